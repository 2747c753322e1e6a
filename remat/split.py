"""Split the output head and loss, the MLPs and the attention blocks into chunks, so no schedule must hold the
whole logits, the whole of an MLP's widened activations, or every example's attention at once.

Rematerialization cannot go below the working set of the largest single op. In a language model
that op is the loss head: `_log_softmax_backward_data` over (batch*seq, vocab) fp32 logits holds
three such tensors at once (9.9 GB for GPT-2 small at batch 16 x 1024). The head is independent
along its rows (batch*seq tokens, or batch examples for a classifier) up to the loss reduction,
so it can run as k chunks of rows whose partial losses are added, as fused / chunked
cross-entropy kernels do by hand.

The rewrite works on the forward of the captured joint graph, for any model (aten ops, not
module names):
  1. `forward_graph`: the forward part of the joint graph (the loss and buffer updates).
  2. `find_head`: the region that starts at a matmul (mm / addmm) and ends at a reduction to the
     scalar loss (nll_loss_forward, sum, mean), in which every op is row-wise (views that regroup
     the leading row dims, casts, pointwise ops, softmax / reductions / gather over trailing dims).
     Of the valid regions, the one holding the largest tensor.
     `find_mlps`: the regions from one or more matmuls (c_fc; gate and up) through row-wise ops to
     a matmul (c_proj; down) whose hidden tensors are wider than its output: the next largest
     working sets of a transformer once the head is split (GELU's backward in GPT-2).
     `find_attention`: the regions from the q/k/v projections to the output projection in which
     every op keeps each example of the batch to itself (SDPA without dropout, or eager attention's
     bmm and softmax; RoPE, grouped-query expands): split along the batch, as attention mixes the
     positions of an example but never two examples.
  3. `split_forward`: the same forward with those regions run once per chunk of rows; the chunk
     losses are added (a mean becomes the sum of chunk sums over the total weight), an MLP's chunk
     outputs are concatenated where its output was, and a weight's cast is repeated per chunk so
     its gradient is accumulated in the parameter's dtype.
  4. `capture_split`: the rewritten forward, run through the model's own parameters, is captured
     again by AOTAutograd, which derives an exact backward: chunk gradients of the weight are
     added by autograd, chunk gradients of the hidden states are concatenated.
Forward and backward are then split; the solver may free and recompute each chunk separately.

Results equal the unsplit step up to the order of the reduction: the loss is a sum of k partial
sums and a split matmul's weight gradient a sum of k partial matmuls (float64: about 1e-15 relative).
The head, the MLPs and the attention blocks have their own chunk counts
(`capture_split(..., chunks, mlp_chunks, attention_chunks)`). Dropout inside a region is refused (it draws
one mask for the whole tensor), so the RNG is used as in the unsplit step.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.fx
from torch import nn

from remat.capture import NO_GRAD_KEY, Call, CapturedStep, capture_step, ran_without_grad

aten = torch.ops.aten

_MATMULS = (aten.mm.default, aten.addmm.default)
_SAME_SHAPE = (aten._to_copy.default, aten.clone.default, aten.alias.default, aten.detach.default)
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_SOFTMAX = (aten._log_softmax.default, aten._softmax.default)  # (x, dim, half_to_float)
_TRAILING_REDUCTIONS = (aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.mean.dim,
                        aten.logsumexp.default)  # (x, dims, keepdim, ...)
_SINKS = (aten.sum.default, aten.mean.default, aten.nll_loss_forward.default)
_DROPPED = (aten._assert_tensor_metadata.default,)  # dtype asserts on region tensors: chunks keep the dtype
# ops that only prepare a parameter for a matmul (cast, transpose): repeated per chunk
_WEIGHT_PREP = (aten._to_copy.default, aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
                aten.alias.default)
NLL_SUM = 2  # nll_loss reduction enum: 0 none, 1 mean, 2 sum
CHUNK_KEY = "split_chunk"  # node.meta["custom"][CHUNK_KEY]: the chunk a node of a split region computes
REGION_KEY = "split_region"  # node.meta["custom"][REGION_KEY]: HEAD or MLP
HEAD, MLP, ATTENTION = "head", "mlp", "attention"
CHUNK_COUNTS = (1, 2, 4, 8, 16, 32, 64)


class Unsplittable(ValueError):
    """The op at hand is not row-wise: the region cannot be split."""


@dataclass(frozen=True)
class Region:
    """Ops that run independently on each of `rows` rows: the head (from a matmul to the loss: `sinks`), or an
    MLP (from its input matmuls to its output matmul: `exit`, whose rows the rest of the step reads)."""

    nodes: tuple[str, ...]  # FX node names, in graph order: a matmul first
    sinks: tuple[str, ...]  # the reductions to scalars (the loss, or several terms of it); () for an MLP
    rows: int  # independent rows: batch*seq tokens for a language model, batch for a classifier
    largest_bytes: int  # the largest tensor in the region
    module: str  # module path of the matmul ("lm.lm_head"), or the MLP's ("lm.transformer.h.0.mlp"), for reports
    exit: str = ""  # an MLP's output matmul: its chunks are concatenated

    @property
    def name(self) -> str:
        if self.exit:
            return self.module or "MLP"
        return f"{self.module or 'output head'}+loss"


@dataclass(frozen=True)
class Split:
    """What the plan split: recorded in the graph's meta and shown by `remat solve`."""

    chunks: int  # the head's chunks (1: not split)
    region: str  # "lm.lm_head+loss", "" when the head is not split
    rows: int
    along: str  # "batch*seq", "batch" or "rows"
    largest_bytes: int  # the largest tensor of the split regions before splitting
    reason: str = ""
    mlp_chunks: int = 1  # each MLP's chunks (1: not split)
    mlps: str = ""  # the MLPs split, "12 x lm.transformer.h.*.mlp"
    attention_chunks: int = 1  # each attention block's chunks of the batch (1: not split)
    attentions: str = ""  # "12 x lm.transformer.h.*.attn"

    def describe(self) -> str:
        rows = [f"{self.region} into {self.chunks} chunks"] if self.chunks > 1 else []
        if self.mlp_chunks > 1:
            rows.append(f"{self.mlps} into {self.mlp_chunks} chunks")
        parts = [" and ".join(rows) + f" along {self.along}"] if rows else []
        if self.attention_chunks > 1:
            parts.append(f"{self.attentions} into {self.attention_chunks} chunks along batch")
        return "; ".join(parts)

    def short(self) -> str:
        """"head in 4 chunks", "head in 32 chunks, MLPs in 2, attention in 2"."""
        parts = [f"head in {self.chunks} chunks"] if self.chunks > 1 else []
        if self.mlp_chunks > 1:
            parts.append(f"MLPs in {self.mlp_chunks}")
        if self.attention_chunks > 1:
            parts.append(f"attention in {self.attention_chunks}")
        return ", ".join(parts)

    def to_meta(self) -> dict:
        return {"chunks": self.chunks, "region": self.region, "rows": self.rows, "along": self.along,
                "largest_bytes": self.largest_bytes, "reason": self.reason, "mlp_chunks": self.mlp_chunks,
                "mlps": self.mlps, "attention_chunks": self.attention_chunks, "attentions": self.attentions}

    @classmethod
    def from_meta(cls, meta: dict) -> Split:
        """The inverse of `to_meta` (plans saved before MLP splits have no MLP keys)."""
        return cls(**{f.name: meta[f.name] for f in fields(cls) if f.name in meta})


# ----------------------------------------------------------------------------------------------------------
# 1. The forward of a joint graph


def forward_graph(step: CapturedStep) -> torch.fx.GraphModule:
    """The joint graph less its backward: placeholders without the tangent, outputs (loss, buffer updates...)."""
    gm = torch.fx.GraphModule(step.joint, _copy_graph(step.joint.graph))
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    output = graph.find_nodes(op="output")[0]
    outputs = list(zip(output.args[0], step.output_kinds, strict=True))
    keep = [v for kind_wanted in ("loss", "returned", "mutation") for v, kind in outputs if kind == kind_wanted]
    output.args = (tuple(keep),)
    for node in reversed(graph.nodes):  # dead code: the backward, and forward values only the backward read
        if node.op == "call_function" and not node.users:
            graph.erase_node(node)
    for placeholder, kind in zip(placeholders, step.input_kinds, strict=True):
        if kind == "tangent":
            if placeholder.users:
                raise ValueError(f"the forward reads the tangent {placeholder.name}")
            graph.erase_node(placeholder)
    gm.recompile()
    return gm


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    copy = torch.fx.Graph()
    output = copy.graph_copy(graph, {})
    copy.output(output)
    return copy


# ----------------------------------------------------------------------------------------------------------
# 2. Finding the head


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _row_prefix(value: Any, rows: int) -> int | None:
    """The number of leading dims whose product is `rows` (the row dims), or None."""
    if not isinstance(value, torch.Tensor):
        return None
    product = 1
    for index, size in enumerate(value.shape):
        product *= int(size)
        if product == rows:
            return index + 1
        if product > rows:
            return None
    return None


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    return 0


def find_head(forward: torch.fx.GraphModule) -> Region | None:
    """The row-wise region from a matmul to the loss that holds the largest tensor, or None."""
    graph = forward.graph
    output = graph.find_nodes(op="output")[0]
    loss = output.args[0][0] if output.args[0] else None
    if not isinstance(loss, torch.fx.Node):
        return None
    ancestors = _ancestors(loss)
    best: Region | None = None
    for matmul in graph.nodes:
        if matmul.target not in _MATMULS or matmul not in ancestors:
            continue
        region = _region_from(matmul, ancestors)
        if region is not None and (best is None or region.largest_bytes >= best.largest_bytes):  # ties: the shortest
            best = region
    return best


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    return _reachable(node, lambda n: n.all_input_nodes)


def _reachable(node: torch.fx.Node, next_nodes) -> set[torch.fx.Node]:
    """`node` and every node reached from it through `next_nodes` (its inputs, or its users)."""
    seen, stack = {node}, [node]
    while stack:
        for x in next_nodes(stack.pop()):
            if x not in seen:
                seen.add(x)
                stack.append(x)
    return seen


def _region_from(matmul: torch.fx.Node, loss_ancestors: set[torch.fx.Node]) -> Region | None:
    """The nodes between `matmul` and the loss, if they are all row-wise and end in one reduction."""
    rows = int(_val(matmul).shape[0])
    if rows < 2:
        return None
    members: set[torch.fx.Node] = set()
    stack = [matmul]
    while stack:  # descendants of the matmul that lead to the loss
        node = stack.pop()
        if node in members:
            continue
        members.add(node)
        stack.extend(u for u in node.users if u in loss_ancestors)
    sinks = [n for n in matmul.graph.nodes if n in members and n.target in _SINKS and _is_reduction(n)]
    if not sinks:
        return None
    # nothing past a sink belongs to the region; the sinks' getitems belong to them
    for sink in sinks:
        members -= _descendants(sink) - {sink}
    for sink in sinks:
        members |= {u for u in sink.users if u.target is operator.getitem}
    if not all(sink in members for sink in sinks):
        return None  # a sink reads another one's result
    ordered = [n for n in matmul.graph.nodes if n in members]
    downstream = _descendants(matmul)
    prefix: dict[torch.fx.Node, int] = {}
    try:
        for node in ordered:
            if any(x in downstream and x not in members for x in node.all_input_nodes):
                raise Unsplittable(f"{node.name} reads a value computed from the region's result")
            if _sink_part(node, sinks):
                continue
            for user in node.users:
                if user not in members and user.target not in _DROPPED:
                    raise Unsplittable(f"{user.name} outside the region reads {node.name}")
            prefix[node] = _check(node, prefix, rows, members)
        for sink in sinks:
            _check_sink(sink, prefix, rows)
    except Unsplittable:
        return None
    module = (matmul.meta.get("custom") or {}).get("module", "")
    return Region(tuple(n.name for n in ordered), tuple(n.name for n in sinks), rows,
                      max(_bytes(_val(n)) for n in ordered), module)


def _sink_part(node: torch.fx.Node, sinks: Sequence[torch.fx.Node]) -> bool:
    """A sink, or a getitem of one."""
    return node in sinks or (node.target is operator.getitem and node.args[0] in sinks)


def _descendants(node: torch.fx.Node) -> set[torch.fx.Node]:
    return _reachable(node, lambda n: n.users)


def _is_reduction(node: torch.fx.Node) -> bool:
    if node.target is aten.nll_loss_forward.default:
        return node.args[3] != 0
    return True  # sum.default and mean.default reduce everything


def _dims(dims: Any, ndim: int) -> list[int]:
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % ndim for d in dims]


def _check(node: torch.fx.Node, prefix: dict[torch.fx.Node, int], rows: int, members: set) -> int:
    """The row prefix of `node`'s output; raises Unsplittable when the op is not row-wise."""
    target, val = node.target, _val(node)
    out_prefix = _row_prefix(val, rows)
    if target is operator.getitem:
        out_prefix = _row_prefix(val, rows)
        if node.args[0] not in prefix or out_prefix is None:
            raise Unsplittable(node.name)
        return out_prefix
    if out_prefix is None and not (isinstance(val, tuple) and target is aten.nll_loss_forward.default):
        raise Unsplittable(f"{node.name}: output {tuple(getattr(val, 'shape', ()))} has no leading {rows} rows")
    inside = [x for x in node.all_input_nodes if x in members]
    if target in _MATMULS:
        a, b = (node.args[1], node.args[2]) if target is aten.addmm.default else node.args[:2]
        bias = node.args[0] if target is aten.addmm.default else None
        if b in members or (bias is not None and (bias in members or _val(bias).dim() > 1)):
            raise Unsplittable(f"{node.name}: the weight depends on the rows")
        if a in members and prefix[a] != 1:
            raise Unsplittable(node.name)
        if a not in members and _row_prefix(_val(a), rows) != 1:
            raise Unsplittable(node.name)
        return 1
    if target in _SAME_SHAPE or target in _VIEWS:
        source = node.args[0]
        in_prefix = prefix.get(source, _row_prefix(_val(source), rows))
        if in_prefix is None or tuple(_val(source).shape[in_prefix:]) != tuple(val.shape[out_prefix:]):
            raise Unsplittable(f"{node.name}: reshapes more than the row dims")
        return out_prefix
    if target in _SOFTMAX or target in _TRAILING_REDUCTIONS or target in (aten.squeeze.dim, aten.gather.default):
        source = node.args[0]
        in_prefix = prefix.get(source, _row_prefix(_val(source), rows))
        dims = _dims(node.args[1], _val(source).dim())
        if in_prefix is None or any(d < in_prefix for d in dims):
            raise Unsplittable(f"{node.name}: reduces over the rows")
        if target is aten.gather.default and _row_prefix(_val(node.args[2]), rows) != in_prefix:
            raise Unsplittable(f"{node.name}: index without the rows")
        keeps_rows = target in _SOFTMAX or target is aten.gather.default or in_prefix == out_prefix
        if not keeps_rows:
            raise Unsplittable(node.name)
        return out_prefix
    if target is aten.unsqueeze.default:
        if _dims(node.args[1], val.dim())[0] < out_prefix:
            raise Unsplittable(node.name)
        return out_prefix
    if target is aten.nll_loss_forward.default:  # reduction none: one loss per row
        x, target_rows = node.args[0], node.args[1]
        if prefix.get(x) != 1 or _row_prefix(_val(target_rows), rows) != 1 or node.args[2] in members:
            raise Unsplittable(node.name)
        return 1
    if torch.Tag.pointwise in getattr(target, "tags", ()):
        trailing = val.dim() - out_prefix
        for x in node.all_input_nodes:
            x_val = _val(x)
            if x in members and x_val.dim() - prefix[x] != trailing:
                raise Unsplittable(f"{node.name}: operands with different row layouts")
            if x not in members and not _is_row_operand(node, x, rows) and x_val.dim() > trailing:
                raise Unsplittable(f"{node.name}: {x.name} broadcasts across the rows")
        if not inside:
            raise Unsplittable(node.name)
        return out_prefix
    raise Unsplittable(f"{node.name}: {target} is not known to be row-wise")


def _check_sink(sink: torch.fx.Node, prefix: dict[torch.fx.Node, int], rows: int) -> None:
    source = sink.args[0]
    if source not in prefix:
        raise Unsplittable(sink.name)
    if sink.target is aten.nll_loss_forward.default:
        if prefix[source] != 1 or _row_prefix(_val(sink.args[1]), rows) != 1 or sink.args[2] in prefix:
            raise Unsplittable(sink.name)
    elif sink.kwargs.get("dtype") is not None:
        raise Unsplittable(sink.name)
    for user in sink.users:
        if sink.target is aten.nll_loss_forward.default and user.target is not operator.getitem:
            raise Unsplittable(f"{user.name} reads the loss tuple")


def find_mlps(forward: torch.fx.GraphModule) -> list[Region]:
    """The MLPs: row-wise regions from one or more input matmuls (c_fc; gate and up) through pointwise ops to an
    output matmul (c_proj; down) whose largest tensor is at least WIDENING times the output. Only those of the
    largest kind: the MLPs of a transformer's blocks, not a small adapter."""
    regions = [r for r in map(_mlp_ending_at, forward.graph.find_nodes(op="call_function", target=aten.mm.default))
               if r is not None]
    regions += [r for r in map(_mlp_ending_at, forward.graph.find_nodes(op="call_function", target=aten.addmm.default))
                if r is not None]
    if not regions:
        return []
    largest = max(r.largest_bytes for r in regions)
    order = {n.name: i for i, n in enumerate(forward.graph.nodes)}
    kept: list[Region] = []
    taken: set[str] = set()
    for region in sorted((r for r in regions if 2 * r.largest_bytes >= largest), key=lambda r: order[r.exit]):
        # a plain stack of widening layers chains them, one's output matmul the next one's input: each node is
        # split in one region only, so of two regions that share a matmul the first is kept
        if taken.isdisjoint(region.nodes):
            kept.append(region)
            taken.update(region.nodes)
    return kept


WIDENING = 2  # an MLP's hidden tensors are 4x (GPT-2) or 2.7x (Llama) its output
_MLP_WALK_LIMIT = 64  # nodes between an MLP's input and output matmuls (GELU's tanh form is about 10)


def _mlp_ending_at(exit: torch.fx.Node) -> Region | None:
    """The MLP whose output matmul is `exit`, or None: every op between its input matmuls and `exit` is
    pointwise, a view or a cast, row-wise, and widens the rows by WIDENING at least."""
    rows = int(_val(exit).shape[0])
    found = _between_matmuls(exit, _pointwise_or_view, _MLP_WALK_LIMIT) if rows >= 2 else None
    if found is None:
        return None
    ordered, entries = found
    members = set(ordered)
    prefix: dict[torch.fx.Node, int] = {}
    try:
        for node in ordered:
            prefix[node] = _check(node, prefix, rows, members)
    except Unsplittable:
        return None
    largest = max(_bytes(_val(n)) for n in ordered)
    if largest < WIDENING * _bytes(_val(exit)):
        return None
    return Region(tuple(n.name for n in ordered), (), rows, largest, _module_of([*entries, exit]), exit.name)


def _pointwise_or_view(node: torch.fx.Node) -> bool:
    return (node.target in _SAME_SHAPE or node.target in _VIEWS
            or torch.Tag.pointwise in getattr(node.target, "tags", ()))


def _between_matmuls(exit: torch.fx.Node, passes, limit: int) -> tuple[list[torch.fx.Node], set[torch.fx.Node]] | None:
    """The nodes from the matmuls that feed `exit`'s row operand (through ops that `passes`) to `exit`, in graph
    order, and those input matmuls. Walking back from the row operand, every path must end at a matmul or at a
    value not computed from one (a bias, a constant, a mask). None when no matmul is reached, the walk passes
    `limit` nodes, or a value between them is read outside."""
    row_operand = exit.args[1] if exit.target is aten.addmm.default else exit.args[0]
    if not isinstance(row_operand, torch.fx.Node):
        return None
    walked: set[torch.fx.Node] = set()
    entries: set[torch.fx.Node] = set()
    stack = [row_operand]
    while stack:
        node = stack.pop()
        if node in walked or node in entries:
            continue
        if node.op == "call_function" and node.target in _MATMULS:
            entries.add(node)
            continue
        walked.add(node)
        if len(walked) > limit:
            return None
        if node.op == "call_function" and passes(node):
            stack.extend(node.all_input_nodes)
    # members: the input matmuls, what is computed from them on the way, and the output matmul
    members = set(entries)
    for node in exit.graph.nodes:  # graph order: inputs before users
        if node in walked and any(x in members for x in node.all_input_nodes):
            members.add(node)
    if not entries or row_operand not in members:
        return None
    members.add(exit)
    ordered = [n for n in exit.graph.nodes if n in members]
    if any(u not in members and u.target not in _DROPPED for n in ordered if n is not exit for u in n.users):
        return None  # a value between the matmuls is read by the rest of the step
    return ordered, entries


def _module_of(nodes: Sequence[torch.fx.Node]) -> str:
    """The module path the nodes share ("lm.transformer.h.0.mlp"), "" when one has none."""
    paths = [(n.meta.get("custom") or {}).get("module", "") for n in nodes]
    return ".".join(os.path.commonprefix([p.split(".") for p in paths])) if all(paths) else ""


# ----------------------------------------------------------------------------------------------------------
# 3. The rewrite


def chunk_sizes(rows: int, chunks: int) -> list[int]:
    """`chunks` contiguous row counts, as equal as possible (the first ones one row longer)."""
    base, extra = divmod(rows, chunks)
    return [base + (1 if c < extra else 0) for c in range(chunks)]


def split_forward(forward: torch.fx.GraphModule, head: Region | None, chunks: int = 1, mlps: Sequence[Region] = (),
                  mlp_chunks: int = 1, attentions: Sequence[Region] = (),
                  attention_chunks: int = 1) -> torch.fx.GraphModule:
    """`forward` with the `head` run once per chunk of rows, its chunk losses reduced exactly, and each MLP of
    `mlps` (attention block of `attentions`) run once per chunk of rows (of examples) where its output matmul
    was: the rest of the step reads the chunks' outputs concatenated. Autograd adds the chunks' weight
    gradients. Regions are found on `forward` beforehand."""
    regions = [(head, chunks)] * (head is not None) + [(m, mlp_chunks) for m in mlps]
    for region, k in regions + [(a, attention_chunks) for a in attentions]:
        if not 2 <= k <= region.rows:
            raise ValueError(f"chunks must be in 2..{region.rows}, got {k}")
    source = forward.graph
    by_name = {n.name: n for n in source.nodes}
    members = [by_name[name] for name in head.nodes] if head is not None else []
    sinks = [by_name[name] for name in head.sinks] if head is not None else []
    mlp_at_exit = {by_name[m.exit]: [by_name[name] for name in m.nodes] for m in mlps}
    attention_at_exit = {by_name[a.exit]: ([by_name[name] for name in a.nodes], a.rows) for a in attentions}
    member_set = set(members).union(*mlp_at_exit.values(), *(nodes for nodes, _ in attention_at_exit.values()))
    after = set().union(*(_descendants(n) for n in sinks)) - member_set  # what reads the losses
    dropped = {n for n in source.nodes if n.target in _DROPPED and any(x in member_set for x in n.all_input_nodes)}

    # Everything the head does not feed (the MLPs' chunks where their outputs were), then the head's chunks,
    # then what reads the chunked losses.
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in source.nodes:
        if node in mlp_at_exit:
            _emit_mlp(graph, env, node, mlp_at_exit[node], mlp_chunks)
        elif node in attention_at_exit:
            nodes, batch = attention_at_exit[node]
            _emit_batched(graph, env, node, nodes, attention_chunks, batch)
        elif node not in member_set and node not in after and node not in dropped:
            env[node] = graph.node_copy(node, lambda x: env[x])
    if head is not None:
        prefix = {n: _row_prefix(_val(n), head.rows) for n in members}
        _emit_chunks(graph, env, members, sinks, prefix, chunk_sizes(head.rows, chunks), head.rows)
    for node in source.nodes:
        if node in after and node not in dropped:
            env[node] = graph.node_copy(node, lambda x: env[x])
    graph.lint()
    return torch.fx.GraphModule(forward, graph)


def _emit_mlp(graph: torch.fx.Graph, env: dict, exit: torch.fx.Node, members: list[torch.fx.Node],
              chunks: int) -> None:
    """An MLP's chunks, and their outputs concatenated as the value of its output matmul."""
    rows = int(_val(exit).shape[0])
    prefix = {n: _row_prefix(_val(n), rows) for n in members}
    per_chunk = _emit_chunks(graph, env, members, [], prefix, chunk_sizes(rows, chunks), rows, MLP)
    env[exit] = graph.call_function(aten.cat.default, ([local[exit] for local in per_chunk], 0))
    env[exit].meta["custom"] = dict(exit.meta.get("custom", {}))


def _node_maker(graph: torch.fx.Graph, kind: str):
    """new(target, args, kwargs, like, chunk=None): a node of `graph` with `like`'s metadata, marked as computing
    `chunk` of a region of `kind`."""

    def new(target, args, kwargs, like: torch.fx.Node, chunk: int | None = None, shared: bool = False) -> torch.fx.Node:
        node = graph.call_function(target, args, kwargs)
        for key in ("stack_trace", "nn_module_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        # the module path, and the chunk: AOTAutograd hands both to the nodes it traces from this one
        node.meta["custom"] = {**like.meta.get("custom", {}),
                               **({CHUNK_KEY: chunk, REGION_KEY: kind} if chunk is not None else {})}
        if shared:
            # cuts an outside value into chunks for every reader in the region: not under the grad mode of the one
            # reader it was made for (a reader that ran under no_grad detached the chunks from every other reader,
            # and nothing before the region got a gradient); a value made without grad has none to pass anyway
            node.meta["custom"].pop(NO_GRAD_KEY, None)
        return node

    return new


def _weight_maker(env: dict, new):
    """weight(x, like, chunk): a matmul operand outside the region. A cast parameter is cast again for each chunk,
    so that autograd adds the chunk gradients in the parameter's dtype (fp32), not in the cast's (bf16)."""

    def weight(x: torch.fx.Node, like: torch.fx.Node, chunk: int) -> torch.fx.Node:
        chain = []
        node = x
        while node.op == "call_function" and node.target in _WEIGHT_PREP:
            chain.append(node)
            node = node.args[0]
        if node.op != "placeholder" or not any(n.target is aten._to_copy.default for n in chain):
            return env[x]
        value = env[node]
        for prep in reversed(chain):
            value = new(prep.target, (value, *prep.args[1:]), dict(prep.kwargs), like, chunk)
        return value

    return weight


def _emit_chunks(graph: torch.fx.Graph, env: dict, members: list[torch.fx.Node], sinks: list[torch.fx.Node],
                 prefix: dict[torch.fx.Node, Any], sizes: list[int], rows: int, kind: str = HEAD) -> list[dict]:
    """Each chunk's copy of the region's ops, then the sinks' totals. Returns each chunk's values by source node."""
    member_set = set(members)
    body = [n for n in members if not _sink_part(n, sinks)]
    row_inputs: dict[torch.fx.Node, list[torch.fx.Node]] = {}

    new = _node_maker(graph, kind)
    weight = _weight_maker(env, new)

    def row_chunks(x: torch.fx.Node, like: torch.fx.Node) -> list[torch.fx.Node]:
        """An outside tensor with leading rows, as one (chunk rows, *trailing) view per chunk."""
        if x not in row_inputs:
            val = _val(x)
            flat = env[x]
            x_prefix = _row_prefix(val, rows)
            if x_prefix != 1:
                flat = new(aten.reshape.default, (flat, [rows, *val.shape[x_prefix:]]), {}, like, shared=True)
            # a copy, not split's views: each chunk its own storage, released after the chunk's last read
            # (views would keep the whole input alive); the backward is one cat of the chunk gradients
            parts = new(aten.split_with_sizes_copy.default, (flat, sizes), {}, like, shared=True)
            row_inputs[x] = [new(operator.getitem, (parts, c), {}, like, shared=True) for c in range(len(sizes))]
        return row_inputs[x]

    partials: list[list[Any]] = [[] for _ in sinks]  # per sink, per chunk
    locals_: list[dict] = []
    for c in range(len(sizes)):
        local: dict[torch.fx.Node, Any] = {}
        locals_.append(local)

        def arg(x: Any, user: torch.fx.Node, c: int = c, local: dict = local) -> Any:
            if not isinstance(x, torch.fx.Node):
                return x
            if x in member_set:
                return local[x]
            if _row_prefix(_val(x), rows) is not None and _is_row_operand(user, x, rows):
                return row_chunks(x, user)[c]
            if user.target in _MATMULS:
                return weight(x, user, c)
            return env[x]

        in_chunk = functools.partial(new, chunk=c)
        for node in body:
            local[node] = _emit_one(node, prefix, rows, lambda x, u=node: arg(x, u), in_chunk)
        for sink, sink_partials in zip(sinks, partials, strict=True):
            sink_partials.append(_emit_partial(sink, [arg(x, sink) for x in sink.args], in_chunk))
    for sink, sink_partials in zip(sinks, partials, strict=True):
        _emit_total(env, sink, sink_partials, new)
    return locals_


def _is_row_operand(user: torch.fx.Node, x: torch.fx.Node, rows: int) -> bool:
    """Whether `user` reads outside value `x` row by row (else x is shared by every row, like a weight)."""
    target = user.target
    if target in _MATMULS:
        return x is (user.args[1] if target is aten.addmm.default else user.args[0])
    if target is aten.nll_loss_forward.default:
        return x is user.args[1]
    if target is aten.gather.default:
        return x is user.args[2]
    if torch.Tag.pointwise in getattr(target, "tags", ()):  # same rows and trailing rank as the output
        out_val, x_val = _val(user), _val(x)
        x_prefix = _row_prefix(x_val, rows)
        return x_prefix is not None and x_val.dim() - x_prefix == out_val.dim() - _row_prefix(out_val, rows)
    return x is user.args[0]


def _emit_one(node: torch.fx.Node, prefix: dict, rows: int, arg, new) -> torch.fx.Node:
    """One chunk's copy of a region op. Chunk values are (chunk rows, *trailing dims)."""
    target = node.target
    args = [arg(x) for x in node.args] if node.target is not operator.getitem else [arg(node.args[0]), node.args[1]]
    kwargs = {k: arg(v) for k, v in node.kwargs.items()}
    if target in _VIEWS:
        return args[0]  # only the row dims are regrouped: the chunk is already (chunk rows, *trailing)
    in_prefix = prefix.get(node.args[0], _row_prefix(_val(node.args[0]), rows)) if node.args else None

    def shift(dim: int, ndim: int) -> int:  # a trailing dim of the full tensor -> the same dim of a chunk
        return dim % ndim - in_prefix + 1

    if target in _SOFTMAX or target in (aten.squeeze.dim, aten.gather.default):
        args[1] = shift(args[1], _val(node.args[0]).dim())
    elif target in _TRAILING_REDUCTIONS:
        args[1] = [shift(d, _val(node.args[0]).dim()) for d in _dims(args[1], _val(node.args[0]).dim())]
    elif target is aten.unsqueeze.default:
        out_prefix = prefix[node]
        args[1] = args[1] % _val(node).dim() - out_prefix + 1
    return new(target, tuple(args), kwargs, node)


def _emit_partial(sink: torch.fx.Node, args: list, new) -> Any:
    """One chunk's share of the loss: a sum (and for nll_loss the chunk's total weight)."""
    if sink.target is aten.nll_loss_forward.default:
        x, target_rows, class_weight, _, ignore_index = args
        pair = new(aten.nll_loss_forward.default, (x, target_rows, class_weight, NLL_SUM, ignore_index), {}, sink)
        return (new(operator.getitem, (pair, 0), {}, sink), new(operator.getitem, (pair, 1), {}, sink))
    return new(aten.sum.default, (args[0],), {}, sink)


def _emit_total(env: dict, sink: torch.fx.Node, partials: list, new) -> None:
    """The loss from the chunk partials, mapped to the sink's users."""

    def add(values: list) -> torch.fx.Node:
        total = values[0]
        for value in values[1:]:
            total = new(aten.add.Tensor, (total, value), {}, sink)
        return total

    if sink.target is aten.nll_loss_forward.default:
        loss_sum = add([p[0] for p in partials])
        total_weight = add([p[1] for p in partials])
        loss = new(aten.div.Tensor, (loss_sum, total_weight), {}, sink) if sink.args[3] == 1 else loss_sum
        for user in sink.users:  # getitem 0: the loss, getitem 1: the total weight
            env[user] = loss if user.args[1] == 0 else total_weight
        return
    total = add(partials)
    if sink.target is aten.mean.default:
        total = new(aten.div.Tensor, (total, float(math.prod(_val(sink.args[0]).shape))), {}, sink)
    env[sink] = total


# ----------------------------------------------------------------------------------------------------------
# Attention: split along the batch


def _sdpa_ops() -> tuple:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention")
    return tuple(getattr(aten, name).default for name in names if hasattr(aten, name))


_SDPA = _sdpa_ops()
_RESHAPES = (*_VIEWS, aten.expand.default)  # (x, shape): dim 0 of the shape scales with the batch
_ATTENTION_WALK_LIMIT = 128  # ops from the q/k/v projections to the output projection (Llama's RoPE: about 40)
# ops that keep each example of the batch to itself, when they leave dim 0 alone (checked in _check_batched)
_BATCHED = (*_RESHAPES, *_SAME_SHAPE, *_SDPA, *_SOFTMAX, aten.transpose.int, aten.permute.default,
            aten.unsqueeze.default, aten.slice.Tensor, aten.cat.default, aten.split.Tensor,
            aten.split_with_sizes.default, aten.bmm.default, operator.getitem)


def _arg(node: torch.fx.Node, name: str, default: Any = None) -> Any:
    """An op's argument by its schema name."""
    for index, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)
    return default


def find_attention(forward: torch.fx.GraphModule, batch: int) -> list[Region]:
    """The attention blocks: regions from the q/k/v projection matmuls to the output projection in which every op
    keeps each example of the batch to itself (views and transposes that leave dim 0 alone, RoPE's slices and
    products, SDPA without dropout, or eager attention's bmm and softmax). Split along the batch: `rows` is
    the batch. Regions without an op that mixes positions (SDPA, bmm) are MLPs, left to `find_mlps`."""
    exits = [n for n in forward.graph.nodes if n.op == "call_function" and n.target in _MATMULS]
    regions = [r for r in (_attention_ending_at(e, batch) for e in exits) if r is not None]
    return regions


def _attention_ending_at(exit: torch.fx.Node, batch: int) -> Region | None:
    if batch < 2 or int(_val(exit).shape[0]) % batch:
        return None
    found = _between_matmuls(exit, _keeps_examples_apart, _ATTENTION_WALK_LIMIT)
    if found is None:
        return None
    ordered, entries = found
    if not any(n.target in _SDPA or n.target is aten.bmm.default for n in ordered):
        return None  # nothing mixes positions: an MLP
    members = set(ordered)
    try:
        for node in ordered:
            _check_batched(node, batch, members)
    except Unsplittable:
        return None
    largest = max(_bytes(_val(n)) for n in ordered)
    return Region(tuple(n.name for n in ordered), (), batch, largest, _module_of([*entries, exit]), exit.name)


def _keeps_examples_apart(node: torch.fx.Node) -> bool:
    return node.target in _BATCHED or torch.Tag.pointwise in getattr(node.target, "tags", ())


def _per_example(value: Any, batch: int) -> bool:
    """A tensor whose dim 0 runs over the batch (batch x m rows, each example's rows together)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and int(value.shape[0]) % batch == 0


def _broadcast_over_batch(x: torch.fx.Node, like: torch.fx.Node) -> bool:
    """An operand that one value serves every example of `like` (an op's output, or attention's q) with: it has fewer
    dims (broadcasting aligns them from the right) or a dim 0 of 1."""
    value, reference = _val(x), _val(like)
    if isinstance(reference, torch.Tensor) and value.dim() < reference.dim():
        return True  # (a 0-d scale too, which has no dim 0)
    return value.dim() > 0 and int(value.shape[0]) == 1


def _batch_major(node: torch.fx.Node, batch: int) -> bool:
    """An outside value whose dim 0 is the batch, or a view (or cast) of one that folds later dims into dim 0
    (GPT-2's (batch*seq, hidden) input of c_attn), so that a chunk of examples is a contiguous block of its rows."""
    while True:
        value = _val(node)
        if not _per_example(value, batch):
            return False
        if int(value.shape[0]) == batch:
            return True
        if node.op != "call_function" or (node.target not in _VIEWS and node.target not in _SAME_SHAPE):
            return False
        node = node.args[0]


def _check_batched(node: torch.fx.Node, batch: int, members: set) -> None:
    """Raises Unsplittable unless `node` computes each example of the batch from that example alone."""
    target, value = node.target, _val(node)
    if target is operator.getitem:
        if node.args[0] not in members or not _per_example(value, batch):
            raise Unsplittable(node.name)
        return
    per_example_out = _per_example(value, batch) or (isinstance(value, (tuple, list)) and target in (
        *_SDPA, aten.split.Tensor, aten.split_with_sizes.default))
    if not per_example_out:
        raise Unsplittable(f"{node.name}: output without the batch in dim 0")

    def batched_operand(x: Any) -> bool:
        return isinstance(x, torch.fx.Node) and (x in members or _batch_major(x, batch))

    if target in _MATMULS:
        a, b = (node.args[1], node.args[2]) if target is aten.addmm.default else node.args[:2]
        bias = node.args[0] if target is aten.addmm.default else None
        if not batched_operand(a) or b in members or (bias is not None and (bias in members or _val(bias).dim() > 1)):
            raise Unsplittable(node.name)
        return
    if target is aten.bmm.default:
        if not all(batched_operand(x) for x in node.args[:2]):
            raise Unsplittable(node.name)
        return
    if target in _SDPA:
        if _arg(node, "dropout_p", 0.0) != 0.0:
            raise Unsplittable(f"{node.name}: attention dropout draws its mask for the whole batch")
        mask = _arg(node, "attn_mask") or _arg(node, "attn_bias")
        if not all(batched_operand(x) for x in node.args[:3]):
            raise Unsplittable(node.name)
        if mask is not None and not _broadcast_over_batch(mask, node.args[0]) and not batched_operand(mask):
            raise Unsplittable(f"{node.name}: a mask that is not per example")
        return
    source = node.args[0]
    if target is aten.cat.default:
        if _dims(node.args[1] if len(node.args) > 1 else 0, value.dim())[0] == 0:
            raise Unsplittable(f"{node.name}: concatenates along the batch")
        if not all(batched_operand(x) for x in source):
            raise Unsplittable(node.name)
        return
    if not batched_operand(source) and not (target is aten.expand.default and int(_val(source).shape[0]) == 1):
        raise Unsplittable(f"{node.name}: reads {getattr(source, 'name', source)} without the batch")
    source_value = _val(source)
    if target in _VIEWS:
        pass  # dim 0 a multiple of the batch before and after: in row-major order each example stays one block
    elif target is aten.expand.default:
        if int(source_value.shape[0]) not in (1, int(value.shape[0])):
            raise Unsplittable(node.name)
    elif target is aten.transpose.int:
        if 0 in _dims(node.args[1:3], value.dim()):
            raise Unsplittable(f"{node.name}: moves the batch")
    elif target is aten.permute.default:
        if _dims(node.args[1], value.dim())[0] != 0:
            raise Unsplittable(f"{node.name}: moves the batch")
    elif target is aten.unsqueeze.default:
        if _dims(node.args[1], value.dim())[0] == 0:
            raise Unsplittable(node.name)
    elif target in (aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default) or target in _SOFTMAX:
        if target in (aten.split.Tensor, aten.split_with_sizes.default):  # (x, sizes, dim=0)
            dim = node.args[2] if len(node.args) > 2 else 0
        else:  # slice (x, dim=0, start, end, step), softmax (x, dim, half_to_float)
            dim = node.args[1] if len(node.args) > 1 else 0
        if _dims(dim, source_value.dim())[0] == 0:
            raise Unsplittable(f"{node.name}: works along the batch")
    elif target in _SAME_SHAPE:
        pass
    elif torch.Tag.pointwise in getattr(target, "tags", ()):
        for x in node.all_input_nodes:
            if not _broadcast_over_batch(x, node) and not batched_operand(x):
                raise Unsplittable(f"{node.name}: {x.name} is neither per example nor shared")
    else:
        raise Unsplittable(f"{node.name}: {target} is not known to keep examples apart")


def _emit_batched(graph: torch.fx.Graph, env: dict, exit: torch.fx.Node, members: list[torch.fx.Node],
                  chunks: int, batch: int) -> None:
    """An attention block's chunks of examples, and their outputs concatenated as the value of its output matmul."""
    member_set = set(members)
    sizes = chunk_sizes(batch, chunks)
    new = _node_maker(graph, ATTENTION)
    weight = _weight_maker(env, new)
    parts: dict[torch.fx.Node, list[torch.fx.Node]] = {}

    def example_chunks(x: torch.fx.Node, like: torch.fx.Node) -> list[torch.fx.Node]:
        """An outside per-example tensor, as one copy per chunk of examples (as `row_chunks` does for rows)."""
        if x not in parts:
            rows_per_example = int(_val(x).shape[0]) // batch
            split = new(aten.split_with_sizes_copy.default, (env[x], [s * rows_per_example for s in sizes]), {}, like,
                        shared=True)
            parts[x] = [new(operator.getitem, (split, c), {}, like, shared=True) for c in range(chunks)]
        return parts[x]

    outputs = []
    for c, size in enumerate(sizes):
        local: dict[torch.fx.Node, Any] = {}

        def arg(x: Any, user: torch.fx.Node, c: int = c, local: dict = local) -> Any:
            if isinstance(x, (list, tuple)):
                return type(x)(arg(v, user) for v in x)
            if not isinstance(x, torch.fx.Node):
                return x
            if x in member_set:
                return local[x]
            if user.target in _MATMULS and x is not (user.args[1] if user.target is aten.addmm.default
                                                       else user.args[0]):
                return weight(x, user, c)
            # (attention's mask broadcasts against q: a (seq, seq) mask with seq == batch was cut into chunks)
            shared = not _per_example(_val(x), batch) or _broadcast_over_batch(
                x, user.args[0] if user.target in _SDPA else user)
            return env[x] if shared else example_chunks(x, user)[c]

        for node in members:
            args = [arg(x, node) for x in node.args] if node.target is not operator.getitem \
                else [arg(node.args[0], node), node.args[1]]
            if node.target in _RESHAPES:  # the shape's dim 0 covers this chunk's examples
                shape = list(args[1])
                if shape and shape[0] != -1:
                    shape[0] = int(shape[0]) // batch * size
                args[1] = shape
            kwargs = {k: arg(v, node) for k, v in node.kwargs.items()}
            local[node] = new(node.target, tuple(args), kwargs, node, c)
        outputs.append(local[exit])
    env[exit] = graph.call_function(aten.cat.default, (outputs, 0))
    env[exit].meta["custom"] = dict(exit.meta.get("custom", {}))


# ----------------------------------------------------------------------------------------------------------
# 4. Capturing the rewritten step


class _GradModeInterpreter(torch.fx.Interpreter):
    """Runs each op that ran with grad disabled in the model (capture.ran_without_grad) under no_grad again, so
    that the step captured from the graph sends it no gradient, as the model's own step does."""

    def run_node(self, node: torch.fx.Node) -> Any:
        if ran_without_grad(node):
            with torch.no_grad():
                return super().run_node(node)
        return super().run_node(node)


class GraphStep(nn.Module):
    """Runs a forward graph (from `forward_graph`) with a model's own parameters and buffers.

    The model's children, parameters and buffers are registered here under the same names, so the
    captured step names its placeholders as a capture of the model itself does (tied weights stay tied),
    and `remat.replay.joint_inputs(model, ...)` feeds it.
    """

    def __init__(self, model: nn.Module, forward: torch.fx.GraphModule, step: CapturedStep):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, parameter in model.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        self.__dict__["forward_graph"] = forward  # not a submodule: named_modules stays the model's
        self.input_kinds = [k for k in step.input_kinds if k != "tangent"]
        self.input_names = [n.removeprefix("model.") for n, k in zip(step.input_names, step.input_kinds, strict=True)
                            if k != "tangent"]
        self.mutated = [n.removeprefix("model.") for n, k in zip(step.output_names, step.output_kinds, strict=True)
                        if k == "mutation"]
        self.returned = step.output_kinds.count("returned")  # handed out after the loss (outputs="all")

    def forward(self, *inputs: Any) -> torch.Tensor:
        user = list(inputs)
        values = []
        for kind, name in zip(self.input_kinds, self.input_names, strict=True):
            if kind in ("param", "buffer"):  # attribute lookup: AOTAutograd swaps in functional tensors
                value = operator.attrgetter(name)(self)
                # a buffer updated below is read through a copy: autograd may have saved what the graph read
                values.append(value.clone() if name in self.mutated else value)
            else:
                values.append(user.pop(0))
        # the Interpreter hands each node's metadata (module path) to the nodes AOTAutograd records
        loss, *rest = _GradModeInterpreter(self.forward_graph).run(*values)
        returned, updates = rest[:self.returned], rest[self.returned:]
        for name, value in zip(self.mutated, updates, strict=True):
            with torch.no_grad():
                operator.attrgetter(name)(self).copy_(value)
        return (loss, *returned) if returned else loss


def chunk_of(step: CapturedStep, kind: str = HEAD) -> dict[str, int]:
    """FX node name -> chunk, for the nodes of a captured split step that compute one chunk of the head (or of
    an MLP: `kind`)."""
    found = {}
    for node in step.joint.graph.nodes:
        custom = node.meta.get("custom") or {}
        if CHUNK_KEY in custom and custom.get(REGION_KEY, HEAD) == kind:
            found[node.name] = custom[CHUNK_KEY]
    return found


def describe_rows(rows: int, example_inputs: Sequence[Any]) -> str:
    """"batch*seq" when the rows are the tokens of the first input, "batch" when they are its examples."""
    first = next((x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    if first is not None and first.dim() >= 2 and rows == first.shape[0] * first.shape[1]:
        return "batch*seq"
    if first is not None and rows == first.shape[0]:
        return "batch"
    return "rows"


def describe_regions(regions: Sequence[Region], kind: str) -> str:
    """"12 x lm.transformer.h.*.mlp": the count and the module path, with the block index as *."""
    paths = {".".join("*" if part.isdigit() else part for part in r.module.split(".")) for r in regions}
    return f"{len(regions)} x {paths.pop() if len(paths) == 1 and all(r.module for r in regions) else kind}"


def batch_size(example_inputs: Sequence[Any]) -> int:
    """The batch: dim 0 of the first tensor input (0 when there is none)."""
    return next((int(x.shape[0]) for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 0)


def capture_split(model: nn.Module, example_inputs: Call | Sequence[Any], step: CapturedStep, chunks: int,
                  mlp_chunks: int = 1, attention_chunks: int = 1) -> tuple[CapturedStep, Split]:
    """The training step of `model` (already captured as `step`) with its head split into `chunks`, each of its
    MLPs into `mlp_chunks` and each attention block into `attention_chunks` chunks of the batch (1: that part
    not split)."""
    if max(chunks, mlp_chunks, attention_chunks) < 2:
        raise ValueError("nothing to split: every chunk count is 1")
    example_inputs = Call.of(example_inputs).tensors  # the captured step's user inputs
    forward = forward_graph(step)
    head, mlps, attentions = None, [], []
    if mlp_chunks > 1:
        mlps = find_mlps(forward)
        if not mlps:
            raise Unsplittable("no MLP: no row-wise region between matmuls that widens the rows")
    if attention_chunks > 1:
        attentions = find_attention(forward, batch_size(example_inputs))
        if not attentions:
            raise Unsplittable("no attention block that keeps the examples of the batch apart")
    if chunks > 1:
        head = find_head(forward)
        if head is None:
            raise Unsplittable("no row-wise region from a matmul to the loss")
        # a head that starts at the last block's output matmul (no final norm) holds that block's exit: the block is
        # split as part of the head (split in two regions, it failed with a KeyError)
        mlps = [m for m in mlps if set(m.nodes).isdisjoint(head.nodes)]
        attentions = [a for a in attentions if set(a.nodes).isdisjoint(head.nodes)]
        if (mlp_chunks > 1 and not mlps) or (attention_chunks > 1 and not attentions):
            raise Unsplittable("the head holds the only block to split")
    rewritten = split_forward(forward, head, chunks, mlps, mlp_chunks, attentions, attention_chunks)
    by_rows = [*([head] if head is not None else []), *mlps]
    rows = by_rows[0].rows if by_rows else attentions[0].rows
    largest = max(r.largest_bytes for r in [*by_rows, *attentions])
    # the casts of mixed precision (remat's own, and those of an autocast the caller was in) are explicit ops in the
    # rewritten forward: no autocast on top
    outputs = "all" if "returned" in step.output_kinds else "loss"
    split_step = capture_step(GraphStep(model, rewritten, step), example_inputs, None, precision="fp32",
                              outputs=outputs, warn_of_hooks=False, in_callers_autocast=False)
    split = Split(chunks, head.name if head is not None else "", rows, describe_rows(rows, example_inputs), largest,
                  mlp_chunks=mlp_chunks, mlps=describe_regions(mlps, MLP) if mlps else "",
                  attention_chunks=attention_chunks,
                  attentions=describe_regions(attentions, ATTENTION) if attentions else "")
    return replace(split_step, precision=step.precision, returns=step.returns), split
