"""Baselines: every schedule valid per the simulator, and each one's known behaviour on hand-made graphs."""

from dataclasses import replace
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remat.graph import FixedMemory, Graph, Node
from remat.schedule import FREE, Op, tighten_frees
from remat.simulate import simulate
from solvers import baselines
from solvers.base import FEASIBLE, NO_SOLUTION, SolveOptions
from solvers.baselines import (
    BASELINES,
    cut_vertices,
    find_blocks,
    find_named_blocks,
    revolve,
    revolve_advances,
    shared_values,
)
from solvers.coarsen import coarsen, contiguous_groups
from tests.graphs import chain_training_graph, make_graph

OPTIONS = SolveOptions(time_limit_s=60.0)
BUDGET_DRIVEN = ("chen-greedy", "griewank")


def run(name, graph, budget_bytes=10**12):
    result = BASELINES[name](graph, budget_bytes, OPTIONS)
    simulation = simulate(graph, result.schedule) if result.schedule is not None else None
    return result, simulation


def check_result(name, graph, result, simulation):
    """What every baseline result promises, whatever the graph."""
    assert result.solver == name
    assert result.wall_s >= 0 and result.lower_bound_s is None
    if result.status == NO_SOLUTION:
        assert name in ("per-block", "griewank") and result.schedule is None and result.message
        return
    assert result.status == FEASIBLE
    assert simulation.valid, simulation.errors
    assert result.objective_s == pytest.approx(simulation.compute_s, abs=1e-12)
    assert result.detail["peak_bytes"] == simulation.peak_bytes
    assert min(simulation.compute_counts) >= 1  # the main walk runs every node
    assert simulation.compute_s >= graph.compute_s - 1e-9
    # each value freed at its last read, as the executor frees it: the peak is the one a run holds
    assert frees_after_each_compute(tighten_frees(graph, result.schedule)) == frees_after_each_compute(result.schedule)


def frees_after_each_compute(schedule) -> list[tuple[int, frozenset[int]]]:
    """Each computation with the values freed right after it (in any order)."""
    steps: list[tuple[int, set[int]]] = []
    for op in schedule.ops:
        if op.kind == FREE:
            steps[-1][1].add(op.node)
        else:
            steps.append((op.node, set()))
    return [(node, frozenset(freed)) for node, freed in steps]


def residual_training_graph(blocks: int, width: int = 10, mask: bool = False) -> Graph:
    """A pre-norm residual network's training step with module paths like a transformer's.

    Forward: embed -> [ln_k(x), mlp_k(ln), x + mlp] per block "h.k" -> norm -> loss.
    Backward: norm', then per block mlp' (reads ln), a weight gradient (reads ln), ln' (reads x), then embed'.
    mask: a small node after embed that every mlp (and its backward) reads, like an attention mask.
    """
    deps, sizes, modules, backward = [], [], [], []

    def add(node_deps, size, module, is_backward=False):
        deps.append(node_deps)
        sizes.append(size)
        modules.append(module)
        backward.append(is_backward)
        return len(deps) - 1

    x = add([], width, "embed")
    shared = [add([], 1, "mask")] if mask else []
    block_inputs, norms = [], []
    for k in range(blocks):
        block_inputs.append(x)
        norm = add([x], width, f"h.{k}.ln")
        mlp = add([norm, *shared], 4 * width, f"h.{k}.mlp")  # wide: worth recomputing
        norms.append(norm)
        x = add([x, mlp], width, f"h.{k}")
    final_norm = add([x], width, "norm")
    loss = add([final_norm], 1, "head")
    grad = add([loss, final_norm], width, "norm", True)
    grad = add([grad, x], width, "norm", True)
    outputs = [loss]
    for k in reversed(range(blocks)):
        grad_norm = add([grad, norms[k], *shared], width, f"h.{k}.mlp", True)
        outputs.append(add([grad, norms[k]], width, f"h.{k}.mlp", True))  # weight gradient
        grad = add([grad_norm, block_inputs[k], grad], width, f"h.{k}.ln", True)
    outputs.append(add([grad], width, "embed", True))
    return make_graph(deps, sizes, outputs=outputs, backward=backward, modules=modules)


@st.composite
def training_graphs(draw):
    """Random small training steps: a forward DAG with skips (and roots, side values only the backward
    reads), a loss, a backward that walks it in reverse, forward-labelled nodes inside the backward,
    random sizes, costs, workspaces and block labels."""
    forward_count = draw(st.integers(2, 14))
    deps: list[list[int]] = []
    for i in range(forward_count):
        if i == 0 or draw(st.integers(0, 9)) == 0:
            deps.append([])  # a root (reads only graph inputs)
            continue
        node_deps = {i - 1} if draw(st.integers(0, 4)) else set()
        node_deps |= set(draw(st.lists(st.integers(0, i - 1), max_size=2)))
        deps.append(sorted(node_deps or {i - 1}))
    # block labels: contiguous runs of forward nodes, with some nodes outside any block
    modules, block = [], 0
    for _ in range(forward_count):
        if draw(st.integers(0, 3)) == 0:
            block += 1
        modules.append(f"blocks.{block}.op" if draw(st.integers(0, 5)) else "head")
    loss = len(deps)
    deps.append([forward_count - 1])
    modules.append("head")
    backward = [False] * len(deps)
    outputs, grad = [loss], loss
    for k in reversed(range(forward_count)):
        if draw(st.integers(0, 6)) == 0:  # forward-labelled node in the backward: a constant or a transpose
            deps.append(sorted(set(draw(st.lists(st.integers(0, forward_count - 1), max_size=1)))))
            modules.append(modules[k])
            backward.append(False)
        reads = draw(st.lists(st.sampled_from(sorted({k, *deps[k]})), max_size=2))
        deps.append(sorted({grad, *reads}))
        modules.append(modules[k])
        backward.append(True)
        grad = len(deps) - 1
        if draw(st.booleans()):
            outputs.append(grad)
    n = len(deps)
    outputs.append(n - 1)
    sizes = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    costs = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=n, max_size=n))
    workspaces = draw(st.lists(st.sampled_from([0, 0, 0, 5, 40]), min_size=n, max_size=n))
    nodes = tuple(Node(name=f"n{i}", op="test", deps=tuple(deps[i]), output_bytes=sizes[i], compute_s=costs[i],
                       is_backward=backward[i], workspace_bytes=workspaces[i], module=modules[i]) for i in range(n))
    return Graph(nodes=nodes, outputs=tuple(sorted(set(outputs))), fixed=FixedMemory(parameter_bytes=7))


@st.composite
def arbitrary_dags(draw):
    """Any DAG with forward/backward flags in any order, like the coarse graphs the planner also feeds in."""
    n = draw(st.integers(1, 25))
    deps = [sorted(set(draw(st.lists(st.integers(0, i - 1), max_size=3)))) if i else [] for i in range(n)]
    sizes = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    backward = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    outputs = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
    modules = [f"layers.{draw(st.integers(0, 3))}" for _ in range(n)]
    return make_graph(deps, sizes, outputs=outputs, backward=backward, modules=modules)


# --- every baseline, every graph ---------------------------------------------------------------


def test_the_registry_has_exactly_the_baselines():
    assert set(BASELINES) == {"store-all", "checkpoint-all", "chen-sqrtn", "chen-greedy", "per-block", "griewank"}


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("graph", [chain_training_graph(1), chain_training_graph(5), chain_training_graph(17),
                                   residual_training_graph(1), residual_training_graph(6),
                                   residual_training_graph(6, mask=True)],
                         ids=["chain1", "chain5", "chain17", "residual1", "residual6", "residual6-mask"])
def test_every_baseline_is_valid_on_hand_made_graphs(name, graph):
    result, simulation = run(name, graph)
    check_result(name, graph, result, simulation)


@settings(max_examples=60, deadline=None)
@given(training_graphs(), st.floats(0.0, 1.2))
def test_every_baseline_is_valid_on_random_training_graphs(graph, budget_fraction):
    store_all_peak = run("store-all", graph)[1].peak_bytes
    budget = int(budget_fraction * store_all_peak)
    for name in BASELINES:
        result, simulation = run(name, graph, budget)
        check_result(name, graph, result, simulation)
    # chen-greedy's largest threshold places no checkpoint: it is store-all, the cheapest possible schedule
    if store_all_peak <= budget:
        result, simulation = run("chen-greedy", graph, budget)
        assert simulation.fits(budget) and simulation.compute_s == pytest.approx(graph.compute_s)


@settings(max_examples=60, deadline=None)
@given(arbitrary_dags())
def test_every_baseline_is_valid_on_arbitrary_dags(graph):
    for name in BASELINES:
        check_result(name, graph, *run(name, graph, 0))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_is_valid_on_a_coarsened_graph(name):
    # the planner runs the baselines on coarse graphs too: nodes with workspace, groups of many nodes
    coarse = coarsen(residual_training_graph(8), contiguous_groups(residual_training_graph(8), 20)).coarse
    assert any(node.workspace_bytes for node in coarse.nodes)
    check_result(name, coarse, *run(name, coarse, 0))


# --- store-all, checkpoint-all, chen-sqrtn --------------------------------------------------------


def test_store_all_peak_on_a_chain_by_hand():
    layers = 8
    graph = replace(chain_training_graph(layers, activation_bytes=10), fixed=FixedMemory(parameter_bytes=100))
    result, simulation = run("store-all", graph)
    # at the first backward node: all 8 activations, the 1-byte loss and its 10-byte output, plus fixed memory
    assert simulation.peak_bytes == 100 + 10 * layers + 1 + 10
    assert simulation.compute_counts == (1,) * len(graph)
    assert result.objective_s == graph.compute_s


def test_store_all_frees_each_value_after_its_last_use():
    graph = residual_training_graph(3)
    schedule = run("store-all", graph)[0].schedule
    computed = [op.node for op in schedule.ops if op.kind == "compute"]
    assert computed == list(range(len(graph)))
    position = {}
    for k, op in enumerate(schedule.ops):
        position.setdefault((op.kind, op.node), k)
    for v in range(len(graph)):
        last_reader = max(graph.users[v], default=v)
        # the free comes right after the last reader, before the next node is computed
        assert position[("compute", last_reader)] < position[("free", v)]
        if last_reader + 1 < len(graph):
            assert position[("free", v)] < position[("compute", last_reader + 1)]


def test_fixed_strategies_ignore_the_budget():
    graph = residual_training_graph(4)
    for name in ("store-all", "checkpoint-all", "chen-sqrtn", "per-block"):
        assert run(name, graph, 0)[0].schedule == run(name, graph)[0].schedule


def test_memory_and_time_order_on_a_long_chain():
    graph = chain_training_graph(30)
    store_all = run("store-all", graph)[1]
    sqrtn = run("chen-sqrtn", graph)[1]
    checkpoint_all = run("checkpoint-all", graph)[1]
    assert checkpoint_all.peak_bytes <= sqrtn.peak_bytes < store_all.peak_bytes
    assert checkpoint_all.compute_s > sqrtn.compute_s > store_all.compute_s
    # checkpoint-all holds a few values at a time: the gradient, a layer's input and output, the new gradient
    assert checkpoint_all.activation_peak_bytes <= 4 * 10
    # sqrt(n) stores each forward value at most twice: 30 layers recomputed at most once, not quadratically
    assert sqrtn.compute_s <= 2 * store_all.compute_s


def test_checkpoint_all_is_not_built_past_its_instruction_limit(monkeypatch):
    graph = chain_training_graph(30)
    result, simulation = run("checkpoint-all", graph)
    # recomputing from the input before each backward node: quadratic in the depth
    assert len(result.schedule.ops) > 10 * len(graph) and max(simulation.compute_counts) >= 30
    monkeypatch.setattr(baselines, "CHECKPOINT_ALL_OPS_PER_NODE", 0)
    monkeypatch.setattr(baselines, "CHECKPOINT_ALL_MAX_OPS", len(result.schedule.ops) - 1)
    too_long, _ = run("checkpoint-all", graph)
    assert too_long.status == NO_SOLUTION and too_long.schedule is None
    assert f"more than {len(result.schedule.ops) - 1:,} instructions" in too_long.message
    monkeypatch.setattr(baselines, "CHECKPOINT_ALL_MAX_OPS", len(result.schedule.ops))
    assert run("checkpoint-all", graph)[0].schedule == result.schedule


def test_checkpoint_all_of_a_wide_step_is_built_past_the_flat_limit(monkeypatch):
    """The limit grows with the step: a wide step (GPT-2 small split 64/8/2 ways, 5,444 nodes) has 332 instructions
    per node; a deep chain's schedule grows with the square of its depth and passes any fixed allowance per node."""
    graph = chain_training_graph(30)  # 61 nodes, 1,054 instructions: 17 per node
    ops = len(run("checkpoint-all", graph)[0].schedule.ops)
    monkeypatch.setattr(baselines, "CHECKPOINT_ALL_MAX_OPS", 500)
    monkeypatch.setattr(baselines, "CHECKPOINT_ALL_OPS_PER_NODE", -(-ops // len(graph)))
    assert len(run("checkpoint-all", graph)[0].schedule.ops) == ops
    monkeypatch.setattr(baselines, "CHECKPOINT_ALL_OPS_PER_NODE", ops // len(graph) - 1)
    assert run("checkpoint-all", graph)[0].schedule is None


def test_chen_sqrtn_checkpoints_about_sqrt_n_cut_vertices():
    graph = chain_training_graph(24)  # 25 cut vertices: 24 layers and the loss
    result = run("chen-sqrtn", graph)[0]
    assert result.detail["checkpoints"] == [4, 9, 14, 19, 24]
    counts = simulate(graph, result.schedule).compute_counts
    # every forward value between two checkpoints is recomputed once; the checkpoints are not
    assert [counts[v] for v in range(25)] == [1 if v in (4, 9, 14, 19, 24) else 2 for v in range(25)]


def test_checkpoints_no_backward_reads_are_held_for_the_segment_after_them():
    # 10 layers whose backward reads the layer's output (like exp), except at the checkpoints 2, 5, 8
    layers, readers = 10, {3, 4, 6, 7, 9}
    deps = [[k - 1] if k else [] for k in range(layers)] + [[layers - 1]]
    grad = layers
    for k in reversed(range(layers)):
        deps.append([grad, k] if k in readers else [grad])
        grad = len(deps) - 1
    backward = [False] * (layers + 1) + [True] * layers
    graph = make_graph(deps, [10] * len(deps), outputs=[layers, grad], backward=backward)
    result, simulation = run("chen-sqrtn", graph)
    assert result.detail["checkpoints"] == [2, 5, 8]
    # segments {3, 4} and {6, 7} are recomputed from their checkpoint, not from the start; the tail is kept
    assert simulation.compute_counts[:layers + 1] == (1, 1, 1, 2, 2, 1, 2, 2, 1, 1, 1)


def test_cut_vertices_of_a_diamond_and_a_residual_block():
    # 0 -> (1, 2) -> 3 -> 4: only 0, 3 and 4 separate earlier from later nodes
    diamond = make_graph([[], [0], [0], [1, 2], [3]], [1] * 5)
    assert cut_vertices(diamond) == [0, 3, 4]
    graph = residual_training_graph(2)  # embed, (ln, mlp, add) x 2, norm, loss
    assert cut_vertices(graph) == [0, 3, 6, 7, 8]


def test_a_mask_every_block_reads_does_not_hide_the_cut_vertices():
    plain, masked = residual_training_graph(6), residual_training_graph(6, mask=True)
    assert shared_values(plain) == set() and shared_values(masked) == {1}
    assert cut_vertices(masked) == [0] + [v + 1 for v in cut_vertices(plain)[1:]]  # node 1 is the mask
    budget = run("chen-sqrtn", plain)[1].peak_bytes
    for name in ("chen-sqrtn", "chen-greedy", "griewank"):
        without_mask = run(name, plain, budget)[1]
        with_mask = run(name, masked, budget + 1)[1]  # the mask is 1 byte
        assert with_mask.fits(budget + 1) and max(with_mask.compute_counts) > 1, name
        # the mask is kept, never recomputed, and the rest is recomputed exactly as without it
        counts = list(with_mask.compute_counts)
        assert counts.pop(1) == 1 and counts == list(without_mask.compute_counts), name


# --- chen-greedy and griewank ------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUDGET_DRIVEN)
def test_budget_driven_baselines_fit_between_the_extremes(name):
    graph = chain_training_graph(16)
    store_all = run("store-all", graph)[1]
    checkpoint_all = run("checkpoint-all", graph)[1]
    budget = (store_all.peak_bytes + checkpoint_all.peak_bytes) // 2
    result, simulation = run(name, graph, budget)
    assert simulation.fits(budget)
    assert store_all.compute_s < simulation.compute_s < checkpoint_all.compute_s
    assert result.message.startswith("cheapest")


@pytest.mark.parametrize("name", BUDGET_DRIVEN)
def test_budget_driven_cost_never_rises_with_the_budget(name):
    # the variants tried do not depend on the budget: a larger budget admits more of them
    graph = residual_training_graph(6)
    low = run("checkpoint-all", graph)[1].peak_bytes
    high = run("store-all", graph)[1].peak_bytes
    costs = []
    for budget in range(low, high + 1, max(1, (high - low) // 12)):
        simulation = run(name, graph, budget)[1]
        if simulation.fits(budget):
            costs.append(simulation.compute_s)
    assert len(costs) >= 3
    assert costs == sorted(costs, reverse=True)


@pytest.mark.parametrize("name", BUDGET_DRIVEN)
def test_budget_driven_fall_back_to_their_lowest_memory_variant(name):
    graph = residual_training_graph(6)
    result, fallback = run(name, graph, 0)
    assert result.status == FEASIBLE and not fallback.fits(0)
    assert "none of" in result.message
    for budget in (fallback.peak_bytes, 2 * fallback.peak_bytes, 10**9):
        assert fallback.peak_bytes <= run(name, graph, budget)[1].peak_bytes


def test_chen_greedy_on_a_uniform_chain_matches_sqrtn_at_its_peak():
    # on equal layers one of greedy's thresholds spaces checkpoints exactly as sqrt(n) does
    graph = chain_training_graph(16)
    sqrtn = run("chen-sqrtn", graph)[1]
    greedy = run("chen-greedy", graph, sqrtn.peak_bytes)[1]
    assert greedy.fits(sqrtn.peak_bytes) and greedy.compute_s <= sqrtn.compute_s


def test_chen_greedy_is_store_all_when_store_all_fits():
    graph = residual_training_graph(5)
    store_all = run("store-all", graph)[1]
    greedy = run("chen-greedy", graph, store_all.peak_bytes)[1]
    assert greedy.compute_s == graph.compute_s and greedy.peak_bytes <= store_all.peak_bytes


def test_griewank_on_a_chain():
    graph = chain_training_graph(16)
    store_all = run("store-all", graph)[1]
    # with a slot for every state, each step (one layer) is stored: no recomputation at all
    assert run("griewank", graph, store_all.peak_bytes)[1].compute_s == graph.compute_s
    # at sqrt(n)'s peak, binomial checkpointing recomputes no more than evenly spaced segments
    sqrtn = run("chen-sqrtn", graph)[1]
    griewank = run("griewank", graph, sqrtn.peak_bytes)[1]
    assert griewank.fits(sqrtn.peak_bytes) and griewank.compute_s <= sqrtn.compute_s


def test_griewank_needs_a_chain_of_three_segments():
    diamond = make_graph([[], [0], [0], [1, 2], [2, 3], [4]], [1] * 6, outputs=[5],
                         backward=[False] * 4 + [True] * 2)
    assert len(cut_vertices(diamond)) == 2
    result, _ = run("griewank", diamond)
    assert result.status == NO_SOLUTION and "segment" in result.message


@cache
def fewest_advances(steps, free_slots):
    """Brute force over every first split (the recursion revolve's closed form solves)."""
    if steps == 1:
        return 0
    if free_slots == 0:
        return steps * (steps - 1) // 2
    return min(m + fewest_advances(steps - m, free_slots - 1) + fewest_advances(m, free_slots)
               for m in range(1, steps))


def test_revolve_closed_form_matches_brute_force():
    for steps in range(1, 40):
        for free_slots in range(0, 8):
            assert revolve_advances(steps, free_slots) == fewest_advances(steps, free_slots), (steps, free_slots)


@pytest.mark.parametrize("steps, free_slots", [(1, 1), (2, 1), (6, 2), (10, 1), (20, 3), (7, 6)])
def test_revolve_schedule_reverses_every_step_once_at_the_optimal_cost(steps, free_slots):
    events = revolve(steps, free_slots)
    assert [j for kind, j, _ in events if kind == "reverse"] == list(range(steps, 0, -1))
    assert sum(end - start for kind, start, end in events if kind == "advance") == fewest_advances(steps, free_slots)
    stored = {0}
    for kind, start, end in events:  # an advance starts from a stored state, a reversal from state j-1
        assert (start if kind == "advance" else start - 1) in stored
        if kind == "advance":
            stored.add(end)
        else:
            stored.discard(start - 1)  # every later step lies before it: the state is done with
        assert len(stored - {0}) <= free_slots + 1  # the slots, plus the state the next reversal starts from


# --- per-block -------------------------------------------------------------------------------------


def test_find_blocks_takes_the_shallowest_indexed_level():
    def graph_with(modules):
        return make_graph([[]] + [[i] for i in range(len(modules) - 1)], [1] * len(modules), modules=modules)

    gpt = graph_with(["transformer.wte", "transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn",
                      "lm_head"])
    assert find_blocks(gpt) == {"transformer.h.0": [1, 2], "transformer.h.1": [3]}
    resnet = graph_with(["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "fc"])
    assert find_blocks(resnet) == {"layer1.0": [1], "layer1.1": [2], "layer2.0": [3]}
    nested = graph_with(["encoder.0.layers.0.ff", "encoder.0.layers.1.ff", "encoder.0.norm"])
    assert find_blocks(nested) == {"encoder.0.layers.0": [0], "encoder.0.layers.1": [1]}
    assert find_blocks(graph_with(["embed", "h.10.attn", "head"])) == {}


def test_find_named_blocks_takes_the_innermost_containers_numbered_in_their_names():
    def graph_with(modules):
        return make_graph([[]] + [[i] for i in range(len(modules) - 1)], [1] * len(modules), modules=modules)

    densenet = graph_with(["features.conv0", "features.denseblock1.denselayer1",
                           "features.denseblock1.denselayer1.conv1", "features.denseblock1.denselayer1.conv2",
                           "features.denseblock1.denselayer2.conv1", "features.denseblock1",
                           "features.transition1.conv", "features.denseblock2.denselayer1.conv1", "classifier"])
    assert find_blocks(densenet) == {}  # no index of its own: conv0, conv1 and conv2 are layers, not containers
    assert find_named_blocks(densenet) == {"features.denseblock1.denselayer1": [1, 2, 3],
                                           "features.denseblock1.denselayer2": [4],
                                           "features.denseblock2.denselayer1": [7]}
    assert find_named_blocks(graph_with(["stem.conv1", "stem.conv2", "head"])) == {}  # numbered layers only
    assert find_named_blocks(graph_with(["down1.conv", "mid.conv", "up1.conv"])) == {}  # no two of a name


def test_per_block_recomputes_each_block_forward_once_before_its_backward():
    blocks = 4
    graph = residual_training_graph(blocks)
    result, simulation = run("per-block", graph)
    assert result.detail["blocks"] == [f"h.{k}" for k in range(blocks)]
    members = {k: [v for v in range(len(graph)) if not graph.nodes[v].is_backward
                   and graph.nodes[v].module.startswith(f"h.{k}")] for k in range(blocks)}
    in_blocks = {v for vs in members.values() for v in vs}
    assert simulation.compute_counts == tuple(2 if v in in_blocks else 1 for v in range(len(graph)))
    computes = [op.node for op in result.schedule.ops if op.kind == "compute"]
    for k, vs in members.items():
        first_backward = min(i for i, node in enumerate(graph.nodes)
                             if node.is_backward and node.module.startswith(f"h.{k}"))
        at = computes.index(first_backward)
        assert computes[at - len(vs):at] == vs  # the whole block, in order, right before its backward
    store_all = run("store-all", graph)[1]
    assert simulation.peak_bytes < store_all.peak_bytes


def test_per_block_stores_block_inputs_and_drops_their_insides():
    graph = residual_training_graph(3)  # 0 embed, (ln, mlp, add) at 1-3, 4-6, 7-9, 10 norm, 11 loss
    schedule = run("per-block", graph)[0].schedule
    first_backward = 12
    assert graph.nodes[first_backward].is_backward and not graph.nodes[first_backward - 1].is_backward
    live = set()
    for op in schedule.ops:
        if op == Op("compute", first_backward):
            break
        (live.add if op.kind == "compute" else live.remove)(op.node)
    # the blocks' inputs (embed, the first two adds), the last block's output (read by the norm), norm and loss
    assert live == {0, 3, 6, 9, 10, 11}


def test_per_block_without_blocks_says_so():
    graph = make_graph([[], [0], [1]], [1, 1, 1], outputs=[2], backward=[False, False, True])
    result, _ = run("per-block", graph)
    assert result.status == NO_SOLUTION and "no repeated blocks" in result.message
