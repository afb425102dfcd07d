"""Which reader opens `--data`: the VOC layout, COCO json files or the YOLO layout, by what is there
(`data.format: auto`) or as `data.format` says.

`--data` is a folder (VOC: Annotations/*.xml; COCO: annotations/*.json, or <train_split>.json; YOLO:
data.yaml), a COCO json file (the training split; its folder, or the folder above annotations/, is the data
set's folder) or a YOLO data.yaml. A COCO split given as a json file (`--set data.test_split=path/to/val.json`,
relative to the current folder or to the data set's folder) is renamed in the config to how every cache key
names it (pipeline.data.coco.canonical_split), so that moving the data set's folder re-runs nothing. A VOC
data set is opened exactly as before there were other formats: its identity, and every key, are unchanged.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.data.coco import CocoDataset, canonical_split, split_candidates
from pipeline.data.voc import VOCDataset
from pipeline.data.yolo import YoloDataset
from pipeline.engine.errors import DataSetError
from pipeline.engine.schema import register_choices

FORMATS = ("auto", "voc", "coco", "yolo")
register_choices("data.format", FORMATS)


def open_dataset(data: dict):
    """The reader of the config's data section (root, format, classes, train_split, test_split, on_bad_input);
    for a COCO data set, `data`'s root and splits are rewritten to the names the keys use."""
    root = Path(data["root"])
    data_format = detect_format(root, data["train_split"]) if data["format"] == "auto" else data["format"]
    if data_format == "voc":
        return VOCDataset(root, classes=data["classes"], class_split=data["train_split"],
                          on_bad_input=data["on_bad_input"])
    if data_format == "yolo":
        yaml_path = root if root.suffix in (".yaml", ".yml") else root / "data.yaml"
        return YoloDataset(yaml_path, [data["train_split"], data["test_split"]], data["classes"],
                           data["on_bad_input"])
    roles = ["train_split", "test_split"]
    if root.suffix == ".json":  # the single-file form: this file is the training split
        training = root
        root = root.parent.parent if root.parent.name == "annotations" else root.parent
        data["train_split"], roles = canonical_split(root, training), ["test_split"]
    for role in roles:
        if data[role].endswith(".json"):
            data[role] = canonical_split(root, json_path(root, data[role]))
    data["root"] = str(root)
    return CocoDataset(root, [data["train_split"], data["test_split"]], data["classes"], data["on_bad_input"])


def json_path(root: Path, given: str) -> Path:
    """A split given as a json file: its path as given (absolute, or from the current folder), else inside the
    data set's folder."""
    for path in (Path(given), root / given):
        if path.is_file():
            return path
    raise DataSetError(given, "no such annotation file (a split given as a .json file is found from the current "
                              "folder or the data set's folder)")


def detect_format(root: Path, train_split: str) -> str:
    """voc, coco or yolo, by what `root` holds; one line naming it when it holds none or several."""
    if not root.exists():
        raise DataSetError(root, "no such folder or file; generate a data set with `rcnn data shapes --out DIR`, "
                                 "or pass --data a VOC, COCO or YOLO data set")
    if root.is_file():
        if root.suffix == ".json":
            return "coco"
        if root.suffix in (".yaml", ".yml"):
            return "yolo"
        raise DataSetError(root, "not a data set: --data takes a folder (VOC, COCO or YOLO layout), a COCO .json "
                                 "file or a YOLO data.yaml")
    found = {}
    if next((root / "Annotations").glob("*.xml"), None):
        found["voc"] = "Annotations/*.xml"
    if next((root / "annotations").glob("*.json"), None):
        found["coco"] = "annotations/*.json"
    elif any(path.is_file() for path in split_candidates(root, train_split)):
        found["coco"] = f"{train_split}.json"
    if (root / "data.yaml").is_file():
        found["yolo"] = "data.yaml"
    if len(found) > 1:
        kinds = "; ".join(f"{name}: {evidence}" for name, evidence in found.items())
        raise DataSetError(root, f"holds data sets of several formats ({kinds}); choose one with "
                                 f"--set data.format={'|'.join(found)}")
    if not found:
        raise DataSetError(root, "not a data set: no Annotations/*.xml (VOC), annotations/*.json (COCO) or data.yaml "
                                 "(YOLO) here; generate one with `rcnn data shapes --out DIR`, or pass --data the "
                                 "data set's folder")
    return next(iter(found))
