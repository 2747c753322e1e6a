"""The solver registry: every method by name.

Every solver is a function (graph, budget_bytes, options) -> SolverResult. Back-ends are
imported lazily: OR-Tools and highspy both ship libhighs, and loading both in one process can crash.
"""

from __future__ import annotations

from remat.graph import Graph
from solvers.base import SolveOptions, SolverResult
from solvers.baselines import BASELINES

MILP_SOLVERS = ("checkmate", "lp-round")
SOLVER_NAMES = ("auto", *MILP_SOLVERS, *BASELINES)


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
    if name == "checkmate-min-peak":
        from solvers.checkmate import solve_min_peak

        return solve_min_peak(graph, options)
    raise ValueError(f"unknown solver {name!r}: choose one of {', '.join(SOLVER_NAMES)}")
