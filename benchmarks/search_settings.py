"""Search settings A/B: plan the rows where the planner's searches run with the planner's defaults and with one
setting changed, alternating, in the same time limit, and compare the plans' overheads.

    python benchmarks/search_settings.py --setting DROP_SHARE=1.0
                                         [--rows unet:0.5,unet:min1.1,mobilenet_v2:min1.1,resnet50:min1.1]
                                         [--repeats 4] [--time-limit 30] [--out benchmarks/results/search_settings.json]

A setting is a constant of remat/planner.py: MAX_ANNEALS_AT_ONCE=1 (one anneal at a time instead of one per
core), DROP_SHARE=1.0 (drops only, no rows), DROP_SHARE=0.0 (rows only, from cover-round's plan). Each row is
planned by `remat.planner.solve(solver="auto")` as solver_scale.py plans it (same budgets: a fraction f of
store-all's activation peak, or `min1.1`). These are the rows where a search runs (a plan still above its bound
with time left); elsewhere the settings change nothing. Overheads are against store-all, from the simulator. The
table prints each setting's overheads, their mean and their best. Results go to --out, by default
benchmarks/results/search_settings_<NAME>_<VALUE>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import remat.planner as planner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/search_settings.py` from anywhere
from benchmarks.solver_scale import budget_for, commit  # noqa: E402
from remat.split_plan import SplitTracer
from solvers.base import overhead_of

ROWS = "unet:0.5,unet:min1.1,mobilenet_v2:min1.1,resnet50:min1.1"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setting", required=True, help="NAME=VALUE, a constant of remat/planner.py")
    parser.add_argument("--rows", default=ROWS, help="model:budget pairs, comma-separated")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    name, value = args.setting.split("=")
    if not hasattr(planner, name):
        parser.error(f"remat/planner.py has no constant {name}")
    default = getattr(planner, name)
    changed = type(default)(value)
    settings = {"default": default, args.setting: changed}
    ran_at = commit()  # before any edit made while it runs
    runs = []
    for row in args.rows.split(","):
        model, label = row.split(":")
        graph = SplitTracer.zoo(model, batch=16).unsplit.graph
        probe = planner.solve(graph, 10**15, solver="store-all")
        lowest = min(c.simulation.peak_bytes for c in probe.candidates if c.simulation and c.simulation.valid)
        budget = budget_for(label, graph.fixed.total_bytes, probe.store_all.peak_bytes, lowest)
        for repeat in range(args.repeats):
            for setting, setting_value in settings.items():
                setattr(planner, name, setting_value)
                started = time.perf_counter()
                plan = planner.solve(graph, budget, solver="auto", time_limit_s=args.time_limit)
                runs.append({"model": model, "budget": label, "budget_bytes": budget, "setting": setting,
                             name: setting_value, "anneals_at_once": planner.anneals_at_once(),
                             "repeat": repeat, "method": plan.method,
                             "wall_s": time.perf_counter() - started, "load_average": os.getloadavg()[0],
                             "overhead": overhead_of(plan.compute_s, probe.store_all.compute_s),
                             "lower_bound_overhead": overhead_of(plan.lower_bound_s, probe.store_all.compute_s),
                             "gap": plan.gap, "message": plan.message})
                print(f"{model:>13} {label:>7} {setting:>20} repeat {repeat}: {plan.method:>12} "
                      f"{runs[-1]['overhead']:+.2%} gap {plan.gap:.2%}", flush=True)
        setattr(planner, name, default)

    print(f"\n{'model':>13} {'budget':>7} {'setting':>20} {'mean':>8} {'best':>8}  overheads")
    for row in args.rows.split(","):
        model, label = row.split(":")
        for setting in settings:
            overheads = [r["overhead"] for r in runs if (r["model"], r["budget"], r["setting"]) == (model, label,
                                                                                                   setting)]
            print(f"{model:>13} {label:>7} {setting:>20} {statistics.mean(overheads):+8.2%} {min(overheads):+8.2%}  "
                  + " ".join(f"{o:+.2%}" for o in overheads))
    out = Path(args.out or f"benchmarks/results/search_settings_{name}_{value}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                               "commit": ran_at, "setting": args.setting, "time_limit_s": args.time_limit,
                               "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
