"""Simulated annealing over which values a schedule drops (solvers/anneal.py), each point judged by the simulator.

cover-round (solvers/cover_round.py) turns the covering bound's drops into a schedule. Where that schedule costs
more than the bound (a U-Net's skip connections: bringing one back drags the dropped encoder chain back with it),
the covering solution is a poor guide to what to drop, and the whole-graph MILP rarely finds anything better in
minutes (U-Net's is 313k rows: HiGHS's presolve alone takes a minute). This search moves from cover-round's drops
one change at a time:

- undo a drop;
- drop a value held at the peak, or any value that is read again later;
- swap a drop for another value;
- with reuse, bring a value back fresh at every point that needs it, or hold it again (rows_for_drops' `fresh`).

The drops it starts from may hold inputs (rows_for_drops' `held`, from cover-round's keep_what_fits); moves keep
them. A move that holds an input or stops holding one was tried and not kept: three 15-s anneals from the same
starts ended no lower on MobileNet-v2, U-Net or ResNet-50 near their minimum budgets, and higher on U-Net.
"""

from __future__ import annotations

import random
from dataclasses import asdict, replace

from remat.graph import Graph
from solvers.anneal import Current, Space, anneal
from solvers.base import SolveOptions, SolverResult
from solvers.cover_round import Drops, schedule_for_drops, schedule_for_drops_within

MOVES = 8000  # moves over which the temperature cools (fewer when the time limit runs out first)


def droppable(graph: Graph) -> list[int]:
    """Values whose dropping changes the schedule: they hold bytes and are read again after the next op."""
    return [v for v, users in enumerate(graph.users) if graph.nodes[v].output_bytes > 0 and users
            and users[-1] > v + 1]


_last_droppable: tuple[Graph | None, list[int], frozenset[int]] = (None, [], frozenset())


def _droppable_of(graph: Graph) -> tuple[list[int], frozenset[int]]:
    """droppable(graph), as a list and a set, worked out once per graph: every move asks (an anneal's moves are all
    on one graph, so the last graph's answer is the one kept)."""
    global _last_droppable
    if _last_droppable[0] is not graph:
        values = droppable(graph)
        _last_droppable = (graph, values, frozenset(values))
    return _last_droppable[1], _last_droppable[2]


def neighbour(graph: Graph, current: Current, rng: random.Random) -> Drops:
    """One change to the current drops (see the module docstring); the same drops when the change drawn does not
    apply."""
    drops: Drops = current.point
    values, value_set = _droppable_of(graph)
    if not values:
        return drops  # dropping anything would change nothing
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
        options = [v for v in current.held_at_peak if v not in dropped and v in value_set]
        if options:
            dropped.add(rng.choice(options))
    elif drops.reuse:
        return replace(drops, fresh=drops.fresh ^ {rng.choice(values)})
    return replace(drops, dropped=tuple(sorted(dropped)))


def _drops_to_json(drops: Drops) -> dict:
    return {**asdict(drops), "dropped": list(drops.dropped), "fresh": sorted(drops.fresh), "held": sorted(drops.held)}


def _drops_from_json(data: dict) -> Drops:
    return Drops(**{**data, "dropped": tuple(data["dropped"]), "fresh": frozenset(data["fresh"]),
                    "held": frozenset(data.get("held", ()))})


SPACE = Space("drop-search", __name__, MOVES, schedule_for_drops, schedule_for_drops_within, neighbour,
              _drops_to_json, _drops_from_json)


def search_drops(graph: Graph, budget_bytes: int, start: Drops, options: SolveOptions | None = None,
                 lower_bound_s: float | None = None, seed: int = 0, moves_at_most: int = MOVES) -> SolverResult:
    """The cheapest schedule that fits found by annealing from `start`, within the time limit; status optimal
    when it meets `lower_bound_s`. detail: moves tried, improvements, the best drops ("best")."""
    return anneal(SPACE, graph, budget_bytes, start, options or SolveOptions(time_limit_s=10.0), lower_bound_s,
                  seed, moves_at_most)
