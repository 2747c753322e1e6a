"""Lower bounds on the optimal seconds of a graph at a budget, cheap enough for graphs the MILP cannot take.

Lifetime covering bound. Take any schedule that computes nodes for the first time in index order (every
schedule our solvers emit, and every solution of Checkmate's MILP: its stage t computes node t first).
Let x_v = 1 when value v is computed more than once. If x_v = 0, v's only computation precedes the first
computation of every t > v, and v is read by its users, so v is in memory while node t first runs for
every v < t < max(users of v). At that moment memory also holds t's inputs, t's output and workspace. So

    for every t:  fixed + ws(t) + out(t) + sum(out(d), d in deps(t))
                  + sum(out(v) * (1 - x_v), v < t, v not in deps(t), max users(v) > t)  <=  budget   (C_t)

and the schedule costs at least  sum(compute_s) + sum(compute_s(v) * x_v)  (each recomputed value at least
once more). The covering MILP  min sum(c_v x_v) s.t. (C_t), x binary  is a relaxation of the scheduling
problem, so its optimum, and any dual bound HiGHS proves for it, plus the store-all seconds is a valid
lower bound. It is infeasible only when no schedule in that class fits (then the budget is infeasible).
An op with several outputs counts, at t, only the outputs read at or after t (the simulator releases each
output after its own last read), and as an input of t only the outputs t reads; its outputs that t does not
read and a later op does are in memory unless it is computed again, like an alive value's. So the bound stays
valid under that accounting too.
It is loose where recomputing a value needs its inputs back too (long recomputation chains): at the most
crowded moments a chained form says so (below). And it counts each recomputed value once, where a value brought
back to recompute another and then dropped again, because holding it until its own readers does not fit, is
computed twice (revolve's case): pairs of those moments say so too (second_computations, on graphs of up to
PAIRS_MAX_NODES), and chains of those moments count the third and later computations. The gap it implies
is an upper bound on the true gap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from remat.graph import Graph, Node
from remat.schedule import COMPUTE, Schedule
from solvers.base import SolveOptions

if TYPE_CHECKING:
    import pulp

CHAINED_MOMENTS = 12  # the most crowded moments get the chained form (recomputing needs the inputs back)
CHAINED_NODE_MOMENTS = 1200  # small graphs chain more: up to this many chained moments x nodes. A 24-layer chain's
# step (49 nodes) at its smallest budgets needs every moment chained to prove its plans (revolve's many recomputations)
PAIRS_MAX_NODES = 600  # larger graphs go without second computations: on GPT-2's step (968 nodes) at 1.1 x min they
# lifted the bound 0.13 points for 10 s more (37 s against 27 s), time the planner's plans on such graphs need more
COUNT_MAX_NODES = 200  # graphs up to this size count third and later computations (second_computations). On the
# CNNs' steps (215 to 520 nodes) counting raised no bound and slowed the covering MILP by 1 to 2 s (U-Net at 1.1 x min:
# 2.8 -> 4.6 s; ResNet-50 at 50% no longer proven in its 5-s share of a 30-s plan); on chains' steps it is the proof
FOCUS_MOMENTS = 8  # chained moments from `focus` stretches at most: each adds pairs to second_computations. At 1.1 x
# min, from the stretches of a 30-s plan and cover-round's, with the 12 most crowded moments: U-Net +23.24% -> +23.71%
# in 6 s (+25.15% solved, 35 s); ResNet-50 +20.97% -> +21.06% (+21.37%, 28 s); MobileNet-v2 +21.52% -> +22.11% (2 s)
PAIRS_MIN_S = 2.0  # a bound given less time goes without second computations on graphs past COUNT_MAX_NODES: building
# them is not timed (ResNet-50's step, 520 nodes: 3.2 s on a busy machine), and auto at --time-limit 1 took 7 to 9 s
# there, the bound most of it; small graphs build them in milliseconds (and chains' proofs need them)
MILP_SHARE = 0.75  # of the time limit, for the covering MILP; its LP relaxation (the fallback) gets the rest
MAX_MOMENT_TERMS = 1_000_000  # (C_t) terms at most, the most crowded moments first: any subset of the moments gives
# a valid bound. DenseNet-121's step (1,707 nodes) has 0.5M, built in 2 s; a 2-layer LSTM unrolled over 128 steps
# (10,276 nodes, ~1,800 values alive at each of 3,500 moments) 6.2M, built in 55 s, past any time limit.


@dataclass(frozen=True)
class Bound:
    lower_bound_s: float | None  # None: no schedule of the class fits the budget (proven)
    # "covering"; "covering (dual bound at the time limit)", "covering (LP relaxation)" (the MILP's root did not
    # finish) or "covering (not solved in time: ...)" when cut short; "store-all" when nothing needs recomputing
    method: str
    wall_s: float
    proven_infeasible: bool = False
    recomputed: tuple[int, ...] | None = None  # the covering MILP's incumbent x (values it recomputes), if any
    # every improving incumbent's x, in the order HiGHS found them (`recomputed` last, when the MILP gave one):
    # solutions near the optimum can differ a lot as schedules (solvers/cover_round.py tries each)
    incumbents: tuple[tuple[int, ...], ...] = ()


def parts(node: Node) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(bytes, readers) of each output of an op with several that the simulator releases one by one; () else."""
    return tuple(zip(node.part_bytes, node.part_users, strict=True))


def held_bytes(node: Node, t: int, read_by_t: bool) -> int:
    """Bytes of a value, computed once before node t first runs, still in memory while t runs: all of them, or
    for an op with several outputs (remat/simulate.py releases each after its own last read) the outputs that
    a node after t reads (or t itself, when t reads the value)."""
    if not parts(node):
        return node.output_bytes
    return sum(size for size, users in parts(node) if any(u > t or (read_by_t and u == t) for u in users))


def read_bytes(node: Node, t: int) -> int:
    """Bytes of `node`'s value that node t reads: all of them, or of an op with several outputs those t reads."""
    if not parts(node):
        return node.output_bytes
    return sum(size for size, users in parts(node) if t in users)


def later_only_bytes(node: Node, t: int) -> int:
    """Bytes of the outputs of an op with several that t, a reader of the op, does not read and a later op does."""
    return sum(size for size, users in parts(node) if t not in users and max(users, default=-1) > t)


def dead_bytes(node: Node, last_reader: int, reader: int, t: int) -> int:
    """Bytes of `node`'s value that `reader` reads and that no reader at or after t reads: gone at t unless held
    on (the whole value, or for an op with several outputs released one by one the outputs `reader` reads).
    `last_reader`: the node's last reader."""
    if not parts(node):
        return node.output_bytes if last_reader < t else 0
    return sum(size for size, users in parts(node) if reader in users and max(users, default=-1) < t)


def second_computations(problem: pulp.LpProblem, graph: Graph, absent_at: dict[int, tuple[dict, dict]],
                        last_user: Sequence[int], recomputed: Callable[[int], pulp.LpVariable],
                        count_chains: bool = True) -> dict[int, pulp.LpVariable]:
    """Values computed twice or more again, from pairs of chained moments s < t (Checkmate's revolve effect):
    {w: e_w, its computations beyond its first two}. `recomputed(w)`: the covering's x_w. `count_chains`: count the
    third and later computations too (below).

    A value v absent at s (y_v of s) and read at some u in (s, t] is computed again in (s, u). So is each input w
    that this needs and that was absent at s too (or dead at s and not held through it), recursively: w is then
    in memory at some point in (s, t). If w is absent at t as well (y_w of t) and read after t, it is computed
    once more after t: at least twice in all, where x_w counts once. e_w >= [w computed in (s, t)] + y_w(t) - 1
    adds w's seconds again. The [w computed in (s, t)] indicators are continuous: their lower bounds are 0 or 1
    whenever the y and h variables are.
    Computations in disjoint intervals add up: a value computed in (s1, t1), again in (s2, t2) with t1 <= s2, and
    absent at t2 and read later is computed four times. On a chain's step at its smallest budgets (revolve's
    quadratic regime) this makes the bound the optimum: an 8-layer chain's step at 40 bytes costs 38 s, where
    counting at most twice gave 28 s (tests/test_bounds.py; 12 layers: 80 s against 44 s).
    For an op with several outputs released one by one, y says only that some output held across the moment is
    absent, not which (a schedule may hold the one a reader needs and drop another): such an op joins only as a
    dead input (what v reads of it is known gone unless held) or as the w absent at t, never through its y at s."""
    import pulp

    nodes = graph.nodes
    second: dict[int, pulp.LpVariable] = {}
    spans: dict[int, list[tuple[int, int, pulp.LpVariable]]] = {}  # w -> (s, t, [w computed in (s, t)]), to count
    order = sorted(absent_at)
    for k, s in enumerate(order):
        y_s, held_s = absent_at[s]
        for t in order[k + 1:]:
            y_t = absent_at[t][0]
            computed: dict[int, pulp.LpVariable] = {}  # value -> its [computed in (s, t)] (its own, or y_v of s)
            for v, gone in y_s.items():
                if not parts(nodes[v]) and any(s < u <= t for u in graph.users[v]):
                    computed[v] = gone
            read_inside = set(computed)
            stack = list(computed)
            while stack:
                v = stack.pop()
                for w in set(nodes[v].deps):
                    if w in read_inside:
                        continue  # absent at s and read in (s, t]: computed there already
                    if dead_bytes(nodes[w], last_user[w], v, s) > 0:
                        if w not in held_s:
                            continue
                        floor = computed[v] - held_s[w]  # dead at s: computed again unless held through s
                    elif w in y_s and not parts(nodes[w]):
                        floor = computed[v] + y_s[w] - 1  # absent at s: computed again to be read
                    else:
                        continue
                    if w not in computed:
                        computed[w] = problem.add_variable(f"in_{s}_{t}_{w}", 0, 1, pulp.LpContinuous)
                        stack.append(w)
                    problem.addConstraint(computed[w] >= floor, f"need_{s}_{t}_{w}_{v}")
            if count_chains:
                for w, inside_s_t in computed.items():
                    spans.setdefault(w, []).append((s, t, inside_s_t))
                continue
            for w, inside_s_t in computed.items():  # computed in (s, t), and again after t when absent at t
                if w in y_t:
                    if w not in second:
                        second[w] = problem.add_variable(f"e_{w}", 0, 1, pulp.LpContinuous)
                    problem.addConstraint(second[w] >= inside_s_t + y_t[w] - 1, f"twice_{s}_{t}_{w}")
    # Computations in disjoint intervals add up: count[t] is at least w's computations after its first and before
    # moment t, the most any chain of intervals (s1, t1), (s2 >= t1, t2), ..., ending at t gives. One more follows t
    # when w is absent at t (and read later). x_w counts one of them, e_w the rest.
    for w, intervals in spans.items():
        second[w] = problem.add_variable(f"e_{w}", 0, None, pulp.LpContinuous)
        count: dict[int, pulp.LpVariable] = {}
        for s, t, inside_s_t in sorted(intervals, key=lambda interval: interval[1]):  # chains ending at s first
            # computed in (s, t), after its first computation (w < s): computed more than once. It tightens the
            # relaxation (a 14-layer chain's step at 50 B: proven in 2 s, not within 4 s without these rows)
            problem.addConstraint(recomputed(w) >= inside_s_t, f"more_{s}_{t}_{w}")
            if t not in count:
                count[t] = problem.add_variable(f"count_{t}_{w}", 0, None, pulp.LpContinuous)
            problem.addConstraint(count[t] >= count.get(s, 0) + inside_s_t, f"count_{s}_{t}_{w}")
        for t, counted in count.items():
            y_t = absent_at[t][0]
            problem.addConstraint(second[w] >= counted + (y_t[w] if w in y_t else 0) - 1, f"again_{t}_{w}")
    return second


def chained_moments_for(nodes: int) -> int:
    """How many moments get the chained form on a graph of this many nodes."""
    return max(CHAINED_MOMENTS, CHAINED_NODE_MOMENTS // max(nodes, 1))


def recomputed_again(graph: Graph, schedules: Sequence[Schedule]) -> list[tuple[int, int]]:
    """Where schedules let go of a value they had computed again, until they compute it once more: (the first moment
    it is gone, the stage that computes it again), for each value a schedule computes three times or more; those of
    the costliest values first. A moment is a node's first run; stage t computes again what node t needs, then
    runs it. The covering bound counts one recomputation a value unless a pair of chained moments shows a second:
    a moment in such a stretch is where one may show (covering_bound's `focus`)."""
    stretches: dict[tuple[int, int], float] = {}  # stretch -> the seconds of the values computed again around it
    for schedule in schedules:
        ops = schedule.ops
        seen: set[int] = set()
        first_time = [False] * len(ops)  # a node's first computation
        for position, op in enumerate(ops):
            if op.kind == COMPUTE and op.node not in seen:
                first_time[position] = True
                seen.add(op.node)
        moment = [len(graph)] * (len(ops) + 1)  # the first moment at or after each instruction
        for position in reversed(range(len(ops))):
            moment[position] = ops[position].node if first_time[position] else moment[position + 1]
        gone: dict[int, int] = {}  # value -> the first moment after it was let go, once it has been computed again
        computed_again: set[int] = set()
        for position, op in enumerate(ops):
            v = op.node
            if op.kind != COMPUTE:
                if v in computed_again:
                    gone[v] = moment[position + 1]
            elif not first_time[position]:
                if v in gone and gone[v] < moment[position]:
                    stretch = (gone[v], moment[position])
                    stretches[stretch] = stretches.get(stretch, 0.0) + graph.nodes[v].compute_s
                gone.pop(v, None)
                computed_again.add(v)
    return sorted(stretches, key=lambda stretch: (-stretches[stretch], stretch))


def most_crowded(moments: list[tuple[int, int, dict[int, int]]], max_terms: int) -> list[tuple[int, int, dict]]:
    """The moments (bytes over, t, values that may free bytes), most bytes over first, until their values number
    `max_terms`; in their order (by t). All of them when they fit."""
    if sum(len(optional) for *_, optional in moments) <= max_terms:
        return moments
    kept, terms = [], 0
    for moment in sorted(moments, key=lambda moment: moment[:2], reverse=True):
        if kept and terms + len(moment[2]) > max_terms:
            break
        kept.append(moment)
        terms += len(moment[2])
    return sorted(kept, key=lambda moment: moment[1])


def covering_bound(graph: Graph, budget_bytes: int, options: SolveOptions | None = None,
                   chained_moments: int | None = None, focus: Sequence[tuple[int, int]] = ()) -> Bound:
    """The lifetime covering bound (see the module docstring), solved with HiGHS within the time limit.
    `chained_moments`: how many of the most crowded moments get the chained form (chained_moments_for by default).
    `focus`: stretches of moments (first, last), such as recomputed_again's; in each, the most crowded moment from
    first to the one before last and that last one get the chained form too, until FOCUS_MOMENTS more moments have
    it. The most crowded moments sit where the forward turns into the backward; a plan can compute a value a third
    time much later, in the backward (ResNet-50 at 1.1 x min: its first stage's values are brought back to
    recompute others and again for their own readers), and moments there let the pairs count it. Any choice of
    moments gives a valid bound."""
    import pulp

    from solvers.checkmate import solve_problem

    options = options or SolveOptions(time_limit_s=10.0)
    started = time.perf_counter()
    n = len(graph)
    nodes = graph.nodes
    if n == 0:
        return Bound(0.0, "store-all", 0.0)
    last_user = graph.last_users
    capacity = budget_bytes - graph.fixed.total_bytes
    scale = max(capacity, 1) / 1000.0  # model units of memory, as in the MILP
    second = max(graph.compute_s / n, 1e-12)
    problem = pulp.LpProblem("covering", pulp.LpMinimize)
    x: dict[int, pulp.LpVariable] = {}

    def recomputed(v: int) -> pulp.LpVariable:
        if v not in x:
            x[v] = problem.add_variable(f"x_{v}", 0, 1, pulp.LpBinary)
        return x[v]

    # The moments that need a value dropped: the first run of t, with the values alive across it.
    moments: list[tuple[int, int, dict[int, int]]] = []  # (bytes over, t, {value: bytes it may free at t})
    alive: set[int] = set()
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for v in range(n):
        if last_user[v] > v + 1 and nodes[v].output_bytes > 0:
            starts.setdefault(v + 1, []).append(v)
            ends.setdefault(last_user[v], []).append(v)
    # Values held whole are summed as they come and go (a 10,276-node LSTM step has ~1,800 alive at each t); the
    # outputs of ops with several are counted at each t, as the simulator releases them one by one.
    whole = [0 if parts(node) else node.output_bytes for node in nodes]
    alive_whole = 0
    alive_parts: set[int] = set()
    for t in range(n):
        for v in starts.get(t, ()):
            alive.add(v)
            alive_whole += whole[v]
            if not whole[v]:
                alive_parts.add(v)
        for v in ends.get(t, ()):
            alive.discard(v)
            alive_whole -= whole[v]
            alive_parts.discard(v)
        deps = set(nodes[t].deps)
        forced = (nodes[t].output_bytes + nodes[t].workspace_bytes
                  + sum(read_bytes(nodes[d], t) for d in deps))
        if forced > capacity:  # t's run alone does not fit (t's output and workspace, what it reads)
            return Bound(None, "covering", time.perf_counter() - started, proven_infeasible=True)
        # bytes in memory at t unless the value is recomputed: of the values alive across t, and of t's inputs
        # the outputs that t does not read but a later op does (they may be released and recomputed)
        optional_bytes = (alive_whole - sum(whole[d] for d in deps if d in alive)
                          + sum(held_bytes(nodes[v], t, read_by_t=False) for v in alive_parts if v not in deps)
                          + sum(later_only_bytes(nodes[d], t) for d in deps))
        over = forced + optional_bytes - capacity
        if over > 0:
            optional = {v: held_bytes(nodes[v], t, read_by_t=False) if not whole[v] else whole[v]
                        for v in alive if v not in deps}
            optional.update((d, later_only_bytes(nodes[d], t)) for d in deps)
            moments.append((over, t, {v: size for v, size in sorted(optional.items()) if size > 0}))
    if not moments:
        return Bound(graph.compute_s, "store-all", time.perf_counter() - started)
    moments = most_crowded(moments, MAX_MOMENT_TERMS)

    if chained_moments is None:
        chained_moments = chained_moments_for(n)
    chained: set[int] = set()  # the most crowded moments with distinct alive sets get the chained form
    seen: set[tuple[int, ...]] = set()
    for _, t, optional in sorted(moments, key=lambda moment: moment[:2], reverse=True):
        if len(chained) >= chained_moments:
            break
        if tuple(optional) not in seen:
            seen.add(tuple(optional))
            chained.add(t)
    focused: set[int] = set()
    for first, last in focus:
        inside = [(over, t) for over, t, _ in moments if first <= t < last]  # the value is gone at these moments
        if inside:  # no one moment of a stretch does it on all three CNNs near their minimum budgets: two
            focused |= {max(inside)[1], inside[-1][1]} - chained
        if len(focused) >= FOCUS_MOMENTS:
            break
    chained |= focused

    absent_at: dict[int, tuple[dict, dict]] = {}  # chained moment t -> (its y_v, its h_w)
    for over, t, optional in moments:
        if t not in chained:
            # (C_t): the values dropped must free at least `over` bytes
            problem += (pulp.LpAffineExpression([(recomputed(v), size / scale) for v, size in optional.items()])
                        >= over / scale, f"C_{t}")
            continue
        # Chained form at t: y_v = v absent at t (then computed again after t, so x_v >= y_v). Recomputing v
        # after t needs each input w back: w alive across t is present unless it is absent (and recomputed)
        # itself; w read by t is present; what v reads of a w whose last reader of it ran before t ("dead": the
        # whole value, or for an op whose outputs are released one by one the outputs v reads) was either held
        # through t (h_w: those bytes count at t) or w is computed again after t (b_w, x_w >= b_w).
        y: dict[int, pulp.LpVariable] = {v: problem.add_variable(f"y_{t}_{v}", 0, 1, pulp.LpBinary) for v in optional}
        back: dict[int, pulp.LpVariable] = {}  # b_w: w computed again after t, for its dead outputs
        held: dict[int, pulp.LpVariable] = {}
        held_size: dict[int, int] = {}
        stack = [(v, y[v]) for v in optional]  # (value, the variable that says it is computed again after t)
        while stack:
            v, again = stack.pop()
            for w in set(nodes[v].deps):
                dead = dead_bytes(nodes[w], last_user[w], v, t)
                if dead == 0:
                    continue  # alive across t: present unless absent itself (then its own chain); or no bytes
                if w not in back:  # a dead input: held through t, or computed again after t
                    back[w] = problem.add_variable(f"b_{t}_{w}", 0, 1, pulp.LpBinary)
                    held[w] = problem.add_variable(f"h_{t}_{w}", 0, 1, pulp.LpBinary)
                    held_size[w] = dead
                    stack.append((w, back[w]))
                held_size[w] = min(held_size[w], dead)  # readers of different outputs: the least is what is sure
                problem.addConstraint(again <= back[w] + held[w], f"chain_{again.name}_{w}")
        for v, gone in (*y.items(), *back.items()):
            problem.addConstraint(gone <= recomputed(v), f"once_{t}_{v}_{'y' if gone is y.get(v) else 'b'}")
        problem += (pulp.lpSum(size / scale * y[v] for v, size in optional.items())
                    - pulp.lpSum(held_size[w] / scale * h for w, h in held.items()) >= over / scale,
                    f"C_{t}")
        absent_at[t] = (y, held)
    again = second_computations(problem, graph, absent_at, last_user, recomputed,
                                count_chains=n <= COUNT_MAX_NODES) \
        if n <= PAIRS_MAX_NODES and (options.time_limit_s >= PAIRS_MIN_S or n <= COUNT_MAX_NODES) else {}
    problem += pulp.lpSum(nodes[v].compute_s / second * var for v, var in (*x.items(), *again.items()))
    # The time limit covers the whole bound: the MILP gets most of it, and the LP relaxation (the fallback when
    # the MILP's root does not finish) the rest, or a quarter of the limit if the MILP left less.
    incumbents: list[tuple[int, ...]] = []

    def keep_incumbent(values: Sequence[float]) -> None:
        incumbents.append(tuple(sorted(v for v, var in x.items() if values[var.index] > 0.5)))

    outcome = solve_problem(problem, options, deadline=started + MILP_SHARE * options.time_limit_s,
                            on_incumbent=keep_incumbent)
    wall_s = time.perf_counter() - started
    if outcome.status == "infeasible":
        return Bound(None, "covering", wall_s, proven_infeasible=True)
    method = "covering" if outcome.status == "optimal" else "covering (dual bound at the time limit)"
    if outcome.bound is None or not math.isfinite(outcome.bound):
        # The MILP's root did not finish in time (large graphs, a busy machine): its LP relaxation is a bound too.
        for variable in problem.variables():
            variable.cat = pulp.LpContinuous
        deadline = max(started + options.time_limit_s, time.perf_counter() + (1 - MILP_SHARE) * options.time_limit_s)
        outcome = solve_problem(problem, options, mip=False, deadline=deadline)
        wall_s = time.perf_counter() - started
        if outcome.status != "optimal" or outcome.objective is None:  # every node once: still a bound
            return Bound(graph.compute_s, "covering (not solved in time: every node once)", wall_s)
        outcome = replace(outcome, bound=outcome.objective)
        method = "covering (LP relaxation)"
    # The incumbent's x: which values it drops (solvers/cover_round.py turns that into a schedule).
    dropped = None
    if method != "covering (LP relaxation)" and outcome.objective is not None:
        dropped = tuple(sorted(v for v, var in x.items() if (var.value() or 0.0) > 0.5))
        if not incumbents or incumbents[-1] != dropped:  # the callback reported it already, or no callback ran
            incumbents.append(dropped)
    # HiGHS's bound carries its tolerances: shave a relative 1e-9 so rounding never lifts it past the optimum
    extra_s = max(0.0, outcome.bound * second * (1 - 1e-9))
    return Bound(graph.compute_s + extra_s, method, wall_s, recomputed=dropped,
                 incumbents=tuple(incumbents))
