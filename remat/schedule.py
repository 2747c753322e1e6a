"""Schedules: an ordered list of compute / free instructions (Checkmate's instruction form),
and conversion to and from Checkmate's stage matrices R (recompute) and S (stored).

Stage semantics (frontier-advancing, Jain et al. 2020, section 4):
  stage t computes node t for the first time, possibly after recomputing earlier nodes;
  S[t][i] = node i is in memory when stage t starts;  R[t][i] = node i is computed in stage t.
  Within a stage nodes are computed in ascending index order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from remat.graph import Graph

COMPUTE: Literal["compute"] = "compute"
FREE: Literal["free"] = "free"


@dataclass(frozen=True)
class Op:
    kind: Literal["compute", "free"]
    node: int

    def __repr__(self) -> str:
        return f"{self.kind}({self.node})"


@dataclass(frozen=True)
class Schedule:
    ops: tuple[Op, ...]
    num_nodes: int

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, int]], num_nodes: int) -> Schedule:
        return cls(tuple(Op(kind, node) for kind, node in pairs), num_nodes)  # type: ignore[arg-type]

    def to_json(self) -> dict:
        return {"num_nodes": self.num_nodes, "ops": [[op.kind, op.node] for op in self.ops]}

    @classmethod
    def from_json(cls, data: dict) -> Schedule:
        ops = []
        for kind, node in data["ops"]:
            if kind not in (COMPUTE, FREE) or not isinstance(node, int):
                raise ValueError(f"bad schedule instruction {[kind, node]!r}")
            ops.append(Op(kind, node))
        return cls(tuple(ops), int(data["num_nodes"]))

    def compute_counts(self) -> list[int]:
        counts = [0] * self.num_nodes
        for op in self.ops:
            if op.kind == COMPUTE:
                counts[op.node] += 1
        return counts

    def recomputed_nodes(self) -> list[int]:
        """Nodes computed more than once."""
        return [i for i, count in enumerate(self.compute_counts()) if count > 1]

    # --- Checkmate matrices ------------------------------------------------------------

    def to_matrices(self) -> tuple[list[list[int]], list[list[int]]]:
        """(R, S), each num_nodes x num_nodes of 0/1.

        Needs a frontier-advancing schedule: first computations in index order, at most one
        computation of a node per stage, ascending order inside a stage.
        """
        n = self.num_nodes
        R = [[0] * n for _ in range(n)]
        S = [[0] * n for _ in range(n)]
        live: set[int] = set()
        stage = 0
        last_in_stage = -1
        for op in self.ops:
            if op.kind == FREE:
                live.discard(op.node)
                continue
            i = op.node
            if stage >= n:
                raise ValueError(f"compute({i}) after the last stage")
            if i > stage:
                raise ValueError(f"node {i} first computed before node {stage}: not frontier-advancing")
            if R[stage][i] or i <= last_in_stage:
                raise ValueError(f"stage {stage} computes node {i} out of ascending order")
            R[stage][i] = 1
            last_in_stage = i
            live.add(i)
            if i == stage:  # the frontier advanced: the next stage starts with what is live now
                stage += 1
                last_in_stage = -1
                if stage < n:
                    for j in live:
                        S[stage][j] = 1
        if stage != n:
            raise ValueError(f"schedule never computes node {stage}")
        return R, S

    @classmethod
    def from_matrices(cls, graph: Graph, R: list[list[int]], S: list[list[int]]) -> Schedule:
        """Instruction list that runs R/S, freeing every value as early as R/S allow.

        In stage t a value is freed right after its last use in the stage unless S[t+1] keeps it;
        a stored value the stage neither uses nor keeps is freed when the stage starts.
        """
        n = len(graph)
        users = graph.users
        ops: list[Op] = []
        live: set[int] = set()
        for t in range(n):
            keep_next = {i for i in range(n) if t + 1 < n and S[t + 1][i]}
            # a value already in memory is not computed again (that would only cost time)
            computed = [i for i in range(t + 1) if (R[t][i] and i not in live) or i == t]
            used = {d for k in computed for d in graph.nodes[k].deps}
            for i in sorted(live - keep_next - used - set(computed)):
                ops.append(Op(FREE, i))
                live.discard(i)
            for position, k in enumerate(computed):
                ops.append(Op(COMPUTE, k))
                live.add(k)
                later = set(computed[position + 1:])
                for i in sorted(set(graph.nodes[k].deps) | {k}):
                    if i in live and i not in keep_next and not later.intersection(users[i]):
                        ops.append(Op(FREE, i))
                        live.discard(i)
        return cls(tuple(ops), n)


def minimal_storage(graph: Graph, R: list[list[int]]) -> list[list[int]]:
    """The smallest S that Checkmate's dependency and storage constraints allow for R: store a value
    only where the stage, or a later stage it is carried into, reads it before computing it.
    (to_matrices keeps every live value, including those the stage frees later: this drops them.)"""
    n = len(graph)
    S = [[0] * n for _ in range(n)]
    for t in reversed(range(1, n)):
        for j in range(t + 1):
            if R[t][j] or j == t:
                for i in graph.nodes[j].deps:
                    if not R[t][i]:
                        S[t][i] = 1
        if t + 1 < n:
            for i in range(t):
                if S[t + 1][i] and not R[t][i]:
                    S[t][i] = 1
    return S


def compute_seconds(graph: Graph, schedule: Schedule) -> float:
    """Seconds of every compute instruction, summed in instruction order as remat.simulate does."""
    return sum(graph.nodes[op.node].compute_s for op in schedule.ops if op.kind == COMPUTE)


def tighten_frees(graph: Graph, schedule: Schedule) -> Schedule:
    """The same computations in the same order, each value freed right after its last read.

    Never later than `schedule` frees it, so no instruction holds more memory; the executor's
    graphs free values exactly there, so the simulated peak of the result is the peak a run
    holds. (A coarsened plan, expanded, frees whole groups late; solvers may keep spare values.)
    """
    release_after: dict[int, list[int]] = {}  # position -> nodes whose last read it is
    last_read: dict[int, int] = {}  # node -> its last read in the lifetime being swept (backwards)
    for position in range(len(schedule.ops) - 1, -1, -1):
        op = schedule.ops[position]
        if op.kind == FREE:
            last_read.pop(op.node, None)  # reads after this free belong to a later lifetime
            continue
        for dep in set(graph.nodes[op.node].deps):
            last_read.setdefault(dep, position)
        release_after.setdefault(last_read.pop(op.node, position), []).append(op.node)
    ops: list[Op] = []
    for position, op in enumerate(schedule.ops):
        if op.kind == COMPUTE:
            ops.append(op)
            ops.extend(Op(FREE, node) for node in release_after.get(position, ()))
    return Schedule(tuple(ops), schedule.num_nodes)
