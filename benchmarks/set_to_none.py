"""Plans for each way a training loop keeps its gradients between steps (`--gradients`): held (the default, fixed
memory once per weight), set-to-none (freed between steps) and accumulate (kept, with the backward's new ones beside).

    PYTHONPATH=. python benchmarks/set_to_none.py [--models gpt2,resnet50,unet] [--budgets 0.9,0.7,0.5]
                                                  [--gradients held,set-to-none,accumulate] [--time-limit 30]

Each model is traced once per setting, as `remat solve` traces it (`SplitTracer.zoo`, head split where that pays),
and planned at the same budgets in bytes: fractions of the held step's store-all activation memory (its fixed
memory plus that fraction of the rest), as `remat solve --budget` would be given them. A loop that frees its
gradients between steps has none when the backward starts, where the peak is; the plan gets that memory for
activations. Overheads are against the held step's store-all step time, for all. Table printed, JSON saved
(`benchmarks/results/set_to_none.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from remat.split_plan import SplitTracer, solve_split
from remat.units import format_bytes
from solvers.base import overhead_of


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="gpt2,resnet50,unet")
    parser.add_argument("--budgets", default="0.9,0.7,0.5")
    parser.add_argument("--gradients", default="held,set-to-none,accumulate")
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--out", default="benchmarks/results/set_to_none.json")
    args = parser.parse_args()

    rows = []
    for model in args.models.split(","):
        settings = args.gradients.split(",")
        tracers = {gradients: SplitTracer.zoo(model, gradients=gradients) for gradients in {"held", *settings}}
        held = tracers["held"]
        store_all = held.budget_bytes("100%")
        fixed = held.unsplit.graph.fixed.total_bytes
        for fraction in (float(f) for f in args.budgets.split(",")):
            budget = fixed + int(fraction * (store_all - fixed))
            for gradients in settings:
                tracer = tracers[gradients]
                started = time.perf_counter()
                plan = solve_split(tracer, budget, time_limit_s=args.time_limit).plan
                rows.append({
                    "model": model, "fraction": fraction, "budget_bytes": budget, "gradients": gradients,
                    "fixed_bytes": tracer.unsplit.graph.fixed.total_bytes, "method": plan.method,
                    "status": plan.status, "peak_bytes": plan.simulation.peak_bytes if plan.simulation else None,
                    # against the held step as traced, the same reference for both settings
                    "overhead": overhead_of(plan.compute_s, held.unsplit.graph.compute_s),
                    "gap": plan.gap, "min_feasible_bytes": plan.min_feasible_bytes,
                    "split": (plan.graph.meta.get("split") or {}).get("chunks", 1),
                    "wall_s": time.perf_counter() - started})
                row = rows[-1]
                overhead = f"{row['overhead']:+.2%}" if row["overhead"] is not None else "-"
                gap = f"{row['gap']:.2%}" if row["gap"] is not None else "-"
                print(f"{model:10s} {fraction:4.0%} {format_bytes(budget):>10s} {gradients:12s} {plan.method:14s} "
                      f"{overhead:>8s} gap {gap:>7s} lowest peak found "
                      f"{format_bytes(row['min_feasible_bytes'] or 0):>10s} {row['wall_s']:6.1f} s", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    out.write_text(json.dumps({"machine": machine, "time_limit_s": args.time_limit, "rows": rows}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
