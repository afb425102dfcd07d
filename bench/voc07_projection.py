"""R-CNN at VOC07's scale on this machine, projected from measured rates: disk, hours per stage, workers.

    python bench/voc07_projection.py [--backbones alexnet vgg16] [--batch 16] [--threads 2]
                                     [--photos ../shared/data/bccd/JPEGImages]

Measured here, with random weights (the cost of a forward pass does not depend on them), channels-last as
the stages run, the fastest of two calls after a warm-up: R-CNN's features pass (crops at the backbone's
input size to pool5, no gradient), a fine-tuning step (forward, backward, SGD) and fc6 + fc7 on cached
pool5 (what the SVM stage computes for every region it scores), each on --batch crops; and selective
search (the voc2007 preset's: rcnn-fast at 500 px) on the first photos of --photos.
Projected from those rates and VOC07's counts (5 011 trainval and 4 952 test images, 2 000 proposals
each, R-CNN's 70 000 fine-tuning iterations of 128 windows): the hours of each stage on one 2-core
worker, the feature cache's bytes, and how many 2-core dask.distributed workers would bring the training
to the paper's 84 h (proposals, features, the SVMs' scoring pass and test images split across workers;
fine-tuning, one SGD process, does not split). Not projected: liblinear's retrains (seconds to minutes
per class on BCCD), box regression, evaluation. The rates do not carry over between machines; the
method does (docs/speed.md).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import cv2
import torch
from memory_format import crop_workloads, fastest

from pipeline.engine.config import load_config
from pipeline.engine.memory import use_tensor_friendly_malloc
from pipeline.models import build_region_net
from pipeline.proposals import proposal_params, propose
from pipeline.reports import markdown_table

TRAINVAL, TEST, PROPOSALS = 5011, 4952, 2000
PAPER_TRAIN_HOURS = 84  # R-CNN with VGG16 on a K40 (Fast R-CNN, Table 4)
INPUT_SIZE = {"alexnet": 227, "vgg16": 224}


def crop_rates(backbone: str, batch: int) -> dict[str, float]:
    """Crops per second of the features pass, the fine-tuning step, and regions per second of fc6 + fc7."""
    size = INPUT_SIZE.get(backbone, 224)
    config = load_config("voc2007", [f"backbone.name={backbone}", f"backbone.input_size={size}",
                                     f"features.batch_size={batch}", f"finetune.batch_size={batch}"])
    rates = {}
    for name, (work, model, units, _) in crop_workloads(config, backbone).items():
        rates[name] = units / min(fastest(work, model, torch.channels_last) for _ in range(2))
    net = build_region_net(backbone, 21, size).eval()
    pool5 = torch.randn(batch, net.pool5_dim(size))

    def fc_pass() -> None:
        with torch.no_grad():
            net.fc(pool5)
    rates["fc6 + fc7 on cached pool5"] = batch / min(fastest(fc_pass, net, torch.contiguous_format) for _ in range(2))
    rates["pool5 values"] = net.pool5_dim(size)
    return rates


def search_seconds(photos: Path, count: int) -> float:
    """Selective search's seconds per photo with the voc2007 preset's settings."""
    params = proposal_params(load_config("voc2007", []))
    files = sorted(photos.glob("*.jpg"))[:count]
    if not files:
        raise SystemExit(f"{photos}: no .jpg photos to time selective search on (--photos)")
    started = time.perf_counter()
    for file in files:
        propose(cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB), params)
    return (time.perf_counter() - started) / len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["alexnet", "vgg16"], help="default: alexnet vgg16")
    parser.add_argument("--batch", type=int, default=16, help="crops per measured call (default: 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--photos", type=Path, default=Path("../shared/data/bccd/JPEGImages"),
                        help="photos to time selective search on (default: ../shared/data/bccd/JPEGImages)")
    parser.add_argument("--search-photos", type=int, default=5, help="how many (default: 5)")
    args = parser.parse_args()
    use_tensor_friendly_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cv2.setNumThreads(1)
    search = search_seconds(args.photos, args.search_photos)
    print(f"selective search: {search:.2f} s per photo (one thread; the stage runs one per core)\n")
    regions = TRAINVAL * PROPOSALS
    measured, projected = [], []
    for backbone in args.backbones:
        rates = crop_rates(backbone, args.batch)
        measured.append([backbone, INPUT_SIZE.get(backbone, 224), *(f"{rates[name]:.1f}" for name in (
            "R-CNN features (crops to pool5)", "R-CNN fine-tuning step", "fc6 + fc7 on cached pool5"))])
        hours = {  # one 2-core worker: the crop rates use both cores; selective search runs two photos at once
            "proposals (trainval + test)": (TRAINVAL + TEST) * search / 2 / 3600,
            "fine-tuning (70 000 x 128 windows)": 70000 * 128 / rates["R-CNN fine-tuning step"] / 3600,
            "features (trainval)": regions / rates["R-CNN features (crops to pool5)"] / 3600,
            "SVMs: fc6 + fc7 on every cached region (one pass)": regions / rates["fc6 + fc7 on cached pool5"] / 3600,
            "test: features + fc of 2 000 crops per test image": TEST * PROPOSALS * (
                1 / rates["R-CNN features (crops to pool5)"] + 1 / rates["fc6 + fc7 on cached pool5"]) / 3600}
        serial = hours["fine-tuning (70 000 x 128 windows)"]
        parallel = sum(value for name, value in hours.items() if not name.startswith(("fine", "test")))
        workers = (f"{math.ceil(parallel / (PAPER_TRAIN_HOURS - serial))}" if serial < PAPER_TRAIN_HOURS else
                   f"none: fine-tuning alone takes {serial:.0f} h on one worker")
        dim = rates["pool5 values"]
        projected += [[backbone, name, f"{value:,.1f}"] for name, value in hours.items()]
        projected += [[backbone, "training on one worker (all but test)", f"{serial + parallel:,.1f}"],
                      [backbone, f"2-core workers for {PAPER_TRAIN_HOURS} h of training", workers],
                      [backbone, f"feature cache, float32 ({dim} x 4 B per region)",
                       f"{regions * dim * 4 / 1e9:,.0f} GB"],
                      [backbone, "feature cache, uint8 before lzf (the presets')",
                       f"{regions * (dim + 8) / 1e9:,.0f} GB"]]
    print(f"measured: {args.threads} threads, batches of {args.batch}, crops (regions) per second\n")
    print(markdown_table(["backbone", "input", "features pass", "fine-tuning step", "fc6 + fc7 on pool5"], measured))
    print(f"\nprojected to VOC07 ({TRAINVAL} trainval + {TEST} test images, {PROPOSALS} proposals each), "
          f"hours on one 2-core worker unless said\n")
    print(markdown_table(["backbone", "stage", "projection"], projected))


if __name__ == "__main__":
    main()
