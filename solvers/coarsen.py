"""Coarsening: merge runs of consecutive nodes so that a graph too big for the MILP becomes one
it can solve, and expand the coarse schedule back into a schedule of the original graph.

A coarse node is a contiguous range of the topological order (so the coarse graph is acyclic
and its order is still topological). Running a coarse node runs its members in order; a member
is kept after the group only if a node outside the group reads it (its "export"); the others
are freed as soon as the group no longer needs them. The coarse node's size is the bytes of
its exports and its workspace is the extra memory the group needs while it runs, so any coarse
schedule within a budget expands into a fine schedule within the same budget. The converse
does not hold: the coarse optimum is an upper bound on the fine one.
"""

from __future__ import annotations

from dataclasses import dataclass

from remat.graph import Graph, Node
from remat.schedule import COMPUTE, FREE, Op, Schedule


@dataclass(frozen=True)
class Coarsening:
    fine: Graph
    coarse: Graph
    groups: tuple[tuple[int, ...], ...]  # fine node indices of each coarse node, ascending
    exports: tuple[tuple[int, ...], ...]  # members kept after each group runs

    def expand(self, coarse_schedule: Schedule) -> Schedule:
        """The fine schedule that runs `coarse_schedule` group by group."""
        ops: list[Op] = []
        for op in coarse_schedule.ops:
            if op.kind == FREE:
                ops.extend(Op(FREE, member) for member in self.exports[op.node])
            else:
                ops.extend(_run_group(self.fine, self.groups[op.node], set(self.exports[op.node])))
        return Schedule(tuple(ops), len(self.fine))


def _run_group(fine: Graph, members: tuple[int, ...], exports: set[int]) -> list[Op]:
    """Compute the members in order, freeing each non-exported member after its last use inside."""
    inside = set(members)
    last_use = {m: m for m in members}
    for m in members:
        for d in fine.nodes[m].deps:
            if d in inside:
                last_use[d] = max(last_use[d], m)
    ops = []
    for m in members:
        ops.append(Op(COMPUTE, m))
        for d in sorted({*fine.nodes[m].deps, m} & inside):
            if last_use[d] == m and d not in exports:
                ops.append(Op(FREE, d))
    return ops


def coarsen(graph: Graph, groups: list[list[int]]) -> Coarsening:
    """Build the coarse graph for contiguous `groups` covering 0..n-1 in order."""
    group_of = [0] * len(graph)
    for g, members in enumerate(groups):
        for m in members:
            group_of[m] = g
    outputs = set(graph.outputs)
    nodes, exports = [], []
    for g, members in enumerate(groups):
        member_set = set(members)
        exported = tuple(m for m in members
                         if any(group_of[u] != g for u in graph.users[m])
                         or (m in outputs and graph.nodes[m].output_bytes == 0))
        export_bytes = sum(graph.nodes[m].output_bytes for m in exported)
        peak = _group_peak(graph, members, set(exported))
        deps = sorted({group_of[d] for m in members for d in graph.nodes[m].deps if d not in member_set})
        first = graph.nodes[members[0]]
        nodes.append(Node(
            name=first.name if len(members) == 1 else f"{first.name}..{graph.nodes[members[-1]].name}",
            op=first.op if len(members) == 1 else f"group of {len(members)}",
            deps=tuple(deps),
            output_bytes=export_bytes,
            compute_s=sum(graph.nodes[m].compute_s for m in members),
            is_backward=first.is_backward,
            workspace_bytes=max(0, peak - export_bytes),
            module=first.module,
        ))
        exports.append(exported)
    coarse_outputs = tuple(sorted({group_of[o] for o in graph.outputs}))
    coarse = Graph(nodes=tuple(nodes), outputs=coarse_outputs, fixed=graph.fixed, meta=dict(graph.meta))
    return Coarsening(graph, coarse, tuple(tuple(m) for m in groups), tuple(exports))


def _group_peak(graph: Graph, members: list[int], exports: set[int]) -> int:
    """Peak bytes of the group's own values while it runs (its inputs are counted outside)."""
    live = peak = 0
    for op in _run_group(graph, tuple(members), exports):
        node = graph.nodes[op.node]
        if op.kind == COMPUTE:
            peak = max(peak, live + node.output_bytes + node.workspace_bytes)
            live += node.output_bytes
        else:
            live -= node.output_bytes
    return peak


def contiguous_groups(graph: Graph, max_nodes: int) -> list[list[int]]:
    """Split the topological order into at most about `max_nodes` contiguous groups.

    Boundaries go where the graph is thin: a group never mixes forward and backward nodes, a
    large tensor (its own working set near the graph's largest) is a group by itself so the
    memory floor is not raised, and inside the forward a group preferably ends where few bytes
    cross the boundary (block outputs in residual networks), so that keeping a block's output
    does not mean keeping its insides.
    """
    n = len(graph)
    if n <= max_nodes:
        return [[i] for i in range(n)]
    largest = max(graph.working_set_bytes(i) for i in range(n))
    big = {i for i in range(n) if graph.nodes[i].output_bytes * 8 >= largest}
    if len(big) > max_nodes // 4:  # many similar big tensors (CNNs): isolating them all leaves no room
        big = set()
    crossing = _forward_crossing_bytes(graph)
    for size in range(2, n + 1):
        groups = _greedy_groups(graph, size, big, crossing)
        if len(groups) <= max_nodes:
            return groups
    return [list(range(n))]  # only when max_nodes < 2 (the forward/backward boundary needs two groups)


def _greedy_groups(graph: Graph, size: int, big: set[int], crossing: list[int]) -> list[list[int]]:
    groups: list[list[int]] = []
    current: list[int] = []
    n = len(graph)
    for i, node in enumerate(graph.nodes):
        # the thinnest boundary this group can still reach: end here if none ahead is thinner
        reach = range(i + 1, min(n, i + size - len(current)))
        thinnest_here = all(crossing[i] <= crossing[j] for j in reach if not graph.nodes[j].is_backward)
        starts_new = bool(current) and (
            i in big or current[-1] in big
            or node.is_backward != graph.nodes[current[-1]].is_backward
            or len(current) >= size
            or (not node.is_backward and len(current) >= size // 2 and thinnest_here)
        )
        if starts_new:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _forward_crossing_bytes(graph: Graph) -> list[int]:
    """crossing[i]: bytes of forward values made before node i and read by forward nodes >= i."""
    n = len(graph)
    last_forward_use = [-1] * n
    for i, node in enumerate(graph.nodes):
        if not node.is_backward:
            for d in node.deps:
                last_forward_use[d] = max(last_forward_use[d], i)
    delta = [0] * (n + 1)
    for d in range(n):
        if last_forward_use[d] > d:
            delta[d + 1] += graph.nodes[d].output_bytes
            delta[last_forward_use[d] + 1] -= graph.nodes[d].output_bytes
    crossing, running = [], 0
    for i in range(n):
        running += delta[i]
        crossing.append(running)
    return crossing
