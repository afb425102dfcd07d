"""Honest clocks: device-synchronised laps, wall time of work done in pieces, and what it ran on.

Stage shards record when they started and how long they ran (pipeline.engine.graph), so the time a method
spent training is the length of the union of its shards' intervals: shards that ran side by side are
counted once, and the gaps of a run that was killed and resumed are not counted at all.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.engine.stage import describe_hardware
from pipeline.proposals import propose


class Clock:
    """Wall-clock laps; on cuda the device is synchronised before each reading. A lap given a name is
    added to `laps[name]`, so a test pass can report its time by part."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.laps: dict[str, float] = {}
        self.last = self._now()

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, part: str | None = None) -> float:
        """Seconds since the previous lap (or since the clock was made), added to laps[part] if named."""
        now = self._now()
        lap, self.last = now - self.last, now
        if part is not None:
            self.laps[part] = self.laps.get(part, 0.0) + lap
        return lap

    def total(self) -> float:
        """Seconds of every named lap."""
        return sum(self.laps.values())


class FlopMeter(Clock):
    """A Clock whose laps are the multiply-adds torch counted since the last lap (torch.utils.flop_counter:
    convolutions and matrix products; RoI pooling, NMS and numpy work are not counted), not seconds."""

    def __init__(self, counter):
        self.counter, self.laps, self.last = counter, {}, 0

    def _now(self) -> float:
        return self.counter.get_total_flops() / 2  # torch counts two FLOPs per multiply-add


def time_detector(detector, variant: str, images: list, proposals: list, warmup: int, device: str) -> dict:
    """Seconds per image (and ms per part) of one variant of a detector on these images, after `warmup`
    images that are not counted; proposals: each image's boxes, or None for a method that proposes its own."""
    parts, per_image = {}, []
    for index, (rgb, boxes) in enumerate(zip(images, proposals)):
        clock = Clock(device)
        detector(rgb, boxes, (variant,), clock)
        if index >= warmup:
            per_image.append(clock.total())
            for part, seconds in clock.laps.items():
                parts[part] = parts.get(part, 0.0) + seconds
    return {"seconds_per_image": float(np.mean(per_image)),
            "parts_ms": {part: 1000 * seconds / len(per_image) for part, seconds in parts.items()}}


def count_multiply_adds(detector, variant: str, images: list, proposals: list) -> dict[str, float]:
    """Multiply-adds per image, by part, of one variant of a detector (torch.utils.flop_counter)."""
    totals: dict[str, float] = {}
    for rgb, boxes in zip(images, proposals):
        with FlopCounterMode(display=False) as counter:
            meter = FlopMeter(counter)
            detector(rgb, boxes, (variant,), meter)
        for part, count in meter.laps.items():
            totals[part] = totals.get(part, 0.0) + count / len(images)
    return totals


def time_proposals(images: list, params, device: str) -> tuple[list, list[float]]:
    """Each image's region proposals (pipeline.proposals.propose with these params) and the seconds each took."""
    proposals, seconds = [], []
    for rgb in images:
        clock = Clock(device)
        proposals.append(propose(rgb, params))
        seconds.append(clock.lap())
    return proposals, seconds


def timing_key_extras(device: str, threads: int) -> dict:
    """Timings belong to a machine: another one (or another thread count) measures again."""
    return {"hardware": describe_hardware(device), "torch_threads": threads}
