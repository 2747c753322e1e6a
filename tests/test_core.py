"""Graph IR, schedules, the simulator and sizes, on hand-made graphs with known answers."""

import dataclasses
import json
import re

import pytest

from remat.graph import FixedMemory, Graph
from remat.schedule import Schedule, tighten_frees
from remat.simulate import simulate
from remat.units import format_bytes, format_seconds, parse_size
from tests.graphs import chain_training_graph, eager_schedule, make_graph


def test_simulator_peak_on_a_chain_by_hand():
    # a -> b -> c with sizes 10, 20, 30 and 5 bytes fixed: peak while computing c is 5 + 20 + 30.
    graph = make_graph([[], [0], [1]], [10, 20, 30], [1.0, 2.0, 3.0], outputs=[2], fixed_bytes=5)
    schedule = Schedule.from_pairs([("compute", 0), ("compute", 1), ("free", 0), ("compute", 2), ("free", 1)], 3)
    sim = simulate(graph, schedule)
    assert sim.valid, sim.errors
    assert sim.peak_bytes == 55
    assert sim.activation_peak_bytes == 50
    assert sim.compute_s == 6.0
    assert sim.timeline_bytes == (15, 35, 25, 55, 35)
    assert sim.peak_op == 3


def test_simulator_counts_workspace_and_recomputation():
    graph = make_graph([[], [0], [1]], [10, 20, 30], [1.0, 2.0, 3.0], outputs=[2])
    with_workspace = dataclasses.replace(graph.nodes[1], workspace_bytes=100)
    graph = Graph(nodes=(graph.nodes[0], with_workspace, graph.nodes[2]), outputs=graph.outputs)
    ops = [("compute", 0), ("compute", 1), ("free", 0), ("free", 1), ("compute", 0), ("compute", 1), ("compute", 2)]
    sim = simulate(graph, Schedule.from_pairs(ops, 3))
    assert sim.valid
    assert sim.peak_bytes == 130  # 10 live + 20 output + 100 workspace while node 1 runs
    assert sim.compute_s == 1 + 2 + 1 + 2 + 3
    assert sim.compute_counts == (2, 2, 1)


@pytest.mark.parametrize("ops, error", [
    ([("compute", 1)], "not in memory"),
    ([("compute", 0), ("compute", 0)], "already in memory"),
    ([("free", 0)], "free n0 which is not in memory"),
    ([("compute", 0), ("compute", 1)], "never computed"),
    ([("compute", 7)], "does not exist"),
])
def test_simulator_rejects_invalid_schedules(ops, error):
    graph = make_graph([[], [0], [1]], [1, 1, 1], outputs=[2])
    sim = simulate(graph, Schedule.from_pairs(ops, 3))
    assert not sim.valid
    assert any(error in e for e in sim.errors), sim.errors


def test_store_all_peak_of_training_chain():
    graph = chain_training_graph(4, activation_bytes=10)
    sim = simulate(graph, eager_schedule(graph))
    assert sim.valid
    # all four activations + the loss (1 byte) + the first gradient (10) while b3 runs
    assert sim.peak_bytes == 4 * 10 + 1 + 10


def test_matrices_round_trip_keeps_cost_and_does_not_raise_peak():
    graph = chain_training_graph(5)
    schedule = eager_schedule(graph)
    R, S = schedule.to_matrices()
    assert all(R[t][t] == 1 for t in range(len(graph)))
    again = Schedule.from_matrices(graph, R, S)
    a, b = simulate(graph, schedule), simulate(graph, again)
    assert b.valid and b.compute_s == a.compute_s and b.peak_bytes <= a.peak_bytes


def test_matrices_express_recomputation():
    graph = chain_training_graph(3)  # f0 f1 f2 loss b2 b1 b0 = nodes 0..6; b2 reads f1 and f2
    n = len(graph)
    R = [[int(i == t) for i in range(n)] for t in range(n)]
    S = [[0] * n for _ in range(n)]
    for t in range(1, n):  # keep everything, except f1 during stages 3 and 4
        for i in range(t):
            S[t][i] = 1
    S[3][1] = S[4][1] = 0
    R[4][1] = 1  # b2's stage recomputes f1 and keeps it for b1
    sim = simulate(graph, Schedule.from_matrices(graph, R, S))
    assert sim.valid, sim.errors
    assert sim.compute_counts[1] == 2
    R2, S2 = Schedule.from_matrices(graph, R, S).to_matrices()
    assert R2 == R


def test_to_matrices_refuses_schedules_that_do_not_advance_the_frontier():
    with pytest.raises(ValueError, match="frontier"):
        Schedule.from_pairs([("compute", 1), ("compute", 0)], 2).to_matrices()


def test_graph_json_round_trip_and_hash(tmp_path):
    graph = chain_training_graph(3)
    path = tmp_path / "g.json"
    graph.save(path)
    again = Graph.load(path)
    assert again == graph and again.content_hash == graph.content_hash
    data = json.loads(path.read_text())
    data["nodes"][0]["compute_s"] *= 2  # costs may be edited (a graph costed again is the same graph)
    assert Graph.from_json(data).compute_s == graph.compute_s + graph.nodes[0].compute_s
    data["nodes"][0]["output_bytes"] += 1
    with pytest.raises(ValueError, match="hash does not match its ops, dependencies, sizes"):
        Graph.from_json(data)
    data["schema_version"] = 99
    with pytest.raises(ValueError, match="schema version"):
        Graph.from_json(data)


def test_graph_rejects_non_topological_dependencies():
    with pytest.raises(ValueError, match="not topological"):
        make_graph([[1], []], [1, 1])


@pytest.mark.parametrize(("change", "words"), [
    ({"output_bytes": -999}, "output_bytes must be a whole number"),
    ({"output_bytes": 8.5}, "output_bytes must be a whole number"),
    ({"compute_s": float("nan")}, "compute_s must be finite"),
    ({"compute_s": -1.0}, "compute_s must be finite"),
    ({"deps": ("0",)}, "not an earlier node"),
    ({"part_bytes": (1, 0), "part_users": ((2,), (5,))}, "part_users names 5"),
])
def test_graph_rejects_sizes_costs_and_readers_that_cannot_be(change, words):
    """A negative size or a NaN cost was planned and called optimal (peak -2, compute_s nan); a part read by a node that
    does not exist failed deep inside a solver (IndexError in stage_memory)."""
    graph = make_graph([[], [0], [1]], [1, 1, 1])
    nodes = list(graph.nodes)
    nodes[1] = dataclasses.replace(nodes[1], **change)
    with pytest.raises(ValueError, match=re.escape(words)):
        Graph(tuple(nodes), graph.outputs, graph.fixed)
    with pytest.raises(ValueError, match="parameter_bytes must be a whole number"):
        Graph(graph.nodes, graph.outputs, FixedMemory(parameter_bytes=-2))


def test_a_file_that_is_no_graph_is_a_value_error(tmp_path):
    path = tmp_path / "graph.json"
    for text in ("[1, 2]", '{"schema_version": 1}', '{"schema_version": 1, "nodes": [{"nope": 1}], "outputs": [], '
                 '"fixed": {}}', "", "nodes: 3"):  # (empty and not JSON: json's "Expecting value" before)
        path.write_text(text)
        with pytest.raises(ValueError, match="not a remat graph"):
            Graph.load(path)


def test_min_budget_lower_bound_is_the_largest_working_set():
    graph = make_graph([[], [0], [0, 1]], [10, 20, 30], outputs=[2], fixed_bytes=7)
    assert graph.min_budget_lower_bound() == 7 + 10 + 20 + 30


@pytest.mark.parametrize("text, expected", [
    ("16GB", 16 * 10**9), ("16GiB", 16 * 2**30), ("512MiB", 512 * 2**20), ("1.5e9", 1_500_000_000),
    ("16 gb", 16 * 10**9), ("2048", 2048), ("1e+9", 10**9),
    # the digits as written: float arithmetic read 2.01GB as 2,009,999,999 bytes, under the CLI's own suggestions
    ("2.01GB", 2_010_000_000), ("16.06KB", 16_060), ("2.55GB", 2_550_000_000), ("0.5KiB", 512),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["16XB", "-3GB", "", "GB", "0GB", "abc", "0%", "inf%", "nan%", "1e400", float("inf"),
                                  float("nan"), "0.99999999999999999", "0.00001%"])  # those two read as 0 bytes
def test_parse_size_rejects_bad_input(text):
    with pytest.raises(ValueError):
        parse_size(text, reference_bytes=100)


def test_a_fraction_without_a_unit_is_not_read_as_zero_bytes():
    with pytest.raises(ValueError, match="write 60%"):
        parse_size("0.6", reference_bytes=100)
    with pytest.raises(ValueError, match="write \"60%\""):  # remat.apply(budget=0.6) planned for 0 bytes
        parse_size(0.6, reference_bytes=100)


def test_percent_and_format():
    assert parse_size("75%", reference_bytes=200) == 150
    assert parse_size("32.3%", reference_bytes=1000) == 323  # 1000 * 32.3 / 100 is 322.99999999999994
    assert format_bytes(16 * 10**9) == "16.00 GB"
    # a value that rounds up to the next unit is printed in it (999,999 bytes were "1000.00 KB")
    assert [format_bytes(b) for b in (999, 999_994, 999_995, 999_999, 999_999_999)] == [
        "999 B", "999.99 KB", "1.00 MB", "1.00 MB", "1.00 GB"]
    assert [format_seconds(s) for s in (999.94e-6, 999.96e-6, 0.999996, 1.5)] == [
        "999.9 us", "1.00 ms", "1.00 s", "1.50 s"]


def test_tighten_frees_frees_at_the_last_read_and_never_raises_memory():
    graph = chain_training_graph(6)
    computes = [("compute", i) for i in range(len(graph))]
    late = Schedule.from_pairs(computes + [("free", i) for i in range(len(graph))], len(graph))  # frees at the end
    tight = tighten_frees(graph, late)
    before, after = simulate(graph, late), simulate(graph, tight)
    assert after.valid
    assert after.compute_counts == before.compute_counts and after.compute_s == before.compute_s
    assert after.peak_bytes <= simulate(graph, eager_schedule(graph)).peak_bytes < before.peak_bytes
    assert tighten_frees(graph, tight) == tight
    # each free follows the compute that reads the value last (or the value's own compute when nothing reads it)
    last_compute = None
    for op in tight.ops:
        if op.kind == "compute":
            last_compute = op.node
            continue
        readers = [u for u in range(len(graph)) if op.node in graph.nodes[u].deps]
        assert last_compute == (max(readers) if readers else op.node)
