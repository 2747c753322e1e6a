"""A lower bound on the lowest peak of a graph's schedules, found by walking back from the step's end.

Take any schedule that runs the last node, n-1 (every frontier-advancing one does: stage n-1 runs it), and look
at the runs before its last run of n-1, latest first. Call a part (an output of a node, solvers/stage_memory.py)
*needed* at a moment when a run after that moment reads it and no run in between makes it again: it is in memory
then (nothing can read a part that was freed). So while node k runs, memory holds every part needed just after the
run, k's inputs and outputs and its workspace, and just before the run the needed parts are those needed after it
that k does not make, plus the parts k reads.

The walk follows those sets, but only through the runs that make a part of the set it holds, starting from the
parts n-1 reads: it holds a set N, the walk's step to a run of k that makes a part of N costs
fixed + bytes(N | outputs(k) | inputs(k)) + workspace(k), and leads to (N - outputs(k)) | inputs(k). Whatever the
schedule, the walk's set stays inside the schedule's needed set: a run the walk steps over makes no part of N, so
the parts of N are still needed before it. Each step's cost is then at most the schedule's memory at that run, and
a nonempty set has a next step (its parts are made by some earlier run). So the peak of every schedule is at least
the lowest, over every walk from the start to the empty set, of the walk's costliest step: a bottleneck shortest
path, which a best-first search finds (Dijkstra with max for +). Stopped early, the cost of the set it would take
next is still a lower bound: every walk to the empty set passes through a set on its frontier. The costs start at the
node floor of what the last node reads, directly or not (each of those runs: fixed memory and the largest working set
among them), and of sets at the same cost the search takes the one it reached last: most sets tie at the bound, and
breadth-first among them it expanded 200,000 sets (1 to 2 s) without reaching the empty set on 24 to 50-node steps,
where this order reaches it at once (the bound is the same: the order among ties does not change which cost is taken
first).

Under gradients="set-to-none" or "accumulate" the last node is the backward's return, which reads every gradient:
each walk then keeps every gradient not made yet in its set, and the bound sees that whatever runs last before the
return runs beside all the others. The node floor (fixed memory and the largest single working set) does not; nor
does the min-peak MILP's LP relaxation, which keeps gradients a fraction each and makes them again at no cost in
the last stage: on a 24-node step it stayed at the floor, 6,784 bytes, where this walk gives the optimum, 7,264.

A set M inside a set N does at least as well as N from the same cost: take a walk from N; where its step runs a k
that makes a part of M, the same run from M costs no more (M's parts are N's) and leads inside N's next set, and
where k makes no part of M, M is already inside N's next set (N - outputs(k) keeps M), so a walk from M follows
with no costlier step. So where a run reads only parts of the set N it is taken from, and costs no more than the
walk so far, it leads to N - outputs(k), inside N at the same cost, and the search takes that step alone from N:
the bound stays a bound, and the walk it finds the cheapest. On a set-to-none ResNet-50 step (batch 2, 521 nodes)
the search then reached the empty set in 2.4 s, where it had not in 4 s; on a U-Net one in 0.33 s (0.58 s before).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

from remat.graph import Graph
from remat.schedule import COMPUTE, FREE, Op, Schedule, tighten_frees
from solvers.stage_memory import node_parts

MAX_SETS = 200_000  # sets the search reaches at most (each a few hundred bytes of its dictionary)
CHECK_EVERY = 64  # sets expanded between looks at the clock


@dataclass(frozen=True)
class Walk:
    bound_bytes: int  # no schedule that runs the last node peaks below this (fixed memory included)
    runs: tuple[int, ...] | None  # the walk to the empty set, in the order a schedule runs them (the last node last),
    #                               when the search reached it: then its costliest step is bound_bytes


def backward_peak_bound(graph: Graph, deadline: float, target: int | None = None) -> int:
    """A lower bound, in bytes (fixed memory included), on the peak of every schedule that runs the graph's last
    node: the search above, stopped at `deadline` (a time.perf_counter() value), at MAX_SETS sets reached, or once the
    bound reaches `target` (a peak some schedule reaches: no bound goes above it)."""
    return backward_walk(graph, deadline, target).bound_bytes


def backward_walk(graph: Graph, deadline: float, target: int | None = None, max_sets: int | None = None) -> Walk:
    """backward_peak_bound's search, with the walk it found when it reached the empty set (walk_schedule makes a
    schedule of it). `max_sets`: the sets it reaches at most, in place of MAX_SETS."""
    max_sets = MAX_SETS if max_sets is None else max_sets
    n = len(graph)
    if n == 0:
        return Walk(graph.fixed.total_bytes, ())
    parts = node_parts(graph)
    bit: dict[tuple[int, int], int] = {}  # (node, output) -> its bit in a set
    size: list[int] = []  # bytes of the part of each bit
    maker: list[int] = []  # the node that makes the part of each bit
    for group in parts:
        for part in group:
            bit[part.node, part.index] = 1 << len(size)
            size.append(part.size_bytes)
            maker.append(part.node)
    outputs = [sum(bit[part.node, part.index] for part in parts[k]) for k in range(n)]
    inputs = [sum(bit[part.node, part.index] for d in set(graph.nodes[k].deps) for part in parts[d]
                  if k in part.readers) for k in range(n)]
    fixed = graph.fixed.total_bytes
    workspace = [node.workspace_bytes for node in graph.nodes]

    def held(bits: int) -> int:
        total = 0
        while bits:
            low = bits & -bits
            total += size[low.bit_length() - 1]
            bits ^= low
        return total

    last = n - 1
    start = inputs[last]
    ran = {last}  # the last node and what it reads, directly or not: every schedule that runs it runs them
    stack = [last]
    while stack:
        for d in graph.nodes[stack.pop()].deps:
            if d not in ran:
                ran.add(d)
                stack.append(d)
    first_cost = fixed + max(graph.working_set_bytes(k) for k in ran)  # (the last node's step among them)
    frontier = [(first_cost, 0, start)]  # (costliest step so far, minus the order reached, set)
    best = {start: first_cost}
    step_to: dict[int, tuple[int, int]] = {}  # set -> (the set the walk came from, the node whose run led here)
    pushed = expanded = 0
    while frontier:
        cost, _, needed = heapq.heappop(frontier)
        if best[needed] < cost:
            continue  # reached again more cheaply since
        if needed == 0:
            runs = []
            while needed != start:
                needed, k = step_to[needed]
                runs.append(k)
            return Walk(cost, (*runs, last))
        if target is not None and cost >= target:
            return Walk(cost, None)
        expanded += 1
        if len(best) > max_sets or (expanded % CHECK_EVERY == 0 and time.perf_counter() > deadline):
            return Walk(cost, None)
        needed_bytes = held(needed)
        makers = set()
        bits = needed
        while bits:
            low = bits & -bits
            makers.add(maker[low.bit_length() - 1])
            bits ^= low
        steps = {k: fixed + needed_bytes + held((outputs[k] | inputs[k]) & ~needed) + workspace[k] for k in makers}
        # a run that reads only parts of the set, at no more than the cost so far, leads to a set inside it at the
        # same cost: the only step worth taking from here (the docstring's last paragraph)
        free = next((k for k in makers if not inputs[k] & ~needed and steps[k] <= cost), None)
        for k in makers if free is None else (free,):
            step = max(cost, steps[k])
            before = (needed & ~outputs[k]) | inputs[k]
            if step < best.get(before, step + 1):
                best[before] = step
                step_to[before] = (needed, k)
                pushed += 1
                heapq.heappush(frontier, (step, -pushed, before))
    raise AssertionError("the search ended without reaching the empty set")  # a node's inputs are earlier nodes'


def walk_schedule(graph: Graph, runs: tuple[int, ...]) -> Schedule:
    """A schedule that runs `runs` in order (a Walk's), each value freed at its last read. The walk counts only parts
    of nonzero size, so a node it runs may read a value of 0 bytes it never made, and outputs of the step off its path
    (the loss, where the last node does not read it) are not in it: each is computed, with what it reads and is not
    in memory, right before the run that reads it, or the outputs at the end. Its peak is the walk's bound where
    those add nothing (remat.simulate judges it)."""
    ops: list[Op] = []
    computed: set[int] = set()  # in memory unless a later run of the node frees it first (frees come at the end)

    def run(k: int) -> None:
        for d in graph.nodes[k].deps:
            if d not in computed:
                run(d)
        if k in computed:  # a value made again: the walk needs none of its earlier one after this run
            ops.append(Op(FREE, k))
        ops.append(Op(COMPUTE, k))
        computed.add(k)

    for k in runs:
        run(k)
    for k in graph.outputs:
        if k not in computed:
            run(k)
    return tighten_frees(graph, Schedule(tuple(with_every_node_run(graph, ops)), len(graph)))


def with_every_node_run(graph: Graph, ops: list[Op]) -> list[Op]:
    """`ops` with each node they never compute (one that no output reads, directly or not: dead code in a random
    graph) computed right after the first computations of its inputs, which are in memory then. Every schedule of the
    other solvers runs every node, store-all included: without these, the walk's schedule cost less than store-all's,
    and a budget's plan less than a larger one's (sweep's curve rose: 0.4 s at 2 bytes, store-all's 0.7 s at 3)."""
    pending = [k for k in range(len(graph)) if k not in {op.node for op in ops if op.kind == COMPUTE}]
    ran: set[int] = set()
    result: list[Op] = []

    def run_ready() -> None:
        while ready := [k for k in pending if all(d in ran for d in graph.nodes[k].deps)]:
            for k in ready:
                pending.remove(k)
                result.append(Op(COMPUTE, k))
                ran.add(k)

    run_ready()
    for op in ops:
        result.append(op)
        if op.kind == COMPUTE and op.node not in ran:
            ran.add(op.node)
            run_ready()
    return result
