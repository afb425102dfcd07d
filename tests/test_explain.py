"""`rcnn explain`: each method's pictures drawn from its own detector's steps, on the tiny generated set."""
import json
import shutil

import cv2
import h5py
import numpy as np
import pytest
import torch
from browser import check_page, needs_browser
from test_rcnn_pipeline import status
from tiny import METHOD_TINY
from tiny import method_options as options
from torchvision.ops import box_iou

from pipeline.classifiers import load_hardest_negatives, load_svms
from pipeline.cli import main
from pipeline.data.voc import VOCDataset
from pipeline.detections import read_detections
from pipeline.engine.cache import StageCache
from pipeline.explain.regions import detections_of, recall_curve, regression_examples, verdict
from pipeline.features import FeatureReader, layer_features
from pipeline.methods import METHODS
from pipeline.roi import pool_regions, pooling_bins
from pipeline.weights import load_finetuned
from stages.predict import read_explained


@pytest.mark.parametrize("method", ["roi_pool", "roi_align"])
def test_the_roi_grids_bins_are_where_torchvision_pools(method):
    """On a map whose value is its column (row) index, roi_pool's output is the last column (row) of each bin and
    roi_align's the bin's centre (in sample coordinates, half a cell before the cell edges'): the grid drawn is
    the grid pooled."""
    rng = np.random.default_rng(0)
    columns = torch.arange(40.0).view(1, 1, 1, 40).expand(1, 1, 40, 40).contiguous()
    rows = columns.transpose(2, 3).contiguous()
    for _ in range(100):
        x1, y1 = rng.uniform(32, 300, 2)
        width, height = rng.uniform(20, 300, 2)
        box = torch.tensor([[x1, y1, min(x1 + width, 630), min(y1 + height, 630)]], dtype=torch.float32)
        xs, ys = pooling_bins(box[0].numpy(), 7, 1 / 16, method)
        pooled_x = pool_regions(columns, [box], 7, 1 / 16, method)[0, 0, 0].numpy()
        pooled_y = pool_regions(rows, [box], 7, 1 / 16, method)[0, 0, :, 0].numpy()
        if method == "roi_pool":  # max of the column index: a bin's last column; of minus it: its first
            np.testing.assert_array_equal(pooled_x, np.minimum(xs[:, 1], 40) - 1)
            np.testing.assert_array_equal(pooled_y, np.minimum(ys[:, 1], 40) - 1)
            np.testing.assert_array_equal(-pool_regions(-columns, [box], 7, 1 / 16, method)[0, 0, 0].numpy(), xs[:, 0])
            np.testing.assert_array_equal(-pool_regions(-rows, [box], 7, 1 / 16, method)[0, 0, :, 0].numpy(), ys[:, 0])
        else:
            np.testing.assert_allclose(pooled_x, xs.mean(axis=1) - 0.5, atol=1e-4)
            np.testing.assert_allclose(pooled_y, ys.mean(axis=1) - 0.5, atol=1e-4)


def test_recall_counts_an_object_once_a_proposal_covers_it():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    proposals = np.array([[50, 50, 60, 60], [0, 0, 10, 11], [21, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(recall_curve(proposals, truth, 0.5), [0.0, 0.5, 1.0])


def test_the_regression_targets_read_as_the_slides_examples():
    """The slide's targets: (0, 0, 0, 0) a good proposal, (.25, 0, 0, 0) one too far to left, (0, 0, -0.125, 0)
    one too wide."""
    assert verdict(np.zeros(4)) == "is good"
    assert verdict(np.array([0.25, 0, 0, 0])) == "too far to left"
    assert verdict(np.array([0, 0, -0.125, 0])) == "too wide"


@pytest.fixture(scope="module")
def explained(timing_run, tmp_path_factory):
    """Every method (and the FCN's worked examples) explained on the first test image, on a copy of the tiny
    timing run's cache."""
    data, cache, _ = timing_run
    work = tmp_path_factory.mktemp("explain")
    shutil.copytree(cache, work / "cache")
    image_id = VOCDataset(data).image_ids("test")[0]
    for method in [*METHODS, "fcn"]:
        assert main_explain(image_id, method, data, work) == 0
    return data, work, image_id


def main_explain(image_id, method, data, work):
    return main(["explain", image_id, "--method", method, *options(data, work / "cache", work / "reports")])


@pytest.mark.slow
def test_every_method_has_its_pictures_on_the_images_page(explained):
    _, work, image_id = explained
    folder = work / "reports" / "demo" / "explain" / image_id
    page = (folder / "index.html").read_text()
    for method in [*METHODS, "fcn"]:
        record = json.loads((folder / f"{method}.json").read_text())
        assert record["pictures"], method
        for entry in record["pictures"]:
            picture = cv2.imread(str(folder / entry["file"]))
            assert picture is not None and picture.size, entry["file"]
            assert f'src="{entry["file"]}"' in page


def explained_arrays(data, work, capsys, method, image_id):
    rows = status(data, work / "cache", work / "reports", capsys, *METHOD_TINY)
    explain_key = json.loads((work / "reports" / "demo" / "explain" / image_id / f"{method}.json").read_text())["key"]
    cache = StageCache(work / "cache", f"{method}-explain", explain_key)
    digest = next(iter(h5_names(cache)))
    return read_explained(cache, digest), rows


def h5_names(cache):
    for path in sorted(cache.dir.glob("*.h5")):
        with h5py.File(path, "r") as shard_file:
            yield from shard_file


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rcnn", "sppnet", "fast-rcnn", "faster-rcnn"])
def test_the_explained_detections_are_the_detectors_own(explained, capsys, method):
    """What the pictures show as the result (and R-CNN's regression arrows end at) is what the method's detect
    stage found on the same image."""
    data, work, image_id = explained
    arrays, rows = explained_arrays(data, work, capsys, method, image_id)
    detect = StageCache(work / "cache", f"{method}-detect", rows[f"{method}-detect"]["key"])
    expected = read_detections(detect, METHODS[method].result)[image_id]
    shown = detections_of(arrays) if "keep" in arrays else arrays["detections"]
    np.testing.assert_allclose(shown, expected, rtol=1e-4, atol=1e-3)
    if "keep" in arrays:
        regressed = np.stack([example["regressed"] for example in regression_examples(arrays)])
        np.testing.assert_allclose(regressed, expected[:, :4], atol=1e-3)


@pytest.mark.slow
def test_the_hard_negatives_shown_are_negatives_from_the_svms_cache(explained, capsys):
    """Each recorded hard negative is a training region of the feature cache, IoU < 0.3 with every box of its class,
    and the final SVM scores it as recorded (hardest first)."""
    data, work, _ = explained
    rows = status(data, work / "cache", work / "reports", capsys, *METHOD_TINY)
    cache_of = {stage: StageCache(work / "cache", stage, rows[stage]["key"], suffix)
                for stage, suffix in (("svm", ".npz"), ("features", ".h5"), ("finetune", ".pt"))}
    hardest = load_hardest_negatives(cache_of["svm"])
    net, _, classes = load_finetuned(cache_of["finetune"], "cpu")
    svms, reader = load_svms(cache_of["svm"], len(classes)), FeatureReader(cache_of["features"])
    dataset = VOCDataset(data)
    assert hardest
    for class_index, negatives in hardest.items():
        scores = [score for _, _, score in negatives]
        assert scores == sorted(scores, reverse=True)
        for image_id, box, score in negatives[:3]:
            region = reader.read(image_id)
            row = int(np.flatnonzero((region.boxes == box).all(axis=1))[0])
            feature = layer_features(net, region.features[[row]], svms["layer"], "cpu")[0]
            rescored = feature @ svms["weights"][class_index] + svms["biases"][class_index]
            assert rescored == pytest.approx(score, abs=1e-3)
        for image_id, box, _ in negatives:
            assert image_id in dataset.image_ids("trainval")  # the demo's training split
            gt_boxes, gt_labels, _ = dataset.ground_truth(image_id)
            of_class = gt_boxes[gt_labels == class_index]
            if len(of_class):
                assert box_iou(torch.from_numpy(box[None]), torch.from_numpy(of_class)).max() < 0.3  # negative_iou


@pytest.mark.slow
@needs_browser
def test_the_explain_page_and_the_run_page_open_in_a_browser(explained):
    """Every picture of the image's page loads in Chromium, every link resolves, and the run's page links to it."""
    _, work, image_id = explained
    root = work / "reports" / "demo"
    assert check_page(root / "explain" / image_id / "index.html") == []
    assert check_page(root / "index.html") == []
    assert f"explain/{image_id}/index.html" in (root / "index.html").read_text()


def test_an_unknown_image_is_one_line_naming_it(rcnn, capsys):
    assert rcnn("explain", "no-such-image", "--method", "rcnn") == 2
    assert capsys.readouterr().err.strip() == ("rcnn: error: no-such-image: neither an image id of the test split "
                                               "(test) nor an image file or folder")


def test_an_untrained_method_is_one_line_naming_the_command_that_trains_it(rcnn, shapes_root, capsys):
    image_id = VOCDataset(shapes_root).image_ids("test")[0]
    assert rcnn("explain", image_id, "--method", "fast-rcnn") == 2
    error = capsys.readouterr().err
    assert "Fast R-CNN is not trained" in error and "rcnn run --methods fast-rcnn" in error and "--train" in error


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rcnn", "fast-rcnn"])
def test_odd_images_are_explained_or_skipped_by_name(explained, tmp_path, capsys, method):
    """A flat image (no proposals, no detections), the same picture under two names and an unreadable file with
    --on-bad-input skip: a page for each readable one, the bad one listed."""
    data, work, _ = explained
    folder = tmp_path / "mine"
    folder.mkdir()
    cv2.imwrite(str(folder / "flat.png"), np.full((48, 64, 3), 128, np.uint8))
    shutil.copy(next((data / "JPEGImages").iterdir()), folder / "a.jpg")
    shutil.copy(folder / "a.jpg", folder / "b.jpg")
    (folder / "broken.jpg").write_bytes(b"not a picture")
    capsys.readouterr()
    assert main(["explain", str(folder), "--method", method, "--on-bad-input", "skip",
                 *options(data, work / "cache", work / "reports")]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "broken.jpg" in out
    for stem in ("flat", "a", "b"):
        assert (work / "reports" / "demo" / "explain" / stem / f"{method}.json").is_file(), stem
