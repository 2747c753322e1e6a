"""Plan GPT-2 small's training step (batch 16, seq 1024, bf16-mixed, AdamW, H100 profile) at a sweep of
budgets and compare the plan with every baseline in the same run, on the same simulator.

    python benchmarks/solve_gpt2.py [--model gpt2] [--time-limit 60] [--out benchmarks/results/solve_gpt2.json]

Prints one row per budget: the plan's peak and overhead against store-all, the best fitting
baseline's overhead, and the ratio between them; saves every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from remat.planner import solve
from remat.trace import trace_model
from remat.units import format_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--budgets", default="20GB,16GB,14GB,min+1%",
                        help="comma-separated sizes; min+1% is 1.01x the minimum feasible budget found")
    parser.add_argument("--out", default="benchmarks/results/solve_gpt2.json")
    args = parser.parse_args()

    from remat.units import parse_size

    started = time.perf_counter()
    graph = trace_model(args.model, batch=args.batch)
    trace_s = time.perf_counter() - started
    rows = []
    min_feasible = None
    print(f"{args.model} batch {args.batch}: {len(graph)} nodes, traced in {trace_s:.1f} s")
    header = f"{'budget':>10} {'status':>9} {'method':>17} {'peak':>10} {'overhead':>9} {'best baseline':>24} " \
             f"{'ratio':>6} {'wall s':>7}"
    print(header)
    for text in args.budgets.split(","):
        if text == "min+1%":
            if min_feasible is None:
                continue
            budget = int(min_feasible * 1.01)
        else:
            budget = parse_size(text)
        t0 = time.perf_counter()
        plan = solve(graph, budget, time_limit_s=args.time_limit)
        wall_s = time.perf_counter() - t0
        min_feasible = plan.min_feasible_bytes if min_feasible is None else min(min_feasible, plan.min_feasible_bytes)
        store_all_s = plan.store_all.compute_s
        baselines = [c for c in plan.candidates if c.fits(budget) and not c.method.startswith("checkmate")]
        best = min(baselines, key=lambda c: c.simulation.compute_s, default=None)
        best_overhead = best.simulation.compute_s / store_all_s - 1 if best else None
        row = {
            "model": args.model, "batch": args.batch, "nodes": len(graph), "budget_bytes": budget,
            "status": plan.status, "method": plan.method, "coarse_nodes": plan.coarse_nodes,
            "peak_bytes": plan.simulation.peak_bytes if plan.simulation else None,
            "compute_s": plan.compute_s, "store_all_s": store_all_s,
            "store_all_peak_bytes": plan.store_all.peak_bytes, "overhead": plan.overhead,
            "lower_bound_s": plan.lower_bound_s, "gap": plan.gap,
            "best_baseline": best.method if best else None, "best_baseline_overhead": best_overhead,
            "min_feasible_bytes": plan.min_feasible_bytes,
            "min_budget_lower_bound_bytes": plan.min_budget_lower_bound_bytes, "wall_s": wall_s,
            "candidates": {c.method: {"status": c.status, "wall_s": c.wall_s,
                                      "peak_bytes": c.simulation.peak_bytes if c.simulation else None,
                                      "compute_s": c.simulation.compute_s if c.simulation else None}
                           for c in plan.candidates},
        }
        rows.append(row)
        ratio = (f"{plan.overhead / best_overhead:.2f}" if plan.overhead is not None and best_overhead else "-")
        print(f"{format_bytes(budget):>10} {plan.status:>9} {plan.method:>17} "
              f"{format_bytes(row['peak_bytes']) if row['peak_bytes'] else '-':>10} "
              f"{plan.overhead if plan.overhead is not None else float('nan'):>+9.2%} "
              f"{(best.method + f' {best_overhead:+.2%}') if best else 'none fits':>24} {ratio:>6} {wall_s:>7.1f}")
    print(f"store-all peak {format_bytes(rows[0]['store_all_peak_bytes'])}, minimum feasible found "
          f"{format_bytes(min_feasible)} ({min_feasible / rows[0]['store_all_peak_bytes']:.1%} of store-all), "
          f"lower bound {format_bytes(rows[0]['min_budget_lower_bound_bytes'])}")
    result = {"benchmark": "solve_gpt2", "machine": platform.platform(), "cpu_count": __import__("os").cpu_count(),
              "time_limit_s": args.time_limit, "trace_s": trace_s, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
