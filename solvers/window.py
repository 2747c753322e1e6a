"""Window polish: Checkmate's MILP on a few consecutive stages of a schedule at a time, the others held as they are.

The whole-graph MILP does not fit graphs of hundreds of nodes in a minute (DESIGN.md: 320 nodes stalled at
the root). A window of W stages does: it has W rows of variables, and only for the nodes the schedule computes
or stores in or around the window (and their inputs, DEPTH levels up). What stage `first` starts with and what
stage last+1 must start with stay the schedule's, so every schedule of the window fits into the rest, and the
window's optimum is never worse than the schedule's own stages (its warm start). Windows go where the schedule
spends most on recomputation; a window that improves is kept, and the windows are ranked again.
A local optimum: the result is feasible, never proven optimal, and costs at most what it started from.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from remat.graph import Graph
from remat.schedule import Schedule, compute_seconds, minimal_storage
from remat.simulate import simulate
from solvers.base import FEASIBLE, SolveOptions, SolverResult
from solvers.checkmate import MEMORY_SCALE, Window, build_model, model_values, second_unit, solve_problem
from solvers.stage_memory import node_parts, stage_values

WINDOW_STAGES = 24  # stages in a window
DEPTH = 2  # levels of inputs, above what the schedule computes or stores there, a window may compute
MIN_WINDOW_S = 2.0  # a window is not started with less time left than this
WINDOW_S = 10.0  # the most one window's MILP may take
GAIN = 1e-9  # relative improvement that counts


def matrices(graph: Graph, schedule: Schedule) -> tuple[list[list[int]], list[list[int]]]:
    """A frontier-advancing schedule's (R, S), S minimal (ValueError when it is not frontier-advancing)."""
    R, _ = schedule.to_matrices()
    return R, minimal_storage(graph, R)


def window_at(graph: Graph, R: list[list[int]], S: list[list[int]], first: int, last: int,
              depth: int = DEPTH) -> Window:
    """The window of stages first..last of (R, S): the nodes computed or stored there, and DEPTH levels of their
    inputs."""
    n = len(graph)
    held = stage_values(graph, R, S).held
    parts = node_parts(graph)
    involved = {i for t in range(first, last + 1) for i in range(t + 1) if R[t][i] or i == t}
    involved |= {i for t in range(first, min(last + 2, n)) for i in range(t) if S[t][i]}
    frontier = set(involved)
    for _ in range(depth):
        frontier = {d for i in frontier for d in graph.nodes[i].deps} - involved
        involved |= frontier
    after = last + 1

    def separate_held(t: int) -> frozenset[tuple[int, int]]:
        if t >= n:
            return frozenset()
        return frozenset((i, part.index) for i, group in enumerate(parts) if i < t for part in group
                         if part.separate and held.get((t, i, part.index), 0))

    return Window(first, last, frozenset(involved),
                  stored_before=frozenset(i for i in range(first) if S[first][i]),
                  stored_after=frozenset(i for i in range(after) if after < n and S[after][i]),
                  held_before=separate_held(first), held_after=separate_held(after))


def solve_window(graph: Graph, budget_bytes: int, R: list[list[int]], S: list[list[int]], window: Window,
                 options: SolveOptions, deadline: float) -> tuple[list[list[int]], list[list[int]]] | None:
    """(R, S) with the window's stages re-solved, or None when the solver found nothing better."""
    byte_unit = max(budget_bytes - graph.fixed.total_bytes, 1) / MEMORY_SCALE
    model = build_model(graph, budget_bytes, byte_unit, second_unit(graph), window=window)
    start = model_values(model, R, S)
    outcome = solve_problem(model.problem, options, start, deadline=deadline)
    if outcome.objective is None:
        return None
    before = sum(graph.nodes[i].compute_s for t in range(window.first, window.last + 1) for i in range(t + 1)
                 if R[t][i] or i == t)
    R2 = [row[:] for row in R]
    S2 = [row[:] for row in S]
    for t in range(window.first, window.last + 1):
        R2[t] = [0] * len(graph)
    for (t, i), var in model.R.items():
        R2[t][i] = int(i == t or (var.value() or 0.0) > 0.5)
    for t in range(window.first + 1, window.last + 1):
        S2[t] = [0] * len(graph)
    for (t, i), var in model.S.items():
        S2[t][i] = int((var.value() or 0.0) > 0.5)
    after = sum(graph.nodes[i].compute_s for t in range(window.first, window.last + 1) for i in range(t + 1)
                if R2[t][i])
    return (R2, S2) if after < before * (1 - GAIN) else None


def recompute_seconds(graph: Graph, R: list[list[int]]) -> list[float]:
    """Seconds each stage spends computing nodes again."""
    return [sum(graph.nodes[i].compute_s for i in range(t) if R[t][i]) for t in range(len(graph))]


def polish_windows(graph: Graph, budget_bytes: int, schedule: Schedule, options: SolveOptions, deadline: float,
                   width: int = WINDOW_STAGES, window_s: float = WINDOW_S,
                   say: Callable[[str], None] = lambda message: None) -> SolverResult:
    """Re-solve windows of `schedule` (frontier-advancing, within the budget: ValueError when it is not
    frontier-advancing) until the deadline or until no window improves. Each window's MILP gets at most
    `window_s`. The result's schedule is the cheapest that fits: `schedule` itself when no window improved."""
    started = time.perf_counter()
    n = len(graph)
    best = schedule
    best_s = compute_seconds(graph, schedule)
    R, S = matrices(graph, schedule)
    solved = improved = 0
    tried: set[tuple[int, float]] = set()  # (first stage, seconds of the schedule it was tried on)
    while time.perf_counter() + MIN_WINDOW_S < deadline:
        spent = recompute_seconds(graph, R)
        windows = sorted(((sum(spent[first:first + width]), first)
                          for first in range(0, max(1, n - width + 1), max(1, width // 4))), reverse=True)
        first = next((first for seconds, first in windows if seconds > 0 and (first, best_s) not in tried), None)
        if first is None:
            break
        last = min(first + width, n) - 1
        tried.add((first, best_s))
        solved += 1
        result = solve_window(graph, budget_bytes, R, S, window_at(graph, R, S, first, last), options,
                              min(deadline, time.perf_counter() + window_s))
        if result is None:
            continue
        R2 = result[0]
        S2 = minimal_storage(graph, R2)
        candidate = Schedule.from_matrices(graph, R2, S2)
        simulation = simulate(graph, candidate)
        if simulation.valid and simulation.peak_bytes <= budget_bytes and simulation.compute_s < best_s:
            best, best_s, R, S = candidate, simulation.compute_s, R2, S2
            improved += 1
            say(f"window of stages {first}..{last}: {best_s:.6g} s")
    message = (f"{improved} of {solved} window(s) of {width} stages improved the schedule" if solved
               else "no window to solve")
    return SolverResult("window-polish", FEASIBLE, best, best_s, wall_s=time.perf_counter() - started,
                        message=message, detail={"windows": solved, "improved": improved})
