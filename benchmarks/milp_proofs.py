"""MILP proofs: how long Checkmate's MILP (solvers/checkmate.py, HiGHS) takes to prove the optimum of small
training-step graphs whose LP relaxation is weak: chain steps near their smallest budget and a 4-layer MLP step.

    PYTHONPATH=. python benchmarks/milp_proofs.py [--time-limit 60] [--out benchmarks/results/milp_proofs.json]

Each graph is solved once with mip_gap=1e-9; the table gives its status, optimum and wall seconds. Run it at two
commits to compare formulations (docs/solvers.md, "Valid inequalities in Checkmate's MILP").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from solvers.base import SolveOptions
from solvers.checkmate import solve_checkmate
from tests.graphs import chain_training_graph
from tests.test_plan import mlp_step

CASES = {  # name: (graph, budget bytes)
    "chain(8) at 40 B": (lambda: chain_training_graph(8), 40),
    "chain(10) at 50 B": (lambda: chain_training_graph(10), 50),
    "chain(24) at 40 B": (lambda: chain_training_graph(24), 40),
    "4-layer MLP step at 80%": (mlp_step, 1_298_566),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--out", default="benchmarks/results/milp_proofs.json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    print(f"{'graph':26} {'nodes':>5} {'status':>12} {'optimum':>10} {'wall s':>7}")
    for name, (build, budget) in CASES.items():
        graph = build()
        started = time.perf_counter()
        result = solve_checkmate(graph, budget, SolveOptions(time_limit_s=args.time_limit, mip_gap=1e-9))
        wall_s = time.perf_counter() - started
        rows.append({"graph": name, "nodes": len(graph), "budget_bytes": budget, "status": result.status,
                     "objective_s": result.objective_s, "wall_s": wall_s})
        optimum = "-" if result.objective_s is None else f"{result.objective_s:.6g}"
        print(f"{name:26} {len(graph):5d} {result.status:>12} {optimum:>10} {wall_s:7.2f}")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
               "commit": commit}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
