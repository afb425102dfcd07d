"""The VOC evaluator against hand-worked examples (devkit semantics, VOC07 11-point and all-point AP)."""
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from pipeline.evaluation import VOCEvaluator, all_point_ap, paired_bootstrap, voc07_11pt_ap
from pipeline.methods import METHODS
from stages.evaluate import draw_detections

BOX_A = [0, 0, 10, 10]
BOX_B = [20, 20, 30, 30]


def evaluator_with(ground_truth: dict, classes=("cat", "dog")) -> VOCEvaluator:
    evaluator = VOCEvaluator(list(classes), iou_threshold=0.5)
    for image_id, objects in ground_truth.items():
        boxes = [box for box, _, _ in objects]
        evaluator.add_ground_truth(image_id, np.array(boxes, float).reshape(-1, 4),
                                   np.array([label for _, label, _ in objects]),
                                   np.array([difficult for _, _, difficult in objects], bool))
    return evaluator


def detect(evaluator, image_id, rows):
    """rows: (box, score, label)"""
    evaluator.process(image_id, np.array([r[0] for r in rows], float).reshape(-1, 4),
                      np.array([r[1] for r in rows], float), np.array([r[2] for r in rows]))


def test_perfect_detections_give_ap_one():
    evaluator = evaluator_with({"i1": [(BOX_A, 0, False)], "i2": [(BOX_B, 0, False)]}, classes=("cat",))
    detect(evaluator, "i1", [(BOX_A, 0.9, 0)])
    detect(evaluator, "i2", [(BOX_B, 0.8, 0)])
    result = evaluator.evaluate()
    assert result["map_voc07_11pt"] == pytest.approx(1.0) and result["map_all_point"] == pytest.approx(1.0)


def test_duplicate_detection_is_a_false_positive():
    # 2 objects; ranked: TP(obj1), FP(duplicate of obj1), TP(obj2) -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    evaluator = evaluator_with({"i1": [(BOX_A, 0, False)], "i2": [(BOX_B, 0, False)]}, classes=("cat",))
    detect(evaluator, "i1", [(BOX_A, 0.9, 0), ([0, 0, 10, 11], 0.8, 0)])
    detect(evaluator, "i2", [(BOX_B, 0.7, 0)])
    result = evaluator.evaluate()["per_class"]["cat"]
    assert result["precision"].tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    # 11-point: t = 0..0.5 -> max precision at recall >= t is 1 (6 points); t = 0.6..1 -> 2/3 (5 points)
    assert result["ap_voc07_11pt"] == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)
    # all-point: recall 0 -> 0.5 at precision 1, 0.5 -> 1 at 2/3
    assert result["ap_all_point"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_detection_of_a_difficult_object_is_neither_true_nor_false():
    evaluator = evaluator_with({"i1": [(BOX_A, 0, False), (BOX_B, 0, True)]}, classes=("cat",))
    detect(evaluator, "i1", [(BOX_B, 0.95, 0), (BOX_A, 0.9, 0)])  # the difficult one ranks first
    result = evaluator.evaluate()["per_class"]["cat"]
    assert result["positives"] == 1 and result["ap_voc07_11pt"] == pytest.approx(1.0)


def test_overlap_must_exceed_the_threshold():
    # [0, 0, 10, 20] against [0, 0, 10, 10]: IoU exactly 0.5 -> not a match (the devkit's "exceed 50 %")
    evaluator = evaluator_with({"i1": [(BOX_A, 0, False)]}, classes=("cat",))
    detect(evaluator, "i1", [([0, 0, 10, 20], 0.9, 0)])
    assert evaluator.evaluate()["per_class"]["cat"]["ap_all_point"] == 0.0


def test_class_with_no_detections_has_ap_zero_and_counts_in_the_mean():
    evaluator = evaluator_with({"i1": [(BOX_A, 0, False), (BOX_B, 1, False)]})
    detect(evaluator, "i1", [(BOX_A, 0.9, 0)])
    result = evaluator.evaluate()
    assert result["per_class"]["dog"]["ap_voc07_11pt"] == 0.0 and result["per_class"]["dog"]["detections"] == 0
    assert result["map_voc07_11pt"] == pytest.approx(0.5)


def test_class_without_ground_truth_has_no_ap_and_is_left_out_of_the_mean():
    evaluator = evaluator_with({"i1": [(BOX_A, 0, False)]})
    detect(evaluator, "i1", [(BOX_A, 0.9, 0), (BOX_B, 0.5, 1)])
    result = evaluator.evaluate()
    assert result["per_class"]["dog"]["ap_voc07_11pt"] is None and result["map_voc07_11pt"] == pytest.approx(1.0)


def test_tied_scores_keep_the_order_they_were_given_in():
    # two detections with the same score: a false positive given first, then the true positive
    evaluator = evaluator_with({"i1": [(BOX_A, 0, False)], "i2": [(BOX_B, 0, False)]}, classes=("cat",))
    detect(evaluator, "i1", [([50, 50, 60, 60], 0.5, 0)])
    detect(evaluator, "i2", [(BOX_B, 0.5, 0)])
    result = evaluator.evaluate()["per_class"]["cat"]
    assert result["precision"].tolist() == [0.0, 0.5] and result["recall"].tolist() == [0.0, 0.5]
    # the other order would give precision [1, 0.5]: ties are not re-ordered in the detector's favour
    assert result["ap_all_point"] == pytest.approx(0.25)


def test_detection_on_an_image_without_that_class_is_a_false_positive():
    evaluator = evaluator_with({"i1": [(BOX_A, 0, False)], "i2": []}, classes=("cat",))
    detect(evaluator, "i2", [(BOX_A, 0.9, 0)])
    detect(evaluator, "i1", [(BOX_A, 0.8, 0)])
    assert evaluator.evaluate()["per_class"]["cat"]["precision"].tolist() == [0.0, 0.5]


def test_eleven_point_ap_counts_recall_of_exactly_three_tenths():
    recall, precision = np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.0, 1.0])
    assert voc07_11pt_ap(recall, precision) == pytest.approx(4 / 11)
    assert all_point_ap(recall, precision) == pytest.approx(0.3)


def test_ap_of_a_batch_of_curves_is_the_ap_of_each():
    recall = np.array([[0.5, 0.5, 1.0], [0.1, 0.2, 0.3]])
    precision = np.array([[1.0, 0.5, 2 / 3], [1.0, 1.0, 1.0]])
    for metric in (voc07_11pt_ap, all_point_ap):
        assert metric(recall, precision) == pytest.approx([metric(recall[0], precision[0]),
                                                           metric(recall[1], precision[1])])


def scored_set(correct: list[bool]) -> VOCEvaluator:
    """One cat per image, detected (score 0.9) where correct[i], else a box beside it at score 0.9
    (a false positive that also leaves the cat missed)."""
    evaluator = evaluator_with({f"i{index}": [(BOX_A, 0, False)] for index in range(len(correct))}, classes=("cat",))
    for index, hit in enumerate(correct):
        detect(evaluator, f"i{index}", [(BOX_A if hit else BOX_B, 0.9 - index / 1000, 0)])
    return evaluator


def test_bootstrap_of_an_evaluation_against_itself_is_exactly_zero():
    evaluator = scored_set([True, False, True, True])
    summary = paired_bootstrap(evaluator, evaluator, resamples=200, seed=0)
    assert summary["difference"] == 0.0 and summary["ci95"] == [0.0, 0.0]


def test_bootstrap_difference_is_the_difference_of_all_point_maps():
    better, worse = scored_set([True, True, True, False]), scored_set([True, False, False, True])
    summary = paired_bootstrap(better, worse, resamples=50, seed=0)
    assert summary["difference"] == pytest.approx(better.evaluate()["map_all_point"]
                                                  - worse.evaluate()["map_all_point"])
    assert summary["ci95"][0] <= summary["difference"] <= summary["ci95"][1]


def test_a_resample_that_repeats_an_image_counts_its_detections_twice():
    # weights (2, 0, 1): the same APs as a test set holding i0 twice and i2 once
    matches = scored_set([True, False, False]).class_matches(0)
    recall, precision = matches.curves(np.array([[2.0, 0.0, 1.0]]))
    repeated = evaluator_with({"a": [(BOX_A, 0, False)], "b": [(BOX_A, 0, False)], "c": [(BOX_A, 0, False)]},
                              classes=("cat",))
    detect(repeated, "a", [(BOX_A, 0.9, 0)])
    detect(repeated, "b", [(BOX_A, 0.9, 0)])
    detect(repeated, "c", [(BOX_B, 0.898, 0)])
    expected = repeated.evaluate()["per_class"]["cat"]
    assert recall[0, -1] == pytest.approx(2 / 3) and precision[0, -1] == pytest.approx(2 / 3)
    assert all_point_ap(recall, precision)[0] == pytest.approx(expected["ap_all_point"])
    assert voc07_11pt_ap(recall, precision)[0] == pytest.approx(expected["ap_voc07_11pt"])


def test_a_consistent_gain_has_an_interval_above_zero_and_noise_one_around_it():
    rng = np.random.default_rng(1)
    always = scored_set([True] * 40)
    mostly = scored_set(list(rng.random(40) < 0.6))
    assert paired_bootstrap(always, mostly, resamples=300, seed=0)["ci95"][0] > 0
    odd, even = scored_set([index % 2 == 1 for index in range(40)]), scored_set([index % 2 == 0 for index in range(40)])
    low, high = paired_bootstrap(odd, even, resamples=300, seed=0)["ci95"]
    assert low < 0 < high


def test_bootstrap_refuses_evaluations_of_different_images():
    with pytest.raises(ValueError, match="different images"):
        paired_bootstrap(scored_set([True, True]), scored_set([True, True, True]), resamples=10, seed=0)


def test_detections_added_after_an_evaluation_count_in_the_next():
    evaluator = evaluator_with({"i1": [(BOX_A, 0, False)], "i2": [(BOX_B, 0, False)]}, classes=("cat",))
    detect(evaluator, "i1", [(BOX_A, 0.9, 0)])
    assert evaluator.evaluate()["map_all_point"] == pytest.approx(0.5)
    detect(evaluator, "i2", [(BOX_B, 0.8, 0)])
    assert evaluator.evaluate()["map_all_point"] == pytest.approx(1.0)


@pytest.mark.parametrize(("method", "drawn_boxes"), [("rcnn", 2), ("faster-rcnn", 1)])
def test_report_pictures_draw_only_detections_above_the_methods_threshold(tmp_path, method, drawn_boxes):
    """An SVM margin of 0.3 is a detection; a softmax probability of 0.3 is not (the threshold of rcnn
    predict): the pictures show what the method would report, not every ranked candidate."""
    dataset = SimpleNamespace(image_ids=lambda split: ["i1"], ground_truth=lambda image_id: (np.zeros((0, 4)),),
                              read_image=lambda image_id: np.zeros((60, 90, 3), np.uint8))
    ctx = SimpleNamespace(dataset=dataset, test_split="test", params={"pictures": 1}, classes=["cat"])
    rows = np.array([[5, 5, 25, 25, 0.9, 0], [50, 20, 80, 50, 0.3, 0], [40, 30, 60, 55, -0.5, 0]], np.float32)
    draw_detections(ctx, {"i1": rows}, METHODS[method].score_threshold, tmp_path)
    picture = cv2.imread(str(tmp_path / "detections" / "i1.jpg"))
    corners_drawn = [picture[y1, x1 + 4].max() > 100 for x1, y1 in ((5, 5), (50, 20), (40, 30))]
    assert sum(corners_drawn) == drawn_boxes and corners_drawn[0] and not corners_drawn[2]


def test_detections_after_a_class_s_last_hit_change_no_resample_s_ap():
    """The bootstrap leaves out each class's detections after its last true positive (misses, and a hit on a
    difficult object): every resample's AP must be what it is with them, here with images dropped and repeated."""
    evaluator = evaluator_with({f"i{i}": [(BOX_A, 0, False), ([60, 60, 70, 70], 0, True)] for i in range(5)},
                               classes=("cat",))
    for image, hit in enumerate([True, False, True, True, False]):
        detect(evaluator, f"i{image}", [(BOX_A if hit else BOX_B, 0.9 - image / 10, 0), (BOX_B, 0.3 - image / 100, 0),
                                        ([60, 60, 70, 70], 0.1 - image / 100, 0)])
    matches = evaluator.class_matches(0)
    cut = matches.through_last_true_positive()
    weights = np.vstack([np.ones(5), np.random.default_rng(0).integers(0, 3, (200, 5))])
    assert len(cut.image) == 4 < len(matches.image) == 15
    assert np.array_equal(all_point_ap(*cut.curves(weights)), all_point_ap(*matches.curves(weights)))
    assert np.array_equal(voc07_11pt_ap(*cut.curves(weights)), voc07_11pt_ap(*matches.curves(weights)))
