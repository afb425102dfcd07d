"""The identity of a data set: content hashes of the files the pipeline reads.

Part of every stage's cache key, so editing an image or an annotation invalidates exactly what
depends on it, while moving or copying the data set (new paths, new mtimes, same bytes) does not.
Hashes are remembered per file with its size and mtime (as DVC does), so a warm run re-hashes nothing.
Each reader lists the files it reads (pipeline.data.voc: split files, annotations, images, masks).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.engine.cache import file_digests


def files_digest(root: Path, files: list[Path], stat_cache: Path) -> tuple[int, str]:
    """How many distinct files, and the sha256 over each one's path relative to `root` and content digest."""
    files = sorted(set(files))
    digests = file_digests(files, stat_cache)
    combined = hashlib.sha256()
    for path in files:
        combined.update(f"{path.relative_to(root).as_posix()}\0{digests[path]}\n".encode())
    return len(files), combined.hexdigest()
