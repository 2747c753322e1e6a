"""Solver scale: plan each model at several budgets with `remat.planner.solve(solver="auto")` and report the
plan's cost, its proven lower bound and gap, the wall time, and the baselines' figures from the same run.

    python benchmarks/solver_scale.py [--models gpt2,vgg16] [--budgets 0.9,0.7,0.5,min1.1] [--time-limit S]
                                      [--no-split] [--out benchmarks/results/solver_scale.json]

Budgets: a fraction f is fixed memory + f x store-all's activation peak (the memory a plan can act on);
`min1.1` is 1.1 x the minimum feasible budget (the lowest peak any baseline reaches; it equals the
single-op floor when that is printed as proven). Default time limits are the issue's targets: 60 s for
gpt2, 180 s for gpt2-medium, 30 s for the CNNs. Results are merged into the JSON file by (model, budget),
so subsets can be run one at a time. Every figure comes from remat/simulate.py.

Models with a splittable loss head (the GPT-2s) are planned as `remat solve` plans them, with
`remat.split_plan.solve_split`: the head's chunk count is part of the plan. Budgets, store-all and the
overheads stay those of the unsplit step (the step the user has), so a split's own cost counts as overhead;
each baseline is its best on the chosen graph, plain or with the head streamed. `--no-split` plans the
unsplit step with `remat.planner.solve` only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from remat.planner import Plan, solve
from remat.split import CHUNK_COUNTS
from remat.split_plan import SplitPlan, SplitTracer, solve_split
from remat.units import format_bytes
from solvers.base import overhead_of

MODELS = ("gpt2", "gpt2-medium", "vgg16", "resnet50", "mobilenet_v2", "unet")
# The targets are wall seconds: gpt2-medium's solve is asked for 175 s, as its last stages (a cover-round
# step on 1,844 nodes, the covering model's build) end up to about 2 s past the limit (180 s: 181.8 and 182.5 s)
TIME_LIMITS_S = {"gpt2": 60.0, "gpt2-medium": 175.0}  # the rest: 30 s
BASELINES_SHOWN = ("chen-sqrtn", "checkpoint-all", "per-block", "chen-greedy", "griewank")
STREAMED = "+streamed-head"  # remat/split_plan.py's name for a baseline run with the head's chunks streamed


def budget_for(label: str, fixed_bytes: int, store_all_peak: int, min_feasible: int) -> int:
    if label.startswith("min"):
        return int(min_feasible * float(label[3:]))
    return fixed_bytes + int(float(label) * (store_all_peak - fixed_bytes))


def row_for(model: str, label: str, plan: Plan, trace_s: float, store_all_s: float | None = None) -> dict:
    """The figures of one plan. `store_all_s`: the step the overheads are against (the unsplit step's store-all
    when the plan's graph is a split one); the plan's own graph's by default."""
    store_all_s = store_all_s or plan.store_all.compute_s
    baselines = {}
    for candidate in plan.candidates:  # each baseline's cheapest fitting run, plain or with the head streamed
        name = candidate.method.removesuffix(STREAMED)
        if name in BASELINES_SHOWN and candidate.simulation is not None and candidate.simulation.valid:
            sim = candidate.simulation
            entry = {"fits": sim.peak_bytes <= plan.budget_bytes, "peak_bytes": sim.peak_bytes,
                     "compute_s": sim.compute_s, "overhead": overhead_of(sim.compute_s, store_all_s),
                     "streamed_head": candidate.method.endswith(STREAMED)}
            known = baselines.get(name)
            if known is None or (entry["fits"], -entry["compute_s"]) > (known["fits"], -known["compute_s"]):
                baselines[name] = entry
        return {
        "model": model, "budget": label, "budget_bytes": plan.budget_bytes, "nodes": len(plan.graph),
        "fixed_bytes": plan.graph.fixed.total_bytes, "store_all_peak_bytes": plan.store_all.peak_bytes,
        "store_all_s": store_all_s, "solver": plan.method, "picked": plan.picked, "status": plan.status,
        "wall_s": plan.wall_s, "trace_s": trace_s,
        "compute_s": plan.compute_s, "peak_bytes": plan.simulation.peak_bytes if plan.simulation else None,
        "lower_bound_s": plan.lower_bound_s, "lower_bound_method": plan.lower_bound_method, "gap": plan.gap,
        "overhead": overhead_of(plan.compute_s, store_all_s),
        "lower_bound_overhead": overhead_of(plan.lower_bound_s, store_all_s),
        "min_budget_lower_bound_bytes": plan.min_budget_lower_bound_bytes,
        "min_feasible_bytes": plan.min_feasible_bytes,
        "message": plan.message, "baselines": baselines,
    }


def split_row(model: str, label: str, split_plan: SplitPlan, unsplit_store_all_s: float, trace_s: float,
              wall_s: float) -> dict:
    """A row for a plan over chunk counts: overheads against the unsplit step's store-all, the wall time of the
    whole search (every chunk count solved), and the chunk counts tried."""
    plan = split_plan.plan
    row = row_for(model, label, plan, trace_s, store_all_s=unsplit_store_all_s)
    row.update(wall_s=wall_s, chunks=split_plan.split.chunks if split_plan.split else 1,
               split_note=split_plan.note, split_store_all_s=plan.store_all.compute_s,
               tried=[{"chunks": k, "floor_bytes": floor, "compute_s": p.compute_s if p else None}
                      for k, floor, p in split_plan.tried])
    return row


def print_row(row: dict) -> None:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:+.1%}"

    best = min((b["overhead"] for b in row["baselines"].values() if b["fits"]), default=None)
    shown = " ".join(f"{name}={pct(b['overhead']) if b['fits'] else 'over'}"
                     for name, b in row["baselines"].items() if name in ("chen-sqrtn", "checkpoint-all", "per-block"))
    gap = "-" if row["gap"] is None else f"{row['gap']:.2%}"
    chunks = f" chunks={row['chunks']}" if "chunks" in row else ""
    print(f"{row['model']:>13} {row['budget']:>7} {format_bytes(row['budget_bytes']):>10} {row['nodes']:>5} "
          f"{row['solver']:>22} {row['status']:>9} {row['wall_s']:>6.1f} {pct(row['overhead']):>7} "
          f"{pct(row['lower_bound_overhead']):>7} {gap:>6} best-baseline={pct(best)} {shown}{chunks}", flush=True)


CODE = ("remat", "solvers", "profiles", "cli.py", "benchmarks/*.py")  # what the figures depend on


def commit() -> str:
    """The commit the rows ran at, "-dirty" when the code (CODE, not the docs or results) had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root)

    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    return head + ("-dirty" if git("diff", "--quiet", "HEAD", "--", *CODE).returncode else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default="0.9,0.7,0.5,min1.1")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per solve (default: per model)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-split", action="store_true", help="plan the unsplit step only (no head chunks)")
    parser.add_argument("--out", default="benchmarks/results/solver_scale.json")
    args = parser.parse_args()

    out = Path(args.out)
    ran_at = commit()  # before any edit made while it runs
    saved = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = {(r["model"], r["budget"]): r for r in saved["rows"]}
    print(f"{'model':>13} {'budget':>7} {'bytes':>10} {'nodes':>5} {'solver':>22} {'status':>9} {'wall s':>6} "
          f"{'overhd':>7} {'bound':>7} {'gap':>6} baselines (overhead against store-all; 'over': does not fit)")
    for model in args.models.split(","):
        started = time.perf_counter()
        tracer = SplitTracer.zoo(model, batch=args.batch)
        graph = tracer.unsplit.graph
        splits = not args.no_split and tracer.variant(2) is not None  # a head to split: plan as `remat solve` does
        for chunks in CHUNK_COUNTS[2:] if splits else ():  # traced here, not inside the timed solves
            tracer.variant(chunks)
        trace_s = time.perf_counter() - started
        time_limit = args.time_limit or TIME_LIMITS_S.get(model, 30.0)
        probe = solve(graph, 10**15, solver="store-all")  # store-all and every baseline's peak
        lowest = min(c.simulation.peak_bytes for c in probe.candidates if c.simulation and c.simulation.valid)
        for label in args.budgets.split(","):
            budget = budget_for(label, graph.fixed.total_bytes, probe.store_all.peak_bytes, lowest)
            load = os.getloadavg()[0]
            if splits:
                solve_started = time.perf_counter()
                split_plan = solve_split(tracer, budget, solver="auto", time_limit_s=time_limit)
                row = split_row(model, label, split_plan, probe.store_all.compute_s, trace_s,
                                time.perf_counter() - solve_started)
            else:
                row = row_for(model, label, solve(graph, budget, solver="auto", time_limit_s=time_limit), trace_s)
            row.update(time_limit_s=time_limit, load_average=load, commit=ran_at, min_feasible_found_bytes=lowest,
                       min_feasible_proven=lowest == graph.min_budget_lower_bound())
            rows[model, label] = row
            print_row(row)
            saved = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "note": "2 cores shared with other agents' jobs: wall times are under contention"},
                     "rows": sorted(rows.values(), key=lambda r: (r["model"], r["budget"]))}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
