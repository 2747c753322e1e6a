"""Checkmate's MILP (Jain et al., MLSys 2020, section 4) written with PuLP.

Frontier-advancing stages: stage t computes node t for the first time, after recomputing
whatever earlier nodes it needs. Binary decision matrices, lower triangular (the upper triangles
are never created):

    R[t, i]  node i is computed in stage t            (i <= t, R[t, t] = 1)
    S[t, i]  node i is in memory when stage t starts  (i < t, no S[0, .])

and, for the memory accounting inside a stage,

    FREE[t, i, p, k]  output p of node i is freed right after node k runs in stage t  (k = i or a reader of p)
    HELD[t, i, p]     output p of an op with several outputs is in memory when stage t starts (<= S[t, i])
    U[t, k]           activation bytes in memory while node k runs in stage t (continuous)

Equation labels follow the paper: (1a) objective, (1b) dependencies, (1c) storage,
(1d)/(1e) frontier advancing; (M1)-(M4) the memory accounting of its section 4, kept output by output
(solvers/stage_memory.py: the simulator releases each output of an op with several after its own last read).
An op with one output has one "part", held when S says so. FREE is linearised tightly (no big-M):
FREE <= R[t, k], FREE + (part held at t+1) <= 1, FREE + R[t, j] <= 1 for every reader j > k of the part.

The accounting is an upper bound of what remat.simulate measures for
Schedule.from_matrices(graph, R, S), and equal to it for solutions without redundant entries
(a value both stored and recomputed, or stored but neither used nor kept), which an optimum
has no reason to contain. The emitted schedule is simulated before it is returned anyway.

Units inside the model: bytes in `byte_unit` (about 1/1000 of the budget) and seconds in
`second_unit` (the mean node cost), so that HiGHS sees coefficients near 1.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pulp

from remat.graph import Graph
from remat.schedule import Schedule, compute_seconds, minimal_storage
from remat.simulate import simulate
from solvers.base import FEASIBLE, INFEASIBLE, NO_SOLUTION, OPTIMAL, SolveOptions, SolverResult, settled_without_solving
from solvers.highs_process import (
    LARGE_MODEL_NONZEROS,
    HighsArrays,
    HighsResult,
    load,
    result_of,
    solve_in_child,
)
from solvers.peak_bound import backward_peak_bound
from solvers.stage_memory import Part, freed_by, node_parts, stage_values

BACKENDS = ("highs", "cbc", "gurobi")
MEMORY_SCALE = 1000.0  # the budget (or the store-all peak) is this many model units of memory
PEAK_BOUND_SHARE = 0.1  # of the min-peak MILP's time limit, at most, for the backward bound (solvers/peak_bound.py)


# --- the model -------------------------------------------------------------------------------


@dataclass
class CheckmateModel:
    """The PuLP problem and its variables, indexed as in the paper."""

    graph: Graph
    problem: pulp.LpProblem
    R: dict[tuple[int, int], pulp.LpVariable]  # (t, i), i <= t
    S: dict[tuple[int, int], pulp.LpVariable]  # (t, i), 1 <= t, i < t
    HELD: dict[tuple[int, int, int], pulp.LpVariable]  # (t, i, p): output p of an op with several, i < t
    FREE: dict[tuple[int, int, int, int], pulp.LpVariable]  # (t, i, p, k): part p of i freed after k runs
    U: dict[tuple[int, int], pulp.LpVariable]  # (t, k), k <= t
    peak: pulp.LpVariable | None  # the peak (fixed memory included) in byte units, min-peak objective only
    byte_unit: float  # bytes per model unit of memory
    second_unit: float  # seconds per model unit of time
    compute_weight: float  # weight of the seconds term in the objective


@dataclass(frozen=True)
class Window:
    """Stages first..last of a schedule, solved again with every other stage held as it is (solvers/window.py).

    The model then has variables for those stages only, and only for the nodes in `nodes` (the stage nodes
    first..last are added): what stage `first` starts with and what stage last+1 must start with are the
    schedule's, constants. `nodes` holds every node stored at either boundary."""

    first: int
    last: int
    nodes: frozenset[int]
    stored_before: frozenset[int]  # S[first, .]
    stored_after: frozenset[int]  # S[last + 1, .]
    held_before: frozenset[tuple[int, int]]  # (node, output) of ops with several, HELD at stage first
    held_after: frozenset[tuple[int, int]]  # and at stage last + 1


def build_model(
    graph: Graph,
    budget_bytes: int | None,
    byte_unit: float,
    second_unit: float,
    relax: bool = False,
    window: Window | None = None,
    peak_floor_bytes: int | None = None,
) -> CheckmateModel:
    """Checkmate's MILP. budget_bytes=None: minimise the peak instead of the seconds.

    relax=True gives the LP relaxation (every binary becomes continuous in [0, 1]). window: the stages of a
    schedule to solve again, the others held (the objective then counts the window's seconds only).
    peak_floor_bytes: a peak no schedule goes below (solvers/peak_bound.py), a row under the min-peak objective.
    """
    n = len(graph)
    nodes = graph.nodes
    category = pulp.LpContinuous if relax else pulp.LpBinary
    parts = node_parts(graph)  # the outputs memory is counted by (solvers/stage_memory.py)
    freed = freed_by(graph, parts)
    mem = [sum(part.size_bytes for part in parts[i]) / byte_unit for i in range(n)]  # m_i in model units
    workspace = [node.workspace_bytes / byte_unit for node in nodes]
    cost = [node.compute_s / second_unit for node in nodes]  # C_i in model units
    fixed = graph.fixed.total_bytes / byte_unit
    problem = pulp.LpProblem("checkmate", pulp.LpMinimize)
    if window is None:
        stages = range(n)
        stored_stages = range(1, n)  # S[0, .] and S[n, .] are 0
        allowed = list(range(n))
    else:
        stages = range(window.first, window.last + 1)
        stored_stages = range(window.first + 1, window.last + 1)  # S[first, .] and S[last + 1, .] are given
        allowed = sorted(window.nodes | set(stages))
    allowed_set = set(allowed)

    def columns(t: int) -> list[int]:
        """The nodes stage t may compute (all up to t, or the window's), ascending."""
        return [i for i in allowed if i <= t]

    # Variables; (1e) frontier advancing: nothing above the diagonal is created.
    R = {(t, i): problem.add_variable(f"R_{t}_{i}", 0, 1, category) for t in stages for i in columns(t)}
    S = {(t, i): problem.add_variable(f"S_{t}_{i}", 0, 1, category) for t in stored_stages for i in columns(t - 1)}
    HELD = {(t, i, part.index): problem.add_variable(f"HELD_{t}_{i}_{part.index}", 0, 1, category)
            for t in stored_stages for i in columns(t - 1) for part in parts[i] if part.separate}
    FREE = {(t, part.node, part.index, k): problem.add_variable(f"FREE_{t}_{part.node}_{part.index}_{k}", 0, 1,
                                                                category)
            for t in stages for k in columns(t) for part in freed[k] if part.node in allowed_set}
    U = {(t, k): problem.add_variable(f"U_{t}_{k}", 0) for t in stages for k in columns(t)}

    def stored(t: int, i: int) -> pulp.LpVariable | int:
        if (t, i) in S:
            return S[t, i]
        if window is not None and t == window.first:
            return int(i in window.stored_before)
        if window is not None and t == window.last + 1:
            return int(i in window.stored_after)
        return 0  # S[0, .], S[n, .], and nodes a window leaves out

    def in_memory(t: int, part: Part) -> pulp.LpVariable | int:
        """Whether the part is in memory when stage t starts (0 before its node's stage and after the last)."""
        if not part.separate:
            return stored(t, part.node)
        if (t, part.node, part.index) in HELD:
            return HELD[t, part.node, part.index]
        if window is not None and t == window.first:
            return int((part.node, part.index) in window.held_before)
        if window is not None and t == window.last + 1:
            return int((part.node, part.index) in window.held_after)
        return 0

    def computed(t: int, i: int) -> pulp.LpVariable | int:
        return R.get((t, i), 0)

    def add(constraint: pulp.LpConstraint | bool, name: str) -> None:
        """Add a constraint; one between constants (at a window's boundary) must hold already."""
        if isinstance(constraint, bool):
            if not constraint:
                raise ValueError(f"the window's boundary breaks {name}")
            return
        problem.addConstraint(constraint, name)

    # (1d) frontier advancing: stage t computes node t.
    for t in stages:
        problem += R[t, t] == 1, f"frontier_{t}"

    # (1b) dependencies: a node runs only if each of its inputs is computed earlier in the stage or stored.
    for t in stages:
        for j in columns(t):
            for i in sorted(set(nodes[j].deps)):
                add(R[t, j] <= computed(t, i) + stored(t, i), f"dep_{t}_{i}_{j}")

    # (1c) storage: a value is in memory at the start of stage t+1 only if it was at the start of
    # stage t or was computed during it.
    for t in stages:
        if t + 1 < n:
            for i in columns(t):
                kept = stored(t + 1, i)
                if not isinstance(kept, int) or kept:  # a window's boundary that drops i: nothing to say
                    add(kept <= stored(t, i) + R[t, i], f"store_{t + 1}_{i}")

    # The outputs of an op with several: each is in memory only while the op is (HELD <= S), only if it was at the
    # start of the stage before or was computed there (as (1c)), and a reader of it needs it (as (1b)). The op is
    # not computed again while it is in memory: the simulator holds its outputs through, and that would hide
    # how long an output the model released early is really held.
    part_of = {(part.node, part.index): part for group in parts for part in group}
    for (t, i, p), held in HELD.items():
        problem += held <= S[t, i], f"held_stored_{t}_{i}_{p}"
        add(held <= in_memory(t - 1, part_of[i, p]) + computed(t - 1, i), f"held_carried_{t}_{i}_{p}")
    if window is not None and window.last + 1 < n:
        for i, p in sorted(window.held_after):
            add(1 <= in_memory(window.last, part_of[i, p]) + computed(window.last, i),
                f"held_carried_{window.last + 1}_{i}_{p}")
    for t in stages:
        for i in columns(t - 1):
            if any(part.separate for part in parts[i]):
                add(R[t, i] + stored(t, i) <= 1, f"not_again_while_stored_{t}_{i}")
                for part in parts[i]:
                    for j in part.readers:
                        if j <= t and (t, j) in R:
                            add(R[t, j] <= R[t, i] + in_memory(t, part), f"dep_{t}_{i}_{part.index}_{j}")

    # (M1) memory when the stage's first node runs: what is stored, plus that node if it runs.
    # (M2) memory when the next node runs: less what the last one's run freed, plus the next one if it runs.
    for t in stages:
        previous = None
        for k in columns(t):
            if previous is None:
                problem += (U[t, k] == pulp.lpSum(part.size_bytes / byte_unit * in_memory(t, part)
                                                  for i in columns(t - 1) for part in parts[i])
                            + mem[k] * R[t, k]), f"mem_start_{t}"
            else:
                released = pulp.lpSum(part.size_bytes / byte_unit * FREE[t, part.node, part.index, previous]
                                      for part in freed[previous] if (t, part.node, part.index, previous) in FREE)
                problem += U[t, k] == U[t, previous] - released + mem[k] * R[t, k], f"mem_{t}_{k}"
            previous = k

    # (M3) FREE[t, i, p, k] = R[t, k] * (1 - in memory at t+1) * prod over readers j > k of p of (1 - R[t, j]),
    # linearised tightly: FREE is at most each factor (FREE may stay 0: the model then frees less than the
    # simulator).
    for (t, i, p, k), free in FREE.items():
        part = part_of[i, p]
        problem += free <= R[t, k], f"free_runs_{t}_{i}_{p}_{k}"
        if t + 1 < n:
            add(free + in_memory(t + 1, part) <= 1, f"free_not_kept_{t}_{i}_{p}_{k}")
        for j in part.readers:
            if k < j <= t and (t, j) in R:
                problem += free + R[t, j] <= 1, f"free_last_use_{t}_{i}_{p}_{k}_{j}"

    # Valid inequalities (V1), (V2): every 0/1 solution of the constraints above satisfies them, so the optimum
    # stays the same; they cut off fractional points of the LP relaxation that HiGHS's proof of optimality rests on.
    # (V1) in stage t, part p of node i is freed at most once, only if it is there, and not at all if kept:
    #     sum over k of FREE[t, i, p, k] + (p in memory at t+1) <= (p in memory at t) + R[t, i].
    # Kept: (M3) sets every FREE of the part to 0, and (1c) (or held_carried) gives 1 <= the right side. Not kept:
    # FREEs at k1 < k2 would need R[t, k2] = 1 (k2 > i reads the part) and FREE[k1] + R[t, k2] <= 1, so at most
    # one FREE is 1; it needs R[t, k] = 1, so k = i (R[t, i] = 1) or k reads the part, which (1b) then computes or
    # has in memory. In the LP, fractional FREEs at several readers could free more than the part holds.
    for t in stages:
        for i in columns(t):
            for part in parts[i]:
                frees = [FREE[t, i, part.index, k] for k in (i, *part.readers) if (t, i, part.index, k) in FREE]
                if frees:
                    add(pulp.lpSum(frees) + in_memory(t + 1, part) <= in_memory(t, part) + computed(t, i),
                        f"freed_once_{t}_{i}_{part.index}")

    # (V2) the frontier's knapsack: while node t runs in stage t, U[t, t] holds t's output (R[t, t] = 1), every part
    # of an earlier node that t reads ((1b) puts it in memory; (M3) frees nothing before t, since t reads it later),
    # and every other part of an earlier node kept into stage t+1 ((M3) frees nothing of it in stage t; (1c) has it
    # in memory at the start or computed before t). Every part counts >= 0 in U (at most one FREE, only once it is
    # there: (V1)), so U[t, t] >= the sum below, and (M4) bounds it. As one row over 0/1 variables it gives
    # HiGHS knapsack covers and fixings that (M4) implies only through the continuous U chain.
    frontier = {}
    for t in stages:
        needed = mem[t] + workspace[t]
        kept = []
        for i in columns(t - 1):
            for part in parts[i]:
                if t in part.readers:
                    needed += part.size_bytes / byte_unit
                else:
                    kept.append(part.size_bytes / byte_unit * in_memory(t + 1, part))
        frontier[t] = needed + pulp.lpSum(kept)

    # (M4) budget: fixed memory + activations + the running node's workspace, at every step of every stage.
    seconds = pulp.lpSum(cost[i] * R[t, i] for (t, i) in R if cost[i] > 0)
    peak = None
    if budget_bytes is not None:
        capacity = budget_bytes / byte_unit - fixed
        for (t, k), held in U.items():
            problem += held + workspace[k] * R[t, k] <= capacity, f"budget_{t}_{k}"
        for t, held in frontier.items():
            if len(held):  # a row without variables is implied by (M4) already
                problem += held <= capacity, f"frontier_budget_{t}"
        compute_weight = 1.0
        problem += seconds  # (1a) objective: seconds of every computation, recomputations included
    else:
        peak = problem.add_variable("PEAK", 0)
        for (t, k), held in U.items():
            problem += peak >= fixed + held + workspace[k] * R[t, k], f"peak_{t}_{k}"
        for t, held in frontier.items():
            problem += peak >= fixed + held, f"frontier_peak_{t}"
        if peak_floor_bytes is not None:
            # (V3) the backward bound: every 0/1 solution's PEAK is at least the simulated peak of its schedule (the
            # accounting above is an upper bound of remat.simulate's), which no schedule running node n-1 takes below
            # peak_floor_bytes. A millionth of a unit below it, so float sums of the same bytes never cut the
            # optimum off. The LP relaxation cannot see this bound: it keeps a value a fraction in memory, and makes
            # a gradient the last node reads again in the last stage at a fraction of its inputs.
            problem += peak >= peak_floor_bytes / byte_unit - 1e-6, "peak_floor"
        # Objective: the peak, plus the seconds with a weight small enough that all the seconds a schedule can
        # spend (node i runs at most once in each of the n - i stages) are worth less than half a byte, or
        # where a byte is below HiGHS's tolerances, less than a millionth of the reference memory.
        most_seconds = sum(cost[i] * (n - i) for i in range(n))
        worth = max(0.5 / byte_unit, 1e-6 * MEMORY_SCALE)
        compute_weight = min(1e-3, worth / most_seconds) if most_seconds > 0 else 0.0
        problem += peak + compute_weight * seconds

    return CheckmateModel(graph, problem, R, S, HELD, FREE, U, peak, byte_unit, second_unit, compute_weight)


def model_values(model: CheckmateModel, R: list[list[int]], S: list[list[int]]) -> dict[str, float]:
    """Every variable's value for given stage matrices (HELD and FREE exact, U by (M1)/(M2)); for warm starts."""
    exact = stage_values(model.graph, R, S, size=lambda part: part.size_bytes / model.byte_unit)
    values: dict[str, float] = {}
    for (t, i), var in model.R.items():
        values[var.name] = float(R[t][i] or i == t)
    for (t, i), var in model.S.items():
        values[var.name] = float(S[t][i])
    for key, var in model.HELD.items():
        values[var.name] = float(exact.held[key])
    for key, var in model.FREE.items():
        values[var.name] = float(exact.free[key])
    for key, var in model.U.items():
        values[var.name] = exact.memory[key]
    return values


def rounded_matrices(model: CheckmateModel) -> tuple[list[list[int]], list[list[int]]]:
    """R and S as 0/1 lists from the solver's values."""
    n = len(model.graph)
    R = [[0] * n for _ in range(n)]
    S = [[0] * n for _ in range(n)]
    for (t, i), var in model.R.items():
        R[t][i] = int(i == t or (var.value() or 0.0) > 0.5)
    for (t, i), var in model.S.items():
        S[t][i] = int((var.value() or 0.0) > 0.5)
    return R, S


# --- back-ends ------------------------------------------------------------------------------


def _cbc(**kwargs) -> pulp.LpSolver:
    with warnings.catch_warnings():  # PuLP 3.3 announces that PULP_CBC_CMD (its bundled CBC) goes in 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**kwargs)


def backend_available(name: str) -> bool:
    if name == "highs":
        return pulp.HiGHS().available() or pulp.HiGHS_CMD(msg=False).available()
    if name == "cbc":
        return _cbc(msg=False).available()
    if name == "gurobi":
        return pulp.GUROBI(msg=False).available()
    return False


def available_backends() -> list[str]:
    return [name for name in BACKENDS if backend_available(name)]


@dataclass
class SolveOutcome:
    """What a back-end reports, in one form for all of them."""

    status: str  # OPTIMAL, FEASIBLE (an incumbent, not proven), INFEASIBLE, NO_SOLUTION
    objective: float | None  # model units
    bound: float | None  # dual bound, model units
    message: str


MIN_RUN_S = 1e-3  # HiGHS's time limit when the deadline has passed: it returns the warm start at once
CHILD_MIN_LEFT_S = 0.3  # a large model is solved (in a child process) only with at least this much time left
# What a model's build costs, from its FREE variables (cheap to count), to tell before building it whether HiGHS could
# run it in the time given. 94-node MLP, VGG16's and U-Net's coarse levels (2.7k to 9.2k FREE variables, 39k to 135k
# non-zeros): 14.0 to 14.7 non-zeros and 300 to 470 us of build (PuLP, then its copy into HiGHS's arrays) per FREE
# variable on this 2-core machine under load. Both are taken low, so that only a model HiGHS could not run is skipped.
NONZEROS_PER_FREE = 10
BUILD_S_PER_FREE = 1e-4


def free_variables(graph: Graph) -> int:
    """The FREE variables of `graph`'s model (build_model's FREE: each part a node's run may free, in every stage from
    that node on)."""
    freed = freed_by(graph, node_parts(graph))
    return sum(len(freed[k]) * (len(graph) - k) for k in range(len(graph)))


def unbuildable_in(graph: Graph, options: SolveOptions) -> str:
    """Why the model of `graph` is not worth building in options.time_limit_s ("" when it is): a model HiGHS solves
    only in a child process, whose build (not interruptible) would leave less than CHILD_MIN_LEFT_S for that child, so
    that HiGHS would not run it at all. Such builds took 3.7 to 4.5 s each of a 1-s `remat.solve` of a 94-node MLP,
    stages started near the deadline with MIN_STAGE_S each (4.7 s in all, for the plan a baseline had before)."""
    if options.backend != "highs" or not pulp.HiGHS().available():  # only in-process HiGHS skips large models
        return ""
    free = free_variables(graph)
    build_s = free * BUILD_S_PER_FREE
    if free * NONZEROS_PER_FREE < LARGE_MODEL_NONZEROS or options.time_limit_s >= build_s + CHILD_MIN_LEFT_S:
        return ""
    return (f"not built: its {free:,} FREE variables take {build_s:.1f} s or more to build, and "
            f"{options.time_limit_s:.1f} s leaves less than the {CHILD_MIN_LEFT_S} s the process that solves a model "
            "that size needs")


def highs_arrays(problem: pulp.LpProblem) -> HighsArrays:
    """The problem as HiGHS takes it, setting var.index (PuLP's numbering of the columns) on the way."""
    infinity = math.inf
    sign = -1 if problem.sense == pulp.LpMaximize else 1
    variables = problem.variables()
    for index, var in enumerate(variables):
        var.index = index
    starts, columns, coefficients, row_lower, row_upper = [], [], [], [], []
    for index, constraint in enumerate(problem._constraints.values()):
        constraint.index = index
        starts.append(len(columns))
        for var, coefficient in constraint.items():
            if coefficient != 0:
                columns.append(var.index)
                coefficients.append(coefficient)
        low, high = constraint.getLb(), constraint.getUb()
        row_lower.append(-infinity if low is None else low)
        row_upper.append(infinity if high is None else high)
    return HighsArrays(
        costs=np.array([sign * problem.objective.get(var, 0.0) for var in variables], dtype=np.float64),
        lower=np.array([-infinity if var.lowBound is None else var.lowBound for var in variables], dtype=np.float64),
        upper=np.array([infinity if var.upBound is None else var.upBound for var in variables], dtype=np.float64),
        integers=np.array([var.index for var in variables if var.cat == pulp.LpInteger], dtype=np.int32),
        row_lower=np.array(row_lower, dtype=np.float64), row_upper=np.array(row_upper, dtype=np.float64),
        starts=np.array(starts, dtype=np.int32), columns=np.array(columns, dtype=np.int32),
        coefficients=np.array(coefficients, dtype=np.float64))


class _HighsWithStart(pulp.HiGHS):
    """pulp.HiGHS (highspy in-process) that hands HiGHS a starting solution before it runs, and sets its time
    limit to what is left before `deadline` (a time.perf_counter() value) once PuLP has copied the model in:
    that copy takes seconds on large models, and HiGHS's own clock starts after it. `on_incumbent` is called
    with each improving MIP solution HiGHS finds (its column values, by var.index), where highspy has callbacks."""

    def __init__(self, start: dict[str, float] | None, deadline: float | None = None,
                 on_incumbent: Callable[[Sequence[float]], None] | None = None, model: HighsArrays | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.start = start
        self.deadline = deadline
        self.on_incumbent = on_incumbent
        self.model = model  # the problem's arrays, when they are made already

    def buildSolverModel(self, lp: pulp.LpProblem) -> None:  # noqa: N802 (PuLP's name)
        load(lp.solverModel, self.model or highs_arrays(lp), self.mip)

    def callSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 (PuLP's name)
        if self.start:
            import highspy

            solution = highspy.HighsSolution()
            solution.col_value = [self.start.get(var.name, 0.0) for var in lp.variables()]  # by var.index order
            solution.value_valid = True
            lp.solverModel.setSolution(solution)
        if self.deadline is not None:
            lp.solverModel.setOptionValue("time_limit", max(MIN_RUN_S, self.deadline - time.perf_counter()))
        for name, value in presolve_settings().items():
            lp.solverModel.setOptionValue(name, value)
        improving = getattr(lp.solverModel, "cbMipImprovingSolution", None)  # highspy 1.10 and later
        if self.on_incumbent is not None and improving is not None:
            on_incumbent = self.on_incumbent
            improving.subscribe(lambda event: on_incumbent(event.data_out.mip_solution))
        lp.solverModel.run()


ENUMERATION_RULE_BIT = 1 << 16  # HiGHS 1.15 and 1.16 number their presolve rules so (presolve_rule_logging)


@functools.cache
def presolve_settings() -> dict[str, int]:
    """HiGHS options every run of ours takes: its presolve's Enumeration rule off. HiGHS 1.16.0's Enumeration
    called feasible Checkmate models infeasible (a 7-node step at 11 bytes, where a schedule peaks at 11 and HiGHS
    1.15.1, presolve off, or the rule off, all solve it; tests/test_checkmate.py). The rule is off in 1.15 too,
    which numbers it the same; older HiGHS numbers the rules otherwise and gets no setting."""
    try:
        version = tuple(int(part) for part in importlib.metadata.version("highspy").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return {}
    return {"presolve_rule_off": ENUMERATION_RULE_BIT} if version >= (1, 15) else {}


@functools.cache
def _skip_highs_banner() -> None:
    """HiGHS prints its banner from C++ to stdout when a process makes its first Highs object, whatever its
    options (msg=False sets them only after): make that first one with stdout on /dev/null, so the banner does
    not open remat's report."""
    import highspy

    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to print to (a daemon's closed descriptor): nothing to keep the banner off
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_highs(problem: pulp.LpProblem, options: SolveOptions, start: dict[str, float] | None,
                 mip: bool, deadline: float,
                 on_incumbent: Callable[[Sequence[float]], None] | None = None) -> SolveOutcome:
    settings = dict(mip=mip, msg=options.verbose, gapRel=options.mip_gap, threads=options.threads or None)
    if not pulp.HiGHS().available():  # no highspy: the command-line HiGHS through files
        left = max(MIN_RUN_S, deadline - time.perf_counter())
        return _solve_command(problem, pulp.HiGHS_CMD(timeLimit=left, warmStart=start is not None, **settings),
                              start)
    if not options.verbose:
        _skip_highs_banner()
    model = highs_arrays(problem)
    # HiGHS checks its clock only at some points (its MIP presolve ran for minutes past a 0.5-s limit on GPT-2's
    # covering model), so a large model runs only in a child process that can be stopped; with too little time
    # left for that child to start, it is not run at all (a warm start given is still the result).
    large = model.nonzeros >= LARGE_MODEL_NONZEROS
    left = deadline - time.perf_counter()
    if large and left < CHILD_MIN_LEFT_S:
        return SolveOutcome(NO_SOLUTION, None, None, f"HiGHS not run: {max(0.0, left):.1f} s left, too little to "
                            f"start the process that solves a model of {model.nonzeros:,} non-zeros")
    run = _run_in_child if large else _run_in_process
    result = run(problem, model, options, start, mip, deadline, on_incumbent, presolve=True)
    retried = ""
    if result.model_status in ("kSolveError", "kPostsolveError") or _start_handed_back(problem, result, start):
        # HiGHS 1.15's presolve can hand back a solution that breaks the model (seen on 3-node graphs, then
        # reported as a solve error), and HiGHS 1.16's can hand back the start itself with the objective of a
        # better solution it found in the presolved model: solve again without presolve in the time left.
        result = run(problem, model, options, start, mip, deadline, on_incumbent, presolve=False)
        retried = " (solved again without presolve, after its presolve failed or handed back the start)"
    stopped = f"; {result.stopped}" if result.stopped else ""
    message = f"HiGHS: {result.status_text}{retried}{stopped}"
    if result.model_status == "kOptimal":
        return SolveOutcome(OPTIMAL, result.objective, result.dual_bound if result.dual_bound is not None
                            else result.objective, message)
    if result.model_status in ("kInfeasible", "kUnboundedOrInfeasible"):
        return SolveOutcome(INFEASIBLE, None, None, message)  # the objective is bounded: infeasible
    if result.primal_feasible:
        return SolveOutcome(FEASIBLE, result.objective, result.dual_bound, message)
    return SolveOutcome(NO_SOLUTION, None, result.dual_bound, message)


def _run_in_process(problem: pulp.LpProblem, model: HighsArrays, options: SolveOptions,
                    start: dict[str, float] | None, mip: bool, deadline: float,
                    on_incumbent: Callable[[Sequence[float]], None] | None, presolve: bool) -> HighsResult:
    settings = dict(mip=mip, msg=options.verbose, gapRel=options.mip_gap, threads=options.threads or None)
    if not presolve:
        settings["presolve"] = "off"
    left = max(MIN_RUN_S, deadline - time.perf_counter())
    problem.solve(_HighsWithStart(start, deadline, on_incumbent, model, timeLimit=left, **settings))
    return result_of(problem.solverModel, mip)


def _run_in_child(problem: pulp.LpProblem, model: HighsArrays, options: SolveOptions,
                  start: dict[str, float] | None, mip: bool, deadline: float,
                  on_incumbent: Callable[[Sequence[float]], None] | None, presolve: bool) -> HighsResult:
    """The same run in a process of its own, killed if it overruns its deadline (solvers/highs_process.py);
    the problem's variables get the values it ends with, as PuLP gives them in-process."""
    highs_options: dict[str, object] = dict(presolve_settings())
    if mip:
        highs_options["mip_rel_gap"] = options.mip_gap
    if options.threads:
        highs_options["threads"] = options.threads
    if not presolve:
        highs_options["presolve"] = "off"
    variables = problem.variables()  # by var.index, which highs_arrays set
    values = [start.get(var.name, 0.0) for var in variables] if start else None
    result = solve_in_child(model, mip, highs_options, values, deadline, on_incumbent, verbose=options.verbose)
    if result.values is not None:
        for var, value in zip(variables, result.values.tolist(), strict=True):
            var.varValue = value
    return result


def _start_handed_back(problem: pulp.LpProblem, result: HighsResult, start: dict[str, float] | None) -> bool:
    """Whether HiGHS returned values whose objective is not the one it reports (its presolve mapped a better
    solution of the reduced model back onto the warm start: seen on a 5-node graph, values at 6 reported as 5)."""
    if not start or not result.primal_feasible or result.objective is None:
        return False
    achieved = problem.objective.value() or 0.0
    return abs(achieved - result.objective) > 1e-6 * max(1.0, abs(result.objective))


def _solve_command(problem: pulp.LpProblem, solver: pulp.LpSolver, start: dict[str, float] | None) -> SolveOutcome:
    """A back-end that PuLP runs as a command (CBC, HiGHS_CMD): status and incumbent, no dual bound."""
    if start:
        for var in problem.variables():
            var.setInitialValue(start.get(var.name, 0.0))
    try:
        problem.solve(solver)
    except pulp.PulpSolverError as error:  # CBC ending without a solution file (killed, or out of time at once)
        return SolveOutcome(NO_SOLUTION, None, None, f"{solver.name}: {str(error).splitlines()[0]}")
    # (the problem's status reads "Optimal" for a solution found in the time limit too: the solution's says which)
    message = f"{solver.name}: {pulp.LpSolution[problem.sol_status]}"
    if problem.status == pulp.LpStatusInfeasible and problem.sol_status != pulp.LpSolutionInfeasible:
        # CBC's "Integer infeasible" (PuLP reads its first word as infeasible): CBC 2.10.3, PuLP's own, says so when
        # its time limit cuts the pre-processing short ("Cut generators found to be infeasible!"), of a model whose
        # warm start is a solution (a U-Net step's 44-node coarse MILP with 0.5 s; with 0.3 s and 0.8 s it stopped
        # with the warm start), so it is no proof: the MILP of a whole graph made the plan's lower bound None
        return SolveOutcome(NO_SOLUTION, None, None, f"{solver.name}: integer infeasible, said by its pre-processing "
                                                     "(also when its time runs out: not a proof)")
    if problem.status == pulp.LpStatusInfeasible:
        return SolveOutcome(INFEASIBLE, None, None, message)
    objective = pulp.value(problem.objective)
    if problem.sol_status == pulp.LpSolutionOptimal:
        return SolveOutcome(OPTIMAL, objective, objective, message)
    if problem.sol_status == pulp.LpSolutionIntegerFeasible:
        return SolveOutcome(FEASIBLE, objective, None, message)
    return SolveOutcome(NO_SOLUTION, None, None, message)


def _solve_gurobi(problem: pulp.LpProblem, options: SolveOptions, start: dict[str, float] | None) -> SolveOutcome:
    if start:
        for var in problem.variables():
            var.setInitialValue(start.get(var.name, 0.0))
    solver = pulp.GUROBI(msg=options.verbose, timeLimit=options.time_limit_s, gapRel=options.mip_gap,
                         warmStart=start is not None, threads=options.threads or None)
    problem.solve(solver)
    gurobi = problem.solverModel
    status, count = gurobi.Status, gurobi.SolCount  # 2 optimal, 3 infeasible, 4 infeasible or unbounded
    message = f"Gurobi: status {status}"
    if status in (3, 4):
        return SolveOutcome(INFEASIBLE, None, None, message)
    bound = gurobi.ObjBound if math.isfinite(gurobi.ObjBound) else None
    if count == 0:
        return SolveOutcome(NO_SOLUTION, None, bound, message)
    return SolveOutcome(OPTIMAL if status == 2 else FEASIBLE, gurobi.ObjVal, bound, message)


def solve_problem(problem: pulp.LpProblem, options: SolveOptions, start: dict[str, float] | None = None,
                  mip: bool = True, deadline: float | None = None,
                  on_incumbent: Callable[[Sequence[float]], None] | None = None) -> SolveOutcome:
    """Run the back-end options.backend names; a missing one is a ValueError naming those present.

    `deadline` (a time.perf_counter() value): when HiGHS must stop, the time spent handing it the model
    included; without one it gets options.time_limit_s from now. `on_incumbent`: called with the column values
    (by var.index) of each improving solution in-process HiGHS finds; the other back-ends never call it."""
    if not backend_available(options.backend):
        raise ValueError(f"MILP back-end {options.backend!r} is not available here; "
                         f"available: {', '.join(available_backends()) or 'none'}")
    if deadline is None:
        deadline = time.perf_counter() + options.time_limit_s
    if options.backend == "highs":
        return _solve_highs(problem, options, start, mip, deadline, on_incumbent)
    # the time left to the deadline (the model's build counts against it): CBC was given the whole limit again
    left = deadline - time.perf_counter()
    if left <= 0:  # CBC reads the model and solves its root LP before it looks at the clock (seconds on 50k rows)
        return SolveOutcome(NO_SOLUTION, None, None, f"{options.backend}: not run, no time left")
    options = replace(options, time_limit_s=left)
    if options.backend == "cbc":
        cbc = _cbc(msg=options.verbose, timeLimit=options.time_limit_s, gapRel=options.mip_gap,
                   warmStart=start is not None, threads=options.threads or None, mip=mip)
        return _solve_command(problem, cbc, start)
    return _solve_gurobi(problem, options, start)


# --- warm starts ----------------------------------------------------------------------------


@dataclass
class WarmStart:
    schedule: Schedule  # the schedule given, when it is valid (and fits the budget)
    values: dict[str, float] | None  # the model's variables for it, None when it breaks the model's accounting
    note: str


def prepare_warm_start(model: CheckmateModel, schedule: Schedule | None, budget_bytes: int | None) -> WarmStart | None:
    """Check a warm start and turn it into the model's variable values.

    values is None when the solver cannot use it (the note says why); schedule is still a valid fallback
    unless the note starts with "skipped" (invalid, or over the budget)."""
    if schedule is None:
        return None
    graph = model.graph
    sim = simulate(graph, schedule)
    if not sim.valid:
        return WarmStart(schedule, None, f"skipped: not a valid schedule ({sim.errors[0]})")
    if budget_bytes is not None and sim.peak_bytes > budget_bytes:
        return WarmStart(schedule, None, f"skipped: peak {sim.peak_bytes} bytes does not fit the budget")
    try:
        R, _ = schedule.to_matrices()
    except ValueError as error:
        return WarmStart(schedule, None, f"not used by the solver: not frontier-advancing ({error})")
    S = minimal_storage(graph, R)  # to_matrices keeps what is freed later in the stage; drop it
    values = model_values(model, R, S)
    if budget_bytes is not None:
        capacity = (budget_bytes - graph.fixed.total_bytes) / model.byte_unit
        workspace = [node.workspace_bytes / model.byte_unit for node in graph.nodes]
        over = [(t, k) for (t, k), var in model.U.items()
                if values[var.name] + workspace[k] * values[model.R[t, k].name] > capacity * (1 + 1e-9)]
        if over:
            return WarmStart(schedule, None, "not used by the solver: over the budget in the model's accounting "
                                             f"at stage {over[0][0]}")
    else:
        fixed = graph.fixed.total_bytes / model.byte_unit
        workspace = [node.workspace_bytes / model.byte_unit for node in graph.nodes]
        values[model.peak.name] = max(fixed + values[var.name] + workspace[k] * values[model.R[t, k].name]
                                      for (t, k), var in model.U.items())
    return WarmStart(schedule, values, "given to the solver")


# --- solvers --------------------------------------------------------------------------------


def second_unit(graph: Graph) -> float:
    mean = graph.compute_s / len(graph) if len(graph) else 0.0
    return mean if mean > 0 else 1.0


def _solve(graph: Graph, budget_bytes: int | None, options: SolveOptions, name: str,
           constrain: Callable[[CheckmateModel], None] | None = None) -> SolverResult:
    """Build, solve, and turn the solution into a simulated Schedule (both objectives).

    `constrain` adds constraints of the caller's to the model before it is solved (solvers/decompose.py
    forbids recomputation in a block's gap stage); a warm start must satisfy them."""
    started = time.perf_counter()
    fixed_bytes = graph.fixed.total_bytes
    if budget_bytes is not None:
        reference = budget_bytes - fixed_bytes
    else:
        reference = sum(node.output_bytes for node in graph.nodes) + max(node.workspace_bytes for node in graph.nodes)
    byte_unit = max(reference, 1) / MEMORY_SCALE
    peak_floor = None  # min-peak: a bound far above the MILP's relaxation on some graphs, in a share of the time
    if budget_bytes is None and options.peak_floor_bytes is not None:
        peak_floor = options.peak_floor_bytes
    elif budget_bytes is None:
        given = simulate(graph, options.warm_start) if options.warm_start is not None else None
        target = given.peak_bytes if given is not None and given.valid else None  # no bound goes above it
        peak_floor = backward_peak_bound(graph, started + PEAK_BOUND_SHARE * options.time_limit_s, target)
    bound_s_taken = time.perf_counter() - started
    model = build_model(graph, budget_bytes, byte_unit, second_unit(graph), peak_floor_bytes=peak_floor)
    if constrain is not None:
        constrain(model)
    warm = prepare_warm_start(model, options.warm_start, budget_bytes)
    detail: dict = {"variables": len(model.problem.variables()), "constraints": model.problem.numConstraints(),
                    "backend": options.backend, "build_s": time.perf_counter() - started}
    if peak_floor is not None:
        detail["backward_peak_bound_bytes"], detail["backward_peak_bound_s"] = peak_floor, bound_s_taken
    if warm is not None:
        detail["warm_start"] = warm.note
    # The time limit covers the whole call: building the model and checking the warm start count against it.
    outcome = solve_problem(model.problem, options, warm.values if warm else None,
                            deadline=started + options.time_limit_s)
    detail["solver_message"] = outcome.message

    def bound_s(bound: float | None) -> float:
        """A lower bound on the seconds: each node runs at least once, and the solver's dual bound."""
        if budget_bytes is None or bound is None:
            return graph.compute_s
        return max(graph.compute_s, bound * model.second_unit)

    def result(status: str, schedule: Schedule | None, lower_bound_s: float | None, message: str) -> SolverResult:
        objective_s = compute_seconds(graph, schedule) if schedule is not None else None
        if objective_s is not None and lower_bound_s is not None:
            lower_bound_s = min(lower_bound_s, objective_s)
        if budget_bytes is None:
            lower_bound_s = None  # the bound is on the peak, given in detail
        return SolverResult(solver=name, status=status, schedule=schedule, objective_s=objective_s,
                            lower_bound_s=lower_bound_s, wall_s=time.perf_counter() - started,
                            message=message, detail=detail)

    if outcome.status == INFEASIBLE:
        return result(INFEASIBLE, None, None, f"no schedule fits {budget_bytes} bytes ({outcome.message})")
    fallback = warm.schedule if warm is not None and not warm.note.startswith("skipped") else None
    if outcome.status == NO_SOLUTION:
        if fallback is not None:
            return result(FEASIBLE, fallback, bound_s(outcome.bound),
                          f"no solution found in {options.time_limit_s:.3g} s ({outcome.message}): "
                          "returning the warm start")
        return result(NO_SOLUTION, None, bound_s(outcome.bound), f"no solution found ({outcome.message})")

    R, S = rounded_matrices(model)
    schedule = Schedule.from_matrices(graph, R, S)
    sim = simulate(graph, schedule)
    if not sim.valid or (budget_bytes is not None and sim.peak_bytes > budget_bytes):
        # Only a rounding or tolerance accident can get here: never return a schedule that breaks the budget.
        problem = sim.errors[0] if sim.errors else f"simulated peak {sim.peak_bytes} bytes over the budget"
        detail["rejected_solution"] = problem
        if fallback is not None:
            return result(FEASIBLE, fallback, bound_s(outcome.bound), f"solver solution rejected ({problem}): "
                                                                      "returning the warm start")
        return result(NO_SOLUTION, None, bound_s(outcome.bound), f"solver solution rejected: {problem}")
    if fallback is not None and warm.values is None:  # a warm start the solver never saw may still be better
        given = simulate(graph, fallback)
        better = (given.compute_s < sim.compute_s if budget_bytes is not None
                  else (given.peak_bytes, given.compute_s) < (sim.peak_bytes, sim.compute_s))
        if better:
            detail["solver_schedule_compute_s"] = sim.compute_s
            if budget_bytes is None:
                detail["peak_bytes"] = detail["simulated_peak_bytes"] = given.peak_bytes
            return result(FEASIBLE, fallback, bound_s(outcome.bound),
                          f"the warm start beats the solver's schedule ({outcome.message})")
    if budget_bytes is None:
        detail["peak_bytes"] = round(model.peak.value() * byte_unit)
        detail["simulated_peak_bytes"] = sim.peak_bytes
        if outcome.bound is not None:  # less the most the seconds term can add
            most_seconds = sum(node.compute_s * (len(graph) - i) for i, node in enumerate(graph.nodes))
            slack = model.compute_weight * most_seconds / model.second_unit
            detail["peak_lower_bound_bytes"] = max(graph.min_budget_lower_bound(), peak_floor,
                                                   math.ceil((outcome.bound - slack) * byte_unit - 1e-6))
    verdict = "optimal" if outcome.status == OPTIMAL else "time limit: best schedule found"
    return result(outcome.status, schedule, bound_s(outcome.bound), f"{verdict} ({outcome.message})")


def solve_checkmate(graph: Graph, budget_bytes: int, options: SolveOptions | None = None,
                    constrain: Callable[[CheckmateModel], None] | None = None) -> SolverResult:
    """The fastest frontier-advancing schedule whose peak (fixed memory included) fits budget_bytes."""
    options = options or SolveOptions()
    settled = settled_without_solving("checkmate", graph, budget_bytes)
    if settled is not None:
        return settled
    return _solve(graph, budget_bytes, options, "checkmate", constrain)


def solve_min_peak(graph: Graph, options: SolveOptions | None = None) -> SolverResult:
    """The frontier-advancing schedule with the smallest peak, and among those the fastest (nearly).

    detail["peak_bytes"] is the model's peak: the minimum feasible budget when the status is OPTIMAL;
    detail["peak_lower_bound_bytes"] bounds it from below when the time limit stopped the search.
    """
    options = options or SolveOptions()
    if len(graph) == 0:
        return SolverResult("checkmate-min-peak", OPTIMAL, Schedule((), 0), 0.0, None,
                            detail={"peak_bytes": graph.fixed.total_bytes})
    return _solve(graph, None, options, "checkmate-min-peak")


def lower_bound_lp(graph: Graph, budget_bytes: int, options: SolveOptions | None = None) -> float | None:
    """Seconds of the LP relaxation: a lower bound on the optimum; None when even the LP is infeasible
    (then no schedule fits)."""
    options = options or SolveOptions()
    if budget_bytes < graph.min_budget_lower_bound():
        return None
    byte_unit = max(budget_bytes - graph.fixed.total_bytes, 1) / MEMORY_SCALE
    model = build_model(graph, budget_bytes, byte_unit, second_unit(graph), relax=True)
    outcome = solve_problem(model.problem, options, mip=False)
    if outcome.status == INFEASIBLE:
        return None
    if outcome.status != OPTIMAL or outcome.objective is None:
        return graph.compute_s  # the LP did not finish: fall back to the trivial bound
    return max(graph.compute_s, outcome.objective * model.second_unit)
