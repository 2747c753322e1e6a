"""Simulated annealing over points that each turn into a schedule, judged by the simulator.

Two searches use it: solvers/drop_search.py moves through which values a schedule drops, solvers/rows_search.py
through Checkmate's rows (what each stage computes). A Space says how a point becomes a schedule, what one change
to a point is, and how a point travels to another process as JSON.

Each point is an emit and a simulation: milliseconds on a few hundred nodes. A move is taken when it lowers the
score (seconds, times 1 + OVER_WEIGHT x the share of the budget the peak is over by), or else with the Metropolis
probability exp(-rise / temperature). The temperature cools geometrically, from FIRST_TEMPERATURE to
LAST_TEMPERATURE of the start's score, over the moves or the time limit, whichever runs out first: early on the
search crosses schedules over the budget to reach other points, late it only descends. The moves are drawn from
a seeded generator, but the temperature follows the clock as well as the count of moves (whichever is further
along), so two runs agree only where the moves run out well before the time.

Runs differ a lot (on MobileNet-v2 near its minimum budget three 20 s anneals over drops from the same start
ended at +27.4%, +30.9% and +31.3% over store-all), so anneal_at_once runs several side by side, each with its
own seed, one per core (the others in child processes, `python -m solvers.anneal`), and keeps the best. Every
other one (odd seeds) starts at COOL_FIRST_TEMPERATURE instead: a walk that starts hot can leave the start's
neighbourhood and never come back below it, which a cooler one, descending from the start, does not.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from remat.graph import Graph
from remat.schedule import Schedule
from remat.simulate import Simulation, live_bytes_at, simulate
from solvers.base import FEASIBLE, NO_SOLUTION, OPTIMAL, SolveOptions, SolverResult, meets_bound

FIRST_TEMPERATURE = 0.05  # of the start's score: a move that adds 5% is taken with probability 1/e at first
LAST_TEMPERATURE = 1e-4  # at the end only what adds under a basis point or so is ever taken
OVER_WEIGHT = 10.0  # a peak 1% over the budget scores like 10% more seconds
# (Tried on U-Net, ResNet-50 and MobileNet-v2 near their minimum budgets with drops: a cooler start, 0.01, with a
# peak over the budget weighed ten times more, or three shorter anneals each from the best so far, end higher on
# U-Net; first temperatures of 0.02 and 0.005 were within the spread of one setting.)
COOL_FIRST_TEMPERATURE = 0.005  # the first temperature of every other anneal side by side (odd seeds): see below
CHILD_GRACE_S = 10.0  # how long a child anneal may run past the time limit (start-up, reading the graph)


def score(simulation: Simulation, budget_bytes: int) -> float:
    over = max(0, simulation.peak_bytes - budget_bytes) / max(budget_bytes, 1)
    return simulation.compute_s * (1 + OVER_WEIGHT * over)


@dataclass
class Current:
    """The anneal's current point, with its schedule and simulation."""

    graph: Graph
    point: Any
    schedule: Schedule
    simulation: Simulation

    @cached_property
    def held_at_peak(self) -> list[int]:
        """The values in memory at the schedule's peak (worked out once, when a move asks)."""
        return list(live_bytes_at(self.graph, self.schedule, self.simulation.peak_op))


@dataclass(frozen=True)
class Space:
    """What an anneal moves through. Points are immutable and compare equal when they are the same point."""

    method: str  # the name of its results: "drop-search", "rows-search"
    module: str  # the module that defines it as SPACE (a child process imports it from there)
    moves: int  # moves over which an anneal cools, unless the time limit runs out first
    schedule_of: Callable[[Graph, Any], Schedule]
    # the point's schedule, or None once its seconds pass the given ceiling (then it is not built: see anneal)
    schedule_within: Callable[[Graph, Any, float], Schedule | None]
    neighbour: Callable[[Graph, Current, random.Random], Any]  # one change to the current point (or the same)
    to_json: Callable[[Any], Any]
    from_json: Callable[[Any], Any]


def anneal(space: Space, graph: Graph, budget_bytes: int, start: Any, options: SolveOptions,
           lower_bound_s: float | None = None, seed: int = 0, moves_at_most: int | None = None,
           first_temperature: float = FIRST_TEMPERATURE) -> SolverResult:
    """The cheapest schedule that fits found by annealing from `start` (see the module docstring), within the
    time limit; status optimal when it meets `lower_bound_s`. detail: moves tried, improvements, the best point."""
    started = time.perf_counter()
    moves_at_most = space.moves if moves_at_most is None else moves_at_most
    rng = random.Random(seed)
    schedule = space.schedule_of(graph, start)
    current = Current(graph, start, schedule, simulate(graph, schedule))
    current_score = first_score = score(current.simulation, budget_bytes)
    best = current if current.simulation.fits(budget_bytes) else None
    moves = improvements = 0
    with _caller_objects_frozen():
        while moves < moves_at_most:
            elapsed = time.perf_counter() - started
            if elapsed > options.time_limit_s:
                break
            if best is not None and meets_bound(best.simulation.compute_s, lower_bound_s):
                break  # meets the bound: optimal
            progress = max(moves / moves_at_most, elapsed / max(options.time_limit_s, 1e-9))
            temperature = first_score * first_temperature * (LAST_TEMPERATURE / first_temperature) ** progress
            moves += 1
            point = space.neighbour(graph, current, rng)
            if point == current.point:
                continue
            # The Metropolis test, drawn first: the move is taken when its score rises by less than `allowed`. A
            # score is at least the seconds, so a point whose seconds pass current + allowed is not even built
            # (about a quarter of the moves near the CNNs' minimum budgets; each build is an emit and a simulation)
            allowed = -temperature * math.log(max(rng.random(), 1e-300))
            schedule = space.schedule_within(graph, point, (current_score + allowed) * (1 + 1e-9))
            if schedule is None:
                continue
            proposed = Current(graph, point, schedule, simulate(graph, schedule))
            proposed_score = score(proposed.simulation, budget_bytes)
            rise = proposed_score - current_score
            if rise > 0 and rise >= allowed:
                continue
            current, current_score = proposed, proposed_score
            if current.simulation.fits(budget_bytes) and (best is None or
                                                          current.simulation.compute_s < best.simulation.compute_s):
                best = current
                improvements += 1
    detail = {"moves": moves, "improvements": improvements, "best": best.point if best else None}
    return _outcome(space, best, lower_bound_s, detail, time.perf_counter() - started)


@contextmanager
def _caller_objects_frozen() -> Iterator[None]:
    """Keep the objects that exist now out of the garbage collector's passes. Each move leaves garbage that sets
    off collections, and a full one walks every object in the process: in the planner, after its MILPs, about
    430k, which cost MobileNet-v2's anneal (508 nodes) a quarter of its moves."""
    if gc.get_freeze_count():  # the caller froze them already: leave that as it is
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _outcome(space: Space, best: Current | None, lower_bound_s: float | None, detail: dict,
             wall_s: float = 0.0) -> SolverResult:
    """An anneal's result: its best schedule that fits (None: none did), optimal when it meets the bound."""
    moves, improvements = detail["moves"], detail["improvements"]
    if best is None:
        return SolverResult(space.method, NO_SOLUTION, None, wall_s=wall_s, detail=detail,
                            message=f"no schedule that fits in {moves} moves")
    seconds = best.simulation.compute_s
    proven = meets_bound(seconds, lower_bound_s)
    return SolverResult(space.method, OPTIMAL if proven else FEASIBLE, best.schedule, objective_s=seconds,
                        lower_bound_s=lower_bound_s, wall_s=wall_s, detail=detail,
                        message=f"{improvements} improvement(s) in {moves} moves")


def anneal_at_once(space: Space, graph: Graph, budget_bytes: int, start: Any, options: SolveOptions,
                   lower_bound_s: float | None = None, seeds: Sequence[int] = (0,),
                   moves_at_most: int | None = None) -> SolverResult:
    """anneal from `start` once per seed, all to the same time limit and at the same time: the first seed in this
    process, each other in a child process. The best result; a child's best point is turned into a schedule and
    simulated here. A child that fails is left out (detail["failed"] says why)."""
    started = time.perf_counter()
    deadline = time.time() + options.time_limit_s  # the wall clock: children measure their time from it
    moves_at_most = space.moves if moves_at_most is None else moves_at_most  # a child knows only the module's space
    children = []
    shared = {"space": space.module, "graph": graph.to_json(), "budget_bytes": budget_bytes,
              "start": space.to_json(start), "deadline": deadline, "lower_bound_s": lower_bound_s,
              "moves_at_most": moves_at_most}
    for seed in seeds[1:]:
        with tempfile.TemporaryFile("w+") as request:  # a file, not a pipe: nothing blocks if the child stops early
            json.dump({**shared, "seed": seed}, request)
            request.seek(0)
            children.append(subprocess.Popen([sys.executable, "-m", "solvers.anneal"], stdin=request,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             cwd=Path(__file__).resolve().parent.parent))
    results = [anneal(space, graph, budget_bytes, start, replace(options, time_limit_s=deadline - time.time()),
                      lower_bound_s, seeds[0], moves_at_most, first_temperature(seeds[0]))]
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
        point = space.from_json(answer["best"]) if answer["best"] is not None else None
        results.append(_result_for(space, graph, budget_bytes, point, lower_bound_s, answer["moves"],
                                   answer["improvements"]))
    best = min(results, key=lambda r: r.objective_s if r.objective_s is not None else math.inf)
    detail = {**best.detail, "anneals": len(results), "failed": failed,
              "moves": sum(r.detail["moves"] for r in results)}
    return replace(best, wall_s=time.perf_counter() - started, detail=detail)


def first_temperature(seed: int) -> float:
    """Anneals side by side start at two temperatures, a hedge: from cover-round's drops on MobileNet-v2 near its
    minimum budget, both anneals of a 30-s plan starting at FIRST_TEMPERATURE found nothing cheaper than the start
    in 3 of 6 plans (the walk leaves the start's neighbourhood and never comes back below it), while the best of
    the others reached +25.8%. A cooler start descends from the start instead."""
    return COOL_FIRST_TEMPERATURE if seed % 2 else FIRST_TEMPERATURE


def _result_for(space: Space, graph: Graph, budget_bytes: int, point: Any, lower_bound_s: float | None, moves: int,
                improvements: int) -> SolverResult:
    """anneal's result for the best point an anneal found in another process (None: none that fit)."""
    best = None
    if point is not None:
        schedule = space.schedule_of(graph, point)
        best = Current(graph, point, schedule, simulate(graph, schedule))
        best = best if best.simulation.fits(budget_bytes) else None
    return _outcome(space, best, lower_bound_s, {"moves": moves, "improvements": improvements, "best": point})


def _main() -> None:
    """One anneal in a process of its own: the request as JSON on stdin, the best point as JSON on stdout."""
    request = json.load(sys.stdin)
    space = importlib.import_module(request["space"]).SPACE
    graph = Graph.from_json(request["graph"])
    options = SolveOptions(time_limit_s=max(request["deadline"] - time.time(), 0.0))
    result = anneal(space, graph, request["budget_bytes"], space.from_json(request["start"]), options,
                    request["lower_bound_s"], request["seed"], request["moves_at_most"],
                    first_temperature(request["seed"]))
    best = result.detail["best"]
    json.dump({"best": space.to_json(best) if best is not None else None, "moves": result.detail["moves"],
               "improvements": result.detail["improvements"]}, sys.stdout)


if __name__ == "__main__":
    _main()
