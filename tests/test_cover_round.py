"""The schedule from the covering bound's solution (solvers/cover_round.py): valid, never below the optimum, and on
a chain of layers it meets the bound, so the planner returns it as proven optimal without the MILP."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from remat import planner
from remat.planner import solve
from remat.simulate import simulate
from solvers.base import FEASIBLE, NO_SOLUTION, OPTIMAL, SolveOptions
from solvers.bounds import covering_bound
from solvers.checkmate import solve_checkmate
from solvers.cover_round import (
    HOLD_ALL,
    HOLD_NONE,
    VARIANTS,
    Drops,
    drops_for_variant,
    keep_what_fits,
    pruned_rows_for,
    recompute_points,
    release_held,
    schedule_for_drops,
    schedules_for_bound,
    solve_cover_round,
)
from tests.bruteforce import cheapest_schedule
from tests.graphs import chain_training_graph, make_graph
from tests.test_solver_properties import EXACT, FAST, budget_between, dags_with_multi_output_ops, random_dags


@FAST
@given(graph=random_dags(), fraction=st.floats(0.0, 1.0))
def test_cover_round_is_valid_and_never_beats_the_optimum(graph, fraction):
    budget = budget_between(graph, fraction)
    best = cheapest_schedule(graph, budget)
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    result = solve_cover_round(graph, budget, bound, SolveOptions(time_limit_s=10))
    if result.schedule is None:
        assert result.status == NO_SOLUTION
        return
    sim = simulate(graph, result.schedule)
    assert sim.valid and sim.fits(budget) and best is not None
    assert sim.compute_s == pytest.approx(result.objective_s)
    assert sim.compute_s >= best.compute_s * (1 - 1e-9)


@FAST
@given(graph=dags_with_multi_output_ops(), fraction=st.floats(0.0, 1.0))
def test_every_variant_of_any_drops_is_a_valid_schedule(graph, fraction):
    # emit is valid for any rows: whatever the drops (here: every value), each way of placing them runs
    dropped = tuple(range(len(graph)))[:: 1 + int(fraction * 3)]
    held = frozenset(range(len(graph))[1::2])  # inputs held until their points, dropped or not
    for rule, reuse, hold in VARIANTS:
        drops = drops_for_variant(graph, dropped, rule, reuse, hold, small=5)
        schedule = schedule_for_drops(graph, replace(drops, held=drops.held | held))
        assert simulate(graph, schedule).valid


@pytest.mark.parametrize("fraction", [0.5, 0.7, 0.9])
def test_on_a_chain_the_planner_proves_the_cover_round_optimal(fraction):
    graph = chain_training_graph(layers=10, activation_bytes=10)
    budget = budget_between(graph, fraction)
    plan = solve(graph, budget, time_limit_s=20)
    milp = solve_checkmate(graph, budget, EXACT)
    assert plan.method == "cover-round" and plan.status == OPTIMAL and plan.gap < 1e-9
    assert plan.compute_s == pytest.approx(milp.objective_s, rel=1e-6)
    assert plan.simulation.fits(budget)


@FAST
@given(graph=dags_with_multi_output_ops(), fraction=st.floats(0.0, 1.0), drops=st.sets(st.integers(0, 7)))
def test_the_covering_bound_holds_against_every_schedule_of_drops(graph, fraction, drops):
    # ops with outputs released one by one: no exhaustive search models them, so weigh the bound against many
    # schedules in the class it covers (first computations in index order): every way of placing any drops
    budget = budget_between(graph, fraction)
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    dropped = tuple(v for v in sorted(drops) if v < len(graph))
    for rule, reuse, hold in VARIANTS:
        sim = simulate(graph, schedule_for_drops(graph, drops_for_variant(graph, dropped, rule, reuse, hold, small=5)))
        assert sim.valid
        if sim.fits(budget):
            assert not bound.proven_infeasible and bound.lower_bound_s <= sim.compute_s * (1 + 1e-9)


def chain_with_saved_copies(layers: int = 4, copy_bytes: int = 30, activation_bytes: int = 10):
    """A chain whose every layer also saves a large, cheap copy of its output that only its backward reads (as
    MobileNet's in-place hardtanh saves a clone of its input)."""
    deps, sizes, costs = [], [], []
    for k in range(layers):
        deps.append([2 * k - 2] if k else [])  # f_k at 2k
        sizes.append(activation_bytes)
        costs.append(1.0)
        deps.append([2 * k])  # its copy at 2k + 1
        sizes.append(copy_bytes)
        costs.append(0.25)
    loss = len(deps)
    deps.append([2 * layers - 2])
    sizes.append(1)
    costs.append(1.0)
    grad = loss
    for k in reversed(range(layers)):
        deps.append([grad, 2 * k, 2 * k + 1])
        sizes.append(activation_bytes)
        costs.append(1.0)
        grad = len(deps) - 1
    n = len(deps)
    return make_graph(deps, sizes, costs, outputs=[loss, n - 1], backward=[i > loss for i in range(n)])


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_a_copy_only_the_backward_reads_is_made_again_for_it_and_proven_optimal(fraction):
    graph = chain_with_saved_copies()
    for rule in ("first", "longest", "every"):  # the copy of f_0, read only by the last op (f_0's backward)
        assert recompute_points(graph, 1, 9, rule) == [len(graph) - 1]
    budget = budget_between(graph, fraction)
    plan = solve(graph, budget, time_limit_s=20)
    milp = solve_checkmate(graph, budget, EXACT)
    assert plan.method == "cover-round" and plan.status == OPTIMAL
    assert plan.compute_s == pytest.approx(milp.objective_s, rel=1e-6)
    assert plan.simulation.fits(budget)


def skip_concatenation():
    """A skip connection as U-Net's decoder has it: a stem s, a convolution g of it that only the concatenation
    c = cat(s, g) reads, two large layers after c, and a backward that reads c only after theirs."""
    deps = [[], [0], [0, 1], [2], [3], [4], [5, 4], [6, 3], [7, 2], [8, 0], [9]]
    sizes = [4, 4, 8, 10, 10, 1, 2, 2, 2, 2, 2]
    costs = [5.0, 3.0, 1.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    return make_graph(deps, sizes, costs, outputs=[5, 10], backward=[i > 5 for i in range(11)])


def test_an_input_brought_back_only_to_recompute_a_drop_is_held_where_it_fits():
    # The covering drops c (1 s): bringing it back for its backward reads g, whose last reader was c. Computing g
    # again costs 3 s more than the bound; holding g (4 bytes) from its stage fits, and costs the bound itself.
    graph = skip_concatenation()
    budget = 32  # store-all peaks at 35
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    assert bound.recomputed == (2,)
    dropped = Drops((2,), "first", reuse=True)
    made_again = schedule_for_drops(graph, dropped)
    sim = simulate(graph, made_again)
    assert sim.fits(budget) and sim.compute_s == pytest.approx(bound.lower_bound_s + 3)
    (_, seconds, _), kept_drops, kept = keep_what_fits(graph, budget, (made_again, sim.compute_s, sim.peak_bytes),
                                                       dropped, deadline=float("inf"))
    assert kept_drops.held == {1} and kept == {"hold": 1} and seconds == pytest.approx(bound.lower_bound_s)
    # cover-round's variant that holds every input gets there at once
    result = solve_cover_round(graph, budget, bound, SolveOptions(time_limit_s=10), repairs=0)
    assert 1 in result.detail["drops"].held and result.objective_s == pytest.approx(bound.lower_bound_s)
    # the optimum (the exact MILP, proven, in 0.1 s; brute force takes 25 s on these 11 nodes)
    exact = solve_checkmate(graph, budget, SolveOptions(time_limit_s=60, mip_gap=1e-9))
    assert exact.status == OPTIMAL and result.objective_s == pytest.approx(exact.objective_s)
    plan = solve(graph, budget, time_limit_s=20)
    assert plan.method == "cover-round" and plan.status == OPTIMAL and plan.simulation.fits(budget)


def stem_chain(layers: int = 5, large: int = 40, small: int = 4):
    """A chain of large values (a U-Net's full-resolution stem), a small tail and the loss; in the backward each
    large value is read twice a few ops apart (relu's backward and the convolution's backward)."""
    deps: list[list[int]] = [[k - 1] if k else [] for k in range(layers)]
    sizes = [large] * layers
    deps += [[layers - 1], [layers]]  # the tail, the loss
    sizes += [small, 1]
    loss = layers + 1
    deps.append([loss, layers])
    sizes.append(small)
    for k in reversed(range(layers)):
        deps.append([len(deps) - 1, k])
        deps.append([len(deps) - 1, k] + ([k - 1] if k else []))
        sizes += [small, small]
    n = len(deps)
    return make_graph(deps, sizes, [1.0] * n, outputs=[loss, n - 1], backward=[i > loss for i in range(n)])


def test_releasing_reused_values_fits_where_reuse_does_not_for_less_than_no_reuse():
    graph = stem_chain()
    dropped = tuple(range(5))  # the whole stem: bringing back its top brings back every value below it
    reused = simulate(graph, schedule_for_drops(graph, Drops(dropped, "first", reuse=True)))
    fresh = simulate(graph, schedule_for_drops(graph, Drops(dropped, "first", reuse=False)))
    budget = 164
    assert reused.peak_bytes > budget and fresh.fits(budget)
    released = release_held(graph, budget, Drops(dropped, "first", reuse=True), deadline=float("inf"))
    assert released is not None
    schedule, sim, drops = released
    let_go = drops.fresh
    assert sim == simulate(graph, schedule) and sim.valid and sim.fits(budget)
    assert reused.compute_s < sim.compute_s < fresh.compute_s  # 23 < 29 < 33: some values held, some made again
    assert let_go and let_go < set(dropped)


def test_keeping_what_fits_holds_again_a_value_released_too_eagerly():
    # Every stem value let go (made again at each of its readers: what release_held did when it let go of the
    # largest first) fits at this budget; holding one of them again fits too, once drops are undone.
    graph = stem_chain()
    budget = 128
    dropped = tuple(range(5))
    eager = Drops(dropped, "first", reuse=True, fresh=frozenset(dropped))
    schedule = schedule_for_drops(graph, eager)
    sim = simulate(graph, schedule)
    assert sim.fits(budget) and sim.compute_s == 33
    (kept_schedule, seconds, peak), kept_drops, kept = keep_what_fits(
        graph, budget, (schedule, sim.compute_s, sim.peak_bytes), eager, deadline=float("inf"))
    assert kept["reuse"] == 1 and len(kept_drops.fresh) == 4 and seconds == 21
    kept_sim = simulate(graph, kept_schedule)
    assert kept_sim.valid and kept_sim.fits(budget) and kept_sim.compute_s == seconds and kept_sim.peak_bytes == peak


def test_release_lets_go_of_the_cheapest_per_byte_first_and_only_what_the_overshoot_needs():
    # The five stem values cost the same per byte: the first two let go are enough at this budget (26 s), where
    # letting go of the largest one at a time (ties: the latest) let go of all five (33 s).
    graph = stem_chain()
    schedule, sim, released = release_held(graph, 128, Drops(tuple(range(5)), "first", reuse=True),
                                           deadline=float("inf"))
    assert released.fresh == {0, 1} and sim.fits(128) and sim.compute_s == 26
    assert simulate(graph, schedule) == sim


def test_release_passes_over_values_that_hold_no_bytes():
    # A view or an empty output brought back holds nothing: letting it go frees nothing (and it has no cost per
    # byte). A Hugging Face model's step at 80% crashed on such a value.
    graph = stem_chain()
    nodes = list(graph.nodes)
    nodes[1] = replace(nodes[1], output_bytes=0)
    graph = replace(graph, nodes=tuple(nodes))
    released = release_held(graph, 100, Drops(tuple(range(5)), "first", reuse=True), deadline=float("inf"))
    assert released is not None
    schedule, sim, drops = released
    assert sim.fits(100) and 1 not in drops.fresh and simulate(graph, schedule) == sim


@FAST
@given(graph=dags_with_multi_output_ops(), fraction=st.floats(0.0, 1.0), drops=st.sets(st.integers(0, 7)),
       reuse=st.booleans(), hold_all=st.booleans())
def test_released_schedules_are_valid_and_fit(graph, fraction, drops, reuse, hold_all):
    budget = budget_between(graph, fraction)
    dropped = tuple(v for v in sorted(drops) if v < len(graph))
    start = Drops(dropped, "first", reuse=reuse, held=frozenset(range(len(graph))) if hold_all else frozenset())
    held = simulate(graph, schedule_for_drops(graph, start))
    released = release_held(graph, budget, start, deadline=float("inf"))
    if released is not None:
        schedule, sim, drops_released = released
        assert sim.valid and sim.fits(budget) and simulate(graph, schedule) == sim
        # letting go of what is held only adds recomputation
        assert drops_released.held <= start.held and sim.compute_s >= held.compute_s * (1 - 1e-9)
        if held.fits(budget):
            assert drops_released == start
    elif not reuse and not hold_all:
        assert not held.fits(budget)  # nothing is held for later points: nothing to let go of


@FAST
@given(graph=dags_with_multi_output_ops(), drops=st.sets(st.integers(0, 7)), variant=st.sampled_from(VARIANTS),
       fresh=st.sets(st.integers(0, 7)), cap=st.floats(0.0, 1.0))
def test_rows_are_cut_short_exactly_when_they_cost_more_than_the_cap(graph, drops, variant, fresh, cap):
    # schedules_for_bound stops building a variant's rows once they cost more than a schedule that fits; pruning
    # removes none of what rows_for_drops adds, so the cut is exact
    rule, reuse, hold = variant
    dropped = tuple(v for v in sorted(drops) if v < len(graph))
    drops = replace(drops_for_variant(graph, dropped, rule, reuse, hold, small=5), fresh=frozenset(fresh))
    rows = pruned_rows_for(graph, drops)
    seconds = sum(graph.nodes[v].compute_s for row in rows for v in row)
    store_all = sum(node.compute_s for node in graph.nodes)
    max_seconds = store_all + cap * 2 * (seconds - store_all)
    assume(abs(seconds - max_seconds) > 1e-9 * seconds)  # not a tie that summing in another order may break
    capped = pruned_rows_for(graph, drops, max_seconds)
    assert capped == (rows if seconds <= max_seconds else None)


def dense_block(features: int = 3):
    """A DenseNet block: a stem x, each feature a_k a costly convolution of the concatenation before it (of x for
    the first), each concatenation c_k = cat(x, a_1, .., a_k) large and cheap. The features' last readers are
    concatenations, in the forward; each feature's backward reads its input (x or a concatenation)."""
    deps, sizes, costs = [[]], [2], [5.0]
    grown: list[int] = []
    for _ in range(features):
        deps.append([len(deps) - 1])  # a_k of x or of the concatenation before
        sizes.append(2)
        costs.append(5.0)
        grown.append(len(deps) - 1)
        deps.append([0, *grown])  # c_k
        sizes.append(2 + 2 * len(grown) + 2)
        costs.append(1.0)
    deps.append([len(deps) - 1])  # the loss
    sizes.append(1)
    costs.append(1.0)
    loss = len(deps) - 1
    for k in reversed(range(features)):  # a_k's backward reads its input
        deps.append([len(deps) - 1, 2 * k])
        sizes.append(2)
        costs.append(1.0)
    deps.append([len(deps) - 1])
    sizes.append(2)
    costs.append(1.0)
    n = len(deps)
    return make_graph(deps, sizes, costs, outputs=[loss, n - 1], backward=[i > loss for i in range(n)])


def test_a_dropped_concatenation_is_brought_back_from_its_features_held():
    # At this budget the covering drops both concatenations the backward reads (c1, c2: 1 s each). Brought back
    # there, each reads features gone since the forward's last concatenation read them: made again, they need the
    # concatenations before them, and so on down the block. Holding every input meets the bound, the optimum.
    graph = dense_block(3)
    budget = 23  # store-all peaks at 32
    exact = solve_checkmate(graph, budget, SolveOptions(time_limit_s=30))  # 0.1 s; exhaustive search takes 37 s
    assert exact.status == OPTIMAL
    optimum = exact.objective_s
    bound = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    assert bound.recomputed == (2, 4) and bound.lower_bound_s == pytest.approx(optimum)
    tried: list[dict] = []
    fits, _, _ = schedules_for_bound(graph, budget, bound, small=0, deadline=float("inf"), margin=0, tried=tried)
    by_hold = {hold: min(row["compute_s"] for row in tried if row["hold"] == hold and row["peak_bytes"] <= budget)
               for hold in (HOLD_NONE, HOLD_ALL)}
    assert by_hold[HOLD_ALL] == pytest.approx(optimum) == 30
    assert by_hold[HOLD_NONE] >= optimum + 10  # two features made again, at 5 s each, and more
    assert min(f[0] for f in fits) == pytest.approx(optimum)


def test_cover_round_tries_every_incumbent_of_the_covering_solve():
    # Near the covering optimum, incumbents of about the same seconds make very different schedules (gpt2-medium at
    # 1.1 x min: the last drops a chain of residual adds, +400%; one HiGHS found earlier makes +17%). Here the last
    # incumbent drops nothing (store-all: over the budget) and an earlier one is the covering optimum.
    graph = chain_training_graph(layers=10, activation_bytes=10)
    budget = budget_between(graph, 0.5)
    options = SolveOptions(time_limit_s=10)
    bound = covering_bound(graph, budget, options)
    assert bound.incumbents and bound.incumbents[-1] == bound.recomputed != ()
    best = solve_cover_round(graph, budget, bound, options, repairs=0)
    assert best.objective_s == pytest.approx(bound.lower_bound_s)  # a chain: the covering optimum meets the bound
    last_only = replace(bound, recomputed=(), incumbents=((),))
    assert solve_cover_round(graph, budget, last_only, options, repairs=0).status == NO_SOLUTION
    earlier_too = replace(bound, recomputed=(), incumbents=(bound.recomputed, ()))
    result = solve_cover_round(graph, budget, earlier_too, options, repairs=0)
    assert result.status == FEASIBLE and result.objective_s == pytest.approx(best.objective_s)
    assert {row["incumbent"] for row in result.detail["tried"]} == {0, 1}


def test_the_bounds_second_solve_hands_its_incumbents_to_cover_round_when_the_bound_does_not_rise(monkeypatch):
    # The planner solves the covering MILP again when its first solve was cut short. HiGHS retraces its path, and
    # an incumbent on it can make a better plan than any before, however far the bound moves (here: not at all).
    graph = chain_training_graph(layers=10, activation_bytes=10)
    budget = budget_between(graph, 0.5)
    exact = covering_bound(graph, budget, SolveOptions(time_limit_s=10))
    cut_short = "covering (dual bound at the time limit)"
    baseline = solve(graph, budget, solver="chen-sqrtn")
    assert baseline.simulation.fits(budget) and baseline.compute_s > exact.lower_bound_s * 1.01
    plan = replace(baseline, status=FEASIBLE, lower_bound_s=exact.lower_bound_s, lower_bound_method=cut_short)
    monkeypatch.setattr(planner, "covering_bound", lambda *args, **kwargs: replace(exact, method=cut_short))
    started = time.perf_counter()
    tightened = planner._tighten_bound(plan, started, started + 20, lambda message: None)
    assert tightened.method == "cover-round" and tightened.status == OPTIMAL
    assert tightened.compute_s == pytest.approx(exact.lower_bound_s) and tightened.simulation.fits(budget)
    # incumbents that cover-round turned into schedules before are not tried again (the plan returns early)
    seen = planner.Candidate("cover-round", FEASIBLE, None, None, 0.0, incumbents=exact.incumbents)
    again = planner._tighten_bound(replace(plan, candidates=(*plan.candidates, seen)), started, started + 20,
                                   lambda message: None)
    assert again.method == "chen-sqrtn" and again.status == FEASIBLE
    assert len(again.candidates) == len(plan.candidates) + 1  # no new cover-round candidate
