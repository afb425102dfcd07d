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

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.cache import StageCache
from pipeline.errors import ConfigError
from pipeline.stage import RunContext, Shard, ShardOutput, TrainingStage
from stages.pretrain import backbone_params, load_training_images, predict_classes

class Finetune(TrainingStage):
    """Fine-tune the CNN on warped proposals as an (N + 1)-way classifier."""

    name = "finetune"
    version = "2"
    headline_metrics = ("final_loss", "window_accuracy", "foreground_windows")
    loss_title = "finetune: (N + 1)-way loss on warped proposals"

    def params(self, config: dict) -> dict:
        return {**config["finetune"], "backbone": initial_backbone_params(config),
                "train_split": config["data"]["train_split"], "amp": config["amp"]}

    def input_stages(self, config: dict) -> tuple[str, ...]:
        return ("proposals",) + pretrain_input(config)

    def key_extras(self, ctx: RunContext) -> dict:
        return weights_key_extras(ctx)

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        import torch

        from pipeline.regions import augment_crops, draw
        from pipeline.training import SGDSettings, train
        from stages.proposals import read_proposals

        params, backbone = ctx.config["finetune"], ctx.config["backbone"]
        settings = SGDSettings.from_config(params)
        torch.manual_seed(settings.seed)
        net = initial_net(ctx, inputs)
        training = load_training_images(ctx, ctx.device)
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

        losses = train(net, next_batch, settings, out.checkpoint, ctx.device, amp=ctx.config["amp"],
                       threads=ctx.config["torch_threads"], desc="finetune").losses
        sample = np.sort(np.random.default_rng(settings.seed).choice(len(labels), min(len(labels), 4096), replace=False))
        predicted = predict_classes(net, training, windows.image_index[sample], windows.boxes[sample], backbone)
        torch.save({"model": net.state_dict(), "backbone": backbone_params(ctx.config),
                    "classes": ctx.dataset.classes, "losses": losses}, out.path)
        return {"final_loss": float(np.mean(losses[-20:])), "foreground_windows": len(foreground),
                "background_windows": len(background),
                "window_accuracy": float((predicted == labels[sample]).float().mean())}


def initial_backbone_params(config: dict) -> dict:
    """The backbone a stage starts from, for its key: its shape and where its weights come from."""
    return {**backbone_params(config), "weights": config["backbone"]["weights"]}


def pretrain_input(config: dict) -> tuple[str, ...]:
    """("pretrain",) when the backbone's weights come from the pretrain stage, else ()."""
    return ("pretrain",) if config["backbone"]["weights"] == "pretrain" else ()


def weights_key_extras(ctx: RunContext) -> dict:
    """The bytes of an ImageNet weights file change a result: hash them into the key."""
    backbone = ctx.config["backbone"]
    if backbone["weights"] in ("pretrain", "none"):
        return {}
    from pipeline.models import torchvision_weights_file
    path = torchvision_weights_file(backbone["name"], backbone["weights"])
    return {"weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@dataclass
class Windows:
    """Every training window: its image's index, its box (a tensor row) and label (0 = background)."""
    image_index: np.ndarray  # int[W]
    boxes: object            # torch float32[W, 4]
    labels: np.ndarray       # int64[W]


def training_windows(training, proposals: dict[str, np.ndarray], fg_iou: float) -> Windows:
    """Ground-truth boxes and proposals of each training image, labelled by their best IoU."""
    import torch

    from pipeline.regions import label_regions
    image_index, boxes, labels = [], [], []
    for index, image_id in enumerate(training.image_ids):
        gt_boxes = torch.from_numpy(training.gt_boxes[index])
        image_boxes = torch.cat([gt_boxes, torch.from_numpy(proposals.get(image_id, np.zeros((0, 4), np.float32)))])
        image_labels, _, _ = label_regions(image_boxes, gt_boxes, torch.from_numpy(training.gt_labels[index]), fg_iou)
        image_index.append(np.full(len(image_boxes), index))
        boxes.append(image_boxes)
        labels.append(image_labels.numpy())
    return Windows(np.concatenate(image_index), torch.cat(boxes), np.concatenate(labels))


def initial_net(ctx: RunContext, inputs: dict):
    """The backbone to fine-tune, per backbone.weights, with a fresh (N + 1)-way head."""
    import torch

    from pipeline.models import build_region_net, load_state, torchvision_weights_file
    backbone, num_classes = ctx.config["backbone"], len(ctx.dataset.classes)
    weights = backbone["weights"]
    if weights == "pretrain":
        net = build_region_net(backbone["name"], num_classes, backbone["input_size"])
        net.load_state_dict(torch.load(inputs["pretrain"].shard_path("00000"), weights_only=True)["model"])
        net.replace_head(num_classes + 1)
        return net
    if weights == "none":
        return build_region_net(backbone["name"], num_classes + 1, backbone["input_size"])
    state = load_state(torchvision_weights_file(backbone["name"], weights))
    return build_region_net(backbone["name"], num_classes + 1, backbone["input_size"], torchvision_state=state)


def load_finetuned(cache: StageCache, device: str):
    """The fine-tuned RegionNet (eval mode, on `device`) and the backbone settings it was trained with.

    Reads finetune's output and sppnet-finetune's (whose fc6 takes the pyramid, `fc6_input_dim`).
    """
    import torch

    from pipeline.models import build_region_net
    saved = torch.load(cache.shard_path("00000"), map_location=device, weights_only=True)
    backbone = saved["backbone"]
    net = build_region_net(backbone["name"], len(saved["classes"]) + 1, backbone["input_size"],
                           fc6_input_dim=saved.get("fc6_input_dim"))
    net.load_state_dict(saved["model"])
    return net.to(device).eval(), backbone
