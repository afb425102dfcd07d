"""The timing table's test pass: every method from pixels to detections on the same images, timed.

Each method runs its own test-time path, assembled from its stages' functions: the sliding window
warps every window of its grid through R-CNN's fine-tuned CNN (stages.sliding_window); R-CNN warps every
proposal and runs the whole CNN on each crop (stages.features), SPP-net runs conv5 once per scale and
pools the pyramid (stages.sppnet), both then score with their SVMs, refine with their regressors and
apply per-class NMS (stages.detect, the result variant only); Fast and Faster R-CNN run
pipeline.detectors.detect. All in float32 on ctx.device, one image at a time; images are decoded and
models loaded before any clock starts; the first `warmup` images are not counted; on cuda the device
is synchronised before every clock reading (pipeline.timing.Clock).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.stage import RunContext
from pipeline.timing import Clock

# detector(rgb, proposals, clock, laps): runs one image, adding the seconds of each part to laps
Detector = Callable[[np.ndarray, np.ndarray, Clock, dict], None]


def time_test_pass(ctx: RunContext, inputs: dict, image_ids: list[str], warmup: int) -> dict:
    """Seconds per image (and per part, in ms) of each method, and of selective search, on these images."""
    from stages.proposals import propose
    images = [ctx.dataset.read_image(image_id) for image_id in image_ids]
    if any(rgb is None for rgb in images):
        raise ValueError("timing: a test image could not be read; see the proposals report")
    search = ctx.config["proposals"]
    proposals, search_seconds = [], []
    for rgb in images:
        clock = Clock(ctx.device)
        proposals.append(propose(rgb, search["mode"], search["search_side"], search["min_size"],
                                 search["max_proposals"]))
        search_seconds.append(clock.lap())
    methods = {}
    for method, detector in detectors(ctx, inputs).items():
        totals, per_image = {}, []
        for index, (rgb, boxes) in enumerate(zip(images, proposals)):
            laps: dict = {}
            detector(rgb, boxes, Clock(ctx.device), laps)
            if index >= warmup:
                per_image.append(sum(laps.values()))
                for part, seconds in laps.items():
                    totals[part] = totals.get(part, 0.0) + seconds
        methods[method] = {"seconds_per_image": float(np.mean(per_image)),
                           "parts_ms": {part: 1000 * seconds / len(per_image) for part, seconds in totals.items()}}
    return {"images": len(images) - warmup, "warmup": warmup, "methods": methods,
            "selective_search_s_per_image": float(np.mean(search_seconds[warmup:])),
            "proposals_per_image": float(np.mean([len(boxes) for boxes in proposals[warmup:]]))}


def detectors(ctx: RunContext, inputs: dict) -> dict[str, Detector]:
    from pipeline.detectors import with_truncated_svd
    from stages.fast_rcnn import FastRCNNTrain
    from stages.faster_rcnn import FasterRCNNTrain
    fast_rcnn, fast_params = FastRCNNTrain().load(inputs["fast-rcnn"], ctx.device, ctx.config)
    faster_rcnn, _ = FasterRCNNTrain().load(inputs["faster-rcnn"], ctx.device, ctx.config)
    return {"Sliding window": window_detector(ctx, inputs),
            "R-CNN": svm_detector(ctx, inputs, "", spp=False),
            "SPP-net": svm_detector(ctx, inputs, "sppnet-", spp=True),
            "Fast R-CNN": network_detector(ctx, fast_rcnn, uses_proposals=True),
            "Fast R-CNN (SVD)": network_detector(ctx, with_truncated_svd(fast_rcnn, fast_params["svd_ranks"]), True),
            "Faster R-CNN": network_detector(ctx, faster_rcnn, uses_proposals=False)}


def svm_detector(ctx: RunContext, inputs: dict, prefix: str, spp: bool) -> Detector:
    """R-CNN (warped crops through the whole CNN) or SPP-net (conv5 per scale, pyramid pooling), then
    SVM scores, box regression and per-class NMS."""
    from stages.bbox import load_regressors
    from stages.detect import PRIMARY, detect_image
    from stages.features import ImageFeatures, pool5_features
    from stages.finetune import load_finetuned
    from stages.sppnet import conv5_at_scales, pyramid_features
    from stages.svm import load_svms

    num_classes, device = len(ctx.dataset.classes), ctx.device
    net, backbone = load_finetuned(inputs[prefix + "finetune"], device)
    svms = load_svms(inputs[prefix + "svm"], num_classes)
    regressors = load_regressors(inputs[prefix + "bbox"], num_classes)
    batch_size, spp_params = ctx.config["features"]["batch_size"], ctx.config["sppnet"]

    def run(rgb: np.ndarray, boxes: np.ndarray, clock: Clock, laps: dict) -> None:
        if spp:
            maps = conv5_at_scales(net.trunk, rgb, spp_params["scales"], device, amp=False)
            laps["conv5 at every scale"] = clock.lap()
            features = pyramid_features(maps, boxes, spp_params["levels"], net.trunk_stride, backbone["input_size"])
            laps["pyramid pooling"] = clock.lap()
        else:
            features = pool5_features(net, rgb, boxes, backbone, batch_size, device, amp=False)
            laps["warp + CNN on every crop"] = clock.lap()
        regions = ImageFeatures(boxes, np.full(len(boxes), -1, np.int16), np.zeros(len(boxes), bool), features)
        detect_image(net, svms, regressors, regions, rgb.shape[1], rgb.shape[0], ctx.config["detect"], device,
                     variants=(PRIMARY,))
        laps["fc + SVM + bbox + NMS"] = clock.lap()
    return run


def window_detector(ctx: RunContext, inputs: dict) -> Detector:
    """The sliding-window baseline: R-CNN's fine-tuned classifier on a grid of windows (no proposals)."""
    from stages.finetune import load_finetuned
    from stages.sliding_window import detect_windows, grid_windows
    net, backbone = load_finetuned(inputs["finetune"], ctx.device)
    params = ctx.config["sliding_window"]

    def run(rgb: np.ndarray, _proposals: np.ndarray, clock: Clock, laps: dict) -> None:
        boxes = grid_windows(rgb.shape[1], rgb.shape[0], params["sizes"], params["aspect_ratios"], params["step"])
        detect_windows(net, backbone, rgb, boxes, params, ctx.device)
        laps["warp + CNN on every window + NMS"] = clock.lap()
    return run


def network_detector(ctx: RunContext, model, uses_proposals: bool) -> Detector:
    """Fast R-CNN (given the proposals) or Faster R-CNN (its RPN proposes)."""
    import torch

    from pipeline.detectors import detect
    from pipeline.regions import image_tensor, normalised
    device = ctx.device

    def run(rgb: np.ndarray, boxes: np.ndarray, clock: Clock, laps: dict) -> None:
        image = normalised(image_tensor(rgb, device))
        given = [torch.from_numpy(boxes).to(device)] if uses_proposals else None
        detect(model, [image], given, clock, laps)
    return run
