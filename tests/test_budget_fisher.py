"""``budget_objective="fisher"``: every layer's error in the model's own loss. The Fisher weights
against autograd and against the closed form of a softmax, the weighted prices against the
projections they price, and the objective through both conversion paths."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import monarchify
from monarchify.config import CalibrationConfig, MonarchConfig
from monarchify.errors import ConfigError
from monarchify.hf.convert import convert_pretrained
from monarchify.hf.loading import load_tokenizer
from monarchify.monarch.layout import BLOCKED, INTERLEAVED, MonarchLayout
from monarchify.monarch.projection import assemble, project
from monarchify.monarch.whitening import diagonal_blocks, padded_covariance, project_whitened
from monarchify.pipeline import convert
from monarchify.pipeline.observe import FISHER_ROWS
from monarchify.pipeline.observe import _sampled_log_likelihood, output_fisher
from monarchify.pipeline.pricing import candidate_errors
from monarchify.samples import read_samples

from conftest import tiny_llama
from test_streaming_calibration import CALIBRATION, source, text_file, tokenizers  # noqa: F401 (fixture)


class Classifier(nn.Module):
    """Embeddings, then a linear head whose output is the logits."""

    def __init__(self, vocab: int = 7, width: int = 5, classes: int = 4) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, classes)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.head(self.embed(input_ids)))


def test_the_fisher_of_a_softmax_head_is_p_times_one_minus_p():
    """The gradient of ``log p(y)`` with respect to the logits, for ``y`` drawn from ``p``, is
    ``onehot(y) - p``; its mean square in channel ``j`` is ``p_j (1 - p_j)``."""
    torch.manual_seed(0)
    model = Classifier()
    ids = torch.randint(0, 7, (40, 500))
    fisher = output_fisher(model, {"head": model.head}, [{"input_ids": ids}])["head"]
    with torch.no_grad():
        p = torch.softmax(model.head(model.embed(ids)), dim=-1).double().reshape(-1, 4)
    expected = (p * (1 - p)).mean(dim=0)
    assert fisher.shape == (4,)
    assert torch.allclose(fisher, expected, rtol=0.03), (fisher, expected)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_the_fisher_weights_are_the_mean_squared_output_gradients_of_real_tokens():
    """Against plain autograd on the same drawn outputs: gradients retained on every layer's
    output, padded positions left out of the mean, batches split as the measurement splits them."""
    model = tiny_llama(vocab_size=50)
    names = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    modules = {name: model.get_submodule(name) for name in names}
    ids = torch.randint(0, 50, (FISHER_ROWS + 2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[-1, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    measured = output_fisher(model, modules, [batch], seed=3)

    generator = torch.Generator().manual_seed(3)
    sums = {name: 0.0 for name in names}
    for start in range(0, len(ids), FISHER_ROWS):
        part = {k: v[start:start + FISHER_ROWS] for k, v in batch.items()}
        outputs = {}
        handles = [module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
                   for name, module in modules.items()]
        out = model(**part)
        for handle in handles:
            handle.remove()
        for tensor in outputs.values():
            tensor.retain_grad()
        _sampled_log_likelihood(out, part["attention_mask"].bool(), generator).backward()
        for name in names:
            sums[name] = sums[name] + outputs[name].grad.double().square().sum(dim=(0, 1))
    model.zero_grad(set_to_none=True)
    real = int(mask.sum())
    for name in names:
        assert torch.allclose(measured[name], sums[name] / real, rtol=1e-6, atol=0), name
        assert (measured[name] > 0).all(), name


@pytest.mark.parametrize("order", [BLOCKED, INTERLEAVED])
@pytest.mark.parametrize("shape", [(24, 40), (36, 36), (50, 20)])
@pytest.mark.parametrize("calibrated", [False, True])
def test_weighted_prices_are_the_weighted_errors_of_the_projections(shape, order, calibrated):
    """The price of every block count is ``Σ_j s_j ((W - M) C_bd (W - M)ᵀ)_jj`` of the very
    projection the projector builds, computed here the long way in float64 (padding included:
    24→40 and 50→20 do not divide by every candidate)."""
    torch.manual_seed(sum(shape))
    d_out, d_in = shape
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    s = torch.rand(d_out, dtype=torch.float64) * 3
    x = torch.randn(300, d_in, dtype=torch.float64) * torch.linspace(0.2, 3, d_in, dtype=torch.float64)
    cov = x.T @ x / len(x) if calibrated else None
    nblocks = [b for b in (2, 3, 4) if not MonarchLayout(d_in, d_out, b).has_structural_zeros]
    priced = candidate_errors(w, nblocks, cov, output_order=order, row_weights=s)
    for b in nblocks:
        layout = MonarchLayout(d_in, d_out, b, order)
        if cov is None:
            p = project(w, b, output_order=order)
            c = torch.eye(d_in, dtype=torch.float64)
        else:
            p = project_whitened(w, cov, b, output_order=order).projection
            c = torch.block_diag(*diagonal_blocks(padded_covariance(cov, layout, 0.01), layout))[:d_in, :d_in]
        delta = w - assemble(p.L.double(), p.R.double(), layout)
        expected = float((s * torch.diagonal(delta @ c @ delta.T)).sum())
        assert priced[b] == pytest.approx(expected, rel=1e-8), b
    # Unit weights give back the unweighted error times the whitened energy: one metric.
    unit = candidate_errors(w, nblocks, cov, output_order=order, row_weights=torch.ones(d_out, dtype=torch.float64))
    relative = candidate_errors(w, nblocks, cov, output_order=order)
    ratios = [unit[b] / relative[b] for b in nblocks]
    if cov is None:
        assert ratios == pytest.approx([float(w.square().sum())] * len(nblocks), rel=1e-8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_fisher_objective_chooses_the_same_plan_block_by_block_and_whole(tmp_path, tokenizers, arch):
    """The block-by-block conversion (a loaded model) runs the whole model forward and backward
    once for the weights, then prices block by block: the same plan and factors as the library's
    whole-model pass, recorded as a Fisher-priced budget in the saved recipe."""
    src = source(tmp_path, tokenizers, arch)
    data = text_file(tmp_path)
    config = MonarchConfig(nblocks=4, calibration=CALIBRATION, budget=0.45, budget_objective="fisher")
    model = AutoModelForCausalLM.from_pretrained(src)
    whole = monarchify.convert(model, config, samples=read_samples(data, 9, 4), tokenizer=load_tokenizer(src))
    blocks = convert_pretrained(src, tmp_path / "out", config, calibration_data=data, stream=False, check=False)
    assert blocks.report.meta["budget"] == whole.meta["budget"]
    assert whole.meta["budget"]["error_kind"].startswith("Fisher")
    assert whole.meta["budget"]["params_used"] <= whole.meta["budget"]["params_budget"]
    mine = {k: v for k, v in blocks.model.state_dict().items() if k.endswith((".L", ".R"))}
    theirs = {k: v for k, v in model.state_dict().items() if k.endswith((".L", ".R"))}
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["recipe"]
    assert recipe["budget_objective"] == "fisher"
    # The recorded recipe pins every layer: re-applied, it needs no gradients and gives the same layers.
    again = convert(AutoModelForCausalLM.from_pretrained(src), MonarchConfig.from_dict({**recipe, "calibration": None}))
    assert {(l.name, l.nblocks) for l in again.converted} == {(l.name, l.nblocks) for l in whole.converted}


def test_a_layer_the_loss_ignores_is_compressed_hardest():
    """Two layers alike in weights and inputs, one feeding the head ten times more strongly:
    the Fisher prices give the quiet one the fewest parameters (the relative errors, equal for
    both, cannot tell them apart)."""
    from monarchify.pipeline.allocate import plan_budget
    from monarchify.pipeline.plan import plan

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(30, 32)
            self.loud, self.quiet = nn.Linear(32, 32), nn.Linear(32, 32)
            with torch.no_grad():
                self.quiet.weight.copy_(self.loud.weight)
            self.head = nn.Linear(32, 30)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, attention_mask=None):
            x = self.embed(input_ids)
            return types.SimpleNamespace(logits=self.head(3.0 * self.loud(x) + 0.3 * self.quiet(x)))

    torch.manual_seed(0)
    model = Two()
    config = MonarchConfig(include=["loud", "quiet"], nblocks=4, budget=0.6, budget_objective="fisher")
    layers = plan(model, config)
    ids = torch.randint(0, 30, (8, 16))
    fisher = output_fisher(model, {l.name: l.module for l in layers}, [{"input_ids": ids}])
    x = model.embed(ids).detach().reshape(-1, 32).double()
    cov = x.T @ x / len(x)
    chosen = plan_budget(layers, config, covariance=lambda name: cov, row_weights=fisher).choices
    assert chosen["quiet"].params < chosen["loud"].params, chosen
    from monarchify.pipeline.pricing import price_layer

    relative = [[o.error for o in price_layer(layer, MonarchConfig(include=["loud", "quiet"], nblocks=4, budget=0.6),
                                              cov).options] for layer in layers]
    assert relative[0] == pytest.approx(relative[1])


def test_the_fisher_objective_needs_a_budget_calibration_and_plain_monarch():
    with pytest.raises(ConfigError, match="needs a budget"):
        MonarchConfig(budget_objective="fisher")
    with pytest.raises(ConfigError, match="plain Monarch"):
        MonarchConfig(budget=0.5, budget_objective="fisher", budget_ranks=[8])
    with pytest.raises(ConfigError, match="plain Monarch"):
        MonarchConfig(budget=0.5, budget_objective="fisher", structure="lowrank")
    with pytest.raises(ConfigError, match="calibrate the conversion"):
        convert(tiny_llama(), MonarchConfig(budget=0.5, budget_objective="fisher"))


def test_a_model_without_input_embeddings_is_a_clean_error():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)

        def forward(self, input_ids):
            return self.layer(input_ids.float())

    from monarchify.samples import SampleError

    model = Bare()
    with pytest.raises(SampleError, match="input embeddings"):
        output_fisher(model, {"layer": model.layer}, [{"input_ids": torch.ones(2, 4, dtype=torch.long)}])
