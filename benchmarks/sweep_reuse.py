"""Sweep reuse: what a budget sweep (remat compare, the report's budget/overhead curve) gains from reusing the
decomposition's block MILPs between budgets (solvers/decompose.py's memo, SOLVED).

    python benchmarks/sweep_reuse.py [--model gpt2] [--chunks 4] [--budgets 0.5,0.6,0.7,0.8] [--time-limit 60]

The same graph is planned at each budget twice with `remat.planner.solve(solver="auto")`, smallest budget first:
cold (the memo emptied before each budget: every budget solves its own block MILPs) and as a sweep
(`remat.planner.sweep`: the memo kept, and each budget weighs the plan of the one below). GPT-2's head is split
in `--chunks` chunks, as `remat solve` splits it at these budgets. Budgets are fractions of the graph's
store-all activation memory (fixed memory plus the fraction of the rest). Table printed, JSON saved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from remat.planner import Plan, solve, sweep
from remat.split_plan import SplitTracer
from solvers import decompose


def figures(plan: Plan, wall_s: float) -> dict:
    return {"budget_bytes": plan.budget_bytes, "method": plan.method, "status": plan.status, "wall_s": wall_s,
            "compute_s": plan.compute_s, "overhead": plan.overhead, "gap": plan.gap}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--chunks", type=int, default=4, help="the head's chunk count (1: unsplit)")
    parser.add_argument("--budgets", default="0.5,0.6,0.7,0.8")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--out", default="benchmarks/results/sweep_reuse.json")
    args = parser.parse_args()

    tracer = SplitTracer.zoo(args.model)
    graph = (tracer.variant(args.chunks) if args.chunks > 1 else tracer.unsplit).graph
    store_all = solve(graph, 10**15, solver="store-all").store_all.peak_bytes
    fixed = graph.fixed.total_bytes
    fractions = [float(f) for f in args.budgets.split(",")]
    budgets = [fixed + int(f * (store_all - fixed)) for f in fractions]

    cold = []
    for budget in budgets:
        decompose.SOLVED.clear()
        started = time.perf_counter()
        plan = solve(graph, budget, time_limit_s=args.time_limit)
        cold.append(figures(plan, time.perf_counter() - started))

    decompose.SOLVED.clear()
    walls: list[float] = []
    last = [time.perf_counter()]

    def lap(message: str) -> None:  # the sweep's progress: a budget ends where the next one's baselines start
        if message == "baselines":
            now = time.perf_counter()
            walls.append(now - last[0])
            last[0] = now

    plans = sweep(graph, budgets, time_limit_s=args.time_limit, progress=lap)
    walls = walls[1:] + [time.perf_counter() - last[0]]
    warm = [figures(plan, wall) for plan, wall in zip(plans, walls, strict=True)]

    print(f"{args.model} ({len(graph)} nodes, head in {args.chunks} chunks), {args.time_limit:.0f} s per budget")
    print(f"{'budget':>7} {'cold s':>7} {'sweep s':>8} {'cold overhead':>14} {'sweep overhead':>15} "
          f"{'cold gap':>9} {'sweep gap':>10}")
    for fraction, a, b in zip(fractions, cold, warm, strict=True):
        print(f"{fraction:>7.0%} {a['wall_s']:>7.1f} {b['wall_s']:>8.1f} {a['overhead']:>14.2%} {b['overhead']:>15.2%} "
              f"{a['gap']:>9.2%} {b['gap']:>10.2%}")
    total_cold, total_warm = sum(a["wall_s"] for a in cold), sum(b["wall_s"] for b in warm)
    print(f"{'total':>7} {total_cold:>7.1f} {total_warm:>8.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]},
        "model": args.model, "nodes": len(graph), "chunks": args.chunks, "time_limit_s": args.time_limit,
        "fractions": fractions, "cold": cold, "sweep": warm, "cold_total_s": total_cold,
        "sweep_total_s": total_warm}, indent=1))


if __name__ == "__main__":
    main()
