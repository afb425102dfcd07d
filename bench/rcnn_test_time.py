"""R-CNN test time per image, split into its parts, beside the CNN forward alone on the same crops.

    python bench/rcnn_test_time.py [--config demo] [--data DIR] [--cache DIR] [--images 20] [--device auto]

Needs a cache in which `rcnn run` (with the same config and data) has trained the networks, SVMs and
regressors. For each of the first --images test images it times, in one run:
    read      decoding the image
    proposals selective search (the proposals stage's propose())
    warp      context-padded warping of every proposal (roi_align on the device)
    forward   conv layers to pool5, then fc6 and fc7, in the features stage's batches
    svm+nms   SVM scores, box regression, per-class NMS (pipeline.classifiers.score_regions, as rcnn-detect)
then runs the forward alone on as many random crops, batched the same way. The first image is a
warm-up and is not counted; CUDA is synchronised before every clock read. It prints the share of
each part, and the overhead: everything but the forward and selective search, over the total.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline.classifiers import load_regressors, load_svms, score_regions
from pipeline.config import load_config
from pipeline.data.voc import VOCDataset
from pipeline.errors import UserError
from pipeline.methods import RCNN
from pipeline.proposals import propose
from pipeline.regions import image_tensor, mean_subtracted, warp_regions
from pipeline.reports import markdown_table
from pipeline.runner import RunContext, plan_stages
from pipeline.timing import Clock
from pipeline.weights import load_finetuned
from stages import REGISTRY

PARTS = ("read", "proposals", "warp", "forward", "svm+nms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="config preset or file (default: demo)")
    parser.add_argument("--data", type=Path, help="VOC-layout root (default: the config's data.root)")
    parser.add_argument("--cache", type=Path, help="cache folder (default: the config's cache_dir)")
    parser.add_argument("--images", type=int, default=20, help="test images to time, after one warm-up image")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the networks run")
    args = parser.parse_args()
    config = load_config(args.config, [f"device={args.device}"])
    data = config["data"]
    dataset = VOCDataset(args.data or data["root"], classes=data["classes"], class_split=data["train_split"])
    ctx = RunContext(config, dataset, Path(args.cache or config["cache_dir"]), Path(config["reports_dir"]))
    caches = {plan.stage.name: plan.cache for plan in plan_stages([RCNN.detect_stage], REGISTRY, ctx)}
    missing = [name for name in ("finetune", "svm", "bbox") if not caches[name].is_complete()]
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} not cached for this config and data; run `rcnn run` first")
    timings, crops = time_pipeline(ctx, caches, dataset.image_ids(data["test_split"])[:args.images + 1])
    forward_only = time_forward_only(ctx, caches, crops)
    report(timings, forward_only, crops, ctx)


def time_pipeline(ctx: RunContext, caches: dict, image_ids: list[str]) -> tuple[dict, list[int]]:
    """Seconds per part, summed over the images after the first, and the crop count of each image."""
    device, params = ctx.device, ctx.config["proposals"]
    net, backbone, classes = load_finetuned(caches["finetune"], device)
    svms, regressors = load_svms(caches["svm"], len(classes)), load_regressors(caches["bbox"], len(classes))
    test_params = RCNN.test_params(ctx.config)
    batch_size = test_params["crops_per_batch"]
    totals, crop_counts = dict.fromkeys(PARTS, 0.0), []
    for index, image_id in enumerate(image_ids):
        clock = Clock(device)
        rgb = ctx.dataset.read_image(image_id)
        spent = {"read": clock.lap()}
        boxes = propose(rgb, params)
        spent["proposals"] = clock.lap()
        image = mean_subtracted(image_tensor(rgb, device))
        spent["warp"] = spent["forward"] = 0.0
        pool5_parts = []
        with torch.no_grad():
            for batch in torch.from_numpy(boxes).split(batch_size):
                crops = warp_regions(image, batch, backbone["input_size"], backbone["context_pad"])
                spent["warp"] += clock.lap()
                pool5 = net.pool5(crops).flatten(1)
                net.fc(pool5)  # fc6, fc7: the SVMs' input, computed here so the forward is timed whole
                pool5_parts.append(pool5.float().cpu().numpy())
                spent["forward"] += clock.lap()
        features = np.concatenate(pool5_parts).astype(test_params["feature_dtype"])
        score_regions(net, svms, regressors, boxes, features, rgb.shape[1], rgb.shape[0], test_params, device,
                      (RCNN.result,))
        spent["svm+nms"] = clock.lap()
        if index:  # the first image warms up caches, allocators and kernels
            for part in PARTS:
                totals[part] += spent[part]
            crop_counts.append(len(boxes))
    return totals, crop_counts


def time_forward_only(ctx: RunContext, caches: dict, crop_counts: list[int]) -> float:
    """The conv + fc forward alone on random crops, image by image in the same batches."""
    device = ctx.device
    net, backbone, _ = load_finetuned(caches["finetune"], device)
    size, batch_size = backbone["input_size"], ctx.config["features"]["batch_size"]
    inputs = [torch.randn(count, 3, size, size, device=device) for count in crop_counts]
    clock, seconds = Clock(device), 0.0
    with torch.no_grad():
        net.fc(net.pool5(inputs[0][:batch_size]).flatten(1))  # warm-up
        clock.lap()
        for crops in inputs:
            for batch in crops.split(batch_size):
                net.fc(net.pool5(batch).flatten(1)).cpu()
        seconds = clock.lap()
    return seconds


def report(totals: dict, forward_only: float, crop_counts: list[int], ctx: RunContext) -> None:
    images, total = len(crop_counts), sum(totals.values())
    rows = [[part, seconds, 1000 * seconds / images, f"{100 * seconds / total:.1f} %"] for part, seconds in totals.items()]
    rows.append(["total", total, 1000 * total / images, "100 %"])
    rows.append(["forward alone, same crops", forward_only, 1000 * forward_only / images, ""])
    overhead = total - totals["forward"] - totals["proposals"]
    device = torch.cuda.get_device_name() if ctx.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"R-CNN test time on {device}: {images} images, {np.mean(crop_counts):.0f} proposals per image, "
          f"backbone {ctx.config['backbone']['name']} at {ctx.config['backbone']['input_size']} px\n")
    print(markdown_table(["part", "seconds", "ms per image", "share"], rows))
    print(f"overhead (all but the forward and selective search) / total: {overhead / total:.3f} (goal < 0.2)")
    print(f"forward inside the pipeline / forward alone: {totals['forward'] / forward_only:.3f}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        raise SystemExit(f"bench: {error}") from None
