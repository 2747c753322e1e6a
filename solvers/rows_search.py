"""Simulated annealing over Checkmate's rows (solvers/anneal.py): which nodes each stage computes.

Drops (solvers/drop_search.py) bring a dropped value back at fixed points, once, with whatever inputs it is missing
there. Near a graph's minimum budget the best schedules recompute more than that: a U-Net's full-resolution stem
is rebuilt for each of its backward ops in turn, from a different value held each time, as revolve does for a
chain. Rows say that directly. A point is the rows, stage t running rows[t] in ascending order (node t among
them); the schedule is emit's (solvers/decompose.py: each computed value held until its last read before it is
computed again), valid for any rows. One move, at a stage drawn at random:

- recompute there a value the stage reads (so its earlier copy is freed sooner), and each of that value's
  inputs too with probability CHAIN, recursively (a chain rebuilt from further back);
- or stop recomputing one of the stage's extra nodes (its earlier copy is then held until here).

Either way, computations that nothing reads any more are pruned. A move that recomputes more costs seconds and
frees bytes; one that recomputes less the reverse.

On U-Net (215 nodes) at 1.1 x its minimum budget, from the planner's 30 s plan (drop-search, +42.3% over
store-all), one 30 s anneal reached +35.1%; on a 77-node U-Net, +52.9% -> +39.9% in 30 s, where Checkmate's MILP
warm-started from the same plan reached +38.7% in 240 s.
"""

from __future__ import annotations

import random

from remat.graph import Graph
from remat.schedule import Schedule
from solvers.anneal import Current, Space, anneal
from solvers.base import SolveOptions, SolverResult
from solvers.decompose import emit, prune_rows

Rows = tuple[tuple[int, ...], ...]
MOVES = 100_000  # moves over which the temperature cools: a move costs about a millisecond on U-Net, so the time
#                  limit usually runs out first
CHAIN = 0.5  # the chance that a recomputed value's input is recomputed with it (when the stage does not run it)


def rows_of(schedule: Schedule) -> Rows:
    """The rows of a frontier-advancing schedule (ValueError for one that is not: see Schedule.to_matrices)."""
    R, _ = schedule.to_matrices()
    return tuple(tuple(k for k, computed in enumerate(row) if computed) for row in R)


def schedule_of(graph: Graph, rows: Rows) -> Schedule:
    return emit(graph, [list(row) for row in rows])[0]


def neighbour(graph: Graph, current: Current, rng: random.Random) -> Rows:
    """One change to the current rows (see the module docstring); the same rows when the change drawn does not
    apply."""
    rows: Rows = current.point
    t = rng.randrange(1, len(rows)) if len(rows) > 1 else 0
    row = set(rows[t])
    if rng.random() < 0.5:
        reads = sorted({d for k in row for d in graph.nodes[k].deps
                        if d not in row and graph.nodes[d].output_bytes > 0})
        if not reads:
            return rows
        value = rng.choice(reads)
        added, stack = {value}, [value]
        while stack:
            for d in graph.nodes[stack.pop()].deps:
                if d not in row and d not in added and graph.nodes[d].deps and rng.random() < CHAIN:
                    added.add(d)
                    stack.append(d)
        row |= added
    else:
        extra = sorted(row - {t})
        if not extra:
            return rows
        row.discard(rng.choice(extra))
    changed = [list(r) for r in rows]
    changed[t] = sorted(row)
    return tuple(tuple(r) for r in prune_rows(graph, changed))


def _rows_to_json(rows: Rows) -> list[list[int]]:
    return [list(row) for row in rows]


def _rows_from_json(data: list[list[int]]) -> Rows:
    return tuple(tuple(row) for row in data)


def schedule_within(graph: Graph, rows: Rows, max_seconds: float) -> Schedule | None:
    """The schedule of `rows`, or None when they cost more than `max_seconds` (it is not emitted)."""
    if sum(graph.nodes[k].compute_s for row in rows for k in row) > max_seconds:
        return None
    return schedule_of(graph, rows)


SPACE = Space("rows-search", __name__, MOVES, schedule_of, schedule_within, neighbour, _rows_to_json, _rows_from_json)


def search_rows(graph: Graph, budget_bytes: int, start: Rows, options: SolveOptions | None = None,
                lower_bound_s: float | None = None, seed: int = 0, moves_at_most: int = MOVES) -> SolverResult:
    """The cheapest schedule that fits found by annealing from the rows `start`, within the time limit; status
    optimal when it meets `lower_bound_s`. detail: moves tried, improvements, the best rows ("best")."""
    return anneal(SPACE, graph, budget_bytes, start, options or SolveOptions(time_limit_s=10.0), lower_bound_s,
                  seed, moves_at_most)
