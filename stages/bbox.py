"""Per-class bounding-box regressors (R-CNN §3.4 and Appendix C).

For each class, a ridge regressor (scikit-learn Ridge, alpha = bbox.lambda; R-CNN: 1000) from the
cached pool5 features (scaled to a mean L2 norm of feature_norm) of the training regions whose best
IoU with a ground-truth box is > min_iou (0.6) to the (dx, dy, dw, dh) that move the region onto that
box: the paper's parameterisation, which is torchvision's BoxCoder with weights (1, 1, 1, 1) in the
pipeline's box convention. Targets are standardised per coordinate before the fit (R-CNN whitens them)
so that lambda weighs the four outputs alike. Classes are fitted in Dask tasks of classes_per_task.
A class's examples are held in memory: (examples of the class) x pool5 dim x 4 bytes.
Output per task: `<task>.npz` with class_indices, coef[k, 4, D], intercept[k, 4], target_mean[k, 4],
target_std[k, 4] and scale.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from sklearn.linear_model import Ridge
from torchvision.ops import box_iou

from pipeline.classifiers import box_coder, class_groups
from pipeline.engine.cache import StageCache, write_bytes
from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import PrefixedStage, Shard, ShardOutput, StageContext
from pipeline.features import FeatureReader, mean_norm_scale, training_image_ids


class BBox(PrefixedStage):
    """Per-class ridge regressors from pool5 features to box corrections."""

    base_name = "bbox"
    version = "1"
    base_inputs = ("features",)
    shard_suffix = ".npz"
    headline_metrics = ("classes", "examples", "mean_abs_residual")

    def params(self, config: dict) -> dict:
        return config["bbox"]

    def shards(self, ctx: StageContext) -> list[Shard]:
        return class_groups(len(ctx.classes), ctx.params["classes_per_task"])

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params = ctx.params
        reader = FeatureReader(self.upstream(inputs, "features"))
        image_ids = training_image_ids(ctx.dataset, ctx.train_split, reader)
        scale = mean_norm_scale(reader, image_ids[:params["norm_images"]], lambda pool5: pool5.astype(np.float32),
                                params["feature_norm"])
        examples = regression_examples(reader, image_ids, set(shard.items), params["min_iou"])
        fitted, stats = {name: [] for name in ("coef", "intercept", "target_mean", "target_std")}, {}
        for class_index in shard.items:
            features, targets = examples[class_index]
            if not len(features):
                raise ConfigError(f"bbox: class {ctx.classes[class_index]!r} has no training region with "
                                  f"IoU > {params['min_iou']}")
            features = np.concatenate(features) * scale
            targets = np.concatenate(targets)
            mean, std = targets.mean(axis=0), targets.std(axis=0) + 1e-6
            ridge = Ridge(alpha=params["lambda"]).fit(features, (targets - mean) / std)
            residual = ridge.predict(features) * std + mean - targets
            for name, value in (("coef", ridge.coef_), ("intercept", ridge.intercept_),
                                ("target_mean", mean), ("target_std", std)):
                fitted[name].append(value.astype(np.float32))
            stats[ctx.classes[class_index]] = {"examples": len(targets),
                                                       "mean_abs_residual": float(np.abs(residual).mean()),
                                                       "mean_abs_target": float(np.abs(targets).mean())}
        buffer = io.BytesIO()
        np.savez(buffer, class_indices=np.array(shard.items), scale=scale,
                 **{name: np.stack(values) for name, values in fitted.items()})
        write_bytes(out.path, buffer.getvalue())
        return stats

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        per_class = {name: stats for record in records.values() for name, stats in record["metrics"].items()}
        examples = sum(stats["examples"] for stats in per_class.values())
        return {"classes": len(per_class), "examples": examples, "per_class": per_class,
                "mean_abs_residual": sum(s["mean_abs_residual"] * s["examples"] for s in per_class.values()) / examples}


def regression_examples(reader: FeatureReader, image_ids: list[str], classes: set[int], min_iou: float) -> dict:
    """class -> (pool5 parts, target parts): regions whose best ground-truth IoU is > min_iou."""
    coder = box_coder()
    examples = {class_index: ([], []) for class_index in classes}
    for image_id in image_ids:
        image = reader.read(image_id)
        gt_rows = np.flatnonzero((image.gt_label >= 0) & ~image.gt_difficult)
        if not len(gt_rows):
            continue
        boxes = torch.from_numpy(image.boxes)
        best_iou, best = box_iou(boxes, boxes[gt_rows]).max(dim=1)
        assigned_class = image.gt_label[gt_rows][best.numpy()]
        for class_index in classes:
            rows = np.flatnonzero((best_iou.numpy() > min_iou) & (assigned_class == class_index))
            if len(rows):
                targets = coder.encode_single(boxes[gt_rows][best[rows]], boxes[rows])
                examples[class_index][0].append(image.features[rows].astype(np.float32))
                examples[class_index][1].append(targets.numpy())
    return examples
