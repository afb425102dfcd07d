"""A reader for the PASCAL VOC layout, strict about bad input.

    <root>/Annotations/<id>.xml          name, bndbox (1-based, inclusive), difficult, truncated
    <root>/JPEGImages/<id>.jpg
    <root>/ImageSets/Main/<split>.txt    one image id per line
    <root>/SegmentationClass/<id>.png    optional per-pixel class masks (0 background, class index + 1,
                                         255 void), for the images of ImageSets/Segmentation/<split>.txt

It reads a real VOCdevkit/VOC2007 unchanged. Every problem with an item raises a BadInputError naming
the file; with on_bad_input="skip" the item is left out instead and listed in `skipped`.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import coco
from pipeline.boxes import box_to_voc, voc_to_box
from pipeline.data.identity import files_digest
from pipeline.data.reader import IMAGE_SUFFIXES, AnnotatedImages, VOCAnnotation, VOCObject, class_name_problem
from pipeline.engine.errors import BadInputError, ConfigError, DataSetError
from pipeline.engine.interrupt import check_stop
from pipeline.engine.schema import register_check, register_choices

class VOCDataset(AnnotatedImages):
    """One VOC-layout root. Classes come from `classes`, or else from `class_split`'s annotations."""
    format = "voc"

    def __init__(self, root, classes=None, class_split: str = "trainval", on_bad_input: str = "error"):
        super().__init__(root, classes, class_split, on_bad_input)
        if not (self.root / "Annotations").is_dir():
            raise DataSetError(self.root, "not a VOC-layout data set (no Annotations/ folder); "
                                "generate one with `rcnn data shapes --out DIR` or pass --data VOCdevkit/VOC2007")

    # ---- splits ---------------------------------------------------------------------------------
    def split_file(self, split: str) -> Path:
        return self.root / "ImageSets" / "Main" / f"{split}.txt"

    def splits(self) -> list[str]:
        """The splits of ImageSets/Main/ (its lists of one id per line; a class's <class>_<split>.txt has two)."""
        folder = self.root / "ImageSets" / "Main"
        return [path.stem for path in sorted(folder.glob("*.txt"))
                if len((path.read_text().split("\n", 1)[0]).split()) == 1] if folder.is_dir() else []

    def segmentation_split_file(self, split: str) -> Path:
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def has_segmentation(self, split: str) -> bool:
        return self.segmentation_split_file(split).is_file()

    def segmentation_ids(self, split: str) -> list[str]:
        """The images of the split's segmentation list (ImageSets/Segmentation/), without bad items."""
        path = self.segmentation_split_file(split)
        return [image_id for image_id in self.listed_ids(split, path) if self.annotation(image_id) is not None]

    def listed_ids(self, split: str, path: Path | None = None) -> list[str]:
        """Every id the split file (default: ImageSets/Main/<split>.txt) lists, in order, bad items included."""
        path = path or self.split_file(split)
        if not path.is_file():
            raise DataSetError(path, f"split file is missing (expected one image id per line for split {split!r})")
        ids = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            # a class's split file (<class>_<split>.txt) has a second column: 1, 0 or -1
            if len(fields) > 2 or len(fields) == 2 and fields[1] not in ("1", "0", "-1"):
                raise DataSetError(path, f"line {number}: {line.strip()!r} is not an image id (ids hold no spaces; "
                                         f"a second column may only be 1, 0 or -1)")
            ids.append(fields[0])
            if "/" in ids[-1] or "\\" in ids[-1] or ids[-1] in (".", ".."):
                raise DataSetError(path, f"line {number}: {ids[-1]!r} is not an image id (a file name without "
                                         f"folders: no / or \\, not . or ..)")
        return list(dict.fromkeys(ids))

    def identity(self, splits: list[str], stat_cache: Path) -> dict:
        """What every cache key holds of the data set: a digest of the split files and of every listed image's
        annotation, image and mask (pipeline.data.identity), its classes and what is done with bad items."""
        files = [self.split_file(split) for split in splits]
        for split in splits:
            for image_id in self.listed_ids(split):
                files += [self.annotation_path(image_id), self.image_path(image_id)]
                if self.segmentation_path(image_id).is_file():
                    files.append(self.segmentation_path(image_id))
        count, digest = files_digest(self.root, files, stat_cache)
        return {"files": count, "digest": digest, "classes": self.classes, "on_bad_input": self.on_bad_input}

    # ---- annotations --------------------------------------------------------------------------
    def _parsed(self, image_id: str) -> VOCAnnotation:
        return parse_annotation(self.annotation_path(image_id), image_id)

    def _object_source(self, image_id: str, index: int) -> tuple[Path, str]:
        return self.annotation_path(image_id), f"object {index + 1}"

    def annotation_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def coco_ground_truth(self, split: str, image_ids: list[str]) -> coco.GroundTruth:
        """These images' boxes as COCO ground truth (pipeline.coco.converted; VOC has no COCO ids)."""
        return coco.converted(self, image_ids)

    # ---- images and masks ---------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        stem = self.root / "JPEGImages" / image_id
        for suffix in IMAGE_SUFFIXES:
            if stem.with_suffix(suffix).is_file():
                return stem.with_suffix(suffix)
        return stem.with_suffix(IMAGE_SUFFIXES[0])

    def segmentation_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def read_segmentation(self, image_id: str) -> np.ndarray | None:
        """The class mask uint8[H, W] (0 background, class index + 1, 255 void), or None when bad and skipped."""
        annotation = self.annotation(image_id)
        if annotation is None:
            return None
        return self._guard(lambda: read_mask(self.segmentation_path(image_id), annotation.width, annotation.height,
                                             len(self.classes)))


def parse_annotation(path: Path, image_id: str) -> VOCAnnotation:
    """Parse and check one VOC annotation file; raises BadInputError naming the file."""
    if not path.is_file():
        raise BadInputError(path, "annotation file is missing")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise BadInputError(path, f"malformed XML ({exc})") from None
    width = _number(path, root, "size/width", "the image size")
    height = _number(path, root, "size/height", "the image size")
    if width < 1 or height < 1:
        raise BadInputError(path, f"image size {width}x{height} is empty")
    objects = tuple(_parse_object(path, element, index, int(width), int(height))
                    for index, element in enumerate(root.findall("object"), start=1))
    return VOCAnnotation(image_id, int(width), int(height), objects)


def _parse_object(path: Path, element, index: int, width: int, height: int) -> VOCObject:
    name = (element.findtext("name") or "").strip()
    if not name:
        raise BadInputError(path, f"object {index} has no <name>")
    if class_name_problem(name):
        raise BadInputError(path, f"object {index}: class name {name!r} {class_name_problem(name)} (class names "
                                  f"name files)")
    what = f"object {index} ({name})"
    xmin, ymin, xmax, ymax = (_number(path, element, f"bndbox/{tag}", what)
                              for tag in ("xmin", "ymin", "xmax", "ymax"))
    if xmax <= xmin or ymax <= ymin:
        raise BadInputError(path, f"{what}: box has no width or height (xmax <= xmin or ymax <= ymin: "
                                  f"xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g})")
    if xmin < 1 or ymin < 1 or xmax > width or ymax > height:
        raise BadInputError(path, f"{what}: box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) lies outside "
                                  f"the {width}x{height} image (VOC boxes are 1-based and inclusive)")
    return VOCObject(name=name, box=voc_to_box(xmin, ymin, xmax, ymax),
                     difficult=_flag(element, "difficult"), truncated=_flag(element, "truncated"))


def _number(path: Path, element, tag: str, what: str) -> float:
    text = element.findtext(tag)
    if text is None:
        raise BadInputError(path, f"{what}: missing <{tag.replace('/', '><')}>")
    try:
        return float(text)
    except ValueError:
        raise BadInputError(path, f"{what}: <{tag.split('/')[-1]}> is not a number: {text.strip()!r}") from None


def _flag(element, tag: str) -> bool:
    return (element.findtext(tag) or "0").strip() == "1"


def read_mask(path: Path, width: int, height: int, num_classes: int) -> np.ndarray:
    """A VOC class mask: a palette (or greyscale) PNG whose values are labels, not colours."""
    if not path.is_file():
        raise BadInputError(path, "segmentation mask is missing (SegmentationClass/<id>.png)")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise BadInputError(path, f"segmentation mask has mode {image.mode}; expected a palette (P) or "
                                          f"greyscale (L) PNG whose values are class labels")
            labels = np.asarray(image).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInputError(path, f"segmentation mask is not a readable PNG ({exc})") from None
    if labels.shape != (height, width):
        raise BadInputError(path, f"segmentation mask is {labels.shape[1]}x{labels.shape[0]} but its annotation "
                                  f"says {width}x{height}")
    beyond = labels[(labels != 255) & (labels > num_classes)]
    if beyond.size:
        raise BadInputError(path, f"segmentation mask holds label {int(beyond.max())}, but there are only "
                                  f"{num_classes} classes (labels 1-{num_classes}, 0 background, 255 void)")
    return labels


def write_annotation(path: Path, annotation: VOCAnnotation, folder: str, database: str, segmented: bool) -> None:
    """A VOC annotation file: size, then each object's name, flags and box (1-based inclusive, whole pixels)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{annotation.image_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = database
    size = ET.SubElement(root, "size")
    for tag, value in (("width", annotation.width), ("height", annotation.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = str(int(segmented))
    for obj in annotation.objects:
        element = ET.SubElement(root, "object")
        ET.SubElement(element, "name").text = obj.name
        ET.SubElement(element, "pose").text = "Unspecified"
        ET.SubElement(element, "truncated").text = str(int(obj.truncated))
        ET.SubElement(element, "difficult").text = str(int(obj.difficult))
        bndbox = ET.SubElement(element, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box_to_voc(obj.box)):
            ET.SubElement(bndbox, tag).text = str(int(round(value)))
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=False)


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples) used by its SegmentationClass PNGs."""
    palette = []
    for label in range(256):
        red = green = blue = 0
        value = label
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [red, green, blue]
    return palette
