"""Checkmate's LP rounding: valid schedules within the budget, LP bound <= MILP optimum <= rounded cost."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remat.graph import Graph
from remat.simulate import simulate
from solvers.base import FEASIBLE, INFEASIBLE, NO_SOLUTION, OPTIMAL, SolveOptions, SolverResult
from solvers.checkmate import solve_checkmate
from solvers.lp_round import recompute_given_storage, schedule_for_storage, solve_lp_round
from tests.bruteforce import cheapest_schedule
from tests.graphs import ancestors, chain_training_graph, eager_schedule, make_graph
from tests.test_checkmate import EXACT, small_training_graphs, store_all

FAST = SolveOptions(time_limit_s=20)


def check_result(graph: Graph, budget: int, result: SolverResult) -> None:
    """A returned schedule is valid, fits, and costs objective_s; the bounds are ordered."""
    assert result.status in (OPTIMAL, FEASIBLE, NO_SOLUTION)
    assert {"lp_seconds", "trials", "fitting_trials"} <= result.detail.keys()
    assert result.lower_bound_s is not None and result.lower_bound_s >= graph.compute_s * (1 - 1e-12)
    if result.schedule is None:
        assert result.status == NO_SOLUTION and result.objective_s is None
        return
    sim = simulate(graph, result.schedule)
    assert sim.valid, sim.errors
    assert sim.peak_bytes <= budget
    assert result.objective_s == sim.compute_s
    assert result.lower_bound_s <= result.objective_s
    assert result.detail["fitting_trials"] >= 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=small_training_graphs(), fraction=st.floats(0.0, 1.0))
def test_lp_bound_and_rounded_cost_bracket_the_optimum(graph, fraction):
    low, high = graph.min_budget_lower_bound(), simulate(graph, store_all(graph)).peak_bytes
    budget = low + round(fraction * max(0, high - low))
    result = solve_lp_round(graph, budget, FAST)
    best = cheapest_schedule(graph, budget)
    if best is None:  # no schedule fits: the LP may prove it, or rounding finds nothing
        assert result.status in (INFEASIBLE, NO_SOLUTION) and result.schedule is None
        return
    assert result.status != INFEASIBLE  # an infeasible LP would be a wrong proof
    check_result(graph, budget, result)
    optimum = solve_checkmate(graph, budget, EXACT).objective_s
    assert optimum == pytest.approx(best.compute_s, rel=1e-6)
    assert result.lower_bound_s <= optimum * (1 + 1e-6)
    if result.schedule is not None:
        assert optimum <= result.objective_s * (1 + 1e-9)
        if result.status == OPTIMAL:
            assert result.objective_s == pytest.approx(optimum, rel=1e-6)


@pytest.mark.parametrize("layers,fraction", [(10, 0.5), (12, 0.7), (15, 0.4), (20, 0.6)])
def test_chain_graphs_between_the_floor_and_the_store_all_peak(layers, fraction):
    graph = chain_training_graph(layers)
    low, high = graph.min_budget_lower_bound(), simulate(graph, store_all(graph)).peak_bytes
    budget = low + round(fraction * (high - low))
    result = solve_lp_round(graph, budget, FAST)
    check_result(graph, budget, result)
    assert result.status in (OPTIMAL, FEASIBLE)  # these budgets leave room: rounding must find a schedule


def test_store_all_budget_needs_no_recomputation():
    graph = chain_training_graph(10)
    budget = simulate(graph, store_all(graph)).peak_bytes
    result = solve_lp_round(graph, budget, FAST)
    check_result(graph, budget, result)
    assert result.objective_s == pytest.approx(graph.compute_s)
    assert result.status == OPTIMAL  # the LP bound (each node once) is met


def test_lp_round_is_never_below_the_milp_optimum_on_a_chain():
    graph = chain_training_graph(6)
    budget = max(graph.min_budget_lower_bound(), simulate(graph, store_all(graph)).peak_bytes * 2 // 3)
    optimum = solve_checkmate(graph, budget, EXACT)
    result = solve_lp_round(graph, budget, FAST)
    check_result(graph, budget, result)
    assert result.lower_bound_s <= optimum.objective_s * (1 + 1e-9) <= result.objective_s * (1 + 1e-9)


def test_budget_below_the_floor_is_infeasible():
    graph = chain_training_graph(4)
    result = solve_lp_round(graph, graph.min_budget_lower_bound() - 1, FAST)
    assert result.status == INFEASIBLE and result.schedule is None


def test_all_zero_storage_recomputes_every_ancestor():
    graph = chain_training_graph(5)
    n = len(graph)
    R = recompute_given_storage(graph, [[0] * n for _ in range(n)])
    for t in range(n):  # stage t computes exactly t and its ancestors
        assert {i for i in range(n) if R[t][i]} == ancestors(graph, t)
    sim = simulate(graph, schedule_for_storage(graph, [[0] * n for _ in range(n)]))
    assert sim.valid, sim.errors
    assert sim.compute_s > graph.compute_s


@pytest.mark.parametrize("make_schedule", [store_all, eager_schedule])
def test_store_all_storage_needs_no_recomputation(make_schedule):
    graph = chain_training_graph(6)
    _, S = make_schedule(graph).to_matrices()
    R = recompute_given_storage(graph, S)
    assert R == [[int(i == t) for i in range(len(graph))] for t in range(len(graph))]
    sim = simulate(graph, schedule_for_storage(graph, S))
    assert sim.valid, sim.errors
    assert sim.compute_s == pytest.approx(graph.compute_s)


@settings(max_examples=60, deadline=None)
@given(graph=small_training_graphs(), seed=st.integers(0, 2**32 - 1), density=st.floats(0.0, 1.0))
def test_any_storage_matrix_gives_a_valid_schedule(graph, seed, density):
    rng = random.Random(seed)
    n = len(graph)
    S = [[int(rng.random() < density) for _ in range(n)] for _ in range(n)]  # upper triangle too: ignored
    sim = simulate(graph, schedule_for_storage(graph, S))
    assert sim.valid, sim.errors
    R = recompute_given_storage(graph, S)
    for t in range(n):
        assert R[t][t] == 1 and not any(R[t][t + 1:])
        for j in range(t + 1):  # (1b): every input of a computed node is stored or computed in the stage
            if R[t][j]:
                assert all(R[t][d] or S[t][d] for d in graph.nodes[j].deps)
        if t + 1 < n:  # (1c): what the next stage starts with is stored now or computed now
            assert all(R[t][i] or (i < t and S[t][i]) for i in range(t + 1) if S[t + 1][i])


def test_where_no_schedule_fits_above_the_floor_the_lp_says_so():
    # the graph of test_checkmate's infeasible-above-the-floor case: no schedule fits 5 bytes. The LP relaxation was
    # feasible there (no rounding fitted: NO_SOLUTION); with the frontier's knapsack rows it is not, a proof
    graph = make_graph([[], [], [0], [1], [2, 3]], [4, 4, 1, 1, 1], outputs=[4])
    assert graph.min_budget_lower_bound() == 5
    tight = solve_lp_round(graph, 5, FAST)
    assert tight.status == INFEASIBLE and tight.schedule is None
    roomy = solve_lp_round(graph, 6, FAST)
    check_result(graph, 6, roomy)
    assert roomy.status in (OPTIMAL, FEASIBLE)


def test_time_limit_stops_the_trials_and_returns_what_it_has():
    graph = chain_training_graph(20)
    budget = simulate(graph, store_all(graph)).peak_bytes // 2
    result = solve_lp_round(graph, budget, SolveOptions(time_limit_s=0.05))
    check_result(graph, budget, result)
    assert result.wall_s < 5
    assert result.detail["trials"] < 29  # the LP alone takes longer than the limit: few or no roundings
