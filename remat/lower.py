"""Lower a captured joint FX graph to the Graph IR.

- Views, getitem and other aliasing ops are folded into the node that owns the storage they
  alias, so a node's bytes are counted once however many views read it.
- Placeholders (parameters, buffers, inputs, tangent) and the traced module's tensor constants are fixed memory,
  not nodes.
- Gradients are outputs whose memory is the fixed gradient memory: their nodes hold 0 bytes (with
  gradients="set-to-none" or "accumulate", their own bytes, held by a last node that returns them). So do the
  tensors a step hands out beside its loss (outputs="all"): the caller holds them to the step's end, so they
  are fixed memory from the forward on (counted with the inputs).
- Each node is costed with a device profile (remat.cost).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch.utils.flop_counter import flop_registry

from remat.capture import CapturedStep, aliasing_input, describe_value, tensor_bytes, view_bytes
from remat.cost import DeviceProfile
from remat.graph import RETURN_OP, FixedMemory, Graph, Node

GRADIENTS = ("held", "set-to-none", "accumulate")  # how the loop keeps gradients between steps (lower's docstring)
OPTIMIZERS = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0, "none": 0}  # state tensors per parameter

# torch's FlopCounter has formulas for the CUDA attention kernels; the CPU ones take the same leading arguments.
_FLOP_ALIASES = {
    "_scaled_dot_product_flash_attention_for_cpu": torch.ops.aten._scaled_dot_product_flash_attention,
    "_scaled_dot_product_flash_attention_for_cpu_backward":
        torch.ops.aten._scaled_dot_product_flash_attention_backward,
}
_DTYPE_CLASS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def lower(step: CapturedStep, profile: DeviceProfile, optimizer: str = "adamw", meta: dict | None = None,
          gradients: str = "held", frozen_trained_bytes: int = 0, frozen_gradient_bytes: int = 0) -> Graph:
    """`gradients`: how the training loop keeps them between steps.
    - "held": fixed memory for the whole step, once per weight (the classic model);
    - "set-to-none": none before the step (`optimizer.zero_grad()`, PyTorch's default, frees them): each gradient the
      backward makes counts from then to the backward's end, where the planned backward returns them together (a
      tied weight's per name);
    - "accumulate": the loop's gradients are there for the whole step (gradient accumulation,
      zero_grad(set_to_none=False)), fixed memory, and the backward's new ones count beside them as with
      "set-to-none", until it returns them to be added.
    `frozen_trained_bytes`: parameters this step does not train that an earlier one did; the optimizer keeps their
    state (torch's optimizers keep it for a parameter frozen after it trained), so the plan counts it too.
    `frozen_gradient_bytes`: gradients the loop keeps of parameters this step does not train (frozen after a step that
    trained them, then zero_grad(set_to_none=False) zeroes them in place): fixed memory, whatever `gradients` says."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if gradients not in GRADIENTS:
        raise ValueError(f"unknown gradients {gradients!r}: choose one of {', '.join(GRADIENTS)}")
    fx_graph = step.joint.graph
    placeholders = list(fx_graph.find_nodes(op="placeholder"))
    kind_of = {node: kind for node, kind in zip(placeholders, step.input_kinds, strict=True)}
    # Tensors the forward makes from constants (`torch.tensor([...])`, BART's decoder start token) are attributes of
    # the traced module, held for as long as it is: fixed memory, like the buffers, and their views too.
    constants = [n for n in fx_graph.find_nodes(op="get_attr") if isinstance(n.meta.get("val"), torch.Tensor)]

    # 1. Storage owners: every FX value maps to the call_function node (or placeholder, or constant) owning its storage.
    owner: dict[torch.fx.Node, torch.fx.Node] = {p: p for p in (*placeholders, *constants)}
    folded: dict[torch.fx.Node, list[str]] = {}
    compute_fx: list[torch.fx.Node] = []
    part_of: dict[torch.fx.Node, int] = {}  # getitem k of a multi-output op, and views of it -> k
    for fx_node in (n for n in fx_graph.nodes if n.op == "call_function"):  # in graph order
        base = aliasing_input(fx_node)
        if gradients != "held" and fx_node.target is torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors.default:
            # a sparse gradient (nn.Embedding(sparse=True)) holds its values (and indices): no storage of its own, it
            # keeps theirs to the backward's end (counted as a dense tensor, it planned 2.56 MB for 5 KB)
            base = fx_node.args[4]
        if base is not None and base in owner:
            owner[fx_node] = owner[base]
            folded.setdefault(owner[base], []).append(fx_node.name)
            if base in part_of:
                part_of[fx_node] = part_of[base]
            elif fx_node.target is operator.getitem and base is owner[base] and _parts(base) is not None:
                part_of[fx_node] = fx_node.args[1]
            continue
        if not _has_tensor(fx_node.meta.get("val")):
            continue  # asserts, symbolic sizes: no storage, nothing to schedule
        owner[fx_node] = fx_node
        compute_fx.append(fx_node)

    # 2. Outputs: the loss, buffer updates, gradients and handed-out tensors (whose storage is fixed memory).
    output_fx = fx_graph.find_nodes(op="output")[0].args[0]
    grad_owners: set[torch.fx.Node] = set()  # the whole output is a gradient (or handed out)
    grad_parts: dict[torch.fx.Node, set[int]] = {}  # outputs k of a multi-output op that are gradients (or handed out)
    returned: set[tuple[torch.fx.Node, int | None]] = set()  # handed-out storages: (owner, output k or None)
    output_owners: list[torch.fx.Node] = []
    gradient_values: list[torch.fx.Node] = []
    made = gradients != "held"  # gradients are counted from when the backward makes them (a node returns them)
    for value, kind in zip(output_fx, step.output_kinds, strict=True):
        if kind == "none" or not isinstance(value, torch.fx.Node) or owner.get(value) not in compute_fx:
            continue
        output_owners.append(owner[value])
        # The model's one non-scalar output (logits, features) for the caller's loss is handed out too: the caller
        # holds it from the forward to its loss. As an activation nothing in the graph reads, the plan freed it right
        # after computing it, while the forward graph holds it to its end, beside any recomputation after it.
        handed_out = kind == "returned" or (kind == "loss" and is_handed_out_output(value))
        if (kind == "grad" and not made) or handed_out:
            if value in part_of:  # e.g. convolution_backward's weight gradient; its input gradient is an activation
                grad_parts.setdefault(owner[value], set()).add(part_of[value])
            else:
                grad_owners.add(owner[value])
        if handed_out:
            returned.add((owner[value], part_of.get(value)))
        if kind == "grad":
            gradient_values.append(value)

    # 3. Nodes, in the joint graph's order (topological).
    index_of = {fx_node: i for i, fx_node in enumerate(compute_fx)}
    # Readers of each output of a multi-output op; a read of the op's tuple itself reads every output.
    part_readers: dict[torch.fx.Node, list[set[int]]] = {
        fx_node: [set() for _ in _parts(fx_node)] for fx_node in compute_fx if _parts(fx_node) is not None}
    for reader in compute_fx:
        for x in reader.all_input_nodes:
            multi = owner.get(x)
            if multi in part_readers and multi is not reader:
                for k in ([part_of[x]] if x in part_of else range(len(part_readers[multi]))):
                    part_readers[multi][k].add(index_of[reader])
    # set-to-none, accumulate: gradients are values the backward makes and returns together at its end: a node after
    # every other, reading each, holds them from when they are made to there
    sink = len(compute_fx)
    if made:
        for value in gradient_values:
            if value in part_of:
                part_readers[owner[value]][part_of[value]].add(sink)
    tangents = {p for p in placeholders if kind_of[p] == "tangent"}
    backward: dict[torch.fx.Node, bool] = {}
    nodes = []
    for fx_node in compute_fx:
        inputs = fx_node.all_input_nodes  # each input once
        deps = sorted({index_of[owner[x]] for x in inputs if owner.get(x) in index_of} - {index_of[fx_node]})
        tag = fx_node.meta.get("partitioner_tag")
        backward[fx_node] = tag == "is_backward" if tag else any(
            owner.get(x) in tangents or backward.get(owner.get(x), False) for x in inputs)
        val = fx_node.meta["val"]
        flops, dtype = _flops(fx_node)
        bytes_moved = view_bytes(val) + sum(view_bytes(x.meta.get("val")) for x in inputs)
        nodes.append(Node(
            name=fx_node.name,
            op=str(fx_node.target),
            deps=tuple(deps),
            output_bytes=0 if fx_node in grad_owners else _output_bytes(fx_node) - _grad_bytes(fx_node, grad_parts),
            compute_s=profile.node_seconds(cost_key(fx_node), flops, bytes_moved, dtype),
            is_backward=backward[fx_node],
            flops=flops,
            bytes_moved=bytes_moved,
            module=(fx_node.meta.get("custom") or {}).get("module", ""),
            shape=describe_value(val),
            fx_nodes=(fx_node.name, *folded.get(fx_node, ())),
            **_part_fields(fx_node, part_readers, grad_parts.get(fx_node, set()), fx_node in grad_owners),
        ))

    if made and gradient_values:
        returned_owners = {owner[value] for value in gradient_values}
        nodes.append(Node(name="return_gradients", op=RETURN_OP,
                          deps=tuple(sorted(index_of[o] for o in returned_owners)), output_bytes=0, compute_s=0.0,
                          is_backward=True))
        output_owners = [o for o in output_owners if o not in returned_owners]
        extra_outputs = (sink,)
    else:
        extra_outputs = ()

    # 4. Fixed memory. Tied parameters share one storage and one gradient; a buffer held by two modules is one too.
    def unique_bytes(names_and_nodes) -> int:
        seen = {}
        for name, p in names_and_nodes:
            seen[step.tied_to.get(name, name)] = tensor_bytes(p.meta["val"])
        return sum(seen.values())

    params = [(name, p) for p, name in zip(placeholders, step.input_names, strict=True) if kind_of[p] == "param"]
    trained = {name for name, kind in zip(step.output_names, step.output_kinds, strict=True) if kind == "grad"}
    trained_bytes = unique_bytes((name, p) for name, p in params if name in trained)
    buffers = [(name, p) for p, name in zip(placeholders, step.input_names, strict=True) if kind_of[p] == "buffer"]
    other_bytes = (unique_bytes(buffers) + sum(tensor_bytes(p.meta["val"]) for p in placeholders
                                               if kind_of[p] not in ("param", "buffer"))
                   + sum(tensor_bytes(c.meta["val"]) for c in constants))
    # an input that requires grad gets its gradient too (held to the step's end, like the parameters')
    input_grad_bytes = sum(tensor_bytes(p.meta["val"]) for p, name in zip(placeholders, step.input_names, strict=True)
                           if kind_of[p] == "input" and name in trained)
    # a tensor handed out beside the loss is held by the caller from the forward to the step's end; counted as fixed, it
    # is counted before it is computed too, which overstates the early forward only (the peak comes later)
    whole = {fx for fx, k in returned if k is None}
    returned_bytes = (sum(tensor_bytes(fx.meta["val"]) for fx in whole)
                      + sum(_parts(fx)[k] for fx, k in returned if k is not None and fx not in whole))
    held = gradients != "set-to-none"  # the loop's gradients are there from the step's start
    fixed = FixedMemory(parameter_bytes=unique_bytes(params),
                        gradient_bytes=(trained_bytes if held else 0) + frozen_gradient_bytes,
                        optimizer_bytes=OPTIMIZERS[optimizer] * (trained_bytes + frozen_trained_bytes),
                        input_bytes=other_bytes + (input_grad_bytes if held else 0) + returned_bytes)
    outputs = tuple(dict.fromkeys([*(index_of[o] for o in output_owners), *extra_outputs]))
    return Graph(nodes=tuple(nodes), outputs=outputs, fixed=fixed,
                 meta={**(meta or {}), "optimizer": optimizer, "profile": profile.name,
                       "precision": step.precision, **({"gradients": gradients} if gradients != "held" else {})})


def cost_key(fx_node: torch.fx.Node) -> str:
    """How a measured profile names an op: its overload and arguments, tensors as dtype[shape]
    ("aten.mm.default('bf16[2048, 768]', 'bf16[768, 2304]')")."""
    args, kwargs = torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda x: describe_value(x.meta.get("val")))
    return f"{fx_node.target}{tuple(args)!r}" + (f"{kwargs!r}" if kwargs else "")


def is_handed_out_output(value: torch.fx.Node) -> bool:
    """The step's first output is the model's one non-scalar tensor (logits, features), not a scalar loss."""
    val = value.meta.get("val")
    return isinstance(val, torch.Tensor) and val.numel() != 1


_aten = torch.ops.aten
# Normalisations whose CPU kernels give their statistics another dtype than the meta kernels (torch 2.13) that fake
# tensors, and so the traced graph, take them from: on a bfloat16 / float16 input with float32 weights (a batch norm
# under autocast), the kernel's mean and inverse std are float32, the meta's the input's dtype (24 bytes planned
# where 48 are held, per 12 channels); on an all-bfloat16 batch norm, the new running statistics are bfloat16, the
# meta's float32 (planned twice the bytes).
_NORM_STATS = {_aten._native_batch_norm_legit_functional.default: 1, _aten._native_batch_norm_legit.default: 1,
               _aten._native_batch_norm_legit.no_stats: 1, _aten.native_batch_norm.default: 1,
               _aten.native_layer_norm.default: 2, _aten.native_group_norm.default: 1}  # -> the weight's argument


def _kernel_dtypes(fx_node: torch.fx.Node) -> dict[int, torch.dtype]:
    """Outputs k whose dtype the CPU kernel sets otherwise than the meta kernel: {k: the kernel's dtype}."""
    weight_at = _NORM_STATS.get(fx_node.target)
    if weight_at is None:
        return {}
    vals = [x.meta.get("val") if isinstance(x, torch.fx.Node) else None for x in fx_node.args]
    x = vals[0] if vals else None
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return {}
    fixes: dict[int, torch.dtype] = {}
    # the tensor whose dtype the kernel computes its statistics in: the weight, or for a batch norm without one
    # (affine=False) its running statistics
    norms = (_aten.native_layer_norm.default, _aten.native_group_norm.default)
    candidates = (weight_at,) if fx_node.target in norms else (weight_at, 3)
    like = next((vals[k] for k in candidates if len(vals) > k and isinstance(vals[k], torch.Tensor)), None)
    if x.dtype in (torch.bfloat16, torch.float16) and like is not None and like.dtype == torch.float32:
        fixes[1] = fixes[2] = torch.float32
    if fx_node.target is _aten._native_batch_norm_legit_functional.default and isinstance(vals[3], torch.Tensor):
        fixes[3] = fixes[4] = vals[3].dtype  # the new running statistics: the running statistics' dtype
    return fixes


# CPU's embedding_bag makes its offset2bag output (output 1) with one element more than there are indices and resizes
# it down, which keeps the storage (torch 2.13: 104 bytes held for 12 int64 indices, 96 planned; 8 bytes per
# embedding_bag under every plan, also for an empty batch of indices). The meta kernels, and so the traced graph, size
# it exactly. A sum in float32 or lower without padding_idx skips it (shape (0,), no storage).
_EMBEDDING_BAGS = (_aten._embedding_bag.default, _aten._embedding_bag_forward_only.default)


def _kernel_extra_bytes(fx_node: torch.fx.Node, k: int, value: torch.Tensor | None) -> int:
    """Bytes the CPU kernel's storage of output k holds beyond what the traced (meta) tensor's does."""
    if fx_node.target not in _EMBEDDING_BAGS or k != 1 or value is None or value.device.type != "cpu":
        return 0
    weight = fx_node.args[0].meta.get("val")
    mode = fx_node.args[4] if len(fx_node.args) > 4 else 0
    padding_idx = fx_node.args[8] if len(fx_node.args) > 8 else -1
    skipped = mode == 0 and padding_idx < 0 and weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return 0 if skipped else value.element_size()


def _output_bytes(fx_node: torch.fx.Node) -> int:
    parts = _parts(fx_node)
    return sum(parts) if parts is not None else tensor_bytes(fx_node.meta["val"])


def _parts(fx_node: torch.fx.Node) -> list[int] | None:
    """Bytes of each output of an op with several tensor outputs, else None. (Ops whose outputs alias
    one storage, like split, are views: they were folded into their base, not scheduled.)"""
    val = fx_node.meta.get("val")
    if not isinstance(val, (tuple, list)) or len(val) < 2 or not all(isinstance(v, torch.Tensor) or v is None
                                                                        for v in val):
        return None
    fixes = _kernel_dtypes(fx_node)
    # None (convolution_backward's absent bias gradient): 0 bytes
    return [(tensor_bytes(v) if k not in fixes or v is None
             else tensor_bytes(v) // v.element_size() * fixes[k].itemsize) + _kernel_extra_bytes(fx_node, k, v)
            for k, v in enumerate(val)]


def _grad_bytes(fx_node: torch.fx.Node, grad_parts: dict[torch.fx.Node, set[int]]) -> int:
    """Bytes of the outputs of a multi-output op that are gradients (fixed memory, not activations)."""
    parts = _parts(fx_node)
    return sum(parts[k] for k in grad_parts.get(fx_node, ())) if parts else 0


def _part_fields(fx_node: torch.fx.Node, part_readers: dict, gradients: set[int], is_gradient: bool) -> dict:
    if fx_node not in part_readers or is_gradient:
        return {}
    parts = [0 if k in gradients else size for k, size in enumerate(_parts(fx_node))]
    return {"part_bytes": tuple(parts),
            "part_users": tuple(tuple(sorted(readers)) for readers in part_readers[fx_node])}


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def _flops(fx_node: torch.fx.Node) -> tuple[float, str]:
    """(FLOPs, compute dtype class) of a matmul / conv / attention; (0, dtype) otherwise."""
    target = fx_node.target
    packet = getattr(target, "overloadpacket", None)
    formula = flop_registry.get(packet)
    if formula is None:
        alias = _FLOP_ALIASES.get(getattr(packet, "__name__", ""))
        formula = flop_registry.get(alias) if alias is not None else None
    dtype = _dtype_class(fx_node)
    if formula is None:
        return 0.0, dtype
    args, kwargs = torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda x: x.meta.get("val"))
    try:
        return float(formula(*args, **kwargs, out_val=fx_node.meta.get("val"))), dtype
    except Exception:  # a formula that does not fit this overload: cost it as memory-bound
        return 0.0, dtype


def _dtype_class(fx_node: torch.fx.Node) -> str:
    for x in fx_node.all_input_nodes:
        val = x.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            return _DTYPE_CLASS.get(val.dtype, "fp32")
    return "fp32"
