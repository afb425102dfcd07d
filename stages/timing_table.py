"""`rcnn timing-table`: sliding window vs R-CNN vs SPP-net vs Fast R-CNN vs Faster R-CNN, measured here.

The methods, their training stages, variants and published figures are the records of pipeline.methods.
Training time: each method's training stages (Method.training), from their manifests (shards record
when they started and how long they ran; pipeline.engine.runner.union_seconds counts work that ran side by
side once). Excluded, as in the papers: the classification pre-training (pretrain; ImageNet in the
papers) and the region proposals. `rcnn timing-table` runs the methods one after another so that their
training does not share the machine; `--fresh` retrains them all for fresh timings.
Test time: this stage runs every method's own detector (the one its detect stage runs and evaluates)
on the same `timing.images` test images, decoded into memory first, after `timing.warmup` images that
are not counted, with the device synchronised before every clock reading: from pixels to detections
after NMS, one variant at a time (the timed rows), and the region proposals on the same images.
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
from pipeline.methods import FAST_RCNN_TABLE4, FASTER_RCNN_TABLE5, METHODS, PUBLISHED_PROPOSALS_S
from pipeline.proposals import proposal_files_digests, proposal_params, proposal_title
from pipeline.reports import markdown_table, new_figure, save_figure
from pipeline.timing import time_detector, time_proposals, timing_key_extras
from pipeline.weights import initial_backbone


class TimingTable(Stage):
    """Train and test R-CNN, SPP-net, Fast and Faster R-CNN on the same data and hardware; compare."""

    name = "timing-table"
    version = "3"
    shard_suffix = ".json"
    headline_metrics = ("fast_rcnn_train_speedup", "fast_rcnn_test_speedup")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {**config["timing"], "proposals": proposal_params(config),
                "backbone": initial_backbone(config["backbone"]),
                "methods": {method.name: method.test_params(config) for method in METHODS.values()}}

    def input_stages(self, params) -> tuple[str, ...]:
        stages = ["proposals"]
        for method in METHODS.values():
            stages += [*method.training, *method.trained.values(), method.evaluate_stage]
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
            train_s = training_seconds(manifests, method.training)
            for variant in (variant for variant in method.variants if variant.timed):
                test_s = measured["methods"][variant.timed]["seconds_per_image"]
                proposals_s = measured["proposals_s_per_image"] if method.uses_proposals else 0.0
                rows.append({"method": variant.timed, "train_s": train_s, "test_s_per_image": test_s,
                             "test_s_per_image_with_proposals": test_s + proposals_s,
                             "map": evaluation["variants"][variant.name][f"map_voc07_11pt@{evaluation['iou']}"]})
        table = {"hardware": describe_hardware(ctx.device), "methods": rows}
        training_hardware = sorted({manifests[stage].get("hardware", "unknown")
                                    for method in METHODS.values() for stage in method.training})
        write_report(cache.report_dir, table, measured, ctx, manifests, training_hardware)
        rcnn, fast = (next(row for row in rows if row["method"] == name) for name in ("R-CNN", "Fast R-CNN"))
        return {"hardware": table["hardware"], "methods": rows,
                "fast_rcnn_train_speedup": rcnn["train_s"] / fast["train_s"],
                "fast_rcnn_test_speedup": rcnn["test_s_per_image"] / fast["test_s_per_image"]}


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
        for variant in (variant for variant in method.variants if variant.timed):
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
    return {variant.timed: (variant, method) for method in METHODS.values() for variant in method.variants
            if variant.timed}


def write_report(report_dir, table: dict, measured: dict, ctx: StageContext, manifests: dict,
                 training_hardware: list[str]) -> None:
    """timing.md, timing.json and timing.png."""
    (report_dir / "timing.json").write_text(json.dumps(table, indent=2))
    (report_dir / "timing.md").write_text(markdown_report(table, measured, ctx, manifests, training_hardware))
    plot_timing(report_dir / "timing.png", table["methods"])


def markdown_report(table: dict, measured: dict, ctx: StageContext, manifests: dict,
                    training_hardware: list[str]) -> str:
    methods = {m["method"]: m for m in table["methods"]}
    published = {row: variant.published for row, (variant, _) in timed_rows().items()}
    rcnn, published_rcnn = methods["R-CNN"], published["R-CNN"]
    rows = []
    for name, m in methods.items():
        rows.append([name, m["train_s"], f"{rcnn['train_s'] / m['train_s']:.1f}x", m["test_s_per_image"],
                     f"{rcnn['test_s_per_image'] / m['test_s_per_image']:.1f}x", m["test_s_per_image_with_proposals"],
                     m["map"], _published(published[name].train_h),
                     _ratio(published_rcnn.train_h, published[name].train_h),
                     _published(published[name].test_s), _ratio(published_rcnn.test_s, published[name].test_s),
                     _published(published[name].map)])
    measured_table = markdown_table(
        ["method", "train (s)", "train speedup", "test (s/image)", "test speedup", "test with proposals (s/image)",
         "mAP (VOC07 11-pt, IoU 0.5)", "paper: train (h)", "paper: train speedup", "paper: test (s/image)",
         "paper: test speedup", "paper: mAP (VOC07)"], rows)
    test_order = [methods[name]["test_s_per_image"] for name in ("R-CNN", "SPP-net", "Fast R-CNN")]
    window = methods["Sliding window"]
    with_proposals = {name: methods[name]["test_s_per_image_with_proposals"] for name in result_rows()}
    checks = [
        f"- the sliding window, with no proposals, is slower at test than R-CNN with its region proposals: "
        f"{'holds' if window['test_s_per_image'] > rcnn['test_s_per_image_with_proposals'] else 'does NOT hold'} "
        f"here; its mAP is {'below' if window['map'] < rcnn['map'] else 'NOT below'} R-CNN's",
        f"- test time, proposals excluded, R-CNN > SPP-net > Fast R-CNN (the papers' order): "
        f"{'holds' if test_order[0] > test_order[1] > test_order[2] else 'does NOT hold'} here",
        f"- Faster R-CNN fastest once proposal time is included: "
        f"{'holds' if min(with_proposals, key=with_proposals.get) == 'Faster R-CNN' else 'does NOT hold'} here",
        f"- Fast R-CNN over R-CNN: training {rcnn['train_s'] / methods['Fast R-CNN']['train_s']:.1f}x faster "
        f"(paper: 8.8x), test {rcnn['test_s_per_image'] / methods['Fast R-CNN']['test_s_per_image']:.1f}x faster "
        f"(paper: 146x)"]
    parts = measured["methods"]
    proposals_ms = 1000 * measured["proposals_s_per_image"]
    fast_parts, faster_parts = parts["Fast R-CNN"]["parts_ms"], parts["Faster R-CNN"]["parts_ms"]
    table5 = markdown_table(["system", "conv (ms)", "proposal (ms)", "region-wise (ms)", "total (ms)", "rate"], [
        ["SS + Fast R-CNN", fast_parts["conv"], proposals_ms + fast_parts["proposal"], fast_parts["region-wise"],
         proposals_ms + sum(fast_parts.values()), f"{1000 / (proposals_ms + sum(fast_parts.values())):.1f} fps"],
        ["RPN + Fast R-CNN (Faster R-CNN)", faster_parts["conv"], faster_parts["proposal"], faster_parts["region-wise"],
         sum(faster_parts.values()), f"{1000 / sum(faster_parts.values()):.1f} fps"]])
    breakdown = markdown_table(["method", "part", "ms per image"], [
        [method, part, ms] for method, result in parts.items() for part, ms in result["parts_ms"].items()])
    fast, svd = methods["Fast R-CNN"], methods["Fast R-CNN (SVD)"]
    table4 = markdown_table(["", "Fast R-CNN", "R-CNN", "SPP-net"], [
        ["train time (s)", fast["train_s"], rcnn["train_s"], methods["SPP-net"]["train_s"]],
        ["train speedup", f"{rcnn['train_s'] / fast['train_s']:.1f}x", "1x",
         f"{rcnn['train_s'] / methods['SPP-net']['train_s']:.1f}x"],
        ["test rate (s/im)", fast["test_s_per_image"], rcnn["test_s_per_image"],
         methods["SPP-net"]["test_s_per_image"]],
        ["with SVD", svd["test_s_per_image"], "-", "-"],
        ["test speedup", f"{rcnn['test_s_per_image'] / fast['test_s_per_image']:.1f}x", "1x",
         f"{rcnn['test_s_per_image'] / methods['SPP-net']['test_s_per_image']:.1f}x"],
        ["with SVD", f"{rcnn['test_s_per_image'] / svd['test_s_per_image']:.1f}x", "-", "-"],
        ["mAP (VOC07 11-pt, test split)", fast["map"], rcnn["map"], methods["SPP-net"]["map"]],
        ["with SVD", svd["map"], "-", "-"]])
    return "\n".join([
        "# Timing: sliding window vs R-CNN vs SPP-net vs Fast R-CNN vs Faster R-CNN\n",
        f"Measured on **{table['hardware']}**.\n",
        measured_table, *checks, "",
        "## Protocol\n", *protocol(ctx, measured, manifests, training_hardware), "",
        "## Fast R-CNN, Table 4 (published; VGG16 = L, VOC07 test, Nvidia K40)\n", FAST_RCNN_TABLE4,
        "Measured here, same rows:\n", table4,
        "## Faster R-CNN, Table 5 (published; K40, ms per image)\n", FASTER_RCNN_TABLE5,
        "Measured here, same columns (proposal = the region proposals for SS + Fast R-CNN):\n", table5,
        "## Test time by part (ms per image)\n", breakdown])


def result_rows() -> list[str]:
    """The timing-table rows of the methods' results (every method once, without test-time variants)."""
    return [method.variants[0].timed for method in METHODS.values()]


def protocol(ctx: StageContext, measured: dict, manifests: dict, training_hardware: list[str]) -> list[str]:
    params, backbone = ctx.params, ctx.params["backbone"]
    tests = params["methods"]
    trained = {name: manifests[f"{name}-train"]["description"]["params"] for name in ("fast-rcnn", "faster-rcnn")}
    threads = "" if ctx.device == "cuda" else f", {torch.get_num_threads()} torch threads"
    window = tests["sliding-window"]
    return [
        f"- device: {ctx.device}{threads}; dtype float32 for every method at test; training as configured "
        f"(amp: bf16 autocast on cuda when `amp` is on)",
        f"- backbone: {backbone['name']} ({backbone['weights']} weights); R-CNN warps each proposal to "
        f"{backbone['input_size']} px ({tests['rcnn']['crops_per_batch']} crops per forward); SPP-net: conv5 at "
        f"shorter sides {list(tests['sppnet']['scales'])}, pyramid {list(tests['sppnet']['levels'])}; Fast / Faster "
        f"R-CNN: shorter side {trained['fast-rcnn']['min_size']} / {trained['faster-rcnn']['min_size']}, one image "
        f"per forward",
        f"- sliding window: windows of sides {list(window['sizes'])} px, aspect ratios "
        f"{list(window['aspect_ratios'])}, "
        f"every {window['step']} of a window's side, through R-CNN's fine-tuned classifier (so its training time "
        f"is fine-tuning's); no proposals",
        f"- proposals: {proposal_title(params['proposals'])}, {measured['proposals_per_image']:.0f} per image on "
        f"average, {measured['proposals_s_per_image']:.3f} s per image measured on the same images in this run; "
        f"Faster R-CNN: its RPN's {tests['faster-rcnn']['rpn_post_nms_test']} per image",
        f"- test: {measured['images']} test images after {measured['warmup']} warm-up images (not counted), every "
        f"method on the same images, from decoded pixels to detections after NMS, through the detector its "
        f"detect stage evaluates; image decoding and disk I/O excluded (images decoded and models loaded before "
        f"the clocks start); CUDA synchronised before every clock reading; 'test' excludes proposal time, "
        f"'with proposals' adds it",
        f"- training: wall-clock time of each method's training stages (Method.training in pipeline/methods.py), "
        f"from their manifests, measured when they were computed, on: {'; '.join(training_hardware)}; "
        f"classification pre-training and region proposals excluded, as in the papers",
        f"- published figures: Fast R-CNN Table 4 (VGG16, K40; SPP-net with five scales), Faster R-CNN Table 5; "
        f"their 'with proposals' add selective search at {PUBLISHED_PROPOSALS_S} s per image (Table 5)"]



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
    return "-" if value is None else f"{reference / value:.1f}x"
