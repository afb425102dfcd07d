"""The VOC reader on the generated set, and each kind of bad input: a clear error naming the file."""
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pipeline.data.voc import VOCDataset, parse_annotation
from pipeline.engine.errors import BadInputError, DataSetError


def edit_first_box(xml_path, **corners):
    tree = ET.parse(xml_path)
    bndbox = tree.getroot().find("object/bndbox")
    for tag, value in corners.items():
        bndbox.find(tag).text = str(value)
    tree.write(xml_path)


def test_reads_boxes_in_the_pipeline_convention(shapes_root):
    dataset = VOCDataset(shapes_root)
    image_id = dataset.image_ids("test")[0]
    root = ET.parse(dataset.annotation_path(image_id)).getroot()
    xmin = float(root.find("object/bndbox/xmin").text)
    xmax = float(root.find("object/bndbox/xmax").text)
    boxes, labels, difficult = dataset.ground_truth(image_id)
    assert boxes[0, 0] == xmin - 1 and boxes[0, 2] == xmax
    assert labels.dtype == np.int64 and difficult.dtype == bool and len(boxes) == len(labels)


def test_classes_come_from_the_training_annotations_sorted(shapes_root):
    names = {obj.name for image_id in VOCDataset(shapes_root).listed_ids("trainval")
             for obj in parse_annotation(shapes_root / "Annotations" / f"{image_id}.xml", image_id).objects}
    assert VOCDataset(shapes_root).classes == sorted(names)


def test_classes_from_the_config_take_precedence(shapes_root):
    classes = ["triangle", "star", "square", "hexagon", "cross", "circle"]
    assert VOCDataset(shapes_root, classes=classes).classes == classes


def test_image_is_rgb_of_the_annotated_size(shapes_root):
    dataset = VOCDataset(shapes_root)
    image_id = dataset.image_ids("trainval")[0]
    annotation = dataset.annotation(image_id)
    assert dataset.read_image(image_id).shape == (annotation.height, annotation.width, 3)


def test_folder_without_annotations_is_not_a_data_set(tmp_path):
    with pytest.raises(DataSetError, match="not a VOC-layout data set"):
        VOCDataset(tmp_path)


def first_test_image(root):
    return (root / "ImageSets/Main/test.txt").read_text().split()[0]


def break_annotation_xml(root, image_id):
    (root / "Annotations" / f"{image_id}.xml").write_text("<annotation><size><width>10</width>")


def break_box_outside(root, image_id):
    edit_first_box(root / "Annotations" / f"{image_id}.xml", xmax=10_000)


def break_box_inverted(root, image_id):
    edit_first_box(root / "Annotations" / f"{image_id}.xml", xmin=50, xmax=20)


def break_box_zero_width(root, image_id):
    edit_first_box(root / "Annotations" / f"{image_id}.xml", xmin=20, xmax=20)


def break_unknown_class(root, image_id):
    path = root / "Annotations" / f"{image_id}.xml"
    tree = ET.parse(path)
    tree.getroot().find("object/name").text = "blob"
    tree.write(path)


BROKEN_ANNOTATIONS = {
    "malformed XML": (break_annotation_xml, "malformed XML"),
    "box outside the image": (break_box_outside, "lies outside the"),
    "x2 < x1": (break_box_inverted, "box has no width or height"),
    "zero-width box": (break_box_zero_width, "box has no width or height"),
    "unknown class": (break_unknown_class, "class 'blob' is not one of the classes found in the training split"),
}


@pytest.mark.parametrize("case", BROKEN_ANNOTATIONS)
def test_bad_annotation_raises_error_naming_the_file(shapes_copy, case):
    breaker, message = BROKEN_ANNOTATIONS[case]
    image_id = first_test_image(shapes_copy)
    breaker(shapes_copy, image_id)
    with pytest.raises(BadInputError, match=message) as caught:
        VOCDataset(shapes_copy).image_ids("test")
    assert caught.value.path == str(shapes_copy / "Annotations" / f"{image_id}.xml")


@pytest.mark.parametrize("case", BROKEN_ANNOTATIONS)
def test_bad_annotation_is_skipped_and_listed_in_skip_mode(shapes_copy, case):
    breaker, message = BROKEN_ANNOTATIONS[case]
    image_id = first_test_image(shapes_copy)
    breaker(shapes_copy, image_id)
    dataset = VOCDataset(shapes_copy, on_bad_input="skip")
    ids = dataset.image_ids("test")
    assert image_id not in ids and len(ids) == len(dataset.listed_ids("test")) - 1
    assert message in dataset.skipped[str(shapes_copy / "Annotations" / f"{image_id}.xml")]


def truncate_image(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_image(path):
    path.write_bytes(b"this is not a picture" * 20)


@pytest.mark.parametrize("breaker, message", [(truncate_image, "truncated"), (garble_image, "not a readable image")])
def test_bad_image_raises_error_naming_the_file(shapes_copy, breaker, message):
    image_id = first_test_image(shapes_copy)
    breaker(shapes_copy / "JPEGImages" / f"{image_id}.jpg")
    with pytest.raises(BadInputError, match=message) as caught:
        VOCDataset(shapes_copy).read_image(image_id)
    assert caught.value.path == str(shapes_copy / "JPEGImages" / f"{image_id}.jpg")
    skipping = VOCDataset(shapes_copy, on_bad_input="skip")
    assert skipping.read_image(image_id) is None
    assert message in skipping.skipped[caught.value.path]


def test_missing_split_file_is_an_error_even_when_skipping(shapes_copy):
    (shapes_copy / "ImageSets/Main/test.txt").unlink()
    with pytest.raises(DataSetError, match="test.txt: split file is missing"):
        VOCDataset(shapes_copy, on_bad_input="skip").image_ids("test")


def test_a_class_outside_the_given_classes_is_named_as_such(shapes_copy):
    image_id = first_test_image(shapes_copy)
    break_unknown_class(shapes_copy, image_id)
    with pytest.raises(BadInputError, match=r"class 'blob' is not one of data.classes \(circle, square\)"):
        VOCDataset(shapes_copy, classes=["circle", "square"]).image_ids("test")


def test_a_class_only_the_training_split_has_is_a_class(shapes_copy):
    image_id = VOCDataset(shapes_copy).image_ids("trainval")[0]
    break_unknown_class(shapes_copy, image_id)
    dataset = VOCDataset(shapes_copy)
    assert "blob" in dataset.classes and image_id in dataset.image_ids("trainval")
