"""Schedule -> forward and backward FX GraphModules that save, free and recompute exactly as planned.

This module and remat/capture.py are the only homes of private torch APIs.

`partition(step, graph, schedule)` cuts the schedule's instruction list where the first backward
node is computed and interprets each part into an FX graph, node by node, the same way
remat/replay.py interprets it on real tensors:
  - compute(i) copies the FX nodes of Graph node i (the storage owner, then the views folded into
    it) into the graph being built; a node computed three times is copied three times;
  - free(i) forgets the copies, so a later read of i must come from a recomputation (an
    `ExecuteError` otherwise). FX's code generator deletes a value right after its last read,
    which is never later than the planned free;
  - the forward returns the loss, the buffer updates it computed, and then exactly the values
    the schedule holds at the cut: the saved tensors;
  - the backward takes the saved tensors, the RNG states of random ops it recomputes, every
    primal (parameters, buffers, inputs: fixed memory, no copy) and the loss tangent, and
    returns the gradients (and any buffer update computed after the cut).
Random ops (dropout) that the schedule computes more than once run first through
`run_and_save_rng_state` and are recomputed with `run_with_rng_state`, so every copy draws the
same mask, and the generator advances as in a run without recomputation. Those save the default
generator; an op given its own (`torch.rand(..., generator=g)`) goes through `save_generator_state`
and `run_with_generator_state`, which do the same with that generator.

Both graphs use the boxed calling convention: they take one list and clear it, so a saved tensor
is freed after its last read in the backward, not when the step ends.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._prims.rng_prims import run_and_save_rng_state, run_with_rng_state

from remat.capture import CapturedStep, aliasing_input, no_autocast
from remat.graph import Graph
from remat.lower import is_handed_out_output
from remat.schedule import COMPUTE, FREE, Schedule


class ExecuteError(RuntimeError):
    """The schedule cannot be turned into forward and backward graphs; the message says where and why."""


@dataclass
class PartitionedStep:
    """The planned training step as two graphs, and what their inputs and outputs are."""

    forward: torch.fx.GraphModule  # [*primals] -> (loss, *returned, *forward_mutations, *saved, *held, *rng_states)
    # [*saved, *held, *rng_states, *primals, tangent] -> (*grads, *backward_mutations)
    backward: torch.fx.GraphModule
    primal_kinds: list[str]  # per primal: "param", "buffer" or "input" (the joint placeholders but the tangent)
    primal_names: list[str]
    forward_mutations: list[str]  # buffer names updated by the forward's outputs 1..
    backward_mutations: list[str]  # buffer names updated by the backward's outputs after the grads
    grad_names: list[str]  # the primal (parameter, or input that requires grad) of each gradient the backward returns
    saved_names: list[str]  # joint FX names of the saved tensors
    rng_names: list[str]  # joint FX names of the random ops recomputed in the backward
    tangent: Any  # a fake (meta) tensor: the loss tangent's shape and dtype
    # Copies in the backward graph (gradients come after the cut; the forward graph's names may be the
    # same) whose result is gradient storage, the fixed memory the plan does not count as activations:
    # None for the whole result, else the outputs k of a tuple.
    gradient_storage: dict[str, set[int] | None] = field(default_factory=dict)
    returned_storage: dict[str, set[int] | None] = field(default_factory=dict)  # the same for handed-out tensors
    # joint FX names of the tensors handed out beside the loss (outputs="all"), in the model's output order
    returned_names: list[str] = field(default_factory=list)
    # joint FX names of handed-out tensors the backward reads: the caller's copy, not a recomputation (fixed memory)
    held_names: list[str] = field(default_factory=list)
    # forward mutations the backward reads the old value of: written in the forward, the old value held as a copy
    deferred_mutations: set[str] = field(default_factory=set)
    # those written in the forward: the forward reads their old values' copies in their place, and takes the buffers
    # themselves after the primals, in this order, to write into
    written_deferred: list[str] = field(default_factory=list)
    # Tied weights (one tensor under several names: BART's embeddings and head) are a placeholder each, with a
    # gradient each: per tensor, those names in the order the joint graph computes their gradients, autograd's order
    tied_gradients: list[list[str]] = field(default_factory=list)


def is_random(fx_node: torch.fx.Node) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(fx_node.target, "tags", ())


def first_backward_position(graph: Graph, schedule: Schedule) -> int:
    """Index of the first instruction that computes a backward node (len(ops) if none)."""
    for position, op in enumerate(schedule.ops):
        if op.kind == COMPUTE and graph.nodes[op.node].is_backward:
            return position
    return len(schedule.ops)


def graph_nodes_by_fx_name(graph: Graph, by_name: dict[str, torch.fx.Node]) -> dict[str, int]:
    """FX name -> the Graph node that computes it (its storage owner and the views folded into it)."""
    node_of: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        if node.is_return:  # the backward's return: no FX node of its own
            continue
        for name in node.fx_nodes or (node.name,):
            if name not in by_name:
                raise ExecuteError(f"graph node {index} ({node.name}) names FX node {name!r}, not in the traced "
                                   "step: the plan was made for another graph")
            node_of[name] = index
    return node_of


def partition(step: CapturedStep, graph: Graph, schedule: Schedule) -> PartitionedStep:
    """Forward and backward GraphModules that run `schedule` on `step`'s joint graph (module docstring)."""
    joint = step.joint.graph
    if schedule.num_nodes != len(graph):
        raise ExecuteError(f"the schedule is for {schedule.num_nodes} nodes, the graph has {len(graph)}")
    by_name = {n.name: n for n in joint.nodes}
    node_of = graph_nodes_by_fx_name(graph, by_name)
    placeholders = list(joint.find_nodes(op="placeholder"))
    tangents = [p for p, kind in zip(placeholders, step.input_kinds, strict=True) if kind == "tangent"]
    if len(tangents) != 1:
        raise ExecuteError(f"the traced step has {len(tangents)} loss tangents; remat runs steps with one loss")
    tangent = tangents[0]
    primals = [p for p in placeholders if p is not tangent]
    primal_info = [(kind, name) for p, kind, name in zip(placeholders, step.input_kinds, step.input_names,
                                                         strict=True) if p is not tangent]
    # FX nodes in no Graph node: views of placeholders, symbolic sizes. Copied where they are read.
    side = {n.name for n in joint.nodes if n.op not in ("placeholder", "output") and n.name not in node_of}

    output_values = joint.find_nodes(op="output")[0].args[0]
    outputs = [(value.name, kind, name) for value, kind, name in
               zip(output_values, step.output_kinds, step.output_names, strict=True)
               if kind in ("loss", "returned", "grad", "mutation") and isinstance(value, torch.fx.Node)]
    counts = schedule.compute_counts()
    replayed = {name for name, index in node_of.items() if counts[index] > 1 and is_random(by_name[name])}
    cut = first_backward_position(graph, schedule)
    # Tensors handed out beside the loss: the caller holds them (fixed memory, 0 bytes in the graph), so a plan that
    # computes one again reads the caller's copy instead, in the forward as in the backward (`held`).
    returned_names = [name for name, kind, _ in outputs if kind == "returned"]
    returned_nodes = {node_of[name] for name in returned_names if name in node_of}
    held: dict[str, torch.fx.Node] = {}  # in the graph being built: a handed-out tensor's value for a recomputation

    copies: dict[str, list[str]] = {}  # joint name -> the names of its copies
    planned: set[torch.fx.Node] = set()  # each compute instruction's copy of its Graph node's storage owner
    first_copy: dict[str, torch.fx.Node] = {}  # joint name -> its first copy, for the outputs
    rng_state: dict[str, torch.fx.Node] = {}  # joint name of a random op -> its saved RNG state
    # joint name -> the copy the backward's return reads (gradients counted as made): a gradient computed again is
    # returned from the copy the plan holds to the end, not from its first, which the plan let go
    returned_copies: dict[str, torch.fx.Node] = {}

    def build(target: torch.fx.Graph, ops, current: dict[str, torch.fx.Node], part: str) -> None:
        def lookup(joint_node: torch.fx.Node, reader: str) -> torch.fx.Node:
            name = joint_node.name
            if name in current:
                return current[name]
            if name in side:
                current[name] = target.node_copy(joint_node, lambda x: lookup(x, reader))
                return current[name]
            owner = node_of.get(name)
            held = f"graph node {owner} ({graph.nodes[owner].name})" if owner is not None else "no graph node"
            raise ExecuteError(f"{reader}: reads {name}, held by {held}, which is not in memory at that point")

        for position, op in ops:
            node = graph.nodes[op.node]
            names = node.fx_nodes or (node.name,)
            if node.is_return:  # the gradients are returned at the backward's end: the copies it reads
                if op.kind == COMPUTE:
                    returned_copies.update((name, current[name]) for d in node.deps
                                           for name in graph.nodes[d].fx_nodes or (graph.nodes[d].name,)
                                           if name in current)
                continue
            if op.kind == FREE:
                for name in names:
                    current.pop(name, None)
                continue
            if op.kind != COMPUTE:
                raise ExecuteError(f"instruction {position}: unknown kind {op.kind!r}")
            if op.node in returned_nodes and node.name in first_copy:  # the caller's copy, read again
                for name in names:
                    current[name] = held[name] if part == "backward" else first_copy[name]
                continue
            reader = f"{part} instruction {position}: compute({op.node}) {node.name}"
            for name in names:
                clone = _copy(target, by_name[name], lambda x, r=reader: lookup(x, r), name in replayed, rng_state)
                current[name] = clone
                if name == node.name:  # the storage owner: what the plan computes, read or not
                    planned.add(clone)
                copies.setdefault(name, []).append(clone.name)
                first_copy.setdefault(name, clone)

    # Forward: the instructions before the cut.
    forward = torch.fx.Graph()
    current: dict[str, torch.fx.Node] = {}
    for p in primals:
        current[p.name] = _placeholder(forward, p)
    forward_primals = dict(current)
    build(forward, list(enumerate(schedule.ops))[:cut], current, "forward")
    loss = [name for name, kind, _ in outputs if kind == "loss"]
    if len(loss) != 1 or loss[0] not in first_copy:
        raise ExecuteError("the schedule does not compute the loss before the first backward op")
    forward_mutations = [(name, buffer) for name, kind, buffer in outputs if kind == "mutation" and name in first_copy]
    # A buffer update whose op the plan lets go before the cut (a batch norm dropped in the forward) is written into
    # the buffer where its first copy is computed, and goes with the op as the simulator counts it. Returned at the
    # forward's end, it was held to there: ResNet-50's halfway plan held 85,928 bytes of running statistics over its
    # plan. (Later copies read the updated statistics, but in training a norm's outputs do not depend on them.)
    buffer_placeholder = {name: forward_primals[p.name]
                          for p, (kind, name) in zip(primals, primal_info, strict=True) if kind in ("buffer", "input")}
    live_at_cut = _live_after(schedule, cut)
    saved_names = [name for index in live_at_cut for name in (graph.nodes[index].fx_nodes or (graph.nodes[index].name,))
                   if name in current]
    forward_values = dict(current)
    forward_rng = dict(rng_state)
    late = [name for name in returned_names if name in node_of and name not in first_copy]
    if late:
        raise ExecuteError(f"the schedule computes {late[0]}, a tensor the step hands out, only after the backward "
                           "starts")
    returned_values = [first_copy[name] if name in first_copy else _copy_side(forward, by_name[name], current)
                       for name in returned_names]
    computed_after = {op.node for op in schedule.ops[cut:] if op.kind == COMPUTE}
    held_names = [name for index in sorted(returned_nodes & computed_after)
                  for name in (graph.nodes[index].fx_nodes or (graph.nodes[index].name,))]

    # Backward: the saved values, RNG states, primals and tangent in; the rest of the schedule.
    backward = torch.fx.Graph()
    current = {}
    saved = {name: _placeholder(backward, by_name[name], f"saved_{name}") for name in saved_names}
    current.update(saved)
    held.update({name: _placeholder(backward, by_name[name], f"held_{name}") for name in held_names})
    rng_inputs = {name: backward.placeholder(f"rng_state_{name}") for name in forward_rng}
    rng_state.update(rng_inputs)
    for p in primals:
        current[p.name] = _placeholder(backward, p)
    backward_primal = {name: current[p.name]
                       for p, (kind, name) in zip(primals, primal_info, strict=True) if kind in ("buffer", "input")}
    current[tangent.name] = _placeholder(backward, tangent)
    build(backward, list(enumerate(schedule.ops))[cut:], current, "backward")
    grads = [(name, parameter) for name, kind, parameter in outputs if kind == "grad"]
    order = {n.name: i for i, n in enumerate(joint.nodes)}
    tied: dict[str, list[tuple[int, str]]] = {}
    for name, parameter in grads:
        tied.setdefault(step.tied_to.get(parameter, parameter), []).append((order[name], parameter))
    missing = [name for name, _ in grads if name not in first_copy and name not in side]
    if missing:
        raise ExecuteError(f"the schedule never computes the gradient(s) {', '.join(missing[:3])}")
    grad_values = [(returned_copies[name] if name in returned_copies else first_copy[name]) if name in first_copy else
                   backward.node_copy(by_name[name], lambda x: current[x.name]) for name, _ in grads]
    backward_mutations = [(name, buffer) for name, kind, buffer in outputs
                          if kind == "mutation" and name not in {n for n, _ in forward_mutations}]
    for name, _ in backward_mutations:
        if name not in first_copy:
            raise ExecuteError(f"the schedule never computes the buffer update {name}")
    backward.output((*grad_values, *(first_copy[name] for name, _ in backward_mutations)))

    # Save only what the backward reads: an unread input would stay alive for the whole backward. Dead copies
    # go first: a saved tensor that only they read is not read.
    _eliminate_dead_code(backward, planned)
    saved_names = [name for name in saved_names if _used(backward, saved[name])]
    held_names = [name for name in held_names if _used(backward, held[name])]
    rng_names = [name for name in forward_rng if _used(backward, rng_inputs[name])]
    # A buffer (or input) the forward updates but an op reads as it was, after the update (a value recomputed in the
    # backward from a buffer replaced after its use: an EMA updated after the product that reads it), must keep its
    # old value until then: the step holds a copy of it for the backward (_PlannedStep.forward; past the plan's
    # count, as the buffer is). Read from the buffer, the backward saw the new value: gradients that were not eager's.
    order = {node: i for i, node in enumerate(forward.nodes)}
    read_later = {buffer for buffer, placeholder in backward_primal.items()
                  if any(_reads_value(user, placeholder) for user in placeholder.users)}
    # (one the backward reads the old value of too: the step keeps a copy of that from before the forward)
    deferred_mutations = {buffer for _, buffer in forward_mutations if buffer in read_later}
    # The forward of such a buffer reads the copy of its old value in its place (every reader of a buffer's
    # placeholder reads the old value: the new one is the update's own node), so its update can be written into the
    # buffer, a placeholder after the primals, where it is made, even where a recomputation in the forward reads the
    # buffer after that (checkpoint-all's). Returned at the forward's end, it was held to there, past the plan's count.
    written_early = {name for name, buffer in forward_mutations
                     if name not in forward_values and buffer in buffer_placeholder
                     and (buffer in deferred_mutations
                          or all(order[user] <= order[first_copy[name]]
                                 or not _reads_value(user, buffer_placeholder[buffer])
                                 for user in buffer_placeholder[buffer].users))}
    written_deferred = [buffer for name, buffer in forward_mutations
                        if name in written_early and buffer in deferred_mutations]
    target = dict(buffer_placeholder)
    last_input = list(forward.find_nodes(op="placeholder"))[-1]
    for k, buffer in enumerate(written_deferred):
        with forward.inserting_after(last_input):
            target[buffer] = last_input = forward.placeholder(f"buffer_to_write_{k}")
        target[buffer].meta = dict(buffer_placeholder[buffer].meta)
    for name, buffer in forward_mutations:
        if name in written_early:
            with forward.inserting_after(first_copy[name]):
                forward.call_function(torch.ops.aten.copy_.default, (target[buffer], first_copy[name]))
    forward_mutations = [(name, buffer) for name, buffer in forward_mutations if name not in written_early]
    # A buffer update held at the cut comes from the copy held there: a batch norm computed again in the forward
    # lets its first copy's statistics go with it, as the simulator releases them (every copy computes the same)
    forward.output((first_copy[loss[0]], *returned_values,
                    *(forward_values.get(name, first_copy[name]) for name, _ in forward_mutations),
                    *(forward_values[name] for name in saved_names), *(first_copy[name] for name in held_names),
                    *(forward_rng[name] for name in rng_names)))

    return PartitionedStep(
        forward=_module(step.joint, forward, planned),
        backward=_module(step.joint, backward, planned),
        primal_kinds=[kind for kind, _ in primal_info],
        primal_names=[name for _, name in primal_info],
        forward_mutations=[buffer for _, buffer in forward_mutations],
        backward_mutations=[buffer for _, buffer in backward_mutations],
        deferred_mutations=deferred_mutations,
        written_deferred=written_deferred,
        grad_names=[parameter for _, parameter in grads],
        saved_names=saved_names,
        rng_names=rng_names,
        returned_names=returned_names,
        held_names=held_names,
        tied_gradients=[[parameter for _, parameter in sorted(names)] for names in tied.values() if len(names) > 1],
        tangent=tangent.meta.get("val"),
        # gradients counted as the backward makes them ("set-to-none", "accumulate") are activations held to its end
        gradient_storage={} if graph.gradients_made else _gradient_storage([by_name[name] for name, _ in grads],
                                                                             copies),
        # the model's non-scalar output (logits) is the caller's too: fixed memory (remat.lower), not an activation
        returned_storage=_gradient_storage([by_name[name] for name in returned_names]
                                           + [by_name[name] for name in loss if is_handed_out_output(by_name[name])],
                                           copies),
    )


def _copy_side(target: torch.fx.Graph, joint_node: torch.fx.Node, current: dict[str, torch.fx.Node]) -> torch.fx.Node:
    """A value in no Graph node (a view of an input), copied from the placeholders it reads."""
    if joint_node.name not in current:
        current[joint_node.name] = target.node_copy(joint_node, lambda x: _copy_side(target, x, current))
    return current[joint_node.name]


def _gradient_storage(gradients: list[torch.fx.Node], copies: dict[str, list[str]]) -> dict[str, set[int] | None]:
    storage: dict[str, set[int] | None] = {}
    for value in gradients:
        source, part = _storage_source(value)
        for name in copies.get(source, ()):
            if part is None:
                storage[name] = None
            elif storage.get(name, set()) is not None:
                storage[name] = storage.get(name, set()) | {part}
    return storage


def _storage_source(value: torch.fx.Node) -> tuple[str, int | None]:
    """The joint node whose result holds `value`'s storage: (name, None), or (name, k) when it is
    output k of a multi-output op."""
    while (base := aliasing_input(value)) is not None:
        if value.target is operator.getitem and aliasing_input(base) is None:
            return base.name, value.args[1]
        value = base
    return value.name, None


def _copy(target: torch.fx.Graph, joint_node: torch.fx.Node, lookup, replayed: bool,
          rng_state: dict[str, torch.fx.Node]) -> torch.fx.Node:
    """Copy one joint FX node; a random op that runs more than once saves or reuses its RNG state."""
    if not replayed:
        return target.node_copy(joint_node, lookup)
    args, kwargs = torch.fx.node.map_arg((joint_node.args, joint_node.kwargs), lookup)
    name = joint_node.name
    # torch's pair saves and restores the default generator; an op given its own (torch.rand(..., generator=g))
    # drew other numbers when recomputed, silently: its gradients and the generator's next draws were not eager's
    own = kwargs.get("generator") is not None
    save, replay = (save_generator_state, run_with_generator_state) if own else (run_and_save_rng_state,
                                                                                 run_with_rng_state)
    if name not in rng_state:  # first run: remember the generator state it starts from
        both = target.call_function(save, (joint_node.target, *args), kwargs)
        rng_state[name] = target.call_function(operator.getitem, (both, 0))
        value = target.call_function(operator.getitem, (both, 1))
    else:
        value = target.call_function(replay, (rng_state[name], joint_node.target, *args), kwargs)
    value.meta = dict(joint_node.meta)
    return value


def save_generator_state(op, *args, generator: torch.Generator, **kwargs) -> tuple[torch.Tensor, Any]:
    """run_and_save_rng_state for a random op that draws from its own generator: its state, then the op's output."""
    state = generator.get_state()
    return state, op(*args, generator=generator, **kwargs)


def run_with_generator_state(state: torch.Tensor, op, *args, generator: torch.Generator, **kwargs) -> Any:
    """The op again from the generator state of its first run; the generator is left where it was, as an eager step
    that ran the op once leaves it."""
    now = generator.get_state()
    generator.set_state(state)
    try:
        return op(*args, generator=generator, **kwargs)
    finally:
        generator.set_state(now)


_TRAINING_NORMS = (torch.ops.aten._native_batch_norm_legit_functional.default, torch.ops.aten.native_batch_norm.default)


def _reads_value(reader: torch.fx.Node, placeholder: torch.fx.Node) -> bool:
    """Whether `reader`'s result depends on the placeholder's value: a batch norm in training takes its running
    statistics as arguments but normalises with the batch's own, so a copy recomputed after their update computes
    the same (they are updated where the norm first runs, and a recomputed one's update is not written)."""
    if reader.target in _TRAINING_NORMS and len(reader.args) > 5 and reader.args[5] is True:
        return any(arg is placeholder for i, arg in enumerate(reader.args) if i not in (3, 4))
    return True


def _used(graph: torch.fx.Graph, placeholder: torch.fx.Node) -> bool:
    """Whether a placeholder is read; an unread one is removed."""
    if placeholder.users:
        return True
    graph.erase_node(placeholder)
    return False


def _placeholder(target: torch.fx.Graph, joint_node: torch.fx.Node, name: str | None = None) -> torch.fx.Node:
    node = target.placeholder(name or joint_node.name)
    node.meta = dict(joint_node.meta)
    return node


def _live_after(schedule: Schedule, position: int) -> list[int]:
    """Graph nodes in memory after the first `position` instructions, in the order they were computed."""
    live: dict[int, None] = {}
    for op in schedule.ops[:position]:
        if op.kind == COMPUTE:
            live[op.node] = None
        else:
            live.pop(op.node, None)
    return list(live)


def _eliminate_dead_code(graph: torch.fx.Graph, planned: set[torch.fx.Node]) -> None:
    """Remove the copies nothing reads (the unused outputs of a multi-output op copied for one of them, say), but
    not the plan's computations: one whose value nothing reads (a Checkmate stage runs its own node, read or not)
    still runs, and is freed right after, as the simulator counts it. Removed, the inputs it reads could be
    freed earlier than planned, and a saved tensor only it read would be held through the whole backward."""
    graph.eliminate_dead_code(is_impure_node=lambda node: node in planned or node.is_impure())


def _views_as_reshapes(graph: torch.fx.Graph) -> None:
    """Each `aten.view` run as `aten.reshape`: a view where the tensor's strides allow one (the same storage, the same
    bytes), a copy where not. The graph was traced on fake tensors, whose strides follow torch's meta functions; some
    CPU kernels lay out their outputs otherwise (batch norm's output and its backward's input gradient, dropout's
    backward, on a transposed input), and a view the trace took for granted failed at the first step ("view size is
    not compatible with input tensor's size and stride")."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default


def _module(root: torch.fx.GraphModule, graph: torch.fx.Graph, planned: set[torch.fx.Node]) -> torch.fx.GraphModule:
    """A GraphModule with the boxed calling convention: it takes one list of inputs and clears it."""
    graph.set_codegen(torch.fx.graph._BoxedCodeGen())
    _eliminate_dead_code(graph, planned)
    _views_as_reshapes(graph)
    graph.lint()
    module = torch.fx.GraphModule(root, graph)
    return module


# --- running the two graphs ------------------------------------------------------------------


@dataclass
class StepMemory:
    """Bytes measured while the two graphs ran, comparable with `simulate(graph, schedule)`.

    Counted: the distinct storages of the values the graphs hold (FX's interpreter frees a value
    after its last read, as the generated code does), measured after each op with its inputs still
    held. Not counted, like the simulator: primals (parameters, buffers, inputs, tangent: fixed
    memory), the graph module's tensor constants (fixed memory too) and gradients (fixed gradient
    memory). RNG states saved for replayed random ops are counted apart: the plan does not know them.
    """

    peak_live_bytes: int = 0  # activations only: compare with Simulation.activation_peak_bytes
    peak_bytes: int = 0  # peak_live_bytes + the graph's fixed memory: compare with Simulation.peak_bytes
    rng_state_bytes: int = 0


class StepRunner:
    """Runs a PartitionedStep as one autograd op: `StepRunner.loss(primals)` returns the loss, and
    `loss.backward()` runs the planned backward and hands each parameter its gradient."""

    def __init__(self, parts: PartitionedStep, graph: Graph, backend: str = "eager"):
        self.parts = parts
        self.graph = graph
        self.backend = backend
        self.run_forward = parts.forward
        self.run_backward = parts.backward
        if backend == "inductor":
            self.run_forward, self.run_backward = compile_inductor(parts)
        elif backend != "eager":
            raise ValueError(f"unknown backend {backend!r}: choose eager or inductor")
        self.memory: StepMemory | None = None  # set by `measuring()`: run through the counting interpreter

    def loss(self, primals: list[Any]) -> torch.Tensor:
        return self.run(primals)[0]

    def run(self, primals: list[Any]) -> tuple[torch.Tensor, ...]:
        """The loss, then the tensors the step hands out beside it (outputs="all")."""
        outputs = _PlannedStep.apply(self, *primals)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    @contextlib.contextmanager
    def measuring(self):
        """Run the steps inside this block through an interpreter that counts live bytes."""
        self.memory = StepMemory()
        try:
            yield self.memory
        finally:
            memory, self.memory = self.memory, None
            memory.peak_bytes = memory.peak_live_bytes + self.graph.fixed.total_bytes

    def _call(self, module: torch.fx.GraphModule, compiled: Any, values: list[Any], counted: int = 0,
              handed_out: Sequence[torch.Tensor] = ()) -> list[Any]:
        """Run one graph on `values` (a list it clears). When measuring, the first `counted` values
        (the saved tensors) are activations; the others are primals, RNG states or the tangent. The tensors the
        forward `handed_out` are fixed memory: a saved value that shares their storage costs nothing more."""
        with no_autocast(), torch.no_grad():
            if self.memory is None:
                return list(compiled(values))
            fixed = [*handed_out, *(t for v in values[counted:] for t in tensors_in(v))]
            # gradients are computed after the cut; the forward's copies may bear the same FX names. Both, and the
            # tensors the forward hands out, are fixed memory.
            gradients = (self.parts.gradient_storage if module is self.parts.backward
                         else self.parts.returned_storage)
            interpreter = _CountingInterpreter(module, self, fixed, gradients)
            outputs = interpreter.run(*values, enable_io_processing=False)
            values.clear()
            return list(outputs)


class _PlannedStep(torch.autograd.Function):
    """forward: the planned forward graph; backward: the planned backward graph."""

    @staticmethod
    def forward(ctx, runner: StepRunner, *primals: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        parts = runner.parts
        # A buffer the backward reads as it was before this forward updated it (deferred_mutations) is held as a copy
        # of that old value, taken before the forward graph, which may write the buffer where its update is made.
        old_values = {i: primals[i].detach().clone()
                      for i, (kind, name) in enumerate(zip(parts.primal_kinds, parts.primal_names, strict=True))
                      if kind in ("buffer", "input") and name in parts.deferred_mutations}
        index = {name: i for i, name in enumerate(parts.primal_names)}
        inputs = [old_values.get(i, p) for i, p in enumerate(primals)]
        outputs = runner._call(parts.forward, runner.run_forward,
                               inputs + [primals[index[name]] for name in parts.written_deferred])
        loss, returned = outputs[0], outputs[1:1 + len(parts.returned_names)]
        outputs = [loss, *outputs[1 + len(returned):]]
        mutations = outputs[1:1 + len(parts.forward_mutations)]
        ctx.runner = runner
        ctx.saved = outputs[1 + len(parts.forward_mutations):]  # saved tensors, then RNG states
        ctx.handed_out = list(returned) if runner.memory is not None else []  # only to measure: the caller's
        # Primals are parameters, buffers and inputs: persistent memory, held by reference. Buffers are written in the
        # forward, as eager writes them: a second forward before this backward reads the update (an update the
        # backward read the old value of was written after the backward, so such a forward, or one never run
        # backward, read the stale value).
        ctx.primals = [p.detach() if isinstance(p, torch.Tensor) else p for p in primals]
        ctx.old_values = old_values
        _write_buffers(parts, primals, parts.forward_mutations, mutations)
        if not returned:
            return loss
        ctx.set_materialize_grads(False)  # a handed-out tensor nothing differentiates gets None, not zeros
        return (loss, *returned)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *grad_returned: torch.Tensor | None):
        if any(grad is not None for grad in grad_returned) or grad_loss is None:
            raise RuntimeError("a gradient reached a tensor that remat's planned step handed out beside its loss "
                               "(outputs=\"all\"): the planned backward starts from the loss alone; make that term "
                               "part of the model's loss (or of a loss_fn), or detach the tensor")
        if torch.is_grad_enabled():  # autograd runs a backward with grad mode on only for create_graph=True
            raise RuntimeError("remat's planned backward is not differentiable: gradients of gradients "
                               "(create_graph=True: gradient penalties, double backward, MAML) need the plain model's "
                               "own backward; run such a step on the wrapped model (`model.model`)")
        if ctx.saved is None:
            raise RuntimeError("this step's planned backward ran already, and it frees each saved value after its last "
                               "read, as the plan counts them: backward(retain_graph=True) and a second backward "
                               "through the same step are not supported; run the forward again")
        runner, parts = ctx.runner, ctx.runner.parts
        primals = ctx.primals
        values = [*ctx.saved, *(ctx.old_values.get(i, p) for i, p in enumerate(primals)), grad_loss]
        # the backward graph clears `values`: saved tensors die at their last read
        ctx.saved = ctx.primals = ctx.old_values = None
        outputs = runner._call(parts.backward, runner.run_backward, values, counted=len(parts.saved_names),
                               handed_out=ctx.handed_out)
        ctx.handed_out = None
        grads = _sum_tied(parts, outputs)
        _write_buffers(parts, primals, parts.backward_mutations, outputs[len(parts.grad_names):])
        per_primal = [grads.get(name) if kind in ("param", "input") else None  # inputs that require grad get theirs
                      for kind, name in zip(parts.primal_kinds, parts.primal_names, strict=True)]
        return (None, *per_primal)


def _sum_tied(parts: PartitionedStep, outputs: list[Any]) -> dict[str, Any]:
    """The backward's gradients by name, a tied weight's summed into its first name's in the order the joint graph
    computes them, as eager's autograd engine accumulates them: ((first + second) + third). Handed to autograd a name
    each, they were summed in the order of the names (BART's encoder, decoder and head: other roundings than eager's in
    float64). In place, as the engine sums, into the first where no other output shares its storage: no more memory."""
    grads = dict(zip(parts.grad_names, outputs, strict=False))
    storages = Counter(t.untyped_storage().data_ptr() for t in tensors_in(outputs))
    for names in parts.tied_gradients:
        present = [gradient for gradient in (grads.pop(name, None) for name in names) if gradient is not None]
        total = present[0] if present else None
        for k, gradient in enumerate(present[1:]):
            own = k > 0 or (total.layout == torch.strided and storages[total.untyped_storage().data_ptr()] == 1
                            and total.untyped_storage().nbytes() == total.nbytes)  # the whole storage, its own
            total = total.add_(gradient) if own else total + gradient
        grads[names[0]] = total
    return grads


def _write_buffers(parts: PartitionedStep, primals, names: list[str], values: list[Any]) -> None:
    """Buffer updates (BatchNorm running statistics) go back into the module's buffers, and what the forward wrote
    into an input (`labels[labels == pad] = -100`) into the caller's tensor."""
    if not names:
        return
    index = {name: i for i, (kind, name) in enumerate(zip(parts.primal_kinds, parts.primal_names, strict=True))
             if kind in ("buffer", "input")}
    with torch.no_grad():
        for name, value in zip(names, values, strict=True):
            primals[index[name]].copy_(value)


def tensors_in(value: Any):
    """The tensors in a value: itself, or those in a (nested) tuple / list. A sparse tensor (the gradient of
    `nn.Embedding(sparse=True)`) as its indices and values, which hold its storages (it has none of its own:
    measure() failed on it)."""
    if isinstance(value, torch.Tensor) and value.layout == torch.sparse_coo:
        yield value._indices()
        yield value._values()
    elif isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors_in(v)


class _CountingInterpreter(torch.fx.Interpreter):
    """Runs a graph node by node and records the peak bytes of the storages its live values hold."""

    def __init__(self, module: torch.fx.GraphModule, runner: StepRunner, fixed: list[torch.Tensor],
                 gradients: dict[str, set[int] | None]):
        super().__init__(module)
        self.runner = runner
        self.gradients = gradients
        for node in module.graph.nodes:  # a value nothing reads goes right after it is made, as in FX's code
            if not node.users and node.op not in ("placeholder", "output"):
                self.user_to_last_uses.setdefault(node, []).append(node)
        # Storages not counted, by address: held here until the run ends, so that no activation allocated
        # later can take the address of one freed meanwhile (the tangent; a gradient computed twice).
        self.pinned: list[torch.Tensor] = []
        self.excluded: set[int] = set()
        self._pin(fixed)

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        memory = self.runner.memory
        if node.op == "placeholder":
            if node.name.startswith("rng_state_"):
                self._exclude(result, memory)
            return result
        if node.op == "get_attr":  # a tensor constant of the module: fixed memory (remat.lower), held while it lives
            self._pin(tensors_in(result))
            return result
        if node.target in (run_and_save_rng_state, save_generator_state):
            self._exclude(result[0], memory)
        if node.name in self.gradients:  # gradients are fixed memory
            parts = self.gradients[node.name]
            storage = result if parts is None else [result[k] for k in parts]
            self._pin(tensors_in(storage))
        held: dict[int, int] = {}
        for value in (*self.env.values(), result):
            for tensor in tensors_in(value):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self.excluded:
                    held[storage.data_ptr()] = storage.nbytes()
        memory.peak_live_bytes = max(memory.peak_live_bytes, sum(held.values()))
        return result

    def _pin(self, tensors) -> None:
        for tensor in tensors:
            self.pinned.append(tensor)
            self.excluded.add(tensor.untyped_storage().data_ptr())

    def _exclude(self, value: Any, memory: StepMemory) -> None:
        for tensor in tensors_in(value):
            if tensor.untyped_storage().data_ptr() not in self.excluded:
                self._pin([tensor])
                memory.rng_state_bytes += tensor.untyped_storage().nbytes()


def compile_inductor(parts: PartitionedStep):
    """Both graphs compiled by Inductor, at their first call (Inductor wants real example inputs).

    Inductor decomposes, fuses and may reorder ops within each graph: it keeps the planned
    saved set and recomputations (they are in the graphs), but its peak must be measured, not assumed.
    """
    return _InductorGraph(parts.forward), _InductorGraph(parts.backward)


class _InductorGraph:
    def __init__(self, module: torch.fx.GraphModule):
        graph = copy.deepcopy(module.graph)
        graph.set_codegen(torch.fx.graph.CodeGen())  # traced with positional arguments, not the boxed list
        self.module = torch.fx.GraphModule(module, graph)
        self.compiled = None

    def __call__(self, values: list[Any]) -> Any:
        if self.compiled is None:
            from torch._inductor import config
            from torch._inductor.compile_fx import compile_fx_inner
            from torch._inductor.decomposition import select_decomp_table
            from torch.fx.experimental.proxy_tensor import make_fx

            # The graphs are aten already: decomposed as Inductor wants them and handed to its graph compiler, not to
            # compile_fx, whose AOTAutograd pass functionalizes them again and has no rule for the RNG operators of
            # replayed random ops (a plan that recomputed a dropout failed at its first step). Traced on fake tensors,
            # and with the RNG put back: tracing on the real inputs drew the first step's dropout masks once more.
            with torch.random.fork_rng(devices=[]), config.patch(compile_threads=1):  # no pool of compile workers
                graph = make_fx(self.module, decomposition_table=select_decomp_table(), tracing_mode="fake")(*values)
                self.compiled = compile_fx_inner(graph, list(values))
        args = list(values)
        values.clear()
        return self.compiled(args)
