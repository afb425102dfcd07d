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

import numpy as np

from pipeline.cache import StageCache
from pipeline.detections import read_detections
from pipeline.methods import Method
from pipeline.reports import markdown_table, new_figure, save_figure
from pipeline.stage import Shard, ShardOutput, Stage, StageContext


class Evaluate(Stage):
    """PASCAL VOC AP per class and mAP of each detection variant, with PR curves and pictures."""

    version = "3"
    shard_suffix = ".json"

    def __init__(self, method: Method):
        self.method = method
        self.name = method.evaluate_stage
        self.inputs = (method.detect_stage,)
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
        from pipeline.evaluation import VOCEvaluator, paired_bootstrap

        params, results, evaluators = ctx.params, {}, {}
        for variant in shard.items:
            detections = read_detections(inputs[self.method.detect_stage], variant)  # every detected image
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
        out.path.write_text(json.dumps({"results": results, "differences": differences}))
        return {}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        saved = json.loads(cache.shard_path("00000").read_text())
        results, differences = saved["results"], saved["differences"]
        main_iou = str(ctx.params["ious"][0])
        write_tables(cache.report_dir, results, differences, self.variants, ctx.classes, main_iou)
        plot_pr_curves(cache.report_dir / "pr_curves.png", results[self.primary][main_iou], ctx.classes)
        draw_detections(ctx, read_detections(inputs[self.method.detect_stage], self.primary), cache.report_dir)
        primary = results[self.primary][main_iou]
        return {"iou": float(main_iou), "map_voc07_11pt": primary["map_voc07_11pt"], "map_all_point": primary["map_all_point"],
                **{name: results[variant][main_iou]["map_voc07_11pt"] for name, variant in self.variant_metrics.items()},
                "ap_voc07_11pt": {name: r["ap_voc07_11pt"] for name, r in primary["per_class"].items()},
                "variants": {variant: {f"map_{metric}@{iou}": r[f"map_{metric}"] for iou, r in by_iou.items()
                                       for metric in ("voc07_11pt", "all_point")}
                             for variant, by_iou in results.items()},
                "differences": differences}


def _jsonable(result: dict) -> dict:
    """Per-class PR curves thinned to at most 200 points, as lists."""
    for per_class in result["per_class"].values():
        for name in ("recall", "precision"):
            curve = per_class[name]
            keep = np.unique(np.linspace(0, len(curve) - 1, min(len(curve), 200)).astype(int)) if len(curve) else []
            per_class[name] = [None if np.isnan(value) else float(value) for value in np.asarray(curve)[keep]]
    return result


def write_tables(report_dir, results: dict, differences: dict, titles: dict[str, str], classes: list[str],
                 main_iou: str) -> None:
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
    (report_dir / "map.md").write_text(
        f"# Detection results (PASCAL VOC protocol: a detection is correct when its overlap exceeds the IoU)\n\n"
        f"## mAP by method\n\n{variants}\n{difference_section(differences, titles, titles[first], ious)}"
        f"## AP per class at IoU {main_iou}: {titles[first]}\n\n{per_class}")
    summary = {variant: {iou: {key: value for key, value in result.items() if key != "per_class"} |
                         {"ap": {name: {"voc07_11pt": c["ap_voc07_11pt"], "all_point": c["ap_all_point"]}
                                 for name, c in result["per_class"].items()}}
                         for iou, result in by_iou.items()} for variant, by_iou in results.items()}
    (report_dir / "map.json").write_text(json.dumps({"results": summary, "differences": differences}, indent=2))


def difference_section(differences: dict, titles: dict[str, str], result_title: str, ious: list[str]) -> str:
    """The result's all-point mAP minus each variant's, with the paired-bootstrap interval."""
    if not differences:
        return ""
    resamples = next(iter(differences.values()))[ious[0]]["resamples"]
    def cell(summary):
        low, high = summary["ci95"]
        return f"{summary['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
    table = markdown_table(["compared with"] + [f"difference in mAP@{iou}, all-point [95 % interval]" for iou in ious],
                           [[titles[variant]] + [cell(by_iou[iou]) for iou in ious]
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


def draw_detections(ctx: StageContext, detections: dict, report_dir) -> None:
    """The first few test images with ground truth (thin, white) and detections above min_score."""
    import cv2
    params = ctx.params
    pictures = report_dir / "detections"
    pictures.mkdir(exist_ok=True)
    for image_id in ctx.dataset.image_ids(ctx.test_split)[:params["pictures"]]:
        rgb = ctx.dataset.read_image(image_id)
        if rgb is None or image_id not in detections:
            continue
        canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        for box in ctx.dataset.ground_truth(image_id)[0]:
            cv2.rectangle(canvas, (int(box[0]), int(box[1])), (int(box[2]) - 1, int(box[3]) - 1), (255, 255, 255), 1)
        for x1, y1, x2, y2, score, class_index in detections[image_id]:
            if score < params["picture_min_score"]:
                continue
            cv2.rectangle(canvas, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), (0, 200, 255), 2)
            cv2.putText(canvas, f"{ctx.classes[int(class_index)]} {score:.2f}", (int(x1), max(int(y1) - 3, 10)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 200, 255), 1, cv2.LINE_AA)
        cv2.imwrite(str(pictures / f"{image_id}.jpg"), canvas)
