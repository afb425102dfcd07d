"""The scripts that choose settings: paired_runs.py on fabricated detect outputs, validation_split.py, and
validate_change.py on the tiny generated set."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from tiny import METHOD_TINY, TINY

from pipeline.data.voc import VOCDataset

BENCH = Path(__file__).resolve().parent.parent / "bench"


def write_detect_output(directory: Path, dataset: VOCDataset, shift: float) -> Path:
    """A detect stage's output holding each test object's own box moved right by `shift` of its width."""
    directory.mkdir(parents=True)
    with h5py.File(directory / "00000.h5", "w") as shard:
        for image_id in dataset.image_ids("test"):
            boxes, labels, _ = dataset.ground_truth(image_id)
            moved = boxes + np.outer(boxes[:, 2] - boxes[:, 0], [shift, 0, shift, 0])
            rows = np.column_stack([moved, np.ones(len(boxes)), labels]).astype(np.float32)
            shard.create_dataset(f"svm_bbox/{image_id}", data=rows)
    return directory


def test_paired_runs_reports_both_maps_and_their_difference(shapes_root, tmp_path):
    dataset = VOCDataset(shapes_root)
    exact = write_detect_output(tmp_path / "cache" / "rcnn-detect" / "exact", dataset, shift=0.0)
    missed = write_detect_output(tmp_path / "cache" / "rcnn-detect" / "missed", dataset, shift=0.6)
    table = subprocess.run([sys.executable, str(BENCH / "paired_runs.py"), "--data", str(shapes_root),
                            "--ious", "0.5", "--resamples", "50", str(exact), str(missed)],
                           capture_output=True, text=True, check=True).stdout
    row = table.strip().splitlines()[-1]
    assert row == "| 0.5 | 1.000 | 0.000 | +1.000 [+1.000, +1.000] |"


def test_validation_split_divides_trainval_into_disjoint_train_and_val(shapes_root, tmp_path):
    out = tmp_path / "val-root"
    subprocess.run([sys.executable, str(BENCH / "validation_split.py"), "--data", str(shapes_root), "--out", str(out),
                    "--val", "3", "--seed", "0"], capture_output=True, text=True, check=True)
    trainval = set((shapes_root / "ImageSets" / "Main" / "trainval.txt").read_text().split())
    train, val = (set((out / "ImageSets" / "Main" / f"{split}.txt").read_text().split()) for split in ("train", "val"))
    assert len(val) == 3 and train | val == trainval and not train & val
    assert VOCDataset(out, class_split="train").image_ids("val") == sorted(val)  # a VOC root through the symlinks


def test_validation_split_keeps_each_group_on_one_side(shapes_root, tmp_path):
    out = tmp_path / "val-root"
    subprocess.run([sys.executable, str(BENCH / "validation_split.py"), "--data", str(shapes_root), "--out", str(out),
                    "--val", "1", "--group", "[0-9]$", "--seed", "0"], capture_output=True, text=True, check=True)
    train, val = ((out / "ImageSets" / "Main" / f"{split}.txt").read_text().split() for split in ("train", "val"))
    groups_of = {side: {image_id[:-1] for image_id in ids} for side, ids in (("train", train), ("val", val))}
    assert len(groups_of["val"]) == 1 and not groups_of["train"] & groups_of["val"]
    assert len(val) > 1  # the whole group went, more than the one image asked for


def test_validate_change_trains_both_arms_and_reports_their_paired_difference(shapes_root, tmp_path):
    root = tmp_path / "val-root"
    subprocess.run([sys.executable, str(BENCH / "validation_split.py"), "--data", str(shapes_root), "--out", str(root),
                    "--val", "4", "--seed", "2"], check=True, capture_output=True)  # every class in train
    sets = [part for value in (*TINY, *METHOD_TINY) for part in ("--set", value)]
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(BENCH / "validate_change.py"), "--config", "demo", "--roots", str(root),
                    "--methods", "faster-rcnn", *sets, "--change", "faster_rcnn.nms_iou=0.6", "--ious", "0.5",
                    "--resamples", "50", "--cache", str(tmp_path / "cache"), "--reports", str(tmp_path / "reports"),
                    "--out", str(out)], check=True, capture_output=True, cwd=tmp_path)
    [row] = json.loads(out.read_text())["rows"]
    assert row["set"] == "val-root" and row["preset"] != row["change"]
    result = row["0.5"]
    assert result["difference"] == pytest.approx(result["change_map"] - result["preset_map"])
    assert result["ci95"][0] <= result["difference"] <= result["ci95"][1]
    trained = [path for path in (tmp_path / "cache" / "faster-rcnn-train").iterdir() if path.is_dir()]
    assert len(trained) == 1  # a test-time change: both arms detect with the one trained model
    assert all((tmp_path / "reports" / "val-root" / arm / "demo" / "faster-rcnn-evaluate" / "map.md").is_file()
               for arm in ("preset", "change"))
