"""How the pipeline's cost grows with the data: time per image, peak memory and cache bytes per stage.

    python bench/scaling.py --work /tmp/scaling [--sizes 250 500 1000 2000 4000] [--config demo]
                            [--methods rcnn fast-rcnn faster-rcnn] [--set KEY=VALUE ...]
    python bench/scaling.py --work /tmp/bccd --data ../shared/data/bccd --config photos --set backbone.weights=...

For each size, a generated shapes set of that many images (70 % trainval), or the one `--data` set, goes
through the methods' stages one at a time, in the graph's order, each in a fresh `rcnn <stage>` process
(the threaded scheduler, as a user runs it). Per stage it records the stage's wall clock from its
manifest, the process's peak resident memory (its own `ru_maxrss`, from wait4: what the machine must
hold while that stage runs, the interpreter and torch included), the largest of its anonymous resident
memory sampled every 0.1 s, and the bytes the stage cached. With `--whole-run`, one `rcnn run` process
computes every stage, as a user runs it, and each stage gets the memory samples taken while it ran. Training
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


def run_sampled(command: list[str]) -> tuple[list[tuple[float, int, int]], int]:
    """Run a command, sampling its resident memory every 0.1 s: samples of (time, VmRSS, RssAnon) in bytes, and
    its peak resident memory (its own ru_maxrss, from wait4). RssAnon leaves out the shared libraries' pages,
    which the kernel can drop and read again: the memory the process cannot give back."""
    process, samples = subprocess.Popen(command), []
    while True:
        status = Path(f"/proc/{process.pid}/status").read_text()  # the process stays until wait4 reaps it
        fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Rss")
                  or line.startswith("VmRSS")}
        if "RssAnon" not in fields:  # a zombie: it has ended
            break
        samples.append((time.time(), int(fields["VmRSS"]) * 1024, int(fields["RssAnon"]) * 1024))
        time.sleep(0.1)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(command)}: exit status {os.waitstatus_to_exitcode(status)}")
    return samples, usage.ru_maxrss * 1024


def stage_output(cache: Path, stage: str) -> tuple[dict, int]:
    """The stage's newest manifest in this cache, and the bytes of its output."""
    manifests = sorted((cache / stage).glob("*/manifest.json"), key=lambda path: path.stat().st_mtime)
    return (json.loads(manifests[-1].read_text()),
            sum(path.stat().st_size for path in manifests[-1].parent.rglob("*") if path.is_file()))


def measure_stage(stage: str, args: list[str], cache: Path) -> dict:
    """Run `rcnn <stage>` in a fresh process; its wall clock (manifest), peak memory and cached bytes."""
    samples, peak = run_sampled([sys.executable, "-m", "pipeline.cli", "-q", stage, *args])
    manifest, cached = stage_output(cache, stage)
    return {"seconds": manifest["timings"]["wall_s"], "peak_bytes": peak,
            "peak_anonymous_bytes": max(anonymous for _, _, anonymous in samples), "cache_bytes": cached}


def measure_whole_run(order: list[str], args: list[str], cache: Path, methods: list[str]) -> dict:
    """`rcnn run` in one process, as a user runs it: each stage's wall clock and cached bytes, and the largest
    memory samples taken while one of its shards (or its reduce) ran: stages that overlap share samples."""
    samples, peak = run_sampled([sys.executable, "-m", "pipeline.cli", "-q", "run", "--methods", *methods, *args])
    measured = {"whole run": {"seconds": samples[-1][0] - samples[0][0], "peak_bytes": peak,
                              "peak_anonymous_bytes": max(anonymous for _, _, anonymous in samples), "cache_bytes": 0}}
    for stage in order:
        manifest, cached = stage_output(cache, stage)
        spans = [(record["started"], record["seconds"]) for record in manifest["shards"].values()]
        spans.append((manifest["timings"]["reduce_started"], manifest["timings"]["reduce_s"]))
        during = [(rss, anonymous) for moment, rss, anonymous in samples
                  if any(start <= moment <= start + seconds for start, seconds in spans)] or [(0, 0)]
        measured[stage] = {"seconds": manifest["timings"]["wall_s"], "peak_bytes": max(rss for rss, _ in during),
                           "peak_anonymous_bytes": max(anonymous for _, anonymous in during), "cache_bytes": cached}
    return measured


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
    cache = options.work / f"cache-{name}"
    stage_args = ["--config", options.config, "--data", str(data), "--cache", str(cache),
                  "--reports", str(options.work / f"reports-{name}"), *[f"--set={item}" for item in overrides]]
    if options.whole_run:
        name = f"{name}, one process"
    measured = results.setdefault(name, {"images": image_counts(data, config)})
    measured["order"] = ["whole run"] * options.whole_run + order
    if options.whole_run and "whole run" not in measured:
        print(f"{name}: rcnn run ...", flush=True)
        measured.update(measure_whole_run(order, stage_args, cache, options.methods))
        write_json_atomic(results_path, results)
    for stage in order:
        if stage in measured:
            continue
        print(f"{name} images: {stage} ...", flush=True)
        measured[stage] = measure_stage(stage, stage_args, cache)
        write_json_atomic(results_path, results)


def spread(values: list[float]) -> float:
    """The largest relative departure from the mean."""
    mean = sum(values) / len(values)
    return max(abs(value - mean) for value in values) / mean if mean else 0.0


def print_tables(results: dict) -> None:
    sizes = sorted(results, key=lambda size: (results[size]["images"]["all"], size))  # json keeps no order
    stages = list(dict.fromkeys(stage for size in sizes for stage in results[size].get("order", [])
                                if stage in results[size]))
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
    parser.add_argument("--whole-run", action="store_true",
                        help="one `rcnn run` process for all stages (memory sampled and attributed to the stages "
                             "running at the time) instead of a process per stage")
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
