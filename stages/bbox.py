"""Per-class bounding-box regressors (R-CNN §3.4 and Appendix C).

For each class, a ridge regressor (alpha = bbox.lambda; R-CNN: 1000) from the
cached pool5 features (scaled to a mean L2 norm of feature_norm) of the training regions whose best
IoU with a ground-truth box is > min_iou (0.6) to the (dx, dy, dw, dh) that move the region onto that
box: the paper's parameterisation, which is torchvision's BoxCoder with weights (1, 1, 1, 1) in the
pipeline's box convention. Targets are standardised per coordinate before the fit (R-CNN whitens them)
so that lambda weighs the four outputs alike. Classes are fitted in Dask tasks of classes_per_task.
A class's examples are not held: RidgeSums streams them into the sums the fit is solved from (its
centred Gram matrix), so a task's memory is classes_per_task x pool5 dim^2 x 8 bytes whatever the number
of images (MobileNetV2's 4 704 dims: 177 MB a class), where the examples grew with the data set (BCCD:
~1 GB of RBC regions, held three times over by the fit).
Output per task: `<task>.npz` with class_indices, coef[k, 4, D], intercept[k, 4], target_mean[k, 4],
target_std[k, 4] and scale.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from torchvision.ops import box_iou

from pipeline.classifiers import box_coder, class_groups
from pipeline.engine.cache import StageCache, write_bytes
from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import PrefixedStage, Shard, ShardOutput, StageContext
from pipeline.features import FeatureReader, mean_norm_scale, training_image_ids


class BBox(PrefixedStage):
    """Per-class ridge regressors from pool5 features to box corrections."""

    base_name = "bbox"
    version = "2"  # 2: solved from streamed sums (RidgeSums) in float64, not scikit-learn's Ridge on held examples
    base_inputs = ("features",)
    shard_suffix = ".npz"
    headline_metrics = ("classes", "examples", "rms_residual")

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
        sums = regression_sums(reader, image_ids, shard.items, params["min_iou"], scale)
        fitted, stats = {name: [] for name in ("coef", "intercept", "target_mean", "target_std")}, {}
        for class_index in shard.items:
            if not sums[class_index].count:
                raise ConfigError(f"bbox: class {ctx.classes[class_index]!r} has no training region with "
                                  f"IoU > {params['min_iou']}")
            fit = sums[class_index].solve(params["lambda"])
            for name in fitted:
                fitted[name].append(fit[name].astype(np.float32))
            stats[ctx.classes[class_index]] = {"examples": sums[class_index].count,
                                               "rms_residual": fit["rms_residual"], "rms_target": fit["rms_target"]}
        buffer = io.BytesIO()
        np.savez(buffer, class_indices=np.array(shard.items), scale=scale,
                 **{name: np.stack(values) for name, values in fitted.items()})
        write_bytes(out.path, buffer.getvalue())
        return stats

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        per_class = {name: stats for record in records.values() for name, stats in record["metrics"].items()}
        examples = sum(stats["examples"] for stats in per_class.values())
        return {"classes": len(per_class), "examples": examples, "per_class": per_class,
                "rms_residual": float(np.sqrt(sum(s["rms_residual"] ** 2 * s["examples"] for s in per_class.values())
                                              / examples))}


class RidgeSums:
    """A class's regression examples, kept as the sums that ridge regression is solved from.

    Examples arrive in batches and wait in a buffer of at most BUFFER_ROWS rows, which is then folded into
    float64 sums: count, sum of features and of targets, X'X, X'T and T'T (D = feature dim, 4 targets).
    `solve` gives what scikit-learn's Ridge(alpha) fits on the examples themselves (intercept fitted, the
    targets standardised first): centring is done on the sums, X'X - n mean mean'.
    """

    BUFFER_ROWS = 2048

    def __init__(self, dim: int):
        self.count = 0
        self.feature_sum, self.target_sum = np.zeros(dim), np.zeros(4)
        self.gram, self.cross, self.target_gram = np.zeros((dim, dim)), np.zeros((dim, 4)), np.zeros((4, 4))
        self.waiting: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        self.count += len(features)
        self.waiting.append((features, targets))
        if sum(len(part) for part, _ in self.waiting) >= self.BUFFER_ROWS:
            self.fold()

    def fold(self) -> None:
        if not self.waiting:
            return
        features = np.concatenate([part for part, _ in self.waiting]).astype(np.float64)
        targets = np.concatenate([part for _, part in self.waiting]).astype(np.float64)
        self.waiting = []
        self.feature_sum += features.sum(axis=0)
        self.target_sum += targets.sum(axis=0)
        self.gram += features.T @ features
        self.cross += features.T @ targets
        self.target_gram += targets.T @ targets

    def solve(self, alpha: float) -> dict:
        """coef[4, D], intercept[4], target_mean[4], target_std[4] (the fit is on (target - mean) / std) and
        the RMS residual and target in box-delta units."""
        self.fold()
        n = self.count
        feature_mean, target_mean = self.feature_sum / n, self.target_sum / n
        centred_gram = self.gram - n * np.outer(feature_mean, feature_mean)
        centred_cross = self.cross - n * np.outer(feature_mean, target_mean)
        centred_targets = self.target_gram - n * np.outer(target_mean, target_mean)
        target_std = np.sqrt(np.maximum(np.diag(centred_targets) / n, 0)) + 1e-6
        centred_gram[np.diag_indices_from(centred_gram)] += alpha
        right = centred_cross / target_std  # X'Z for the standardised targets Z
        coef = np.linalg.solve(centred_gram, right).T  # [4, D]
        # residual sum of squares per target, from the sums: Z'Z - 2 w'X'Z + w'X'Xw, where
        # w'X'Xw = w'(X'X + alpha I)w - alpha w'w = w'X'Z - alpha w'w (w solves the regularised system)
        explained = np.einsum("jd,dj->j", coef, right)
        squares = np.diag(centred_targets) / target_std ** 2 - explained - alpha * (coef ** 2).sum(axis=1)
        residual = np.maximum(squares, 0) * target_std ** 2
        return {"coef": coef, "intercept": -coef @ feature_mean, "target_mean": target_mean, "target_std": target_std,
                "rms_residual": float(np.sqrt(residual.sum() / (4 * n))),
                "rms_target": float(np.sqrt(np.trace(self.target_gram) / (4 * n)))}


def regression_sums(reader: FeatureReader, image_ids: list[str], classes, min_iou: float,
                    scale: float) -> dict[int, RidgeSums]:
    """class -> the RidgeSums of its regions whose best ground-truth IoU is > min_iou (features x scale)."""
    coder = box_coder()
    sums = {}
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
                if class_index not in sums:
                    sums[class_index] = RidgeSums(image.features.shape[1])
                sums[class_index].add(image.features[rows].astype(np.float32) * scale, targets.numpy())
    return {class_index: sums.get(class_index, RidgeSums(0)) for class_index in classes}
