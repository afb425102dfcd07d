"""A resumable SGD loop: a killed run resumes from its checkpoint and ends with the same weights.

The checkpoint holds everything the rest of the run depends on: model, optimizer and LR-schedule
state, the torch RNG (dropout) and the numpy generator that samples the mini-batches, the CPU thread
count, the iteration and the loss history. It is written under a temporary name and renamed, so a kill never
leaves a half file.
(Resuming that silently changes results is a known complaint about the originals; fast-rcnn issue 35.)
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.engine.cache import StageCache, commit_file, save_torch, temporary_path
from pipeline.engine.errors import ConfigError, UserError
from pipeline.engine.interrupt import STOP, check_stop
from pipeline.engine.schema import register_choices
from pipeline.engine.stage import Shard, Stage, StageContext
from pipeline.models import on_device
from pipeline.precision import bf16_autocast
from pipeline.reports import plot_loss, plot_losses

log = logging.getLogger(__name__)
OPTIMIZERS = ("sgd", "adam")
register_choices("*.optimizer", OPTIMIZERS)


class TrainingDiverged(UserError):
    """The loss became infinite or NaN."""


@dataclass(frozen=True)
class SGDSettings:
    iterations: int
    lr: float
    momentum: float
    weight_decay: float
    step_every: int       # multiply the learning rate by gamma every this many iterations
    gamma: float
    seed: int
    checkpoint_every: int
    optimizer: str = "sgd"  # sgd (with momentum) | adam (momentum unused; its defaults for the moment estimates)
    warmup: int = 0         # the learning rate rises linearly from lr / warmup to lr over this many iterations

    @classmethod
    def from_config(cls, section: dict) -> SGDSettings:
        return cls(**{name: section[name] for name in cls.__dataclass_fields__ if name in section})


# next_batch(rng) -> a mini-batch on the device, by default (inputs, class targets)
BatchSampler = Callable[[np.random.Generator], object]
# loss_of(model, batch) -> the loss, or named losses that are summed (e.g. Fast R-CNN's multitask loss)
LossFunction = Callable[[nn.Module, object], "torch.Tensor | dict[str, torch.Tensor]"]


@dataclass
class History:
    losses: list[float]             # the (total) loss per iteration
    parts: dict[str, list[float]]   # named losses per iteration, when loss_of returns them


def cross_entropy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


def train(model: nn.Module, next_batch: BatchSampler, settings: SGDSettings, checkpoint: Path, device: str,
          amp: bool = False, threads: int = 0, desc: str = "train", loss_of: LossFunction = cross_entropy_loss,
          parameters: list | None = None) -> History:
    """Minimise `loss_of` over `settings.iterations` mini-batches; returns the losses per iteration.

    `parameters`: the ones to train (default: all of the model's).

    On the CPU the backward pass sums over threads, so the weights depend on the thread count in their
    last bits: training pins it (`threads`, 0 = every core; never whatever OMP_NUM_THREADS the process
    inherited) and a resumed run uses the count its checkpoint recorded.
    """
    on_device(model, device).train()
    optimizer = make_optimizer(settings, parameters or list(model.parameters()))
    schedule = lr_schedule(optimizer, settings)
    rng, losses, parts, start = np.random.default_rng(settings.seed), [], {}, 0
    torch.manual_seed(settings.seed)
    threads = threads or os.cpu_count() or 1
    if checkpoint.is_file():
        start, losses, parts, threads = _restore(checkpoint, model, optimizer, schedule, rng, device)
        log.info("%s: resuming from iteration %d (%s)", desc, start, checkpoint.name)
    torch.set_num_threads(threads)
    use_amp = amp and device == "cuda"
    for iteration in tqdm(range(start, settings.iterations), desc=desc, unit="it", initial=start,
                          total=settings.iterations, disable=None):
        if STOP.is_set():  # asked to stop (SIGINT / SIGTERM): keep every finished iteration, then stop
            if iteration > start:
                _save(checkpoint, model, optimizer, schedule, rng, iteration, losses, parts, threads)
            check_stop()
        batch = next_batch(rng)
        with bf16_autocast(device, use_amp):
            loss = loss_of(model, batch)
        if isinstance(loss, dict):
            for name, part in loss.items():
                parts.setdefault(name, []).append(part.item())
            loss = sum(loss.values())
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"{desc}: the loss is {loss.item()} at iteration {iteration + 1}; training diverged "
                                   f"(lower the learning rate)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (iteration + 1) % settings.checkpoint_every == 0 and iteration + 1 < settings.iterations:
            _save(checkpoint, model, optimizer, schedule, rng, iteration + 1, losses, parts, threads)
    model.eval()
    return History(losses, parts)


def lr_schedule(optimizer: torch.optim.Optimizer, settings: SGDSettings) -> torch.optim.lr_scheduler.LRScheduler:
    """Steps of gamma every step_every iterations, after a linear warm-up of `warmup` iterations if any (Goyal
    et al. 2017; detectron2 and torchvision's detection references warm up too): newly initialised fc layers
    on the unbounded features of a pretrained trunk can otherwise take steps early on that switch most of
    their ReLUs off for good (what it did to the photos preset without warm-up: docs/real-photos.md)."""
    steps = torch.optim.lr_scheduler.StepLR(optimizer, settings.step_every, settings.gamma)
    if not settings.warmup:
        return steps
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / settings.warmup, total_iters=settings.warmup)
    return torch.optim.lr_scheduler.ChainedScheduler([warmup, steps], optimizer)


def make_optimizer(settings: SGDSettings, parameters: list) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ConfigError(f"optimizer {settings.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")


def _save(path: Path, model, optimizer, schedule, rng: np.random.Generator, iteration: int, losses: list,
          parts: dict, threads: int) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state,
             "iteration": iteration, "losses": losses, "loss_parts": parts, "threads": threads}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    temporary = temporary_path(path)
    save_torch(state, temporary)
    commit_file(temporary, path)


def _restore(path: Path, model, optimizer, schedule, rng: np.random.Generator,
             device: str) -> tuple[int, list, dict, int]:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    rng.bit_generator.state = state["numpy_rng"]
    return state["iteration"], state["losses"], state["loss_parts"], state["threads"]


class TrainingStage(Stage):
    """A stage that trains one network: one shard, `00000.pt`, holding at least its "losses" per iteration
    (and "loss_parts" when the loss has named parts); the report plots them under `loss_title`."""
    shard_suffix = ".pt"
    runs_on_device = True
    exclusive = True
    loss_title: str = ""

    def shards(self, ctx: StageContext) -> list[Shard]:
        return [Shard("00000", ())]

    @staticmethod
    def start(params) -> SGDSettings:
        """The SGD settings its params hold, with torch's generator seeded by them: how every training begins."""
        settings = SGDSettings.from_config(params)
        torch.manual_seed(settings.seed)
        return settings

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict[str, dict],
               inputs: dict[str, StageCache]) -> dict:
        saved = torch.load(cache.shard_path("00000"), weights_only=True)
        if saved.get("loss_parts"):
            plot_losses({"total": saved["losses"], **saved["loss_parts"]}, cache.report_dir / "loss.png",
                        self.loss_title)
        else:
            plot_loss(saved["losses"], cache.report_dir / "loss.png", self.loss_title)
        return {**records["00000"]["metrics"], "device": ctx.device}
