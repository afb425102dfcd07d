"""Fast R-CNN and Faster R-CNN on a RegionNet backbone, built from torchvision's detection blocks.

Both take the pretrained trunk (conv1..conv5; BatchNorm frozen, as detection backbones do: batches of
one or two images give poor statistics), RoI pooling (pipeline.roi.RoIPooler) in place of pool5, and
the pretrained fc6 and fc7 as the box head; then torchvision's RoIHeads: the two sibling outputs
(softmax over N + 1 classes, per-class box regression), the multitask loss (log loss + smooth L1)
and the sampler of `rois_per_image` RoIs per image with `fg_fraction` foreground (Fast R-CNN's
hierarchical sampling when a mini-batch holds `images_per_batch` images).
Fast R-CNN (`FastRCNN`) is given the cached selective-search proposals; Faster R-CNN is torchvision's
FasterRCNN with torchvision's RegionProposalNetwork (anchors of several sizes and aspect ratios,
objectness + box regression) on the same conv5 map, trained jointly with the head: four losses.
Images are normalised before (pipeline.regions.normalised), so torchvision's transform only resizes
them (shorter side `min_size`, longer side at most `max_size`) and batches them.

With `feature_pyramid` (Lin et al., CVPR 2017), the heads read torchvision's FeaturePyramidNetwork over
the trunk's maps at half its stride and at its stride (pipeline.models.HALF_STRIDE_LAYERS), both with the
trunk's channels so that fc6 keeps its input. RoIs are pooled by torchvision's MultiScaleRoIAlign from the
level FPN's rule (its eq. 1) gives them: a 224-pixel box on stride 16, one level finer for each halving of
its side, clamped to the two maps (for a stride-16 trunk: boxes under 112 px on the half-stride map). The
RPN also reads a max-pooled level at twice the stride (FPN's P6), `anchor_sizes` shared out over the three
levels, smallest on the finest. A pyramid costs compute on the finer map; what it buys: docs/real-photos.md.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign

from pipeline.engine.errors import ConfigError
from pipeline.models import RegionNet, build_region_net, freeze_batchnorm, on_device
from pipeline.precision import bf16_autocast
from pipeline.roi import RoIPooler, compress_fc
from pipeline.timing import Clock

NO_NORMALISATION = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


class FastRCNN(nn.Module):
    """Shared conv5 of the whole image, RoI pooling of the given proposals, the two sibling heads."""

    def __init__(self, net: RegionNet, num_classes: int, params: dict):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(params["min_size"], params["max_size"], *NO_NORMALISATION)
        self.backbone = detection_backbone(net, params)
        self.roi_heads = roi_heads(net, num_classes, params)

    def forward(self, images: list[torch.Tensor], proposals: list[torch.Tensor], targets: list[dict]) -> dict:
        """Training: normalised images[3, H, W], proposals[K, 4] and targets (boxes, labels 1..N) -> the losses."""
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, targets = self.transform(images, targets)
        proposals = resized_proposals(proposals, original_sizes, image_list.image_sizes)
        features = feature_maps(self.backbone, image_list.tensors)
        _, losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        return losses


def detection_backbone(net: RegionNet, params: dict) -> nn.Module:
    """The trunk (BatchNorm frozen), or with `feature_pyramid` an FPN over its last two strides (module
    docstring); `out_channels` set, as torchvision's detectors read it."""
    trunk = freeze_batchnorm(net.trunk)
    if not params["feature_pyramid"]:
        trunk.out_channels = net.trunk_channels
        return trunk
    layers = {net.half_stride_layer: "0", str(len(trunk) - 1): "1"}
    return BackboneWithFPN(trunk, layers, [net.half_stride_channels, net.trunk_channels], net.trunk_channels)


def feature_maps(backbone: nn.Module, images: torch.Tensor) -> dict:
    """The backbone's maps by name: "0" (the trunk's, or the pyramid's finest), "1", "pool" with a pyramid."""
    features = backbone(images)
    return {"0": features} if isinstance(features, torch.Tensor) else features


def rpn_anchors(params: dict) -> AnchorGenerator:
    """Every anchor size on the one map, or with a pyramid `anchor_sizes` split evenly over its three levels."""
    sizes, ratios = tuple(params["anchor_sizes"]), tuple(params["aspect_ratios"])
    if not params["feature_pyramid"]:
        return AnchorGenerator(sizes=(sizes,), aspect_ratios=(ratios,))
    if len(sizes) % 3:
        raise ConfigError(f"faster_rcnn.anchor_sizes {list(sizes)}: with feature_pyramid, a multiple of 3 sizes "
                          "(one share for each of the pyramid's three levels)")
    per_level = len(sizes) // 3
    return AnchorGenerator(sizes=tuple(sizes[i:i + per_level] for i in range(0, len(sizes), per_level)),
                           aspect_ratios=(ratios,) * 3)


def build_faster_rcnn(net: RegionNet, num_classes: int, params: dict) -> FasterRCNN:
    """torchvision's FasterRCNN: our trunk, its RPN, and the same RoI heads as Fast R-CNN's."""
    model = FasterRCNN(
        detection_backbone(net, params), num_classes=num_classes + 1,
        min_size=params["min_size"], max_size=params["max_size"], image_mean=NO_NORMALISATION[0],
        image_std=NO_NORMALISATION[1], rpn_anchor_generator=rpn_anchors(params),
        rpn_pre_nms_top_n_train=params["rpn_pre_nms_train"], rpn_post_nms_top_n_train=params["rpn_post_nms_train"],
        rpn_pre_nms_top_n_test=params["rpn_pre_nms_test"], rpn_post_nms_top_n_test=params["rpn_post_nms_test"],
        rpn_nms_thresh=params["rpn_nms_iou"], rpn_batch_size_per_image=params["rpn_anchors_per_image"])
    model.roi_heads = roi_heads(net, num_classes, params)
    return model


def roi_heads(net: RegionNet, num_classes: int, params: dict) -> RoIHeads:
    """RoI pooling to pool5's size, fc6 + fc7 as the box head, cls_score + bbox_pred, the multitask loss."""
    return RoIHeads(
        box_roi_pool=roi_pooler(net, params),
        box_head=nn.Sequential(nn.Flatten(), net.fc6, net.fc7),
        box_predictor=FastRCNNPredictor(net.head.in_features, num_classes + 1),
        fg_iou_thresh=params["fg_iou"], bg_iou_thresh=params["fg_iou"],  # background: IoU below fg_iou
        batch_size_per_image=params["rois_per_image"], positive_fraction=params["fg_fraction"],
        bbox_reg_weights=None, score_thresh=0.0, nms_thresh=params["nms_iou"],
        detections_per_img=params["max_per_image"])


def roi_pooler(net: RegionNet, params: dict) -> nn.Module:
    """RoIPooler on the trunk's map; with a pyramid, torchvision's MultiScaleRoIAlign over its two levels
    (RoIAlign only, on torchvision's grid: aligned=False, half a cell off pipeline.roi's)."""
    if not params["feature_pyramid"]:
        return RoIPooler(net.roi_size, net.trunk_stride, params["pooling"])
    if params["pooling"] != "roi_align":
        raise ConfigError(f"pooling {params['pooling']!r} with feature_pyramid: the pyramid pools with roi_align")
    return MultiScaleRoIAlign(["0", "1"], net.roi_size, sampling_ratio=2)


# what only detection reads: a model built for training (whose params leave them out, as they do not change
# its weights) gets these placeholders; load_detection_model gives it the config's test-time settings
TEST_TIME_PLACEHOLDERS = {"nms_iou": 0.3, "max_per_image": 100, "rpn_pre_nms_test": 1000, "rpn_post_nms_test": 1000}
# options added after the first models were trained, at the value that builds those models: a model saved before
# them is built with it, and every cache key leaves them out at it (pipeline.methods registers them per section)
LATER_OPTIONS = {"train_sizes": [], "feature_pyramid": False}


def build_detection_model(architecture: str, net: RegionNet, num_classes: int, params) -> nn.Module:
    """"fast-rcnn" (FastRCNN, given proposals) or "faster-rcnn" (its RPN proposes) on the backbone `net`."""
    params = {**TEST_TIME_PLACEHOLDERS, **LATER_OPTIONS, **params}
    if architecture == "fast-rcnn":
        return FastRCNN(net, num_classes, params)
    if architecture == "faster-rcnn":
        return build_faster_rcnn(net, num_classes, params)
    raise ValueError(f"architecture {architecture!r}: expected fast-rcnn or faster-rcnn")


def jitter_training_scale(model: nn.Module, sizes: list[int]) -> None:
    """Scale jitter (Fast R-CNN's multi-scale training, §5.2): in training mode, torchvision's transform
    resizes each image so that its shorter side is one of `sizes`, drawn at random. Only for the training
    stage's model: detection builds its own, which resizes to min_size."""
    model.transform.min_size = tuple(sizes)


def load_detection_model(cache, device: str, test_params) -> tuple[nn.Module, dict, list[str]]:
    """A trained Fast or Faster R-CNN (eval mode, on `device`) with the given test-time settings, its
    params and its classes, from the training stage's `00000.pt`."""
    saved = torch.load(cache.shard_path("00000"), map_location=device, weights_only=True)
    backbone, classes = saved["backbone"], list(saved["classes"])
    params = {**saved["params"], **test_params}
    net = build_region_net(backbone["name"], len(classes) + 1, backbone["input_size"])
    model = build_detection_model(saved["architecture"], net, len(classes), params)
    model.load_state_dict(saved["model"])
    return on_device(model, device).eval(), params, classes


def with_truncated_svd(model: nn.Module, ranks: list[int]) -> nn.Module:
    """A copy of a Fast/Faster R-CNN model whose fc6 and fc7 are replaced by their truncated SVD
    (ranks[0], ranks[1])."""
    compressed = copy.deepcopy(model)
    _, fc6, fc7 = compressed.roi_heads.box_head
    for block, rank in zip((fc6, fc7), ranks):
        compress_fc(block, rank)
    return compressed


def detect(model: nn.Module, images: list[torch.Tensor], proposals: list[torch.Tensor] | None,
           clock: Clock, seen: dict | None = None, bf16: bool = False) -> list[dict]:
    """Test-time detection (model in eval mode): boxes, scores and labels (1..N) per image, in its pixels.

    Fast R-CNN is given `proposals` (boxes in each image's pixels); Faster R-CNN's RPN makes its own.
    The clock's laps get the seconds of each part: "conv" (resize + trunk), "proposal" (the RPN, or
    scaling the given boxes) and "region-wise" (RoI pooling, heads, NMS): Faster R-CNN's Table 5.
    `seen`, if given, receives what the steps in between computed (`rcnn explain` draws them): the resized
    images ("image_list"), the feature maps ("features") and the proposals in the resized images' pixels.
    With `bf16` the backbone runs under bf16 autocast and its maps go on in float32 (pipeline.precision).
    """
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    with torch.no_grad():
        image_list, _ = model.transform(images)
        with bf16_autocast(image_list.tensors.device.type, bf16):
            features = feature_maps(model.backbone, image_list.tensors)
        features = {name: level.float() for name, level in features.items()}
        clock.lap("conv")
        if proposals is None:
            proposals, _ = model.rpn(image_list, features)
        else:
            proposals = resized_proposals(proposals, original_sizes, image_list.image_sizes)
        clock.lap("proposal")
        if seen is not None:
            seen.update(image_list=image_list, features=features, proposals=proposals)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
        detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        clock.lap("region-wise")
    return detections


def resized_proposals(proposals: list[torch.Tensor], original_sizes: list, new_sizes: list) -> list[torch.Tensor]:
    """Each image's proposals[K, 4] scaled from its original size to the size torchvision's transform gave it."""
    return [resize_boxes(boxes, size, new_size) for boxes, size, new_size in zip(proposals, original_sizes, new_sizes)]
