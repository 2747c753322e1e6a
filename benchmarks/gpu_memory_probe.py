"""Where a remat step's measured CUDA peak differs from its plan: peaks of the forward, the backward and the
optimizer step apart, against the plan's fixed memory and activation peak (GPT-2 small, bf16 autocast, AdamW).

    python benchmarks/gpu_memory_probe.py [--batch 16] [--budgets 15GB,12.5GB]
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.gpu_pareto import fresh, release, training_step
from remat.apply import apply

GIB = 2**30


def phases(planned, inputs, optimizer) -> dict:
    """Peak and held bytes of each phase of one step, after two warm-up steps."""
    step = training_step(planned, inputs, optimizer)
    step()
    step()
    torch.cuda.synchronize()
    figures = {"start_gib": torch.cuda.memory_allocated() / GIB}
    for name, run in (("forward", lambda: planned(*inputs)), ):
        torch.cuda.reset_peak_memory_stats()
        loss = run()
        torch.cuda.synchronize()
        figures[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        figures[f"after_{name}_gib"] = torch.cuda.memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    figures["backward_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    figures["after_backward_gib"] = torch.cuda.memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    torch.cuda.synchronize()
    figures["optimizer_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    optimizer.zero_grad(set_to_none=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budgets", default="15GB,12.5GB")
    args = parser.parse_args()
    for budget in args.budgets.split(","):
        model, inputs, optimizer = fresh(args.batch)
        planned = apply(model, budget=budget, example_inputs=inputs, precision="bf16-mixed", time_limit=20.0)
        prepared = planned.planned
        fixed = prepared.graph.fixed
        row = {"budget": budget, "batch": args.batch, "plan_method": prepared.plan.method,
               "planned_peak_gib": prepared.simulation.peak_bytes / GIB,
               "planned_activation_gib": prepared.simulation.activation_peak_bytes / GIB,
               "fixed_gib": fixed.total_bytes / GIB, "parameter_gib": fixed.parameter_bytes / GIB,
               "gradient_gib": fixed.gradient_bytes / GIB, "optimizer_gib": fixed.optimizer_bytes / GIB,
               **phases(planned, inputs, optimizer)}
        _, memory = planned.measure(*inputs)
        row["measure_peak_gib"] = memory.peak_bytes / GIB
        row["measure_live_gib"] = memory.peak_live_bytes / GIB
        print(json.dumps(row), flush=True)
        del planned, model, optimizer
        release()


if __name__ == "__main__":
    main()
