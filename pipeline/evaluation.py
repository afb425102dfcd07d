"""PASCAL VOC detection evaluation with the devkit's semantics (VOCevaldet.m), as an evaluator object.

Per class: detections are taken in descending score order (a stable sort, so tied scores keep the
order they were given in, as MATLAB's sort does); each is matched to the ground-truth box of its image
and class with the largest overlap. Overlap > iou_threshold (0.5; the devkit's criterion "must exceed
50 %", as in py-faster-rcnn's voc_eval; VOCevaldet.m itself tests >=, which differs only at exactly
0.5): a true positive if that box is not difficult and not yet detected, a false positive if already
detected (duplicates), neither if difficult. Otherwise a false positive. Recall is over the
non-difficult boxes. Areas use the devkit's +1 pixel convention, which the pipeline's box convention
reproduces exactly (pipeline.boxes). Two AP definitions, always labelled:
    voc07_11pt  the VOC2007 metric: mean of the interpolated precision at recall 0, 0.1, ..., 1
    all_point   the VOC2010+ metric: area under the interpolated precision-recall curve
A class with no non-difficult ground truth has no AP (None) and is left out of the mean.
paired_bootstrap compares two evaluations of the same images (a method and its ablation) by
resampling the images, the unit the test set was drawn in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ClassMatches:
    """One class's detections in descending score order: the index of each one's image (into
    VOCEvaluator.image_ids()), whether it is a true or a false positive (neither: it hit a difficult
    object), and the number of non-difficult ground-truth boxes of the class in each image."""
    image: np.ndarray
    true_positive: np.ndarray
    false_positive: np.ndarray
    positives_per_image: np.ndarray

    def curves(self, image_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """recall and precision [B, D] when image i counts image_weights[b, i] times (a bootstrap
        resample; a row of ones is the test set itself). Matching is decided within an image, so a
        repeated image repeats its true and false positives."""
        weights = image_weights[:, self.image]
        tp = np.cumsum(self.true_positive * weights, axis=1)
        fp = np.cumsum(self.false_positive * weights, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = tp / (image_weights @ self.positives_per_image)[:, None]
        return recall, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)

    def through_last_true_positive(self) -> ClassMatches:
        """The detections up to the last true positive. Those after it add no recall in any resample and
        only lower the precision where recall is already reached, so no AP counts them; cutting them
        spares the bootstrap a third of its work at 100 detections per class and image (docs/speed.md)."""
        hits = np.flatnonzero(self.true_positive)
        end = hits[-1] + 1 if len(hits) else 0
        return ClassMatches(self.image[:end], self.true_positive[:end], self.false_positive[:end],
                            self.positives_per_image)


class VOCEvaluator:
    def __init__(self, classes: list[str], iou_threshold: float = 0.5):
        self.classes, self.iou_threshold = classes, iou_threshold
        self.reset()

    def reset(self) -> None:
        self._ground_truth: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._detections: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self._matches: dict[int, ClassMatches] = {}  # class_matches, until more data comes

    def add_ground_truth(self, image_id: str, boxes: np.ndarray, labels: np.ndarray, difficult: np.ndarray) -> None:
        """boxes[G, 4] (x1, y1, x2, y2), class indices labels[G], difficult[G] of one image."""
        self._ground_truth[image_id] = (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels),
                                        np.asarray(difficult, bool))
        self._matches.clear()

    def process(self, image_id: str, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """Detections of one image: boxes[D, 4], scores[D], class indices labels[D]."""
        self._detections.append((image_id, np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores),
                                 np.asarray(labels)))
        self._matches.clear()

    def evaluate(self) -> dict:
        """{"per_class": {name: {...}}, "map_voc07_11pt": float, "map_all_point": float}."""
        per_class = {name: self._evaluate_class(class_index) for class_index, name in enumerate(self.classes)}
        scored = [result for result in per_class.values() if result["ap_voc07_11pt"] is not None]
        return {"per_class": per_class, "iou_threshold": self.iou_threshold,
                "map_voc07_11pt": float(np.mean([r["ap_voc07_11pt"] for r in scored])) if scored else None,
                "map_all_point": float(np.mean([r["ap_all_point"] for r in scored])) if scored else None}

    def image_ids(self) -> list[str]:
        """Every image with ground truth or detections, sorted: the units a bootstrap resamples."""
        return sorted(set(self._ground_truth) | {image_id for image_id, *_ in self._detections})

    def class_matches(self, class_index: int) -> ClassMatches:
        """The class's detections in descending score order, each a true or false positive (or neither);
        computed once (matching is a loop over every detection) for evaluate() and each bootstrap."""
        if class_index not in self._matches:
            self._matches[class_index] = self._match_class(class_index)
        return self._matches[class_index]

    def _match_class(self, class_index: int) -> ClassMatches:
        image_index = {image_id: index for index, image_id in enumerate(self.image_ids())}
        gt = {image_id: (boxes[labels == class_index], difficult[labels == class_index])
              for image_id, (boxes, labels, difficult) in self._ground_truth.items()}
        positives = np.zeros(len(image_index))
        for image_id, (_, difficult) in gt.items():
            positives[image_index[image_id]] = (~difficult).sum()
        image_ids, boxes, scores = [], [], []
        for image_id, image_boxes, image_scores, image_labels in self._detections:
            mine = image_labels == class_index
            image_ids += [image_id] * int(mine.sum())
            boxes.append(image_boxes[mine])
            scores.append(image_scores[mine])
        order = np.argsort(-np.concatenate(scores), kind="stable") if scores else np.zeros(0, int)
        boxes = np.concatenate(boxes)[order] if boxes else np.zeros((0, 4))
        ordered_ids = [image_ids[i] for i in order]
        true_positive, false_positive = self._match(ordered_ids, boxes, gt)
        return ClassMatches(np.array([image_index[image_id] for image_id in ordered_ids], int), true_positive,
                            false_positive, positives)

    def _evaluate_class(self, class_index: int) -> dict:
        matches = self.class_matches(class_index)
        recall, precision = matches.curves(np.ones((1, len(matches.positives_per_image))))
        positives = int(matches.positives_per_image.sum())
        return {"positives": positives, "detections": len(matches.image),
                "ap_voc07_11pt": float(voc07_11pt_ap(recall, precision)[0]) if positives else None,
                "ap_all_point": float(all_point_ap(recall, precision)[0]) if positives else None,
                "recall": recall[0], "precision": precision[0]}  # recall NaN without positives (0 / 0)

    def _match(self, image_ids: list[str], boxes: np.ndarray, gt: dict) -> tuple[np.ndarray, np.ndarray]:
        true_positive, false_positive = np.zeros(len(boxes)), np.zeros(len(boxes))
        detected = {image_id: np.zeros(len(gt_boxes), bool) for image_id, (gt_boxes, _) in gt.items()}
        for index, (image_id, box) in enumerate(zip(image_ids, boxes)):
            gt_boxes, difficult = gt.get(image_id, (np.zeros((0, 4)), np.zeros(0, bool)))
            overlaps = _overlaps(box, gt_boxes)
            best = int(np.argmax(overlaps)) if len(overlaps) else -1
            if best >= 0 and overlaps[best] > self.iou_threshold:
                if difficult[best]:
                    continue  # neither true nor false positive
                if not detected[image_id][best]:
                    true_positive[index] = detected[image_id][best] = True
                else:
                    false_positive[index] = 1  # duplicate detection
            else:
                false_positive[index] = 1
        return true_positive, false_positive


def _overlaps(box: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """IoU of one box[4] with gt_boxes[G, 4]; 0 where they do not intersect."""
    widths = np.minimum(box[2], gt_boxes[:, 2]) - np.maximum(box[0], gt_boxes[:, 0])
    heights = np.minimum(box[3], gt_boxes[:, 3]) - np.maximum(box[1], gt_boxes[:, 1])
    intersection = np.where((widths > 0) & (heights > 0), widths * heights, 0.0)
    areas = ((box[2] - box[0]) * (box[3] - box[1])
             + (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1]))
    return intersection / (areas - intersection)


def voc07_11pt_ap(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mean over t = 0, 0.1, ..., 1 of the highest precision at recall >= t (0 if none); recall and
    precision [..., D] give one AP per leading index (a 0-d array for 1-D curves).

    t is k / 10 (the nearest double to each tenth), not an accumulated 0.1 step, so that a recall of
    exactly 3/10 counts at t = 0.3."""
    recall, precision = np.asarray(recall), np.asarray(precision)
    return sum(np.where(recall >= k / 10, precision, 0.0).max(axis=-1, initial=0.0) for k in range(11)) / 11


def all_point_ap(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Area under the precision-recall curve with precision made monotonically decreasing; [..., D]
    curves as in voc07_11pt_ap. Steps where recall does not change add nothing."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    zeros, ones = np.zeros(recall.shape[:-1] + (1,)), np.ones(recall.shape[:-1] + (1,))
    recall = np.concatenate([zeros, recall, ones], axis=-1)
    precision = np.concatenate([zeros, precision, zeros], axis=-1)
    precision = np.flip(np.maximum.accumulate(np.flip(precision, -1), axis=-1), -1)
    return np.sum(np.diff(recall, axis=-1) * precision[..., 1:], axis=-1)


def paired_bootstrap(result: VOCEvaluator, other: VOCEvaluator, resamples: int, seed: int, chunk: int = 50) -> dict:
    """How much `result`'s all-point mAP exceeds `other`'s on these test images, and a 95 % percentile
    interval for that difference from `resamples` resamples of the images with replacement, the same
    resamples for both (a paired bootstrap: it asks whether an ablation's effect exceeds what the choice
    of test images alone would give). Both must have seen the same images and classes.

    The all-point AP, not the VOC07 11-point one: the 11-point AP jumps whenever a class's recall
    crosses a tenth, which biases its bootstrap distribution (docs/demo.md).
    Returns {"metric": "all_point", "resamples": n, "difference": d, "ci95": [low, high]}."""
    images = result.image_ids()
    if images != other.image_ids() or result.classes != other.classes:
        raise ValueError("paired bootstrap: the two evaluations cover different images or classes")
    rng = np.random.default_rng(seed)
    weights = np.ones((resamples + 1, len(images)))  # row 0: the test set itself
    for row in range(1, resamples + 1):
        weights[row] = np.bincount(rng.integers(0, len(images), len(images)), minlength=len(images))
    matches = [[evaluator.class_matches(class_index).through_last_true_positive()
                for class_index in range(len(result.classes))]
               for evaluator in (result, other)]
    difference = np.concatenate([_resampled_map(matches[0], weights[start:start + chunk]) -
                                 _resampled_map(matches[1], weights[start:start + chunk])
                                 for start in range(0, len(weights), chunk)])
    low, high = np.percentile(difference[1:], [2.5, 97.5]) if resamples else (np.nan, np.nan)
    return {"metric": "all_point", "resamples": resamples, "difference": float(difference[0]),
            "ci95": [float(low), float(high)]}


def _resampled_map(matches: list[ClassMatches], weights: np.ndarray) -> np.ndarray:
    """All-point mAP [B] under each row of image weights; a class absent from a resample is left out of
    that resample's mean, as a class without ground truth is left out of the mAP."""
    aps = []
    for class_matches in matches:
        if class_matches.positives_per_image.sum():
            present = weights @ class_matches.positives_per_image > 0
            aps.append(np.where(present, all_point_ap(*class_matches.curves(weights)), np.nan))
    if not aps:
        raise ValueError("paired bootstrap: no class has ground truth")
    return np.nanmean(np.stack(aps), axis=0)
