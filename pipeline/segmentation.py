"""Semantic segmentation: a fully convolutional network with every upsampling of the lecture, and metrics.

FCN (Long, Shelhamer and Darrell, CVPR 2015) and the encoder-decoder of Noh et al. (ICCV 2015): the
encoder is either a classification network's conv layers cut at their 2x2 max-pools, with its fully
connected layers turned into convolutions as the bottleneck (FCN's recipe: `trunk_levels` and
`convolutionalized` of the pretrained backbone), or fresh conv blocks of `channels`; it halves the
resolution once per level (2x2 max-pooling, or for fresh blocks a stride-2 3x3 convolution),
the decoder doubles it back as many times and ends in a 1x1 convolution giving a score per class and
background for every pixel. Each decoder step is an upsampling followed by a 3x3 convolution (so that
the fixed upsamplings, too, have weights to learn what to fill in):

    nearest          each value copied into its 2x2 output block
    bed-of-nails     each value at the top-left corner of its 2x2 block, zeros elsewhere
    max-unpool       each value back where the paired 2x2 max-pool found its maximum, zeros elsewhere
                     (torch.nn.MaxUnpool2d with the positions the encoder's pool returned)
    transpose-conv   a learnable 3x3 transpose convolution, stride 2, padding 1 (output padding 1)

Skip connections (FCN-16s / 8s style): with `skips` = k, the decoder adds the encoder's features at
the k coarsest resolutions below the bottleneck to its own before convolving them (FCN adds score
maps; here the features, whose channels already match).

Metrics come from a confusion matrix over the labelled pixels (255, "void", is left out as in VOC):
pixel accuracy, mean class accuracy and mean IoU, the three of the FCN paper.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.engine.errors import ConfigError
from pipeline.engine.schema import register_choices
from pipeline.models import build_region_net, on_device

UPSAMPLINGS = ("nearest", "bed-of-nails", "max-unpool", "transpose-conv")
DOWNSAMPLINGS = ("max-pool", "strided-conv")
register_choices("fcn.upsampling", UPSAMPLINGS)
register_choices("fcn.downsampling", DOWNSAMPLINGS)
register_choices("fcn.encoder", ("pretrain", "scratch"))
VOID = 255


class BedOfNails(nn.Module):
    """2x unpooling that puts each value at the top-left of its 2x2 block and zeros elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-2], 2 * x.shape[-2], 2 * x.shape[-1])
        out[..., ::2, ::2] = x
        return out


def upsampler(kind: str, channels: int) -> nn.Module:
    """A 2x upsampling of a [N, channels, H, W] map; max-unpool also takes the paired pool's positions."""
    if kind == "nearest":
        return nn.Upsample(scale_factor=2, mode="nearest")
    if kind == "bed-of-nails":
        return BedOfNails()
    if kind == "max-unpool":
        return nn.MaxUnpool2d(2)
    if kind == "transpose-conv":
        return nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1)
    raise ConfigError(f"fcn.upsampling {kind!r}: expected one of {', '.join(UPSAMPLINGS)}")


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def trunk_levels(trunk: nn.Sequential) -> list[nn.Sequential]:
    """A classifier's conv layers cut before each of its max-pools: the encoder levels of an FCN (the
    pools themselves are replaced by the FCN's, which remember their positions). Each pool must halve
    the resolution (2x2, stride 2: the small backbone and VGG16, not AlexNet's 3x3 stride-2 pools)."""
    levels, current = [], []
    for layer in trunk:
        if isinstance(layer, nn.MaxPool2d):
            if (layer.kernel_size, layer.stride) not in ((2, 2), ((2, 2), (2, 2))):
                raise ConfigError(f"fcn.encoder pretrain: the backbone's max-pool {layer} does not halve the "
                                  f"resolution; use the small or vgg16 backbone, or fcn.encoder scratch")
            levels.append(nn.Sequential(*current))
            current = []
        else:
            current.append(layer)
    return levels + [nn.Sequential(*current)] if current else levels


def out_channels(level: nn.Module) -> int:
    return next(m.out_channels for m in reversed(list(level.modules())) if isinstance(m, nn.Conv2d))


def convolutionalized(classifier) -> nn.Sequential:
    """A classifier's (RegionNet's) fc6 and fc7 as convolutions with the same weights (FCN §3.1): fc6
    reads a roi_size x roi_size window of pool5 cells (the window it was trained on), fc7 is 1x1. On a
    bigger map they give, at every pool5 cell, the activations the classifier computes for the window
    around it (from (roi_size - 1) // 2 cells before it to roi_size // 2 after, zeros beyond the border);
    ReLU and dropout carry over unchanged."""
    layers, in_channels, kernel = [], classifier.trunk_channels, classifier.roi_size
    for layer in (*classifier.fc6, *classifier.fc7):
        if isinstance(layer, nn.Linear):
            conv = nn.Conv2d(in_channels, layer.out_features, kernel, padding="same")
            with torch.no_grad():
                conv.weight.copy_(layer.weight.view(layer.out_features, in_channels, kernel, kernel))
                conv.bias.copy_(layer.bias)
            layer, in_channels, kernel = conv, layer.out_features, 1
        layers.append(layer)
    return nn.Sequential(*layers)


class FCN(nn.Module):
    """images[N, 3, H, W] (H, W multiples of `stride`) -> scores[N, num_outputs, H, W].

    `encoder`: the conv levels of a classifier (trunk_levels), or None for fresh blocks of `channels`;
    `fc_layers`: that classifier's fully connected layers, convolutionalized, which then replace the fresh
    bottleneck (their output is brought to the decoder's width by one more conv-BN-ReLU).
    """

    def __init__(self, num_outputs: int, channels: tuple[int, ...] = (16, 32, 64, 96),
                 upsampling: str = "transpose-conv", downsampling: str = "max-pool", skips: int = 0,
                 encoder: list[nn.Module] | None = None, fc_layers: nn.Sequential | None = None):
        super().__init__()
        if encoder is not None:
            channels = tuple(out_channels(level) for level in encoder)
        if downsampling not in DOWNSAMPLINGS:
            raise ConfigError(f"fcn.downsampling {downsampling!r}: expected one of {', '.join(DOWNSAMPLINGS)}")
        if upsampling == "max-unpool" and downsampling != "max-pool":
            raise ConfigError("fcn.upsampling max-unpool needs fcn.downsampling max-pool: it puts values back "
                              "where the paired max-pool found its maxima")
        if not 0 <= skips <= len(channels):
            raise ConfigError(f"fcn.skips {skips}: expected 0 to {len(channels)} (one per downsampling)")
        self.upsampling, self.downsampling, self.skips = upsampling, downsampling, skips
        self.stride = 2 ** len(channels)
        widths = [3, *channels]
        self.encoder = nn.ModuleList(encoder or (nn.Sequential(conv_bn_relu(widths[i], widths[i + 1]),
                                                               conv_bn_relu(widths[i + 1], widths[i + 1]))
                                                 for i in range(len(channels))))
        self.downsample = nn.ModuleList(nn.MaxPool2d(2, return_indices=True) if downsampling == "max-pool"
                                        else conv_bn_relu(width, width, stride=2) for width in channels)
        bottleneck_input = channels[-1] if fc_layers is None else out_channels(fc_layers)
        self.bottleneck = nn.Sequential(*(fc_layers or [conv_bn_relu(channels[-1], channels[-1])]),
                                        conv_bn_relu(bottleneck_input, channels[-1]))
        self.upsample = nn.ModuleList(upsampler(upsampling, width) for width in channels)
        self.decoder = nn.ModuleList(conv_bn_relu(width, channels[max(level - 1, 0)])
                                     for level, width in enumerate(channels))
        self.classifier = nn.Conv2d(channels[0], num_outputs, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2] % self.stride or images.shape[-1] % self.stride:
            raise ValueError(f"FCN input {tuple(images.shape[-2:])}: height and width must be multiples of "
                             f"{self.stride} (pad_to_stride pads them)")
        features, positions, x = [], [], images
        for block, downsample in zip(self.encoder, self.downsample):
            x = block(x)
            features.append(x)
            if self.downsampling == "max-pool":
                x, where = downsample(x)
                positions.append(where)
            else:
                x = downsample(x)
        x = self.bottleneck(x)
        levels = len(self.encoder)
        for level in reversed(range(levels)):
            upsample = self.upsample[level]
            x = upsample(x, positions[level]) if self.upsampling == "max-unpool" else upsample(x)
            if levels - level <= self.skips:
                x = x + features[level]
            x = self.decoder[level](x)
        return self.classifier(x)


def pad_to_stride(image: torch.Tensor, stride: int) -> torch.Tensor:
    """A normalised image[..., H, W] padded with zeros (the mean colour) at the bottom and right to multiples
    of stride."""
    height, width = image.shape[-2:]
    return nn.functional.pad(image, (0, -width % stride, 0, -height % stride))


def predict_mask(model: FCN, image: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The arg-max label uint8[H, W] of every pixel of one normalised image[3, H, W], the network run on
    the image resized by `scale` and its scores resized back (bilinear), as FCN upsamples its last scores."""
    height, width = image.shape[-2:]
    with torch.no_grad():
        scaled = resize(image[None], scale)
        scores = model(pad_to_stride(scaled, model.stride))[:, :, :scaled.shape[-2], :scaled.shape[-1]]
        if scale != 1:
            scores = nn.functional.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
    return scores[0].argmax(0).to(torch.uint8)


def resize(images: torch.Tensor, scale: float) -> torch.Tensor:
    """images[N, C, H, W] resized by `scale` (bilinear, antialiased when shrinking)."""
    if scale == 1:
        return images
    size = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
    return nn.functional.interpolate(images, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)


# ---- metrics ------------------------------------------------------------------------------------
def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_labels: int) -> np.ndarray:
    """int64[K, K]: pixels of true label i predicted as j, over the pixels whose truth is not void."""
    labelled = truth != VOID
    if (truth[labelled] >= num_labels).any():
        raise ValueError(f"a mask holds label {int(truth[labelled].max())}, beyond the {num_labels} labels "
                         f"(background + classes) this data set has")
    pairs = truth[labelled].astype(np.int64) * num_labels + predicted[labelled].astype(np.int64)
    return np.bincount(pairs, minlength=num_labels ** 2).reshape(num_labels, num_labels)


def segmentation_metrics(confusion: np.ndarray) -> dict:
    """Pixel accuracy, mean accuracy and mean IoU (FCN §5), and the IoU and accuracy of each label.

    As in the FCN code: mean accuracy averages the labels present in the ground truth; mean IoU
    averages every label that is in the ground truth or the prediction (one predicted but absent
    counts as IoU 0; one in neither is left out).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    true_pixels, predicted_pixels, correct = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    present = true_pixels > 0
    union = true_pixels + predicted_pixels - correct
    accuracy = np.divide(correct, true_pixels, out=np.full_like(correct, np.nan), where=present)
    iou = np.divide(correct, union, out=np.full_like(correct, np.nan), where=union > 0)
    return {"pixel_accuracy": float(correct.sum() / max(confusion.sum(), 1)),
            "mean_accuracy": float(np.nanmean(accuracy[present])) if present.any() else float("nan"),
            "mean_iou": float(np.nanmean(iou)) if (union > 0).any() else float("nan"),
            "iou": [None if np.isnan(value) else float(value) for value in iou],
            "accuracy": [None if np.isnan(value) else float(value) for value in accuracy]}


def build_fcn(params, num_classes: int, backbone, classifier=None) -> FCN:
    """The FCN of `params`; with encoder pretrain, its encoder is `classifier`'s trunk (a RegionNet; when
    None, one of the backbone's shape, for weights that are loaded next)."""
    encoder = fc_layers = None
    if params["encoder"] == "pretrain":
        classifier = classifier or build_region_net(backbone["name"], num_classes + 1, backbone["input_size"])
        encoder = trunk_levels(classifier.trunk)
        fc_layers = convolutionalized(classifier)
    elif params["encoder"] != "scratch":
        raise ConfigError(f"fcn.encoder {params['encoder']!r}: expected pretrain or scratch")
    return FCN(num_classes + 1, tuple(params["channels"]), params["upsampling"], params["downsampling"],
               params["skips"], encoder, fc_layers)


def load_fcn(cache, device: str) -> tuple[FCN, dict]:
    """The trained FCN of an fcn-train output (eval mode, on `device`) and the params it was trained with."""
    saved = torch.load(cache.shard_path("00000"), map_location=device, weights_only=True)
    model = build_fcn(saved["params"], len(saved["classes"]), saved["params"].get("backbone"))
    model.load_state_dict(saved["model"])
    return on_device(model, device).eval(), saved["params"]
