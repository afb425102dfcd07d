"""R-CNN's test-time scoring of region features: per-class linear SVMs, per-class box regressors and
greedy per-class NMS (R-CNN §2.2, Appendix C). SPP-net scores its pyramid features the same way.

The svm and bbox stages write their fitted models as `.npz` files, one per task of a few classes
(class_groups); load_svms and load_regressors stack them back into class order.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms

from pipeline.engine.cache import StageCache
from pipeline.engine.stage import Shard
from pipeline.features import as_stored, layer_features, pool5_features
from pipeline.precision import test_time_bf16
from pipeline.roi import conv5_at_scales, pyramid_features
from pipeline.timing import Clock


@dataclass
class RegionModels:
    """What R-CNN and SPP-net detect with: the fine-tuned network, its SVMs and its box regressors."""
    net: object
    backbone: Mapping
    classes: list[str]
    svms: dict
    regressors: dict


def region_features(spp: bool, models: RegionModels, rgb: np.ndarray, proposals: np.ndarray, params: Mapping,
                    device: str, clock: Clock) -> np.ndarray:
    """What the SVMs and box regressors of R-CNN (pool5 of each warped proposal) or SPP-net (each proposal's
    pyramid on conv5 at its best scale) read, rounded to features.dtype as their training features were."""
    if spp:
        maps = conv5_at_scales(models.net.trunk, rgb, params["scales"], device, amp=False)
        clock.lap("conv5 at every scale")
        features = pyramid_features(maps, proposals, params["levels"], models.net.trunk_stride,
                                    models.backbone["input_size"])
        clock.lap("pyramid pooling")
    else:
        features = pool5_features(models.net, rgb, proposals, models.backbone, params["crops_per_batch"], device,
                                  test_time_bf16(device, params["cpu_amp"]), clock=clock)
    features = as_stored(features, params["feature_dtype"])
    clock.lap("rounding to features.dtype")
    return features


def class_groups(num_classes: int, per_task: int) -> list[Shard]:
    """Shards of consecutive class indices, `per_task` at a time."""
    return [Shard(f"{start // per_task:05d}", tuple(range(start, min(start + per_task, num_classes))))
            for start in range(0, num_classes, per_task)]


def load_svms(cache: StageCache, num_classes: int) -> dict:
    """weights[N, D], biases[N] in class order (scoring the layer's features as they come: the stage folds
    any centring and scaling in) and the layer they were trained on."""
    parts = [np.load(path) for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}"))]
    return {**stack_by_class(parts, ("weights", "biases"), num_classes), "layer": str(parts[0]["layer"])}


def load_hardest_negatives(cache: StageCache) -> dict[int, list[tuple[str, np.ndarray, float]]]:
    """class index -> (training image id, box, final SVM score) of the hardest negatives the svm stage kept
    from each class's cache, hardest first (stages/svm.py)."""
    hardest: dict[int, list] = {}
    for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}")):
        with np.load(path) as part:
            for class_index, image_id, box, score in zip(part["hardest_class"], part["hardest_image"],
                                                         part["hardest_box"], part["hardest_score"]):
                hardest.setdefault(int(class_index), []).append((str(image_id), box, float(score)))
    return hardest


def load_regressors(cache: StageCache, num_classes: int) -> dict:
    """The fitted box regressors of every class, stacked in class order."""
    parts = [np.load(path) for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}"))]
    return {**stack_by_class(parts, ("coef", "intercept", "target_mean", "target_std"), num_classes),
            "scale": float(parts[0]["scale"])}


def stack_by_class(parts: list, names: tuple[str, ...], num_classes: int) -> dict:
    """Concatenate per-task arrays (each with its class_indices) into class order."""
    class_indices = np.concatenate([part["class_indices"] for part in parts])
    if sorted(class_indices.tolist()) != list(range(num_classes)):
        raise RuntimeError(f"per-class outputs cover classes {sorted(class_indices.tolist())}, "
                           f"not 0..{num_classes - 1}")
    order = np.argsort(class_indices)
    return {name: np.concatenate([part[name] for part in parts])[order] for name in names}


def box_coder():
    """R-CNN's (dx, dy, dw, dh): torchvision's BoxCoder with unit weights."""
    return BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


def apply_regressors(regressors: dict, features, boxes):
    """Refined boxes float32[R, N, 4] for each class (a tensor), from the regressors' features[R, D] of
    boxes[R, 4] (tensors or arrays)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    deltas = regression_deltas(regressors, features)
    return box_coder().decode_single(deltas.reshape(len(boxes), -1), boxes).view(len(boxes), -1, 4)


def regression_deltas(regressors: dict, features) -> torch.Tensor:
    """Every class's (dx, dy, dw, dh) float32[R, N, 4] for regions of features[R, D]."""
    features = torch.as_tensor(features, dtype=torch.float32)
    coef = torch.from_numpy(regressors["coef"])
    # [R, D] x [D, N * 4]: every class's standardised deltas in one matrix product, then (dx, dy, dw, dh)
    deltas = ((features * regressors["scale"]) @ coef.flatten(0, 1).T).view(len(features), *coef.shape[:2])
    return ((deltas + torch.from_numpy(regressors["intercept"])) * torch.from_numpy(regressors["target_std"])
            + torch.from_numpy(regressors["target_mean"]))


def score_regions(net, svms: dict, regressors: dict, boxes: np.ndarray, features: np.ndarray, width: int,
                  height: int, params: Mapping, device: str, variants: tuple[str, ...],
                  clock=None) -> dict[str, np.ndarray]:
    """Detections float32[D, 6] (x1, y1, x2, y2, score, class) of one image's boxes[R, 4] from their
    pool5 (or pyramid) features[R, P], per variant asked for:
        svm_bbox (the R-CNN result), svm (no box regression), softmax_bbox and softmax (the fine-tuned
        network's own (N + 1)-way softmax instead of the SVMs).
    Scores and boxes come from region_scores; NMS per class at params["nms_iou"], then each class's
    params["max_per_class"] best. A pipeline.timing.Clock, if given, gets the laps "fc6 + fc7" (the SVMs'
    layer) and "SVM + bbox + NMS"."""
    softmax = any(variant.startswith("softmax") for variant in variants)
    scores, refined = region_scores(net, svms, regressors, boxes, features, width, height, device, softmax, clock)
    plain = torch.from_numpy(boxes)[:, None, :].expand_as(refined)
    detections = {variant: per_class_nms(refined if variant.endswith("_bbox") else plain,
                                         scores[variant.split("_")[0]], params["nms_iou"], params["max_per_class"])
                  for variant in variants}
    if clock is not None:
        clock.lap("SVM + bbox + NMS")
    return detections


def region_scores(net, svms: dict, regressors: dict, boxes: np.ndarray, features: np.ndarray, width: int,
                  height: int, device: str, softmax: bool, clock=None) -> tuple[dict, torch.Tensor]:
    """Every class's score of every region, {"svm": [R, N]} (and "softmax": [R, N] when asked), and every
    class's regressed box of every region, clipped to the image: [R, N, 4]. The SVMs score their layer's
    features (fc6 / fc7 through the fine-tuned fc layers); box regression uses the regressors' features (pool5).
    The work after fc7 is done in torch on the CPU, so that numpy's BLAS threads do not compete with torch's
    for the same cores (docs/speed.md, bench/rcnn_test_time.py)."""
    svm_features = torch.from_numpy(layer_features(net, features, svms["layer"], device))
    if clock is not None:
        clock.lap("fc6 + fc7")
    scores = {"svm": svm_features @ torch.from_numpy(svms["weights"]).T + torch.from_numpy(svms["biases"]).float()}
    if softmax:
        fc7 = svm_features if svms["layer"] == "fc7" else torch.from_numpy(layer_features(net, features, "fc7", device))
        with torch.no_grad():
            scores["softmax"] = torch.softmax(net.head(fc7.to(device)), dim=1)[:, 1:].cpu()
    refined = apply_regressors(regressors, features, boxes)
    refined[..., 0::2] = refined[..., 0::2].clamp(0, width)
    refined[..., 1::2] = refined[..., 1::2].clamp(0, height)
    return scores, refined


def per_class_nms(class_boxes, scores, nms_iou: float, max_per_class: int) -> np.ndarray:
    """NMS within each class over class_boxes[R, N, 4] and scores[R, N] (tensors or arrays); each class's
    max_per_class best, best first overall."""
    class_boxes = torch.as_tensor(class_boxes, dtype=torch.float32)
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return kept_rows(class_boxes, scores, per_class_keep(class_boxes, scores, nms_iou, max_per_class))


def per_class_keep(class_boxes, scores, nms_iou: float, max_per_class: int) -> torch.Tensor:
    """What per_class_nms keeps, best first, as flat indices region * N + class into scores[R, N].

    The cap is per class, as in R-CNN's test (100 per class and image), not over all classes as Fast R-CNN's
    softmax detector has it: SVM margins are not comparable across classes, so one class whose SVM scores
    everything high would otherwise take every place (puffin on the aquarium photos: docs/real-photos.md)."""
    num_regions, num_classes = scores.shape
    flat_boxes = torch.as_tensor(class_boxes, dtype=torch.float32).reshape(-1, 4)
    flat_scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    classes = torch.arange(num_classes).repeat(num_regions)
    keep = batched_nms(flat_boxes, flat_scores, classes, nms_iou)  # sorted by score
    of_class = torch.nn.functional.one_hot(classes[keep], num_classes)
    rank_in_class = (of_class.cumsum(0) * of_class).sum(1)  # 1 for each class's best
    return keep[rank_in_class <= max_per_class]


def kept_rows(class_boxes, scores, keep) -> np.ndarray:
    """Detections float32[D, 6] (x1, y1, x2, y2, score, class) of the flat indices `keep` (region * N + class)
    into class_boxes[R, N, 4] and scores[R, N] (tensors or arrays)."""
    class_boxes = torch.as_tensor(class_boxes, dtype=torch.float32)
    scores = torch.as_tensor(scores, dtype=torch.float32)
    keep = torch.as_tensor(keep, dtype=torch.int64)
    regions, classes = keep // scores.shape[1], keep % scores.shape[1]
    return torch.cat([class_boxes[regions, classes], scores[regions, classes, None], classes[:, None].float()],
                     dim=1).numpy()
