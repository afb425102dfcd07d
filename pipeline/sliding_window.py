"""The detection baseline before R-CNN: a classifier applied to windows at every position and scale.

Square-ish windows of each side in `sizes` and each aspect ratio (height / width) in `aspect_ratios`
are placed on a grid whose step is `step` x the window's side; each window is warped and classified
by R-CNN's fine-tuned (N + 1)-way network; windows whose best label is a class (not background) are
kept with that class's probability as their score, then per-class NMS. With no proposals the network
sees every window: many more crops than R-CNN's few hundred proposals, and boxes no better than the grid.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from pipeline.classifiers import per_class_nms
from pipeline.features import pool5_features


def grid_windows(width: int, height: int, sizes, aspect_ratios, step: float) -> np.ndarray:
    """float32[W, 4] boxes (x1, y1, x2, y2): for each size and aspect ratio (height / width), a window of
    area size^2 at every grid position inside the image, `step` x its side apart, the grid centred."""
    windows = []
    for size in sizes:
        for ratio in aspect_ratios:
            box_width, box_height = size / np.sqrt(ratio), size * np.sqrt(ratio)
            if box_width > width or box_height > height:
                continue
            xs = _positions(width, box_width, step * box_width)
            ys = _positions(height, box_height, step * box_height)
            x1, y1 = (axis.ravel() for axis in np.meshgrid(xs, ys))
            windows.append(np.stack([x1, y1, x1 + box_width, y1 + box_height], axis=1))
    return np.concatenate(windows).astype(np.float32) if windows else np.zeros((0, 4), np.float32)


def _positions(extent: float, side: float, step: float) -> np.ndarray:
    """Left (or top) edges of windows of `side` every `step` pixels inside `extent`, the run centred."""
    count = int((extent - side) // step) + 1
    return (extent - side - (count - 1) * step) / 2 + step * np.arange(count)


def detect_by_windows(net, backbone: Mapping, rgb: np.ndarray, params: Mapping,
                      device: str) -> tuple[np.ndarray, np.ndarray]:
    """The image's grid of windows (params: sizes, aspect_ratios, step) and the detections classify_windows
    makes of them."""
    windows = grid_windows(rgb.shape[1], rgb.shape[0], params["sizes"], params["aspect_ratios"], params["step"])
    return windows, classify_windows(net, backbone, rgb, windows, params, device)


def classify_windows(net, backbone: Mapping, rgb: np.ndarray, boxes: np.ndarray, params: Mapping,
                     device: str) -> np.ndarray:
    """Detections float32[D, 6] (x1, y1, x2, y2, score, class) of one image from its windows[W, 4]."""
    if not len(boxes):
        return np.zeros((0, 6), np.float32)
    pool5 = pool5_features(net, rgb, boxes, backbone, params["batch_size"], device, bf16=False)
    with torch.no_grad():
        probabilities = torch.softmax(net.head(net.fc(torch.from_numpy(pool5).to(device))), dim=1).cpu().numpy()
    objects = probabilities.argmax(1) > 0  # the best label is a class, not background
    scores = np.where(probabilities[:, 1:] == probabilities[:, 1:].max(1, keepdims=True), probabilities[:, 1:], 0)
    scores = scores[objects]
    class_boxes = torch.from_numpy(boxes[objects])[:, None, :].expand(-1, scores.shape[1], 4)
    rows = per_class_nms(class_boxes, scores, params["nms_iou"], params["max_per_class"])
    return rows[rows[:, 4] > 0]
