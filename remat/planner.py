"""Graph + budget -> the best schedule we can find, judged by the simulator.

The orchestration around the solvers (`solve`, then `_plan`, in this order): the baselines and torch's choices
given; the covering lower bound and cover-round's schedules from its solutions; the decomposition for repeated
blocks; the MILP (whole up to MAX_WHOLE_NODES, else coarsened) or lp-round / cpsat by name; the covering bound solved
again where it was cut short; the annealing searches over drops and over Checkmate's rows where a gap is left; the
bound focused on the plans' recomputations; the MILP polish of windows given the time. Every schedule is simulated,
and the cheapest that fits is returned with every candidate's figures. No torch here.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from remat.graph import Graph
from remat.schedule import Schedule, tighten_frees
from remat.simulate import Simulation, simulate
from remat.units import format_seconds, is_share, parse_size
from solvers.anneal import Space, anneal_at_once, score
from solvers.base import (
    FEASIBLE,
    INFEASIBLE,
    NO_SOLUTION,
    OPTIMAL,
    SolveOptions,
    SolverResult,
    meets_bound,
    overhead_of,
    relative_gap,
)
from solvers.baselines import BASELINES, BUDGET_FREE_BASELINES, checkpoint_all
from solvers.bounds import PAIRS_MAX_NODES, covering_bound, recomputed_again
from solvers.checkmate import unbuildable_in
from solvers.coarsen import Coarsening, coarsen, contiguous_groups
from solvers.cover_round import MAX_REPAIRS, Drops, incumbents_of, solve_cover_round
from solvers.decompose import decompose_applies
from solvers.drop_search import SPACE as DROPS
from solvers.peak_bound import backward_walk, walk_schedule
from solvers.registry import SOLVER_NAMES, solve_with
from solvers.rows_search import SPACE as ROWS
from solvers.rows_search import rows_of
from solvers.stage_memory import freed_by, node_parts
from solvers.window import MIN_WINDOW_S, polish_windows

MAX_EXACT_NODES = 100  # the first coarse level's size; graphs above it try the decomposition first
MAX_WHOLE_NODES = 100  # the MILP takes graphs up to this size whole. VGG16 (155 nodes) whole: +1.8% at 90% in one
#                        run, but no better than chen-greedy and 65 s for a 30 s limit (build and min-peak) in another
WHOLE_MILP_SHARE = 0.4  # of the time left, for the MILP on a whole graph (auto): what it does not prove by then goes
#                         to the searches and the MILP polish. Near the smallest budgets the MILP's 30-s plans are
#                         poor (a 32-layer chain's step at 90 B: 104 s, then 94 s; a 54-node U-Net at 1.1 x min:
#                         +57.7%, then +43.3%); what it proves at once it still proves
WALK_SHARE = 0.5  # of the time left, at most, for the walk back from the step's end (solvers/peak_bound.py) on a whole
#                   graph whose baselines peak over the node floor. On 24 to 50-node set-to-none and accumulate steps it
#                   reaches the empty set in under 0.05 s (the lowest peak, and a schedule at it), or stops at once
#                   where its bound meets the lowest peak found; else at MAX_SETS sets (1 s on a 95-node MLP's step)
LARGE_WALK_MAX_SETS = 800_000  # the walk's cap on graphs over MAX_WHOLE_NODES, in place of MAX_SETS: a ResNet-50
#                                set-to-none step at batch 2 (521 nodes) reaches the empty set after 200k to 400k sets
#                                (3 s; 620k sets, 5 to 8 s and 258 MB of host memory before the walk's step through
#                                runs that read only needed parts) at the lowest peak, 3.6% under any other plan's
LARGE_WALK_PROBE_SETS = 20_000  # ... but first this many (0.2 s), and on only where its bound has risen over the node
#                                 floor by then: on ResNet-50 and U-Net steps it has, and it reaches the empty set; on
#                                 MobileNet-v2 and VGG16 steps it stays at the floor through 800k sets (11 s of a 30-s
#                                 plan for nothing: their bound is the floor still at 5 s, searched without a cap)
MIN_STAGE_S = 0.5  # the least time a solver stage gets once the deadline is near or past (then it keeps its warm start)
BOUND_SHARE = 1 / 6  # of the time limit, at most BOUND_MAX_S, for the covering lower bound (up to MAX_REPAIR_NODES)
BOUND_MAX_S = 20.0  # gpt2-medium (90 s a chunk count) gets 15 s: its covering MILP (so cover-round) improves to ~15 s
LARGE_BOUND_SHARE = 0.8  # in place of BOUND_SHARE on graphs past MAX_REPAIR_NODES. There cover-round's plan from a
#                          covering solved to its end beats the decomposition's, which gets the time left, and a
#                          covering cut short is time lost: solved again, it starts over. 60 s (30 s for DenseNet-121),
#                          1/6 -> 0.5 -> 0.8: GPT-2 large at 70% +8.25% (gap 7.6%) -> +4.93% (0.0002%) -> the same;
#                          at 50% +19.6% (16.4%) -> the same -> +15.7% (0.07%); GPT-2 XL at 70% +9.6% (8.8%) -> +7.1%
#                          (6.6%) -> +7.5% (7.0%); DenseNet-121 at 90% proven optimal (22 s, its covering solved again)
#                          -> gap 0.01% (cut short at 10 s, 10.7 s needed, then again at 14 s) -> proven in 17.8 s.
#                          Nor is it held to BOUND_MAX_S there: GPT-2 XL at 50%, 180 s, decompose's +18.3% (gap
#                          15.5%), both coverings cut short at 20 s; with 60 s, cover-round's +14.2% (0.001%) in 133 s
MAX_REPAIR_NODES = 600  # larger graphs get one schedule from the bound, no covering re-solves (GPT-2's are seconds
#                         each, and its blocks' plans come from the decomposition), the default MILP gap, and
#                         LARGE_BOUND_SHARE of the time for their covering
EXACT_BOUND_GAP = 1e-9  # the covering MILP's relative gap on graphs up to MAX_REPAIR_NODES
TIGHTEN_MIN_S = 2.0  # the least time left worth solving a cut-short covering bound again
TIGHTEN_SHARE = 0.8  # of the time left, for that solve; the rest covers cover-round on its new incumbents (gpt2-medium:
#                     eight variants of a cascading incumbent take 1 to 2 s) and what overruns (0.9 ended 2.5 s late)
FOCUS_SHARE = 0.2  # of the time after the bound and its plans, for _focus_bound, after the search: cut short, its
#                   dual bound still rises (ResNet-50 at 1.1 x min: +20.97% -> +21.26% in 5 s, +21.37% solved)
FOCUS_CROWDED_MOMENTS = 4  # the most crowded moments chained in that solve, besides the plans' (12 in the first): at
#                            1.1 x min, solved to the end, U-Net +24.97% in 4.6 s (12: the same in 13.7 s; 2: +23.73%),
#                            ResNet-50 +21.37% in 8.5 s (24.2 s), MobileNet-v2 +22.11% in 1.3 s (2.1 s)
SEARCH_MIN_GAP = 1e-3  # a plan further than this from its bound is searched (drops, then rows)
SEARCH_MIN_S = 1.0  # the least time left worth that search
MAX_SEARCH_NODES = 600  # larger graphs (GPT-2's, gaps under 1.2%) take tens of ms a move: no search, unless
LARGE_GAP = 0.2  # the plan is this far from its bound: DenseNet-121 at 1.1 x min (1,707 nodes, 76 ms a move) went
#                  from cover-round's +568% (gap 82%) to +262% in 30 s of drop-search. Its bound solved again then
LARGE_GAP_TIGHTEN_SHARE = 0.4  # gets this share of the time left, not all of it: the search gets the rest
SEARCH_ROUNDS = 8  # rounds of anneals at most in a space, each from the best so far, while the time left fits one
DROP_SHARE = 0.5  # of the search's time, for drops; rows get the rest. benchmarks/search_settings.py, 30 s plans,
#                   means of 2: U-Net 1.1 x min +34.5% (drops only +39.7%, rows only +37.3%); U-Net 50% +14.1%
#                   (drops only +14.4%, rows only +16.0%)
MAX_ROWS_NODES = 300  # larger graphs give drops the whole search: on MobileNet-v2 (508 nodes) and ResNet-50 (520)
#                       at 1.1 x min no rows anneal ever beat its start, and MobileNet's drops need the whole 30 s
#                       (drops only +27.2%, both runs; half each: +31.3%, nothing found in four runs)
MAX_ANNEALS_AT_ONCE = 8  # anneals side by side in a round: one per core, up to this many
LP_ROUND_SHARE = 0.1  # of the time left, for lp-round on a whole graph where no schedule found so far fits
MAX_POLISH_NODES = 300  # the whole-graph MILP polishes plans of graphs up to this size, when the time left covers it
WINDOW_SHARE = 0.4  # of the time after the bound, for window polish (solvers/window.py) where the whole-graph MILP
#                     cannot polish; the search gets the rest. Only with WINDOW_MIN_LEFT_S or more left: a window
#                     that improves on ResNet-50 or MobileNet-v2 at 1.1 x min takes 20 to 50 s, and with 30 s plans
#                     the share cost the search more than the windows found (benchmarks/search_settings.py)
WINDOW_MIN_LEFT_S = 60.0
SEARCHED_MILP_SHARE = 0.25  # of the time left after cover-round, for the decomposition and the coarsened MILPs on a
#                            graph the searches take, when cover-round's plan fits: there the searches from its drops
#                            find the plans (Hugging Face's Whisper at 80%, 272 nodes, 30 s: the coarsened MILPs took
#                            all of it for +20.25%, where the searches reach +17.67%)
POLISH_S_PER_FREE = 2e-3  # seconds the MILP wants per FREE variable to improve on its warm start: U-Net (215 nodes,
#                           64k): build 6 s, presolve 56 s, +13.8% -> +12.9% by 120 s at 50% (2 cores)


@dataclass(frozen=True)
class Candidate:
    """One method's schedule for the graph, with the simulator's verdict."""

    method: str
    status: str
    schedule: Schedule | None
    simulation: Simulation | None
    wall_s: float
    message: str = ""
    drops: Drops | None = None  # what the schedule drops, when it comes from cover-round or drop-search
    incumbents: tuple[tuple[int, ...], ...] = ()  # the covering incumbents cover-round turned into schedules

    def fits(self, budget_bytes: int) -> bool:
        return self.simulation is not None and self.simulation.fits(budget_bytes)


@dataclass(frozen=True)
class Plan:
    graph: Graph
    budget_bytes: int
    method: str  # the method whose schedule this is ("" where none fits)
    status: str  # optimal, feasible, infeasible (proven: no schedule fits) or no_solution (none found in time)
    schedule: Schedule | None
    simulation: Simulation | None
    lower_bound_s: float | None  # valid lower bound on the optimal seconds for this budget
    store_all: Simulation
    min_feasible_bytes: int | None  # the lowest peak any schedule we found reaches
    min_budget_lower_bound_bytes: int  # no schedule can go below this (min_budget_lower_bound_why says why)
    wall_s: float
    message: str = ""
    coarse_nodes: int | None = None  # nodes the MILP saw when the graph was coarsened
    candidates: tuple[Candidate, ...] = field(default=())
    # what proves lower_bound_s, in words: "milp", "covering" (with how it was solved: "covering (dual bound ...)"),
    # "store-all", "every node once", ... (solvers/bounds.py, _plan, split_plan's "of the unsplit step ...")
    lower_bound_method: str = ""
    picked: str = ""  # which solver `auto` (or the name given) ran, and why

    @property
    def compute_s(self) -> float | None:
        return self.simulation.compute_s if self.simulation else None

    @property
    def overhead(self) -> float | None:
        return overhead_of(self.compute_s, self.store_all.compute_s)

    @property
    def gap(self) -> float | None:
        return relative_gap(self.compute_s, self.lower_bound_s)

    @property
    def min_feasible_proven(self) -> bool:
        """Whether min_feasible_bytes is the minimum budget, not only the lowest peak found in the time: it is the
        single-op floor, or the min-peak MILP on the whole graph proved it."""
        lowest = self.min_feasible_bytes
        return lowest is not None and (lowest == self.min_budget_lower_bound_bytes
                                       or _proven_min_peak(self.candidates, self.coarse_nodes) == lowest)

    @property
    def min_budget_lower_bound_why(self) -> str:
        """What proves min_budget_lower_bound_bytes, in words."""
        if self.min_budget_lower_bound_bytes > self.graph.min_budget_lower_bound():
            return "what every schedule holds at some moment before the step's last op (the walk back from its end)"
        return "fixed memory + the largest single op's working set"

    def to_json(self) -> dict:
        """The plan file: enough to check it fits a graph and to run it."""
        return {
            "format": "remat-plan",
            "version": 1,
            "graph_hash": self.graph.content_hash,
            "graph_meta": self.graph.meta,
            "budget_bytes": self.budget_bytes,
            "method": self.method,
            "status": self.status,
            "peak_bytes": self.simulation.peak_bytes if self.simulation else None,
            "compute_s": self.compute_s,
            "schedule": self.schedule.to_json() if self.schedule else None,
        }

    def save(self, path: str | Path) -> None:
        """Write the plan file that `remat.apply(model, plan=path)` runs."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1))


def check_time_limit(seconds: object, name: str) -> None:
    """A time limit is seconds, 0 or more: "2" failed deep in the planner, and -1 and nan were taken."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{name} is seconds, 0 or more, not {seconds!r}")


def budget_of(graph: Graph, budget: int | float | str) -> int:
    """Bytes of a budget: a number of bytes, a size ("16GB", "16GiB"), or a share of the graph's store-all peak
    ("60%"). A negative, infinite or unreadable one: ValueError (0 bytes is a budget: what a graph holding nothing
    needs)."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if not math.isfinite(budget) or budget < 0:
            raise ValueError(f"a budget is a number of bytes, 0 or more, not {budget!r}")
        if 0 < budget < 1:  # remat.solve(graph, 0.6) planned for 0 bytes: most likely a share meant as "60%"
            raise ValueError(f"a budget of {budget!r} is less than a byte: a number is bytes; write \"60%\" for a "
                             "share of the store-all peak")
        return int(budget)
    if is_share(budget):
        return parse_size(budget, reference_bytes=store_all_simulation(graph).peak_bytes)
    return parse_size(budget)


def store_all_simulation(graph: Graph) -> Simulation:
    """Store-all's step: every value computed once and kept to its last read (the reference of overheads and
    shares)."""
    return simulate(graph, BASELINES["store-all"](graph, 0, SolveOptions()).schedule)


def solve(graph: Graph, budget_bytes: int | str, solver: str = "auto", time_limit_s: float = 60.0,
          backend: str = "highs", progress: Callable[[str], None] | None = None,
          known: Sequence[Candidate] = (), beaten_at_s: float | None = None) -> Plan:
    """The cheapest schedule of `graph` whose simulated peak fits `budget_bytes` (bytes, or a size or share as
    budget_of reads it: "16GB", "60%").

    `known`: schedules found earlier for this graph (a smaller budget's plan, say), weighed like the baselines.
    One named after a baseline stands in for that baseline, which is then not built again: it must be that
    baseline's schedule of this graph at this budget (`baseline_candidate`).
    `beaten_at_s`: the seconds of a plan found elsewhere (another chunk count's): once the lower bound shows no
    schedule of this graph costs less, the solve stops with what it has (`Plan.picked` says so).
    Every stage draws on one deadline, `time_limit_s` from now: when it is near or past, the stages still to
    come get MIN_STAGE_S each (a MILP then keeps its warm start; a finer coarse level is skipped; past it, with a
    plan that fits, no MILP is started, nor one whose model HiGHS could not run in its time), and the best plan
    found so far is returned with its bound. Building a MILP is not interruptible: that is the overrun.
    Time the plan leaves goes to its lower bound when that was cut short (_tighten_bound).
    """
    if solver not in SOLVER_NAMES:
        raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVER_NAMES)}")
    check_time_limit(time_limit_s, "time_limit_s")
    budget_bytes = budget_of(graph, budget_bytes)  # "16GB" failed deep in the planner with a TypeError
    from solvers.checkmate import available_backends, backend_available  # pulp and highspy: only when needed

    if solver not in BASELINES and not backend_available(backend):  # auto would go on without its MILPs, unsaid
        raise ValueError(f"MILP back-end {backend!r} is not available here; available: "
                         f"{', '.join(available_backends()) or 'none'}")
    started = time.perf_counter()
    say = progress or (lambda message: None)
    plan = _plan(graph, budget_bytes, solver, time_limit_s, backend, say, known, started, beaten_at_s)
    if _beaten(plan.lower_bound_s, beaten_at_s):
        return plan
    deadline = started + time_limit_s
    tighten_until = deadline
    if solver == "auto" and _leaves_time_to_search(plan):  # the search needs time after the bound's
        tighten_until = time.perf_counter() + LARGE_GAP_TIGHTEN_SHARE * max(0.0, deadline - time.perf_counter())
    plan = _tighten_bound(plan, started, tighten_until, say)
    if solver != "auto":
        return plan
    if _beaten(plan.lower_bound_s, beaten_at_s):  # the bound solved again shows the other plan is as cheap
        return replace(plan, picked=f"{plan.picked}; stopped at the lower bound solved again: beaten by a plan "
                       "found elsewhere")
    # kept for the MILP polish, when the time left covers it (large graphs never polish: no estimate needed). The
    # decision is made here, once: the search may overrun its deadline by a little (its child anneals, the last
    # simulation), and the polish then runs on what is left rather than not at all.
    reserve = polish_seconds(graph) if len(graph) <= MAX_POLISH_NODES else 0.0
    if deadline - time.perf_counter() < reserve:
        reserve = 0.0
    left = deadline - time.perf_counter()
    by_windows = not reserve and len(graph) <= MAX_SEARCH_NODES and left >= WINDOW_MIN_LEFT_S
    windows = WINDOW_SHARE * left if by_windows else 0.0
    searched_by = deadline - reserve - windows  # the search's and the focused bound's time
    focus = FOCUS_SHARE * max(0.0, searched_by - time.perf_counter()) if _focuses(plan) else 0.0
    plan = _search(plan, started, searched_by - focus, say)
    if focus:
        plan = _focus_bound(plan, started, searched_by, say)
    if reserve:
        return _polish(plan, started, deadline, backend, say)
    return _polish_windows(plan, started, deadline, backend, say) if windows else plan


def polish_seconds(graph: Graph) -> float:
    """About how long the whole-graph MILP needs to improve on a good warm start: it grows with its FREE variables
    (the parts each node's run may free, in every stage from that node on)."""
    freed = freed_by(graph, node_parts(graph))
    return POLISH_S_PER_FREE * sum(len(freed[k]) * (len(graph) - k) for k in range(len(graph)))


def _covering_gap(graph: Graph) -> float:
    """The covering MILP's relative gap: on graphs whose covering MILP takes seconds it is solved to its optimum
    (not within the default 0.01%): its solution is the cover-round plan, which then meets the bound exactly when
    it is optimal."""
    return SolveOptions().mip_gap if len(graph) > MAX_REPAIR_NODES else EXACT_BOUND_GAP


def _within_covering_gap(graph: Graph, seconds: float, lower_bound_s: float | None) -> bool:
    """Whether a plan of `seconds` is as close to the covering bound as the covering MILP itself was asked to get:
    on graphs over MAX_REPAIR_NODES it stops within a relative gap of its objective (the recomputation's seconds),
    so no other plan can be cheaper by more than that share of the recomputation, and searching on is wasted (GPT-2
    XL at 70%, 180 s: cover-round's +4.98% at a gap of 0.0002% of the step, then 42 s of decomposition for
    nothing). Such a plan stays `feasible`, with its gap."""
    if lower_bound_s is None:
        return False
    extra_s = seconds - graph.compute_s
    return extra_s > 0 and seconds - lower_bound_s <= _covering_gap(graph) * extra_s


def _tighten_bound(plan: Plan, started: float, deadline: float, say: Callable[[str], None]) -> Plan:
    """When the covering bound was cut short by its share of the time (its dual bound at the time limit, or its
    LP relaxation) and the plan leaves time, solve the covering MILP again with that time: a bound that rises
    narrows the gap, and the drops of its incumbents give more cover-round plans (HiGHS's path to the covering
    optimum passes solutions that make better schedules than its end: gpt2-medium at 1.1 x min); a plan that
    meets the bound is proven optimal. Either bound is valid; the higher is kept."""
    left = deadline - time.perf_counter()
    if (plan.status != FEASIBLE or plan.lower_bound_s is None or plan.compute_s is None or left < TIGHTEN_MIN_S
            or not plan.lower_bound_method.startswith("covering (")):
        return plan
    say(f"lower bound again, with the {left:.0f} s left")
    covering = covering_bound(plan.graph, plan.budget_bytes,
                              SolveOptions(time_limit_s=TIGHTEN_SHARE * left, mip_gap=_covering_gap(plan.graph)))
    # HiGHS retraces its path: the incumbents the first solve found too were turned into schedules already
    tried = {drops for candidate in plan.candidates for drops in candidate.incumbents}
    new = tuple(drops for drops in incumbents_of(covering)[::-1] if drops not in tried)
    if new:  # more cover-round plans
        result = solve_cover_round(plan.graph, plan.budget_bytes, replace(covering, incumbents=new, recomputed=None),
                                   SolveOptions(time_limit_s=max(MIN_STAGE_S, deadline - time.perf_counter())),
                                   repairs=0)
        covered = _candidate(plan.graph, "cover-round", result, result.schedule)
        plan = _adopt(plan, covered, started, "cover-round on the lower bound solved again")
    lower_bound_s, method = plan.lower_bound_s, plan.lower_bound_method
    if covering.lower_bound_s is not None and covering.lower_bound_s > lower_bound_s:
        lower_bound_s, method = min(covering.lower_bound_s, plan.compute_s), covering.method
    status = OPTIMAL if meets_bound(plan.compute_s, lower_bound_s) else FEASIBLE
    return replace(plan, lower_bound_s=lower_bound_s, status=status, wall_s=time.perf_counter() - started,
                   lower_bound_method=method)


def _focuses(plan: Plan) -> bool:
    """Whether _focus_bound may raise the plan's bound: a covering bound with a gap, on a graph small enough for
    its pairs of moments."""
    return (plan.status == FEASIBLE and plan.gap is not None and plan.gap > SEARCH_MIN_GAP
            and plan.schedule is not None and len(plan.graph) <= PAIRS_MAX_NODES
            and plan.lower_bound_method.startswith("covering"))


def _focus_bound(plan: Plan, started: float, deadline: float, say: Callable[[str], None]) -> Plan:
    """Where the plan or a cover-round schedule computes a value three times or more, solve the covering bound again
    until the deadline, with moments between two of those computations chained too (solvers/bounds.py's `focus`):
    its pairs of moments then count a value brought back, let go and brought back again, which the moments where the
    forward turns into the backward do not show. At 1.1 x min, solved to the end: ResNet-50 +20.97% -> +21.37%,
    U-Net +23.24% -> +24.97%, MobileNet-v2 +21.52% -> +22.11%. The dual bound of a solve cut short is a bound too;
    the higher bound is kept."""
    left = deadline - time.perf_counter()
    if not _focuses(plan) or left < TIGHTEN_MIN_S:
        return plan
    schedules = [plan.schedule] + [c.schedule for c in plan.candidates
                                   if c.method == "cover-round" and c.schedule is not None]
    stretches = recomputed_again(plan.graph, schedules)
    if not stretches:
        return plan
    say(f"lower bound again, with moments where plans bring values back a third time ({left:.0f} s)")
    covering = covering_bound(plan.graph, plan.budget_bytes,
                              SolveOptions(time_limit_s=left, mip_gap=_covering_gap(plan.graph)),
                              chained_moments=FOCUS_CROWDED_MOMENTS, focus=stretches)
    plan = replace(plan, wall_s=time.perf_counter() - started)
    if covering.lower_bound_s is None or covering.lower_bound_s <= plan.lower_bound_s:
        return plan
    lower_bound_s = min(covering.lower_bound_s, plan.compute_s)
    status = OPTIMAL if meets_bound(plan.compute_s, lower_bound_s) else FEASIBLE
    return replace(plan, lower_bound_s=lower_bound_s, status=status,
                   lower_bound_method=f"{covering.method}, focused on plans' recomputations")


def _leaves_time_to_search(plan: Plan) -> bool:
    """A plan LARGE_GAP or more from its bound, which the search takes: the bound solved again gets only
    LARGE_GAP_TIGHTEN_SHARE of the time left (a 20-layer chain's step at 50 B: it took all 13 s after the MILP)."""
    return (plan.gap is not None and plan.gap >= LARGE_GAP
            and (len(plan.graph) <= MAX_SEARCH_NODES or _searched_for_its_gap(plan)))


def _searched_for_its_gap(plan: Plan) -> bool:
    """A graph past MAX_SEARCH_NODES whose plan is LARGE_GAP or more from its bound, with drops to search from."""
    return (len(plan.graph) > MAX_SEARCH_NODES and plan.gap is not None and plan.gap >= LARGE_GAP
            and any(c.drops is not None for c in plan.candidates))


def _search(plan: Plan, started: float, deadline: float, say: Callable[[str], None]) -> Plan:
    """When the plan is further than SEARCH_MIN_GAP from its bound and time is left, anneal (solvers/anneal.py):
    first over drops, from those of the best cover-round schedule (solvers/drop_search.py), for DROP_SHARE of the
    time left; then over Checkmate's rows, from the plan's schedule by then (solvers/rows_search.py), until the
    deadline. Rows reach the schedules that recompute a value more than once, which drops cannot; drops move
    faster to a good start. A cheaper schedule that fits is the plan, proven optimal when it meets the bound.
    Graphs up to MAX_SEARCH_NODES, and larger ones whose plan is LARGE_GAP or more from its bound
    (_searched_for_its_gap); over MAX_ROWS_NODES, drops get all the time."""
    if len(plan.graph) > MAX_SEARCH_NODES and not _searched_for_its_gap(plan):
        return plan
    rows_too = len(plan.graph) <= MAX_ROWS_NODES
    starts = [c for c in plan.candidates if c.drops is not None]
    if starts:  # the start: the cover-round schedule with the best score (seconds, weighed up by any overshoot)
        start = min(starts, key=lambda c: score(c.simulation, plan.budget_bytes) if c.simulation else math.inf)
        share = DROP_SHARE if rows_too else 1.0
        drops_deadline = time.perf_counter() + share * max(0.0, deadline - time.perf_counter())
        plan = _anneal_rounds(plan, DROPS, start.drops, "cover-round's drops", started, drops_deadline, say)
    if not rows_too:
        return plan
    try:
        rows = rows_of(plan.schedule) if plan.schedule is not None else None
    except ValueError:  # not frontier-advancing: no rows to start from
        rows = None
    if rows is None:
        return plan
    return _anneal_rounds(plan, ROWS, rows, f"{plan.method}'s rows", started, deadline, say)


def _anneal_rounds(plan: Plan, space: Space, start: object, start_name: str, started: float, deadline: float,
                   say: Callable[[str], None]) -> Plan:
    """Anneal in `space` from `start` while the plan has a gap and SEARCH_MIN_S are left before `deadline`. A round
    runs one anneal per core (anneals_at_once), each with its own seed, and keeps the best (runs differ by several
    percent); an anneal ends after its moves or at the deadline. While SEARCH_MIN_S are left (up to SEARCH_ROUNDS
    rounds), another round starts from the best point so far, cooling over its moves or the time left."""
    searching = time.perf_counter()
    left = deadline - searching
    if plan.status != FEASIBLE or plan.gap is None or plan.gap <= SEARCH_MIN_GAP or left < SEARCH_MIN_S:
        return plan
    point, best, rounds, anneals, at_once = start, None, 0, 0, anneals_at_once()
    while True:
        say(f"{space.method} from {start_name if best is None else 'the best so far'}, {at_once} anneal(s) at once "
            f"({left:.0f} s)")
        result = anneal_at_once(space, plan.graph, plan.budget_bytes, point, SolveOptions(time_limit_s=left),
                                lower_bound_s=plan.lower_bound_s, seeds=range(anneals, anneals + at_once))
        rounds += 1
        anneals += result.detail["anneals"]
        if result.schedule is not None and (best is None or result.objective_s < best.objective_s):
            best, point = result, result.detail["best"]
        left = deadline - time.perf_counter()
        if result.status == OPTIMAL or rounds >= SEARCH_ROUNDS or left < SEARCH_MIN_S:
            break
    result = best or result
    message = f"annealed {start_name}: {result.message}"
    if anneals > 1:
        message += f" (the best of {anneals} anneals, {at_once} at once)"
    result = replace(result, message=message, wall_s=time.perf_counter() - searching)  # every round's time
    searched = _candidate(plan.graph, space.method, result, result.schedule)
    return _adopt(plan, searched, started, f"{space.method} from {start_name}")


def _adopt(plan: Plan, candidate: Candidate, started: float, how: str) -> Plan:
    """The plan with `candidate` among its candidates, and as its schedule when it fits and is cheaper (proven
    optimal when it meets the bound). `how`: what the plan's `picked` says was done next."""
    plan = replace(plan, candidates=(*plan.candidates, candidate), wall_s=time.perf_counter() - started)
    if not candidate.fits(plan.budget_bytes) or candidate.simulation.compute_s >= plan.compute_s:
        return plan
    status = OPTIMAL if meets_bound(candidate.simulation.compute_s, plan.lower_bound_s) else FEASIBLE
    return replace(plan, method=candidate.method, status=status, schedule=candidate.schedule,
                   simulation=candidate.simulation, message=f"{candidate.message}; {plan.method} gave "
                   f"{format_seconds(plan.compute_s)}", picked=f"{plan.picked}; then {how}")


def anneals_at_once() -> int:
    """One anneal per core this process may run on, up to MAX_ANNEALS_AT_ONCE."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_ANNEALS_AT_ONCE))


def _polish(plan: Plan, started: float, deadline: float, backend: str, say: Callable[[str], None]) -> Plan:
    """When the plan is further than SEARCH_MIN_GAP from its bound and at least SEARCH_MIN_S are left, solve
    Checkmate's MILP on the whole graph (up to MAX_POLISH_NODES nodes) warm-started from the plan, until the deadline:
    its accounting is the simulator's (solvers/stage_memory.py), so the plan is its incumbent and anything it
    returns is at least as cheap. Its dual bound raises the plan's bound when it is higher. solve calls it when
    it could keep polish_seconds for it."""
    left = deadline - time.perf_counter()
    if (plan.status != FEASIBLE or plan.gap is None or plan.gap <= SEARCH_MIN_GAP or len(plan.graph) > MAX_POLISH_NODES
            or left < SEARCH_MIN_S):
        return plan
    say(f"the MILP on the whole graph ({len(plan.graph)} nodes), warm-started from the plan ({left:.0f} s)")
    result = solve_with("checkmate", plan.graph, plan.budget_bytes,
                        SolveOptions(time_limit_s=left, warm_start=plan.schedule, backend=backend))
    polished = _candidate(plan.graph, "milp-polish", result, result.schedule)
    lower_bound_s, bound_method = plan.lower_bound_s, plan.lower_bound_method
    if result.lower_bound_s is not None and result.lower_bound_s > lower_bound_s:
        lower_bound_s, bound_method = result.lower_bound_s, "milp"
    plan = _adopt(plan, polished, started, "the whole-graph MILP warm-started from it")
    proven = result.status == OPTIMAL or meets_bound(plan.compute_s, lower_bound_s)
    return replace(plan, status=OPTIMAL if proven else FEASIBLE, lower_bound_s=min(lower_bound_s, plan.compute_s),
                   lower_bound_method=bound_method)


def _polish_windows(plan: Plan, started: float, deadline: float, backend: str, say: Callable[[str], None]) -> Plan:
    """When the plan is further than SEARCH_MIN_GAP from its bound and time is left, solve Checkmate's MILP on
    windows of its stages in turn, the rest held (solvers/window.py), until the deadline: for graphs the MILP
    cannot take whole. Never worse than the plan; never proves it optimal."""
    left = deadline - time.perf_counter()
    if (plan.status != FEASIBLE or plan.gap is None or plan.gap <= SEARCH_MIN_GAP or plan.schedule is None
            or left < MIN_WINDOW_S):
        return plan
    say(f"the MILP on windows of the plan's stages ({left:.0f} s)")
    try:
        result = polish_windows(plan.graph, plan.budget_bytes, plan.schedule, SolveOptions(backend=backend),
                                deadline, say=say)
    except ValueError:  # not frontier-advancing: no stages to solve again
        return plan
    polished = _candidate(plan.graph, result.solver, result, result.schedule)
    return _adopt(plan, polished, started, "the MILP on windows of its stages")


def _beaten(lower_bound_s: float | None, beaten_at_s: float | None) -> bool:
    """No schedule can cost less than the plan found elsewhere (ties go to that plan: fewer chunks)."""
    return lower_bound_s is not None and beaten_at_s is not None and lower_bound_s >= beaten_at_s


def _plan(graph: Graph, budget_bytes: int, solver: str, time_limit_s: float, backend: str,
          say: Callable[[str], None], known: Sequence[Candidate], started: float,
          beaten_at_s: float | None = None) -> Plan:
    """solve's search, every stage on one deadline from `started`."""
    deadline = started + time_limit_s

    def left(share: float = 1.0, until: float | None = None) -> float:
        """A share of the time left before the deadline (or `until`), and never less than MIN_STAGE_S."""
        return max(MIN_STAGE_S, share * ((deadline if until is None else until) - time.perf_counter()))

    say("baselines")
    given = {c.method: c for c in known if c.method in BASELINES}  # built already: not built again
    candidates = [given.get(name) or _run(graph, name, budget_bytes, SolveOptions(time_limit_s=left()))
                  for name in BASELINES]
    candidates += [c for c in known if c.method not in given]
    store_all = next(c for c in candidates if c.method == "store-all").simulation
    assert store_all is not None and store_all.valid, "store-all must always be a valid schedule"
    bound = graph.min_budget_lower_bound()

    if solver in BASELINES:  # its plan, with the bound that costs nothing: every node runs once
        chosen = next(c for c in candidates if c.method == solver)
        return _finish(graph, budget_bytes, [chosen], candidates, store_all, bound, started,
                       lower_bound_s=graph.compute_s, bound_method="every node once",
                       picked=f"{solver} (asked for by name)")

    lower_bound_s: float | None = graph.compute_s  # every node runs at least once
    coarse_nodes = None
    if store_all.peak_bytes <= budget_bytes:
        # Nothing to recompute: store-all is optimal.
        chosen = next(c for c in candidates if c.method == "store-all")
        chosen = Candidate("store-all", OPTIMAL, chosen.schedule, chosen.simulation, chosen.wall_s,
                           "the budget holds every activation: no rematerialization needed")
        return _finish(graph, budget_bytes, [chosen], candidates, store_all, bound, started, lower_bound_s,
                       bound_method="store-all", picked="store-all: the budget holds every activation")

    if budget_bytes < graph.fixed.total_bytes:  # fixed memory alone is over: no search can help, say so at once
        plan = _finish(graph, budget_bytes, candidates, candidates, store_all, bound, started, None,
                       bound_method="fixed memory is over the budget", picked="none: fixed memory is over the budget")
        # (the lowest peak found is no answer here: it named a minimum budget and not why)
        return replace(plan, message=f"no schedule fits {budget_bytes} bytes: fixed memory alone is "
                       f"{graph.describe_fixed()}, whatever is recomputed")

    if _walks_before_solving(graph, budget_bytes, candidates, bound):
        # On a graph too large for the MILP whole, the walk back from the step's end runs first: nothing found fits,
        # and a budget under its bound is then infeasible at once, with the proof named; where it reaches the empty
        # set, its schedule peaks at the lowest peak of all (a set-to-none U-Net step at batch 1: 498.0 MB in 0.9 s,
        # where the baselines' lowest was 542.1 MB and no MILP ran)
        say("lower bound on the peak, walking back from the step's end")
        node_floor = bound
        walked = _walk(graph, left(WALK_SHARE), _lowest_peak(candidates), LARGE_WALK_PROBE_SETS)
        bound = max(bound, walked.detail["backward_peak_bound_bytes"])
        if walked.schedule is None and bound > node_floor:  # rising over the floor: walk on
            walked = _walk(graph, left(WALK_SHARE), _lowest_peak(candidates), LARGE_WALK_MAX_SETS)
            bound = max(bound, walked.detail["backward_peak_bound_bytes"])
        if walked.schedule is not None:
            candidates.append(_candidate(graph, "backward-walk", walked, walked.schedule))
        if budget_bytes < bound:
            return _refused_by_the_walk(graph, budget_bytes, candidates, store_all, bound, started)

    # A valid lower bound on the fine graph, whatever solves it (solvers/bounds.py): cheap, so always.
    say("lower bound")
    bound_share, bound_max_s = ((BOUND_SHARE, BOUND_MAX_S) if len(graph) <= MAX_REPAIR_NODES
                                else (LARGE_BOUND_SHARE, math.inf))
    covering = covering_bound(graph, budget_bytes,
                              SolveOptions(time_limit_s=min(bound_max_s, max(1.0, bound_share * time_limit_s), left()),
                                           mip_gap=_covering_gap(graph)))
    if covering.proven_infeasible:
        lower_bound_s, bound_method = None, "covering: no schedule fits"
    else:
        lower_bound_s, bound_method = covering.lower_bound_s, covering.method
    if _beaten(lower_bound_s, beaten_at_s):
        return _finish(graph, budget_bytes, candidates, candidates, store_all, bound, started, lower_bound_s,
                       note=f"stopped: no schedule costs less than {beaten_at_s:.6g} s, a plan found elsewhere",
                       bound_method=bound_method, picked="stopped at the lower bound: beaten by a plan found elsewhere")

    # The schedule that drops what the bound's covering MILP recomputes: on chains of layers it costs the bound
    # itself, which proves it optimal at once; elsewhere one more candidate and warm start.
    if solver == "auto" and (covering.incumbents or covering.recomputed is not None):
        say("schedule from the lower bound")
        repairs = MAX_REPAIRS if len(graph) <= MAX_REPAIR_NODES else 0
        result = solve_cover_round(graph, budget_bytes, covering,
                                   SolveOptions(time_limit_s=min(bound_max_s, left(bound_share)), backend=backend),
                                   repairs=repairs)
        covered = _candidate(graph, "cover-round", result, result.schedule)
        candidates.append(covered)
        done = ""  # why no other plan is worth looking for
        if covered.fits(budget_bytes) and meets_bound(covered.simulation.compute_s, lower_bound_s):
            done = "dropping what the lower bound recomputes costs the bound itself"
        elif covered.fits(budget_bytes) and _within_covering_gap(graph, covered.simulation.compute_s, lower_bound_s):
            done = (f"within the covering MILP's own stopping gap ({_covering_gap(graph):.0e} of its recomputation) "
                    "of the lower bound")
        if done:
            return _finish(graph, budget_bytes, [covered] + [c for c in candidates if c is not covered], candidates,
                           store_all, bound, started, lower_bound_s, bound_method=bound_method,
                           picked=f"cover-round: {done}")

    # The decomposition's and the coarsened MILPs' time ends here. On a graph the searches take, with a cover-round
    # plan that fits, they get a share and the searches the rest (solve's _search, after this function returns).
    milp_until = deadline
    if solver == "auto" and MAX_WHOLE_NODES < len(graph) <= MAX_SEARCH_NODES and any(
            c.method == "cover-round" and c.fits(budget_bytes) for c in candidates):
        milp_until = time.perf_counter() + SEARCHED_MILP_SHARE * max(0.0, deadline - time.perf_counter())

    wants_decompose = solver == "decompose" or (solver == "auto" and len(graph) > MAX_EXACT_NODES)
    if wants_decompose and covering.proven_infeasible is False:
        applies, why = decompose_applies(graph, budget_bytes)
        if applies or solver == "decompose":
            say("block decomposition")
            result = solve_with("decompose", graph, budget_bytes,
                                SolveOptions(time_limit_s=left(until=milp_until), backend=backend))
            decomposed = _candidate(graph, "decompose", result, result.schedule)
            candidates.append(decomposed)
            picked = (f"decompose: {len(graph)} nodes (more than {MAX_EXACT_NODES}) with {why}" if solver == "auto"
                      else "decompose (asked for by name)")
            if decomposed.fits(budget_bytes) or solver == "decompose":
                return _finish(graph, budget_bytes, [decomposed] + [c for c in candidates if c is not decomposed],
                               candidates, store_all, bound, started, lower_bound_s, bound_method=bound_method,
                               picked=picked)
            say("the decomposition found no plan that fits: coarsened MILP")
        auto_note = f"; no decomposition: {why}" if not applies else "; the decomposition found no plan that fits"
    else:
        auto_note = ""

    if (solver == "auto" and len(graph) > MAX_WHOLE_NODES and (not covering.incumbents or len(graph) > MAX_SEARCH_NODES)
            and covering.method.startswith("covering (") and any(c.fits(budget_bytes) for c in candidates)
            and deadline - time.perf_counter() >= TIGHTEN_MIN_S):
        # The covering MILP was cut short: before its first solution, so cover-round had nothing to start from, or
        # (on graphs too big for the searches) after a few. On a graph this size the coarsened MILP's plans are poor
        # (DenseNet-121 at 80%: +300% where chen-greedy has +12.6%; at 90%, +20.9% where cover-round had +7.4%
        # from the covering's first incumbents). The time goes to the covering MILP again instead (solve's
        # _tighten_bound) and its solutions' cover-round plans (80%: +3.2%; at 50% of store-all +15.3%, where
        # checkpoint-all's +6679% was the only fit; 90%: proven optimal at +1.0%).
        cheapest = min((c for c in candidates if c.fits(budget_bytes)), key=lambda c: c.simulation.compute_s)
        first = "cover-round" if cheapest.method == "cover-round" else "the best baseline"
        return _finish(graph, budget_bytes, candidates, candidates, store_all, bound, started, lower_bound_s,
                       note="the lower bound was cut short: it is solved again",
                       bound_method=bound_method, picked=f"{first}{auto_note}")

    # The MILP sees the whole graph when it is small enough. A larger graph is coarsened twice, to
    # about MAX_EXACT_NODES and half that; the small one is solved first and its plan, expanded,
    # warm-starts the larger one (multilevel refinement: each level's plan is valid on the next).
    levels: list[Coarsening] = []  # levels[0].fine is `graph`, levels[d].fine is levels[d - 1].coarse
    if len(graph) > MAX_WHOLE_NODES:
        for target in (MAX_EXACT_NODES, MAX_EXACT_NODES // 2):
            finer = levels[-1].coarse if levels else graph
            level = coarsen(finer, contiguous_groups(finer, target))
            if level.coarse.min_budget_lower_bound() > budget_bytes:
                break  # merging ops raised the single-op floor above the budget: stop coarsening here
            levels.append(level)
        if not levels:
            candidates = _long_checkpoint_all_if_nothing_fits(graph, budget_bytes, candidates, say)
            found = ("the baselines and cover-round" if any(c.method == "cover-round" for c in candidates)
                     else "the baselines")
            message = ("every coarsening of this graph has a single-op floor above the budget, and the graph is too "
                       f"big for the MILP whole ({len(graph)} nodes): no MILP ran, the plan is the cheapest of {found}")
            return _finish(graph, budget_bytes, candidates, candidates, store_all, bound, started, lower_bound_s,
                           note=message, bound_method=bound_method, picked=f"no MILP: {found} only")
    graphs = [graph] + [level.coarse for level in levels]  # depth 0 is the graph itself

    def to_graph(schedule: Schedule | None, depth: int) -> Schedule | None:
        """A schedule of graphs[depth] as a schedule of the original graph."""
        for level in reversed(levels[:depth]):
            schedule = level.expand(schedule) if schedule is not None else None
        return schedule

    if solver == "auto" and not levels and not any(c.fits(budget_bytes) for c in candidates):
        # Nothing fits yet to warm-start the MILP, which may then find nothing in its time: the rounded LP relaxation
        # is quick on a graph this size and often fits (a 4-layer MLP's 25 nodes at 80%: lp-round's plan, at the
        # optimum's cost, in 0.12 s, where the MILP found no schedule in the 1.5 s a 5-s limit left it)
        say("rounding the LP relaxation")
        rounded = solve_with("lp-round", graph, budget_bytes,
                             SolveOptions(time_limit_s=left(LP_ROUND_SHARE), backend=backend))
        candidates.append(_candidate(graph, "lp-round", rounded, rounded.schedule))
    name = "checkmate" if solver == "auto" else solver
    coarser: Schedule | None = None  # the previous level's plan, expanded to this level
    lowest_peak = _lowest_peak(candidates)
    milp_candidates: list[Candidate] = []
    result = None
    for depth in reversed(range(1 if levels else 0, len(graphs))):  # the whole graph only when it is small
        working = graphs[depth]
        if result is not None:  # a finer level, after a coarser one
            needed_s = max(MIN_STAGE_S, 2 * _build_s(result, working, graphs[depth + 1]))
            if milp_until - time.perf_counter() < needed_s:
                # Too little time to build this level's MILP and still search: the coarser plan, expanded, stands.
                say(f"no time left for the MILP on {len(working)} nodes")
                break
        coarse_nodes = len(working) if depth > 0 else None
        label = name if depth == 0 else f"{name}-coarse-{len(working)}"
        say(f"warm start for {len(working)} nodes")
        baselines = (candidates if depth == 0
                     else [_run(working, b, budget_bytes, SolveOptions(time_limit_s=left())) for b in BASELINES])
        options = [(c.simulation.compute_s, c.schedule) for c in baselines if c.fits(budget_bytes)]
        if coarser is not None:
            coarser_sim = simulate(working, coarser)
            if coarser_sim.fits(budget_bytes):
                options.append((coarser_sim.compute_s, coarser))
        walked_bound = None  # the walk's bound where it ran: the min-peak MILP's bound row, not searched again
        if (not levels and lowest_peak > bound and len(graph) - 1 in graph.outputs
                and not _out_of_time(deadline, candidates, budget_bytes)):
            # Every valid schedule runs the last node (an output): no schedule peaks below the backward walk's bound,
            # and the walk it found to the empty set, when it did, is a schedule at that bound (not frontier-advancing,
            # so a candidate of its own, not a warm start: dyn_bool_index_assign's step, 7,264 bytes at once, where
            # the min-peak MILP named 7,296 to 7,360 in 3 s)
            say("lower bound on the peak, walking back from the step's end")
            walked = _walk(graph, left(WALK_SHARE), lowest_peak)
            bound = walked_bound = max(bound, walked.detail["backward_peak_bound_bytes"])
            if walked.schedule is not None:
                candidates.append(_candidate(graph, "backward-walk", walked, walked.schedule))
                if candidates[-1].schedule is not None:  # (valid)
                    lowest_peak = min(lowest_peak, candidates[-1].simulation.peak_bytes)
        if depth == len(graphs) - 1 and lowest_peak > bound and not _out_of_time(deadline, candidates, budget_bytes):
            # No baseline reaches the single-op floor: ask the MILP for the lowest peak it can find.
            say("minimum feasible budget")
            lowest = min((c for c in baselines if c.simulation is not None and c.simulation.valid
                          and c.method != "backward-walk"),  # (not frontier-advancing: no warm start)
                         key=lambda c: (c.simulation.peak_bytes, c.simulation.compute_s))
            # A quarter of the time left, or all of it when the budget is below this graph's single-op floor
            # (then the MILP for the budget settles at once and the lowest peak is the answer wanted).
            below_floor = max(working.min_budget_lower_bound(), bound) > budget_bytes
            min_peak_options = SolveOptions(time_limit_s=left(1.0 if below_floor else 0.25), backend=backend,
                                            warm_start=lowest.schedule, peak_floor_bytes=walked_bound)
            unbuilt = unbuildable_in(working, min_peak_options)
            min_peak = (SolverResult("checkmate-min-peak", NO_SOLUTION, None, message=unbuilt) if unbuilt
                        else solve_with("checkmate-min-peak", working, budget_bytes, min_peak_options))
            candidates.append(_candidate(graph, "checkmate-min-peak", min_peak, to_graph(min_peak.schedule, depth)))
            if min_peak.schedule is not None:
                min_peak_sim = simulate(working, min_peak.schedule)
                if min_peak_sim.fits(budget_bytes):
                    options.append((min_peak_sim.compute_s, min_peak.schedule))
        if graph.min_budget_lower_bound() <= budget_bytes < bound:  # under the walk's bound: proven, no MILP needed
            return _refused_by_the_walk(graph, budget_bytes, candidates, store_all, bound, started)
        warm = min(options, key=lambda option: option[0])[1] if options else None

        # of two coarse levels, the coarser gets a third of the time left and the finer what is left after it; on a
        # whole graph, auto's MILP leaves time to the searches, unless nothing fits yet for them to start from (a
        # 34-node MLP at 5 s: auto found no plan where checkmate by name did, its MILP given 0.8 s of 5)
        whole_share = WHOLE_MILP_SHARE if options else 1.0
        share = left(1 / 3 if depth > 1 else whole_share if solver == "auto" and not levels else 1.0,
                     until=milp_until)
        run_options = SolveOptions(time_limit_s=share, warm_start=warm, backend=backend)
        # Not started past the deadline with a plan in hand, nor where HiGHS could not run the model once it is built
        # (lp-round tells that itself, for each of its LPs; CP-SAT's process builds its own)
        unbuilt = ("not run: the time limit ran out before its model was built"
                   if _out_of_time(deadline, candidates, budget_bytes)
                   else unbuildable_in(working, run_options) if name == "checkmate" else "")
        if unbuilt:
            say(f"no time left for the MILP on {len(working)} nodes")
            if result is None:  # (else the coarser level's plan, expanded, stands)
                result = SolverResult(name, NO_SOLUTION, None, message=unbuilt)
                milp_candidates.append(_candidate(graph, label, result, None))
            break
        say(f"solving the MILP on {len(working)} nodes ({share:.1f} s)")
        result = solve_with(name, working, budget_bytes, run_options)
        candidate = _candidate(graph, label, result, to_graph(result.schedule, depth))
        if depth > 0 and candidate.status == OPTIMAL:  # optimal among coarse schedules, not proven for the graph
            candidate = replace(candidate, status=FEASIBLE, message="optimal for the coarsened graph")
        milp_candidates.append(candidate)
        coarser = levels[depth - 1].expand(result.schedule) if depth > 0 and result.schedule is not None else None

    assert result is not None
    candidates.extend(milp_candidates)
    # The MILP's dual bound holds for the whole graph (its accounting is the simulator's, output by output).
    if not levels and result.lower_bound_s is not None and lower_bound_s is not None \
            and result.lower_bound_s > lower_bound_s:
        lower_bound_s, bound_method = result.lower_bound_s, "milp"  # the MILP's dual bound on the whole graph
    if result.status == INFEASIBLE and not levels:
        lower_bound_s = None
    finest = milp_candidates[-1]
    candidates = _long_checkpoint_all_if_nothing_fits(graph, budget_bytes, candidates, say)
    model = {"cpsat": "CP-SAT", "lp-round": "LP relaxation, rounded,"}.get(name, "MILP")
    where = f"{model} on {coarse_nodes} coarse nodes" if levels else f"{model} on the whole graph ({len(graph)} nodes)"
    picked = (f"{name}: {where}{auto_note}" if solver == "auto" else f"{solver} (asked for by name): {where}")
    return _finish(graph, budget_bytes, [finest] + [c for c in candidates if c is not finest], candidates,
                   store_all, bound, started, lower_bound_s, coarse_nodes,
                   proven_optimal=result.status == OPTIMAL and not levels,
                   bound_method=bound_method, picked=picked)


def sweep(graph: Graph, budgets_bytes: Sequence[int | str], solver: str = "auto", time_limit_s: float = 60.0,
          backend: str = "highs", progress: Callable[[str], None] | None = None) -> list[Plan]:
    """Plans for several budgets (bytes, sizes or shares, as `solve` takes them): one per distinct budget, smallest
    first, each with its `budget_bytes`: the budget -> cost curve.

    A schedule that fits a budget fits every larger one, so each budget also weighs the plan of the
    budget below it: the curve never rises, whatever the time limit cut short.
    """
    plans: list[Plan] = []
    known: list[Candidate] = []
    for budget in sorted({budget_of(graph, budget) for budget in budgets_bytes}):
        plan = solve(graph, budget, solver, time_limit_s, backend, progress, known=known)
        plans.append(plan)
        # the baselines that ignore the budget are built once (checkpoint-all: 4 s on GPT-2 XL)
        known = [c for c in plan.candidates if c.method in BUDGET_FREE_BASELINES]
        if plan.schedule is not None:
            known.append(Candidate(f"{plan.method}@{plan.budget_bytes}", FEASIBLE, plan.schedule, plan.simulation,
                                   0.0, f"the plan for {plan.budget_bytes} bytes"))
    return plans


def _out_of_time(deadline: float, candidates: Sequence[Candidate], budget_bytes: int) -> bool:
    """Past the deadline with a plan that fits in hand: a MILP stage started now only overruns. Building its model is
    not interruptible (1.5 to 4.5 s for a 94-node MLP's), and then it keeps its warm start, or HiGHS does not run a
    model that size at all with the time a late stage gets (MIN_STAGE_S): `lp-round` given 1 s on that MLP took 4.7 s,
    the min-peak MILP's build and the LP's, for the plan chen-greedy had before either."""
    return time.perf_counter() >= deadline and any(c.fits(budget_bytes) for c in candidates)


def _build_s(coarser: SolverResult, finer: Graph, coarser_graph: Graph) -> float:
    """About how long building the MILP of `finer` takes, from the time the coarser graph's took: it grows with
    the square of the nodes, and PuLP's copy of the model into HiGHS adds about half again."""
    return 1.5 * coarser.detail.get("build_s", 0.0) * (len(finer) / max(1, len(coarser_graph))) ** 2


def baseline_candidate(graph: Graph, name: str, budget_bytes: int, result: SolverResult | None = None) -> Candidate:
    """Baseline `name`'s schedule of `graph` as the planner weighs it (each value freed at its last read), for
    `solve`'s `known`. `result`: that baseline's own result, where it was built already (a split variant's
    checkpoint-all, built for its reach)."""
    return _run(graph, name, budget_bytes, SolveOptions(), result)


def _run(graph: Graph, name: str, budget_bytes: int, options: SolveOptions,
         result: SolverResult | None = None) -> Candidate:
    result = result or solve_with(name, graph, budget_bytes, options)
    return _candidate(graph, name, result, result.schedule, tight=True)


def _long_checkpoint_all_if_nothing_fits(graph: Graph, budget_bytes: int, candidates: list[Candidate],
                                        say: Callable[[str], None]) -> list[Candidate]:
    """`candidates`, with checkpoint-all built however long where none of them fits and it was not built for its
    length (solvers/baselines.py's checkpoint_all_max_ops): the last resort, a schedule of the lowest peak known
    without solving (a 10,276-node LSTM: 11.1M instructions, about 40 s with its simulations)."""
    index = next((i for i, c in enumerate(candidates) if c.method == "checkpoint-all" and c.schedule is None), None)
    if index is None or any(c.fits(budget_bytes) for c in candidates):
        return candidates
    say("checkpoint-all, however long: nothing else fits")
    result = checkpoint_all(graph, budget_bytes, SolveOptions(), capped=False)
    return [*candidates[:index], _candidate(graph, "checkpoint-all", result, result.schedule, tight=True),
            *candidates[index + 1:]]


def _candidate(graph: Graph, method: str, result: SolverResult, schedule: Schedule | None,
               tight: bool = False) -> Candidate:
    """`schedule` simulated, each value freed at its last read. `tight`: it frees so already (the baselines' builder
    does: on GPT-2 XL tightening checkpoint-all's 856k instructions again and simulating them took 1.6 s)."""
    simulation = simulate(graph, schedule) if schedule is not None else None
    status = result.status
    if simulation is not None and not simulation.valid:
        status, schedule = NO_SOLUTION, None
        message = f"{method} produced an invalid schedule: {simulation.errors[0]}"
        return Candidate(method, status, None, simulation, result.wall_s, message)
    if schedule is not None and not tight:  # free each value at its last read, as the executor's graphs do
        schedule = tighten_frees(graph, schedule)
        simulation = simulate(graph, schedule)
    return Candidate(method, status, schedule, simulation, result.wall_s, result.message, result.detail.get("drops"),
                     result.detail.get("incumbents", ()))


def _walk(graph: Graph, seconds: float, target: int, max_sets: int | None = None) -> SolverResult:
    """solvers/peak_bound.py's walk back from the last node for `seconds`, stopped once its bound reaches `target` (a
    peak found): its bound in detail["backward_peak_bound_bytes"], and its schedule where it reached the empty set."""
    started = time.perf_counter()
    walk = backward_walk(graph, started + seconds, target, max_sets)
    schedule = walk_schedule(graph, walk.runs) if walk.runs is not None else None
    return SolverResult("backward-walk", FEASIBLE if schedule is not None else NO_SOLUTION, schedule,
                        wall_s=time.perf_counter() - started,
                        message=f"the walk back from the step's end: no schedule peaks below {walk.bound_bytes} bytes",
                        detail={"backward_peak_bound_bytes": walk.bound_bytes})


def _walks_before_solving(graph: Graph, budget_bytes: int, candidates: Sequence[Candidate], bound: int) -> bool:
    """Whether _plan walks back from the step's end before its other stages: a graph over MAX_WHOLE_NODES (the whole
    ones are walked before their min-peak MILP) whose last node is the backward's return, which reads every gradient
    (set-to-none or accumulate: there the walk's bound rises above the node floor), where nothing found fits the budget
    and no schedule found peaks at the floor. Held steps are not walked: their plans (`remat solve`'s default) pay
    nothing for it."""
    return (len(graph) > MAX_WHOLE_NODES and graph.gradients_made
            and not any(c.fits(budget_bytes) for c in candidates) and _lowest_peak(candidates) > bound)


def _refused_by_the_walk(graph: Graph, budget_bytes: int, candidates: list[Candidate], store_all: Simulation,
                         bound: int, started: float) -> Plan:
    """The plan for a budget under the walk's bound (`bound`): infeasible, with the walk named as the proof."""
    return _finish(graph, budget_bytes, candidates, candidates, store_all, bound, started, None,
                   bound_method="the walk back from the step's end: no schedule fits",
                   picked="none: no schedule peaks below the walk back from the step's end")


def _lowest_peak(candidates: Sequence[Candidate]) -> int:
    """The lowest peak of the valid schedules among `candidates` (store-all's is always there)."""
    return min(c.simulation.peak_bytes for c in candidates if c.simulation is not None and c.simulation.valid)


def _proven_infeasible(budget_bytes: int, candidates: list[Candidate], bound: int, lower_bound_s: float | None,
                       coarse_nodes: int | None) -> bool:
    """Whether no schedule of the graph can fit `budget_bytes`, where none found does: the budget is under the floor no
    schedule goes below (`bound`: fixed memory and the largest op's working set, or the walk back from the step's end
    where _plan ran it), a relaxation (the covering MILP, or the MILP on the whole graph) found no solution, which
    `_plan` marks by a lower bound of None, or the min-peak MILP on the whole graph proved a lowest peak over the
    budget. Otherwise the time limit cut the search short: no_solution."""
    if budget_bytes < bound or lower_bound_s is None:  # (the floor holds fixed memory)
        return True
    lowest = _proven_min_peak(candidates, coarse_nodes)
    return lowest is not None and lowest > budget_bytes


def _proven_min_peak(candidates: Sequence[Candidate], coarse_nodes: int | None) -> int | None:
    """The lowest peak of any schedule, where the min-peak MILP proved it on the whole graph."""
    return next((c.simulation.peak_bytes for c in candidates if coarse_nodes is None
                 and c.method == "checkmate-min-peak" and c.status == OPTIMAL and c.simulation is not None
                 and c.simulation.valid), None)


def _asked_by_name(picked: str) -> bool:
    """Whether the user named the method (the `picked` line says so), rather than auto choosing it."""
    return "(asked for by name)" in picked


def _finish(graph: Graph, budget_bytes: int, preference: list[Candidate], candidates: list[Candidate],
            store_all: Simulation, bound: int, started: float, lower_bound_s: float | None,
            coarse_nodes: int | None = None, proven_optimal: bool = False, note: str = "", bound_method: str = "",
            picked: str = "") -> Plan:
    """Pick the cheapest fitting candidate (ties go to the earlier one in `preference`)."""
    valid_peaks = [c.simulation.peak_bytes for c in candidates if c.simulation is not None and c.simulation.valid]
    min_feasible = min(valid_peaks) if valid_peaks else None
    fitting = [c for c in preference if c.fits(budget_bytes)]
    wall_s = time.perf_counter() - started
    if not fitting:
        message = (f"no schedule fits {budget_bytes} bytes; the lowest peak found is {min_feasible} bytes "
                   f"(no schedule can go below {bound} bytes)")
        asked = preference[0]
        if len(preference) == 1 and asked.method in BASELINES:  # a baseline asked for by name: why it does not fit
            own = asked.simulation
            message = (f"{asked.method}'s schedule peaks at {own.peak_bytes} bytes, over the budget of {budget_bytes}"
                       if own is not None and own.valid else f"{asked.method}: {asked.message}")
            if min_feasible is not None and min_feasible <= budget_bytes:
                message += f"; other methods fit (the lowest peak found is {min_feasible} bytes)"
        elif _asked_by_name(picked) and asked.schedule is None and asked.message and budget_bytes >= bound:
            message += f"; {asked.method}: {asked.message}"
        proven = _proven_infeasible(budget_bytes, candidates, bound, lower_bound_s, coarse_nodes)
        return Plan(graph, budget_bytes, "", INFEASIBLE if proven else NO_SOLUTION, None, None, None, store_all,
                    min_feasible, bound, wall_s, message, coarse_nodes, tuple(candidates), bound_method, picked)
    best = min(fitting, key=lambda c: c.simulation.compute_s)
    first = fitting[0]
    if first.simulation.compute_s <= best.simulation.compute_s * (1 + 1e-9):
        best = first
    status = OPTIMAL if (best.status == OPTIMAL and (proven_optimal or best.method == "store-all")) else FEASIBLE
    message = note or best.message
    asked = preference[0]
    if best is not asked and asked.simulation is not None and asked.fits(budget_bytes):
        ours, theirs = (format_seconds(c.simulation.compute_s) for c in (best, asked))
        message = f"{best.method} is cheaper than {asked.method} ({ours} vs {theirs})"
    elif best is not asked and _asked_by_name(picked):  # say why the method asked for is not the plan
        why = asked.message if asked.schedule is None and asked.message else "no plan that fits"
        message = f"{asked.method}: {why}; {best.method}'s plan is the cheapest that fits"
    if meets_bound(best.simulation.compute_s, lower_bound_s):
        status = OPTIMAL  # the plan meets a valid lower bound
    if lower_bound_s is not None:
        lower_bound_s = min(lower_bound_s, best.simulation.compute_s)  # float rounding only (bounds are shaved)
    return Plan(graph, budget_bytes, best.method, status, best.schedule, best.simulation, lower_bound_s, store_all,
                min_feasible, bound, wall_s, message, coarse_nodes, tuple(candidates), bound_method, picked)
