"""The detection baseline before R-CNN: a classifier applied to windows at every position and scale.

    sliding-window-detect   for each test image, square-ish windows of each side in `sizes` and each
                            aspect ratio (height / width) in `aspect_ratios`, placed on a grid whose step
                            is `step` x the window's side; each window is warped and classified by R-CNN's
                            fine-tuned (N + 1)-way network (the finetune stage: the same classifier, other
                            windows); windows whose best label is a class (not background) are kept with
                            that class's probability as their score, then per-class NMS. Written in
                            detect's layout, so the shared evaluation scores them.
    sliding-window          the shared VOC evaluation (stages.evaluate) of those detections: `rcnn
                            sliding-window` runs both and prints the mAP.

With no proposals the network sees every window: many more crops than R-CNN's few hundred proposals,
and boxes no better than the grid. Its test time and mAP are the first row of `rcnn timing-table`.
"""
from __future__ import annotations

import h5py
import numpy as np

from pipeline.cache import StageCache
from pipeline.stage import RunContext, Shard, ShardOutput, Stage, image_shards

SLIDING_WINDOW_VARIANTS = {"sliding_window": "sliding window: R-CNN's fine-tuned classifier on a grid of windows"}


class SlidingWindowDetect(Stage):
    """Classify windows at every position and scale with the fine-tuned CNN; keep object windows; NMS."""

    name = "sliding-window-detect"
    version = "1"
    inputs = ("finetune",)
    headline_metrics = ("images", "windows_per_image", "detections_per_image")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {**config["sliding_window"], "test_split": config["data"]["test_split"]}

    def shards(self, ctx: RunContext) -> list[Shard]:
        return image_shards(ctx.dataset.image_ids(ctx.config["data"]["test_split"]),
                            ctx.config["sliding_window"]["images_per_shard"])

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        from stages.finetune import load_finetuned
        net, backbone = load_finetuned(inputs["finetune"], ctx.device)
        params = ctx.config["sliding_window"]
        detections = windows = 0
        with h5py.File(out.path, "w") as shard_file:
            for image_id in shard.items:
                rgb = ctx.dataset.read_image(image_id)
                if rgb is None:  # skipped for bad input
                    continue
                boxes = grid_windows(rgb.shape[1], rgb.shape[0], params["sizes"], params["aspect_ratios"],
                                     params["step"])
                rows = detect_windows(net, backbone, rgb, boxes, params, ctx.device)
                shard_file[f"sliding_window/{image_id}"] = rows
                detections, windows = detections + len(rows), windows + len(boxes)
        return {"images": len(shard.items), "detections": detections, "windows": windows}

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        from stages.detect import summarise_detections
        summary = summarise_detections(ctx, cache, records, SLIDING_WINDOW_VARIANTS)
        windows = sum(record["metrics"]["windows"] for record in records.values())
        return {**summary, "windows_per_image": windows / max(summary["images"], 1)}


def grid_windows(width: int, height: int, sizes: list[int], aspect_ratios: list[float], step: float) -> np.ndarray:
    """float32[W, 4] boxes (x1, y1, x2, y2): for each size and aspect ratio (height / width), a window of
    area size^2 at every grid position inside the image, `step` x its side apart, the grid centred."""
    windows = []
    for size in sizes:
        for ratio in aspect_ratios:
            box_width, box_height = size / np.sqrt(ratio), size * np.sqrt(ratio)
            if box_width > width or box_height > height:
                continue
            xs = _positions(width, box_width, step * box_width)
            ys = _positions(height, box_height, step * box_height)
            x1, y1 = (axis.ravel() for axis in np.meshgrid(xs, ys))
            windows.append(np.stack([x1, y1, x1 + box_width, y1 + box_height], axis=1))
    return np.concatenate(windows).astype(np.float32) if windows else np.zeros((0, 4), np.float32)


def _positions(extent: float, side: float, step: float) -> np.ndarray:
    """Left (or top) edges of windows of `side` every `step` pixels inside `extent`, the run centred."""
    count = int((extent - side) // step) + 1
    return (extent - side - (count - 1) * step) / 2 + step * np.arange(count)


def detect_windows(net, backbone: dict, rgb: np.ndarray, boxes: np.ndarray, params: dict, device: str) -> np.ndarray:
    """Detections float32[D, 6] (x1, y1, x2, y2, score, class) of one image from its windows."""
    import torch

    from stages.detect import per_class_nms
    from stages.features import pool5_features
    if not len(boxes):
        return np.zeros((0, 6), np.float32)
    pool5 = pool5_features(net, rgb, boxes, backbone, params["batch_size"], device, amp=False)
    with torch.no_grad():
        probabilities = torch.softmax(net.head(net.fc(torch.from_numpy(pool5).to(device))), dim=1).cpu().numpy()
    objects = probabilities.argmax(1) > 0  # the best label is a class, not background
    scores = np.where(probabilities[:, 1:] == probabilities[:, 1:].max(1, keepdims=True), probabilities[:, 1:], 0)
    scores = scores[objects]
    class_boxes = np.broadcast_to(boxes[objects, None, :], (int(objects.sum()), scores.shape[1], 4))
    rows = per_class_nms(class_boxes, scores, params["nms_iou"], params["max_per_image"])
    return rows[rows[:, 4] > 0]
