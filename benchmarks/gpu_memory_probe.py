"""Where a remat step's measured CUDA peak differs from its plan: peaks of the forward, the backward and the
optimizer step apart, against the plan's fixed memory and activation peak (GPT-2 small, bf16 autocast, AdamW).

    python benchmarks/gpu_memory_probe.py [--batch 16] [--budgets 15GB,12.5GB] [--loop-steps 12]

On an H200 (README, "On a GPU") one step's phases were within 3% under the plan, while gpu_pareto's 10-step loop
peaked 1.40 GiB higher: the loop's per-step peaks are recorded to find where.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/gpu_memory_probe.py` from anywhere
from benchmarks.gpu_pareto import fresh, release, training_step  # noqa: E402
from remat.training import apply

GIB = 2**30


def phases(planned, inputs, optimizer) -> dict:
    """Peak and held bytes of each phase of one step, after two warm-up steps."""
    step = training_step(planned, inputs, optimizer)
    step()
    step()
    torch.cuda.synchronize()
    figures = {"start_gib": torch.cuda.memory_allocated() / GIB}
    torch.cuda.reset_peak_memory_stats()
    loss = planned(*inputs)
    torch.cuda.synchronize()
    figures["forward_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    figures["after_forward_gib"] = torch.cuda.memory_allocated() / GIB
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


def loop_peaks(planned, inputs, optimizer, steps: int) -> dict:
    """Each step's peak and the bytes allocated when it starts, over a loop as benchmarks/gpu_pareto.py times it
    (no synchronisation between steps): a peak that grows step by step is something held across steps; one that
    jumps is an allocation the plan does not know."""
    step = training_step(planned, inputs, optimizer)
    starts, peaks = [], []
    for _ in range(steps):
        starts.append(torch.cuda.memory_allocated() / GIB)
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / GIB)
    return {"loop_start_gib": starts, "loop_peak_gib": peaks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budgets", default="15GB,12.5GB")
    parser.add_argument("--loop-steps", type=int, default=12, help="steps of the loop whose peaks are recorded")
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
        row.update(loop_peaks(planned, inputs, optimizer, args.loop_steps))
        print(json.dumps(row), flush=True)
        del planned, model, optimizer
        release()


if __name__ == "__main__":
    main()
