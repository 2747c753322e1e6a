"""Capture and lowering: a real module becomes a Graph with the right sizes, outputs and fixed memory."""

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode

from remat.capture import CaptureError, capture_fake, capture_step
from remat.cost import load_profile
from remat.lower import lower
from remat.simulate import simulate
from tests.graphs import eager_schedule


class TiedNet(nn.Module):
    """Embedding -> 2 linear layers -> output head tied to the embedding, with a view in the middle."""

    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)  # (B, T, D)
        for layer in self.layers:
            x = torch.relu(layer(x))
        logits = self.head(x)  # (B, T, V)
        return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), ids.view(-1))


def build():
    from types import SimpleNamespace
    return SimpleNamespace(model=TiedNet(), example_inputs=(torch.randint(0, 64, (4, 8)),), loss_fn=None)


def test_fake_capture_lowers_to_a_graph_with_fixed_memory_and_outputs():
    _, step = capture_fake(build, "fp32")
    assert step.tied_to == {"model.head.weight": "model.embed.weight"}
    graph = lower(step, load_profile("h100"), optimizer="adamw")
    params = 64 * 32 + 2 * (32 * 32 + 32)
    assert graph.fixed.parameter_bytes == 4 * params  # the tied head weight is counted once
    assert graph.fixed.gradient_bytes == 4 * params
    assert graph.fixed.optimizer_bytes == 2 * 4 * params
    assert graph.fixed.input_bytes >= 4 * 8 * 8  # int64 ids (+ the loss tangent)
    assert graph.forward_nodes and any(n.is_backward for n in graph.nodes)
    # views are folded: no node is a view, and the logits (B*T x V fp32) appear with their true size
    assert not any(n.op.startswith(("aten.view", "aten.t.", "aten.transpose")) for n in graph.nodes)
    assert any(n.output_bytes == 4 * 8 * 64 * 4 for n in graph.nodes)
    # the loss is an output with its bytes; gradients are outputs held in fixed memory (0 bytes)
    loss_like = [i for i in graph.outputs if not graph.nodes[i].is_backward]
    assert len(loss_like) == 1
    grads = [i for i in graph.outputs if graph.nodes[i].is_backward]
    assert grads and all(graph.nodes[i].output_bytes == 0 for i in grads)
    assert {n.module for n in graph.nodes} >= {"layers.0", "layers.1", "embed", "head"}
    assert all(n.compute_s > 0 for n in graph.nodes)
    assert any(n.flops > 0 for n in graph.nodes)  # the matmuls


def test_eager_order_of_a_captured_graph_is_valid():
    _, step = capture_fake(build, "bf16-mixed")
    graph = lower(step, load_profile("a100"), optimizer="sgd")
    assert graph.fixed.optimizer_bytes == 0
    sim = simulate(graph, eager_schedule(graph))
    assert sim.valid, sim.errors
    assert sim.peak_bytes > graph.fixed.total_bytes
    assert "bf16" in " ".join(n.shape for n in graph.nodes)  # autocast made bf16 matmuls


def test_real_tensors_capture_the_same_graph_as_fake_ones():
    torch.manual_seed(0)
    spec = build()
    real = lower(capture_step(spec.model, spec.example_inputs), load_profile("h100"))
    _, fake_step = capture_fake(build)
    fake = lower(fake_step, load_profile("h100"))
    assert real.content_hash == fake.content_hash


class TruncNormalNet(TiedNet):
    """TiedNet with ViT's and ConvNeXt's init: nn.init.trunc_normal_ reads a tensor's value, which fake tensors lack."""

    def __init__(self):
        super().__init__()
        for layer in self.layers:
            nn.init.trunc_normal_(layer.weight, std=0.02)


def test_a_model_whose_init_reads_values_is_built_on_real_tensors_then_traced_on_fake_ones():
    from types import SimpleNamespace

    with FakeTensorMode(), pytest.raises(DataDependentOutputException):
        TruncNormalNet()  # why the fallback exists
    rng = torch.random.get_rng_state()
    spec, step = capture_fake(lambda: SimpleNamespace(model=TruncNormalNet(), loss_fn=None,
                                                      example_inputs=(torch.randint(0, 64, (4, 8)),)))
    assert torch.equal(torch.random.get_rng_state(), rng)  # planning leaves the user's RNG alone
    assert all(isinstance(t, FakeTensor) for t in (*spec.model.parameters(), *spec.example_inputs))
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in spec.model.parameters())
    assert spec.model.head.weight is spec.model.embed.weight  # still tied
    assert step.tied_to == {"model.head.weight": "model.embed.weight"}
    _, plain = capture_fake(build)  # the same network built on fake tensors from the start
    assert lower(step, load_profile("h100")).content_hash == lower(plain, load_profile("h100")).content_hash


def test_a_model_that_deep_copies_its_blocks_is_traced_on_fake_tensors(recwarn):
    # nn.TransformerEncoder deep-copies its layer; a fake tensor's deep copy is one of another fake mode, and the trace
    # refused it ("fake mode ... doesn't match mode ... from fake tensor input 0")
    import copy
    from types import SimpleNamespace

    class Cloned(nn.Module):
        def __init__(self):
            super().__init__()
            block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
            self.blocks = nn.Sequential(*[copy.deepcopy(block) for _ in range(3)])
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                                 enable_nested_tensor=False)
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            return self.head(self.encoder(self.blocks(x))).pow(2).mean()

    spec, step = capture_fake(lambda: SimpleNamespace(model=Cloned(), loss_fn=None,
                                                      example_inputs=(torch.randn(2, 5, 16),)))
    parameters = list(spec.model.parameters())
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in parameters)
    modes = {p.fake_mode for p in parameters}
    assert len(modes) == 1 and spec.example_inputs[0].fake_mode in modes  # one fake mode for all
    assert len(parameters) == 2 * 3 + 2 * 12 + 2  # 3 linears, 2 encoder layers of 12 tensors, the head
    assert not [w for w in recwarn if "data pointer of FakeTensor" in str(w.message)]
    graph = lower(step, load_profile("h100"))
    assert graph.fixed.parameter_bytes == 4 * sum(p.numel() for p in parameters)


@pytest.mark.parametrize("writes", ["clamp", "max_norm"])
def test_a_forward_that_writes_a_parameter_in_place_is_a_clear_error(writes):
    # the plan was made, then refused at the first step: "the traced step has 2 loss tangents" (remat solve planned
    # it without a word)
    class Clips(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.a = nn.Embedding(50, 8, max_norm=1.0 if writes == "max_norm" else None), nn.Linear(8, 1)

        def forward(self, ids):
            if writes == "clamp":
                with torch.no_grad():
                    self.a.weight.clamp_(-0.1, 0.1)
            return self.a(self.embed(ids)).pow(2).mean()

    with pytest.raises(CaptureError, match=r"writes into parameter (a|embed)\.weight in place .* outside the forward"):
        capture_step(Clips(), (torch.randint(0, 50, (4, 6)),))


class CausalEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(x, mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1])).pow(2).mean()


class Reentrant(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.b, self.a(x), use_reentrant=True).pow(2).mean()


class SqueezesAView(nn.Module):
    """An in-place shape change of a view, then an in-place write into it: eager runs it, AOTAutograd cannot."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        h = self.a(x).unsqueeze(0).squeeze_(0)
        h[:, :4].relu_()
        return h * 3


@pytest.mark.parametrize(("model", "advice"), [
    (CausalEncoder, "pass is_causal=True with a causal mask"),
    (lambda: nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16, momentum=None)), "give the norm a momentum"),
    (Reentrant, "pass use_reentrant=False"),
    # torch's own words: "MulBackward0 returned an invalid gradient at index 0 - got [8, 16] but expected shape
    # compatible with [1, 8, 16]"
    (SqueezesAView, "use the out-of-place form (`x = x.squeeze(0)`"),
])
def test_what_torch_nn_itself_cannot_trace_says_what_to_change(model, advice, recwarn):
    # the message blamed the user's line and said to use torch.where, which the user cannot do in torch's own code;
    # the reentrant checkpoint's spoke of .grad() and backward(inputs=...), which the user never called
    x = torch.randn(4, 6, 16) if model is CausalEncoder else torch.randn(8, 16)
    module = model()
    with pytest.raises(CaptureError, match=re.escape(advice)):
        capture_step(module, (x,), loss_fn=lambda out: out.pow(2).mean() if out.dim() else out)
    assert not [w for w in recwarn if "Error detected in" in str(w.message)]  # anomaly mode's tracebacks


def test_a_model_without_trainable_parameters_is_a_clear_error():
    model = nn.Linear(4, 4)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        capture_step(model, (torch.randn(2, 4),))
    except CaptureError as error:
        assert "nor its inputs require grad" in str(error)
    else:
        raise AssertionError("expected a CaptureError")


def test_a_model_that_fails_to_trace_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            raise RuntimeError("shape mismatch in user code")

    try:
        capture_step(Broken(), (torch.randn(2, 4),))
    except CaptureError as error:
        assert "shape mismatch in user code" in str(error)
    else:
        raise AssertionError("expected a CaptureError")


class BranchOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        # Python reads a value: one graph cannot follow this
        if x.mean() > 0:
            return self.a(x).sum()
        return self.b(x).sum()


class MaskRouting(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.expert = nn.Linear(4, 2), nn.Linear(4, 4)

    def forward(self, x):
        mask = self.gate(x).argmax(-1) == 0
        # as many rows as the mask holds: a shape set by data
        return self.expert(x[mask]).sum()


@pytest.mark.parametrize(("model", "meaning", "line"), [
    (BranchOnData, "Python reads a tensor's value", "if x.mean() > 0:"),
    (MaskRouting, "output shape depends on tensor values", "return self.expert(x[mask]).sum()"),
])
def test_a_step_that_depends_on_tensor_values_names_the_cause_and_the_line(model, meaning, line):
    """Fake tensors have no values: the error says so in the model's terms and points at the model's own line,
    not at torch's internals."""
    with pytest.raises(CaptureError) as caught:
        capture_step(model(), (torch.randn(8, 4),))
    message = str(caught.value)
    assert meaning in message and "test_capture_lower.py:" in message and f"`{line}`" in message


@pytest.mark.parametrize("on_fake", [False, True], ids=["real", "fake"])
def test_a_loss_fn_that_closes_over_the_targets_says_to_pass_them_as_inputs(on_fake):
    """The most common loss_fn reads targets it was not given: a constant of the graph, which torch refuses with
    words about fake tensors. The error says what the step read and how to pass it."""
    def build():
        targets = torch.randint(0, 4, (8,))
        return SimpleNamespace(model=nn.Linear(4, 4), example_inputs=(torch.randn(8, 4),),
                               loss_fn=lambda out: nn.functional.cross_entropy(out, targets))

    with pytest.raises(CaptureError) as caught:
        if on_fake:
            capture_fake(build)
        else:
            spec = build()
            capture_step(spec.model, spec.example_inputs, spec.loss_fn)
    message = str(caught.value)
    assert "not one of its inputs, parameters or buffers" in message and "forward(x, targets)" in message


def test_a_tensor_kept_as_a_plain_attribute_is_traced_as_a_buffer_on_fake_tensors():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.scale = torch.full((4,), 2.0)  # not registered: a constant the trace would refuse

        def forward(self, x):
            return (self.linear(x) * self.scale).sum()

    spec, step = capture_fake(lambda: SimpleNamespace(model=Scaled(), example_inputs=(torch.randn(8, 4),),
                                                      loss_fn=None))
    assert "scale" in dict(spec.model.named_buffers()) and "scale" not in spec.model.state_dict()
    assert [n for n, k in zip(step.input_names, step.input_kinds, strict=True) if k == "buffer"] == ["model.scale"]


def test_a_tensor_two_modules_hold_is_fixed_memory_once():
    # a mask made once and kept by every layer, as a plain attribute or a registered buffer: one storage, which
    # fixed memory counted once per module
    mask = torch.ones(64, 64)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 64)
            self.mask = mask  # a plain attribute, registered as a buffer when traced

        def forward(self, x):
            return self.linear(x) * self.mask

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(Layer(), Layer(), Layer())
            self.register_buffer("scale", torch.ones(64, 64))
            self.other = nn.Module()
            self.other.register_buffer("scale", self.scale)

        def forward(self, x):
            return (self.layers(x) * self.scale * self.other.scale).pow(2).mean()

    step = capture_step(Net(), (torch.randn(64, 64),))
    assert step.tied_to == {"model.layers.1.mask": "model.layers.0.mask", "model.layers.2.mask": "model.layers.0.mask",
                            "model.other.scale": "model.scale"}
    graph = lower(step, load_profile("cpu"))
    tangent = 4
    assert graph.fixed.input_bytes == 3 * 64 * 64 * 4 + tangent  # the mask, the scale and the input, once each


def test_a_model_that_returns_a_dict_with_a_loss_is_trained_on_it():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x, labels):
            logits = self.linear(x)
            return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}

    model, x, labels = DictOut(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    step = capture_step(model, (x, labels))
    graph = lower(step, load_profile("cpu"))
    assert any(n.op == "aten.nll_loss_forward.default" for n in graph.nodes)
    assert any(n.op == "aten.nll_loss_backward.default" for n in graph.nodes)  # the loss was differentiated


def test_hugging_face_gpt2_traces_with_tied_weights_and_flash_attention():
    from remat.trace import trace_model

    graph = trace_model("gpt2-tiny", batch=2, seq=64, precision="bf16-mixed", device="h100", optimizer="adamw")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from remat.models import build_model

    with FakeTensorMode():
        params = sum(p.numel() for p in build_model("gpt2-tiny", batch=2, seq=64).model.parameters())
    assert graph.fixed.parameter_bytes == 4 * params  # the tied lm_head is not counted twice
    ops = {n.op for n in graph.nodes}
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in ops
    assert "aten._log_softmax_backward_data.default" in ops
    assert any(n.module.startswith("lm.transformer.h.1") and n.is_backward for n in graph.nodes)
    assert graph.meta["seq"] == 64 and graph.meta["batch"] == 2


def test_roofline_costs_matmuls_by_flops_and_elementwise_ops_by_bytes():
    profile = load_profile("h100")
    matmul_s = profile.op_seconds(2 * 4096**3, 3 * 4096 * 4096 * 2, "bf16")
    assert matmul_s == pytest.approx(2 * 4096**3 / (989.4e12 * 0.6) + 4e-6)
    relu_s = profile.op_seconds(0, 2 * 10**9, "bf16")
    assert relu_s == pytest.approx(2e9 / (3.35e12 * 0.75) + 4e-6)

    class Matmul(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(256, 128))

        def forward(self, x):
            return torch.relu(x @ self.weight).sum()

    graph = lower(capture_step(Matmul(), (torch.randn(64, 256),)), profile)
    mm = next(n for n in graph.nodes if n.op == "aten.mm.default" and not n.is_backward)
    assert mm.flops == 2 * 64 * 256 * 128
    assert mm.compute_s == pytest.approx(profile.op_seconds(mm.flops, mm.bytes_moved, "fp32"))
    relu = next(n for n in graph.nodes if n.op == "aten.relu.default")
    assert relu.flops == 0 and relu.bytes_moved == 2 * 64 * 128 * 4


def test_unknown_device_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="h100"):
        load_profile("tpu9")


def test_multi_output_ops_hold_each_output_apart_and_list_views_are_not_allocations():
    from remat.models import build_model

    _, step = capture_fake(lambda: build_model("gpt2-tiny", batch=2, seq=16))
    graph = lower(step, load_profile("cpu"))
    ops = {node.op for node in graph.nodes}
    assert "aten.split.Tensor" not in ops  # q, k, v are views of c_attn's output, not a second copy of it
    norms = [node for node in graph.nodes if node.op == "aten.native_layer_norm.default"]
    assert norms and all(len(node.part_bytes) == 3 and sum(node.part_bytes) == node.output_bytes for node in norms)
    norm = norms[0]
    # The normalised output feeds the next matmul (and its weight gradient); mean and rstd only the backward.
    index = graph.nodes.index(norm)
    assert any(not graph.nodes[u].is_backward for u in norm.part_users[0])
    assert all(graph.nodes[u].is_backward for u in norm.part_users[1] + norm.part_users[2])
    assert all(u in graph.users[index] for users in norm.part_users for u in users)


def test_convolution_backward_counts_its_input_gradient_but_not_its_weight_gradient():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv2(torch.relu(self.conv1(x))).square().mean()

    graph = lower(capture_step(Net(), (torch.randn(2, 3, 8, 8),)), load_profile("cpu"))
    backward = [node for node in graph.nodes if node.op == "aten.convolution_backward.default"]
    second = next(node for node in backward if node.part_bytes)  # conv2's: input gradient (2, 8, 8, 8) in fp32
    assert second.part_bytes[0] == 2 * 8 * 8 * 8 * 4 and second.part_bytes[1:] == (0, 0)
    assert second.output_bytes == second.part_bytes[0]


class ArgmaxScore(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 4)

    def forward(self, x):
        return (self.a(x).argmax(-1) == 0).float().mean()  # an accuracy: no gradient reaches a parameter


def test_a_loss_no_parameter_gets_a_gradient_from_is_refused():
    """It was planned as a step with 0 bytes of gradients, and no word."""
    with pytest.raises(CaptureError, match="no parameter gets a gradient"):
        capture_step(ArgmaxScore(), (torch.randn(8, 16),))


class Whitens(nn.Module):
    """A linear solve in the forward (Gaussian processes, whitening): torch.linalg.solve checks for a singular
    matrix, an op with a side effect that the trace threads on a token the planned step did not feed (its first
    call failed with an empty StopIteration); solve_ex leaves the check out."""

    def __init__(self, checked: bool):
        super().__init__()
        self.b, self.checked = nn.Linear(16, 16), checked

    def forward(self, x):
        a = self.b.weight @ self.b.weight.T + 16 * torch.eye(16)
        h = torch.linalg.solve(a, x.T) if self.checked else torch.linalg.solve_ex(a, x.T).result
        return h.pow(2).mean()


def test_linalgs_error_check_is_refused_with_its_unchecked_form():
    x = torch.randn(12, 16)
    with pytest.raises(CaptureError, match=re.escape("use torch.linalg.solve_ex(A, B).result")):
        capture_step(Whitens(checked=True), (x,))
    step = capture_step(Whitens(checked=False), (x,))
    assert step.input_kinds.count("input") == 1  # no token


def test_traced_values_have_the_layouts_of_cpus_kernels():
    """Batch norm's CPU output is contiguous whatever its input's layout; its fake one took the input's, so the
    reshape after the transpose back was traced as a view that the run made a copy. The copy is in the graph, counted
    (all 64 x 4 floats); the ops after the norm have the strides they run with."""
    from tests.test_apply import NormThenReshape

    step = capture_step(NormThenReshape(), (torch.randn(4, 16, 4),))
    nodes = {node.target: node for node in step.joint.graph.nodes}
    norm = nodes[torch.ops.aten._native_batch_norm_legit_functional.default]
    assert norm.meta["val"][0].is_contiguous()
    assert nodes[torch.ops.aten.native_batch_norm_backward.default].meta["val"][0].is_contiguous()
    # (the backward copies too: tanh's gradient is laid out as the norm's is, and the linear before reads it as rows)
    copy = next(node for node in step.joint.graph.find_nodes(op="call_function", target=torch.ops.aten.clone.default)
                if node.args[0].target is torch.ops.aten.transpose.int and node.args[0].args[0].args[0] is norm)
    graph = lower(step, load_profile("cpu"))
    assert next(node for node in graph.nodes if node.name == copy.name).output_bytes == 64 * 4 * 4


def test_a_write_into_part_of_a_tensor_copies_that_part_alone():
    """`h[:, 0] = v` is traced as a copy of the row, then a scatter into h: aten's functional copy cloned all of h;
    remat's holds the (2, 4) row alone, as the plan counts it."""
    from tests.test_apply import WritesARow

    step = capture_step(WritesARow(), (torch.randn(2, 3, 4),))
    copies = step.joint.graph.find_nodes(op="call_function", target=torch.ops.remat.copy_like.default)
    assert len(copies) == 2  # the forward's write, and its backward's (the row's gradient zeroed)
    assert all(copy.args[0].target is torch.ops.aten.select.int for copy in copies)
    graph = lower(step, load_profile("cpu"))
    names = {copy.name for copy in copies}
    assert {node.output_bytes for node in graph.nodes if node.name in names} == {2 * 4 * 4}
