"""The schedule from the covering bound's solution (solvers/cover_round.py): valid, never below the optimum, and on
a chain of layers it meets the bound, so the planner returns it as proven optimal without the MILP."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remat.planner import solve
from remat.simulate import simulate
from solvers.base import NO_SOLUTION, OPTIMAL, SolveOptions
from solvers.bounds import covering_bound
from solvers.checkmate import solve_checkmate
from solvers.cover_round import VARIANTS, schedule_for_drops, solve_cover_round
from tests.bruteforce import cheapest_schedule
from tests.graphs import chain_training_graph
from tests.test_solver_properties import EXACT, FAST, budget_between, dags_with_multi_output_ops, random_dags


@FAST
@given(graph=random_dags(), fraction=st.floats(0.0, 1.0))
def test_cover_round_is_valid_and_never_beats_the_optimum(graph, fraction):
    budget = budget_between(graph, fraction)
    best = cheapest_schedule(graph, budget)
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    result = solve_cover_round(graph, budget, bound, SolveOptions(time_limit_s=10))
    if result.schedule is None:
        assert result.status == NO_SOLUTION
        return
    sim = simulate(graph, result.schedule)
    assert sim.valid and sim.fits(budget) and best is not None
    assert sim.compute_s == pytest.approx(result.objective_s)
    assert sim.compute_s >= best.compute_s * (1 - 1e-9)


@FAST
@given(graph=dags_with_multi_output_ops(), fraction=st.floats(0.0, 1.0))
def test_every_variant_of_any_drops_is_a_valid_schedule(graph, fraction):
    # emit is valid for any rows: whatever the drops (here: every value), each way of placing them runs
    dropped = tuple(range(len(graph)))[:: 1 + int(fraction * 3)]
    for rule, reuse, hold in VARIANTS:
        schedule = schedule_for_drops(graph, dropped, rule, reuse, 5 if hold else 0)
        assert simulate(graph, schedule).valid


@pytest.mark.parametrize("fraction", [0.5, 0.7, 0.9])
def test_on_a_chain_the_planner_proves_the_cover_round_optimal(fraction):
    graph = chain_training_graph(layers=10, activation_bytes=10)
    budget = budget_between(graph, fraction)
    plan = solve(graph, budget, time_limit_s=20)
    milp = solve_checkmate(graph, budget, EXACT)
    assert plan.method == "cover-round" and plan.status == OPTIMAL and plan.gap < 1e-9
    assert plan.compute_s == pytest.approx(milp.objective_s, rel=1e-6)
    assert plan.simulation.fits(budget)


@FAST
@given(graph=dags_with_multi_output_ops(), fraction=st.floats(0.0, 1.0), drops=st.sets(st.integers(0, 7)))
def test_the_covering_bound_holds_against_every_schedule_of_drops(graph, fraction, drops):
    # ops with outputs released one by one: no exhaustive search models them, so weigh the bound against many
    # schedules in the class it covers (first computations in index order): every way of placing any drops
    budget = budget_between(graph, fraction)
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    dropped = tuple(v for v in sorted(drops) if v < len(graph))
    for rule, reuse, hold in VARIANTS:
        sim = simulate(graph, schedule_for_drops(graph, dropped, rule, reuse, 5 if hold else 0))
        assert sim.valid
        if sim.fits(budget):
            assert not bound.proven_infeasible and bound.lower_bound_s <= sim.compute_s * (1 + 1e-9)
