"""Which ops lay out their outputs on CPU unlike the fake tensors a step is traced on?

A plan counts a traced `view` as no memory; where the real kernel's output has other strides than the fake one, the
planned graphs run that view as a reshape that copies, which the plan does not count (batch norm over the D of a
transposed (B, T, D) batch: 9,216 bytes measured against 7,040 planned). This script runs aten ops on strided inputs
(transposed, permuted, channels_last, sliced) on real CPU tensors and on fake ones, and prints every output whose
strides differ; then it traces a few small training steps with `capture_step`, runs their joint graphs on real
tensors and prints each node whose real strides (or storage size) differ from the traced ones.

    python benchmarks/layout_survey.py          # 20 s on 2 cores

The first part is torch's alone; the second traces with `capture_step`, which gives the outputs of the ops in
capture.py's `_CPU_LAYOUTS` their CPU layouts and rewrites partial copies (`_copies_of_their_own`): what it still
prints is what those miss. With torch 2.13.0 on CPU, the first part printed batch norm's forward and backward,
layer norm's and log-softmax's backward and dropout's backward (the rules of `_CPU_LAYOUTS`), and group norm, whose
aten op refuses a non-contiguous input (torch.nn.functional.group_norm makes it contiguous first); the second
printed nothing.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable

import torch
from torch import nn

from remat.capture import capture_step, fake_tensor_mode

aten = torch.ops.aten


def _inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "contiguous 3d": torch.randn(2, 4, 6),
        "transposed 3d": torch.randn(2, 6, 4).transpose(1, 2),  # (B, D, T) of a (B, T, D) batch
        "channels_last": torch.randn(2, 4, 3, 5).contiguous(memory_format=torch.channels_last),
        "permuted 4d": torch.randn(2, 3, 5, 4).permute(0, 3, 1, 2),  # (N, C, H, W) of an (N, H, W, C) image
        "sliced 3d": torch.randn(2, 4, 12)[:, :, ::2],  # not dense
    }


def _ops(x: torch.Tensor) -> dict[str, Callable[[torch.Tensor], object]]:
    """Ops on an (N, C, ...) input `x`, as traced graphs hold them."""
    c = x.shape[1]
    w, b = torch.randn(c), torch.randn(c)
    spatial = x.shape[2:]
    g = torch.randn_like(x)  # the gradient: contiguous (the transposed one is tried with `_like`)

    def stats():
        return torch.zeros(c), torch.ones(c)

    def bn_backward(x, grad):
        out, mean, invstd = aten.native_batch_norm(x, w, b, *stats(), True, 0.1, 1e-5)
        return aten.native_batch_norm_backward(grad, x, w, None, None, mean, invstd, True, 1e-5, [True] * 3)

    def ln_backward(x, grad):
        out, mean, rstd = aten.native_layer_norm(x, spatial, None, None, 1e-5)
        return aten.native_layer_norm_backward(grad, x, spatial, mean, rstd, None, None, [True, False, False])

    def gn_backward(x, grad):
        n = x.shape[0]
        out, mean, rstd = aten.native_group_norm(x, w, b, n, c, x[0, 0].numel(), 2, 1e-5)
        return aten.native_group_norm_backward(grad, x, mean, rstd, w, n, c, x[0, 0].numel(), 2, [True] * 3)

    conv_w = torch.randn(c, c, *([3] * len(spatial)))

    def conv(x):
        return aten.convolution(x, conv_w, None, [1] * len(spatial), [1] * len(spatial), [1] * len(spatial), False,
                                [0] * len(spatial), 1)

    def conv_backward(x, grad):
        return aten.convolution_backward(grad, x, conv_w, None, [1] * len(spatial), [1] * len(spatial),
                                         [1] * len(spatial), False, [0] * len(spatial), 1, [True, True, False])

    def dropout_backward(x, grad):
        out, mask = aten.native_dropout(x, 0.5, True)
        return aten.native_dropout_backward(grad, mask, 2.0)

    def softmax_backward(x, grad):
        return aten._softmax_backward_data(grad, aten._softmax(x, 1, False), 1, x.dtype)

    def log_softmax_backward(x, grad):
        return aten._log_softmax_backward_data(grad, aten._log_softmax(x, 1, False), 1, x.dtype)

    ops = {
        "_native_batch_norm_legit_functional":
            lambda x: aten._native_batch_norm_legit_functional(x, w, b, *stats(), True, 0.1, 1e-5),
        "_native_batch_norm_legit_no_training":
            lambda x: aten._native_batch_norm_legit_no_training(x, w, b, *stats(), 0.1, 1e-5),
        "native_batch_norm_backward": lambda x: bn_backward(x, g),
        "native_batch_norm_backward (grad _like)": lambda x: bn_backward(x, torch.randn_like(x)),
        "native_layer_norm": lambda x: aten.native_layer_norm(x, spatial, None, None, 1e-5),
        "native_layer_norm_backward (grad _like)": lambda x: ln_backward(x, torch.randn_like(x)),
        "native_group_norm": lambda x: aten.native_group_norm(x, w, b, x.shape[0], c, x[0, 0].numel(), 2, 1e-5),
        "native_group_norm_backward (grad _like)": lambda x: gn_backward(x, torch.randn_like(x)),
        "convolution": conv,
        "convolution_backward (grad contiguous)":
            lambda x: conv_backward(x, torch.randn_like(conv(x), memory_format=torch.contiguous_format)),
        "convolution_backward (grad _like)": lambda x: conv_backward(x, torch.randn_like(conv(x))),
        "_softmax": lambda x: aten._softmax(x, 1, False),
        "_softmax_backward_data (grad _like)": lambda x: softmax_backward(x, torch.randn_like(x)),
        "_log_softmax": lambda x: aten._log_softmax(x, 1, False),
        "_log_softmax_backward_data (grad _like)": lambda x: log_softmax_backward(x, torch.randn_like(x)),
        "native_dropout": lambda x: aten.native_dropout(x, 0.5, True),
        "native_dropout_backward (grad _like)": lambda x: dropout_backward(x, torch.randn_like(x)),
        "gelu": lambda x: aten.gelu(x),
        "gelu_backward (grad _like)": lambda x: aten.gelu_backward(torch.randn_like(x), x),
        "tanh_backward (grad contiguous)": lambda x: aten.tanh_backward(g, x),
        "threshold_backward (grad contiguous)": lambda x: aten.threshold_backward(g, x, 0.0),
        "add (contiguous + x)": lambda x: aten.add(g, x),
        "mul (x * scalar)": lambda x: aten.mul(x, 3.0),
        "clone": lambda x: aten.clone(x),
        "empty_like": lambda x: aten.empty_like(x),
        "rand_like": lambda x: aten.rand_like(x),
        "bernoulli.p (on empty_like)": lambda x: aten.bernoulli.p(aten.empty_like(x), 0.5),
        "sum (dim 1, keepdim)": lambda x: aten.sum.dim_IntList(x, [1], True),
        "var_mean (dim 1)": lambda x: aten.var_mean.correction(x, [1], correction=0, keepdim=True),
        "cumsum (dim 1)": lambda x: aten.cumsum(x, 1),
        "sort (dim 1)": lambda x: aten.sort(x, 1),
        "topk (dim 1)": lambda x: aten.topk(x, 2, 1),
        "max.dim (dim 1)": lambda x: aten.max.dim(x, 1),
        "where (x > 0)": lambda x: aten.where.self(aten.gt.Scalar(x, 0), x, g),
        "copy (into contiguous)": lambda x: aten.copy(g, x),
        "index_select (dim 1)": lambda x: aten.index_select(x, 1, torch.tensor([0, 2])),
        "select_backward": lambda x: aten.select_backward(x[:, 0], x.shape, 1, 0),
        "slice_backward": lambda x: aten.slice_backward(x[:, 1:], x.shape, 1, 1, x.shape[1], 1),
        "constant_pad_nd": lambda x: aten.constant_pad_nd(x, [1, 1]),
        "cat (x, x) dim 1": lambda x: aten.cat([x, x], 1),
    }
    if x.dim() == 4:
        ops |= {
            "max_pool2d_with_indices": lambda x: aten.max_pool2d_with_indices(x, [2, 2], [1, 1]),
            "avg_pool2d": lambda x: aten.avg_pool2d(x, [2, 2], [1, 1]),
            "_adaptive_avg_pool2d": lambda x: aten._adaptive_avg_pool2d(x, [1, 1]),
            "upsample_nearest2d": lambda x: aten.upsample_nearest2d(x, [6, 10]),
            "upsample_bilinear2d": lambda x: aten.upsample_bilinear2d(x, [6, 10], False),
        }
    return ops


def _strides(value: object) -> list:
    """Strides of each tensor, but for dims of size 1, whose strides nothing reads."""
    values = value if isinstance(value, (tuple, list)) else [value]
    return [tuple(st if n != 1 else None for n, st in zip(v.shape, v.stride(), strict=True))
            if isinstance(v, torch.Tensor) else None for v in values]


def survey_ops() -> list[tuple[str, str, list, list]]:
    """(op, input, real strides, fake strides) for each output layout that differs."""
    found = []
    for kind, x in _inputs().items():
        for name, op in _ops(x).items():
            torch.manual_seed(0)
            try:
                real = _strides(op(x))
            except RuntimeError as error:
                real = [f"error: {str(error).splitlines()[0][:60]}"]
            mode = fake_tensor_mode(allow_real_inputs=True)
            fake_x = mode.from_tensor(x)
            try:
                with mode:
                    fake = _strides(op(fake_x))
            except Exception as error:
                fake = [f"error: {str(error).splitlines()[0][:60]}"]
            if real != fake:
                found.append((name, kind, real, fake))
    return found


class Transposed(nn.Module):
    """A norm over the D of a (B, T, D) batch, then a linear over D."""

    def __init__(self, norm: nn.Module, d: int = 4):
        super().__init__()
        self.pre, self.norm, self.head = nn.Linear(d, d), norm, nn.Linear(d, d)

    def forward(self, x):
        h = self.norm(torch.tanh(self.pre(x)).transpose(1, 2)).transpose(1, 2)
        return self.head(h).pow(2).sum()


class Image(nn.Module):
    """A conv net on an image given as (N, H, W, C) and permuted, or in channels_last."""

    def __init__(self, norm: nn.Module, permute: bool):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(4, 4, 3, padding=1), norm, nn.Linear(4 * 3 * 5, 2)
        self.permute = permute

    def forward(self, x):
        h = x.permute(0, 3, 1, 2) if self.permute else x
        h = torch.relu(self.norm(self.conv(h)))
        return self.head(h.reshape(h.shape[0], -1)).pow(2).sum()


class WritesARow(nn.Module):
    """`h[:, 0] = ...` on a clone: functionalized as a copy of the row and a scatter."""

    def __init__(self):
        super().__init__()
        self.pre, self.head = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):
        h = torch.tanh(self.pre(x)).clone()
        h[:, 0] = h[:, 0] * 3
        return self.head(h).pow(2).sum()


class Classes(nn.Module):
    """Cross-entropy over the classes of a (B, C, T) output: log-softmax over dim 1 of a transposed tensor."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 5)

    def forward(self, x):
        logits = self.pre(x).transpose(1, 2)
        return nn.functional.cross_entropy(logits, torch.zeros(x.shape[0], x.shape[1], dtype=torch.long))


class Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

    def forward(self, x):
        h = self.drop(torch.softmax(self.pre(x).transpose(1, 2), dim=-1)).transpose(1, 2)
        return h.reshape(-1, 4).pow(2).sum()


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    seq, nhwc = torch.randn(2, 6, 4), torch.randn(2, 3, 5, 4)
    cl = torch.randn(2, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    return {
        "batch norm, transposed (B, T, D)": (Transposed(nn.BatchNorm1d(4)), seq),
        "instance norm, transposed (B, T, D)": (Transposed(nn.InstanceNorm1d(4, affine=True)), seq),
        "group norm, transposed (B, T, D)": (Transposed(nn.GroupNorm(2, 4)), seq),
        "layer norm over T, transposed": (Transposed(nn.LayerNorm(6)), seq),
        "softmax + dropout, transposed": (Softmax(), seq),
        "index write into a clone": (WritesARow(), seq),
        "cross-entropy over dim 1 of (B, C, T)": (Classes(), seq),
        "conv + batch norm, permuted NHWC": (Image(nn.BatchNorm2d(4), True), nhwc),
        "conv + group norm, permuted NHWC": (Image(nn.GroupNorm(2, 4), True), nhwc),
        "conv + batch norm, channels_last": (Image(nn.BatchNorm2d(4), False), cl),
        "conv + group norm, channels_last": (Image(nn.GroupNorm(2, 4), False), cl),
    }


def _storage_bytes(value: object) -> list:
    values = value if isinstance(value, (tuple, list)) else [value]
    return [v.untyped_storage().nbytes() if isinstance(v, torch.Tensor) else None for v in values]


def survey_graph(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, object, object]]:
    """(node, op, real, traced) for each node of the traced step whose real CPU output (run with the model's own
    values) has other strides, or another storage size, than the traced one: "strides / storage bytes" each."""
    step = capture_step(model, (x,))
    values = {}
    primals = iter([*dict(step_tensors(model)).values(), x])
    found = []
    for node in step.joint.graph.nodes:
        if node.op == "placeholder":
            values[node] = torch.ones(()) if node.name.startswith("tangents") else next(primals)
            continue
        if node.op == "output":
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
        target = aten.reshape.default if node.target is aten.view.default else node.target  # as execute.py runs it
        values[node] = target(*args, **kwargs)
        if node.target is operator.getitem:
            continue
        real = (_strides(values[node]), _storage_bytes(values[node]))
        traced = (_strides(node.meta.get("val")), _storage_bytes(node.meta.get("val")))
        if real != traced:
            found.append((node.name, str(node.target), real, traced))
    return found


def step_tensors(model: nn.Module):
    """Parameters, then buffers, as the joint graph takes them."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def main() -> None:
    warnings.simplefilter("ignore")
    print("ops whose CPU output strides differ from the fake ones (op, input: real vs fake):")
    for name, kind, real, fake in survey_ops():
        print(f"  {name:42} {kind:14} real {real} fake {fake}")
    print("\ntraced steps run on real CPU tensors (node: real vs traced (strides, storage bytes)):")
    for title, (model, x) in _models().items():
        found = survey_graph(model, x)
        print(f"  {title}: {'same' if not found else ''}")
        for name, target, real, traced in found:
            print(f"    {name:34} {target:48} real {real} traced {traced}")


if __name__ == "__main__":
    main()
