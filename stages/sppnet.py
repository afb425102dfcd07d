"""SPP-net (He et al., ECCV 2014): conv5 once per image, spatial pyramid pooling of each window on it.

Three training stages of its own, then R-CNN's SVM and box regression stages, reused as sppnet-svm
and sppnet-bbox (stages.svm and stages.bbox with prefix "sppnet-"); its detector (pipeline.methods:
conv5 at every scale, the pyramid, the SVMs, the regressors) is run by sppnet-detect and evaluated by
sppnet-evaluate, as every method's is.

    sppnet-conv5     the pretrained trunk's conv5 map of every training image at each of `sppnet.scales`
                     (the shorter image side; SPP-net: 480, 576, 688, 864, 1200), cached in HDF5 per
                     shard: `<image id>/<scale index>` float16[C, h, w] with its resize factor as an attribute.
    sppnet-features  each ground-truth box and proposal pooled by the pyramid (`sppnet.levels`, l x l
                     bins each; SPP-net: 6, 3, 2, 1) on the scale where it is closest to the network's
                     input size (SPP-net: 224 x 224), in pipeline.features' layout (kind "spatial
                     pyramid"), so R-CNN's SVM and bbox stages read it unchanged.
    sppnet-finetune  only the fc layers (fc6, fc7 and an (N + 1)-way head) trained on the cached pyramid
                     features, as SPP-net does: the conv layers stay as pretrained. fc6 is new when the
                     pyramid's size differs from pool5's (SPP-net pretrained its fc6 on pyramids).
                     Mini-batches: `images_per_batch` training images, fg_fraction foreground windows
                     (IoU >= fg_iou), the rest background. Output: finetune's format plus fc6_input_dim.
"""
from __future__ import annotations

import h5py
import numpy as np
import torch

from pipeline.engine.cache import StageCache, hdf5_file, save_torch
from pipeline.engine.stage import Shard, ShardOutput, Stage, StageContext, image_shards
from pipeline.features import FeatureReader, features_summary, image_regions, training_image_ids, write_image_features
from pipeline.models import BACKBONES, on_device
from pipeline.proposals import read_proposals
from pipeline.regions import label_regions, sample_windows
from pipeline.roi import conv5_at_scales, pyramid_features
from pipeline.training import TrainingStage, train
from pipeline.weights import StartsFromBackbone, backbone_shape, initial_net


def training_shards(ctx: StageContext) -> list[Shard]:
    return image_shards(ctx.dataset.image_ids(ctx.train_split), ctx.params["images_per_shard"])


class SPPConv5(StartsFromBackbone, Stage):
    """conv5 of every training image at each SPP-net scale, computed once by the pretrained trunk."""

    name = "sppnet-conv5"
    version = "2"
    headline_metrics = ("images", "bytes_per_image")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {"scales": config["sppnet"]["scales"], "images_per_shard": config["sppnet"]["images_per_shard"],
                **self.backbone_params(config)}

    def shards(self, ctx: StageContext) -> list[Shard]:
        return training_shards(ctx)

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        trunk = on_device(initial_net(ctx.params["backbone"], len(ctx.classes), inputs), ctx.device).eval().trunk
        images = 0
        with hdf5_file(out.path) as shard_file:
            for image_id in shard.items:
                rgb = ctx.dataset.read_image(image_id)
                if rgb is None:  # skipped for bad input
                    continue
                group = shard_file.create_group(image_id)
                for index, (factor, conv5) in enumerate(conv5_at_scales(trunk, rgb, ctx.params["scales"],
                                                                        ctx.device, ctx.params["amp"])):
                    dataset = group.create_dataset(str(index), data=conv5.cpu().numpy().astype(np.float16),
                                                   compression="lzf")
                    dataset.attrs["factor"] = factor
                images += 1
        return {"images": images}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        images = sum(record["metrics"]["images"] for record in records.values())
        return {"images": images, "bytes_per_image": sum(r["bytes"] for r in records.values()) / max(images, 1),
                "device": ctx.device}


class SPPFeatures(Stage):
    """Spatial pyramid pooling of every ground-truth box and proposal on its best-scale conv5."""

    name = "sppnet-features"
    version = "2"
    inputs = ("proposals", "sppnet-conv5")
    headline_metrics = ("regions", "bytes_per_region", "regions_per_second")

    def params(self, config: dict) -> dict:
        features, backbone = config["features"], config["backbone"]
        return {"levels": config["sppnet"]["levels"], "images_per_shard": config["sppnet"]["images_per_shard"],
                "backbone": backbone_shape(backbone), "dtype": features["dtype"],
                "compression": features["compression"]}

    def shards(self, ctx: StageContext) -> list[Shard]:
        return training_shards(ctx)

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        proposals = read_proposals(inputs["proposals"], shard.items)
        backbone = ctx.params["backbone"]
        stride = BACKBONES[backbone["name"]].trunk_stride
        regions, dim = 0, 0
        # the conv5 shard of the same id holds these images: both stages' shards are the training split's
        # images cut by sppnet.images_per_shard, which both keys cover
        with h5py.File(inputs["sppnet-conv5"].shard_path(shard.id), "r") as conv5_file, \
                hdf5_file(out.path) as shard_file:
            shard_file.attrs["kind"] = "spatial pyramid"
            for image_id in shard.items:
                if image_id not in conv5_file or image_id not in proposals:  # skipped for bad input
                    continue
                regions_of_image = image_regions(ctx.dataset, image_id, proposals[image_id])
                maps = [(float(dataset.attrs["factor"]), dataset[()]) for _, dataset in
                        sorted(conv5_file[image_id].items(), key=lambda item: int(item[0]))]
                pooled = pyramid_features(maps, regions_of_image.boxes, ctx.params["levels"], stride,
                                          backbone["input_size"])
                write_image_features(shard_file, image_id, regions_of_image, pooled, ctx.params)
                regions, dim = regions + len(pooled), pooled.shape[1]
        return {"regions": regions, "feature_dim": dim}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        return features_summary(records, ctx.device, ctx.params["dtype"])


class SPPFinetune(StartsFromBackbone, TrainingStage):
    """Fine-tune SPP-net's fc layers on the cached pyramid features of the training windows."""

    name = "sppnet-finetune"
    version = "1"
    inputs = ("sppnet-features",)
    reads_amp = False  # it trains the fc layers on cached features, in float32
    headline_metrics = ("final_loss", "foreground_windows")
    loss_title = "sppnet-finetune: (N + 1)-way loss, fc layers only"

    def params(self, config: dict) -> dict:
        return {**config["sppnet_finetune"], **self.backbone_params(config)}

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:

        params = ctx.params
        settings = self.start(params)
        reader = FeatureReader(inputs["sppnet-features"])
        image_ids = training_image_ids(ctx.dataset, ctx.train_split, reader)
        labels = [window_labels(reader, image_id, params["fg_iou"]) for image_id in image_ids]
        fc6_input_dim = reader.read(image_ids[0], ground_truth_only=True).features.shape[1]
        net = initial_net(params["backbone"], len(ctx.classes), inputs)
        net.set_fc6_input(fc6_input_dim)
        fc_parameters = [p for block in (net.fc6, net.fc7, net.head) for p in block.parameters()]

        def next_batch(rng: np.random.Generator):
            chosen = rng.choice(len(image_ids), size=min(params["images_per_batch"], len(image_ids)), replace=False)
            rows = [sample_windows(rng, labels[index], params["batch_size"] // len(chosen), params["fg_fraction"])
                    for index in chosen]
            features = np.concatenate([reader.read(image_ids[index]).features[image_rows]
                                       for index, image_rows in zip(chosen, rows)])
            targets = np.concatenate([labels[index][image_rows] for index, image_rows in zip(chosen, rows)])
            return (torch.from_numpy(features.astype(np.float32)).to(ctx.device),
                    torch.from_numpy(targets).to(ctx.device))

        def loss_of(model, batch):
            features, targets = batch
            return torch.nn.functional.cross_entropy(model.head(model.fc(features)), targets)

        history = train(net, next_batch, settings, out.checkpoint, ctx.device, threads=ctx.threads,
                        desc="sppnet-finetune", loss_of=loss_of, parameters=fc_parameters)
        save_torch({"model": net.state_dict(), "backbone": backbone_shape(params["backbone"]), "classes": ctx.classes,
                    "losses": history.losses, "fc6_input_dim": fc6_input_dim}, out.path)
        foreground = int(sum((image_labels > 0).sum() for image_labels in labels))
        return {"final_loss": float(np.mean(history.losses[-20:])), "foreground_windows": foreground,
                "background_windows": int(sum(len(image_labels) for image_labels in labels)) - foreground}


def window_labels(reader, image_id: str, fg_iou: float) -> np.ndarray:
    """int64[R] for an image's stored regions: the best-matching non-difficult ground-truth box's class + 1
    where IoU >= fg_iou, else 0 (background); -1 (never drawn) for difficult ground-truth boxes."""
    regions = reader.regions(image_id)
    gt_rows = (regions.gt_label >= 0) & ~regions.gt_difficult
    labels, _, _ = label_regions(torch.from_numpy(regions.boxes), torch.from_numpy(regions.boxes[gt_rows]),
                                 torch.from_numpy(regions.gt_label[gt_rows].astype(np.int64)), fg_iou)
    labels = labels.numpy()
    labels[regions.gt_difficult] = -1
    return labels
