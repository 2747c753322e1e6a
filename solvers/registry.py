"""The solver registry: every method by name.

Every solver is a function (graph, budget_bytes, options) -> SolverResult. Back-ends are
imported lazily: OR-Tools and highspy both ship libhighs, and loading both in one process can crash.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from remat.graph import Graph
from remat.schedule import Schedule
from solvers.base import NO_SOLUTION, SolveOptions, SolverResult
from solvers.baselines import BASELINES

MILP_SOLVERS = ("checkmate", "lp-round", "cpsat", "decompose")
SOLVER_NAMES = ("auto", *MILP_SOLVERS, *BASELINES)
CHILD_GRACE_S = 30.0  # how long the CP-SAT process may run past its time limit (start-up, model build)
CHILD_TRIES = 2  # CP-SAT runs, each with its own seed, while the process crashes


def solve_with(name: str, graph: Graph, budget_bytes: int, options: SolveOptions | None = None) -> SolverResult:
    """Run the solver called `name` ("checkmate-min-peak" minimises the peak instead of time)."""
    options = options or SolveOptions()
    if name in BASELINES:
        return BASELINES[name](graph, budget_bytes, options)
    if name in ("auto", "checkmate"):
        from solvers.checkmate import solve_checkmate

        return solve_checkmate(graph, budget_bytes, options)
    if name == "lp-round":
        from solvers.lp_round import solve_lp_round

        return solve_lp_round(graph, budget_bytes, options)
    if name == "cpsat":
        return _solve_cpsat_in_child(graph, budget_bytes, options)
    if name == "decompose":
        from solvers.decompose import solve_decompose

        return solve_decompose(graph, budget_bytes, options)
    if name == "checkmate-min-peak":
        from solvers.checkmate import solve_min_peak

        return solve_min_peak(graph, options)
    raise ValueError(f"unknown solver {name!r}: choose one of {', '.join(SOLVER_NAMES)}")


def _solve_cpsat_in_child(graph: Graph, budget_bytes: int, options: SolveOptions) -> SolverResult:
    """CP-SAT in a child process: OR-Tools cannot load beside highspy (see solvers/cpsat.py).

    CP-SAT's parallel search can abort on one of its internal checks, at random (it happened once in CI on a
    graph that solves in a second every other time), so a crash is run again with another seed in the time
    left. If every try crashes the result has no solution and says why: the planner keeps its other plans.
    """
    started = time.perf_counter()
    fields = dataclasses.asdict(dataclasses.replace(options, warm_start=None))
    fields["warm_start"] = options.warm_start.to_json() if options.warm_start else None
    root = Path(__file__).resolve().parent.parent
    graph_json = graph.to_json()
    crashes: list[str] = []
    for seed in range(CHILD_TRIES):
        fields["time_limit_s"] = max(options.time_limit_s - (time.perf_counter() - started), 1.0)
        request = json.dumps({"graph": graph_json, "budget_bytes": budget_bytes, "options": fields, "seed": seed,
                              "sent_at": time.time()})  # the process's start counts against its time limit
        try:
            child = subprocess.run([sys.executable, "-m", "solvers.cpsat"], input=request, capture_output=True,
                                   text=True, cwd=root, timeout=fields["time_limit_s"] + CHILD_GRACE_S)
        except subprocess.TimeoutExpired:  # a time limit is never an error: the planner keeps what it had
            return SolverResult("cpsat", NO_SOLUTION, None, wall_s=time.perf_counter() - started,
                                message=f"the CP-SAT process ran {CHILD_GRACE_S:.0f} s past its time limit: stopped")
        if child.returncode == 0:
            data = json.loads(child.stdout)
            schedule = Schedule.from_json(data.pop("schedule")) if data.get("schedule") else None
            data.pop("schedule", None)
            if crashes:
                data["message"] += f" (after {len(crashes)} crashed run(s): {crashes[-1]})"
            return SolverResult(schedule=schedule, **data)
        if child.returncode > 0:  # a Python error in our code, not a crash of the solver: never hidden
            lines = child.stderr.strip().splitlines() or ["no output"]
            raise RuntimeError(f"the CP-SAT process failed ({child.returncode}): {lines[-1]}")
        crashes.append(_crash_reason(child.returncode, child.stderr))
    return SolverResult("cpsat", NO_SOLUTION, None, wall_s=time.perf_counter() - started,
                        message=f"the CP-SAT process crashed {len(crashes)} times: {crashes[-1]}")


def _crash_reason(returncode: int, stderr: str) -> str:
    """The failed check of a crashed CP-SAT run (its line says what went wrong; the stack trace does not)."""
    lines = stderr.strip().splitlines()
    check = next((line.strip() for line in lines if "Check failed" in line), None)
    return f"signal {-returncode}" + (f", {check}" if check else "")
