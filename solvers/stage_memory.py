"""The memory accounting of the stage models (Checkmate's MILP in solvers/checkmate.py, its CP-SAT twin in
solvers/cpsat.py): which stored bytes each stage starts with and what each run frees, output by output.

remat/simulate.py releases each output of an op with several (batch norm's output, mean and rstd; max pooling's
output and indices) after its own last read, while the op stays in memory until its free. Counting the op's
bytes as one value until its last reader overstates memory badly on CNNs: a batch norm's output is read by the
next op, its statistics by the backward, and counted whole it stays for the whole forward. So the models count
parts:

- an op with one output has one part: all its bytes, read by all its users. Its storage variable S[t, i] says
  whether the part is in memory when stage t starts, as in the paper;
- an op with several outputs has one part per output of nonzero size, each read by its own readers. S[t, i] says
  the op is in memory (so it cannot be computed again in stage t); a variable HELD[t, i, p] <= S[t, i] says its
  output p still is, and is what the memory counts.

FREE[t, i, p, k]: part p of value i is released right after node k runs in stage t, for k = i and the readers of
p. This module holds the index sets and, for warm starts, every variable's value for given stage matrices; the
models build their variables and constraints over them. No solver library here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from remat.graph import Graph


@dataclass(frozen=True)
class Part:
    """One output of a node, as the stage models count it."""

    node: int
    index: int  # which output (0 for an op with one)
    size_bytes: int
    readers: tuple[int, ...]  # the nodes that read this output, ascending
    separate: bool  # the op has several outputs: HELD[t, node, index] says it is in memory, not S[t, node]


def node_parts(graph: Graph) -> list[list[Part]]:
    """parts[i]: node i's outputs of nonzero size."""
    parts: list[list[Part]] = []
    for i, node in enumerate(graph.nodes):
        if node.part_bytes:
            parts.append([Part(i, p, size, tuple(sorted(set(readers))), True)
                          for p, (size, readers) in enumerate(zip(node.part_bytes, node.part_users, strict=True))
                          if size > 0])
        else:
            parts.append([Part(i, 0, node.output_bytes, graph.users[i], False)] if node.output_bytes > 0 else [])
    return parts


def freed_by(graph: Graph, parts: list[list[Part]]) -> list[list[Part]]:
    """freed_by[k]: the parts that node k's run may release: its own, and those of its inputs that k reads."""
    freed: list[list[Part]] = [list(parts[k]) for k in range(len(graph))]
    for i in range(len(graph)):
        for part in parts[i]:
            for k in part.readers:
                freed[k].append(part)
    return freed


@dataclass(frozen=True)
class StageValues:
    """Every accounting variable's value for stage matrices R, S: what the models hold, exactly, for the
    schedule Schedule.from_matrices emits (when S is minimal, as remat.schedule.minimal_storage makes it)."""

    held: dict[tuple[int, int, int], int]  # (t, i, p) -> HELD, for separate parts, 1 <= t, i < t
    free: dict[tuple[int, int, int, int], int]  # (t, i, p, k) -> FREE
    memory: dict[tuple[int, int], float]  # (t, k) -> U: activation memory while node k runs in stage t, in `size`


def part_bytes(part: Part) -> int:
    return part.size_bytes


def stage_values(graph: Graph, R: list[list[int]], S: list[list[int]],
                 size: Callable[[Part], float] = part_bytes) -> StageValues:
    """`size`: a part's memory in the model's units (a node's run allocates the sum of its parts'). Node t runs in
    stage t whatever R[t][t] says."""
    n = len(graph)
    parts = node_parts(graph)
    freed = freed_by(graph, parts)

    # HELD[t, i, p]: i is stored at stage t and part p is read in this stage or a later one of the same stay in
    # memory (stages t, t+1, ... while S keeps i), as the simulator holds it until its last read.
    held: dict[tuple[int, int, int], int] = {}
    for i in range(n):
        for part in parts[i]:
            if not part.separate:
                continue
            later = 0  # part read in stage t+1 or later of the stay that continues into t+1
            for t in reversed(range(i + 1, n)):
                read_now = any(R[t][j] or j == t for j in part.readers if j <= t)
                held[t, i, part.index] = int(bool(S[t][i]) and (read_now or bool(later)))
                later = held[t, i, part.index]

    def in_memory_next(t: int, part: Part) -> bool:
        if t + 1 >= n:
            return False
        if part.separate:
            return bool(held.get((t + 1, part.node, part.index), 0))
        return bool(S[t + 1][part.node])

    free: dict[tuple[int, int, int, int], int] = {}
    for t in range(n):
        for k in range(t + 1):
            for part in freed[k]:
                runs = bool(R[t][k] or k == t)
                read_later = any(R[t][j] or j == t for j in part.readers if k < j <= t)
                free[t, part.node, part.index, k] = int(runs and not in_memory_next(t, part) and not read_later)

    allocated = [sum(size(part) for part in parts[i]) for i in range(n)]
    memory: dict[tuple[int, int], float] = {}
    for t in range(n):
        in_memory = sum(size(part) for i in range(t) for part in parts[i]
                        if (held.get((t, i, part.index), 0) if part.separate else S[t][i]))
        in_memory += allocated[0] * int(bool(R[t][0]) or t == 0)
        memory[t, 0] = in_memory
        for k in range(t):
            in_memory -= sum(size(part) * free[t, part.node, part.index, k] for part in freed[k])
            in_memory += allocated[k + 1] * int(bool(R[t][k + 1]) or k + 1 == t)
            memory[t, k + 1] = in_memory
    return StageValues(held, free, memory)
