"""The COCO reader on the generated set written as COCO json (rcnn data shapes --format coco): the same images,
boxes, classes and splits as the VOC reader; each kind of bad input one line naming the json file and the
annotation or image id; evaluation against the file's own ids."""
import json
import re
import shutil

import numpy as np
import pytest

from pipeline import coco
from pipeline.cli import main
from pipeline.data.coco import CocoDataset
from pipeline.data.shapes import write_shapes
from pipeline.data.voc import VOCDataset
from pipeline.engine.errors import BadInputError, DataSetError


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "shapes"
    write_shapes(root, images=16, seed=0, data_format="coco")
    return root


@pytest.fixture
def coco_copy(coco_root, tmp_path):
    return shutil.copytree(coco_root, tmp_path / "shapes")


def split_json(root, split="test"):
    return root / "annotations" / f"instances_{split}.json"


def edit(root, change, split="test"):
    """Apply change(content) to a split's json file."""
    path = split_json(root, split)
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))
    return content


def test_reads_the_voc_boxes_classes_and_splits_of_the_same_set(coco_root, shapes_root):
    voc, read = VOCDataset(shapes_root), CocoDataset(coco_root, ["trainval", "test"])
    assert read.classes == voc.classes
    for split in ("train", "val", "trainval", "test"):
        assert read.image_ids(split) == voc.image_ids(split)
    for image_id in voc.image_ids("trainval") + voc.image_ids("test"):
        for ours, theirs in zip(read.ground_truth(image_id), voc.ground_truth(image_id)):
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
        assert read.image_path(image_id).read_bytes() == voc.image_path(image_id).read_bytes()
    image_id = voc.image_ids("test")[0]
    assert np.array_equal(read.read_image(image_id), voc.read_image(image_id))
    assert not read.has_segmentation("trainval") and read.segmentation_ids("trainval") == []


def test_bbox_x_y_width_height_is_the_pipelines_box_without_a_pixel_added(coco_copy):
    def one_box(content):
        content["annotations"] = [dict(content["annotations"][0], bbox=[10.25, 20.5, 30.5, 40.125])]
    content = edit(coco_copy, one_box)
    image = next(entry for entry in content["images"] if entry["id"] == content["annotations"][0]["image_id"])
    image_id = image["file_name"].rsplit(".", 1)[0]
    boxes, _, _ = CocoDataset(coco_copy, ["trainval", "test"]).ground_truth(image_id)
    assert boxes.tolist() == [[10.25, 20.5, 40.75, 60.625]]


def test_iscrowd_is_difficult_and_an_image_without_annotations_is_a_negative(coco_copy):
    def crowd_first_and_empty_second(content):
        first, second = content["images"][0]["id"], content["images"][1]["id"]
        content["annotations"] = [dict(annotation, iscrowd=1) if annotation["image_id"] == first else annotation
                                  for annotation in content["annotations"] if annotation["image_id"] != second]
    content = edit(coco_copy, crowd_first_and_empty_second)
    read = CocoDataset(coco_copy, ["trainval", "test"])
    first, second = (entry["file_name"].rsplit(".", 1)[0] for entry in content["images"][:2])
    assert read.ground_truth(first)[2].all() and len(read.ground_truth(first)[2]) > 0
    assert second in read.image_ids("test") and len(read.ground_truth(second)[0]) == 0


def test_classes_are_the_sorted_category_names_the_training_split_uses(coco_copy):
    def unused_category(content):
        content["categories"].append({"id": 99, "name": "unused", "supercategory": "object"})
    edit(coco_copy, unused_category, split="trainval")
    assert CocoDataset(coco_copy, ["trainval", "test"]).classes == sorted(
        ["circle", "cross", "hexagon", "square", "star", "triangle"])
    given = ["triangle", "star", "square", "hexagon", "cross", "circle"]
    assert CocoDataset(coco_copy, ["trainval", "test"], classes=given).classes == given


def first_annotation_id(root):
    return json.loads(split_json(root).read_text())["annotations"][0]["id"]


def set_first_annotation(**values):
    def change(content):
        content["annotations"][0].update(values)
    return change


BAD_ANNOTATIONS = {
    "category_id of no category": (set_first_annotation(category_id=99), "category_id 99 is not the id of any"),
    "box outside the image": (set_first_annotation(bbox=[100, 100, 10_000, 10]), "lies outside the"),
    "box without width": (set_first_annotation(bbox=[10, 10, 0, 10]), "box has no width or height"),
    "bbox that is no box": (set_first_annotation(bbox=[10, 10, 5]), "is not [x, y, width, height]"),
}


@pytest.mark.parametrize("case", BAD_ANNOTATIONS)
def test_bad_annotation_is_one_line_naming_the_file_and_the_annotation(coco_copy, case):
    change, message = BAD_ANNOTATIONS[case]
    annotation_id = first_annotation_id(coco_copy)
    edit(coco_copy, change)
    with pytest.raises(BadInputError, match=re.escape(message)) as caught:
        CocoDataset(coco_copy, ["trainval", "test"]).image_ids("test")
    assert caught.value.path == str(split_json(coco_copy))
    assert f"annotation {annotation_id} (image " in caught.value.problem and "\n" not in str(caught.value)


@pytest.mark.parametrize("case", BAD_ANNOTATIONS)
def test_bad_annotation_leaves_its_image_out_in_skip_mode(coco_copy, case):
    change, message = BAD_ANNOTATIONS[case]
    content = json.loads(split_json(coco_copy).read_text())
    image = next(entry for entry in content["images"] if entry["id"] == content["annotations"][0]["image_id"])
    edit(coco_copy, change)
    read = CocoDataset(coco_copy, ["trainval", "test"], on_bad_input="skip")
    ids = read.image_ids("test")
    assert image["file_name"].rsplit(".", 1)[0] not in ids and len(ids) == len(read.listed_ids("test")) - 1
    assert message in read.skipped[f"{split_json(coco_copy)} (image {image['file_name']})"]


def test_annotation_of_no_image_is_named_and_dropped_in_skip_mode(coco_copy):
    annotation_id = first_annotation_id(coco_copy)
    edit(coco_copy, set_first_annotation(image_id=12345))
    with pytest.raises(BadInputError, match=f"annotation {annotation_id}: image_id 12345 is not the id of any image"):
        CocoDataset(coco_copy, ["trainval", "test"]).image_ids("test")
    read = CocoDataset(coco_copy, ["trainval", "test"], on_bad_input="skip")
    assert len(read.image_ids("test")) == len(read.listed_ids("test"))
    assert "image_id 12345" in read.skipped[f"{split_json(coco_copy)} (annotation {annotation_id})"]


def test_missing_image_file_is_named_with_the_json_and_the_image(coco_copy):
    content = json.loads(split_json(coco_copy).read_text())
    image = content["images"][0]
    (coco_copy / "images" / image["file_name"]).unlink()
    with pytest.raises(BadInputError, match=rf"image {image['id']} \({image['file_name']}\): image file is missing"):
        CocoDataset(coco_copy, ["trainval", "test"]).image_ids("test")
    assert image["file_name"].rsplit(".", 1)[0] not in CocoDataset(coco_copy, ["trainval", "test"],
                                                                   on_bad_input="skip").image_ids("test")


def duplicate_image_id(content):
    content["images"][1]["id"] = content["images"][0]["id"]


def duplicate_annotation_id(content):
    content["annotations"][1]["id"] = content["annotations"][0]["id"]


def bad_category_name(content):
    content["categories"][0]["name"] = "circle/ring"


@pytest.mark.parametrize("change, message", [
    (duplicate_image_id, r"image id \d+ is used twice"), (duplicate_annotation_id, r"annotation id \d+ is used twice"),
    (bad_category_name, "category 1: name 'circle/ring' holds a path separator")])
def test_a_file_that_breaks_cocos_rules_is_an_error_even_when_skipping(coco_copy, change, message):
    edit(coco_copy, change)
    with pytest.raises(DataSetError, match=message) as caught:
        CocoDataset(coco_copy, ["trainval", "test"], on_bad_input="skip").image_ids("test")
    assert caught.value.path == str(split_json(coco_copy))


def test_unparsable_json_is_one_line_with_where_it_breaks(coco_copy):
    split_json(coco_copy).write_text('{"images": [}')
    with pytest.raises(DataSetError, match=r"not valid JSON \(Expecting value at line 1 column 13\)") as caught:
        CocoDataset(coco_copy, ["trainval", "test"], on_bad_input="skip").image_ids("test")
    assert caught.value.path == str(split_json(coco_copy))


def test_the_cli_stops_with_one_line_naming_the_json_and_the_annotation(coco_copy, tmp_path, capsys):
    annotation_id = first_annotation_id(coco_copy)
    edit(coco_copy, set_first_annotation(bbox=[100, 100, 10_000, 10]))
    assert main(["status", "--data", str(coco_copy), "--cache", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"rcnn: error: {split_json(coco_copy)}: annotation {annotation_id} (image ")
    assert "lies outside" in error and "--on-bad-input skip" in error and error.count("\n") == 1


def test_evaluation_uses_the_files_own_image_and_category_ids(coco_copy):
    def renumber(content):
        category_ids = {category["id"]: 100 - category["id"] for category in content["categories"]}
        image_ids = {image["id"]: 1000 + 7 * image["id"] for image in content["images"]}
        for category in content["categories"]:
            category["id"] = category_ids[category["id"]]
        for image in content["images"]:
            image["id"] = image_ids[image["id"]]
        for annotation in content["annotations"]:
            annotation.update(category_id=category_ids[annotation["category_id"]],
                              image_id=image_ids[annotation["image_id"]])
    content = edit(coco_copy, renumber)
    read = CocoDataset(coco_copy, ["trainval", "test"])
    ids = read.image_ids("test")
    truth = read.coco_ground_truth("test", ids)
    assert truth.truth["images"] == content["images"]
    assert sorted(a["id"] for a in truth.truth["annotations"]) == sorted(a["id"] for a in content["annotations"])
    assert truth.category_ids == tuple(100 - (index + 1) for index in range(len(read.classes)))
    exact = {}
    for image_id in ids:
        boxes, labels, _ = read.ground_truth(image_id)
        exact[image_id] = np.hstack([boxes, np.ones((len(boxes), 1)), labels[:, None]]).astype(np.float32)
    results = truth.results(exact)
    assert {result["image_id"] for result in results} <= {image["id"] for image in content["images"]}
    measured = coco.evaluate(truth.truth, results)
    assert measured["ap"] == pytest.approx(1.0, abs=1e-6)
    assert all(value == pytest.approx(1.0, abs=1e-6) for value in measured.values() if value is not None)
