"""The YOLO reader on the generated set written in the Ultralytics layout (rcnn data shapes --format yolo): the
same images, boxes, classes and splits as the VOC reader; normalised centre boxes converted exactly; each kind
of bad input one line naming the file and the line."""
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shapes import write_shapes
from pipeline.data.voc import VOCDataset
from pipeline.data.yolo import YoloDataset
from pipeline.engine.errors import BadInputError, DataSetError


@pytest.fixture(scope="module")
def yolo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo") / "shapes"
    write_shapes(root, images=16, seed=0, data_format="yolo")
    return root


@pytest.fixture
def yolo_copy(yolo_root, tmp_path):
    return shutil.copytree(yolo_root, tmp_path / "shapes")


def first_test_image(root):
    return (root / "test.txt").read_text().split()[0].removeprefix("./images/").rsplit(".", 1)[0]


def test_reads_the_voc_boxes_classes_and_splits_of_the_same_set(yolo_root, shapes_root):
    voc, read = VOCDataset(shapes_root), YoloDataset(yolo_root / "data.yaml", ["trainval", "test"])
    assert read.classes == voc.classes
    for split in ("train", "val", "trainval", "test"):
        assert read.image_ids(split) == voc.image_ids(split)
    for image_id in voc.image_ids("trainval") + voc.image_ids("test"):
        (boxes, labels, _), (voc_boxes, voc_labels, _) = read.ground_truth(image_id), voc.ground_truth(image_id)
        assert np.array_equal(boxes, voc_boxes) and np.array_equal(labels, voc_labels)
    assert not read.has_segmentation("trainval")


def small_set(tmp_path, label: str, size=(200, 100), names="[a, b]"):
    """A YOLO set of one image of `size` (width, height) with one label file."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", size).save(tmp_path / "images" / "one.png")
    (tmp_path / "labels" / "one.txt").write_text(label)
    (tmp_path / "data.yaml").write_text(f"names: {names}\ntrain: images\nval: images\n")
    return YoloDataset(tmp_path / "data.yaml", ["train", "val"])


def test_normalised_centre_boxes_become_exact_corners(tmp_path):
    read = small_set(tmp_path, "1 0.5 0.5 0.25 0.5\n0 0.1 0.3 0.2 0.2\n")
    boxes, labels, difficult = read.ground_truth("one")
    assert boxes.tolist() == [[75.0, 25.0, 125.0, 75.0], [0.0, 20.0, 40.0, 40.0]]
    assert labels.tolist() == [1, 0] and not difficult.any()
    assert read.annotation("one").objects[0].box == (75.0, 25.0, 125.0, 75.0)


def test_values_are_read_as_the_decimals_they_are_written_as(tmp_path):
    # 0.03 and 0.02 have no exact binary float: computed in floats, (0.03 - 0.02 / 2) * 100 is 1.9999999999999998
    read = small_set(tmp_path, "0 0.03 0.5 0.02 0.5\n", size=(100, 100))
    assert read.annotation("one").objects[0].box == (2.0, 25.0, 4.0, 75.0)


def test_a_corner_beyond_the_border_by_six_decimal_rounding_is_put_on_the_border(tmp_path):
    read = small_set(tmp_path, "0 0.9500004 0.5 0.1 0.5\n")  # right edge at 1.0000004
    assert read.annotation("one").objects[0].box[2] == 200.0


def test_an_image_without_a_label_file_is_a_negative(tmp_path):
    small_set(tmp_path, "")
    (tmp_path / "labels" / "one.txt").unlink()
    read = YoloDataset(tmp_path / "data.yaml", ["train", "val"], classes=["a", "b"])
    assert read.image_ids("train") == ["one"] and len(read.ground_truth("one")[0]) == 0


BAD_LINES = {
    "four fields": ("0 0.5 0.5 0.2\n", "line 1: 4 fields, expected 5"),
    "polygon": ("0 0.1 0.1 0.2 0.1 0.2 0.2\n", "line 1: 7 fields, expected 5"),
    "class beyond the names": ("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n", "line 2: class '7' is not an index"),
    "not a number": ("0 0.5 half 0.2 0.2\n", "line 1: '0.5 half 0.2 0.2' are not four numbers"),
    "box outside the image": ("0 0.5 0.5 0.2 0.2\n\n1 0.95 0.5 0.2 0.2\n",
                              "line 3: box (0.95 0.5 0.2 0.2) lies outside"),
    "box without width": ("0 0.5 0.5 0 0.2\n", "line 1: box has no width or height"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_label_line_is_one_line_naming_the_file_and_the_line(tmp_path, case):
    label, message = BAD_LINES[case]
    read = small_set(tmp_path, label)
    with pytest.raises(BadInputError, match=re.escape(message)) as caught:
        read.image_ids("train")
    assert caught.value.path == str(tmp_path / "labels" / "one.txt") and "\n" not in str(caught.value)


def test_bad_label_leaves_its_image_out_in_skip_mode(yolo_copy):
    image_id = first_test_image(yolo_copy)
    (yolo_copy / "labels" / f"{image_id}.txt").write_text("0 0.5 0.5 0.2\n")
    read = YoloDataset(yolo_copy / "data.yaml", ["trainval", "test"], on_bad_input="skip")
    assert image_id not in read.image_ids("test") and len(read.image_ids("test")) == len(read.listed_ids("test")) - 1
    assert "line 1: 4 fields" in read.skipped[str(yolo_copy / "labels" / f"{image_id}.txt")]


def test_a_missing_image_is_named_with_the_list_and_its_line(yolo_copy):
    image_id = first_test_image(yolo_copy)
    (yolo_copy / "images" / f"{image_id}.jpg").unlink()
    with pytest.raises(BadInputError, match=rf"line 1: image file .*{image_id}.jpg is missing") as caught:
        YoloDataset(yolo_copy / "data.yaml", ["trainval", "test"]).image_ids("test")
    assert caught.value.path == str(yolo_copy / "test.txt")
    assert image_id not in YoloDataset(yolo_copy / "data.yaml", ["trainval", "test"],
                                       on_bad_input="skip").image_ids("test")


def test_a_class_outside_data_classes_is_named_with_its_line(yolo_copy):
    image_id = first_test_image(yolo_copy)
    (yolo_copy / "labels" / f"{image_id}.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n")
    read = YoloDataset(yolo_copy / "data.yaml", ["trainval", "test"], classes=["circle", "cross"])
    with pytest.raises(BadInputError, match=r"line 2: class 'triangle' is not one of data.classes \(circle, cross\)"):
        read.image_ids("test")


def test_two_images_of_one_name_are_an_error(yolo_copy):
    image_id = first_test_image(yolo_copy)
    (yolo_copy / "images" / "more").mkdir()
    shutil.copy(yolo_copy / "images" / f"{image_id}.jpg", yolo_copy / "images" / "more" / f"{image_id}.jpg")
    with (yolo_copy / "test.txt").open("a") as listing:
        listing.write(f"./images/more/{image_id}.jpg\n")
    with pytest.raises(DataSetError, match=f"two images share the name '{image_id}'"):
        YoloDataset(yolo_copy / "data.yaml", ["trainval", "test"]).image_ids("test")


@pytest.mark.parametrize("text, message", [
    ("names: [a, b\n", "not valid YAML"), ("train: images\n", "names is missing or empty"),
    ("names: [a, a]\ntrain: images\n", "classes 0 and 1 are both named 'a'"),
    ("names: ['a/b']\ntrain: images\n", "holds a path separator"),
    ("names: [a]\nnc: 2\ntrain: images\n", "nc is 2 but names lists 1 classes")])
def test_a_bad_data_yaml_is_one_line_naming_it(tmp_path, text, message):
    (tmp_path / "data.yaml").write_text(text)
    with pytest.raises(DataSetError, match=re.escape(message)) as caught:
        YoloDataset(tmp_path / "data.yaml", ["train", "train"])
    assert caught.value.path == str(tmp_path / "data.yaml")


def test_a_split_data_yaml_lacks_names_the_splits_it_has(yolo_root):
    with pytest.raises(DataSetError, match=r"no split 'valid' here \(splits: train, val, test, trainval\)"):
        YoloDataset(yolo_root / "data.yaml", ["train", "valid"])
