"""Baseline schedules: store-all, checkpoint-all, Chen's sqrt(n) and greedy segments, per-block
recomputation (what Hugging Face gradient checkpointing does) and Griewank's binomial checkpointing.

Every baseline is a policy, a `RematPlan`, that one builder (`build_schedule`) turns into a Schedule:
  - the "main walk" computes every node once, in index order (the order of the captured graph);
  - a forward value in `plan.dropped` is freed after its last forward use, every other value after
    its last use (including the reads of planned recomputations: every value is freed at its last read);
  - before main-walk node p, the plan's `Recompute` groups positioned at p bring values back
    (a segment, a block, revolve's advances), keeping what is still needed and freeing the rest
    as soon as the group no longer reads it;
  - any dependency still missing is recomputed on demand from the nearest values in memory and
    freed right after p runs. So every plan gives a valid schedule, whatever the graph.

The "forward" is the prefix of the graph before its first backward node: forward-labelled nodes
after it (a transpose of a weight, a constant) are computed and kept like backward values.
Budget-driven baselines (chen-greedy, griewank) simulate each variant they try and return the
cheapest that fits, or their lowest-memory variant when none fits.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache

from remat.graph import Graph
from remat.schedule import COMPUTE, FREE, Op, Schedule, tighten_frees
from remat.simulate import Simulation, simulate
from solvers.base import FEASIBLE, NO_SOLUTION, SolveOptions, SolverResult

GREEDY_THRESHOLDS = 30  # segment-size thresholds chen-greedy tries, log-spaced
MAX_REVOLVE_VARIANTS = 30  # snapshot counts griewank tries at most
# checkpoint-all's schedule grows with the square of a chain's depth: 856k instructions (2.3 s to build) for
# GPT-2 XL's 3,549 nodes, 11.1M (18 s) for a 2-layer LSTM unrolled over 128 steps (10,276 nodes: 1,080 per node,
# 530 times slower than store-all). Past CHECKPOINT_ALL_MAX_OPS, or CHECKPOINT_ALL_OPS_PER_NODE per node where that
# is more, it is not built: a baseline that runs each op hundreds of times says nothing a user can use. The
# per-node allowance is for wide steps: GPT-2 small with its head in 64 chunks, MLPs in 8 and attention in 2
# (5,444 nodes) has 1.81M, 332 per node, and at batch 706 it is the one schedule known to fit 16 GB.
CHECKPOINT_ALL_MAX_OPS = 1_000_000
CHECKPOINT_ALL_OPS_PER_NODE = 400


class ScheduleTooLong(ValueError):
    """build_schedule's instruction list went past its max_ops."""


@dataclass(frozen=True)
class Recompute:
    """Before main-walk node `position` runs, bring `targets` back into memory.

    `members` is the node set the group spans (a segment, a block, a run of revolve steps): the
    values its members read from outside it are held in memory until `position`.
    `targets` None: the members still needed at `position` or later. Targets still needed are kept
    until their last use; every other value the group computes is freed once the group is done with it.
    """

    position: int
    members: tuple[int, ...]
    targets: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RematPlan:
    dropped: frozenset[int] = frozenset()  # forward values freed after their last forward use
    recomputes: tuple[Recompute, ...] = ()


# --- the shared schedule builder ---------------------------------------------------------------


def first_backward_index(graph: Graph) -> int:
    """Index of the first backward node: nodes before it are the forward pass (len(graph) if none)."""
    return next((i for i, node in enumerate(graph.nodes) if node.is_backward), len(graph))


def build_schedule(graph: Graph, plan: RematPlan, max_ops: int | None = None) -> Schedule:
    """The instruction list that runs `plan` (see the module docstring); ScheduleTooLong past `max_ops`."""
    n = len(graph)
    nodes, users = graph.nodes, graph.users
    forward_end = first_backward_index(graph)

    # last_needed[v]: the last main-walk position that reads v, directly or through a planned recompute.
    last_needed = [max(users[v], default=v) for v in range(n)]
    for group in plan.recomputes:
        for d in _outside_deps(graph, group.members):
            last_needed[d] = max(last_needed[d], group.position)
    last_forward_use = [max((u for u in users[v] if u < forward_end), default=v) for v in range(n)]
    groups_at: dict[int, list[Recompute]] = defaultdict(list)
    for group in plan.recomputes:
        groups_at[group.position].append(group)

    ops: list[Op] = []
    live = [False] * n
    hold = [-1] * n  # main-walk position after which a live value is freed
    frees_at: dict[int, list[int]] = defaultdict(list)

    def hold_until(v: int, position: int) -> None:
        hold[v] = position
        frees_at[position].append(v)

    def bring_in(targets: Iterable[int], keep_until: dict[int, int]) -> None:
        """Compute the targets not in memory and the not-live ancestors they need, in index order.

        A value in `keep_until` stays live until that position; the others are freed right after their
        last read inside this group (values that were live before the group are never touched).
        """
        computed: set[int] = set()
        stack = [t for t in targets if not live[t]]
        while stack:
            v = stack.pop()
            if v not in computed:
                computed.add(v)
                stack.extend(d for d in nodes[v].deps if not live[d] and d not in computed)
        order = sorted(computed)
        last_read = {v: v for v in order}
        for k in order:  # ascending: the last k to read d is the last to set it
            for d in nodes[k].deps:
                if d in computed:
                    last_read[d] = k
        frees_after: dict[int, list[int]] = defaultdict(list)  # k -> the values freed right after it, ascending
        for v in order:
            if v not in keep_until:
                frees_after[last_read[v]].append(v)
        for k in order:
            ops.append(Op(COMPUTE, k))
            live[k] = True
            for v in frees_after.get(k, ()):
                ops.append(Op(FREE, v))
                live[v] = False
        for v, position in keep_until.items():
            if live[v]:
                hold_until(v, max(hold[v], position))

    for p in range(n):
        for group in groups_at.get(p, ()):
            if group.targets is None:
                targets = [t for t in group.members if t < p and last_needed[t] >= p]
            else:
                targets = [t for t in group.targets if t < p]
            bring_in(targets, {t: last_needed[t] for t in targets if last_needed[t] >= p})
        missing = sorted({d for d in nodes[p].deps if not live[d]})
        if missing:  # on demand: recompute from what is in memory, free after p
            bring_in(missing, {d: p for d in missing})
        ops.append(Op(COMPUTE, p))
        live[p] = True
        hold_until(p, last_forward_use[p] if p in plan.dropped else last_needed[p])
        for v in sorted(set(frees_at.pop(p, ()))):
            if live[v] and hold[v] == p:
                ops.append(Op(FREE, v))
                live[v] = False
        if max_ops is not None and len(ops) > max_ops:
            raise ScheduleTooLong(f"more than {max_ops:,} instructions by node {p} of {n}")
    schedule = Schedule(tuple(ops), n)
    # A group's outside inputs are held until its position, but the group may not read them there (its targets
    # were live already): free each value at its last read, as the executor's graphs do, so that a baseline's
    # peak is the one a run holds (Griewank on ResNet-50 at 80% of store-all: 877 MB held, 702 MB needed) and
    # the budget-driven baselines pick their variant by it. Without groups every free is at a last read already.
    return tighten_frees(graph, schedule) if plan.recomputes else schedule


def _outside_deps(graph: Graph, members: Iterable[int]) -> set[int]:
    """Values that `members` read from nodes outside the set."""
    inside = set(members)
    return {d for m in inside for d in graph.nodes[m].deps} - inside


def _first_backward_use(graph: Graph, members: Iterable[int], forward_end: int) -> int | None:
    """First main-walk position after the forward that reads one of `members`."""
    return min((u for m in members for u in graph.users[m] if u >= forward_end), default=None)


def shared_values(graph: Graph) -> set[int]:
    """Forward values shared across the forward, like an attention mask or a position table: read by at
    least 3 forward nodes spread over more than a quarter of it. They are kept for the whole step (they
    are needed to recompute any layer) and do not stop the nodes they jump over from being cut vertices."""
    forward_end = first_backward_index(graph)
    shared = set()
    for v in range(forward_end):
        readers = [u for u in graph.users[v] if u < forward_end]
        if len(readers) >= 3 and readers[-1] - readers[0] > forward_end / 4:
            shared.add(v)
    return shared


def cut_vertices(graph: Graph) -> list[int]:
    """Forward nodes that every forward path from an earlier to a later forward node passes through,
    shared values aside (see `shared_values`).

    Tested in index order: v is a cut vertex when no forward edge jumps over it (from a node before v
    to a node after v), so keeping v alone is enough to recompute anything after it from it.
    """
    forward_end = first_backward_index(graph)
    shared = shared_values(graph)
    cuts = []
    reach = -1  # furthest forward user of any node before v
    for v in range(forward_end):
        if reach <= v:
            cuts.append(v)
        if v not in shared:
            reach = max(reach, max((u for u in graph.users[v] if u < forward_end), default=v))
    return cuts


# --- results ------------------------------------------------------------------------------------


def _result(name: str, schedule: Schedule, simulation: Simulation, started: float,
            message: str = "", detail: dict | None = None) -> SolverResult:
    wall_s = time.perf_counter() - started
    if not simulation.valid:  # a bug in this module: say so rather than hand out a broken plan
        return SolverResult(name, NO_SOLUTION, None, wall_s=wall_s,
                            message=f"{name} built an invalid schedule: {simulation.errors[0]}")
    detail = {"peak_bytes": simulation.peak_bytes, **(detail or {})}
    return SolverResult(name, FEASIBLE, schedule, objective_s=simulation.compute_s, lower_bound_s=None,
                        wall_s=wall_s, message=message, detail=detail)


def _fixed_plan(name: str, graph: Graph, plan: RematPlan, started: float, detail: dict | None = None,
                max_ops: int | None = None) -> SolverResult:
    schedule = build_schedule(graph, plan, max_ops)
    return _result(name, schedule, simulate(graph, schedule), started, detail=detail)


def _cheapest_fitting(name: str, graph: Graph, budget_bytes: int, options: SolveOptions, started: float,
                      variants: Iterable[tuple[dict, RematPlan]]) -> SolverResult:
    """Simulate each variant; the cheapest that fits the budget, else the lowest-memory one."""
    best_fit: tuple[float, int, Schedule, Simulation, dict] | None = None
    lowest: tuple[int, float, Schedule, Simulation, dict] | None = None
    tried = 0
    for detail, plan in variants:
        schedule = build_schedule(graph, plan)
        sim = simulate(graph, schedule)
        tried += 1
        if sim.valid:
            if sim.peak_bytes <= budget_bytes and (best_fit is None or (sim.compute_s, sim.peak_bytes) < best_fit[:2]):
                best_fit = (sim.compute_s, sim.peak_bytes, schedule, sim, detail)
            if lowest is None or (sim.peak_bytes, sim.compute_s) < lowest[:2]:
                lowest = (sim.peak_bytes, sim.compute_s, schedule, sim, detail)
        if time.perf_counter() - started > options.time_limit_s:
            break
    if best_fit is not None:
        *_, schedule, sim, detail = best_fit
        message = f"cheapest of {tried} variants that fits the budget"
    elif lowest is not None:
        *_, schedule, sim, detail = lowest
        message = f"none of {tried} variants fits the budget; this is the lowest-memory one"
    else:
        return SolverResult(name, NO_SOLUTION, None, wall_s=time.perf_counter() - started,
                            message=f"{name} built no valid schedule")
    return _result(name, schedule, sim, started, message, {**detail, "variants_tried": tried})


# --- fixed strategies ----------------------------------------------------------------------------


def store_all(graph: Graph, budget_bytes: int, options: SolveOptions) -> SolverResult:
    """No rematerialization: every node once, in order, each value freed after its last use."""
    return _fixed_plan("store-all", graph, RematPlan(), time.perf_counter())


def checkpoint_all(graph: Graph, budget_bytes: int, options: SolveOptions, capped: bool = True) -> SolverResult:
    """The low-memory extreme: drop every forward value after its last forward use and recompute,
    before each backward node, what it reads from the nearest values still in memory. `capped`: not built past
    checkpoint_all_max_ops(graph) instructions."""
    started = time.perf_counter()
    plan = RematPlan(dropped=frozenset(range(first_backward_index(graph))))
    try:
        return _fixed_plan("checkpoint-all", graph, plan, started,
                           max_ops=checkpoint_all_max_ops(graph) if capped else None)
    except ScheduleTooLong as too_long:
        return SolverResult("checkpoint-all", NO_SOLUTION, None, wall_s=time.perf_counter() - started,
                            message=f"not built: its schedule recomputes the forward before each backward node, "
                                    f"{too_long} (a deep chain, such as an unrolled RNN)")


def checkpoint_all_max_ops(graph: Graph) -> int:
    """The longest checkpoint-all schedule that is built (see CHECKPOINT_ALL_MAX_OPS)."""
    return max(CHECKPOINT_ALL_MAX_OPS, CHECKPOINT_ALL_OPS_PER_NODE * len(graph))


def _segment_plan(graph: Graph, checkpoints: set[int]) -> RematPlan:
    """Keep the checkpoints through the forward; drop the forward values between two checkpoints and
    recompute such a segment once, when the backward first needs one of its values.

    The values after the last checkpoint are kept: the backward needs them first, so recomputing them
    right away would cost time and save no memory. Shared values are kept too.
    """
    forward_end = first_backward_index(graph)
    shared = shared_values(graph)
    segments: list[list[int]] = [[]]
    for v in range(forward_end):
        if v in shared:
            continue
        if v in checkpoints:
            segments.append([])
        else:
            segments[-1].append(v)
    segments = [s for s in segments[:-1] if s]  # the last one is the kept tail
    recomputes = []
    for segment in segments:
        trigger = _first_backward_use(graph, segment, forward_end)
        if trigger is not None:
            recomputes.append(Recompute(trigger, tuple(segment)))
    dropped = frozenset(v for segment in segments for v in segment)
    return RematPlan(dropped, tuple(sorted(recomputes, key=lambda r: r.position)))


def chen_sqrtn(graph: Graph, budget_bytes: int, options: SolveOptions) -> SolverResult:
    """Chen et al. 2016: about sqrt(n) checkpoints, evenly spaced among the n cut vertices
    (every k-th candidate with k = floor(sqrt(n)), as Checkmate's implementation does)."""
    started = time.perf_counter()
    candidates = cut_vertices(graph)
    every = max(1, math.isqrt(len(candidates)))
    checkpoints = [v for position, v in enumerate(candidates) if (position + 1) % every == 0]
    return _fixed_plan("chen-sqrtn", graph, _segment_plan(graph, set(checkpoints)), started,
                       detail={"checkpoints": checkpoints})


def chen_greedy(graph: Graph, budget_bytes: int, options: SolveOptions) -> SolverResult:
    """Chen's greedy variant: walk the forward adding up bytes and checkpoint the next cut vertex once
    the sum exceeds a threshold; try thresholds on a log scale, from one value's size to the whole forward
    (no checkpoint at all, which is store-all)."""
    started = time.perf_counter()
    candidates = set(cut_vertices(graph))
    forward_sizes = [graph.nodes[v].output_bytes for v in range(first_backward_index(graph))]
    smallest = max(1, min((b for b in forward_sizes if b > 0), default=1))
    total = max(smallest, sum(forward_sizes))
    thresholds = sorted({round(smallest * (total / smallest) ** (k / (GREEDY_THRESHOLDS - 1)))
                         for k in range(GREEDY_THRESHOLDS)} | {total})

    def variants() -> Iterable[tuple[dict, RematPlan]]:
        seen: set[tuple[int, ...]] = set()
        for threshold in thresholds:
            checkpoints, accumulated = [], 0
            for v, size in enumerate(forward_sizes):
                accumulated += size
                if v in candidates and accumulated > threshold:
                    checkpoints.append(v)
                    accumulated = 0
            if tuple(checkpoints) not in seen:
                seen.add(tuple(checkpoints))
                yield {"threshold_bytes": threshold, "checkpoints": checkpoints}, _segment_plan(graph, set(checkpoints))

    return _cheapest_fitting("chen-greedy", graph, budget_bytes, options, started, variants())


# --- per-block (Hugging Face gradient checkpointing) ----------------------------------------------


def find_blocks(graph: Graph) -> dict[str, list[int]]:
    """Repeated containers in the forward's module paths: prefixes ending in an integer index
    ("transformer.h.3", "layer2.1"), at the shallowest depth that yields at least two blocks.
    Returns block prefix -> its forward nodes, ascending."""
    by_depth: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for v in range(first_backward_index(graph)):
        parts = graph.nodes[v].module.split(".")
        for depth, part in enumerate(parts):
            if part.isdigit():
                by_depth[depth][".".join(parts[:depth + 1])].append(v)
    for depth in sorted(by_depth):
        if len(by_depth[depth]) >= 2:
            return dict(by_depth[depth])
    return {}


def find_named_blocks(graph: Graph) -> dict[str, list[int]]:
    """Repeated containers numbered in their names rather than by an index ("features.denseblock1.denselayer3":
    torchvision's DenseNet), for per-block where find_blocks finds none: a container is a module path that holds
    others, numbered when its name ends in a number and another container's path is the same but for its numbers
    ("features.denseblock2.denselayer1" and "features.denseblock1.denselayer4"); the innermost of those
    (that hold no numbered container) are the blocks: a DenseNet's layers, as its own memory_efficient option
    checkpoints them. Returns block prefix -> its forward nodes, ascending."""
    forward = range(first_backward_index(graph))
    paths = {graph.nodes[v].module for v in forward}
    containers = {".".join(path.split(".")[:depth]) for path in paths for depth in range(1, path.count(".") + 1)}
    kinds: dict[str, set[str]] = defaultdict(set)  # the path without its numbers -> the paths
    for path in containers:
        stem = path.rstrip("0123456789")
        if stem != path and not stem.endswith("."):
            kinds[".".join(part.rstrip("0123456789") for part in path.split("."))].add(path)
    numbered = {path for group in kinds.values() if len(group) >= 2 for path in group}
    innermost = {path for path in numbered if not any(_in_module(other, path) and other != path for other in numbered)}
    blocks: dict[str, list[int]] = defaultdict(list)
    for v in forward:
        block = next((path for path in innermost if _in_module(graph.nodes[v].module, path)), None)
        if block is not None:
            blocks[block].append(v)
    return dict(blocks) if len(blocks) >= 2 else {}


def _in_module(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def per_block(graph: Graph, budget_bytes: int, options: SolveOptions) -> SolverResult:
    """Store each block's inputs, drop what the block computes, and recompute the whole block's forward
    right before its first backward node; nodes outside blocks are stored as in store-all."""
    started = time.perf_counter()
    blocks = find_blocks(graph) or find_named_blocks(graph)
    if not blocks:
        return SolverResult("per-block", NO_SOLUTION, None, wall_s=time.perf_counter() - started,
                            message="no repeated blocks in the module paths (like 'transformer.h.3' or 'denselayer3'): "
                                    "per-block checkpointing does not apply")
    forward_end = first_backward_index(graph)
    block_of = {v: prefix for prefix, members in blocks.items() for v in members}
    dropped, recomputes = set(), []
    for prefix, members in blocks.items():
        # a block's outputs (values read by forward nodes outside it) are the next one's inputs: kept
        inner = [v for v in members
                 if all(block_of.get(u) == prefix for u in graph.users[v] if u < forward_end)]
        dropped.update(inner)
        first_backward_node = next((i for i in range(forward_end, len(graph))
                                    if graph.nodes[i].is_backward and _in_module(graph.nodes[i].module, prefix)),
                                   None)
        first_need = _first_backward_use(graph, inner, forward_end)
        starts = [i for i in (first_backward_node, first_need) if i is not None]
        if starts:
            recomputes.append(Recompute(min(starts), tuple(members), targets=tuple(members)))
    plan = RematPlan(frozenset(dropped), tuple(sorted(recomputes, key=lambda r: r.position)))
    return _fixed_plan("per-block", graph, plan, started, detail={"blocks": list(blocks)})


# --- Griewank's binomial checkpointing (revolve) --------------------------------------------------


@cache
def revolve_advances(steps: int, free_slots: int) -> int:
    """Fewest forward steps (the first sweep included) that reverse a chain of `steps` steps when the
    start state is stored and `free_slots` more states can be: Griewank's t(l, s) = r*l - C(s+r, r-1),
    with s = free_slots + 1 snapshots counting the start and r the least integer with C(s+r, s) >= l."""
    if steps <= 1:
        return 0
    snapshots = free_slots + 1
    repetitions = 0
    while math.comb(snapshots + repetitions, snapshots) < steps:
        repetitions += 1
    return repetitions * steps - math.comb(snapshots + repetitions, repetitions - 1)


@cache
def _revolve_split(steps: int, free_slots: int) -> int:
    """How many steps to advance before storing the next snapshot (binomially optimal)."""
    if free_slots == 0:
        return steps - 1
    return min(range(1, steps), key=lambda m: m + revolve_advances(steps - m, free_slots - 1)
               + revolve_advances(m, free_slots))


def revolve(steps: int, free_slots: int) -> list[tuple[str, int, int]]:
    """Griewank's schedule for reversing steps 1..`steps` from state 0 with `free_slots` snapshots.

    Events in order: ("advance", i, m): from state i run steps i+1..m and store state m;
    ("reverse", j, j): run step j forward again and then its backward.
    """
    events: list[tuple[str, int, int]] = []

    def reverse(start: int, end: int, slots: int) -> None:
        while end - start > 1:
            middle = start + _revolve_split(end - start, slots)
            events.append(("advance", start, middle))
            reverse(middle, end, slots - 1)
            end = middle
        events.append(("reverse", end, end))

    reverse(0, steps, free_slots)
    return events


def _revolve_plan(graph: Graph, cuts: list[int], free_slots: int) -> RematPlan:
    """Revolve on the chain of steps between cut vertices: step j is the forward nodes after cut j-1
    up to cut j, state j is the value of cut j (state 0: the graph inputs, fixed memory). Shared values
    are kept throughout.

    The first sweep of the schedule is the forward itself: the states it stores are kept, with the last
    step and the nodes after the last cut. Every later event is moved to the main-walk position where the
    backward first needs the step it reverses.
    """
    forward_end = first_backward_index(graph)
    step_nodes: list[list[int]] = [[]]  # step_nodes[j]: the forward nodes of step j, 1-based
    for j, cut in enumerate(cuts):
        step_nodes.append(list(range(cuts[j - 1] + 1 if j else 0, cut + 1)))
    events = revolve(len(cuts), free_slots)
    first_reverse = next(k for k, event in enumerate(events) if event[0] == "reverse")
    kept = {cuts[m - 1] for _, _, m in events[:first_reverse]}
    kept.update(step_nodes[len(cuts)])
    kept.update(range(cuts[-1] + 1, forward_end))
    kept.update(shared_values(graph))
    recomputes, pending, position = [], [], 0
    for kind, start, end in events[first_reverse + 1:]:
        if kind == "advance":
            members = tuple(v for j in range(start + 1, end + 1) for v in step_nodes[j])
            pending.append((members, (cuts[end - 1],)))
            continue
        pending.append((tuple(step_nodes[end]), None))
        trigger = _first_backward_use(graph, [v for v in step_nodes[end] if v not in kept], forward_end)
        if trigger is None:  # nothing of this step is needed by the backward: do its events later
            continue
        position = max(position, trigger)
        recomputes.extend(Recompute(position, members, targets) for members, targets in pending)
        pending = []
    return RematPlan(frozenset(range(forward_end)) - kept, tuple(recomputes))


def griewank(graph: Graph, budget_bytes: int, options: SolveOptions) -> SolverResult:
    """Binomial checkpointing on the forward's chain of cut-vertex segments: try snapshot counts from 1
    up and return the cheapest schedule that fits the budget."""
    started = time.perf_counter()
    cuts = cut_vertices(graph)
    if len(cuts) < 3:
        return SolverResult("griewank", NO_SOLUTION, None, wall_s=time.perf_counter() - started,
                            message=f"the forward has {len(cuts)} segment(s) between cut vertices; "
                                    "revolve needs a chain of at least 3")
    most = len(cuts) - 1  # one slot per state but the last: every state stored
    slot_counts = sorted({max(1, round(most ** (k / (MAX_REVOLVE_VARIANTS - 1))))
                          for k in range(MAX_REVOLVE_VARIANTS)} | {1, most})
    variants = (({"snapshots": slots}, _revolve_plan(graph, cuts, slots)) for slots in slot_counts)
    return _cheapest_fitting("griewank", graph, budget_bytes, options, started, variants)


Baseline = Callable[[Graph, int, SolveOptions], SolverResult]

BASELINES: dict[str, Baseline] = {
    "store-all": store_all,
    "checkpoint-all": checkpoint_all,
    "chen-sqrtn": chen_sqrtn,
    "chen-greedy": chen_greedy,
    "per-block": per_block,
    "griewank": griewank,
}
# the baselines whose schedule does not depend on the budget (chen-greedy and griewank pick by it)
BUDGET_FREE_BASELINES = ("store-all", "checkpoint-all", "chen-sqrtn", "per-block")
