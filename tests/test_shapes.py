import hashlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shapes import CLASSES, VOID, split_ids, write_shapes
from pipeline.data.voc import VOCDataset
from pipeline.engine.errors import UserError


def tree_digest(root):
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_same_bytes(tmp_path, shapes_root):
    write_shapes(tmp_path / "again", images=16, seed=0)
    assert tree_digest(tmp_path / "again") == tree_digest(shapes_root)


def test_other_seed_gives_other_images(tmp_path, shapes_root):
    write_shapes(tmp_path / "other", images=16, seed=1)
    first = "JPEGImages/000000.jpg"
    assert tree_digest(tmp_path / "other")[first] != tree_digest(shapes_root)[first]


def test_larger_set_extends_a_smaller_one(tmp_path, shapes_root):
    write_shapes(tmp_path / "small", images=4, seed=0)
    small = tree_digest(tmp_path / "small")
    large = tree_digest(shapes_root)
    assert all(small[name] == large[name] for name in small if name.startswith(("JPEGImages", "Annotations")))


def test_identical_set_is_not_rewritten(shapes_copy):
    assert write_shapes(shapes_copy, images=16, seed=0) is False


def test_refuses_to_overwrite_a_folder_that_is_not_a_shapes_set(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a shapes data set"):
        write_shapes(tmp_path / "mine", images=2, seed=0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_refuses_to_write_over_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        write_shapes(tmp_path / "afile", images=2, seed=0)


def test_splits_partition_the_images():
    ids = [f"{i:06d}" for i in range(200)]
    splits = split_ids(ids)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (100, 40, 60)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == ids
    assert splits["trainval"] == splits["train"] + splits["val"]


@pytest.fixture(scope="module")
def larger_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes60")
    write_shapes(root / "shapes", images=60, seed=3)
    return VOCDataset(root / "shapes")


def test_set_has_the_variety_the_tests_and_demo_rely_on(larger_set):
    objects = [obj for split in ("trainval", "test") for image_id in larger_set.image_ids(split)
               for obj in larger_set.annotation(image_id).objects]
    per_image = [len(larger_set.annotation(i).objects) for s in ("trainval", "test") for i in larger_set.image_ids(s)]
    assert larger_set.classes == sorted(CLASSES) and len(CLASSES) >= 6
    assert min(per_image) >= 1 and max(per_image) <= 6
    assert any(obj.truncated for obj in objects) and any(obj.difficult for obj in objects)
    assert sum(obj.difficult for obj in objects) < 0.15 * len(objects)


def test_boxes_are_tight_around_the_visible_object(larger_set):
    for image_id in larger_set.image_ids("test")[:10]:
        mask = np.asarray(Image.open(larger_set.segmentation_path(image_id)))
        for obj in larger_set.annotation(image_id).objects:
            if obj.difficult:
                continue
            x1, y1, x2, y2 = map(int, obj.box)
            touches = np.isin(mask[y1:y2, x1:x2], [larger_set.classes.index(obj.name) + 1, VOID])
            # every side of the box touches the object (its pixels or the void band along its boundary)
            assert touches[0].any() and touches[-1].any() and touches[:, 0].any() and touches[:, -1].any()


def test_occluded_objects_keep_half_their_area_visible(larger_set):
    overlapping_pairs = 0
    for image_id in larger_set.image_ids("trainval"):
        boxes, _, _ = larger_set.ground_truth(image_id)
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                ix = min(boxes[a, 2], boxes[b, 2]) - max(boxes[a, 0], boxes[b, 0])
                iy = min(boxes[a, 3], boxes[b, 3]) - max(boxes[a, 1], boxes[b, 1])
                overlapping_pairs += ix > 0 and iy > 0
    assert overlapping_pairs > 0  # occlusion happens
