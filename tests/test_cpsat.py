"""Checkmate's model in CP-SAT against exhaustive search, the simulator and time limits.

OR-Tools and highspy both ship libhighs and can crash when loaded into one process, and pytest may have
imported highspy (through PuLP) for other test modules. So every CP-SAT solve runs in a child Python that
imports solvers.cpsat only, and prints its results as JSON; this process checks them with the exhaustive
search (tests/bruteforce.py, pure Python) and the simulator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from remat.graph import Graph
from remat.schedule import Schedule
from remat.simulate import simulate
from solvers import registry
from solvers.base import FEASIBLE, INFEASIBLE, NO_SOLUTION, OPTIMAL, SolveOptions
from tests.bruteforce import cheapest_schedule
from tests.graphs import chain_training_graph, eager_schedule, make_graph

ROOT = Path(__file__).resolve().parent.parent

# The child: reads a list of jobs on stdin, solves each with solve_cpsat, prints a list of results.
WORKER = r"""
import json, sys
from remat.graph import Graph
from remat.schedule import Schedule
from solvers.base import SolveOptions
from solvers.cpsat import solve_cpsat
jobs, seed = json.load(sys.stdin)
results = []
for job in jobs:
    graph = Graph.from_json(job["graph"])
    warm = Schedule.from_json(job["warm_start"]) if job.get("warm_start") else None
    options = SolveOptions(time_limit_s=job["time_limit_s"], threads=job.get("threads", 2), warm_start=warm)
    result = solve_cpsat(graph, job["budget"], options, seed=seed)
    results.append({"status": result.status, "objective_s": result.objective_s,
                    "lower_bound_s": result.lower_bound_s, "message": result.message,
                    "second_unit": result.detail.get("second_unit"),
                    "schedule": result.schedule.to_json() if result.schedule is not None else None})
print(json.dumps({"results": results, "loaded": sorted(m for m in ("pulp", "highspy") if m in sys.modules)}))
"""


def solve_in_child(jobs: list[dict], timeout_s: float = 60) -> list[dict]:
    """The jobs' results from one child process. A crash of CP-SAT itself (a signal: its parallel search can abort
    on an internal check, at random) is run again with another seed, as the registry does (solvers/registry.py);
    a Python error is a failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for seed in range(registry.CHILD_TRIES):
        completed = subprocess.run([sys.executable, "-c", WORKER], input=json.dumps([jobs, seed]),
                                   capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout_s)
        if completed.returncode >= 0:
            break
    assert completed.returncode == 0, completed.stderr[-4000:]
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    assert answer["loaded"] == [], f"solvers.cpsat pulled in {answer['loaded']}"
    assert len(answer["results"]) == len(jobs)
    return answer["results"]


def job(graph: Graph, budget: int, time_limit_s: float = 20.0, warm_start: Schedule | None = None) -> dict:
    return {"graph": graph.to_json(), "budget": budget, "time_limit_s": time_limit_s,
            "warm_start": warm_start.to_json() if warm_start is not None else None}


def random_graph(rng: random.Random, max_nodes: int = 6) -> Graph:
    """The shape of test_checkmate's small_training_graphs: each node reads up to three earlier ones, some
    values are free (0 bytes), some ops need workspace, a few outputs, some fixed memory."""
    n = rng.randint(2, max_nodes)
    deps: list[list[int]] = [[]]
    for i in range(1, n):
        count = rng.randint(0 if i > 1 else 1, min(i, 3))
        deps.append(sorted(rng.sample(range(i), count)))
    sizes = [rng.choice([0, 1, 2, 3, 5, 8, 13]) for _ in range(n)]
    costs = [round(rng.uniform(0.1, 5.0), 3) for _ in range(n)]
    outputs = sorted({n - 1} | set(rng.sample(range(n), rng.randint(0, 2))))
    graph = make_graph(deps, sizes, costs, outputs=outputs, fixed_bytes=rng.randint(0, 5))
    nodes = tuple(dataclasses.replace(node, workspace_bytes=rng.choice([0, 0, 0, 1, 4])) for node in graph.nodes)
    return dataclasses.replace(graph, nodes=nodes)


def with_two_output_ops(graph: Graph, rng: random.Random) -> Graph:
    """Some ops get two outputs that the simulator releases one by one, each read by some of the op's readers."""
    nodes = list(graph.nodes)
    for i, node in enumerate(nodes):
        readers = graph.users[i]
        if node.output_bytes >= 2 and readers and rng.random() < 0.6:
            first = rng.randint(1, node.output_bytes - 1)
            reads = [rng.choice([(0,), (1,), (0, 1)]) for _ in readers]
            part_users = tuple(tuple(u for u, r in zip(readers, reads, strict=True) if k in r) for k in range(2))
            nodes[i] = dataclasses.replace(node, part_bytes=(first, node.output_bytes - first), part_users=part_users)
    return dataclasses.replace(graph, nodes=tuple(nodes))


def check_schedule(graph: Graph, budget: int, result: dict) -> Schedule:
    """The schedule is valid, fits, and objective_s is the simulator's seconds."""
    schedule = Schedule.from_json(result["schedule"])
    sim = simulate(graph, schedule)
    assert sim.valid, sim.errors
    assert sim.peak_bytes <= budget
    assert result["objective_s"] == pytest.approx(sim.compute_s, rel=1e-12, abs=1e-12)
    if result["lower_bound_s"] is not None:
        assert result["lower_bound_s"] <= result["objective_s"] + 1e-9
    return schedule


def cases() -> list[tuple[Graph, int]]:
    """15 random graphs of at most 6 nodes, budgets spread between the trivial floor and the store-all peak."""
    rng = random.Random(20200301)
    found = []
    for index in range(15):
        graph = random_graph(rng)
        low, high = graph.min_budget_lower_bound(), simulate(graph, eager_schedule(graph)).peak_bytes
        fraction = [0.0, 0.25, 0.5, 0.75, 1.0][index % 5]
        found.append((graph, low + round(fraction * max(0, high - low))))
    return found


@pytest.mark.parametrize("outputs", ["one output each", "two outputs released one by one"])
def test_cpsat_optimum_equals_exhaustive_search(outputs):
    problems = cases()
    if outputs != "one output each":
        rng = random.Random(5)
        problems = [(with_two_output_ops(graph, rng), budget) for graph, budget in problems]
        assert any(node.part_bytes for graph, _ in problems for node in graph.nodes)
    results = solve_in_child([job(graph, budget) for graph, budget in problems])
    seen = set()
    for (graph, budget), result in zip(problems, results, strict=True):
        best = cheapest_schedule(graph, budget)
        if best is None:
            assert result["status"] == INFEASIBLE and result["schedule"] is None, result
            seen.add(INFEASIBLE)
            continue
        assert result["status"] == OPTIMAL, result
        seen.add(OPTIMAL)
        check_schedule(graph, budget, result)
        # costs are floored to whole units of max(compute_s) / 1e6: at most one unit per computation
        tolerance = len(graph) * (len(graph) + 1) / 2 * result["second_unit"] + 1e-9
        assert result["objective_s"] == pytest.approx(best.compute_s, abs=tolerance)
        assert result["lower_bound_s"] <= best.compute_s + 1e-9  # a valid bound
        assert result["lower_bound_s"] >= best.compute_s - tolerance  # and a tight one at the optimum
    assert OPTIMAL in seen


def infeasible_case() -> tuple[Graph, int]:
    """A budget at or above the trivial floor that still fits no schedule (so the solver has to prove it)."""
    rng = random.Random(7)
    while True:
        graph = random_graph(rng)
        budget = graph.min_budget_lower_bound()
        if cheapest_schedule(graph, budget) is None:
            return graph, budget


def test_infeasible_budget_and_time_limit():
    graph, budget = infeasible_case()
    chain = chain_training_graph(40)
    store_all_peak = simulate(chain, eager_schedule(chain)).peak_bytes
    half = store_all_peak // 2
    small, small_budget = cases()[2]
    best = cheapest_schedule(small, small_budget)
    assert best is not None
    jobs = [
        job(graph, budget),  # proven infeasible by the solver
        job(graph, graph.min_budget_lower_bound() - 1),  # below the trivial floor
        job(chain, half, time_limit_s=0.05),  # a tiny time limit on a large model
        job(small, small_budget, time_limit_s=0.05, warm_start=best.schedule),  # a warm start that fits
        job(small, small_budget, warm_start=Schedule.from_pairs([("compute", 1)], len(small))),  # an invalid one
    ]
    infeasible, below, limited, warm, invalid = solve_in_child(jobs)

    assert infeasible["status"] == INFEASIBLE and infeasible["schedule"] is None, infeasible
    assert below["status"] == INFEASIBLE and below["schedule"] is None

    assert limited["status"] in (FEASIBLE, NO_SOLUTION), limited
    if limited["schedule"] is not None:
        check_schedule(chain, half, limited)
    else:
        assert limited["objective_s"] is None

    assert warm["status"] in (OPTIMAL, FEASIBLE), warm
    check_schedule(small, small_budget, warm)
    assert warm["objective_s"] <= best.compute_s + 1e-9  # never worse than the warm start

    assert invalid["status"] == OPTIMAL, invalid
    check_schedule(small, small_budget, invalid)


# CP-SAT's parallel search once aborted on an internal check in CI (SIGABRT, "Check failed: ..."), on a graph
# that solves in a second every other time. The registry runs such a crash again with another seed.
CRASH = subprocess.CompletedProcess(args=[], returncode=-6, stdout="",
                                    stderr="F0000 cp_model_solver.cc:1] Check failed: SolutionIsFeasible(...)\n"
                                           "*** Check failure stack trace: ***\n")


def test_a_crashed_cpsat_run_is_run_again_with_another_seed(monkeypatch):

    graph, budget = cases()[2]
    best = cheapest_schedule(graph, budget)
    real_run = subprocess.run
    seeds = []

    def crash_first(command, **kwargs):
        seeds.append(json.loads(kwargs["input"])["seed"])
        return CRASH if len(seeds) == 1 else real_run(command, **kwargs)

    monkeypatch.setattr(registry.subprocess, "run", crash_first)
    result = registry.solve_with("cpsat", graph, budget, SolveOptions(time_limit_s=20, threads=2))
    assert seeds == [0, 1]
    assert result.status == OPTIMAL and "crashed" in result.message and "SolutionIsFeasible" in result.message
    assert simulate(graph, result.schedule).fits(budget)
    assert result.objective_s == pytest.approx(best.compute_s, abs=1e-3 * len(graph) ** 2)


def test_when_every_cpsat_run_crashes_the_plan_falls_back_and_says_why(monkeypatch):
    from remat.planner import solve

    monkeypatch.setattr(registry.subprocess, "run", lambda command, **kwargs: CRASH)
    graph = chain_training_graph(6)
    budget = simulate(graph, eager_schedule(graph)).peak_bytes * 2 // 3
    result = registry.solve_with("cpsat", graph, budget, SolveOptions(time_limit_s=5))
    assert result.status == NO_SOLUTION and result.schedule is None
    assert "crashed 2 times" in result.message and "signal 6" in result.message

    plan = solve(graph, budget, solver="cpsat", time_limit_s=5)  # a plan from the others, not an error
    assert plan.simulation.fits(budget) and plan.method != "cpsat"
    assert any(c.method == "cpsat" and "crashed" in c.message for c in plan.candidates)

    def python_error(command, **kwargs):
        return subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="ValueError: a bug of ours\n")

    monkeypatch.setattr(registry.subprocess, "run", python_error)
    with pytest.raises(RuntimeError, match="a bug of ours"):  # our own errors are never retried or hidden
        registry.solve_with("cpsat", graph, budget, SolveOptions(time_limit_s=5))


def test_the_process_start_and_the_model_build_count_against_the_time_limit():
    """CP-SAT got its whole time limit for its search, after the child process had started (Python, OR-Tools and
    remat imported: about 1 s) and built its model (0.4 s here): a 3-s limit took 4.4 s, and `remat.solve` of U-Net
    at 50% with `--solver cpsat` and 10 s ended at 11.6 s (13.3 s under load). Both count now, from when the
    registry sent the request: here a request sent 1 s before, with 3 s, leaves the search at most 2 s."""
    import time

    chain = chain_training_graph(40)  # CP-SAT proves nothing about it within seconds
    half = simulate(chain, eager_schedule(chain)).peak_bytes // 2
    request = {"graph": chain.to_json(), "budget_bytes": half, "seed": 0, "sent_at": time.time() - 1.0,
               "options": dataclasses.asdict(SolveOptions(time_limit_s=3.0, threads=2))}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run([sys.executable, "-m", "solvers.cpsat"], input=json.dumps(request), capture_output=True,
                               text=True, cwd=ROOT, env=env, timeout=60)
    assert completed.returncode == 0, completed.stderr[-2000:]
    detail = json.loads(completed.stdout)["detail"]
    assert detail["build_s"] + detail["solve_s"] <= 3.0 - 1.0, detail
