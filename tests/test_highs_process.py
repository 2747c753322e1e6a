"""HiGHS in a child process (solvers/highs_process.py): the same results as in-process, and a hard stop."""

from __future__ import annotations

import sys
import textwrap
import time

import numpy as np
import pytest

import solvers.checkmate as checkmate
import solvers.highs_process as highs_process
from remat.simulate import simulate
from solvers.base import FEASIBLE, OPTIMAL, SolveOptions
from solvers.bounds import covering_bound
from solvers.checkmate import solve_checkmate
from tests.graphs import chain_training_graph

EXACT = SolveOptions(mip_gap=1e-9, time_limit_s=60)


@pytest.fixture
def every_model_in_a_child(monkeypatch):
    monkeypatch.setattr(checkmate, "LARGE_MODEL_NONZEROS", 0)


def _solves(monkeypatch) -> list[str]:
    """Record where each HiGHS run happens."""
    where: list[str] = []
    for name, label in (("_run_in_child", "child"), ("_run_in_process", "in-process")):
        run = getattr(checkmate, name)
        monkeypatch.setattr(checkmate, name, lambda *args, _run=run, _label=label, **kwargs:
                            where.append(_label) or _run(*args, **kwargs))
    return where


def test_a_model_solved_in_a_child_gets_what_it_gets_in_process(monkeypatch):
    graph = chain_training_graph(8)
    budget = 40  # below store-all: the optimum recomputes
    where = _solves(monkeypatch)
    here = solve_checkmate(graph, budget, EXACT)
    bound_here = covering_bound(graph, budget, SolveOptions(time_limit_s=30))
    assert set(where) == {"in-process"}
    monkeypatch.setattr(checkmate, "LARGE_MODEL_NONZEROS", 0)
    where.clear()
    there = solve_checkmate(graph, budget, EXACT)
    bound_there = covering_bound(graph, budget, SolveOptions(time_limit_s=30))
    assert set(where) == {"child"}
    assert here.status == there.status == OPTIMAL and here.objective_s > graph.compute_s
    assert there.objective_s == pytest.approx(here.objective_s)
    assert simulate(graph, there.schedule).fits(budget)
    assert there.lower_bound_s == pytest.approx(here.lower_bound_s)
    # the covering's incumbents come back one by one from the child, as the in-process callback gives them
    assert bound_there.lower_bound_s == pytest.approx(bound_here.lower_bound_s)
    assert bound_there.incumbents and bound_there.incumbents[-1] == bound_there.recomputed
    assert bound_there.recomputed == bound_here.recomputed


def test_a_time_limited_child_returns_its_incumbent_and_bound(every_model_in_a_child):
    graph = chain_training_graph(25)
    result = solve_checkmate(graph, 260, SolveOptions(time_limit_s=0.5))
    assert result.status in (FEASIBLE, OPTIMAL, "no_solution"), result.message
    assert result.lower_bound_s is not None and result.lower_bound_s >= graph.compute_s
    if result.schedule is not None:
        assert simulate(graph, result.schedule).fits(260)


HANGING_CHILD = textwrap.dedent("""
    import pickle, sys, time
    import numpy as np
    request = pickle.load(sys.stdin.buffer)
    out = sys.stdout.buffer
    values = np.arange(len(request["model"].costs), dtype=np.float64)
    pickle.dump(("incumbent", values), out); pickle.dump(("bound", 1.5), out); out.flush()
    time.sleep(600)  # as HiGHS in a presolve that no longer looks at its clock
""")


def _tiny_model() -> highs_process.HighsArrays:
    """min 2a + 3b subject to a + b >= 1, a and b binary."""
    f64, i32 = np.float64, np.int32
    return highs_process.HighsArrays(
        costs=np.array([2.0, 3.0], dtype=f64), lower=np.zeros(2, dtype=f64), upper=np.ones(2, dtype=f64),
        integers=np.array([0, 1], dtype=i32), row_lower=np.array([1.0], dtype=f64),
        row_upper=np.array([np.inf], dtype=f64), starts=np.array([0], dtype=i32),
        columns=np.array([0, 1], dtype=i32), coefficients=np.array([1.0, 1.0], dtype=f64))


def test_a_child_that_overruns_its_deadline_is_stopped_and_its_incumbent_kept(monkeypatch):
    monkeypatch.setattr(highs_process, "CHILD_COMMAND", (sys.executable, "-c", HANGING_CHILD))
    seen: list[list[float]] = []
    started = time.perf_counter()
    result = highs_process.solve_in_child(_tiny_model(), True, {}, None, started + 1.0,
                                          on_incumbent=lambda values: seen.append(list(values)))
    wall = time.perf_counter() - started
    assert 1.0 + highs_process.GRACE_S <= wall < 1.0 + highs_process.GRACE_S + 3.0
    assert seen == [[0.0, 1.0]]
    assert result.model_status == "kTimeLimit" and result.primal_feasible
    assert list(result.values) == [0.0, 1.0] and result.objective == 3.0 and result.dual_bound == 1.5
    assert "past its time limit" in result.stopped


def test_a_child_that_crashes_is_a_solve_error_that_says_why(monkeypatch):
    monkeypatch.setattr(highs_process, "CHILD_COMMAND",
                        (sys.executable, "-c", "import sys; sys.stdin.buffer.read(); sys.exit('out of memory')"))
    result = highs_process.solve_in_child(_tiny_model(), True, {}, None, time.perf_counter() + 30.0)
    assert result.model_status == "kSolveError" and not result.primal_feasible
    assert "exit status 1: out of memory" in result.stopped


def test_the_child_solves_the_model_it_is_sent():
    result = highs_process.solve_in_child(_tiny_model(), True, {"mip_rel_gap": 0.0}, [0.0, 1.0],
                                          time.perf_counter() + 30.0)
    assert result.model_status == "kOptimal" and list(result.values) == [1.0, 0.0]
    assert result.objective == 2.0 and result.dual_bound == pytest.approx(2.0)


def test_a_large_model_with_under_a_second_left_is_not_run_in_process(monkeypatch, every_model_in_a_child):
    # HiGHS's MIP presolve sat past a 0.5-s limit for minutes on GPT-2's covering model (batch 2, seq 128): in
    # the process it cannot be stopped, and a child would not start in the time left
    where = _solves(monkeypatch)
    graph = chain_training_graph(8)
    warm = solve_checkmate(graph, 40, EXACT).schedule
    where.clear()
    monkeypatch.setattr(checkmate, "CHILD_MIN_LEFT_S", 3600.0)  # every deadline is "under a second" away
    result = solve_checkmate(graph, 40, SolveOptions(time_limit_s=5, warm_start=warm))
    assert where == [] and "HiGHS not run" in result.message
    assert result.status == FEASIBLE and result.schedule == warm  # the warm start is still the result
    bound = covering_bound(graph, 40, SolveOptions(time_limit_s=5))
    assert where == [] and bound.lower_bound_s == pytest.approx(graph.compute_s)  # every node once
