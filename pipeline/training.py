"""A resumable SGD loop: a killed run resumes from its checkpoint and ends with the same weights.

The checkpoint holds everything the rest of the run depends on: model, optimizer and LR-schedule
state, the torch RNG (dropout) and the numpy generator that samples the mini-batches, the CPU thread
count, the iteration and the loss history. It is written under a temporary name and renamed, so a kill never leaves a half file.
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

from pipeline.cache import commit_file, temporary_path

log = logging.getLogger(__name__)


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

    @classmethod
    def from_config(cls, section: dict) -> SGDSettings:
        return cls(**{name: section[name] for name in cls.__dataclass_fields__})


# next_batch(rng) -> (inputs, targets) on the device
BatchSampler = Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


def train(model: nn.Module, next_batch: BatchSampler, settings: SGDSettings, checkpoint: Path, device: str,
          amp: bool = False, threads: int = 0, desc: str = "train") -> list[float]:
    """Minimise cross-entropy over `settings.iterations` mini-batches; returns the loss per iteration.

    On the CPU the backward pass sums over threads, so the weights depend on the thread count in their
    last bits: training pins it (`threads`, 0 = every core; never whatever OMP_NUM_THREADS the process
    inherited) and a resumed run uses the count its checkpoint recorded.
    """
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, settings.step_every, settings.gamma)
    rng, losses, start = np.random.default_rng(settings.seed), [], 0
    torch.manual_seed(settings.seed)
    threads = threads or os.cpu_count() or 1
    if checkpoint.is_file():
        start, losses, threads = _restore(checkpoint, model, optimizer, schedule, rng, device)
        log.info("%s: resuming from iteration %d (%s)", desc, start, checkpoint.name)
    torch.set_num_threads(threads)
    use_amp = amp and device == "cuda"
    for iteration in tqdm(range(start, settings.iterations), desc=desc, unit="it", initial=start,
                          total=settings.iterations, disable=None):
        inputs, targets = next_batch(rng)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (iteration + 1) % settings.checkpoint_every == 0 and iteration + 1 < settings.iterations:
            _save(checkpoint, model, optimizer, schedule, rng, iteration + 1, losses, threads)
    model.eval()
    return losses


def _save(path: Path, model, optimizer, schedule, rng: np.random.Generator, iteration: int, losses: list,
          threads: int) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state,
             "iteration": iteration, "losses": losses, "threads": threads}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    temporary = temporary_path(path)
    torch.save(state, temporary)
    commit_file(temporary, path)


def _restore(path: Path, model, optimizer, schedule, rng: np.random.Generator, device: str) -> tuple[int, list, int]:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    rng.bit_generator.state = state["numpy_rng"]
    return state["iteration"], state["losses"], state["threads"]
