"""Repeated-block decomposition (in the line of Rockmate, Zhao et al. 2023, and rotor, Beaumont et al. 2019):
plans for graphs too large for the MILP whole, made of identical blocks (GPT-2's 12 transformer blocks).

1. Layout: each block's forward is a contiguous range of the topological order (find_blocks, by module
   path) and so is its backward; everything else (embeddings, the head and loss, the last gradient sums)
   is "outside" and runs as in store-all, except for two local problems of their own: the head (between the
   last block's forward and its backward) and the stem (before the first block, after its backward), whose
   greedy options drop large values and recompute them for their backward (a split LM head's logits, a
   CNN's first convolution); the DP picks one option of each beside the blocks'.
2. Block trade-off curve: one block's forward and backward, with a "gap" node between them that stands for
   the rest of the step (a workspace of E bytes, nothing recomputed in it), is a small Checkmate MILP.
   Raising E forces the block to hold fewer bytes across the gap; each E gives one option: the block's
   recomputation rows, its seconds, the bytes it holds across the gap and its forward and backward peaks.
   Blocks with the same structure (ops, sizes, costs, local dependencies) share one curve.
3. Combination: a dynamic program over the blocks in forward order picks one option per block. Memory at
   any stage is the outside bytes (option-independent, measured on a probe schedule) plus the gap bytes of
   the blocks before the current one plus the current block's own live bytes, so the state is the prefix
   sum of gap bytes and the program is exact for that accounting (Pareto front of (prefix bytes, seconds)).
4. The chosen rows are stitched into one recomputation matrix R of the whole fine graph and emitted with
   minimal storage (every value is kept from its last computation to its last read before the next one),
   which is a valid schedule for any R. The simulator judges it; if it overshoots the budget (the
   accounting is conservative, but outside bytes can shift), the program is rerun with the overshoot as a
   margin.

No coarsening: every fine node is scheduled on its own. The result is feasible, not proven optimal; a
valid lower bound comes from solvers/bounds.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import cache

from remat.graph import FixedMemory, Graph, Node
from remat.schedule import COMPUTE, FREE, Op, Schedule
from remat.simulate import part_releases, simulate
from solvers.base import FEASIBLE, NO_SOLUTION, OPTIMAL, SolveOptions, SolverResult, settled_without_solving
from solvers.baselines import _in_module, find_blocks, first_backward_index
from solvers.bounds import parts

CURVE_POINTS = 6  # spread options per block class, between the least gap bytes and store-all's
LOCAL_MIP_GAP = 5e-3  # the block MILP stops within 0.5% of its optimum: the curve needs many points more
CURVE_SHARE = 0.8  # of the time limit, for the block MILPs
MAX_REPAIRS = 8  # DP reruns with a margin when the stitched schedule overshoots the budget, then bisection
DP_BINS = 512  # the DP rounds bytes up to this fraction of the capacity
STEM_OPTIONS = 4  # options for the stem (what runs before the blocks and after their backward): one DP each
MIN_BLOCK_NODES = 8  # mean forward nodes per block below which `auto` does not decompose (VGG's single layers)
SOLVED_MAX = 512  # block MILP solutions kept for later budgets (each a schedule of one block: a few KB)

# Block MILP solutions by the block's MILP graph (its gap workspace is the target), its op costs and the
# back-end: the budgets of a sweep (remat compare, solver_scale) share most targets, so a later budget takes an
# optimal one as it is and warm-starts from a feasible one. A pure function's memo: the same MILP, the same answers.
SOLVED: dict[tuple[str, tuple[float, ...], str], tuple[str, Schedule]] = {}


# --- layout ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """Contiguous index ranges of each block's forward and backward (forward order of blocks)."""

    names: tuple[str, ...]
    forward: tuple[range, ...]
    backward: tuple[range, ...]


def find_layout(graph: Graph) -> BlockLayout | None:
    """The blocks of `graph` as contiguous forward and backward ranges; None when there are fewer than two
    or their nodes are not contiguous (then the decomposition does not apply)."""
    blocks = find_blocks(graph)
    if len(blocks) < 2:
        return None
    names = sorted(blocks, key=lambda prefix: blocks[prefix][0])
    forward_end = first_backward_index(graph)
    forward, backward = [], []
    for prefix in names:
        members = blocks[prefix]
        if members != list(range(members[0], members[-1] + 1)):
            return None
        forward.append(range(members[0], members[-1] + 1))
        mine = [i for i in range(forward_end, len(graph)) if _in_module(graph.nodes[i].module, prefix)]
        if not mine:
            return None
        backward.append(range(mine[0], mine[-1] + 1))
    for k in range(len(names) - 1):  # forwards in order, backwards in reverse order, nothing shared
        if forward[k].stop > forward[k + 1].start or backward[k + 1].stop > backward[k].start:
            return None
    return BlockLayout(tuple(names), tuple(forward), tuple(backward))


# --- one block's local problem -----------------------------------------------------------------------


@dataclass(frozen=True)
class LocalProblem:
    """A block's forward + gap node + backward as a graph of its own."""

    graph: Graph  # local nodes: forward, the gap (index `gap`), backward
    to_global: tuple[int, ...]  # local index -> global index (-1 for the gap)
    gap: int
    signature: tuple  # equal for blocks with the same structure


def local_problem(graph: Graph, forward: range, backward: range) -> LocalProblem:
    members = [*forward, *backward]
    gap = len(forward)
    to_global = tuple([*forward, -1, *backward])
    local_of = {g: l for l, g in enumerate(to_global) if g >= 0}
    member_set = set(members)
    boundary = sorted({d for m in members for d in graph.nodes[m].deps if d not in member_set})
    # Values the block hands to the rest of the step from its forward that the backward reads outside the
    # block too (the next block's input, read again by its backward): the gap node reads them, so they are
    # held through the gap. One read only by the next forward is freed there (the probe's phases count it).
    backward_start = first_backward_index(graph)
    exports = [local_of[v] for v in forward
               if any(u not in member_set and u >= backward_start for u in graph.users[v])]
    nodes: list[Node] = []
    for g in to_global:
        if g < 0:
            nodes.append(Node(name="gap", op="gap", deps=tuple(exports), output_bytes=0, compute_s=0.0,
                              is_backward=False))
            continue
        node = graph.nodes[g]
        local = replace(node, deps=tuple(local_of[d] for d in node.deps if d in local_of), fx_nodes=())
        if parts(node):  # an op's outputs released one by one: their readers, in local indices (the gap for
            # an export's output that a later backward reads)
            readers = tuple(tuple(sorted({local_of[u] for u in users if u in local_of}
                                         | ({gap} if local_of[g] in exports and any(
                                             u not in member_set and u >= backward_start for u in users) else set())))
                            for _, users in parts(node))
            local = replace(local, part_users=readers)
        nodes.append(local)
    outputs = tuple(l for l, g in enumerate(to_global) if g >= 0 and g in backward
                    and (g in graph.outputs or any(u not in member_set for u in graph.users[g])))
    # The values read from outside (the block input, a shared mask, the incoming gradient) count as fixed
    # memory for the whole local schedule: more than they take globally, never less.
    fixed = FixedMemory(input_bytes=sum(graph.nodes[b].output_bytes for b in boundary))
    local = Graph(nodes=tuple(nodes), outputs=outputs or (len(nodes) - 1,), fixed=fixed)
    signature = tuple((n.op, n.deps, n.output_bytes, n.workspace_bytes, round(n.compute_s, 15), n.is_backward)
                      for n in nodes) + (outputs, fixed.input_bytes)
    return LocalProblem(local, to_global, gap, signature)


@dataclass(frozen=True)
class BlockOption:
    """One point of a block's trade-off curve (bytes are activation bytes owned by the block)."""

    gap_bytes: int  # held from the end of the forward to the start of the backward, exports included
    compute_s: float  # the block's seconds, recomputation included
    forward_peak_bytes: int
    backward_peak_bytes: int
    rows: tuple[tuple[int, ...], ...]  # rows[l]: local nodes computed in local stage l (the gap's row empty)
    status: str


def milp_graph(problem: LocalProblem, gap_workspace_bytes: int) -> Graph:
    """The block as the MILP sees it: the gap node with its workspace, and every op with several outputs held
    as one value of the outputs read after the gap (layer norm's mean and rstd), the others counted as its
    workspace. The MILP holds a node's outputs together; the simulator releases each after its last read, so
    without this the MILP would pay for a layer norm's whole output to keep its statistics. Options are
    measured on the block itself afterwards (option_from_rows), so this view only steers the search."""
    nodes = list(problem.graph.nodes)
    for i, node in enumerate(nodes):
        if parts(node):
            later = sum(size for size, users in parts(node) if any(u >= problem.gap for u in users))
            nodes[i] = replace(node, output_bytes=later, part_bytes=(), part_users=(),
                               workspace_bytes=node.workspace_bytes + node.output_bytes - later)
    nodes[problem.gap] = replace(nodes[problem.gap], workspace_bytes=gap_workspace_bytes)
    return replace(problem.graph, nodes=tuple(nodes))


def option_from_rows(problem: LocalProblem, rows: list[list[int]], status: str) -> BlockOption:
    """Measure a local R (rows) with the local simulator: seconds, gap bytes, peaks on each side."""
    local = problem.graph
    rows = prune_rows(local, rows)
    schedule, _ = emit(local, rows)
    sim = simulate(local, schedule)
    assert sim.valid, sim.errors
    fixed = local.fixed.total_bytes
    gap_op = next(p for p, op in enumerate(schedule.ops) if op.kind == COMPUTE and op.node == problem.gap)
    forward = [sim.timeline_bytes[p] - fixed for p in range(gap_op) ]
    backward = [sim.timeline_bytes[p] - fixed for p in range(gap_op + 1, len(schedule.ops))]
    return BlockOption(gap_bytes=sim.timeline_bytes[gap_op] - fixed, compute_s=sim.compute_s,
                       forward_peak_bytes=max(forward, default=0), backward_peak_bytes=max(backward, default=0),
                       rows=tuple(tuple(r) for r in rows), status=status)


def block_options(problem: LocalProblem, targets: list[int], options: SolveOptions,
                  deadline: float) -> list[BlockOption]:
    """Options from the block's MILP, one per target of gap bytes (in the order given, most useful first):
    the gap node's workspace is set so that only `target` bytes fit beside it. A solution for a smaller
    target warm-starts a larger one (holding fewer bytes across the gap fits a smaller gap workspace)."""
    from solvers.checkmate import CheckmateModel, solve_checkmate

    local = problem.graph
    n = len(local)
    store_all = option_from_rows(problem, [[t] for t in range(n)], FEASIBLE)
    capacity = max(store_all.forward_peak_bytes, store_all.backward_peak_bytes, store_all.gap_bytes)
    budget = local.fixed.total_bytes + capacity

    def block_rules(model: CheckmateModel) -> None:
        # The gap stands for the rest of the step: the block runs nothing there. And the only recomputation
        # worth its time in a block is of forward values in the backward: fixing the rest to zero shrinks
        # the MILP several times (HiGHS's presolve drops the fixed columns).
        for (t, i), run in model.R.items():
            if i < t and (t <= problem.gap or i > problem.gap):
                model.problem += run == 0, f"block_rule_{t}_{i}"

    found: list[BlockOption] = [store_all]
    solved: list[tuple[int, Schedule]] = []
    for position, target in enumerate(targets):
        graph = milp_graph(problem, capacity - target)
        key = (graph.content_hash, tuple(node.compute_s for node in graph.nodes), options.backend)
        status, schedule = SOLVED.get(key, (None, None))
        left = deadline - time.perf_counter()
        if status != OPTIMAL and left > 0.5:
            share = left / (len(targets) - position)
            warm = max((s for s in solved if s[0] <= target), default=None, key=lambda s: s[0])
            result = solve_checkmate(graph, budget, replace(options, time_limit_s=share, mip_gap=LOCAL_MIP_GAP,
                                                            warm_start=schedule or (warm[1] if warm else None)),
                                     constrain=block_rules)
            if result.schedule is not None:
                status, schedule = result.status, result.schedule
                if len(SOLVED) >= SOLVED_MAX:
                    SOLVED.pop(next(iter(SOLVED)))  # the oldest
                SOLVED[key] = (status, schedule)
        if schedule is None:
            continue
        R, _ = schedule.to_matrices()
        rows = [[i for i in range(t + 1) if R[t][i]] for t in range(n)]
        if any(i != problem.gap for i in rows[problem.gap]):
            continue  # a fallback schedule that runs something in the gap is not an option of this block
        found.append(option_from_rows(problem, rows, status))
        solved.append((target, schedule))
    return found


def greedy_options(problem: LocalProblem) -> list[BlockOption]:
    """Options without a solver, so that a block has a curve even when the MILP gets little time: drop the
    forward values the backward reads, cheapest to bring back per byte first, each recomputed (with the
    inputs it needs that are not held) at its first reader in the backward. One option per prefix."""
    local, gap = problem.graph, problem.gap
    exports = set(local.nodes[gap].deps)
    read_later = {v for v in range(gap) if any(u > gap for u in local.users[v])}
    candidates = [v for v in read_later if v not in exports and local.nodes[v].output_bytes > 0]

    def needed(v: int, dropped: set[int]) -> set[int]:
        """v and the forward values it needs back: dropped ones and those nobody holds (read only forward)."""
        found, stack = set(), [v]
        while stack:
            w = stack.pop()
            if w in found:
                continue
            found.add(w)
            stack.extend(d for d in local.nodes[w].deps if d not in exports and (d in dropped or d not in read_later))
        return found

    def later_bytes(v: int) -> int:
        node = local.nodes[v]
        return (sum(size for size, users in parts(node) if any(u > gap for u in users)) if parts(node)
                else node.output_bytes)

    order = sorted(candidates, key=lambda v: sum(local.nodes[w].compute_s for w in needed(v, {v}))
                   / max(1, later_bytes(v)))
    found: list[BlockOption] = []
    for count in range(1, len(order) + 1):
        dropped = set(order[:count])
        rows = [[t] for t in range(len(local))]
        for v in dropped:
            first = min(u for u in local.users[v] if u > gap)
            rows[first] = sorted(set(rows[first]) | needed(v, dropped))
        found.append(option_from_rows(problem, rows, FEASIBLE))
    return found


def curve_targets(least: int, most: int, wanted: int | None) -> list[int]:
    """Gap-byte targets, most useful first: the even share of the budget (`wanted`), its neighbours, then
    points spread between the least a block can hold and what store-all holds."""
    spread = [round(least + (most - least) * k / (CURVE_POINTS - 1)) for k in range(CURVE_POINTS - 1)]
    first = []
    if wanted is not None:
        first = [wanted, round(wanted * 0.9), round(wanted * 1.1)]
    targets = []
    for target in first + spread:
        target = min(max(target, least), most)
        if target < most and all(abs(target - t) > 0.02 * (most - least) for t in targets):
            targets.append(target)
    return targets


def pareto(curve: list[BlockOption]) -> list[BlockOption]:
    """Drop options that another beats on seconds, gap bytes or a peak and matches on the rest; of options with the
    same four figures (different rows), the first. Before, such twins each dropped the other: a block MILP's
    solutions for several targets, all the same schedule's figures, emptied the curve of that point, and given more
    time (or after an earlier call had filled the cache) decompose found no plan where it had found one."""
    def figures(option: BlockOption) -> tuple[float, int, int, int]:
        return option.compute_s, option.gap_bytes, option.forward_peak_bytes, option.backward_peak_bytes

    def beats(b: BlockOption, a: BlockOption) -> bool:
        return all(x <= y for x, y in zip(figures(b), figures(a), strict=True)) and figures(b) != figures(a)

    kept: list[BlockOption] = []
    for a in curve:
        if not any(beats(b, a) for b in curve) and all(figures(k) != figures(a) for k in kept):
            kept.append(a)
    return sorted(kept, key=lambda o: o.gap_bytes)


def peak_bytes(option: BlockOption) -> int:
    """The most bytes the option holds at any moment: in its forward, across its gap or in its backward."""
    return max(option.forward_peak_bytes, option.gap_bytes, option.backward_peak_bytes)


def head_problem(graph: Graph, layout: BlockLayout) -> LocalProblem | None:
    """The head of the step (what runs between the last block's forward and its backward: a final norm, an LM
    head and its loss) as a local problem, its gap between its own forward and backward; None when it has no
    forward or no backward. Every block's held bytes are live beside it, so only its peak matters."""
    backward_start = first_backward_index(graph)
    forward = range(layout.forward[-1].stop, backward_start)
    backward = range(backward_start, layout.backward[-1].start)
    if not forward or not backward:
        return None
    return local_problem(graph, forward, backward)


def head_curve(problem: LocalProblem) -> list[BlockOption]:
    """The head's options, store-all first, then each greedy option that lowers the peak for the least seconds
    (recomputing a chunk of logits in the backward, say, when the blocks need the room more)."""
    store_all = option_from_rows(problem, [[t] for t in range(len(problem.graph))], FEASIBLE)
    curve = [store_all]
    for option in sorted(greedy_options(problem), key=lambda o: (o.compute_s, peak_bytes(o))):
        if peak_bytes(option) < peak_bytes(curve[-1]):
            curve.append(option)
    return curve


def stem_problem(graph: Graph, layout: BlockLayout) -> LocalProblem | None:
    """What runs before the first block's forward and after its backward (a CNN's stem convolution, GPT-2's
    embeddings, and their backward) as a local problem: its gap stands for the blocks and the head, so the bytes
    it holds across the gap are outside bytes in every block's phase. None when it has no forward or backward."""
    forward = range(0, layout.forward[0].start)
    backward = range(layout.backward[0].stop, len(graph))
    if not forward or not backward:
        return None
    return local_problem(graph, forward, backward)


def stem_curve(problem: LocalProblem) -> list[BlockOption]:
    """The stem's options, store-all first, then at most STEM_OPTIONS - 1 greedy ones that hold fewer bytes
    across the gap (the DP runs once per option), spread from the cheapest to the one holding the least."""
    store_all = option_from_rows(problem, [[t] for t in range(len(problem.graph))], FEASIBLE)
    others = [o for o in pareto([store_all, *greedy_options(problem)]) if o != store_all
              and o.gap_bytes < store_all.gap_bytes]
    if len(others) >= STEM_OPTIONS:
        step = (len(others) - 1) / (STEM_OPTIONS - 2)
        others = [others[round(k * step)] for k in range(STEM_OPTIONS - 1)]
    return [store_all, *others]


# --- emitting a schedule from R ----------------------------------------------------------------------


def prune_rows(graph: Graph, rows: list[list[int]]) -> list[list[int]]:
    """Remove recomputations that nothing reads before the value is computed again (they only cost time).

    One pass backwards through the run order: a computation is kept when it is its stage's own node or when
    a kept computation after it reads it before the value's next computation; a kept one makes its inputs
    wanted by the computations before it."""
    wanted = [False] * len(graph)
    deps = graph.columns.deps
    kept_rows: list[list[int]] = []
    for t in reversed(range(len(rows))):
        kept = []
        row = rows[t]
        computed = row if len(row) == 1 and row[0] == t else sorted(set(row) | {t})  # most stages run only t
        for k in reversed(computed):
            if k == t or wanted[k]:
                kept.append(k)
                wanted[k] = False  # the reads after this computation are served by it
                for d in deps[k]:
                    wanted[d] = True
        kept_rows.append(kept[::-1])  # kept in descending order
    return kept_rows[::-1]


def emit(graph: Graph, rows: list[list[int]]) -> tuple[Schedule, list[int]]:
    """The schedule that runs stage t's row in ascending order for every t, holding each computed value
    until its last read before it is computed again (minimal storage). Valid for any rows that contain
    their own stage: every read is served by the value's latest computation, at this stage or before.
    Also returns the stage of each instruction."""
    n = len(graph)
    computes, frees = _instructions(n)
    order = [(t, k) for t, row in enumerate(rows) for k in row]  # every computation, in run order
    freed_after: list[list[int]] = [[] for _ in order]  # values freed right after each computation
    latest = [-1] * n  # the computation (its index in order) whose value is in memory
    last_read = [-1] * n  # the last computation that read it so far
    deps = graph.columns.deps
    for i, (_, k) in enumerate(order):
        for d in deps[k]:
            last_read[d] = i
        if latest[k] >= 0:  # computed again: the earlier copy goes after its last read
            freed_after[max(latest[k], last_read[k])].append(k)
        latest[k], last_read[k] = i, -1
    for v in range(n):
        if latest[v] >= 0:
            freed_after[max(latest[v], last_read[v])].append(v)
    ops: list[Op] = []
    stages: list[int] = []
    for (t, k), freed in zip(order, freed_after, strict=True):
        ops.append(computes[k])
        stages.append(t)
        for v in sorted(freed):
            ops.append(frees[v])
            stages.append(t)
    return Schedule(tuple(ops), n), stages


@cache
def _instructions(n: int) -> tuple[tuple[Op, ...], tuple[Op, ...]]:
    """The compute and the free instruction of each node of an n-node graph, made once: emit uses thousands a
    schedule, and the searches emit thousands of schedules."""
    return tuple(Op(COMPUTE, k) for k in range(n)), tuple(Op(FREE, k) for k in range(n))


# --- combining blocks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phases:
    """For every phase (a block's forward, a block's backward, or a run of outside stages) the most
    outside-owned activation bytes live in it, and which blocks are in their gap then."""

    forward_outside: tuple[int, ...]  # per block
    backward_outside: tuple[int, ...]  # per block
    between: tuple[tuple[int, int], ...]  # (outside bytes, number of blocks already past their forward)


def measure_phases(graph: Graph, layout: BlockLayout, schedule: Schedule, stages: list[int]) -> Phases:
    """Outside bytes per phase on a probe schedule: memory less fixed less every block-owned live value
    (a block owns its forward and backward values from its forward's start to its backward's end)."""
    owner = {}
    for k, (fwd, bwd) in enumerate(zip(layout.forward, layout.backward, strict=True)):
        for i in (*fwd, *bwd):
            owner[i] = k
    sim = simulate(graph, schedule)
    fixed = graph.fixed.total_bytes
    blocks = len(layout.names)
    region = {}
    for k in range(blocks):
        for t in layout.forward[k]:
            region[t] = ("f", k)
        for t in layout.backward[k]:
            region[t] = ("b", k)
    held = [0] * len(graph)  # bytes node i holds now (outputs of a multi-output op are released one by one)
    counted = [False] * len(graph)  # whether node i's bytes are counted as its block's
    releases = part_releases(graph, schedule)
    owned = 0
    forward_outside, backward_outside = [0] * blocks, [0] * blocks
    between: dict[int, list[int]] = {}  # stage -> [outside bytes, blocks in their gap]
    for position, op in enumerate(schedule.ops):
        i, node, t = op.node, graph.nodes[op.node], stages[position]
        mine = owner.get(i) is not None and _active(layout, owner[i], t)
        if op.kind == COMPUTE:
            owned_during = owned + (node.output_bytes + node.workspace_bytes if mine and not held[i] else 0)
            outside = sim.timeline_bytes[position] - fixed - owned_during
            if not held[i]:
                held[i], counted[i] = node.output_bytes, mine
                owned += node.output_bytes if mine else 0
            for part_owner, part in releases.get(position, ()):
                size = graph.nodes[part_owner].part_bytes[part]
                held[part_owner] -= size
                owned -= size if counted[part_owner] else 0
        else:
            owned -= held[i] if counted[i] else 0
            held[i], counted[i] = 0, False
            outside = sim.timeline_bytes[position] - fixed - owned
        where = region.get(t)
        if where is None:
            past = sum(1 for k in range(blocks) if layout.forward[k].stop <= t and layout.backward[k].start > t)
            entry = between.setdefault(t, [0, past])
            entry[0] = max(entry[0], outside)
        elif where[0] == "f":
            forward_outside[where[1]] = max(forward_outside[where[1]], outside)
        else:
            backward_outside[where[1]] = max(backward_outside[where[1]], outside)
        # values of a finished block's backward stay (the gradient it hands on): from now on they are outside
        if position + 1 < len(stages) and stages[position + 1] != t:
            for k in range(blocks):
                if layout.backward[k].stop - 1 == t:
                    for v in (*layout.forward[k], *layout.backward[k]):
                        owned -= held[v] if counted[v] else 0
                        counted[v] = False
    merged: dict[int, int] = {}
    for outside, past in between.values():
        merged[past] = max(merged.get(past, 0), outside)
    return Phases(tuple(forward_outside), tuple(backward_outside), tuple(sorted(merged.items(), key=lambda x: x[1])))


def _active(layout: BlockLayout, k: int, t: int) -> bool:
    return layout.forward[k].start <= t < layout.backward[k].stop


@dataclass(frozen=True)
class Choice:
    """A block's option, and whether the block's exports (the next block's input) are dropped: then they are
    freed after the next block's forward, and the run of blocks dropping theirs (a segment) is recomputed,
    whole, at the start of the backward of the block after it (rotor's "checkpoint only the input")."""

    option: BlockOption
    drops_export: bool = False


def combine(curves: list[list[BlockOption]], phases: Phases, capacity_bytes: int,
            forward_s: list[float], head: list[BlockOption] = ()) -> tuple[float, list[Choice], int] | None:
    """The cheapest choice per block under the phase accounting, by DP over the blocks in forward order.

    State: (bytes held by blocks whose exports are kept, bytes the open segment will hold once recomputed,
    whether a segment is open). A kept block holds its gap bytes from its forward to its backward; a segment
    holds nothing until it is recomputed at the start of the next block's backward, then its gap bytes. So
    at block k's forward the kept bytes count; at its backward the kept bytes and the open segment's
    (recomputed just before); at the head only the kept bytes. Bytes are rounded up to 1/DP_BINS of the
    capacity (conservative); the last block keeps its exports (the head reads them).

    `head`: options for the head of the step (the first is the probe's, store-all), each lowering the outside
    bytes there by its peak's difference to the first's. Returns the seconds the choices add to the blocks'
    store-all seconds (a rank, not a cost), the choices and the index of the head's option."""
    blocks = len(curves)
    between = dict(phases.between)
    unit = max(1, capacity_bytes // DP_BINS)

    def units(size: int) -> int:
        return -(-size // unit)

    # A state's choices are a linked list, (index, drops, the choices before), not a tuple copied at each block:
    # fronts of thousands of states over 48 blocks (GPT-2 XL) spent most of the DP's seconds copying.
    State = tuple[int, int, bool]
    Chosen = tuple[int, bool, "Chosen"] | None
    front: dict[State, tuple[float, Chosen]] = {(0, 0, False): (0.0, None)}
    for k in range(blocks):
        following: dict[State, tuple[float, Chosen]] = {}
        # per option: its index, gap units, seconds, and the room it needs under the capacity at k's forward
        # and backward, in units' bytes of the kept (and pending) bytes
        options = [(index, units(o.gap_bytes), o.compute_s,
                    capacity_bytes - phases.forward_outside[k] - o.forward_peak_bytes,
                    capacity_bytes - phases.backward_outside[k] - o.backward_peak_bytes)
                   for index, o in enumerate(curves[k])]
        room_between = capacity_bytes - between.get(k, 0)
        can_drop = k < blocks - 1
        for (kept, pending, open_segment), (seconds, chosen) in front.items():
            if (kept + pending) * unit > room_between:
                continue
            kept_bytes, held_bytes = kept * unit, (kept + pending) * unit
            carried = pending if open_segment else 0
            for index, gap, compute_s, forward_room, backward_room in options:
                if kept_bytes > forward_room or held_bytes > backward_room:
                    continue
                key, value = (kept + gap, 0, False), seconds + compute_s
                if key not in following or value < following[key][0]:
                    following[key] = (value, (index, False, chosen))
                if can_drop:
                    key, value = (kept, carried + gap, True), seconds + (compute_s + forward_s[k])
                    if key not in following or value < following[key][0]:
                        following[key] = (value, (index, True, chosen))
        front = _dominant(following)
    head = list(head) or [None]
    final = []
    for (kept, _, open_segment), (seconds, chosen) in front.items():
        if open_segment:
            continue
        for index, option in enumerate(head):
            saved_bytes, extra_s = (0, 0.0) if option is None else (
                peak_bytes(head[0]) - peak_bytes(option), option.compute_s - head[0].compute_s)
            if between.get(blocks, 0) - saved_bytes + kept * unit <= capacity_bytes:
                final.append((seconds + extra_s, chosen, index))
    if not final:
        return None
    seconds, chosen, head_index = min(final, key=lambda entry: entry[0])
    choices = []
    while chosen is not None:
        index, drops, chosen = chosen
        choices.append((index, drops))
    choices.reverse()
    return seconds, [Choice(curves[k][index], drops) for k, (index, drops) in enumerate(choices)], head_index


def combine_with_stem(curves: list[list[BlockOption]], phases: Phases, capacity_bytes: int,
                      forward_s: list[float], head: list[BlockOption], stem: list[BlockOption],
                      deadline: float = math.inf) -> tuple[list[Choice], int, int] | None:
    """`combine` for each of the stem's options (the first is the probe's), each lowering the outside bytes of
    every phase where the stem is in its gap; the cheapest. Returns the choices, the head's option and the stem's.
    Past `deadline`, no more of the stem's options once one has a combination (a pass is 1 to 2 s per option on
    BERT-base: four options took 6 s past a 10-s limit)."""
    best = None
    for index, option in enumerate(stem or [None]):
        if best is not None and time.perf_counter() > deadline:
            break
        shifted, extra_s = phases, 0.0
        if index > 0:
            shifted, extra_s = without_stem_bytes(phases, stem[0], option), option.compute_s - stem[0].compute_s
        combined = combine(curves, shifted, capacity_bytes, forward_s, head)
        if combined is not None and (best is None or combined[0] + extra_s < best[0]):
            best = (combined[0] + extra_s, combined[1], combined[2], index)
    return None if best is None else best[1:]


def without_stem_bytes(phases: Phases, store_all: BlockOption, option: BlockOption) -> Phases:
    """The probe's phases (stem as store-all) with the stem's `option` instead: the bytes it no longer holds
    across its gap leave every phase after its forward and before its backward; its own phases (no block
    past its forward) lose the difference of peaks."""
    held = store_all.gap_bytes - option.gap_bytes
    own = peak_bytes(store_all) - peak_bytes(option)
    return Phases(tuple(b - held for b in phases.forward_outside), tuple(b - held for b in phases.backward_outside),
                  tuple((past, b - (own if past == 0 else held)) for past, b in phases.between))


def _dominant(states: dict) -> dict:
    """Drop a state when another with the same flag holds no more bytes of either kind for no more seconds.

    In ascending (kept, pending) order a state is dominated when an earlier one has no more pending bytes and
    no more seconds: a prefix minimum of seconds over pending bytes (a Fenwick tree) answers that in log time.
    Fronts reach thousands of states, and comparing them pairwise took seconds per block on GPT-2."""
    kept_states = {}
    for flag in (False, True):
        keys = sorted(k for k in states if k[2] == flag)
        least_seconds = [math.inf] * (max((k[1] for k in keys), default=0) + 2)  # tree over pending + 1
        for key in keys:
            seconds = states[key][0]
            if _prefix_min(least_seconds, key[1] + 1) <= seconds:
                continue
            _lower(least_seconds, key[1] + 1, seconds)
            kept_states[key] = states[key]
    return kept_states


def _prefix_min(tree: list[float], position: int) -> float:
    """The least value stored at positions 1..position of a Fenwick tree of minima."""
    least = math.inf
    while position > 0:
        least = min(least, tree[position])
        position -= position & -position
    return least


def _lower(tree: list[float], position: int, value: float) -> None:
    """Store `value` at `position` (1-based) of a Fenwick tree of minima."""
    while position < len(tree):
        tree[position] = min(tree[position], value)
        position += position & -position


def stitch(graph: Graph, layout: BlockLayout, problems: list[LocalProblem], chosen: list[Choice]) -> list[list[int]]:
    """The whole graph's rows: every outside stage runs its own node; block stages run their option's row;
    the first stage of a block's backward also recomputes the segment before it (every node from the
    segment's first block's forward to the block's own forward), if the blocks before it dropped exports."""
    rows = [[t] for t in range(len(graph))]
    for problem, choice in zip(problems, chosen, strict=True):
        place(rows, problem, choice.option)
    segment_start = None
    for k, choice in enumerate(chosen):
        if choice.drops_export:
            segment_start = k if segment_start is None else segment_start
        elif segment_start is not None:
            first = layout.backward[k].start
            chain = range(layout.forward[segment_start].start, layout.forward[k].start)
            rows[first] = sorted(set(rows[first]) | set(chain))
            segment_start = None
    return rows


def place(rows: list[list[int]], problem: LocalProblem, option: BlockOption) -> None:
    """Write a local problem's option into the whole graph's rows."""
    for local_stage, row in enumerate(option.rows):
        stage = problem.to_global[local_stage]
        if stage >= 0:
            rows[stage] = sorted({problem.to_global[i] for i in row})


# --- the solver ---------------------------------------------------------------------------------------


def probe(graph: Graph, layout: BlockLayout) -> tuple[list[LocalProblem], list[BlockOption], Phases]:
    """Each block's local problem and store-all option, and the outside bytes of every phase measured on the
    schedule that runs store-all in every block."""
    problems = [local_problem(graph, f, b) for f, b in zip(layout.forward, layout.backward, strict=True)]
    store_all = [option_from_rows(p, [[t] for t in range(len(p.graph))], FEASIBLE) for p in problems]
    schedule, stages = emit(graph, prune_rows(graph, stitch(graph, layout, problems, [Choice(o) for o in store_all])))
    return problems, store_all, measure_phases(graph, layout, schedule, stages)


def decompose_applies(graph: Graph, budget_bytes: int) -> tuple[bool, str]:
    """Whether the decomposition can fit this budget, and why (cheap: no MILP). It cannot when the graph has
    no repeated blocks worth the name, or when the head of the step with only the last block's exports (which
    the head reads) is already over the budget."""
    layout = find_layout(graph)
    if layout is None:
        return False, "no repeated blocks"
    sizes = [len(f) for f in layout.forward]
    if sum(sizes) < MIN_BLOCK_NODES * len(sizes):
        return False, f"{len(sizes)} blocks of {sum(sizes) / len(sizes):.1f} forward nodes on average: too small"
    problems, _, phases = probe(graph, layout)
    shapes = {tuple(node.deps for node in p.graph.nodes) for p in problems}
    if 2 * len(shapes) > len(problems):
        return False, f"{len(problems)} blocks of {len(shapes)} different shapes: too few repeats"
    last = problems[-1]
    least = sum(last.graph.nodes[d].output_bytes for d in last.graph.nodes[last.gap].deps)
    head, stem = head_problem(graph, layout), stem_problem(graph, layout)
    heads, stems = (head_curve(head) if head else []), (stem_curve(stem) if stem else [])
    saves = ((peak_bytes(heads[0]) - peak_bytes(heads[-1]) if heads else 0)
             + (stems[0].gap_bytes - min(o.gap_bytes for o in stems) if stems else 0))
    if dict(phases.between).get(len(problems), 0) - saves + least > budget_bytes - graph.fixed.total_bytes:
        return False, f"{len(problems)} repeated blocks, but the head of the step alone does not fit the budget"
    return True, f"{len(problems)} repeated blocks"


def solve_decompose(graph: Graph, budget_bytes: int, options: SolveOptions | None = None) -> SolverResult:
    """Block decomposition: block trade-off curves by MILP, combined by DP, stitched on the fine graph."""
    options = options or SolveOptions()
    started = time.perf_counter()
    settled = settled_without_solving("decompose", graph, budget_bytes)
    if settled is not None:
        return settled
    layout = find_layout(graph)
    if layout is None:
        return SolverResult("decompose", NO_SOLUTION, None, wall_s=time.perf_counter() - started,
                            message="no repeated blocks with contiguous forward and backward ranges: "
                                    "the decomposition does not apply")
    capacity = budget_bytes - graph.fixed.total_bytes
    problems, store_all_options, phases = probe(graph, layout)
    store_all = [[option] for option in store_all_options]
    classes: dict[tuple, list[int]] = {}  # blocks with the same local dependencies share one MILP curve
    for k, problem in enumerate(problems):
        shape = tuple(node.deps for node in problem.graph.nodes)
        classes.setdefault(shape, []).append(k)
    head, stem = head_problem(graph, layout), stem_problem(graph, layout)
    heads = head_curve(head) if head is not None else []
    stems = stem_curve(stem) if stem is not None else []
    # the even share of the budget each block may hold across its gap when every block holds the same
    wanted = (capacity - dict(phases.between).get(len(problems), 0)) // len(problems)

    curves: list[list[BlockOption]] = [list(c) for c in store_all]
    class_list = sorted(classes.values(), key=len, reverse=True)
    curve_deadline = started + CURVE_SHARE * options.time_limit_s
    for position, members in enumerate(class_list):
        problem = problems[members[0]]
        least = sum(problem.graph.nodes[d].output_bytes for d in problem.graph.nodes[problem.gap].deps)
        left = curve_deadline - time.perf_counter()
        found = block_options(problem, curve_targets(least, store_all[members[0]][0].gap_bytes, wanted), options,
                              time.perf_counter() + left / (len(class_list) - position))
        found = found[1:] + greedy_options(problem)
        for k in members:  # the rows fit every block of the class; measure them on each block's own sizes
            curves[k] = pareto(store_all[k] + [option_from_rows(problems[k], [list(r) for r in o.rows], o.status)
                                               for o in found])

    forward_s = [sum(graph.nodes[i].compute_s for i in f) for f in layout.forward]  # a segment's recomputation
    # The DP's accounting can miss bytes (outside values shifting with the choice, a segment's recomputation
    # transient): rerun it with a margin until the stitched schedule fits, then bisect the margin between the
    # largest that overshot and the smallest that fit, to give back what a wide margin wasted.
    margin, overshot, fitted = 0, None, None
    best: tuple[Schedule, float, int] | None = None
    tried = []
    deadline = started + options.time_limit_s
    cut_short = False
    for _ in range(MAX_REPAIRS + 1):
        if tried and time.perf_counter() > deadline:
            # out of time: the best stitched schedule that fits so far, if any (a pass that overshot was repaired
            # with a wider margin until one fit, past any limit: BERT-base given 0.5 s took 13 s)
            cut_short = best is None
            break
        combined = combine_with_stem(curves, phases, capacity - margin, forward_s, heads, stems, deadline)
        if combined is None:  # no choice fits the DP's accounting at this margin (bisection never gets here)
            break
        else:
            chosen, head_index, stem_index = combined
            rows = stitch(graph, layout, problems, chosen)
            if head_index:
                place(rows, head, heads[head_index])
            if stem_index:
                place(rows, stem, stems[stem_index])
            rows = prune_rows(graph, rows)
            schedule, _ = emit(graph, rows)
            sim = simulate(graph, schedule)
            assert sim.valid, sim.errors  # emit is valid for any rows
            tried.append({"margin_bytes": margin, "peak_bytes": sim.peak_bytes, "compute_s": sim.compute_s,
                          "dropped_exports": [k for k, c in enumerate(chosen) if c.drops_export],
                          "head_option": head_index, "stem_option": stem_index})
            if sim.peak_bytes <= budget_bytes:
                if best is None or sim.compute_s < best[1]:
                    best = (schedule, sim.compute_s, sim.peak_bytes)
                fitted = margin
            else:
                overshot = margin
        if fitted == 0:
            break  # the DP's own optimum fits: nothing to give back
        if fitted is None:  # still over: widen
            margin = max(2 * margin, margin + sim.peak_bytes - budget_bytes)
        else:
            low = overshot if overshot is not None and overshot < fitted else 0
            if fitted - low < capacity // 1000:
                break
            margin = (low + fitted) // 2
    detail = {"blocks": len(problems), "block_classes": len(classes), "wanted_gap_bytes": wanted,
              "block_nodes": [len(p.graph) - 1 for p in problems[:1]],
              "curve": [{"gap_bytes": o.gap_bytes, "compute_s": o.compute_s, "status": o.status,
                         "forward_peak_bytes": o.forward_peak_bytes, "backward_peak_bytes": o.backward_peak_bytes}
                        for o in class_curve(curves)],
              "repairs": tried}
    wall_s = time.perf_counter() - started
    if best is None:
        why = ("the time limit ran out before a combination of block options and recomputed segments fit the budget "
               "(each tried overshot it)" if cut_short else
               "no combination of block options and recomputed segments fits the budget")
        return SolverResult("decompose", NO_SOLUTION, None, wall_s=wall_s, detail=detail, message=why)
    schedule, seconds, peak = best
    detail["peak_bytes"] = peak
    return SolverResult("decompose", FEASIBLE, schedule, objective_s=seconds, lower_bound_s=None, wall_s=wall_s,
                        message=f"{len(problems)} blocks in {len(classes)} class(es), "
                                f"{len(class_curve(curves))} options per block, combined by DP", detail=detail)


def class_curve(curves: list[list[BlockOption]]) -> list[BlockOption]:
    return curves[0] if curves else []


