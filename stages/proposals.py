"""Selective-search region proposals (R-CNN §2.1), one HDF5 file per image shard.

Modes:
  rcnn-fast       R-CNN's "fast" selective search: HSV and Lab images, graph segmentations with
                  k = 50 and 100 (min size = k, sigma 0.8), strategies colour+texture+size+fill and
                  texture+size+fill (Uijlings et al. 2013, Table 5), built from ximgproc's lower-level
                  calls. OpenCV's own fast preset differs: it runs k = 150, 300, 450.
  opencv-fast     ximgproc's switchToSelectiveSearchFast(), as OpenCV ships it.
  opencv-quality  ximgproc's switchToSelectiveSearchQuality(), as OpenCV ships it.

Determinism: OpenCV ranks regions with an unseeded libc rand(), so its output order changes from run
to run and thread to thread, while the *set* of boxes does not. We therefore keep the set and rank it
ourselves: first by how many segmentations produced the box (boxes that several colour spaces and
scales agree on are likelier objects), then by a hash of the box's coordinates, a fixed stand-in for
selective search's random diversification. The OpenCV version is part of the cache key.

Shard file layout: one dataset per image, named by its image id, float32[N, 4] boxes (x1, y1, x2, y2,
pipeline convention) in rank order, with attrs image_id, width, height and, when OpenCV failed on
the image, error (and then no boxes).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import cv2
import h5py
import numpy as np

from pipeline.boxes import clip_boxes, drop_small_and_duplicates
from pipeline.cache import StageCache
from pipeline.errors import ConfigError
from pipeline.reports import markdown_table, new_figure, save_figure
from pipeline.stage import RunContext, Shard, ShardOutput, Stage, image_shards

MODES = ("rcnn-fast", "opencv-fast", "opencv-quality")
RCNN_FAST_COLOUR_SPACES = (cv2.COLOR_RGB2HSV, cv2.COLOR_RGB2Lab)
RCNN_FAST_KS = (50, 100)
RCNN_FAST_SIGMA = 0.8
RECALL_IOUS = (0.5, 0.7)


class Proposals(Stage):
    """Selective-search region proposals per image, with a recall report against the ground truth."""

    name = "proposals"
    version = "1"
    headline_metrics = ("recall@0.5", "recall@0.7", "proposals_per_image", "failed_images")

    def params(self, config: dict) -> dict:
        params = dict(config["proposals"])
        if params["mode"] not in MODES:
            raise ConfigError(f"proposals.mode {params['mode']!r}: expected one of {', '.join(MODES)}")
        for key in ("max_proposals", "images_per_shard"):
            if not _positive_int(params[key]):
                raise ConfigError(f"proposals.{key} must be a positive whole number, not {params[key]!r}")
        if not isinstance(params["recall_at"], list) or not all(map(_positive_int, params["recall_at"])):
            raise ConfigError(f"proposals.recall_at must be a list of positive whole numbers, "
                              f"not {params['recall_at']!r}")
        return params

    def key_extras(self, ctx: RunContext) -> dict:
        return {"opencv": cv2.__version__}

    def shards(self, ctx: RunContext) -> list[Shard]:
        return image_shards(ctx.image_ids(), self.params(ctx.config)["images_per_shard"])

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params = self.params(ctx.config)
        cv2.setNumThreads(1)  # parallelism comes from the shards; OpenCV's own threads would oversubscribe
        failed, boxes_written, skipped = {}, 0, {}
        with h5py.File(out.path, "w") as shard_file:
            for image_id in shard.items:
                rgb = ctx.dataset.read_image(image_id)
                if rgb is None:  # bad image and on_bad_input=skip: the data set noted why, under its path
                    image_path = str(ctx.dataset.image_path(image_id))
                    skipped[image_path] = ctx.dataset.skipped[image_path]
                    continue
                try:
                    boxes = propose(rgb, params["mode"], params["search_side"], params["min_size"],
                                    params["max_proposals"])
                except cv2.error as exc:  # ximgproc asserts on some inputs; report the image, go on
                    failed[image_id] = str(exc).strip().splitlines()[-1]
                    boxes = np.zeros((0, 4), np.float32)
                dataset = shard_file.create_dataset(image_id, data=boxes)
                dataset.attrs.update(image_id=image_id, height=rgb.shape[0], width=rgb.shape[1])
                if image_id in failed:
                    dataset.attrs["error"] = failed[image_id]
                boxes_written += len(boxes)
        return {"images": len(shard.items) - len(skipped), "boxes": boxes_written, "failed": failed,
                "skipped": skipped}

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        params = self.params(ctx.config)
        proposals = read_proposals(cache)
        curve = recall_curve(ctx, proposals, params["recall_at"] + [params["max_proposals"]])
        failed = {image: error for record in records.values() for image, error in record["metrics"]["failed"].items()}
        skipped = {**ctx.dataset.skipped,
                   **{path: problem for record in records.values()
                      for path, problem in record["metrics"]["skipped"].items()}}
        images = sum(record["metrics"]["images"] for record in records.values())
        metrics = {
            "images": images,
            "proposals_per_image": sum(len(boxes) for boxes in proposals.values()) / max(images, 1),
            "seconds_per_image": sum(record["seconds"] for record in records.values()) / max(images, 1),
            "recall@0.5": curve[-1]["recall@0.5"], "recall@0.7": curve[-1]["recall@0.7"],
            "gt_boxes": curve[-1]["gt_boxes"], "recall_curve": curve,
            "failed_images": len(failed), "failed": failed, "skipped": skipped,
        }
        write_report(cache.report_dir, params, metrics)
        return metrics


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def propose(rgb: np.ndarray, mode: str, search_side: int, min_size: float, max_proposals: int) -> np.ndarray:
    """Ranked proposals float32[N, 4] (x1, y1, x2, y2) in the image's own pixels, N <= max_proposals.

    The image is resized so that its longer side is `search_side` (0 keeps it as it is); boxes are
    scaled back, rounded to whole pixels, clipped, and those narrower or shorter than `min_size`
    pixels, degenerate boxes and duplicates are dropped.
    """
    height, width = rgb.shape[:2]
    scale = search_side / max(height, width) if search_side else 1.0
    if scale != 1.0:
        rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    rects = rank_rects(selective_search(rgb, mode))
    boxes = np.array([(x, y, x + w, y + h) for x, y, w, h in rects], np.float32).reshape(-1, 4) / scale
    boxes = clip_boxes(np.round(boxes), width, height)
    return drop_small_and_duplicates(boxes, min_size)[:max_proposals]


def selective_search(rgb: np.ndarray, mode: str) -> Counter:
    """Selective-search rectangles (x, y, w, h) -> how many segmentations produced each."""
    segmentation = cv2.ximgproc.segmentation
    votes = Counter()
    if mode == "rcnn-fast":
        for colour_space in RCNN_FAST_COLOUR_SPACES:
            for k in RCNN_FAST_KS:
                search = segmentation.createSelectiveSearchSegmentation()
                search.addImage(cv2.cvtColor(rgb, colour_space))
                search.addGraphSegmentation(segmentation.createGraphSegmentation(RCNN_FAST_SIGMA, float(k), k))
                search.addStrategy(_strategy(colour=True))
                search.addStrategy(_strategy(colour=False))
                votes.update({tuple(int(v) for v in rect) for rect in search.process()})
        return votes
    search = segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if mode == "opencv-fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    votes.update({tuple(int(v) for v in rect) for rect in search.process()})
    return votes


def _strategy(colour: bool):
    """Selective search's merge similarity: (colour +) texture + size + fill."""
    segmentation = cv2.ximgproc.segmentation
    parts = [segmentation.createSelectiveSearchSegmentationStrategyTexture(),
             segmentation.createSelectiveSearchSegmentationStrategySize(),
             segmentation.createSelectiveSearchSegmentationStrategyFill()]
    if colour:
        parts.insert(0, segmentation.createSelectiveSearchSegmentationStrategyColor())
    return segmentation.createSelectiveSearchSegmentationStrategyMultiple(*parts)


def rank_rects(votes: Counter) -> list[tuple[int, int, int, int]]:
    """Most votes first; ties broken by a hash of the coordinates (stable across runs and machines)."""
    def key(rect):
        return -votes[rect], hashlib.blake2b(np.asarray(rect, np.int32).tobytes(), digest_size=8).digest()
    return sorted(votes, key=key)


def read_proposals(cache: StageCache, image_ids=None) -> dict[str, np.ndarray]:
    """image id -> boxes float32[N, 4] from a proposals output, for every image or only `image_ids`."""
    wanted = None if image_ids is None else set(image_ids)
    proposals = {}
    for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}")):
        with h5py.File(path, "r") as shard_file:
            proposals.update({image_id: dataset[()] for image_id, dataset in shard_file.items()
                              if wanted is None or image_id in wanted})
    return proposals


def recall_curve(ctx: RunContext, proposals: dict[str, np.ndarray], caps: list[int]) -> list[dict]:
    """Recall of the non-difficult ground truth at IoU 0.5 and 0.7 when keeping the top `cap` boxes."""
    import torch
    from torchvision.ops import box_iou

    best_iou_per_cap = {cap: [] for cap in caps}
    kept_per_cap = {cap: 0 for cap in caps}
    for image_id, boxes in proposals.items():
        gt_boxes, _, difficult = ctx.dataset.ground_truth(image_id)
        gt_boxes = torch.from_numpy(gt_boxes[~difficult])
        overlaps = box_iou(gt_boxes, torch.from_numpy(boxes))  # [G, N], columns in rank order
        for cap in caps:
            kept = overlaps[:, :cap]
            kept_per_cap[cap] += kept.shape[1]
            best = kept.max(dim=1).values if kept.shape[1] else torch.zeros(len(gt_boxes))
            best_iou_per_cap[cap].append(best)
    curve = []
    for cap in sorted(set(caps)):
        best = torch.cat(best_iou_per_cap[cap]) if best_iou_per_cap[cap] else torch.zeros(0)
        row = {"cap": cap, "mean_kept": kept_per_cap[cap] / max(len(proposals), 1), "gt_boxes": len(best),
               "mean_best_iou": float(best.mean()) if len(best) else 0.0}
        row.update({f"recall@{iou}": float((best >= iou).float().mean()) if len(best) else 0.0
                    for iou in RECALL_IOUS})
        curve.append(row)
    return curve


def write_report(report_dir: Path, params: dict, metrics: dict) -> None:
    """recall.md (table, failures, skipped items), recall.json and recall.png."""
    curve = metrics["recall_curve"]
    rows = [[row["cap"], f"{row['mean_kept']:.1f}", row["recall@0.5"], row["recall@0.7"], row["mean_best_iou"]]
            for row in curve]
    lines = [f"# Proposal recall ({params['mode']}, {metrics['images']} images, {curve[-1]['gt_boxes']} "
             f"non-difficult ground-truth boxes)\n",
             markdown_table(["max proposals", "mean kept", "recall@0.5", "recall@0.7", "mean best IoU"], rows)]
    for title, items in (("Images on which OpenCV failed", metrics["failed"]),
                         ("Items skipped for bad input", metrics["skipped"])):
        if items:
            lines += [f"\n## {title}\n"] + [f"- {name}: {problem}" for name, problem in sorted(items.items())]
    (report_dir / "recall.md").write_text("\n".join(lines) + "\n")
    (report_dir / "recall.json").write_text(json.dumps({"params": params, "curve": curve}, indent=2))
    figure = new_figure()
    axes = figure.add_subplot()
    for iou in RECALL_IOUS:
        axes.plot([row["mean_kept"] for row in curve], [row[f"recall@{iou}"] for row in curve], marker="o",
                  label=f"IoU >= {iou}")
    axes.set(xscale="log", xlabel="proposals per image (mean kept)", ylabel="recall", ylim=(0, 1.02),
             title=f"Selective search ({params['mode']}) recall")
    axes.grid(True, alpha=0.3)
    axes.legend()
    save_figure(figure, report_dir / "recall.png")
