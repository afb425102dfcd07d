"""Clocks and the bookkeeping behind the timing table; the detection helpers they time."""
import numpy as np
import torch
from torch import nn

from pipeline.models import freeze_batchnorm
from pipeline.regions import flip_boxes, sample_windows
from pipeline.timing import union_seconds


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
