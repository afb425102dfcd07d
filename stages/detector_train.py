"""Training Fast R-CNN and Faster R-CNN: one stage class, two copies.

    fast-rcnn-train     Fast R-CNN (Girshick, ICCV 2015): pipeline.detectors.FastRCNN from the pretrained
                        backbone on the cached region proposals: one conv pass per image, RoI pooling, the
                        two sibling heads and the multitask loss (log loss + smooth L1).
    faster-rcnn-train   Faster R-CNN (Ren et al., NIPS 2015): torchvision's FasterRCNN with our pretrained
                        trunk, its region proposal network (anchors of `anchor_sizes` x `aspect_ratios`
                        at every conv5 cell; objectness + box regression) and Fast R-CNN's RoI heads,
                        trained jointly: the four losses summed. No proposals are read.
Mini-batches: images_per_batch images x rois_per_image RoIs (Fast R-CNN: 2 x 64, 25 % foreground),
horizontal flips and, with `augment`, colour changes; with `train_sizes`, each training image's shorter
side drawn from them (scale jitter; Fast R-CNN's multi-scale training) while detection stays at
`min_size`; with `feature_pyramid`, an FPN over the trunk (pipeline.detectors); resumable like every
training stage. Output
`00000.pt`: the model's state, its architecture, params, backbone, classes and losses. Detection and
evaluation are every method's (`<method>-detect`, `<method>-evaluate`; the detector in pipeline.methods).
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.detectors import build_detection_model, jitter_training_scale
from pipeline.engine.cache import save_torch
from pipeline.engine.stage import Shard, ShardOutput, StageContext, thaw
from pipeline.methods import NETWORK_TEST_PARAMS, Method
from pipeline.proposals import read_proposals
from pipeline.regions import flip_boxes, load_training_images, normalised, recolour
from pipeline.training import TrainingStage, train
from pipeline.weights import StartsFromBackbone, backbone_shape, initial_net


class DetectorTrain(StartsFromBackbone, TrainingStage):
    """Train a network method end to end (pipeline.methods.network_method): Fast R-CNN on the cached proposals,
    Faster R-CNN with its RPN."""

    version = "2"
    headline_metrics = ("final_loss",)

    def __init__(self, method: Method):
        self.method, self.architecture, self.uses_proposals = method, method.name, method.uses_proposals
        self.name = method.training_stages[0]
        self.inputs = ("proposals",) * method.uses_proposals
        self.loss_title = f"{self.name}: multitask loss"
        self.__doc__ = (f"Train {method.title} end to end "
                        f"{'on the cached proposals' if method.uses_proposals else 'with its own proposals'}.")

    def params(self, config: dict) -> dict:
        training = {name: value for name, value in config[self.method.section].items()
                    if name not in NETWORK_TEST_PARAMS}
        return {**training, **self.backbone_params(config)}

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:

        params = ctx.params
        settings = self.start(params)
        model = build_detection_model(self.architecture, initial_net(params["backbone"], len(ctx.classes), inputs),
                                      len(ctx.classes), params)
        if params.get("train_sizes"):
            jitter_training_scale(model, params["train_sizes"])
        training = load_training_images(ctx.dataset, ctx.train_split, ctx.device, out.checkpoint.parent)
        proposals = read_proposals(inputs["proposals"]) if self.uses_proposals else None
        next_batch = image_batches(training, proposals, params)

        def loss_of(model, batch):
            images, image_proposals, targets = batch
            return model(images, image_proposals, targets) if self.uses_proposals else model(images, targets)

        history = train(model, next_batch, settings, out.checkpoint, ctx.device, amp=params["amp"],
                        threads=ctx.threads, desc=self.name, loss_of=loss_of)
        save_torch({"model": model.state_dict(), "architecture": self.architecture, "params": thaw(params),
                    "backbone": backbone_shape(params["backbone"]), "classes": ctx.classes,
                    "losses": history.losses, "loss_parts": history.parts}, out.path)
        return {"final_loss": float(np.mean(history.losses[-20:])),
                **{f"final_{name}": float(np.mean(values[-20:])) for name, values in history.parts.items()}}


def image_batches(training, proposals: dict | None, params):
    """next_batch(rng) for the training loop: images_per_batch random training images, each flipped with
    probability 1/2 and, with `augment`, recoloured; with their proposals (if any) and targets."""

    def next_batch(rng: np.random.Generator):
        chosen = rng.choice(len(training.image_ids), size=min(params["images_per_batch"], len(training.image_ids)),
                            replace=False)
        images, image_proposals, targets = [], [], []
        for index in chosen:
            image = normalised(training.bank.image(index))
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
