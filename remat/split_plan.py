"""The chunk counts as part of the plan: trace the step with its head (and MLPs) split into chunks, solve, keep
the best.

A split costs a little time (more, smaller kernels) and saves memory (one chunk of logits at a time),
so it is worth having only where the budget needs it:
  - store-all fits the unsplit step: no split;
  - otherwise the chunk count of the region that holds the largest op, or the op at checkpoint-all's peak,
    doubles (the head's: 2, 4, 8, ...; the MLPs' once GELU's ops are the limit) until the split graph's largest
    op leaves two thirds of the activation budget free and checkpoint-all fits, or while its single-op floor
    or checkpoint-all's peak keeps falling (`SplitTracer.lowering`); the plan is the cheapest that fits of
    the unsplit step (when its floor is below the budget), the last variant, then the other variants traced whose
    floor is below the budget, latest first (the time limit is shared: each gets an even share of the time left,
    and each after the first stops once its lower bound shows it cannot beat the cheapest plan so far).
    Where the unsplit step's floor is below the budget, no variant is traced when the step's own trace took more
    than TRACE_SHARE of the time limit (a variant's trace takes as long), and no further one once the next (taken
    to be as slow as the slowest so far) would end past TRACES_UNTIL of the time limit.
    Ties go to fewer chunks. The baselines, with the chunks streamed (`stream_head`), join the solver's
    candidates: they know nothing of chunks and would hold every chunk's logits until its backward.
The chosen split and the reason are recorded in the graph's meta ("split", "split_note"), so the plan
file and `remat solve` show them.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
from torch import nn

from remat.capture import Call, CapturedStep, build_on_fake, capture_step, fake_tensor_mode, uncompiled
from remat.comparators import compile_budget_candidate, compile_method
from remat.cost import load_profile
from remat.graph import Graph
from remat.lower import GRADIENTS, lower
from remat.models import build_model
from remat.planner import Candidate, Plan, baseline_candidate, solve, store_all_simulation
from remat.schedule import COMPUTE, FREE, Op, Schedule
from remat.simulate import Simulation, live_bytes_at, simulate
from remat.split import (
    ATTENTION,
    CHUNK_COUNTS,
    HEAD,
    MLP,
    Region,
    Split,
    Unsplittable,
    batch_size,
    capture_split,
    chunk_of,
    find_attention,
    find_head,
    find_mlps,
    forward_graph,
)
from remat.units import format_bytes, parse_size
from solvers.base import FEASIBLE, INFEASIBLE, OPTIMAL, SolveOptions, SolverResult, meets_bound, overhead_of
from solvers.baselines import BASELINES

REGION_KINDS = (HEAD, MLP, ATTENTION)  # the order of a variant's key
FLOOR_GAIN = 0.05  # keep doubling k while the floor falls by more than this fraction
# k doubles until the largest op leaves this share of the activation budget to the rest of the step. A half was
# too little for GPT-2 small (batch 16, seq 1024, h100): at 70% of store-all's activations 2 chunks plan +4.1%
# over unsplit store-all and 4 chunks +3.3%, at 13.06 GB +12.5% and +7.6% (30 s solves); at 90% 2 chunks still
# leave two thirds and store-all fits them.
ROOM_SHARE = 2 / 3
MIN_SOLVE_S = 1.0  # the least time a solve gets when tracing the split variants took the time limit
# Where the budget is above the unsplit floor, split variants are traced only if the step's own trace took at most
# this share of the time limit: a variant's trace takes as long (a 2-layer LSTM unrolled over 128 steps: 15 s each).
TRACE_SHARE = 1 / 3
# ... and a further variant only if it would end within this share of the time limit (a 2-layer LSTM LM unrolled
# over 64 steps, 4k nodes, 30 s: 8 s for torch.compile's choice, then 11 and 12 s for the head in 2 and 4 chunks,
# and the solves began at 31.5 s, past the limit; the second trace lowered nothing that fit).
TRACES_UNTIL = 1 / 2
STREAMED_FRACTION = 16  # stream_head drops and recomputes head values of at least 1/16 of the largest one


@dataclass(frozen=True)
class Variant:
    """The step with its head in `chunks` chunks, each MLP in `mlp_chunks` and each attention block in
    `attention_chunks` chunks of the batch (1, 1, 1: unsplit)."""

    chunks: int
    graph: Graph
    split: Split | None
    step: CapturedStep  # the joint FX graph the Graph was lowered from (execute partitions it)
    head: frozenset[int] = frozenset()  # forward nodes that compute one chunk of the head
    mlp_chunks: int = 1
    attention_chunks: int = 1

    @property
    def floor_bytes(self) -> int:
        return self.graph.min_budget_lower_bound()

    @property
    def key(self) -> tuple[int, int, int]:
        return self.chunks, self.mlp_chunks, self.attention_chunks

    def describe(self) -> str:
        return f"with the {self.split.short()}" if self.split else "unsplit"

    @cached_property
    def largest_op(self) -> int:
        """The node with the largest working set: it sets the floor."""
        return max(range(len(self.graph)), key=self.graph.working_set_bytes)

    @cached_property
    def checkpoint_all(self) -> SolverResult:
        """checkpoint-all's schedule (it ignores the budget): built once, for the reach and for the solve."""
        return BASELINES["checkpoint-all"](self.graph, 0, SolveOptions())

    def built_baselines(self) -> list[Candidate]:
        """The baselines built for this variant already, as `solve`'s `known`: checkpoint-all, where the reach
        was asked for (2 s of a 60-s limit on GPT-2 XL, not spent again)."""
        if "checkpoint_all" not in self.__dict__:
            return []
        return [baseline_candidate(self.graph, "checkpoint-all", 0, self.checkpoint_all)]

    @cached_property
    def _lowest_baseline(self) -> tuple[Schedule, Simulation]:
        """checkpoint-all's schedule and simulation, or, where that is too long to build (a deep chain), those of
        the baseline with the lowest peak."""
        lowest = self.checkpoint_all.schedule
        schedules = [lowest] if lowest is not None else [
            BASELINES[name](self.graph, 0, SolveOptions()).schedule for name in BASELINES if name != "checkpoint-all"]
        simulated = [(schedule, simulate(self.graph, schedule)) for schedule in schedules if schedule is not None]
        return min(simulated, key=lambda pair: pair[1].peak_bytes)  # store-all always builds

    @property
    def reach_bytes(self) -> int:
        """The peak of checkpoint-all (recompute every forward value where it is read; see _lowest_baseline): a
        budget that is known to fit without solving. Above the floor by the values that must be live together,
        e.g. an MLP's hidden activations in its backward, which a split lowers where the floor barely moves."""
        return self._lowest_baseline[1].peak_bytes

    @property
    def reach_op(self) -> int:
        """The node computed at checkpoint-all's peak (see _lowest_baseline)."""
        schedule, simulation = self._lowest_baseline
        return schedule.ops[simulation.peak_op].node if simulation.peak_op >= 0 else self.largest_op


class SplitTracer:
    """A model's training step, captured once, and its split variants traced on demand.

    `SplitTracer.zoo(name, ...)` builds a zoo model on fake tensors (no memory); `SplitTracer(model, inputs, ...)`
    traces the user's own module (remat.apply), leaving its parameters and the RNG as they were.
    """

    def __init__(self, model: nn.Module, inputs: Call | Sequence[Any], *, loss_fn: Callable | None = None,
                 precision: str = "fp32", device: str = "cpu", optimizer: str = "adamw", meta: dict | None = None,
                 mode: contextlib.AbstractContextManager | None = None, outputs: str = "loss",
                 gradients: str = "held", frozen_trained_bytes: int = 0, frozen_gradient_bytes: int = 0):
        self.profile = load_profile(device)  # fail on a bad device before the slow trace
        if gradients not in GRADIENTS:  # (before the slow trace)
            raise ValueError(f"unknown gradients {gradients!r}: choose one of {', '.join(GRADIENTS)}")
        self.model, self.inputs, self.optimizer = uncompiled(model), Call.of(inputs), optimizer
        self.gradients = gradients
        self.frozen_trained_bytes = frozen_trained_bytes  # parameters frozen after an earlier step trained them
        self.frozen_gradient_bytes = frozen_gradient_bytes  # and their gradients, where the loop keeps them
        self.mode = mode or contextlib.nullcontext()
        self.meta = {**(meta or {}), "device": self.profile.name, "precision": precision,
                     **({"outputs": outputs} if outputs != "loss" else {})}
        started = time.perf_counter()
        with self._tracing():
            step = capture_step(self.model, self.inputs, loss_fn, precision, outputs)
        unsplit = Variant(1, self._lower(step, self.meta), None, step)
        self.trace_s = time.perf_counter() - started  # what a split variant's trace takes too, about
        self.variants: dict[tuple[int, int, int], Variant | None] = {unsplit.key: unsplit}
        self.unsplittable: dict[tuple[int, int, int], str] = {}  # chunk counts -> why the step cannot be split so
        self._modules: dict[str, tuple[str, ...]] | None = None  # MLP / ATTENTION -> the module paths of its regions

    @classmethod
    def zoo(cls, model: str, batch: int | None = None, seq: int | None = None, precision: str = "bf16-mixed",
            device: str = "h100", optimizer: str = "adamw", outputs: str = "loss",
            gradients: str = "held") -> SplitTracer:
        """A zoo model (or `file.py:factory`) built on fake tensors."""
        load_profile(device)  # fail on a bad device before building the model
        mode = fake_tensor_mode()
        spec = build_on_fake(lambda: build_model(model, batch=batch, seq=seq), mode)
        meta = {"model": model, "batch": spec.batch, "seq": spec.seq, "description": spec.description}
        return cls(spec.model, spec.example_inputs, loss_fn=spec.loss_fn, precision=precision, device=device,
                   optimizer=optimizer, meta=meta, mode=mode, outputs=outputs, gradients=gradients)

    @property
    def unsplit(self) -> Variant:
        return self.variants[1, 1, 1]

    def budget_bytes(self, budget: str | int | float) -> int:
        """Bytes of `budget`: a size ("16GB", bytes) or a share of the unsplit step's store-all peak ("60%")."""
        return parse_size(budget, reference_bytes=store_all_simulation(self.unsplit.graph).peak_bytes)

    @property
    def step(self) -> CapturedStep:
        return self.unsplit.step

    @property
    def own_backward(self) -> tuple[str, ...]:
        """What the step's backward runs beyond the derivatives of its forward's ops (custom autograd.Functions,
        backward hooks): a split variant is captured again from the joint graph's forward, where autograd would
        differentiate the ops alone (BLOOM's GeLUFunction: its MLP's weights got no gradient at all with the MLPs
        split; a gradient-reversal hook's layers got the opposite gradient). Such a step is not split."""
        return self.step.own_backward

    @contextlib.contextmanager
    def _tracing(self):
        with torch.random.fork_rng(devices=[]), self.mode:  # tracing a real model must not move its RNG
            yield

    def _lower(self, step: CapturedStep, meta: dict) -> Graph:
        with self.mode:
            return lower(step, self.profile, optimizer=self.optimizer, meta=meta, gradients=self.gradients,
                         frozen_trained_bytes=self.frozen_trained_bytes,
                         frozen_gradient_bytes=self.frozen_gradient_bytes)

    def lowering(self, progress: Callable[[str], None] | None = None) -> Iterator[Variant]:
        """Split variants of the step, each lowering the single-op floor or the reach of the one before by more
        than FLOOR_GAIN. The chunk count doubles for the region that holds the largest op or the op at
        checkpoint-all's peak (the head's, the MLPs' or the attention blocks'), or for both when doubling either
        alone does not lower them. None at all when there is nothing to split. Traced as they are asked for and kept."""
        if self.own_backward:  # a split capture differentiates the forward's ops alone
            return
        current = self.unsplit
        while True:
            regions = self._limiting(current)
            if current is self.unsplit and regions == [HEAD] and not self._head_could_lower(current):
                return
            found, handed_over = None, True
            for region in regions:
                found = self._traced(_grown(current.key, region), progress)
                if found is not None and _lowers(found, current):
                    break
                limits_next = self._limiting(found) if found is not None else [region]
                handed_over = handed_over and region not in limits_next  # the other region's ops are the limit now
                if len(regions) == 1 and handed_over:
                    regions.append(limits_next[0])
            else:  # neither alone lowers them, and each hands the limit to the other: the two were near equal
                both = len(regions) == 2 and handed_over
                found = self._traced(_grown(current.key, *regions), progress) if both else None
            if found is None or not _lowers(found, current):
                return
            yield found
            current = found

    def _limiting(self, variant: Variant) -> list[str]:
        """The regions that hold the largest op and the op at checkpoint-all's peak: [HEAD] when neither is in a
        region that splits (the unsplit head is not marked: doubling its chunks is tried first)."""
        found = [self._region_of(variant, node) for node in (variant.largest_op, variant.reach_op)]
        return list(dict.fromkeys(r for r in found if r is not None)) or [HEAD]

    @cached_property
    def _forward(self) -> torch.fx.GraphModule:
        """The unsplit step's forward, where its regions are looked for (a copy of the joint graph: 0.2 s on
        DenseNet-121, so made once)."""
        with self._tracing():
            return forward_graph(self.step)

    @cached_property
    def head(self) -> Region | None:
        """The unsplit step's head (from a matmul to the loss), or None."""
        with self._tracing():
            return find_head(self._forward)

    def _head_could_lower(self, variant: Variant) -> bool:
        """Whether splitting the head might lower the floor or the reach by FLOOR_GAIN. First from the head's size:
        its ops' forward tensors, their gradients and what the backward saves, each at most its largest tensor. A
        classifier's head is a few KB: not traced (1.6 s of a 30-s limit on ResNet-50, 4.6 s on DenseNet-121, for a
        variant that lowers nothing). Then from where the head is: the floor falls only if the largest op is a head op
        (an op outside the head that reads its input's gradient keeps its working set), the reach only by the head
        values live at its peak. A 2-layer LSTM's head (logits of 4 MB, 74 MB by size) is neither: its trace took
        18 s of a 60-s limit for a variant that lowered nothing."""
        head = self.head
        if head is None:
            return False
        most = 3 * len(head.nodes) * head.largest_bytes
        if most <= FLOOR_GAIN * min(variant.floor_bytes, variant.reach_bytes):
            return False
        in_head = self._head_values(variant)
        if variant.largest_op in in_head:
            return True
        schedule, simulation = variant._lowest_baseline
        live = live_bytes_at(variant.graph, schedule, simulation.peak_op) if simulation.peak_op >= 0 else {}
        return sum(b for node, b in live.items() if node in in_head) > FLOOR_GAIN * variant.reach_bytes

    def _head_values(self, variant: Variant) -> set[int]:
        """Nodes of the unsplit `variant`'s graph whose values a head split makes smaller: the head's forward ops,
        the backward of its modules, and backward ops that read a forward head value (the loss's gradient)."""
        head = self.head
        assert head is not None
        names = set(head.nodes)
        module = head.module

        def in_module(path: str) -> bool:
            return bool(module) and (path == module or path.startswith(module + "."))

        forward = {i for i, node in enumerate(variant.graph.nodes) if not node.is_backward and node.name in names}
        return forward | {i for i, node in enumerate(variant.graph.nodes) if node.is_backward
                          and (in_module(node.module) or any(d in forward for d in node.deps))}

    def _traced(self, key: tuple[int, int, int], progress: Callable[[str], None] | None) -> Variant | None:
        if max(key) > CHUNK_COUNTS[-1]:
            return None
        if progress and key not in self.variants:
            parts = zip(("the head in {} chunks", "the MLPs in {}", "attention in {}"), key, strict=True)
            progress("tracing " + ", ".join(text.format(k) for text, k in parts if k > 1))
        return self.variant(*key)

    def _region_of(self, variant: Variant, node_index: int) -> str | None:
        """HEAD, MLP or ATTENTION: the split region that node `node_index` of the variant's graph belongs to."""
        node = variant.graph.nodes[node_index]
        if variant.split is not None:
            for kind in REGION_KINDS:
                if node.name in chunk_of(variant.step, kind):
                    return kind
        if self._modules is None:
            with self._tracing():
                forward = self._forward
                attentions = find_attention(forward, batch_size(self.inputs.tensors))
                self._modules = {MLP: tuple(r.module for r in find_mlps(forward) if r.module),
                                 ATTENTION: tuple(r.module for r in attentions if r.module)}
        for kind, modules in self._modules.items():  # a region not split yet
            if any(node.module == m or node.module.startswith(m + ".") for m in modules):
                return kind
        return None

    def variant(self, chunks: int, mlp_chunks: int = 1, attention_chunks: int = 1) -> Variant | None:
        """The step with its head in `chunks`, its MLPs in `mlp_chunks` and its attention blocks in
        `attention_chunks`, or None when there is no such region to split or too few rows."""
        key = (chunks, mlp_chunks, attention_chunks)
        if key not in self.variants:
            try:
                with self._tracing():
                    step, split = capture_split(self.model, self.inputs, self.step, *key)
            except (Unsplittable, ValueError) as error:
                self.variants[key] = None
                self.unsplittable[key] = str(error)
            else:
                graph = self._lower(step, {**self.meta, "split": split.to_meta()})
                self.variants[key] = Variant(chunks, graph, split, step, head_nodes(graph, step), mlp_chunks,
                                             attention_chunks)
        return self.variants[key]

    def variant_of(self, split: Split | None) -> Variant:
        """The variant a plan's `split` ran on."""
        variant = (self.variant(split.chunks, split.mlp_chunks, split.attention_chunks) if split is not None
                   else self.unsplit)
        assert variant is not None
        return variant


def _grown(key: tuple[int, int, int], *regions: str) -> tuple[int, int, int]:
    """`key` with the chunk count of each of `regions` doubled."""
    return tuple(2 * k if kind in regions else k for k, kind in zip(key, REGION_KINDS, strict=True))


def _lowers(variant: Variant, current: Variant) -> bool:
    """The variant's floor or its reach is more than FLOOR_GAIN below the current one's."""
    return (variant.floor_bytes <= (1 - FLOOR_GAIN) * current.floor_bytes
            or variant.reach_bytes <= (1 - FLOOR_GAIN) * current.reach_bytes)


def head_nodes(graph: Graph, step: CapturedStep) -> frozenset[int]:
    """The forward nodes of `graph` (lowered from the split `step`) that compute one chunk of the head."""
    in_chunk = chunk_of(step, HEAD)
    return frozenset(i for i, node in enumerate(graph.nodes)
                     if not node.is_backward and node.name in in_chunk and i not in graph.outputs)


@dataclass(frozen=True)
class SplitPlan:
    plan: Plan  # the chosen plan; plan.graph is the chosen variant's graph
    split: Split | None  # None: not split
    note: str  # why this chunk count
    # ((head, MLP, attention chunks), floor bytes, plan if solved), for every variant traced
    tried: tuple[tuple[tuple[int, int, int], int, Plan | None], ...] = field(default=())


def solve_split(tracer: SplitTracer, budget_bytes: int, solver: str = "auto", time_limit_s: float = 60.0,
                backend: str = "highs", progress: Callable[[str], None] | None = None,
                known: Sequence[Candidate] = ()) -> SplitPlan:
    """The cheapest plan over the chunk counts of the head, the MLPs and the attention blocks (see the module
    docstring). `known`: schedules of the unsplit step (torch's choices, say) that its solve weighs beside its own."""
    say = progress or (lambda message: None)
    # one deadline from the call: tracing the variants and judging their floors count against the time limit too
    deadline = time.monotonic() + time_limit_s
    unsplit = tracer.unsplit
    floors = {unsplit.key: unsplit.floor_bytes}

    # Store-all fits: nothing to gain from splitting.
    if store_all_simulation(unsplit.graph).fits(budget_bytes):
        plan = solve(unsplit.graph, budget_bytes, solver, time_limit_s, backend, progress, known=list(known))
        return _finish(plan, None, "not split: the budget holds every activation",
                       [(unsplit.key, floors[unsplit.key], plan)])

    # Below fixed memory no chunk count fits (parameters, gradients, optimizer state and inputs are the same in every
    # one): tracing split variants (44 s on GPT-2 small at 1 GB) would only find a minimum budget far above this one.
    fixed = unsplit.graph.fixed
    if budget_bytes < fixed.total_bytes:
        plan = solve(unsplit.graph, budget_bytes, solver, max(deadline - time.monotonic(), MIN_SOLVE_S), backend,
                     progress, known=[*known, *unsplit.built_baselines()])
        # the unsplit step's lowest peak is no minimum for a split one: name none rather than a wrong one
        message = f"no schedule fits {budget_bytes} bytes: fixed memory alone is {fixed.total_bytes} bytes"
        plan = replace(plan, min_feasible_bytes=None, min_budget_lower_bound_bytes=fixed.total_bytes, message=message)
        note = f"not split: the budget is below fixed memory, {format_bytes(fixed.total_bytes)}, which no split changes"
        return _finish(plan, None, note, [(unsplit.key, floors[unsplit.key], plan)])

    # torch.compile's own choice (its min-cut partitioner at the default activation_memory_budget, 1.0) is weighed
    # too, so the plan is never worse than what torch.compile would run: a 2-layer LSTM (10,276 nodes) at 70% of its
    # store-all peak, +3.7% where remat's own search had +14.8% in 60 s. 0.3 s on ResNet-50, 3 s on GPT-2 XL, 5 s on
    # that LSTM.
    if solver == "auto" and not any(c.method == compile_method(1.0) for c in known):
        say("torch.compile's choice")
        known = [*known, compile_budget_candidate(tracer.step, unsplit.graph, 1.0)]

    def leaves_room(variant: Variant) -> bool:
        """Its largest op leaves at least ROOM_SHARE of the activation budget to the rest of the step (room to
        store rather than recompute), and checkpoint-all fits (a schedule is known to fit)."""
        fixed = variant.graph.fixed.total_bytes
        return (variant.floor_bytes - fixed <= (1 - ROOM_SHARE) * (budget_bytes - fixed)
                and variant.reach_bytes <= budget_bytes)

    # Split variants, doubling chunk counts until one leaves room, or while the floor or the reach falls.
    variants = [unsplit]
    unsplit_may_fit = unsplit.floor_bytes <= budget_bytes
    slow_to_trace = unsplit_may_fit and tracer.trace_s > TRACE_SHARE * time_limit_s
    slowest_s, traced_at = 0.0, time.monotonic()
    cut = ""  # said in the note when the doubling stopped for time
    for variant in () if slow_to_trace else tracer.lowering(say):
        variants.append(variant)
        if leaves_room(variant):
            break
        slowest_s, traced_at = max(slowest_s, time.monotonic() - traced_at), time.monotonic()
        # until a step traced is known to fit (checkpoint-all's peak, its reach, is under the budget) the doubling goes
        # on, past the time limit: there may be no plan without it. Once one is, it stops for time, split or not
        # (llama-tiny at 15 MB, 5 s: the unsplit step's floor is over the budget, and the doubling went on to MLP and
        # attention splits, 13.6 s of wall time and a +50.6% plan; now the head in 4 chunks, 10.6 s, +18.1%)
        may_fit = any(v.reach_bytes <= budget_bytes for v in variants)
        if may_fit and traced_at + slowest_s > deadline - (1 - TRACES_UNTIL) * time_limit_s:
            say("no time to trace another split variant")
            cut = (f"; more chunks not traced: the next trace (about {slowest_s:.0f} s) would end past "
                   f"{TRACES_UNTIL:.0%} of the time limit")
            break
    floors.update((k, v.floor_bytes) for k, v in tracer.variants.items() if v is not None)  # every one traced
    if len(variants) == 1:
        if tracer.own_backward:
            why_not = (f"not split: the step's backward runs {', '.join(tracer.own_backward)}, which a split step's "
                       "capture would not keep")
        elif slow_to_trace:  # (tracer.head is not looked for either: that copies the joint graph)
            why_not = (f"not split: the budget is above the unsplit floor, and tracing a split variant takes about "
                       f"as long as the step's trace ({tracer.trace_s:.0f} s), more than {TRACE_SHARE:.0%} of the "
                       f"time limit")
        elif tracer.head is None and all(v is None for k, v in tracer.variants.items() if k != unsplit.key):
            why_not = "not split: no head from a matmul to the loss, MLP or attention block to split"
        elif tried := [v for k, v in tracer.variants.items() if k != unsplit.key and v is not None]:
            # the largest op is in a region that splits, but splitting it raises the floor or the reach elsewhere
            # (GPT-2 at batch 2: the tied embedding's gradient accumulated in float32), which this note hid
            variant = min(tried, key=lambda v: (v.floor_bytes, v.reach_bytes))
            why_not = (f"not split: splitting lowers neither the single-op floor nor checkpoint-all's peak by more "
                       f"than {FLOOR_GAIN:.0%} (unsplit "
                       f"{format_bytes(unsplit.floor_bytes)} and {format_bytes(unsplit.reach_bytes)}; with the "
                       f"{variant.split.short()} {format_bytes(variant.floor_bytes)} and "
                       f"{format_bytes(variant.reach_bytes)})")
        else:
            why_not = f"not split: the largest op is not in a region that splits ({_largest_op(unsplit)})"
        plan = solve(unsplit.graph, budget_bytes, solver, max(deadline - time.monotonic(), MIN_SOLVE_S), backend,
                     progress, known=[*known, *unsplit.built_baselines()])
        return _finish(plan, None, why_not, [(k, floor, plan if k == unsplit.key else None)
                                             for k, floor in floors.items()], cut_for_time=slow_to_trace)

    # Candidates: the unsplit step if its floor fits, the last variant (the fewest chunks that leave room, or else
    # the most chunks: the lowest floor, the plan when nothing fits, and the minimum budget), then the others traced
    # on the way whose floor fits, the latest first. Those were dropped, so the plan hung on how far the doubling got:
    # gpt2-tiny at 70% had the head in 2 chunks at +25.8% with 10 s, and with 20 s went on to the head in 4 and MLPs
    # in 2 and kept only that, +115.1%, over per-block's +30.3% on the head in 2 chunks.
    candidates = [unsplit] if unsplit.floor_bytes <= budget_bytes else []
    candidates.append(variants[-1])
    candidates += [v for v in reversed(variants[1:-1]) if v.floor_bytes <= budget_bytes]
    solved: list[tuple[Variant, Plan]] = []
    for position, variant in enumerate(candidates):
        say(f"solving {variant.describe()}")
        if variant.split is None:
            weighed = list(known)
        else:
            weighed = streamed_baselines(variant, budget_bytes) if variant.head and solver not in BASELINES else []
        weighed += variant.built_baselines()
        # an even share of the time left: what a solve that ends early (proven optimal) leaves goes to the next
        share = max(deadline - time.monotonic(), 0.0) / (len(candidates) - position)
        # a plan found for an earlier candidate: this one stops once its bound shows it cannot do better
        beaten_at_s = min((p.compute_s for _, p in solved if p.compute_s is not None), default=None)
        solved.append((variant, solve(variant.graph, budget_bytes, solver, share, backend, progress, known=weighed,
                                      beaten_at_s=beaten_at_s)))
    # a solve may prove a floor over the variant's node floor (the walk back from the step's end: planner._plan)
    floors.update((v.key, max(floors[v.key], p.min_budget_lower_bound_bytes)) for v, p in solved)
    tried = [(k, floor, next((p for v, p in solved if v.key == k), None)) for k, floor in floors.items()]

    fits = [(v, p) for v, p in solved if p.schedule is not None]
    # the minimum budget over the chunk counts: the lowest peak of any plan, above the lowest floor
    min_feasible = min((p.min_feasible_bytes for _, p in solved if p.min_feasible_bytes is not None), default=None)
    lowest_floor = min(floors.values())
    # where that floor is, which the plan's own chunk counts need not be ("with the head in 2 chunks" was printed
    # beside the floor of the head in 8, the MLPs and attention blocks in 2)
    floor_at = tracer.variants[min(floors, key=lambda key: (floors[key], sum(key)))].describe()
    if not fits:
        variant, plan = solved[-1]
        note = (f"no chunk count fits: the unsplit step cannot go below {format_bytes(unsplit.floor_bytes)} "
                f"and the step {variant.describe()} not below {format_bytes(plan.min_feasible_bytes or 0)}")
        if solver in BASELINES:  # its one schedule peaks over the budget: the floors need not be why
            note = f"{solver}'s schedule fits no chunk count: " + ", ".join(
                f"{v.describe()} it peaks at {format_bytes(peak)}" for v, p in solved
                if (peak := _peak_of(p, solver)) is not None)
        plan = replace(plan, min_feasible_bytes=min_feasible, min_budget_lower_bound_bytes=lowest_floor)
        return _finish(plan, variant.split, note + cut, tried, bool(cut), floor_at)
    best_variant, best = min(fits, key=lambda vp: (vp[1].simulation.compute_s, sum(vp[0].key)))
    plan = replace(best, min_feasible_bytes=min_feasible, min_budget_lower_bound_bytes=lowest_floor)
    plan = _bound_over(solved, plan)
    if best_variant.split is None:
        return _finish(plan, None, "not split: the unsplit plan fits and is the cheapest" + cut, tried, bool(cut),
                       floor_at)
    unsplit_plan = next((p for v, p in solved if v.split is None), None)
    against_unsplit = f"step {overhead_of(best.compute_s, unsplit.graph.compute_s):+.1%} against unsplit store-all"
    if unsplit_plan is None:  # its floor is over the budget
        why = (f"unsplit, no schedule fits below {format_bytes(unsplit.floor_bytes)}: "
               f"{_largest_op(unsplit)}; {against_unsplit}")
    elif unsplit_plan.schedule is None:
        peak = _peak_of(unsplit_plan, solver) if solver in BASELINES else unsplit_plan.min_feasible_bytes
        found = f"{solver}'s schedule peaks at" if solver in BASELINES else "the lowest peak found is"
        why = f"unsplit, {found} {format_bytes(peak or 0)}, over the budget; {against_unsplit}"
    else:
        why = (f"{against_unsplit}, the best unsplit plan "
               f"{overhead_of(unsplit_plan.compute_s, unsplit.graph.compute_s):+.1%}")
    return _finish(plan, best_variant.split, why + cut, tried, bool(cut), floor_at)


def streamed_baselines(variant: Variant, budget_bytes: int, plain: bool = False) -> list[Candidate]:
    """The baselines' schedules with the head streamed (`stream_head`): plans the solver weighs beside its own.
    The baselines know nothing of chunks, so they hold every chunk's logits from its loss to its backward.
    With `plain`, each baseline's own schedule of the split step too (one baseline solve serves both)."""
    candidates = []
    for name, baseline in BASELINES.items():
        if name == "checkpoint-all" and not plain:
            continue
        started = time.perf_counter()
        result = (variant.checkpoint_all if name == "checkpoint-all"
                  else baseline(variant.graph, budget_bytes, SolveOptions()))
        if result.schedule is None:
            continue
        if plain:
            candidates.append(Candidate(name, result.status, result.schedule,
                                        simulate(variant.graph, result.schedule), result.wall_s, result.message))
        if name == "checkpoint-all":
            continue  # recomputes everything already: nothing to stream
        schedule = stream_head(variant.graph, result.schedule, variant.head)
        simulation = simulate(variant.graph, schedule)
        if simulation.valid:
            candidates.append(Candidate(f"{name}+streamed-head", FEASIBLE, schedule, simulation,
                                        time.perf_counter() - started, f"{name} with the head's chunks streamed"))
    return candidates


def with_chunks(method: str, split: Split | None) -> str:
    """A method's name with the chunk counts of the step it ran on ("decompose (head in 4 chunks)")."""
    return f"{method} ({split.short()})" if split is not None else method


def stream_head(graph: Graph, schedule: Schedule, head: frozenset[int], keep_within: int = 2) -> Schedule:
    """`schedule` with the head's chunks streamed: a head node is freed after it is read, unless it is read
    again within `keep_within` computes, and computed again where it is read later (a chunk's logits are
    made for its loss, dropped, and made again for its backward, as chunked cross-entropy kernels do).
    Whatever else such a recomputation needs and the schedule no longer holds is recomputed the same way.
    """
    order = [op.node for op in schedule.ops if op.kind == COMPUTE]
    uses: dict[int, list[int]] = {}  # node -> positions in `order` of the computes that read it
    for position, node in enumerate(order):
        for dep in set(graph.nodes[node].deps):
            uses.setdefault(dep, []).append(position)
    outputs = set(graph.outputs)
    live: set[int] = set()
    largest = max((graph.nodes[i].output_bytes for i in head), default=0)
    # streamed: the head's large values (a partial loss is a scalar: kept, not recomputed for each reader)
    transient: set[int] = {i for i in head if graph.nodes[i].output_bytes * STREAMED_FRACTION >= largest}
    ops: list[Op] = []

    def read_again_soon(node: int, position: int) -> bool:
        reads = uses.get(node, ())
        next_read = bisect.bisect_right(reads, position)  # reads are in ascending order
        return next_read < len(reads) and reads[next_read] - position <= keep_within

    def compute(node: int, position: int) -> None:
        """Compute `node` for the schedule's compute at `position`; drop the streamed inputs it was the
        last near reader of (`position - 1` while preparing that compute: its own read counts as near)."""
        ops.append(Op(COMPUTE, node))
        live.add(node)
        for dep in sorted(set(graph.nodes[node].deps)):
            if dep in transient and dep in live and not read_again_soon(dep, position):
                ops.append(Op(FREE, dep))
                live.discard(dep)

    def make_live(node: int, position: int) -> None:
        stack = [(node, False)]  # depth-first, each node after its missing inputs
        while stack:
            current, inputs_ready = stack.pop()
            if current in live:
                continue
            if inputs_ready:
                if current != node and current not in outputs:
                    transient.add(current)  # recomputed here for a reader: dropped after it again
                compute(current, position - 1 if current != node else position)
                continue
            stack.append((current, True))
            stack.extend((dep, False) for dep in graph.nodes[current].deps if dep not in live)

    free_at: dict[int, list[int]] = {}  # position -> nodes the schedule frees after its compute there
    position = -1
    for op in schedule.ops:
        if op.kind == COMPUTE:
            position += 1
        else:
            free_at.setdefault(position, []).append(op.node)
    for position, node in enumerate(order):
        if node not in live:
            make_live(node, position)
        if node in transient and node in live and not read_again_soon(node, position) and node not in outputs:
            ops.append(Op(FREE, node))  # a streamed value nobody reads
            live.discard(node)
        for freed in free_at.get(position, ()):
            if freed in live:
                ops.append(Op(FREE, freed))
                live.discard(freed)
    return Schedule(tuple(ops), len(graph))


def _largest_op(variant: Variant) -> str:
    """The op that sets the variant's floor, in words."""
    graph, index = variant.graph, variant.largest_op
    node = graph.nodes[index]
    holds = format_bytes(graph.working_set_bytes(index))
    if node.is_return:
        return f"the backward's return of the gradients holds {holds} by itself"
    return f"{node.op.removeprefix('aten.').removesuffix('.default')} {node.shape} holds {holds} by itself"


def _peak_of(plan: Plan, method: str) -> int | None:
    """The peak of `method`'s schedule among the plan's candidates (a baseline asked for by name), if it made one."""
    return next((c.simulation.peak_bytes for c in plan.candidates
                 if c.method == method and c.simulation is not None and c.simulation.valid), None)


def _bound_over(solved: Sequence[tuple[Variant, Plan]], plan: Plan) -> Plan:
    """`plan` (the cheapest of `solved`) with the lowest of the solved chunk counts' lower bounds: each bound holds for
    its own step only, so a plan proven optimal on its split step was called optimal, at a gap of 0, where the unsplit
    step had a cheaper plan or a lower bound (`remat compare`'s auto row at +18.8%, where the unsplit step's plan was
    +17.0%). A step proven infeasible has no schedule to count; one cut short without a plan counts every node once."""
    bounds = []
    for variant, other in solved:
        if other.schedule is None and other.status == INFEASIBLE:
            continue
        bound = other.lower_bound_s if other.lower_bound_s is not None else other.graph.compute_s
        bounds.append((bound, variant, other))
    bound, variant, other = min(bounds, key=lambda b: b[0])
    if bound >= (plan.lower_bound_s or 0.0):  # its own step's bound is the lowest
        return plan
    lower_bound_s = min(bound, plan.compute_s)
    status = OPTIMAL if meets_bound(plan.compute_s, lower_bound_s) else FEASIBLE
    method = other.lower_bound_method if other.lower_bound_s is not None else "every node once"
    step = "the unsplit step" if variant.split is None else f"the step {variant.describe()}"
    return replace(plan, lower_bound_s=lower_bound_s, status=status,
                   lower_bound_method=f"{method}, of {step}: the lowest over the chunk counts solved")


def _finish(plan: Plan, split: Split | None, note: str, tried, cut_for_time: bool = False,
            floor_at: str | None = None) -> SplitPlan:
    """`cut_for_time`: chunk counts were left untraced for the time limit (meta "split_cut": a longer limit traces
    them, and where nothing fits they may). `floor_at`: the chunk counts of min_budget_lower_bound_bytes, in words
    (meta "floor_at"), where it is not the plan's."""
    meta = {**plan.graph.meta, "split_note": note, "split_cut": cut_for_time}
    if floor_at is not None:
        meta["floor_at"] = floor_at
    if split is not None:
        split = replace(split, reason=note)
        meta["split"] = split.to_meta()
    plan = replace(plan, graph=replace(plan.graph, meta=meta))
    return SplitPlan(plan, split, note, tuple(tried))
