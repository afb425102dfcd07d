"""Per-class linear SVMs with hard negative mining over the feature cache (R-CNN §2.3, Appendix B).

Features: `svm.layer` (pool5, fc6 or fc7; R-CNN: fc7) computed on the fly from the cached pool5
through the fine-tuned fc layers, scaled so that their mean L2 norm is `feature_norm` (20).
Positives: the non-difficult ground-truth boxes of the class. Negatives: proposals whose IoU with
every instance of the class is < negative_iou (0.3). Loss: L2-regularised L1 hinge (liblinear through
scikit-learn's LinearSVC, loss='hinge'), C, positive class weight and intercept scaling from the config.

Hard negative mining streams the training images in split order, one image's features at a time:
negatives scoring above hard_threshold (-1.0001) join the class's cache; the SVM is retrained after the
first image, whenever more than retrain_after (2000) negatives were added, and after the last image;
each retrain evicts cached negatives scoring below evict_threshold (-1.2) and, if the cache is still
larger than max_cached_negatives, keeps only the hardest. With n = positives + max_cached_negatives +
retrain_after + regions of one image, a task of k classes therefore holds at most

    k x n x D x 4 bytes (the float32 caches)  +  n x D x 24 bytes (one fit: scikit-learn's float64
    copy and liblinear's 16-byte feature nodes)

whatever the size of the feature cache (bench/svm_memory.py measures it). Classes are trained in parallel Dask tasks of
classes_per_task classes; each task reads the feature cache once for all of its classes.
Output per task: `<task>.npz` with class_indices, weights[k, D], biases[k] and layer, and the hardest
negatives of each class's final cache (at most HARDEST_KEPT per class, hardest first; what `rcnn explain`
shows): hardest_class[M] (class index), hardest_image[M] (image id), hardest_box[M, 4], hardest_score[M].
"""
from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.svm import LinearSVC
from torchvision.ops import box_iou

from pipeline.classifiers import class_groups
from pipeline.engine.cache import StageCache, write_bytes
from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import PrefixedStage, Shard, ShardOutput, StageContext
from pipeline.features import FeatureReader, feature_statistics, layer_features, training_image_ids
from pipeline.reports import markdown_table
from pipeline.weights import load_finetuned


class SVM(PrefixedStage):
    """Per-class linear SVMs on cached features, with hard negative mining."""

    base_name = "svm"
    version = "5"  # 5: the hardest negatives recorded
    base_inputs = ("features", "finetune")
    shard_suffix = ".npz"
    headline_metrics = ("classes", "mean_cached_negatives", "retrains")
    runs_on_device = True  # fc6/fc7 from the cached pool5

    def params(self, config: dict) -> dict:
        return config["svm"]

    def shards(self, ctx: StageContext) -> list[Shard]:
        return class_groups(len(ctx.classes), ctx.params["classes_per_task"])

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params = ctx.params
        net, _, _ = load_finetuned(self.upstream(inputs, "finetune"), ctx.device)
        reader = FeatureReader(self.upstream(inputs, "features"))
        image_ids = training_image_ids(ctx.dataset, ctx.train_split, reader)

        def features_of(pool5: np.ndarray) -> np.ndarray:
            return layer_features(net, pool5, params["layer"], ctx.device)

        treatments = {center: FeatureTreatment(*feature_statistics(reader, image_ids[:params["norm_images"]],
                                                                   features_of, params["feature_norm"], center),
                                               features_of)
                      for center in params["center"]}
        if len(treatments) > 1 and not params["check_every"]:
            raise ConfigError("svm.center lists several treatments: svm.check_every must hold training images back "
                              "to choose between them")
        held_back = image_ids[::params["check_every"]] if params["check_every"] else []
        held_back_set = set(held_back)
        fitted_on = [image_id for image_id in image_ids if image_id not in held_back_set]
        checks = {center: ranking_quality(reader, held_back, fit_svms(reader, fitted_on, shard.items, treatment,
                                                                      ctx.classes, params), treatment, params)
                  for center, treatment in treatments.items()} if held_back else {}
        # each class: the treatment whose fit ranks the held-back images best (a tie: the first listed)
        chosen = {class_index: max(params["center"], key=lambda center: checks[center].get(class_index, {})
                                   .get("held_back_auc", 0.0) if checks else 0.0) for class_index in shard.items}
        stats, weights, biases, hardest = {}, {}, {}, []
        for center, treatment in treatments.items():
            classes_of = tuple(c for c in shard.items if chosen[c] == center)
            for class_index, cache in fit_svms(reader, image_ids, classes_of, treatment, ctx.classes, params).items():
                hardest += hardest_negatives(cache, class_index, image_ids, reader)
                # the SVM scores the layer's features as they come: its weights and bias fold the treatment in
                weights[class_index] = cache.weights * treatment.scale
                biases[class_index] = cache.bias - float(treatment.scale * np.sum(treatment.mean * cache.weights))
                aucs = {f"held_back_auc_{'centred' if c else 'raw'}": checks[c][class_index]["held_back_auc"]
                        for c in checks if class_index in checks[c]}
                stats[ctx.classes[class_index]] = {**cache.summary(), "center": center, **aucs}
                if checks and class_index in checks[center]:
                    stats[ctx.classes[class_index]]["held_back_auc"] = checks[center][class_index]["held_back_auc"]
        buffer = io.BytesIO()
        class_of, image_of, box_of, score_of = zip(*hardest) if hardest else ((), (), np.zeros((0, 4)), ())
        np.savez(buffer, class_indices=np.array(shard.items), layer=params["layer"],
                 weights=np.stack([weights[c] for c in shard.items]), biases=np.array([biases[c] for c in shard.items]),
                 hardest_class=np.array(class_of, np.int64), hardest_image=np.array(image_of, str),
                 hardest_box=np.array(box_of, np.float32).reshape(-1, 4), hardest_score=np.array(score_of, np.float32))
        write_bytes(out.path, buffer.getvalue())
        return stats

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        per_class = {name: stats for record in records.values() for name, stats in record["metrics"].items()}
        rows = [[name, stats["positives"], stats["cached_negatives"], stats["hard_negatives_seen"], stats["retrains"],
                 stats["unconverged_fits"], stats.get("held_back_auc_raw", "-"),
                 stats.get("held_back_auc_centred", "-"), "centred" if stats["center"] else "raw"]
                for name, stats in per_class.items()]
        (cache.report_dir / "svm.md").write_text(
            f"# Linear SVMs ({ctx.params['layer']}, C = {ctx.params['C']})\n\n"
            + markdown_table(["class", "positives", "cached negatives at the end", "hard negatives added",
                              "retrains", "fits that hit svm.max_iter", "held-back ROC AUC, raw features",
                              "held-back ROC AUC, centred", "used"], rows)
            + CHECK_EXPLAINED.format(every=ctx.params["check_every"], iou=ctx.params["negative_iou"]))
        return {"classes": len(per_class), "per_class": per_class,
                "mean_cached_negatives": float(np.mean([s["cached_negatives"] for s in per_class.values()])),
                "retrains": int(sum(s["retrains"] for s in per_class.values()))}


@dataclass
class ClassSVM:
    """One class's SVM while it is trained: its positives, its cache of hard negatives (R-CNN's per-class
    cache), its weights and how mining went."""
    positives: np.ndarray
    negatives: list = field(default_factory=list)    # feature rows
    keys: list = field(default_factory=list)         # (image index, row) of each cached negative
    key_set: set = field(default_factory=set)
    added_since_retrain: int = 0
    hard_negatives_seen: int = 0
    retrains: int = 0
    unconverged_fits: int = 0
    weights: np.ndarray | None = None
    bias: float = 0.0

    def scores(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weights + self.bias if self.weights is not None else np.zeros(len(features))

    def summary(self) -> dict:
        return {"positives": len(self.positives), "cached_negatives": len(self.negatives),
                "hard_negatives_seen": self.hard_negatives_seen, "retrains": self.retrains,
                "unconverged_fits": self.unconverged_fits}


HARDEST_KEPT = 32


def hardest_negatives(cache: ClassSVM, class_index: int, image_ids: list[str],
                      reader: FeatureReader) -> list[tuple[int, str, np.ndarray, float]]:
    """(class, image id, box, score) of the class's highest-scoring cached negatives after the last retrain,
    hardest first: the mistakes the SVM was trained hardest on."""
    if not cache.negatives:
        return []
    scores = cache.scores(np.stack(cache.negatives))
    hardest, boxes_of = [], {}
    for row in np.argsort(-scores, kind="stable")[:HARDEST_KEPT]:
        image_index, region = cache.keys[row]
        image_id = image_ids[image_index]
        if image_id not in boxes_of:
            boxes_of[image_id] = reader.regions(image_id).boxes
        hardest.append((class_index, image_id, boxes_of[image_id][region], float(scores[row])))
    return hardest


CHECK_EXPLAINED = (
    "\nHeld-back ROC AUC: a fit made the same way without every {every}-th training image ranks those images' "
    "ground-truth boxes of the class against their regions of IoU < {iou} with it (the SVM's own positives and "
    "negatives): 1 separates them, 0.5 is chance. Raw: R-CNN's features, scaled to their mean norm; centred: "
    "the mean training feature subtracted first. Each class's SVM is trained on all training images with the "
    "treatment (svm.center) that ranks better. A class near 0.5 has an SVM that learnt nothing it can use.\n")


@dataclass
class FeatureTreatment:
    """What the SVMs see: (layer features - mean) * scale (mean 0 for R-CNN's raw features)."""
    mean: np.ndarray | float
    scale: float
    features_of: object  # pool5 -> layer features

    def __call__(self, pool5: np.ndarray) -> np.ndarray:
        return (self.features_of(pool5) - self.mean) * self.scale


def fit_svms(reader: FeatureReader, image_ids: list[str], class_indices, transform, classes: list[str],
             params) -> dict[int, "ClassSVM"]:
    """One SVM per class on these training images: their positives, then hard negative mining."""
    positives = collect_positives(reader, image_ids, class_indices, transform, classes)
    caches = {class_index: ClassSVM(positives[class_index]) for class_index in class_indices}
    mine_hard_negatives(reader, image_ids, caches, transform, params)
    return caches


def ranking_quality(reader: FeatureReader, image_ids: list[str], caches: dict, transform, params) -> dict:
    """class -> {"held_back_auc": ROC AUC of its SVM's scores, positives against negatives, on these images}."""
    scores = {class_index: ([], []) for class_index in caches}
    for image_id in image_ids:
        image = reader.read(image_id)
        features = transform(image.features)
        negatives_of = class_negatives(image, caches, params["negative_iou"])
        for class_index, cache in caches.items():
            positive = (image.gt_label == class_index) & ~image.gt_difficult
            scores[class_index][0].append(cache.scores(features[positive]))
            scores[class_index][1].append(cache.scores(features[negatives_of[class_index]]))
    quality = {}
    for class_index, (positive, negative) in scores.items():
        positive, negative = np.concatenate(positive), np.concatenate(negative)
        if len(positive) and len(negative):
            labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
            quality[class_index] = {"held_back_auc": float(roc_auc_score(labels, np.r_[positive, negative]))}
    return quality


def collect_positives(reader: FeatureReader, image_ids: list[str], class_indices, transform,
                      classes: list[str]) -> dict[int, np.ndarray]:
    """class -> features of its non-difficult ground-truth boxes in the training images."""
    rows: dict[int, list] = {class_index: [] for class_index in class_indices}
    for image_id in image_ids:
        gt = reader.read(image_id, ground_truth_only=True)
        features = transform(gt.features)
        for class_index in class_indices:
            rows[class_index].append(features[(gt.gt_label == class_index) & ~gt.gt_difficult])
    positives = {class_index: np.concatenate(parts) for class_index, parts in rows.items()}
    for class_index, features in positives.items():
        if not len(features):
            raise ConfigError(f"svm: class {classes[class_index]!r} has no non-difficult ground-truth box in the "
                              f"training split")
    return positives


def mine_hard_negatives(reader: FeatureReader, image_ids: list[str], caches: dict, transform, params: dict) -> None:
    """R-CNN's hard negative mining loop over the training images, for every class in `caches`."""
    for pass_index in range(params["hard_negative_passes"]):
        for image_index, image_id in enumerate(image_ids):
            image = reader.read(image_id)
            features = transform(image.features)
            negatives_of = class_negatives(image, caches, params["negative_iou"])
            last = pass_index == params["hard_negative_passes"] - 1 and image_index == len(image_ids) - 1
            for class_index, cache in caches.items():
                negatives = negatives_of[class_index]
                hard = negatives[cache.scores(features[negatives]) > params["hard_threshold"]]
                new = [row for row in hard if (image_index, row) not in cache.key_set]
                cache.negatives.extend(features[new])
                cache.keys.extend((image_index, row) for row in new)
                cache.key_set.update((image_index, row) for row in new)
                cache.added_since_retrain += len(new)
                cache.hard_negatives_seen += len(new)
                first = cache.retrains == 0
                if cache.negatives and (first or cache.added_since_retrain > params["retrain_after"] or last):
                    retrain(cache, params)


def class_negatives(image, class_indices, negative_iou: float) -> dict[int, np.ndarray]:
    """class -> the image's proposal rows whose IoU with every instance of the class is < negative_iou."""
    proposals, gt_rows = image.proposal_rows, image.gt_label >= 0
    overlaps = box_iou(torch.from_numpy(image.boxes[proposals]), torch.from_numpy(image.boxes[gt_rows])).numpy()
    negatives = {}
    for class_index in class_indices:
        class_overlap = overlaps[:, image.gt_label[gt_rows] == class_index]
        max_overlap = class_overlap.max(axis=1) if class_overlap.shape[1] else np.zeros(len(proposals))
        negatives[class_index] = proposals[max_overlap < negative_iou]
    return negatives


# sklearn's liblinear draws the order of its coordinate descent from one process-wide generator (newrand.h)
# and trains without the GIL: fits in two threads would interleave their draws, and the weights would
# differ from run to run in the 6th digit. One fit at a time per process reproduces them exactly.
LIBLINEAR = threading.Lock()


def retrain(cache: ClassSVM, params: dict) -> None:
    """Fit the SVM on positives + cached negatives, then evict the easy negatives."""
    negatives = np.stack(cache.negatives)
    features = np.concatenate([cache.positives, negatives])
    labels = np.concatenate([np.ones(len(cache.positives)), -np.ones(len(negatives))])
    svm = LinearSVC(C=params["C"], loss="hinge", dual=True, intercept_scaling=params["intercept_scaling"],
                    class_weight={1: params["positive_weight"], -1: 1.0}, max_iter=params["max_iter"], random_state=0)
    with LIBLINEAR, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(features, labels)
    cache.unconverged_fits += any(issubclass(warning.category, ConvergenceWarning) for warning in caught)
    cache.weights, cache.bias = svm.coef_[0].astype(np.float32), float(svm.intercept_[0])
    cache.retrains += 1
    cache.added_since_retrain = 0
    scores = cache.scores(negatives)
    keep = np.flatnonzero(scores >= params["evict_threshold"])
    if len(keep) > params["max_cached_negatives"]:
        keep = keep[np.argsort(-scores[keep], kind="stable")[:params["max_cached_negatives"]]]
    cache.negatives = [negatives[row] for row in keep]
    cache.keys = [cache.keys[row] for row in keep]
    cache.key_set = set(cache.keys)
