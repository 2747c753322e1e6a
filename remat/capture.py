"""Capture a training step (forward, loss, backward) as one joint FX graph.

This module and remat/execute.py are the only homes of private torch APIs.

The joint graph comes from AOTAutograd (`aot_export_joint_with_descriptors`): placeholders are
parameters, buffers, user inputs and the loss tangent; outputs are the loss, then one gradient
per parameter. Planning traces on fake tensors, so GPT-2 at batch 16 x 1024 tokens costs no
device memory and a few hundred MB of host memory.

Module paths ("transformer.h.3.attn") are recorded on every node, backward nodes included,
through forward hooks that annotate the FX node metadata while AOTAutograd traces: the
repeated-block baselines and the reports need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import linecache
import logging
import os
import re
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch._functorch.aot_autograd import aot_export_joint_with_descriptors
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

PRECISIONS = ("fp32", "bf16-mixed")
# What a planned step hands back beside its loss: nothing ("loss": None in the model's other tensors' places), or the
# model's other tensors ("all": logits, hidden states), which the plan holds to the step's end, as the caller does.
OUTPUTS = ("loss", "all")


class CaptureError(ValueError):
    """The model could not be traced into a training graph; the message says why."""


class NothingToDifferentiate(CaptureError):
    """The step has no gradient to compute: nothing that requires grad is read on the way to the loss."""


@dataclass
class CapturedStep:
    joint: torch.fx.GraphModule
    input_kinds: list[str]  # per placeholder: "param", "buffer", "input" or "tangent"
    input_names: list[str]  # parameter / buffer name, or a description of the input
    tied_to: dict[str, str]  # parameter or buffer name -> the first name of the same tensor (tied weights)
    output_kinds: list[str]  # per joint output: "loss", "returned" (handed out beside it), "grad", "mutation", "none"
    output_names: list[str]  # parameter name for gradients, buffer name for mutations
    precision: str
    returns: OutputLayout | None = None  # where the loss sits in what the model returns (None: the loss alone)
    # what the backward runs beyond the forward ops' derivatives: custom autograd.Functions, backward hooks
    own_backward: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputLayout:
    """What the model returns around its loss (a Hugging Face output object, a dict, a tuple), so that a planned step
    returns the same structure: the loss in its place, plain constants as they were, the tensors it hands out
    (`outputs="all"`: logits, hidden states) and None for the rest (with `outputs="loss"`, every other tensor; always,
    objects that hold tensors, such as a cache). `outputs.loss`, `outputs["loss"]` and `outputs[0]` then read the loss
    as they do in eager (Hugging Face's Trainer reads one of them)."""

    spec: pytree.TreeSpec
    loss_leaves: tuple[int, ...]  # where the loss is (a dict may hold it under two keys: "loss", "total_loss")
    constants: tuple  # per leaf: a plain constant (None, a number, a string) as returned; None for anything else
    dropped: tuple[str, ...]  # the leaves returned as None: "logits", "cache", "[1]"
    returned: tuple[int, ...] = ()  # the leaves the planned step hands out, in the order its graph returns them
    constant: tuple[int, ...] = ()  # of those, the ones that need no gradient (detached, integer): handed out so
    given: tuple[tuple[int, int], ...] = ()  # (leaf, k): the leaf is the k-th of `inputs` (returned as it is)
    repeated: tuple[tuple[int, int], ...] = ()  # (leaf, earlier leaf): the same tensor returned twice

    @staticmethod
    def of(returned: Any, loss: torch.Tensor, keep: bool = False, inputs: Sequence[Any] = ()) -> OutputLayout | None:
        """The layout of `returned` around `loss` (one of its tensors); None when the loss is all it is, or where it
        is not one of the leaves torch's pytree finds (an object of a class it does not know). `keep`: hand out its
        other tensors, and those that are `inputs` (the step's inputs, then the model's parameters and buffers) as
        the caller's own tensors, as eager does."""
        _register_dataclasses(returned)
        leaves, spec = pytree.tree_flatten_with_path(returned)
        where = [i for i, (_, leaf) in enumerate(leaves) if leaf is loss]
        if spec.is_leaf() or not where:
            return None
        plain = (*SCALARS, type(None))
        position = {id(x): k for k, x in enumerate(inputs)}
        tensors = [i for i, (_, leaf) in enumerate(leaves)
                   if keep and i not in where and isinstance(leaf, torch.Tensor)]
        given = tuple((i, position[id(leaves[i][1])]) for i in tensors if id(leaves[i][1]) in position)
        first = {}  # a tensor returned twice ({"a": logits, "b": logits}) is handed out once, and is one in both
        for i in tensors:
            first.setdefault(id(leaves[i][1]), i)
        repeated = tuple((i, first[id(leaves[i][1])]) for i in tensors if first[id(leaves[i][1])] != i)
        tensors = [i for i in tensors if first[id(leaves[i][1])] == i]
        kept = tuple(i for i in tensors if id(leaves[i][1]) not in position)
        constants = tuple(leaf if isinstance(leaf, plain) else None for _, leaf in leaves)
        dropped = tuple(_leaf_name(path) for i, (path, leaf) in enumerate(leaves)
                        if i not in where and i not in tensors and i not in dict(repeated)
                        and not isinstance(leaf, plain))
        constant = tuple(i for i in kept if not leaves[i][1].requires_grad)
        return OutputLayout(spec, tuple(where), constants, dropped, kept, constant, given, repeated)

    def handed_out(self, returned: Any) -> list[torch.Tensor]:
        """The tensors of `returned` (an output of this layout) that the planned step hands out."""
        leaves = pytree.tree_leaves(returned)
        return [leaves[i] for i in self.returned]

    def rebuild(self, loss: torch.Tensor, values: Sequence[torch.Tensor] = (),
                inputs: Callable[[], Sequence[Any]] | None = None) -> Any:
        """The output with `loss` and the handed-out `values` in their places; `inputs()`: the live `inputs` that
        `of` was given, for the leaves that are among them."""
        leaves = list(self.constants)
        for i in self.loss_leaves:
            leaves[i] = loss
        for i, value in zip(self.returned, values, strict=True):
            # in eager, a detached or integer output needs no gradient: a loss may add it as a constant
            leaves[i] = value.detach() if i in self.constant else value
        if self.given:
            live = inputs()
            for i, k in self.given:
                leaves[i] = live[k]
        for i, earlier in self.repeated:
            leaves[i] = leaves[earlier]
        return pytree.tree_unflatten(leaves, self.spec)


def _leaf_name(path: tuple) -> str:
    """"logits", "hidden_states[3]", "[1]": a leaf's place in the output, as the user would index it."""
    name = ""
    for key in path:
        if isinstance(key, pytree.GetAttrKey):
            name += f".{key.name}" if name else key.name
        elif isinstance(key, pytree.MappingKey) and isinstance(key.key, str):
            name += f".{key.key}" if name else key.key
        else:
            name += key.__str__()
    return name


@dataclass(frozen=True)
class Call:
    """The arguments of one call, model(*args, **kwargs). The traced step takes the tensors among them (nested in
    lists, tuples and dicts too) as its inputs, in order: `tensors`. Everything else (None, flags, sizes) is fixed
    in the graph, as torch.export fixes constants, so Hugging Face's model(input_ids=..., labels=...) traces."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _register_dataclasses((self.args, self.kwargs))

    @staticmethod
    def of(inputs: Call | torch.Tensor | Sequence[Any] | Mapping[str, Any]) -> Call:
        """A call from positional inputs (a tuple or list, or one tensor), keyword inputs (a dict, or a mapping such
        as Hugging Face's BatchEncoding), or a Call."""
        if isinstance(inputs, Call):
            return inputs
        if isinstance(inputs, torch.Tensor):  # one input, as a factory may give it (it was unpacked along its rows)
            return Call((inputs,))
        if isinstance(inputs, Mapping):
            return Call((), dict(inputs))
        return Call(tuple(inputs))

    def flattened(self) -> tuple[str, list[Any]]:
        """How the arguments nest (tuples, lists, dicts, dataclasses; keywords by name), and their leaves in order."""
        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        return str(spec), leaves

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(leaf for leaf in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(leaf, torch.Tensor))

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """(args, kwargs) of this call with its tensors, in order, replaced by `tensors`."""
        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        given = iter(tensors)
        return pytree.tree_unflatten([next(given) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves],
                                     spec)

    def describe(self) -> list:
        """Shapes of the tensors and reprs of the rest, for a graph's metadata; keyword inputs by name."""
        def describe(value: Any) -> Any:
            return list(value.shape) if isinstance(value, torch.Tensor) else repr(value)

        return [*map(describe, self.args), *(f"{name}={describe(value)}" for name, value in self.kwargs.items())]


def tensor_layout(tensor: torch.Tensor) -> Any:
    """The strides a traced graph assumes: its views (`x.view(b, -1)` from a reshape) hold for these only."""
    if tensor.is_contiguous():
        return "contiguous"
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return tensor.stride()


SCALARS = (bool, int, float, str)


def module_state(model: nn.Module) -> tuple:
    """What the trace takes from the model as fixed, module by module: train or eval, its hooks, its plain settings
    (a dropout's p, a temperature, a flag: public attributes that are numbers or strings, or small lists, tuples, sets
    and dicts of them, such as PEFT's LoRA `scaling` and `merged_adapters`, and those of a config object it holds,
    such as a Hugging Face model's `config`), and its parameters' and
    buffers' shapes, dtypes and devices, and which parameters require grad. A change to any of them is traced and
    planned again: the planned graph has the old value in it (a dropout annealed to 0 kept its first p, a hook added
    later never ran, a model cast to float64 ran in float64 with a float32 plan's memory)."""
    modules = []
    configs: dict[int, tuple] = {}  # by id: one config object is held by many modules
    for module in model.modules():
        settings = []
        for name, value in vars(module).items():
            if name.startswith("_"):
                continue
            setting = _config_settings(value, configs) if _is_config(value) else _plain(value)
            if setting is not None:
                settings.append((name, setting))
        hooks = tuple(map(tuple, (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks,
                                  module._backward_hooks)))
        tensors = tuple((tensor.shape, tensor.dtype, tensor.device, tensor.requires_grad)
                        for tensor in (*module._parameters.values(), *module._buffers.values()) if tensor is not None)
        modules.append((tuple(settings), hooks, tensors))
    return tuple(modules)


_CONTAINERS = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset", dict: "dict"}


def _plain(value: Any, room: list[int] | None = None) -> Any:
    """A number or string as it is; a list, tuple, set or dict of them (nested too, 1 to 1,024 items in all) as a
    tuple, but for an attribute that is a list of numbers alone; None for anything else. PEFT keeps a LoRA layer's
    scale in a dict and its merged adapters in a list of names: `scale_layer`, `set_scale` and `merge_adapter`
    changed the step, and the stale plan ran (a merged update added twice: another loss). An attribute that is a list
    of numbers is no setting: a log of losses kept on the model grows at every step, and made a trace at each."""
    if isinstance(value, SCALARS):
        return value
    if type(value) not in _CONTAINERS:  # (a subclass: an output object, a named tuple of settings: not looked into)
        return None
    top = room is None
    room = [1024] if room is None else room  # items left, over the nesting
    room[0] -= len(value)
    # empty: no setting (a list the forward fills with tensors, an output recorder's, is empty between steps)
    if not value or room[0] < 0:
        return None
    if top and isinstance(value, list) and all(isinstance(item, (int, float)) for item in value):
        return None
    if isinstance(value, dict):
        items = tuple((key, _plain(item, room)) for key, item in value.items())
        plain = all(isinstance(key, SCALARS) and item is not None for key, item in items)
    else:
        items = tuple(_plain(item, room) for item in (sorted(value, key=repr) if isinstance(value, (set, frozenset))
                                                     else value))
        plain = all(item is not None for item in items)
    return (_CONTAINERS[type(value)], items) if plain else None


def _is_config(value: Any) -> bool:
    """A settings object the forward may read: a Hugging Face config (`model.config.router_aux_loss_coef`) or a
    dataclass of settings (nanoGPT's GPTConfig, torchtitan's ModelArgs)."""
    if value is None or isinstance(value, (nn.Module, torch.Tensor, type)) or not hasattr(value, "__dict__"):
        return False  # (a dataclass with __slots__ has no __dict__ to read: not looked into)
    return dataclasses.is_dataclass(value) or callable(getattr(value, "to_dict", None))


def _config_settings(config: Any, seen: dict[int, tuple]) -> tuple:
    """The config's public attributes that are numbers or strings, worked out once per object."""
    if id(config) not in seen:
        seen[id(config)] = tuple((name, value) for name, value in vars(config).items()
                                 if isinstance(value, SCALARS) and not name.startswith("_"))
    return seen[id(config)]


def _register_model_output(cls: type) -> bool:
    """Register a Hugging Face `ModelOutput` class with torch's pytree as Hugging Face does, in its own table of
    registered classes; True if it is one. Hugging Face registers each such class when it is defined or first made,
    but not while `torch.compiler.is_compiling()`, which the trace says (`_compiling`): a class first made there (its
    module imported by the forward, an output class defined in it) was registered by `_register_dataclasses` instead,
    outside Hugging Face's table, and the next eager construction of it, the model's own forward under no_grad
    included, failed with "... is already registered as pytree node"."""
    generic = sys.modules.get("transformers.utils.generic")
    base = getattr(generic, "ModelOutput", None)
    register = getattr(generic, "_register_model_output_pytree_node", None)
    if base is None or register is None or not issubclass(cls, base):
        return False
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = False  # Hugging Face skips the registration while compiling
    try:
        register(cls)
    except Exception:  # another Hugging Face version's registration: register it as any dataclass
        return False
    finally:
        torch.compiler._is_compiling_flag = previous
    return cls in pytree.SUPPORTED_NODES


def _register_dataclasses(value: Any) -> None:
    """A batch made as a dataclass holds tensors that are the step's inputs too: its type is registered with torch's
    pytree (as torch.export asks of its users), so that flattening the call finds them. Unregistered, they were taken
    for constants and the trace failed ("reads a tensor that is not one of its inputs")."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if type(value) not in pytree.SUPPORTED_NODES and not _register_model_output(type(value)):
            try:
                pytree.register_dataclass(type(value))
            except (TypeError, ValueError):  # fields it cannot rebuild the dataclass from (init=False)
                return
        children = [getattr(value, item.name) for item in dataclasses.fields(value)]
    elif isinstance(value, (tuple, list)):
        children = value
    elif isinstance(value, dict):
        children = value.values()
    else:
        return
    for child in children:
        _register_dataclasses(child)


class LossStep(nn.Module):
    """model + loss function + autocast as one module whose output is the scalar loss, or the model's one non-scalar
    output (logits, features) as it is, for the caller's loss. `call`: how the step's inputs, the call's tensors,
    make the model's arguments (None: they are its positional arguments)."""

    def __init__(self, model: nn.Module, loss_fn: Callable | None, precision: str, call: Call | None = None,
                 outputs: str = "loss"):
        super().__init__()
        if outputs not in OUTPUTS:
            raise ValueError(f"unknown outputs={outputs!r}: choose one of {', '.join(map(repr, OUTPUTS))}")
        self.model = model
        self.outputs = outputs
        self.loss_fn = loss_fn
        self.precision = precision
        self.call = call
        self.tracing = False  # set while capture_step traces it: the inputs are the trace's, not the caller's
        # while tracing: the caller's own autocast, entered around the forward alone (capture_step traces the joint
        # graph outside it)
        self.callers_autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.layout: OutputLayout | None = None  # what the traced forward returned around its loss

    def forward(self, *inputs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        output = self.output(*inputs)
        loss = loss_of(output)
        if self.tracing and self.layout is not None and self.layout.returned:
            # handed out after the loss, detached: no gradient comes back into them (the step has one loss), and
            # the joint graph takes no tangent for them
            return (loss, *(value.detach() for value in self.layout.handed_out(output)))
        return loss

    def output(self, *inputs: Any) -> Any:
        """What the model returns (or the loss function makes of it) for the step's inputs."""
        args, kwargs = self.call.with_tensors(inputs) if self.call is not None else (inputs, {})
        if not self.tracing:  # the model's own forward (evaluation): it rebinds its buffers, as eager does
            with _autocast(self.model, self.precision):
                output = self.model(*args, **kwargs)
                return self.loss_fn(output) if self.loss_fn is not None else output
        buffers = [(path, module, name, tensor) for path, module in self.model.named_modules()
                   for name, tensor in module._buffers.items() if tensor is not None]
        frozen = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and not x.requires_grad]
        with self.callers_autocast(), _autocast(self.model, self.precision):
            output = self.model(*args, **kwargs)
            output = self.loss_fn(output) if self.loss_fn is not None else output
        _write_replaced_buffers(buffers)
        self.layout = OutputLayout.of(output, loss_in(output), self.outputs == "all",
                                      [*inputs, *self.model.parameters(), *self.model.buffers()])
        if any(inputs[i].requires_grad for i in frozen):
            # a physics-informed net's x.requires_grad_() in forward: its own derivatives are in the graph, but the
            # caller's tensor is not the one the trace changed, so it gets no .grad (eager leaves one)
            warnings.warn("the model's forward sets requires_grad on an input: the step differentiates through it, "
                          "but the caller's tensor gets no .grad from the planned backward; call x.requires_grad_() "
                          "before the model to have it", stacklevel=2)
        return output


def _write_replaced_buffers(buffers: list[tuple[str, nn.Module, str, torch.Tensor]]) -> None:
    """A forward that replaces a buffer (`self.queue = torch.roll(self.queue, n, 0)`, `self.ema = 0.9 * self.ema +
    ...`) gives it a new value at each eager step. The traced graph sees only writes into its inputs, so the new value
    is written into the buffer it replaces, which the planned step then writes back at each step, as it does a batch
    norm's statistics. Before, the buffer kept its first value, silently: losses and gradients drifted from eager's."""
    def label(path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    holders: dict[int, list[str]] = {}
    for path, _, name, tensor in buffers:
        holders.setdefault(id(tensor), []).append(label(path, name))
    for path, module, name, before in buffers:
        after = module._buffers.get(name)
        if after is None or after is before:
            continue
        others = [h for h in holders[id(before)] if h != label(path, name)]
        if others:  # written into, it would change for the others too, which eager leaves as they were
            raise CaptureError(f"the forward replaces buffer {label(path, name)}, a tensor that "
                               f"{', '.join(others)} {'holds' if len(others) == 1 else 'hold'} too: a planned step "
                               "writes a buffer's new value into it, which would change theirs; give each module a "
                               "buffer of its own, or update it outside the forward")
        if after.shape != before.shape or after.dtype != before.dtype:
            raise CaptureError(f"the forward replaces buffer {label(path, name)} "
                               f"({before.dtype}{list(before.shape)}) with a {after.dtype}{list(after.shape)} "
                               "tensor: a planned step writes a buffer's new value into it, so keep its shape and "
                               "dtype")
        with torch.no_grad():
            # functionalised: ops that read the buffer before keep its old value; one that saved it for its
            # backward (an EMA's product, updated after) makes autograd refuse the trace, explained in _meaning
            before.copy_(after)
        module._buffers[name] = before


def loss_of(returned: Any) -> torch.Tensor:
    """The loss in what the model returned (`loss_in`), in float32 where the model computed it in a lower precision."""
    loss = loss_in(returned)
    if loss.dim() != 0:
        return loss
    # a bf16 loss is reported in float32; a float64 model's loss stays float64
    return loss if loss.dtype == torch.float64 else loss.float()


def loss_in(returned: Any) -> torch.Tensor:
    """The loss in what the model returned: a scalar, a `loss` attribute or key, a tuple's first item; or the one
    non-scalar tensor it returned (logits, features), or the first tensor of an output whose loss is None (a Hugging
    Face model's logits, without labels). Anything else is a CaptureError that says what to return."""
    loss = getattr(returned, "loss", returned)  # Hugging Face ModelOutput
    if isinstance(loss, dict) and "loss" in loss:  # {"loss": ..., "logits": ...}
        loss = loss["loss"]
    if isinstance(loss, (tuple, list)):
        loss = loss[0]
    if loss is None and getattr(returned, "loss", 0) is None:
        # a Hugging Face model called without labels (the Trainer takes them out for label smoothing, or for a loss
        # of its own): its first tensor, the logits, for the caller's loss, as a model that returns logits alone
        _register_dataclasses(returned)
        loss = next((leaf for leaf in pytree.tree_leaves(returned) if isinstance(leaf, torch.Tensor)), None)
        if loss is None:
            raise CaptureError(f"the model returned a {type(returned).__name__} whose loss is None (Hugging Face "
                               "models compute it when given labels), and no tensor that torch's pytree finds in it "
                               "for a loss made outside: pass labels among the inputs, or a loss_fn of the output")
        return loss
    if not isinstance(loss, torch.Tensor):
        raise CaptureError(f"the model returned {type(loss).__name__}, not a loss tensor: return a scalar loss "
                           "(or a dict or an object with a `loss`), one tensor (logits, features), or pass a "
                           "loss_fn")
    if loss.dim() != 0:
        if loss is not returned:  # the step would return a tensor where the model returns a tuple, say
            raise CaptureError(
                f"the model returned a {type(returned).__name__} whose first item is a tensor of shape "
                f"{tuple(loss.shape)}, not a scalar loss: return the loss first, or one tensor (logits, "
                "features) for a loss computed outside, or pass a loss_fn that makes the loss of the output")
        # logits or features, as the model returns them: the caller's loss of them hands back their gradient
    return loss


def uncompiled(model: nn.Module) -> nn.Module:
    """The module `torch.compile(module)` wrapped, with a warning; any other module as it is. A compiled module's
    forward runs Dynamo, which cannot be traced again on fake tensors (the capture failed with "Attempting to use
    FunctionalTensor on its own"); the plan is made and run on the module itself, whose parameters the compiled one
    shares."""
    if not isinstance(model, OptimizedModule):
        return model
    warnings.warn("remat got a torch.compile'd module: it plans and runs the module it wraps (`_orig_mod`, the same "
                  "parameters); remat.apply(..., backend=\"inductor\") compiles the planned graphs", stacklevel=4)
    return model._orig_mod


AUTOCAST_DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def no_autocast():
    """No autocast, whatever the caller is in: around a graph that already holds autocast's casts (a planned graph,
    a split step's forward), which a surrounding autocast would cast again."""
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _callers_autocast() -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast the caller is in (`with torch.autocast("cpu", dtype=torch.bfloat16): loss = model(x)`, as
    Hugging Face's Trainer runs with bf16=True), to be entered again around the model's forward alone."""
    entered = [(device_type, torch.get_autocast_dtype(device_type)) for device_type in AUTOCAST_DEVICES
               if torch.is_autocast_enabled(device_type)]

    @contextlib.contextmanager
    def enter():
        with contextlib.ExitStack() as stack:
            for device_type, dtype in entered:
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            yield
    return enter


def _autocast(model: nn.Module, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        first = next(model.parameters(), None)
        device_type = first.device.type if first is not None else "cpu"
        return torch.autocast(device_type, dtype=torch.bfloat16)
    raise CaptureError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def _compiling():
    """Tell model code that it is being traced, as torch.export does.

    Hugging Face skips value-dependent checks (e.g. on position_ids in the causal-mask code)
    when `torch.compiler.is_compiling()`; AOTAutograd's functional tensors are not the fake
    tensors it otherwise recognises, so without this the trace stops at `.item()`.
    """
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        # a torch.compile'd submodule (regional compilation) runs as the module it wraps: Dynamo cannot trace on the
        # trace's tensors ("Attempting to use FunctionalTensor on its own"); the planned graphs are compiled or not as
        # remat.apply's backend says
        with _quiet_fake_tensor_log(), torch._dynamo.config.patch(disable=True):
            yield
    finally:
        torch.compiler._is_compiling_flag = previous


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    """Fake tensors log the traceback of an op that fails on them (a Linear given the wrong number of features) before
    raising: 19 lines on stderr before remat's own one-line error. The error is raised and explained all the same.
    Also quiet while a model is built (build_on_fake)."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # copy.deepcopy reads each tensor's data pointer, which fake tensors warn of: the copy is made in ours
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _without_onednn():
    """Trace CPU ops without oneDNN. Its fused LSTM layer has a workspace (read by its backward) that fake tensors give
    0 bytes, where a real run holds megabytes (a 3-layer LSTM, batch 32, seq 50: 3.77 MB planned, 22.76 MB measured);
    without it the LSTM is traced as its cells' ops, whose every byte is counted, as GRUs and RNNs always are.
    (torch.backends.mkldnn.flags would also set oneDNN's TF32 flag, which warns on machines without an Intel GPU.)"""
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


def _held_generators(model: nn.Module) -> dict[int, torch.Generator]:
    """The generators the model's modules hold, or their Python modules' globals, by id: one level into the
    containers and helper objects they hold (`self.sampler.g`)."""
    found, places = {}, {}
    for module in model.modules():  # each Python module's globals once: `torch` among them holds thousands of names
        for place in (vars(module), vars(sys.modules.get(type(module).__module__, types.ModuleType("none")))):
            places[id(place)] = place
    for place in places.values():
        for value in place.values():
            items = (value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple))
                     else (value,))
            for item in items:
                held = vars(item).values() if hasattr(item, "__dict__") and not isinstance(item, nn.Module) else ()
                found.update((id(g), g) for g in (item, *held) if isinstance(g, torch.Generator))
    return found


def _rnn_helper(input, hidden, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, layer_fn):
    """torch._decomp's `_rnn_helper` (which nn.RNN, nn.GRU and nn.LSTM decompose through while traced), less the line
    that set the dropout between layers to 0 (`dropout if (train and num_layers < i - 1) else 0.0`, never true): the
    planned step trained a stacked RNN without its dropout (loss and gradients off eager's, silently), and drew no
    random numbers where eager draws one mask per layer."""
    from torch._decomp.decompositions import params_hiddens

    input = input.transpose(0, 1) if batch_first else input
    final_hiddens = []
    for i in range(num_layers):
        cur_params, cur_hidden, bidir_params, bidir_hidden = params_hiddens(params, hidden, i, bidirectional)
        fwd_inp, fwd_hidden = layer_fn(input, cur_hidden, cur_params, has_biases)
        final_hiddens.append(fwd_hidden)
        if bidirectional:
            bwd_inp, bwd_hidden = layer_fn(input, bidir_hidden, bidir_params, has_biases, reverse=True)
            final_hiddens.append(bwd_hidden)
            input = torch.cat([fwd_inp, bwd_inp], fwd_inp.dim() - 1)
        else:
            input = fwd_inp
        if dropout != 0 and train and i < num_layers - 1:  # as eager's RNN.cpp: one mask on each layer's output
            input = torch.dropout(input, dropout, train=True)
    input = input.transpose(0, 1) if batch_first else input
    return input, final_hiddens


@contextlib.contextmanager
def _rnn_dropout_between_layers():
    """Trace stacked RNNs with their dropout between layers (`_rnn_helper`), where torch's decomposition drops it."""
    from torch._decomp import decompositions

    original = decompositions._rnn_helper
    try:
        dropped = "num_layers < i - 1" in inspect.getsource(original)
    except (OSError, TypeError):
        dropped = False
    if dropped:
        decompositions._rnn_helper = _rnn_helper
    try:
        yield
    finally:
        decompositions._rnn_helper = original


def _warn_of_generators_made_in_forward(model: nn.Module, generators: Iterable[torch.Generator]) -> None:
    """A generator the forward makes and seeds at each call (`torch.Generator().manual_seed(3)`) gives eager the same
    draws every time; the planned step holds the one the trace made, and draws on from it (the loss off by 1e-2 from
    the second step, silently). One the model holds, or its module's globals, is drawn from at each step as in eager.
    A generator found in neither is taken to be made in the forward."""
    known = {id(torch.default_generator), *_held_generators(model)}
    if any(id(generator) not in known for generator in generators):
        warnings.warn("the forward draws from a torch.Generator that neither the model nor its module holds: if the "
                      "forward makes (or seeds) it at each call, as for a fixed random projection, the planned step "
                      "draws on from the one made at the trace, and its numbers are not eager's after the first step; "
                      "keep the generator as an attribute, seeded once, or make the fixed tensor once, as a buffer",
                      stacklevel=3)


@contextlib.contextmanager
def _noting_unpreserved_rng_checkpoints(found: list[int]):
    """Count the non-reentrant `torch.utils.checkpoint(..., preserve_rng_state=False)` calls whose function draws random
    numbers (a dropout) into `found`. Eager recomputes such a function in the backward with the generator as it is
    then, so its backward differentiates another mask than its forward drew, and the generator ends a draw further on.
    The trace keeps no recomputation of a checkpoint (AOTAutograd runs the backward without saved-tensor hooks, as
    torch.compile, which ignores the flag): the planned step differentiates the forward's own mask, and its gradients
    (30% to 85% off a small MLP's in a fuzz run) and the random numbers after the step were not eager's, silently."""
    module = torch.utils.checkpoint
    original = module._checkpoint_without_reentrant_generator

    def generator(fn, preserve_rng_state=True, *args, **kwargs):
        if preserve_rng_state:
            return (yield from original(fn, preserve_rng_state, *args, **kwargs))
        mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
        graph = getattr(getattr(mode, "tracer", None), "graph", None)  # the graph the trace is building
        before = set(graph.nodes) if graph is not None else set()
        result = yield from original(fn, preserve_rng_state, *args, **kwargs)
        if graph is not None and any(torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
                                     for node in graph.nodes if node not in before):
            found.append(1)
        return result

    module._checkpoint_without_reentrant_generator = generator
    try:
        yield
    finally:
        module._checkpoint_without_reentrant_generator = original


@contextlib.contextmanager
def _refusing_reseeds(model: nn.Module):
    """A forward that seeds torch's generator (`torch.manual_seed(3)` before a fixed random projection) draws the same
    numbers at every call in eager; the trace does not keep the seeding, so the planned step drew on from the
    generator's state: other numbers from the second step (a loss off by 1e-2, silently). Refused instead; as is
    one that seeds a generator the model holds (`self.g.manual_seed(3)`: a method of a C type, not patched here, so
    each held generator is set to TRACE_SEED for the trace and checked after it). Yields the refusal and a check."""
    def refuse(*args, **kwargs):
        raise CaptureError("the forward seeds torch's random number generator (torch.manual_seed / torch.seed / "
                           "torch.set_rng_state, or torch.cuda's), which a planned step cannot do at each call: its "
                           "random ops draw on from the generator's state. Make a fixed random tensor once (in "
                           "__init__, as a buffer), or keep a torch.Generator of your own as an attribute, seeded "
                           "once, and draw from it (generator=...)")

    def check_held() -> None:
        if any(generator.initial_seed() != TRACE_SEED for generator, _ in held):
            raise CaptureError("the forward seeds a torch.Generator the model holds (generator.manual_seed / .seed "
                               "/ .set_state), which a planned step cannot do at each call: its random ops draw on "
                               "from the generator's state, and their numbers are not eager's after the first step. "
                               "Seed the generator once (in __init__) and draw on from it, or make the fixed random "
                               "tensor once, as a buffer")

    # (CUDA's too: a no-op for a step traced on CPU, but the plan runs where the model is)
    saved = [(module, name, getattr(module, name))
             for module, names in ((torch, _SEEDING), (torch.random, _SEEDING),
                                   (torch.cuda, _CUDA_SEEDING), (torch.cuda.random, _CUDA_SEEDING))
             for name in names]
    def refusing(original):
        def call(*args, **kwargs):  # torch's own code may: torch.utils.checkpoint puts the state back to recompute
            if _in_torch(sys._getframe(1)):
                return original(*args, **kwargs)
            refuse()
        return call

    for module, name, original in saved:
        setattr(module, name, refusing(original))
    # Seeded another way (torch.default_generator.manual_seed, an imported alias), the generator's seed is no longer
    # the one set here for the trace: _RecordGradMode sees that at the next op (the user's state is put back after)
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(TRACE_SEED)
    held = [(generator, generator.get_state()) for generator in _held_generators(model).values()
            if generator is not torch.default_generator]
    for generator, _ in held:
        generator.manual_seed(TRACE_SEED)
    try:
        yield refuse, check_held
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        torch.set_rng_state(state)
        for generator, held_state in held:
            generator.set_state(held_state)


TRACE_SEED = 0x7E3A_C0DE_5EED_0001  # no seed a user would pick
_SEEDING = ("manual_seed", "seed", "set_rng_state")
_CUDA_SEEDING = ("manual_seed", "manual_seed_all", "seed", "seed_all", "set_rng_state", "set_rng_state_all")


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


@contextlib.contextmanager
def _keeping_module_state(model: nn.Module):
    """Undo what the traced forward wrote onto its modules: an attribute set or replaced (`self.acc = ...`, a counter,
    a cache), a buffer or parameter replaced and a hook installed. Those writes happen once, at the trace, with fake
    tensors: `model.acc` was left a FakeTensor that every later read failed on, and never changed with the steps the
    plan runs. A tensor written so is said in a warning (return it from forward, or compute it outside)."""
    modules = dict(model.named_modules())
    before = {path: (dict(vars(m)), dict(m._buffers), dict(m._parameters)) for path, m in modules.items()}
    hooks = {path: {name: dict(getattr(m, name)) for name in _HOOK_TABLES} for path, m in modules.items()}
    try:
        yield
    finally:
        for path, module in modules.items():
            # a hook the forward installs (Hugging Face's output recorders, at the first forward, behind a flag
            # that is undone below) is in the traced graph; left on, it was installed again at every trace, and the
            # step's signature, which holds the hooks, changed at every call: a trace and a plan per step
            for name in _HOOK_TABLES:
                table = getattr(module, name)
                for key in [key for key in table if key not in hooks[path][name]]:
                    del table[key]
        written = []
        for path, module in modules.items():
            attributes, buffers, parameters = before[path]
            for name in [n for n in vars(module) if n not in attributes]:
                value = vars(module).pop(name)
                written.append((path, name, value))
            for name, value in attributes.items():
                if name not in vars(module):  # deleted in the forward (`del self.cache`)
                    vars(module)[name] = value
                elif vars(module)[name] is not value:
                    written.append((path, name, vars(module)[name]))
                    vars(module)[name] = value
            for name, value in buffers.items():
                if module._buffers.get(name, value) is not value:
                    module._buffers[name] = value
            # a module registered under two names (`self.m = self.l`, one layer in two Sequentials) had its
            # parameters swapped for AOTAutograd's functional tensors under both and put back under one: the
            # user's model was left holding FunctionalTensors, and every later use of it failed
            for name, value in parameters.items():
                if module._parameters.get(name, value) is not value:
                    module._parameters[name] = value
        # the old weight_norm's and spectral_norm's pre-hooks set the weight before each forward: in the graph
        computed = {(path, name) for path, module in modules.items() for name in _computed_weights(module)}
        tensors = [f"{path + '.' if path else ''}{name}" for path, name, value in written
                   if isinstance(value, torch.Tensor) and (path, name) not in computed]
        if tensors:
            warnings.warn(f"the model's forward sets {', '.join(tensors)} to a tensor: the planned step runs the "
                          "traced graph, not the forward's Python code, so such a value is not set at each step (it "
                          "keeps what it had before planning); return it from forward or compute it outside",
                          stacklevel=2)


def _warn_of_forward_hooks(model: nn.Module) -> None:
    """Forward hooks run when the step is traced, once, on fake tensors: what they do to a module's inputs or output is
    in the traced graph, what they keep elsewhere (activations appended to a list, a logger) is not updated at each
    step, and holds the trace's tensors, which cannot be read. Weight norm's and spectral norm's pre-hooks compute the
    weight, which the graph has; Hugging Face's `enable_input_require_grads` hook (which gradient checkpointing
    installs) only makes the embeddings' output require grad, which the graph has too."""
    hooked = [path or type(model).__name__ for path, module in model.named_modules()
              if any(not isinstance(hook, _weight_computing_hooks()) and not _requires_grad_hook(hook)
                     for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()))]
    if _global_hooks("_global_forward_hooks", "_global_forward_pre_hooks"):
        hooked.insert(0, "every module (register_module_forward_hook)")
    if hooked:
        where = ", ".join(hooked[:3]) + (" and more" if len(hooked) > 3 else "")
        warnings.warn(f"forward hooks on {where} run once, when the step is traced: what they change in a "
                      "module's inputs or output is planned, but what they record elsewhere (activations kept in a "
                      "list, a logger) is not updated at each step, and holds tensors of the trace that cannot be "
                      "read; compute such values from the model's outputs", stacklevel=3)
    # Backward hooks too: the planned backward is the traced one (a logger hook was called once, at the trace, and
    # never at a step, with no word said)
    hooked = _backward_hooked(model)
    if _global_backward_hooks():
        hooked.insert(0, "every module (register_module_full_backward_hook)")
    if hooked:
        where = ", ".join(hooked[:3]) + (" and more" if len(hooked) > 3 else "")
        warnings.warn(f"backward hooks on {where} run once, when the step is traced: what they change in the "
                      "gradients is planned, but what they record elsewhere (gradient norms kept in a list, a "
                      "logger) is not updated at each step; read the gradients after backward() instead, or hook the "
                      "parameters (`p.register_hook`, `p.register_post_accumulate_grad_hook`), whose hooks run at "
                      "each step", stacklevel=3)


def _requires_grad_hook(hook: Any) -> bool:
    return (getattr(hook, "__name__", "") == "make_inputs_require_grads"
            and getattr(hook, "__module__", "").startswith("transformers."))


def _computed_weights(module: nn.Module) -> set[str]:
    """The attributes the old weight_norm's and spectral_norm's pre-hooks set before each forward (`weight`)."""
    return {hook.name for hook in module._forward_pre_hooks.values() if isinstance(hook, _weight_computing_hooks())}


def _weight_computing_hooks() -> tuple[type, ...]:
    """The old weight_norm's and spectral_norm's pre-hooks: they compute a weight, which the traced graph has."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return WeightNorm, SpectralNorm


@contextlib.contextmanager
def _record_module_paths(model: nn.Module):
    """Annotate every traced node with the path of the innermost module that issued it."""
    active: list[str] = []

    def enter(name: str):
        def hook(module, args):
            active.append(name)
            fx_traceback.current_meta["custom"] = {"module": name}
        return hook

    def leave(module, args, output):
        active.pop()
        fx_traceback.current_meta["custom"] = {"module": active[-1] if active else ""}

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with fx_traceback.preserve_node_meta():
            yield
    finally:
        for handle in handles:
            handle.remove()


NO_GRAD_KEY = "no_grad"  # node.meta["custom"][NO_GRAD_KEY]: the op ran with grad disabled (torch.no_grad(), ...)


class _RecordGradMode(torch.overrides.TorchFunctionMode):
    """Marks the nodes each torch call issues while grad is disabled. The joint graph keeps no grad-mode regions: a
    value computed under `torch.no_grad()` is a constant there only because the backward sends it nothing, so a
    forward graph captured again (remat.split's GraphStep) would differentiate it. The mark lets it run that op
    under no_grad again (spectral_norm's power iteration; a scale computed under no_grad: 9% off in the split
    step's gradients before).

    It also records what the step's backward runs beyond the derivatives of the forward's ops (`own_backward`),
    which a forward graph captured again would not keep: custom autograd.Functions whose output takes part in the
    backward (`recording_functions`), module backward hooks, tensor hooks, and hooks on an op's grad_fn (the
    forward reads `grad_fn` to register them)."""

    def __init__(self):
        super().__init__()
        self.own_backward: dict[str, None] = {}  # in the order first seen
        self.generators: dict[int, torch.Generator] = {}  # the generators random ops drew from (generator=...)
        self.reseeded = False  # the forward seeded torch's generator (_refusing_reseeds set TRACE_SEED)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(kwargs.get("generator"), torch.Generator):
            self.generators[id(kwargs["generator"])] = kwargs["generator"]
        self.reseeded = self.reseeded or torch.initial_seed() != TRACE_SEED
        if func is torch.Tensor.register_hook:
            self.own_backward[TENSOR_HOOK] = None
        elif getattr(func, "__self__", None) is torch._C.TensorBase.grad_fn and not _in_torch(sys._getframe(1)):
            # the model's code reads an op's grad_fn: to hook it (torch's own reads, for Functions and module hooks,
            # are recorded as those)
            self.own_backward["a hook on an op's grad_fn"] = None
        if torch.is_grad_enabled():
            return func(*args, **kwargs)
        meta = fx_traceback.current_meta
        had, before = "custom" in meta, meta.get("custom")
        meta["custom"] = {**(before or {}), NO_GRAD_KEY: True}
        try:
            return func(*args, **kwargs)
        finally:
            if had:
                meta["custom"] = before
            else:
                meta.pop("custom", None)

    @contextlib.contextmanager
    def recording_functions(self, model: nn.Module):
        """Record the custom autograd.Functions whose output requires grad (their backward runs: not one applied to
        a frozen layer's output, under no_grad, or inside another Function's forward), by patching Function.apply
        for the trace, and the model's backward hooks (a full one runs through torch's BackwardHookFunction)."""
        if _backward_hooked(model) or _global_backward_hooks():
            self.own_backward[MODULE_BACKWARD_HOOK] = None
        original = torch.autograd.Function.__dict__["apply"]

        def apply(cls, *args, **kwargs):
            output = original.__func__(cls, *args, **kwargs)
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves(output)):
                name = cls.__qualname__
                self.own_backward[MODULE_BACKWARD_HOOK if name == "BackwardHookFunction"
                                  else f"custom autograd.Function {name}"] = None
            return output

        torch.autograd.Function.apply = classmethod(apply)
        try:
            yield
        finally:
            torch.autograd.Function.apply = original


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _in_torch(frame) -> bool:
    return os.path.abspath(frame.f_code.co_filename).startswith(_TORCH_DIR)


TENSOR_HOOK = "a tensor hook (register_hook)"
MODULE_BACKWARD_HOOK = "a module's backward hook"


def _backward_hooked(model: nn.Module) -> list[str]:
    """The paths of the model's modules with backward hooks (full or not, and pre-hooks)."""
    return [path or type(model).__name__ for path, module in model.named_modules()
            if module._backward_hooks or module._backward_pre_hooks]


def _global_backward_hooks() -> bool:
    """Whether backward hooks are registered for every module (register_module_full_backward_hook)."""
    return _global_hooks("_global_backward_hooks", "_global_backward_pre_hooks")


def _global_hooks(*tables: str) -> bool:
    from torch.nn.modules import module

    return any(getattr(module, table, None) for table in tables)


def ran_without_grad(node: torch.fx.Node) -> bool:
    """Whether the captured op ran with grad disabled (_RecordGradMode)."""
    return bool((node.meta.get("custom") or {}).get(NO_GRAD_KEY))


def capture_step(model: nn.Module, example_inputs: Call | Sequence[Any] | dict[str, Any],
                 loss_fn: Callable | None = None, precision: str = "fp32", outputs: str = "loss",
                 warn_of_hooks: bool = True, in_callers_autocast: bool = True) -> CapturedStep:
    """Trace model(*example_inputs) (or model(**example_inputs) for a dict, or a Call) -> loss -> backward into a
    joint FX graph whose user inputs are the call's tensors, in order (`Call.tensors`). `outputs="all"`: the joint
    graph also returns the model's other tensors, after the loss (`OutputLayout`).

    Works on real or fake tensors alike; `capture_fake` is the memory-free path for planning.

    An autocast the caller is in (the user's own, around the planned module's call) covers the model's forward alone,
    as eager's does when the backward is called after the `with` block (as torch recommends, and the Trainers do).
    Left on over the whole trace it also cast the backward: BERT's attention with dropout (SDPA's math path, which
    runs in float32 on CPU) got bfloat16 matmuls in its backward (other gradients than eager's, and another graph
    than the plan made for the same step with precision="bf16-mixed", which was refused). `in_callers_autocast=False`:
    the forward already holds the casts (a split step's, captured again from the rewritten forward graph), which a
    second autocast cast again (its float32 attention matmuls in bfloat16: another loss than eager's).
    """
    if precision not in PRECISIONS:
        raise CaptureError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    call = Call.of(example_inputs)
    if not any(p.requires_grad for p in model.parameters()) and not any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in call.tensors):
        # a frozen model attacked through its input (adversarial examples, saliency) still has a backward to plan
        raise NothingToDifferentiate("neither the model's parameters nor its inputs require grad: nothing to "
                                     "differentiate")
    _register_plain_tensors(model)
    if warn_of_hooks:  # (a split step's capture runs the same model's hooks: said once, for the unsplit one)
        _warn_of_forward_hooks(model)
    step = LossStep(model, loss_fn, precision, call, outputs)
    step.tracing = True
    if in_callers_autocast:
        step.callers_autocast = _callers_autocast()
    grad_mode = _RecordGradMode()
    with _keeping_module_state(model), _record_module_paths(model), _compiling(), _without_onednn(), \
            _refusing_reseeds(model) as (refuse_reseed, check_held_generators), grad_mode.recording_functions(model), \
            _noting_unpreserved_rng_checkpoints(unpreserved := []), _rnn_dropout_between_layers(), \
            contextlib.ExitStack() as stack, warnings.catch_warnings(), grad_mode, no_autocast():
        # AOTAutograd differentiates in anomaly mode, which warns "Error detected in ..." with a forward traceback
        # where an op's backward fails, also where torch recovers: the error, if any, is explained below
        warnings.filterwarnings("ignore", message="Error detected in")
        try:
            joint = aot_export_joint_with_descriptors(stack, step, call.tensors)
        except CaptureError:
            raise
        except Exception as error:  # torch raises many types; the user needs the gist
            raise CaptureError(f"could not trace the training step: {_explain(error)}") from error
        if grad_mode.reseeded:
            refuse_reseed()
        check_held_generators()
    gm = joint.graph_module
    if warn_of_hooks:
        _warn_of_generators_made_in_forward(model, grad_mode.generators.values())
    if warn_of_hooks and unpreserved:
        warnings.warn(f"torch.utils.checkpoint(..., preserve_rng_state=False) around random ops ({len(unpreserved)} "
                      "call(s)): eager recomputes them in the backward with other random numbers than its forward "
                      "drew, and differentiates those; the planned step differentiates the forward's own (as "
                      "torch.compile does, which ignores the flag), so its gradients, and the generator's state after "
                      "the step, are not eager's. Pass preserve_rng_state=True (eager's and the plan's then agree), or "
                      "drop the checkpoint: the plan chooses what to recompute", stacklevel=3)
    if warn_of_hooks and TENSOR_HOOK in grad_mode.own_backward:
        warnings.warn("a tensor hook registered in the forward (`h.register_hook(...)`) runs once, when the step is "
                      "traced: what it changes in the gradient is planned, but what it records elsewhere (a logger, "
                      "a list) is not updated at each step", stacklevel=3)
    with no_autocast():  # these run the traced ops again on fake tensors: in the dtypes traced, not cast again
        _refuse_side_effects(gm)
        _bernoulli_in_layout(gm)
        _real_layouts(gm, _copies_of_their_own(gm))
    input_kinds, input_names = [], []
    for node in gm.graph.find_nodes(op="placeholder"):
        kind, name = _describe_input(node.meta.get("desc"))
        input_kinds.append(kind)
        input_names.append(name)
    output_node = gm.graph.find_nodes(op="output")[0]
    output_kinds, output_names = [], []
    for value, desc in zip(output_node.args[0], output_node.meta.get("desc", []), strict=False):
        kind, name = _describe_output(desc, value)
        output_kinds.append(kind)
        output_names.append(name)
    parameters = {name for name, kind in zip(input_names, input_kinds, strict=True) if kind == "param"}
    written = [name for name, kind in zip(output_names, output_kinds, strict=True)
               if kind == "mutation" and name in parameters]
    if written:
        names = ", ".join(name.removeprefix("model.") for name in written)
        raise CaptureError(f"the forward writes into parameter {names} in place (weight clipping with clamp_ under "
                           "no_grad, nn.Embedding(max_norm=...) renormalising the rows it looks up), which a planned "
                           "step cannot do: clip or renormalise outside the forward (after optimizer.step(), under "
                           "torch.no_grad()); model.model is the module itself")
    if "grad" not in output_kinds:
        raise NothingToDifferentiate("no parameter gets a gradient from the model's output: it does not depend on "
                                     "them through differentiable ops (argmax, comparisons, .detach(), integer "
                                     "outputs), so there is nothing to train; return a loss made of the model's "
                                     "outputs")
    return CapturedStep(gm, input_kinds, input_names, _tied_tensors(step), output_kinds, output_names, precision,
                        step.layout, tuple(grad_mode.own_backward))


def _register_plain_tensors(model: nn.Module) -> None:
    """Register each tensor kept as a plain attribute (`self.mask = torch.tril(...)`) as a non-persistent buffer.
    The trace would otherwise meet it as a constant, which it refuses; as a buffer it is an input of the step,
    read afresh at each call, it moves with the module, and state_dict stays as it was.

    Not the weight that the old `torch.nn.utils.spectral_norm`'s pre-hook sets before each forward: the forward never
    reads the attribute's value (the graph computes the weight from weight_orig), and spectral_norm keeps it as
    `weight_orig.data`, a tensor sharing the parameter's storage, which AOTAutograd refused as a buffer ("does not yet
    handle non-differentiable view input mutations ... share storage")."""
    for module in model.modules():
        computed = _computed_weights(module)
        for name, value in list(vars(module).items()):
            if name in computed:
                continue
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and not value.requires_grad:
                delattr(module, name)
                module.register_buffer(name, value, persistent=False)


Spec = TypeVar("Spec")


def capture_fake(build: Callable[[], Spec], precision: str = "fp32") -> tuple[Spec, CapturedStep]:
    """Build a model spec (an object with .model, .example_inputs, .loss_fn) and trace it on
    fake tensors: shapes and dtypes only, no parameter or activation memory."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    spec = build_on_fake(build, mode)
    with mode:
        step = capture_step(spec.model, spec.example_inputs, spec.loss_fn, precision)
    return spec, step


def build_on_fake(build: Callable[[], Spec], mode: FakeTensorMode) -> Spec:
    """Run `build` (it returns an object with .model and .example_inputs) so that every tensor is fake in `mode`.

    Inside `mode` first, which costs no memory. Some model code reads a tensor's value while it builds: torch's
    nn.init.trunc_normal_ (ViT's and ConvNeXt's init), drop-path rates made with .tolist(). Fake tensors have no
    values, and a module of fake parameters cannot be cast or moved (`model.to(torch.bfloat16)`, `.half()`: torch swaps
    each parameter, which fake ones refuse), so such a model is built on real CPU tensors instead and its parameters,
    buffers and example inputs are then made fake tensors of `mode` (same shapes and dtypes). The random number
    generator is left as it was."""
    try:
        with mode, _quiet_fake_tensor_log():
            spec = build()
    except Exception as error:
        if not (_reads_values(error) or _casts_parameters(error)):
            raise
    else:
        # copy.deepcopy of a fake tensor makes one of a new mode (nn.TransformerEncoder deep-copies its layer, and
        # many models clone their blocks so), which the trace refuses beside ours: same shapes and dtypes in ours
        def into_mode(tensor: torch.Tensor) -> torch.Tensor:
            if getattr(tensor, "fake_mode", None) is mode:
                return tensor
            with mode:
                return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)

        _replace_tensors(spec, into_mode)
        return spec
    with torch.random.fork_rng(devices=[]):
        spec = build()
    _replace_tensors(spec, lambda tensor: mode.from_tensor(tensor, static_shapes=True))
    return spec


def _replace_tensors(spec: Spec, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Put convert(tensor) in place of each parameter, buffer, tensor attribute and example input of the spec,
    once per tensor (tied weights stay one parameter); a tensor that `convert` returns as it is stays."""
    made: dict[int, torch.Tensor] = {}  # by the old tensor's id

    def one(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in made:
            new = convert(tensor)
            if new is not tensor and isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new, tensor.requires_grad)
            made[id(tensor)] = new
        return made[id(tensor)]

    for module in spec.model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    table[name] = one(tensor)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):
                setattr(module, name, one(value))
    spec.example_inputs = pytree.tree_map(lambda x: one(x) if isinstance(x, torch.Tensor) else x, spec.example_inputs)


def _reads_values(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a fake tensor refusing to give a value."""
    return any(isinstance(cause, DataDependentOutputException) for cause in _causes(error))


def _casts_parameters(error: BaseException | None) -> bool:
    """Whether `error` is torch's refusal to swap a module's fake parameter for its cast or moved copy."""
    return any(isinstance(cause, RuntimeError) and str(cause).startswith("_apply(): Couldn't swap")
               for cause in _causes(error))


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and the errors it was raised from, the latest first."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


# What a trace cannot follow, said in the user's terms: the step is traced once into one graph with fixed shapes.
_VALUE_DEPENDENT = (
    (DynamicOutputShapeException, "an op's output shape depends on tensor values (boolean-mask indexing, nonzero, "
     "unique, ...), and one graph has fixed shapes: keep shapes fixed (torch.where, a mask multiplied in, a fixed "
     "capacity per expert)"),
    ((DataDependentOutputException, GuardOnDataDependentSymNode), "Python reads a tensor's value (`if tensor ...:`, "
     "`.item()`, `.tolist()`), and one graph cannot follow a branch on data: compute it with tensor ops "
     "(torch.where), or decide it outside the model"),
)


def _reads_random(where: str) -> bool:
    """Whether the line `where` names ("path:line `code`"), or one of the few before it, draws a random number
    (wav2vec2's LayerDrop: `dropout_probability = torch.rand([])`, then `skip_the_layer = ...`, then `if not
    skip_the_layer ...`)."""
    found = re.match(r"(.*):(\d+) `", where)
    if found is None:
        return "rand" in where
    path, line = found.group(1), int(found.group(2))
    return any("rand" in linecache.getline(path, k) for k in range(max(1, line - 4), line + 1))


def _explain(error: BaseException) -> str:
    """The gist of a tracing error: what torch could not trace, in the user's terms where it is one we know, and
    the line of the model's code (outside torch and remat) that asked for it."""
    text = str(error).strip()
    gist = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    meaning = _in_torch_nn(error) or _meaning(error)
    if meaning:
        gist = f"{meaning} (torch: {gist})"
    where = _model_line(error)
    if where and meaning and meaning.startswith("Python reads a tensor's value") and _reads_random(where):
        # LayerDrop (wav2vec2's and HuBERT's layerdrop=0.1 by default) and stochastic depth skip layers at random
        gist += ("; a branch on a random number (LayerDrop, stochastic depth) is one a traced graph cannot take: set "
                 "its probability to 0 (Hugging Face: layerdrop=0.0), or drop layers with a mask multiplied in")
    return f"{where}: {gist}" if where else gist


# Values torch.nn's own code reads, which the user cannot rewrite: (function, what to do instead).
_READ_BY_TORCH_NN = {
    "_detect_is_causal_mask": "torch's transformer layers compare the mask's values to tell whether it is causal, "
                              "which one traced graph cannot do: pass is_causal=True with a causal mask",
}
_NUM_BATCHES_TRACKED = ("a batch norm with momentum=None averages by 1 / num_batches_tracked, a value Python reads, "
                        "which one traced graph cannot follow: give the norm a momentum (torch's default is 0.1)")


def _in_torch_nn(error: BaseException) -> str | None:
    """Where a value is read in torch.nn's own code (the user's line is only the call): what to do instead."""
    if not _reads_values(error):
        return None
    nn_dir = os.path.dirname(os.path.abspath(nn.__file__)) + os.sep
    frames = traceback.extract_tb(error.__traceback__)
    users = [i for i, frame in enumerate(frames) if _is_users(frame)]
    inner = [frame for frame in frames[users[-1] + 1 if users else 0:]  # called from the user's last line
             if os.path.abspath(frame.filename).startswith(nn_dir)]
    if not inner:
        return None
    frame = inner[-1]
    if frame.name in _READ_BY_TORCH_NN:
        return _READ_BY_TORCH_NN[frame.name]
    if "num_batches_tracked" in (frame.line or ""):
        return _NUM_BATCHES_TRACKED
    return (f"torch's own {frame.name} ({os.path.relpath(frame.filename, os.path.dirname(nn_dir))}:{frame.lineno}) "
            "reads a tensor's value, which one traced graph cannot follow: the module's settings or arguments "
            "decide whether it does (see its documentation)")


# A tensor the step reads that is none of its inputs, parameters or buffers becomes a constant of the graph, which
# fake tracing refuses (and a real run would keep the example's value): torch's words for it, on fake and real inputs.
_NOT_AN_INPUT = ("Unexpected fake buffer", "Please convert all Tensors to FakeTensors first")
_NOT_AN_INPUT_MEANING = (
    "the step reads a tensor that is not one of its inputs, parameters or buffers (a loss_fn that closes over the "
    "targets, or a tensor the model reads from a global): pass it as an input, e.g. a module whose forward(x, "
    "targets) returns the loss, with example_inputs=(x, targets); register a constant with register_buffer")


def _meaning(error: BaseException) -> str | None:
    """What `error`, or an error it was raised from, means in the user's terms (_VALUE_DEPENDENT, _NOT_AN_INPUT), if
    we know."""
    for cause in _causes(error):
        for kinds, meaning in _VALUE_DEPENDENT:
            if isinstance(cause, kinds):
                return meaning
        if any(words in str(cause) for words in _NOT_AN_INPUT):
            return _NOT_AN_INPUT_MEANING
        if "modified by an inplace operation" in str(cause):
            saved_by = re.search(r"which is output \d+ of (\w+)", str(cause))
            if saved_by:  # an activation, not a buffer: eager's backward refuses it too
                return (f"an in-place op writes a value that {saved_by.group(1)} saved for its backward (`h.add_(x)`, "
                        "`h += x`, `relu_(h)` after the op that made h), which eager's backward refuses too; use the "
                        "out-of-place op (`h = h + x`)")
            return ("a value an op saved for its backward is written later in the forward: a buffer replaced after "
                    "an op that reads it (an EMA updated after its use: `self.ema = 0.9 * self.ema + ...`), which the "
                    "planned step writes into the buffer, or an in-place op on such a value; read it as "
                    "`self.ema.clone()` in that op, or update it after the step")
        if "returned an invalid gradient" in str(cause) and "expected shape compatible with" in str(cause):
            # torch.compile fails on these alike (AOTAutograd's view replay); eager runs them
            return ("AOTAutograd, which traces the step as torch.compile does, cannot differentiate an in-place shape "
                    "change of a view that is then written in place (`x = x.unsqueeze(0).squeeze_(0)`, `t_`, "
                    "`transpose_`, then `x[:, :4].relu_()`), which eager runs: use the out-of-place form "
                    "(`x = x.squeeze(0)`, `x = x.t()`)")
        if "use_reentrant=True" in str(cause):
            return ("torch.utils.checkpoint(..., use_reentrant=True) cannot be traced: remat differentiates the step "
                    "with torch.autograd.grad, which a reentrant checkpoint refuses; pass use_reentrant=False, or "
                    "drop the checkpoint and let the plan choose what to recompute")
    return None


def _is_users(frame: traceback.FrameSummary) -> bool:
    """Whether a traceback frame is the model's code: in neither torch nor remat."""
    internal = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (torch.__file__, __file__))
    return not os.path.abspath(frame.filename).startswith(internal) and not frame.filename.startswith("<")


def _model_line(error: BaseException) -> str:
    """"file.py:31 `if x.mean() > 0:`": the innermost frame of the traceback in neither torch nor remat."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if _is_users(frame)]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}" + (f" `{frame.line.strip()}`" if frame.line else "")


def _tied_tensors(module: nn.Module) -> dict[str, str]:
    """Tied weights (GPT-2's wte and lm_head) trace as two placeholders of one storage, and so does a buffer that two
    modules hold (a mask made once and kept by every layer): name -> the first name of the same tensor."""
    first_name: dict[int, str] = {}
    tied = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        canonical = first_name.setdefault(id(tensor), name)
        if canonical != name:
            tied[name] = canonical
    return tied


@torch.library.custom_op("remat::bernoulli_like", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def bernoulli_like(like: torch.Tensor, p: float) -> torch.Tensor:
    """`torch.empty_like(like).bernoulli_(p)`: a mask drawn in `like`'s own layout, as eager's in-place dropout
    draws it."""
    return torch.empty_like(like).bernoulli_(p)


@bernoulli_like.register_fake
def _(like: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(like)


def _bernoulli_in_layout(gm: torch.fx.GraphModule) -> None:
    """An in-place dropout (`F.dropout(h, inplace=True)`, `nn.Dropout(inplace=True)`) draws its mask with
    `empty_like(h).bernoulli_(p)`: in `h`'s layout, element by element in memory order. Functionalized, that is
    `bernoulli.p(empty_like(h), p)`, whose output is contiguous: on a strided `h` (a transposed batch norm output)
    the planned step drew each element another number than eager did (another loss and other gradients, silently).
    The pair is made one op that draws in place again (an `empty_like` holds no values a `bernoulli.p` could read)."""
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.bernoulli.p)):
        empty = node.args[0]
        if not (isinstance(empty, torch.fx.Node) and empty.target is torch.ops.aten.empty_like.default
                and len(empty.users) == 1 and len(node.args) == 2 and not node.kwargs
                and empty.kwargs.get("memory_format", torch.preserve_format) is torch.preserve_format
                and set(empty.kwargs) <= {"memory_format"}):  # (another dtype or layout asked: left as it is)
            continue
        node.target = torch.ops.remat.bernoulli_like.default
        node.args = (empty.args[0], node.args[1])
        gm.graph.erase_node(empty)
    gm.recompile()


@torch.library.custom_op("remat::copy_like", mutates_args=())
def copy_like(like: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like(like).copy_(src)`: `src` in a tensor of `like`'s shape and dtype, holding its own elements
    only."""
    return torch.empty_like(like).copy_(src)


@copy_like.register_fake
def _(like: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like)


def _copies_of_their_own(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, Any]:
    """A write into part of a tensor (`h[:, 0] = h[:, 0] * 3` on a clone) is functionalized as
    `select_scatter(h, copy(select(h), value))`. The functional `copy` clones its first argument's whole storage
    (the whole of h, as `clone_preserve_strides` does) and its fake output holds the view's span only: a (2, 3)
    select of a (2, 4, 3) tensor held 96 bytes where the trace said 60 (448 bytes measured against 416 planned). Such a
    copy becomes `remat::copy_like`, which holds the view's elements alone, as the plan counts them (the scatter
    reads its values, not its layout). The nodes rewritten -> their new values (a non-dense view's copy is
    contiguous), for `_real_layouts` to trace the ops after them again."""
    rewritten = {}
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.copy.default)):
        like, src = (node.args[0].meta.get("val"), node.args[1].meta.get("val")) if len(node.args) == 2 and all(
            isinstance(x, torch.fx.Node) for x in node.args) else (None, None)
        mode = getattr(like, "fake_mode", None)
        if mode is None or node.kwargs or not isinstance(src, torch.Tensor) or tensor_bytes(like) == view_bytes(like):
            continue  # (a copy into a whole tensor clones only it: left as it is)
        node.target = torch.ops.remat.copy_like.default
        with mode:
            node.meta["val"] = rewritten[node] = torch.ops.remat.copy_like.default(like, src)
    gm.recompile()
    return rewritten


def _suggested_format(x: torch.Tensor) -> torch.memory_format:
    """`x.suggest_memory_format()`: channels_last for an image laid out so, else contiguous."""
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(x)


# Ops whose CPU kernels lay out their first output unlike their fake (traced) tensors, found by
# benchmarks/layout_survey.py: op -> (the op's fake arguments, its fake output) -> the output in the kernel's layout.
# Batch norm's CPU kernels write into `empty_like(input, input.suggest_memory_format())` (its fake output, and its
# backward's, takes the input's or the gradient's strides); layer norm's and log-softmax's backward write contiguous
# gradients; dropout's backward follows its gradient, where the fake one is contiguous.
def _like_input(k: int) -> Callable[[tuple, torch.Tensor], torch.Tensor]:
    return lambda args, out: torch.empty_like(out, memory_format=_suggested_format(args[k]))


def _contiguous(args: tuple, out: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _like_product(args: tuple, out: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(torch.ops.aten.mul.Tensor(args[0], args[1]), dtype=out.dtype)


_CPU_LAYOUTS = {
    torch.ops.aten._native_batch_norm_legit_functional.default: _like_input(0),
    torch.ops.aten._native_batch_norm_legit.default: _like_input(0),
    torch.ops.aten._native_batch_norm_legit.no_stats: _like_input(0),
    torch.ops.aten._native_batch_norm_legit_no_training.default: _like_input(0),
    torch.ops.aten.native_batch_norm.default: _like_input(0),
    torch.ops.aten.native_batch_norm_backward.default: _like_input(1),
    torch.ops.aten.native_layer_norm_backward.default: _contiguous,
    torch.ops.aten._log_softmax_backward_data.default: _contiguous,
    torch.ops.aten.native_dropout_backward.default: _like_product,
}


def _strides_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.stride()
    return tuple(map(_strides_of, value)) if isinstance(value, (tuple, list)) else None


def _real_layouts(gm: torch.fx.GraphModule, changed: dict[torch.fx.Node, Any] | None = None) -> None:
    """Give the traced values the strides the CPU kernels give them (_CPU_LAYOUTS), and copy where a view then needs
    one. Batch norm over the D of a transposed (B, T, D) batch traced an output in its input's layout, so the
    transpose back was contiguous and `.reshape(B * T, D)` traced a view: the real output is contiguous, the view ran
    as a reshape that copied (execute.py), and the plan, which counts a view as no memory, missed the copy (9,216 bytes
    measured against 7,040 planned). The ops after such an output are traced again on fake tensors with its real
    layout; a view they cannot take reads a contiguous copy (`clone`), as the reshape did, now counted. Where an op
    cannot be traced again (a higher-order op), it keeps the traced values: its views still run as reshapes.
    `changed`: nodes already given other values (node -> value), whose readers are traced again too."""
    changed = dict(changed or {})  # node -> its value in the kernels' layouts, where that differs from the traced one
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        rule = _CPU_LAYOUTS.get(node.target)
        if rule is None and not any(x in changed for x in node.all_input_nodes):
            continue
        traced = node.meta.get("val")
        first = traced[0] if isinstance(traced, (tuple, list)) and traced else traced
        mode = getattr(first, "fake_mode", None)
        if mode is None:
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda x: changed.get(x, x.meta.get("val")))
        with mode:
            try:
                value = node.target(*args, **kwargs)
            except Exception:  # (fake tensors raise a ValueError for a view their strides do not allow)
                if node.target is not torch.ops.aten.view.default:
                    continue
                # "cannot view a tensor with shape ... and strides ...": reshape's copy, made explicit
                with gm.graph.inserting_before(node):
                    copy = gm.graph.call_function(torch.ops.aten.clone.default, (node.args[0],),
                                                  {"memory_format": torch.contiguous_format})
                copy.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                copy.meta["val"] = torch.ops.aten.clone.default(args[0], memory_format=torch.contiguous_format)
                node.args = (copy, *node.args[1:])
                changed[copy] = copy.meta["val"]
                value = node.target(copy.meta["val"], *args[1:], **kwargs)
            if rule is not None and first.device.type == "cpu":
                if isinstance(value, (tuple, list)):
                    value = (rule(args, value[0]), *value[1:])
                else:
                    value = rule(args, value)
        if _strides_of(value) != _strides_of(traced):
            node.meta["val"] = changed[node] = value
    gm.recompile()


def _refuse_side_effects(gm: torch.fx.GraphModule) -> None:
    """Ops with a side effect are traced threaded on an effect token (an extra input and output of the graph), which
    the planned step did not feed: it failed at its first call with an empty StopIteration. The one met in models is
    linalg's error check (solve, inv, cholesky raise on a singular matrix); its `_ex` forms leave it out."""
    effects = {str(node.args[1]) for node in gm.graph.find_nodes(op="call_function",
                                                                 target=torch.ops.higher_order.with_effects)}
    if not effects:
        return
    hint = ("; torch.linalg.solve, inv and cholesky check their input that way: use "
            "torch.linalg.solve_ex(A, B).result, inv_ex(A).inverse or cholesky_ex(A).L, which return the check's "
            "`info` instead of raising"
            if any("_linalg_check_errors" in op for op in effects) else "")
    raise CaptureError(f"the step runs ops with a side effect ({', '.join(sorted(effects))}), which a planned step "
                       f"cannot replay yet{hint}")


def _describe_input(desc: Any) -> tuple[str, str]:
    kind = type(desc).__name__
    if kind == "ParamAOTInput":
        return "param", desc.target
    if kind == "BufferAOTInput":
        return "buffer", desc.target
    if kind == "TangentAOTInput":
        return "tangent", repr(desc)
    return "input", repr(desc)


def _describe_output(desc: Any, value: Any) -> tuple[str, str]:
    kind = type(desc).__name__
    if value is None:
        return "none", ""
    if kind == "GradAOTOutput":
        grad_of = desc.grad_of
        return "grad", getattr(grad_of, "target", repr(grad_of))
    if kind == "PlainAOTOutput":  # the loss, then what the step hands out beside it (outputs="all")
        return ("loss", "loss") if desc.idx == 0 else ("returned", str(desc.idx))
    # InputMutationAOTOutput: a buffer updated in place (by its name), or an input the forward writes into (named as
    # _describe_input names it), which the step writes back into the caller's tensor as eager does
    mutated = getattr(desc, "mutated_input", None)
    return "mutation", getattr(mutated, "target", repr(mutated))


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in an FX node's `val` (a tensor, or a tuple/list of them)."""
    if isinstance(value, torch.Tensor):
        try:
            return value.untyped_storage().nbytes()
        except Exception:  # some tensor subclasses have no storage
            return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def view_bytes(value: Any) -> int:
    """Bytes a kernel touches through this value (numel x itemsize, not the whole storage)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(view_bytes(v) for v in value)
    return 0


def describe_value(value: Any) -> str:
    """"bf16[16, 1024, 768]" for a tensor, "(f32[16, 1024], f32[16, 1])" for several."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64", "int64": "i64",
                 "bool": "bool", "int32": "i32", "uint8": "u8"}.get(dtype, dtype)
        return f"{short}[{', '.join(str(s) for s in value.shape)}]"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe_value(v) for v in value if isinstance(v, torch.Tensor)) + ")"
    return ""


def aliasing_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The FX input whose storage `node`'s output aliases (a view, getitem, detach), or None
    when the op allocates fresh storage. Read off the op schema's alias annotations."""
    import operator

    if node.target is operator.getitem:
        return node.args[0]  # getitem of a fresh multi-output op is folded into that op
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    if node.target in (torch.ops.aten._unsafe_view.default, torch.ops.aten._reshape_alias.default):
        return node.args[0]  # views in all but their schema annotation
    returns = schema.returns
    if not returns or returns[0].alias_info is None:
        return None
    # "Tensor(a)[]" (split, unbind, chunk): a list of views; the alias set sits on the element type,
    # which the Python binding does not expose, so read it off the return's text.
    alias_sets = returns[0].alias_info.before_set or set(
        re.findall(r"^\(?Tensor\((\w+)\)\[\]", str(schema).rsplit(" -> ", 1)[-1]))
    for argument, value in zip(schema.arguments, node.args, strict=False):
        if argument.alias_info is not None and argument.alias_info.before_set & alias_sets:
            return value if isinstance(value, torch.fx.Node) else None
    return None


def compile_budget_saved(step: CapturedStep, activation_memory_budget: float) -> set[str]:
    """Names of the joint-graph values that torch.compile's min-cut partitioner saves for the backward
    under `torch._functorch.config.activation_memory_budget` (1.0: its default choice; 0.0: the least memory).

    Runs the partitioner on a copy of the joint graph (fake tensors: no memory). The forward graph's
    outputs after the real ones (loss, buffer updates) are the saved values; parameters and inputs
    among them are fixed memory anyway.
    """
    import copy
    import warnings

    import torch._functorch.config as functorch_config
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree's LeafSpec deprecation, raised while copying
        joint = copy.deepcopy(step.joint)
    fake_inputs = [node.meta.get("val") for node in joint.graph.find_nodes(op="placeholder")]
    num_fwd_outputs = sum(kind in ("loss", "returned", "mutation") for kind in step.output_kinds)
    with functorch_config.patch(activation_memory_budget=activation_memory_budget), _without_recompiling():
        forward, _ = min_cut_rematerialization_partition(joint, fake_inputs, num_fwd_outputs=num_fwd_outputs)
    outputs = forward.graph.find_nodes(op="output")[0].args[0]
    return {value.name for value in outputs[num_fwd_outputs:] if isinstance(value, torch.fx.Node)}


@contextlib.contextmanager
def _without_recompiling():
    """GraphModule.recompile as a no-op while the partitioner runs: it regenerates each module's Python code after
    every rewrite (8 times), 30% to 60% of the partition (a 10,276-node LSTM step: 8.3 s -> 5.0 s), and the code of
    these copies is never run: only the forward graph's outputs are read. The saved sets are the same
    (tests/test_report.py). Should a later torch run that code, the partition fails, and
    compile_budget_candidate says so."""
    recompile = torch.fx.GraphModule.recompile
    torch.fx.GraphModule.recompile = lambda self: None
    try:
        yield
    finally:
        torch.fx.GraphModule.recompile = recompile


def fake_tensor_mode(allow_real_inputs: bool = False) -> FakeTensorMode:
    """A fake-tensor mode to enter several times, for captures that share one model built on fake tensors
    (capture_fake builds and captures once): remat.split captures the split head from the unsplit step's model.
    `allow_real_inputs`: ops in it may read real tensors too (benchmarks/layout_survey.py's weights)."""
    return FakeTensorMode(allow_non_fake_inputs=allow_real_inputs)
