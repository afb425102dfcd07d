"""The identity of a data set: content hashes of the files the pipeline reads.

Part of every stage's cache key, so editing an image or an annotation invalidates exactly what
depends on it, while moving or copying the data set (new paths, new mtimes, same bytes) does not.
Hashes are remembered per file with its size and mtime (as DVC does), so a warm run re-hashes nothing.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.cache import file_digests
from pipeline.data.voc import VOCDataset


def data_identity(dataset: VOCDataset, splits: list[str], stat_cache: Path) -> dict:
    """Digest of the split files and of every listed image's annotation, image and mask."""
    files = [dataset.split_file(split) for split in splits]
    for split in splits:
        for image_id in dataset.listed_ids(split):
            files += [dataset.annotation_path(image_id), dataset.image_path(image_id)]
            if dataset.segmentation_path(image_id).is_file():
                files.append(dataset.segmentation_path(image_id))
    files = sorted(set(files))
    digests = file_digests(files, stat_cache)
    combined = hashlib.sha256()
    for path in files:
        combined.update(f"{path.relative_to(dataset.root).as_posix()}\0{digests[path]}\n".encode())
    return {"files": len(files), "digest": combined.hexdigest(), "classes": dataset.classes,
            "on_bad_input": dataset.on_bad_input}
