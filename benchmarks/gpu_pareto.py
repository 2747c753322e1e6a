"""Measured step time against measured peak memory of GPT-2 small's training step on a GPU (issue 8), per method.

    python benchmarks/gpu_pareto.py [--batches 16,8] [--budgets 18GB,15GB,12.5GB] [--deadline-s 420]
                                    [--out benchmarks/results/gpu_pareto_<gpu>.json]
    python benchmarks/gpu_pareto.py --plot benchmarks/results/gpu_pareto_<gpu>.json   # the PNG from saved rows

GPT-2 small (transformers, random init), seq 1024, bf16 autocast, AdamW, dropout 0. Methods, each after two
warm-up steps, the median of ten (CUDA events around forward, backward, optimizer step and zeroing the
gradients):
- `eager`: the model as it is (store-all);
- `hf-checkpoint`: Hugging Face's per-block gradient checkpointing (`gradient_checkpointing_enable`, non-reentrant);
- `compile-budget-<B>`: `torch.compile` with `activation_memory_budget` B (1.0, 0.5, 0.2, 0.0);
- `remat-<budget>`: `remat.apply(model, budget=...)` with backend `eager` (and `inductor` at the first budget).
Peak: `torch.cuda.max_memory_allocated()` over the timed steps, the whole step (weights, gradients, AdamW's
state, activations); planned peak: the simulator's for remat's schedule. The sections run in that order until
`--deadline-s` (one device lease is short), and each row is saved as soon as it is measured: a method that
fails leaves a row with its error. Max batch under 16 GiB is not measured by this version.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from remat.capture import LossStep
from remat.models import build_model
from remat.training import apply

COMPILE_BUDGETS = (1.0, 0.5, 0.2, 0.0)
WARMUP_STEPS = 2
TIMED_STEPS = 10
GIB = 2**30


def timed(step, steps: int = TIMED_STEPS, warmup: int = WARMUP_STEPS) -> tuple[float, int]:
    """Median milliseconds of `step` after `warmup` calls, and the peak bytes allocated over the timed calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated()


def training_step(module: torch.nn.Module, inputs: tuple, optimizer: torch.optim.Optimizer):
    def step() -> None:
        loss = module(*inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def fresh(batch: int):
    """GPT-2 small on the GPU with its inputs, its loss step (bf16 autocast) and AdamW."""
    torch.manual_seed(0)
    spec = build_model("gpt2", batch=batch)
    model = spec.model.cuda().train()
    inputs = tuple(x.cuda() for x in spec.example_inputs)
    return model, inputs, torch.optim.AdamW(model.parameters(), lr=1e-4)


def release() -> None:
    """Free the last section's model, optimizer and compiled graphs before the next section is measured. (Collecting
    garbage here did not change any peak on the H200: the loop's 1.40 GiB over one step has another cause.)"""
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure_eager(batch: int, checkpoint: bool) -> dict:
    model, inputs, optimizer = fresh(batch)
    if checkpoint:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step_ms, peak = timed(training_step(LossStep(model, None, "bf16-mixed"), inputs, optimizer))
    return {"method": "hf-checkpoint" if checkpoint else "eager", "backend": "eager", "step_ms": step_ms,
            "peak_gib": peak / GIB}


def measure_compile(batch: int, budget: float) -> dict:
    import torch._functorch.config as functorch_config

    model, inputs, optimizer = fresh(batch)
    functorch_config.activation_memory_budget = budget
    started = time.perf_counter()
    compiled = torch.compile(LossStep(model, None, "bf16-mixed"))
    step_ms, peak = timed(training_step(compiled, inputs, optimizer))
    return {"method": f"compile-budget-{budget}", "backend": "inductor", "step_ms": step_ms, "peak_gib": peak / GIB,
            "compile_and_measure_s": time.perf_counter() - started}


def measure_remat(batch: int, budget: str, backend: str) -> dict:
    model, inputs, optimizer = fresh(batch)
    started = time.perf_counter()
    planned = apply(model, budget=budget, example_inputs=inputs, precision="bf16-mixed", backend=backend,
                    time_limit=20.0)
    step_ms, peak = timed(training_step(planned, inputs, optimizer))
    step = planned.planned
    return {"method": f"remat-{budget}", "backend": backend, "step_ms": step_ms, "peak_gib": peak / GIB,
            "planned_peak_gib": step.simulation.peak_bytes / GIB, "plan_method": step.plan.method,
            "plan_status": step.solved.status if step.solved else None, "planned_ms": step.simulation.compute_s * 1e3,
            "plan_and_measure_s": time.perf_counter() - started}


def sections(batches: list[int], budgets: list[str]):
    """(batch, name, thunk) in the order they run: what a short lease must measure first comes first."""
    for batch in batches:
        yield batch, "eager", lambda b=batch: measure_eager(b, checkpoint=False)
        yield batch, "hf-checkpoint", lambda b=batch: measure_eager(b, checkpoint=True)
        for budget in budgets:
            yield batch, f"remat-{budget}", lambda b=batch, m=budget: measure_remat(b, m, "eager")
        for budget in COMPILE_BUDGETS:
            yield batch, f"compile-budget-{budget}", lambda b=batch, c=budget: measure_compile(b, c)
        yield batch, f"remat-{budgets[0]} inductor", lambda b=batch: measure_remat(b, budgets[0], "inductor")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if "step_ms" in row:
            family = "remat" if row["method"].startswith("remat") else row["method"].split("-budget")[0]
            groups.setdefault(f"{family} ({row['backend']}), batch {row['batch']}", []).append(row)
    for label, points in sorted(groups.items()):
        points.sort(key=lambda r: r["peak_gib"])
        axes.plot([p["peak_gib"] for p in points], [p["step_ms"] for p in points], "o-", label=label)
    axes.set_xlabel("measured peak (GiB, max_memory_allocated)")
    axes.set_ylabel("step time (ms, median)")
    axes.set_title(f"GPT-2 small training step, {rows[0].get('device', 'GPU')}")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="16,8")
    parser.add_argument("--budgets", default="18GB,15GB,12.5GB", help="remat's budgets (whole step memory)")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="start no section after this many seconds")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None, help="only draw the PNG of a saved JSON file")
    args = parser.parse_args()
    if args.plot:
        saved = Path(args.plot)
        plot(json.loads(saved.read_text())["rows"], saved.with_suffix(".png"))
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu_pareto needs a CUDA device")
    device = torch.cuda.get_device_name()
    out = Path(args.out or f"benchmarks/results/gpu_pareto_{device.split()[-1].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, skipped = [], []
    release()
    for batch, name, measure in sections([int(b) for b in args.batches.split(",")], args.budgets.split(",")):
        if time.perf_counter() - started > args.deadline_s:
            skipped.append(f"{name} batch {batch}")
            continue
        section_started = time.perf_counter()
        try:
            row = measure()
        except Exception as error:  # a method that fails (OOM, a capture error) is a row too
            row = {"method": name, "error": f"{type(error).__name__}: {str(error)[:300]}"}
            traceback.print_exc()
        release()
        row.update(batch=batch, device=device, torch=torch.__version__, wall_s=time.perf_counter() - section_started)
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    out.write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"skipped past the deadline: {skipped}")


if __name__ == "__main__":
    main()
