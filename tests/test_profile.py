"""Measured device profiles: ops with a measured time take it, every other op keeps the roofline; the keys the
profiler writes are the keys lowering looks up; `remat profile` needs CUDA and says so."""

import json
import re
from pathlib import Path

import pytest
import torch

from remat.cost import load_profile
from remat.lower import cost_key
from remat.planner import solve
from remat.profile import compute_nodes, measure_ops, random_like
from remat.trace import trace_step
from tests.cli_run import remat

ROOT = Path(__file__).resolve().parent.parent
STORED = ROOT / "tests" / "data" / "profile-mlp-test.json"  # matmul times for mlp at batch 8, fp32


@pytest.fixture(scope="module")
def traced_pair():
    measured = trace_step("mlp", batch=8, precision="fp32", device=str(STORED))
    roofline = trace_step("mlp", batch=8, precision="fp32", device="h100")
    return measured, roofline


def test_stored_profile_loads_with_its_roofline_fields():
    profile = load_profile(str(STORED))
    base = load_profile("h100")
    assert profile.name == "h100-mlp-test"
    assert len(profile.measured_s) == 7
    assert profile.flops_per_s == base.flops_per_s
    assert profile.memory_bandwidth_bytes_per_s == base.memory_bandwidth_bytes_per_s
    assert base.measured_s == {}


@pytest.mark.parametrize("change, message", [
    (lambda data: [1, 2], "a JSON object is needed"),
    (lambda data: {**data, "memory_bandwidth_bytes_per_s": "3.35e12"}, "memory_bandwidth_bytes_per_s must be"),
    (lambda data: {**data, "memory_bandwidth_bytes_per_s": 0}, "memory_bandwidth_bytes_per_s must be"),
    (lambda data: {**data, "memory_bandwidth_bytes_per_s": -3.35e12}, "memory_bandwidth_bytes_per_s must be"),
    (lambda data: {k: v for k, v in data.items() if k != "flops_per_s"}, "missing flops_per_s"),
    (lambda data: {**data, "flops_per_s": {"bf16": 1e15}}, "fp32 among them"),
    (lambda data: {**data, "flops_per_s": {k: v for k, v in data["flops_per_s"].items() if k != "bf16"}},
     "flops_per_s has no peak for bf16"),
    (lambda data: {**data, "matmul_efficiency": 6}, "matmul_efficiency must be a number in (0, 1]"),
])
def test_a_profile_with_wrong_values_is_refused_with_what_is_wrong(tmp_path, change, message):
    """A list, a string, a zero or negative bandwidth failed deep in the cost model (AttributeError, TypeError,
    ZeroDivisionError), or, negative, made every step cheaper without a word."""
    data = json.loads((ROOT / "profiles" / "h100.json").read_text())
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(change(data)))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_profile(str(path))
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "description"}))
    assert load_profile(str(path)).description == "h100"  # a description is not needed


def test_measured_ops_take_their_time_and_the_rest_the_roofline(traced_pair):
    measured, roofline = traced_pair
    table = load_profile(str(STORED)).measured_s
    fx = {node.name: node for node in measured.step.joint.graph.nodes}
    assert measured.graph.content_hash == roofline.graph.content_hash  # costs differ, structure does not
    hits = 0
    for node, reference in zip(measured.graph.nodes, roofline.graph.nodes, strict=True):
        key = cost_key(fx[node.name])
        if key in table:
            assert node.compute_s == table[key]
            hits += 1
        else:
            assert node.compute_s == reference.compute_s
    matmuls = sum(node.op.startswith(("aten.addmm", "aten.mm")) for node in measured.graph.nodes)
    assert hits == matmuls > 0  # every matmul found; the profile's extra op changes nothing
    assert hits < len(measured.graph)  # and the other ops fell back to the roofline
    assert measured.graph.meta["device"] == "h100-mlp-test"


def test_plans_use_the_measured_costs(traced_pair):
    measured, roofline = traced_pair
    budget = roofline.graph.fixed.total_bytes * 10
    plan = solve(measured.graph, budget, solver="store-all")
    assert plan.simulation.compute_s == pytest.approx(measured.graph.compute_s)
    assert measured.graph.compute_s != pytest.approx(roofline.graph.compute_s)


def test_profiler_measures_every_op_lowering_costs(traced_pair):
    """The profiler's keys are lowering's keys: measured on this CPU, every compute node of the graph is covered."""
    _, roofline = traced_pair
    measurement = measure_ops(roofline.step, device="cpu", warmup=0, repeats=1)
    assert not measurement.failed
    fx = {node.name: node for node in roofline.step.joint.graph.nodes}
    keys = {cost_key(fx[node.name]) for node in roofline.graph.nodes}
    assert keys <= set(measurement.measured_s)
    assert measurement.ops == len(compute_nodes(roofline.step)) >= len(roofline.graph)
    assert all(seconds > 0 for seconds in measurement.measured_s.values())


def test_random_inputs_keep_shape_strides_and_dtype():
    base = torch.empty(4, 6)
    for value in (base, base.t(), base[:, :3], torch.empty(3, 1).expand(3, 5), torch.zeros(2, 3, dtype=torch.int64)):
        real = random_like(value, "cpu")
        assert real.shape == value.shape and real.stride() == value.stride() and real.dtype == value.dtype
    assert random_like(torch.empty(5, dtype=torch.int64), "cpu").eq(0).all()  # valid indices


def test_profile_command_needs_cuda(tmp_path):
    out = tmp_path / "profiles" / "mlp.json"  # a folder made for the file, and taken away again without CUDA
    result = remat("profile", "--model", "mlp", "--batch", "8", "--out", str(out), "--repeats", "2")
    if torch.cuda.is_available():  # on a GPU machine the profile is written and loads
        assert result.returncode == 0, result.stderr
        assert load_profile(str(out)).measured_s
    else:
        assert result.returncode == 2
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "CUDA" in lines[0], result.stderr
        assert not out.parent.exists()


def test_stored_profile_is_json_with_its_provenance():
    data = json.loads(STORED.read_text())
    assert data["measured"]["model"] == "mlp" and data["measured"]["batch"] == 8


def test_a_profile_file_that_is_not_there_is_named_so(tmp_path):
    # it said "unknown device 'nothere.json': choose one of a100, cpu, h100, v100 or give a profile JSON file"
    with pytest.raises(ValueError, match="device profile file .*nothere.json' not found"):
        load_profile(str(tmp_path / "nothere.json"))
    with pytest.raises(ValueError, match="device profile file .*nothere' not found"):  # a path without a suffix
        load_profile(str(tmp_path / "nothere"))
    with pytest.raises(ValueError, match="unknown device 'h200x': choose one of"):
        load_profile("h200x")
