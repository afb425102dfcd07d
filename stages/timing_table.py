"""`rcnn timing-table`: every detection method trained, evaluated and timed here, beside the papers' figures.

The methods, their training stages, variants, timing rows and published figures are the records of
pipeline.methods; this module names none of them. Training time: each method's training stages
(Method.training_stages), from their manifests (shards record when they started and how long they ran;
pipeline.engine.runner.union_seconds counts work that ran side by side once). Excluded, as in the papers:
the classification pre-training (pretrain; ImageNet in the papers) and the region proposals. `rcnn
timing-table` runs the methods one after another so that their training does not share the machine
(`timing_targets`); `--fresh` retrains them all for fresh timings.
Test time: this stage runs every method's own detector (the one its detect stage runs and evaluates)
on the same `timing.images` test images, decoded into memory first, after `timing.warmup` images that
are not counted, with the device synchronised before every clock reading: from pixels to detections
after NMS, one timed variant at a time (the rows), and the region proposals on the same images.
The report (`reports/<config>/timing-table/`): timing.md with the table beside the published figures,
Fast R-CNN's Table 4 and Faster R-CNN's Table 5, the protocol, timing.json, timing.png.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.engine.cache import StageCache
from pipeline.engine.errors import ConfigError
from pipeline.engine.runner import union_seconds
from pipeline.engine.stage import Shard, ShardOutput, Stage, StageContext, describe_hardware
from pipeline.methods import FAST_RCNN_TABLE4, FASTER_RCNN_TABLE5, METHODS, PUBLISHED_PROPOSALS_S, REFERENCE
from pipeline.precision import test_time_bf16
from pipeline.proposals import proposal_files_digests, proposal_params, proposal_title
from pipeline.reports import markdown_table, new_figure, save_figure
from pipeline.timing import time_detector, time_proposals, timing_key_extras
from pipeline.weights import initial_backbone

NOT_RETIMED = ("proposals", "pretrain")  # in no method's time: `--fresh` reuses them


class TimingTable(Stage):
    """Train and test every detection method on the same data and hardware; compare with the papers."""

    name = "timing-table"
    version = "4"  # 4: rows and checks from the method records; speedups by row in the metrics
    shard_suffix = ".json"
    headline_metrics = ("fastest_test", "fastest_training")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {**config["timing"], "proposals": proposal_params(config),
                "backbone": initial_backbone(config["backbone"]),
                "methods": {method.name: method.test_params(config) for method in METHODS.values()}}

    def input_stages(self, params) -> tuple[str, ...]:
        stages = ["proposals"]
        for method in METHODS.values():
            stages += [*method.training_stages, *method.model_stages.values(), method.evaluate_stage]
        return tuple(dict.fromkeys(stages))

    def key_extras(self, ctx: StageContext) -> dict:
        return {**timing_key_extras(ctx.device, ctx.threads), **proposal_files_digests(ctx.params["proposals"])}

    def shards(self, ctx: StageContext) -> list[Shard]:
        image_ids = ctx.dataset.image_ids(ctx.test_split)
        return [Shard("00000", tuple(image_ids[:ctx.params["warmup"] + ctx.params["images"]]))]

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params = ctx.params
        if len(shard.items) < params["warmup"] + params["images"]:
            raise ConfigError(f"timing: {params['warmup']} warm-up + {params['images']} timed images asked for, but "
                              f"the test split has {len(shard.items)}; lower timing.images")
        measured = time_test_pass(ctx, inputs, list(shard.items))
        out.path.write_text(json.dumps(measured))
        return {}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        measured = json.loads(cache.shard_path("00000").read_text())
        manifests = {stage: upstream.manifest() for stage, upstream in inputs.items()}
        rows = []
        for method in METHODS.values():
            evaluation = manifests[method.evaluate_stage]["metrics"]
            train_s = training_seconds(manifests, method.training_stages)
            for variant in method.timed_variants:
                test_s = measured["methods"][variant.timed]["seconds_per_image"]
                proposals_s = measured["proposals_s_per_image"] if method.uses_proposals else 0.0
                rows.append({"method": variant.timed, "train_s": train_s, "test_s_per_image": test_s,
                             "test_s_per_image_with_proposals": test_s + proposals_s,
                             "map": evaluation["variants"][variant.name][f"map_voc07_11pt@{evaluation['iou']}"]})
        table = {"hardware": describe_hardware(ctx.device), "methods": rows}
        training_hardware = sorted({manifests[stage].get("hardware", "unknown")
                                    for method in METHODS.values() for stage in method.training_stages})
        write_report(cache.report_dir, table, measured, ctx, manifests, training_hardware)
        reference = reference_row(rows)
        speedups = {row["method"]: {"train": reference["train_s"] / row["train_s"],
                                    "test": reference["test_s_per_image"] / row["test_s_per_image"]} for row in rows}
        return {"hardware": table["hardware"], "methods": rows, "speedups": speedups,
                "fastest_test": min(rows, key=lambda row: row["test_s_per_image_with_proposals"])["method"],
                "fastest_training": min(rows, key=lambda row: row["train_s"])["method"]}


def timing_targets() -> list[str]:
    """What `rcnn timing-table` runs, one after another: each method's evaluation (with what it needs), so that
    no two methods train at once, then the timing table."""
    return [*(method.evaluate_stage for method in METHODS.values()), TimingTable.name]


def time_test_pass(ctx: StageContext, inputs: dict, image_ids: list[str]) -> dict:
    """Seconds per image (and per part, in ms) of each timed variant of each method, and of the region
    proposals, on these images; the first `timing.warmup` are not counted."""
    params, warmup = ctx.params, ctx.params["warmup"]
    images = [ctx.dataset.read_image(image_id) for image_id in image_ids]
    if any(rgb is None for rgb in images):
        raise ConfigError("timing: a test image could not be read; see the proposals report")
    proposals, proposal_seconds = time_proposals(images, params["proposals"], ctx.device)
    timed = {}
    for method in METHODS.values():
        detector = method.detector(inputs, params["methods"][method.name], ctx.device)
        given = proposals if method.uses_proposals else [None] * len(images)
        for variant in method.timed_variants:
            timed[variant.timed] = time_detector(detector, variant.name, images, given, warmup, ctx.device)
    return {"images": len(images) - warmup, "warmup": warmup, "methods": timed,
            "proposals_s_per_image": float(np.mean(proposal_seconds[warmup:])),
            "proposals_per_image": float(np.mean([len(boxes) for boxes in proposals[warmup:]]))}


def training_seconds(manifests: dict[str, dict], stages: tuple[str, ...]) -> float:
    """Wall-clock seconds of a method's training stages, from their manifests (see the module docstring)."""
    intervals = []
    for stage in stages:
        manifest = manifests[stage]
        intervals += [(record["started"], record["seconds"]) for record in manifest["shards"].values()]
        intervals.append((manifest["timings"]["reduce_started"], manifest["timings"]["reduce_s"]))
    return union_seconds(intervals)


def timed_rows() -> dict:
    """Timing-table row -> (its Variant, its Method), in the table's order."""
    return {variant.timed: (variant, method) for method in METHODS.values() for variant in method.timed_variants}


def result_rows() -> list[str]:
    """The rows of the methods' results (every method once, without its test-time variants)."""
    return [method.timed_variants[0].timed for method in METHODS.values()]


def reference_row(rows: list[dict]) -> dict:
    """The row every speedup is relative to: the reference method's result (R-CNN's, as in the papers)."""
    return next(row for row in rows if row["method"] == REFERENCE.timed_variants[0].timed)


def write_report(report_dir, table: dict, measured: dict, ctx: StageContext, manifests: dict,
                 training_hardware: list[str]) -> None:
    """timing.md, timing.json and timing.png."""
    (report_dir / "timing.json").write_text(json.dumps(table, indent=2))
    (report_dir / "timing.md").write_text(markdown_report(table, measured, ctx, manifests, training_hardware))
    plot_timing(report_dir / "timing.png", table["methods"])


def markdown_report(table: dict, measured: dict, ctx: StageContext, manifests: dict,
                    training_hardware: list[str]) -> str:
    rows, reference = {row["method"]: row for row in table["methods"]}, reference_row(table["methods"])
    published_reference = timed_rows()[reference["method"]][0].published
    measured_table = markdown_table(
        ["method", "train (s)", "train speedup", "test (s/image)", "test speedup", "test with proposals (s/image)",
         "mAP (VOC07 11-pt, IoU 0.5)", "paper: train (h)", "paper: train speedup", "paper: test (s/image)",
         "paper: test speedup", "paper: mAP (VOC07)"],
        [[name, row["train_s"], f"{reference['train_s'] / row['train_s']:.1f}x", row["test_s_per_image"],
          f"{reference['test_s_per_image'] / row['test_s_per_image']:.1f}x", row["test_s_per_image_with_proposals"],
          row["map"], _published(paper.train_h), _ratio(published_reference.train_h, paper.train_h),
          _published(paper.test_s), _ratio(published_reference.test_s, paper.test_s), _published(paper.map)]
         for name, row in rows.items() for paper in [timed_rows()[name][0].published]])
    parts = measured["methods"]
    breakdown = markdown_table(["method", "part", "ms per image"], [
        [method, part, ms] for method, result in parts.items() for part, ms in result["parts_ms"].items()])
    return "\n".join([
        "# Timing: " + " vs ".join(result_rows()) + "\n",
        f"Measured on **{table['hardware']}**.\n",
        measured_table, *lecture_checks(rows), "",
        "## Protocol\n", *protocol(ctx, measured, manifests, training_hardware), "",
        "## Fast R-CNN, Table 4 (published; VGG16 = L, VOC07 test, Nvidia K40)\n", FAST_RCNN_TABLE4,
        "Measured here, the same rows for each method the table holds:\n", table4_here(rows),
        "## Faster R-CNN, Table 5 (published; K40, ms per image)\n", FASTER_RCNN_TABLE5,
        "Measured here, same columns (proposal: the region proposals, or the RPN):\n",
        table5_here(parts, 1000 * measured["proposals_s_per_image"]),
        "## Test time by part (ms per image)\n", breakdown])


def lecture_checks(rows: dict[str, dict]) -> list[str]:
    """Whether what the papers found holds here: the order of test times, with and without proposals, the
    lecture's baselines (methods without published figures) against the reference, and each method's speedups
    over the reference beside the papers'."""
    records, reference = timed_rows(), reference_row(list(rows.values()))
    published = {name: records[name][0].published for name in result_rows()}
    with_proposals = {name: published[name].test_s + PUBLISHED_PROPOSALS_S * records[name][1].uses_proposals
                      for name in result_rows() if published[name].test_s is not None}
    readers = [name for name in with_proposals if records[name][1].uses_proposals]
    checks = []
    if len(readers) > 1:
        order = sorted(readers, key=lambda name: -published[name].test_s)
        holds = [rows[name]["test_s_per_image"] for name in order] == sorted(
            (rows[name]["test_s_per_image"] for name in order), reverse=True)
        checks.append(f"- test time, proposals excluded, {' > '.join(order)} (the papers' order): "
                      f"{'holds' if holds else 'does NOT hold'} here")
    if with_proposals:
        expected = min(with_proposals, key=with_proposals.get)
        fastest = min(with_proposals, key=lambda name: rows[name]["test_s_per_image_with_proposals"])
        checks.append(f"- {expected} fastest once proposal time is included (the papers): "
                      f"{'holds' if fastest == expected else f'does NOT hold ({fastest} is)'} here")
    for name in result_rows():
        row = rows[name]
        if published[name].test_s is None:  # a baseline of the lecture's, before the papers
            slower = row["test_s_per_image"] > reference["test_s_per_image_with_proposals"]
            checks.append(f"- {name}: {'slower' if slower else 'NOT slower'} at test than {reference['method']} with "
                          f"its region proposals; its mAP {'below' if row['map'] < reference['map'] else 'NOT below'} "
                          f"{reference['method']}'s")
        elif name != reference["method"] and published[name].train_h and published[name].test_s:
            paper_reference = records[reference["method"]][0].published
            checks.append(f"- {name} over {reference['method']}: training "
                          f"{reference['train_s'] / row['train_s']:.1f}x faster (paper: "
                          f"{paper_reference.train_h / published[name].train_h:.1f}x), test "
                          f"{reference['test_s_per_image'] / row['test_s_per_image']:.1f}x faster (paper: "
                          f"{paper_reference.test_s / published[name].test_s:.0f}x)")
    return checks


def table4_here(rows: dict[str, dict]) -> str:
    """Fast R-CNN's Table 4 measured here: a column for each row with a published training time."""
    records, reference = timed_rows(), reference_row(list(rows.values()))
    columns = [name for name in rows if records[name][0].published.train_h is not None]
    return markdown_table(["", *columns], [
        ["train time (s)", *(rows[name]["train_s"] for name in columns)],
        ["train speedup", *(f"{reference['train_s'] / rows[name]['train_s']:.1f}x" for name in columns)],
        ["test rate (s/im)", *(rows[name]["test_s_per_image"] for name in columns)],
        ["test speedup", *(f"{reference['test_s_per_image'] / rows[name]['test_s_per_image']:.1f}x"
                           for name in columns)],
        ["mAP (VOC07 11-pt, test split)", *(rows[name]["map"] for name in columns)]])


def table5_here(parts: dict[str, dict], proposals_ms: float) -> str:
    """Faster R-CNN's Table 5 measured here: every row whose detector times a conv, a proposal and a region-wise
    part (the network detectors); the region proposals count as the proposal part of a method that reads them."""
    records, lines = timed_rows(), []
    for name in result_rows():
        ms = parts[name]["parts_ms"]
        if {"conv", "proposal", "region-wise"} <= set(ms):
            method = records[name][1]
            proposal = ms["proposal"] + proposals_ms * method.uses_proposals
            total = ms["conv"] + proposal + ms["region-wise"]
            system = f"{'selective search' if method.uses_proposals else 'its RPN'} + {name}"
            lines.append([system, ms["conv"], proposal, ms["region-wise"], total, f"{1000 / total:.1f} fps"])
    return markdown_table(["system", "conv (ms)", "proposal (ms)", "region-wise (ms)", "total (ms)", "rate"], lines)


def protocol(ctx: StageContext, measured: dict, manifests: dict, training_hardware: list[str]) -> list[str]:
    params, backbone = ctx.params, ctx.params["backbone"]
    threads = "" if ctx.device == "cuda" else f", {torch.get_num_threads()} torch threads"
    at_test = ("bf16 trunks for R-CNN, Fast and Faster R-CNN (cpu_amp), float32 elsewhere"
               if test_time_bf16(ctx.device, params["methods"]["rcnn"]["cpu_amp"]) else "float32 for every method")
    settings = [f"- {method.title}: "
                f"{method.describe(params['methods'][method.name], trained_params(method, manifests))}"
                for method in METHODS.values()]
    return [
        f"- device: {ctx.device}{threads}; {at_test} at test; training as configured "
        f"(amp: bf16 autocast on cuda when `amp` is on)",
        f"- backbone: {backbone['name']} ({backbone['weights']} weights), {backbone['input_size']} px crops",
        *settings,
        f"- proposals: {proposal_title(params['proposals'])}, {measured['proposals_per_image']:.0f} per image on "
        f"average, {measured['proposals_s_per_image']:.3f} s per image measured on the same images in this run",
        f"- test: {measured['images']} test images after {measured['warmup']} warm-up images (not counted), every "
        f"method on the same images, from decoded pixels to detections after NMS, through the detector its "
        f"detect stage evaluates; image decoding and disk I/O excluded (images decoded and models loaded before "
        f"the clocks start); CUDA synchronised before every clock reading; 'test' excludes proposal time, "
        f"'with proposals' adds it",
        f"- training: wall-clock time of each method's training stages (Method.training_stages in "
        f"pipeline/methods.py), from their manifests, measured when they were computed, on: "
        f"{'; '.join(training_hardware)}; classification pre-training and region proposals excluded, as in the "
        f"papers",
        f"- published figures: Fast R-CNN Table 4 (VGG16, K40; SPP-net with five scales), Faster R-CNN Table 5; "
        f"their 'with proposals' add selective search at {PUBLISHED_PROPOSALS_S} s per image (Table 5)"]


def trained_params(method, manifests: dict) -> dict:
    """The params the method's model was trained with, when one stage trains it whole (else {})."""
    stages = list(dict.fromkeys(method.model_stages.values()))
    return manifests[stages[0]]["description"]["params"] if method.end_to_end else {}


def plot_timing(path, methods: list[dict]) -> None:
    """Training time and test time per image, measured (left) beside the published figures (right)."""
    figure = new_figure(11, 7)
    rows = timed_rows()
    names = [m["method"] for m in methods if m["method"] in result_rows()]
    published = [n for n in names if rows[n][0].published.test_s is not None]
    measured = {m["method"]: m for m in methods}

    def published_with_proposals(name: str) -> float:
        variant, method = rows[name]
        return variant.published.test_s + (PUBLISHED_PROPOSALS_S if method.uses_proposals else 0.0)

    panels = [
        ("measured: training time (s)", names, [measured[n]["train_s"] for n in names], None),
        ("published: training time (h)", published, [rows[n][0].published.train_h or 0.0 for n in published], None),
        ("measured: test time per image (s)", names, [measured[n]["test_s_per_image"] for n in names],
         [measured[n]["test_s_per_image_with_proposals"] for n in names]),
        ("published: test time per image (s)", published, [rows[n][0].published.test_s for n in published],
         [published_with_proposals(n) for n in published]),
    ]
    for index, (title, names, values, with_proposals) in enumerate(panels):
        axes = figure.add_subplot(2, 2, index + 1)
        if with_proposals:
            axes.bar(names, with_proposals, color="#cccccc", label="with proposal time")
        axes.bar(names, values, color="#4477aa", label="proposal time excluded" if with_proposals else None)
        axes.set(title=title, yscale="log" if with_proposals else "linear")
        axes.tick_params(axis="x", labelsize=8)
        if with_proposals:
            axes.legend(fontsize=7)
    save_figure(figure, path)


def _published(value) -> str:
    return "-" if value is None else f"{value:g}"


def _ratio(reference, value) -> str:
    return "-" if value is None or reference is None else f"{reference / value:.1f}x"
