"""Coarsening: any coarse schedule expands into a valid fine schedule that is no bigger."""


from hypothesis import given, settings
from hypothesis import strategies as st

from remat.schedule import Schedule
from remat.simulate import simulate
from solvers.coarsen import coarsen, contiguous_groups
from tests.graphs import ancestors, chain_training_graph, eager_schedule, make_graph


def recompute_everything(graph):
    """Run each node after recomputing all of its ancestors; keep nothing in between."""
    ops = []
    for target in range(len(graph)):
        order = sorted(ancestors(graph, target))
        last = {d: i for i in order for d in graph.nodes[i].deps}
        for i in order:
            ops.append(("compute", i))
            ops += [("free", d) for d in sorted(set(graph.nodes[i].deps)) if last[d] == i]
        ops.append(("free", target))
    return Schedule.from_pairs(ops, len(graph))


@st.composite
def dags(draw):
    n = draw(st.integers(4, 30))
    deps = [sorted(set(draw(st.lists(st.integers(0, i - 1), max_size=3)))) if i else [] for i in range(n)]
    sizes = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    backward = sorted(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return make_graph(deps, sizes, [1.0] * n, outputs=[n - 1], backward=backward)


@settings(max_examples=60, deadline=None)
@given(dags(), st.integers(1, 12))
def test_expanded_schedules_are_valid_and_within_the_coarse_peak(graph, max_nodes):
    coarsening = coarsen(graph, contiguous_groups(graph, max_nodes))
    coarse = coarsening.coarse
    assert len(coarse) <= max(max_nodes, 1) or len(coarse) == 1
    assert sorted(m for g in coarsening.groups for m in g) == list(range(len(graph)))
    for coarse_schedule in (eager_schedule(coarse), recompute_everything(coarse)):
        coarse_sim = simulate(coarse, coarse_schedule)
        fine_sim = simulate(graph, coarsening.expand(coarse_schedule))
        assert coarse_sim.valid and fine_sim.valid, fine_sim.errors
        assert fine_sim.peak_bytes <= coarse_sim.peak_bytes
        assert abs(fine_sim.compute_s - coarse_sim.compute_s) < 1e-9


def test_groups_never_mix_forward_and_backward_and_isolate_big_tensors():
    graph = chain_training_graph(30)
    sizes = [n.output_bytes for n in graph.nodes]
    sizes[15] = 10_000  # one giant activation
    graph = make_graph([list(n.deps) for n in graph.nodes], sizes, outputs=list(graph.outputs),
                       backward=[n.is_backward for n in graph.nodes])
    groups = contiguous_groups(graph, 12)
    assert len(groups) <= 12
    assert [15] in groups
    for group in groups:
        assert len({graph.nodes[m].is_backward for m in group}) == 1


def test_small_graphs_are_not_coarsened():
    graph = chain_training_graph(3)
    assert contiguous_groups(graph, 100) == [[i] for i in range(len(graph))]
