"""The networks' work in float32 and in bf16 on the CPU, side by side.

    python bench/bf16_cpu.py [--config photos] [--backbones mobilenet_v2 efficientnet_lite0] [--threads 2]
        [--repeats 3]

The workloads of bench/memory_format.py (R-CNN's features pass and fine-tuning step on the config's crops,
a Faster R-CNN training iteration and test pass on its image size), channels-last as the stages run them,
random weights, each once in float32 and once inside torch.autocast("cpu", dtype=torch.bfloat16), alternated
--repeats times, the fastest of each kept; and Faster R-CNN's test pass as `cpu_amp` runs it (only the trunk in
bf16: pipeline.precision). For the features pass it also prints how far bf16's pool5 is from float32's
(relative L2 error over the batch). This measures whether a CPU's bf16 units (AVX512_BF16, AMX) pay; the
figures, the CPUs they were measured on and the mAP with `cpu_amp` (bench/validate_change.py) are in
docs/speed.md.
"""
from __future__ import annotations

import platform
import time

import torch
from memory_format import bench_parser, rate, start, workloads_of

from pipeline.detectors import detect
from pipeline.models import build_region_net
from pipeline.precision import bf16_autocast
from pipeline.reports import markdown_table
from pipeline.timing import Clock

PRECISIONS = ("float32", "bf16")


def cpu_flags() -> str:
    """The bf16-related flags of this CPU (Linux), or what platform says elsewhere."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU flags"
    return " ".join(flag for flag in flags if "bf16" in flag or flag.startswith("amx")) or "no bf16 flags"


def seconds_of(work, bf16: bool) -> float:
    """Seconds of one call of `work(bf16)`, after a warm-up call."""
    work(bf16)
    started = time.perf_counter()
    work(bf16)
    return time.perf_counter() - started


def under_autocast(work):
    """`work` as a function of bf16: the whole of it under bf16 autocast, or not."""
    def run(bf16: bool) -> None:
        with bf16_autocast("cpu", bf16):
            work()
    return run


def trunk_only_test_pass(config: dict, model):
    """Faster R-CNN's test pass as `cpu_amp` runs it: the trunk in bf16, the RPN and heads in float32."""
    params = config["faster_rcnn"]
    image = [torch.rand(3, params["min_size"], params["max_size"])]

    def run(bf16: bool) -> None:
        model.eval()
        detect(model, image, None, Clock(), bf16=bf16)
    return run


def workloads(config: dict, backbone: str) -> dict[str, tuple]:
    """name -> (work(bf16), model, units, unit): bench/memory_format.py's under autocast, and cpu_amp's test pass."""
    found = {name: (under_autocast(work), *rest) for name, (work, *rest) in workloads_of(config, backbone).items()}
    _, model, units, unit = found["Faster R-CNN test pass"]
    found["Faster R-CNN test pass, trunk only (cpu_amp)"] = (trunk_only_test_pass(config, model), model, units, unit)
    return found


def pool5_error(config: dict, backbone: str) -> float:
    """Relative L2 distance of bf16 autocast's pool5 from float32's on one features batch."""
    size = config["backbone"]["input_size"]
    net = build_region_net(backbone, 4, size).eval().to(memory_format=torch.channels_last)
    crops = torch.randn(config["features"]["batch_size"], 3, size, size)
    with torch.no_grad():
        exact = net.pool5(crops)
        with bf16_autocast("cpu", True):
            approximate = net.pool5(crops).float()
    return float((approximate - exact).norm() / exact.norm())


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"],
                        help="backbone.name values (default: mobilenet_v2 efficientnet_lite0)")
    args = parser.parse_args()
    config = start(args)
    rows = []
    for backbone in args.backbones:
        for name, (work, model, units, unit) in workloads(config, backbone).items():
            model.to(memory_format=torch.channels_last)
            seconds = {precision: float("inf") for precision in PRECISIONS}
            for _ in range(args.repeats):
                for precision in PRECISIONS:
                    seconds[precision] = min(seconds[precision], seconds_of(work, precision != "float32"))
            full, half = (units / seconds[precision] for precision in PRECISIONS)
            rows.append([backbone, name, unit, rate(full), rate(half), f"{half / full:.2f}x"])
        rows.append([backbone, "pool5 relative error, bf16 vs float32", "", "", "",
                     f"{pool5_error(config, backbone):.4f}"])
    print(f"config {args.config}, {args.threads} threads, fastest of {args.repeats}; CPU flags: {cpu_flags()}")
    print(markdown_table(["backbone", "work", "unit", *PRECISIONS, "bf16 / float32"], rows))


if __name__ == "__main__":
    main()
