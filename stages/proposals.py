"""Region proposals for every image of both splits (R-CNN §2.1), one HDF5 file per image shard.

The proposal method (`proposals.method`; selective search, R-CNN's) is pipeline.proposals.propose.
Shard file layout: one dataset per image, named by its image id, float32[N, 4] boxes (x1, y1, x2, y2,
pipeline convention) in rank order, with attrs image_id, width, height and, when OpenCV failed on
the image, error (and then no boxes). The report gives the recall of the ground truth at IoU 0.5 and
0.7 against the number of proposals kept. The OpenCV version is part of the cache key.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

from pipeline.engine.cache import StageCache, hdf5_file
from pipeline.engine.stage import Shard, ShardOutput, Stage, StageContext, image_shards, thaw
from pipeline.proposals import (
    proposal_files_digests,
    proposal_params,
    proposal_title,
    propose,
    read_proposals,
    search_scale,
)
from pipeline.reports import markdown_table, new_figure, save_figure

RECALL_IOUS = (0.5, 0.7)
log = logging.getLogger(__name__)


class Proposals(Stage):
    """Region proposals per image (selective search), with a recall report against the ground truth."""

    name = "proposals"
    version = "1"
    headline_metrics = ("recall@0.5", "recall@0.7", "proposals_per_image", "failed_images")

    def params(self, config: dict) -> dict:
        return proposal_params(config)

    def key_extras(self, ctx: StageContext) -> dict:
        return {"opencv": cv2.__version__, **proposal_files_digests(ctx.params)}

    def shards(self, ctx: StageContext) -> list[Shard]:
        return image_shards(ctx.image_ids(), ctx.params["images_per_shard"])

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params = ctx.params
        cv2.setNumThreads(1)  # parallelism comes from the shards; OpenCV's own threads would oversubscribe
        failed, boxes_written, skipped, shrunk = {}, 0, {}, 0
        with hdf5_file(out.path) as shard_file:
            for image_id in shard.items:
                rgb = ctx.dataset.read_image(image_id)
                if rgb is None:  # bad image and on_bad_input=skip: the data set noted why, under its path
                    image_path = str(ctx.dataset.image_path(image_id))
                    skipped[image_path] = ctx.dataset.skipped[image_path]
                    continue
                try:
                    boxes = propose(rgb, params)
                except cv2.error as exc:  # ximgproc asserts on some inputs; report the image, go on
                    failed[image_id] = str(exc).strip().splitlines()[-1]
                    boxes = np.zeros((0, 4), np.float32)
                shrunk += search_scale(rgb.shape[1], rgb.shape[0], params["search_side"]) < 1
                dataset = shard_file.create_dataset(image_id, data=boxes)
                dataset.attrs.update(image_id=image_id, height=rgb.shape[0], width=rgb.shape[1])
                if image_id in failed:
                    dataset.attrs["error"] = failed[image_id]
                boxes_written += len(boxes)
        return {"images": len(shard.items) - len(skipped), "boxes": boxes_written, "failed": failed,
                "skipped": skipped, "shrunk": shrunk}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        params = ctx.params
        proposals = read_proposals(cache)
        curve = recall_curve(ctx.dataset, proposals, [*params["recall_at"], params["max_proposals"]])
        failed = {image: error for record in records.values() for image, error in record["metrics"]["failed"].items()}
        skipped = {**ctx.dataset.skipped,
                   **{path: problem for record in records.values()
                      for path, problem in record["metrics"]["skipped"].items()}}
        images = sum(record["metrics"]["images"] for record in records.values())
        shrunk = sum(record["metrics"]["shrunk"] for record in records.values())
        if shrunk:
            log.info("proposals: %d of %d images are larger than %d px and were searched at that size "
                     "(proposals.search_side)", shrunk, images, params["search_side"])
        metrics = {
            "images": images,
            "proposals_per_image": sum(len(boxes) for boxes in proposals.values()) / max(images, 1),
            "seconds_per_image": sum(record["seconds"] for record in records.values()) / max(images, 1),
            "recall@0.5": curve[-1]["recall@0.5"], "recall@0.7": curve[-1]["recall@0.7"],
            "gt_boxes": curve[-1]["gt_boxes"], "recall_curve": curve,
            "failed_images": len(failed), "failed": failed, "skipped": skipped, "images_searched_smaller": shrunk,
        }
        write_report(cache.report_dir, params, metrics)
        return metrics


    def report_beside(self, report_dir: Path, manifests: list[dict]) -> None:
        """recall-by-method.md and .png: the recall curve of every proposals output computed on this data
        set (each method, and each setting tried), this one first."""
        runs = [(proposal_title(manifest["description"]["params"]), manifest["description"]["params"],
                 manifest["metrics"]["recall_curve"]) for manifest in manifests]
        rows = [[title, params["max_proposals"], curve[-1]["recall@0.5"], curve[-1]["recall@0.7"],
                 curve[-1]["mean_best_iou"]] for title, params, curve in runs]
        (report_dir / "recall-by-method.md").write_text(
            "# Proposal recall of every proposal method computed on this data set\n\n"
            + markdown_table(["method", "max proposals", "recall@0.5", "recall@0.7", "mean best IoU"], rows))
        figure = new_figure(11, 4.5)
        for index, iou in enumerate(RECALL_IOUS):
            axes = figure.add_subplot(1, len(RECALL_IOUS), index + 1)
            for title, params, curve in runs:
                axes.plot([row["mean_kept"] for row in curve], [row[f"recall@{iou}"] for row in curve], marker="o",
                          label=f"{title}, at most {params['max_proposals']}")
            axes.set(xscale="log", xlabel="proposals per image (mean kept)", ylabel=f"recall at IoU {iou}",
                     ylim=(0, 1.02))
            axes.grid(True, alpha=0.3)
            axes.legend(fontsize=7)
        save_figure(figure, report_dir / "recall-by-method.png")


def recall_curve(dataset, proposals: dict[str, np.ndarray], caps: list[int]) -> list[dict]:
    """Recall of the non-difficult ground truth at IoU 0.5 and 0.7 when keeping the top `cap` boxes."""
    caps = sorted(set(caps))  # max_proposals may also be one of recall_at: count each cap once
    best_iou_per_cap = {cap: [] for cap in caps}
    kept_per_cap = {cap: 0 for cap in caps}
    for image_id, boxes in proposals.items():
        gt_boxes, _, difficult = dataset.ground_truth(image_id)
        gt_boxes = torch.from_numpy(gt_boxes[~difficult])
        overlaps = box_iou(gt_boxes, torch.from_numpy(boxes))  # [G, N], columns in rank order
        for cap in caps:
            kept = overlaps[:, :cap]
            kept_per_cap[cap] += kept.shape[1]
            best = kept.max(dim=1).values if kept.shape[1] else torch.zeros(len(gt_boxes))
            best_iou_per_cap[cap].append(best)
    curve = []
    for cap in caps:
        best = torch.cat(best_iou_per_cap[cap]) if best_iou_per_cap[cap] else torch.zeros(0)
        row = {"cap": cap, "mean_kept": kept_per_cap[cap] / max(len(proposals), 1), "gt_boxes": len(best),
               "mean_best_iou": float(best.mean()) if len(best) else 0.0}
        row.update({f"recall@{iou}": float((best >= iou).float().mean()) if len(best) else 0.0
                    for iou in RECALL_IOUS})
        curve.append(row)
    return curve


def write_report(report_dir: Path, params, metrics: dict) -> None:
    """recall.md (table, failures, skipped items), recall.json and recall.png."""
    curve = metrics["recall_curve"]
    rows = [[row["cap"], f"{row['mean_kept']:.1f}", row["recall@0.5"], row["recall@0.7"], row["mean_best_iou"]]
            for row in curve]
    lines = [f"# Proposal recall ({proposal_title(params)}, {metrics['images']} images, {curve[-1]['gt_boxes']} "
             f"non-difficult ground-truth boxes)\n",
             markdown_table(["max proposals", "mean kept", "recall@0.5", "recall@0.7", "mean best IoU"], rows)]
    if metrics["images_searched_smaller"]:
        lines.append(f"{metrics['images_searched_smaller']} images are larger than {params['search_side']} px and were "
                     f"searched at that size (proposals.search_side); their boxes are in their own pixels.\n")
    for title, items in (("Images on which OpenCV failed", metrics["failed"]),
                         ("Items skipped for bad input", metrics["skipped"])):
        if items:
            lines += [f"\n## {title}\n"] + [f"- {name}: {problem}" for name, problem in sorted(items.items())]
    (report_dir / "recall.md").write_text("\n".join(lines) + "\n")
    (report_dir / "recall.json").write_text(json.dumps({"params": thaw(params), "curve": curve}, indent=2))
    figure = new_figure()
    axes = figure.add_subplot()
    for iou in RECALL_IOUS:
        axes.plot([row["mean_kept"] for row in curve], [row[f"recall@{iou}"] for row in curve], marker="o",
                  label=f"IoU >= {iou}")
    axes.set(xscale="log", xlabel="proposals per image (mean kept)", ylabel="recall", ylim=(0, 1.02),
             title=f"Proposal recall: {proposal_title(params)}")
    axes.grid(True, alpha=0.3)
    axes.legend()
    save_figure(figure, report_dir / "recall.png")

