"""Anneals at once: does running one drop-search anneal per core (and keeping the best) give cheaper plans than
one anneal at a time, in the same time limit?

    python benchmarks/anneals_at_once.py [--rows unet:0.5,unet:min1.1,mobilenet_v2:min1.1,resnet50:min1.1]
                                         [--repeats 4] [--time-limit 30] [--out benchmarks/results/anneals_at_once.json]

Each row is planned by `remat.planner.solve(solver="auto")` as solver_scale.py plans it (same budgets: a fraction
f of store-all's activation peak, or `min1.1`), once with remat.planner.MAX_ANNEALS_AT_ONCE = 1 and once with its
default (one anneal per core), alternating so both see the same load. These are the rows where drop-search runs
(a plan still above its bound with time left); elsewhere the setting changes nothing. Overheads are against
store-all, from the simulator. The table prints each setting's overheads, their mean and their best.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import remat.planner as planner
from benchmarks.solver_scale import budget_for
from remat.split_plan import SplitTracer

ROWS = "unet:0.5,unet:min1.1,mobilenet_v2:min1.1,resnet50:min1.1"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=ROWS, help="model:budget pairs, comma-separated")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--out", default="benchmarks/results/anneals_at_once.json")
    args = parser.parse_args()

    default_at_once = planner.MAX_ANNEALS_AT_ONCE
    settings = {"one at a time": 1, "one per core": default_at_once}
    runs = []
    for row in args.rows.split(","):
        model, label = row.split(":")
        graph = SplitTracer.zoo(model, batch=16).unsplit.graph
        probe = planner.solve(graph, 10**15, solver="store-all")
        lowest = min(c.simulation.peak_bytes for c in probe.candidates if c.simulation and c.simulation.valid)
        budget = budget_for(label, graph.fixed.total_bytes, probe.store_all.peak_bytes, lowest)
        for repeat in range(args.repeats):
            for setting, most in settings.items():
                planner.MAX_ANNEALS_AT_ONCE = most
                at_once = planner.anneals_at_once()
                started = time.perf_counter()
                plan = planner.solve(graph, budget, solver="auto", time_limit_s=args.time_limit)
                runs.append({"model": model, "budget": label, "budget_bytes": budget, "setting": setting,
                             "anneals_at_once": at_once, "repeat": repeat, "method": plan.method,
                             "wall_s": time.perf_counter() - started, "load_average": os.getloadavg()[0],
                             "overhead": plan.compute_s / probe.store_all.compute_s - 1,
                             "lower_bound_overhead": plan.lower_bound_s / probe.store_all.compute_s - 1,
                             "gap": plan.gap, "message": plan.message})
                print(f"{model:>13} {label:>7} {setting:>13} ({at_once} at once) repeat {repeat}: "
                      f"{plan.method:>12} {runs[-1]['overhead']:+.2%} gap {plan.gap:.2%}", flush=True)
        planner.MAX_ANNEALS_AT_ONCE = default_at_once

    print(f"\n{'model':>13} {'budget':>7} {'setting':>13} {'mean':>8} {'best':>8}  overheads")
    for row in args.rows.split(","):
        model, label = row.split(":")
        for setting in settings:
            overheads = [r["overhead"] for r in runs if (r["model"], r["budget"], r["setting"]) == (model, label,
                                                                                                   setting)]
            print(f"{model:>13} {label:>7} {setting:>13} {statistics.mean(overheads):+8.2%} {min(overheads):+8.2%}  "
                  + " ".join(f"{o:+.2%}" for o in overheads))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                               "time_limit_s": args.time_limit, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
