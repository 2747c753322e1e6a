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

An op with several outputs that the simulator releases one by one (Node.part_bytes) is kept as a value (it
cannot be computed again while kept) with a chosen set of its outputs still held: a stage reads only held
outputs of a stored op, and counts only those. An output released when nothing later in the stay reads it is
what the simulator does; holding it longer is never cheaper, so the program's optimum is the simulator's.
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


Output = tuple[int, int]  # (node, output index) of an op with several outputs


def outputs_of(graph: Graph, v: int) -> list[tuple[Output, int, tuple[int, ...]]]:
    """((v, p), bytes, readers) of each output of nonzero size of an op with several; [] for other ops."""
    node = graph.nodes[v]
    pairs = zip(node.part_bytes, node.part_users, strict=True)
    return [((v, p), size, readers) for p, (size, readers) in enumerate(pairs) if size > 0]


def stage_peak(graph: Graph, stored: frozenset[int], held: frozenset[Output], computed: list[int],
               kept: frozenset[int], kept_outputs: frozenset[Output]) -> int:
    """Activation bytes at the stage's peak: while computed[p] runs, memory holds every value already
    available and still needed (read at position >= p, or kept), plus computed[p]'s output and workspace.
    Of an op with several outputs, each output counts on its own: available when the op ran in the stage or is
    stored with it held, needed when read at position >= p or kept."""
    nodes = graph.nodes
    last_read: dict[int, int] = {}
    last_output_read: dict[Output, int] = {}
    for position, k in enumerate(computed):
        for d in nodes[k].deps:
            last_read[d] = position
            for output, _, readers in outputs_of(graph, d):
                if k in readers:
                    last_output_read[output] = position
    peak = 0
    for position, k in enumerate(computed):
        in_memory = 0
        for v in stored | set(computed[:position]):
            if not outputs_of(graph, v):
                in_memory += nodes[v].output_bytes if v in kept or last_read.get(v, -1) >= position else 0
                continue
            for output, size, _ in outputs_of(graph, v):
                available = v in computed[:position] or output in held
                needed = output in kept_outputs or last_output_read.get(output, -1) >= position
                in_memory += size if available and needed else 0
        peak = max(peak, in_memory + nodes[k].output_bytes + nodes[k].workspace_bytes)
    return peak


def stage_options(graph: Graph, t: int, stored: frozenset[int], held: frozenset[Output]):
    """(computed, kept, kept_outputs) for every useful stage t that starts with `stored` (and of its ops with
    several outputs, the outputs in `held`)."""
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
    def later(readers) -> bool:
        return any(u > t or u in later_ancestors for u in readers)

    needed_later = {i for i in range(t + 1) if later(graph.users[i])}
    candidates = [i for i in range(t) if i not in stored]
    for extra in subsets(candidates):
        computed = [*extra, t]
        present = set(stored)
        runnable = True
        for k in computed:  # ascending: each node's inputs are stored or computed before it in the stage
            stale = [o for d in nodes[k].deps if d in stored for o, _, readers in outputs_of(graph, d)
                     if k in readers and o not in held]
            if not set(nodes[k].deps) <= present or stale:
                runnable = False
                break
            present.add(k)
        if not runnable:
            continue
        read = {d for k in computed for d in nodes[k].deps}
        read_outputs = {o for k in computed for d in nodes[k].deps for o, _, readers in outputs_of(graph, d)
                        if k in readers}
        keepable = sorted(present & needed_later) if t + 1 < n else []
        for kept in map(frozenset, subsets(keepable)):
            if any(x not in read and x not in kept for x in extra):
                continue  # a recomputation nobody reads
            if any(s not in read and s not in kept for s in stored):
                continue  # stored for nothing: dominated by dropping it one stage earlier
            if any(o not in read_outputs and o[0] not in kept for o in held):
                continue  # an output held for nothing, as above
            # of the ops kept with several outputs, the outputs still held: available, and read later
            choices = [o for v in sorted(kept) for o, _, readers in outputs_of(graph, v)
                       if (v in computed or o in held) and later(readers)]
            for kept_outputs in map(frozenset, subsets(choices)):
                if any(o not in read_outputs and o not in kept_outputs for o in held):
                    continue  # held for nothing, as above
                yield computed, kept, kept_outputs


def _matrices(n: int, stages: list[tuple[list[int], frozenset[int], frozenset[Output]]]
              ) -> tuple[list[list[int]], list[list[int]]]:
    R = [[0] * n for _ in range(n)]
    S = [[0] * n for _ in range(n)]
    for t, (computed, kept, _) in enumerate(stages):
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
    # states: (stored set, outputs held) at the start of stage t -> ((peak, seconds) or (seconds, peak), stages)
    State = tuple[frozenset[int], frozenset[Output]]
    states: dict[State, tuple[tuple[float, float], list]] = {(frozenset(), frozenset()): ((0, 0.0), [])}
    for t in range(n):
        following: dict[State, tuple[tuple[float, float], list]] = {}
        for (stored, held), (score, path) in states.items():
            for computed, kept, kept_outputs in stage_options(graph, t, stored, held):
                peak = fixed + stage_peak(graph, stored, held, computed, kept, kept_outputs)
                seconds = sum(graph.nodes[k].compute_s for k in computed)
                if budget_bytes is not None:
                    if peak > budget_bytes:
                        continue
                    new_score = (score[0] + seconds, max(score[1], peak))
                else:
                    new_score = (max(score[0], peak), score[1] + seconds)
                state = (kept, kept_outputs)
                if state not in following or new_score < following[state][0]:
                    following[state] = (new_score, [*path, (computed, kept, kept_outputs)])
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
