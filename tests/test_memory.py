"""pipeline.engine.memory: a batch's activations reuse the memory the batch before freed (glibc only)."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")

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


def test_batches_reuse_freed_memory_and_child_processes_inherit_the_settings():
    default, _ = page_faults_per_crop_and_tunables("default")
    tuned, tunables = page_faults_per_crop_and_tunables("tuned")
    assert default > 50  # glibc's defaults fault every batch's activations in anew (about 200 per crop)
    assert tuned < default / 5
    assert "glibc.malloc.arena_max=1" in tunables
