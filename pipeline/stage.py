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
from pipeline.errors import ConfigError


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
    def device(self) -> str:
        """'cuda' or 'cpu', from the config's device: auto | cpu | cuda."""
        import torch
        wanted = self.config.get("device", "auto")
        if wanted not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {wanted!r}: expected auto, cpu or cuda")
        if wanted == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to PyTorch here; use --device cpu")
        return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"

    @cached_property
    def data_identity(self) -> dict:
        return data_identity(self.dataset, self.splits, self.cache_root / ".data-identity.json")

    def image_ids(self) -> list[str]:
        """The images of every split, each once, in split order."""
        return list(dict.fromkeys(image_id for split in self.splits for image_id in self.dataset.image_ids(split)))

    def __getstate__(self):  # the identity is the driver's business; workers resolve their own device
        state = dict(self.__dict__)
        state.pop("data_identity", None)
        state.pop("device", None)
        return state


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

    def params(self, config: dict) -> dict:
        """The config values that change this stage's result (part of its cache key)."""
        return config[self.name]

    def input_stages(self, config: dict) -> tuple[str, ...]:
        """The upstream stages this stage reads, which may depend on the config."""
        return self.inputs

    def key_extras(self, ctx: RunContext) -> dict:
        """Anything else the result depends on, e.g. a library version or a weights file's hash."""
        return {}

    def resources(self, ctx: RunContext) -> dict:
        """dask.distributed resources each task of this stage needs: {"GPU": 1} for device work on cuda."""
        return {"GPU": 1} if self.runs_on_device and ctx.device == "cuda" else {}

    def shards(self, ctx: RunContext) -> list[Shard]:
        raise NotImplementedError

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict[str, StageCache], out: ShardOutput) -> dict:
        """Compute one shard into `out.path`; return JSON-able metrics for its record."""
        raise NotImplementedError

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict[str, dict],
               inputs: dict[str, StageCache]) -> dict:
        """Combine the shard records into the stage's metrics; write tables and plots to cache.report_dir."""
        return {}


class TrainingStage(Stage):
    """A stage that trains one network: one shard, `00000.pt`, holding at least its "losses" per iteration
    (and "loss_parts" when the loss has named parts); the report plots them under `loss_title`."""
    shard_suffix = ".pt"
    runs_on_device = True
    exclusive = True
    loss_title: str = ""

    def shards(self, ctx: RunContext) -> list[Shard]:
        return [Shard("00000", ())]

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict[str, dict],
               inputs: dict[str, StageCache]) -> dict:
        import torch

        from pipeline.reports import plot_loss, plot_losses
        saved = torch.load(cache.shard_path("00000"), weights_only=True)
        if saved.get("loss_parts"):
            plot_losses({"total": saved["losses"], **saved["loss_parts"]}, cache.report_dir / "loss.png",
                        self.loss_title)
        else:
            plot_loss(saved["losses"], cache.report_dir / "loss.png", self.loss_title)
        return {**records["00000"]["metrics"], "device": ctx.device}


class MethodStage(Stage):
    """A stage several methods share: R-CNN's SVMs, box regressors, detection and evaluation serve
    SPP-net too, and the evaluation every method. `prefix` ("" for R-CNN, e.g. "sppnet-") names this
    copy and the copies of the inputs it reads: sppnet-svm reads sppnet-features and sppnet-finetune.
    """
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


def split_shards(ctx: RunContext, images_per_shard: int) -> list[Shard]:
    """Image shards of every split, each image once, named <split>-00000, ...: a shard holds the images
    of one split only, so the time spent on the training split can be told from the test split's."""
    shards, seen = [], set()
    for split in ctx.splits:
        image_ids = [image_id for image_id in ctx.dataset.image_ids(split) if image_id not in seen]
        seen.update(image_ids)
        shards += image_shards(image_ids, images_per_shard, prefix=f"{split}-")
    return shards
