"""Detections in the COCO formats, and COCO-style AP by pycocotools, beside the PASCAL figures.

COCO boxes are [x, y, width, height] in continuous pixel coordinates, which is the pipeline's own
convention (pipeline.boxes: x2 = x1 + width), so no pixel is added or taken. Category ids are class
index + 1 (COCO reserves 0). A VOC `difficult` object becomes `iscrowd: 1`, the only way pycocotools
ignores a ground-truth box: a detection on it is neither a true nor a false positive (as in VOC),
though pycocotools measures its overlap with such a box as intersection over the detection's area.

A data set read from COCO files is evaluated against its own file (its image and category ids,
pipeline.data.coco); any other is converted here (`ground_truth`). Each reader says which:
`dataset.coco_ground_truth(split, image_ids)` returns a GroundTruth.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

# COCOeval.stats[0:6] by name, with their column titles: AP@[0.5:0.95], AP@0.5, AP@0.75, then AP@[0.5:0.95] over
# the objects of each COCO size, by area in the image's pixels: under 32², 32² to 96², over 96² (Params.areaRng)
COCO_TITLES = {"ap": "AP@[0.5:0.95]", "ap50": "AP50", "ap75": "AP75", "ap_small": "AP small (area < 32² px)",
               "ap_medium": "AP medium", "ap_large": "AP large (> 96² px)"}
COCO_METRICS = tuple(COCO_TITLES)
SIZE_METRICS = COCO_METRICS[3:]


def categories(classes: list[str]) -> list[dict]:
    return [{"id": index + 1, "name": name, "supercategory": "object"} for index, name in enumerate(classes)]


@dataclass(frozen=True)
class GroundTruth:
    """COCO ground truth of some images, with the COCO id of each image (by the pipeline's image id) and of
    each class (by class index), which the detections' results must use."""
    truth: dict
    image_numbers: dict[str, int]
    category_ids: tuple[int, ...]

    def results(self, detections_by_image: dict[str, np.ndarray]) -> list[dict]:
        """COCO results of float32[D, 6] rows (x1, y1, x2, y2, score, class index) by pipeline image id."""
        return results({self.image_numbers[image_id]: rows for image_id, rows in detections_by_image.items()},
                       self.category_ids)


def converted(dataset, image_ids: list[str]) -> GroundTruth:
    """The COCO ground truth of these images made from the reader's boxes (`ground_truth`)."""
    return GroundTruth(ground_truth(dataset, image_ids),
                       {image_id: number for number, image_id in enumerate(image_ids, start=1)},
                       tuple(range(1, len(dataset.classes) + 1)))


def results(detections_by_image: dict[int, np.ndarray], category_ids: tuple[int, ...] | None = None) -> list[dict]:
    """COCO results: one entry per detection of float32[D, 6] rows (x1, y1, x2, y2, score, class index);
    a class's category id is category_ids[class index], by default class index + 1."""
    def category(class_index) -> int:
        return int(class_index) + 1 if category_ids is None else category_ids[int(class_index)]
    return [{"image_id": image_id, "category_id": category(class_index), "score": round(float(score), 6),
             "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)]}
            for image_id, rows in detections_by_image.items() for x1, y1, x2, y2, score, class_index in rows]


def ground_truth(dataset, image_ids: list[str]) -> dict:
    """A COCO ground-truth file of these images of a VOC data set (COCO image id = position + 1)."""
    images, annotations = [], []
    for number, image_id in enumerate(image_ids, start=1):
        annotation = dataset.annotation(image_id)
        images.append({"id": number, "file_name": f"{image_id}.jpg", "width": annotation.width,
                       "height": annotation.height})
        boxes, labels, difficult = dataset.ground_truth(image_id)
        for (x1, y1, x2, y2), label, hard in zip(boxes.tolist(), labels.tolist(), difficult.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(hard)})
    return {"images": images, "annotations": annotations, "categories": categories(dataset.classes)}


def sizes_without_objects(truth: dict) -> set[str]:
    """The size metrics whose area range holds no ground-truth object that counts (crowd boxes are ignored)."""
    areas = [annotation["area"] for annotation in truth["annotations"] if not annotation["iscrowd"]]
    ranges = Params(iouType="bbox").areaRng[1:]  # [0, 32²], [32², 96²], [96², 1e10]: small, medium, large
    return {name for name, (low, high) in zip(SIZE_METRICS, ranges) if not any(low <= area <= high for area in areas)}


def evaluate(truth: dict, detections: list[dict]) -> dict[str, float | None]:
    """COCO AP@[0.5:0.95], AP50, AP75 and AP by object size of the detections (pycocotools.COCOeval, bbox);
    None for a size that no ground-truth object has (pycocotools' -1)."""
    if not detections:
        absent = sizes_without_objects(truth)
        return {name: None if name in absent else 0.0 for name in COCO_METRICS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = truth
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: None if value < 0 else float(value) for name, value in zip(COCO_METRICS, evaluation.stats)}
