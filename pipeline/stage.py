"""The stage contract and the context a stage runs in.

A stage declares its name, a version string (bumped when its output format or algorithm changes),
the upstream stages it reads, and the config params that change its result. It splits its work into
independent shards, runs one shard into a file the engine hands it, and reduces the shard records
into the stage's metrics and report. The engine (pipeline.runner) does the caching, locking and Dask.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipeline.cache import StageCache
from pipeline.data.identity import data_identity
from pipeline.data.voc import VOCDataset


@dataclass(frozen=True)
class Shard:
    """One independent piece of a stage's work, e.g. a run of image ids or one class."""
    id: str
    items: tuple


@dataclass
class RunContext:
    """What every stage may read: the config, the data set, and where outputs and reports go."""
    config: dict
    dataset: VOCDataset
    cache_root: Path
    reports_root: Path

    @property
    def splits(self) -> list[str]:
        """Every split the pipeline touches: the training split, then the test split."""
        data = self.config["data"]
        return list(dict.fromkeys([data["train_split"], data["test_split"]]))

    @cached_property
    def data_identity(self) -> dict:
        return data_identity(self.dataset, self.splits, self.cache_root / ".data-identity.json")

    def image_ids(self) -> list[str]:
        """The images of every split, each once, in split order."""
        return list(dict.fromkeys(image_id for split in self.splits for image_id in self.dataset.image_ids(split)))

    def __getstate__(self):  # the identity is the driver's business; workers never need it
        state = dict(self.__dict__)
        state.pop("data_identity", None)
        return state


class Stage:
    name: str = ""
    version: str = "1"
    inputs: tuple[str, ...] = ()
    shard_suffix: str = ".h5"
    headline_metrics: tuple[str, ...] = ()  # printed by the CLI after a run

    def params(self, config: dict) -> dict:
        """The config values that change this stage's result (part of its cache key)."""
        return config[self.name]

    def key_extras(self) -> dict:
        """Anything else the result depends on, e.g. a library version."""
        return {}

    def shards(self, ctx: RunContext) -> list[Shard]:
        raise NotImplementedError

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict[str, StageCache], out_path: Path) -> dict:
        """Compute one shard into `out_path`; return JSON-able metrics for its record."""
        raise NotImplementedError

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict[str, dict],
               inputs: dict[str, StageCache]) -> dict:
        """Combine the shard records into the stage's metrics; write tables and plots to cache.report_dir."""
        return {}


def image_shards(image_ids: list[str], images_per_shard: int) -> list[Shard]:
    """Consecutive runs of image ids, numbered 00000, 00001, ..."""
    return [Shard(f"{start // images_per_shard:05d}", tuple(image_ids[start:start + images_per_shard]))
            for start in range(0, len(image_ids), images_per_shard)]
