"""Window polish (solvers/window.py): Checkmate's MILP on a few stages of a schedule, the rest held. Its schedules
are valid, fit, never cost more than the start nor less than the optimum; a window over every stage is the whole
MILP; and the planner gives it the time the whole-graph MILP cannot use."""

from __future__ import annotations

import dataclasses
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remat import planner
from remat.planner import _polish_windows, solve
from remat.schedule import compute_seconds
from remat.simulate import simulate
from solvers.base import OPTIMAL
from solvers.checkmate import build_model, solve_checkmate, solve_min_peak
from solvers.window import matrices, polish_windows, solve_window, window_at
from tests.bruteforce import cheapest_schedule, smallest_peak_schedule
from tests.graphs import chain_training_graph
from tests.test_drop_search import cover_round_plan
from tests.test_solver_properties import EXACT, FAST, budget_between, dags_with_multi_output_ops


@FAST
@given(graph=dags_with_multi_output_ops(), fraction=st.floats(0.0, 1.0), width=st.integers(1, 4))
def test_windows_keep_schedules_valid_and_never_worse_or_below_the_optimum(graph, fraction, width):
    budget = budget_between(graph, fraction)
    best = cheapest_schedule(graph, budget)
    if best is None:
        return
    start = smallest_peak_schedule(graph).schedule  # fits every budget that any schedule fits
    result = polish_windows(graph, budget, start, EXACT, time.perf_counter() + 60, width=width)
    sim = simulate(graph, result.schedule)
    assert sim.valid and sim.fits(budget)
    assert sim.compute_s == pytest.approx(result.objective_s)
    assert best.compute_s * (1 - 1e-9) <= sim.compute_s <= compute_seconds(graph, start) * (1 + 1e-9)


@FAST
@given(graph=dags_with_multi_output_ops(), fraction=st.floats(0.0, 1.0))
def test_a_window_over_every_stage_is_the_whole_milp(graph, fraction):
    budget = budget_between(graph, fraction)
    best = cheapest_schedule(graph, budget)
    if best is None:
        return
    start = smallest_peak_schedule(graph).schedule
    result = polish_windows(graph, budget, start, EXACT, time.perf_counter() + 60, width=len(graph))
    assert result.objective_s == pytest.approx(best.compute_s)


def test_a_full_window_builds_the_whole_model():
    graph = chain_training_graph(5)
    R, S = matrices(graph, solve_min_peak(graph, EXACT).schedule)
    whole = build_model(graph, 10**6, 1.0, 1.0)
    window = build_model(graph, 10**6, 1.0, 1.0, window=window_at(graph, R, S, 0, len(graph) - 1))
    assert {c.name: str(c) for c in whole.problem.constraints()} == \
           {c.name: str(c) for c in window.problem.constraints()}


def test_narrow_windows_improve_a_chain_in_steps_and_hold_the_rest():
    graph = chain_training_graph(6)
    start = solve_min_peak(graph, EXACT).schedule  # recomputes a lot: the budget below allows more storage
    budget = simulate(graph, start).peak_bytes + 20
    optimum = solve_checkmate(graph, budget, EXACT)
    assert optimum.status == OPTIMAL
    messages = []
    result = polish_windows(graph, budget, start, EXACT, time.perf_counter() + 60, width=4, say=messages.append)
    sim = simulate(graph, result.schedule)
    assert sim.valid and sim.fits(budget)
    assert optimum.objective_s * (1 - 1e-9) <= sim.compute_s < compute_seconds(graph, start)
    assert result.detail["improved"] == len(messages) >= 1 and result.detail["windows"] > result.detail["improved"]
    assert all(message.startswith("window of stages") for message in messages)
    # one window: only its rows change (S inside it), and the stages it hands on start as before
    R, S = matrices(graph, start)
    for first in range(len(graph) - 3):
        solved = solve_window(graph, budget, R, S, window_at(graph, R, S, first, first + 3), EXACT,
                              time.perf_counter() + 60)
        if solved is not None:
            break
    assert solved is not None
    R1, S1 = solved
    assert [t for t in range(len(graph)) if R1[t] != R[t]] and all(R1[t] == R[t] for t in range(len(graph))
                                                                   if not first <= t <= first + 3)
    assert all(S1[t] == S[t] for t in range(len(graph)) if not first < t <= first + 3)
    assert sum(map(sum, R1)) < sum(map(sum, R))  # fewer computations in the window


def test_the_planner_polishes_windows_of_a_plan_the_whole_milp_cannot_take():
    as_if = cover_round_plan()  # 40.5 s against a bound of 37.5 s; the optimum is 38.5 s
    messages = []
    started = time.perf_counter()
    polished = _polish_windows(as_if, started, started + 60, "highs", messages.append)
    assert polished.method == "window-polish" and polished.compute_s == pytest.approx(38.5)
    assert polished.simulation.fits(as_if.budget_bytes) and "windows of its stages" in polished.picked
    assert messages[0].startswith("the MILP on windows")
    # no time left, or a plan proven optimal: returned as it is
    assert _polish_windows(as_if, started, started, "highs", messages.append) is as_if
    proven = dataclasses.replace(as_if, status=OPTIMAL)
    assert _polish_windows(proven, started, started + 60, "highs", messages.append) is proven


def test_solve_keeps_its_window_share_of_the_time_when_the_whole_milp_does_not_fit(monkeypatch):
    as_if = cover_round_plan()
    searched_until = []

    def search(plan, started, deadline, say):
        searched_until.append(deadline - started)
        return plan

    monkeypatch.setattr(planner, "_plan", lambda *args: as_if)
    monkeypatch.setattr(planner, "_search", search)
    monkeypatch.setattr(planner, "MAX_POLISH_NODES", 0)  # as if the graph were too big for the whole MILP
    monkeypatch.setattr(planner, "WINDOW_MIN_LEFT_S", 8.0)
    plan = solve(as_if.graph, as_if.budget_bytes, time_limit_s=10)
    # the windows' share is kept, and of the rest FOCUS_SHARE for the bound focused on the plan's recomputations
    assert searched_until[0] == pytest.approx((1 - planner.WINDOW_SHARE) * (1 - planner.FOCUS_SHARE) * 10, abs=0.5)
    assert plan.method == "window-polish" and plan.compute_s == pytest.approx(38.5)
    # less than WINDOW_MIN_LEFT_S left: the search has all of it
    assert solve(as_if.graph, as_if.budget_bytes, time_limit_s=6).method == "cover-round"
    assert searched_until[1] == pytest.approx(6 * (1 - planner.FOCUS_SHARE), abs=0.5)
