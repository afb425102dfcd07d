import numpy as np
import torch
from torchvision.ops import box_iou

from pipeline.boxes import box_to_voc, clip_boxes, drop_small_and_duplicates, voc_to_box


def test_voc_corners_round_trip():
    assert box_to_voc(voc_to_box(1, 2, 10, 20)) == (1, 2, 10, 20)


def test_pipeline_area_equals_devkit_plus_one_area():
    # devkit: box 1..10 x 1..10 (inclusive) covers 10 x 10 pixels
    x1, y1, x2, y2 = voc_to_box(1, 1, 10, 10)
    assert (x2 - x1) * (y2 - y1) == 100


def test_iou_matches_the_devkit_formula():
    a, b = (1, 1, 10, 10), (6, 1, 15, 10)  # devkit 1-based inclusive
    inter = (10 - 6 + 1) * (10 - 1 + 1)
    devkit_iou = inter / (100 + 100 - inter)
    iou = box_iou(torch.tensor([voc_to_box(*a)]), torch.tensor([voc_to_box(*b)]))
    assert abs(iou.item() - devkit_iou) < 1e-6


def test_clip_boxes_to_image():
    boxes = np.array([[-5, -3, 50, 40], [10, 10, 120, 90]], np.float32)
    assert clip_boxes(boxes, 100, 80).tolist() == [[0, 0, 50, 40], [10, 10, 100, 80]]


def test_drop_small_and_duplicates_keeps_first_copies_in_order():
    boxes = np.array([[0, 0, 30, 30], [5, 5, 15, 40], [0, 0, 30, 30], [1, 1, 40, 25], [2, 2, 2, 30]], np.float32)
    kept = drop_small_and_duplicates(boxes, min_size=20)
    assert kept.tolist() == [[0, 0, 30, 30], [1, 1, 40, 25]]
