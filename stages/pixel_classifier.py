"""The sliding-window segmenter's network (the baseline of `fcn-evaluate`): a patch's centre-pixel label.

    pixel-classifier   the backbone the detectors start from (backbone.weights), with an (N + 1)-way
                       head, classifying a patch of its input size by the label of the patch's centre
                       pixel (background or a class), trained on patches around random labelled pixels
                       (background_fraction of them background) of the training images resized by
                       fcn.scale, as the FCN sees them. Output `00000.pt` in finetune's layout.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.engine.cache import save_torch
from pipeline.engine.stage import Shard, ShardOutput, StageContext
from pipeline.regions import augment_crops
from pipeline.segmentation_data import labelled_pixels, load_training_masks, patches
from pipeline.training import TrainingStage, train
from pipeline.weights import StartsFromBackbone, backbone_shape, initial_net


class PixelClassifier(StartsFromBackbone, TrainingStage):
    """Train the sliding-window baseline's network: the label of a patch's centre pixel."""

    name = "pixel-classifier"
    version = "2"
    headline_metrics = ("final_loss",)
    loss_title = "pixel-classifier: centre-pixel cross-entropy"

    def params(self, config: dict) -> dict:
        return {**config["pixel_classifier"], **self.backbone_params(config), "scale": config["fcn"]["scale"]}

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params, patch_size = ctx.params, ctx.params["backbone"]["input_size"]
        settings = self.start(params)
        net = initial_net(params["backbone"], len(ctx.classes), inputs)
        # objects at the size the FCN sees them
        training = load_training_masks(ctx.dataset, ctx.train_split, ctx.device, params["scale"])
        pixels = labelled_pixels(training.masks)

        def next_batch(rng: np.random.Generator):
            image_index, ys, xs = pixels.sample(rng, params["batch_size"], params["background_fraction"])
            crops = torch.cat([patches(training.images[i], ys[image_index == i], xs[image_index == i], patch_size)
                               for i in np.unique(image_index)])
            order = np.concatenate([np.flatnonzero(image_index == i) for i in np.unique(image_index)])
            labels = torch.from_numpy(np.array([training.masks[i][y, x] for i, y, x in
                                                zip(image_index[order], ys[order], xs[order])], dtype=np.int64))
            return augment_crops(crops, rng) if params["augment"] else crops, labels.to(crops.device)

        history = train(net, next_batch, settings, out.checkpoint, ctx.device, amp=params["amp"],
                        threads=ctx.threads, desc=self.name)
        save_torch({"model": net.state_dict(), "backbone": backbone_shape(params["backbone"]), "classes": ctx.classes,
                    "losses": history.losses}, out.path)
        return {"final_loss": float(np.mean(history.losses[-20:]))}
