"""The networks' work with their tensors in PyTorch's default layout (NCHW) and channels-last (NHWC), side by side.

    python bench/memory_format.py [--config photos] [--backbone NAME] [--threads 2] [--repeats 5]

pipeline.models.on_device puts every network the stages run in channels-last layout. This measures what
that buys on this machine, for the shapes the config gives (photos: MobileNetV2, 96 px crops, 480-800 px
images): R-CNN's features stage (crops to pool5, no gradient, features.batch_size per pass), one
fine-tuning step (finetune.batch_size crops, forward, backward and SGD), one Faster R-CNN training
iteration (images_per_batch random images at min_size x max_size with three boxes each) and Faster
R-CNN's test pass on one image. Random weights (ImageNet's where backbone.weights names a file would
cost the same), the same model and inputs in both layouts, the layouts alternated --repeats times and
the fastest of each kept, --threads torch threads, glibc's allocator as the CLI sets it (pipeline.engine.memory).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from pipeline.detectors import build_detection_model
from pipeline.engine.config import load_config
from pipeline.engine.memory import use_tensor_friendly_malloc
from pipeline.models import build_region_net
from pipeline.reports import markdown_table

LAYOUTS = {"NCHW (default)": torch.contiguous_format, "channels-last": torch.channels_last}


def fastest(work: Callable[[], None], model: torch.nn.Module, layout: torch.memory_format) -> float:
    """Seconds of one call of `work` with `model` in `layout`, after a warm-up call."""
    model.to(memory_format=layout)
    work()
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def crop_workloads(config: dict, backbone: str) -> dict[str, tuple]:
    """name -> (work, model, unit count, unit) for R-CNN's features pass and fine-tuning step."""
    size = config["backbone"]["input_size"]
    net = build_region_net(backbone, 4, size)
    feature_batch = torch.randn(config["features"]["batch_size"], 3, size, size)
    train_batch = torch.randn(config["finetune"]["batch_size"], 3, size, size)
    labels = torch.randint(0, 4, (len(train_batch),))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)

    def features() -> None:
        net.eval()
        with torch.no_grad():
            net.pool5(feature_batch)

    def finetune_step() -> None:
        net.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(train_batch), labels).backward()
        optimizer.step()
    return {"R-CNN features (crops to pool5)": (features, net, len(feature_batch), "crops/s"),
            "R-CNN fine-tuning step": (finetune_step, net, len(train_batch), "crops/s")}


def faster_rcnn_workloads(config: dict, backbone: str) -> dict[str, tuple]:
    """name -> (work, model, unit count, unit) for a Faster R-CNN training iteration and its test pass."""
    params = config["faster_rcnn"]
    model = build_detection_model("faster-rcnn", build_region_net(backbone, 4, config["backbone"]["input_size"]),
                                  3, params)
    images = [torch.rand(3, params["min_size"], params["max_size"]) for _ in range(params["images_per_batch"])]
    boxes = torch.tensor([[40.0, 40.0, 90.0, 90.0], [200.0, 150.0, 300.0, 230.0], [400.0, 300.0, 430.0, 330.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3])} for _ in images]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_iteration() -> None:
        model.train()
        optimizer.zero_grad()
        sum(model(images, targets).values()).backward()
        optimizer.step()

    def test_image() -> None:
        model.eval()
        with torch.no_grad():
            model(images[:1])
    return {"Faster R-CNN training iteration": (train_iteration, model, 1, "iterations/s"),
            "Faster R-CNN test pass": (test_image, model, 1, "images/s")}


def rate(value: float) -> str:
    """Three significant digits, without an exponent for large rates."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def workloads_of(config: dict, backbone: str) -> dict[str, tuple]:
    """Every workload of this benchmark for one backbone: name -> (work, model, units, unit)."""
    return {**crop_workloads(config, backbone), **faster_rcnn_workloads(config, backbone)}


def bench_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options this benchmark and bench/backbones.py share: --config, --threads, --repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="photos",
                        help="config preset or file whose shapes are used (default: photos)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"alternations of what is compared; the fastest counts (default: {repeats})")
    return parser


def start(args: argparse.Namespace) -> dict:
    """The CLI's allocator, --threads torch threads and a fixed seed; returns the config."""
    use_tensor_friendly_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return load_config(args.config, [])


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], repeats=5)
    parser.add_argument("--backbone", help="a backbone.name (default: the config's)")
    args = parser.parse_args()
    config = start(args)
    backbone = args.backbone or config["backbone"]["name"]
    rows = []
    for name, (work, model, units, unit) in workloads_of(config, backbone).items():
        seconds = {layout: float("inf") for layout in LAYOUTS}
        for _ in range(args.repeats):
            for layout, memory_format in LAYOUTS.items():
                seconds[layout] = min(seconds[layout], fastest(work, model, memory_format))
        default, channels_last = (units / seconds[layout] for layout in LAYOUTS)
        rows.append([name, unit, rate(default), rate(channels_last), f"{channels_last / default:.2f}x"])
    print(f"{backbone}, config {args.config}, {args.threads} threads, fastest of {args.repeats}")
    print(markdown_table(["work", "unit", *LAYOUTS, "channels-last / default"], rows))


if __name__ == "__main__":
    main()
