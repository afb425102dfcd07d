"""`<method>-evaluate`: PASCAL VOC evaluation of a method's test detections (pipeline.evaluation.VOCEvaluator).

Evaluates every variant the method's detect stage wrote: for R-CNN the result (svm_bbox) and the ablations
(no box regression; the fine-tuned softmax instead of the SVMs); for Fast R-CNN with and without the
truncated SVD; and so on. Both the VOC2007 11-point AP and the all-point AP, each labelled. Each
ablation's difference from the result comes with a 95 % interval from a paired bootstrap over the test
images (pipeline.evaluation.paired_bootstrap), so that a difference within noise reads as one. The
manifest's metrics hold the mAPs and the differences, so `rcnn status --json` shows them; the report
(`reports/<config>/<stage>/`) holds map.md, map.json, pr_curves.png and a few test images with detections.
Every method has its copy of this stage (rcnn-evaluate, sppnet-evaluate, fast-rcnn-evaluate, ...).
"""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np

from pipeline import coco
from pipeline.detections import read_detections
from pipeline.engine.cache import StageCache
from pipeline.engine.stage import Shard, ShardOutput, Stage, StageContext
from pipeline.evaluation import VOCEvaluator, paired_bootstrap
from pipeline.methods import Method
from pipeline.reports import draw_detections as drawn
from pipeline.reports import interval_cell, markdown_table, new_figure, save_figure

log = logging.getLogger(__name__)


class Evaluate(Stage):
    """PASCAL VOC AP per class and mAP of each detection variant, with PR curves and pictures."""

    version = "6"
    shard_suffix = ".json"

    def __init__(self, method: Method):
        self.method = method
        self.name = method.evaluate_stage
        # R-CNN and SPP-net: their SVMs' check, for a warning when one ranks no better than chance
        self.inputs = (method.detect_stage, *(stage for role, stage in method.model_stages.items() if role == "svm"))
        self.variants = {variant.name: variant.title for variant in method.variants}
        self.primary = method.result
        # the mAP of the variants that name a metric: map_voc07_11pt_<metric>, printed after a run
        self.variant_metrics = {f"map_voc07_11pt_{v.metric}": v.name for v in method.variants if v.metric}
        self.headline_metrics = ("map_voc07_11pt", "map_all_point", *self.variant_metrics)

    def params(self, config: dict) -> dict:
        return config["evaluate"]

    def shards(self, ctx: StageContext) -> list[Shard]:
        return [Shard("00000", tuple(self.variants))]

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params, results, evaluators, coco_results = ctx.params, {}, {}, {}
        for variant in shard.items:
            detections = read_detections(inputs[self.method.detect_stage], variant)  # every detected image
            truth = coco_ground_truth(ctx, detections)
            coco_results[variant] = coco.evaluate(truth.truth, truth.results(detections))
            for iou in params["ious"]:
                evaluator = evaluators[variant, iou] = VOCEvaluator(ctx.classes, iou)
                for image_id in detections:
                    evaluator.add_ground_truth(image_id, *ctx.dataset.ground_truth(image_id))
                for image_id, rows in detections.items():
                    evaluator.process(image_id, rows[:, :4], rows[:, 4], rows[:, 5].astype(int))
                results.setdefault(variant, {})[str(iou)] = _jsonable(evaluator.evaluate())
        differences = {variant: {str(iou): paired_bootstrap(evaluators[self.primary, iou], evaluators[variant, iou],
                                                            params["bootstrap_resamples"], params["bootstrap_seed"])
                                 for iou in params["ious"]}
                       for variant in shard.items if variant != self.primary}
        out.path.write_text(json.dumps({"results": results, "differences": differences, "coco": coco_results}))
        return {}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        saved = json.loads(cache.shard_path("00000").read_text())
        results, differences, coco_results = saved["results"], saved["differences"], saved["coco"]
        main_iou = str(ctx.params["ious"][0])
        write_tables(cache.report_dir, results, differences, coco_results, self.variants, ctx.classes, main_iou)
        detections = read_detections(inputs[self.method.detect_stage], self.primary)
        write_coco_files(ctx, detections, cache.report_dir / "coco")
        plot_pr_curves(cache.report_dir / "pr_curves.png", results[self.primary][main_iou], ctx.classes)
        draw_detections(ctx, detections, self.method.score_threshold, cache.report_dir)
        svm_stage = self.method.model_stages.get("svm")
        warnings = chance_level_svms(inputs[svm_stage]) if svm_stage else []
        if warnings:
            with open(cache.report_dir / "map.md", "a") as report:
                report.write("\n## Warnings\n\n" + "".join(f"- {warning}\n" for warning in warnings))
            for warning in warnings:
                log.warning("%s: %s", self.name, warning)
        primary = results[self.primary][main_iou]
        return {"iou": float(main_iou), "map_voc07_11pt": primary["map_voc07_11pt"],
                "map_all_point": primary["map_all_point"],
                **{name: results[variant][main_iou]["map_voc07_11pt"]
                   for name, variant in self.variant_metrics.items()},
                "ap_voc07_11pt": {name: r["ap_voc07_11pt"] for name, r in primary["per_class"].items()},
                "variants": {variant: {f"map_{metric}@{iou}": r[f"map_{metric}"] for iou, r in by_iou.items()
                                       for metric in ("voc07_11pt", "all_point")}
                             for variant, by_iou in results.items()},
                "differences": differences,
                **{f"coco_{name}": value for name, value in coco_results[self.primary].items()},
                "coco": coco_results, "warnings": warnings}


CHANCE_AUC = 0.6  # a held-back ROC AUC at or below this: the SVM ranks no better than chance


def chance_level_svms(svm: StageCache) -> list[str]:
    """One line for each class whose SVM ranks its held-back training regions no better than chance."""
    per_class = svm.manifest()["metrics"]["per_class"]
    return [f"the SVM of {name} ranks its held-back training regions no better than chance (ROC AUC "
            f"{stats['held_back_auc']:.2f}): its detections are ordered by noise; see svm.md"
            for name, stats in per_class.items() if stats.get("held_back_auc", 1.0) <= CHANCE_AUC]


def coco_ground_truth(ctx: StageContext, detections: dict) -> coco.GroundTruth:
    """The COCO ground truth of the detected test images, in test-split order: for a data set read from COCO
    files, its own test file's images, annotations and ids; for any other, a conversion numbering the images
    by their position from 1 (pipeline.coco)."""
    detected = [image_id for image_id in ctx.dataset.image_ids(ctx.test_split) if image_id in detections]
    return ctx.dataset.coco_ground_truth(ctx.test_split, detected)


def write_coco_files(ctx: StageContext, detections: dict, folder) -> None:
    """The result's test detections in the COCO results format, and the test split as COCO ground truth."""
    folder.mkdir()
    truth = coco_ground_truth(ctx, detections)
    (folder / "ground_truth.json").write_text(json.dumps(truth.truth))
    (folder / "detections.json").write_text(json.dumps(truth.results(detections)))


def _jsonable(result: dict) -> dict:
    """Per-class PR curves thinned to at most 200 points, as lists."""
    for per_class in result["per_class"].values():
        for name in ("recall", "precision"):
            curve = per_class[name]
            keep = np.unique(np.linspace(0, len(curve) - 1, min(len(curve), 200)).astype(int)) if len(curve) else []
            per_class[name] = [None if np.isnan(value) else float(value) for value in np.asarray(curve)[keep]]
    return result


def write_tables(report_dir, results: dict, differences: dict, coco_results: dict, titles: dict[str, str],
                 classes: list[str], main_iou: str) -> None:
    def cell(value):
        return "n/a" if value is None else value
    first = next(iter(titles))
    primary = results[first][main_iou]["per_class"]
    ious = list(results[first])
    per_class = markdown_table(["class", "ground truth", "detections", "AP (VOC07 11-point)", "AP (all-point)"],
                               [[name, primary[name]["positives"], primary[name]["detections"],
                                 cell(primary[name]["ap_voc07_11pt"]), cell(primary[name]["ap_all_point"])]
                                for name in classes])
    variants = markdown_table(
        ["method"] + [f"mAP@{iou} ({name})" for iou in ious for name in ("VOC07 11-point", "all-point")],
        [[titles[v]] + [cell(by_iou[iou][f"map_{metric}"]) for iou in ious for metric in ("voc07_11pt", "all_point")]
         for v, by_iou in results.items()])
    coco_table = markdown_table(
        ["method", *coco.COCO_TITLES.values()],
        [[titles[v], *(cell(r[name]) for name in coco.COCO_METRICS)] for v, r in coco_results.items()])
    (report_dir / "map.md").write_text(
        f"# Detection results (PASCAL VOC protocol: a detection is correct when its overlap exceeds the IoU)\n\n"
        f"## mAP by method\n\n{variants}\n{difference_section(differences, titles, titles[first], ious)}"
        f"## AP per class at IoU {main_iou}: {titles[first]}\n\n{per_class}\n"
        f"## COCO-style AP (pycocotools; difficult objects ignored as crowd; coco/ holds the files)\n\n{coco_table}")
    summary = {variant: {iou: {key: value for key, value in result.items() if key != "per_class"} |
                         {"ap": {name: {"voc07_11pt": c["ap_voc07_11pt"], "all_point": c["ap_all_point"]}
                                 for name, c in result["per_class"].items()}}
                         for iou, result in by_iou.items()} for variant, by_iou in results.items()}
    (report_dir / "map.json").write_text(json.dumps({"results": summary, "differences": differences,
                                                     "coco": coco_results}, indent=2))


def difference_section(differences: dict, titles: dict[str, str], result_title: str, ious: list[str]) -> str:
    """The result's all-point mAP minus each variant's, with the paired-bootstrap interval."""
    if not differences:
        return ""
    resamples = next(iter(differences.values()))[ious[0]]["resamples"]
    table = markdown_table(["compared with"] + [f"difference in mAP@{iou}, all-point [95 % interval]" for iou in ious],
                           [[titles[variant]] + [interval_cell(by_iou[iou]) for iou in ious]
                            for variant, by_iou in differences.items()])
    return (f"## {result_title} against each variant\n\nThe result's all-point mAP minus the "
            f"variant's, with a 95 % interval from {resamples} paired bootstrap resamples of the test images: an "
            f"interval that contains 0 means these test images cannot tell the two apart. (All-point, because "
            f"the 11-point AP jumps as recall crosses each tenth, which makes its bootstrap unreliable.)\n\n{table}\n")


def plot_pr_curves(path, result: dict, classes: list[str]) -> None:
    columns = min(4, len(classes))
    rows = -(-len(classes) // columns)
    figure = new_figure(3.2 * columns, 2.8 * rows)
    for index, name in enumerate(classes):
        axes = figure.add_subplot(rows, columns, index + 1)
        curve = result["per_class"][name]
        axes.plot(curve["recall"], curve["precision"])
        ap = curve["ap_voc07_11pt"]
        axes.set(title=f"{name} (AP07 {ap:.3f})" if ap is not None else name, xlim=(0, 1), ylim=(0, 1.02),
                 xlabel="recall", ylabel="precision")
        axes.grid(True, alpha=0.3)
    save_figure(figure, path)


def draw_detections(ctx: StageContext, detections: dict, min_score: float, report_dir) -> None:
    """The first few test images with ground truth (thin, white) and the detections scoring at least the
    method's own threshold (that of `rcnn predict`: an SVM's margin 0, a softmax's even odds), not all of
    the up to 100 per class that the evaluation ranks."""
    pictures = report_dir / "detections"
    pictures.mkdir(exist_ok=True)
    for image_id in ctx.dataset.image_ids(ctx.test_split)[:ctx.params["pictures"]]:
        rgb = ctx.dataset.read_image(image_id)
        if rgb is not None and image_id in detections:
            canvas = drawn(rgb, detections[image_id], ctx.classes, min_score,
                           ctx.dataset.ground_truth(image_id)[0])
            cv2.imwrite(str(pictures / f"{image_id}.jpg"), canvas)
