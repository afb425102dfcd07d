"""SPP-net, Fast R-CNN, Faster R-CNN and the timing table on the tiny generated set, as a user runs them."""
import json

import cv2
import numpy as np
import pytest
import torch
from test_rcnn_pipeline import assert_killed_training_resumes_identically, status
from tiny import METHOD_TINY
from tiny import method_options as options

from pipeline.cli import build_parser, main, make_context
from pipeline.data.voc import VOCDataset
from pipeline.engine.runner import plan_stages
from pipeline.engine.stage import describe_hardware
from pipeline.methods import METHODS
from pipeline.sliding_window import grid_windows
from stages import REGISTRY

pytestmark = pytest.mark.slow


def rows_of(timing_run, capsys):
    return status(*timing_run, capsys, *METHOD_TINY)


@pytest.mark.parametrize("stage", ["sppnet-finetune", "fast-rcnn-train", "faster-rcnn-train"])
def test_each_new_training_stage_lowers_its_loss(timing_run, capsys, stage):
    _, cache, _ = timing_run
    saved = torch.load(cache / stage / rows_of(timing_run, capsys)[stage]["key"] / "00000.pt", weights_only=True)
    assert len(saved["losses"]) == 40
    assert np.mean(saved["losses"][-8:]) < np.mean(saved["losses"][:8])


def test_faster_rcnn_trains_the_four_losses_jointly(timing_run, capsys):
    _, cache, _ = timing_run
    key = rows_of(timing_run, capsys)["faster-rcnn-train"]["key"]
    saved = torch.load(cache / "faster-rcnn-train" / key / "00000.pt", weights_only=True)
    assert set(saved["loss_parts"]) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert np.allclose(saved["losses"], np.sum([saved["loss_parts"][name] for name in saved["loss_parts"]], axis=0),
                       atol=1e-4)


def test_every_method_is_evaluated_on_every_test_object(timing_run, capsys):
    data, cache, _ = timing_run
    rows = rows_of(timing_run, capsys)
    dataset = VOCDataset(data)
    objects = sum(int((~dataset.ground_truth(image_id)[2]).sum()) for image_id in dataset.image_ids("test"))
    for method in METHODS.values():
        row = rows[method.evaluate_stage]
        assert row["state"] == "cached", method.name
        results = json.loads((cache / row["stage"] / row["key"] / "00000.json").read_text())["results"]
        assert set(results) == {variant.name for variant in method.variants}
        for variant in results.values():  # images without a detection count too: every object is a positive
            assert sum(ap["positives"] for ap in variant["0.5"]["per_class"].values()) == objects
    assert "map_voc07_11pt_svd" in rows["fast-rcnn-evaluate"]["metrics"]


def test_sppnet_reuses_the_rcnn_stages_on_its_own_features(shapes_root, tmp_path):
    ctx = make_context(build_parser().parse_args(["status", *options(shapes_root, tmp_path / "c", tmp_path / "r")]))
    plans = {plan.stage.name: plan for plan in plan_stages(["sppnet-evaluate"], REGISTRY, ctx)}
    assert type(plans["sppnet-svm"].stage) is type(REGISTRY["svm"])
    assert set(plans["sppnet-svm"].description["inputs"]) == {"sppnet-features", "sppnet-finetune"}
    assert set(plans["sppnet-detect"].description["inputs"]) == {"proposals", "sppnet-finetune", "sppnet-svm",
                                                                 "sppnet-bbox"}
    assert not {"features", "finetune", "svm"} & set(plans)


def test_sliding_window_classifies_a_grid_of_windows_with_the_fine_tuned_network(timing_run, capsys):
    data, cache, reports = timing_run
    detect = rows_of(timing_run, capsys)["sliding-window-detect"]
    ctx = make_context(build_parser().parse_args(["status", *options(data, cache, reports)]))
    plans = {plan.stage.name: plan for plan in plan_stages(["sliding-window-evaluate"], REGISTRY, ctx)}
    assert set(plans) == {"proposals", "pretrain", "finetune", "sliding-window-detect", "sliding-window-evaluate"}
    assert set(plans["sliding-window-detect"].description["inputs"]) == {"finetune"}
    windows = grid_windows(ctx.dataset.annotation(ctx.dataset.image_ids("test")[0]).width,
                           ctx.dataset.annotation(ctx.dataset.image_ids("test")[0]).height, [48, 96], [1.0], 0.5)
    assert len(windows) > 0 and detect["metrics"]["detections_per_image"] <= len(windows) * len(ctx.dataset.classes)
    assert set(detect["metrics"]["ms_per_image_by_part"]) == {"warp + CNN on every window + NMS"}


def test_timing_table_writes_markdown_json_and_plot(timing_run, capsys):
    _, cache, reports = timing_run
    rows = rows_of(timing_run, capsys)
    report = reports / "demo" / "timing-table"
    table = json.loads((report / "timing.json").read_text())
    assert table["hardware"] == describe_hardware("cpu")  # the machine it was measured on
    methods = {entry["method"]: entry for entry in table["methods"]}
    # a row for each timed variant of each method, in the records' order (the lecture's story)
    assert list(methods) == [variant.timed for method in METHODS.values() for variant in method.timed_variants]
    for entry in table["methods"]:
        assert set(entry) == {"method", "train_s", "test_s_per_image", "test_s_per_image_with_proposals", "map"}
    for method in METHODS.values():  # the mAPs are the evaluations' own; the training times the manifests'
        evaluation = rows[method.evaluate_stage]["metrics"]
        for variant in method.timed_variants:
            assert methods[variant.timed]["map"] == evaluation["variants"][variant.name]["map_voc07_11pt@0.5"]
        if len(method.training_stages) == 1:
            (stage,) = method.training_stages
            manifest = json.loads((cache / stage / rows[stage]["key"] / "manifest.json").read_text())
            assert methods[method.timed_variants[0].timed]["train_s"] == pytest.approx(manifest["timings"]["wall_s"])
    markdown = (report / "timing.md").read_text()
    for published in ("| train time (h) | 1.2 | 2.0 | 9.5 | 22 | 28 | 84 | 25 |",
                      "| VGG | RPN + Fast R-CNN | 141 | 10 | 47 | 198 |"):
        assert published in markdown
    assert "## Protocol" in markdown and "warm-up" in markdown and table["hardware"] in markdown
    assert all(f"- {method.title}: " in markdown for method in METHODS.values())  # each method's settings
    assert cv2.imread(str(report / "timing.png")).shape[2] == 3


def test_cached_timing_table_reruns_nothing(timing_run, capsys):
    data, cache, reports = timing_run
    capsys.readouterr()
    assert main(["timing-table", *options(data, cache, reports)]) == 0
    assert " computed " not in capsys.readouterr().out


def test_killed_fast_rcnn_training_resumes_with_identical_weights(timing_run, tmp_path, capsys):
    data, original_cache, _ = timing_run
    key = rows_of(timing_run, capsys)["fast-rcnn-train"]["key"]
    assert_killed_training_resumes_identically("fast-rcnn-train", key, original_cache, tmp_path,
                                               lambda cache: options(data, cache, tmp_path / "reports"))
