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
"""
from __future__ import annotations

import numpy as np


class VOCEvaluator:
    def __init__(self, classes: list[str], iou_threshold: float = 0.5):
        self.classes, self.iou_threshold = classes, iou_threshold
        self.reset()

    def reset(self) -> None:
        self._ground_truth: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._detections: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    def add_ground_truth(self, image_id: str, boxes: np.ndarray, labels: np.ndarray, difficult: np.ndarray) -> None:
        """boxes[G, 4] (x1, y1, x2, y2), class indices labels[G], difficult[G] of one image."""
        self._ground_truth[image_id] = (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels),
                                        np.asarray(difficult, bool))

    def process(self, image_id: str, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """Detections of one image: boxes[D, 4], scores[D], class indices labels[D]."""
        self._detections.append((image_id, np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores),
                                 np.asarray(labels)))

    def evaluate(self) -> dict:
        """{"per_class": {name: {...}}, "map_voc07_11pt": float, "map_all_point": float}."""
        per_class = {name: self._evaluate_class(class_index) for class_index, name in enumerate(self.classes)}
        scored = [result for result in per_class.values() if result["ap_voc07_11pt"] is not None]
        return {"per_class": per_class, "iou_threshold": self.iou_threshold,
                "map_voc07_11pt": float(np.mean([r["ap_voc07_11pt"] for r in scored])) if scored else None,
                "map_all_point": float(np.mean([r["ap_all_point"] for r in scored])) if scored else None}

    def _evaluate_class(self, class_index: int) -> dict:
        gt = {image_id: (boxes[labels == class_index], difficult[labels == class_index])
              for image_id, (boxes, labels, difficult) in self._ground_truth.items()}
        positives = sum(int((~difficult).sum()) for _, difficult in gt.values())
        image_ids, boxes, scores = [], [], []
        for image_id, image_boxes, image_scores, image_labels in self._detections:
            mine = image_labels == class_index
            image_ids += [image_id] * int(mine.sum())
            boxes.append(image_boxes[mine])
            scores.append(image_scores[mine])
        order = np.argsort(-np.concatenate(scores), kind="stable") if scores else np.zeros(0, int)
        boxes = np.concatenate(boxes)[order] if boxes else np.zeros((0, 4))
        true_positive, false_positive = self._match([image_ids[i] for i in order], boxes, gt)
        tp, fp = np.cumsum(true_positive), np.cumsum(false_positive)
        recall = tp / positives if positives else np.full(len(tp), np.nan)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        return {"positives": positives, "detections": len(order),
                "ap_voc07_11pt": voc07_11pt_ap(recall, precision) if positives else None,
                "ap_all_point": all_point_ap(recall, precision) if positives else None,
                "recall": recall, "precision": precision}

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
    areas = (box[2] - box[0]) * (box[3] - box[1]) + (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    return intersection / (areas - intersection)


def voc07_11pt_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Mean over t = 0, 0.1, ..., 1 of the highest precision at recall >= t (0 if none).

    t is k / 10 (the nearest double to each tenth), not an accumulated 0.1 step, so that a recall of
    exactly 3/10 counts at t = 0.3."""
    total = 0.0
    for k in range(11):
        reached = precision[recall >= k / 10]
        total += reached.max() if len(reached) else 0.0
    return total / 11


def all_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision-recall curve with precision made monotonically decreasing."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))
