"""R-CNN's and SPP-net's steps, drawn for one image: proposals, the warped regions the CNN sees, each class's
SVM scores before and after NMS, the hard negatives its SVM was trained on, box regression, and (SPP-net)
the spatial pyramid's bins on conv5.

`compute` runs the detector's own steps (pipeline.classifiers: region_features, region_scores,
per_class_keep) and keeps what it throws away: every region's score and regressed box per class, and which
of them NMS kept. The detections it draws are therefore the detector's own.
"""
from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

from pipeline.classifiers import (
    RegionModels,
    kept_rows,
    load_hardest_negatives,
    per_class_keep,
    region_features,
    region_scores,
    regression_deltas,
)
from pipeline.explain.drawing import (
    COLOURS,
    blend,
    crop_window,
    draw_boxes,
    figure,
    figure_image,
    labelled,
    pooling_picture,
    tile,
)
from pipeline.explain.page import Explainer, Picture, Scene
from pipeline.regions import MEAN_RGB, STD_RGB, image_tensor, label_regions, warp_regions
from pipeline.reports import draw_detections
from pipeline.roi import best_scale, conv5_at_scales, pool_regions, pooling_bins
from pipeline.timing import Clock

TOP_PROPOSALS = 10   # drawn bright on the proposals picture (all of them faintly)
WARPED_SHOWN = 24    # crops in the "what the CNN sees" grid
CLASSES_SHOWN = 4    # classes with a picture of their scores (those with the best detections)
REGIONS_PER_CLASS = 10
HARD_NEGATIVES_SHOWN = 16
REGRESSIONS_SHOWN = 6
CROP_SIDE = 112      # display side of a warped crop


# ---- what is computed and cached per image ---------------------------------------------------------------------
def region_arrays(spp: bool):
    def compute(models: RegionModels, rgb: np.ndarray, proposals: np.ndarray, params: Mapping, device: str) -> dict:
        """Every proposal's SVM score and regressed box for every class, and the flat indices NMS kept."""
        num_classes = len(models.classes)
        if not len(proposals):
            return {"proposals": proposals, "svm_scores": np.zeros((0, num_classes), np.float32),
                    "refined": np.zeros((0, num_classes, 4), np.float32), "keep": np.zeros(0, np.int64),
                    "kept_deltas": np.zeros((0, 4), np.float32),
                    "input_size": models.backbone["input_size"], "context_pad": models.backbone["context_pad"]}
        features = region_features(spp, models, rgb, proposals, params, device, Clock(device))
        scores, refined = region_scores(models.net, models.svms, models.regressors, proposals, features, rgb.shape[1],
                                        rgb.shape[0], device, softmax=False)
        keep = per_class_keep(refined, scores["svm"], params["nms_iou"], params["max_per_class"])
        regions, classes = keep // num_classes, keep % num_classes
        kept_deltas = regression_deltas(models.regressors, features[regions.numpy()])[torch.arange(len(keep)), classes]
        arrays = {"proposals": proposals, "svm_scores": scores["svm"].numpy(), "refined": refined.numpy(),
                  "keep": keep.numpy(), "kept_deltas": kept_deltas.numpy(), "input_size": models.backbone["input_size"],
                  "context_pad": models.backbone["context_pad"]}
        if spp:
            region = int(keep[0]) // num_classes if len(keep) else 0
            arrays.update(pyramid_arrays(models, rgb, proposals[region], params, device),
                          pool_of_detection=len(keep) > 0)
        return arrays
    return compute


def pyramid_arrays(models: RegionModels, rgb: np.ndarray, box: np.ndarray, params: Mapping, device: str) -> dict:
    """SPP-net on one region: its scale's conv5 (mean over channels), the region there, its pooled bins per level."""
    maps = conv5_at_scales(models.net.trunk, rgb, params["scales"], device, amp=False)
    chosen = int(best_scale(box[None], [factor for factor, _ in maps], models.backbone["input_size"])[0])
    factor, conv5 = maps[chosen]
    scaled = torch.from_numpy(box * factor).to(conv5.device)[None]
    arrays = {"pool_box": box, "pool_factor": factor, "pool_stride": models.net.trunk_stride,
              "conv_summary": conv5.mean(0).cpu().numpy(), "levels": np.asarray(params["levels"])}
    for level in params["levels"]:
        pooled = pool_regions(conv5[None], [scaled], level, 1.0 / models.net.trunk_stride)
        arrays[f"pooled_{level}"] = pooled[0].mean(0).cpu().numpy()
    return arrays


def detections_of(arrays: dict) -> np.ndarray:
    """The detector's rows float32[D, 6] (x1, y1, x2, y2, score, class), from the cached scores and keep."""
    return kept_rows(arrays["refined"], arrays["svm_scores"], arrays["keep"])


# ---- the pictures ------------------------------------------------------------------------------------------------
def draw_rcnn(scene: Scene) -> list[Picture]:
    return [*proposal_pictures(scene), warped_regions(scene), *class_pictures(scene, warped=True),
            *box_regression(scene), final_detections(scene, "R-CNN")]


def draw_sppnet(scene: Scene) -> list[Picture]:
    return [*proposal_pictures(scene), *pyramid_picture(scene), *class_pictures(scene, warped=False),
            *box_regression(scene), final_detections(scene, "SPP-net")]


def proposal_pictures(scene: Scene) -> list[Picture]:
    """The proposals (all faintly, the best-ranked bright) and, for a data-set image, recall against their count."""
    proposals = scene.arrays["proposals"]
    faint = blend(scene.rgb, draw_boxes(scene.rgb, proposals, COLOURS["proposal"], 1), 0.35)
    top = draw_boxes(faint, proposals[:TOP_PROPOSALS], COLOURS["proposal"], 2, labels=range(1, TOP_PROPOSALS + 1))
    pictures = [Picture("proposals", "Region proposals", "Region proposals: selective search",
                        f"All {len(proposals)} proposals of this image (faint) and the "
                        f"{min(TOP_PROPOSALS, len(proposals))} ranked first (numbered): category-independent, 'blobby' "
                        f"regions likely to hold objects.",
                        top)]
    if scene.ground_truth is not None and len(scene.ground_truth[0]) and len(proposals):
        pictures.append(recall_picture(proposals, scene.ground_truth[0]))
    return pictures


def recall_curve(proposals: np.ndarray, gt_boxes: np.ndarray, iou: float) -> np.ndarray:
    """Recall at each count of proposals k = 1..R: the share of ground-truth boxes one of the first k covers."""
    overlaps = box_iou(torch.from_numpy(gt_boxes).float(), torch.from_numpy(proposals).float()).numpy()
    covered = overlaps >= iou
    first = np.where(covered.any(axis=1), covered.argmax(axis=1), len(proposals))
    return (first[None, :] < np.arange(1, len(proposals) + 1)[:, None]).mean(axis=1)


def recall_picture(proposals: np.ndarray, gt_boxes: np.ndarray) -> Picture:
    drawn = figure(5, 3.2)
    axes = drawn.add_subplot()
    counts = np.arange(1, len(proposals) + 1)
    for iou in (0.5, 0.7):
        axes.plot(counts, recall_curve(proposals, gt_boxes, iou), label=f"IoU >= {iou}")
    axes.set(xscale="log", xlabel="proposals (in rank order)", ylabel="recall of this image's objects", ylim=(0, 1.05))
    axes.grid(True, alpha=0.3)
    axes.legend()
    return Picture("proposal-recall", "Recall against the number of proposals", "Region proposals",
                   f"The share of this image's {len(gt_boxes)} ground-truth boxes covered by one of the first k "
                   f"proposals.",
                   figure_image(drawn))


def warped_crops(rgb: np.ndarray, boxes: np.ndarray, input_size: int, context_pad: float) -> list[np.ndarray]:
    """The crops exactly as they enter the network (pipeline.regions.warp_regions), back in RGB for display,
    enlarged to CROP_SIDE with the region's own extent (inside the context padding) outlined."""
    crops = warp_regions(image_tensor(rgb, "cpu"), torch.from_numpy(boxes).float(), input_size, context_pad)
    shown = crops * torch.tensor(STD_RGB).view(1, 3, 1, 1) + torch.tensor(MEAN_RGB).view(1, 3, 1, 1)
    shown = (shown.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()
    inner = round(context_pad * CROP_SIDE / input_size)
    return [cv2.rectangle(cv2.resize(crop, (CROP_SIDE, CROP_SIDE), interpolation=cv2.INTER_NEAREST),
                          (inner, inner), (CROP_SIDE - 1 - inner, CROP_SIDE - 1 - inner), (255, 255, 0), 1)
            for crop in shown]


def shown_regions(proposals: np.ndarray, best_iou: np.ndarray | None) -> np.ndarray:
    """Rows to show in the warped grid: with ground truth, a spread of overlaps (the best matches, partial
    overlaps, background); without it, the first in rank order."""
    if best_iou is None:
        return np.arange(min(WARPED_SHOWN, len(proposals)))
    order = np.argsort(-best_iou, kind="stable")
    third = WARPED_SHOWN // 3
    partial = order[(best_iou[order] >= 0.1) & (best_iou[order] < 0.5)]
    background = order[best_iou[order] < 0.1]
    chosen = np.concatenate([order[:third], partial[:third], background[:third]])
    return np.array(list(dict.fromkeys(chosen.tolist()))[:WARPED_SHOWN], int) if len(chosen) else order[:WARPED_SHOWN]


def warped_regions(scene: Scene) -> Picture:
    """The grid of warped regions, each with its best IoU and the label fine-tuning gives it."""
    proposals, input_size, context_pad = (scene.arrays[name] for name in ("proposals", "input_size", "context_pad"))
    fg_iou = scene.trained["finetune"].manifest()["description"]["params"]["fg_iou"]
    best_iou = labels = None
    if scene.ground_truth is not None:
        gt_boxes, gt_labels = scene.ground_truth
        labels, best_iou, _ = label_regions(torch.from_numpy(proposals).float(), torch.from_numpy(gt_boxes).float(),
                                            torch.from_numpy(gt_labels), fg_iou)
        labels, best_iou = labels.numpy(), best_iou.numpy()
    rows = shown_regions(proposals, best_iou)
    crops = warped_crops(scene.rgb, proposals[rows], int(input_size), float(context_pad))
    names = ["background", *scene.classes]
    texts = [[f"rank {row + 1}"] if best_iou is None else [f"IoU {best_iou[row]:.2f}", names[labels[row]]]
             for row in rows]
    grid = tile([labelled(crop, lines) for crop, lines in zip(crops, texts)], columns=8) if len(rows) else scene.rgb
    return Picture("warped-regions", "What the CNN sees", "R-CNN: warped image regions",
                   f"{len(rows)} proposals warped to {input_size} x {input_size} as they enter the network, with "
                   f"{context_pad:g} pixels of context (outside the yellow square). Below each: its best IoU with a "
                   f"ground-truth box and the label fine-tuning gives it (IoU >= {fg_iou}: that box's class, else "
                   f"background).", grid)


def classes_by_score(arrays: dict) -> list[int]:
    """The classes of the detections, best detection first, at most CLASSES_SHOWN."""
    classes = arrays["keep"] % arrays["svm_scores"].shape[1]
    return list(dict.fromkeys(classes.tolist()))[:CLASSES_SHOWN]


def class_pictures(scene: Scene, warped: bool) -> list[Picture]:
    """For each class with the best detections: its scores before and after NMS, and its hardest negatives (as
    the network saw them: warped crops for R-CNN, plain crops for SPP-net, which pools them from conv5)."""
    pictures = []
    hardest = load_hardest_negatives(scene.trained["svm"])
    for class_index in classes_by_score(scene.arrays):
        pictures.append(nms_picture(scene, class_index))
        if hardest.get(class_index):
            pictures.append(hard_negatives_picture(scene, class_index, hardest[class_index], warped))
    return pictures


def nms_picture(scene: Scene, class_index: int) -> Picture:
    """A class's best-scoring regions (regressed) before NMS, beside those of them that per-class NMS kept."""
    arrays, name = scene.arrays, scene.classes[class_index]
    scores, boxes = arrays["svm_scores"][:, class_index], arrays["refined"][:, class_index]
    before = np.argsort(-scores, kind="stable")[:REGIONS_PER_CLASS]
    num_classes = arrays["svm_scores"].shape[1]
    kept_regions = {int(flat) // num_classes for flat in arrays["keep"] if int(flat) % num_classes == class_index}
    after = [region for region in before if region in kept_regions]
    left = draw_boxes(scene.rgb, boxes[before], COLOURS["detection"], 1, [f"{score:.2f}" for score in scores[before]])
    right = draw_boxes(scene.rgb, boxes[after], COLOURS["detection"], 2, [f"{score:.2f}" for score in scores[after]])
    return Picture(f"class-{class_index}-nms", f"{name}: SVM scores before and after NMS",
                   "R-CNN: classify regions with SVMs; non-maximum suppression",
                   f"Left: the {len(before)} regions the {name} SVM scores highest (after box regression), with their "
                   f"scores. Right: the {len(after)} of them that per-class NMS keeps (IoU {scene.params['nms_iou']}): "
                   f"each suppresses the lower-scoring ones it overlaps.",
                   np.hstack([left, np.full((scene.rgb.shape[0], 6, 3), 255, np.uint8), right]))


def hard_negatives_picture(scene: Scene, class_index: int, hardest: list[tuple[str, np.ndarray, float]],
                           warped: bool) -> Picture:
    """The highest-scoring negatives in the class's SVM cache at the end of training, cut from the training images."""
    crops = []
    for image_id, box, score in hardest[:HARD_NEGATIVES_SHOWN]:
        rgb = scene.dataset.read_image(image_id)
        if rgb is None:
            continue
        crop = warped_crops(rgb, box[None], int(scene.arrays["input_size"]), float(scene.arrays["context_pad"]))[0] \
            if warped else crop_window(rgb, box, CROP_SIDE)
        crops.append(labelled(crop, [f"score {score:.2f}", image_id[:16]]))
    name = scene.classes[class_index]
    return Picture(f"class-{class_index}-hard-negatives", f"{name}: the hardest negatives its SVM mined",
                   "R-CNN: hard negative mining",
                   f"The {len(crops)} highest-scoring background regions (IoU < the SVM's negative_iou with every "
                   f"{name}) in the {name} SVM's cache at the end of training, from the training images, with the "
                   f"final SVM's score.", tile(crops, columns=8) if crops else scene.rgb)


def box_regression(scene: Scene) -> list[Picture]:
    """For each of the best detections: its proposal, the regressed box (the detection) and the ground truth it
    overlaps most, with the (dx, dy, dw, dh) the regressor predicted (none without detections)."""
    panels = [regression_panel(scene, example) for example in regression_examples(scene.arrays)[:REGRESSIONS_SHOWN]]
    if not panels:
        return []
    return [Picture("box-regression", "Bounding-box regression", "R-CNN: bounding-box regression",
                   "Each best detection: its proposal (blue), the box the class's regressor moves it to (green: the "
                   "detection), the ground truth (white, for a data-set image); below, the regression's "
                   "(dx, dy, dw, dh): centre shifts in proposal widths / heights and log scale changes, as the "
                   "slide's (.25, 0, 0, 0) for a proposal too far to left and (0, 0, -0.125, 0) for one too wide.",
                   tile(panels, columns=3))]


def regression_examples(arrays: dict) -> list[dict]:
    """Per detection (best first): its class, score, proposal, regressed box (clipped to the image) and the
    (dx, dy, dw, dh) its class's regressor predicted."""
    num_classes = arrays["svm_scores"].shape[1]
    examples = []
    for flat, deltas in zip(arrays["keep"], arrays["kept_deltas"]):
        region, class_index = int(flat) // num_classes, int(flat) % num_classes
        examples.append({"class": class_index, "score": float(arrays["svm_scores"][region, class_index]),
                         "proposal": arrays["proposals"][region], "regressed": arrays["refined"][region, class_index],
                         "deltas": deltas})
    return examples


def regression_panel(scene: Scene, example: dict) -> np.ndarray:
    boxes = [example["proposal"], example["regressed"]]
    truth = nearest_truth(scene.ground_truth, example["regressed"])
    if truth is not None:
        boxes.append(truth)
    stacked = np.stack(boxes)
    side = max(np.ptp(stacked[:, 0::2]), np.ptp(stacked[:, 1::2]), 8) * 1.3
    centre = (stacked[:, :2].min(0) + stacked[:, 2:].max(0)) / 2
    window = np.concatenate([centre - side / 2, centre + side / 2])
    canvas = scene.rgb.copy()
    for box, colour in zip(boxes, (COLOURS["proposal"], COLOURS["regressed"], COLOURS["ground truth"])):
        canvas = draw_boxes(canvas, box[None], colour, 1)
    start, end = [tuple(int(v) for v in (box[:2] + box[2:]) / 2) for box in boxes[:2]]
    cv2.arrowedLine(canvas, start, end, COLOURS["regressed"], 1, cv2.LINE_AA, tipLength=0.3)
    panel = crop_window(canvas, window, 220)
    dx, dy, dw, dh = example["deltas"]
    return labelled(panel, [f"{scene.classes[example['class']]} {example['score']:.2f}",
                            f"dx {dx:+.2f} dy {dy:+.2f}", f"dw {dw:+.2f} dh {dh:+.2f}",
                            "proposal " + verdict(example["deltas"])])


def verdict(deltas: np.ndarray, margin: float = 0.05) -> str:
    """The slide's words for what the regression corrects: "too far to left" for dx > 0, "too wide" for dw < 0..."""
    words = [word for value, (positive, negative) in zip(deltas, (
        ("too far to left", "too far to right"), ("too high", "too low"), ("too narrow", "too wide"),
        ("too short", "too tall"))) if abs(value) > margin for word in [positive if value > 0 else negative]]
    return ", ".join(words[:2]) or "is good"


def nearest_truth(ground_truth, box: np.ndarray, min_iou: float = 0.1) -> np.ndarray | None:
    """The ground-truth box the box overlaps most, if it overlaps one by at least min_iou."""
    if ground_truth is None or not len(ground_truth[0]):
        return None
    overlaps = box_iou(torch.from_numpy(box[None]).float(), torch.from_numpy(ground_truth[0]).float())[0]
    return ground_truth[0][int(overlaps.argmax())] if overlaps.max() >= min_iou else None


def pyramid_picture(scene: Scene) -> list[Picture]:
    arrays = scene.arrays
    if "pool_box" not in arrays:  # no proposals
        return []
    factor, stride = float(arrays["pool_factor"]), int(arrays["pool_stride"])
    box = arrays["pool_box"] * factor
    levels = [int(level) for level in arrays["levels"]]
    which = "the region of the best detection" if arrays["pool_of_detection"] else "the first proposal"
    bins = [pooling_bins(box, level, 1.0 / stride, "roi_pool") for level in levels]
    image = pooling_picture(arrays["conv_summary"], box / stride, bins, [arrays[f"pooled_{level}"] for level in levels],
                            [f"{level} x {level} bins" for level in levels])
    return [Picture("spatial-pyramid", "The spatial pyramid on conv5", "SPP-net: spatial pyramid pooling",
                   f"conv5 of the whole image, computed once at the scale nearest the region's size (the image resized "
                   f"by {factor:.2f}; mean over channels), {which} projected onto it (white, "
                   f"1/{stride} of its pixels) and each pyramid level's bins (red). Below: each level's max-pooled "
                   f"cells (mean over channels), concatenated into one fixed-length vector for fc6.", image)]


def final_detections(scene: Scene, title: str, rows: np.ndarray | None = None) -> Picture:
    rows = detections_of(scene.arrays) if rows is None else rows
    threshold = scene.params["score_threshold"]
    truth = None if scene.ground_truth is None else scene.ground_truth[0]
    drawn = cv2.cvtColor(draw_detections(scene.rgb, rows, scene.classes, threshold, truth), cv2.COLOR_BGR2RGB)
    return Picture("detections", f"{title}: the detections", "Detection: the result",
                   f"The {int((rows[:, 4] >= threshold).sum())} detections scoring at least {threshold:g} (orange) and "
                   f"the ground truth (white, for a data-set image).", drawn)


RCNN_EXPLAINER = Explainer("R-CNN", region_arrays(spp=False), draw_rcnn)
SPPNET_EXPLAINER = Explainer("SPP-net", region_arrays(spp=True), draw_sppnet)
