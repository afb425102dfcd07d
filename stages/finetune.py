"""Fine-tune the CNN for detection on warped proposals (R-CNN §2.3).

The classifier becomes N + 1 outputs (classes + background). Training windows are the training
split's proposals plus its non-difficult ground-truth boxes; a window whose best IoU with a
ground-truth box is >= fg_iou is that box's class, any other is background. Each mini-batch draws
fg_fraction of batch_size foreground windows and the rest background, uniformly over all windows
of all images (R-CNN: 32 + 96 = 128); with `augment`, crops are flipped and their colours changed
(not in R-CNN; it helps small data sets). SGD; resumable from checkpoints with identical final weights.
Runs on CUDA when the device is cuda (bf16 autocast there when amp is on).

Output `00000.pt`: {"model": state dict, "backbone": {...}, "classes": [...], "losses": [...]}.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.engine.cache import save_torch
from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import Shard, ShardOutput, StageContext
from pipeline.proposals import read_proposals
from pipeline.regions import augment_crops, draw, label_regions, load_training_images, predict_classes
from pipeline.training import TrainingStage, train
from pipeline.weights import StartsFromBackbone, backbone_shape, initial_net


class Finetune(StartsFromBackbone, TrainingStage):
    """Fine-tune the CNN on warped proposals as an (N + 1)-way classifier."""

    name = "finetune"
    version = "3"  # 3: R-CNN's warp, one bilinear sample per pixel (pipeline.regions)
    inputs = ("proposals",)
    headline_metrics = ("final_loss", "window_accuracy", "foreground_windows")
    loss_title = "finetune: (N + 1)-way loss on warped proposals"

    def params(self, config: dict) -> dict:
        return {**config["finetune"], **self.backbone_params(config)}

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:

        params, backbone = ctx.params, ctx.params["backbone"]
        settings = self.start(params)
        net = initial_net(backbone, len(ctx.classes), inputs)
        training = load_training_images(ctx.dataset, ctx.train_split, ctx.device, out.checkpoint.parent)
        windows = training_windows(training, read_proposals(inputs["proposals"]), params["fg_iou"])
        foreground = np.flatnonzero(windows.labels > 0)
        background = np.flatnonzero(windows.labels == 0)
        if not len(foreground) or not len(background):
            raise ConfigError(f"finetune: {len(foreground)} foreground and {len(background)} background windows; "
                              f"both are needed (check finetune.fg_iou and the proposals)")
        fg_per_batch = round(params["batch_size"] * params["fg_fraction"])
        labels = torch.from_numpy(windows.labels)

        def next_batch(rng: np.random.Generator):
            chosen = np.concatenate([draw(rng, foreground, fg_per_batch),
                                     draw(rng, background, params["batch_size"] - fg_per_batch)])
            crops = training.bank.warp(windows.image_index[chosen], windows.boxes[chosen],
                                       backbone["input_size"], backbone["context_pad"])
            return augment_crops(crops, rng) if params["augment"] else crops, labels[chosen].to(crops.device)

        losses = train(net, next_batch, settings, out.checkpoint, ctx.device, amp=params["amp"],
                       threads=ctx.threads, desc="finetune").losses
        sample = np.sort(np.random.default_rng(settings.seed).choice(len(labels), min(len(labels), 4096),
                                                                     replace=False))
        predicted = predict_classes(net, training.bank, windows.image_index[sample], windows.boxes[sample],
                                    backbone["input_size"], backbone["context_pad"], params["batch_size"])
        save_torch({"model": net.state_dict(), "backbone": backbone_shape(backbone),
                    "classes": ctx.classes, "losses": losses}, out.path)
        return {"final_loss": float(np.mean(losses[-20:])), "foreground_windows": len(foreground),
                "background_windows": len(background),
                "window_accuracy": float((predicted == labels[sample]).float().mean())}


@dataclass
class Windows:
    """Every training window: its image's index, its box (a tensor row) and label (0 = background)."""
    image_index: np.ndarray  # int[W]
    boxes: object            # torch float32[W, 4]
    labels: np.ndarray       # int64[W]


def training_windows(training, proposals: dict[str, np.ndarray], fg_iou: float) -> Windows:
    """Ground-truth boxes and proposals of each training image, labelled by their best IoU."""
    image_index, boxes, labels = [], [], []
    for index, image_id in enumerate(training.image_ids):
        gt_boxes = torch.from_numpy(training.gt_boxes[index])
        image_boxes = torch.cat([gt_boxes, torch.from_numpy(proposals.get(image_id, np.zeros((0, 4), np.float32)))])
        image_labels, _, _ = label_regions(image_boxes, gt_boxes, torch.from_numpy(training.gt_labels[index]), fg_iou)
        image_index.append(np.full(len(image_boxes), index))
        boxes.append(image_boxes)
        labels.append(image_labels.numpy())
    return Windows(np.concatenate(image_index), torch.cat(boxes), np.concatenate(labels))
