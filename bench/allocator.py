"""R-CNN's CNN on crops with glibc's default allocator and with pipeline.engine.memory's settings, side by side.

    python bench/allocator.py [--backbone mobilenet_v2] [--input-size 96] [--batch 128] [--threads 2] [--crops 1280]

Each row runs in a fresh process: --threads Python threads (the threaded dask scheduler's workers) each
run --crops crops through the backbone to pool5 (random weights: the allocation pattern, not the values,
is measured) in batches of --batch, after one warm-up batch per thread. Printed per row: crops per second
over all threads, minor page faults per crop and the kernel's share of the CPU time, both from
getrusage. The defaults are the photos preset's features stage. Linux with glibc only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import torch

from pipeline.engine.memory import use_tensor_friendly_malloc
from pipeline.models import build_region_net
from pipeline.reports import markdown_table

SETTINGS = ("glibc's defaults", "pipeline.engine.memory (one arena, 1 GiB thresholds)")


def measure(backbone: str, input_size: int, batch: int, threads: int, crops: int, tuned: bool) -> dict:
    """Throughput and page faults of one configuration, in this process."""
    if tuned:
        use_tensor_friendly_malloc()
    net = build_region_net(backbone, 2, input_size).eval()

    def run(batches: int) -> None:
        crops_batch = torch.randn(batch, 3, input_size, input_size)
        with torch.no_grad():
            for _ in range(batches):
                net.pool5(crops_batch)

    def run_side_by_side(batches: int) -> None:
        workers = [threading.Thread(target=run, args=(batches,)) for _ in range(threads)]
        [worker.start() for worker in workers]
        [worker.join() for worker in workers]

    batches = max(1, crops // batch)
    run_side_by_side(1)  # warm-up
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run_side_by_side(batches)
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    total = threads * batches * batch
    kernel, user = after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime
    return {"crops_per_second": total / seconds, "faults_per_crop": (after.ru_minflt - before.ru_minflt) / total,
            "kernel_share": kernel / (kernel + user)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2", help="a backbone.name (default: mobilenet_v2)")
    parser.add_argument("--input-size", type=int, default=96, help="crop side in pixels (default: 96)")
    parser.add_argument("--batch", type=int, default=128, help="crops per forward pass (default: 128)")
    parser.add_argument("--threads", type=int, default=2, help="Python threads running side by side (default: 2)")
    parser.add_argument("--crops", type=int, default=1280, help="crops per thread (default: 1280)")
    parser.add_argument("--measure", choices=("default", "tuned"), help=argparse.SUPPRESS)  # one row, in a child
    args = parser.parse_args()
    shape = (args.backbone, args.input_size, args.batch, args.threads, args.crops)
    if args.measure:
        print(json.dumps(measure(*shape, tuned=args.measure == "tuned")))
        return
    rows = []
    for setting, name in zip(SETTINGS, ("default", "tuned")):
        # a fresh process per row: the settings cannot be undone, and the default row must not inherit them
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure", name], check=True,
                               capture_output=True, text=True, env=_without_tunables())
        rows.append((setting, json.loads(child.stdout.splitlines()[-1])))
    base = rows[0][1]["crops_per_second"]
    print(f"{args.backbone} to pool5, {args.input_size} px crops, batches of {args.batch}, {args.threads} threads")
    print(markdown_table(["allocator", "crops/s", "x default", "page faults per crop", "kernel share of CPU time"],
                         [[setting, f"{row['crops_per_second']:.0f}", f"{row['crops_per_second'] / base:.2f}",
                           f"{row['faults_per_crop']:.0f}", f"{row['kernel_share']:.2f}"] for setting, row in rows]))


def _without_tunables() -> dict:
    return {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}


if __name__ == "__main__":
    main()
