"""The decomposition plans the head and the stem of the step too: when the blocks cannot give up enough bytes, a
chunk of the head's large values (a split LM head's logits) is dropped after its loss and recomputed in its
backward, and a stem's large value (a CNN's first convolution) is dropped after the first block and recomputed
for the stem's backward."""

from remat.graph import Graph
from remat.schedule import COMPUTE
from remat.simulate import simulate
from solvers.base import SolveOptions
from solvers.baselines import BASELINES
from solvers.decompose import find_layout, solve_decompose
from tests.graphs import add_residual_blocks, make_graph

LOGITS_BYTES = 64
STEM_BYTES = 96


def blocks_with_a_split_head(blocks: int = 4, ops_per_block: int = 6, stem: bool = False) -> tuple[Graph, list[int]]:
    """Repeated residual blocks of a chain of ops, then a head in two chunks (logits, loss each; the losses
    added), its backward (each chunk's gradient reads its logits) and the blocks' backward. Also returns the
    two logits nodes. With `stem`, a large op (node 0) and a small one come first, and their backward last
    (the large op's backward reads its output)."""
    deps: list[list[int]] = []
    sizes: list[int] = []
    modules: list[str] = []
    stream = None
    if stem:
        deps += [[], [0]]
        sizes += [STEM_BYTES, 4]
        modules += ["stem", "stem"]
        stream = 1
    stream, forward_of = add_residual_blocks(deps, sizes, modules, blocks, ops_per_block, stream)

    def add(reads: list[int], size: int, module: str = "head") -> int:
        deps.append(reads)
        sizes.append(size)
        modules.append(module)
        return len(deps) - 1

    logits, losses = [], []
    for _ in range(2):  # each chunk's loss right after its logits
        logits.append(add([stream], LOGITS_BYTES))
        losses.append(add([logits[-1]], 1))
    loss = add(losses, 1)
    forward_count = len(deps)
    chunk_grads = [add([logits[1], loss], 4), add([logits[0], loss], 4)]  # the backward runs the chunks reversed
    grad = add([*chunk_grads, stream], 4)
    for block in reversed(range(blocks)):
        for member in reversed(forward_of[block]):
            grad = add(sorted({grad, *deps[member]}), 4, f"layers.{block}")
    if stem:
        grad = add([grad, 0], 4, "stem")
        add([grad], 4, "stem")
    n = len(deps)
    costs = [1.0 + (i % 4) * 0.5 for i in range(n)]
    return make_graph(deps, sizes, costs, outputs=[loss, n - 1], backward=[i >= forward_count for i in range(n)],
                      modules=modules), logits


def test_a_budget_that_needs_the_head_streamed_gets_a_plan_that_recomputes_a_chunk_of_logits():
    graph, logits = blocks_with_a_split_head()
    assert find_layout(graph) is not None
    # Every block drops all it can (checkpoint-all's peak) and there is still no room for both chunks' logits at
    # once beside the first chunk's backward: only a plan that drops the other chunk's logits fits.
    checkpoint_all = simulate(graph, BASELINES["checkpoint-all"](graph, 2**62, SolveOptions()).schedule)
    budget = checkpoint_all.peak_bytes - LOGITS_BYTES + 8
    result = solve_decompose(graph, budget, SolveOptions(time_limit_s=10))
    assert result.schedule is not None, result.message
    sim = simulate(graph, result.schedule)
    assert sim.valid and sim.fits(budget)
    assert sim.compute_s < checkpoint_all.compute_s
    runs = [op.node for op in result.schedule.ops if op.kind == COMPUTE]
    assert max(runs.count(node) for node in logits) == 2  # one chunk's logits made again for its backward


def test_a_budget_that_needs_the_stem_dropped_gets_a_plan_that_recomputes_it():
    graph, logits = blocks_with_a_split_head(stem=True)
    layout = find_layout(graph)
    assert layout is not None and layout.forward[0].start == 2
    checkpoint_all = simulate(graph, BASELINES["checkpoint-all"](graph, 2**62, SolveOptions()).schedule)
    # With the stem's large output held from its forward to its backward nothing fits beside the head's peak
    budget = checkpoint_all.peak_bytes + 8
    assert budget - graph.fixed.total_bytes < STEM_BYTES + 2 * LOGITS_BYTES
    result = solve_decompose(graph, budget, SolveOptions(time_limit_s=10))
    assert result.schedule is not None, result.message
    sim = simulate(graph, result.schedule)
    assert sim.valid and sim.fits(budget) and sim.compute_s < checkpoint_all.compute_s
    runs = [op.node for op in result.schedule.ops if op.kind == COMPUTE]
    assert runs.count(0) == 2  # the stem's large op made again for its backward
