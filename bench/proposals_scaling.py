"""Proposals throughput on a dask.distributed LocalCluster of 1, 2, ... worker processes.

    python bench/proposals_scaling.py [--images 100] [--workers 1,2] [--data DIR] [--config demo]

Each worker count runs the proposals stage from an empty cache on the same images, through the same
code path as `rcnn proposals --scheduler tcp://...`. Cluster start-up and the workers' first imports
are kept out of the timing (a warm-up task imports them); the stage's reduce (recall report) is in.
Prints images/s per worker count and the scaling ratio against one worker.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from pipeline.data.shapes import write_shapes
from pipeline.data.voc import VOCDataset
from pipeline.engine.config import load_config
from pipeline.engine.runner import RunContext, plan_stages, run_stages
from pipeline.reports import markdown_table
from stages import REGISTRY


def warm_up() -> None:
    """Run on each worker before the clock starts, so that no worker's first imports are timed."""
    import torchvision.ops  # noqa: F401, PLC0415  (the recall report's IoU)

    import stages.proposals  # noqa: F401, PLC0415


def time_proposals(data: Path, config_name: str, workers: int, work_dir: Path) -> tuple[int, float]:
    config = load_config(config_name, [f"data.root={data}"])
    data_config = config["data"]
    dataset = VOCDataset(data, classes=data_config["classes"], class_split=data_config["train_split"])
    ctx = RunContext(config, dataset, work_dir / f"cache-{workers}", work_dir / f"reports-{workers}")
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.run(warm_up)
        plans = plan_stages(["proposals"], REGISTRY, ctx)
        started = time.perf_counter()
        run_stages(plans, ctx, cluster.scheduler_address)
        return len(ctx.image_ids()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="generated images when --data is not given")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    parser.add_argument("--data", type=Path, help="a VOC-layout root (default: a generated shapes set)")
    parser.add_argument("--config", default="demo", help="config preset or file (default: demo)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = Path(scratch)
        data = args.data or work_dir / "shapes"
        if not args.data:
            write_shapes(data, args.images, seed=0)
        rows, base_rate = [], None
        for workers in map(int, args.workers.split(",")):
            images, seconds = time_proposals(data, args.config, workers, work_dir)
            rate = images / seconds
            base_rate = base_rate or rate
            rows.append([workers, images, seconds, rate, rate / base_rate])
    print(markdown_table(["workers", "images", "seconds", "images/s", "scaling vs first row"], rows))


if __name__ == "__main__":
    main()
