"""Detection post-processing, the SVM training loop and the box regressors on small known inputs."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from pipeline.classifiers import apply_regressors, box_coder, per_class_nms
from stages.bbox import RidgeSums
from stages.svm import ClassSVM, retrain

SVM_PARAMS = {"C": 1.0, "positive_weight": 2.0, "intercept_scaling": 10.0, "max_iter": 10000,
              "evict_threshold": -1.2, "max_cached_negatives": 1000}


def test_nms_keeps_highest_scoring_of_overlapping_pair_within_a_class():
    boxes = np.zeros((3, 2, 4), np.float32)
    boxes[:, 0] = [[0, 0, 10, 10], [1, 0, 11, 10], [40, 40, 50, 50]]  # class 0: two overlapping, one apart
    boxes[:, 1] = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]    # class 1: the same box three times
    scores = np.array([[0.9, 0.1], [0.8, 0.3], [0.7, 0.2]], np.float32)
    rows = per_class_nms(boxes, scores, nms_iou=0.3, max_per_class=10)
    assert rows[:, 5].tolist() == [0, 0, 1]  # best first: 0.9 and 0.7 of class 0, then 0.3 of class 1
    assert rows[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.3])
    assert rows[0, :4].tolist() == [0, 0, 10, 10] and rows[1, :4].tolist() == [40, 40, 50, 50]


def test_nms_does_not_suppress_across_classes_and_caps_the_count_of_each_class():
    boxes = np.zeros((4, 2, 4), np.float32)
    boxes[:, 0] = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]  # class 0: four apart
    boxes[:, 1] = [[0, 0, 10, 10]] * 4                                              # class 1: one box (NMS)
    scores = np.array([[9.0, 0.5], [8.0, 0.4], [7.0, 0.3], [6.0, 0.2]], np.float32)  # class 1 far below
    rows = per_class_nms(boxes, scores, nms_iou=0.3, max_per_class=2)
    assert rows[:, 5].tolist() == [0, 0, 1] and rows[:, 4].tolist() == pytest.approx([9.0, 8.0, 0.5])


def test_retrain_separates_the_classes_and_evicts_easy_negatives():
    rng = np.random.default_rng(0)
    positives = rng.normal(2.0, 0.3, (20, 5)).astype(np.float32)
    hard = rng.normal(0.5, 0.3, (10, 5)).astype(np.float32)
    easy = rng.normal(-4.0, 0.3, (30, 5)).astype(np.float32)
    cache = ClassSVM(positives=positives, negatives=list(hard) + list(easy),
                       keys=[(0, row) for row in range(40)], key_set={(0, row) for row in range(40)})
    retrain(cache, SVM_PARAMS)
    assert (cache.scores(positives) > 0).all() and (cache.scores(easy) < -1.2).all()
    # the easy negatives (keys 10..39) are evicted; what stays is among the hard ones, keys in step
    assert 0 < len(cache.negatives) <= 10 and all(row < 10 for _, row in cache.keys)
    assert all(np.array_equal(negative, hard[row]) for negative, (_, row) in zip(cache.negatives, cache.keys))
    assert cache.key_set == set(cache.keys)
    assert cache.retrains == 1 and cache.added_since_retrain == 0


def test_retrain_caps_the_cache_at_the_hardest_negatives():
    rng = np.random.default_rng(1)
    positives = rng.normal(2.0, 0.3, (20, 5)).astype(np.float32)
    negatives = rng.normal(0.0, 1.0, (50, 5)).astype(np.float32)
    cache = ClassSVM(positives=positives, negatives=list(negatives), keys=[(0, r) for r in range(50)])
    retrain(cache, {**SVM_PARAMS, "evict_threshold": -100.0, "max_cached_negatives": 5})
    kept_scores = cache.scores(np.stack(cache.negatives))
    assert len(cache.negatives) == 5 and kept_scores.min() >= np.sort(cache.scores(negatives))[-5] - 1e-6


def test_box_coder_is_rcnn_parameterisation():
    proposal = torch.tensor([[10.0, 20.0, 30.0, 60.0]])   # centre (20, 40), size 20 x 40
    target = torch.tensor([[12.0, 20.0, 36.0, 80.0]])     # centre (24, 50), size 24 x 60
    deltas = box_coder().encode_single(target, proposal)
    assert deltas[0].tolist() == pytest.approx([4 / 20, 10 / 40, np.log(24 / 20), np.log(60 / 40)])


def test_regressors_apply_learned_deltas_per_class():
    boxes = np.array([[10.0, 20.0, 30.0, 60.0]], np.float32)
    pool5 = np.ones((1, 3), np.float32)
    # class 0 predicts zero deltas; class 1 predicts (0.2, 0.25, log 1.2, log 1.5) through its intercept
    regressors = {"scale": 1.0, "coef": np.zeros((2, 4, 3), np.float32),
                  "intercept": np.array([[0, 0, 0, 0], [0.2, 0.25, np.log(1.2), np.log(1.5)]], np.float32),
                  "target_mean": np.zeros((2, 4), np.float32), "target_std": np.ones((2, 4), np.float32)}
    refined = apply_regressors(regressors, pool5, boxes)
    assert refined.shape == (1, 2, 4)
    assert refined[0, 0].tolist() == pytest.approx(boxes[0].tolist())
    assert refined[0, 1].tolist() == pytest.approx([12.0, 20.0, 36.0, 80.0], abs=1e-4)


def test_ridge_from_streamed_sums_is_scikit_learns_ridge_on_the_examples(monkeypatch):
    monkeypatch.setattr(RidgeSums, "BUFFER_ROWS", 50)  # several folds of the buffer into the sums
    rng = np.random.default_rng(0)
    features = rng.random((400, 30)).astype(np.float32) * 5 + 3  # positive and off-centre, as pool5 is
    targets = (features @ rng.normal(size=(30, 4)) * 0.01 + rng.normal(0.2, 0.1, (400, 4))).astype(np.float32)
    sums = RidgeSums(30)
    for start in range(0, 400, 7):
        sums.add(features[start:start + 7], targets[start:start + 7])
        assert sum(len(part) for part, _ in sums.waiting) < 50  # never more examples held than the buffer
    fit = sums.solve(alpha=10.0)
    exact = targets.astype(np.float64)
    mean, std = exact.mean(axis=0), exact.std(axis=0) + 1e-6
    ridge = Ridge(alpha=10.0).fit(features.astype(np.float64), (exact - mean) / std)
    assert sums.count == 400
    np.testing.assert_allclose(fit["coef"], ridge.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit["intercept"], ridge.intercept_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit["target_std"], std, rtol=1e-5)
    residual = ridge.predict(features) * std + mean - exact
    assert fit["rms_residual"] == pytest.approx(np.sqrt((residual ** 2).mean()), rel=1e-5)
    assert fit["rms_target"] == pytest.approx(np.sqrt((exact ** 2).mean()), rel=1e-6)
