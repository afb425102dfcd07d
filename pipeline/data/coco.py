"""A reader (and writer) for COCO detection files, strict about bad input.

    <root>/annotations/instances_<split>.json   (or annotations/<split>.json, <split>.json, instances_<split>.json,
                                                 or any .json file named as the split)
    images: <root>/images/<split>/<file_name>, <root>/<split>/<file_name>, <root>/images/<file_name>,
            <root>/<file_name>, or <file_name> beside the split's json file: the first that exists

One json file per split, holding `images` (id, file_name, width, height), `annotations` (id, image_id,
category_id, bbox [x, y, width, height] in pixels, iscrowd) and `categories` (id, name). COCO's boxes are
continuous pixel coordinates, the pipeline's own (pipeline.boxes): (x1, y1, x2, y2) = (x, y, x + width,
y + height), no pixel added or taken, and the rules are the VOC reader's: inside the image, width and height
above 0. `iscrowd: 1` is VOC's difficult (neither a hit nor a miss). An image without annotations is a
negative. An image's id in the pipeline is its file name without the suffix (so names must be unique); its
COCO id is kept for the evaluation, which scores detections against this file itself (`coco_ground_truth`).
Every problem is one line naming the json file and the image or annotation id; with on_bad_input="skip" a
bad image is left out (and an annotation of no image dropped) and listed in `skipped`.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath

from pipeline import coco
from pipeline.data.reader import AnnotatedImages, VOCAnnotation, VOCObject, category_problem, check_image_id
from pipeline.engine.cache import write_bytes
from pipeline.engine.errors import BadInputError, DataSetError


@dataclass
class CocoSplit:
    """One split's json file, indexed: images by the pipeline's image id, annotations by COCO image id."""
    path: Path
    name: str  # the split's name for finding its images (images/<name>/, <name>/)
    images: dict[str, dict] = field(default_factory=dict)
    annotations: dict[int, list[dict]] = field(default_factory=dict)
    categories: dict[int, dict] = field(default_factory=dict)


class CocoDataset(AnnotatedImages):
    """COCO json files under one root. `splits`: the splits the stages read (the training split first), each a
    name or a json file's path (absolute, or relative to the root): their files are found now, and an image is
    looked up in them."""
    format = "coco"

    def __init__(self, root, splits: list[str], classes=None, on_bad_input: str = "error"):
        super().__init__(root, classes, splits[0], on_bad_input)
        if not self.root.is_dir():
            raise DataSetError(self.root, "no such folder (the COCO data set's folder, which holds its images)")
        self._split_files = {split: find_split_file(self.root, split) for split in splits}
        self._splits: dict[str, CocoSplit] = {}
        self._image_paths: dict[str, Path] = {}

    def __getstate__(self):
        return {**super().__getstate__(), "_splits": {}, "_image_paths": {}}

    # ---- splits -------------------------------------------------------------------------------
    def split_file(self, split: str) -> Path:
        if split not in self._split_files:
            self._split_files[split] = find_split_file(self.root, split)
        return self._split_files[split]

    def splits(self) -> list[str]:
        """Those of annotations/instances_*.json (COCO's own folder also holds captions_* and person_keypoints_*),
        else of annotations/*.json, else the splits the reader was given."""
        folder = self.root / "annotations"
        files = (sorted(folder.glob("instances_*.json")) or sorted(folder.glob("*.json"))) if folder.is_dir() else []
        return [split_name(path) for path in files] or list(self._split_files)

    def listed_ids(self, split: str) -> list[str]:
        return list(self._split(split).images)

    def _split(self, split: str) -> CocoSplit:
        if split not in self._splits:
            path = self.split_file(split)
            self._splits[split] = self._read_split(path, split_name(path) if split.endswith(".json") else split)
            self._check_shared_images(split)
        return self._splits[split]

    def _read_split(self, path: Path, name: str) -> CocoSplit:
        content = read_json(path)
        read = CocoSplit(path, name)
        numbers: dict[int, str] = {}
        for position, entry in enumerate(content["images"]):
            where = f"images[{position}]"
            if not isinstance(entry, dict) or not is_whole(entry.get("id")) or not entry.get("file_name") \
                    or not isinstance(entry["file_name"], str):
                raise DataSetError(path, f"{where} is not an image entry with an integer id and a file_name")
            image_id = PurePosixPath(entry["file_name"].replace("\\", "/")).stem
            check_image_id(path, image_id, f"image {entry['id']} ({entry['file_name']})")
            if entry["id"] in numbers:
                raise DataSetError(path, f"image id {entry['id']} is used twice ({numbers[entry['id']]} and "
                                         f"{entry['file_name']}); image ids must be unique")
            if image_id in read.images:
                raise DataSetError(path, f"two images share the name {image_id!r} ({read.images[image_id]['file_name']} "
                                         f"and {entry['file_name']}); image ids are file names without their suffix: "
                                         f"rename one")
            numbers[entry["id"]], read.images[image_id] = entry["file_name"], entry
        for entry in content["categories"]:
            if not isinstance(entry, dict) or not is_whole(entry.get("id")):
                raise DataSetError(path, f"category {entry!r} has no integer id")
            if entry["id"] in read.categories:
                raise DataSetError(path, f"category id {entry['id']} is used twice; category ids must be unique")
            problem = category_problem(entry.get("name"))
            if problem:
                raise DataSetError(path, f"category {entry['id']}: name {entry.get('name')!r} {problem} (class names "
                                         f"name files)")
            named = [other["id"] for other in read.categories.values() if other["name"] == entry["name"]]
            if named:
                raise DataSetError(path, f"categories {named[0]} and {entry['id']} are both named {entry['name']!r}")
            read.categories[entry["id"]] = entry
        seen: set[int] = set()
        for position, entry in enumerate(content["annotations"]):
            if not isinstance(entry, dict) or not is_whole(entry.get("id")):
                raise DataSetError(path, f"annotations[{position}] has no integer id")
            if entry["id"] in seen:
                raise DataSetError(path, f"annotation id {entry['id']} is used twice; annotation ids must be unique")
            seen.add(entry["id"])
            if entry.get("image_id") not in numbers or not is_whole(entry.get("image_id")):
                problem = f"annotation {entry['id']}: image_id {entry.get('image_id')!r} is not the id of any image " \
                          f"in this file"
                if self.on_bad_input == "error":
                    raise BadInputError(path, problem)
                self.skipped[f"{path} (annotation {entry['id']})"] = problem  # dropped; no image to leave out
                continue
            read.annotations.setdefault(entry["image_id"], []).append(entry)
        return read

    def _check_shared_images(self, split: str) -> None:
        """An image id two split files both list must be the same image with the same boxes in each."""
        new = self._splits[split]
        for other in self._splits.values():
            if other is new:
                continue
            for image_id in new.images.keys() & other.images.keys():
                if _signature(new, image_id) != _signature(other, image_id):
                    raise DataSetError(new.path, f"image {image_id!r} differs from the image of that name in "
                                                 f"{other.path} (file, size or annotations); an image listed by two "
                                                 f"splits must be the same in both")

    def _owner(self, image_id: str) -> CocoSplit:
        """The split file that lists the image: those read so far, else every split named to the reader."""
        for read in self._splits.values():
            if image_id in read.images:
                return read
        for split in self._split_files:
            if image_id in self._split(split).images:
                return self._splits[split]
        raise KeyError(f"image {image_id!r} is in none of the splits read ({', '.join(self._split_files)})")

    # ---- annotations --------------------------------------------------------------------------
    def _parsed(self, image_id: str) -> VOCAnnotation:
        read = self._owner(image_id)
        entry = read.images[image_id]
        about = f"image {entry['id']} ({entry['file_name']})"
        width, height = entry.get("width"), entry.get("height")
        if not (is_whole(width) and is_whole(height) and width >= 1 and height >= 1):
            raise BadInputError(read.path, f"{about}: width and height must be whole numbers >= 1, not "
                                           f"{width!r} and {height!r}")
        self._image_paths[image_id] = locate_image(self.root, read, entry["file_name"], about)
        objects = tuple(_object(read, annotation, int(width), int(height))
                        for annotation in read.annotations.get(entry["id"], []))
        return VOCAnnotation(image_id, int(width), int(height), objects)

    def _object_source(self, image_id: str, index: int) -> tuple[Path, str]:
        read = self._owner(image_id)
        annotation = read.annotations[read.images[image_id]["id"]][index]
        return read.path, f"annotation {annotation['id']} (image {annotation['image_id']})"

    def _skip_key(self, error: BadInputError, image_id: str | None) -> str:
        if image_id is not None and error.path == str(self._owner(image_id).path):
            return f"{error.path} (image {self._owner(image_id).images[image_id]['file_name']})"
        return error.path

    def coco_ground_truth(self, split: str, image_ids: list[str]) -> coco.GroundTruth:
        """The split file itself, cut to these images: its image, annotation and category ids, so that the
        detections are scored against the user's own file (COCO ids of classes it lacks: new ones)."""
        read = self._split(split)
        images = [read.images[image_id] for image_id in image_ids]
        annotations = [{"area": annotation["bbox"][2] * annotation["bbox"][3], "iscrowd": 0, **annotation}
                       for entry in images for annotation in read.annotations.get(entry["id"], [])]
        by_name = {entry["name"]: entry for entry in read.categories.values()}
        spare = max([0, *read.categories]) + 1
        categories = []
        for index, name in enumerate(self.classes):
            categories.append(by_name.get(name) or {"id": spare + index, "name": name, "supercategory": "object"})
        return coco.GroundTruth({"images": images, "annotations": annotations, "categories": categories},
                                {image_id: read.images[image_id]["id"] for image_id in image_ids},
                                tuple(category["id"] for category in categories))

    # ---- images -------------------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        if image_id not in self._image_paths:
            read = self._owner(image_id)
            entry = read.images[image_id]
            try:
                self._image_paths[image_id] = locate_image(self.root, read, entry["file_name"], "")
            except BadInputError:
                return image_candidates(self.root, read, entry["file_name"])[0]
        return self._image_paths[image_id]

    def identity_files(self, splits: list[str]) -> list[Path]:
        return [*(self.split_file(split) for split in splits),
                *(self.image_path(image_id) for split in splits for image_id in self.listed_ids(split))]


def _signature(read: CocoSplit, image_id: str) -> tuple:
    entry = read.images[image_id]
    objects = sorted((read.categories.get(annotation.get("category_id"), {}).get("name", ""),
                      json.dumps(annotation.get("bbox")), bool(annotation.get("iscrowd")))
                     for annotation in read.annotations.get(entry["id"], []))
    return entry["file_name"], entry.get("width"), entry.get("height"), objects


def _object(read: CocoSplit, annotation: dict, width: int, height: int) -> VOCObject:
    """One annotation as a VOCObject, checked as the VOC reader checks a box."""
    where = f"annotation {annotation['id']} (image {annotation['image_id']})"
    category = read.categories.get(annotation.get("category_id"))
    if category is None:
        raise BadInputError(read.path, f"{where}: category_id {annotation.get('category_id')!r} is not the id of "
                                       f"any category in this file")
    bbox = annotation.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(value) for value in bbox)):
        raise BadInputError(read.path, f"{where}: bbox {bbox!r} is not [x, y, width, height] (four finite numbers)")
    if annotation.get("iscrowd", 0) not in (0, 1):
        raise BadInputError(read.path, f"{where}: iscrowd is {annotation['iscrowd']!r}, not 0 or 1")
    x, y, box_width, box_height = (float(value) for value in bbox)
    if box_width <= 0 or box_height <= 0:
        raise BadInputError(read.path, f"{where}: box has no width or height (bbox [{x:g}, {y:g}, {box_width:g}, "
                                       f"{box_height:g}])")
    if x < 0 or y < 0 or x + box_width > width or y + box_height > height:
        raise BadInputError(read.path, f"{where}: box [{x:g}, {y:g}, {box_width:g}, {box_height:g}] lies outside the "
                                       f"{width}x{height} image (COCO boxes are [x, y, width, height] in pixels)")
    return VOCObject(name=category["name"], box=(x, y, x + box_width, y + box_height),
                     difficult=bool(annotation.get("iscrowd", 0)), truncated=False)


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path: Path) -> dict:
    """A COCO file's content: images, annotations (default none) and categories; one line naming it otherwise.
    Parsed once per process for each size and mtime (a worker handed the data set again reuses it)."""
    if not path.is_file():
        raise DataSetError(path, "annotation file is missing")
    stat = path.stat()
    try:
        return _parsed_json(path.resolve(), stat.st_size, stat.st_mtime_ns)
    except DataSetError as error:
        raise DataSetError(path, error.problem) from None  # named as given


@lru_cache(maxsize=8)
def _parsed_json(path: Path, size: int, mtime_ns: int) -> dict:
    try:
        content = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise DataSetError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise DataSetError(path, f"not valid JSON (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    if not isinstance(content, dict):
        raise DataSetError(path, "not a COCO file (expected an object with images, annotations and categories)")
    content.setdefault("annotations", [])  # a COCO file of images with nothing in them may leave it out
    for key in ("images", "annotations", "categories"):
        if not isinstance(content.get(key), list):
            raise DataSetError(path, f"not a COCO file: {key!r} is {'missing' if key not in content else 'not a list'}")
    return content


# ---- where files are ------------------------------------------------------------------------------
def split_candidates(root: Path, split: str) -> list[Path]:
    return [root / "annotations" / f"instances_{split}.json", root / "annotations" / f"{split}.json",
            root / f"{split}.json", root / f"instances_{split}.json"]


def find_split_file(root: Path, split: str) -> Path:
    """The json file of a split: a path (ending in .json; relative to the root) or a name (module docstring)."""
    if split.endswith(".json"):
        path = Path(split) if Path(split).is_absolute() else root / split
        if not path.is_file():
            raise DataSetError(path, f"annotation file of split {split!r} is missing")
        return path
    candidates = split_candidates(root, split)
    for path in candidates:
        if path.is_file():
            return path
    found = sorted(split_name(path) for path in (root / "annotations").glob("*.json")) \
        if (root / "annotations").is_dir() else []
    raise DataSetError(candidates[0], f"annotation file of split {split!r} is missing (nor are "
                                      f"{', '.join(str(path.relative_to(root)) for path in candidates[1:])} there); "
                                      f"the splits found: {', '.join(found) or 'none'}; set data.train_split and "
                                      f"data.test_split to the splits to use")


def split_name(path: Path) -> str:
    """instances_val2017.json -> val2017, val.json -> val."""
    return path.stem.removeprefix("instances_")


def canonical_split(root: Path, path: Path) -> str:
    """How a split given as a json file is named in the config (and so in every cache key): its name when the
    file is where that name finds it, else its path inside the root, else its absolute path."""
    name = split_name(path)
    try:
        if find_split_file(root, name).resolve() == path.resolve():
            return name
    except DataSetError:
        pass
    if path.resolve().is_relative_to(root.resolve()):
        return path.resolve().relative_to(root.resolve()).as_posix()
    return str(path.resolve())


def image_candidates(root: Path, read: CocoSplit, file_name: str) -> list[Path]:
    if Path(file_name).is_absolute():
        return [Path(file_name)]
    candidates = [root / "images" / read.name / file_name, root / read.name / file_name, root / "images" / file_name,
                  root / file_name, read.path.parent / file_name]
    return list(dict.fromkeys(candidates))


def locate_image(root: Path, read: CocoSplit, file_name: str, about: str) -> Path:
    candidates = image_candidates(root, read, file_name)
    for path in candidates:
        if path.is_file():
            return path
    raise BadInputError(read.path, f"{about}: image file is missing (looked for "
                                   f"{', '.join(str(path) for path in candidates)})")


# ---- writing --------------------------------------------------------------------------------------
def write_coco(out: Path, classes: list[str], splits: dict[str, list[str]], annotations: dict[str, VOCAnnotation],
               image_paths: dict[str, Path]) -> None:
    """annotations/instances_<split>.json for each split and images/<file> once for every image (file_name: the
    file's name, found in images/). Image and annotation ids are the same in every split file; category ids are
    class index + 1; VOC's difficult becomes iscrowd (truncated has no COCO field and is not written)."""
    (out / "annotations").mkdir(parents=True)
    (out / "images").mkdir()
    numbers, objects = {}, {}
    for image_id in dict.fromkeys(image_id for ids in splits.values() for image_id in ids):
        numbers[image_id] = len(numbers) + 1
        first = sum(len(items) for items in objects.values()) + 1
        objects[image_id] = list(enumerate(annotations[image_id].objects, start=first))
        shutil.copyfile(image_paths[image_id], out / "images" / image_file_name(image_id, image_paths[image_id]))
    class_index = {name: index for index, name in enumerate(classes)}
    for split, ids in splits.items():
        content = {
            "images": [{"id": numbers[image_id], "file_name": image_file_name(image_id, image_paths[image_id]),
                        "width": annotations[image_id].width, "height": annotations[image_id].height}
                       for image_id in ids],
            "annotations": [{"id": number, "image_id": numbers[image_id], "category_id": class_index[obj.name] + 1,
                             "bbox": [obj.box[0], obj.box[1], obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]],
                             "area": (obj.box[2] - obj.box[0]) * (obj.box[3] - obj.box[1]),
                             "iscrowd": int(obj.difficult)}
                            for image_id in ids for number, obj in objects[image_id]],
            "categories": coco.categories(classes)}
        write_bytes(out / "annotations" / f"instances_{split}.json", (json.dumps(content) + "\n").encode())


def image_file_name(image_id: str, path: Path) -> str:
    return f"{image_id}{path.suffix.lower()}"
