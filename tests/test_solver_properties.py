"""Properties every solver must have, on random DAGs of at most 8 nodes, against exhaustive search
(tests/bruteforce.py): the MILP finds the optimum; lp-round, cpsat and the block decomposition return valid
schedules that fit and cost no less than it; every lower bound is at most it; the swept cost never rises."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remat.graph import Graph
from remat.planner import solve, sweep
from remat.simulate import simulate
from solvers import peak_bound
from solvers.base import INFEASIBLE, NO_SOLUTION, OPTIMAL, SolveOptions
from solvers.baselines import store_all
from solvers.bounds import covering_bound
from solvers.checkmate import lower_bound_lp, solve_checkmate, solve_min_peak
from solvers.decompose import find_layout, solve_decompose
from solvers.peak_bound import backward_peak_bound, backward_walk, walk_schedule
from solvers.registry import solve_with
from tests.bruteforce import cheapest_schedule, smallest_peak_schedule
from tests.graphs import make_graph, step_whose_lowest_peak_recomputes

EXACT = SolveOptions(mip_gap=1e-9, time_limit_s=60)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def random_dags(draw, max_nodes: int = 8) -> Graph:
    """Each node reads up to three earlier ones; a few outputs; some values free, some ops with workspace."""
    n = draw(st.integers(2, max_nodes))
    deps: list[list[int]] = [[]]
    for i in range(1, n):
        count = draw(st.integers(0 if i > 1 else 1, min(i, 3)))
        deps.append(sorted(draw(st.sets(st.integers(0, i - 1), min_size=count, max_size=count))))
    sizes = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, 13]), min_size=n, max_size=n))
    costs = draw(st.lists(st.sampled_from([0.1, 0.5, 1.0, 1.5, 2.0, 3.25, 5.0]), min_size=n, max_size=n))
    outputs = sorted({n - 1} | draw(st.sets(st.integers(0, n - 1), max_size=2)))
    graph = make_graph(deps, sizes, costs, outputs=outputs, fixed_bytes=draw(st.integers(0, 5)))
    workspaces = draw(st.lists(st.sampled_from([0, 0, 0, 1, 4]), min_size=n, max_size=n))
    nodes = tuple(dataclasses.replace(node, workspace_bytes=w) for node, w in zip(graph.nodes, workspaces, strict=True))
    return dataclasses.replace(graph, nodes=nodes)


@st.composite
def block_graphs(draw) -> Graph:
    """Two repeated blocks (module paths "layers.0", "layers.1") of one or two forward ops each, a loss, and each
    block's backward (one or two ops reading the incoming gradient and the block's forward values): at most 8
    nodes, the shape of a transformer's training step in miniature. Sizes and costs differ per node."""
    forward_ops = draw(st.integers(1, 2))
    backward_ops = draw(st.integers(1, 2)) if forward_ops == 1 else 1
    deps: list[list[int]] = []
    modules: list[str] = []
    backward: list[bool] = []
    block_forward: list[list[int]] = []
    stream = None
    for block in range(2):
        members = []
        for op in range(forward_ops):
            reads = [stream] if stream is not None else []
            if op and draw(st.booleans()):
                reads = [len(deps) - 1] + reads
            elif op:
                reads = [len(deps) - 1]
            deps.append(sorted(set(reads)))
            modules.append(f"layers.{block}")
            backward.append(False)
            members.append(len(deps) - 1)
        block_forward.append(members)
        stream = members[-1]
    deps.append([stream])  # the loss
    modules.append("loss")
    backward.append(True)
    grad = len(deps) - 1
    for block in reversed(range(2)):
        for op in range(backward_ops):
            saved = draw(st.sets(st.sampled_from(block_forward[block]), min_size=1, max_size=len(block_forward[block])))
            reads = sorted({grad, *saved} | ({len(deps) - 1} if op else set()))
            deps.append(reads)
            modules.append(f"layers.{block}")
            backward.append(True)
        grad = len(deps) - 1
    n = len(deps)
    sizes = draw(st.lists(st.sampled_from([1, 2, 3, 5, 8]), min_size=n, max_size=n))
    costs = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=n, max_size=n))
    return make_graph(deps, sizes, costs, outputs=[forward_ops * 2, n - 1], backward=backward, modules=modules)


def budget_between(graph: Graph, fraction: float) -> int:
    low = graph.min_budget_lower_bound()
    high = simulate(graph, store_all(graph, 0, SolveOptions()).schedule).peak_bytes
    return low + round(fraction * max(0, high - low))


@FAST
@given(graph=random_dags(), fraction=st.floats(0.0, 1.0))
def test_milp_equals_the_exhaustive_optimum(graph, fraction):
    assert_milp_meets_the_exhaustive_optimum(graph, budget_between(graph, fraction))


def assert_milp_meets_the_exhaustive_optimum(graph: Graph, budget: int) -> None:
    best = cheapest_schedule(graph, budget)
    result = solve_checkmate(graph, budget, EXACT)
    if best is None:
        assert result.status == INFEASIBLE
        return
    # the search's figures are the simulator's, and the MILP meets its optimum
    assert best.simulation.fits(budget) and best.simulation.compute_s == pytest.approx(best.compute_s, rel=1e-12)
    assert result.status == OPTIMAL and result.objective_s == pytest.approx(best.compute_s, rel=1e-6)
    assert simulate(graph, result.schedule).fits(budget)


@FAST
@given(graph=random_dags(), fraction=st.floats(0.0, 1.0))
def test_lower_bounds_never_exceed_the_optimum(graph, fraction):
    budget = budget_between(graph, fraction)
    best = cheapest_schedule(graph, budget)
    covering = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    lp = lower_bound_lp(graph, budget)
    if best is None:
        return  # nothing to bound (an infeasible budget may or may not be proven so)
    assert not covering.proven_infeasible
    assert graph.compute_s - 1e-9 <= covering.lower_bound_s <= best.compute_s * (1 + 1e-9)
    assert lp is not None and lp <= best.compute_s * (1 + 1e-6)


@FAST
@given(graph=random_dags(), fraction=st.floats(0.0, 1.0))
def test_lp_rounding_is_valid_and_never_beats_the_optimum(graph, fraction):
    _valid_and_never_below_the_optimum("lp-round", graph, budget_between(graph, fraction), time_limit_s=10)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_dags(), fraction=st.floats(0.0, 1.0))
def test_cpsat_in_its_own_process_is_valid_and_never_beats_the_optimum(graph, fraction):
    _valid_and_never_below_the_optimum("cpsat", graph, budget_between(graph, fraction), time_limit_s=20)


def _valid_and_never_below_the_optimum(solver: str, graph, budget: int, time_limit_s: float) -> None:
    """The solver's schedule, if any, fits and costs no less than brute force's optimum; its bound is below it."""
    best = cheapest_schedule(graph, budget)
    result = solve_with(solver, graph, budget, SolveOptions(time_limit_s=time_limit_s))
    if result.schedule is None:
        assert result.status in (INFEASIBLE, NO_SOLUTION)
        return
    sim = simulate(graph, result.schedule)
    assert sim.fits(budget) and best is not None
    assert sim.compute_s >= best.compute_s * (1 - 1e-9)
    if result.lower_bound_s is not None:
        assert result.lower_bound_s <= best.compute_s * (1 + 1e-6)


@FAST
@given(graph=block_graphs(), fraction=st.floats(0.0, 1.0))
def test_decomposition_is_valid_and_never_beats_the_optimum(graph, fraction):
    assert find_layout(graph) is not None
    budget = budget_between(graph, fraction)
    best = cheapest_schedule(graph, budget)
    result = solve_decompose(graph, budget, SolveOptions(time_limit_s=20))
    if result.schedule is None:
        assert result.status in (INFEASIBLE, NO_SOLUTION)
        return
    sim = simulate(graph, result.schedule)
    assert sim.valid and sim.fits(budget) and best is not None
    assert sim.compute_s == pytest.approx(result.objective_s)
    assert sim.compute_s >= best.compute_s * (1 - 1e-9)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_dags(max_nodes=7))
def test_swept_cost_never_rises_and_matches_the_optimum(graph):
    budgets = sorted({budget_between(graph, f) for f in (0.0, 0.3, 0.6, 1.0)})
    plans = sweep(graph, budgets, time_limit_s=10)
    costs = [p.compute_s for p in plans if p.schedule is not None]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(costs, costs[1:], strict=False))
    for plan in plans:
        best = cheapest_schedule(graph, plan.budget_bytes)
        if best is None:
            continue
        # the whole-graph MILP is exact over the schedules in the traced order; the walk's schedule, in another order,
        # can only do better
        assert plan.compute_s <= best.compute_s * (1 + 1e-6) and plan.simulation.fits(plan.budget_bytes)
        assert plan.lower_bound_s is not None and plan.lower_bound_s <= plan.compute_s * (1 + 1e-9)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=block_graphs(), fraction=st.floats(0.0, 1.0))
def test_decompose_by_name_in_the_planner_keeps_a_valid_bound(graph, fraction):
    budget = budget_between(graph, fraction)
    best = cheapest_schedule(graph, budget)
    plan = solve(graph, budget, solver="decompose", time_limit_s=10)
    if best is None or plan.schedule is None:
        return
    assert plan.simulation.fits(budget) and plan.compute_s >= best.compute_s * (1 - 1e-9)
    assert plan.lower_bound_s is not None and plan.lower_bound_s <= best.compute_s * (1 + 1e-9)
    assert plan.picked.startswith(("decompose", "store-all"))  # store-all when the budget holds everything


@st.composite
def dags_with_multi_output_ops(draw, max_nodes: int = 8) -> Graph:
    """random_dags (of up to max_nodes) where some ops have two outputs that the simulator releases one by one, each
    read by some of the op's readers (as layer norm's output and its mean/rstd are)."""
    graph = draw(random_dags(max_nodes))
    if "part_bytes" not in {f.name for f in dataclasses.fields(graph.nodes[0])}:
        return graph  # a Graph IR without separately released outputs: the plain property
    nodes = list(graph.nodes)
    for i, node in enumerate(nodes):
        readers = graph.users[i]
        if node.output_bytes >= 2 and readers and draw(st.booleans()):
            first = draw(st.integers(1, node.output_bytes - 1))
            reads = [draw(st.sampled_from([(0,), (1,), (0, 1)])) for _ in readers]
            part_users = tuple(tuple(u for u, r in zip(readers, reads, strict=True) if k in r) for k in range(2))
            nodes[i] = dataclasses.replace(node, part_bytes=(first, node.output_bytes - first), part_users=part_users)
    return dataclasses.replace(graph, nodes=tuple(nodes))


@FAST
@given(graph=dags_with_multi_output_ops(), fraction=st.floats(0.0, 1.0))
def test_milp_counts_outputs_released_one_by_one_as_the_simulator_does(graph, fraction):
    # the optimum of the simulator's accounting, not of a stricter one that holds an op's outputs together
    assert_milp_meets_the_exhaustive_optimum(graph, budget_between(graph, fraction))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=dags_with_multi_output_ops())
def test_min_peak_counts_outputs_released_one_by_one(graph):
    best = smallest_peak_schedule(graph)
    assert best.simulation.valid and best.simulation.peak_bytes == best.peak_bytes
    result = solve_min_peak(graph, EXACT)
    assert result.status == OPTIMAL and result.detail["peak_bytes"] == best.peak_bytes
    assert simulate(graph, result.schedule).peak_bytes == best.peak_bytes


@FAST
@given(graph=dags_with_multi_output_ops(), fraction=st.floats(0.0, 1.0))
def test_covering_bound_holds_when_outputs_are_released_one_by_one(graph, fraction):
    budget = budget_between(graph, fraction)
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    best = cheapest_schedule(graph, budget)
    if bound.proven_infeasible:
        assert best is None
    elif best is not None:
        assert bound.lower_bound_s <= best.compute_s * (1 + 1e-9)


@st.composite
def steps_returning_values(draw) -> Graph:
    """dags_with_multi_output_ops of up to 7 nodes and a last node of 0 bytes that reads 2 to 4 of their values (an
    output of an op with two, for some), as the backward's return reads every gradient under gradients="set-to-none":
    each of them is then held (or made again) from where it is made to the end."""
    graph = draw(dags_with_multi_output_ops(max_nodes=7))
    nodes = list(graph.nodes)
    returned = sorted(draw(st.sets(st.integers(0, len(nodes) - 1), min_size=min(2, len(nodes)),
                                   max_size=min(4, len(nodes)))))
    last = len(nodes)
    for i in returned:
        if nodes[i].part_bytes:  # the return reads one output of an op with two (or both)
            reads = draw(st.sampled_from([(0,), (1,), (0, 1)]))
            part_users = tuple(tuple(sorted({*users, last} if k in reads else users))
                               for k, users in enumerate(nodes[i].part_users))
            nodes[i] = dataclasses.replace(nodes[i], part_users=part_users)
    nodes.append(dataclasses.replace(nodes[0], name="return", op="return", deps=tuple(returned), output_bytes=0,
                                     part_bytes=(), part_users=(), compute_s=0.0, workspace_bytes=0))
    return dataclasses.replace(graph, nodes=tuple(nodes), outputs=(last,))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=steps_returning_values())
def test_min_peak_of_a_step_whose_last_node_reads_several_values(graph):
    best = smallest_peak_schedule(graph)
    assert best.simulation.valid and best.simulation.peak_bytes == best.peak_bytes
    assert backward_peak_bound(graph, math.inf) <= best.peak_bytes
    result = solve_min_peak(graph, EXACT)
    assert result.status == OPTIMAL and result.detail["peak_bytes"] == best.peak_bytes
    assert simulate(graph, result.schedule).peak_bytes == best.peak_bytes


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=st.one_of(dags_with_multi_output_ops(), steps_returning_values()))
def test_backward_peak_bound_never_exceeds_the_lowest_peak(graph):
    # run to the end (no deadline, no target), the search's bound is the lowest peak of the schedules it walks over,
    # which include every frontier-advancing one
    assert backward_peak_bound(graph, math.inf) <= smallest_peak_schedule(graph).peak_bytes


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=st.one_of(dags_with_multi_output_ops(), steps_returning_values()))
def test_the_walk_back_to_the_empty_set_is_a_valid_schedule_at_or_over_its_bound(graph):
    # the walk counts parts of nonzero size only: walk_schedule adds the values of 0 bytes and the outputs it skips
    walk = backward_walk(graph, math.inf)
    assert walk.runs is not None and walk.runs[-1] == len(graph) - 1
    simulation = simulate(graph, walk_schedule(graph, walk.runs))
    assert simulation.valid, simulation.errors
    assert simulation.peak_bytes >= walk.bound_bytes


def test_a_run_that_reads_only_needed_parts_is_the_walks_only_step_from_its_set():
    # w (50 bytes) makes z (100) and x (10); x makes y1..y14 (1 each); the last node reads z, x and every y. Every
    # order of the y runs costs the node floor, 150 (z's working set), and the lowest peak, 160 (x made beside z),
    # comes after them: the search went through all 2^14 sets of y's at 150 first. Each y run reads only x, already
    # needed: a set inside the one it leaves, at the same cost, so it is the only step taken there
    ys = 14
    deps = [[], [0], [0]] + [[2]] * ys + [[1, 2, *range(3, 3 + ys)]]
    graph = make_graph(deps, [50, 100, 10] + [1] * ys + [0])
    walk = backward_walk(graph, math.inf, max_sets=100)
    assert graph.min_budget_lower_bound() == 150 and walk.bound_bytes == 160 and walk.runs is not None
    assert simulate(graph, walk_schedule(graph, walk.runs)).peak_bytes == 160


def test_the_walk_back_reaches_the_lowest_peak_of_a_step_in_few_sets(monkeypatch):
    # of the sets at the same cost the search takes the last reached: breadth-first among them, the walk had not
    # reached the empty set after 200,000 sets on 24 to 50-node steps
    graph = step_whose_lowest_peak_recomputes()
    monkeypatch.setattr(peak_bound, "MAX_SETS", 1000)
    walk = backward_walk(graph, math.inf)
    assert graph.min_budget_lower_bound() == 6784 and walk.bound_bytes == 7264 and walk.runs is not None
    schedule = walk_schedule(graph, walk.runs)
    assert simulate(graph, schedule).peak_bytes == 7264 and schedule.recomputed_nodes()
