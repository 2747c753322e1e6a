"""Graph IR: the training step as compute nodes with sizes, costs and dependencies.

Pure data. Every other stage reads it; nothing here knows about torch or solvers.
Nodes are stored in a topological order (the order of the captured joint graph), so a
dependency always has a smaller index than its user. That order is also the frontier order
of Checkmate's formulation.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from numbers import Integral, Real
from pathlib import Path

from remat.units import format_bytes

SCHEMA_VERSION = 1
PerNode = tuple[tuple[int, ...], ...]  # a tuple of ints for each node


def _is_count(value: object) -> bool:
    """A whole number, 0 or more (bytes, a node's index). (An int is told first: the ABC's isinstance made checking a
    10,000-node graph 25 times slower than building it.)"""
    if type(value) is int:
        return value >= 0
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class NodeColumns:
    output_bytes: tuple[int, ...]
    workspace_bytes: tuple[int, ...]
    seconds: tuple[float, ...]
    deps: PerNode


# The op of the node that holds gradients to the step's end where they are counted as the backward makes them
# (remat.lower's gradients="set-to-none" or "accumulate"): it reads every gradient, as the backward's return does,
# and runs nothing.
RETURN_OP = "return"


@dataclass(frozen=True)
class Node:
    """One operation that allocates storage (views and tuple unpacking are folded into it)."""

    name: str  # name of the FX node that allocates the storage
    op: str  # aten overload, e.g. "aten.mm.default"
    deps: tuple[int, ...]  # indices of the nodes whose values this op reads
    output_bytes: int  # bytes of storage this op allocates (all of its outputs together)
    compute_s: float  # seconds for one execution
    is_backward: bool = False
    workspace_bytes: int = 0  # transient bytes held only while the op runs
    flops: float = 0.0
    bytes_moved: int = 0  # bytes read + written, for the roofline
    module: str = ""  # module path that issued the op ("transformer.h.3.attn"), "" if unknown
    shape: str = ""  # human-readable output, e.g. "bf16[16, 1024, 768]"
    fx_nodes: tuple[str, ...] = ()  # FX nodes folded into this one (views, getitem), for execute
    # An op with several outputs (layer norm's output, mean and rstd) holds each in its own storage,
    # freed after its own last read. part_bytes[k]: output k's bytes (they sum to output_bytes);
    # part_users[k]: the nodes that read output k. Empty for ops with one output.
    part_bytes: tuple[int, ...] = ()
    part_users: tuple[tuple[int, ...], ...] = ()

    @property
    def is_return(self) -> bool:
        """The backward's return of the gradients (RETURN_OP): no op to run."""
        return self.op == RETURN_OP


@dataclass(frozen=True)
class FixedMemory:
    """Memory that stays allocated for the whole step, whatever the schedule."""

    parameter_bytes: int = 0
    gradient_bytes: int = 0
    optimizer_bytes: int = 0
    # batch inputs, buffers, the traced module's tensor constants, the loss tangent, gradients of inputs, and tensors
    # handed out beside the loss
    input_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.input_bytes

    @property
    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state: fixed memory that no batch size changes."""
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    def describe(self, inputs: bool = True, gradients: str | None = None) -> str:
        """'1.99 GB (parameters 497.76 MB, gradients 497.76 MB, optimizer state 995.52 MB, inputs 131.08 KB)';
        without `inputs`, the state alone (state_bytes and its three parts). `gradients` words the gradients' part
        (Graph.describe_fixed: a step that makes its gradients holds none of them as fixed memory)."""
        total = self.total_bytes if inputs else self.state_bytes
        with_inputs = f", inputs {format_bytes(self.input_bytes)}" if inputs else ""
        return (f"{format_bytes(total)} (parameters {format_bytes(self.parameter_bytes)}, gradients "
                f"{gradients or format_bytes(self.gradient_bytes)}, optimizer state "
                f"{format_bytes(self.optimizer_bytes)}{with_inputs})")


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    outputs: tuple[int, ...]  # nodes the step must produce: the loss and every gradient
    fixed: FixedMemory = field(default_factory=FixedMemory)
    meta: dict = field(default_factory=dict, compare=False)  # model, batch, seq, device, ...

    def __post_init__(self) -> None:
        # A negative size or a NaN cost was planned and called optimal (peak -2, compute_s nan), and a part read by a
        # node that does not exist failed deep inside a solver: said here, with the node.
        for index, node in enumerate(self.nodes):
            for dep in node.deps:
                if not _is_count(dep) or not 0 <= dep < index:
                    raise ValueError(f"node {index} ({node.name}) depends on {dep!r}: not an earlier node (not "
                                     "topological)")
            for name in ("output_bytes", "workspace_bytes"):
                if not _is_count(getattr(node, name)):
                    raise ValueError(f"node {index} ({node.name}): {name} must be a whole number of bytes, 0 or more, "
                                     f"not {getattr(node, name)!r}")
            seconds = node.compute_s
            if not (type(seconds) is float or (isinstance(seconds, Real) and not isinstance(seconds, bool))) \
                    or not math.isfinite(seconds) or seconds < 0:
                raise ValueError(f"node {index} ({node.name}): compute_s must be finite seconds, 0 or more, not "
                                 f"{node.compute_s!r}")
            if node.part_bytes and (len(node.part_users) != len(node.part_bytes)
                                    or sum(node.part_bytes) != node.output_bytes
                                    or not all(_is_count(b) for b in node.part_bytes)):
                raise ValueError(f"node {index} ({node.name}): part_bytes must be bytes, 0 or more, that sum to "
                                 "output_bytes, with one list of users each")
            for users in node.part_users:
                for user in users:
                    if not _is_count(user) or not index < user < len(self.nodes) \
                            or index not in self.nodes[user].deps:
                        raise ValueError(f"node {index} ({node.name}): part_users names {user!r}, which does not "
                                         "read it")
        for out in self.outputs:
            if not _is_count(out) or not 0 <= out < len(self.nodes):
                raise ValueError(f"output {out!r} is not a node")
        for name, value in asdict(self.fixed).items():
            if not _is_count(value):
                raise ValueError(f"fixed memory's {name} must be a whole number of bytes, 0 or more, not {value!r}")

    def __len__(self) -> int:
        return len(self.nodes)

    @cached_property
    def users(self) -> tuple[tuple[int, ...], ...]:
        """users[i]: indices of the nodes that read node i, ascending."""
        users: list[list[int]] = [[] for _ in self.nodes]
        for index, node in enumerate(self.nodes):
            for dep in sorted(set(node.deps)):
                users[dep].append(index)
        return tuple(tuple(u) for u in users)

    @cached_property
    def last_users(self) -> tuple[int, ...]:
        """last_users[i]: the last node that reads node i (i itself when none does)."""
        return tuple(users[-1] if users else i for i, users in enumerate(self.users))

    @cached_property
    def part_reads(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """part_reads[i]: the (node, output) pairs node i reads among the outputs of multi-output ops."""
        return tuple(tuple((dep, k) for dep in sorted(set(node.deps))
                           for k, users in enumerate(self.nodes[dep].part_users) if index in users)
                     for index, node in enumerate(self.nodes))

    @cached_property
    def read_until(self) -> dict[tuple[int, int], int]:
        """(d, w) -> the last reader of the outputs of multi-output op d that w reads (a batch norm's output goes
        after the next op, its statistics stay for the backward); for other pairs, last_users[d]."""
        return {(d, w): max(max(users) for users in self.nodes[d].part_users if w in users)
                for d, node in enumerate(self.nodes) if node.part_users
                for w in self.users[d] if any(w in users for users in node.part_users)}

    @cached_property
    def columns(self) -> NodeColumns:
        """Each node's output bytes, workspace bytes, seconds and inputs, as columns (the simulator's and the
        searches' inner loops index them rather than read each node's fields)."""
        return NodeColumns(tuple(node.output_bytes for node in self.nodes),
                           tuple(node.workspace_bytes for node in self.nodes),
                           tuple(node.compute_s for node in self.nodes), tuple(node.deps for node in self.nodes))

    @cached_property
    def part_slots(self) -> tuple[PerNode, PerNode, tuple[tuple[int, int], ...]]:
        """The outputs of multi-output ops numbered 0, 1, ...: (each node's own slots, the slots each node reads,
        each slot's (node, output)). remat/simulate.py looks them up by list index, faster than by pair."""
        pairs = tuple((i, k) for i, node in enumerate(self.nodes) for k in range(len(node.part_bytes)))
        slot = {pair: number for number, pair in enumerate(pairs)}
        own = tuple(tuple(slot[i, k] for k in range(len(node.part_bytes))) for i, node in enumerate(self.nodes))
        reads = tuple(tuple(slot[pair] for pair in node_reads) for node_reads in self.part_reads)
        return own, reads, pairs

    @property
    def compute_s(self) -> float:
        """Seconds to run every node once (the store-all cost)."""
        return sum(node.compute_s for node in self.nodes)

    @property
    def forward_nodes(self) -> list[int]:
        return [i for i, node in enumerate(self.nodes) if not node.is_backward]

    def working_set_bytes(self, index: int) -> int:
        """Bytes that must be live while node `index` runs: the outputs it reads, its output, its workspace.
        (Of a multi-output input, only the outputs this node reads: the others may be released.)"""
        node = self.nodes[index]
        inputs = 0
        for d in set(node.deps):
            dep = self.nodes[d]
            inputs += (sum(size for size, users in zip(dep.part_bytes, dep.part_users, strict=True) if index in users)
                       if dep.part_bytes else dep.output_bytes)
        return inputs + node.output_bytes + node.workspace_bytes

    @property
    def gradients_made(self) -> bool:
        """Gradients are counted from when the backward makes them to its end (a node returns them: RETURN_OP), not
        as fixed memory alone (remat.lower's gradients="set-to-none" or "accumulate")."""
        return bool(self.nodes) and self.nodes[-1].is_return

    @property
    def gradients(self) -> str:
        """How the loop keeps gradients between steps, as the graph was lowered for (remat.lower's `gradients`)."""
        return self.meta.get("gradients", "held")

    @property
    def gradients_note(self) -> str:
        """How the plan counts gradients, for a summary line: "" for the default (held), else what the loop does."""
        return {"set-to-none": ", gradients set to None between steps",
                "accumulate": ", gradients accumulated between steps"}.get(self.gradients, "")

    @property
    def gradient_memory(self) -> str:
        """The fixed gradient memory in words: its bytes, or "as made" where each counts from when it is made."""
        return "as made" if self.gradients_made and not self.fixed.gradient_bytes else format_bytes(
            self.fixed.gradient_bytes)

    def describe_fixed(self, inputs: bool = True) -> str:
        """Fixed memory in words for an error (FixedMemory.describe), its gradients as this step counts them: a
        set-to-none step holds none ("gradients 0 B" said otherwise), an accumulating one those kept between steps."""
        if not self.gradients_made:
            return self.fixed.describe(inputs)
        made = "counted as the backward makes them"
        kept = (f"{format_bytes(self.fixed.gradient_bytes)} kept between steps, the new ones {made}"
                if self.fixed.gradient_bytes else made)
        return self.fixed.describe(inputs, gradients=kept)

    def min_budget_lower_bound(self) -> int:
        """No schedule fits below this: fixed memory plus the largest single-op working set."""
        largest = max((self.working_set_bytes(i) for i in range(len(self.nodes))), default=0)
        return self.fixed.total_bytes + largest

    # --- serialisation -------------------------------------------------------------------

    def structure(self) -> dict:
        """What identifies the graph a plan fits: ops, dependencies, shapes, sizes (not costs)."""
        return {
            "nodes": [[n.name, n.op, list(n.deps), n.output_bytes, n.workspace_bytes, n.shape, n.is_backward]
                      + ([list(n.part_bytes), [list(u) for u in n.part_users]] if n.part_bytes else [])
                      for n in self.nodes],
            "outputs": list(self.outputs),
            "fixed": asdict(self.fixed),
        }

    @cached_property
    def content_hash(self) -> str:
        blob = json.dumps(self.structure(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "content_hash": self.content_hash,
            "meta": self.meta,
            "fixed": asdict(self.fixed),
            "outputs": list(self.outputs),
            "nodes": [asdict(n) for n in self.nodes],
        }

    @classmethod
    def from_json(cls, data: dict) -> Graph:
        if not isinstance(data, dict) or not {"nodes", "outputs", "fixed"} <= data.keys():
            raise ValueError("not a remat graph: a JSON object with nodes, outputs and fixed (Graph.save writes one)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"graph schema version {version!r}, this remat reads version {SCHEMA_VERSION}")
        try:
            nodes = tuple(
                Node(**{**n, "deps": tuple(n["deps"]), "fx_nodes": tuple(n.get("fx_nodes", ())),
                        "part_bytes": tuple(n.get("part_bytes", ())),
                        "part_users": tuple(tuple(u) for u in n.get("part_users", ()))})
                for n in data["nodes"]
            )
            fixed = FixedMemory(**data["fixed"])
        except (KeyError, TypeError, AttributeError) as error:  # a field missing or unknown, a node not an object
            raise ValueError(f"not a remat graph: a node or its fixed memory does not read ({error})") from None
        graph = cls(nodes=nodes, outputs=tuple(data["outputs"]), fixed=fixed, meta=dict(data.get("meta", {})))
        if data.get("content_hash") not in (None, graph.content_hash):
            # (costs are left out of the hash on purpose: a graph costed again, or by hand, is the same graph)
            raise ValueError("graph content hash does not match its ops, dependencies, sizes or outputs: the file is "
                             "corrupted, or they were edited (costs may be edited: the hash leaves them out)")
        return graph

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # json's own message named no graph
            raise ValueError(f"not a remat graph: {path} is not JSON ({error}); Graph.save writes one") from None
        return cls.from_json(data)

