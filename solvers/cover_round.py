"""A schedule from the covering bound's solution (solvers/bounds.py): drop the values it recomputes.

The covering MILP picks values x_v to drop so that every moment of the step fits the budget, counting a dropped
value's recomputation once (and, at the most crowded moments, the inputs it needs back). Where that is what a
schedule can do (a chain of layers such as VGG's; GPT-2's blocks at most budgets) this schedule costs the bound
itself, and the plan is proven optimal without the Checkmate MILP. Elsewhere it is one more candidate.

The schedule: every value is computed at its own stage and held as in store-all, except that a dropped value is
computed again at its recomputation points, together with the inputs it needs that are not in memory there
(dropped ones, and those whose last reader ran before). The rows are emitted with minimal storage
(solvers/decompose.py's emit), so a dropped value is freed after its last read before such a point. A few ways
of placing the points (VARIANTS) are each emitted and simulated, for each incumbent the covering solve found on its
way (near its optimum, solutions of about the same seconds differ a lot as schedules: schedules_for_bound); the
cheapest that fits is the plan. Where the cheap way (values brought back once and held for every later point)
overshoots, release_held lets go of what is held at the peak, the cheapest to make again per byte first, a few at a
time, until it fits. When nothing fits (recomputation transients, inputs held longer), the covering MILP is solved
again for a lower budget.
Last, one value at a time while the schedule still fits, a drop is undone (the covering may drop more than needed),
an input computed again only to recompute a dropped value is held instead, or a value let go is held again.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, replace

from remat.graph import Graph
from remat.schedule import COMPUTE, Schedule
from remat.simulate import Simulation, live_bytes_at, simulate
from solvers.base import FEASIBLE, NO_SOLUTION, SolveOptions, SolverResult, meets_bound
from solvers.baselines import first_backward_index
from solvers.bounds import Bound, covering_bound
from solvers.decompose import emit, prune_rows

MAX_REPAIRS = 4  # covering solves for a moved budget after the first
MAX_FRESH = 48  # schedules release_held tries, each letting go of more of what it holds for later points
KEEP_STARTS = 8  # drops whose cheapest schedule that fits keep_what_fits starts from, the cheapest first
REPAIR_STEPS = 100  # the margin stops once it would move by less than 1/REPAIR_STEPS of the activation budget
HOLD_SHARE = 1000  # inputs of at most 1/HOLD_SHARE of the activation budget may be held rather than recomputed
# Which inputs of a dropped value are held until its points rather than computed again there (rows_for_drops):
HOLD_NONE = "none"
HOLD_SMALL = "small"  # those of at most 1/HOLD_SHARE of the activation budget (a weight's cast)
# every one: a DenseNet's concatenations read the block's features, the last of them in the forward, so bringing a
# dropped concatenation back in the backward computes those features again, each from the ones before it (DenseNet-121
# at 1.1 x min: +567% where the same drops with every input held cost +74%)
HOLD_ALL = "all"
# The ways of turning the drops into rows that are tried (each is an emit and a simulation: milliseconds):
# (where a dropped value comes back, reuse values brought back, which inputs are held)
VARIANTS = [(rule, reuse, hold) for rule in ("first", "longest") for reuse, hold in ((True, HOLD_NONE),
                                                                                     (False, HOLD_NONE),
                                                                                     (True, HOLD_SMALL))]
VARIANTS += [("every", False, HOLD_NONE), ("every", False, HOLD_SMALL), ("first", True, HOLD_ALL),
             ("first", False, HOLD_ALL)]


@dataclass(frozen=True)
class Drops:
    """Which values a schedule drops and how rows_for_drops brings them back: the covering solution's drops turned
    into a schedule by one variant, or a point of solvers/drop_search.py's search."""

    dropped: tuple[int, ...]  # values computed again at their recomputation points
    rule: str = "first"  # where a dropped value comes back (recompute_points)
    reuse: bool = False  # a value brought back is held for the later points that need it
    hold_bytes: int = 0  # inputs of at most this many bytes are held rather than computed again
    fresh: frozenset[int] = frozenset()  # values never held for later points, even with reuse (release_held)
    held: frozenset[int] = frozenset()  # inputs held until the points that read them, whatever their size


def recompute_points(graph: Graph, v: int, backward_start: int, rule: str) -> list[int]:
    """Where a dropped value is computed again (none when it is read at once or never). "first": at its first reader
    in the backward (or else its last reader); "longest": at the reader after the longest wait between two reads
    (a U-Net's skip connection, read by the decoder's forward long after the encoder's); "every": before each
    reader but the first (in memory only while read, as the covering bound counts a dropped value)."""
    readers = graph.users[v]
    if not readers or readers[-1] <= v + 1:
        return []  # nothing to gain: read by nobody, or right away
    if len(readers) == 1:
        return [readers[0]]  # computed at its stage, released at once, made again for its one reader
    if rule == "every":
        return list(readers[1:])
    if rule == "longest":
        return [max((readers[k] - readers[k - 1], readers[k]) for k in range(1, len(readers)))[1]]
    later = [u for u in readers if u >= backward_start]
    return [later[0] if later and later[0] != readers[0] else readers[-1]]


def rows_for_drops(graph: Graph, dropped: set[int], rule: str = "first", reuse: bool = False,
                   hold_bytes: int = 0, fresh: frozenset[int] = frozenset(),
                   held: frozenset[int] = frozenset(), max_seconds: float = math.inf) -> list[list[int]] | None:
    """Checkmate rows (stage t runs rows[t] in ascending order) that recompute every dropped value at its
    recomputation points (`rule`, see recompute_points), with its missing inputs. `reuse`: a value computed
    again at one point (for itself or as another's input) is held for the points after it that need it, rather
    than computed once more (fewer seconds, more bytes held in the backward). `hold_bytes`: an input of at most
    this many bytes that is not dropped is held until the point rather than computed again (a weight's cast);
    so is every input in `held` (HOLD_ALL, keep_what_fits). `fresh`: values never held for later points, even with
    `reuse` (see release_held). None once the rows' seconds pass `max_seconds`: a variant that costs more than a
    schedule already found is not worth finishing (on DenseNet-121 near its minimum, an early covering incumbent's
    rows without reuse recompute a block's features over and over: +37,000%, 2 s to build)."""
    backward_start = first_backward_index(graph)
    last_reader = graph.last_users
    points = {v: recompute_points(graph, v, backward_start, rule) for v in dropped}
    again: dict[int, int] = {}  # value -> the first point where it is computed again
    rows = [[t] for t in range(len(graph))]
    seconds = graph.compute_s  # every node once; the recomputations are added below

    read_until = graph.read_until  # what w reads of an op whose outputs are released one by one

    def present(d: int, t: int, w: int) -> bool:
        """Whether what w reads of value d is in memory when stage t starts without being computed again there."""
        if reuse and d not in fresh and again.get(d, t + 1) <= t:
            return True  # computed again at an earlier point and held since
        if read_until.get((d, w), last_reader[d]) < t:
            return d not in dropped and (graph.nodes[d].output_bytes <= hold_bytes or d in held)  # held on, or gone
        if not points.get(d):
            return True  # never dropped (or nothing to gain: a single reader)
        return t in points[d] if rule == "every" else points[d][0] <= t  # absent until brought back

    pairs = sorted((point, v) for v, at in points.items() for point in at)
    for point, v in pairs:
        if reuse and v not in fresh and again.get(v, point + 1) <= point:
            continue  # already back, held from an earlier point
        needed, stack = set(), [v]
        while stack:  # v and, recursively, its inputs that are not in memory at the point
            w = stack.pop()
            if w in needed:
                continue
            needed.add(w)
            stack.extend(d for d in graph.nodes[w].deps if d not in rows[point] and not present(d, point, w))
        for w in needed:
            again.setdefault(w, point)
        # each of these is read (by v, or by what v needs) before anything else computes it: prune_rows keeps it
        seconds += sum(graph.nodes[w].compute_s for w in needed)
        if seconds > max_seconds:
            return None
        rows[point] = sorted(set(rows[point]) | needed)
    return rows


def pruned_rows_for(graph: Graph, drops: Drops, max_seconds: float = math.inf) -> list[list[int]] | None:
    """rows_for_drops for `drops`, without the computations nothing reads; None past `max_seconds`."""
    rows = rows_for_drops(graph, set(drops.dropped), drops.rule, drops.reuse, drops.hold_bytes, drops.fresh,
                          drops.held, max_seconds)
    return None if rows is None else prune_rows(graph, rows)


def schedule_for_drops(graph: Graph, drops: Drops) -> Schedule:
    schedule, _ = emit(graph, pruned_rows_for(graph, drops))
    return schedule


def schedule_for_drops_within(graph: Graph, drops: Drops, max_seconds: float) -> Schedule | None:
    """schedule_for_drops, or None once the rows cost more than `max_seconds` (they are not finished or emitted)."""
    rows = pruned_rows_for(graph, drops, max_seconds)
    return None if rows is None else emit(graph, rows)[0]


def drops_for_variant(graph: Graph, dropped: tuple[int, ...], rule: str, reuse: bool, hold: str,
                      small: int) -> Drops:
    """The drops of one of VARIANTS; `small`: the bytes up to which HOLD_SMALL holds an input."""
    return Drops(dropped, rule, reuse, small if hold == HOLD_SMALL else 0,
                 held=frozenset(range(len(graph))) if hold == HOLD_ALL else frozenset())


def release_held(graph: Graph, budget_bytes: int, drops: Drops, deadline: float,
                 built: tuple[Schedule, Simulation] | None = None) -> tuple[Schedule, Simulation, Drops] | None:
    """Let go of values the schedule holds at its peak only for a later point, the cheapest to make again per byte
    first, as many as add up to its overshoot, until the schedule fits. Two kinds are held so:
    - with `reuse`, a value brought back at one point, for the later points that read it: the fewest seconds, but
      where the backward brings back a chain (a U-Net's full-resolution stem: convolution, relu, convolution, relu,
      each read again a few ops apart) every link is held at once. Let go, it is brought back fresh at each point;
    - an input in `held`, past its last reader, for the points that recompute its dropped readers (HOLD_ALL: a
      DenseNet's features). Let go, it is computed again at those points.
    `built`: the drops' schedule and simulation, when the caller has them (each is an emit and a simulation).
    The schedule, its simulation and its drops; None when it does not fit in MAX_FRESH steps or by the deadline,
    or nothing held at the peak can be let go."""
    last_reader = graph.last_users
    for _ in range(MAX_FRESH):
        if built is None:
            schedule = schedule_for_drops(graph, drops)
            built = schedule, simulate(graph, schedule)
        (schedule, sim), built = built, None
        if sim.peak_bytes <= budget_bytes:
            return schedule, sim, drops
        if time.perf_counter() > deadline:
            return None
        peak = schedule.ops[sim.peak_op].node
        computed = Counter(op.node for op in schedule.ops[:sim.peak_op + 1] if op.kind == COMPUTE)
        stage = max(computed)  # the stage the peak is in, or the one before
        held = []  # (bytes, value, brought back: else an input held)
        for v, size in live_bytes_at(graph, schedule, sim.peak_op).items():
            if v == peak or v in graph.nodes[peak].deps or v in drops.fresh:
                continue
            brought_back = drops.reuse and computed[v] > 1
            if size > 0 and (brought_back or (v in drops.held and v not in drops.dropped and last_reader[v] < stage)):
                held.append((size, v, brought_back))  # (a value of no bytes frees nothing)
        if not held:
            return None
        fresh, kept, freed = set(drops.fresh), set(drops.held), 0
        # the cheapest to make again per byte first, until they add up to the overshoot (the largest first made
        # ResNet-50's cover-round plan at 1.1 x min +24.22%, this +24.00%; U-Net's +47.7%, this +44.4%)
        for size, v, brought_back in sorted(held, key=lambda item: (graph.nodes[item[1]].compute_s / item[0], item[1])):
            if freed >= sim.peak_bytes - budget_bytes:
                break
            freed += size
            if brought_back:
                fresh.add(v)
            else:
                kept.discard(v)
        drops = replace(drops, fresh=frozenset(fresh), held=frozenset(kept))
    return None


def incumbents_of(bound: Bound) -> list[tuple[int, ...]]:
    """The covering solve's incumbents (the drops of each), its last (the best) first."""
    last = () if bound.recomputed is None else (bound.recomputed,)
    return list(dict.fromkeys(reversed((*bound.incumbents, *last))))


def schedules_for_bound(graph: Graph, budget_bytes: int, bound: Bound, small: int, deadline: float, margin: int,
                        tried: list[dict]) -> tuple[list[tuple[float, int, Schedule, Drops]], list[int],
                                                    list[tuple[int, ...]]]:
    """Every variant of every incumbent of the covering solve `bound` (its last, the best, first) as a schedule:
    those that fit, as (seconds, peak, schedule, drops), and by how many bytes each of the others overshoots. Near
    the covering optimum, solutions of about the same seconds differ a lot as schedules: one drops a chain of links
    (GPT-2's residual stream, one add per link) that the covering counts as an add each, and bringing the last link
    back then recomputes the whole chain; an earlier incumbent drops every other link and fits at +17% where the
    best recomputes +400% (gpt2-medium at 1.1 x min). Then release_held, for each variant that holds values for
    later points and overshoots while costing less than the cheapest fit (it only adds recomputation). Until the
    deadline, but the last incumbent's variants always, until one fits. Appends a row to `tried` for each schedule;
    returns the incumbents it turned into schedules too."""
    fits: list[tuple[float, int, Schedule, Drops]] = []
    over: list[int] = []
    # (score, seconds, incumbent, hold, drops, (schedule, simulation))
    overshooting: list[tuple[float, float, int, str, Drops, tuple[Schedule, Simulation]]] = []
    capacity = max(1, budget_bytes - graph.fixed.total_bytes)
    cheapest = math.inf  # the seconds of the cheapest schedule that fits
    done: list[tuple[int, ...]] = []
    for incumbent, dropped in enumerate(incumbents_of(bound)):
        if incumbent > 0 and time.perf_counter() > deadline:
            break  # the last incumbent's schedules at least
        done.append(dropped)
        rows_seen: set[tuple[tuple[int, ...], ...]] = set()
        for rule, reuse, hold in VARIANTS:
            if (incumbent > 0 or fits) and time.perf_counter() > deadline:
                break  # each variant is an emit and a simulation: 10 ms to 5 s on DenseNet-121 (1,707 nodes)
            drops = drops_for_variant(graph, dropped, rule, reuse, hold, small)
            # costs more than a schedule that fits (letting go of held values only adds to it): not finished
            rows = pruned_rows_for(graph, drops, cheapest * (1 + 1e-9))
            if rows is None:
                continue
            key = tuple(map(tuple, rows))
            if hold == HOLD_ALL and key in rows_seen:
                continue  # every input was in memory at its points already: the schedule of an earlier variant
            rows_seen.add(key)
            schedule, _ = emit(graph, rows)
            sim = simulate(graph, schedule)
            assert sim.valid, sim.errors  # emit is valid for any rows
            tried.append({"margin_bytes": margin, "incumbent": incumbent, "dropped": len(dropped), "rule": rule,
                          "reuse": reuse, "hold": hold, "peak_bytes": sim.peak_bytes, "compute_s": sim.compute_s})
            if sim.peak_bytes <= budget_bytes:
                fits.append((sim.compute_s, sim.peak_bytes, schedule, drops))
                cheapest = min(cheapest, sim.compute_s)
            else:
                over.append(sim.peak_bytes - budget_bytes)
                if reuse or drops.held:  # the cheap placement overshoots: holding less of what it holds may fit
                    # the nearest to fitting first: letting go of each value held costs an emit and a simulation
                    score = sim.compute_s * (1 + (sim.peak_bytes - budget_bytes) / capacity)
                    overshooting.append((score, sim.compute_s, incumbent, hold, drops, (schedule, sim)))
    for _, seconds, incumbent, hold, drops, built in sorted(overshooting, key=lambda item: item[:3]):
        if time.perf_counter() > deadline:
            break
        if seconds > cheapest:
            continue
        released = release_held(graph, budget_bytes, drops, deadline, built)
        if released is not None:
            schedule, sim, drops = released
            tried.append({"margin_bytes": margin, "incumbent": incumbent, "dropped": len(drops.dropped),
                          "rule": drops.rule, "reuse": drops.reuse, "hold": hold, "fresh": len(drops.fresh),
                          "peak_bytes": sim.peak_bytes, "compute_s": sim.compute_s})
            fits.append((sim.compute_s, sim.peak_bytes, schedule, drops))
            cheapest = min(cheapest, sim.compute_s)
    return fits, over, done


def solve_cover_round(graph: Graph, budget_bytes: int, first: Bound, options: SolveOptions | None = None,
                      repairs: int = MAX_REPAIRS) -> SolverResult:
    """The schedule that drops what the covering bound `first` (for this budget) recomputes. The covering MILP is
    then solved again, up to `repairs` times within the time limit, for a budget moved by a margin: lowered by
    the overshoot while no variant fits, raised by the room left when one fits with room to spare, then halved
    between the two (the covering counts neither recomputation transients nor all the bytes its drops free).
    The cheapest schedule that fits."""
    options = options or SolveOptions(time_limit_s=10.0)
    started = time.perf_counter()
    deadline = started + options.time_limit_s
    capacity = budget_bytes - graph.fixed.total_bytes
    small = capacity // HOLD_SHARE
    bound, margin = first, 0
    fitted, overshot = None, None  # the smallest margin at which a variant fit; the largest below it that did not
    room = 0  # bytes the best variant at `fitted` leaves under the budget
    best: tuple[Schedule, float, int] | None = None
    best_drops: Drops | None = None  # the drops and the variant of the best schedule
    tried: list[dict] = []
    incumbents: dict[tuple[int, ...], None] = {}  # every incumbent turned into schedules, in order
    fitting: list[tuple[float, int, Schedule, Drops]] = []  # every schedule that fits, over all covering solves
    solves = 1
    for attempt in range(repairs + 1):
        if not bound.incumbents and bound.recomputed is None:
            break
        fits, over, done = schedules_for_bound(graph, budget_bytes, bound, small, deadline, margin, tried)
        incumbents.update(dict.fromkeys(done))
        fitting += fits
        if fits:  # ties go to reuse: solvers/drop_search.py moves its fresh values, a richer start for its search
            seconds, peak, schedule, drops = min(fits, key=lambda f: (f[0], f[1], not f[3].reuse))
            if best is None or seconds < best[1]:
                best, best_drops = (schedule, seconds, peak), drops
            if fitted is None or margin < fitted:
                fitted, room = margin, budget_bytes - peak
            if meets_bound(best[1], first.lower_bound_s):
                break  # meets the bound: optimal
        elif overshot is None or margin > overshot:
            overshot = margin
        if fitted is None:  # nothing fits yet: lower the budget by the least overshoot
            margin += min(over)
        elif overshot is None or overshot > fitted:  # fits, nothing tried below: hand the room back
            if room < capacity // REPAIR_STEPS:
                break
            margin = fitted - room
        else:
            if fitted - overshot < capacity // REPAIR_STEPS:
                break
            margin = (overshot + fitted) // 2
        left = deadline - time.perf_counter()
        if attempt == repairs or left < 0.5:
            break
        bound = covering_bound(graph, budget_bytes - margin, replace(options, time_limit_s=left / 2))
        solves += 1
    kept: Counter[str] = Counter()  # the changes keep_what_fits kept
    # What keep_what_fits makes of a schedule is not ordered as the schedules are: try the cheapest variant of each
    # of the cheapest few drops
    starts: dict[tuple[int, ...], tuple[float, int, Schedule, Drops]] = {}
    for fit in sorted(fitting, key=lambda f: (f[0], f[1], not f[3].reuse)):
        starts.setdefault(fit[3].dropped, fit)
    for k, (seconds, peak, schedule, drops) in enumerate(list(starts.values())[:KEEP_STARTS]):
        if meets_bound(best[1], first.lower_bound_s) or (
                k > 0 and time.perf_counter() > deadline):
            break
        kept_best, kept_drops, changes = keep_what_fits(graph, budget_bytes, (schedule, seconds, peak), drops, deadline)
        if kept_best[1] < best[1]:
            best, best_drops, kept = kept_best, kept_drops, changes
    wall_s = time.perf_counter() - started
    # "drops": the best schedule's, or the covering solution's when none fits (solvers/drop_search.py starts there)
    if best_drops is None and first.recomputed is not None:
        best_drops = Drops(first.recomputed)
    detail = {"tried": tried, "covering_solves": solves, "kept": dict(kept), "drops": best_drops,
              "incumbents": tuple(incumbents)}
    if best is None:
        return SolverResult("cover-round", NO_SOLUTION, None, wall_s=wall_s, detail=detail,
                            message="dropping what the covering bound recomputes overshoots the budget")
    schedule, seconds, peak = best
    return SolverResult("cover-round", FEASIBLE, schedule, objective_s=seconds, wall_s=wall_s, detail=detail,
                        message=f"drops the values the covering bound recomputes ({solves} covering solve(s))")


def keep_what_fits(graph: Graph, budget_bytes: int, best: tuple[Schedule, float, int], drops: Drops,
                   deadline: float) -> tuple[tuple[Schedule, float, int], Drops, Counter[str]]:
    """Keep in memory what the schedule need not recompute, one value at a time while it still fits, the costliest
    to recompute first:
    - "undo" a drop: the covering solution drops what its accounting needs, which can be more than the schedule
      needs;
    - "hold" an input computed again only to recompute a dropped value (not dropped itself: its last reader ran
      before the point). The covering bound counts the dropped value's recomputation only, so such an input makes
      the plan cost more than the bound even where holding it fits (U-Net at 50%: bringing back a dropped
      concatenation recomputed the convolution it concatenates; held, the plan meets the bound);
    - "reuse" a value release_held made fresh: it let go of values at the peak, the cheapest per byte first, and
      later ones may have made room for an earlier one (ResNet-50 at 1.1 x min: +24.7% -> +24.2%).
    Until the deadline. Returns the best schedule, its drops and how many changes of each kind it kept."""
    kept: Counter[str] = Counter()
    counts = best[0].compute_counts()
    changes = [(v, "undo") for v in drops.dropped]
    changes += [(v, "hold") for v, count in enumerate(counts)
                if count > 1 and v not in drops.dropped and v not in drops.held]
    changes += [(v, "reuse") for v in drops.fresh]
    for v, change in sorted(changes, key=lambda item: graph.nodes[item[0]].compute_s, reverse=True):
        if time.perf_counter() > deadline:
            break
        if change == "undo":
            changed = replace(drops, dropped=tuple(d for d in drops.dropped if d != v))
        elif change == "hold":
            changed = replace(drops, held=drops.held | {v})
        else:
            changed = replace(drops, fresh=drops.fresh - {v})
        schedule = schedule_for_drops_within(graph, changed, best[1])
        if schedule is None:
            continue  # costs more than the best: not simulated
        sim = simulate(graph, schedule)
        if sim.peak_bytes <= budget_bytes and sim.compute_s < best[1]:
            best, drops = (schedule, sim.compute_s, sim.peak_bytes), changed
            kept[change] += 1
    return best, drops, kept
