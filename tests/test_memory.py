"""Memory: a batch's activations reuse the memory the batch before freed (pipeline.engine.memory, glibc only),
and the networks meet few batch shapes (pipeline.models.in_padded_batch)."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.features import pool5_features
from pipeline.models import build_region_net, in_padded_batch

GLIBC_ONLY = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")

# a worker thread (as the threaded dask scheduler runs shards) runs 32 crops of 96 px through MobileNetV2
# to pool5 10 times; prints the minor page faults per crop of the last 4 (the heap has grown to its
# working size by then), then GLIBC_TUNABLES as a child process would inherit it
BATCHES = """
import os, resource, sys, threading
import torch
if sys.argv[1] == "tuned":
    from pipeline.engine.memory import use_tensor_friendly_malloc
    assert use_tensor_friendly_malloc()
from pipeline.models import build_region_net
net = build_region_net("mobilenet_v2", 2, 96).eval()
crops = torch.randn(32, 3, 96, 96)
def batches():
    with torch.no_grad():
        for _ in range(6):
            net.pool5(crops)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            net.pool5(crops)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4 / len(crops))
thread = threading.Thread(target=batches)
thread.start()
thread.join()
print(os.environ.get("GLIBC_TUNABLES", ""))
"""


def page_faults_per_crop_and_tunables(setting: str) -> tuple[float, str]:
    """In a fresh process without GLIBC_TUNABLES (this one's CLI calls may have set it)."""
    environment = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
    faults, tunables = subprocess.run([sys.executable, "-c", BATCHES, setting], capture_output=True, text=True,
                                      check=True, env=environment).stdout.split("\n")[:2]
    return float(faults), tunables


@GLIBC_ONLY
def test_batches_reuse_freed_memory_and_child_processes_inherit_the_settings():
    default, _ = page_faults_per_crop_and_tunables("default")
    tuned, tunables = page_faults_per_crop_and_tunables("tuned")
    assert default > 50  # glibc's defaults fault every batch's activations in anew (about 200 per crop)
    assert tuned < default / 5
    assert "glibc.malloc.arena_max=1" in tunables


def test_a_padded_batch_gives_each_row_the_output_it_has_alone():
    net = build_region_net("small", 3, 48).eval()
    crops = torch.randn(37, 3, 48, 48)
    seen = []
    with torch.no_grad():
        padded = in_padded_batch(lambda batch: seen.append(len(batch)) or net.pool5(batch), crops)
        alone = net.pool5(crops)
    assert seen == [64] and padded.shape == alone.shape
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_the_network_meets_few_batch_shapes_whatever_the_images_region_counts():
    """oneDNN keeps a primitive, and its memory, for every input shape: 40 images of 1 to 200 regions must not
    show it 40 shapes (the process grew by 0.7 GB in 30 photos that way)."""
    net = build_region_net("small", 3, 48).eval()
    shapes = set()
    net.trunk.register_forward_pre_hook(lambda _, inputs: shapes.add(tuple(inputs[0].shape)))
    rgb = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    backbone = {"input_size": 48, "context_pad": 3}
    for regions in np.random.default_rng(1).integers(1, 200, 40):
        boxes = np.tile(np.array([[10, 10, 90, 70]], np.float32), (regions, 1))
        assert pool5_features(net, rgb, boxes, backbone, batch_size=128, device="cpu", bf16=False).shape[0] == regions
    assert {shape[0] for shape in shapes} <= {32, 64, 96, 128}
