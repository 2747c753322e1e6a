"""The anneal both searches share (solvers/anneal.py): anneals side by side, in child processes, find what the same
seeds find one by one, and a child that fails is left out."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest

from remat.simulate import simulate
from solvers.anneal import COOL_FIRST_TEMPERATURE, anneal, anneal_at_once, first_temperature
from solvers.base import SolveOptions
from solvers.bounds import covering_bound
from solvers.cover_round import Drops, solve_cover_round
from solvers.drop_search import SPACE as DROPS
from solvers.rows_search import SPACE as ROWS
from solvers.rows_search import rows_of
from tests.test_drop_search import skip_heavy_step
from tests.test_rows_search import chain_case


def drops_case():
    graph, budget = skip_heavy_step()
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    return DROPS, graph, budget, solve_cover_round(graph, budget, bound, SolveOptions(time_limit_s=10)).detail["drops"]


def rows_case():
    graph, budget, dropped = chain_case()
    return ROWS, graph, budget, rows_of(dropped.schedule)


@pytest.mark.parametrize("case", [drops_case, rows_case], ids=["drops", "rows"])
def test_anneals_at_once_find_what_the_same_seeds_find_one_by_one(case):
    space, graph, budget, start = case()
    options = SolveOptions(time_limit_s=600)  # the moves run out long before: each seed's run is the same
    # side by side, odd seeds start cooler (a hedge against a hot walk that never comes back below its start)
    assert first_temperature(1) == COOL_FIRST_TEMPERATURE < first_temperature(0) == first_temperature(2)
    one_by_one = [anneal(space, graph, budget, start, options, seed=seed, moves_at_most=400,
                         first_temperature=first_temperature(seed)) for seed in (0, 1, 2)]
    at_once = anneal_at_once(space, graph, budget, start, options, seeds=(0, 1, 2), moves_at_most=400)
    assert at_once.solver == space.method
    assert at_once.detail["anneals"] == 3 and at_once.detail["failed"] == []
    assert at_once.detail["moves"] == sum(r.detail["moves"] for r in one_by_one)
    assert at_once.objective_s == pytest.approx(min(r.objective_s for r in one_by_one))
    assert at_once.detail["best"] in [r.detail["best"] for r in one_by_one]
    sim = simulate(graph, at_once.schedule)
    assert sim.valid and sim.fits(budget) and sim.compute_s == pytest.approx(at_once.objective_s)


@pytest.mark.parametrize("case", [drops_case, rows_case], ids=["drops", "rows"])
def test_points_ruled_out_by_their_seconds_are_not_built_and_the_walk_is_the_same(case):
    # the Metropolis test is drawn before a point is built, and a point whose seconds alone fail it is skipped: the
    # same moves are taken as when every point is emitted and simulated, for fewer simulations
    space, graph, budget, start = case()
    options = SolveOptions(time_limit_s=600)  # the moves run out long before: the cooling follows them only
    built = {"every": 0, "within": 0}  # schedules emitted (and then simulated) after the start

    def counted(build, tally):
        def schedule(*args):
            schedule = build(*args)
            built[tally] += schedule is not None
            return schedule
        return schedule

    def walk(space):
        result = anneal(space, graph, budget, start, options, seed=3, moves_at_most=400)
        return result.objective_s, result.detail

    built_anyway = counted(lambda graph, point, max_seconds: space.schedule_of(graph, point), "every")
    every = walk(replace(space, schedule_within=built_anyway))
    within = walk(replace(space, schedule_within=counted(space.schedule_within, "within")))
    assert within == every
    assert built["within"] < built["every"]


def test_drops_travel_to_a_child_anneal_whole():
    # a child process gets its start as JSON: the values made fresh and the inputs held must arrive too
    start = Drops((2, 5, 7), "longest", reuse=True, hold_bytes=3, fresh=frozenset({5}), held=frozenset({1, 4}))
    assert DROPS.from_json(json.loads(json.dumps(DROPS.to_json(start)))) == start


def test_an_anneal_whose_process_fails_is_left_out(monkeypatch):
    graph, budget = skip_heavy_step()
    start = Drops((3, 5))
    monkeypatch.setattr(sys, "executable", "false")  # the child processes exit at once with status 1
    options = SolveOptions(time_limit_s=5)
    result = anneal_at_once(DROPS, graph, budget, start, options, seeds=(0, 1), moves_at_most=50)
    alone = anneal(DROPS, graph, budget, start, options, seed=0, moves_at_most=50)
    assert result.detail["anneals"] == 1 and result.detail["failed"] == ["an anneal failed (1): no output"]
    assert result.objective_s == pytest.approx(alone.objective_s)
