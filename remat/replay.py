"""Replay a captured joint graph on real tensors, following a Schedule instruction by instruction.

This checks a plan end to end: the loss and gradients must equal plain execution, and the bytes
actually held by live values are measured and can be compared with `simulate(graph, schedule)`.

Interpretation of the instructions:
  - `env` maps FX node names to real values. Placeholders (parameters, buffers, inputs, tangent)
    are always present, and so are the views of placeholders (`t` of a weight), which lowering
    folds into the placeholders rather than into a Graph node.
  - compute(i) runs graph.nodes[i].fx_nodes in order (the FX node owning the storage, then the
    views / getitems / detaches folded into it) with `node.target(*args, **kwargs)`; every FX
    input must be a placeholder or belong to a live node, otherwise `ReplayError`.
  - free(i) deletes the owner and its folded names from `env`.
  - FX nodes that are in no Graph node and hold no tensor (symbolic sizes, asserts) are evaluated
    on demand.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from remat.capture import CapturedStep, aliasing_input
from remat.execute import ExecuteError, graph_nodes_by_fx_name, is_random, tensors_in
from remat.graph import Graph
from remat.schedule import COMPUTE, FREE, Schedule
from remat.simulate import part_releases


class ReplayError(RuntimeError):
    """The schedule cannot be executed on the captured graph; the message says where and why."""


@dataclass
class ReplayResult:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]  # parameter name (CapturedStep.output_names) -> gradient
    # Max over the run of the bytes of the distinct storages held by live Graph nodes' values,
    # measured right after each compute (before the following frees). Placeholder storages are
    # excluded, and so are gradient outputs' storages: the Graph gives gradient nodes 0 bytes
    # because their memory is the fixed gradient memory, so leaving them out keeps this figure
    # comparable with `simulate(graph, schedule).activation_peak_bytes`.
    peak_live_bytes: int
    peak_bytes: int  # peak_live_bytes + graph.fixed.total_bytes, comparable to simulate(...).peak_bytes


def joint_inputs(model: nn.Module, example_inputs: Any, step: CapturedStep) -> list[Any]:
    """The joint graph's placeholder values, in order, from the real module.

    Parameters are detached (same storage), buffers are cloned (so an eager run that updates running
    statistics afterwards does not change them), user inputs are taken in order, and the loss
    tangent is ones of the loss's shape and dtype.
    Capture wraps the model in `LossStep`, so the recorded names carry a "model." prefix.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    placeholders = list(step.joint.graph.find_nodes(op="placeholder"))
    user = list(example_inputs)
    values: list[Any] = []
    for placeholder, kind, name in zip(placeholders, step.input_kinds, step.input_names, strict=True):
        key = name.removeprefix("model.")
        if kind == "param":
            if key not in params:
                raise ReplayError(f"the model has no parameter {key!r} (placeholder {placeholder.name})")
            values.append(params[key].detach())
        elif kind == "buffer":
            if key not in buffers:
                raise ReplayError(f"the model has no buffer {key!r} (placeholder {placeholder.name})")
            values.append(buffers[key].detach().clone())
        elif kind == "input":
            if not user:
                raise ReplayError(f"the graph has more user inputs than the {len(example_inputs)} given")
            value = user.pop(0)
            values.append(value.detach() if isinstance(value, torch.Tensor) else value)
        elif kind == "tangent":
            val = placeholder.meta.get("val")
            shape, dtype = (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else ((), torch.float32)
            values.append(torch.ones(shape, dtype=dtype))
        else:
            raise ReplayError(f"placeholder {placeholder.name} has unknown kind {kind!r}")
    if user:
        raise ReplayError(f"{len(user)} example input(s) left over: the graph takes fewer user inputs")
    return values


def _storage_key_and_bytes(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def replay(step: CapturedStep, graph: Graph, schedule: Schedule, inputs: list[Any]) -> ReplayResult:
    """Run `schedule` on `step.joint` with real `inputs` (see `joint_inputs`); see the module docstring."""
    fx_graph = step.joint.graph
    placeholders = list(fx_graph.find_nodes(op="placeholder"))
    if len(inputs) != len(placeholders):
        raise ReplayError(f"{len(inputs)} inputs given, the joint graph has {len(placeholders)} placeholders")
    if schedule.num_nodes != len(graph):
        raise ReplayError(f"schedule is for {schedule.num_nodes} nodes, graph has {len(graph)}")
    by_name = {n.name: n for n in fx_graph.nodes}

    try:
        node_of = graph_nodes_by_fx_name(graph, by_name)  # which Graph node owns each FX name
    except ExecuteError as error:
        raise ReplayError(str(error)) from None

    env: dict[str, Any] = {p.name: v for p, v in zip(placeholders, inputs, strict=True)}
    placeholder_ptrs = {_storage_key_and_bytes(t)[0] for v in inputs for t in tensors_in(v)}

    # FX nodes in no Graph node: views of placeholders and non-tensor values. Those that depend on
    # placeholders only are evaluated once here and kept like placeholders.
    fixed_names = set(env)
    side: set[str] = set()
    for fx_node in fx_graph.nodes:
        if fx_node.op in ("placeholder", "output") or fx_node.name in node_of:
            continue
        side.add(fx_node.name)
        if all(x.name in fixed_names for x in fx_node.all_input_nodes):
            env[fx_node.name] = _run(step, fx_node, env)
            fixed_names.add(fx_node.name)

    def lookup(fx_node: torch.fx.Node, reader: str) -> Any:
        if fx_node.name in env:
            return env[fx_node.name]
        if fx_node.name in side:  # a value in no Graph node (e.g. a symbolic size of an activation)
            args, kwargs = torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda x: lookup(x, reader))
            return _call(step, fx_node, args, kwargs)
        owner = node_of.get(fx_node.name)
        held_by = f"graph node {owner} ({graph.nodes[owner].name})" if owner is not None else "no graph node"
        raise ReplayError(f"{reader}: input {fx_node.name}, held by {held_by}, is not in memory")

    # Outputs: FX name -> (kind, parameter name).
    output_fx = fx_graph.find_nodes(op="output")[0].args[0]
    wanted: dict[str, list[tuple[str, str]]] = {}
    for value, kind, name in zip(output_fx, step.output_kinds, step.output_names, strict=True):
        if kind in ("loss", "grad") and isinstance(value, torch.fx.Node):
            wanted.setdefault(value.name, []).append((kind, name))
    grad_nodes = set() if graph.gradients_made else {node_of[name] for name, uses in wanted.items()
                                                       if name in node_of and any(kind == "grad" for kind, _ in uses)}
    collected: dict[str, Any] = {}

    # RNG: before the FIRST execution of a random FX node (dropout, rand), the CPU generator state
    # is saved; every later execution (a recomputation) runs from that saved state and then puts
    # back the state it found, so a recomputed mask is bit-identical to the first one and the
    # random stream seen by the rest of the run is the one a run without recomputation sees.
    rng_states: dict[str, torch.Tensor] = {}

    live = [False] * len(graph)
    peak = 0
    releases = part_releases(graph, schedule)
    part_names = {i: _part_names(graph.nodes[i].fx_nodes, by_name) for i, node in enumerate(graph.nodes)
                  if node.part_bytes}

    # the storages each live node holds, (address, bytes), found once per change of what it holds: counting the
    # bytes after every instruction then walks these short lists only
    held: dict[int, list[tuple[int, int]]] = {}

    def storages_of(index: int) -> list[tuple[int, int]]:
        if index not in held:
            names = graph.nodes[index].fx_nodes or (graph.nodes[index].name,)
            keys = (_storage_key_and_bytes(t) for name in names for t in tensors_in(env.get(name)))
            held[index] = [(ptr, nbytes) for ptr, nbytes in keys if ptr not in placeholder_ptrs]
        return held[index]

    def live_bytes() -> int:
        seen: dict[int, int] = {}
        for index in held.keys() - grad_nodes:
            for ptr, nbytes in held[index]:
                seen[ptr] = max(seen.get(ptr, 0), nbytes)
        return sum(seen.values())

    with torch.no_grad():
        for position, op in enumerate(schedule.ops):
            i = op.node
            if not 0 <= i < len(graph):
                raise ReplayError(f"instruction {position}: node {i} does not exist")
            node = graph.nodes[i]
            names = node.fx_nodes or (node.name,)
            if node.is_return:  # the backward's return of the gradients: nothing to run
                live[i] = op.kind == COMPUTE
                continue
            if op.kind == FREE:
                if not live[i]:
                    raise ReplayError(f"instruction {position}: free({i}) {node.name} which is not in memory")
                for name in names:
                    env.pop(name, None)
                live[i] = False
                held.pop(i, None)
                continue
            if op.kind != COMPUTE:
                raise ReplayError(f"instruction {position}: unknown kind {op.kind!r}")
            if live[i]:
                raise ReplayError(f"instruction {position}: compute({i}) {node.name} while it is already in memory")
            reader = f"instruction {position}: compute({i}) {node.name}"
            for name in names:
                fx_node = by_name[name]
                args, kwargs = torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda x, r=reader: lookup(x, r))
                if is_random(fx_node):
                    if name not in rng_states:
                        rng_states[name] = torch.get_rng_state()
                        env[name] = _call(step, fx_node, args, kwargs)
                    else:
                        current = torch.get_rng_state()
                        torch.set_rng_state(rng_states[name])
                        try:
                            env[name] = _call(step, fx_node, args, kwargs)
                        finally:
                            torch.set_rng_state(current)
                else:
                    env[name] = _call(step, fx_node, args, kwargs)
                if name in wanted and name not in collected:
                    collected[name] = env[name]
            live[i] = True
            storages_of(i)
            peak = max(peak, live_bytes())  # the new output is counted before any following free
            changed = {owner for owner, _ in releases.get(position, ())}  # nodes that now hold less
            if node.part_bytes:
                env.pop(names[0], None)  # the outputs live on as getitems, each freed after its own last read
                changed.add(i)
            for owner, part in releases.get(position, ()):  # an output of a multi-output op read for the last time
                for name in part_names[owner][part]:
                    env.pop(name, None)
            for index in changed:
                held.pop(index, None)
                if live[index]:
                    storages_of(index)

    # Outputs held by no Graph node (e.g. a gradient that is a view of a placeholder) are read at the end.
    for name in wanted:
        if name not in collected:
            if name not in side:
                raise ReplayError(f"output {name} (graph node {node_of.get(name)}) was never computed by the schedule")
            collected[name] = lookup(by_name[name], f"output {name}")

    loss = None
    grads: dict[str, torch.Tensor] = {}
    for name, uses in wanted.items():
        for kind, parameter in uses:
            if kind == "loss":
                loss = collected[name]
            else:
                grads[parameter] = collected[name]
    if loss is None:
        raise ReplayError("the joint graph has no loss output")
    return ReplayResult(loss=loss, grads=grads, peak_live_bytes=peak, peak_bytes=peak + graph.fixed.total_bytes)


def _part_names(fx_names: tuple[str, ...], by_name: dict[str, torch.fx.Node]) -> list[list[str]]:
    """FX names of each output of a multi-output op: getitem k and the views of it."""
    owner = by_name[fx_names[0]]
    parts: list[list[str]] = [[] for _ in owner.meta["val"]]
    for name in fx_names[1:]:
        value = by_name[name]
        while (base := aliasing_input(value)) is not None and base is not owner:
            value = base
        if value.target is operator.getitem:
            parts[value.args[1]].append(name)
    return parts


def _run(step: CapturedStep, fx_node: torch.fx.Node, env: dict[str, Any]) -> Any:
    args, kwargs = torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda x: env[x.name])
    with torch.no_grad():
        return _call(step, fx_node, args, kwargs)


def _call(step: CapturedStep, fx_node: torch.fx.Node, args: Any, kwargs: Any) -> Any:
    if fx_node.op == "call_function":
        return fx_node.target(*args, **kwargs)
    if fx_node.op == "get_attr":
        value: Any = step.joint
        for part in str(fx_node.target).split("."):
            value = getattr(value, part)
        return value
    raise ReplayError(f"FX node {fx_node.name}: cannot execute op {fx_node.op!r}")
