"""Simulated annealing over which values a schedule drops, each point judged by the simulator.

cover-round (solvers/cover_round.py) turns the covering bound's drops into a schedule. Where that schedule costs
more than the bound (a U-Net's skip connections: bringing one back drags the dropped encoder chain back with it),
the covering solution is a poor guide to what to drop, and the whole-graph MILP rarely finds anything better in
minutes (U-Net's is 313k rows: HiGHS's presolve alone takes a minute). This search moves from cover-round's drops
one change at a time:

- undo a drop;
- drop a value held at the peak, or any value that is read again later;
- swap a drop for another value;
- with reuse, bring a value back fresh at every point that needs it, or hold it again (rows_for_drops' `fresh`).

Each point is an emit and a simulation: milliseconds on a few hundred nodes. A move is taken when it lowers the
score (seconds, times 1 + OVER_WEIGHT x the share of the budget the peak is over by), or else with the Metropolis
probability exp(-rise / temperature). The temperature cools geometrically, from FIRST_TEMPERATURE to
LAST_TEMPERATURE of the start's score, over MOVES moves or the time limit, whichever runs out first: early on the
search crosses schedules over the budget to reach other drops, late it only descends. The moves are drawn from
a seeded generator, but the temperature follows the clock as well as the count of moves (whichever is further
along), so two runs agree only where the moves run out well before the time.

Runs differ a lot: on MobileNet-v2 near its minimum budget, three 20 s anneals from the same drops ended at
+27.4%, +30.9% and +31.3% over store-all. search_drops_at_once runs several anneals side by side, each with its
own seed, one per core (the others in child processes, `python -m solvers.drop_search`), and keeps the best.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from remat.graph import Graph
from remat.schedule import Schedule
from remat.simulate import Simulation, live_bytes_at, simulate
from solvers.base import FEASIBLE, NO_SOLUTION, OPTIMAL, SolveOptions, SolverResult
from solvers.cover_round import Drops, schedule_for_drops

MOVES = 8000  # moves over which the temperature cools (fewer when the time limit runs out first)
FIRST_TEMPERATURE = 0.05  # of the start's score: a move that adds 5% is taken with probability 1/e at first
LAST_TEMPERATURE = 1e-4  # at the end only what adds under a basis point or so is ever taken
OVER_WEIGHT = 10.0  # a peak 1% over the budget scores like 10% more seconds
# (Tried on U-Net, ResNet-50 and MobileNet-v2 near their minimum budgets: a cooler start, 0.01, with a peak over
# the budget weighed ten times more, or three shorter anneals each from the best so far, end higher on U-Net.)


def score(simulation: Simulation, budget_bytes: int) -> float:
    over = max(0, simulation.peak_bytes - budget_bytes) / max(budget_bytes, 1)
    return simulation.compute_s * (1 + OVER_WEIGHT * over)


def droppable(graph: Graph) -> list[int]:
    """Values whose dropping changes the schedule: they hold bytes and are read again after the next op."""
    return [v for v, users in enumerate(graph.users) if graph.nodes[v].output_bytes > 0 and users
            and users[-1] > v + 1]


def neighbour(drops: Drops, held_at_peak: Callable[[], list[int]], values: list[int], rng: random.Random) -> Drops:
    """One change to `drops` (see the module docstring); the same drops when the change drawn does not apply.
    `held_at_peak()`: the droppable values held at the current schedule's peak (asked for only when needed)."""
    dropped = set(drops.dropped)
    draw = rng.random()
    if draw < 0.30 and dropped:
        dropped.discard(rng.choice(drops.dropped))
    elif draw < 0.45:
        dropped.add(rng.choice(values))
    elif draw < 0.55 and dropped:
        dropped.discard(rng.choice(drops.dropped))
        dropped.add(rng.choice(values))
    elif draw < 0.80:
        options = [v for v in held_at_peak() if v not in dropped]
        if options:
            dropped.add(rng.choice(options))
    elif drops.reuse:
        return replace(drops, fresh=drops.fresh ^ {rng.choice(values)})
    return replace(drops, dropped=tuple(sorted(dropped)))


def search_drops(graph: Graph, budget_bytes: int, start: Drops, options: SolveOptions | None = None,
                 lower_bound_s: float | None = None, seed: int = 0, moves_at_most: int = MOVES) -> SolverResult:
    """The cheapest schedule that fits found by annealing from `start` (see the module docstring), within the
    time limit; status optimal when it meets `lower_bound_s`. detail: moves tried, improvements, the best drops."""
    options = options or SolveOptions(time_limit_s=10.0)
    started = time.perf_counter()
    rng = random.Random(seed)
    values = droppable(graph)
    value_set = set(values)
    current = start
    schedule = schedule_for_drops(graph, current)
    simulation = simulate(graph, schedule)
    current_score = first_score = score(simulation, budget_bytes)
    best: tuple[Schedule, Simulation, Drops] | None = None
    if simulation.fits(budget_bytes):
        best = (schedule, simulation, current)
    moves = improvements = 0
    peak_values: list[int] | None = None  # held at the current schedule's peak, worked out when a move needs them

    def held_at_peak() -> list[int]:
        nonlocal peak_values
        if peak_values is None:
            peak_values = [v for v in live_bytes_at(graph, schedule, simulation.peak_op) if v in value_set]
        return peak_values

    while values and moves < moves_at_most:
        elapsed = time.perf_counter() - started
        if elapsed > options.time_limit_s:
            break
        if best is not None and lower_bound_s is not None and best[1].compute_s <= lower_bound_s * (1 + 1e-9):
            break  # meets the bound: optimal
        progress = max(moves / moves_at_most, elapsed / max(options.time_limit_s, 1e-9))
        temperature = first_score * FIRST_TEMPERATURE * (LAST_TEMPERATURE / FIRST_TEMPERATURE) ** progress
        moves += 1
        proposal = neighbour(current, held_at_peak, values, rng)
        if proposal == current:
            continue
        proposed_schedule = schedule_for_drops(graph, proposal)
        proposed = simulate(graph, proposed_schedule)
        proposed_score = score(proposed, budget_bytes)
        rise = proposed_score - current_score
        if rise > 0 and rng.random() >= math.exp(-rise / temperature):
            continue
        current, schedule, simulation, current_score = proposal, proposed_schedule, proposed, proposed_score
        peak_values = None
        if simulation.fits(budget_bytes) and (best is None or simulation.compute_s < best[1].compute_s):
            best = (schedule, simulation, current)
            improvements += 1
    detail = {"moves": moves, "improvements": improvements, "drops": best[2] if best else None}
    return _outcome(best[:2] if best else None, lower_bound_s, detail, time.perf_counter() - started)


def _outcome(best: tuple[Schedule, Simulation] | None, lower_bound_s: float | None, detail: dict,
             wall_s: float = 0.0) -> SolverResult:
    """An anneal's result: its best schedule that fits (None: none did), optimal when it meets the bound."""
    moves, improvements = detail["moves"], detail["improvements"]
    if best is None:
        return SolverResult("drop-search", NO_SOLUTION, None, wall_s=wall_s, detail=detail,
                            message=f"no schedule that fits in {moves} moves")
    schedule, simulation = best
    proven = lower_bound_s is not None and simulation.compute_s <= lower_bound_s * (1 + 1e-9)
    return SolverResult("drop-search", OPTIMAL if proven else FEASIBLE, schedule, objective_s=simulation.compute_s,
                        lower_bound_s=lower_bound_s, wall_s=wall_s, detail=detail,
                        message=f"annealed cover-round's drops: {improvements} improvement(s) in {moves} moves")


# --- several anneals at once ----------------------------------------------------------------------------------
CHILD_GRACE_S = 10.0  # how long a child anneal may run past the time limit (start-up, reading the graph)


def search_drops_at_once(graph: Graph, budget_bytes: int, start: Drops, options: SolveOptions,
                         lower_bound_s: float | None = None, seeds: Sequence[int] = (0,),
                         moves_at_most: int = MOVES) -> SolverResult:
    """search_drops from `start` once per seed, all to the same time limit and at the same time: the first seed
    in this process, each other in a child process. The best result; a child's drops are turned into a schedule
    and simulated here. A child that fails is left out (detail["failed"] says why)."""
    started = time.perf_counter()
    deadline = time.time() + options.time_limit_s  # the wall clock: children measure their time from it
    children = []
    shared = {"graph": graph.to_json(), "budget_bytes": budget_bytes, "start": _drops_to_json(start),
              "deadline": deadline, "lower_bound_s": lower_bound_s, "moves_at_most": moves_at_most}
    for seed in seeds[1:]:
        with tempfile.TemporaryFile("w+") as request:  # a file, not a pipe: nothing blocks if the child stops early
            json.dump({**shared, "seed": seed}, request)
            request.seek(0)
            children.append(subprocess.Popen([sys.executable, "-m", "solvers.drop_search"], stdin=request,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             cwd=Path(__file__).resolve().parent.parent))
    results = [search_drops(graph, budget_bytes, start, replace(options, time_limit_s=deadline - time.time()),
                            lower_bound_s, seeds[0], moves_at_most)]
    failed = []
    for child in children:
        try:
            out, err = child.communicate(timeout=max(deadline - time.time(), 0) + CHILD_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            failed.append("an anneal ran past its time limit: stopped")
            continue
        if child.returncode != 0:
            failed.append(f"an anneal failed ({child.returncode}): "
                          f"{(err.strip().splitlines() or ['no output'])[-1]}")
            continue
        answer = json.loads(out)
        drops = _drops_from_json(answer["drops"]) if answer["drops"] else None
        results.append(_result_for(graph, budget_bytes, drops, lower_bound_s, answer["moves"],
                                   answer["improvements"]))
    best = min(results, key=lambda r: r.objective_s if r.objective_s is not None else math.inf)
    detail = {**best.detail, "anneals": len(results), "failed": failed,
              "moves": sum(r.detail["moves"] for r in results)}
    return replace(best, wall_s=time.perf_counter() - started, detail=detail)


def _result_for(graph: Graph, budget_bytes: int, drops: Drops | None, lower_bound_s: float | None, moves: int,
                improvements: int) -> SolverResult:
    """search_drops' result for the best drops an anneal found in another process (None: none that fit)."""
    best = None
    if drops is not None:
        schedule = schedule_for_drops(graph, drops)
        simulation = simulate(graph, schedule)
        best = (schedule, simulation) if simulation.fits(budget_bytes) else None
    return _outcome(best, lower_bound_s, {"moves": moves, "improvements": improvements, "drops": drops})


def _drops_to_json(drops: Drops) -> dict:
    return {**asdict(drops), "dropped": list(drops.dropped), "fresh": sorted(drops.fresh)}


def _drops_from_json(data: dict) -> Drops:
    return Drops(**{**data, "dropped": tuple(data["dropped"]), "fresh": frozenset(data["fresh"])})


def _main() -> None:
    """One anneal in a process of its own: the request as JSON on stdin, the best drops as JSON on stdout."""
    request = json.load(sys.stdin)
    graph = Graph.from_json(request["graph"])
    options = SolveOptions(time_limit_s=max(request["deadline"] - time.time(), 0.0))
    result = search_drops(graph, request["budget_bytes"], _drops_from_json(request["start"]), options,
                          request["lower_bound_s"], request["seed"], request["moves_at_most"])
    drops = result.detail["drops"]
    json.dump({"drops": _drops_to_json(drops) if drops else None, "moves": result.detail["moves"],
               "improvements": result.detail["improvements"]}, sys.stdout)


if __name__ == "__main__":
    _main()
