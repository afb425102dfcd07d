"""How the pipeline's cost grows with the data: time per image, peak memory and cache bytes per stage.

    python bench/scaling.py --work /tmp/scaling [--sizes 250 500 1000 2000 4000] [--config demo]
                            [--methods rcnn fast-rcnn faster-rcnn] [--set KEY=VALUE ...]
    python bench/scaling.py --work /tmp/bccd --data ../shared/data/bccd --config photos --set backbone.weights=...

For each size, a generated shapes set of that many images (70 % trainval), or the one `--data` set, goes
through the methods' stages one at a time, in the graph's order, each in a fresh `rcnn <stage>` process
(the threaded scheduler, as a user runs it). Per stage it records the stage's wall clock from its
manifest, the process's peak resident memory (its own `ru_maxrss`, from wait4: what the machine must
hold while that stage runs, the interpreter and torch included) and the bytes the stage cached. Training
runs a fixed number of iterations (`TRAINING` below) and proposals are capped, so that only the per-image
work grows; their time is shown whole. The results go to `<work>/results.json` after each stage: a
second call skips what was measured and the pipeline's cache resumes a stage that was cut off, so the
largest sizes can be spread over several sessions.

The table checks the targets of docs/speed.md: the time per image of every per-image stage within
±15 % of its mean over the sizes, and the peak memory of every stage within 10 % from 1 000 images to
the largest.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.data.shapes import write_shapes
from pipeline.data.voc import VOCDataset
from pipeline.engine.cache import write_json_atomic
from pipeline.engine.config import load_config
from pipeline.engine.runner import upstream_order
from pipeline.reports import markdown_table
from stages import REGISTRY

# fixed training so that its cost does not grow with the images, and proposals capped (generated sets only)
TRAINING = ["proposals.max_proposals=200", "pretrain.iterations=300", "finetune.iterations=300",
            "fast_rcnn.iterations=300", "faster_rcnn.iterations=300"]
# the images each per-image stage works through; the other stages train for a fixed number of iterations
IMAGES_OF = {"proposals": "all", "features": "train", "svm": "train", "bbox": "train",
             "rcnn-detect": "test", "rcnn-evaluate": "test", "fast-rcnn-detect": "test", "faster-rcnn-detect": "test"}


def peak_anonymous(pid: int) -> int:
    """Sample the process's anonymous resident memory (RssAnon: not the shared libraries' pages, which the
    kernel can drop and read again) every 50 ms until it ends; the largest sample, in bytes."""
    peak = 0
    while True:
        status = Path(f"/proc/{pid}/status").read_text()  # the process stays until wait4 reaps it
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), None)
        if kib is None:  # a zombie: it has ended
            return peak
        peak = max(peak, kib * 1024)
        time.sleep(0.05)


def measure_stage(stage: str, args: list[str], cache: Path) -> dict:
    """Run `rcnn <stage>` in a fresh process; its wall clock (manifest), peak memory and cached bytes."""
    command = [sys.executable, "-m", "pipeline.cli", "-q", stage, *args]
    process = subprocess.Popen(command)
    anonymous = peak_anonymous(process.pid)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)}: exit status {process.returncode}")
    manifests = sorted((cache / stage).glob("*/manifest.json"), key=lambda path: path.stat().st_mtime)
    manifest = json.loads(manifests[-1].read_text())
    cached = sum(path.stat().st_size for path in manifests[-1].parent.rglob("*") if path.is_file())
    return {"seconds": manifest["timings"]["wall_s"], "peak_bytes": usage.ru_maxrss * 1024,
            "peak_anonymous_bytes": anonymous, "cache_bytes": cached}


def image_counts(data: Path, config: dict) -> dict[str, int]:
    dataset = VOCDataset(data, classes=config["data"]["classes"], class_split=config["data"]["train_split"])
    train = len(dataset.image_ids(config["data"]["train_split"]))
    test = len(dataset.image_ids(config["data"]["test_split"]))
    return {"train": train, "test": test, "all": train + test}


def measure_size(name: str, data: Path, options: argparse.Namespace, overrides: list[str], results: dict,
                 results_path: Path) -> None:
    config = load_config(options.config, [f"data.root={data}", *overrides])
    order = upstream_order([f"{method}-evaluate" if method == "rcnn" else f"{method}-detect"
                            for method in options.methods], REGISTRY, config)
    cache, measured = options.work / f"cache-{name}", results.setdefault(name, {"images": image_counts(data, config)})
    stage_args = ["--config", options.config, "--data", str(data), "--cache", str(cache),
                  "--reports", str(options.work / f"reports-{name}"), *[f"--set={item}" for item in overrides]]
    for stage in order:
        if stage in measured:
            continue
        print(f"{name} images: {stage} ...", flush=True)
        started = time.perf_counter()
        measured[stage] = measure_stage(stage, stage_args, cache)
        measured[stage]["process_s"] = time.perf_counter() - started
        write_json_atomic(results_path, results)


def spread(values: list[float]) -> float:
    """The largest relative departure from the mean."""
    mean = sum(values) / len(values)
    return max(abs(value - mean) for value in values) / mean if mean else 0.0


def print_tables(results: dict) -> None:
    sizes = list(results)
    stages = [stage for stage in results[sizes[-1]] if stage != "images"]
    rows, verdicts = [], []
    for stage in stages:
        per = IMAGES_OF.get(stage)
        times, peaks, anonymous_peaks, cached = [], [], [], []
        for size in sizes:
            row = results[size].get(stage)
            if not row:
                continue
            images = results[size]["images"][per] if per else 1
            times.append(row["seconds"] / images)
            peaks.append((results[size]["images"]["all"], row["peak_bytes"]))
            anonymous_peaks.append(row["peak_anonymous_bytes"])
            cached.append(row["cache_bytes"] / (results[size]["images"][per] if per else 1))
        unit = "s/image" if per else "s (fixed)"
        rows.append([stage, unit, " / ".join(f"{value:.3g}" for value in times),
                     " / ".join(f"{peak / 2 ** 20:.0f}" for _, peak in peaks),
                     " / ".join(f"{anonymous / 2 ** 20:.0f}" for anonymous in anonymous_peaks),
                     " / ".join(f"{value / 1024:.0f}" for value in cached)])
        large = [peak for images, peak in peaks if images >= 1000]
        verdicts.append([stage, f"{spread(times):.0%}" if per and len(times) > 1 else "-",
                         f"{max(large) / min(large) - 1:+.0%}" if len(large) > 1 else "-"])
    print(f"sizes (images): {' / '.join(str(results[size]['images']['all']) for size in sizes)}\n")
    print(markdown_table(["stage", "time", "time per size", "peak resident MiB", "of which anonymous",
                          "cache KiB per image (or whole)"], rows))
    print("\ntargets: per-image time within ±15 % of its mean; peak memory within 10 % from 1 000 images up\n")
    print(markdown_table(["stage", "time per image: largest departure from the mean", "peak: largest / smallest "
                          "from 1 000 images, minus 1"], verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="data, caches and results.json (kept to resume)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000],
                        help="generated set sizes, in images (default: 250 500 1000 2000 4000)")
    parser.add_argument("--data", type=Path, help="measure this VOC-layout set once instead of generated ones")
    parser.add_argument("--config", default="demo", help="config preset or file (default: demo)")
    parser.add_argument("--methods", nargs="+", default=["rcnn", "fast-rcnn", "faster-rcnn"],
                        help="R-CNN's graph to its evaluation; the others to their detect (default: all three)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every stage (repeatable); a generated set also gets TRAINING")
    parser.add_argument("--report-only", action="store_true", help="print the tables of what was measured")
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    results_path = options.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not options.report_only:
        if options.data:
            measure_size(options.data.name, options.data, options, options.set, results, results_path)
        for size in [] if options.data else options.sizes:
            data = options.work / f"shapes-{size}"
            write_shapes(data, size, seed=0)
            measure_size(str(size), data, options, TRAINING + options.set, results, results_path)
    print_tables(results)


if __name__ == "__main__":
    main()
