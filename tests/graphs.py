"""Hand-made graphs for tests: no torch, known sizes and costs."""

from __future__ import annotations

from dataclasses import replace

from remat.graph import RETURN_OP, FixedMemory, Graph, Node
from remat.schedule import Schedule


def make_graph(
    deps: list[list[int]],
    output_bytes: list[int],
    compute_s: list[float] | None = None,
    outputs: list[int] | None = None,
    fixed_bytes: int = 0,
    backward: list[bool] | None = None,
    modules: list[str] | None = None,
) -> Graph:
    n = len(deps)
    compute_s = compute_s or [1.0] * n
    backward = backward or [False] * n
    modules = modules or [""] * n
    nodes = tuple(
        Node(name=f"n{i}", op="test", deps=tuple(deps[i]), output_bytes=output_bytes[i],
             compute_s=compute_s[i], is_backward=backward[i], module=modules[i])
        for i in range(n)
    )
    return Graph(nodes=nodes, outputs=tuple(outputs if outputs is not None else [n - 1]),
                 fixed=FixedMemory(parameter_bytes=fixed_bytes))


def chain_training_graph(layers: int, activation_bytes: int = 10, cost_s: float = 1.0) -> Graph:
    """A linear network's training step: forward f0..f{L-1}, loss, backward b{L-1}..b0.

    Backward b_k reads the forward activation f_k's input (f_{k-1}, or nothing for k = 0)
    and the gradient from b_{k+1} (or the loss).
    """
    deps: list[list[int]] = []
    for k in range(layers):
        deps.append([k - 1] if k else [])
    loss = layers
    deps.append([layers - 1])
    grad_of_next = loss
    backward_index = {}
    for k in reversed(range(layers)):
        index = len(deps)
        deps.append([grad_of_next] + ([k - 1] if k else []) + [k])
        backward_index[k] = index
        grad_of_next = index
    n = len(deps)
    sizes = [activation_bytes] * layers + [1] + [activation_bytes] * layers
    is_backward = [False] * (layers + 1) + [True] * layers
    modules = [f"layers.{k}" for k in range(layers)] + ["loss"] + [f"layers.{k}" for k in reversed(range(layers))]
    return make_graph(deps, sizes, [cost_s] * n, outputs=[loss, n - 1], backward=is_backward, modules=modules)


def eager_schedule(graph: Graph) -> Schedule:
    """Every node once in index order, each value freed right after its last use (eager PyTorch)."""
    last = {d: i for i, node in enumerate(graph.nodes) for d in node.deps}
    ops = []
    for i, node in enumerate(graph.nodes):
        ops.append(("compute", i))
        ops += [("free", d) for d in sorted(set(node.deps)) if last[d] == i]
    return Schedule.from_pairs(ops, len(graph))


def ancestors(graph: Graph, node: int) -> set[int]:
    """`node` and every node it depends on, directly or not."""
    found, stack = set(), [node]
    while stack:
        i = stack.pop()
        if i not in found:
            found.add(i)
            stack.extend(graph.nodes[i].deps)
    return found


def add_residual_blocks(deps: list[list[int]], sizes: list[int], modules: list[str], blocks: int,
                        ops_per_block: int, stream: int | None = None) -> tuple[int | None, list[list[int]]]:
    """Append `blocks` repeated blocks (module paths "layers.k") of a chain of ops whose last one adds the block's
    input back (a residual), fed by node `stream`. Returns the last block's output and each block's forward nodes."""
    forward_of: list[list[int]] = []
    for block in range(blocks):
        members: list[int] = []
        for op in range(ops_per_block):
            reads = [members[-1]] if members else ([stream] if stream is not None else [])
            if op == ops_per_block - 1 and stream is not None:
                reads.append(stream)
            deps.append(reads)
            sizes.append(16 if op % 3 == 1 else 4)
            modules.append(f"layers.{block}")
            members.append(len(deps) - 1)
        forward_of.append(members)
        stream = members[-1]
    return stream, forward_of


def step_whose_lowest_peak_recomputes() -> Graph:
    """A classifier's set-to-none step (the fuzz case dyn_bool_index_assign: 24 nodes, the return reads every
    gradient). Its node floor is 6,784 bytes and no baseline peaks below 7,360; the lowest peak, 7,264, needs a
    schedule that recomputes and is not frontier-advancing (the walk back from the step's end finds it; the min-peak
    MILP named 7,296 to 7,360 in 3 s)."""
    deps = [[], [0], [1], [2], [1], [], [3, 4, 5], [6], [7], [8], [8, 9], [8, 10], [11], [6, 11], [11], [],
            [4, 12, 15], [16], [1, 16], [16], [1, 17], [20], [20], [13, 14, 18, 19, 21, 22]]
    sizes = [384, 384, 384, 384, 48, 8, 384, 192, 192, 16, 192, 192, 384, 256, 32, 8, 384, 384, 512, 64, 384, 512,
             64, 0]
    return make_graph(deps, sizes, outputs=[9, 23], fixed_bytes=5344, backward=[i >= 10 for i in range(len(deps))])


def set_to_none_chain_step(layers: int, activation_bytes: int = 10, gradient_bytes: int = 4) -> Graph:
    """chain_training_graph's step as lowered with gradients="set-to-none": each layer's weight gradient is made by a
    node of its own (reading the layer's input and the gradient from above) and held to the backward's return
    (RETURN_OP), the last node, which reads them all. Layers in reverse, backward: b_k, then w_k."""
    deps: list[list[int]] = [[k - 1] if k else [] for k in range(layers)]
    deps.append([layers - 1])  # the loss
    sizes = [activation_bytes] * layers + [1]
    grad_of_next, weight_gradients = layers, []
    for k in reversed(range(layers)):
        inputs = [k - 1] if k else []
        deps.append([grad_of_next] + inputs + [k])  # b_k: the gradient of layer k's input
        deps.append([grad_of_next] + inputs)  # w_k: layer k's weight gradient
        sizes += [activation_bytes, gradient_bytes]
        grad_of_next = len(deps) - 2
        weight_gradients.append(len(deps) - 1)
    deps.append(weight_gradients)
    sizes.append(0)
    n = len(deps)
    graph = make_graph(deps, sizes, outputs=[layers, n - 1], backward=[i > layers for i in range(n)])
    nodes = (*graph.nodes[:-1], replace(graph.nodes[-1], op=RETURN_OP, compute_s=0.0))
    return replace(graph, nodes=nodes)
