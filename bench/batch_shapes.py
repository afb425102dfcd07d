"""R-CNN's pool5 pass with each image's last batch as it comes, and padded to a multiple of 32 rows.

    python bench/batch_shapes.py [--config photos] [--images 30] [--repeats 2] [--threads 2]

Each image has its own number of regions, so its last batch of crops has its own size. oneDNN (PyTorch's
CPU convolutions) builds a primitive for every input shape it meets and keeps it, with its memory, in a
cache; pipeline.models.in_padded_batch pads a batch to a multiple of 32 rows so that a stage meets at most
batch_size / 32 shapes. This runs the config's backbone to pool5 (random weights, channels-last, the
config's crop size and features.batch_size) on --images images of 700 to 1 000 random crops each, in a
fresh process per run (the cache lives as long as the process), the two ways alternated --repeats times:
crops per second and the growth of the process's anonymous resident memory from its first image to its
last, the fastest and the largest of the repeats.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.engine.config import load_config
from pipeline.engine.memory import use_tensor_friendly_malloc
from pipeline.models import build_region_net, in_padded_batch
from pipeline.reports import markdown_table


def anonymous_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssAnon:"))


def one_run(config_name: str, images: int, threads: int, padded: bool) -> dict:
    """In this process: the pool5 pass over the images; crops/s and anonymous memory growth."""
    use_tensor_friendly_malloc()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = load_config(config_name, [])
    size, batch_size = config["backbone"]["input_size"], config["features"]["batch_size"]
    net = build_region_net(config["backbone"]["name"], 4, size).eval().to(memory_format=torch.channels_last)
    counts = np.random.default_rng(0).integers(700, 1001, images)
    crops = torch.randn(int(counts.max()), 3, size, size)
    first = None
    started = time.perf_counter()
    with torch.no_grad():
        for count in counts:
            for batch in crops[:count].split(batch_size):
                in_padded_batch(net.pool5, batch) if padded else net.pool5(batch)
            first = first or anonymous_bytes()
    return {"crops_per_second": int(counts.sum()) / (time.perf_counter() - started),
            "growth_bytes": anonymous_bytes() - first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="photos", help="config preset whose shapes are used (default: photos)")
    parser.add_argument("--images", type=int, default=30, help="images of 700-1 000 crops (default: 30)")
    parser.add_argument("--repeats", type=int, default=2, help="alternations; the fastest counts (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--one-run", choices=["as-they-come", "padded"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        print(json.dumps(one_run(args.config, args.images, args.threads, args.one_run == "padded")))
        return
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for way in ("as-they-come", "padded"):
            result = json.loads(subprocess.run(
                [sys.executable, __file__, "--one-run", way, "--config", args.config, "--images", str(args.images),
                 "--threads", str(args.threads)], capture_output=True, text=True, check=True).stdout)
            kept = best.setdefault(way, result)
            kept["crops_per_second"] = max(kept["crops_per_second"], result["crops_per_second"])
            kept["growth_bytes"] = max(kept["growth_bytes"], result["growth_bytes"])
    base = best["as-they-come"]["crops_per_second"]
    print(f"config {args.config}, {args.images} images, {args.threads} threads, fastest of {args.repeats}\n")
    print(markdown_table(["last batch of each image", "crops/s", "vs as they come",
                          "anonymous memory growth, first image to last (MiB)"],
                         [[way, f"{result['crops_per_second']:.0f}", f"{result['crops_per_second'] / base:.2f}x",
                           f"{result['growth_bytes'] / 2 ** 20:.0f}"] for way, result in best.items()]))


if __name__ == "__main__":
    main()
