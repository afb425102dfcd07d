"""Which reader opens --data, `rcnn data convert` and `rcnn data shapes --format`: round trips through COCO and
YOLO give the VOC set back, the identity follows the files' content and not their folder, a run on the COCO form
of a set gives the VOC form's mAP, and BCCD converted to COCO reads as BCCD (skipped without ../shared/data)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny import options

from pipeline.cli import main
from pipeline.data.coco import CocoDataset
from pipeline.data.convert import convert, whole_pixels
from pipeline.data.formats import open_dataset
from pipeline.data.reader import VOCAnnotation, VOCObject
from pipeline.data.voc import VOCDataset
from pipeline.data.yolo import YoloDataset
from pipeline.engine.errors import DataSetError, UserError

SPLITS = ("train", "val", "trainval", "test")
BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def data_section(root, **values) -> dict:
    return {"root": str(root), "format": "auto", "classes": [], "train_split": "trainval", "test_split": "test",
            "on_bad_input": "error", **values}


def contents(dataset, with_difficult=True) -> dict:
    """Every split's image ids with each image's boxes, class names (and difficult flags) and image bytes."""
    def image(image_id):
        boxes, labels, difficult = dataset.ground_truth(image_id)
        names = [dataset.classes[label] for label in labels]
        return (image_id, boxes.tolist(), names, difficult.tolist() if with_difficult else None,
                dataset.image_path(image_id).read_bytes())
    return {split: [image(image_id) for image_id in dataset.image_ids(split)] for split in SPLITS}


def test_voc_to_coco_to_voc_gives_the_same_boxes_classes_flags_and_splits(shapes_root, tmp_path):
    convert(VOCDataset(shapes_root), tmp_path / "coco", "coco")
    convert(CocoDataset(tmp_path / "coco", ["trainval", "test"]), tmp_path / "voc", "voc")
    back = VOCDataset(tmp_path / "voc")
    assert sorted(back.splits()) == sorted(SPLITS) and back.classes == VOCDataset(shapes_root).classes
    assert contents(back) == contents(VOCDataset(shapes_root))
    assert any(flag for split in contents(back).values() for *_, flags, _ in [image[:4] for image in split]
               for flag in flags)  # the set has difficult objects, and they came back


def test_voc_to_yolo_to_voc_gives_the_same_boxes_classes_and_splits(shapes_root, tmp_path):
    convert(VOCDataset(shapes_root), tmp_path / "yolo", "yolo")
    convert(YoloDataset(tmp_path / "yolo" / "data.yaml", ["trainval", "test"]), tmp_path / "voc", "voc")
    back = VOCDataset(tmp_path / "voc")
    assert sorted(back.splits()) == sorted(SPLITS) and back.classes == VOCDataset(shapes_root).classes
    assert contents(back, with_difficult=False) == contents(VOCDataset(shapes_root), with_difficult=False)


def test_whole_pixels_round_each_edge_to_the_nearest_and_keep_at_least_one_pixel():
    annotation = VOCAnnotation("x", 100, 50, (VOCObject("a", (10.4, 20.5, 10.7, 26.49), False, False),
                                              VOCObject("a", (99.8, 0.0, 100.0, 0.3), True, True)))
    assert [obj.box for obj in whole_pixels(annotation).objects] == [(10.0, 21.0, 11.0, 26.0), (99.0, 0.0, 100.0, 1.0)]
    assert [obj.difficult for obj in whole_pixels(annotation).objects] == [False, True]


def test_convert_refuses_a_folder_that_is_not_empty(shapes_root, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert(VOCDataset(shapes_root), tmp_path / "out", "coco")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_rcnn_data_convert_writes_what_the_reader_reads(shapes_root, tmp_path, capsys):
    assert main(["data", "convert", "--data", str(shapes_root), "--to", "coco", str(tmp_path / "coco"),
                 "--splits", "trainval", "test"]) == 0
    assert "wrote 16 images" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "coco" / "annotations").iterdir()) == [
        "instances_test.json", "instances_trainval.json"]
    assert main(["data", "convert", "--data", str(shapes_root), "--to", "voc", str(tmp_path / "coco")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("data_format, marker_file", [("coco", "annotations/instances_trainval.json"),
                                                      ("yolo", "data.yaml")])
def test_shapes_in_each_format_reads_as_the_voc_set(shapes_root, tmp_path, capsys, data_format, marker_file):
    out = tmp_path / data_format
    assert main(["data", "shapes", "--out", str(out), "--images", "16", "--format", data_format]) == 0
    assert (out / marker_file).is_file() and not (out / "SegmentationClass").exists()
    dataset = open_dataset(data_section(out))
    assert contents(dataset, with_difficult=data_format == "coco") == contents(
        VOCDataset(shapes_root), with_difficult=data_format == "coco")
    capsys.readouterr()
    assert main(["data", "shapes", "--out", str(out), "--images", "16", "--format", data_format]) == 0
    assert capsys.readouterr().out.startswith("up to date")


# ---- which reader -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(shapes_root, tmp_path_factory):
    """The tiny set as COCO json and in the YOLO layout."""
    folder = tmp_path_factory.mktemp("converted")
    for data_format in ("coco", "yolo"):
        convert(VOCDataset(shapes_root), folder / data_format, data_format)
    return folder


def test_the_format_is_detected_from_what_is_there(shapes_root, converted):
    assert type(open_dataset(data_section(shapes_root))) is VOCDataset
    assert type(open_dataset(data_section(converted / "coco"))) is CocoDataset
    assert type(open_dataset(data_section(converted / "yolo"))) is YoloDataset
    assert type(open_dataset(data_section(converted / "yolo" / "data.yaml"))) is YoloDataset


def test_a_coco_file_as_data_is_the_training_split_of_its_folder(converted):
    data = data_section(converted / "coco" / "annotations" / "instances_trainval.json",
                        test_split=str(converted / "coco" / "annotations" / "instances_test.json"))
    dataset = open_dataset(data)
    assert type(dataset) is CocoDataset and dataset.root == converted / "coco"
    assert (data["root"], data["train_split"], data["test_split"]) == (str(converted / "coco"), "trainval", "test")


def test_a_folder_of_two_formats_is_an_error_until_data_format_chooses(shapes_copy, converted):
    shutil.copy(converted / "yolo" / "data.yaml", shapes_copy / "data.yaml")
    with pytest.raises(DataSetError, match=r"several formats \(voc: Annotations/\*.xml; yolo: data.yaml\); choose "
                                           r"one with --set data.format=voc\|yolo"):
        open_dataset(data_section(shapes_copy))
    assert type(open_dataset(data_section(shapes_copy, format="voc"))) is VOCDataset


def test_a_folder_of_no_format_says_how_to_make_a_data_set(tmp_path):
    with pytest.raises(DataSetError, match="not a data set: no Annotations/.*rcnn data shapes"):
        open_dataset(data_section(tmp_path))



def keys_of(capsys, data, cache, *sets) -> dict:
    capsys.readouterr()
    assert main(["status", "--json", "--data", str(data), "--cache", str(cache), *sets]) == 0
    return {row["stage"]: row.get("key") for row in json.loads(capsys.readouterr().out)["stages"]}


def test_moving_a_coco_set_keeps_every_key_and_editing_a_box_changes_them(converted, tmp_path, capsys):
    folder = keys_of(capsys, converted / "coco", tmp_path / "cache")
    single_file = keys_of(capsys, converted / "coco" / "annotations" / "instances_trainval.json", tmp_path / "cache",
                          "--set", f"data.test_split={converted / 'coco' / 'annotations' / 'instances_test.json'}")
    moved = shutil.copytree(converted / "coco", tmp_path / "elsewhere" / "coco")
    assert single_file == folder and keys_of(capsys, moved, tmp_path / "cache") == folder
    path = moved / "annotations" / "instances_test.json"
    content = json.loads(path.read_text())
    content["annotations"][0]["bbox"][2] -= 1
    path.write_text(json.dumps(content))
    assert keys_of(capsys, moved, tmp_path / "cache")["proposals"] != folder["proposals"]


def test_moving_a_yolo_set_keeps_its_identity_and_editing_a_label_changes_it(converted, tmp_path):
    moved = shutil.copytree(converted / "yolo", tmp_path / "yolo")
    def identity(root):
        return YoloDataset(root / "data.yaml", ["trainval", "test"]).identity(["trainval", "test"], tmp_path / "memo")
    assert identity(moved) == identity(converted / "yolo")
    label = next((moved / "labels").glob("*.txt"))
    label.write_text(label.read_text().replace("0.", "0.0", 1))
    assert identity(moved)["digest"] != identity(converted / "yolo")["digest"]


@pytest.mark.skipif(not BCCD.is_dir(), reason="../shared/data/bccd is absent")
def test_bccd_converted_to_coco_json_reads_as_the_voc_reader_reads_it(tmp_path):
    voc = VOCDataset(BCCD)
    convert(voc, tmp_path / "bccd", "coco", ["trainval", "test"])
    read = CocoDataset(tmp_path / "bccd", ["trainval", "test"])
    assert read.classes == voc.classes == ["Platelets", "RBC", "WBC"]
    for split in ("trainval", "test"):
        assert read.image_ids(split) == voc.image_ids(split)
        for image_id in voc.image_ids(split):
            for ours, theirs in zip(read.ground_truth(image_id), voc.ground_truth(image_id)):
                assert np.array_equal(ours, theirs)
            assert read.image_path(image_id).read_bytes() == voc.image_path(image_id).read_bytes()
    assert sum(len(read.ground_truth(image_id)[0]) for image_id in read.image_ids("trainval") +
               read.image_ids("test")) == 4886


@pytest.mark.slow
def test_a_run_on_the_coco_form_gives_the_voc_forms_map(shapes_root, tmp_path):
    """The tiny R-CNN run (tests/tiny.py) on the tiny set and on the same set as COCO json: the same detections,
    so the same VOC and COCO APs, though COCO's are scored against the converted file itself (its own image ids,
    not the conversion's 1, 2, ...)."""
    convert(VOCDataset(shapes_root), tmp_path / "shapes-coco", "coco", ["trainval", "test"])  # test ids from 12
    for form, data in (("voc", shapes_root), ("coco", tmp_path / "shapes-coco")):
        assert main(["run", *options(data, tmp_path / form / "cache", tmp_path / form / "reports")]) == 0
    voc_map, coco_map = (json.loads((tmp_path / form / "reports" / "demo" / "rcnn-evaluate" / "map.json").read_text())
                         for form in ("voc", "coco"))
    assert coco_map == voc_map and voc_map["coco"]["svm_bbox"]["ap50"] > 0
    truth = json.loads((tmp_path / "coco" / "reports" / "demo" / "rcnn-evaluate" / "coco" / "ground_truth.json")
                       .read_text())
    own = json.loads((tmp_path / "shapes-coco" / "annotations" / "instances_test.json").read_text())
    assert truth["images"] == own["images"] and truth["categories"] == own["categories"]
    assert [image["id"] for image in truth["images"]] != list(range(1, len(truth["images"]) + 1))
