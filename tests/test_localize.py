"""Classification + localization on single-object images (stages/localize.py)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import config_sealed_while_stages_run
from test_rcnn_pipeline import status
from tiny import options as rcnn_options

from pipeline.cli import main
from pipeline.data.shapes import write_shapes
from pipeline.data.voc import VOCDataset
from pipeline.engine.stage import ShardOutput
from pipeline.models import build_region_net
from stages.localize import build_localizer, load_single_object_images, localize, ordered_boxes, train_phase

LOCALIZE_TINY = ["pretrain.iterations=24", "pretrain.checkpoint_every=4", "localize.input_size=64",
                 "localize.batch_size=8", "localize.classify_iterations=30",
                 "localize.head_iterations=20", "localize.end_to_end_iterations=20", "localize.checkpoint_every=10",
                 "localize.pictures=2"]


@pytest.fixture(scope="module")
def single_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("single") / "shapes"
    write_shapes(root, images=20, seed=0, single_object=True)
    return root


def options(data, cache, reports, *sets):
    return rcnn_options(data, cache, reports, *LOCALIZE_TINY, *sets)


def test_single_object_mode_draws_exactly_one_plain_object_per_image(single_root):
    dataset = VOCDataset(single_root)
    for image_id in dataset.image_ids("trainval") + dataset.image_ids("test"):
        boxes, _, difficult = dataset.ground_truth(image_id)
        assert len(boxes) == 1 and not difficult.any()
    assert json.loads((single_root / "shapes.json").read_text())["single_object"] is True


def context(root, **localize):
    params = {"input_size": 64, "batch_size": 8, "augment": False, "lr": 0.01, "momentum": 0.9, "amp": False,
              "weight_decay": 0.0, "step_every": 1000, "gamma": 0.1, "seed": 0, "checkpoint_every": 100,
              "optimizer": "adam", "box_weight": 10.0, **localize}
    return SimpleNamespace(dataset=VOCDataset(root), params=params, device="cpu", threads=2)


def test_the_head_phase_trains_the_regression_head_alone(single_root, tmp_path):
    ctx = context(single_root, classify_iterations=5, head_iterations=5)
    params = ctx.params
    training = load_single_object_images(ctx.dataset, "trainval", 64, "cpu")
    assert training.images.shape == (14, 3, 64, 64) and ((training.boxes >= 0) & (training.boxes <= 1)).all()
    net = build_localizer(build_region_net("small", 7, 48), len(ctx.dataset.classes), 64)
    out = ShardOutput(tmp_path / "00000.pt", tmp_path / "00000.checkpoint")
    train_phase(net, "classify", training, params, ctx, out)
    before = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    losses = train_phase(net, "head", training, params, ctx, out).losses
    assert len(losses) == 5
    changed = {name for name, tensor in net.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == {"box_head.weight", "box_head.bias"}  # batch-norm statistics included: frozen
    again = build_localizer(build_region_net("small", 7, 48), len(ctx.dataset.classes), 64)
    assert train_phase(again, "head", training, params, ctx, out).losses == losses  # a finished phase is kept
    assert all(torch.equal(tensor, again.state_dict()[name]) for name, tensor in net.state_dict().items())


def test_building_a_localizer_leaves_batchnorm_statistics_and_the_mode_as_they_were():
    """fc6's input size is probed with a zero image in eval mode: in training mode the probe would move the
    running statistics the classifier learnt (RegionNet.pool5_dim)."""
    classifier = build_region_net("small", 7, 48).train()
    statistics = {name: tensor.clone() for name, tensor in classifier.state_dict().items() if "running" in name}
    net = build_localizer(classifier, 6, 96)
    assert net.training and statistics
    assert all(torch.equal(net.state_dict()[name], tensor) for name, tensor in statistics.items())


def test_the_localizer_keeps_the_classifiers_trunk_and_gets_new_fc_layers_for_whole_images():
    classifier = build_region_net("small", 7, 48)
    trunk_weight, fc6_before = classifier.trunk[0].weight, classifier.fc6[1]
    net = build_localizer(classifier, 6, 96)
    assert net.trunk[0].weight is trunk_weight and net.fc6[1] is not fc6_before
    scores, boxes = localize(net.eval(), torch.randn(2, 3, 96, 96))
    assert scores.shape == (2, 6) and boxes.shape == (2, 4)


def test_regressed_corners_are_put_in_order_inside_the_image():
    boxes = ordered_boxes(torch.tensor([[0.8, -0.2, 0.3, 0.5]]))
    assert boxes.tolist() == [[0.30000001192092896, 0.0, 0.800000011920929, 0.5]]


@pytest.mark.slow
def test_localize_reports_accuracy_and_box_iou_after_each_phase(single_root, tmp_path, capsys):
    cache, reports = tmp_path / "cache", tmp_path / "reports"
    with config_sealed_while_stages_run() as sealed_runs:
        assert main(["localize", *options(single_root, cache, reports)]) == 0
    assert sealed_runs == [["pretrain", "localize"]]
    row = status(single_root, cache, reports, capsys, *LOCALIZE_TINY)["localize"]
    metrics = row["metrics"]
    assert set(metrics["phases"]) == {"head", "end_to_end"}
    saved = torch.load(cache / "localize" / row["key"] / "00000.pt", weights_only=True)["results"]
    dataset = VOCDataset(single_root)
    for phase, result in metrics["phases"].items():  # the metrics are those of the predictions kept
        predictions = saved[phase]["predictions"]
        assert result["images"] == len(predictions) == 6
        correct = [p["class"] == int(dataset.ground_truth(image_id)[1][0]) for image_id, p in predictions.items()]
        assert result["accuracy"] == pytest.approx(np.mean(correct))
        assert result["mean_iou"] == pytest.approx(np.mean([p["iou"] for p in predictions.values()]))
    assert metrics["mean_iou"] == metrics["phases"]["end_to_end"]["mean_iou"]
    assert metrics["train_images"] == 14 and metrics["left_out"] == 0
    report = reports / "demo" / "localize"
    assert "| after `head`" in (report / "localize.md").read_text()
    assert len(list((report / "pictures").glob("*.jpg"))) == 2 and (report / "loss_classify.png").is_file()
    assert not list((cache / "localize").glob("*/*.checkpoint")) and not list((cache / "localize").glob("*/*.head.pt"))
    capsys.readouterr()
    assert main(["localize", *options(single_root, cache, reports)]) == 0
    assert " computed " not in capsys.readouterr().out


def test_localize_needs_single_object_images(shapes_copy, tmp_path, capsys):
    dataset = VOCDataset(shapes_copy)
    for split in ("trainval", "test"):  # keep only the images with several objects
        many = [i for i in dataset.image_ids(split) if len(dataset.ground_truth(i)[0]) > 1]
        (shapes_copy / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in many))
    assert main(["localize", *options(shapes_copy, tmp_path / "cache", tmp_path / "reports")]) == 2
    assert "--single-object" in capsys.readouterr().err
