"""The stage contract and the context a stage runs in.

A stage declares its name, a version string (bumped when its output format or algorithm changes),
the upstream stages it reads, and the config params that change its result. It splits its work into
independent shards, runs one shard into a file the engine hands it, and reduces the shard records
into the stage's metrics and report. The engine (pipeline.engine.runner) does the caching, locking and Dask.

A stage reads only what its cache key covers: `params(config)` is the one place it looks at the
config; everything after that (`input_stages`, `key_extras`, `shards`, `run_shard`, `reduce`) gets a
StageContext holding those params, frozen, beside the data set (whose identity is in the key) and
the execution settings (device, CPU threads), which choose where the work runs, not what it computes.
"""
from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import torch

from pipeline.engine.cache import StageCache
from pipeline.engine.errors import ConfigError


class DataSet(Protocol):
    """What the engine needs of a data set (pipeline.data's readers are one): its classes, the image ids of
    a split, and its identity: a digest of what the stages read, part of every key."""
    root: Path

    @property
    def classes(self) -> list[str]: ...

    def image_ids(self, split: str) -> list[str]: ...

    def identity(self, splits: list[str], stat_cache: Path) -> dict: ...


@dataclass(frozen=True)
class ShardOutput:
    """Where a shard writes: `path` (a temporary name the engine renames when the shard returns) and
    `checkpoint` (resumable state for long shards; survives a kill, removed once the shard is done)."""
    path: Path
    checkpoint: Path


@dataclass(frozen=True)
class Shard:
    """One independent piece of a stage's work, e.g. a run of image ids or one class."""
    id: str
    items: tuple


def freeze(value):
    """A read-only copy of a params tree: mappings become mappingproxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value):
    """The plain dicts and lists of a frozen params tree (for JSON and the cache key)."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


@dataclass
class StageContext:
    """What one stage sees: its keyed params (frozen), the data set and its split roles (both in the key
    through the data identity), and where to run: `device_setting` (auto | cpu | cuda) and `threads` (CPU
    threads for training, 0: every core), which change where and how fast, not what is computed."""
    params: Mapping
    dataset: DataSet
    train_split: str
    test_split: str
    device_setting: str = "auto"
    threads: int = 0

    @cached_property
    def device(self) -> str:
        """'cuda' or 'cpu', resolved where the stage runs (a dask worker resolves its own)."""
        return resolve_device(self.device_setting)

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    def image_ids(self) -> list[str]:
        """The images of both splits, each once: the training split's, then the test split's."""
        splits = dict.fromkeys([self.train_split, self.test_split])
        return list(dict.fromkeys(image_id for split in splits for image_id in self.dataset.image_ids(split)))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("device", None)
        state["params"] = thaw(self.params)  # mappingproxy does not pickle
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.params = freeze(state["params"])


def resolve_device(wanted: str) -> str:
    if wanted not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {wanted!r}: expected auto, cpu or cuda")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to PyTorch here; use --device cpu")
    return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"


@cache
def describe_hardware(device: str) -> str:
    """e.g. 'NVIDIA H100 80GB HBM3' or 'cpu: AMD EPYC 7B13, 2 cores'."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model}, {len(os.sched_getaffinity(0))} cores"


class Stage:
    name: str = ""
    version: str = "1"
    inputs: tuple[str, ...] = ()
    shard_suffix: str = ".h5"
    headline_metrics: tuple[str, ...] = ()  # printed by the CLI after a run
    runs_on_device: bool = False  # runs networks on ctx.device, so its tasks need a GPU when that is cuda
    # its shards use process-wide state (torch's global RNG and thread count): one at a time per process, or a
    # training running beside another in a thread would draw from its random numbers and not reproduce
    exclusive: bool = False
    # its result depends on the data set (its identity is in the key); False for stages on images given
    # otherwise (rcnn predict), whose shards name those images by content
    reads_data_set: bool = True

    def params(self, config: dict) -> dict:
        """The config values that change this stage's result: its cache key, and all it may read later."""
        return config[self.name]

    def input_stages(self, params: Mapping) -> tuple[str, ...]:
        """The upstream stages this stage reads, which may depend on its params."""
        return self.inputs

    def key_extras(self, ctx: StageContext) -> dict:
        """Anything else the result depends on, e.g. a library version or a weights file's hash."""
        return {}

    def resources(self, ctx: StageContext) -> dict:
        """dask.distributed resources each task of this stage needs: {"GPU": 1} for device work on cuda."""
        return {"GPU": 1} if self.runs_on_device and ctx.device == "cuda" else {}

    def shards(self, ctx: StageContext) -> list[Shard]:
        raise NotImplementedError

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict[str, StageCache], out: ShardOutput) -> dict:
        """Compute one shard into `out.path`; return JSON-able metrics for its record."""
        raise NotImplementedError

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict[str, dict],
               inputs: dict[str, StageCache]) -> dict:
        """Combine the shard records into the stage's metrics; write tables and plots to cache.report_dir."""
        return {}

    def report_beside(self, report_dir: Path, manifests: list[dict]) -> None:
        """Write to the published report (`<reports>/<stage>/`, not the cache) what compares this output with
        the stage's other complete outputs on the same data: `manifests`, this output's first. Reads nothing
        else, so that no cached result depends on it (e.g. the recall of every proposal method side by side)."""


class PrefixedStage(Stage):
    """A stage R-CNN and SPP-net share: R-CNN's SVMs and box regressors serve SPP-net too. `prefix`
    ("" for R-CNN, "sppnet-" for SPP-net) names this copy and the copies of the inputs it reads:
    sppnet-svm reads sppnet-features and sppnet-finetune."""
    base_name: str = ""
    base_inputs: tuple[str, ...] = ()

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.name = prefix + self.base_name
        self.inputs = tuple(prefix + name for name in self.base_inputs)

    def upstream(self, inputs: dict[str, StageCache], role: str) -> StageCache:
        """The input that plays `role` (a base input name) for this copy."""
        return inputs[self.prefix + role]


def image_shards(image_ids: list[str], images_per_shard: int, prefix: str = "") -> list[Shard]:
    """Consecutive runs of image ids, numbered <prefix>00000, <prefix>00001, ..."""
    return [Shard(f"{prefix}{start // images_per_shard:05d}", tuple(image_ids[start:start + images_per_shard]))
            for start in range(0, len(image_ids), images_per_shard)]
