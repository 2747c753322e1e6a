"""Checkmate's model (Jain et al., MLSys 2020, section 4) solved with OR-Tools CP-SAT instead of a MILP.

The model is the one in solvers/checkmate.py, variable for variable:

    R[t, i]           node i is computed in stage t            (i <= t, R[t, t] = 1)          Boolean
    S[t, i]           node i is in memory when stage t starts  (i < t, no S[0, .])            Boolean
    HELD[t, i, p]     output p of an op with several is in memory when stage t starts         Boolean
    FREE[t, i, p, k]  output p of node i is freed right after node k runs in stage t          Boolean
    U[t, k]           activation memory while node k runs in stage t, in memory units         integer

with the same tight linearisation of FREE (no big-M) and the same (M1)-(M4) accounting, output by output
(solvers/stage_memory.py).

CP-SAT needs integers, so:

* memory: sizes and the budget are divided by their gcd when that leaves at most MAX_MEMORY_UNITS units
  of capacity (exact). Otherwise one unit is ceil(capacity / MAX_MEMORY_UNITS) bytes, every size is rounded
  UP and the capacity DOWN, so the model over-estimates memory and never accepts a schedule that breaks the
  budget. It may then reject some that fit, so infeasibility and optimality are no longer proofs: that
  case reports NO_SOLUTION instead of INFEASIBLE, FEASIBLE instead of OPTIMAL, and no solver bound.
* seconds: one unit is max(compute_s) / COST_UNITS, and each node's cost is FLOORED to whole units. The
  floored objective of every schedule is at most its true seconds (in units), so CP-SAT's
  best_objective_bound on the floored objective, times the unit, is a valid lower bound on the true
  seconds of every schedule of the model. The price: the floored optimum can differ from the true
  optimum by at most one unit per computation (about 1e-6 of the largest cost each). objective_s is
  always the simulator's seconds of the returned schedule, never the scaled objective.

This module imports only ortools (never pulp, highspy or solvers.checkmate): OR-Tools and highspy ship
their own libhighs, and loading both in one process can crash it.
"""

from __future__ import annotations

import math
import time
from functools import reduce

from ortools.sat.python import cp_model

from remat.graph import Graph
from remat.schedule import Schedule, compute_seconds, minimal_storage
from remat.simulate import simulate
from solvers.base import FEASIBLE, INFEASIBLE, NO_SOLUTION, OPTIMAL, SolveOptions, SolverResult, settled_without_solving
from solvers.stage_memory import Part, freed_by, node_parts, stage_values

MAX_MEMORY_UNITS = 1_000_000  # capacity in model units at most (when the gcd does not already give fewer)
COST_UNITS = 1_000_000  # the largest node cost in model units


def memory_scale(graph: Graph, capacity_bytes: int) -> tuple[int, bool]:
    """(bytes per model unit, exact): exact when every size and the capacity are whole multiples of the unit."""
    sizes = [node.output_bytes for node in graph.nodes] + [node.workspace_bytes for node in graph.nodes]
    sizes += [size for node in graph.nodes for size in node.part_bytes]
    g = reduce(math.gcd, [s for s in sizes if s > 0] + [capacity_bytes], 0)
    if g == 0:  # nothing takes memory
        return 1, True
    if capacity_bytes // g <= MAX_MEMORY_UNITS:
        return g, True
    return max(1, math.ceil(capacity_bytes / MAX_MEMORY_UNITS)), False


class CpsatModel:
    """Checkmate's model in CP-SAT, indexed as in the paper."""

    def __init__(self, graph: Graph, budget_bytes: int) -> None:
        self.graph = graph
        n = len(graph)
        nodes = graph.nodes
        capacity_bytes = budget_bytes - graph.fixed.total_bytes
        self.byte_unit, self.exact_memory = memory_scale(graph, capacity_bytes)
        unit = self.byte_unit
        self.parts = parts = node_parts(graph)
        freed = self.freed = freed_by(graph, parts)
        # ceil: memory over-estimated, never under; a node's run allocates the sum of its parts' units
        self.part_units = {(part.node, part.index): -(-part.size_bytes // unit) for group in parts for part in group}
        mem = self.mem = [sum(self.part_units[part.node, part.index] for part in parts[i]) for i in range(n)]
        self.workspace = [-(-node.workspace_bytes // unit) for node in nodes]
        self.capacity = capacity_bytes // unit  # floor
        largest = max(node.compute_s for node in nodes)
        self.second_unit = largest / COST_UNITS if largest > 0 else 1.0
        self.cost = [max(0, math.floor(node.compute_s / self.second_unit)) for node in nodes]  # floor: see above

        model = self.model = cp_model.CpModel()
        stages = range(n)
        R = self.R = {(t, i): model.new_bool_var(f"R_{t}_{i}") for t in stages for i in range(t + 1)}
        S = self.S = {(t, i): model.new_bool_var(f"S_{t}_{i}") for t in range(1, n) for i in range(t)}
        HELD = self.HELD = {(t, i, part.index): model.new_bool_var(f"HELD_{t}_{i}_{part.index}")
                            for t in range(1, n) for i in range(t) for part in parts[i] if part.separate}
        FREE = self.FREE = {(t, part.node, part.index, k): model.new_bool_var(f"FREE_{t}_{part.node}_{part.index}_{k}")
                            for t in stages for k in range(t + 1) for part in freed[k]}
        # (M4) budget as the upper end of U's domain, plus the running node's workspace below.
        U = self.U = {(t, k): model.new_int_var(0, max(self.capacity, 0), f"U_{t}_{k}")
                      for t in stages for k in range(t + 1)}

        def stored(t: int, i: int):
            return S.get((t, i), 0)

        def in_memory(t: int, part: Part):
            return HELD.get((t, part.node, part.index), 0) if part.separate else stored(t, part.node)

        def units(part: Part) -> int:
            return self.part_units[part.node, part.index]

        # (1d) frontier advancing: stage t computes node t.
        for t in stages:
            model.add(R[t, t] == 1)
        # (1b) dependencies.
        for t in stages:
            for j in range(t + 1):
                for i in sorted(set(nodes[j].deps)):
                    model.add(R[t, j] <= R[t, i] + stored(t, i))
        # (1c) storage.
        for t in range(n - 1):
            for i in range(t + 1):
                model.add(S[t + 1, i] <= stored(t, i) + R[t, i])
        # Outputs of an op with several (as in solvers/checkmate.py): held only while the op is stored, carried
        # like (1c), needed by their readers like (1b); the op is not computed again while stored.
        for (t, i, p), held in HELD.items():
            model.add(held <= S[t, i])
            model.add(held <= HELD.get((t - 1, i, p), 0) + R[t - 1, i])
        for t in stages:
            for i in range(t):
                if any(part.separate for part in parts[i]):
                    model.add(R[t, i] + S[t, i] <= 1)
                    for part in parts[i]:
                        for j in part.readers:
                            if j <= t:
                                model.add(R[t, j] <= R[t, i] + HELD[t, i, part.index])
        # (M1) memory while the first node of the stage runs.
        for t in stages:
            model.add(U[t, 0] == sum(units(part) * in_memory(t, part) for i in range(t) for part in parts[i])
                      + mem[0] * R[t, 0])
        # (M2) memory while node k+1 runs.
        for t in stages:
            for k in range(t):
                released = sum(units(part) * FREE[t, part.node, part.index, k] for part in freed[k])
                model.add(U[t, k + 1] == U[t, k] - released + mem[k + 1] * R[t, k + 1])
        # (M3) FREE[t, i, p, k] <= each factor of R[t, k] * (1 - held at t+1) * prod_{readers j > k} (1 - R[t, j]).
        part_of = {(part.node, part.index): part for group in parts for part in group}
        for (t, i, p, k), free in FREE.items():
            part = part_of[i, p]
            model.add(free <= R[t, k])
            if t + 1 < n:
                model.add(free + in_memory(t + 1, part) <= 1)
            for j in part.readers:
                if k < j <= t:
                    model.add(free + R[t, j] <= 1)
        # (M4) budget with the running node's workspace.
        for (t, k), held in U.items():
            if self.workspace[k] > 0:
                model.add(held + self.workspace[k] * R[t, k] <= self.capacity)
        # (1a) objective: floored seconds of every computation, recomputations included.
        model.minimize(sum(self.cost[i] * var for (t, i), var in R.items() if self.cost[i] > 0))

    def hint(self, R: list[list[int]], S: list[list[int]]) -> None:
        """Every variable's value for the stage matrices R, S (HELD and FREE exact, U by (M1)/(M2)) as a hint."""
        exact = stage_values(self.graph, R, S, size=lambda part: self.part_units[part.node, part.index])
        for (t, i), var in self.R.items():
            self.model.add_hint(var, bool(R[t][i] or i == t))
        for (t, i), var in self.S.items():
            self.model.add_hint(var, bool(S[t][i]))
        for key, var in self.HELD.items():
            self.model.add_hint(var, bool(exact.held[key]))
        for key, var in self.FREE.items():
            self.model.add_hint(var, bool(exact.free[key]))
        for key, var in self.U.items():
            self.model.add_hint(var, int(exact.memory[key]))

    def matrices(self, solver: cp_model.CpSolver) -> tuple[list[list[int]], list[list[int]]]:
        n = len(self.graph)
        R = [[0] * n for _ in range(n)]
        S = [[0] * n for _ in range(n)]
        for (t, i), var in self.R.items():
            R[t][i] = int(i == t or solver.boolean_value(var))
        for (t, i), var in self.S.items():
            S[t][i] = int(solver.boolean_value(var))
        return R, S


def solve_cpsat(graph: Graph, budget_bytes: int, options: SolveOptions | None = None, seed: int = 0) -> SolverResult:
    """The fastest frontier-advancing schedule whose peak (fixed memory included) fits budget_bytes, by CP-SAT."""
    options = options or SolveOptions()
    started = time.perf_counter()
    name = "cpsat"
    settled = settled_without_solving(name, graph, budget_bytes)
    if settled is not None:
        return settled

    model = CpsatModel(graph, budget_bytes)
    proto = model.model.proto
    detail: dict = {"variables": len(proto.variables), "constraints": len(proto.constraints),
                    "byte_unit": model.byte_unit, "exact_memory": model.exact_memory,
                    "second_unit": model.second_unit}

    # Warm start: a valid schedule within the budget is the fallback; a frontier-advancing one is also a hint.
    fallback = None
    if options.warm_start is not None:
        given = simulate(graph, options.warm_start)
        if not given.valid:
            detail["warm_start"] = f"skipped: not a valid schedule ({given.errors[0]})"
        elif given.peak_bytes > budget_bytes:
            detail["warm_start"] = f"skipped: peak {given.peak_bytes} bytes does not fit the budget"
        else:
            fallback = options.warm_start
            try:
                R0, _ = options.warm_start.to_matrices()
            except ValueError as error:
                detail["warm_start"] = f"not used by the solver: not frontier-advancing ({error})"
            else:
                model.hint(R0, minimal_storage(graph, R0))  # to_matrices keeps values freed later in the stage
                detail["warm_start"] = "given to the solver as a hint"
    detail["build_s"] = time.perf_counter() - started

    solver = cp_model.CpSolver()
    # the time limit covers the whole call, as the MILP's does: building the model counts against it
    solver.parameters.max_time_in_seconds = max(float(options.time_limit_s) - detail["build_s"], 1e-3)
    solver.parameters.num_workers = options.threads or 8  # CP-SAT's portfolio needs several workers, even on 2 cores
    solver.parameters.log_search_progress = options.verbose
    solver.parameters.random_seed = seed
    # No repair_hint: with it, OR-Tools 9.15's parallel search aborts on "Check failed: heuristics.fixed_search !=
    # nullptr" (google/or-tools#5025, fixed after 9.15): on mlp at batch 2 and 142 MB, every 3-s solve crashed, was
    # run again and ended at 5.7 s with the warm start; without it, 3.8 s and a schedule of CP-SAT's own.
    status = solver.solve(model.model)
    message = f"CP-SAT: {solver.status_name(status)}"
    detail["solver_message"] = message
    detail["solve_s"] = solver.wall_time

    def lower_bound(status_code: int) -> float:
        """Each node runs at least once; with exact memory, CP-SAT's bound on the floored objective too."""
        bound = graph.compute_s
        if model.exact_memory and status_code in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.UNKNOWN):
            scaled = solver.best_objective_bound
            if math.isfinite(scaled):
                bound = max(bound, scaled * model.second_unit)
        return bound

    def result(status_name: str, schedule: Schedule | None, lower_bound_s: float | None, text: str) -> SolverResult:
        objective_s = compute_seconds(graph, schedule) if schedule is not None else None
        if objective_s is not None and lower_bound_s is not None:
            lower_bound_s = min(lower_bound_s, objective_s)
        return SolverResult(solver=name, status=status_name, schedule=schedule, objective_s=objective_s,
                            lower_bound_s=lower_bound_s, wall_s=time.perf_counter() - started,
                            message=text, detail=detail)

    if status == cp_model.INFEASIBLE:
        if model.exact_memory:
            return result(INFEASIBLE, None, None, f"no schedule fits {budget_bytes} bytes ({message})")
        if fallback is not None:
            return result(FEASIBLE, fallback, graph.compute_s,
                          f"rounded-up memory model infeasible ({message}): returning the warm start")
        return result(NO_SOLUTION, None, graph.compute_s,
                      f"no schedule fits the rounded-up memory model ({message}); not a proof of infeasibility")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if fallback is not None:
            return result(FEASIBLE, fallback, lower_bound(status),
                          f"no solution found in {options.time_limit_s:.3g} s: returning the warm start ({message})")
        return result(NO_SOLUTION, None, lower_bound(status), f"no solution found ({message})")

    R, S = model.matrices(solver)
    schedule = Schedule.from_matrices(graph, R, S)
    sim = simulate(graph, schedule)
    if not sim.valid or sim.peak_bytes > budget_bytes:
        # The accounting over-estimates the simulator, so this would be a bug: never return such a schedule.
        problem = sim.errors[0] if sim.errors else f"simulated peak {sim.peak_bytes} bytes over the budget"
        detail["rejected_solution"] = problem
        if fallback is not None:
            return result(FEASIBLE, fallback, lower_bound(status),
                          f"solver solution rejected ({problem}): returning the warm start")
        return result(NO_SOLUTION, None, lower_bound(status), f"solver solution rejected: {problem}")
    if fallback is not None:
        given = simulate(graph, fallback)
        if given.compute_s < sim.compute_s:  # a warm start the solver never saw (or a time-limited search)
            detail["solver_schedule_compute_s"] = sim.compute_s
            return result(FEASIBLE, fallback, lower_bound(status),
                          f"the warm start beats the solver's schedule ({message})")
    proven = status == cp_model.OPTIMAL and model.exact_memory
    verdict = "optimal" if proven else "time limit or rounded memory: best schedule found"
    return result(OPTIMAL if proven else FEASIBLE, schedule, lower_bound(status), f"{verdict} ({message})")


# --- running in a process of its own ---------------------------------------------------------------
# OR-Tools and highspy each ship libhighs: once highspy is loaded, importing OR-Tools fails (undefined
# symbol). The registry therefore runs CP-SAT in a child process: `python -m solvers.cpsat` reads
# {"graph", "budget_bytes", "options", "seed"} as JSON on stdin and writes the result as JSON on stdout.


def _main() -> None:
    import json
    import sys

    request = json.load(sys.stdin)
    options = request["options"]
    # and so does this process's start (Python, OR-Tools and remat imported: 1 to 2 s), from when it was asked
    options["time_limit_s"] = max(0.0, options["time_limit_s"] - (time.time() - request.get("sent_at", time.time())))
    warm = options.pop("warm_start", None)
    result = solve_cpsat(Graph.from_json(request["graph"]), int(request["budget_bytes"]),
                         SolveOptions(**options, warm_start=Schedule.from_json(warm) if warm else None),
                         seed=int(request.get("seed", 0)))
    json.dump({
        "solver": result.solver, "status": result.status,
        "schedule": result.schedule.to_json() if result.schedule else None,
        "objective_s": result.objective_s, "lower_bound_s": result.lower_bound_s, "wall_s": result.wall_s,
        "message": result.message, "detail": json.loads(json.dumps(result.detail, default=str)),
    }, sys.stdout)


if __name__ == "__main__":
    _main()
