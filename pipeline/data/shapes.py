"""`rcnn data shapes`: a deterministic synthetic detection + segmentation set in the VOC layout.

Six shape classes that differ in geometry, each drawn with a random colour, size, aspect and rotation
and a noisy, shaded fill, 1-6 per image, over textured and cluttered backgrounds. Later objects occlude
earlier ones (each keeps at least half of itself visible); objects cut by the border are flagged
truncated; tiny ones are flagged difficult. Boxes are the extent of the visible pixels, as in VOC.
`SegmentationClass/` holds palette PNGs: 0 background, class index + 1, 255 void (object boundaries
and difficult objects, as in VOC). The same seed gives the same bytes; image i depends only on
(seed, i), so a larger set extends a smaller one. With `single_object`, every image holds exactly one
object, never difficult (for classification + localization, stages/localize.py). With `data_format` coco or
yolo, the same set is written as COCO json files or in the YOLO layout instead (pipeline.data.convert: the
same images, boxes and splits; no masks, and YOLO has no difficult flag).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.convert import write_format
from pipeline.engine.cache import naming_the_file, temporary_path, write_bytes
from pipeline.data.voc import VOCDataset, voc_palette, write_annotation
from pipeline.data.reader import VOCAnnotation, VOCObject
from pipeline.engine.errors import UserError

log = logging.getLogger(__name__)

CLASSES = ("circle", "cross", "hexagon", "square", "star", "triangle")
GENERATOR_VERSION = 1
MARKER = "shapes.json"
SPLITS = (("train", 0.5), ("val", 0.2), ("test", 0.3))
VOID = 255
MIN_VISIBLE_FRACTION = 0.5     # occlusion never hides more than half of an object
DIFFICULT_PROBABILITY = 0.05   # share of tiny objects, flagged difficult
BORDER_PROBABILITY = 0.15      # share of objects placed across the image border
SUBPIXEL_BITS = 4              # cv2.fillPoly fixed-point precision
FORMATS = ("voc", "coco", "yolo")


def write_shapes(out: Path, images: int, seed: int, single_object: bool = False, data_format: str = "voc") -> bool:
    """Write the set to `out` in `data_format`; returns False when an identical set is already there."""
    if images < 1:
        raise UserError(f"--images must be at least 1, not {images}")
    if data_format not in FORMATS:
        raise UserError(f"--format {data_format}: not a format to write ({', '.join(FORMATS)})")
    out = Path(out)
    marker = {"generator_version": GENERATOR_VERSION, "images": images, "seed": seed, "classes": list(CLASSES)}
    if single_object:
        marker["single_object"] = True
    if data_format != "voc":
        marker["format"] = data_format
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.exists():
        existing = out / MARKER
        if existing.is_file() and json.loads(existing.read_text()) == marker:
            return False
        if not existing.is_file() and any(out.iterdir()):
            raise UserError(f"{out}: exists and is not a shapes data set (no {MARKER}); "
                            f"remove it or choose another --out")
    staging, voc = temporary_path(out), temporary_path(out)
    try:
        _write_all(voc if data_format != "voc" else staging, images, seed, single_object)
        if data_format != "voc":
            splits = [name for name, _ in SPLITS] + ["trainval"]
            write_format(VOCDataset(voc, classes=list(CLASSES)), splits, staging, data_format)
        write_bytes(staging / MARKER, (json.dumps(marker, indent=2) + "\n").encode())
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(voc, ignore_errors=True)
    return True


def _write_all(root: Path, images: int, seed: int, single_object: bool) -> None:
    for folder in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    image_ids = [f"{index:06d}" for index in range(images)]
    for index in tqdm(range(images), desc="shapes", unit="image", disable=None):
        rgb, labels, objects = render_image(np.random.default_rng([seed, index]), single_object)
        image_id = image_ids[index]
        image_path = root / "JPEGImages" / f"{image_id}.jpg"
        with naming_the_file(image_path):  # PIL's errors on a full disk name no file
            Image.fromarray(rgb).save(image_path, quality=90)
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette(voc_palette())
        mask_path = root / "SegmentationClass" / f"{image_id}.png"
        with naming_the_file(mask_path):
            mask.save(mask_path)
        annotation = VOCAnnotation(image_id, rgb.shape[1], rgb.shape[0], tuple(
            VOCObject(obj["name"], obj["box"], obj["difficult"], obj["truncated"]) for obj in objects))
        annotation_path = root / "Annotations" / f"{image_id}.xml"
        with naming_the_file(annotation_path):
            write_annotation(annotation_path, annotation, "shapes", f"rcnn-pipeline shapes (seed {seed})",
                             segmented=True)
    for split, ids in split_ids(image_ids).items():
        for folder in ("Main", "Segmentation"):
            write_bytes(root / "ImageSets" / folder / f"{split}.txt", "".join(f"{i}\n" for i in ids).encode())


def split_ids(image_ids: list[str]) -> dict[str, list[str]]:
    """train / val / test as consecutive runs (50/20/30 %), and trainval = train + val."""
    splits, start = {}, 0
    for name, fraction in SPLITS:
        end = len(image_ids) if name == SPLITS[-1][0] else start + round(fraction * len(image_ids))
        splits[name], start = image_ids[start:end], end
    splits["trainval"] = splits["train"] + splits["val"]
    return splits


def _replace_dir(staging: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = temporary_path(out) if out.exists() else None
    if previous:
        out.rename(previous)
    staging.rename(out)
    if previous:
        shutil.rmtree(previous)


# ---- one image ----------------------------------------------------------------------------------
def render_image(rng: np.random.Generator, single_object: bool = False) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """RGB uint8[H, W, 3], class mask uint8[H, W] and the objects' annotations of one image."""
    width, height = int(rng.integers(200, 289)), int(rng.integers(160, 241))
    canvas = _background(rng, width, height)
    instances = np.full((height, width), -1, dtype=np.int16)
    placed: list[dict] = []
    for _ in range(1 if single_object else int(rng.integers(1, 7))):
        candidate = _place_object(rng, width, height, instances, placed, allow_tiny=not single_object)
        if candidate is None:
            continue
        _paint(rng, canvas, candidate["alpha"])
        instances[candidate["alpha"] >= 128] = len(placed)
        placed.append(candidate)
    objects = [_annotation_of(obj, instances == index) for index, obj in enumerate(placed)]
    return canvas.clip(0, 255).astype(np.uint8), _class_mask(instances, objects), objects


def _place_object(rng, width, height, instances, placed, allow_tiny: bool = True) -> dict | None:
    """A new object that leaves every earlier one at least half visible (a few tries, else None)."""
    for _ in range(30):
        class_index = int(rng.integers(len(CLASSES)))
        tiny = rng.random() < DIFFICULT_PROBABILITY and allow_tiny
        half_size = rng.uniform(6, 10) if tiny else rng.uniform(14, 48)
        aspect, angle = rng.uniform(0.6, 1.6), rng.uniform(0, 2 * np.pi)
        across_border = rng.random() < BORDER_PROBABILITY
        margin = -0.4 * half_size if across_border else half_size
        center = (rng.uniform(margin, width - margin), rng.uniform(margin, height - margin))
        polygon = _polygon(CLASSES[class_index], half_size, aspect, angle, center)
        alpha = np.zeros((height, width), dtype=np.uint8)
        cv2.fillPoly(alpha, [np.round(polygon * (1 << SUBPIXEL_BITS)).astype(np.int32)], 255,
                     lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS)
        covered = alpha >= 128
        if covered.sum() < 0.35 * cv2.contourArea(polygon.astype(np.float32)):
            continue  # mostly outside the image
        if all(((instances == index) & ~covered).sum() >= MIN_VISIBLE_FRACTION * obj["area"]
               for index, obj in enumerate(placed)):
            truncated = bool((polygon < 0).any() or (polygon[:, 0] > width).any() or (polygon[:, 1] > height).any())
            return {"class_index": class_index, "alpha": alpha, "area": int(covered.sum()),
                    "tiny": tiny, "truncated": truncated}
    return None


def _polygon(name: str, half_size: float, aspect: float, angle: float, center) -> np.ndarray:
    """The shape's outline, float[K, 2] in pixels: unit shape, stretched by aspect, rotated, moved."""
    unit = UNIT_SHAPES[name]
    scale = np.array([half_size * np.sqrt(aspect), half_size / np.sqrt(aspect)])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (unit * scale) @ rotation.T + np.asarray(center)


def _regular(corners: int, radius: float = 1.0, start: float = -np.pi / 2) -> np.ndarray:
    angles = start + np.arange(corners) * 2 * np.pi / corners
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    outline = _regular(2 * points)
    outline[1::2] *= inner
    return outline


_ARM = 0.32
UNIT_SHAPES = {
    "circle": _regular(48),
    "cross": np.array([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
                       (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)], float),
    "hexagon": _regular(6),
    "square": np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]),
    "star": _star(),
    "triangle": _regular(3),
}


def _background(rng, width, height) -> np.ndarray:
    """float[H, W, 3]: a gradient, smooth colour clouds or stripes, then noise and clutter."""
    kind = rng.integers(3)
    if kind == 0:
        ramp = np.linspace(0, 1, width)[None, :, None] * np.ones((height, 1, 1))
        canvas = rng.uniform(0, 255, 3) * (1 - ramp) + rng.uniform(0, 255, 3) * ramp
    elif kind == 1:
        clouds = rng.uniform(0, 255, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3)).astype(np.float32)
        canvas = cv2.resize(clouds, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    else:
        period, angle = rng.uniform(6, 24), rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
        canvas = rng.uniform(0, 255, 3) * (1 - wave[..., None]) + rng.uniform(0, 255, 3) * wave[..., None]
    canvas = np.ascontiguousarray(canvas + rng.normal(0, rng.uniform(3, 12), (height, width, 3)))
    for _ in range(int(rng.integers(0, 12))):  # clutter: strokes and specks, smaller than any object
        start, end = rng.integers(0, [width, height]), rng.integers(0, [width, height])
        cv2.line(canvas, tuple(map(int, start)), tuple(map(int, end)), rng.uniform(0, 255, 3).tolist(),
                 int(rng.integers(1, 4)), lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 15))):
        cv2.circle(canvas, tuple(map(int, rng.integers(0, [width, height]))), int(rng.integers(2, 6)),
                   rng.uniform(0, 255, 3).tolist(), -1, lineType=cv2.LINE_AA)
    return canvas


def _paint(rng, canvas: np.ndarray, alpha: np.ndarray) -> None:
    """Blend a shaded, noisy fill of a random colour into the canvas through the object's alpha."""
    height, width = alpha.shape
    colour = rng.uniform(0, 255, 3)
    shade_angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = (xs * np.cos(shade_angle) + ys * np.sin(shade_angle)) / max(width, height)
    shading = 1.0 + rng.uniform(0.1, 0.35) * (ramp - ramp.mean())
    fill = colour * shading[..., None] + rng.normal(0, rng.uniform(2, 14), (height, width, 3))
    weight = (alpha.astype(np.float64) / 255.0)[..., None]
    canvas *= 1 - weight
    canvas += weight * fill


def _annotation_of(obj: dict, visible: np.ndarray) -> dict:
    ys, xs = np.nonzero(visible)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return {"name": CLASSES[obj["class_index"]], "class_index": obj["class_index"],
            "box": box, "truncated": obj["truncated"], "difficult": obj["tiny"]}


def _class_mask(instances: np.ndarray, objects: list[dict]) -> np.ndarray:
    labels = np.zeros(instances.shape, dtype=np.uint8)
    for index, obj in enumerate(objects):
        labels[instances == index] = VOID if obj["difficult"] else obj["class_index"] + 1
    kernel = np.ones((3, 3), np.uint8)
    boundary = cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)
    labels[boundary] = VOID
    return labels
