"""R-CNN's test-time scoring of region features: per-class linear SVMs, per-class box regressors and
greedy per-class NMS (R-CNN §2.2, Appendix C). SPP-net scores its pyramid features the same way.

The svm and bbox stages write their fitted models as `.npz` files, one per task of a few classes
(class_groups); load_svms and load_regressors stack them back into class order.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.cache import StageCache
from pipeline.features import layer_features
from pipeline.stage import Shard


def class_groups(num_classes: int, per_task: int) -> list[Shard]:
    """Shards of consecutive class indices, `per_task` at a time."""
    return [Shard(f"{start // per_task:05d}", tuple(range(start, min(start + per_task, num_classes))))
            for start in range(0, num_classes, per_task)]


def load_svms(cache: StageCache, num_classes: int) -> dict:
    """weights[N, D], biases[N] in class order (scoring the layer's features as they come: the stage folds
    any centring and scaling in) and the layer they were trained on."""
    parts = [np.load(path) for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}"))]
    return {**stack_by_class(parts, ("weights", "biases"), num_classes), "layer": str(parts[0]["layer"])}


def load_regressors(cache: StageCache, num_classes: int) -> dict:
    """The fitted box regressors of every class, stacked in class order."""
    parts = [np.load(path) for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}"))]
    return {**stack_by_class(parts, ("coef", "intercept", "target_mean", "target_std"), num_classes),
            "scale": float(parts[0]["scale"])}


def stack_by_class(parts: list, names: tuple[str, ...], num_classes: int) -> dict:
    """Concatenate per-task arrays (each with its class_indices) into class order."""
    class_indices = np.concatenate([part["class_indices"] for part in parts])
    if sorted(class_indices.tolist()) != list(range(num_classes)):
        raise RuntimeError(f"per-class outputs cover classes {sorted(class_indices.tolist())}, not 0..{num_classes - 1}")
    order = np.argsort(class_indices)
    return {name: np.concatenate([part[name] for part in parts])[order] for name in names}


def box_coder():
    """R-CNN's (dx, dy, dw, dh): torchvision's BoxCoder with unit weights."""
    from torchvision.models.detection._utils import BoxCoder
    return BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


def apply_regressors(regressors: dict, features: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Refined boxes float32[R, N, 4] for each class, from the regressors' features[R, D] of boxes[R, 4]."""
    import torch
    scaled = features.astype(np.float32) * regressors["scale"]
    # [R, D] x [N, 4, D] -> [R, N, 4] standardised deltas, then back to (dx, dy, dw, dh)
    deltas = np.einsum("rd,nkd->rnk", scaled, regressors["coef"]) + regressors["intercept"]
    deltas = deltas * regressors["target_std"] + regressors["target_mean"]
    decoded = box_coder().decode_single(torch.from_numpy(deltas.reshape(len(boxes), -1)).float(),
                                        torch.from_numpy(boxes))
    return decoded.reshape(len(boxes), -1, 4).numpy()


def score_regions(net, svms: dict, regressors: dict, boxes: np.ndarray, features: np.ndarray, width: int,
                  height: int, params: Mapping, device: str, variants: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Detections float32[D, 6] (x1, y1, x2, y2, score, class) of one image's boxes[R, 4] from their
    pool5 (or pyramid) features[R, P], per variant asked for:
        svm_bbox (the R-CNN result), svm (no box regression), softmax_bbox and softmax (the fine-tuned
        network's own (N + 1)-way softmax instead of the SVMs).
    Box regression uses the regressors' features (pool5); NMS per class at params["nms_iou"], then the
    params["max_per_image"] best."""
    import torch

    from pipeline.boxes import clip_boxes
    svm_features = layer_features(net, features, svms["layer"], device)
    scores = {"svm": svm_features @ svms["weights"].T + svms["biases"]}
    if any(variant.startswith("softmax") for variant in variants):
        fc7 = svm_features if svms["layer"] == "fc7" else layer_features(net, features, "fc7", device)
        with torch.no_grad():
            scores["softmax"] = torch.softmax(net.head(torch.from_numpy(fc7).to(device)), dim=1)[:, 1:].cpu().numpy()
    refined = apply_regressors(regressors, features, boxes)
    refined = clip_boxes(refined.reshape(-1, 4), width, height).reshape(refined.shape)
    plain = np.broadcast_to(boxes[:, None, :], refined.shape)
    return {variant: per_class_nms(refined if variant.endswith("_bbox") else plain, scores[variant.split("_")[0]],
                                   params["nms_iou"], params["max_per_image"])
            for variant in variants}


def per_class_nms(class_boxes: np.ndarray, scores: np.ndarray, nms_iou: float, max_detections: int) -> np.ndarray:
    """NMS within each class over class_boxes[R, N, 4] and scores[R, N]; the best max_detections overall."""
    import torch
    from torchvision.ops import batched_nms

    num_regions, num_classes = scores.shape
    flat_boxes = torch.from_numpy(np.array(class_boxes, dtype=np.float32).reshape(-1, 4))
    flat_scores = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32).reshape(-1))
    classes = torch.arange(num_classes).repeat(num_regions)
    keep = batched_nms(flat_boxes, flat_scores, classes, nms_iou)[:max_detections]  # sorted by score
    return torch.cat([flat_boxes[keep], flat_scores[keep, None], classes[keep, None].float()], dim=1).numpy()
