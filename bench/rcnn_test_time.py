"""R-CNN test time per image, split into its parts, beside the CNN forward alone on the same crops.

    python bench/rcnn_test_time.py [--config demo] [--data DIR] [--cache DIR] [--images 20] [--device auto]

Needs a cache in which `rcnn run` (with the same config and data) has trained the networks, SVMs and
regressors. For each of the first --images test images it times, in one run:
    read                    decoding the image
    proposals               selective search (pipeline.proposals.propose, as the proposals stage)
    then R-CNN's own detector (pipeline.methods.RCNN, what rcnn-detect, the timing table and rcnn predict
    run), by the parts it reports:
    warp                    context-padded warping of every proposal (roi_align on the device)
    CNN on every crop       conv layers to pool5, in the features stage's batches
    rounding to features.dtype  pool5 rounded as the SVMs' training features were stored
    fc6 + fc7               the fc layers on every crop's pool5
    SVM + bbox + NMS        SVM scores, box regression, per-class NMS
and, right after each image, the network alone (conv layers, fc6, fc7) on as many random crops, batched
the same way, as a check of the network's laps. The first image is a warm-up and is not counted; CUDA is
synchronised before every clock read. It prints the share of each part and the overhead: everything but
the network (CNN on every crop, fc6 + fc7) and selective search, over the total.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline.data.voc import VOCDataset
from pipeline.engine.config import load_config
from pipeline.engine.errors import UserError
from pipeline.engine.runner import RunContext, plan_stages
from pipeline.methods import RCNN
from pipeline.proposals import proposal_params, propose
from pipeline.reports import markdown_table
from pipeline.timing import Clock
from stages import REGISTRY


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
    missing = [name for name in RCNN.model_stages.values() if not caches[name].is_complete()]
    if missing:
        raise SystemExit(f"bench: {', '.join(missing)} not cached for this config and data; run `rcnn run` first")
    parts, network_alone, crops = time_test_pass(ctx, caches, dataset.image_ids(data["test_split"])[:args.images + 1])
    report(parts, network_alone, crops, ctx)


def time_test_pass(ctx: RunContext, caches: dict, image_ids: list[str]) -> tuple[dict, float, list[int]]:
    """Seconds per part and of the network alone, summed over the images after the first, and the crop
    count of each image."""
    device, params = ctx.device, RCNN.test_params(ctx.config)
    models = RCNN.load({role: caches[stage] for role, stage in RCNN.model_stages.items()}, params, device)
    # what RCNN.detector(caches, ...) builds; the net is timed alone too
    detector = RCNN.assemble(models, params, device)
    net, size, batch_size = models.net, models.backbone["input_size"], params["crops_per_batch"]
    totals, network_alone, crop_counts = {}, 0.0, []
    for index, image_id in enumerate(image_ids):
        clock = Clock(device)
        rgb = ctx.dataset.read_image(image_id)
        clock.lap("read")
        boxes = propose(rgb, proposal_params(ctx.config))
        clock.lap("proposals")
        detector(rgb, boxes, (RCNN.result,), clock)
        alone = time_network(net, len(boxes), size, batch_size, device)
        if index:  # the first image warms up caches, allocators and kernels
            for part, seconds in clock.laps.items():
                totals[part] = totals.get(part, 0.0) + seconds
            network_alone += alone
            crop_counts.append(len(boxes))
    return totals, network_alone, crop_counts


def time_network(net, count: int, size: int, batch_size: int, device: str) -> float:
    """Seconds of conv layers, fc6 and fc7 on `count` random crops, in batches of batch_size."""
    crops = torch.randn(count, 3, size, size, device=device)
    clock = Clock(device)
    with torch.no_grad():
        for batch in crops.split(batch_size):
            net.fc(net.pool5(batch).flatten(1)).cpu()
    return clock.lap()


def report(totals: dict, network_alone: float, crop_counts: list[int], ctx: RunContext) -> None:
    images, total = len(crop_counts), sum(totals.values())
    rows = [[part, seconds, 1000 * seconds / images, f"{100 * seconds / total:.1f} %"]
            for part, seconds in totals.items()]
    rows.append(["total", total, 1000 * total / images, "100 %"])
    rows.append(["network alone (conv + fc6 + fc7), random crops, same counts", network_alone,
                 1000 * network_alone / images, f"{100 * network_alone / total:.1f} %"])
    overhead = total - totals["CNN on every crop"] - totals["fc6 + fc7"] - totals["proposals"]
    device = torch.cuda.get_device_name() if ctx.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"R-CNN test time on {device}: {images} images, {np.mean(crop_counts):.0f} proposals per image, "
          f"backbone {ctx.config['backbone']['name']} at {ctx.config['backbone']['input_size']} px\n")
    print(markdown_table(["part", "seconds", "ms per image", "share"], rows))
    print(f"overhead (all but the network and selective search) / total: {overhead / total:.3f} (goal <= 0.10)")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        raise SystemExit(f"bench: {error}") from None
