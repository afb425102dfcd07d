"""Honest clocks: device-synchronised laps, wall time of work done in pieces, and what it ran on.

Stage shards record when they started and how long they ran (pipeline.graph), so the time a method
spent training is the length of the union of its shards' intervals: shards that ran side by side are
counted once, and the gaps of a run that was killed and resumed are not counted at all.
"""
from __future__ import annotations

import os
import platform
import time
from functools import cache


class Clock:
    """Wall-clock laps; on cuda the device is synchronised before each reading. A lap given a name is
    added to `laps[name]`, so a test pass can report its time by part."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.laps: dict[str, float] = {}
        self.last = self._now()

    def _now(self) -> float:
        if self.device == "cuda":
            import torch
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


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, seconds) intervals."""
    total, reach = 0.0, float("-inf")
    for start, seconds in sorted(intervals):
        end = start + seconds
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


@cache
def describe_hardware(device: str) -> str:
    """e.g. 'NVIDIA H100 80GB HBM3' or 'cpu: AMD EPYC 7B13, 2 cores'."""
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model}, {len(os.sched_getaffinity(0))} cores"
