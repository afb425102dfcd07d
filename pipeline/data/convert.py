"""`rcnn data convert`: any data set the readers open, written in the VOC layout, as COCO json files or in the
YOLO layout.

Every split (or those named) is read through its reader, with its checks and `on_bad_input`, so what is
written is what the pipeline would read: the same images (their bytes copied, each once), classes, boxes and
splits. What a format cannot hold is lost, and said here: VOC holds whole pixels, so a box read from COCO or
YOLO is rounded to the nearest pixel edges (never to no width: a box that would lose its last pixel keeps
one); COCO has no truncated flag; YOLO has neither a difficult nor a truncated flag (such objects become
plain objects).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

from pipeline.data.coco import write_coco
from pipeline.data.voc import write_annotation
from pipeline.data.reader import IMAGE_SUFFIXES, VOCAnnotation
from pipeline.data.yolo import write_yolo
from pipeline.engine.cache import temporary_path, write_bytes
from pipeline.engine.errors import BadInputError, DataSetError, UserError

TARGETS = ("voc", "coco", "yolo")


def convert(dataset, out: Path, to: str, splits: list[str] | None = None) -> dict:
    """Write the data set's splits (default: every split it has) to the new folder `out` in the format `to`;
    returns the images, objects and splits written. Nothing is left at `out` when it fails."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists; choose a new folder for the converted data set")
    staging = temporary_path(out)
    try:
        written = write_format(dataset, splits or dataset.splits(), staging, to)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def write_format(dataset, splits: list[str], out: Path, to: str) -> dict:
    """Write the splits into `out` (created) in the format `to`, leaving out what the reader skips."""
    if to not in TARGETS:
        raise UserError(f"--to {to}: not a format to write ({', '.join(TARGETS)})")
    if not splits:
        raise DataSetError(dataset.root, "no splits to convert")
    ids = {split: dataset.image_ids(split) for split in splits}
    annotations, image_paths = {}, {}
    for image_id in dict.fromkeys(image_id for split_ids in ids.values() for image_id in split_ids):
        path = dataset.image_path(image_id)
        if not path.is_file():
            if dataset.on_bad_input == "error":
                raise BadInputError(path, "image file is missing")
            dataset.skipped[str(path)] = "image file is missing"
            continue
        annotations[image_id], image_paths[image_id] = dataset.annotation(image_id), path
    ids = {split: [image_id for image_id in split_ids if image_id in annotations] for split, split_ids in ids.items()}
    out.mkdir(parents=True)
    WRITERS[to](out, dataset.classes, ids, annotations, image_paths)
    return {"images": len(annotations), "objects": sum(len(a.objects) for a in annotations.values()),
            "splits": {split: len(split_ids) for split, split_ids in ids.items()}}


def write_voc(out: Path, classes: list[str], splits: dict[str, list[str]], annotations: dict[str, VOCAnnotation],
              image_paths: dict[str, Path]) -> None:
    """Annotations/<id>.xml (boxes in whole pixels: `whole_pixels`), JPEGImages/<id>.<suffix> and
    ImageSets/Main/<split>.txt. `classes` is not written: the VOC reader takes the training split's, sorted."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / folder).mkdir(parents=True)
    for image_id, annotation in annotations.items():
        path = image_paths[image_id]
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataSetError(path, f"the VOC reader reads {', '.join(IMAGE_SUFFIXES)} images only; save this one "
                                     f"as one of them first")
        if image_id.split() != [image_id]:
            raise DataSetError(path, f"the image id {image_id!r} holds a space, which a VOC split file cannot hold; "
                                     f"rename the file")
        shutil.copyfile(path, out / "JPEGImages" / f"{image_id}{path.suffix.lower()}")
        write_annotation(out / "Annotations" / f"{image_id}.xml", whole_pixels(annotation), "converted",
                         "rcnn data convert", segmented=False)
    for split, ids in splits.items():
        write_bytes(out / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{image_id}\n" for image_id in ids).encode())


def whole_pixels(annotation: VOCAnnotation) -> VOCAnnotation:
    """Each box's edges (x1, y1, x2, y2, pipeline convention) rounded to the nearest whole pixel (halves up),
    a box that would lose its last column or row keeping one; inside the image, as they were."""
    def edges(low: float, high: float, side: int) -> tuple[int, int]:
        low, high = math.floor(low + 0.5), math.floor(high + 0.5)
        if high <= low:
            low, high = (low, low + 1) if low + 1 <= side else (high - 1, high)
        return low, high
    objects = []
    for obj in annotation.objects:
        (x1, x2), (y1, y2) = edges(obj.box[0], obj.box[2], annotation.width), edges(obj.box[1], obj.box[3],
                                                                                    annotation.height)
        objects.append(replace(obj, box=(float(x1), float(y1), float(x2), float(y2))))
    return replace(annotation, objects=tuple(objects))


WRITERS = {"voc": write_voc, "coco": write_coco, "yolo": write_yolo}
