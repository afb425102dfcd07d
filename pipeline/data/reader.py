"""What every reader shares (VOC, COCO, YOLO): the interface the stages use of a data set, on annotations each
reader parses in its own way, and the records they parse into.

A reader lists the image ids of a split (`listed_ids`), parses one image's annotation into a VOCAnnotation
(`_parsed`, boxes in the pipeline's 0-based continuous convention, pipeline.boxes), says where each object
comes from (`_object_source`, for errors) and names the files its identity covers (`identity_files`).
Everything else is here: classes (data.classes, or the sorted names the training split's objects use), the
class check, skipping bad items (`on_bad_input`), images, the arrays of `ground_truth`, and the identity
(content digests of the files, pipeline.data.identity). COCO and YOLO have no per-pixel class masks
(`has_segmentation` False here); VOC's reader adds them.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.identity import files_digest
from pipeline.engine.errors import BadInputError, ConfigError, DataSetError
from pipeline.engine.interrupt import check_stop
from pipeline.engine.schema import register_check, register_choices

log = logging.getLogger(__name__)
ON_BAD_INPUT = ("error", "skip")
register_choices("data.on_bad_input", ON_BAD_INPUT)


def class_name_problem(name: str) -> str | None:
    """Why `name` cannot be a class name, or None: class names name files (the devkit's results files,
    comp4_det_<split>_<class>.txt) and folders, so no path separators, control characters, . or .."""
    if "/" in name or "\\" in name:
        return "holds a path separator (/ or \\)"
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        return "holds a control character"
    if name in (".", ".."):
        return "is . or .."
    return None


def check_class_names(config: dict) -> None:
    """data.classes (the schema runs this at config load): valid names, each once."""
    classes = config["data"]["classes"]
    for name in classes:
        if not isinstance(name, str) or class_name_problem(name):
            raise ConfigError(f"data.classes: {name!r} {class_name_problem(str(name)) or 'is not a string'}")
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise ConfigError(f"data.classes: {repeated[0]!r} is listed more than once")


register_check(check_class_names)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class VOCObject:
    name: str
    box: tuple[float, float, float, float]  # (x1, y1, x2, y2), pipeline convention (pipeline.boxes)
    difficult: bool
    truncated: bool


@dataclass(frozen=True)
class VOCAnnotation:
    image_id: str
    width: int
    height: int
    objects: tuple[VOCObject, ...]


class AnnotatedImages:
    """The common part of the readers (subclasses: pipeline.data.voc, pipeline.data.coco, pipeline.data.yolo)."""
    format = ""

    def __init__(self, root, classes=None, class_split: str = "train", on_bad_input: str = "error"):
        if on_bad_input not in ON_BAD_INPUT:
            raise ConfigError(f"on_bad_input must be one of {ON_BAD_INPUT}, not {on_bad_input!r}")
        self.root = Path(root)
        self.class_split = class_split
        self.on_bad_input = on_bad_input
        self.skipped: dict[str, str] = {}  # file (and item) -> problem, for the stage report
        self._given_classes = list(classes) if classes else None
        self._classes: list[str] | None = None
        self._annotations: dict[str, VOCAnnotation | None] = {}

    def __getstate__(self):  # workers re-read what they need rather than receive every annotation
        return {**self.__dict__, "_annotations": {}}

    # ---- what each format defines -------------------------------------------------------------
    def listed_ids(self, split: str) -> list[str]:
        """Every image id the split lists, in order, bad items included."""
        raise NotImplementedError

    def splits(self) -> list[str]:
        """The names of the splits the data set holds (those `rcnn data convert` writes)."""
        raise NotImplementedError

    def split_file(self, split: str) -> Path:
        raise NotImplementedError

    def image_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def _parsed(self, image_id: str) -> VOCAnnotation:
        """The image's size and objects, checked but for the class list; raises BadInputError."""
        raise NotImplementedError

    def _object_source(self, image_id: str, index: int) -> tuple[Path, str]:
        """The file holding the image's object `index` (0-based) and how an error names it there."""
        raise NotImplementedError

    def identity_files(self, splits: list[str]) -> list[Path]:
        raise NotImplementedError

    def _skip_key(self, error: BadInputError, image_id: str | None) -> str:
        """Under which name a skipped item is listed (a file, or a file and the image in it)."""
        return error.path

    # ---- splits and classes -------------------------------------------------------------------
    def image_ids(self, split: str) -> list[str]:
        """The split's image ids, in listed order, without those skipped for bad input."""
        return [image_id for image_id in self.listed_ids(split) if self.annotation(image_id) is not None]

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self._classes = self._given_classes or self._classes_in_split(self.class_split)
        return self._classes

    def _classes_in_split(self, split: str) -> list[str]:
        """The class names of the split's objects, sorted; said in the log with their counts."""
        counts = Counter()
        for image_id in self.listed_ids(split):
            annotation = self._guard(lambda: self._parsed(image_id), image_id)
            if annotation is not None:
                counts.update(obj.name for obj in annotation.objects)
        if not counts:
            raise DataSetError(self.split_file(split), "no annotated objects to take the class list from")
        log.info("classes (data.classes is empty: those of %s): %s", self.split_file(split),
                 ", ".join(f"{name} ({counts[name]})" for name in sorted(counts)))
        return sorted(counts)

    def has_segmentation(self, split: str) -> bool:
        return False

    def segmentation_split_file(self, split: str) -> Path:
        return self.split_file(split)

    def segmentation_ids(self, split: str) -> list[str]:
        return []

    def read_segmentation(self, image_id: str) -> None:
        raise DataSetError(self.split_file(self.class_split), f"a {self.format.upper()} data set has no "
                                                              f"per-pixel class masks")

    def identity(self, splits: list[str], stat_cache: Path) -> dict:
        """What every cache key holds of the data set: its format, a digest of the annotation files and of every
        listed image (by path inside the data set folder, so that moving the folder changes nothing), its classes
        and what is done with bad items."""
        count, digest = identity_digest(self.root, self.identity_files(splits), stat_cache)
        return {"format": self.format, "files": count, "digest": digest, "classes": self.classes,
                "on_bad_input": self.on_bad_input}

    # ---- annotations --------------------------------------------------------------------------
    def annotation(self, image_id: str) -> VOCAnnotation | None:
        """The parsed, checked annotation, or None when it is bad and on_bad_input is 'skip'."""
        if image_id not in self._annotations:
            self._annotations[image_id] = self._guard(lambda: self._checked_annotation(image_id), image_id)
        return self._annotations[image_id]

    def _checked_annotation(self, image_id: str) -> VOCAnnotation:
        annotation = self._parsed(image_id)
        known = set(self.classes)
        for index, obj in enumerate(annotation.objects):
            if obj.name not in known:
                path, where = self._object_source(image_id, index)
                origin = ("data.classes" if self._given_classes else
                          f"the classes found in the training split {self.class_split!r}; list every class in "
                          f"data.classes to use others")
                raise BadInputError(path, f"{where}: class {obj.name!r} is not one of {origin} "
                                          f"({', '.join(self.classes)})")
        return annotation

    def ground_truth(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """boxes float32[N, 4] (x1, y1, x2, y2), class indices int64[N], difficult bool[N]."""
        objects = self.annotation(image_id).objects
        class_index = {name: index for index, name in enumerate(self.classes)}
        boxes = np.array([obj.box for obj in objects], dtype=np.float32).reshape(-1, 4)
        labels = np.array([class_index[obj.name] for obj in objects], dtype=np.int64)
        difficult = np.array([obj.difficult for obj in objects], dtype=bool)
        return boxes, labels, difficult

    # ---- images -------------------------------------------------------------------------------
    def read_image(self, image_id: str) -> np.ndarray | None:
        """The image as RGB uint8[H, W, 3], or None when it is bad and on_bad_input is 'skip'. Per-image work
        reads each image here, so a run asked to stop (pipeline.engine.interrupt) stops here too."""
        check_stop()
        annotation = self.annotation(image_id)
        if annotation is None:
            return None
        return self._guard(lambda: read_rgb(self.image_path(image_id), annotation.width, annotation.height))

    def _guard(self, read, image_id: str | None = None):
        try:
            return read()
        except BadInputError as error:
            if self.on_bad_input == "error":
                raise
            self.skipped[self._skip_key(error, image_id)] = error.problem
            return None


def identity_digest(root: Path, files: list[Path], stat_cache: Path) -> tuple[int, str]:
    """files_digest of the files inside `root` by their path relative to it, and of any outside it (a split
    file given by an absolute path) by their absolute path, combined."""
    inside = [path for path in files if path.is_relative_to(root)]
    outside = [path.resolve() for path in files if not path.is_relative_to(root)]
    count, digest = files_digest(root, inside, stat_cache)
    if not outside:
        return count, digest
    more, elsewhere = files_digest(Path(outside[0].anchor), outside, stat_cache)
    return count + more, hashlib.sha256(f"{digest}\n{elsewhere}".encode()).hexdigest()


def check_image_id(source: Path, image_id: str, where: str) -> None:
    """An image id is a file name without its suffix: it names cache entries, pictures and VOC files."""
    if not image_id or image_id in (".", "..") or any(ord(character) < 32 for character in image_id):
        raise DataSetError(source, f"{where}: {image_id!r} cannot be an image id (the file name without its suffix)")


def check_unique_ids(source: Path, paths: dict[str, list[Path]]) -> None:
    """Image ids are file names without suffix: two files of one name would be one image."""
    for image_id, found in paths.items():
        distinct = list(dict.fromkeys(found))
        if len(distinct) > 1:
            raise DataSetError(source, f"two images share the name {image_id!r} ({distinct[0]} and {distinct[1]}); "
                                       f"image ids are file names without their suffix: rename one")


def category_problem(name) -> str | None:
    """Why a category or class name from a file cannot be a class (class_name_problem, above)."""
    if not isinstance(name, str) or not name.strip():
        return "is not a name"
    return class_name_problem(name)


def read_rgb(path: Path, expected_width: int | None = None, expected_height: int | None = None) -> np.ndarray:
    """Decode an image fully (so a truncated file is caught here) into RGB uint8[H, W, 3]."""
    if not path.is_file():
        raise BadInputError(path, "image file is missing")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise BadInputError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInputError(path, f"image is truncated or corrupt ({exc})") from None
    height, width = rgb.shape[:2]
    if expected_width is not None and (width, height) != (expected_width, expected_height):
        raise BadInputError(path, f"image is {width}x{height} but its annotation says "
                                  f"{expected_width}x{expected_height}")
    return rgb
