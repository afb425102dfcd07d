"""The feature cache's encodings: what is written, what is read back, and what the detector scores."""
import h5py
import numpy as np
import pytest

from pipeline.engine.cache import StageCache
from pipeline.features import (
    FeatureReader,
    ImageFeatures,
    as_stored,
    dequantise,
    feature_statistics,
    quantise,
    write_image_features,
)


def test_quantise_maps_each_row_between_its_minimum_and_maximum():
    features = np.array([[0.0, 1.0, 2.55], [-1.0, 1.55, 0.0], [3.0, 3.0, 3.0]], np.float32)
    codes, offset, step = quantise(features)
    np.testing.assert_allclose(offset, [0.0, -1.0, 3.0])
    np.testing.assert_allclose(step, [0.01, 0.01, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(codes, [[0, 100, 255], [0, 255, 100], [0, 0, 0]])
    np.testing.assert_allclose(dequantise(codes, offset, step), features, atol=1e-6)


def test_quantisation_error_is_at_most_half_a_level_of_the_row_range():
    features = np.random.default_rng(0).gamma(0.5, 2.0, (50, 300)).astype(np.float32)
    features[features < 0.5] = 0.0  # post-ReLU: many exact zeros
    decoded = as_stored(features, "uint8")
    row_range = features.max(axis=1) - features.min(axis=1)
    assert (np.abs(decoded - features).max(axis=1) <= row_range / 510 * (1 + 1e-5)).all()
    assert (decoded[features == 0] == 0).all()


def test_as_stored_rounds_floats_to_the_cache_dtype_as_float32():
    features = np.array([[0.1, 1 / 3]], np.float32)
    rounded = as_stored(features, "float16")
    assert rounded.dtype == np.float32
    np.testing.assert_array_equal(rounded, features.astype(np.float16).astype(np.float32))
    assert not np.array_equal(rounded, features)
    np.testing.assert_array_equal(as_stored(features, "float32"), features)


@pytest.mark.parametrize("dtype, compression", [("uint8", "lzf"), ("uint8", "gzip"), ("float16", "lzf"),
                                                ("float32", "none")])
def test_reader_returns_what_the_writer_was_given_rounded_as_stored(tmp_path, dtype, compression):
    rng = np.random.default_rng(1)
    features = np.maximum(rng.normal(size=(7, 20)), 0).astype(np.float32)
    regions = ImageFeatures(rng.uniform(0, 50, (7, 4)).astype(np.float32),
                            np.array([2, 0, -1, -1, -1, -1, -1], np.int16), np.zeros(7, bool), None)
    cache = StageCache(tmp_path, "features", "key")
    cache.dir.mkdir(parents=True)
    with h5py.File(cache.dir / "00000.h5", "w") as shard_file:
        write_image_features(shard_file, "image", regions, features, {"dtype": dtype, "compression": compression})
    reader = FeatureReader(cache)
    np.testing.assert_array_equal(reader.read("image").features, as_stored(features, dtype))
    ground_truth = reader.read("image", ground_truth_only=True)
    np.testing.assert_array_equal(ground_truth.features, as_stored(features, dtype)[:2])
    np.testing.assert_array_equal(ground_truth.gt_label, [2, 0])


def test_uint8_cache_of_post_relu_features_is_under_a_quarter_of_float32(tmp_path):
    rng = np.random.default_rng(2)
    features = np.maximum(rng.normal(size=(500, 576)), 0).astype(np.float32)  # half zeros, like pool5
    regions = ImageFeatures(np.zeros((500, 4), np.float32), np.full(500, -1, np.int16), np.zeros(500, bool), None)
    with h5py.File(tmp_path / "features.h5", "w") as shard_file:
        write_image_features(shard_file, "image", regions, features, {"dtype": "uint8", "compression": "lzf"})
        group = shard_file["image"]
        stored = sum(group[name].id.get_storage_size() for name in ("features", "feature_offset", "feature_step"))
    assert stored < 0.25 * features.nbytes


def test_feature_statistics_image_by_image_equal_those_of_all_features_together(tmp_path):
    rng = np.random.default_rng(0)
    stored = {f"im{index}": rng.random((rng.integers(5, 40), 12)).astype(np.float32) * 3 for index in range(6)}

    class Reader:
        def read(self, image_id):
            return ImageFeatures(boxes=None, gt_label=None, gt_difficult=None, features=stored[image_id])

    together = np.concatenate(list(stored.values()))
    for center in (False, True):
        mean, scale = feature_statistics(Reader(), list(stored), lambda features: features * 2, 20.0, center)
        expected_mean = (together * 2).mean(axis=0) if center else 0.0
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
        assert scale == pytest.approx(20.0 / np.linalg.norm(together * 2 - expected_mean, axis=1).mean(), rel=1e-6)
