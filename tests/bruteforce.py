"""Exhaustive search over frontier-advancing schedules for tiny graphs: the reference the MILP is tested against.

The class searched is the one Schedule.from_matrices emits (remat/schedule.py): stage t starts with a
stored set, recomputes some earlier nodes in ascending order, computes node t, and keeps a set of values
into stage t+1, freeing every other value right after its last use in the stage. A dynamic program over
stored sets finds the best stage sequence; its stage peaks come from the small formula in `stage_peak`,
written independently of from_matrices, and the winner is rebuilt with from_matrices and judged by
remat.simulate, which must agree with the program's figures.

Pruning that loses no optimum: recompute only nodes the stage reads or keeps; keep only values that a
later stage may read (a user of theirs is a later node or an ancestor of one); never store a value that
the stage neither reads nor keeps (dropping it one stage earlier costs nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, combinations

from remat.graph import Graph
from remat.schedule import Schedule
from remat.simulate import Simulation, simulate


@dataclass(frozen=True)
class Best:
    compute_s: float
    peak_bytes: int  # fixed included
    schedule: Schedule
    simulation: Simulation


def subsets(items: list[int]):
    return chain.from_iterable(combinations(items, size) for size in range(len(items) + 1))


def stage_peak(graph: Graph, stored: frozenset[int], computed: list[int], kept: frozenset[int]) -> int:
    """Activation bytes at the stage's peak: while computed[p] runs, memory holds every value already
    available and still needed (read at position >= p, or kept), plus computed[p]'s output and workspace."""
    nodes = graph.nodes
    last_read: dict[int, int] = {}
    for position, k in enumerate(computed):
        for d in nodes[k].deps:
            last_read[d] = position
    peak = 0
    for position, k in enumerate(computed):
        available = stored | set(computed[:position])
        held = sum(nodes[v].output_bytes for v in available if v in kept or last_read.get(v, -1) >= position)
        peak = max(peak, held + nodes[k].output_bytes + nodes[k].workspace_bytes)
    return peak


def stage_options(graph: Graph, t: int, stored: frozenset[int]):
    """(computed, kept) for every useful stage t that starts with `stored`."""
    nodes = graph.nodes
    n = len(graph)
    # a later stage reads value i if a user of i runs there: a node > t, or an ancestor of one (recomputed)
    later_ancestors: set[int] = set()
    stack = list(range(t + 1, n))
    while stack:
        for d in nodes[stack.pop()].deps:
            if d not in later_ancestors:
                later_ancestors.add(d)
                stack.append(d)
    needed_later = {i for i in range(t + 1) if any(u > t or u in later_ancestors for u in graph.users[i])}
    candidates = [i for i in range(t) if i not in stored]
    for extra in subsets(candidates):
        computed = [*extra, t]
        present = set(stored)
        runnable = True
        for k in computed:  # ascending: each node's inputs are stored or computed before it in the stage
            if not set(nodes[k].deps) <= present:
                runnable = False
                break
            present.add(k)
        if not runnable:
            continue
        read = {d for k in computed for d in nodes[k].deps}
        keepable = sorted(present & needed_later) if t + 1 < n else []
        for kept in map(frozenset, subsets(keepable)):
            if any(x not in read and x not in kept for x in extra):
                continue  # a recomputation nobody reads
            if any(s not in read and s not in kept for s in stored):
                continue  # stored for nothing: dominated by dropping it one stage earlier
            yield computed, kept


def _matrices(n: int, stages: list[tuple[list[int], frozenset[int]]]) -> tuple[list[list[int]], list[list[int]]]:
    R = [[0] * n for _ in range(n)]
    S = [[0] * n for _ in range(n)]
    for t, (computed, kept) in enumerate(stages):
        for i in computed:
            R[t][i] = 1
        if t + 1 < n:
            for i in kept:
                S[t + 1][i] = 1
    return R, S


def _search(graph: Graph, budget_bytes: int | None) -> Best | None:
    """budget_bytes given: the cheapest schedule that fits. None: the smallest peak (its seconds are a tie-break
    that the program does not minimise exactly)."""
    n = len(graph)
    fixed = graph.fixed.total_bytes
    # states: stored set at the start of stage t -> ((peak, seconds) or (seconds, peak), stages so far)
    states: dict[frozenset[int], tuple[tuple[float, float], list]] = {frozenset(): ((0, 0.0), [])}
    for t in range(n):
        following: dict[frozenset[int], tuple[tuple[float, float], list]] = {}
        for stored, (score, path) in states.items():
            for computed, kept in stage_options(graph, t, stored):
                peak = fixed + stage_peak(graph, stored, computed, kept)
                seconds = sum(graph.nodes[k].compute_s for k in computed)
                if budget_bytes is not None:
                    if peak > budget_bytes:
                        continue
                    new_score = (score[0] + seconds, max(score[1], peak))
                else:
                    new_score = (max(score[0], peak), score[1] + seconds)
                if kept not in following or new_score < following[kept][0]:
                    following[kept] = (new_score, [*path, (computed, kept)])
        states = following
    if not states:
        return None
    score, path = min(states.values(), key=lambda item: item[0])
    R, S = _matrices(n, path)
    schedule = Schedule.from_matrices(graph, R, S)
    simulation = simulate(graph, schedule)
    seconds, peak = (score[0], score[1]) if budget_bytes is not None else (score[1], score[0])
    return Best(seconds, int(peak), schedule, simulation)


def cheapest_schedule(graph: Graph, budget_bytes: int) -> Best | None:
    """The cheapest frontier-advancing schedule within budget_bytes (fixed included); None if none fits."""
    return _search(graph, budget_bytes)


def smallest_peak_schedule(graph: Graph) -> Best:
    best = _search(graph, None)
    assert best is not None
    return best
