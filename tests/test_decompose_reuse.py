"""A sweep reuses the decomposition's block MILPs: a block MILP solved to optimality for one budget is taken as it
is by every later budget that asks for the same gap target, and the plans are those a cold solve finds."""

import pytest

import solvers.checkmate
from remat.simulate import simulate
from solvers import decompose
from solvers.base import SolveOptions
from solvers.baselines import BASELINES
from solvers.decompose import solve_decompose
from tests.test_decompose_head import blocks_with_a_split_head


@pytest.fixture
def milp_calls(monkeypatch) -> list[int]:
    """Counts the block MILPs solved, starting from an empty memo."""
    calls: list[int] = []
    solve = solvers.checkmate.solve_checkmate

    def counted(*args, **kwargs):
        calls.append(1)
        return solve(*args, **kwargs)

    monkeypatch.setattr(solvers.checkmate, "solve_checkmate", counted)
    monkeypatch.setattr(decompose, "SOLVED", {})
    return calls


def budgets() -> tuple:
    graph, _ = blocks_with_a_split_head()
    checkpoint_all = simulate(graph, BASELINES["checkpoint-all"](graph, 2**62, SolveOptions()).schedule)
    store_all = simulate(graph, BASELINES["store-all"](graph, 2**62, SolveOptions()).schedule)
    low = checkpoint_all.peak_bytes + 8
    return graph, low, (low + store_all.peak_bytes) // 2


def test_the_same_budget_again_solves_no_block_milp(milp_calls):
    graph, budget, _ = budgets()
    first = solve_decompose(graph, budget, SolveOptions(time_limit_s=20))
    solved = len(milp_calls)
    assert solved > 0 and first.schedule is not None
    again = solve_decompose(graph, budget, SolveOptions(time_limit_s=20))
    assert len(milp_calls) == solved  # every block MILP was optimal the first time: all taken from the memo
    assert again.schedule == first.schedule


def test_a_later_budget_reuses_the_shared_targets_and_finds_the_cold_plan(milp_calls):
    graph, low, high = budgets()
    solve_decompose(graph, low, SolveOptions(time_limit_s=20))
    cold_count = len(milp_calls)
    warm = solve_decompose(graph, high, SolveOptions(time_limit_s=20))
    warm_count = len(milp_calls) - cold_count
    assert warm_count < cold_count  # the spread of targets between least and store-all is the same for both
    decompose.SOLVED.clear()
    cold = solve_decompose(graph, high, SolveOptions(time_limit_s=20))
    assert warm.schedule is not None and cold.schedule is not None
    assert simulate(graph, warm.schedule).compute_s == pytest.approx(simulate(graph, cold.schedule).compute_s)
    assert simulate(graph, warm.schedule).fits(high)
