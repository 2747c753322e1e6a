"""A time limit is kept: the planner returns about when it is told to, with the best valid plan found so far
and its gap, on each of its paths (the whole-graph MILP, the coarsened MILP, the block decomposition).

A guard against gross overruns on a busy CI machine, not a timing benchmark (benchmarks/time_limits.py is).
"""

import time

import pytest

from remat.graph import Graph
from remat.planner import solve
from tests.graphs import add_residual_blocks, chain_training_graph, make_graph

LIMIT_S = 1.5


def block_training_graph(blocks: int, ops_per_block: int) -> Graph:
    """Repeated blocks (module paths "layers.k") of a chain of ops whose last one adds the block's input back
    (a residual), a loss, and each op's backward reading the incoming gradient and the op's inputs."""
    deps: list[list[int]] = []
    sizes: list[int] = []
    modules: list[str] = []
    stream, forward_of = add_residual_blocks(deps, sizes, modules, blocks, ops_per_block)
    deps.append([stream])  # the loss
    sizes.append(1)
    modules.append("loss")
    forward_count = len(deps) - 1
    grad = len(deps) - 1
    for block in reversed(range(blocks)):
        for member in reversed(forward_of[block]):
            deps.append(sorted({grad, *deps[member]}))
            sizes.append(4)
            modules.append(f"layers.{block}")
            grad = len(deps) - 1
    n = len(deps)
    costs = [1.0 + (i % 4) * 0.5 for i in range(n)]
    backward = [i >= forward_count for i in range(n)]
    return make_graph(deps, sizes, costs, outputs=[forward_count, n - 1], backward=backward, modules=modules)


def timed_solve(graph: Graph, fraction: float):
    """A plan for a budget `fraction` of the way from the single-op floor to store-all's peak, and its wall time."""
    store_all_peak = solve(graph, 2**62).store_all.peak_bytes
    floor = graph.min_budget_lower_bound()
    budget = floor + int(fraction * (store_all_peak - floor))
    started = time.perf_counter()
    plan = solve(graph, budget, time_limit_s=LIMIT_S)
    return plan, budget, time.perf_counter() - started


@pytest.mark.parametrize("graph, fraction, path", [
    # 91 nodes: the MILP takes it whole (from 0.3 up, the plan from the bound is proven optimal)
    (chain_training_graph(45), 0.2, "whole graph"),
    # 141 nodes without blocks worth decomposing: coarsened (at 0.3 the plan from the bound is proven optimal)
    (chain_training_graph(70), 0.2, "coarse nodes"),
    # 113 nodes in 7 blocks of 8 forward ops (from 0.25 up, the plan from the bound is proven optimal)
    (block_training_graph(7, 8), 0.2, "decompose"),
], ids=["whole", "coarse", "decompose"])
def test_the_plan_comes_back_within_the_time_limit_with_a_valid_plan_and_its_gap(graph, fraction, path):
    plan, budget, wall_s = timed_solve(graph, fraction)
    assert path in plan.picked, plan.picked
    assert wall_s <= 2 * LIMIT_S + 5, f"{wall_s:.1f} s for a {LIMIT_S} s limit ({plan.picked})"
    assert plan.status in ("feasible", "optimal")
    assert plan.schedule is not None and plan.simulation.valid and plan.simulation.fits(budget)
    assert plan.lower_bound_s is not None and plan.gap is not None and 0 <= plan.gap < 1



def test_a_limit_too_short_for_any_solver_still_returns_the_best_plan_found_with_its_gap():
    graph = chain_training_graph(45)
    store_all_peak = solve(graph, 2**62).store_all.peak_bytes
    budget = store_all_peak // 2
    started = time.perf_counter()
    plan = solve(graph, budget, time_limit_s=0.01)
    assert time.perf_counter() - started <= 10
    assert plan.status in ("feasible", "optimal") and plan.simulation.fits(budget)
    assert plan.lower_bound_s is not None and plan.gap is not None
    fitting = [c.simulation.compute_s for c in plan.candidates if c.fits(budget)]
    assert plan.compute_s == min(fitting)


def test_past_its_time_limit_the_decomposition_repairs_no_further(monkeypatch):
    """The decomposition reruns its DP with a wider margin while the stitched schedule overshoots (its accounting
    can miss bytes); each pass took 1 to 2 s per option of the stem on BERT-base, and passes went on past any
    limit (13 s of decompose given 0.5 s). Past the limit it stops after the pass it is in, with the best plan that
    fits so far, or none. Here each pass's accounting misses 60 bytes, so the first pass overshoots."""
    from solvers import decompose
    from solvers.base import NO_SOLUTION, SolveOptions
    from tests.test_decompose_reuse import budgets

    graph, low, _ = budgets()
    original, passes = decompose.combine_with_stem, []

    def missing_bytes(curves, phases, capacity_bytes, *rest):  # as if the DP's accounting missed 60 bytes
        passes.append(capacity_bytes)
        return original(curves, phases, capacity_bytes + 60, *rest)

    monkeypatch.setattr(decompose, "combine_with_stem", missing_bytes)
    roomy = decompose.solve_decompose(graph, low, SolveOptions(time_limit_s=20))
    assert len(passes) >= 2 and roomy.schedule is not None  # repaired with a margin
    passes.clear()
    monkeypatch.setattr(decompose, "SOLVED", {})
    late = decompose.solve_decompose(graph, low, SolveOptions(time_limit_s=1e-6))
    assert len(passes) == 1
    assert late.status == NO_SOLUTION and "the time limit ran out" in late.message


@pytest.mark.parametrize("solver", ["checkmate", "lp-round", "cpsat"])
def test_past_the_deadline_with_a_plan_in_hand_no_milp_is_started(monkeypatch, solver):
    """A MILP stage started past the deadline got MIN_STAGE_S, built its model (not interruptible: 3.7 to 4.5 s for
    a 94-node MLP's) and kept its warm start, or HiGHS did not run it at all: lp-round given 1 s took 4.7 s (the
    min-peak MILP's build, then the LP's), cpsat 6.5 s, for the plan a baseline had before either. Here the lower
    bound ends past the deadline: the plan is the best found so far, and no MILP runs."""
    from remat import planner
    from solvers.registry import solve_with

    graph = chain_training_graph(45)  # 91 nodes: the MILP takes it whole
    budget = solve(graph, 2**62).store_all.peak_bytes // 2
    limit_s = 0.3
    real_bound, ran = planner.covering_bound, []

    def slow_bound(*args, **kwargs):
        time.sleep(limit_s + 0.1)  # as a bound that takes all of a short limit
        return real_bound(*args, **kwargs)

    def recorded(name, *args, **kwargs):
        ran.append(name)
        return solve_with(name, *args, **kwargs)

    monkeypatch.setattr(planner, "covering_bound", slow_bound)
    monkeypatch.setattr(planner, "solve_with", recorded)
    plan = solve(graph, budget, solver=solver, time_limit_s=limit_s)
    assert not {"checkmate", "checkmate-min-peak", "lp-round", "cpsat"} & set(ran), ran
    assert plan.status == "feasible" and plan.simulation.fits(budget)
    assert plan.lower_bound_s is not None and plan.gap is not None and plan.lower_bound_s <= plan.compute_s
    assert f"{solver}: not run: the time limit ran out" in plan.message, plan.message


def test_a_model_highs_could_not_run_in_its_time_is_not_built(monkeypatch):
    """A model of LARGE_MODEL_NONZEROS or more runs only in a child process, and only with CHILD_MIN_LEFT_S left once
    built: a build that leaves less is skipped (lp-round's LP here, 1 s or more to build; it took 3.7 s to find
    out on the 94-node MLP's, with 0.5 s given). The estimate of the non-zeros stays under the model's own count, so
    no model HiGHS would run in-process is skipped."""
    from solvers import lp_round
    from solvers.base import NO_SOLUTION, SolveOptions
    from solvers.checkmate import NONZEROS_PER_FREE, build_model, free_variables, highs_arrays, unbuildable_in

    for graph in (chain_training_graph(20), block_training_graph(3, 4)):
        model = build_model(graph, 2**40, 1.0, 1.0)
        assert free_variables(graph) == len(model.FREE)
        assert free_variables(graph) * NONZEROS_PER_FREE <= highs_arrays(model.problem).nonzeros
    graph = chain_training_graph(45)  # 10,350 FREE variables, 145k non-zeros
    assert unbuildable_in(graph, SolveOptions(time_limit_s=0.5))
    assert not unbuildable_in(graph, SolveOptions(time_limit_s=30))
    assert not unbuildable_in(chain_training_graph(5), SolveOptions(time_limit_s=0.01))  # solved in-process
    built = []

    def counted(*args, **kwargs):
        built.append(args[0])
        return build_model(*args, **kwargs)

    monkeypatch.setattr(lp_round, "build_model", counted)
    budget = solve(graph, 2**62).store_all.peak_bytes // 2
    result = lp_round.solve_lp_round(graph, budget, SolveOptions(time_limit_s=0.5))
    assert not built and result.status == NO_SOLUTION and "not built" in result.message
    assert result.lower_bound_s == graph.compute_s
