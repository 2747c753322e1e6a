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
output after its own last read), so the bound stays valid under that accounting too.
It is loose where recomputing a value needs its inputs back too (long recomputation chains), so the
gap it implies is an upper bound on the true gap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from remat.graph import Graph, Node
from solvers.base import SolveOptions

CHAINED_MOMENTS = 12  # the most crowded moments get the chained form (recomputing needs the inputs back)
MILP_SHARE = 0.75  # of the time limit, for the covering MILP; its LP relaxation (the fallback) gets the rest


@dataclass(frozen=True)
class Bound:
    lower_bound_s: float | None  # None: no schedule of the class fits the budget (proven)
    method: str  # "covering", "covering-lp" (the relaxation, when the MILP ran out of time), "store-all"
    wall_s: float
    proven_infeasible: bool = False


def parts(node: Node) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(bytes, readers) of each output of an op with several that the simulator releases one by one; () else.
    (getattr: graphs saved before outputs were tracked separately have no such fields.)"""
    return tuple(zip(getattr(node, "part_bytes", ()), getattr(node, "part_users", ()), strict=True))


def held_bytes(node: Node, t: int, read_by_t: bool) -> int:
    """Bytes of a value, computed once before node t first runs, still in memory while t runs: all of them, or
    for an op with several outputs (remat/simulate.py releases each after its own last read) the outputs that
    a node after t reads (or t itself, when t reads the value)."""
    if not parts(node):
        return node.output_bytes
    return sum(size for size, users in parts(node) if any(u > t or (read_by_t and u == t) for u in users))


def covering_bound(graph: Graph, budget_bytes: int, options: SolveOptions | None = None,
                   chained_moments: int = CHAINED_MOMENTS) -> Bound:
    """The lifetime covering bound (see the module docstring), solved with HiGHS within the time limit."""
    import pulp

    from solvers.checkmate import solve_problem

    options = options or SolveOptions(time_limit_s=10.0)
    started = time.perf_counter()
    n = len(graph)
    nodes = graph.nodes
    if n == 0:
        return Bound(0.0, "store-all", 0.0)
    last_user = [max(graph.users[v], default=v) for v in range(n)]
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
    moments: list[tuple[int, int, list[int]]] = []  # (bytes over, t, values alive across t and not read by t)
    alive: set[int] = set()
    starts: dict[int, list[int]] = {}
    for v in range(n):
        if last_user[v] > v + 1 and nodes[v].output_bytes > 0:
            starts.setdefault(v + 1, []).append(v)
    for t in range(n):
        alive.update(starts.get(t, ()))
        alive = {v for v in alive if last_user[v] > t}
        deps = set(nodes[t].deps)
        optional = sorted(v for v in alive if v not in deps and held_bytes(nodes[v], t, read_by_t=False) > 0)
        forced = nodes[t].output_bytes + nodes[t].workspace_bytes + sum(held_bytes(nodes[d], t, True) for d in deps)
        if forced > capacity:  # t's run alone does not fit (its inputs' outputs that t or a later op reads)
            return Bound(None, "covering", time.perf_counter() - started, proven_infeasible=True)
        over = forced + sum(held_bytes(nodes[v], t, False) for v in optional) - capacity
        if over > 0:
            moments.append((over, t, optional))
    if not moments:
        return Bound(graph.compute_s, "store-all", time.perf_counter() - started)

    chained: set[int] = set()  # the most crowded moments with distinct alive sets get the chained form
    seen: set[tuple[int, ...]] = set()
    for _, t, optional in sorted(moments, reverse=True):
        if len(chained) >= chained_moments:
            break
        if tuple(optional) not in seen:
            seen.add(tuple(optional))
            chained.add(t)

    for over, t, optional in moments:
        deps = set(nodes[t].deps)
        if t not in chained:
            # (C_t): the values dropped must free at least `over` bytes
            problem += (pulp.lpSum(held_bytes(nodes[v], t, False) / scale * recomputed(v) for v in optional)
                        >= over / scale, f"C_{t}")
            continue
        # Chained form at t: y_v = v absent at t (then computed again after t, so x_v >= y_v). Recomputing v
        # after t needs each input w back: w alive across t is present unless it is absent (and recomputed)
        # itself; w read by t is present; a w whose last reader ran before t ("dead") was either held
        # through t (h_w: its bytes count at t) or is computed again after t (y_w, x_w >= y_w).
        y: dict[int, pulp.LpVariable] = {v: problem.add_variable(f"y_{t}_{v}", 0, 1, pulp.LpBinary) for v in optional}
        held: dict[int, pulp.LpVariable] = {}
        held_size: dict[int, int] = {}
        stack = list(optional)
        while stack:
            v = stack.pop()
            for w in set(nodes[v].deps):
                if w in deps or w in y and w not in held:
                    continue  # present at t unless absent itself (then recomputed): nothing to add
                if parts(nodes[w]):
                    continue  # which of its outputs are in memory at t is not tracked here: no constraint (weaker)
                if w not in held:  # a dead input: held through t, or computed again after t
                    held[w] = problem.add_variable(f"h_{t}_{w}", 0, 1, pulp.LpBinary)
                    y[w] = problem.add_variable(f"y_{t}_{w}", 0, 1, pulp.LpBinary)
                    stack.append(w)
                held_size[w] = nodes[w].output_bytes
                problem.addConstraint(y[v] <= y[w] + held[w], f"chain_{t}_{v}_{w}")
        for v, gone in y.items():
            problem.addConstraint(gone <= recomputed(v), f"once_{t}_{v}")
        problem += (pulp.lpSum(held_bytes(nodes[v], t, False) / scale * y[v] for v in optional)
                    - pulp.lpSum(held_size[w] / scale * h for w, h in held.items()) >= over / scale,
                    f"C_{t}")
    problem += pulp.lpSum(nodes[v].compute_s / second * var for v, var in x.items())
    # The time limit covers the whole bound: the MILP gets most of it, and the LP relaxation (the fallback when
    # the MILP's root does not finish) the rest, or a quarter of the limit if the MILP left less.
    outcome = solve_problem(problem, options, deadline=started + MILP_SHARE * options.time_limit_s)
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
        if outcome.status != "optimal" or outcome.objective is None:
            return Bound(graph.compute_s, "store-all", wall_s)
        outcome = replace(outcome, bound=outcome.objective)
        method = "covering (LP relaxation)"
    # HiGHS's bound carries its tolerances: shave a relative 1e-9 so rounding never lifts it past the optimum
    extra_s = max(0.0, outcome.bound * second * (1 - 1e-9))
    return Bound(graph.compute_s + extra_s, method, wall_s)
