"""Clocks and the bookkeeping behind the timing table; the detection helpers they time."""
import json

import numpy as np
import pytest
import torch
from tiny import options
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.cli import main
from pipeline.engine.runner import union_seconds
from pipeline.methods import METHODS, REFERENCE
from pipeline.models import build_region_net, freeze_batchnorm
from pipeline.regions import flip_boxes, sample_windows


def test_union_counts_overlapping_work_once_and_skips_gaps():
    # two shards side by side (0-10 and 2-12), then a resumed run after a gap (100-105)
    assert union_seconds([(0.0, 10.0), (2.0, 10.0), (100.0, 5.0)]) == 17.0
    assert union_seconds([(5.0, 1.0), (0.0, 10.0)]) == 10.0
    assert union_seconds([]) == 0.0


def test_sample_windows_fills_with_background_when_foreground_is_short():
    labels = np.array([0] * 50 + [2, 3] + [-1] * 5)
    rows = sample_windows(np.random.default_rng(0), labels, count=16, fg_fraction=0.25)
    assert len(rows) == 16 and (labels[rows] >= 0).all()
    assert (labels[rows] > 0).sum() == 2  # both foreground windows, 14 background; never the ignored ones
    assert len(sample_windows(np.random.default_rng(0), np.full(10, 1), 4, 0.25)) == 4


def test_flip_boxes_mirrors_continuous_coordinates():
    boxes = torch.tensor([[0.0, 1.0, 10.0, 5.0], [90.0, 0.0, 100.0, 3.0]])
    assert flip_boxes(boxes, 100).tolist() == [[90.0, 1.0, 100.0, 5.0], [0.0, 0.0, 10.0, 3.0]]
    assert torch.equal(flip_boxes(flip_boxes(boxes, 100), 100), boxes)


def test_frozen_batchnorm_keeps_the_trained_statistics_in_training_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    inputs = torch.randn(2, 3, 8, 8)
    expected = net.eval()(inputs)
    frozen = freeze_batchnorm(net).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert torch.allclose(frozen(inputs), expected, atol=1e-6)


@pytest.mark.slow
def test_test_only_timing_counts_each_methods_multiply_adds_without_training_anything(shapes_root, tmp_path, capsys):
    argv = ["timing-table", "--test-only", "--images", "2",
            *options(shapes_root, tmp_path / "cache", tmp_path / "reports", "backbone.weights=none")]
    assert main(argv) == 0
    assert sorted(path.name for path in (tmp_path / "cache").iterdir() if path.is_dir()) == ["timing-test-only"]
    report = json.loads((tmp_path / "reports" / "demo" / "timing-test-only" / "timing.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    published = [variant.timed for method in METHODS.values() for variant in method.timed_variants
                 if variant.published.test_s]  # the rows with a published time: no sliding window
    assert list(rows) == published
    # R-CNN runs the small network on every proposal's 48 px crop: its conv multiply-adds are crops x one crop's
    net = build_region_net("small", 7, 48).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.pool5(torch.zeros(1, 3, 48, 48))
    crops = report["measured"]["proposals_per_image"]
    reference = REFERENCE.timed_variants[0].timed
    measured = report["measured"]["methods"][reference]["multiply_adds"]["CNN on every crop"]
    # ... counted as run: each image's last batch padded to a multiple of 32 crops (pipeline.models.in_padded_batch)
    assert crops <= measured / (counter.get_total_flops() / 2) < crops + 32
    # a network trained end to end runs its conv layers once per image: 80 crops of 48 px (184 k pixels) cost
    # R-CNN more than one 216 px image (about 58 k) costs it, even with its RPN or RoI heads on top
    networks = [variant.timed for method in METHODS.values() if method.end_to_end for variant in method.timed_variants]
    assert networks and all(rows[name]["multiply_add_ratio"] > 1 for name in networks)
    assert "No mAP" in capsys.readouterr().out


def test_test_only_timing_refuses_pretrain_weights_before_training_anything(rcnn, tmp_path, capsys):
    assert rcnn("timing-table", "--test-only", "--images", "1") == 2  # the demo preset starts from pretrain
    assert "trains nothing: set backbone.weights" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "cache").iterdir() if path.is_dir()) == ["timing-test-only"]
