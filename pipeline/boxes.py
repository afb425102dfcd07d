"""Box conventions shared by every stage.

Inside the pipeline a box is (x1, y1, x2, y2) in 0-based *continuous* pixel coordinates: a box that
covers pixel columns a..b (0-based, inclusive) has x1 = a and x2 = b + 1. Its width is x2 - x1, so
areas and IoUs from torchvision.ops equal the PASCAL devkit's "+1" areas exactly. The devkit's 1-based
inclusive coordinates (xmin..xmax) appear only at the VOC read/write edge:
x1 = xmin - 1, x2 = xmax (and back: xmin = x1 + 1, xmax = x2).
"""
from __future__ import annotations

import numpy as np


def voc_to_box(xmin: float, ymin: float, xmax: float, ymax: float) -> tuple[float, float, float, float]:
    """Devkit 1-based inclusive corners -> pipeline (x1, y1, x2, y2)."""
    return xmin - 1.0, ymin - 1.0, xmax, ymax


def box_to_voc(box) -> tuple[float, float, float, float]:
    """Pipeline (x1, y1, x2, y2) -> devkit 1-based inclusive (xmin, ymin, xmax, ymax)."""
    x1, y1, x2, y2 = box
    return x1 + 1.0, y1 + 1.0, x2, y2


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip boxes[N, 4] (x1, y1, x2, y2) to the image [0, width] x [0, height]."""
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    return clipped


def drop_small_and_duplicates(boxes: np.ndarray, min_size: float) -> np.ndarray:
    """Keep boxes[N, 4] whose width and height are >= min_size (and > 0), first copy of each box.

    The order of the surviving boxes is their order in the input.
    """
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = boxes[(widths >= max(min_size, 1e-6)) & (heights >= max(min_size, 1e-6))]
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]
