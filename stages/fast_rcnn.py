"""Fast R-CNN (Girshick, ICCV 2015): one conv pass per image, RoI pooling, a multitask loss.

    fast-rcnn           trains pipeline.detectors.FastRCNN from the pretrained backbone on the cached
                        selective-search proposals: mini-batches of images_per_batch images x
                        rois_per_image RoIs (Fast R-CNN: 2 x 64, 25 % foreground), horizontal flips and,
                        with `augment`, colour changes; resumable like every training stage.
                        Output `00000.pt`: the model's state, its params, classes and losses.
    fast-rcnn-detect    detections of the test split, per image shard in detect's layout, for two
                        variants: `fast_rcnn` and `svd`, the same model with fc6 and fc7 replaced by their
                        truncated SVD (svd_ranks; Fast R-CNN §3.1), plus the devkit's results files.
    fast-rcnn-evaluate  the shared evaluation stage (stages.evaluate) on those variants.

Faster R-CNN's stages (stages.faster_rcnn) are these classes with the RPN in place of the proposals.
"""
from __future__ import annotations

import h5py
import numpy as np

from pipeline.cache import StageCache
from pipeline.stage import RunContext, Shard, ShardOutput, Stage, TrainingStage, image_shards
from stages.finetune import initial_backbone_params, pretrain_input, weights_key_extras
from stages.pretrain import backbone_params

FAST_RCNN_VARIANTS = {"fast_rcnn": "Fast R-CNN", "svd": "Fast R-CNN, truncated SVD of fc6 and fc7"}
# settings that only change detection: part of the detect stage's key, not the training stage's
TEST_PARAMS = ("svd_ranks", "nms_iou", "max_per_image", "rpn_pre_nms_test", "rpn_post_nms_test", "images_per_shard")


class FastRCNNTrain(TrainingStage):
    """Train Fast R-CNN (RoI pooling, two sibling heads, multitask loss) on the cached proposals."""

    name = "fast-rcnn"
    section = "fast_rcnn"          # its config section
    version = "1"
    headline_metrics = ("final_loss",)
    loss_title = "fast-rcnn: multitask loss"
    uses_proposals = True          # False for Faster R-CNN, whose RPN proposes

    def params(self, config: dict) -> dict:
        training = {name: value for name, value in config[self.section].items() if name not in TEST_PARAMS}
        return {**training, "backbone": initial_backbone_params(config),
                "train_split": config["data"]["train_split"], "amp": config["amp"]}

    def input_stages(self, config: dict) -> tuple[str, ...]:
        return ("proposals",) * self.uses_proposals + pretrain_input(config)

    def key_extras(self, ctx: RunContext) -> dict:
        return weights_key_extras(ctx)

    def build(self, net, num_classes: int, params: dict):
        from pipeline.detectors import FastRCNN
        return FastRCNN(net, num_classes, params)

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        import torch

        from pipeline.training import SGDSettings, train
        from stages.finetune import initial_net
        from stages.pretrain import load_training_images
        from stages.proposals import read_proposals

        params = ctx.config[self.section]
        settings = SGDSettings.from_config(params)
        torch.manual_seed(settings.seed)
        model = self.build(initial_net(ctx, inputs), len(ctx.dataset.classes), params)
        training = load_training_images(ctx, ctx.device)
        proposals = read_proposals(inputs["proposals"]) if self.uses_proposals else None
        next_batch = image_batches(training, proposals, params)

        def loss_of(model, batch):
            images, image_proposals, targets = batch
            return model(images, image_proposals, targets) if self.uses_proposals else model(images, targets)

        history = train(model, next_batch, settings, out.checkpoint, ctx.device, amp=ctx.config["amp"],
                        threads=ctx.config["torch_threads"], desc=self.name, loss_of=loss_of)
        torch.save({"model": model.state_dict(), "params": params, "backbone": backbone_params(ctx.config),
                    "classes": ctx.dataset.classes, "losses": history.losses, "loss_parts": history.parts}, out.path)
        return {"final_loss": float(np.mean(history.losses[-20:])),
                **{f"final_{name}": float(np.mean(values[-20:])) for name, values in history.parts.items()}}

    def load(self, cache: StageCache, device: str, config: dict):
        """The trained model (eval mode, on `device`) with the config's test-time settings, and its params."""
        import torch

        from pipeline.models import build_region_net
        saved = torch.load(cache.shard_path("00000"), map_location=device, weights_only=True)
        backbone, num_classes = saved["backbone"], len(saved["classes"])
        params = {**saved["params"], **{name: value for name, value in config[self.section].items()
                                        if name in TEST_PARAMS}}
        model = self.build(build_region_net(backbone["name"], num_classes + 1, backbone["input_size"]), num_classes,
                           params)
        model.load_state_dict(saved["model"])
        return model.to(device).eval(), params


def image_batches(training, proposals: dict | None, params: dict):
    """next_batch(rng) for the training loop: images_per_batch random training images, each flipped with
    probability 1/2 and, with `augment`, recoloured; with their proposals (if any) and targets."""
    import torch

    from pipeline.regions import flip_boxes, normalised, recolour

    def next_batch(rng: np.random.Generator):
        chosen = rng.choice(len(training.image_ids), size=min(params["images_per_batch"], len(training.image_ids)),
                            replace=False)
        images, image_proposals, targets = [], [], []
        for index in chosen:
            image = normalised(training.bank.images[index])
            device = image.device
            gt_boxes = torch.from_numpy(training.gt_boxes[index]).to(device)
            boxes = (torch.from_numpy(proposals.get(training.image_ids[index], np.zeros((0, 4), np.float32))).to(device)
                     if proposals is not None else None)
            if rng.random() < 0.5:
                width = image.shape[-1]
                image, gt_boxes = image.flip(-1), flip_boxes(gt_boxes, width)
                boxes = flip_boxes(boxes, width) if boxes is not None else None
            if params["augment"]:
                image = recolour(image[None], rng)[0]
            images.append(image)
            image_proposals.append(boxes)
            targets.append({"boxes": gt_boxes, "labels": torch.from_numpy(training.gt_labels[index] + 1).to(device)})
        return images, image_proposals, targets
    return next_batch


class FastRCNNDetect(Stage):
    """Detect with the trained Fast R-CNN on the test split, with and without truncated SVD."""

    name = "fast-rcnn-detect"
    version = "1"
    inputs = ("proposals", "fast-rcnn")
    headline_metrics = ("images", "detections_per_image")
    runs_on_device = True
    trainer = FastRCNNTrain()
    variants = FAST_RCNN_VARIANTS

    def params(self, config: dict) -> dict:
        section = config[self.trainer.section]
        return {**{name: section[name] for name in TEST_PARAMS if name in section},
                "test_split": config["data"]["test_split"]}

    def shards(self, ctx: RunContext) -> list[Shard]:
        return image_shards(ctx.dataset.image_ids(ctx.config["data"]["test_split"]),
                            ctx.config[self.trainer.section]["images_per_shard"])

    def models(self, inputs: dict, ctx: RunContext) -> dict:
        """variant -> model."""
        from pipeline.detectors import with_truncated_svd
        model, params = self.trainer.load(inputs[self.trainer.name], ctx.device, ctx.config)
        return {"fast_rcnn": model, "svd": with_truncated_svd(model, params["svd_ranks"])}

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        import torch

        from pipeline.detectors import detect
        from pipeline.regions import image_tensor, normalised
        from stages.proposals import read_proposals

        models = self.models(inputs, ctx)
        proposals = read_proposals(inputs["proposals"], shard.items) if self.trainer.uses_proposals else None
        detections = 0
        with h5py.File(out.path, "w") as shard_file:
            for image_id in shard.items:
                rgb = ctx.dataset.read_image(image_id)
                if rgb is None or (proposals is not None and image_id not in proposals):  # skipped for bad input
                    continue
                image = normalised(image_tensor(rgb, ctx.device))
                boxes = [torch.from_numpy(proposals[image_id]).to(ctx.device)] if proposals is not None else None
                for variant, model in models.items():
                    rows = detection_rows(detect(model, [image], boxes)[0])
                    shard_file[f"{variant}/{image_id}"] = rows
                    detections += len(rows) if variant == next(iter(models)) else 0
        return {"images": len(shard.items), "detections": detections}

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        from stages.detect import summarise_detections
        return summarise_detections(ctx, cache, records, self.variants)


def detection_rows(detection: dict) -> np.ndarray:
    """float32[D, 6] rows of (x1, y1, x2, y2, score, class index) from torchvision's output (labels 1..N)."""
    import torch
    return torch.cat([detection["boxes"], detection["scores"][:, None], detection["labels"][:, None] - 1.0],
                     dim=1).float().cpu().numpy()
