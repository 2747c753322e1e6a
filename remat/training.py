"""remat.apply and remat.plan: the public API that runs a user's model with a planned schedule.

    model = remat.apply(model, budget="16GB", example_inputs=(batch,))
    loss = model(batch); loss.backward(); optimizer.step()

`apply` wraps the model in a `RematModule`. For each input signature (shapes, dtypes, devices,
train/eval) it traces the training step once, plans it for the budget (or takes a given plan,
checked against the traced graph's hash), and builds the forward and backward graphs that run
the schedule (remat/execute.py). The module's parameters are the user's own, so any optimizer
works on `model.parameters()`; BatchNorm running statistics are written back to its buffers.

Named training.py, not apply.py: importing a submodule sets it as the package's attribute of that name, so
`remat.apply` became the module instead of the function after its first use.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from remat.capture import (
    AUTOCAST_DEVICES,
    OUTPUTS,
    Call,
    CapturedStep,
    LossStep,
    NothingToDifferentiate,
    OutputLayout,
    module_state,
    tensor_layout,
    uncompiled,
)
from remat.execute import ExecuteError, PartitionedStep, StepMemory, StepRunner, partition
from remat.graph import Graph
from remat.lower import GRADIENTS
from remat.planner import Plan, check_time_limit
from remat.schedule import Schedule
from remat.simulate import Simulation, simulate
from remat.split_plan import SplitTracer, solve_split
from remat.units import format_bytes, format_share_above, is_share
from solvers.base import INFEASIBLE

BACKENDS = ("eager", "inductor")
# A warning at this many input signatures: inputs padded to each batch's longest sequence make a plan per length,
# each a trace and a solve (seconds to a minute).
MANY_SIGNATURES = 8
# Prepared steps kept, the most recently used: a counter set on the model at every step (`model.global_step = i`) is a
# new signature each time, and the steps piled up without end (memory grew at every step).
MAX_PREPARED_STEPS = 32


class PlanError(ValueError):
    """A plan cannot be used: infeasible budget, a plan file for another graph, a corrupted file."""


@dataclass(frozen=True)
class PlanFile:
    """What `remat solve --out` writes and `remat.apply(model, plan=path)` reads."""

    graph_hash: str
    graph_meta: dict
    budget_bytes: int
    method: str
    peak_bytes: int | None
    schedule: Schedule

    @classmethod
    def load(cls, path: str | Path) -> PlanFile:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PlanError(f"plan file {path} is not valid JSON ({error}): is it a remat plan?") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: Any, source: str = "the plan") -> PlanFile:
        if not isinstance(data, dict) or data.get("format") != "remat-plan":
            raise PlanError(f"{source} is not a remat plan (no \"format\": \"remat-plan\")")
        if data.get("version") != 1:
            raise PlanError(f"{source} has plan version {data.get('version')!r}; this remat reads version 1")
        if data.get("schedule") is None:
            raise PlanError(f"{source} holds no schedule: its budget was infeasible when it was made")
        try:
            schedule = Schedule.from_json(data["schedule"])
            return cls(str(data["graph_hash"]), dict(data.get("graph_meta") or {}), int(data["budget_bytes"]),
                       str(data.get("method", "")), data.get("peak_bytes"), schedule)
        except (KeyError, TypeError, ValueError) as error:
            raise PlanError(f"{source} is corrupted: {type(error).__name__}: {error}") from None


def plan_from(source: Plan | PlanFile | str | Path) -> PlanFile:
    if isinstance(source, PlanFile):
        return source
    if isinstance(source, Plan):
        return PlanFile.from_json(source.to_json(), "the plan")
    return PlanFile.load(source)


def check_plan(plan: PlanFile, graph: Graph) -> Simulation:
    """The plan's schedule must be for this very graph; returns its simulation on it."""
    if plan.graph_hash != graph.content_hash:
        made_for = ", ".join(f"{k}={v}" for k, v in plan.graph_meta.items()
                             if k in ("model", "batch", "seq", "precision", "optimizer")) or "unknown"
        raise PlanError(
            f"the plan was made for another graph (hash {plan.graph_hash}: {made_for}); this model and these inputs "
            f"trace to {graph.content_hash} ({len(graph)} nodes): the model, the input shapes, the precision or the "
            "optimizer differ. Plan again for this model (remat.apply with a budget, or remat solve).")
    simulation = simulate(graph, plan.schedule)
    if not simulation.valid:
        raise PlanError(f"the plan's schedule is not valid for this graph: {simulation.errors[0]}")
    # the file's own figures are the schedule's: an edit to either (a free removed, peak_bytes changed) ran before
    if plan.peak_bytes is not None and plan.peak_bytes != simulation.peak_bytes:
        raise PlanError(f"the plan says it peaks at {plan.peak_bytes} bytes, but its schedule peaks at "
                        f"{simulation.peak_bytes} on this graph: the file was edited (or made by another version "
                        "of remat); plan again")
    if not simulation.fits(plan.budget_bytes):
        raise PlanError(f"the plan's schedule peaks at {format_bytes(simulation.peak_bytes)} ({simulation.peak_bytes} "
                        f"bytes), over its budget of {plan.budget_bytes} bytes: the file was edited; plan again")
    return simulation


@dataclass
class PreparedStep:
    """One input signature's traced step, its plan, and the runner that executes it."""

    graph: Graph
    plan: PlanFile
    simulation: Simulation  # the simulator's verdict on the plan: planned peak and seconds
    parts: PartitionedStep
    runner: StepRunner
    solved: Plan | None  # the solver's full result when the plan was made here
    returns: OutputLayout | None = None  # what the model returns around its loss (None: the loss alone)

    def output(self, loss: torch.Tensor, values: Sequence[torch.Tensor] = (),
               inputs: Callable[[], Sequence[Any]] | None = None) -> Any:
        """What a planned step returns: the model's output structure with the loss and the handed-out `values` in
        their places (None for its other tensors), or the loss alone. `inputs()`: the call's tensors, then the
        model's parameters and buffers, for outputs that are one of them."""
        return self.returns.rebuild(loss, values, inputs) if self.returns is not None else loss


class RematModule(nn.Module):
    """The user's module, run with a planned schedule. `forward(*args, **kwargs)` returns what the model returns, with
    the planned step's loss in its place and None for its other tensors (a Hugging Face output's logits, say); or the
    model's one non-scalar output (logits, features) for the caller's loss. Without gradients, the model's own output.

    Its state dict is the user's model's, with the model's own keys: a checkpoint saved from it loads into the
    plain model and the other way round (a stateful `loss_fn` is the caller's object and is not saved in it).
    """

    def __init__(self, model: nn.Module, budget: str | int | float | None, *, loss_fn: Callable | None,
                 precision: str | None, solver: str, device: str | None, optimizer: str, time_limit: float,
                 plan: Plan | PlanFile | str | Path | None, backend: str, outputs: str | None = None,
                 progress: Callable[[str], None] | None = None, gradients: str | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        check_time_limit(time_limit, "time_limit")  # "10" failed at the first step with a TypeError
        if (budget is None) == (plan is None):
            neither = budget is None
            raise ValueError("give a budget (e.g. budget=\"16GB\") or a plan" + (": neither was given" if neither
                                                                                else ", not both"))
        self.model = uncompiled(model)
        self.budget = budget
        self.loss_fn = loss_fn
        self.solver = solver
        self.cost_device = device  # the cost profile; not `device`, which reads the model's (a Hugging Face model's)
        self.optimizer = optimizer
        self.time_limit = time_limit
        self.given_plan = plan_from(plan) if plan is not None else None  # a bad file fails here, before any trace
        # precision, outputs and gradients: as given, or the plan's; refused where the plan was made with others (a
        # plan of bf16-mixed ran while evaluation ran in the precision given)
        self.precision = self._planned_setting("precision", precision, "fp32")
        self.outputs = self._planned_setting("outputs", outputs, "loss", OUTPUTS)
        # "auto": each step is planned for the gradients it finds (none: set-to-none; some: accumulate)
        # (a plan file names them only where they are not held)
        self.gradients = self._planned_setting("gradients", gradients, "held", (*GRADIENTS, "auto"), unplanned="auto")
        self.warned_gradients = False  # said once: gradients kept at a step planned as set-to-none or held
        # bytes of each parameter a planned step has trained, by name: frozen later, it keeps its optimizer state
        self.trained_bytes: dict[str, int] = {}
        self.backend = backend
        self.progress = progress
        # The bytes the first plan got. A share ("60%") is of each input's own store-all peak, and never less than
        # these: an epoch's last, smaller batch gets the memory the first had, not 60% of its own smaller peak (which
        # can be below a small model's fixed memory, and then the epoch stopped at its end).
        self.first_budget_bytes: int | None = None
        self.planning_s = 0.0  # tracing and planning, over every signature
        self.steps: dict[tuple, PreparedStep] = {}
        self.plans: dict[tuple, PlanFile] = {}  # each signature's plan: a copy of this module traces with it again
        # Plans by the hash of the unsplit step they were made for: a signature that traces to the same graph (a module
        # setting that the forward does not read changed, a counter) runs the same plan, traced again but not solved.
        self.plans_by_graph: dict[str, PlanFile] = {}
        self.warned_outputs: set[tuple[str, ...]] = set()  # outputs named in the None-for-these warning
        self.undifferentiable: dict[tuple, str] = {}  # signatures whose step has no gradient: why
        self.register_state_dict_post_hook(_model_keys)
        self.register_load_state_dict_pre_hook(_wrapped_model_keys)
        self.register_load_state_dict_post_hook(_model_key_names)
        self._remat_ready = True  # from here on, attributes the model has are set on the model (__setattr__)

    def _planned_setting(self, name: str, given: str | None, default: str, choices: Sequence[str] = (),
                         unplanned: str | None = None) -> str:
        """`given`, else the given plan's (`default` where its file does not name one), else `unplanned` (default:
        `default`); a PlanError where the plan was made with another."""
        planned = self.given_plan.graph_meta.get(name, default) if self.given_plan is not None else None
        if given is not None and planned is not None and given != planned:
            raise PlanError(f"the plan was made for {name}={planned!r}: leave {name} out, or plan again with {given!r}")
        value = given or planned or unplanned or default
        if choices and value not in choices:
            raise ValueError(f"unknown {name}={value!r}: choose one of {', '.join(map(repr, choices))}")
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        """`planned.head = nn.Linear(...)`, `planned.temperature = 4.0`: set on the wrapped model, which the planned
        step runs, as `planned.head` reads it (__getattr__). They were set on this wrapper: the model kept running
        its old head and setting, silently, and the new head was left out of the state dict. Modules, parameters
        and tensors, and any attribute the model has, go to the model; this wrapper's own attributes (and new ones
        that the model does not have: a hook's bookkeeping) stay here."""
        state = self.__dict__
        if (state.get("_remat_ready") and name not in state and not hasattr(type(self), name)
                and name not in state["_modules"] and name not in state["_parameters"]
                and name not in state["_buffers"]
                and (isinstance(value, (nn.Module, torch.Tensor)) or hasattr(state["_modules"]["model"], name))):
            setattr(state["_modules"]["model"], name, value)
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        """The wrapped model's attributes and methods (`model.config`, `model.generate`), as FSDP forwards them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or name.startswith("__"):
                raise
            return getattr(self.model, name)

    def __getstate__(self) -> dict:
        """copy.deepcopy, pickle and torch.save(model) keep the plans but not the traced graphs, whose fake tensors
        cannot be copied (a deep copy crashed the process at exit; pickling failed): the copy traces its step again
        at its first call, with the same plan, and solves nothing."""
        state = super().__getstate__()
        state["steps"] = {}
        return state

    def _get_name(self) -> str:
        return type(self).__name__  # repr: this class, not the model's that __class__ names

    def __reduce_ex__(self, protocol: int) -> tuple:
        # made from the wrapped model's class (`remat_class`): a copy is made from it again, by a class pickle finds
        return _new_remat_module, (type(self.model),), self.__getstate__()

    # torch.compile of a planned module (Hugging Face's Trainer with torch_compile=True) runs it as planned: Dynamo
    # traced into this method and ran remat's own trace inside its graph, which failed on fake tensors ("Cannot
    # access data pointer"). backend="inductor" compiles the planned graphs themselves.
    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = Call(args, kwargs)
        # evaluation, or nothing to differentiate (a frozen phase, validation without no_grad): nothing to plan,
        # and the model's own forward runs and returns its output, as eager (the trace refused such a step)
        if not torch.is_grad_enabled() or not self._differentiable(call):
            return self._own_forward(call)
        try:
            step = self._prepared(call)
        except NothingToDifferentiate:
            # what requires grad is not read on the way to the loss (PEFT's merged LoRA adapter: its weights still
            # require grad, but the merged forward skips them): the model's own forward, as eager, whose loss has
            # no backward. It was refused (or, before merges were noticed, the stale plan ran the adapter twice).
            return self._own_forward(call)
        if step.returns is not None and step.returns.dropped:
            self._warn_of_dropped(step.returns.dropped)
        if self.gradients in ("set-to-none", "held") and not self.warned_gradients:
            self._warn_of_kept_gradients()
        loss, *values = step.runner.run(self._primals(step.parts, call.tensors))
        return step.output(loss, values, lambda: [*call.tensors, *self.model.parameters(), *self.model.buffers()])

    def _own_forward(self, call: Call) -> Any:
        """The model's own forward (and loss function), as eager runs it: what an unplanned call returns."""
        return LossStep(self.model, self.loss_fn, self.precision, call).output(*call.tensors)

    def _warn_of_dropped(self, dropped: tuple[str, ...]) -> None:
        """Once per set of outputs: which come back as None, and why."""
        if dropped in self.warned_outputs:
            return
        self.warned_outputs.add(dropped)
        if self.outputs == "all":  # objects that hold tensors (a Hugging Face cache): nothing to hand out
            why = "objects the planned step does not hand out; pass use_cache=False to the model for no cache"
        else:
            why = ("it computes the loss and the gradients, not the rest; remat.apply(..., outputs=\"all\") hands "
                   "the model's other tensors out and plans for holding them, or run the model under "
                   "torch.no_grad() for its whole output")
        warnings.warn(f"the planned step returns the model's output with its loss, and None for "
                      f"{', '.join(dropped)}: {why}", stacklevel=_callers_level())

    def _note_trained(self, parts: PartitionedStep) -> None:
        """Remember the parameters this step trains, and their bytes."""
        params = dict(self.named_parameters(remove_duplicate=False))  # the step's names: "model." ones
        for name in parts.grad_names:
            if name in params:
                self.trained_bytes[name] = params[name].numel() * params[name].element_size()

    def _frozen_trained_bytes(self) -> int:
        """Bytes of the parameters an earlier step trained that are frozen now, each tensor once: an optimizer keeps
        their state (torch's do), which the plan of a step without them must count. A 2-layer GPT-2 whose blocks were
        frozen after step 3 held 1.6 MB of AdamW state outside its new 70% plan, about 10% of the budget."""
        frozen = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if name in self.trained_bytes and not p.requires_grad:
                frozen[id(p)] = self.trained_bytes[name]
        return sum(frozen.values())

    def _frozen_gradient_bytes(self) -> int:
        """Bytes of the gradients the loop keeps of frozen parameters, each storage once: zero_grad(set_to_none=False)
        zeroes them in place, and they stay allocated beside the step (they were left out of its plan)."""
        kept = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
                for p in self.model.parameters() if not p.requires_grad and p.grad is not None
                and p.grad.layout == torch.strided}
        return sum(kept.values())

    def _warn_of_kept_gradients(self) -> None:
        """Once: a step planned as "set-to-none" or "held" runs with gradients kept from the last step (gradient
        accumulation, zero_grad(set_to_none=False)); the backward's new gradients come beside them until it returns,
        which neither plan counts ("held" counts each gradient once)."""
        kept = sum(p.grad.untyped_storage().nbytes() for p in self.model.parameters() if p.grad is not None)
        if kept:
            self.warned_gradients = True
            counted = ("counts no gradients held between steps" if self.gradients == "set-to-none" else
                       "counts each gradient once, as fixed memory,")
            warnings.warn(f"the plan {counted} (gradients=\"{self.gradients}\"), but {format_bytes(kept)} of them "
                          f"are kept from the last step: the backward's new gradients come beside them, up to that "
                          f"much above the plan; plan with gradients=\"auto\" (the default: each step for the "
                          f"gradients it finds) or \"accumulate\" for gradient accumulation, or call "
                          f"optimizer.zero_grad() (set_to_none=True, its default) between steps",
                          stacklevel=_callers_level())

    def _gradients_now(self) -> str:
        """How this step finds the gradients: as given, or with gradients="auto", "accumulate" where the loop kept
        some since the last step (gradient accumulation, zero_grad(set_to_none=False)), else "set-to-none" (every
        first step; zero_grad()'s default after it). Both plans are exact for the step they run; "held" is exact for
        neither, and undercounts the backward's new gradients beside kept ones."""
        if self.gradients != "auto":
            return self.gradients
        kept = any(p.grad is not None for p in self.model.parameters() if p.requires_grad)
        return "accumulate" if kept else "set-to-none"

    def _differentiable(self, call: Call) -> bool:
        return (any(p.requires_grad for p in self.model.parameters())
                or any(isinstance(t, torch.Tensor) and t.requires_grad for t in call.tensors))

    def prepare(self, *args: Any, **kwargs: Any) -> PreparedStep:
        """Trace, plan and partition the step for inputs of this signature (cached)."""
        return self._prepared(Call(args, kwargs))

    def _prepared(self, call: Call) -> PreparedStep:
        """prepare() for a call already made (forward makes one per step: not twice)."""
        gradients = self._gradients_now()
        key = (*_signature(self.model, call), gradients)
        if key in self.undifferentiable:  # traced once: nothing to differentiate (not traced at every call)
            raise NothingToDifferentiate(self.undifferentiable[key])
        if key in self.steps:
            self.steps[key] = self.steps.pop(key)  # the most recently used last
            return self.steps[key]
        previous = next(reversed(self.steps), None)
        started = time.perf_counter()
        try:
            self.steps[key] = self._prepare(call, self.given_plan or self.plans.get(key), gradients)
        except NothingToDifferentiate as error:
            self.undifferentiable[key] = str(error)
            raise
        self.plans[key] = self.steps[key].plan
        self._note_trained(self.steps[key].parts)
        self.planning_s += time.perf_counter() - started
        # what the traced forward decided and wrote into a config (a Hugging Face classifier's
        # config.problem_type, at its first forward) is in the graph: the signature after it runs this step too
        # (the first step was traced again)
        after = (*_signature(self.model, call), gradients)
        if after != key:
            self.steps[after], self.plans[after] = self.steps[key], self.plans[key]
        if len({id(step) for step in self.steps.values()}) == MANY_SIGNATURES:
            warnings.warn(f"remat.apply has traced {MANY_SIGNATURES} input signatures ({self.planning_s:.0f} s so "
                          "far), one for each new input shape or layout, non-tensor argument, or module setting (a "
                          "public number or string attribute, a hook) changed since; the last one after a change to "
                          f"{_what_changed(self.model, previous, key)}. Inputs padded to a few lengths (buckets) "
                          "keep that to a few plans, a value passed as a tensor is an input, not part of the graph, "
                          "and a counter or log the forward does not read belongs in an attribute whose name starts "
                          "with _ (a setting that leaves the graph as it was is traced again, not planned again)",
                          stacklevel=_callers_level())
        while len(self.steps) > MAX_PREPARED_STEPS:
            oldest = next(iter(self.steps))
            del self.steps[oldest]
            self.plans.pop(oldest, None)
        return self.steps[key]

    def run_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run forward and backward once, as `measure()` does without measuring, and return the loss (detached),
        whatever the model returns around it (a Hugging Face output object, a dict): for a loop that steps any
        model, as `remat run` does. A model that returns logits or features is run backward as if their sum were
        the loss, and they are returned (detached) in its place."""
        call = Call(args, kwargs)
        return self._forward_and_backward(self._prepared(call), call)

    def _forward_and_backward(self, step: PreparedStep, call: Call) -> torch.Tensor:
        """One planned forward and backward; the loss, detached."""
        loss = step.runner.loss(self._primals(step.parts, call.tensors))
        backward_from(loss)
        return loss.detach()

    def measure(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, StepMemory]:
        """Run forward and backward once and measure memory; returns the loss (detached) and the memory. A model that
        returns logits or features is run backward as if their sum were the loss, and they are returned in its place.

        CPU: the graphs run through an interpreter that counts the storages live values hold,
        comparable with the plan to the byte (`StepMemory`). CUDA: the allocator's peak over the
        step, `torch.cuda.max_memory_allocated()` (peak_bytes: everything allocated; peak_live_bytes:
        what the step added to what was allocated before it, i.e. activations and new gradients).
        """
        call = Call(args, kwargs)
        step = self._prepared(call)
        first = next(self.model.parameters(), None)
        if first is not None and first.device.type == "cuda":
            torch.cuda.synchronize(first.device)
            before = torch.cuda.memory_allocated(first.device)
            torch.cuda.reset_peak_memory_stats(first.device)
            loss = self._forward_and_backward(step, call)
            torch.cuda.synchronize(first.device)
            peak = torch.cuda.max_memory_allocated(first.device)
            return loss, StepMemory(peak_live_bytes=peak - before, peak_bytes=peak)
        if self.backend != "eager":
            raise ValueError("on CPU, live bytes are counted by running the planned graphs eagerly: measure with "
                             "backend='eager' (Inductor's own memory is measured on CUDA)")
        with step.runner.measuring() as memory:
            loss = self._forward_and_backward(step, call)
        return loss, memory

    @property
    def planned(self) -> PreparedStep:
        """The most recently prepared step (for reports: plan, simulation, graph)."""
        if not self.steps:
            raise RuntimeError("no step prepared yet: call the module, or pass example_inputs to remat.apply")
        return next(reversed(self.steps.values()))

    def _prepare(self, inputs: Call, plan: PlanFile | None, gradients: str) -> PreparedStep:
        """Trace the step and plan it, or run `plan` (a given plan file, or the plan this signature had), for
        `gradients` as the step finds them."""
        say = self.progress or (lambda message: None)
        if self.gradients == "auto" and gradients == "accumulate":
            say("the step starts with gradients kept from the last one: planning it for them (accumulate)")
        solved = None
        if plan is not None:
            say("tracing the training step")
            split = plan.graph_meta.get("split") or {}
            precision = plan.graph_meta.get("precision", self.precision)
            graph, captured = trace_step(self.model, inputs, self.loss_fn, precision, self.cost_device, self.optimizer,
                                         split_chunks=int(split.get("chunks", 1)),
                                         mlp_chunks=int(split.get("mlp_chunks", 1)),
                                         attention_chunks=int(split.get("attention_chunks", 1)),
                                         outputs=self.outputs, gradients=gradients)
            simulation = check_plan(plan, graph)
        else:
            tracer = _trace_for_planning(self.model, inputs, self.loss_fn, self.precision, self.cost_device,
                                         self.optimizer, self.progress, self.outputs, gradients,
                                         self._frozen_trained_bytes(), self._frozen_gradient_bytes())
            traced_to = tracer.unsplit.graph.content_hash
            plan = self.plans_by_graph.get(traced_to)
            if plan is not None:  # a setting the forward does not read changed (a counter): the step is the same
                split = plan.graph_meta.get("split") or {}
                variant = tracer.variant(int(split.get("chunks", 1)), int(split.get("mlp_chunks", 1)),
                                         int(split.get("attention_chunks", 1)))
                graph, captured = variant.graph, variant.step
                simulation = check_plan(plan, graph)
            else:
                at_least = self.first_budget_bytes if is_share(self.budget) else None
                solved, captured = _plan_traced(tracer, self.budget, self.solver, self.time_limit, self.progress,
                                                at_least)
                if self.first_budget_bytes is None:
                    self.first_budget_bytes = solved.budget_bytes
                graph, plan, simulation = solved.graph, plan_from(solved), solved.simulation
                self.plans_by_graph[traced_to] = plan
        say("building the forward and backward graphs")
        try:
            parts = partition(captured, graph, plan.schedule)
        except ExecuteError as error:
            raise PlanError(f"the plan cannot run on this model: {error}") from None
        return PreparedStep(graph, plan, simulation, parts, StepRunner(parts, graph, self.backend), solved,
                            captured.returns)

    def _primals(self, parts: PartitionedStep, inputs: Sequence[torch.Tensor]) -> list[Any]:
        """The graphs' primal inputs from the live module: its parameters (so that autograd hands
        them their gradients), its buffers (updated in place), then the call's tensors."""
        # capture wraps the model and the loss function in LossStep, whose names ("model.", "loss_fn.") are ours
        params = dict(self.named_parameters(remove_duplicate=False))
        buffers = dict(self.named_buffers(remove_duplicate=False))
        user = iter(inputs)
        values = []
        for kind, name in zip(parts.primal_kinds, parts.primal_names, strict=True):
            values.append(params[name] if kind == "param" else buffers[name] if kind == "buffer" else next(user))
        return values


_OWN_DIRS = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent))


def _callers_level() -> int:
    """The stack level, for warnings.warn in the function that calls this, of the caller's line: the first frame
    outside remat and torch (torch.nn's call machinery, and the frame of the torch.compiler.disable that wraps
    forward: a warning at a step named torch/_dynamo/eval_frame.py as its place)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_OWN_DIRS):
        frame, level = frame.f_back, level + 1
    return level


@functools.cache
def remat_class(model_class: type) -> type[RematModule]:
    """RematModule for models of `model_class`, named after it ("RematBertForSequenceClassification") and whose
    forward has its forward's signature. Tools read which arguments a model takes from its forward, some from its
    class: Hugging Face's Trainer keeps the dataset columns the forward names and takes its labels from the
    parameters of the class's forward ("labels", "start_positions"). RematModule's `forward(*args, **kwargs)`
    names none: the Trainer dropped every column ("The batch received was empty"), and evaluated without a loss."""
    try:
        signature = inspect.signature(model_class.forward)
    except (AttributeError, TypeError, ValueError):  # no forward to read (a builtin's): RematModule's own
        return RematModule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return RematModule.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = RematModule.forward.__doc__
    forward = torch.compiler.disable(forward)  # as RematModule.forward
    name = f"Remat{model_class.__name__}"
    # `isinstance(planned, model_class)` holds, through __class__ (type(planned) stays this class): the Trainer saves
    # a PreTrainedModel or PeftModel with its save_pretrained, which reaches the model's own, and any other module
    # as a bare state dict, which safetensors refuses where weights are tied (every checkpoint of a GPT-2 failed)
    namespace = {"forward": forward, "__module__": __name__, "__qualname__": name}
    if not issubclass(model_class, (nn.parallel.DistributedDataParallel, nn.DataParallel)):  # a wrapper it is not
        namespace["__class__"] = property(lambda self: model_class)
    return type(name, (RematModule,), namespace)


def _new_remat_module(model_class: type) -> RematModule:
    """An empty RematModule of `remat_class(model_class)`, for pickle and copy.deepcopy to fill in."""
    cls = remat_class(model_class)
    return cls.__new__(cls)


def backward_from(output: torch.Tensor) -> None:
    """`output.backward()` for a scalar loss; for logits or features, as if their sum were the loss."""
    output.backward(None if output.dim() == 0 else torch.ones_like(output))


def _model_keys(module: RematModule, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: only the wrapped model's entries, without the "model." this wrapper adds."""
    moved = {key: _moved(key, prefix + "model.", prefix) for key in state_dict if key.startswith(prefix)}
    values = {key: state_dict.pop(key) for key in moved}
    state_dict.update((new, values[key]) for key, new in moved.items() if new is not None)
    _move_metadata(state_dict, prefix + "model.", prefix)


def _wrapped_model_keys(module: RematModule, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                        missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load-state-dict pre-hook: the model's keys back under "model.", and the loss function's state as it is."""
    values = {key: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(prefix)]}
    state_dict.update((_moved(key, prefix, prefix + "model."), value) for key, value in values.items())
    _move_metadata(state_dict, prefix, prefix + "model.")
    module._keys_loading = len(values)  # for _model_key_names: a load that matched none of them is said
    if isinstance(module.loss_fn, nn.Module):
        state_dict.update(module.loss_fn.state_dict(prefix=prefix + "loss_fn."))


def _model_key_names(module: RematModule, incompatible: Any) -> None:
    """Load-state-dict post-hook: missing and unexpected keys named as `state_dict()` names them, without "model.".
    Loaders that left out a tied weight's key (safetensors, Accelerate's load_state) could not match
    "model.lm_head.weight" to the "lm_head.weight" they had dropped, and failed."""
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [key.removeprefix("model.") for key in keys]
    loaded = module.__dict__.pop("_keys_loading", 0)
    if loaded and len(incompatible.unexpected_keys) >= loaded:
        # strict=False loads nothing without a word: PEFT's set_peft_model_state_dict, or keys taken from
        # named_parameters(), which carry the "model." that state_dict() leaves out
        warnings.warn(f"load_state_dict matched none of its {loaded} keys (the first: "
                      f"{incompatible.unexpected_keys[0]!r}); a planned module's state dict has the wrapped model's "
                      "keys, without named_parameters()'s \"model.\" (load into `planned.model` for names of its "
                      "own)", stacklevel=_callers_level())


def _moved(key: str, old: str, new: str) -> str | None:
    """`key` with its prefix `old` replaced by `new` (both "" or ending in "."); None when it lacks `old`."""
    return new + key.removeprefix(old) if key.startswith(old) else None


def _move_metadata(state_dict: dict, old: str, new: str) -> None:
    """Moves the module versions a state dict carries (BatchNorm's, say: loading reads them by module path)."""
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        return
    # a module's path is its keys' prefix without the dot ("" for the root)
    moved = {path: _moved(path + "." if path else "", old, new) for path in metadata}
    versions = {path: metadata.pop(path) for path, dotted in moved.items() if dotted is not None}
    metadata.update((moved[path].removesuffix("."), version) for path, version in versions.items())


def _what_changed(model: nn.Module, before: tuple | None, after: tuple) -> str:
    """What differs between two steps' keys (a _signature and the gradients setting), in words: "global_step",
    "encoder.scale", "the inputs"."""
    if before is None:
        return "nothing (the first step)"
    changes = []
    if len(before[0]) == len(after[0]):
        paths = [path for path, _ in model.named_modules()]  # module_state's order
        for path, (old_settings, old_hooks, old_tensors), (new_settings, new_hooks, new_tensors) in zip(
                paths, before[0], after[0], strict=False):
            old, new = dict(old_settings), dict(new_settings)
            changes += [f"{path}.{name}" if path else name for name in sorted(old.keys() | new.keys(), key=str)
                        if old.get(name) != new.get(name)]
            if old_hooks != new_hooks:
                changes.append(f"the hooks of {path or 'the model'}")
            if old_tensors != new_tensors:
                changes.append(f"the parameters or buffers of {path or 'the model'}")
    elif before[0] != after[0]:
        changes.append("the model's modules")
    if before[1] != after[1]:
        changes.append("autocast")
    if before[2:-1] != after[2:-1]:
        changes.append("the inputs (a shape, layout, dtype or non-tensor argument)")
    if before[-1] != after[-1]:
        changes.append(f"the gradients kept between steps ({before[-1]} -> {after[-1]})")
    return ", ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")


def _signature(model: nn.Module, call: Call) -> tuple:
    """What a traced step depends on besides the values of tensors: the model's state (capture.module_state),
    autocast and its dtype, and the arguments: how they nest (tuples, lists, dicts, dataclasses; keyword arguments by
    name), each tensor's shape, layout, dtype, device and whether it requires grad, and any other value itself."""
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), tensor_layout(value), value.dtype, value.device.type,
                    value.requires_grad)
        return ("value", repr(value))

    nesting, leaves = call.flattened()
    # autocast's dtype too: a step planned under bf16 ran stale under float16 (its losses were bf16's)
    autocast = tuple(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
                     for device in AUTOCAST_DEVICES)
    return (module_state(model), autocast, str(nesting), *map(describe, leaves))


def default_device_profile(model: nn.Module) -> str:
    """The cost profile for where the model lives: the GPU's own when known, else h100; cpu on CPU."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(first.device).lower()
    return next((p for p in ("h100", "a100", "v100") if p in name), "h100")


def trace_step(model: nn.Module, inputs: Call | Sequence[Any] | dict[str, Any], loss_fn: Callable | None = None,
               precision: str = "fp32",
               device: str | None = None, optimizer: str = "adamw", split_chunks: int = 1, mlp_chunks: int = 1,
               attention_chunks: int = 1, outputs: str = "loss", gradients: str = "held"):
    """The user's model -> (Graph, CapturedStep), without touching its parameters or the RNG.
    `split_chunks` > 1: the loss head split into that many chunks (remat.split), `mlp_chunks` > 1: each MLP,
    `attention_chunks` > 1: each attention block, as a plan made with a split needs."""
    tracer = _trace_for_planning(model, inputs, loss_fn, precision, device, optimizer, None, outputs, gradients)
    key = (split_chunks, mlp_chunks, attention_chunks)
    variant = tracer.variant(*key)
    if variant is None:
        raise PlanError(f"the step cannot be split in {key} chunks (head, MLPs, attention): "
                        f"{tracer.unsplittable.get(key, 'there is no such region')}")
    return variant.graph, variant.step


def _trace_for_planning(model: nn.Module, inputs: Call | Sequence[Any] | dict[str, Any], loss_fn: Callable | None,
                        precision: str, device: str | None, optimizer: str,
                        progress: Callable[[str], None] | None, outputs: str = "loss",
                        gradients: str = "held", frozen_trained_bytes: int = 0,
                        frozen_gradient_bytes: int = 0) -> SplitTracer:
    (progress or (lambda message: None))("tracing the training step")
    inputs = Call.of(inputs)
    meta = {"model": type(model).__name__, "inputs": inputs.describe()}
    return SplitTracer(model, inputs, loss_fn=loss_fn, precision=precision,
                       device=device or default_device_profile(model), optimizer=optimizer, meta=meta,
                       outputs=outputs, gradients=gradients, frozen_trained_bytes=frozen_trained_bytes,
                       frozen_gradient_bytes=frozen_gradient_bytes)


def _plan_traced(tracer: SplitTracer, budget: str | int | float, solver: str, time_limit: float,
                 progress: Callable[[str], None] | None, at_least_bytes: int | None) -> tuple[Plan, CapturedStep]:
    say = progress or (lambda message: None)
    unsplit = tracer.unsplit.graph
    budget_bytes = max(tracer.budget_bytes(budget), at_least_bytes or 0)
    say(f"planning {len(unsplit)} nodes")
    chosen = solve_split(tracer, budget_bytes, solver=solver, time_limit_s=time_limit, progress=progress)
    result = chosen.plan
    if result.status == INFEASIBLE or result.schedule is None:
        if budget_bytes < unsplit.fixed.total_bytes:
            raise PlanError(
                f"no schedule fits a budget of {format_bytes(budget_bytes)} ({budget_bytes} bytes): fixed memory alone "
                f"is {unsplit.describe_fixed()}, whatever is recomputed; a budget above it leaves room for activations"
                + (f" ({format_share_above(unsplit.fixed.total_bytes, tracer.budget_bytes('100%'))} of the store-all "
                   f"peak, which a share such as {budget!r} is of)" if is_share(budget) else ""))
        lowest = result.min_feasible_bytes
        asked = next((c.simulation for c in result.candidates if c.method == solver and c.simulation is not None
                      and c.simulation.valid), None)
        if asked is not None and lowest is not None and lowest <= budget_bytes:
            # a named baseline's one schedule peaks over the budget that others fit (checkpoint-all, which holds
            # recomputed values beside the gradients, can peak above store-all): it said nothing fits, and named a
            # lowest peak equal to the budget
            raise PlanError(f"{solver}'s schedule peaks at {format_bytes(asked.peak_bytes)} ({asked.peak_bytes} "
                            f"bytes), over the budget of {format_bytes(budget_bytes)} ({budget_bytes} bytes): give "
                            f"a budget of at least that, or solver=\"auto\", whose plans go down to "
                            f"{format_bytes(lowest)} here")
        more_chunks = ("; a longer time_limit traces the step split in more chunks, which may fit"
                       if result.graph.meta.get("split_cut") else "")
        if tracer.own_backward:  # where a split could have fit: say why there is none
            more_chunks += f"; {result.graph.meta.get('split_note', '')}"
        proven = result.min_feasible_proven
        # a search cut short by the time limit names the lowest peak it reached, which a longer one may beat
        minimum = ("the minimum feasible budget for this model and input is" if proven else
                   f"the lowest peak found in time_limit={time_limit:g} s is")
        # and what proves the floor under it: a budget between the two may fit, one under the floor never does
        shorter = "" if proven else (f" (a longer time_limit may find a lower one, not below "
                                     f"{format_bytes(result.min_budget_lower_bound_bytes)}: "
                                     f"{result.min_budget_lower_bound_why})")
        # a share is of this step's store-all peak: say which share the lowest is (a step planned as set-to-none
        # peaks lower than the held one, and a small model's floor, its gradients at the backward's end, can be
        # above a share that the held step fitted)
        share = (f", {format_share_above(lowest, tracer.budget_bytes('100%'))} of the store-all peak, which a share "
                 f"such as {budget!r} is of" if is_share(budget) else "")
        raise PlanError(
            f"no schedule fits a budget of {format_bytes(budget_bytes)} ({budget_bytes} bytes): {minimum} "
            f"{format_bytes(lowest)} ({lowest} bytes{share}){shorter}; fixed memory alone is "
            f"{unsplit.describe_fixed()}{more_chunks}")
    return result, tracer.variant_of(chosen.split).step


def apply(model: nn.Module, budget: str | int | float | None = None,
          example_inputs: Sequence[Any] | dict[str, Any] | None = None,
          *, solver: str = "auto", device: str | None = None, time_limit: float = 60.0,
          plan: Plan | PlanFile | str | Path | None = None, backend: str = "eager", loss_fn: Callable | None = None,
          precision: str | None = None, optimizer: str = "adamw", outputs: str | None = None,
          gradients: str | None = None, progress: Callable[[str], None] | None = None) -> RematModule:
    """Wrap `model` so that its training step runs a schedule that fits `budget`.

    budget: the whole memory of the step (parameters, gradients, optimizer state, inputs,
        activations): bytes, "16GB", "16GiB", or "60%" of the store-all peak (of each input signature's step,
        and never less than the first signature's plan got: `model.first_budget_bytes`).
    example_inputs: plan now (errors surface here, and the first step is not slowed); without
        them the plan is made at the first call, and again for each new input signature. A tuple for
        model(*example_inputs), a dict for model(**example_inputs) (Hugging Face: input_ids=..., labels=...);
        the module is then called the same way. Tensors are the step's inputs; other values (None, flags) are
        fixed in its graph, and a call with other such values is traced and planned again.
    plan: a Plan, or a plan file written by `remat solve --out`; refused if the model traces to
        another graph. device: the cost profile (h100, a100, cpu, a JSON file); default: where
        the model is. precision: "fp32" or "bf16-mixed" (autocast inside the planned graphs); default: the plan's,
        or fp32.
    optimizer: whose state the budget must hold (adamw, adam, sgd-momentum, sgd, none).
    The returned module's forward returns what the model returns (or `loss_fn(output)`), with the planned loss in its
    place; or the model's one non-scalar output (logits, features) as it is, whose gradient the caller's loss hands
    to the planned backward. outputs: "loss" (default: None in place of the model's other tensors) or "all" (they
    are handed out too, and the plan holds them to the step's end, as a caller that keeps the output does); default:
    the plan's, or "loss".
    gradients: how the training loop keeps them between steps. "auto" (default): as each step finds them, planned
    for what it finds: a step that starts with none (every first step, and each after `optimizer.zero_grad()`, whose
    default sets them to None) as "set-to-none", one that starts with gradients kept (gradient accumulation,
    zero_grad(set_to_none=False)) as "accumulate", a plan each (the second made at the first step that keeps them).
    "set-to-none": no gradient memory before the step; each gradient is counted from when the backward makes it,
    which lowers the peak the plan must fit. "accumulate": the kept gradients are fixed memory, and the backward's
    new ones are counted beside them until it returns. "held": fixed memory for the whole step, once per weight (the
    classic model, and `remat solve`'s default, which cannot see the loop). Default: the plan's, or "auto".
    """
    if isinstance(model, RematModule):  # planned again (another budget): plan the model it wraps, with its loss_fn
        loss_fn = loss_fn if loss_fn is not None else model.loss_fn
        model = model.model
    cls = remat_class(type(uncompiled(model)))  # forward with the model's signature, for tools that read it
    module = cls(model, budget, loss_fn=loss_fn, precision=precision, solver=solver, device=device,
                 optimizer=optimizer, time_limit=time_limit, plan=plan, backend=backend, outputs=outputs,
                 progress=progress, gradients=gradients)
    if example_inputs is not None:
        call = Call.of(example_inputs)
        module.prepare(*call.args, **call.kwargs)
    return module


def plan(model: nn.Module, example_inputs: Sequence[Any] | dict[str, Any], budget: str | int | float, *,
         solver: str = "auto",
         device: str | None = None, time_limit: float = 60.0, loss_fn: Callable | None = None,
         precision: str = "fp32", optimizer: str = "adamw", outputs: str = "loss", gradients: str = "held") -> Plan:
    """The plan (schedule + simulated figures) for `model` on `example_inputs`, its loss head (and MLPs, attention
    blocks) split into chunks where that fits a lower budget or costs less (remat.split_plan), as `remat solve` plans;
    `budget`: bytes, "16GB", or "60%" of the store-all peak. `.save(path)` writes a plan file that
    `remat.apply(model, plan=path)` runs. outputs: as `apply` takes it; gradients: "held" (default), "set-to-none" or
    "accumulate", as `apply` takes them (a plan is made for one of them, not "auto"). Infeasible -> PlanError."""
    check_time_limit(time_limit, "time_limit")
    if isinstance(model, RematModule):  # a planned module: plan the model it wraps (its own trace ran its plan)
        loss_fn = loss_fn if loss_fn is not None else model.loss_fn
        model = model.model
    tracer = _trace_for_planning(model, example_inputs, loss_fn, precision, device, optimizer, None, outputs,
                                 gradients)
    return _plan_traced(tracer, budget, solver, time_limit, None, None)[0]
