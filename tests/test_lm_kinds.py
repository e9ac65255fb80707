"""Allocation by layer kind: kinds named as in a block, the exact choice under a budget (against
brute force), and the measurement that swaps one kind in and puts the dense layers back."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from monarchify.errors import ConfigError
from monarchify.lm.kinds import KindOption, choose, group_by_kind, kind_of, kind_pattern, measure
from monarchify.pipeline.plan import name_matches


def test_a_kind_is_the_name_inside_the_block():
    assert kind_of("model.layers.12.mlp.up_proj") == "mlp.up_proj"
    assert kind_of("transformer.h.0.attn.c_proj") == "attn.c_proj"
    assert kind_of("transformer.h.3.mlp.c_proj") == "mlp.c_proj"
    assert kind_of("lm_head") == "lm_head"
    names = [f"model.layers.{i}.{k}" for i in range(3) for k in ("self_attn.q_proj", "mlp.up_proj")]
    kinds = group_by_kind(names)
    assert list(kinds) == ["self_attn.q_proj", "mlp.up_proj"] and all(len(v) == 3 for v in kinds.values())
    for kind, members in kinds.items():  # the pattern selects exactly the kind's layers
        assert [n for n in names if name_matches(kind_pattern(kind), n)] == members
    assert not name_matches(kind_pattern("mlp.c_proj"), "transformer.h.0.attn.c_proj")


def _brute(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        params, loss = sum(o.params for o in combo), sum(o.loss for o in combo)
        if params <= budget and (best is None or (loss, params) < best[0]):
            best = ((loss, params), combo)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_choice_is_the_least_loss_that_fits(seed):
    rng = random.Random(seed)
    options = {}
    for k in range(rng.randint(1, 6)):
        full = rng.randint(50, 500)
        options[f"kind{k}"] = [KindOption(None, full, 0.0)] + [
            KindOption(b, max(1, int(full * 2 / (b + rng.random()))), rng.random() * b) for b in rng.sample([2, 3, 4], rng.randint(0, 3))]
    budget = rng.randint(sum(min(o.params for o in v) for v in options.values()), sum(v[0].params for v in options.values()))
    plan = choose(options, budget)
    best = _brute(options, budget)
    assert list(plan) == list(options)
    assert sum(o.params for o in plan.values()) <= budget
    assert sum(o.loss for o in plan.values()) == pytest.approx(best[0][0], abs=1e-12)


def test_a_budget_nothing_fits_is_refused():
    with pytest.raises(ConfigError, match="raise the budget"):
        choose({"a": [KindOption(None, 100, 0.0), KindOption(2, 60, 1.0)]}, 59)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 4)
        self.down = nn.Linear(4, 4)


def test_measure_swaps_one_kind_in_and_puts_the_dense_layers_back():
    torch.manual_seed(0)
    dense = nn.Module()
    dense.layers = nn.ModuleList([Block(), Block()])
    converted = nn.Module()
    converted.layers = nn.ModuleList([Block(), Block()])
    for block in converted.layers:  # stand-ins for converted layers: another type
        block.up = nn.Bilinear(2, 2, 4)
    originals = {n: m for n, m in dense.named_modules()}
    names = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]

    def score(model):  # how many layers are the converted model's
        return float(sum(model.get_submodule(n) is converted.get_submodule(n) for n in names))

    seen = []
    result = measure(dense, {2: converted}, group_by_kind(names), score, lambda k, b, v: seen.append((k, b, v)))
    # "down" was not converted there (same type as the dense layer): not an option at 2 blocks
    assert result == {("up", 2): 2.0} and seen == [("up", 2, 2.0)]
    assert all(dense.get_submodule(n) is originals[n] for n in names)
