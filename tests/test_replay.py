"""Replay: a schedule run on real tensors gives eager's loss and gradients bit for bit, and holds the
bytes the simulator plans."""

from functools import cache

import pytest
import torch
from torch import nn

from remat.capture import LossStep, capture_step
from remat.cost import load_profile
from remat.lower import lower
from remat.replay import ReplayError, joint_inputs, replay
from remat.schedule import Schedule
from remat.simulate import simulate
from solvers.base import SolveOptions
from solvers.baselines import BASELINES
from tests.test_capture_lower import TiedNet

SCHEDULES = ("store-all", "checkpoint-all", "chen-sqrtn")
OPTIONS = SolveOptions(time_limit_s=60.0)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3))).logsumexp(-1).mean()


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.drop1, self.drop2 = nn.Dropout(0.5), nn.Dropout(0.5)

    def forward(self, x):
        x = self.drop1(torch.relu(self.l1(x)))
        x = self.drop2(torch.relu(self.l2(x)))
        return self.l3(x).pow(2).mean()


def _mlp():
    layers = [m for _ in range(4) for m in (nn.Linear(16, 16), nn.Tanh())]
    return nn.Sequential(*layers, nn.Linear(16, 1)), (torch.randn(8, 16, dtype=torch.float64),)


def _tied():
    return TiedNet(), (torch.randint(0, 64, (4, 8)),)


def _conv():
    return ConvNet(), (torch.randn(2, 3, 8, 8, dtype=torch.float64),)


def _dropout():
    return DropoutNet(), (torch.randn(8, 8, dtype=torch.float64),)


BUILDERS = {"mlp": _mlp, "tied": _tied, "conv": _conv, "dropout": _dropout}


@cache
def setup(name):
    torch.manual_seed(0)
    model, example_inputs = BUILDERS[name]()
    model = model.double().train()
    step = capture_step(model, example_inputs, precision="fp32")
    graph = lower(step, load_profile("cpu"))
    inputs = joint_inputs(model, example_inputs, step)  # before eager runs update BatchNorm's buffers
    return model, example_inputs, step, graph, inputs


def schedule_for(graph, name):
    result = BASELINES[name](graph, 10**15, OPTIONS)
    assert result.schedule is not None, result.message
    return result.schedule


def eager_loss_and_grads(model, example_inputs):
    """Plain eager execution, gradients keyed like CapturedStep.output_names."""
    params = dict(model.named_parameters())  # a tied weight appears once, with the summed gradient
    loss = LossStep(model, None, "fp32")(*example_inputs)
    # a model that returns logits (the MLP here) runs backward as the step does: as if their sum were the loss
    grads = torch.autograd.grad(loss, list(params.values()), grad_outputs=torch.ones_like(loss))
    return loss.detach(), {f"model.{name}": g for name, g in zip(params, grads, strict=True)}


def summed_tied(grads, step):
    """The joint graph returns one gradient per tied placeholder; eager sums them into the canonical one."""
    grads = dict(grads)
    for name, canonical in step.tied_to.items():
        if name in grads:  # tied buffers have no gradient
            grads[canonical] = grads[canonical] + grads.pop(name)
    return grads


def check_peak(graph, schedule, result):
    planned = simulate(graph, schedule)
    assert planned.valid, planned.errors
    assert result.peak_bytes == result.peak_live_bytes + graph.fixed.total_bytes
    assert result.peak_live_bytes > 0
    assert abs(result.peak_bytes - planned.peak_bytes) <= 0.02 * planned.peak_bytes, (
        result.peak_bytes, planned.peak_bytes)
    # the activation part alone agrees too (in these models, to the byte)
    assert result.peak_live_bytes == planned.activation_peak_bytes


@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("model_name", ["mlp", "tied", "conv"])
def test_replay_matches_eager_exactly_and_holds_the_planned_bytes(model_name, schedule_name):
    model, example_inputs, step, graph, inputs = setup(model_name)
    schedule = schedule_for(graph, schedule_name)
    if schedule_name != "store-all":
        assert schedule.recomputed_nodes(), "the schedule should recompute something"
    result = replay(step, graph, schedule, inputs)
    loss, grads = eager_loss_and_grads(model, example_inputs)
    assert torch.equal(result.loss, loss)
    replayed = summed_tied(result.grads, step)
    assert set(replayed) == set(grads)
    for name, grad in grads.items():
        assert torch.equal(replayed[name], grad), name
    check_peak(graph, schedule, result)


def test_tied_weights_come_back_as_two_gradients_that_sum_to_eager():
    model, example_inputs, step, graph, inputs = setup("tied")
    result = replay(step, graph, schedule_for(graph, "store-all"), inputs)
    assert {"model.embed.weight", "model.head.weight"} <= set(result.grads)
    _, grads = eager_loss_and_grads(model, example_inputs)
    assert not torch.equal(result.grads["model.embed.weight"], grads["model.embed.weight"])


def test_recomputed_dropout_reuses_the_first_mask():
    _, _, step, graph, inputs = setup("dropout")
    dropouts = [i for i, node in enumerate(graph.nodes) if "dropout.default" in node.op]
    assert len(dropouts) == 2
    results, states = {}, {}
    for name in SCHEDULES:
        schedule = schedule_for(graph, name)
        torch.manual_seed(1234)
        results[name] = replay(step, graph, schedule, inputs)
        states[name] = torch.get_rng_state()
        check_peak(graph, schedule, results[name])
        if name == "checkpoint-all":
            assert set(dropouts) <= set(schedule.recomputed_nodes())
    reference = results["store-all"]
    for name in SCHEDULES[1:]:
        assert torch.equal(results[name].loss, reference.loss), name
        assert set(results[name].grads) == set(reference.grads)
        for param, grad in reference.grads.items():
            assert torch.equal(results[name].grads[param], grad), (name, param)
        # recomputations run from the saved state and put the generator back: the stream after the step is the same
        assert torch.equal(states[name], states["store-all"])
    # the masks are real: another seed gives another loss
    torch.manual_seed(4321)
    other = replay(step, graph, schedule_for(graph, "checkpoint-all"), inputs)
    assert not torch.equal(other.loss, reference.loss)


def test_recomputation_lowers_the_measured_peak():
    _, _, step, graph, inputs = setup("conv")
    peaks = {name: replay(step, graph, schedule_for(graph, name), inputs).peak_live_bytes for name in SCHEDULES}
    assert peaks["checkpoint-all"] < peaks["store-all"]


def test_a_schedule_that_frees_a_needed_value_is_a_clear_error():
    _, _, step, graph, inputs = setup("mlp")
    ops = list(schedule_for(graph, "store-all").ops)
    # free the first node right after computing it, before its first user runs
    first_user = graph.users[0][0]
    position = next(p for p, op in enumerate(ops) if op.kind == "compute" and op.node == 0)
    broken = [(op.kind, op.node) for op in ops[:position + 1]] + [("free", 0)]
    broken += [(op.kind, op.node) for op in ops[position + 1:] if not (op.kind == "free" and op.node == 0)]
    schedule = Schedule.from_pairs(broken, len(graph))
    assert not simulate(graph, schedule).valid
    with pytest.raises(ReplayError, match=rf"compute\({first_user}\).*{graph.nodes[0].name}.*not in memory"):
        replay(step, graph, schedule, inputs)


def test_a_schedule_that_never_computes_the_loss_is_a_clear_error():
    _, _, step, graph, inputs = setup("mlp")
    with pytest.raises(ReplayError, match="never computed"):
        replay(step, graph, Schedule((), len(graph)), inputs)


@pytest.mark.parametrize("model_name", ["mlp", "tied", "conv"])
def test_milp_plans_replay_exactly_within_their_budget(model_name):
    # the plan remat solve would print, run on real tensors: eager's numbers, and the planned bytes
    from remat.planner import solve

    model, example_inputs, step, graph, inputs = setup(model_name)
    store_all = simulate(graph, schedule_for(graph, "store-all"))
    budget = (store_all.peak_bytes + graph.min_budget_lower_bound()) // 2
    plan = solve(graph, budget, time_limit_s=5)  # any plan that recomputes will do (mlp's ran its whole 20 s)
    assert plan.schedule is not None and plan.schedule.recomputed_nodes()
    result = replay(step, graph, plan.schedule, inputs)
    loss, grads = eager_loss_and_grads(model, example_inputs)
    assert torch.equal(result.loss, loss)
    replayed = summed_tied(result.grads, step)
    for name, grad in grads.items():
        assert torch.equal(replayed[name], grad), name
    check_peak(graph, plan.schedule, result)
    assert result.peak_bytes <= budget
