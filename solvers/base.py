"""What every solver returns, and the options every solver accepts.

Solvers turn (Graph, budget) into a Schedule. They import remat.graph, remat.schedule and
remat.simulate (pure Python), never torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from remat.graph import Graph
from remat.schedule import Schedule

OPTIMAL = "optimal"  # proven optimal for this graph and budget
FEASIBLE = "feasible"  # a valid schedule, optimality not proven (time limit, heuristic)
INFEASIBLE = "infeasible"  # proven: no schedule fits the budget
NO_SOLUTION = "no_solution"  # none found in the time limit, nothing proven
# Not a solver's verdict: what reports show for a schedule that exists but peaks above the budget (a baseline
# built without one, such as store-all), where "feasible" beside "fits: no" read as a contradiction.
OVER_BUDGET = "over_budget"


def reported_status(status: str, has_schedule: bool, fits: bool) -> str:
    """What a report shows: OVER_BUDGET for a schedule that does not fit, else the solver's status."""
    return OVER_BUDGET if has_schedule and not fits else status

# How close to a proven lower bound a plan must be to be called optimal. HiGHS stops with its dual bound within
# about 1e-6 of its objective's unit (a mean op's time in the covering MILP), so a plan that costs exactly the
# covering optimum can sit a few parts in 1e8 above the bound it reports; 1e-7 of a step is nanoseconds.
OPTIMAL_TOLERANCE = 1e-7


@dataclass(frozen=True)
class SolveOptions:
    time_limit_s: float = 60.0
    warm_start: Schedule | None = None  # a valid schedule to start from (MILP solvers)
    backend: str = "highs"  # MILP back-end: highs, cbc, gurobi
    threads: int = 0  # 0: the back-end's default
    verbose: bool = False
    mip_gap: float = 1e-4  # relative gap at which a MILP stops as optimal
    # min-peak: a peak no schedule goes below, found before (the planner's walk back from the step's end), which the
    # MILP then takes as its bound row instead of searching for it again (solvers/peak_bound.py)
    peak_floor_bytes: int | None = None


@dataclass(frozen=True)
class SolverResult:
    solver: str
    status: str
    schedule: Schedule | None
    objective_s: float | None = None  # the solver's own objective: seconds of compute
    lower_bound_s: float | None = None  # proven lower bound on the optimal seconds, if known
    wall_s: float = 0.0
    message: str = ""
    detail: dict = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        return relative_gap(self.objective_s, self.lower_bound_s)


def relative_gap(seconds: float | None, lower_bound_s: float | None) -> float | None:
    """(seconds - bound) / seconds, at least 0; None when either is unknown, 0 for a schedule that costs nothing."""
    if seconds is None or lower_bound_s is None:
        return None
    if seconds <= 0:
        return 0.0
    return max(0.0, (seconds - lower_bound_s) / seconds)


def overhead_of(seconds: float | None, store_all_s: float | None) -> float | None:
    """The recomputation's share of the step: seconds / store-all's seconds - 1. None when either is unknown or
    store-all costs nothing (an empty step)."""
    if seconds is None or not store_all_s:
        return None
    return seconds / store_all_s - 1


def meets_bound(seconds: float, lower_bound_s: float | None) -> bool:
    """Whether a plan of `seconds` is proven optimal by `lower_bound_s` (None: no bound, nothing proven)."""
    return lower_bound_s is not None and seconds <= lower_bound_s * (1 + OPTIMAL_TOLERANCE)


def settled_without_solving(solver: str, graph: Graph, budget_bytes: int) -> SolverResult | None:
    """The answer for an empty graph or a budget below the single-op floor; None when a solve is needed."""
    if len(graph) == 0:
        return SolverResult(solver, OPTIMAL, Schedule((), 0), 0.0, 0.0)
    floor = graph.min_budget_lower_bound()
    if budget_bytes < floor:
        return SolverResult(solver, INFEASIBLE, None,
                            message=f"budget {budget_bytes} bytes is below {floor} bytes, the fixed memory plus "
                                    "the largest single-op working set", detail={"min_budget_lower_bound": floor})
    return None
