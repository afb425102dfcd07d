"""Content-addressed stage outputs: `<cache>/<stage>/<key>/`.

    <shard id><suffix>         one output file per shard, renamed into place when complete
    <shard id>.done.json       the shard's record (bytes, sha256, seconds, metrics), written after it
    report/                    what the stage's reduce writes for people (tables, plots)
    manifest.json              written last: the stage is complete exactly when it exists

Every file is written under a temporary name and renamed, so a killed run never leaves a file that
looks done; the next run resumes at the first shard without a record. `<stage>/<key>.lock` is held
(fcntl.flock, released by the kernel if the process dies) by the one run that computes that output.
Every record is checked for its shape when read (RECORD_FIELDS, MANIFEST_FIELDS, a digest memo's
entries): one of another shape, whoever wrote it, counts as missing, so its shard is recomputed.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import h5py
import torch

from pipeline.engine.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECORD_SUFFIX = ".done.json"
TEMPORARY_MARK = ".tmp-"
NUMBER = (int, float)
# what a shard's record and a stage's manifest must hold to be read at all: field -> its type
RECORD_FIELDS = {"file": str, "bytes": int, "sha256": str, "started": NUMBER, "seconds": NUMBER, "metrics": dict}
MANIFEST_FIELDS = {"stage": str, "key": str, "description": dict, "shards": dict, "metrics": dict, "timings": dict}


class CacheBusy(UserError):
    """Another run holds the lock of an output that this command would change."""


class BadRecord(ValueError):
    """A cache record (JSON) that cannot be read or has another shape than its kind's: it counts as missing."""


def read_record(path: Path, fields: dict[str, type | tuple]) -> dict:
    """The JSON object in `path`, checked to hold `fields` of their types; BadRecord naming the file and the
    problem otherwise (FileNotFoundError when there is no file)."""
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise BadRecord(f"{path}: not valid JSON") from None
    if not isinstance(record, dict):
        raise BadRecord(f"{path}: holds a JSON {type(record).__name__}, not an object")
    for field, kind in fields.items():
        if not isinstance(record.get(field), kind) or isinstance(record.get(field), bool):
            raise BadRecord(f"{path}: its {field!r} is missing or of the wrong type")
    return record


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


@contextlib.contextmanager
def hdf5_file(path: Path):
    """A new HDF5 file, built in memory and written to `path` in one piece when the block ends without error.

    HDF5 writing to disk itself fails deep in its C library when the disk is full, prints a traceback for
    every object h5py frees afterwards and can crash the interpreter at exit; written here, a full disk is
    one OSError naming the file. Shards are a few images' worth, so they fit in memory."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        yield handle
    write_bytes(path, buffer.getbuffer())


def save_torch(content, path: Path) -> None:
    """torch.save into memory, then to `path` in one write (torch reports a full disk as a RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    write_bytes(path, buffer.getbuffer())


def write_bytes(path: Path, data) -> None:
    """Write a file; an OSError (a full disk, a read-only folder) names it."""
    with naming_the_file(path), open(path, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def naming_the_file(path: Path):
    """Inside, an OSError that names no file (a full disk found by a write, not an open) is raised again naming
    `path`, so that the one line a user sees says which file."""
    try:
        yield
    except OSError as error:
        if error.filename:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None


def write_json_atomic(path: Path, content: dict) -> None:
    temporary = temporary_path(path)
    write_bytes(temporary, json.dumps(content, indent=2, sort_keys=True, default=str).encode())
    commit_file(temporary, path)


def hash_file(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes: sha256, or blake2b-128 ("blake2b")."""
    digest = hashlib.blake2b(digest_size=16) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    return hash_file(path, "sha256")


def content_digest(path: Path | str) -> str:
    """The sha256 of a file a key depends on (weights, a model), computed once per process for each size and
    mtime: every stage that starts from the same file asks for it."""
    stat = Path(path).stat()
    return _content_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of(Path(path))


def file_digests(paths: list[Path], stat_cache: Path, algorithm: str = "blake2b") -> dict[Path, str]:
    """The hash of each file ('missing' for an absent one; blake2b-128 or sha256), reusing those remembered
    in `stat_cache` for the same size and mtime. The memo is only a shortcut: a damaged one is read as empty
    (and rewritten), and one that cannot be written (a read-only cache) is not."""
    remembered = read_digest_memo(stat_cache)
    digests, updated = {}, False
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            digests[path] = "missing"
            continue
        key, signature = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        entry = remembered.get(key)
        if entry is None or entry[:2] != signature:
            entry = signature + [hash_file(path, algorithm)]
            remembered[key], updated = entry, True
        digests[path] = entry[2]
    if updated:
        try:
            stat_cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stat_cache, remembered)
        except OSError as error:
            log.debug("%s: not written (%s); the digests will be computed again next time", stat_cache, error)
    return digests


def read_digest_memo(path: Path) -> dict[str, list]:
    """path -> [size, mtime_ns, digest], the entries of a digest memo that have that shape (a warning for a
    memo of another shape, which is then ignored)."""
    try:
        memo = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        memo = None
    entry_shape = (int, int, str)
    if not isinstance(memo, dict) or not all(
            isinstance(entry, list) and len(entry) == 3 and all(
                isinstance(value, kind) and not isinstance(value, bool) for value, kind in zip(entry, entry_shape))
            for entry in memo.values()):
        log.warning("%s: not a memo of file digests (damaged?); ignored, every file is hashed again", path)
        return {}
    return memo


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
        """The manifest is written, and every shard it lists has its record and its file, of the size the
        record says (a cheap check; `problems(deep=True)` compares the contents too)."""
        try:
            shards = self.manifest()["shards"]
        except (OSError, ValueError):
            return False
        return not self.problems(shards, deep=False)

    def manifest(self) -> dict:
        """The manifest; FileNotFoundError before it is written, BadRecord when it has another shape."""
        return read_record(self.manifest_path, MANIFEST_FIELDS)

    def manifest_problem(self) -> str | None:
        """What is wrong with a manifest that exists but cannot be read as one, else None."""
        try:
            self.manifest()
        except BadRecord as error:
            return str(error)
        except OSError:
            pass
        return None

    def problems(self, shard_ids, deep: bool, memo: Path | None = None) -> dict[str, str]:
        """shard id -> what is wrong with it: a missing or unreadable record, a missing file, another size
        than the record's, or (deep) other contents: the sha256 the record holds, computed afresh or, with
        `memo`, remembered for the file's size and mtime (pipeline.engine.cache.file_digests)."""
        found, records = {}, {}
        for shard_id in shard_ids:
            try:
                records[shard_id] = record = self.shard_record(shard_id)
                path = self.dir / record["file"]
                if not path.is_file():
                    found[shard_id] = f"{path}: the file is missing"
                elif path.stat().st_size != record["bytes"]:
                    found[shard_id] = f"{path}: {path.stat().st_size} bytes, its record says {record['bytes']}"
            except BadRecord as error:
                found[shard_id] = str(error)
            except OSError:
                found[shard_id] = f"{self.record_path(shard_id)}: the record is missing or unreadable"
        if deep:
            paths = {shard_id: self.dir / record["file"] for shard_id, record in records.items()
                     if shard_id not in found}
            digests = (file_digests(list(paths.values()), memo, "sha256") if memo else
                       {path: sha256_of(path) for path in paths.values()})
            found.update({shard_id: f"{path}: its contents differ from its record (sha256)"
                          for shard_id, path in paths.items() if digests[path] != records[shard_id]["sha256"]})
        return found

    def shard_path(self, shard_id: str) -> Path:
        return self.dir / f"{shard_id}{self.shard_suffix}"

    def checkpoint_path(self, shard_id: str) -> Path:
        return self.dir / f"{shard_id}.checkpoint"

    def record_path(self, shard_id: str) -> Path:
        return self.dir / f"{shard_id}{RECORD_SUFFIX}"

    def shard_done(self, shard_id: str) -> bool:
        return self.record_path(shard_id).is_file()

    def shard_record(self, shard_id: str) -> dict:
        """The shard's record; FileNotFoundError before it is written, BadRecord when it has another shape."""
        record = read_record(self.record_path(shard_id), RECORD_FIELDS)
        if Path(record["file"]).name != record["file"]:
            raise BadRecord(f"{self.record_path(shard_id)}: its 'file' {record['file']!r} is not a file of this folder")
        return record

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.dir.rglob("*") if path.is_file()) if self.dir.is_dir() else 0

    def other_keys(self) -> list[str]:
        """Keys of complete outputs of this stage other than this one (stale results)."""
        stage_dir = self.root / self.stage
        if not stage_dir.is_dir():
            return []
        return sorted(path.parent.name for path in stage_dir.glob(f"*/{MANIFEST}") if path.parent.name != self.key)

    # ---- writing (only while holding the lock) ------------------------------------------------
    def commit_shard(self, shard_id: str, temporary: Path, started: float, seconds: float, metrics: dict) -> dict:
        """Move a finished shard file into place, then write its record (RECORD_FIELDS): the shard is now done.
        started: when it started (seconds since the epoch); seconds: how long it ran; metrics: the stage's."""
        final = self.shard_path(shard_id)
        commit_file(temporary, final)
        record = {"file": final.name, "bytes": final.stat().st_size, "sha256": sha256_of(final), "started": started,
                  "seconds": seconds, "metrics": metrics}
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

    def invalidate(self, shard_ids) -> None:
        """Forget these shards (record and file) and the manifest: the next run recomputes exactly them."""
        if not shard_ids:
            return
        self.manifest_path.unlink(missing_ok=True)
        for shard_id in shard_ids:
            self.record_path(shard_id).unlink(missing_ok=True)
            self.shard_path(shard_id).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the whole output (for --force)."""
        if self.dir.is_dir():
            shutil.rmtree(self.dir)

    @contextlib.contextmanager
    def lock(self, wait: bool = True):
        """Hold this output's lock; while another run holds it, wait (saying for whom), or with wait=False
        raise CacheBusy."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode().strip() or "?"
                if not wait:
                    raise CacheBusy(f"{self.dir}: being computed by another run (pid {holder}); run this again "
                                    f"when it has finished") from None
                log.warning("%s/%s is being computed by another run (pid %s); waiting for it to finish",
                            self.stage, self.key, holder)
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
