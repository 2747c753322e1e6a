"""Schedules of one graph side by side: every method at every budget, judged by the one simulator.

Methods: remat's planners (auto, the default, is `remat solve`'s plan; checkmate, decompose, lp-round, cpsat by
name: remat's plan from that solver, which weighs every
baseline, torch's choices and the previous budget's plan, so its curve never rises and never loses to theirs),
every baseline by name, and `compile-budget` (torch.compile's partitioner at budgets 1.0, 0.5, 0.2, 0.0) or
`compile-budget-B`. Optionally each row gets the largest batch its method fits under its budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from remat.comparators import (
    COMPILE_BUDGETS,
    COMPILE_PREFIX,
    compile_budget_candidate,
    compile_budget_of,
    compile_method,
)
from remat.graph import Graph
from remat.maxbatch import MILP_METHODS, BatchTraces, max_batch
from remat.maxbatch import parse_methods as parse_batch_methods
from remat.models import DEFAULT_BATCH
from remat.planner import Candidate, baseline_candidate, solve, store_all_simulation
from remat.schedule import Schedule
from remat.simulate import Simulation, simulate
from remat.split_plan import SplitTracer, solve_split, with_chunks
from remat.trace import TracedStep
from remat.units import format_bytes
from solvers.base import FEASIBLE, OPTIMAL, meets_bound, overhead_of, relative_gap, reported_status
from solvers.baselines import BASELINES, BUDGET_FREE_BASELINES

DEFAULT_METHODS = ("auto", "store-all", "checkpoint-all", "chen-sqrtn", "per-block", COMPILE_PREFIX)


@dataclass(frozen=True)
class Row:
    method: str
    budget_bytes: int
    # the solver's (optimal, feasible, infeasible, no_solution), or over_budget for a schedule that does not fit
    status: str
    fits: bool  # the simulated peak is within the budget
    peak_bytes: int | None
    compute_s: float | None
    overhead: float | None  # compute_s / store-all's - 1
    gap: float | None  # (compute_s - lower bound) / compute_s, MILP methods only
    wall_s: float  # seconds the method took for this budget
    schedule_from: str  # the method whose schedule it is (remat's plan may be a baseline's); "" without one
    max_batch: int | None = None  # the largest batch this method fits under this budget, when asked for
    message: str = ""
    max_batch_capped: bool = False  # the search stopped at its cap (remat.maxbatch.MAX_BATCH): the batch is a floor

    def to_json(self) -> dict:
        return {"method": self.method, "budget_bytes": self.budget_bytes, "status": self.status, "fits": self.fits,
                "peak_bytes": self.peak_bytes, "compute_s": self.compute_s, "overhead": self.overhead,
                "gap": self.gap, "wall_s": self.wall_s, "schedule_from": self.schedule_from,
                "max_batch": self.max_batch, "max_batch_capped": self.max_batch_capped, "message": self.message}


@dataclass(frozen=True)
class Comparison:
    graph: Graph
    budgets_bytes: tuple[int, ...]
    methods: tuple[str, ...]
    rows: tuple[Row, ...]
    store_all: Simulation
    schedules: dict[tuple[str, int], Schedule] = field(default_factory=dict)  # (method, budget) -> schedule
    wall_s: float = 0.0
    # (method, budget) -> the graph its schedule runs on, where that is not `graph`: the step with its head split
    graphs: dict[tuple[str, int], Graph] = field(default_factory=dict)

    def graph_of(self, method: str, budget_bytes: int) -> Graph:
        return self.graphs.get((method, budget_bytes), self.graph)

    def simulation(self, method: str, budget_bytes: int) -> Simulation | None:
        schedule = self.schedules.get((method, budget_bytes))
        return simulate(self.graph_of(method, budget_bytes), schedule) if schedule is not None else None

    def to_json(self) -> dict:
        meta, fixed = self.graph.meta, self.graph.fixed
        return {
            "model": meta.get("model"), "batch": meta.get("batch"), "seq": meta.get("seq"),
            "device": meta.get("device"), "precision": meta.get("precision"), "optimizer": meta.get("optimizer"),
            "gradients": self.graph.gradients,
            "nodes": len(self.graph), "graph_hash": self.graph.content_hash, "fixed_bytes": fixed.total_bytes,
            "store_all_peak_bytes": self.store_all.peak_bytes, "store_all_s": self.store_all.compute_s,
            "min_budget_lower_bound_bytes": self.graph.min_budget_lower_bound(),
            "budgets_bytes": list(self.budgets_bytes), "methods": list(self.methods),
            "rows": [row.to_json() for row in self.rows], "wall_s": self.wall_s,
        }


def parse_methods(names: Sequence[str]) -> tuple[str, ...]:
    """Method names (checked as max_batch's are), `compile-budget` expanded to its four budgets."""
    methods: list[str] = []
    for name in parse_batch_methods(names):
        methods += [compile_method(b) for b in COMPILE_BUDGETS] if name == COMPILE_PREFIX else [name]
    return tuple(dict.fromkeys(methods))


def compare(traced: TracedStep | SplitTracer, budgets_bytes: Sequence[int], methods: Sequence[str] = DEFAULT_METHODS,
            time_limit_s: float = 30.0, progress: Callable[[str], None] | None = None,
            batch_traces: BatchTraces | None = None, probe_time_limit_s: float = 10.0) -> Comparison:
    """Every method at every budget on the traced step's graph; with `batch_traces`, each row's largest batch too.
    Given a SplitTracer, remat's planners may split the loss head as `remat solve` does (remat.split_plan); the
    other methods run on the unsplit step."""
    started = time.perf_counter()
    say = progress or (lambda message: None)
    tracer = traced if isinstance(traced, SplitTracer) else None
    if tracer is not None:
        traced = TracedStep(tracer.step, tracer.unsplit.graph)
    graph = traced.graph
    methods = parse_methods(methods)
    budgets = tuple(sorted(set(budgets_bytes)))
    store_all = store_all_simulation(graph)
    rows: list[Row] = []
    schedules: dict[tuple[str, int], Schedule] = {}
    graphs: dict[tuple[str, int], Graph] = {}

    def add(method: str, budget: int, candidate: Candidate, status: str, gap: float | None = None,
            on: Graph | None = None) -> None:
        sim = candidate.simulation if candidate.schedule is not None else None
        if sim is not None:
            schedules[(method, budget)] = candidate.schedule
            if on is not None and on is not graph:
                graphs[(method, budget)] = on
        fits = sim is not None and sim.fits(budget)
        rows.append(Row(method, budget, reported_status(status, sim is not None, fits), fits,
                        sim.peak_bytes if sim else None, sim.compute_s if sim else None,
                        overhead_of(sim.compute_s if sim else None, store_all.compute_s),
                        gap, candidate.wall_s, candidate.method if sim is not None else "",
                        message=candidate.message))

    compiled: list[Candidate] = []
    for method in methods:
        budget_value = compile_budget_of(method)
        if budget_value is not None:
            say(f"torch.compile's partitioner at activation_memory_budget={budget_value}")
            candidate = compile_budget_candidate(traced.step, graph, budget_value)
            compiled.append(candidate)
            for budget in budgets:
                add(method, budget, candidate, candidate.status)
        elif method in BASELINES:
            say(method)
            built: Candidate | None = None
            for budget in budgets:
                if built is None or method not in BUDGET_FREE_BASELINES:  # the others ignore the budget: built once
                    built = baseline_candidate(graph, method, budget)
                add(method, budget, built, built.status)

    for method in (m for m in methods if m in MILP_METHODS):
        below: tuple[Candidate, Graph] | None = None  # the plan at the budget below, and the graph it runs on
        for budget in budgets:  # smallest first: each budget weighs the plan of the one below
            say(f"{method} at {format_bytes(budget)}")
            solving = time.perf_counter()  # the row's wall: tracing split variants and solving each, not one solve
            if tracer is not None:
                chosen = solve_split(tracer, budget, solver=method, time_limit_s=time_limit_s, known=compiled)
                plan, split = chosen.plan, chosen.split
            else:
                known = [below[0]] if below is not None and below[1] is graph else []
                plan, split = solve(graph, budget, solver=method, time_limit_s=time_limit_s,
                                    known=[*compiled, *known]), None
            wall_s = time.perf_counter() - solving
            candidate = Candidate(with_chunks(plan.method, split), plan.status, plan.schedule, plan.simulation,
                                  wall_s, plan.message)
            on, status, gap = plan.graph, plan.status, plan.gap
            if below is not None and candidate.schedule is below[0].schedule:  # the planner chose the plan below
                add(method, budget, replace(below[0], wall_s=wall_s), status, gap, on)
                continue
            if below is not None and (not candidate.fits(budget)
                                      or below[0].simulation.compute_s < candidate.simulation.compute_s):
                # more memory never costs more: the plan of the budget below, named as that plan, with the gap to this
                # budget's lower bound where that bound is for the graph the plan runs on
                (carried, on), bound = below, plan.lower_bound_s if below[1] is plan.graph else None
                status = OPTIMAL if meets_bound(carried.simulation.compute_s, bound) else FEASIBLE
                gap = relative_gap(carried.simulation.compute_s, bound)
                add(method, budget, replace(carried, wall_s=wall_s), status, gap, on)
                continue
            add(method, budget, candidate, status, gap, on)
            if candidate.fits(budget):
                shown = candidate.method.split("@")[0]  # the planner's own name for a known plan: "method@budget"
                below = (replace(candidate, method=f"{shown} (the {format_bytes(budget)} plan)"), on)

    order = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda r: (r.budget_bytes, order[r.method]))
    if batch_traces is not None:
        batch_traces.add(traced)
        start = graph.meta.get("batch") or DEFAULT_BATCH
        with_batch = []
        for row in rows:
            say(f"largest batch for {row.method} under {format_bytes(row.budget_bytes)}")
            found = max_batch(batch_traces, row.method, row.budget_bytes, start=start, time_limit_s=probe_time_limit_s)
            with_batch.append(replace(row, max_batch=found.batch, max_batch_capped=found.capped))
        rows = with_batch
    return Comparison(graph, budgets, methods, tuple(rows), store_all, schedules, time.perf_counter() - started, graphs)
