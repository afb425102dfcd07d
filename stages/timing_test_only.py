"""`rcnn timing-table --test-only`: each method's test pass at the config's scale, untrained, timed and counted.

The papers' test-time ratios depend on the networks, the image size and the number of proposals, not on
trained weights. This stage builds each method's own detector (pipeline.methods: the one its detect
stage runs) on untrained models: the backbone from backbone.weights (ImageNet weights, or random with
`none`), the other layers random, SVMs random and box regressors that move nothing. Then, on the first
`timing.images` test images (region proposals computed and timed on the same images, with the config's
settings): R-CNN warps `max_proposals` crops to the backbone's input size, SPP-net runs conv5 at its
scales, Fast R-CNN resizes to `min_size` / `max_size`, Faster R-CNN adds its RPN. Each detector first
warms up on the first image's first 16 proposals (so that a VGG16 R-CNN does not run a whole image
uncounted); the multiply-adds of each part come from torch.utils.flop_counter on a separate pass of the
same images, so that counting does not slow the clock. No mAP: nothing was trained; the report says so.
The sliding window is left out: no paper gives its time. Output: reports/<config>/timing-test-only/.
"""
from __future__ import annotations

import json

import numpy as np

from pipeline.engine.cache import StageCache
from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import Shard, ShardOutput, Stage, StageContext
from pipeline.methods import FAST_RCNN_TABLE4, FASTER_RCNN_TABLE5, METHODS, REFERENCE
from pipeline.models import BACKBONES
from pipeline.proposals import proposal_files_digests, proposal_params
from pipeline.reports import markdown_table
from pipeline.timing import (
    Clock,
    count_multiply_adds,
    describe_hardware,
    time_detector,
    time_proposals,
    timing_key_extras,
)
from pipeline.weights import initial_backbone, weights_key_extras

WARMUP_PROPOSALS = 16
PRETRAIN_WEIGHTS = ("rcnn timing-table --test-only trains nothing: set backbone.weights to ImageNet weights "
                    "(torchvision or a file) or to none (random weights; the time is the same)")


def timed_methods():
    """The methods with published test times (every one but the sliding window), and their timed variants."""
    return [(method, variant) for method in METHODS.values() for variant in method.variants
            if variant.timed and variant.published and variant.published.test_s]


class TestOnlyTiming(Stage):
    """Time every method's untrained test pass at the config's scale; multiply-adds per part; no mAP."""

    name = "timing-test-only"
    version = "1"
    shard_suffix = ".json"
    headline_metrics = ("fastest_test",)
    runs_on_device = True
    exclusive = True  # one clock at a time

    def params(self, config: dict) -> dict:
        return {"images": config["timing"]["images"], "proposals": proposal_params(config),
                "backbone": initial_backbone(config["backbone"]),
                "methods": {method.name: method.test_params(config) for method, _ in timed_methods()},
                "sections": {method.section: config[method.section] for method, _ in timed_methods()
                             if method.end_to_end}}

    def key_extras(self, ctx: StageContext) -> dict:
        return {**timing_key_extras(ctx.device, ctx.threads), **weights_key_extras(ctx.params["backbone"]),
                **proposal_files_digests(ctx.params["proposals"])}

    def shards(self, ctx: StageContext) -> list[Shard]:
        return [Shard("00000", tuple(ctx.dataset.image_ids(ctx.test_split)[:ctx.params["images"]]))]

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        if ctx.params["backbone"]["weights"] == "pretrain":
            raise ConfigError(PRETRAIN_WEIGHTS)
        images = [ctx.dataset.read_image(image_id) for image_id in shard.items]
        if len(images) < ctx.params["images"] or any(rgb is None for rgb in images):
            raise ConfigError(f"timing: {ctx.params['images']} test images asked for, {len(images)} readable")
        proposals, proposal_seconds = time_proposals(images, ctx.params["proposals"], ctx.device)
        measured = {}
        for method, variant in timed_methods():
            detector = method.fresh_detector(ctx.params, ctx.classes, ctx.params["methods"][method.name], ctx.device)
            given = proposals if method.uses_proposals else [None] * len(images)
            detector(images[0], given[0][:WARMUP_PROPOSALS] if method.uses_proposals else None, (variant.name,),
                     Clock(ctx.device))
            timed = time_detector(detector, variant.name, images, given, 0, ctx.device)
            measured[variant.timed] = {**timed, "multiply_adds": count_multiply_adds(detector, variant.name, images,
                                                                                      given)}
        result = {"images": len(images), "methods": measured, "proposals_s_per_image": float(np.mean(proposal_seconds)),
                  "proposals_per_image": float(np.mean([len(boxes) for boxes in proposals]))}
        out.path.write_text(json.dumps(result))
        return {}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        measured = json.loads(cache.shard_path("00000").read_text())
        rows = table_rows(measured, ctx.params["backbone"]["name"])
        (cache.report_dir / "timing.json").write_text(json.dumps({"hardware": describe_hardware(ctx.device),
                                                                  "rows": rows, "measured": measured}, indent=2))
        (cache.report_dir / "timing.md").write_text(markdown_report(ctx, measured, rows, describe_hardware(ctx.device)))
        return {"rows": rows, "fastest_test": min(rows, key=lambda row: row["test_s_per_image"])["method"]}


def table_rows(measured: dict, backbone: str) -> list[dict]:
    """Per timed row: seconds, multiply-adds and achieved GFLOP/s per image, and the ratios to the reference
    method's (R-CNN's), measured, counted and published (model S for AlexNet-class networks, L for VGG16, else
    none)."""
    def published(variant):
        model = BACKBONES[backbone].paper_model  # S: CaffeNet (ZF for Faster R-CNN); L: VGG16
        return variant.published_small if model == "S" else variant.published if model == "L" else None

    rcnn = measured["methods"][REFERENCE.timed_variants[0].timed]
    rcnn_macs = sum(rcnn["multiply_adds"].values())
    published_rcnn = published(REFERENCE.timed_variants[0])
    rows = []
    for _, variant in timed_methods():
        result, paper = measured["methods"][variant.timed], published(variant)
        macs = sum(result["multiply_adds"].values())
        rows.append({"method": variant.timed, "test_s_per_image": result["seconds_per_image"], "multiply_adds": macs,
                     "gflops_per_s": 2 * macs / result["seconds_per_image"] / 1e9,
                     "speedup": rcnn["seconds_per_image"] / result["seconds_per_image"],
                     "multiply_add_ratio": rcnn_macs / macs,
                     "published_test_s": paper.test_s if paper else None,
                     "published_speedup": published_rcnn.test_s / paper.test_s if paper and paper.test_s else None})
    return rows


def markdown_report(ctx: StageContext, measured: dict, rows: list[dict], hardware: str) -> str:
    params, backbone = ctx.params, ctx.params["backbone"]

    def cell(value, form="{:.1f}x"):
        return "-" if value is None else form.format(value)
    table = markdown_table(
        ["method", "test (s/image)", "multiply-adds (G/image)", "achieved GFLOP/s",
         f"measured speedup over {REFERENCE.title}",
         "multiply-add ratio", "speedup / ratio", "paper: test (s/image)", "paper: speedup"],
        [[row["method"], row["test_s_per_image"], row["multiply_adds"] / 1e9, row["gflops_per_s"],
          f"{row['speedup']:.1f}x", f"{row['multiply_add_ratio']:.1f}x", row["speedup"] / row["multiply_add_ratio"],
          cell(row["published_test_s"], "{:g}"), cell(row["published_speedup"])] for row in rows])
    parts = markdown_table(["method", "part", "ms per image", "multiply-adds (G)"], [
        [method, part, ms, result["multiply_adds"].get(part, 0.0) / 1e9]
        for method, result in measured["methods"].items() for part, ms in result["parts_ms"].items()])
    model = {"S": "S (AlexNet-class)", "L": "L (VGG16)"}.get(BACKBONES[backbone["name"]].paper_model)
    return "\n".join([
        "# Test time at the config's scale, untrained (`rcnn timing-table --test-only`)\n",
        f"Measured on **{hardware}** ({ctx.device}), {measured['images']} images, backbone {backbone['name']} "
        f"({backbone['weights']} weights) at {backbone['input_size']} px crops; "
        f"{measured['proposals_per_image']:.0f} region proposals per image ({measured['proposals_s_per_image']:.2f} s "
        f"per image, not in the times below).\n",
        "No mAP: nothing here was trained (random heads, random SVMs). The times still hold: a test pass costs "
        "the same whatever its weights, since every method runs the same layers on the same crops, maps and "
        "regions; only what the papers report as accuracy needs training.\n",
        table,
        f"Published speedups: Fast R-CNN's Table 4, model {model}." if model else
        "No published row for this backbone (the papers timed CaffeNet / ZF and VGG16).",
        "Multiply-adds: torch.utils.flop_counter (convolutions and matrix products; RoI pooling, NMS and the "
        "numpy SVM scores are not counted); achieved GFLOP/s = 2 x multiply-adds / seconds.\n",
        "## Time and multiply-adds by part\n", parts,
        "## Fast R-CNN, Table 4 (published; VOC07 test, Nvidia K40)\n", FAST_RCNN_TABLE4,
        "## Faster R-CNN, Table 5 (published; K40, ms per image)\n", FASTER_RCNN_TABLE5,
        "Settings (float32):\n",
        *(f"- {method.title}: {method.describe(params['methods'][method.name], params['sections'].get(method.section))}"
          for method in {method.name: method for method, _ in timed_methods()}.values())])
