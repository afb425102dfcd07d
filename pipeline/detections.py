"""Detections as every method's detect stage stores them, and as the PASCAL devkit reads them.

Shard file (HDF5): a dataset per variant and image, `<variant>/<image id>`: float32[D, 6] rows of
(x1, y1, x2, y2, score, class index), boxes in the pipeline's convention (pipeline.boxes), sorted by
score. The devkit's results files (comp4: trained on any data) hold one class each:
`comp4_det_<split>_<class>.txt` lines of image id, score, xmin ymin xmax ymax (1-based, inclusive).
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.boxes import box_to_voc
from pipeline.engine.cache import StageCache

NO_DETECTIONS = np.zeros((0, 6), np.float32)


def detection_rows(detection: dict) -> np.ndarray:
    """float32[D, 6] rows from torchvision's detection output (boxes, scores, labels 1..N)."""
    return torch.cat([detection["boxes"], detection["scores"][:, None], detection["labels"][:, None] - 1.0],
                     dim=1).float().cpu().numpy()


def read_detections(cache: StageCache, variant: str) -> dict[str, np.ndarray]:
    """image id -> detections float32[D, 6] of one variant, from every shard of a detect output."""
    detections = {}
    for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}")):
        with h5py.File(path, "r") as shard_file:
            if variant in shard_file:
                detections.update({image_id: dataset[()] for image_id, dataset in shard_file[variant].items()})
    return detections


def write_devkit_results(folder: Path, detections: dict[str, np.ndarray], classes: list[str], split: str) -> None:
    """PASCAL devkit results files, one per class, for one variant's detections."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = {class_index: [] for class_index in range(len(classes))}
    for image_id, rows in sorted(detections.items()):
        for x1, y1, x2, y2, score, class_index in rows:
            xmin, ymin, xmax, ymax = box_to_voc((x1, y1, x2, y2))
            lines[int(class_index)].append(f"{image_id} {score:.6f} {xmin:.1f} {ymin:.1f} {xmax:.1f} {ymax:.1f}\n")
    for class_index, name in enumerate(classes):
        (folder / f"comp4_det_{split}_{name}.txt").write_text("".join(lines[class_index]))
