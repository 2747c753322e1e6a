"""Model zoo and `path/to/file.py:factory` loading.

Every model here returns its own scalar training loss: language models take `input_ids` and predict the
next token, image models take `(images, labels)` and return cross-entropy. `build_model` is called inside
`FakeTensorMode` by the capture stage, so everything below creates tensors with ordinary torch calls and
never reads a tensor's values on the host; the same code builds real models for training.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import sys
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from remat.zoo import model_problem

DEFAULT_BATCH = 16  # the zoo's batch, and a factory's batch= when it has no default of its own


@dataclass
class ModelSpec:
    """A model, the inputs of one training step, and what the loss is."""

    name: str
    model: nn.Module  # model(*example_inputs) returns the scalar training loss (or an object with .loss)
    example_inputs: tuple | dict[str, Any]  # passed positionally to model, or by name (a user factory's dict)
    loss_fn: Callable | None = None  # if given: loss = loss_fn(model(*example_inputs))
    batch: int | None = DEFAULT_BATCH  # None: a factory's inputs with no batch dimension to read it from
    seq: int | None = None  # sequence length for language models; None for others
    description: str = ""


class ModelError(ValueError):
    """A one-line, user-facing message: what is wrong and what to do."""


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, tied weights counted once (works on fake tensors)."""
    return sum(p.numel() for p in model.parameters())


def _millions(count: int) -> str:
    if count < 1e5:  # a small model's 0.0M said nothing
        return f"{count / 1e3:.1f}K"
    return f"{count / 1e6:.1f}M" if count < 1e9 else f"{count / 1e9:.2f}B"


# ----------------------------------------------------------------------------------------------------------
# GPT-2 (Hugging Face transformers, random init)


@dataclass(frozen=True)
class GPT2Size:
    title: str
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = 50257
    n_positions: int = 1024


GPT2_SIZES = {
    "gpt2": GPT2Size("GPT-2 small", n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Size("GPT-2 medium", n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Size("GPT-2 large", n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Size("GPT-2 XL", n_layer=48, n_head=25, n_embd=1600),
    "gpt2-tiny": GPT2Size("GPT-2 tiny", n_layer=2, n_head=4, n_embd=128, vocab_size=1000, n_positions=256),
}


class GPT2Loss(nn.Module):
    """GPT2LMHeadModel whose forward(input_ids) is the next-token loss on the same ids."""

    def __init__(self, size: GPT2Size):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=size.vocab_size, n_positions=size.n_positions,
            n_embd=size.n_embd, n_layer=size.n_layer, n_head=size.n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,  # no dropout
            bos_token_id=size.vocab_size - 1, eos_token_id=size.vocab_size - 1,  # 50256 for the real vocab
            use_cache=False, attn_implementation="sdpa",
        )
        self.lm = GPT2LMHeadModel(config)  # lm_head tied to transformer.wte
        self.lm.loss_type = "ForCausalLM"  # HF's name-based guess misses "GPT2LMHeadModel" and warns

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: (B, T) int64; HF shifts the labels by one inside
        return self.lm(input_ids=input_ids, labels=input_ids).loss


def _sequence_length(name: str, seq: int | None, n_positions: int, default: int) -> int:
    """`seq`, or the model's default where none is given; longer than its position table: ModelError."""
    seq = default if seq is None else seq
    if seq > n_positions:
        raise ModelError(f"--seq {seq} is longer than {name}'s {n_positions} positions: "
                         f"use --seq {n_positions} or less")
    return seq


def _build_gpt2(name: str, batch: int, seq: int | None) -> ModelSpec:
    size = GPT2_SIZES[name]
    seq = _sequence_length(name, seq, size.n_positions, default=size.n_positions)
    model = GPT2Loss(size)
    input_ids = torch.randint(0, size.vocab_size, (batch, seq))  # (B, T)
    description = (f"{size.title} ({_millions(count_parameters(model))} params), seq {seq}, "
                   "random init, dropout 0")
    return ModelSpec(name, model, (input_ids,), batch=batch, seq=seq, description=description)


# ----------------------------------------------------------------------------------------------------------
# Llama-style decoders (Hugging Face LlamaConfig: RMSNorm, SwiGLU MLP, rotary positions, grouped-query
# attention, untied head; random init)


@dataclass(frozen=True)
class LlamaSize:
    title: str
    n_layer: int
    n_head: int
    n_kv_head: int
    hidden: int
    intermediate: int
    vocab_size: int = 32000
    n_positions: int = 2048
    default_seq: int = 1024


LLAMA_SIZES = {
    "llama": LlamaSize("Llama-style 12 x 768", n_layer=12, n_head=12, n_kv_head=4, hidden=768, intermediate=2048),
    "llama-tiny": LlamaSize("Llama-style tiny", n_layer=2, n_head=4, n_kv_head=2, hidden=128, intermediate=344,
                            vocab_size=1000, n_positions=256, default_seq=256),
}


class LlamaLoss(nn.Module):
    """LlamaForCausalLM whose forward(input_ids) is the next-token loss on the same ids."""

    def __init__(self, size: LlamaSize):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=size.vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
            num_hidden_layers=size.n_layer, num_attention_heads=size.n_head, num_key_value_heads=size.n_kv_head,
            max_position_embeddings=size.n_positions, use_cache=False, attn_implementation="sdpa",
            bos_token_id=None, eos_token_id=None,
        )
        self.lm = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: (B, T) int64; HF shifts the labels by one inside
        return self.lm(input_ids=input_ids, labels=input_ids).loss


def _build_llama(name: str, batch: int, seq: int | None) -> ModelSpec:
    size = LLAMA_SIZES[name]
    seq = _sequence_length(name, seq, size.n_positions, default=size.default_seq)
    model = LlamaLoss(size)
    input_ids = torch.randint(0, size.vocab_size, (batch, seq))  # (B, T)
    description = f"{size.title} ({_millions(count_parameters(model))} params), seq {seq}, random init"
    return ModelSpec(name, model, (input_ids,), batch=batch, seq=seq, description=description)


# ----------------------------------------------------------------------------------------------------------
# Image classifiers: forward(images, labels) -> cross-entropy. Layouts follow torchvision's, so module
# paths read "features.3", "layer2.1.conv1" and parameter counts match torchvision's.


class Classifier(nn.Module, ABC):
    """Base: subclasses define logits(images); forward adds the cross-entropy loss."""

    @abstractmethod
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) class scores."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(images), labels)


class MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(x))


class MLP(Classifier):
    """Checkmate's MLP benchmark: a stack of equal-width Linear+ReLU layers and a linear classifier."""

    def __init__(self, in_features: int = 1024, width: int = 1024, depth: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth - 1))
        self.head = nn.Linear(width, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, width)
        for block in self.blocks:
            x = block(x)  # (B, width)
        return self.head(x)  # (B, num_classes)


class VGG16(Classifier):
    """torchvision's vgg16 (configuration D, no BatchNorm): 13 convs, 5 max-pools, 3 fully connected."""

    LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in self.LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 512, H/32, W/32)
        x = self.avgpool(x)  # (B, 512, 7, 7)
        return self.classifier(torch.flatten(x, 1))  # (B, num_classes)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision): 1x1 -> 3x3 -> 1x1, expansion 4."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, C_out, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, width, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, width, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, C_out, H/s, W/s)
        return self.relu(out + identity)


class ResNet50(Classifier):
    """torchvision's resnet50: stem, four stages of [3, 4, 6, 3] bottlenecks, global pool, fc."""

    def __init__(self, num_classes: int = 1000, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
            stride = 1 if stage == 1 else 2
            layer = []
            for index in range(count):
                layer.append(Bottleneck(in_channels, width, stride if index == 0 else 1))
                in_channels = width * Bottleneck.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():  # torchvision's init
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer1(x)  # (B, 256, H/4, W/4)
        x = self.layer2(x)  # (B, 512, H/8, W/8)
        x = self.layer3(x)  # (B, 1024, H/16, W/16)
        x = self.layer4(x)  # (B, 2048, H/32, W/32)
        x = self.avgpool(x)  # (B, 2048, 1, 1)
        return self.fc(torch.flatten(x, 1))  # (B, num_classes)


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, kernel_size=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(Classifier):
    """torchvision's mobilenet_v2 (width 1.0)."""

    # expand ratio t, output channels c, repeats n, first stride s
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        in_channels, last_channels = 32, 1280
        features: list[nn.Module] = [_conv_bn_relu6(3, in_channels, stride=2)]
        for t, c, n, s in self.SETTINGS:
            for index in range(n):
                features.append(InvertedResidual(in_channels, c, s if index == 0 else 1, t))
                in_channels = c
        features.append(_conv_bn_relu6(in_channels, last_channels, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        for module in self.modules():  # torchvision's init
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 1280, H/32, W/32)
        x = x.mean(dim=(2, 3))  # (B, 1280)
        return self.classifier(x)  # (B, num_classes)


# ----------------------------------------------------------------------------------------------------------
# DenseNet: every layer of a block reads the concatenation of all the block's earlier outputs


class DenseLayer(nn.Module):
    """BatchNorm -> ReLU -> 1x1 conv (to 4 x growth) -> BatchNorm -> ReLU -> 3x3 conv (to growth channels)."""

    def __init__(self, in_channels: int, growth: int, width: int = 4):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width * growth, kernel_size=1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(width * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width * growth, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)  # (B, in_channels, H, W): every earlier output of the block
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))  # (B, growth, H, W)


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, in_channels: int, growth: int):
        super().__init__({f"denselayer{i + 1}": DenseLayer(in_channels + i * growth, growth) for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)  # (B, in_channels + layers x growth, H, W)


class DenseNet121(Classifier):
    """torchvision's densenet121: 4 dense blocks of 6, 12, 24 and 16 layers (growth 32), transitions that halve
    the channels and the resolution between them. Checkmate's paper found DenseNet the hardest to solve."""

    BLOCKS = (6, 12, 24, 16)

    def __init__(self, num_classes: int = 1000, growth: int = 32, stem_channels: int = 64):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(stem_channels))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        channels = stem_channels
        for index, layers in enumerate(self.BLOCKS, start=1):
            self.features.add_module(f"denseblock{index}", DenseBlock(layers, channels, growth))
            channels += layers * growth
            if index < len(self.BLOCKS):
                self.features.add_module(f"transition{index}", nn.Sequential(
                    OrderedDict(norm=nn.BatchNorm2d(channels), relu=nn.ReLU(inplace=True),
                                conv=nn.Conv2d(channels, channels // 2, kernel_size=1, bias=False),
                                pool=nn.AvgPool2d(kernel_size=2, stride=2))))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))  # (B, 1024, H/32, W/32)
        x = x.mean(dim=(2, 3))  # (B, 1024)
        return self.classifier(x)  # (B, num_classes)


# ----------------------------------------------------------------------------------------------------------
# U-Net: per-pixel segmentation


class DoubleConv(nn.Module):
    """(3x3 conv -> BatchNorm -> ReLU) twice, same spatial size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Down(nn.Module):
    """Halve the resolution, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """Double the resolution with a transposed conv, concatenate the skip connection, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, C/2, 2H, 2W), same size as skip
        return self.conv(torch.cat([skip, x], dim=1))  # (B, C_out, 2H, 2W)


class UNet(nn.Module):
    """Ronneberger et al.'s U-Net with padded convs and BatchNorm: 4 levels down, 4 up, base 64 channels.

    forward(images (B, 3, H, W), labels (B, H, W) int64) -> per-pixel cross-entropy; H, W divisible by 16.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 64, depth: int = 4):
        super().__init__()
        widths = [base * 2**level for level in range(depth + 1)]  # 64, 128, 256, 512, 1024
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc(x)  # (B, 64, H, W)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)  # (B, 2C, H/2, W/2)
        for up in self.ups:
            x = up(x, skips.pop())  # (B, C/2, 2H, 2W)
        return self.outc(x)  # (B, num_classes, H, W)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(images), labels)


# ----------------------------------------------------------------------------------------------------------
# The zoo


@dataclass(frozen=True)
class ImageTask:
    title: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # per example, without the batch dimension
    label_shape: tuple[int, ...]  # per example: () for a class, (H, W) for a segmentation map
    num_classes: int


IMAGE_TASKS = {
    "mlp": ImageTask("MLP, 8 x Linear(1024, 1024) + ReLU, 1024 features, 10 classes", MLP, (1024,), (), 10),
    "vgg16": ImageTask("VGG-16, 224x224 RGB, 1000 classes", VGG16, (3, 224, 224), (), 1000),
    "resnet50": ImageTask("ResNet-50, 224x224 RGB, 1000 classes", ResNet50, (3, 224, 224), (), 1000),
    "mobilenet_v2": ImageTask("MobileNetV2, 224x224 RGB, 1000 classes", MobileNetV2, (3, 224, 224), (), 1000),
    "unet": ImageTask("U-Net, 256x256 RGB, 2-class segmentation", UNet, (3, 256, 256), (256, 256), 2),
    "densenet121": ImageTask("DenseNet-121, 224x224 RGB, 1000 classes", DenseNet121, (3, 224, 224), (), 1000),
    # extreme classification: the output layer and its logits dwarf the rest of the network
    "mlp-xc": ImageTask("MLP, 4 x Linear(1024, 1024) + ReLU, 1024 features, 131,072 classes",
                        lambda: MLP(depth=4, num_classes=131072), (1024,), (), 131072),
}



def _build_image_model(name: str, batch: int, seq: int | None) -> ModelSpec:
    if seq is not None:
        raise ModelError(f"--seq applies to language models only (gpt2...), not to {name}: leave it out")
    task = IMAGE_TASKS[name]
    model = task.build()
    images = torch.randn(batch, *task.input_shape)  # (B, C, H, W), or (B, features) for the MLP
    labels = torch.randint(0, task.num_classes, (batch, *task.label_shape))  # (B,) or (B, H, W)
    description = f"{task.title} ({_millions(count_parameters(model))} params), random init"
    return ModelSpec(name, model, (images, labels), batch=batch, description=description)


def build_model(name_or_path: str, batch: int | None = None, seq: int | None = None) -> ModelSpec:
    """A zoo model by name, or `path/to/file.py:factory` for a model of your own. `batch` None: DEFAULT_BATCH for
    the zoo, the factory's own `batch=` default for a factory that has one.

    Safe to call inside FakeTensorMode (the capture stage does): no tensor values are read.
    """
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ModelError(f"batch must be a positive integer, got {batch!r}")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise ModelError(f"--seq must be a positive integer, got {seq!r}")
    zoo_batch = DEFAULT_BATCH if batch is None else batch
    if name_or_path in GPT2_SIZES:
        return _build_gpt2(name_or_path, zoo_batch, seq)
    if name_or_path in LLAMA_SIZES:
        return _build_llama(name_or_path, zoo_batch, seq)
    if name_or_path in IMAGE_TASKS:
        return _build_image_model(name_or_path, zoo_batch, seq)
    problem = model_problem(name_or_path)
    if problem:
        raise ModelError(problem)
    path, _, factory = name_or_path.rpartition(":")
    return _build_from_factory(Path(path), factory, batch, seq)


# ----------------------------------------------------------------------------------------------------------
# User factories: def factory([batch=...], [seq=...]) -> (model, example_inputs[, loss_fn])

_module_counter = itertools.count()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _import_file(path: Path):
    """Import a Python file as a fresh module (its folder importable while it loads)."""
    module_name = f"remat_user_{path.stem}_{next(_module_counter)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        del sys.modules[module_name]
        raise ModelError(f"importing {path} failed: {_first_line(error)}") from error
    finally:
        sys.path.remove(folder)
    return module


def _factory_kwargs(factory: Callable, where: str, batch: int | None, seq: int | None) -> dict:
    """batch= and seq= for the factory parameters that take them; no arguments for a factory that takes none. Either
    left None keeps the factory's own default; a batch= without one gets DEFAULT_BATCH."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = {name for name, p in parameters.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    required = [name for name, p in parameters.items()
                if p.default is inspect.Parameter.empty and name not in ("batch", "seq")
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if required:
        raise ModelError(f"{where} needs arguments {', '.join(required)}: a factory may take only batch= and seq=")
    kwargs = {}
    batch_required = "batch" in parameters and parameters["batch"].default is inspect.Parameter.empty
    if (takes_any or "batch" in accepted) and (batch is not None or batch_required):
        kwargs["batch"] = DEFAULT_BATCH if batch is None else batch  # no --batch: the factory's own default
    elif batch is not None:
        raise ModelError(f"{where} takes no batch argument, but batch {batch} was asked for: add a batch= parameter "
                         "(remat maxbatch and compare --max-batch try several batches, which needs one), or leave "
                         "--batch out where you gave it")
    seq_required = "seq" in parameters and parameters["seq"].default is inspect.Parameter.empty
    if seq_required and seq is None:
        raise ModelError(f"{where} takes seq= without a default: give --seq (or a default in the factory)")
    if (takes_any or "seq" in accepted) and seq is not None:
        kwargs["seq"] = seq  # no --seq: the factory's own default, not None over it
    elif seq is not None:
        raise ModelError(f"--seq {seq} was given but {where} takes no seq argument: add one or leave --seq out")
    return kwargs


def _build_from_factory(path: Path, factory_name: str, batch: int | None, seq: int | None) -> ModelSpec:
    where = f"{path}:{factory_name}"
    module = _import_file(path)
    factory = getattr(module, factory_name, None)
    if factory is None:
        defined = sorted(name for name, value in vars(module).items()
                         if inspect.isfunction(value) and value.__module__ == module.__name__ and name[0] != "_")
        raise ModelError(f"{path} has no function {factory_name!r}; functions defined there: "
                         f"{', '.join(defined) or 'none'}")
    if not callable(factory):
        raise ModelError(f"{where} is a {type(factory).__name__}, not a function")
    kwargs = _factory_kwargs(factory, where, batch, seq)
    try:
        result = factory(**kwargs)
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(f"{where} raised {_first_line(error)}") from error

    expected = "return (model, example_inputs) or (model, example_inputs, loss_fn)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise ModelError(f"{where} returned {type(result).__name__}"
                         f"{f' of length {len(result)}' if isinstance(result, (tuple, list)) else ''}: {expected}")
    model, example_inputs, loss_fn = (*result, None) if len(result) == 2 else result
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where} returned a {type(model).__name__} as the model, not a torch.nn.Module: {expected}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    elif isinstance(example_inputs, dict) and not all(isinstance(name, str) for name in example_inputs):
        raise ModelError(f"{where} returned a dict of example_inputs with keys that are not all strings: "
                         "give the model's argument names")
    if not isinstance(example_inputs, (tuple, dict)):
        raise ModelError(f"{where} returned example_inputs of type {type(example_inputs).__name__}: give a tensor, "
                         "a tuple of model(*example_inputs) arguments or a dict of model(**example_inputs) ones")
    if loss_fn is not None and not callable(loss_fn):
        raise ModelError(f"{where} returned a {type(loss_fn).__name__} as loss_fn: give a callable or None")

    if "batch" in kwargs:
        batch = kwargs["batch"]
    else:  # the factory chose its own batch: report the leading dimension of its first tensor
        values = example_inputs.values() if isinstance(example_inputs, dict) else example_inputs
        first = next((x for x in values if isinstance(x, torch.Tensor) and x.dim() > 0), None)
        batch = int(first.shape[0]) if first is not None else None
    if seq is None:  # the factory's own default, for the report
        seq = _default_of(factory, "seq")
    description = f"{type(model).__name__} ({_millions(count_parameters(model))} params)"  # printed after `where`
    return ModelSpec(where, model, example_inputs, loss_fn=loss_fn, batch=batch, seq=seq, description=description)


def _default_of(factory: Callable, name: str) -> int | None:
    """The factory's default for its parameter `name` when that is an integer."""
    try:
        default = inspect.signature(factory).parameters[name].default
    except (TypeError, ValueError, KeyError):
        return None
    return default if isinstance(default, int) and not isinstance(default, bool) else None
