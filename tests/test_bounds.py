"""The covering bound (solvers/bounds.py) on hand-made graphs whose ops release their outputs one by one."""

from __future__ import annotations

import dataclasses
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remat import planner
from remat.graph import Graph
from remat.planner import _focus_bound, _tighten_bound, solve
from remat.schedule import Schedule
from remat.simulate import simulate
from solvers import bounds
from solvers.base import OPTIMAL, SolveOptions
from solvers.bounds import covering_bound, most_crowded, recomputed_again
from solvers.checkmate import solve_checkmate
from solvers.cover_round import solve_cover_round
from tests.graphs import chain_training_graph, eager_schedule, make_graph
from tests.test_solver_properties import budget_between


def test_an_input_output_that_the_op_does_not_read_may_be_recomputed():
    # n0 has two outputs: A (read by n1, n2, n3) and B (read only by n4). While n3 runs, B need not be in memory:
    # release it after n0 and run n0 again for n4. That fits 2 bytes, so the bound must not call 2 infeasible.
    graph = make_graph([[], [0], [0], [0], [0]], [2, 0, 0, 1, 0], [0.1] * 5)
    nodes = list(graph.nodes)
    nodes[0] = dataclasses.replace(nodes[0], part_bytes=(1, 1), part_users=((1, 2, 3), (4,)))
    graph = dataclasses.replace(graph, nodes=tuple(nodes))
    schedule = Schedule.from_json({"num_nodes": 5, "ops": [["compute", 0], ["compute", 1], ["compute", 2],
                                                           ["compute", 3], ["free", 3], ["free", 0],
                                                           ["compute", 0], ["compute", 4], ["free", 0]]})
    sim = simulate(graph, schedule)
    assert sim.valid and sim.peak_bytes == 2
    bound = covering_bound(graph, 2, SolveOptions(time_limit_s=10))
    assert not bound.proven_infeasible
    assert bound.lower_bound_s <= sim.compute_s * (1 + 1e-9)


def test_recomputing_a_value_needs_the_released_output_it_reads_back():
    # n0 has two outputs: A (read by n1 only) and S (read by n6). While n3 and n4 run, n1, S and two 4-byte values
    # are in memory: 13 bytes. At 12, either S goes (n0 runs again for n6: 1.0 s) or n1 goes, and n1 run again
    # needs A, released after n1: n0 runs again too (1.1 s). The bound must count n0 either way, not just n1.
    graph = make_graph([[], [0], [1], [2], [3], [4], [5, 1, 0]], [5, 4, 4, 4, 4, 1, 1], [1.0] + [0.1] * 6)
    nodes = list(graph.nodes)
    nodes[0] = dataclasses.replace(nodes[0], part_bytes=(4, 1), part_users=((1,), (6,)))
    graph = dataclasses.replace(graph, nodes=tuple(nodes))
    assert covering_bound(graph, 13, SolveOptions(time_limit_s=10)).lower_bound_s == graph.compute_s
    bound = covering_bound(graph, 12, SolveOptions(time_limit_s=10))
    assert bound.lower_bound_s == pytest.approx(graph.compute_s + 1.0)
    plan = solve_cover_round(graph, 12, bound)  # drop S: it meets the bound
    assert plan.objective_s == pytest.approx(graph.compute_s + 1.0)
    assert simulate(graph, plan.schedule).fits(12)


@pytest.mark.parametrize("layers, budget, optimum", [
    # A 10-layer chain's training step (21 unit-cost ops) at 50 bytes. The backward needs the dropped activations
    # back: recomputing a late one brings the earlier ones back on the way, and holding them all until their own
    # backward does not fit, so some are dropped again and computed a third time. Counting each recomputed value
    # once gives 28 s; counting those second recomputations (pairs of crowded moments) gives 32 s, the optimum.
    (10, 50, 32.0),
    # An 8-layer chain's step at 40 bytes: two activations besides the gradient. The early activations are
    # computed again for each later backward (revolve's quadratic regime): counting a value's computations in
    # disjoint intervals between crowded moments gives the optimum, 38 s. Counting at most two of each gave 28 s.
    (8, 40, 38.0),
], ids=["second computations", "computations in disjoint intervals add up"])
def test_values_computed_again_and_again_count_each_time(layers, budget, optimum):
    graph = chain_training_graph(layers)
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    assert bound.method == "covering" and bound.lower_bound_s == pytest.approx(optimum)
    exact = solve_checkmate(graph, budget, SolveOptions(time_limit_s=60, mip_gap=1e-9))  # proves it on its own
    assert exact.status == OPTIMAL and exact.objective_s == pytest.approx(optimum)


def test_graphs_over_count_max_nodes_count_two_recomputations_at_most(monkeypatch):
    monkeypatch.setattr(bounds, "COUNT_MAX_NODES", 16)  # the 17-node chain step counts as large
    bound = covering_bound(chain_training_graph(8), 40, SolveOptions(time_limit_s=10))
    assert bound.lower_bound_s == pytest.approx(28.0)


def test_a_24_layer_chain_at_its_smallest_budget_is_proven_optimal_by_the_plan_from_the_bound():
    # 49 nodes: every crowded moment is chained (chained_moments_for). The cover-round plan costs 302 s and the
    # bound proves it; with 12 chained moments the bound was 236 s, and the whole MILP's own bound after 30 s lower.
    graph = chain_training_graph(24)
    assert bounds.chained_moments_for(len(graph)) == 24
    plan = solve(graph, 40, time_limit_s=30)
    assert plan.status == OPTIMAL and plan.compute_s == pytest.approx(302.0)
    assert plan.lower_bound_s == pytest.approx(302.0, rel=1e-6) and simulate(graph, plan.schedule).fits(40)
    assert plan.picked.startswith("cover-round")  # proven at once, before any MILP (which ran 30 s before)
    assert covering_bound(graph, 40, SolveOptions(time_limit_s=10), chained_moments=12).lower_bound_s < 300


@st.composite
def training_steps(draw, max_layers: int = 8) -> Graph:
    """A training step like autograd's: forward ops reading the previous one and now and then an earlier one (a
    skip), a loss, then one backward op per forward op, in reverse, reading the gradients of its forward op's
    readers, its forward op's inputs and (mostly) its output. Sizes and costs vary."""
    layers = draw(st.integers(3, max_layers))
    deps: list[list[int]] = []
    for k in range(layers):
        skip = [draw(st.integers(0, k - 2))] if k >= 2 and draw(st.booleans()) else []
        deps.append(sorted({k - 1, *skip}) if k else [])
    deps.append([layers - 1])  # the loss
    gradients: dict[int, list[int]] = {k: [] for k in range(layers)}
    gradients[layers - 1].append(layers)
    for k in reversed(range(layers)):
        reads_output = [k] if draw(st.booleans()) else []
        deps.append(sorted({*gradients[k], *deps[k], *reads_output}))
        for j in deps[k]:
            gradients[j].append(len(deps) - 1)
    n = len(deps)
    sizes = draw(st.lists(st.sampled_from([2, 5, 8, 10, 13]), min_size=n, max_size=n))
    costs = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=n, max_size=n))
    return make_graph(deps, sizes, costs, outputs=[layers, n - 1],
                      backward=[False] * (layers + 1) + [True] * layers)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=training_steps(), fraction=st.floats(0.0, 0.5))
def test_with_every_moment_chained_the_bound_never_exceeds_the_optimum(graph, fraction):
    # Steps of up to 17 nodes, too many for exhaustive search: Checkmate's MILP, which equals it on the small
    # graphs (tests/test_solver_properties.py), gives the optimum. Tight budgets, where values are computed often.
    budget = budget_between(graph, fraction)
    exact = solve_checkmate(graph, budget, SolveOptions(time_limit_s=60, mip_gap=1e-9))
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=30), chained_moments=len(graph))
    if exact.status != OPTIMAL:
        assert exact.status == "infeasible" and exact.schedule is None
        return
    assert not bound.proven_infeasible
    assert graph.compute_s - 1e-9 <= bound.lower_bound_s <= exact.objective_s * (1 + 1e-9)


def test_most_crowded_keeps_the_moments_furthest_over_until_the_term_limit_in_their_order():
    moments = [(5, 1, {0: 5}), (9, 2, {0: 5, 1: 4}), (7, 3, {1: 4, 2: 3}), (9, 4, {2: 3, 3: 6})]
    assert most_crowded(moments, 8) == moments
    assert most_crowded(moments, 5) == [(9, 2, {0: 5, 1: 4}), (9, 4, {2: 3, 3: 6})]  # ties: the later first
    assert most_crowded(moments, 2) == [(9, 4, {2: 3, 3: 6})]
    assert most_crowded(moments, 0) == [(9, 4, {2: 3, 3: 6})]  # never none: the bound needs a moment over


def test_a_covering_model_past_its_term_limit_is_still_a_bound(monkeypatch):
    # A 2-layer LSTM unrolled over 128 steps has 6.2M (C_t) terms: a subset of the moments gives a lower bound
    graph = chain_training_graph(10)
    full = covering_bound(graph, 50, SolveOptions(time_limit_s=10))
    assert full.lower_bound_s == pytest.approx(32.0)  # the optimum (Checkmate's MILP)
    monkeypatch.setattr(bounds, "MAX_MOMENT_TERMS", 20)
    capped = covering_bound(graph, 50, SolveOptions(time_limit_s=10))
    assert graph.compute_s < capped.lower_bound_s < full.lower_bound_s


def test_graphs_over_pairs_max_nodes_go_without_second_computations(monkeypatch):
    monkeypatch.setattr(bounds, "PAIRS_MAX_NODES", 20)  # the 21-node chain step counts as large
    bound = covering_bound(chain_training_graph(10), 50, SolveOptions(time_limit_s=10))
    assert bound.lower_bound_s == pytest.approx(28.0)  # each recomputed value counted once


def test_an_op_holding_the_output_a_reader_needs_and_dropping_another_is_not_computed_twice():
    # n1's outputs: A (read by n3) and B (read by n4). While n2 runs (4 bytes of workspace) only one byte fits
    # besides: n0 goes (computed again for n3) and so does B (n1 again for n4), while A stays. The covering's y says
    # n1 is absent at n2 (it credits both outputs), but that must not be read as "A is gone, so n1 is computed
    # again before n3, and again for n4": this schedule computes n0 and n1 twice each, 0.7 s.
    graph = make_graph([[], [0], [], [0, 1], [0, 1, 2]], [2, 2, 0, 2, 0], [0.1] * 5)
    nodes = list(graph.nodes)
    nodes[1] = dataclasses.replace(nodes[1], part_bytes=(1, 1), part_users=((3,), (4,)))
    nodes[2] = dataclasses.replace(nodes[2], workspace_bytes=4)
    graph = dataclasses.replace(graph, nodes=tuple(nodes))
    schedule = Schedule.from_json({"num_nodes": 5, "ops": [
        ["compute", 0], ["compute", 1], ["free", 0], ["compute", 2], ["compute", 0], ["compute", 3], ["free", 1],
        ["free", 3], ["compute", 1], ["compute", 4], ["free", 0], ["free", 1], ["free", 2], ["free", 4]]})
    sim = simulate(graph, schedule)
    assert sim.valid and sim.peak_bytes == 5 and sim.compute_s == pytest.approx(0.7)
    assert covering_bound(graph, 5, SolveOptions(time_limit_s=10)).lower_bound_s <= sim.compute_s * (1 + 1e-9)


def test_time_a_plan_leaves_raises_a_cut_short_covering_bound_to_a_proof():
    graph = chain_training_graph(layers=10, activation_bytes=10)
    budget = budget_between(graph, 0.5)
    plan = solve(graph, budget, time_limit_s=20)
    assert plan.status == OPTIMAL and plan.compute_s > graph.compute_s
    # the same plan as if its covering MILP had been stopped at its root: the bound is only "every node once"
    cut = dataclasses.replace(plan, status="feasible", lower_bound_s=graph.compute_s,
                              lower_bound_method="covering (dual bound at the time limit)")
    now = time.perf_counter()
    assert _tighten_bound(cut, now, now + 1.0, print) is cut  # under TIGHTEN_MIN_S left: nothing to do
    tightened = _tighten_bound(cut, now, now + 20.0, print)
    assert tightened.status == OPTIMAL and tightened.lower_bound_method == "covering"
    assert tightened.lower_bound_s == pytest.approx(plan.compute_s, rel=1e-9)
    assert tightened.schedule is plan.schedule


def test_recomputed_again_finds_the_stretches_between_a_values_recomputations():
    # A 4-layer chain's step (f0..f3, loss 4, b3..b0 as 5..8), each backward rebuilding what it reads from f0: f0 is
    # computed again in stages 5, 6 and 7, f1 in 5 and 6, f2 in 5 only (twice in all: no stretch).
    graph = chain_training_graph(4)
    schedule = Schedule.from_pairs([
        ("compute", 0), ("compute", 1), ("free", 0), ("compute", 2), ("free", 1), ("compute", 3), ("free", 2),
        ("compute", 4),
        ("compute", 0), ("compute", 1), ("free", 0), ("compute", 2), ("free", 1), ("compute", 5), ("free", 4),
        ("free", 3),
        ("compute", 0), ("compute", 1), ("free", 0), ("compute", 6), ("free", 5), ("free", 2),
        ("compute", 0), ("compute", 7), ("free", 6), ("free", 1),
        ("compute", 8), ("free", 7), ("free", 0), ("free", 8)], len(graph))
    sim = simulate(graph, schedule)
    assert sim.valid and sim.compute_counts[:4] == (4, 3, 2, 1)
    assert recomputed_again(graph, [schedule]) == [(5, 6), (6, 7)]  # (5, 6) first: f0 and f1 are computed at its ends
    assert recomputed_again(graph, [schedule, schedule]) == [(5, 6), (6, 7)]
    assert recomputed_again(graph, [eager_schedule(graph)]) == []


def exact_and_focused(graph, budget):
    exact = solve_checkmate(graph, budget, SolveOptions(time_limit_s=60, mip_gap=1e-9))
    assert exact.status == OPTIMAL
    return exact, recomputed_again(graph, [exact.schedule])


def test_moments_between_a_plans_recomputations_raise_the_bound():
    # An 8-layer chain's step at 40 bytes (optimum 38 s, revolve's regime): with one chained moment, where the forward
    # turns into the backward, the bound counts each early activation's recomputations once or twice; chained
    # moments between the optimal schedule's recomputations count the rest.
    graph = chain_training_graph(8)
    exact, stretches = exact_and_focused(graph, 40)
    assert exact.objective_s == pytest.approx(38.0) and stretches
    alone = covering_bound(graph, 40, SolveOptions(time_limit_s=10), chained_moments=1)
    focused = covering_bound(graph, 40, SolveOptions(time_limit_s=10), chained_moments=1, focus=stretches)
    assert alone.lower_bound_s < focused.lower_bound_s - 5 and focused.lower_bound_s <= 38.0 * (1 + 1e-9)


def test_the_planner_raises_its_bound_at_the_moments_its_plan_brings_values_back(monkeypatch):
    monkeypatch.setattr(bounds, "CHAINED_MOMENTS", 1)  # as on a large graph: one chained moment, where the turn is
    monkeypatch.setattr(bounds, "CHAINED_NODE_MOMENTS", 0)
    graph = chain_training_graph(8)
    exact, _ = exact_and_focused(graph, 40)
    alone = covering_bound(graph, 40, SolveOptions(time_limit_s=10))
    plan = solve(graph, 40, time_limit_s=20)
    assert plan.compute_s == pytest.approx(38.0)
    cut = dataclasses.replace(plan, status="feasible", lower_bound_s=alone.lower_bound_s, lower_bound_method="covering",
                              schedule=exact.schedule, simulation=simulate(graph, exact.schedule))
    now = time.perf_counter()
    assert _focus_bound(cut, now, now + 1.0, print) is cut  # under TIGHTEN_MIN_S left: nothing to do
    focused = _focus_bound(cut, now, now + 20.0, print)
    assert alone.lower_bound_s + 5 < focused.lower_bound_s <= 38.0 * (1 + 1e-9)
    # the focused solve chains FOCUS_CROWDED_MOMENTS crowded moments: those alone are not what raised it
    crowded = covering_bound(graph, 40, SolveOptions(time_limit_s=10), chained_moments=planner.FOCUS_CROWDED_MOMENTS)
    assert crowded.lower_bound_s + 3 < focused.lower_bound_s
    assert focused.lower_bound_method == "covering, focused on plans' recomputations"
    assert focused.schedule is cut.schedule


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=training_steps(), fraction=st.floats(0.0, 0.5), data=st.data())
def test_moments_anywhere_in_focus_keep_the_bound_under_the_optimum(graph, fraction, data):
    budget = budget_between(graph, fraction)
    exact = solve_checkmate(graph, budget, SolveOptions(time_limit_s=60, mip_gap=1e-9))
    if exact.status != OPTIMAL:
        return
    n = len(graph)
    stretches = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, n)).filter(lambda s: s[0] < s[1]),
                                   max_size=6))
    stretches += recomputed_again(graph, [exact.schedule])
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=30), chained_moments=1, focus=stretches)
    assert graph.compute_s - 1e-9 <= bound.lower_bound_s <= exact.objective_s * (1 + 1e-9)
