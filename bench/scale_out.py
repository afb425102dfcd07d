"""Scale-out: a stage on a dask.distributed LocalCluster of 1, 2, ... worker processes, and where time goes.

    python bench/scale_out.py [--stage proposals|features] [--images 200] [--workers 1,2] [--data DIR]
                              [--config demo] [--set KEY=VALUE ...]

Each worker count computes the stage from an empty output on the same images, through the same code path
as `rcnn <stage> --scheduler tcp://...` (workers of one thread each, as LocalCluster starts them). What the
stage reads (for features: proposals and the fine-tuned network) is computed first, in this process, and
shared. Cluster start-up and the workers' first imports are kept out of the timing (a warm-up task imports
them); the stage's reduce is in. Besides images/s and the ratio to the first row, the table splits the
wall clock: the shards' own seconds summed (divided by the workers: what perfect sharing would take), the
reduce, and the rest (waiting for the last shard, scheduling, the records' hashing). Shards that run
slower side by side than alone show as a larger sum: the workers share the memory bus and the caches.
"""
from __future__ import annotations

import argparse
import logging
import shutil
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

    import stages.features  # noqa: F401, PLC0415
    import stages.proposals  # noqa: F401, PLC0415


def time_stage(ctx: RunContext, stage: str, workers: int) -> dict:
    """Compute `stage` afresh on `workers` worker processes (its inputs already cached): its wall clock, the
    sum of its shards' seconds and its reduce's, from its manifest."""
    plans = plan_stages([stage], REGISTRY, ctx)
    target = next(plan for plan in plans if plan.stage.name == stage)
    shutil.rmtree(target.cache.dir, ignore_errors=True)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.run(warm_up)
        started = time.perf_counter()
        run_stages(plans, ctx, cluster.scheduler_address)
        wall = time.perf_counter() - started
    timings = target.cache.manifest()["timings"]
    return {"wall": wall, "shards": timings["shard_s"], "reduce": timings["reduce_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["proposals", "features"], default="proposals",
                        help="the stage to time (default: proposals)")
    parser.add_argument("--images", type=int, default=200, help="generated images when --data is not given")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    parser.add_argument("--data", type=Path, help="a VOC-layout root (default: a generated shapes set)")
    parser.add_argument("--config", default="demo", help="config preset or file (default: demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (repeatable), e.g. finetune.iterations=100 for features")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = Path(scratch)
        data = args.data or work_dir / "shapes"
        if not args.data:
            write_shapes(data, args.images, seed=0)
        config = load_config(args.config, [f"data.root={data}", *args.set])
        data_config = config["data"]
        dataset = VOCDataset(data, classes=data_config["classes"], class_split=data_config["train_split"])
        ctx = RunContext(config, dataset, work_dir / "cache", work_dir / "reports")
        upstream = [plan for plan in plan_stages([args.stage], REGISTRY, ctx) if plan.stage.name != args.stage]
        run_stages(upstream, ctx, "threads")
        stage = REGISTRY[args.stage]
        images = sum(len(shard.items) for shard in stage.shards(ctx.stage_context(stage)))
        rows, base_rate = [], None
        for workers in map(int, args.workers.split(",")):
            timed = time_stage(ctx, args.stage, workers)
            rate = images / timed["wall"]
            base_rate = base_rate or rate
            rest = timed["wall"] - timed["shards"] / workers - timed["reduce"]
            rows.append([workers, images, f"{timed['wall']:.1f}", f"{rate:.2f}", f"{rate / base_rate:.2f}x",
                         f"{timed['shards']:.1f}", f"{timed['shards'] / workers:.1f}", f"{timed['reduce']:.1f}",
                         f"{rest:.1f}"])
    print(f"{args.stage}, config {args.config}\n")
    print(markdown_table(["workers", "images", "wall (s)", "images/s", "vs first row", "shard seconds summed",
                          "... / workers", "reduce (s)", "the rest (s)"], rows))


if __name__ == "__main__":
    main()
