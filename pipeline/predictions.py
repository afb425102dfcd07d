"""What `rcnn predict` writes for each image: `<stem>.json` and `<stem>.jpg`, and with `--format voc` a
VOC annotation (pre-labels to correct in an annotation tool), with `--format coco` one COCO results file.

Boxes are (x1, y1, x2, y2) pixel corners of the image as given, 0-based and continuous (pipeline.boxes:
x2 - x1 is the width); the VOC files hold them 1-based and inclusive, as VOC does.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from pipeline.boxes import clip_boxes
from pipeline.coco import categories, results
from pipeline.data.reader import VOCAnnotation, VOCObject, read_rgb
from pipeline.data.voc import write_annotation
from pipeline.engine.cache import write_json_atomic
from pipeline.reports import draw_detections

FORMATS = ("voc", "coco")


def write_predictions(out: Path, images: list[tuple[Path, str]], predictions: dict, classes: list[str],
                      about: dict, score_threshold: float, formats: tuple[str, ...]) -> int:
    """Write the files of every predicted image (images: (path, digest) in the order given; predictions:
    digest -> (rows float32[D, 6], attributes)); returns how many images have files. `about` (method,
    config, key) goes into every JSON file."""
    out.mkdir(parents=True, exist_ok=True)
    coco_images, coco_detections = [], {}
    for path, digest in images:
        if digest not in predictions:  # unreadable and skipped
            continue
        rows, attributes = predictions[digest]
        kept = rows[rows[:, 4] >= score_threshold]
        write_json_atomic(out / f"{path.stem}.json", {
            "image": str(path), **about, "score_threshold": score_threshold, "seconds": float(attributes["seconds"]),
            "detections": [{"class": classes[int(class_index)], "score": float(score),
                            "box": [float(x1), float(y1), float(x2), float(y2)]}
                           for x1, y1, x2, y2, score, class_index in kept]})
        cv2.imwrite(str(out / f"{path.stem}.jpg"), draw_detections(read_rgb(path), kept, classes, score_threshold))
        if "voc" in formats:
            write_voc(out / "Annotations" / f"{path.stem}.xml", path.stem, kept, classes, attributes)
        coco_images.append({"id": len(coco_images) + 1, "file_name": path.name, "width": int(attributes["width"]),
                            "height": int(attributes["height"])})
        coco_detections[len(coco_images)] = kept
    if "coco" in formats:
        write_coco(out, coco_images, coco_detections, classes)
    return len(coco_images)


def write_voc(path: Path, stem: str, rows: np.ndarray, classes: list[str], attributes: dict) -> None:
    width, height = int(attributes["width"]), int(attributes["height"])
    boxes = clip_boxes(np.round(rows[:, :4]), width, height)  # whole pixels, inside the image
    objects = tuple(VOCObject(classes[int(row[5])], tuple(box.tolist()), difficult=False, truncated=False)
                    for row, box in zip(rows, boxes) if box[2] > box[0] and box[3] > box[1])
    path.parent.mkdir(exist_ok=True)
    write_annotation(path, VOCAnnotation(stem, width, height, objects), "predictions", "rcnn predict", segmented=False)


def write_coco(out: Path, images: list[dict], detections: dict[int, np.ndarray], classes: list[str]) -> None:
    """detections.json (COCO results) and images.json (the images and categories they refer to)."""
    (out / "detections.json").write_text(json.dumps(results(detections)))
    (out / "images.json").write_text(json.dumps({"images": images, "annotations": [],
                                                 "categories": categories(classes)}, indent=1))
