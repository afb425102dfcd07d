"""One detection method trained two ways, on the same test images: mAP of each and the difference with
its 95 % paired-bootstrap interval (the evaluate stage's own test, pipeline.evaluation.paired_bootstrap).

    python bench/paired_runs.py --data DIR RESULT_DETECT_DIR OTHER_DETECT_DIR [--variant svm_bbox]

Each DETECT_DIR is a detect stage's cache output, `cache/<method>-detect/<key>` (`rcnn status` prints
the key). For example, the lecture's ablation, R-CNN from ImageNet weights against R-CNN from the
pretrain stage on the same photos:

    rcnn run --config photos --data D --set backbone.weights=imagenet.pth
    rcnn run --config photos --data D --set backbone.weights=pretrain
    python bench/paired_runs.py --data D cache/rcnn-detect/<first key> cache/rcnn-detect/<second key>

Classes are those of the data set's training split (data.classes empty), as both runs had them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.data.voc import VOCDataset
from pipeline.detections import read_detections
from pipeline.engine.cache import StageCache
from pipeline.evaluation import VOCEvaluator, paired_bootstrap
from pipeline.reports import interval_cell, markdown_table


def evaluator(dataset: VOCDataset, detect_dir: Path, variant: str, iou: float) -> VOCEvaluator:
    cache = StageCache(detect_dir.parent.parent, detect_dir.parent.name, detect_dir.name)
    detections = read_detections(cache, variant)
    if not detections:
        raise SystemExit(f"{detect_dir}: no detections of variant {variant!r} (is it a detect stage's output?)")
    result = VOCEvaluator(dataset.classes, iou)
    for image_id, rows in detections.items():
        result.add_ground_truth(image_id, *dataset.ground_truth(image_id))
        result.process(image_id, rows[:, :4], rows[:, 4], rows[:, 5].astype(int))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the VOC-layout data set both runs were tested on")
    parser.add_argument("--train-split", default="trainval", help="split whose annotations name the classes")
    parser.add_argument("--variant", default="svm_bbox", help="detections to compare (R-CNN: svm_bbox, svm, "
                                                              "softmax_bbox, softmax; others: their result)")
    parser.add_argument("--ious", type=float, nargs="+", default=[0.5, 0.7], help="overlaps to evaluate at")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the test images")
    parser.add_argument("result", type=Path, help="detect output of the run whose mAP is reported first")
    parser.add_argument("other", type=Path, help="detect output of the run it is compared with")
    args = parser.parse_args()
    dataset = VOCDataset(args.data, class_split=args.train_split)
    rows = []
    for iou in args.ious:
        result, other = (evaluator(dataset, path, args.variant, iou) for path in (args.result, args.other))
        difference = paired_bootstrap(result, other, args.resamples, seed=0)
        rows.append([f"{iou:g}", result.evaluate()["map_voc07_11pt"], other.evaluate()["map_voc07_11pt"],
                     interval_cell(difference)])
    print(markdown_table(["IoU", f"mAP (VOC07 11-pt) {args.result.name}", f"mAP {args.other.name}",
                          "difference, all-point [95 % interval]"], rows))


if __name__ == "__main__":
    main()
