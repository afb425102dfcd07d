"""A preset change judged on validation splits: each method trained with the preset and with the change, on
each validation root, and the change's mAP difference (change minus preset, all-point) with its 95 %
paired-bootstrap interval, per set and overlap.

    python bench/validation_split.py --data ../shared/data/cards --out /tmp/val/cards     # one per set
    python bench/validate_change.py --roots /tmp/val/bccd /tmp/val/cards --methods rcnn faster-rcnn \\
        --set backbone.weights=mobilenet_v2_imagenet.pth --change proposals.search_side=800 [--out result.json]

Each run is `rcnn run --config CONFIG --data ROOT --set data.train_split=train --set data.test_split=val
--methods METHOD` with --set (both arms) and --change (the variant's arm), one method at a time, into one
cache: what the two arms share (the preset's runs, proposals a change does not touch) is computed once and
reused by later calls. The variant is each method's result (R-CNN: SVMs + box regression). The rule of
docs/real-photos.md applies to the printed intervals; nothing here reads a test split.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from paired_runs import evaluator

from pipeline.data.voc import VOCDataset
from pipeline.evaluation import paired_bootstrap
from pipeline.methods import METHODS
from pipeline.reports import interval_cell, markdown_table

VALIDATION_SPLITS = ["--set", "data.train_split=train", "--set", "data.test_split=val"]


def rcnn(command: str, root: Path, args, sets: list[str], *extra: str) -> subprocess.CompletedProcess:
    arguments = [sys.executable, "-m", "pipeline.cli", "-q", command, "--config", args.config, "--data", str(root),
                 "--cache", str(args.cache), *VALIDATION_SPLITS, *(part for item in sets for part in ("--set", item)),
                 *extra]
    completed = subprocess.run(arguments, capture_output=command == "status", text=True)
    if completed.returncode:
        raise SystemExit(f"rcnn {command} on {root}: exit {completed.returncode} {completed.stderr or '(above)'}")
    return completed


def detect_output(root: Path, args, arm: str, sets: list[str], method: str) -> Path:
    """Train and test `method` on `root` with `sets` (cached runs are reused); its detect stage's output.
    Reports go to --reports/<root name>/<arm>/."""
    started = time.perf_counter()
    rcnn("run", root, args, sets, "--methods", method, "--reports", str(args.reports / root.name / arm))
    print(f"{root.name} {method} {arm}: {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr, flush=True)
    status = json.loads(rcnn("status", root, args, sets, "--json").stdout)
    stage = METHODS[method].detect_stage
    key = next(record["key"] for record in status["stages"] if record["stage"] == stage)
    return args.cache / stage / key


def compare(root: Path, method: str, args) -> dict:
    preset = detect_output(root, args, "preset", args.set, method)
    changed = detect_output(root, args, "change", args.set + args.change, method)
    dataset = VOCDataset(root, class_split="train")
    row = {"set": root.name, "method": method, "preset": str(preset), "change": str(changed)}
    for iou in args.ious:
        result, other = (evaluator(dataset, path, METHODS[method].result, iou) for path in (changed, preset))
        difference = paired_bootstrap(result, other, args.resamples, seed=0)
        row[f"{iou:g}"] = {"preset_map": other.evaluate()["map_all_point"],
                           "change_map": result.evaluate()["map_all_point"],
                           "difference": difference["difference"], "ci95": difference["ci95"]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", type=Path, nargs="+", required=True,
                        help="validation roots (ImageSets/Main/train.txt and val.txt: bench/validation_split.py)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["rcnn"], help="methods to train")
    parser.add_argument("--change", action="append", required=True, metavar="KEY=VALUE",
                        help="the change, as rcnn's --set (repeatable: one change of several keys)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="settings of both arms (repeatable), e.g. backbone.weights=FILE")
    parser.add_argument("--config", default="photos", help="the preset (default: photos)")
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="the cache both arms use (default: cache)")
    parser.add_argument("--reports", type=Path, default=Path("reports/validation"),
                        help="reports go to DIR/<root name>/<preset or change>/ (default: reports/validation)")
    parser.add_argument("--ious", type=float, nargs="+", default=[0.5, 0.7], help="overlaps to evaluate at")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the validation images")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = [compare(root, method, args) for method in args.methods for root in args.roots]
    if args.out:
        args.out.write_text(json.dumps({"change": args.change, "set": args.set, "rows": rows}, indent=1))
    headline = f"{args.ious[0]:g}"
    print(markdown_table(
        ["set", "method", f"mAP@{headline} preset / change (all-point)"]
        + [f"difference at IoU {iou:g} [95 % interval]" for iou in args.ious],
        [[row["set"], row["method"], f"{row[headline]['preset_map']:.3f} / {row[headline]['change_map']:.3f}"]
         + [interval_cell(row[f"{iou:g}"]) for iou in args.ious] for row in rows]))


if __name__ == "__main__":
    main()
