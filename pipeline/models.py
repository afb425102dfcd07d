"""Region classifiers split at the layers the R-CNN family uses: conv5, pool5, fc6, fc7 and a head.

The trunk (conv layers up to conv5) runs on an image of any size; pool5 is the last max-pool, the
layer SPP-net replaces by spatial pyramid pooling and Fast R-CNN by RoI pooling, both over the trunk's
map of the whole image (stride `trunk_stride`) with an output of `roi_size` x `roi_size` per region.
Backbones: torchvision's AlexNet (227 px input, pool5 256x6x6) and VGG16 (224 px, pool5 512x7x7), and
a small network for CPU presets (four conv-BN-ReLU-maxpool blocks, pool5 64 x (S/16) x (S/16)).
ImageNet weights for AlexNet and VGG16 are read from a local file or the torch hub cache, never
downloaded (pipeline.weights).
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from pipeline.errors import ConfigError

BACKBONES = ("small", "alexnet", "vgg16")
TORCHVISION_WEIGHTS = {"alexnet": "AlexNet_Weights", "vgg16": "VGG16_Weights"}
SMALL_CHANNELS = (16, 32, 64, 64)
# pixels per conv5 cell: the small net's three max-pools before pool5; AlexNet's stride-4 conv1 and two
# max-pools; VGG16's four max-pools
TRUNK_STRIDES = {"small": 8, "alexnet": 16, "vgg16": 16}


class RegionNet(nn.Module):
    """trunk (conv1..conv5) -> pool5 layer -> fc6 -> fc7 -> head (num_outputs logits)."""

    def __init__(self, trunk: nn.Module, pool5_layer: nn.Module, fc6: nn.Module, fc7: nn.Module, fc7_dim: int,
                 num_outputs: int, trunk_stride: int, roi_size: int):
        super().__init__()
        self.trunk, self.pool5_layer, self.fc6, self.fc7 = trunk, pool5_layer, fc6, fc7
        self.head = nn.Linear(fc7_dim, num_outputs)
        self.trunk_stride, self.roi_size = trunk_stride, roi_size

    def pool5(self, crops: torch.Tensor) -> torch.Tensor:
        """crops[K, 3, S, S] (normalised) -> pool5[K, C, roi_size, roi_size]."""
        return self.pool5_layer(self.trunk(crops))

    def set_fc6_input(self, input_dim: int) -> None:
        """A new, randomly initialised fc6 taking `input_dim` features, unless it takes that many already."""
        index, linear = next((index, m) for index, m in enumerate(self.fc6) if isinstance(m, nn.Linear))
        if linear.in_features != input_dim:
            self.fc6[index] = nn.Linear(input_dim, linear.out_features)

    @property
    def trunk_channels(self) -> int:
        return next(m.out_channels for m in reversed(list(self.trunk.modules())) if isinstance(m, nn.Conv2d))

    def fc(self, pool5: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """pool5[K, C, h, w] (or flattened [K, C*h*w]) -> fc6 or fc7 activations [K, D]."""
        activations = self.fc6(pool5.flatten(1))
        return activations if layer == "fc6" else self.fc7(activations)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.pool5(crops)))

    def replace_head(self, num_outputs: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_outputs)


def build_region_net(name: str, num_outputs: int, input_size: int, torchvision_state: dict | None = None,
                     fc6_input_dim: int | None = None) -> RegionNet:
    """A RegionNet with randomly initialised head; `torchvision_state` loads ImageNet weights first.

    `fc6_input_dim` gives fc6 another input size than pool5's (SPP-net's pyramid), newly initialised.
    """
    if name == "small":
        if torchvision_state is not None:
            raise ConfigError("backbone small has no torchvision weights; use backbone.weights: pretrain or none")
        net = _small_net(num_outputs, input_size)
    elif name in TORCHVISION_WEIGHTS:
        net = _torchvision_net(name, num_outputs, torchvision_state)
    else:
        raise ConfigError(f"backbone.name {name!r}: expected one of {', '.join(BACKBONES)}")
    if fc6_input_dim is not None:
        net.set_fc6_input(fc6_input_dim)
    return net


def _torchvision_net(name: str, num_outputs: int, torchvision_state: dict | None) -> RegionNet:
    model = getattr(torchvision.models, name)(weights=None)
    if torchvision_state is not None:
        model.load_state_dict(torchvision_state)
    # features ends with pool5 (a max-pool); the conv layers before it run on images of any size
    trunk, pool5_layer = model.features[:-1], nn.Sequential(model.features[-1], model.avgpool)
    # AlexNet: [Dropout, fc6, ReLU, Dropout, fc7, ReLU, fc8]; VGG16: [fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8]
    fc6, fc7 = nn.Sequential(*model.classifier[:3]), nn.Sequential(*model.classifier[3:6])
    roi_size = model.avgpool.output_size[0]
    return RegionNet(trunk, pool5_layer, fc6, fc7, 4096, num_outputs, trunk_stride=TRUNK_STRIDES[name],
                     roi_size=roi_size)


def _small_net(num_outputs: int, input_size: int) -> RegionNet:
    if input_size % 16:
        raise ConfigError(f"backbone.input_size {input_size}: the small backbone needs a multiple of 16")
    layers, in_channels = [], 3
    for index, channels in enumerate(SMALL_CHANNELS):
        kernel = 5 if index == 0 else 3
        layers += [nn.Conv2d(in_channels, channels, kernel, padding=kernel // 2), nn.BatchNorm2d(channels),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        in_channels = channels
    roi_size = input_size // 16
    fc6 = nn.Sequential(nn.Dropout(), nn.Linear(in_channels * roi_size ** 2, 256), nn.ReLU(inplace=True))
    fc7 = nn.Sequential(nn.Dropout(), nn.Linear(256, 256), nn.ReLU(inplace=True))
    return RegionNet(nn.Sequential(*layers[:-1]), layers[-1], fc6, fc7, 256, num_outputs,
                     trunk_stride=TRUNK_STRIDES["small"], roi_size=roi_size)
