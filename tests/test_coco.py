"""COCO results, ground truth and COCO-style AP (pycocotools) on hand-made boxes."""
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import coco


def dataset_with(objects: dict):
    """A stand-in data set: image id -> [(box, class index, difficult)], 100 x 80 images, classes a and b."""
    def ground_truth(image_id):
        rows = objects[image_id]
        return (np.array([box for box, _, _ in rows], np.float32).reshape(-1, 4), np.array([c for _, c, _ in rows]),
                np.array([d for _, _, d in rows], bool))
    return SimpleNamespace(classes=["a", "b"], ground_truth=ground_truth,
                           annotation=lambda image_id: SimpleNamespace(width=100, height=80))


def test_boxes_become_x_y_width_height_and_classes_ids_from_one():
    rows = np.array([[10, 20, 40, 60, 0.9, 1]], np.float32)
    assert coco.results({7: rows}) == [{"image_id": 7, "category_id": 2, "score": 0.9,
                                        "bbox": [10.0, 20.0, 30.0, 40.0]}]
    truth = coco.ground_truth(dataset_with({"x": [((10, 20, 40, 60), 0, False), ((0, 0, 5, 5), 1, True)]}), ["x"])
    assert truth["images"] == [{"id": 1, "file_name": "x.jpg", "width": 100, "height": 80}]
    assert [(a["bbox"], a["category_id"], a["iscrowd"], a["area"]) for a in truth["annotations"]] == [
        ([10.0, 20.0, 30.0, 40.0], 1, 0, 1200.0), ([0.0, 0.0, 5.0, 5.0], 2, 1, 25.0)]


def test_exact_boxes_give_ap_one_and_boxes_at_iou_two_thirds_count_at_ap50_only():
    truth = coco.ground_truth(dataset_with({"x": [((10, 10, 50, 50), 0, False)], "y": [((20, 20, 60, 60), 1, False)]}),
                              ["x", "y"])
    exact = coco.results({1: np.array([[10, 10, 50, 50, 0.9, 0]], np.float32),
                          2: np.array([[20, 20, 60, 60, 0.8, 1]], np.float32)})
    assert coco.evaluate(truth, exact) == pytest.approx(
        {"ap": 1.0, "ap50": 1.0, "ap75": 1.0, "ap_small": None, "ap_medium": 1.0, "ap_large": None}, abs=1e-6)
    # 40 x 40 boxes shifted by 8 px in x: IoU = 32 * 40 / (2 * 1600 - 1280) = 2/3
    shifted = coco.results({1: np.array([[18, 10, 58, 50, 0.9, 0]], np.float32),
                            2: np.array([[28, 20, 68, 60, 0.8, 1]], np.float32)})
    measured = coco.evaluate(truth, shifted)
    assert measured["ap50"] == pytest.approx(1.0, abs=1e-6) and measured["ap75"] == 0.0
    assert measured["ap"] == pytest.approx(0.4, abs=1e-6)  # matched at 0.50, 0.55, 0.60, 0.65 of the ten thresholds


def test_ap_by_size_averages_the_classes_that_have_objects_of_that_size():
    """COCO's sizes by area: a 10 x 10 box is small (< 32²), a 110 x 90 one large (> 96²); none is medium."""
    truth = coco.ground_truth(dataset_with({"x": [((0, 0, 10, 10), 0, False)], "y": [((0, 0, 110, 90), 1, False)]}),
                              ["x", "y"])
    found_small_missed_large = coco.results({1: np.array([[0, 0, 10, 10, 0.9, 0]], np.float32),
                                             2: np.array([[60, 50, 100, 80, 0.8, 1]], np.float32)})
    measured = coco.evaluate(truth, found_small_missed_large)
    assert measured["ap_small"] == pytest.approx(1.0, abs=1e-6) and measured["ap_large"] == 0.0
    assert measured["ap_medium"] is None and measured["ap"] == pytest.approx(0.5, abs=1e-6)


def test_no_detections_give_zero_without_calling_pycocotools():
    truth = coco.ground_truth(dataset_with({"x": [((10, 10, 50, 50), 0, False)], "y": [((0, 0, 5, 5), 1, True)]}),
                              ["x", "y"])
    assert coco.evaluate(truth, []) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "ap_small": None, "ap_medium": 0.0,
                                        "ap_large": None}  # the small box is difficult (crowd): no size has it
