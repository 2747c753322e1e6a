"""The single judge of a schedule: validity, peak memory, memory timeline, seconds.

Every figure that remat prints for a schedule comes from `simulate`, whatever produced it.

Memory model (the one Checkmate's MILP uses): while node i runs, memory holds the fixed
memory, every live value, i's output and i's workspace; after it, i's output stays live until a
free instruction releases it.
"""

from __future__ import annotations

from dataclasses import dataclass

from remat.graph import Graph
from remat.schedule import COMPUTE, Schedule


@dataclass(frozen=True)
class Simulation:
    valid: bool
    errors: tuple[str, ...]
    peak_bytes: int  # fixed + activations, the figure compared with the budget
    activation_peak_bytes: int  # peak_bytes less fixed memory
    compute_s: float  # seconds of every compute instruction
    timeline_bytes: tuple[int, ...]  # memory in use at each instruction (fixed included)
    peak_op: int  # index of the instruction at the peak, -1 for an empty schedule
    compute_counts: tuple[int, ...]

    def fits(self, budget_bytes: int) -> bool:
        return self.valid and self.peak_bytes <= budget_bytes


def simulate(graph: Graph, schedule: Schedule, max_errors: int = 10) -> Simulation:
    if schedule.num_nodes != len(graph):
        return Simulation(False, (f"schedule is for {schedule.num_nodes} nodes, graph has {len(graph)}",),
                          0, 0, 0.0, (), -1, ())
    nodes = graph.nodes
    fixed = graph.fixed.total_bytes
    errors: list[str] = []
    releases = part_releases(graph, schedule)
    held = [0] * len(nodes)  # bytes node i holds now (its parts may be released one by one)
    live = [False] * len(nodes)
    counts = [0] * len(nodes)
    live_bytes = 0
    peak = 0
    peak_op = -1
    compute_s = 0.0
    timeline: list[int] = []

    columns = graph.columns
    output_bytes, workspace_bytes, seconds, deps = (columns.output_bytes, columns.workspace_bytes,
                                                    columns.seconds, columns.deps)
    n = len(nodes)
    for position, op in enumerate(schedule.ops):
        i = op.node
        if not 0 <= i < n:
            errors.append(f"instruction {position}: node {i} does not exist")
            timeline.append(fixed + live_bytes)
            continue
        if op.kind == COMPUTE:
            for d in deps[i]:  # a loop, not all(...): this runs for every instruction of every search move
                if not live[d]:
                    missing = [d for d in deps[i] if not live[d]]
                    errors.append(f"instruction {position}: compute {nodes[i].name} needs "
                                  f"{', '.join(nodes[d].name for d in missing[:3])} which is not in memory")
                    break
            size = output_bytes[i]
            if live[i]:
                errors.append(f"instruction {position}: compute {nodes[i].name} while it is already in memory")
                during = live_bytes + workspace_bytes[i]
            else:
                during = live_bytes + size + workspace_bytes[i]
                live[i] = True
                live_bytes += size
                held[i] = size
            if during > peak:
                peak, peak_op = during, position
            timeline.append(fixed + during)
            counts[i] += 1
            compute_s += seconds[i]
            if position in releases:  # outputs of multi-output ops read for the last time
                for owner, part in releases[position]:
                    if live[owner]:
                        size = nodes[owner].part_bytes[part]
                        live_bytes -= size
                        held[owner] -= size
        else:
            if not live[i]:
                errors.append(f"instruction {position}: free {nodes[i].name} which is not in memory")
            else:
                live[i] = False
                live_bytes -= held[i]
                held[i] = 0
            timeline.append(fixed + live_bytes)
        if len(errors) >= max_errors:
            break

    never = [i for i in graph.outputs if counts[i] == 0]
    if never:
        names = ", ".join(nodes[i].name for i in never[:3])
        errors.append(f"{len(never)} output(s) never computed (loss or gradients): {names}")
    return Simulation(
        valid=not errors,
        errors=tuple(errors),
        peak_bytes=fixed + peak,
        activation_peak_bytes=peak,
        compute_s=compute_s,
        timeline_bytes=tuple(timeline),
        peak_op=peak_op,
        compute_counts=tuple(counts),
    )


def part_releases(graph: Graph, schedule: Schedule) -> dict[int, list[tuple[int, int]]]:
    """position -> the (node, output) pairs released right after that instruction.

    Output k of a multi-output op computed at position t is held until its last read before the
    op's next free or recomputation (right after t if nothing reads it), as the executor's graphs
    free it. One backward sweep over the schedule.
    """
    own, reads, pairs = graph.part_slots
    if not pairs:
        return {}
    nodes = len(graph.nodes)
    releases: dict[int, list[tuple[int, int]]] = {}
    last_read = [-1] * len(pairs)  # per output: its last read in the lifetime being swept (-1: none yet)
    ops = schedule.ops
    for position in range(len(ops) - 1, -1, -1):
        op = ops[position]
        i = op.node
        if not 0 <= i < nodes:
            continue
        if op.kind == COMPUTE:
            for slot in reads[i]:
                if last_read[slot] < 0:
                    last_read[slot] = position
            for slot in own[i]:
                at = last_read[slot]
                releases.setdefault(position if at < 0 else at, []).append(pairs[slot])
                last_read[slot] = -1
        else:
            for slot in own[i]:
                last_read[slot] = -1
    return releases


def live_bytes_at(graph: Graph, schedule: Schedule, position: int) -> dict[int, int]:
    """The values in memory while instruction `position` runs (its own output included), with the bytes each
    holds, as simulate counts them: what a plan could give up at its peak."""
    releases = part_releases(graph, schedule)
    held: dict[int, int] = {}
    for index, op in enumerate(schedule.ops[:position + 1]):
        node = graph.nodes[op.node]
        if op.kind != COMPUTE:
            held.pop(op.node, None)
            continue
        held.setdefault(op.node, node.output_bytes)
        if index == position:
            break
        for owner, part in releases.get(index, ()):
            if owner in held:
                held[owner] -= graph.nodes[owner].part_bytes[part]
    return held
