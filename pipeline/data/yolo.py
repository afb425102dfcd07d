"""A reader (and writer) for the Ultralytics YOLO layout, strict about bad input.

    <root>/data.yaml            names (a list, or {index: name}), and each split: a folder of images, a .txt
                                list of image paths (relative to the list's folder), or a list of these;
                                `path` moves the root (relative to data.yaml's folder)
    <root>/images/.../<id>.jpg  the images
    <root>/labels/.../<id>.txt  one line per object: class x_center y_center width height, normalised to 0-1;
                                the label of an image is its path with the last images/ folder made labels/
                                and the suffix .txt; an image without a label file is a negative

Boxes are converted exactly: each value is read as the decimal it is written as (fractions.Fraction), the
corners (x_center -/+ width / 2) * image width are computed without rounding, and only the result becomes a
float. A corner beyond the image border by at most 1e-6 of the image side (the rounding of a value written
with six decimals) is put on the border; further is an error, as is a box without width or height. YOLO has
no difficult or truncated flags. An image's id is its file name without the suffix (names must be unique).
Every problem is one line naming the file and the line; with on_bad_input="skip" the image is left out
and listed in `skipped`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import yaml
from PIL import Image, UnidentifiedImageError

from pipeline import coco
from pipeline.data.reader import AnnotatedImages, VOCAnnotation, VOCObject, category_problem, check_image_id
from pipeline.engine.cache import write_bytes
from pipeline.engine.errors import BadInputError, DataSetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
NOT_SPLITS = ("path", "names", "nc", "download", "channels")  # data.yaml keys that name no split
BORDER_TOLERANCE = Fraction(1, 10**6)  # of the image side: the rounding of six-decimal labels
ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class YoloImage:
    image: Path
    label: Path
    listed_in: Path  # the list file (or data.yaml for a folder) that names the image
    line: int  # its line in a list file, 0 for a folder's image


class YoloDataset(AnnotatedImages):
    """The data set a data.yaml describes. `splits`: the splits the stages read (the training split, where the
    class list comes from, first): checked now, and where an image is looked up first."""
    format = "yolo"

    def __init__(self, yaml_path, splits: list[str], classes=None, on_bad_input: str = "error"):
        self.yaml_path = Path(yaml_path)
        spec = read_yaml(self.yaml_path)
        root = self.yaml_path.parent
        if spec.get("path"):
            root = root / str(spec["path"])
        super().__init__(root, classes, splits[0], on_bad_input)
        self.names = class_names(self.yaml_path, spec)
        self._entries = {key: value for key, value in spec.items() if key not in NOT_SPLITS}
        self._used_splits = list(splits)
        for split in splits:
            self._entry(split)
        self._listing: dict[str, list[str]] = {}
        self._items: dict[str, YoloImage] = {}
        self._object_lines: dict[str, list[int]] = {}

    def __getstate__(self):
        return {**super().__getstate__(), "_object_lines": {}}

    # ---- splits -------------------------------------------------------------------------------
    def splits(self) -> list[str]:
        return [key for key, value in self._entries.items() if isinstance(value, (str, list))]

    def split_file(self, split: str) -> Path:
        """The list file a split names (a single .txt), else data.yaml, where the split is defined."""
        entry = self._entry(split)
        if isinstance(entry, str) and entry.endswith(".txt"):
            return self._resolve(entry)
        return self.yaml_path

    def _entry(self, split: str):
        entry = self._entries.get(split)
        if not (isinstance(entry, str) or isinstance(entry, list) and all(isinstance(item, str) for item in entry)):
            raise DataSetError(self.yaml_path, f"no split {split!r} here (splits: {', '.join(self.splits()) or 'none'}); "
                                               f"set data.train_split and data.test_split to the splits to use")
        return entry

    def _resolve(self, relative: str) -> Path:
        return Path(relative) if Path(relative).is_absolute() else self.root / relative

    def listed_ids(self, split: str) -> list[str]:
        if split not in self._listing:
            entry = self._entry(split)
            ids = []
            for item in [entry] if isinstance(entry, str) else entry:
                ids += [self._register(found) for found in self._images_of(self._resolve(item), split)]
            self._listing[split] = list(dict.fromkeys(ids))
        return self._listing[split]

    def _images_of(self, path: Path, split: str) -> list[YoloImage]:
        if path.is_dir():
            return [YoloImage(image, label_path(image), self.yaml_path, 0)
                    for image in sorted(path.rglob("*")) if image.suffix.lower() in IMAGE_SUFFIXES]
        if path.suffix == ".txt" and path.is_file():
            listed = []
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if line.strip():
                    image = Path(line.strip())
                    image = image if image.is_absolute() else path.parent / image
                    listed.append(YoloImage(image, label_path(image), path, number))
            return listed
        raise DataSetError(self.yaml_path, f"split {split!r}: {path} is neither a folder of images nor a .txt list "
                                           f"of them")

    def _register(self, found: YoloImage) -> str:
        image_id = found.image.stem
        where = f"line {found.line}" if found.line else f"split folder {found.image.parent}"
        check_image_id(found.listed_in, image_id, where)
        known = self._items.setdefault(image_id, found)
        if known.image != found.image:
            raise DataSetError(found.listed_in, f"two images share the name {image_id!r} ({known.image} and "
                                                f"{found.image}); image ids are file names without their suffix: "
                                                f"rename one")
        return image_id

    def _item(self, image_id: str) -> YoloImage:
        if image_id not in self._items:  # a worker that has listed nothing yet
            for split in self._used_splits:
                if image_id in self.listed_ids(split):
                    break
        return self._items[image_id]

    # ---- annotations --------------------------------------------------------------------------
    def _parsed(self, image_id: str) -> VOCAnnotation:
        item = self._item(image_id)
        width, height = image_size(item)
        objects, lines = [], []
        if item.label.is_file():
            for number, line in enumerate(item.label.read_text().splitlines(), start=1):
                if line.strip():
                    objects.append(self._object(item.label, number, line.split(), width, height))
                    lines.append(number)
        self._object_lines[image_id] = lines
        return VOCAnnotation(image_id, width, height, tuple(objects))

    def _object(self, path: Path, number: int, fields: list[str], width: int, height: int) -> VOCObject:
        where = f"line {number}"
        if len(fields) != 5:
            raise BadInputError(path, f"{where}: {len(fields)} fields, expected 5 (class x_center y_center width "
                                      f"height, normalised to 0-1; polygon labels are not read)")
        if not fields[0].isdigit() or int(fields[0]) >= len(self.names):
            raise BadInputError(path, f"{where}: class {fields[0]!r} is not an index of data.yaml's names "
                                      f"(0-{len(self.names) - 1})")
        try:
            center_x, center_y, box_width, box_height = (Fraction(text) for text in fields[1:])
        except ValueError:
            raise BadInputError(path, f"{where}: {' '.join(fields[1:])!r} are not four numbers") from None
        if box_width <= 0 or box_height <= 0:
            raise BadInputError(path, f"{where}: box has no width or height ({' '.join(fields[1:])})")
        corners = (center_x - box_width / 2, center_y - box_height / 2,
                   center_x + box_width / 2, center_y + box_height / 2)
        if min(corners) < -BORDER_TOLERANCE or max(corners) > 1 + BORDER_TOLERANCE:
            raise BadInputError(path, f"{where}: box ({' '.join(fields[1:])}) lies outside the image (its corners "
                                      f"{', '.join(f'{float(corner):g}' for corner in corners)} are not within 0-1)")
        x1, y1, x2, y2 = (min(max(corner, Fraction(0)), Fraction(1)) for corner in corners)
        return VOCObject(self.names[int(fields[0])], (float(x1 * width), float(y1 * height), float(x2 * width),
                                                      float(y2 * height)), difficult=False, truncated=False)

    def _object_source(self, image_id: str, index: int) -> tuple[Path, str]:
        return self._item(image_id).label, f"line {self._object_lines[image_id][index]}"

    def _skip_key(self, error: BadInputError, image_id: str | None) -> str:
        if image_id is not None and error.path == str(self._item(image_id).listed_in):
            return f"{error.path} (image {self._item(image_id).image})"
        return error.path

    def coco_ground_truth(self, split: str, image_ids: list[str]) -> coco.GroundTruth:
        """These images' boxes as COCO ground truth (pipeline.coco.converted; YOLO has no COCO ids)."""
        return coco.converted(self, image_ids)

    # ---- images -------------------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        return self._item(image_id).image

    def identity_files(self, splits: list[str]) -> list[Path]:
        files = [self.yaml_path]
        for split in splits:
            files.append(self.split_file(split))
            for image_id in self.listed_ids(split):
                item = self._item(image_id)
                files += [item.image, item.label] if item.label.is_file() else [item.image]
        return files


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DataSetError(path, "data.yaml is missing (the YOLO layout's file of class names and splits)")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataSetError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise DataSetError(path, "expected a mapping with names and the splits (train, val, ...)")
    return spec


def class_names(path: Path, spec: dict) -> list[str]:
    """data.yaml's names: a list, or a mapping of every index from 0 to a name; checked as class names."""
    names = spec.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataSetError(path, f"names: the indices {sorted(names)} are not 0 to {len(names) - 1}")
        names = [names[index] for index in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataSetError(path, "names is missing or empty (a list of class names, or {index: name})")
    for index, name in enumerate(names):
        problem = category_problem(name)
        if problem:
            raise DataSetError(path, f"names: class {index} ({name!r}) {problem} (class names name files)")
        if names.index(name) != index:
            raise DataSetError(path, f"names: classes {names.index(name)} and {index} are both named {name!r}")
    if "nc" in spec and spec["nc"] != len(names):
        raise DataSetError(path, f"nc is {spec['nc']!r} but names lists {len(names)} classes")
    return names


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last images/ folder of the image's path becomes labels/, the suffix .txt."""
    parts = list(image.parts)
    folders = [index for index, part in enumerate(parts[:-1]) if part == "images"]
    if folders:
        parts[folders[-1]] = "labels"
    return Path(*parts).with_suffix(".txt")


def image_size(item: YoloImage) -> tuple[int, int]:
    """(width, height) from the image's header; the labels are relative to it."""
    if not item.image.is_file():
        where = f"line {item.line}: " if item.line else ""
        raise BadInputError(item.listed_in, f"{where}image file {item.image} is missing")
    try:
        with Image.open(item.image) as image:
            orientation = image.getexif().get(ORIENTATION, 1)
            size = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise BadInputError(item.image, "not a readable image (unknown or corrupt format)") from None
    if orientation not in (0, 1):
        raise BadInputError(item.image, f"the image is stored rotated (EXIF orientation {orientation}), which the "
                                        f"pipeline does not apply but YOLO labels assume; save it upright")
    return size


def write_yolo(out: Path, classes: list[str], splits: dict[str, list[str]], annotations: dict[str, VOCAnnotation],
               image_paths: dict[str, Path]) -> None:
    """images/<file> and labels/<id>.txt once for every image, <split>.txt listing each split's images, and
    data.yaml. Values are written as Python writes a float (shortest exact form); difficult and truncated
    objects become plain objects (YOLO has no flags)."""
    clash = sorted(set(splits) & set(NOT_SPLITS))
    if clash:
        raise DataSetError(out / "data.yaml", f"a split named {clash[0]!r} would be read as data.yaml's own key")
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    class_index = {name: index for index, name in enumerate(classes)}
    files = {}
    for image_id in dict.fromkeys(image_id for ids in splits.values() for image_id in ids):
        files[image_id] = f"{image_id}{image_paths[image_id].suffix.lower()}"
        shutil.copyfile(image_paths[image_id], out / "images" / files[image_id])
        annotation = annotations[image_id]
        lines = [f"{class_index[obj.name]} {(obj.box[0] + obj.box[2]) / 2 / annotation.width!r} "
                 f"{(obj.box[1] + obj.box[3]) / 2 / annotation.height!r} "
                 f"{(obj.box[2] - obj.box[0]) / annotation.width!r} {(obj.box[3] - obj.box[1]) / annotation.height!r}\n"
                 for obj in annotation.objects]
        write_bytes(out / "labels" / f"{image_id}.txt", "".join(lines).encode())
    for split, ids in splits.items():
        write_bytes(out / f"{split}.txt", "".join(f"./images/{files[image_id]}\n" for image_id in ids).encode())
    spec = {"names": dict(enumerate(classes)), "nc": len(classes), **{split: f"{split}.txt" for split in splits}}
    write_bytes(out / "data.yaml", ("# Ultralytics YOLO layout, written by rcnn-pipeline\n" +
                                    yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)).encode())
