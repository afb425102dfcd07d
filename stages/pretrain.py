"""Train the backbone from scratch as an N-class classifier on ground-truth crops.

The lecture's first step, "train (or download) a classification model", for data sets without
ImageNet weights at hand (the shapes demo, or any machine that cannot fetch them). Each mini-batch
draws ground-truth boxes of the training split uniformly, jitters them (keeping IoU >= jitter_iou with
the original) and warps them as R-CNN warps regions; with `augment`, crops are also flipped and their
colours changed (pipeline.regions.augment_crops). Output: `00000.pt`, the
RegionNet's state dict, read by `finetune` when backbone.weights is "pretrain".

torch is imported inside the methods: importing it costs seconds, which cached runs should not pay.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from pipeline.engine.cache import save_torch
from pipeline.engine.stage import Shard, ShardOutput, StageContext
from pipeline.models import build_region_net
from pipeline.regions import augment_crops, load_training_images, predict_classes
from pipeline.training import SGDSettings, TrainingStage, train
from pipeline.weights import backbone_shape


class Pretrain(TrainingStage):
    """Train the backbone from scratch as a classifier on jittered ground-truth crops."""

    name = "pretrain"
    # 3: R-CNN's warp, one bilinear sample per pixel (pipeline.regions); 4: BatchNorm trained (pipeline.models)
    version = "4"
    headline_metrics = ("final_loss", "train_accuracy")
    loss_title = "pretrain: classification loss (ground-truth crops)"

    def params(self, config: dict) -> dict:
        return {**config["pretrain"], "backbone": backbone_shape(config["backbone"])}

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:

        params, backbone = ctx.params, ctx.params["backbone"]
        settings = SGDSettings.from_config(params)
        torch.manual_seed(settings.seed)
        net = build_region_net(backbone["name"], len(ctx.classes), backbone["input_size"], frozen_batchnorm=False)
        training = load_training_images(ctx.dataset, ctx.train_split, ctx.device, out.checkpoint.parent)
        windows = np.concatenate([np.full(len(boxes), index) for index, boxes in enumerate(training.gt_boxes)])
        boxes = torch.from_numpy(np.concatenate(training.gt_boxes))
        labels = torch.from_numpy(np.concatenate(training.gt_labels))

        def next_batch(rng: np.random.Generator):
            chosen = rng.integers(len(windows), size=params["batch_size"])
            jittered = jitter_boxes(boxes[chosen], params["jitter_iou"], rng)
            crops = training.bank.warp(windows[chosen], jittered, backbone["input_size"], backbone["context_pad"])
            return augment_crops(crops, rng) if params["augment"] else crops, labels[chosen].to(crops.device)

        losses = train(net, next_batch, settings, out.checkpoint, ctx.device, threads=ctx.threads,
                       desc="pretrain").losses
        predicted = predict_classes(net, training.bank, windows, boxes, backbone["input_size"], backbone["context_pad"],
                                    params["batch_size"])
        save_torch({"model": net.state_dict(), "losses": losses}, out.path)
        return {"final_loss": float(np.mean(losses[-20:])),
                "train_accuracy": float((predicted == labels).float().mean()), "gt_crops": len(windows)}


def jitter_boxes(boxes, min_iou: float, rng: np.random.Generator, tries: int = 10):
    """Randomly shifted and rescaled copies of boxes[K, 4] whose IoU with the original stays >= min_iou."""
    jittered = boxes.clone()
    pending = torch.ones(len(boxes), dtype=torch.bool)
    sizes = boxes[:, 2:] - boxes[:, :2]
    for _ in range(tries):
        count = int(pending.sum())
        if not count:
            break
        shift = torch.from_numpy(rng.uniform(-0.15, 0.15, (count, 2))).float() * sizes[pending]
        scale = torch.from_numpy(np.exp(rng.uniform(-0.2, 0.2, (count, 2)))).float()
        centers = (boxes[pending, :2] + boxes[pending, 2:]) / 2 + shift
        half = sizes[pending] * scale / 2
        candidates = torch.cat([centers - half, centers + half], dim=1)
        accepted = torch.diagonal(box_iou(candidates, boxes[pending])) >= min_iou
        rows = torch.nonzero(pending).flatten()[accepted]
        jittered[rows] = candidates[accepted]
        pending[rows] = False
    return jittered
