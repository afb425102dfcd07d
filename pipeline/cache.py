"""Content-addressed stage outputs: `<cache>/<stage>/<key>/`.

    <shard id><suffix>         one output file per shard, renamed into place when complete
    <shard id>.done.json       the shard's record (bytes, sha256, seconds, metrics), written after it
    report/                    what the stage's reduce writes for people (tables, plots)
    manifest.json              written last: the stage is complete exactly when it exists

Every file is written under a temporary name and renamed, so a killed run never leaves a file that
looks done; the next run resumes at the first shard without a record. `<stage>/<key>.lock` is held
(fcntl.flock, released by the kernel if the process dies) by the one run that computes that output.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECORD_SUFFIX = ".done.json"
TEMPORARY_MARK = ".tmp-"


def cache_key(description: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of everything that determines an output."""
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def temporary_path(path: Path) -> Path:
    """A sibling name that no reader mistakes for the finished file."""
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}")


def commit_file(temporary: Path, final: Path) -> None:
    """Flush `temporary` to disk and rename it to `final` (atomic on POSIX)."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)


def write_json_atomic(path: Path, content: dict) -> None:
    temporary = temporary_path(path)
    temporary.write_text(json.dumps(content, indent=2, sort_keys=True, default=str))
    commit_file(temporary, path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class StageCache:
    """The cache directory of one stage output, identified by its key."""

    def __init__(self, root: Path, stage: str, key: str, shard_suffix: str = ".h5"):
        self.root, self.stage, self.key, self.shard_suffix = Path(root), stage, key, shard_suffix
        self.dir = self.root / stage / key
        self.lock_path = self.root / stage / f"{key}.lock"

    # ---- reading ------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def shard_path(self, shard_id: str) -> Path:
        return self.dir / f"{shard_id}{self.shard_suffix}"

    def checkpoint_path(self, shard_id: str) -> Path:
        return self.dir / f"{shard_id}.checkpoint"

    def record_path(self, shard_id: str) -> Path:
        return self.dir / f"{shard_id}{RECORD_SUFFIX}"

    def shard_done(self, shard_id: str) -> bool:
        return self.record_path(shard_id).is_file()

    def shard_record(self, shard_id: str) -> dict:
        return json.loads(self.record_path(shard_id).read_text())

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.dir.rglob("*") if path.is_file()) if self.dir.is_dir() else 0

    def other_keys(self) -> list[str]:
        """Keys of complete outputs of this stage other than this one (stale results)."""
        stage_dir = self.root / self.stage
        if not stage_dir.is_dir():
            return []
        return sorted(path.parent.name for path in stage_dir.glob(f"*/{MANIFEST}") if path.parent.name != self.key)

    # ---- writing (only while holding the lock) ------------------------------------------------
    def commit_shard(self, shard_id: str, temporary: Path, record: dict) -> dict:
        """Move a finished shard file into place, then write its record: the shard is now done."""
        final = self.shard_path(shard_id)
        commit_file(temporary, final)
        record = {"file": final.name, "bytes": final.stat().st_size, "sha256": sha256_of(final), **record}
        write_json_atomic(self.record_path(shard_id), record)
        self.checkpoint_path(shard_id).unlink(missing_ok=True)
        return record

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest)

    def prepare(self) -> None:
        """Create the directory and remove the temporary files a killed run left behind."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.dir.glob(f".*{TEMPORARY_MARK}*"):
            leftover.unlink()

    def clear(self) -> None:
        """Remove the whole output (for --force)."""
        if self.dir.is_dir():
            shutil.rmtree(self.dir)

    @contextlib.contextmanager
    def lock(self):
        """Hold this output's lock; wait (saying for whom) while another run holds it."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("%s/%s is being computed by another run (pid %s); waiting for it to finish",
                            self.stage, self.key, os.pread(descriptor, 32, 0).decode().strip() or "?")
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(descriptor)

    def holder_pid(self) -> str | None:
        """The pid of the run holding the lock, or None when nobody computes this output now."""
        if not self.lock_path.is_file():
            return None
        descriptor = os.open(self.lock_path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.pread(descriptor, 32, 0).decode().strip() or "?"
        finally:
            os.close(descriptor)
