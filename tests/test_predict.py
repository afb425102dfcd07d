"""`rcnn predict` on a trained cache: the detect stages' own detections, the formats users' tools read."""
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from test_methods import options, rows_of

from pipeline.cli import main
from pipeline.data.voc import VOCDataset, parse_annotation
from pipeline.detections import read_detections
from pipeline.engine.cache import StageCache
from pipeline.methods import METHODS

pytestmark = pytest.mark.slow


def split_images(data):
    dataset = VOCDataset(data)
    return [dataset.image_path(image_id) for image_id in dataset.image_ids("test")]


@pytest.mark.parametrize("method", ["rcnn", "faster-rcnn"])
def test_predict_gives_the_detect_stages_boxes_and_scores(timing_run, tmp_path, capsys, method):
    data, cache, _ = timing_run
    record = METHODS[method]
    assert main(["predict", *map(str, split_images(data)), "--method", method, "--score-threshold", "-1000",
                 "--out", str(tmp_path / "out"), *options(data, cache, tmp_path / "reports")]) == 0
    row = rows_of(timing_run, capsys)[record.detect_stage]
    detected = read_detections(StageCache(cache, record.detect_stage, row["key"]), record.result)
    classes = VOCDataset(data).classes
    for path in split_images(data):
        predicted = json.loads((tmp_path / "out" / f"{path.stem}.json").read_text())
        assert predicted["method"] == method and predicted["image"] == str(path)
        rows = detected[path.stem]
        assert [item["class"] for item in predicted["detections"]] == [classes[int(c)] for c in rows[:, 5]]
        assert np.allclose([item["score"] for item in predicted["detections"]], rows[:, 4], atol=1e-4)
        assert np.allclose([item["box"] for item in predicted["detections"]], rows[:, :4].reshape(-1, 4), atol=1e-4)
        assert (tmp_path / "out" / f"{path.stem}.jpg").is_file()


def test_predicted_voc_annotations_are_read_back_by_the_voc_reader(timing_run, tmp_path):
    data, cache, _ = timing_run
    image = split_images(data)[0]
    assert main(["predict", str(image), "--format", "voc", "--score-threshold", "-1000", "--out", str(tmp_path),
                 *options(data, cache, tmp_path / "reports")]) == 0
    predicted = json.loads((tmp_path / f"{image.stem}.json").read_text())["detections"]
    annotation = parse_annotation(tmp_path / "Annotations" / f"{image.stem}.xml", image.stem)
    assert (annotation.width, annotation.height) == VOCDataset(data).read_image(image.stem).shape[1::-1]
    assert len(annotation.objects) == len(predicted)
    for obj, item in zip(annotation.objects, predicted):
        assert obj.name == item["class"] and np.allclose(obj.box, item["box"], atol=1.0)  # whole pixels


def test_predicted_coco_results_load_in_pycocotools(timing_run, tmp_path):
    data, cache, _ = timing_run
    images = split_images(data)[:3]
    assert main(["predict", *map(str, images), "--method", "fast-rcnn", "--format", "coco", "--score-threshold", "0",
                 "--out", str(tmp_path), *options(data, cache, tmp_path / "reports")]) == 0
    coco = COCO(str(tmp_path / "images.json"))
    loaded = coco.loadRes(str(tmp_path / "detections.json"))
    expected = sum(len(json.loads((tmp_path / f"{path.stem}.json").read_text())["detections"]) for path in images)
    assert len(loaded.getAnnIds()) == expected and sorted(coco.getImgIds()) == [1, 2, 3]


def test_an_untrained_method_is_a_one_line_error_naming_the_command_that_trains_it(shapes_root, tmp_path, capsys):
    image = split_images(shapes_root)[0]
    argv = ["predict", str(image), "--method", "sppnet", "--out", str(tmp_path / "out"),
            *options(shapes_root, tmp_path / "empty-cache", tmp_path / "reports")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "SPP-net is not trained" in error and "rcnn run --methods sppnet" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "empty-cache" / "sppnet-finetune").exists()


def test_a_bad_image_is_named_and_with_skip_the_rest_go_on(timing_run, tmp_path, capsys):
    data, cache, _ = timing_run
    good = split_images(data)[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:300])
    argv = [str(good), str(bad), "--method", "faster-rcnn", "--out", str(tmp_path / "out"),
            *options(data, cache, tmp_path / "reports")]
    capsys.readouterr()
    assert main(["predict", *argv]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["predict", *argv, "--on-bad-input", "skip"]) == 0
    assert f"skipped {bad}" in capsys.readouterr().out
    assert (tmp_path / "out" / f"{good.stem}.json").is_file() and not (tmp_path / "out" / "broken.json").exists()
