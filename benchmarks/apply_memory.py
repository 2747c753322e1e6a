"""Run planned training steps on this CPU and compare what they hold with what the simulator planned.

    python benchmarks/apply_memory.py [--models gpt2-tiny,mlp,...] [--time-limit 20]
                                      [--out benchmarks/results/apply_memory.json]

For each model, three budgets: store-all, halfway down, and the minimum feasible budget found.
Each row: planned activation peak (simulator), measured activation peak (live storages counted
while the forward and backward graphs run), their difference, the bytes held by multi-output ops
(whose outputs both the simulator and the run free one by one), and whether loss, gradients and
buffers equal eager's bit for bit (float64, except resnet50 in float32). A plan that runs the loss head, the
MLPs or attention in chunks (remat.apply splits them where that fits or costs less) sums the chunks' losses and
gradients in another order, so it is equal to rounding, not bit for bit; the row's `split_chunks`,
`mlp_chunks` and `attention_chunks` say so.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from remat.capture import LossStep
from remat.models import UNet, build_model
from remat.planner import solve
from remat.training import apply, trace_step
from remat.units import format_bytes
from solvers.base import overhead_of


class DropoutMLP(nn.Module):
    def __init__(self, width: int = 256, depth: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.drop(torch.relu(layer(x)))  # (B, width)
        return self.head(x).pow(2).mean()


class InPlaceNet(nn.Module):
    """A residual MLP written with in-place add_, mul_ and ReLU."""

    def __init__(self, width: int = 256, depth: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(x)
            h.add_(x).mul_(0.5)  # residual, in place on the linear's output (its backward does not read it)
            x = self.act(h)  # ReLU in place
        return self.head(x).pow(2).mean()


def _zoo(name: str, batch: int, seq: int | None = None, dtype=torch.float64):
    spec = build_model(name, batch=batch, seq=seq)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in spec.example_inputs)
    return spec.model.to(dtype), inputs


MODELS = {
    "gpt2-tiny": lambda: _zoo("gpt2-tiny", batch=4, seq=64),
    "mlp": lambda: _zoo("mlp", batch=64),
    "resnet50": lambda: _zoo("resnet50", batch=2, dtype=torch.float32),
    "unet": lambda: (UNet(base=16, depth=3).double(),
                     (torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.randint(0, 2, (2, 64, 64)))),
    "dropout-mlp": lambda: (DropoutMLP().double(), (torch.randn(64, 256, dtype=torch.float64),)),
    "inplace-net": lambda: (InPlaceNet().double(), (torch.randn(64, 256, dtype=torch.float64),)),
}


def build(name: str):
    torch.manual_seed(0)
    return MODELS[name]()


def multi_output_bytes(graph) -> int:
    return sum(n.output_bytes for n in graph.nodes if any(f.startswith("getitem") for f in n.fx_nodes))


def run_model(name: str, time_limit: float) -> list[dict]:
    model, inputs = build(name)
    graph, _ = trace_step(model, inputs, device="cpu")
    lowest = solve(graph, 1, time_limit_s=time_limit)
    low, high = lowest.min_feasible_bytes, lowest.store_all.peak_bytes

    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    reference_loss = LossStep(reference, None, "fp32")(*inputs)
    reference_loss.backward()

    rows = []
    for label, budget in (("store-all", high), ("halfway", (low + high) // 2), ("minimum", low)):
        model, inputs = build(name)
        started = time.perf_counter()
        # held: the budgets are the held step's (trace_step's default); apply's default plans the gradients as made
        planned = apply(model, budget=budget, example_inputs=inputs, device="cpu", time_limit=time_limit,
                        gradients="held")
        plan_s = time.perf_counter() - started
        step = planned.planned
        torch.manual_seed(1)
        started = time.perf_counter()
        loss, memory = planned.measure(*inputs)
        run_s = time.perf_counter() - started
        pairs = zip(model.parameters(), reference.parameters(), strict=True)
        buffers = zip(model.buffers(), reference.buffers(), strict=True)
        exact = (torch.equal(loss, reference_loss.detach()) and all(torch.equal(p.grad, q.grad) for p, q in pairs)
                 and all(torch.equal(b, c) for b, c in buffers))
        planned_bytes = step.simulation.activation_peak_bytes
        split = step.graph.meta.get("split") or {}  # chunk counts of the head, the MLPs and attention
        rows.append({
            "model": name, "budget": label, "budget_bytes": budget, "nodes": len(graph), "method": step.plan.method,
            "recomputed_nodes": len(step.plan.schedule.recomputed_nodes()),
            "planned_peak_bytes": step.simulation.peak_bytes, "planned_activation_bytes": planned_bytes,
            "measured_activation_bytes": memory.peak_live_bytes, "measured_peak_bytes": memory.peak_bytes,
            "difference": (memory.peak_live_bytes - planned_bytes) / planned_bytes if planned_bytes else 0.0,
            "multi_output_bytes": multi_output_bytes(graph), "rng_state_bytes": memory.rng_state_bytes,
            "exact_equal_to_eager": exact, "plan_s": plan_s, "step_s": run_s,
            "split_chunks": split.get("chunks", 1), "mlp_chunks": split.get("mlp_chunks", 1),
            "attention_chunks": split.get("attention_chunks", 1),
            "overhead": overhead_of(step.simulation.compute_s, lowest.store_all.compute_s),
        })
        row = rows[-1]
        print(f"{name:12s} {label:9s} {row['method']:22s} planned {format_bytes(planned_bytes):>10s} "
              f"measured {format_bytes(memory.peak_live_bytes):>10s} ({row['difference']:+.1%}) "
              f"exact={exact} recomputed={row['recomputed_nodes']} chunks: head {row['split_chunks']}, MLPs "
              f"{row['mlp_chunks']}, attention {row['attention_chunks']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--time-limit", type=float, default=20.0)
    parser.add_argument("--out", default="benchmarks/results/apply_memory.json")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        rows.extend(run_model(name, args.time_limit))
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "time_limit_s": args.time_limit, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n| model | budget | plan | planned act. | measured act. | diff | multi-output bytes | exact |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['budget']} | {r['method']} | {format_bytes(r['planned_activation_bytes'])} | "
              f"{format_bytes(r['measured_activation_bytes'])} | {r['difference']:+.1%} | "
              f"{format_bytes(r['multi_output_bytes'])} | {r['exact_equal_to_eager']} |")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
