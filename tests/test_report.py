"""remat compare: every row is the simulator's verdict on that method's schedule, remat's plan never loses to
a method that fits, torch.compile's saved sets become valid schedules, and the reports carry their plots."""

import base64
import contextlib
import json
import re

import pytest

from remat.comparators import compile_budget_candidate, saved_set_plan
from remat.compare import Comparison, compare, parse_methods
from remat.report import cells, headers, memory_figure_names, notes, stage_matrix, write_reports
from remat.simulate import simulate
from remat.trace import trace_step
from solvers.baselines import RematPlan, build_schedule, first_backward_index
from tests.cli_run import remat
from tests.graphs import chain_training_graph

METHODS = ("checkmate", "store-all", "checkpoint-all", "per-block", "compile-budget-1.0", "compile-budget-0.0")
ROW_KEYS = {"method", "budget_bytes", "status", "fits", "peak_bytes", "compute_s", "overhead", "gap", "wall_s",
            "schedule_from", "max_batch", "max_batch_capped", "message"}


@pytest.fixture(scope="module")
def traced():
    return trace_step("gpt2-tiny", batch=2, seq=32, precision="fp32", device="h100")


@pytest.fixture(scope="module")
def comparison(traced) -> Comparison:
    graph = traced.graph
    store_all_peak = simulate(graph, build_schedule(graph, RematPlan())).peak_bytes
    lowest_peak = simulate(graph, build_schedule(graph, RematPlan(frozenset(range(first_backward_index(graph))))))
    budgets = [(lowest_peak.peak_bytes + store_all_peak) // 2, int(store_all_peak * 1.1)]  # some fit, some not
    return compare(traced, budgets, METHODS, time_limit_s=2)


def test_rows_agree_with_the_simulator(comparison):
    graph = comparison.graph
    assert len(comparison.rows) == len(METHODS) * len(comparison.budgets_bytes)
    for row in comparison.rows:
        schedule = comparison.schedules.get((row.method, row.budget_bytes))
        if schedule is None:
            assert row.peak_bytes is None and not row.fits and row.schedule_from == ""  # no schedule to name
            continue
        sim = simulate(graph, schedule)
        assert sim.valid, (row.method, sim.errors)
        assert row.peak_bytes == sim.peak_bytes
        assert row.compute_s == pytest.approx(sim.compute_s, rel=1e-12)
        assert row.fits == (sim.peak_bytes <= row.budget_bytes)
        # a schedule over the budget (store-all at the lower budget) says so, not the "feasible" of its builder
        assert (row.status == "over_budget") == (not row.fits)
        assert row.overhead == pytest.approx(sim.compute_s / comparison.store_all.compute_s - 1, abs=1e-12)


def test_baseline_rows_are_the_schedules_the_planner_weighs():
    # one baseline, one peak: the rows and `remat solve`'s table both free each value at its last read (Griewank
    # held values to a recomputation that did not read them: 74.7 MB here against the 66.5 MB it needs)
    from remat.planner import baseline_candidate

    traced = trace_step("gpt2-tiny")
    graph = traced.graph
    store_all_peak = simulate(graph, build_schedule(graph, RematPlan())).peak_bytes
    budgets = [store_all_peak * 6 // 10, store_all_peak * 8 // 10]
    for row in compare(traced, budgets, ("chen-sqrtn", "chen-greedy", "griewank", "per-block")).rows:
        weighed = baseline_candidate(graph, row.method, row.budget_bytes).simulation
        assert (row.peak_bytes, row.compute_s) == (weighed.peak_bytes, weighed.compute_s), row.method


def test_baselines_that_ignore_the_budget_are_built_once_across_budgets(traced, monkeypatch):
    from solvers.baselines import BASELINES

    built = []
    for name in ("checkpoint-all", "chen-greedy"):
        def counted(graph, budget_bytes, options, name=name, baseline=BASELINES[name]):
            built.append(name)
            return baseline(graph, budget_bytes, options)
        monkeypatch.setitem(BASELINES, name, counted)
    budgets = [10**8, 2 * 10**8, 3 * 10**8]
    result = compare(traced, budgets, ("checkpoint-all", "chen-greedy"))
    assert built.count("checkpoint-all") == 1 and built.count("chen-greedy") == len(budgets)  # greedy picks by budget
    rows = [row for row in result.rows if row.method == "checkpoint-all"]
    assert [row.budget_bytes for row in rows] == budgets and len({row.peak_bytes for row in rows}) == 1


def test_remat_plan_never_loses_and_never_rises(comparison):
    previous = None
    for budget in comparison.budgets_bytes:
        rows = [r for r in comparison.rows if r.budget_bytes == budget]
        plan = next(r for r in rows if r.method == "checkmate")
        assert plan.fits
        for other in rows:
            if other.fits:
                assert plan.compute_s <= other.compute_s * (1 + 1e-9), other.method
        if previous is not None:
            assert plan.compute_s <= previous * (1 + 1e-9)
        previous = plan.compute_s


def test_compile_budget_saved_sets_are_valid_schedules(traced):
    graph = traced.graph
    forward_end = first_backward_index(graph)
    for budget in (1.0, 0.0):
        candidate = compile_budget_candidate(traced.step, graph, budget)
        assert candidate.schedule is not None, candidate.message
        assert candidate.simulation.valid
        assert "not in our graph" not in candidate.message  # every saved value maps to a node (views to owners)
        counts = candidate.simulation.compute_counts
        assert all(c >= 1 for c in counts)
        recomputed = [i for i, c in enumerate(counts) if c > 1]
        assert all(i < forward_end for i in recomputed)  # only forward values are recomputed
        if budget == 0.0:  # torch saves nothing but parameters and inputs: the backward recomputes the forward
            assert recomputed
            assert "saves 0 forward values" in candidate.message


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.0])
def test_the_partition_without_recompiling_saves_what_it_saves_with(traced, budget, monkeypatch):
    """compile_budget_saved skips the partitioner's code generation (_without_recompiling): the saved set must be
    the one torch's own partition gives."""
    from remat import capture

    fast = capture.compile_budget_saved(traced.step, budget)
    monkeypatch.setattr(capture, "_without_recompiling", contextlib.nullcontext)
    assert fast and fast == capture.compile_budget_saved(traced.step, budget)


def test_saved_set_recomputes_each_value_once():
    """A chain whose saved set is only the first node: every dropped value the backward reads comes back
    exactly once (torch's backward graph holds each recomputed node once)."""
    graph = chain_training_graph(6)
    schedule = build_schedule(graph, saved_set_plan(graph, [0]))
    sim = simulate(graph, schedule)
    assert sim.valid
    assert max(sim.compute_counts) <= 2


def test_a_plan_carried_to_larger_budgets_is_named_as_the_plan_it_is(traced, monkeypatch):
    """It was relabelled with each budget it passed through ("...@35000000" at 40 MB for the 30-MB plan)."""
    import remat.compare as compare_module
    from remat.units import format_bytes

    real_solve, calls, plans = compare_module.solve, [], []

    def worse_after_the_first(graph, budget, solver, time_limit_s, known):
        calls.append(budget)  # later budgets get checkpoint-all's plan: the first budget's plan is cheaper
        plans.append(real_solve(graph, budget, solver if len(calls) == 1 else "checkpoint-all", time_limit_s,
                                known=known))
        return plans[-1]

    monkeypatch.setattr(compare_module, "solve", worse_after_the_first)
    peak = simulate(traced.graph, build_schedule(traced.graph, RematPlan())).peak_bytes
    budgets = [peak * 90 // 100, peak * 95 // 100, peak * 98 // 100]  # the minimum is about 85%
    result = compare(traced, budgets, ("checkmate",), time_limit_s=2)
    first, *later = [r for r in result.rows if r.method == "checkmate"]
    assert first.fits and "(the" not in first.schedule_from
    for row, plan in zip(later, plans[1:], strict=True):
        assert row.schedule_from == f"{first.schedule_from} (the {format_bytes(budgets[0])} plan)"
        assert row.compute_s == first.compute_s and row.wall_s > 0
        # with the gap to the bound of its own budget (it showed none)
        assert plan.lower_bound_s is not None
        assert row.gap == pytest.approx(max(0.0, 1 - plan.lower_bound_s / row.compute_s), abs=1e-12)


def test_stage_matrix_marks_first_computations_on_the_diagonal(comparison):
    graph = comparison.graph
    schedule = comparison.schedules[("checkpoint-all", comparison.budgets_bytes[0])]
    matrix = stage_matrix(graph, schedule)
    assert all(matrix[t][t] == 2 for t in range(len(graph)))
    assert sum(v == 2 for row in matrix for v in row) == len(schedule.ops) - sum(op.kind == "free"
                                                                                for op in schedule.ops)


def test_reports_are_self_contained_with_plots(comparison, tmp_path):
    written = write_reports(comparison, tmp_path / "report.html", tmp_path / "report.md")
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r"<img [^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(comparison.budgets_bytes) + 2  # memory per budget, the curve, R/S
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert "http://" not in page and "https://" not in page  # nothing fetched
    for row in comparison.rows:
        assert "".join(f"<td>{c}</td>" for c in cells(row, with_max_batch=False)) in page.replace("&#x27;", "'")
    markdown = (tmp_path / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", markdown)
    assert len(pngs) == len(images)
    for name in pngs:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert "| " + " | ".join(headers(comparison)) + " |" in markdown
    assert "max batch" not in headers(comparison)  # not asked for
    assert set(written) == {tmp_path / "report.html", tmp_path / "report.md", *(tmp_path / n for n in pngs)}


def test_budgets_that_print_alike_get_plots_of_their_own():
    names = memory_figure_names([140_000_000, 140_000_400, 16 * 10**9])
    assert [name for name, _ in names] == ["memory-140000000B", "memory-140000400B", "memory-16_00GB"]
    assert names[1][1] == "Memory over the step at 140.00 MB (140,000,400 bytes)"


def test_json_keys_are_stable(comparison):
    data = json.loads(json.dumps(comparison.to_json()))
    assert {"model", "batch", "seq", "device", "nodes", "graph_hash", "fixed_bytes", "store_all_peak_bytes",
            "store_all_s", "budgets_bytes", "methods", "rows", "wall_s"} <= set(data)
    assert all(set(row) == ROW_KEYS for row in data["rows"])


def test_methods_parse_and_unknown_ones_fail():
    assert parse_methods(["checkmate", "compile-budget", "per-block"]) == (
        "checkmate", "compile-budget-1.0", "compile-budget-0.5", "compile-budget-0.2", "compile-budget-0.0",
        "per-block")
    with pytest.raises(ValueError, match="magic"):
        parse_methods(["magic"])
    with pytest.raises(ValueError):
        parse_methods(["compile-budget-2"])


@pytest.mark.slow
def test_cli_compare_json_and_markdown(tmp_path):
    result = remat("compare", "--model", "mlp", "--batch", "256", "--budget", "150MB,0.2GB",
                   "--solvers", "store-all,checkpoint-all,compile-budget-0.5", "--md", str(tmp_path / "r.md"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["budgets_bytes"] == [150_000_000, 200_000_000]
    assert [r["method"] for r in data["rows"]] == ["store-all", "checkpoint-all", "compile-budget-0.5"] * 2
    assert (tmp_path / "r.md").is_file() and str(tmp_path / "r.md") in data["files"]


def test_cli_compare_budgets_as_shares_of_the_store_all_peak():
    result = remat("compare", "--model", "mlp", "--batch", "8", "--budget", "60%,100%", "--solvers",
                   "store-all,checkpoint-all", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    store_all = next(r for r in data["rows"] if r["method"] == "store-all")
    assert data["budgets_bytes"][1] == store_all["peak_bytes"]
    assert abs(data["budgets_bytes"][0] - 0.6 * store_all["peak_bytes"]) <= 1


def test_cli_compare_bad_solver_is_one_line():
    result = remat("compare", "--model", "mlp", "--budget", "1GB", "--solvers", "store-all,magic")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "magic" in lines[0]


def test_remat_plans_in_a_comparison_may_split_the_head(tmp_path):
    """Given the SplitTracer (as `remat compare` passes it), remat's plan at a budget below the unsplit step's
    floor runs on the split step; the row, the plots and the notes say so, and the other methods stay unsplit."""
    from remat.split_plan import SplitTracer

    tracer = SplitTracer.zoo("llama-tiny", batch=8, seq=64, precision="fp32", device="cpu")
    unsplit = tracer.unsplit.graph
    assert unsplit.min_budget_lower_bound() > 15_000_000  # the loss head alone: 16.05 MB
    result = compare(tracer, [15_000_000, 40_000_000], ("checkmate", "store-all", "checkpoint-all"), time_limit_s=3)
    assert result.graph is unsplit
    tight = next(r for r in result.rows if r.method == "checkmate" and r.budget_bytes == 15_000_000)
    assert tight.fits and "chunks" in tight.schedule_from
    runs_on = result.graph_of("checkmate", 15_000_000)
    assert runs_on.meta["split"]["chunks"] > 1
    assert simulate(runs_on, result.schedules[("checkmate", 15_000_000)]).peak_bytes == tight.peak_bytes
    assert not any(r.fits for r in result.rows if r.method != "checkmate" and r.budget_bytes == 15_000_000)
    assert any("split lm.lm_head+loss into" in note for note in notes(result))
    written = write_reports(result, tmp_path / "report.html", None)
    assert written and (tmp_path / "report.html").stat().st_size > 10_000


def test_the_memory_plot_draws_each_instruction_from_its_start():
    """Drawn from each op's end, an op's output and workspace showed over the next op's time."""
    from remat.report import memory_steps
    from remat.simulate import simulate
    from tests.graphs import eager_schedule, make_graph

    graph = make_graph([[], [0], [1]], [4, 8, 2], [1.0, 2.0, 3.0], outputs=[2])
    schedule = eager_schedule(graph)
    simulation = simulate(graph, schedule)
    times, memory = memory_steps(graph, schedule, simulation)
    computes = [i for i, op in enumerate(schedule.ops) if op.kind == "compute"]
    assert times[0] == 0.0 and times[-1] == graph.compute_s
    assert [times[i] for i in computes] == [0.0, 1.0, 3.0]  # each op starts when the one before ends
    assert memory[:-1] == list(simulation.timeline_bytes) and len(times) == len(memory)


def test_a_largest_batch_at_the_search_cap_is_marked_as_a_floor(comparison):
    # compare --max-batch showed 65536 where remat maxbatch shows 65536+ (the search stops at its cap)
    import dataclasses

    row = dataclasses.replace(comparison.rows[0], max_batch=65536, max_batch_capped=True)
    assert "65536+" in cells(row) and row.to_json()["max_batch_capped"] is True
    assert "65536" in cells(dataclasses.replace(row, max_batch_capped=False))
