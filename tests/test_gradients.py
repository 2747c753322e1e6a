"""gradients="set-to-none": a loop that frees the gradients between steps (`optimizer.zero_grad()`'s default) has
none when the step starts; each is counted from when the backward makes it to its end, not as fixed memory."""

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from remat import planner
from remat.planner import solve
from remat.training import PlanError, apply, plan, trace_step
from remat.units import format_bytes
from solvers.base import INFEASIBLE
from solvers.peak_bound import backward_peak_bound
from tests.cli_run import remat


class TiedLM(nn.Module):
    """An embedding tied to the output head (two names, a gradient each until the backward returns) and an MLP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.l1, self.l2 = nn.Embedding(50, 32), nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x, y):
        h = self.embed(x)
        h = h + self.l2(torch.tanh(self.l1(h)))
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, 50, (8, 16), generator=generator), torch.randint(0, 50, (8, 16), generator=generator))


def test_each_gradient_counts_from_when_it_is_made_and_a_tied_weight_has_one_per_name():
    model, inputs = TiedLM().double(), _inputs()
    held, _ = trace_step(model, inputs, device="cpu")
    made, _ = trace_step(model, inputs, device="cpu", gradients="set-to-none")
    gradient_bytes = 8 * sum(p.numel() for p in model.parameters())  # the tied weight once
    assert held.fixed.gradient_bytes == gradient_bytes and not held.gradients_made
    assert made.fixed.gradient_bytes == 0 and made.gradients_made
    assert made.fixed.total_bytes == held.fixed.total_bytes - gradient_bytes
    # the backward's return reads every gradient: the head's and the embedding's of the tied weight apart
    returned = made.nodes[-1]
    assert returned.is_return and len(made) - 1 in made.outputs
    assert made.working_set_bytes(len(made) - 1) == gradient_bytes + 8 * model.embed.weight.numel()
    # accumulating: the loop's gradients are fixed memory, and the backward's new ones count beside them
    accumulating, _ = trace_step(model, inputs, device="cpu", gradients="accumulate")
    assert accumulating.fixed == held.fixed and accumulating.gradients_made
    assert accumulating.working_set_bytes(len(accumulating) - 1) == made.working_set_bytes(len(made) - 1)
    with pytest.raises(ValueError, match="unknown gradients 'zeros'"):
        trace_step(model, inputs, device="cpu", gradients="zeros")


@pytest.mark.parametrize("gradients", ["set-to-none", "accumulate"])
def test_a_step_that_makes_gradients_measures_its_plan_below_store_all(gradients):
    """The backward's gradients are activations held to its end: what the counting interpreter measures, with the
    gradients (the tied weight's per name) in it, equals the plan, and loss and gradients are eager's."""
    model, inputs = TiedLM().double(), _inputs()
    reference = copy.deepcopy(model)
    planned = apply(model, budget="85%", example_inputs=inputs, gradients=gradients, device="cpu",
                    time_limit=1)  # any plan that fits
    step = planned.prepare(*inputs)
    assert step.plan.schedule.recomputed_nodes()  # below store-all: something is computed again
    loss, memory = planned.measure(*inputs)
    assert (memory.peak_bytes, memory.peak_live_bytes) == (step.simulation.peak_bytes,
                                                           step.simulation.activation_peak_bytes)
    expected = reference(*inputs)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, rtol=1e-12, atol=1e-15)


def test_a_budget_below_the_held_floor_fits_and_runs_as_eager_with_the_bytes_planned():
    """No schedule of the held step fits below its floor (fixed memory + the largest op's working set); freed
    between steps, the gradients leave room there, and the step measures what the plan says."""
    model, inputs = TiedLM().double(), _inputs()
    reference = copy.deepcopy(model)
    held, _ = trace_step(model, inputs, device="cpu")
    made, _ = trace_step(model, inputs, device="cpu", gradients="set-to-none")
    budget = held.min_budget_lower_bound() - 1
    assert solve(held, budget, time_limit_s=5).status == INFEASIBLE
    assert solve(made, budget, time_limit_s=5).simulation.peak_bytes <= budget
    planned = apply(model, budget=budget, example_inputs=inputs, gradients="set-to-none", device="cpu", time_limit=5)
    step = planned.prepare(*inputs)
    assert step.simulation.peak_bytes <= budget
    loss, memory = planned.measure(*inputs)
    assert memory.peak_bytes == step.simulation.peak_bytes
    assert memory.peak_live_bytes == step.simulation.activation_peak_bytes
    expected = reference(*inputs)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)  # (a split head adds its chunks' losses)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, rtol=1e-12, atol=1e-15)


def test_gradients_kept_at_a_step_planned_without_them_are_warned_of_once():
    """A set-to-none plan counts none at the step's start, a held one each once: with gradients kept from the last
    step, the backward's new ones come beside them, which neither counts. gradients="auto" plans for them."""
    model, inputs = TiedLM().double(), _inputs()
    planned = apply(model, budget="100%", example_inputs=inputs, gradients="set-to-none", device="cpu", time_limit=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        planned(*inputs).backward()  # the first step: no gradients yet
        model.zero_grad()  # set_to_none=True
        planned(*inputs).backward()
    with pytest.warns(UserWarning, match=r"counts no gradients held between steps .*46.34 KB of them are kept from "
                                         r"the last step.*gradients=\"auto\""):
        planned(*inputs).backward()  # accumulating
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        planned(*inputs).backward()  # said once
    model = TiedLM().double()
    held = apply(model, budget="100%", example_inputs=inputs, device="cpu", time_limit=5, gradients="held")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        held(*inputs).backward()
        model.zero_grad()
        held(*inputs).backward()
    with pytest.warns(UserWarning, match=r"counts each gradient once, as fixed memory, \(gradients=\"held\"\), but "
                                         r"46.34 KB"):
        held(*inputs).backward()
    auto = apply(TiedLM().double(), budget="100%", example_inputs=inputs, device="cpu", time_limit=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            auto(*inputs).backward()


def test_a_plan_file_keeps_its_gradients(tmp_path):
    model, inputs = TiedLM().double(), _inputs()
    path = tmp_path / "plan.json"
    plan(model, inputs, "100%", device="cpu", time_limit=5, gradients="set-to-none").save(path)
    assert apply(copy.deepcopy(model), plan=path, example_inputs=inputs, device="cpu").gradients == "set-to-none"
    with pytest.raises(PlanError, match="the plan was made for gradients='set-to-none'"):
        apply(copy.deepcopy(model), plan=path, gradients="held", device="cpu")
    with pytest.raises(ValueError, match="unknown gradients='zeros'"):
        apply(copy.deepcopy(model), budget="100%", gradients="zeros")


def test_remat_solve_plans_with_gradients_set_to_none():
    summaries = {}
    for gradients in ("held", "set-to-none"):
        result = remat("solve", "--model", "mlp", "--budget", "100%", "--gradients", gradients, "--json",
                       "--time-limit", "10")
        assert result.returncode == 0, result.stderr
        summaries[gradients] = json.loads(result.stdout)
    held, made = summaries["held"], summaries["set-to-none"]
    assert (held["gradients"], made["gradients"]) == ("held", "set-to-none")
    assert made["fixed"]["gradients"] == 0
    assert made["fixed_bytes"] == held["fixed_bytes"] - held["fixed"]["gradients"]
    assert made["store_all_peak_bytes"] < held["store_all_peak_bytes"]


def test_the_optimizer_state_of_parameters_frozen_after_they_trained_stays_in_the_plan():
    """AdamW keeps the state of a parameter frozen after it trained: the plan made for the step without it counts it
    (it left it out: 10% of a 2-layer GPT-2's budget held outside its plan); a parameter never trained has none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)).double()
    model[4].requires_grad_(False)  # frozen from the start: no state
    x = torch.randn(8, 64, dtype=torch.float64)
    planned = apply(model, budget="100%", example_inputs=(x,), loss_fn=lambda out: out.pow(2).mean(), device="cpu",
                    time_limit=5, gradients="held")
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)

    def state_bytes() -> int:
        return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                   if torch.is_tensor(t) and t.dim() > 0)  # (AdamW's step counts are 0-d)

    for step in range(3):
        if step == 1:
            model[0].requires_grad_(False)
        planned(x).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert planned.planned.graph.fixed.optimizer_bytes == state_bytes()
    assert planned.planned.graph.fixed.gradient_bytes == 8 * (256 * 256 + 256)  # the trained layer's alone


def test_by_default_each_step_is_planned_for_the_gradients_it_finds():
    """gradients="auto": a step that starts with none runs a set-to-none plan; one that starts with the gradients an
    accumulating loop kept runs an accumulate plan, made once; both measure what they plan, and the gradients
    accumulate as eager's do."""
    model, inputs = TiedLM().double(), _inputs()
    reference = copy.deepcopy(model)
    planned = apply(model, budget="85%", example_inputs=inputs, device="cpu", time_limit=1)  # any plan that fits
    assert planned.gradients == "auto" and planned.planned.graph.gradients == "set-to-none"
    found = []
    for step in range(5):
        if step == 3:  # the loop's optimizer step: zero_grad(set_to_none=True)
            model.zero_grad()
            reference.zero_grad()
        loss, memory = planned.measure(*inputs)
        found.append(planned.planned.graph.gradients)
        assert (memory.peak_bytes, memory.peak_live_bytes) == (planned.planned.simulation.peak_bytes,
                                                               planned.planned.simulation.activation_peak_bytes)
        expected = reference(*inputs)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    assert found == ["set-to-none", "accumulate", "accumulate", "set-to-none", "accumulate"]
    assert len(planned.steps) == 2  # one plan each, made once
    accumulating = planned.planned.graph
    assert accumulating.fixed.gradient_bytes > 0 and accumulating.gradients_made
    for name, p in reference.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, rtol=1e-12, atol=1e-15)


def test_gradients_kept_of_parameters_frozen_after_they_trained_are_in_the_plan():
    """zero_grad(set_to_none=False) zeroes a frozen parameter's gradient in place: it stays allocated beside every
    later step, whose plan counts it (it was left out); zero_grad() frees it, and then it is not counted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)).double()
    x = torch.randn(8, 64, dtype=torch.float64)
    planned = apply(model, budget="100%", example_inputs=(x,), loss_fn=lambda out: out.pow(2).mean(), device="cpu",
                    time_limit=5, optimizer="sgd-momentum")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    all_bytes = 8 * sum(p.numel() for p in model.parameters())  # the trained ones' and the frozen one's
    for set_to_none, counted in ((False, all_bytes), (True, 0)):
        model[0].requires_grad_(True)
        planned(x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)
        model[0].requires_grad_(False)
        planned(x).backward()  # model[0]'s gradient: kept (zeros), or freed
        assert planned.planned.graph.gradients == ("set-to-none" if set_to_none else "accumulate")
        assert planned.planned.graph.fixed.gradient_bytes == counted
        optimizer.zero_grad(set_to_none=True)


def test_a_share_below_the_set_to_none_floor_is_refused_with_the_share_the_lowest_peak_is():
    """A small MLP's set-to-none step peaks at the backward's end, on its gradients: "90%" fitted the held step's
    larger peak, and is refused now. The error said "fixed memory (parameters, gradients, ...)" (gradients are not
    fixed memory here) and named the lowest peak in bytes alone, not as the share of the peak that "90%" is of."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    inputs = (torch.randn(4, 64),)
    with pytest.raises(PlanError) as raised:
        apply(model, budget="90%", example_inputs=inputs, device="cpu", time_limit=0.5,
              loss_fn=lambda out: out.pow(2).mean())
    message = str(raised.value)
    assert "of the store-all peak, which a share such as '90%' is of" in message, message
    assert "fixed memory alone is" in message and "gradients counted as the backward makes them," in message
    assert "gradients 0 B" not in message, message


@pytest.mark.parametrize("gradients", ["set-to-none", "accumulate"])
def test_a_budget_below_fixed_memory_words_gradients_as_the_step_counts_them(gradients):
    """Below fixed memory, the error listed "gradients 0 B" for a step that makes its gradients (they are not
    fixed memory there, but they are not free either), and the accumulate step's kept gradients by bytes alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    with pytest.raises(PlanError) as raised:
        plan(model, (torch.randn(4, 64),), 1000, device="cpu", time_limit=0.5, gradients=gradients,
                   loss_fn=lambda out: out.pow(2).mean())
    message = str(raised.value)
    assert "gradients 0 B" not in message, message
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kept = f"{format_bytes(gradient_bytes)} kept between steps, the new ones " if gradients == "accumulate" else ""
    assert "fixed memory alone is " in message and f"gradients {kept}counted as the backward makes them," in message


class MaskedClassifier(nn.Module):
    """A layer whose outputs over 1 are zeroed in place (a boolean index assigned), a head and cross entropy: the
    fuzz case dyn_bool_index_assign, whose set-to-none step's lowest peak needs a schedule that is not
    frontier-advancing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, y):
        h = torch.relu(self.inp(x))
        out = self.a(h).clone()
        out[h > 1] = 0.0
        return nn.functional.cross_entropy(self.head(out), y)


def test_the_walk_back_from_the_steps_end_plans_its_lowest_peak_and_runs_it_as_eager():
    """At the bound of the walk back from the step's end (solvers/peak_bound.py), over the node floor and every
    baseline's peak, a 1-s plan raised PlanError (the min-peak MILP did not reach it); now the walk's own schedule is
    the plan, and it runs with the bytes planned, the loss and gradients eager's."""
    model = MaskedClassifier().double()
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(6, 8, generator=generator, dtype=torch.float64) + 2.0,
              torch.randint(0, 4, (6,), generator=generator))
    reference = copy.deepcopy(model)
    graph, _ = trace_step(model, inputs, device="cpu", gradients="set-to-none")
    budget = backward_peak_bound(graph, math.inf)
    assert budget > graph.min_budget_lower_bound()
    planned = apply(model, budget=budget, example_inputs=inputs, gradients="set-to-none", device="cpu", time_limit=1)
    step = planned.prepare(*inputs)
    assert step.plan.method == "backward-walk" and step.simulation.peak_bytes == budget
    loss, memory = planned.measure(*inputs)
    assert (memory.peak_bytes, memory.peak_live_bytes) == (step.simulation.peak_bytes,
                                                           step.simulation.activation_peak_bytes)
    expected = reference(*inputs)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, rtol=0, atol=0)


def test_a_budget_under_the_walk_back_on_a_step_over_the_whole_graph_size_is_infeasible_and_the_error_names_why(
        monkeypatch):
    """A 20-layer tanh MLP's set-to-none step (124 nodes, over MAX_WHOLE_NODES) was not walked back from its end: a
    budget between its node floor (179,232 bytes) and its lowest peak was no_solution, the lowest peak found 191,264
    (the baselines'). Now the walk runs on it and reaches the empty set: the budget is infeasible, the minimum proven
    and planned, 189,208. With the walk cut short (its caps lowered) the PlanError names what no schedule goes below,
    and why, beside the lowest peak found."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 1)).double()
    inputs = (torch.randn(32, 16, dtype=torch.float64),)
    graph, _ = trace_step(model, inputs, device="cpu", gradients="set-to-none")
    budget = graph.min_budget_lower_bound() + 2000
    refused = solve(graph, budget, time_limit_s=2)
    assert refused.status == INFEASIBLE and refused.min_feasible_proven and refused.min_feasible_bytes == 189208
    monkeypatch.setattr(planner, "LARGE_WALK_PROBE_SETS", 500)
    monkeypatch.setattr(planner, "LARGE_WALK_MAX_SETS", 1000)
    proof = r"not below [^:]+: what every schedule holds .* \(the walk back from its end\)"
    with pytest.raises(PlanError, match=proof):
        plan(model, inputs, budget=budget, device="cpu", time_limit=2, gradients="set-to-none")
