"""Model name -> Graph: build the model on fake tensors, capture its training step, lower and cost it."""

from __future__ import annotations

from dataclasses import dataclass

from remat.capture import CapturedStep
from remat.graph import Graph


@dataclass(frozen=True)
class TracedStep:
    step: CapturedStep  # the joint FX graph on fake tensors (for torch's own partitioner, the profiler)
    graph: Graph  # the lowered, costed Graph IR


def trace_model(model: str, batch: int | None = None, seq: int | None = None, precision: str = "bf16-mixed",
                device: str = "h100", optimizer: str = "adamw", gradients: str = "held") -> Graph:
    """The training-step graph of a zoo model or a `file.py:factory`, costed for `device`; `gradients` as
    `remat.apply` takes them (how the loop keeps them between steps)."""
    return trace_step(model, batch, seq, precision, device, optimizer, gradients).graph


def trace_step(model: str, batch: int | None = None, seq: int | None = None, precision: str = "bf16-mixed",
               device: str = "h100", optimizer: str = "adamw", gradients: str = "held") -> TracedStep:
    """trace_model, keeping the captured joint FX graph beside the Graph."""
    from remat.split_plan import SplitTracer  # it loads the planner and its solvers

    tracer = SplitTracer.zoo(model, batch=batch, seq=seq, precision=precision, device=device, optimizer=optimizer,
                             gradients=gradients)
    return TracedStep(tracer.step, tracer.unsplit.graph)
