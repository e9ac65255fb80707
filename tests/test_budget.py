"""The budget solver is exactly optimal (brute force on small instances), respects the
budget, fails cleanly when it cannot, and its candidate errors are the projection's."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monarchify.pipeline.allocate import plan_budget, resolved_config
from monarchify.pipeline.knapsack import GRID, BudgetError, solve
from monarchify.pipeline.pricing import (
    CANDIDATES,
    DENSE,
    PRICING_ORDER,
    LayerChoices,
    Option,
    candidate_errors,
    candidate_nblocks,
    layer_choices,
)
from monarchify.config import MonarchConfig
from monarchify.errors import ConfigError
from monarchify.monarch import MonarchLayout, project
from monarchify.monarch.whitening import project_whitened
from monarchify.pipeline import convert
from monarchify.pipeline.plan import plan

from conftest import tiny_bert

F64 = torch.float64


def brute_force(layers, budget):
    best = None
    for combo in itertools.product(*[range(len(options)) for options in layers]):
        params = sum(layers[i][k].params for i, k in enumerate(combo))
        if params <= budget:
            error = sum(layers[i][k].error for i, k in enumerate(combo))
            if best is None or error < best:
                best = error
    return best


@st.composite
def instances(draw):
    n_layers = draw(st.integers(1, 5))
    layers = []
    for _ in range(n_layers):
        n_options = draw(st.integers(1, 4))
        layers.append([
            Option(draw(st.integers(1, 6)), draw(st.integers(1, 40)), draw(st.floats(0, 10, allow_nan=False)))
            for _ in range(n_options)
        ])
    least = sum(min(o.params for o in options) for options in layers)
    most = sum(max(o.params for o in options) for options in layers)
    return layers, draw(st.integers(least, most))


@settings(max_examples=300, deadline=None)
@given(instances())
def test_solver_matches_brute_force_and_respects_the_budget(instance):
    layers, budget = instance
    picks = solve(layers, budget)
    assert len(picks) == len(layers)
    assert sum(layers[i][k].params for i, k in enumerate(picks)) <= budget
    total = sum(layers[i][k].error for i, k in enumerate(picks))
    assert math.isclose(total, brute_force(layers, budget), rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(instances(), st.integers(2, 50_000))
def test_above_the_grid_the_solver_keeps_the_budget_and_loses_at_most_a_unit_per_layer(instance, scale):
    """Large budgets are solved on a grid of GRID cells with prices rounded up: what it picks
    keeps the true budget and is no worse than the exact optimum of a budget one unit per
    layer smaller (the most the rounding can take)."""
    layers, budget = instance
    big = [[Option(o.nblocks, o.params * scale + 7, o.error) for o in options] for options in layers]
    big_budget = budget * scale + 7 * len(layers)
    picks = solve(big, big_budget)
    assert sum(big[i][k].params for i, k in enumerate(picks)) <= big_budget
    unit = -(-big_budget // GRID) if big_budget > GRID else 1
    total = sum(big[i][k].error for i, k in enumerate(picks))
    smaller = brute_force(big, big_budget - unit * len(layers))
    if smaller is not None:
        assert total <= smaller + 1e-9
    assert total >= brute_force(big, big_budget) - 1e-9


def test_a_model_sized_problem_is_solved_whole():
    """Thirty blocks of seven layers with every candidate, at LLM-sized prices: the shape the
    old frontier programme took 47 minutes over. Every layer gets an option and the budget holds."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * 30
    layers = []
    for d_in, d_out in shapes:
        options = [Option(b, MonarchLayout(d_in, d_out, b).weight_params, float(torch.rand((), generator=generator)) / b ** 0.5)
                   for b in candidate_nblocks(d_in, d_out)]
        layers.append(options + [Option(DENSE, d_in * d_out, 0.0)])
    dense = sum(d_in * d_out for d_in, d_out in shapes)
    picks = solve(layers, dense // 2)
    assert sum(layers[i][k].params for i, k in enumerate(picks)) <= dense // 2
    uniform4 = sum(next(o.error for o in options if o.nblocks == 4) for options in layers)
    four_params = sum(next(o.params for o in options if o.nblocks == 4) for options in layers)
    assert four_params <= dense // 2
    assert sum(layers[i][k].error for i, k in enumerate(picks)) <= uniform4


def test_solver_prefers_the_cheaper_of_equal_errors_and_trades_across_layers():
    hard = [Option(4, 10, 0.9), Option(2, 20, 0.1), Option(DENSE, 40, 0.0)]
    easy = [Option(4, 10, 0.2), Option(2, 20, 0.1), Option(DENSE, 40, 0.0)]
    # 40 parameters: uniform nblocks=2 gives 0.2; the solver keeps the hard layer dense? No:
    # dense (40) + anything > 40; best is hard at 2 (0.1) + easy at 2 (0.1) = 0.2, or
    # hard at 2 + easy at 4 (0.3). It must find 0.2 at 40 parameters.
    assert solve([hard, easy], 40) == [1, 1]
    # 30 parameters: spend them on the hard layer.
    assert solve([hard, easy], 30) == [1, 0]
    tie = [Option(4, 10, 0.5), Option(2, 20, 0.5)]
    assert solve([tie], 25) == [0]


def test_infeasible_budget_is_a_clean_error():
    with pytest.raises(BudgetError, match="below the smallest possible"):
        solve([[Option(4, 10, 0.1)], [Option(4, 10, 0.1)]], 19)
    assert issubclass(BudgetError, ConfigError)


def test_candidate_errors_are_the_projection_errors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 36, generator=g, dtype=F64)
    x = torch.randn(300, 36, generator=g, dtype=F64) @ torch.randn(36, 36, generator=g, dtype=F64)
    cov = x.T @ x / 300
    blocks = candidate_nblocks(36, 40)
    assert blocks == [b for b in CANDIDATES if b * b <= 36]
    plain = candidate_errors(w, blocks)
    weighted = candidate_errors(w, blocks, cov, damping=0.01)
    for b in blocks:
        p = project(w, b)
        assert plain[b] == pytest.approx(p.sq_error / p.weight_sq_norm, rel=1e-9)
        wp = project_whitened(w, cov, b, damping=0.01)
        assert weighted[b] == pytest.approx(wp.objective / wp.energy, rel=1e-9)
    # More blocks, fewer parameters, more error.
    errors = [plain[b] for b in blocks]
    assert errors == sorted(errors)


def test_layer_choices_prices_every_option_and_pins():
    w = torch.randn(48, 32, dtype=F64)
    choices = layer_choices("x", w, has_bias=True)
    by_b = {o.nblocks: o for o in choices.options}
    assert by_b[DENSE].params == 48 * 32 + 48 and by_b[DENSE].error == 0.0
    assert by_b[4].params == MonarchLayout(32, 48, 4).weight_params + 48
    assert set(by_b) == {*candidate_nblocks(32, 48), DENSE}
    pinned = layer_choices("x", w, has_bias=False, pinned=2)
    assert [o.nblocks for o in pinned.options] == [2]


def test_budget_plan_on_a_model_beats_uniform_at_equal_parameters():
    model = tiny_bert(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    uniform = MonarchConfig(nblocks=4, budget=0.999)
    plan_all = plan_budget(plan(model, uniform), uniform)
    fraction = plan_all.uniform[4]["fraction"]
    solved = plan_budget(plan(model, MonarchConfig(budget=fraction)), MonarchConfig(budget=fraction))
    assert solved.params_used <= solved.params_budget
    assert solved.error <= solved.uniform[4]["error"] + 1e-12
    # Converting with the resolved recipe gives exactly the planned parameters.
    # Built in the order the budget prices in, so that built and priced errors compare.
    config = resolved_config(MonarchConfig(budget=fraction, output_order=PRICING_ORDER), solved)
    report = convert(model, config)
    dense_kept = solved.dense_layers()
    converted = {layer.name: layer for layer in report.converted}
    assert set(converted) | set(dense_kept) == set(solved.choices)
    used = sum(layer.params_monarch for layer in converted.values()) + sum(
        solved.choices[name].params for name in dense_kept
    )
    assert used == solved.params_used
    for name, layer in converted.items():
        assert layer.nblocks == solved.choices[name].nblocks
        assert layer.rel_error**2 == pytest.approx(solved.choices[name].error, rel=1e-6, abs=1e-12)


def test_budget_respects_selection_and_pins_and_reports_infeasible():
    model = tiny_bert(hidden_size=64, intermediate_size=256)
    config = MonarchConfig(budget=0.4, exclude=["key"], overrides={"query": 2})
    solved = plan_budget(plan(model, config), config)
    names = {layer.name for layer in plan(model, config)}
    assert set(solved.choices) == names
    assert all(solved.choices[n].nblocks == 2 for n in names if n.endswith("query"))
    with pytest.raises(BudgetError, match="below what the candidates allow"):
        plan_budget(plan(model, MonarchConfig(budget=0.01)), MonarchConfig(budget=0.01))


def test_resolved_recipe_solves_to_the_same_plan():
    model = tiny_bert(hidden_size=64, intermediate_size=256)
    config = MonarchConfig(budget=0.45)
    solved = plan_budget(plan(model, config), config)
    resolved = resolved_config(config, solved)
    again = plan_budget(plan(model, resolved), resolved)
    expected = {n: o.nblocks for n, o in solved.choices.items() if o.nblocks is not DENSE}
    assert {n: o.nblocks for n, o in again.choices.items()} == expected


def test_weighted_errors_change_the_choice_towards_what_the_activations_need():
    """With calibration, a layer whose inputs are rank one inside every 8-wide input block
    is (almost) free to compress: the weighted plan gives it the most blocks."""
    model = tiny_bert(hidden_size=64, intermediate_size=256, num_hidden_layers=1)
    names = [layer.name for layer in plan(model, MonarchConfig())]
    target = next(n for n in names if n.endswith("intermediate.dense"))
    g = torch.Generator().manual_seed(0)

    def covariance(name):
        d_in = model.get_submodule(name).in_features
        if name == target:  # block k of 8 is z_k times a fixed direction
            directions = torch.block_diag(*torch.randn(8, 1, d_in // 8, generator=g, dtype=F64))
            x = torch.randn(2000, 8, generator=g, dtype=F64) @ directions
        else:
            x = torch.randn(2000, d_in, generator=g, dtype=F64)
        return x.T @ x / 2000

    config = MonarchConfig(budget=0.35)
    plain = plan_budget(plan(model, config), config)
    weighted = plan_budget(plan(model, config), config, covariance=covariance)
    assert weighted.weighted and not plain.weighted
    assert plain.choices[target].error > 0.3
    assert weighted.choices[target].nblocks == max(candidate_nblocks(64, 256))
    assert weighted.choices[target].error < 0.05
    # The parameters it saves there go to the other layers.
    others = [n for n in names if n != target]
    assert sum(weighted.choices[n].params for n in others) >= sum(plain.choices[n].params for n in others)


def test_the_budget_prices_in_one_order_so_the_output_order_never_changes_the_plan():
    """Blocked and interleaved layers of one weight differ in error layer by layer; the budget
    prices every layer in the interleaved order, so both orders get the same plan."""
    from monarchify.monarch.layout import BLOCKED, INTERLEAVED
    assert PRICING_ORDER == INTERLEAVED
    torch.manual_seed(0)
    model = tiny_bert(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    plans = {
        order: plan_budget(plan(model, MonarchConfig(budget=0.4, output_order=order)), MonarchConfig(budget=0.4, output_order=order))
        for order in (BLOCKED, INTERLEAVED)
    }
    assert plans[BLOCKED].choices == plans[INTERLEAVED].choices
    layer = plan(model, MonarchConfig(budget=0.4))[0]
    blocks = candidate_nblocks(layer.d_in, layer.d_out)
    by_order = {order: candidate_errors(layer.weight, blocks, output_order=order) for order in (BLOCKED, INTERLEAVED)}
    assert any(not math.isclose(by_order[BLOCKED][b], by_order[INTERLEAVED][b], rel_tol=1e-6) for b in blocks)
    priced = {o.nblocks: o.error for o in layer_choices(layer.name, layer.weight, layer.has_bias, output_order=PRICING_ORDER).options}
    assert all(priced[b] == pytest.approx(by_order[INTERLEAVED][b], rel=1e-12) for b in blocks)
    chosen = plans[BLOCKED].choices[layer.name]
    if chosen.nblocks is not DENSE:
        assert chosen.error == pytest.approx(by_order[INTERLEAVED][chosen.nblocks], rel=1e-12)
    # The conversion builds the layers in the order asked for.
    report_model = tiny_bert(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    report_model.load_state_dict(model.state_dict())
    convert(report_model, MonarchConfig(budget=0.4, output_order=BLOCKED))
    from monarchify.monarch import MonarchLinear

    orders = {m.output_order for m in report_model.modules() if isinstance(m, MonarchLinear)}
    assert orders == {BLOCKED}


def test_the_even_objective_spreads_what_the_plain_sum_concentrates():
    """Two equal layers, 25 of their 40 parameters: the plain sum keeps one dense and crushes
    the other (0.5 < 0.3 + 0.3); the sum of squares takes both to the middle (0.18 < 0.25)."""
    from types import SimpleNamespace

    options = [Option(8, 5, 0.5), Option(4, 10, 0.3), Option(DENSE, 20, 0.0)]
    layers = [SimpleNamespace(name=name) for name in ("a", "b")]
    priced = {layer.name: LayerChoices(layer.name, list(options), 20) for layer in layers}
    plain = plan_budget(layers, MonarchConfig(budget=0.625), priced=priced)
    even = plan_budget(layers, MonarchConfig(budget=0.625, budget_objective="even"), priced=priced)
    assert sorted(o.nblocks or 0 for o in plain.choices.values()) == [0, 8]
    assert [o.nblocks for o in even.choices.values()] == [4, 4]
    assert math.isclose(even.error, 2 * 0.3 ** 2) and even.to_dict()["error_kind"].startswith("squared")
    assert priced["a"].options == options  # the caller's prices are not rewritten


@pytest.mark.parametrize("fraction", [0.3, 0.45, 0.62])
def test_the_plan_records_exactly_what_it_changed_against_the_nearest_uniform_plan(fraction):
    from monarchify.cli.render import moved_line
    from monarchify.pipeline.pricing import price_layer

    model = tiny_bert(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    config = MonarchConfig(budget=fraction)
    layers = plan(model, config)
    solved = plan_budget(layers, config)
    nearest = min(solved.uniform, key=lambda b: (abs(solved.uniform[b]["params"] - solved.params_used), b))
    uniform = {layer.name: next(o for o in price_layer(layer, config, None).options if o.nblocks == nearest) for layer in layers}
    differ = {name for name, option in solved.choices.items() if option.nblocks != uniform[name].nblocks}
    assert set(solved.moved) == differ
    for name, move in solved.moved.items():
        assert move["uniform_nblocks"] == nearest and move["nblocks"] == solved.choices[name].nblocks
        assert move["uniform_error"] == pytest.approx(uniform[name].error) and move["error"] == pytest.approx(solved.choices[name].error)
    # the changes account for the whole difference in parameters and error
    assert sum(m["params_change"] for m in solved.moved.values()) == solved.params_used - solved.uniform[nearest]["params"]
    assert sum(m["error"] - m["uniform_error"] for m in solved.moved.values()) == pytest.approx(
        solved.error - solved.uniform[nearest]["error"], abs=1e-9)
    assert solved.to_dict().get("moved", {}) == solved.moved
    if solved.moved:
        line = moved_line(solved.moved, names=1)
        assert line.startswith(f"against uniform {nearest} blocks the budget changed {len(solved.moved)} layers")
        # one group per option the moved layers took, with its count, parameters and error
        destinations = Counter(solved.choices[name].nblocks for name in solved.moved)
        for nblocks, count in destinations.items():
            what = "kept dense" if nblocks is None else f"at {nblocks} blocks"
            group = [n for n in solved.moved if solved.choices[n].nblocks == nblocks]
            error = sum(solved.moved[n]["error"] - solved.moved[n]["uniform_error"] for n in group)
            assert f"{count} {what} (" in line and f"error {error:+.3f}" in line
        assert sum(name in line for name in solved.moved) == len(destinations)
