"""What a planned step returns: the model's own output structure with the planned loss in its place, so that
training loops written for the model (`outputs.loss`, `outputs["loss"]`, `outputs[0]`, Hugging Face's Trainer)
run unchanged; None for the other tensors, with a warning that names them; the whole output without gradients."""

import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import remat
from remat.planner import solve
from remat.training import trace_step

TIME_LIMIT = 1.0  # any plan that fits: these check what the step hands out, not what its plan costs (at 5 s the
# search took 4 s of each limit at 90 to 95%)


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double(), torch.randint(0, 64, (2, 16))


class DictNet(nn.Module):
    """Returns a dict: the loss, the logits and a plain number."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))

    def forward(self, x, y):
        logits = self.body(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits, "classes": 4}


class TupleNet(DictNet):
    def forward(self, x, y):
        logits = self.body(x)
        return nn.functional.cross_entropy(logits, y), logits


def _batch():
    torch.manual_seed(1)
    return torch.randn(256, 8, dtype=torch.float64), torch.randint(0, 4, (256,))


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_a_hugging_face_model_returns_its_output_object_with_the_planned_loss():
    model, ids = _gpt2()
    expected = model(input_ids=ids, labels=ids)
    expected.loss.backward()
    eager = _gradients(model)

    planned = remat.apply(model, budget="95%", example_inputs={"input_ids": ids, "labels": ids},
                          time_limit=TIME_LIMIT)
    with pytest.warns(UserWarning, match=r"None for logits, cache"):
        outputs = planned(input_ids=ids, labels=ids)
    assert type(outputs) is type(expected)
    # the ways training loops read the loss; Hugging Face's Trainer: outputs["loss"] if a dict, else outputs[0]
    assert outputs.loss is outputs["loss"] is outputs[0] is outputs.to_tuple()[0]
    assert outputs.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    assert outputs.logits is None
    outputs.loss.backward()
    for name, grad in _gradients(model).items():
        torch.testing.assert_close(grad, eager[name], rtol=1e-10, atol=1e-12, msg=name)

    with warnings.catch_warnings():  # named once, not at every step
        warnings.simplefilter("error")
        planned(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():  # evaluation: the model's whole output, logits included
        evaluated = planned(input_ids=ids, labels=ids)
    torch.testing.assert_close(evaluated.logits, expected.logits)
    assert evaluated.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)


def test_a_dict_keeps_its_keys_and_plain_values_and_a_tuple_its_length():
    x, y = _batch()
    torch.manual_seed(0)
    dict_net = DictNet().double()
    planned = remat.apply(dict_net, budget="95%", example_inputs=(x, y), time_limit=TIME_LIMIT)
    with pytest.warns(UserWarning, match=r"None for logits:"):
        outputs = planned(x, y)
    assert list(outputs) == ["loss", "logits", "classes"]
    assert outputs["logits"] is None and outputs["classes"] == 4
    assert outputs["loss"].item() == pytest.approx(dict_net(x, y)["loss"].item(), rel=1e-12)

    torch.manual_seed(0)
    tuple_net = TupleNet().double()
    planned = remat.apply(tuple_net, budget="95%", example_inputs=(x, y), time_limit=TIME_LIMIT)
    with pytest.warns(UserWarning, match=r"None for \[1\]"):
        loss, logits = planned(x, y)  # unpacks as the model's own tuple does
    assert logits is None
    assert loss.item() == pytest.approx(tuple_net(x, y)[0].item(), rel=1e-12)
    loss.backward()
    assert all(p.grad is not None for p in tuple_net.parameters())


def test_a_model_that_returns_its_loss_alone_returns_a_tensor_without_a_warning():
    x, y = _batch()
    torch.manual_seed(0)
    net = TupleNet().double()
    planned = remat.apply(net, budget="95%", example_inputs=(x, y), loss_fn=lambda out: out[0],
                          time_limit=TIME_LIMIT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = planned(x, y)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert loss.item() == pytest.approx(net(x, y)[0].item(), rel=1e-12)


def test_outputs_all_hands_out_the_logits_and_plans_for_holding_them():
    model, ids = _gpt2()
    batch = {"input_ids": ids, "labels": ids}
    expected = model(**batch)
    expected.loss.backward()
    eager = _gradients(model)

    loss_only = remat.apply(model, budget="90%", example_inputs=batch, time_limit=TIME_LIMIT)
    planned = remat.apply(model, budget="90%", example_inputs=batch, time_limit=TIME_LIMIT, outputs="all")
    logits_bytes = expected.logits.numel() * expected.logits.element_size()
    # the caller holds the logits from the forward to the step's end: fixed memory, counted with the inputs
    assert (planned.planned.graph.fixed.input_bytes
            == loss_only.planned.graph.fixed.input_bytes + logits_bytes)
    loss, memory = planned.measure(**batch)  # held as planned, to the byte
    assert memory.peak_live_bytes == planned.planned.simulation.activation_peak_bytes
    model.zero_grad(set_to_none=True)

    with pytest.warns(UserWarning, match=r"None for cache: objects"):  # a cache is no tensor to hand out
        outputs = planned(**batch)
    torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=0)
    assert outputs.loss.item() == expected.loss.item()
    outputs.loss.backward()
    for name, grad in _gradients(model).items():
        torch.testing.assert_close(grad, eager[name], rtol=1e-10, atol=1e-12, msg=name)
    # the planned backward starts from the loss alone: a term made of the logits is an error, not a lost gradient
    outputs = planned(**batch)
    with pytest.raises(RuntimeError, match="handed out beside its loss"):
        (outputs.loss + outputs.logits.pow(2).mean()).backward()


def test_a_handed_out_tensor_computed_again_is_the_callers_copy():
    """checkpoint-all recomputes the logits in the backward: the backward reads the copy the caller holds, as the plan
    counts it (0 bytes more)."""
    x, y = _batch()
    torch.manual_seed(0)
    net = DictNet().double()
    planned = remat.apply(net, budget="100%", example_inputs=(x, y), solver="checkpoint-all", outputs="all")
    step = planned.planned
    assert step.parts.held_names  # the backward reads the handed-out logits again
    loss, memory = planned.measure(x, y)
    assert memory.peak_live_bytes == step.simulation.activation_peak_bytes
    net.zero_grad(set_to_none=True)
    outputs = planned(x, y)
    expected = net(x, y)
    torch.testing.assert_close(outputs["logits"], expected["logits"], rtol=0, atol=0)
    assert outputs["classes"] == 4
    outputs["loss"].backward()
    grads = _gradients(net)
    expected["loss"].backward()
    for name, grad in _gradients(net).items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_a_plan_file_keeps_its_outputs(tmp_path):
    x, y = _batch()
    torch.manual_seed(0)
    net = TupleNet().double()
    path = tmp_path / "plan.json"
    remat.plan(net, (x, y), budget="95%", time_limit=TIME_LIMIT, outputs="all").save(path)
    planned = remat.apply(net, plan=path, example_inputs=(x, y))  # the plan's outputs, as its precision
    loss, logits = planned(x, y)
    torch.testing.assert_close(logits, net(x, y)[1], rtol=0, atol=0)
    with pytest.raises(remat.PlanError, match="made for outputs='all'"):
        remat.apply(net, plan=path, example_inputs=(x, y), outputs="loss")
    with pytest.raises(ValueError, match="unknown outputs='logits'"):
        remat.apply(net, budget="95%", outputs="logits")


def test_a_split_step_hands_out_the_logits_too():
    """The MLPs split in chunks: the rewritten forward returns the logits after its loss. The head cannot be split
    where its logits are handed out whole."""
    model, ids = _gpt2()
    batch = {"input_ids": ids, "labels": ids}
    graph, _ = trace_step(model, batch, device="cpu", mlp_chunks=2, outputs="all")
    plan = solve(graph, "90%", time_limit_s=TIME_LIMIT)
    planned = remat.apply(model, plan=plan, example_inputs=batch)
    assert planned.planned.graph.meta["split"]["mlp_chunks"] == 2
    loss, memory = planned.measure(**batch)
    assert memory.peak_live_bytes == planned.planned.simulation.activation_peak_bytes
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="None for cache"):
        outputs = planned(**batch)
    expected = model(**batch)
    torch.testing.assert_close(outputs.logits, expected.logits, rtol=1e-12, atol=1e-12)
    with pytest.raises(Exception, match="no row-wise region from a matmul to the loss"):
        trace_step(model, batch, device="cpu", split_chunks=2, outputs="all")


def test_the_planned_module_has_the_models_forward_signature_and_class_name():
    """Hugging Face's Trainer keeps the dataset columns that the model's forward names, and takes its label names from
    the forward of the model's class: RematModule's forward(*args, **kwargs) named none, so it dropped every column."""
    import copy
    import inspect
    import pickle

    model, ids = _gpt2()
    planned = remat.apply(model, budget="95%", example_inputs={"input_ids": ids, "labels": ids},
                          time_limit=TIME_LIMIT)
    assert type(planned).__name__ == "RematGPT2LMHeadModel" and isinstance(planned, remat.RematModule)
    # the Trainer saves a PreTrainedModel (or PeftModel) with its save_pretrained, anything else as a bare state dict,
    # which safetensors refuses for tied weights
    assert isinstance(planned, type(model)) and repr(planned).startswith("RematGPT2LMHeadModel(")
    assert inspect.signature(planned.forward) == inspect.signature(model.forward)
    from transformers.utils.generic import find_labels  # what the Trainer calls on the model's class
    assert find_labels(type(planned)) == ["labels"]
    with pytest.warns(UserWarning, match="None for logits"):
        expected = planned(input_ids=ids, labels=ids).loss.item()
    for copied in (copy.deepcopy(planned), pickle.loads(pickle.dumps(planned))):  # made from the model's class again
        assert type(copied) is type(planned)
        assert copied(input_ids=ids, labels=ids).loss.item() == pytest.approx(expected, rel=1e-12)


class HiddenNet(nn.Module):
    """Returns beside its loss a hidden state the backward also reads, a metric, a detached copy of the loss, its
    input and one of its weights."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 64), nn.Linear(64, 4)

    def forward(self, x, y):
        hidden = torch.tanh(self.l1(x))  # saved for l2's weight gradient and for tanh's backward
        logits = self.l2(hidden)
        loss = nn.functional.cross_entropy(logits, y)
        return {"loss": loss, "hidden": hidden, "accuracy": (logits.argmax(-1) == y).double().mean(),
                "detached": loss.detach(), "input": x, "weight": self.l2.weight, "again": hidden}


def test_handed_out_tensors_are_what_eager_returns_and_cost_what_the_plan_says():
    x, y = _batch()
    torch.manual_seed(0)
    net = HiddenNet().double()
    expected = net(x, y)
    for solver in ("store-all", "checkpoint-all"):  # the hidden state saved for the backward, or computed again
        planned = remat.apply(net, budget="1GB", example_inputs=(x, y), solver=solver, outputs="all")
        loss, memory = planned.measure(x, y)  # a saved value that is a handed-out tensor costs nothing more
        assert memory.peak_live_bytes == planned.planned.simulation.activation_peak_bytes, solver
        net.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing comes back as None
            outputs = planned(x, y)
        torch.testing.assert_close(outputs["hidden"], expected["hidden"], rtol=0, atol=0)
        assert outputs["input"] is x and outputs["weight"] is net.l2.weight  # the caller's own tensors, as in eager
        assert outputs["again"] is outputs["hidden"]
        # what needs no gradient in eager needs none here: a loss may add it as a constant
        assert not outputs["accuracy"].requires_grad and not outputs["detached"].requires_grad
        assert outputs["accuracy"].item() == expected["accuracy"].item()
        (outputs["loss"] + 0.5 * outputs["detached"]).backward()
        assert net.l1.weight.grad is not None


def test_a_named_baseline_over_the_budget_is_named_with_its_peak():
    """checkpoint-all can peak above store-all on a small step: it was refused as "nothing fits" with a lowest peak
    equal to the budget."""
    x, y = _batch()
    torch.manual_seed(0)
    with pytest.raises(remat.PlanError, match=r"checkpoint-all's schedule peaks at .* over the budget of .* "
                                              r"solver=\"auto\", whose plans go down to"):
        remat.apply(HiddenNet().double(), budget="100%", example_inputs=(x, y), solver="checkpoint-all")


class LossTwice(DictNet):
    def forward(self, x, y):
        loss = nn.functional.cross_entropy(self.body(x), y)
        return {"loss": loss, "total_loss": loss}


def test_a_loss_under_two_keys_is_in_both():
    x, y = _batch()
    torch.manual_seed(0)
    net = LossTwice().double()
    outputs = remat.apply(net, budget="95%", example_inputs=(x, y), time_limit=TIME_LIMIT)(x, y)
    assert list(outputs) == ["loss", "total_loss"] and outputs["loss"] is outputs["total_loss"]  # a bare tensor before
    assert outputs["loss"].item() == pytest.approx(net(x, y)["loss"].item(), rel=1e-12)


def test_without_labels_the_logits_come_back_for_a_loss_made_outside():
    """Hugging Face's Trainer takes the labels out for label smoothing (or a compute_loss of its own) and makes the loss
    of the output's logits: the planned step was refused ("whose loss is None"). Now the logits come back in the
    model's output object, and the loss made of them drives the planned backward, as for a model returning logits."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).double()
    ids, labels = torch.randint(0, 100, (4, 16)), torch.tensor([0, 2, 1, 2])
    expected = model(input_ids=ids)
    nn.functional.cross_entropy(expected.logits, labels, label_smoothing=0.1).backward()
    eager = _gradients(model)

    planned = remat.apply(model, budget="95%", example_inputs={"input_ids": ids}, time_limit=TIME_LIMIT)
    outputs = planned(input_ids=ids)
    assert type(outputs) is type(expected) and outputs.loss is None
    torch.testing.assert_close(outputs.logits, expected.logits, rtol=1e-12, atol=1e-12)
    nn.functional.cross_entropy(outputs.logits, labels, label_smoothing=0.1).backward()
    for name, grad in _gradients(model).items():
        torch.testing.assert_close(grad, eager[name], rtol=1e-10, atol=1e-12, msg=name)


def test_hugging_face_input_grad_hook_is_not_warned_of():
    """Gradient checkpointing in Hugging Face installs `enable_input_require_grads`'s hook, which only makes the
    embeddings' output require grad (in the graph): it was warned of as a hook whose records are not updated."""
    model, ids = _gpt2()
    model.enable_input_require_grads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        planned = remat.apply(model, budget="95%", example_inputs={"input_ids": ids, "labels": ids},
                              time_limit=TIME_LIMIT)
    assert not [w for w in caught if "forward hooks on" in str(w.message)]
    model.register_forward_hook(lambda module, args, output: None)  # any other hook is still said, once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        planned.prepare(input_ids=ids, labels=ids)
    assert len([w for w in caught if "forward hooks on" in str(w.message)]) == 1


class NormedSequence(nn.Module):
    """Hands out a batch norm's output over the D of a (B, T, D) batch, transposed back."""

    def __init__(self, d=8):
        super().__init__()
        self.pre, self.norm, self.head = nn.Linear(d, d), nn.BatchNorm1d(d), nn.Linear(d, 1)

    def forward(self, x):
        h = self.norm(torch.tanh(self.pre(x)).transpose(1, 2)).transpose(1, 2)
        return {"loss": self.head(h).pow(2).mean(), "normed": h}


def test_a_handed_out_tensor_in_another_layout_than_traced_is_held_as_planned():
    """On CPU the norm's output is contiguous where the trace had it in its input's layout: the head's reshape of it
    copied, which the plan did not count (1,856 bytes measured against 1,792 planned with outputs="all")."""
    torch.manual_seed(0)
    net = NormedSequence().double()
    reference = NormedSequence().double()
    reference.load_state_dict(net.state_dict())
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    planned = remat.apply(net, budget="100%", example_inputs=(x,), outputs="all")
    _, memory = planned.measure(x)
    assert memory.peak_live_bytes == planned.planned.simulation.activation_peak_bytes
    net.load_state_dict(reference.state_dict())  # (the measured step updated the running statistics)
    net.zero_grad(set_to_none=True)
    outputs, expected = planned(x), reference(x)
    torch.testing.assert_close(outputs["normed"], expected["normed"], rtol=0, atol=0)
    outputs["loss"].backward()
    expected["loss"].backward()
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


_LAZY_OUTPUT: list[type] = []


class LazyOutputNet(nn.Module):
    """Makes its ModelOutput class at its first forward, as a module the forward imports first defines its classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x, y):
        if not _LAZY_OUTPUT:
            import dataclasses

            from transformers.utils import ModelOutput

            @dataclasses.dataclass
            class LazyOutput(ModelOutput):
                loss: torch.Tensor | None = None
                logits: torch.Tensor | None = None

            _LAZY_OUTPUT.append(LazyOutput)
        logits = self.body(x)
        return _LAZY_OUTPUT[0](loss=nn.functional.cross_entropy(logits, y), logits=logits)


def test_a_model_output_class_first_made_while_tracing_is_registered_as_hugging_face_does():
    """Hugging Face registers a ModelOutput class with torch's pytree when it is defined or first made, but not while
    torch.compiler.is_compiling(), which the trace says. remat registered such a class itself, outside Hugging Face's
    own table, and the next eager construction of it (the model's own forward under no_grad, an eager model of the same
    class) failed: "... is already registered as pytree node"."""
    _LAZY_OUTPUT.clear()
    model = LazyOutputNet().double()
    x, y = _batch()
    planned = remat.apply(model, budget="100%", example_inputs=(x, y), device="cpu", time_limit=TIME_LIMIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # logits come back as None
        output = planned(x, y)
    assert type(output) is _LAZY_OUTPUT[0]
    output.loss.backward()
    with torch.no_grad():
        evaluated = planned(x, y)  # the model's own forward: an eager construction of the class
    assert torch.equal(evaluated.loss, output.loss.detach())
    assert type(LazyOutputNet().double()(x, y)) is _LAZY_OUTPUT[0]
