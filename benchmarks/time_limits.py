"""Time limits: does `remat.planner.solve(..., time_limit_s=T)` return in about T seconds?

    python benchmarks/time_limits.py [--label after] [--models gpt2-tiny,mlp,llama-tiny,resnet50,gpt2]
                                     [--limits 3,5,10,30] [--gpt2-limits 10,30,60] [--budgets 0.5,0.02]
                                     [--out benchmarks/results/time_limits.json]

For each model, budget and limit: the wall time of one solve, its ratio to the limit, and what came back
(status, method, gap, overhead against store-all). A budget fraction f is the single-op floor plus f x
(store-all peak - floor): 0.5 is a middle budget, 0.02 one near the floor, where the decomposition and the
baselines rarely fit and the coarsened MILP and the min-peak search run too (or no plan is found at all).
The promise checked: wall <= 1.2 x T + 2 s. Rows are stored under `--label` (run the script in a checkout of
an older commit with --label before --commit <hash> to compare), and the table prints every label side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from remat.planner import solve
from remat.simulate import simulate
from remat.trace import trace_model
from solvers.registry import solve_with

TRACES = {  # name -> trace_model arguments: small graphs on the CPU profile, GPT-2 small at its defaults
    "gpt2-tiny": dict(model="gpt2-tiny", batch=4, seq=64, precision="fp32", device="cpu"),
    "mlp": dict(model="mlp", batch=8, precision="fp32", device="cpu"),
    "llama-tiny": dict(model="llama-tiny", batch=4, precision="fp32", device="cpu"),
    "resnet50": dict(model="resnet50", batch=8, precision="fp32", device="cpu"),
    "gpt2": dict(model="gpt2"),
}


def promised_s(limit_s: float) -> float:
    """The most a solve with this limit may take: the limit, plus room for the final simulation and bound."""
    return 1.2 * limit_s + 2.0


def run_model(name: str, budgets: list[float], limits: list[float]) -> list[dict]:
    traced = time.perf_counter()
    graph = trace_model(**TRACES[name])
    trace_s = time.perf_counter() - traced
    store_all_peak = simulate(graph, solve_with("store-all", graph, 2**62).schedule).peak_bytes
    floor = graph.min_budget_lower_bound()
    rows = []
    for fraction in budgets:
        budget = floor + int(fraction * (store_all_peak - floor))
        for limit_s in limits:
            started = time.perf_counter()
            plan = solve(graph, budget, time_limit_s=limit_s)
            wall_s = time.perf_counter() - started
            row = {"model": name, "trace": TRACES[name], "nodes": len(graph), "trace_s": trace_s,
                   "budget_fraction": fraction, "budget_bytes": budget, "time_limit_s": limit_s, "wall_s": wall_s,
                   "within_promise": wall_s <= promised_s(limit_s), "status": plan.status, "method": plan.method,
                   "gap": plan.gap, "overhead": plan.overhead, "picked": plan.picked}
            rows.append(row)
            print(f"{name:>10} {len(graph):>5} {fraction:>6} {limit_s:>6.0f} {wall_s:>7.1f} {wall_s / limit_s:>6.2f} "
                  f"{plan.status:>10} {plan.method:>22} {_percent(plan.gap):>7} {_percent(plan.overhead):>8}",
                  flush=True)
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_table(runs: dict[str, dict]) -> None:
    """One row per (model, budget, limit); for each label its wall seconds, status and gap."""
    labels = sorted(runs, key=lambda label: (label != "before", label))
    keyed = {label: {(r["model"], r["budget_fraction"], r["time_limit_s"]): r for r in runs[label]["rows"]}
             for label in labels}
    keys = sorted({key for rows in keyed.values() for key in rows},
                  key=lambda key: (list(TRACES).index(key[0]) if key[0] in TRACES else 99, -key[1], key[2]))
    header = f"{'model':>10} {'nodes':>5} {'budget':>6} {'limit':>6}" + "".join(
        f" | {label + ' wall s':>14} {'status':>9} {'gap':>6}" for label in labels)
    print(header)
    for key in keys:
        any_row = next(rows[key] for rows in keyed.values() if key in rows)
        line = f"{key[0]:>10} {any_row['nodes']:>5} {key[1]:>6} {key[2]:>6.0f}"
        for label in labels:
            row = keyed[label].get(key)
            if row is None:
                line += f" | {'':>14} {'':>9} {'':>6}"
                continue
            mark = "" if row["within_promise"] else " !"
            line += f" | {row['wall_s']:>12.1f}{mark:2} {row['status']:>9} {_percent(row['gap']):>6}"
        print(line)
    print("! : over the promise of 1.2 x limit + 2 s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="after")
    parser.add_argument("--models", default=",".join(TRACES))
    parser.add_argument("--limits", default="3,5,10,30", help="time limits (s) for every model but gpt2")
    parser.add_argument("--gpt2-limits", default="10,30,60", help="time limits (s) for gpt2")
    parser.add_argument("--budgets", default="0.5,0.02", help="fractions of the way from the floor to store-all")
    parser.add_argument("--out", default="benchmarks/results/time_limits.json")
    parser.add_argument("--commit", default="", help="the commit measured, when the checkout is not a git repository")
    parser.add_argument("--table-only", action="store_true", help="print the table of the saved file and stop")
    args = parser.parse_args()

    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {"benchmark": "time_limits", "runs": {}}
    if not args.table_only:
        budgets = [float(b) for b in args.budgets.split(",")]
        rows = []
        print(f"{'model':>10} {'nodes':>5} {'budget':>6} {'limit':>6} {'wall s':>7} {'ratio':>6} {'status':>10} "
              f"{'method':>22} {'gap':>7} {'overhead':>8}")
        for name in args.models.split(","):
            limits = args.gpt2_limits if name == "gpt2" else args.limits
            rows += run_model(name, budgets, [float(t) for t in limits.split(",")])
        commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                               text=True).stdout.strip()
        shown = {k: v for k, v in vars(args).items() if k not in ("out", "table_only", "commit")}
        saved["runs"][args.label] = {
            "command": "python benchmarks/time_limits.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                       for k, v in shown.items()),
            "commit": commit, "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(), "rows": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(saved, indent=1))
        print(f"saved {out}\n")
    print_table(saved["runs"])


if __name__ == "__main__":
    main()
