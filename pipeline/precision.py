"""Where the networks compute in bf16: `amp` (training and R-CNN's features on CUDA) and `cpu_amp` (the test-time
trunks, and R-CNN's features, on a CPU with bf16 units).

bf16 keeps float32's exponent and 8 bits of its mantissa: a trunk's activations come out within about 1 % of
float32's, but a box coordinate of 600 px would be rounded to 4 px, so on the CPU only the trunk runs in bf16
and what reads boxes (the RPN's decoding, RoI pooling, the heads, NMS, the SVMs) gets its maps back in float32.
On a CPU without bf16 units (AVX512_BF16 or AMX, as PyTorch's own kernels dispatch on) oneDNN would emulate
bf16, slowly, so `cpu_amp` asks for it and the units are detected here, never assumed. Even with the units it
paid on one CPU measured and not on another, so the presets leave it off. What it buys and costs in mAP, and on
which CPUs it was measured: docs/speed.md.
"""
from __future__ import annotations

import contextlib

import torch

from pipeline.engine.config import register_neutral_option

register_neutral_option("cpu_amp", False)  # added later: off, a stage computes what was cached before it


def cpu_amp_param(config: dict) -> dict:
    """A stage's `cpu_amp` param: {} while it is off in a cache key (a neutral option), else {"cpu_amp": ...}."""
    return {"cpu_amp": config["cpu_amp"]} if "cpu_amp" in config else {}


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX tiles), as PyTorch's CPU dispatch reads it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def test_time_bf16(device: str, cpu_amp: bool) -> bool:
    """Whether a test-time trunk runs in bf16: on a CPU with bf16 units when `cpu_amp` is on; on CUDA the test
    passes stay float32 (`amp` covers CUDA's training and features)."""
    return device == "cpu" and cpu_amp and cpu_has_bf16_units()


def features_bf16(device: str, amp: bool, cpu_amp: bool) -> bool:
    """Whether R-CNN's features stage runs its trunk in bf16: `amp` on CUDA, `cpu_amp` on a CPU with bf16 units
    (where R-CNN's test pass computes its pool5 the same way: pipeline.classifiers)."""
    return amp if device == "cuda" else test_time_bf16(device, cpu_amp)


def bf16_autocast(device: str, enabled: bool) -> contextlib.AbstractContextManager:
    """torch.autocast in bf16 on `device` ("cpu" or "cuda") when enabled, else nothing."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
