"""Checkmate's approximation (Jain et al., MLSys 2020, section 5): LP relaxation, then rounding.

Solve the LP relaxation of the MILP in solvers/checkmate.py (same builder, binaries relaxed), round its
storage matrix S to 0/1 several ways (deterministic thresholds and seeded randomized rounding), compute
for each rounded S the cheapest R that makes it feasible ("solve R given S"), and keep the cheapest
schedule that remat.simulate finds within the budget. When no rounding fits, the LP is solved again
with a smaller budget (rounding up overspends memory) and rounded the same way. The LP value at the
real budget is a valid lower bound on the optimum; the rounded schedules are upper bounds, so the
result is FEASIBLE, not OPTIMAL, unless the two meet.
"""

from __future__ import annotations

import dataclasses
import random
import time

from remat.graph import Graph
from remat.schedule import Schedule, minimal_storage
from remat.simulate import simulate
from solvers.base import (
    FEASIBLE,
    INFEASIBLE,
    NO_SOLUTION,
    OPTIMAL,
    SolveOptions,
    SolverResult,
    meets_bound,
    settled_without_solving,
)
from solvers.checkmate import MEMORY_SCALE, build_model, second_unit, solve_problem, unbuildable_in

THRESHOLDS = tuple(k / 10 for k in range(1, 10))  # deterministic roundings: store where S >= threshold
RANDOM_TRIALS = 20  # randomized roundings: store with probability S
BUDGET_SCALES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # LP budgets tried, as fractions of the real one


def recompute_given_storage(graph: Graph, S: list[list[int]]) -> list[list[int]]:
    """The minimal R that makes S feasible (Checkmate's "solve R given S").

    Stage t must compute node t, and every value S[t+1] keeps that S[t] does not hold (storage (1c));
    each of those needs its inputs, which are recomputed in the stage unless S[t] holds them
    (dependencies (1b)). Anything else is left out, so R is the smallest for this S. Only the lower
    triangle of S (i < t) is read.
    """
    n = len(graph)
    R = [[0] * n for _ in range(n)]
    for t in range(n):
        held = {i for i in range(t) if S[t][i]}
        needed = [t] + ([i for i in range(t + 1) if S[t + 1][i] and i not in held] if t + 1 < n else [])
        while needed:
            i = needed.pop()
            if R[t][i]:
                continue
            R[t][i] = 1
            needed.extend(d for d in graph.nodes[i].deps if d not in held and not R[t][d])
    return R


def schedule_for_storage(graph: Graph, S: list[list[int]]) -> Schedule:
    """A valid schedule for any S: R given S, then drop what nothing reads, until nothing changes.

    A rounded S may keep values no later stage reads; minimal_storage drops them, which can make some
    recomputations unnecessary, and recomputing R for the smaller S removes those. Each round only
    shrinks R and S (minimal_storage(R) is within S, and the new R within the old), so it ends.
    """
    R = recompute_given_storage(graph, S)
    while True:
        S = minimal_storage(graph, R)
        smaller = recompute_given_storage(graph, S)
        if smaller == R:
            return Schedule.from_matrices(graph, R, S)
        R = smaller


def roundings(fractional: list[list[float]], seed: int):
    """0/1 storage matrices from the LP's S: thresholds first, then randomized rounding (seeded)."""
    for threshold in THRESHOLDS:
        yield [[int(value >= threshold) for value in row] for row in fractional]
    rng = random.Random(seed)
    for _ in range(RANDOM_TRIALS):
        yield [[int(rng.random() < value) for value in row] for row in fractional]


def solve_lp_round(graph: Graph, budget_bytes: int, options: SolveOptions | None = None,
                   seed: int = 0) -> SolverResult:
    """Checkmate's LP rounding: a fast, valid schedule within budget_bytes, with the LP value as a bound."""
    options = options or SolveOptions()
    started = time.perf_counter()
    settled = settled_without_solving("lp-round", graph, budget_bytes)
    if settled is not None:
        return settled

    n = len(graph)
    detail: dict = {"lp_seconds": 0.0, "lp_budgets": []}
    lp_bound = graph.compute_s  # "each node once", until the LP finishes
    best: tuple[float, Schedule] | None = None
    seen: set[tuple] = set()
    trials = fitting = 0
    message = ""
    # Rounding adds memory the LP did not pay for (a value stored with weight 0.4 costs 0.4 of its bytes
    # in the LP, all of it once rounded up). When no rounding fits, solve the LP again with less memory, so
    # that its roundings have room to spare; the bound comes from the LP at the real budget.
    for attempt, scale in enumerate(BUDGET_SCALES):
        if best is not None or time.perf_counter() - started > options.time_limit_s:
            break
        lp_budget = max(graph.min_budget_lower_bound(), int(budget_bytes * scale))
        if attempt and lp_budget == detail["lp_budgets"][-1]:
            break  # the budget cannot shrink any further
        lp_started = time.perf_counter()
        unbuilt = unbuildable_in(graph, dataclasses.replace(options, time_limit_s=options.time_limit_s - (lp_started
                                                                                                       - started)))
        if unbuilt:
            message = f"the LP was {unbuilt}"
            break
        detail["lp_budgets"].append(lp_budget)
        byte_unit = max(lp_budget - graph.fixed.total_bytes, 1) / MEMORY_SCALE
        model = build_model(graph, lp_budget, byte_unit, second_unit(graph), relax=True)
        # the LP stops at the time limit counted from the start (for HiGHS: building the model included)
        left = max(options.time_limit_s - (lp_started - started), 1e-3)
        outcome = solve_problem(model.problem, dataclasses.replace(options, time_limit_s=left), mip=False,
                                deadline=started + options.time_limit_s)
        detail["lp_seconds"] += time.perf_counter() - lp_started
        message = outcome.message
        if outcome.status == INFEASIBLE:
            if attempt == 0:  # the relaxation contains every MILP solution: none fits
                return SolverResult("lp-round", INFEASIBLE, None, wall_s=time.perf_counter() - started,
                                    message=f"the LP relaxation is infeasible: no schedule fits {budget_bytes} "
                                            f"bytes ({outcome.message})", detail=detail)
            break  # a smaller budget's LP is infeasible: no point shrinking further
        if attempt == 0 and outcome.status == OPTIMAL and outcome.objective is not None:
            lp_bound = max(lp_bound, outcome.objective * model.second_unit)

        fractional = [[0.0] * n for _ in range(n)]
        for (t, i), var in model.S.items():
            fractional[t][i] = var.value() or 0.0  # None when the LP stopped without a solution
        for S in roundings(fractional, seed + attempt):
            if time.perf_counter() - started > options.time_limit_s:
                break  # out of time: return the best so far
            trials += 1
            key = tuple(map(tuple, S))
            if key in seen:  # thresholds often agree; simulate each distinct S once
                continue
            seen.add(key)
            schedule = schedule_for_storage(graph, S)
            sim = simulate(graph, schedule)
            if sim.valid and sim.peak_bytes <= budget_bytes:
                fitting += 1
                if best is None or sim.compute_s < best[0]:
                    best = (sim.compute_s, schedule)
    detail.update(trials=trials, fitting_trials=fitting)

    wall = time.perf_counter() - started
    if best is None:
        return SolverResult("lp-round", NO_SOLUTION, None, None, lp_bound, wall,
                            f"no rounding of the LP fits {budget_bytes} bytes ({trials} trials within "
                            f"{options.time_limit_s:.3g} s; {message})", detail)
    cost, schedule = best
    # Floating-point noise can put the LP value a hair above an optimum it equals: clamp to the achieved cost.
    bound = min(lp_bound, cost)
    status = OPTIMAL if meets_bound(cost, lp_bound) else FEASIBLE
    return SolverResult("lp-round", status, schedule, cost, bound, wall,
                        f"best of {fitting} fitting roundings out of {trials} ({message})", detail)
