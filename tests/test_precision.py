"""bf16 on the CPU (pipeline.precision): only where asked and where the CPU has the units, only in the trunks, and
out of every cache key while off."""
from pathlib import Path

import numpy as np
import pytest
import torch
from test_design import key_descriptions
from test_gpu import DETECTOR_PARAMS

from pipeline import precision
from pipeline.detectors import build_detection_model, detect
from pipeline.features import pool5_features
from pipeline.models import build_region_net
from pipeline.timing import Clock

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.parametrize("units", [True, False])
def test_bf16_runs_on_the_cpu_only_where_asked_and_the_cpu_has_the_units(monkeypatch, units):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: units)
    assert precision.test_time_bf16("cpu", cpu_amp=True) is units
    assert precision.features_bf16("cpu", amp=True, cpu_amp=True) is units
    assert not precision.test_time_bf16("cpu", cpu_amp=False)
    assert not precision.features_bf16("cpu", amp=True, cpu_amp=False)
    assert not precision.test_time_bf16("cuda", cpu_amp=True)  # CUDA's test passes stay float32
    assert precision.features_bf16("cuda", amp=True, cpu_amp=False)  # and `amp` alone decides its features


@pytest.mark.skipif(not CPUINFO.is_file(), reason="reads Linux's /proc/cpuinfo")
def test_the_units_are_detected_from_the_cpu_not_assumed():
    flags = set(next(line for line in CPUINFO.read_text().splitlines() if line.startswith("flags")).split())
    if "avx512_bf16" in flags:
        assert precision.cpu_has_bf16_units()
    if not {"avx512_bf16", "amx_bf16"} & flags:
        assert not precision.cpu_has_bf16_units()


def test_pool5_in_bf16_comes_back_float32_within_bf16_precision():
    torch.manual_seed(0)
    net = build_region_net("mobilenet_v2", 3, 96).eval()
    rgb = np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 120, 90], [50, 30, 190, 150], [0, 0, 199, 159]], np.float32)
    backbone = {"input_size": 96, "context_pad": 8}
    exact = pool5_features(net, rgb, boxes, backbone, 32, "cpu", bf16=False)
    rounded = pool5_features(net, rgb, boxes, backbone, 32, "cpu", bf16=True)
    assert rounded.dtype == np.float32 and rounded.shape == exact.shape
    error = np.linalg.norm(rounded - exact) / np.linalg.norm(exact)
    assert 0 < error < 0.05  # computed in bf16 (not equal), to bf16's ~1 % (not garbage)


def test_faster_rcnn_in_bf16_runs_only_its_backbone_in_bf16():
    """Box coordinates in bf16 would be rounded to 4 px at 600 px: the RPN and the heads get float32 maps."""
    torch.manual_seed(0)
    model = build_detection_model("faster-rcnn", build_region_net("small", 4, 48), 3, DETECTOR_PARAMS).eval()
    seen = {}

    def note(part, tensor) -> None:  # a hook that returns None leaves the module's input and output alone
        seen[part] = tensor.dtype
    first_conv = next(module for module in model.backbone.modules() if isinstance(module, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda _, __, output: note("backbone", output))
    model.rpn.head.register_forward_pre_hook(lambda _, inputs: note("rpn", inputs[0][0]))
    model.roi_heads.box_head.register_forward_pre_hook(lambda _, inputs: note("head", inputs[0]))
    found = detect(model, [torch.rand(3, 120, 160)], None, Clock(), bf16=True)[0]
    assert seen == {"backbone": torch.bfloat16, "rpn": torch.float32, "head": torch.float32}
    assert found["boxes"].dtype == torch.float32


def test_cpu_amp_is_in_the_keys_of_the_stages_it_changes_and_in_no_key_while_off(shapes_root, tmp_path):
    off, on = key_descriptions(shapes_root, tmp_path), key_descriptions(shapes_root, tmp_path, "cpu_amp=true")
    assert not [stage for stage, params in off.items() if '"cpu_amp"' in params]
    changed = {stage for stage in off if off[stage] != on[stage]}
    assert {"features", "rcnn-detect", "fast-rcnn-detect", "faster-rcnn-detect"} <= changed
    assert not {"proposals", "pretrain", "finetune", "svm", "bbox", "fast-rcnn-train", "faster-rcnn-train"} & changed
