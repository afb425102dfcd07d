"""The FCN with each upsampling of the lecture, trained and evaluated on the same data: a table.

    python bench/fcn_upsampling.py [--config demo] [--data DIR] [--cache DIR] [--skips 2] [--set KEY=VALUE ...]

For each of nearest, bed-of-nails, max-unpool and transpose-conv it runs `rcnn fcn-train` and `rcnn
fcn-evaluate` (with fcn.baseline_images=0: the sliding-window baseline is fcn-evaluate's business, not this
comparison's), one variant after another so that no two train at once, reusing what the cache holds,
then prints the test metrics and the training wall time read from each fcn-train manifest.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import build_parser, main, make_context
from pipeline.engine.runner import plan_stages
from pipeline.reports import markdown_table
from pipeline.segmentation import UPSAMPLINGS
from stages import REGISTRY


def run_variant(common: list[str], upsampling: str, skips: int, extra: list[str]) -> dict:
    sets = [f"fcn.upsampling={upsampling}", f"fcn.skips={skips}", "fcn.baseline_images=0", *extra]
    argv = [*common, *[item for value in sets for item in ("--set", value)]]
    if main(["-q", "fcn-evaluate", *argv]) != 0:
        raise SystemExit(f"rcnn fcn-evaluate failed for upsampling {upsampling}")
    ctx = make_context(build_parser().parse_args(["status", *argv]))
    plans = {plan.stage.name: plan for plan in plan_stages(["fcn-evaluate"], REGISTRY, ctx)}
    train, evaluation = (plans[name].cache.manifest() for name in ("fcn-train", "fcn-evaluate"))
    return {"upsampling": upsampling, "train_s": train["timings"]["wall_s"], **evaluation["metrics"]}


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--skips", type=int, default=2, help="skip connections of every variant (default: 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    common = ["--config", args.config, "--cache", str(args.cache)] + (["--data", str(args.data)] if args.data else [])
    rows = [run_variant(common, upsampling, args.skips, args.set) for upsampling in UPSAMPLINGS]
    print(markdown_table(
        ["upsampling", "skips", "train (s)", "pixel accuracy", "mean accuracy", "mean IoU", "test (s/image)"],
        [[r["upsampling"], args.skips, r["train_s"], r["pixel_accuracy"], r["mean_accuracy"], r["mean_iou"],
          r["seconds_per_image"]] for r in rows]))


if __name__ == "__main__":
    main_bench()
