"""Today's tools as schedules of our graph, judged by our simulator.

`compile-budget-B` is the choice of torch.compile's min-cut partitioner under
`activation_memory_budget = B`: it saves a set of forward values for the backward and recomputes
every other forward value the backward reads from them. `saved_set_plan` turns such a saved set into
a RematPlan: forward values not saved are dropped after their last forward use, and each one the
backward needs is recomputed once, right before its first backward use (directly, or through the
recomputation of another dropped value), and kept until its last use, as torch's backward graph does.

The baselines (store-all, checkpoint-all, chen-sqrtn, per-block as Hugging Face does it, ...) are in
solvers/baselines.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from remat.capture import CapturedStep, aliasing_input, compile_budget_saved
from remat.graph import Graph
from remat.planner import Candidate
from remat.schedule import Schedule
from remat.simulate import simulate
from solvers.base import FEASIBLE, NO_SOLUTION
from solvers.baselines import Recompute, RematPlan, build_schedule, first_backward_index

COMPILE_PREFIX = "compile-budget"
COMPILE_BUDGETS = (1.0, 0.5, 0.2, 0.0)  # torch.compile's activation_memory_budget values in the report


def compile_method(activation_memory_budget: float) -> str:
    """"compile-budget-0.5" for 0.5."""
    return f"{COMPILE_PREFIX}-{float(activation_memory_budget)!r}"


def compile_budget_of(method: str) -> float | None:
    """0.5 for "compile-budget-0.5"; None for any other method name."""
    if not method.startswith(COMPILE_PREFIX + "-"):
        return None
    try:
        value = float(method.removeprefix(COMPILE_PREFIX + "-"))
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def fx_to_node(graph: Graph) -> dict[str, int]:
    """FX node name -> index of the Graph node owning its storage (a view counts as its owner)."""
    index = {}
    for i, node in enumerate(graph.nodes):
        for name in (node.name, *node.fx_nodes):
            index[name] = i
    return index


def saved_set_plan(graph: Graph, saved: Iterable[int]) -> RematPlan:
    """Keep the `saved` forward nodes for the backward; drop the other forward values and recompute
    each one the backward needs once, before its first (direct or indirect) backward use.

    The values recomputed before one main-walk position form one group; a value is kept after its group
    only when a backward node or a later group reads it, so a chain recomputed only to reach a value the
    backward reads is freed as it goes, as in torch's backward graph.
    """
    forward_end = first_backward_index(graph)
    dropped = set(range(forward_end)) - set(saved)
    users = graph.users
    first_need: dict[int, int] = {}  # dropped value -> the first main-walk position that needs it back
    for v in reversed(range(forward_end)):  # users come after v: their first_need is known
        if v not in dropped:
            continue
        needs = [u for u in users[v] if u >= forward_end]
        needs += [first_need[u] for u in users[v] if u in first_need]
        if needs:
            first_need[v] = min(needs)
    groups: dict[int, list[int]] = {}
    for v, position in sorted(first_need.items()):
        groups.setdefault(position, []).append(v)
    recomputes = []
    for position, members in sorted(groups.items()):
        targets = [v for v in members  # read by the backward, or by a later group
                   if any(u >= forward_end or first_need.get(u, -1) > position for u in users[v])]
        recomputes.append(Recompute(position, tuple(members), targets=tuple(targets)))
    return RematPlan(frozenset(dropped), tuple(recomputes))


def saved_set_schedule(graph: Graph, saved_fx_names: Iterable[str]) -> tuple[Schedule, int, int]:
    """(schedule, saved forward nodes, saved names not found in the graph) for a set of saved FX values
    (storage owners: resolve views with `storage_owners` first)."""
    index = fx_to_node(graph)
    forward_end = first_backward_index(graph)
    saved, missing = set(), 0
    for name in saved_fx_names:
        if name not in index:
            missing += 1
        elif index[name] < forward_end:
            saved.add(index[name])
    return build_schedule(graph, saved_set_plan(graph, saved)), len(saved), missing


def storage_owners(step: CapturedStep, fx_names: Iterable[str]) -> set[str]:
    """The FX values owning the storage of `fx_names` (a view's base, followed to the end), leaving out
    placeholders: parameters and inputs are fixed memory, not activations."""
    by_name = {node.name: node for node in step.joint.graph.nodes}
    owners = set()
    for name in fx_names:
        node = by_name[name]
        while (base := aliasing_input(node)) is not None:
            node = base
        if node.op != "placeholder":
            owners.add(node.name)
    return owners


def compile_budget_candidate(step: CapturedStep, graph: Graph, activation_memory_budget: float) -> Candidate:
    """torch.compile's saved set at this budget as a schedule of `graph`, simulated."""
    started = time.perf_counter()
    method = compile_method(activation_memory_budget)
    try:
        names = compile_budget_saved(step, activation_memory_budget)
    except Exception as error:  # the partitioner is private API: say what failed, keep the report going
        first_line = (str(error).strip().splitlines() or [""])[0]
        return Candidate(method, NO_SOLUTION, None, None, time.perf_counter() - started,
                         f"torch's partitioner failed: {type(error).__name__}: {first_line}")
    schedule, kept, missing = saved_set_schedule(graph, storage_owners(step, names))
    simulation = simulate(graph, schedule)
    if not simulation.valid:
        return Candidate(method, NO_SOLUTION, None, simulation, time.perf_counter() - started,
                         f"the saved set gave an invalid schedule: {simulation.errors[0]}")
    message = f"saves {kept} forward values"
    if missing:
        message += f"; {missing} saved values not in our graph"
    return Candidate(method, FEASIBLE, schedule, simulation, time.perf_counter() - started, message)
