"""Detection on the test split (R-CNN §2.2): score, refine, per-class NMS, keep the top detections.

For each test image, every proposal is scored by each class's SVM; its box is refined by that class's
regressor; greedy NMS per class (torchvision.ops.batched_nms, IoU nms_iou; R-CNN: 0.3) removes
overlapping detections; the max_per_image highest-scoring remain. Four variants are written so that
the evaluation can show the paper's ablations side by side:
    svm_bbox (the R-CNN result), svm (no box regression), softmax_bbox and softmax (the fine-tuned
    network's own (N + 1)-way softmax instead of the SVMs).
Shard file: a dataset per variant and image, `<variant>/<image id>`: float32[D, 6] rows of
(x1, y1, x2, y2, score, class index). The report holds the devkit's results files for svm_bbox,
`results/comp4_det_<split>_<class>.txt`: image id, score, then xmin ymin xmax ymax (1-based).
"""
from __future__ import annotations

import h5py
import numpy as np

from pipeline.boxes import box_to_voc
from pipeline.cache import StageCache
from pipeline.stage import MethodStage, RunContext, Shard, ShardOutput, image_shards
from stages.features import FeatureReader, layer_features

VARIANTS = ("svm_bbox", "svm", "softmax_bbox", "softmax")
PRIMARY = "svm_bbox"


class Detect(MethodStage):
    """Score test proposals with the SVMs, regress boxes, per-class NMS."""

    base_name = "detect"
    version = "1"
    base_inputs = ("features", "finetune", "svm", "bbox")
    headline_metrics = ("images", "detections_per_image")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {**config["detect"], "test_split": config["data"]["test_split"]}

    def shards(self, ctx: RunContext) -> list[Shard]:
        return image_shards(ctx.dataset.image_ids(ctx.config["data"]["test_split"]),
                            ctx.config["detect"]["images_per_shard"])

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        from stages.bbox import load_regressors
        from stages.finetune import load_finetuned
        from stages.svm import load_svms

        params, num_classes = ctx.config["detect"], len(ctx.dataset.classes)
        net, _ = load_finetuned(self.upstream(inputs, "finetune"), ctx.device)
        svms = load_svms(self.upstream(inputs, "svm"), num_classes)
        regressors = load_regressors(self.upstream(inputs, "bbox"), num_classes)
        reader = FeatureReader(self.upstream(inputs, "features"))
        detections = 0
        with h5py.File(out.path, "w") as shard_file:
            for image_id in shard.items:
                if image_id not in reader:  # skipped for bad input
                    continue
                annotation = ctx.dataset.annotation(image_id)
                for variant, rows in detect_image(net, svms, regressors, reader.read(image_id), annotation.width,
                                                  annotation.height, params, ctx.device).items():
                    shard_file[f"{variant}/{image_id}"] = rows
                    detections += len(rows) if variant == PRIMARY else 0
        return {"images": len(shard.items), "detections": detections}

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        return summarise_detections(ctx, cache, records, VARIANTS)


def summarise_detections(ctx: RunContext, cache: StageCache, records: dict, variants) -> dict:
    """A detection stage's metrics (shard records hold images and the first variant's detections);
    writes the devkit's results files of the first variant, the method's result."""
    images = sum(record["metrics"]["images"] for record in records.values())
    write_devkit_results(cache, ctx.dataset.classes, ctx.config["data"]["test_split"], next(iter(variants)))
    return {"images": images, "variants": list(variants),
            "detections_per_image": sum(r["metrics"]["detections"] for r in records.values()) / max(images, 1)}


def detect_image(net, svms: dict, regressors: dict, image, width: int, height: int, params: dict,
                 device: str, variants: tuple[str, ...] = VARIANTS) -> dict[str, np.ndarray]:
    """Detections float32[D, 6] (x1, y1, x2, y2, score, class) of one image, per variant asked for."""
    import torch

    from pipeline.boxes import clip_boxes
    from stages.bbox import apply_regressors

    rows = image.proposal_rows
    boxes, pool5 = image.boxes[rows], image.pool5[rows]
    svm_features = layer_features(net, pool5, svms["layer"], device)
    scores = {"svm": svm_features * svms["scale"] @ svms["weights"].T + svms["biases"]}
    if any(variant.startswith("softmax") for variant in variants):
        fc7 = svm_features if svms["layer"] == "fc7" else layer_features(net, pool5, "fc7", device)
        with torch.no_grad():
            scores["softmax"] = torch.softmax(net.head(torch.from_numpy(fc7).to(device)), dim=1)[:, 1:].cpu().numpy()
    refined = apply_regressors(regressors, pool5, boxes)
    refined = clip_boxes(refined.reshape(-1, 4), width, height).reshape(refined.shape)
    plain = np.broadcast_to(boxes[:, None, :], refined.shape)
    return {variant: per_class_nms(refined if variant.endswith("_bbox") else plain, scores[variant.split("_")[0]],
                                   params["nms_iou"], params["max_per_image"])
            for variant in variants}


def per_class_nms(class_boxes: np.ndarray, scores: np.ndarray, nms_iou: float, max_detections: int) -> np.ndarray:
    """NMS within each class over class_boxes[R, N, 4] and scores[R, N]; the best max_detections overall."""
    import torch
    from torchvision.ops import batched_nms

    num_regions, num_classes = scores.shape
    flat_boxes = torch.from_numpy(np.array(class_boxes, dtype=np.float32).reshape(-1, 4))
    flat_scores = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32).reshape(-1))
    classes = torch.arange(num_classes).repeat(num_regions)
    keep = batched_nms(flat_boxes, flat_scores, classes, nms_iou)[:max_detections]  # sorted by score
    return torch.cat([flat_boxes[keep], flat_scores[keep, None], classes[keep, None].float()], dim=1).numpy()


def read_detections(cache: StageCache, variant: str) -> dict[str, np.ndarray]:
    """image id -> detections float32[D, 6] of one variant, from every shard of a detect output."""
    detections = {}
    for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}")):
        with h5py.File(path, "r") as shard_file:
            if variant in shard_file:
                detections.update({image_id: dataset[()] for image_id, dataset in shard_file[variant].items()})
    return detections


def write_devkit_results(cache: StageCache, classes: list[str], split: str, variant: str) -> None:
    """PASCAL devkit results files (comp4: trained on any data) for one variant's detections."""
    results = cache.report_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    lines = {class_index: [] for class_index in range(len(classes))}
    for image_id, rows in sorted(read_detections(cache, variant).items()):
        for x1, y1, x2, y2, score, class_index in rows:
            xmin, ymin, xmax, ymax = box_to_voc((x1, y1, x2, y2))
            lines[int(class_index)].append(f"{image_id} {score:.6f} {xmin:.1f} {ymin:.1f} {xmax:.1f} {ymax:.1f}\n")
    for class_index, name in enumerate(classes):
        (results / f"comp4_det_{split}_{name}.txt").write_text("".join(lines[class_index]))
