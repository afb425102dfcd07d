"""SPP-net (He et al., ECCV 2014): conv5 once per image, spatial pyramid pooling of each window on it.

Three stages of its own, then R-CNN's SVM, box regression, detection and evaluation stages, reused
as sppnet-svm, sppnet-bbox, sppnet-detect and sppnet-evaluate (stages.svm ... with prefix "sppnet-"):

    sppnet-conv5     the pretrained trunk's conv5 map of every image at each of `sppnet.scales` (the
                     shorter image side; SPP-net: 480, 576, 688, 864, 1200), cached in HDF5 per shard:
                     `<image id>/<scale index>` float16[C, h, w] with its resize factor as an attribute.
    sppnet-features  each ground-truth box and proposal pooled by the pyramid (`sppnet.levels`, l x l
                     bins each; SPP-net: 6, 3, 2, 1) on the scale where it is closest to the network's
                     input size (SPP-net: 224 x 224), in the features stage's layout, so R-CNN's SVM,
                     bbox and detect stages read it unchanged (its "pool5" is the pyramid).
    sppnet-finetune  only the fc layers (fc6, fc7 and an (N + 1)-way head) trained on the cached pyramid
                     features, as SPP-net does: the conv layers stay as pretrained. fc6 is new when the
                     pyramid's size differs from pool5's (SPP-net pretrained its fc6 on pyramids).
                     Mini-batches: `images_per_batch` training images, fg_fraction foreground windows
                     (IoU >= fg_iou), the rest background. Output: finetune's format plus fc6_input_dim.
"""
from __future__ import annotations

import h5py
import numpy as np

from pipeline.cache import StageCache
from pipeline.stage import RunContext, Shard, ShardOutput, Stage, TrainingStage, split_shards
from stages.features import features_summary
from stages.finetune import initial_backbone_params, pretrain_input, weights_key_extras
from stages.pretrain import backbone_params


class SPPConv5(Stage):
    """conv5 of every image at each SPP-net scale, computed once by the pretrained trunk."""

    name = "sppnet-conv5"
    version = "1"
    headline_metrics = ("images", "bytes_per_image")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {"scales": config["sppnet"]["scales"], "backbone": initial_backbone_params(config),
                "amp": config["amp"]}

    def input_stages(self, config: dict) -> tuple[str, ...]:
        return pretrain_input(config)

    def key_extras(self, ctx: RunContext) -> dict:
        return weights_key_extras(ctx)

    def shards(self, ctx: RunContext) -> list[Shard]:
        return split_shards(ctx, ctx.config["sppnet"]["images_per_shard"])

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        from stages.finetune import initial_net
        trunk = initial_net(ctx, inputs).to(ctx.device).eval().trunk
        images = 0
        with h5py.File(out.path, "w") as shard_file:
            for image_id in shard.items:
                rgb = ctx.dataset.read_image(image_id)
                if rgb is None:  # skipped for bad input
                    continue
                group = shard_file.create_group(image_id)
                for index, (factor, conv5) in enumerate(conv5_at_scales(trunk, rgb, ctx.config["sppnet"]["scales"],
                                                                        ctx.device, ctx.config["amp"])):
                    dataset = group.create_dataset(str(index), data=conv5.cpu().numpy().astype(np.float16),
                                                   compression="lzf")
                    dataset.attrs["factor"] = factor
                images += 1
        return {"images": images}

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        images = sum(record["metrics"]["images"] for record in records.values())
        return {"images": images, "bytes_per_image": sum(r["bytes"] for r in records.values()) / max(images, 1),
                "device": ctx.device}


def conv5_at_scales(trunk, rgb: np.ndarray, scales: list[int], device: str, amp: bool) -> list[tuple[float, object]]:
    """(resize factor, conv5 float32[C, h, w] on the device) of an RGB image resized so that its shorter
    side is each scale."""
    import cv2
    import torch

    from pipeline.regions import image_tensor, normalised
    maps = []
    for scale in scales:
        factor = scale / min(rgb.shape[:2])
        size = (round(rgb.shape[1] * factor), round(rgb.shape[0] * factor))
        resized = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR if factor > 1 else cv2.INTER_AREA)
        image = normalised(image_tensor(resized, device))
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and device == "cuda"):
            maps.append((factor, trunk(image[None])[0].float()))
    return maps


class SPPFeatures(Stage):
    """Spatial pyramid pooling of every ground-truth box and proposal on its best-scale conv5."""

    name = "sppnet-features"
    version = "1"
    inputs = ("proposals", "sppnet-conv5")
    headline_metrics = ("regions", "bytes_per_region", "regions_per_second")

    def params(self, config: dict) -> dict:
        features = config["features"]
        return {"levels": config["sppnet"]["levels"], "input_size": config["backbone"]["input_size"],
                "dtype": features["dtype"], "compression": features["compression"]}

    def shards(self, ctx: RunContext) -> list[Shard]:
        return split_shards(ctx, ctx.config["sppnet"]["images_per_shard"])

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        from pipeline.models import TRUNK_STRIDES
        from stages.features import image_regions, write_image_features
        from stages.proposals import read_proposals

        proposals = read_proposals(inputs["proposals"], shard.items)
        backbone = ctx.config["backbone"]
        stride = TRUNK_STRIDES[backbone["name"]]
        regions, dim = 0, 0
        with h5py.File(inputs["sppnet-conv5"].shard_path(shard.id), "r") as conv5_file, \
                h5py.File(out.path, "w") as shard_file:
            for image_id in shard.items:
                if image_id not in conv5_file or image_id not in proposals:  # skipped for bad input
                    continue
                regions_of_image = image_regions(ctx, image_id, proposals[image_id])
                maps = [(float(dataset.attrs["factor"]), dataset[()]) for _, dataset in
                        sorted(conv5_file[image_id].items(), key=lambda item: int(item[0]))]
                pooled = pyramid_features(maps, regions_of_image.boxes, ctx.config["sppnet"]["levels"], stride,
                                          backbone["input_size"])
                write_image_features(shard_file, image_id, regions_of_image, pooled, ctx.config["features"])
                regions, dim = regions + len(pooled), pooled.shape[1]
        return {"regions": regions, "pool5_dim": dim}

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        return features_summary(ctx, records)


def best_scale(boxes: np.ndarray, factors: list[float], input_size: int) -> np.ndarray:
    """For each box[R, 4], the index of the factor at which its area is closest to input_size^2 (SPP-net §3.1)."""
    sides = np.sqrt(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1))
    return np.abs(np.log(sides[:, None] * np.asarray(factors)[None, :] / input_size)).argmin(axis=1)


def pyramid_features(maps: list[tuple[float, object]], boxes: np.ndarray, levels: list[int], stride: int,
                     input_size: int) -> np.ndarray:
    """float32[R, C * sum(l^2)]: each box pooled by the pyramid on its best scale's conv5 map
    (maps: (resize factor, conv5[C, h, w] as a numpy array or a tensor on any device))."""
    import torch

    from pipeline.roi import spatial_pyramid_pool, spp_dim
    maps = [(factor, torch.as_tensor(conv5, dtype=torch.float32)) for factor, conv5 in maps]
    chosen = best_scale(boxes, [factor for factor, _ in maps], input_size)
    device = maps[0][1].device
    pooled = torch.zeros((len(boxes), spp_dim(maps[0][1].shape[0], levels)), device=device)
    for index, (factor, conv5) in enumerate(maps):
        rows = torch.from_numpy(np.flatnonzero(chosen == index)).to(device)
        if len(rows):
            scaled_boxes = torch.from_numpy(boxes).to(device)[rows] * factor
            pooled[rows] = spatial_pyramid_pool(conv5[None], [scaled_boxes], levels, 1.0 / stride)
    return pooled.cpu().numpy()


class SPPFinetune(TrainingStage):
    """Fine-tune SPP-net's fc layers on the cached pyramid features of the training windows."""

    name = "sppnet-finetune"
    version = "1"
    headline_metrics = ("final_loss", "foreground_windows")
    loss_title = "sppnet-finetune: (N + 1)-way loss, fc layers only"

    def params(self, config: dict) -> dict:
        return {**config["sppnet_finetune"], "backbone": initial_backbone_params(config),
                "train_split": config["data"]["train_split"]}

    def input_stages(self, config: dict) -> tuple[str, ...]:
        return ("sppnet-features",) + pretrain_input(config)

    def key_extras(self, ctx: RunContext) -> dict:
        return weights_key_extras(ctx)

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        import torch

        from pipeline.regions import sample_windows
        from pipeline.training import SGDSettings, train
        from stages.features import FeatureReader
        from stages.finetune import initial_net
        from stages.svm import training_image_ids

        params = ctx.config["sppnet_finetune"]
        settings = SGDSettings.from_config(params)
        torch.manual_seed(settings.seed)
        reader = FeatureReader(inputs["sppnet-features"])
        image_ids = training_image_ids(ctx, reader)
        labels = [window_labels(reader, image_id, params["fg_iou"]) for image_id in image_ids]
        fc6_input_dim = reader.read(image_ids[0], ground_truth_only=True).pool5.shape[1]
        net = initial_net(ctx, inputs)
        net.set_fc6_input(fc6_input_dim)
        fc_parameters = [p for block in (net.fc6, net.fc7, net.head) for p in block.parameters()]

        def next_batch(rng: np.random.Generator):
            chosen = rng.choice(len(image_ids), size=min(params["images_per_batch"], len(image_ids)), replace=False)
            rows = [sample_windows(rng, labels[index], params["batch_size"] // len(chosen), params["fg_fraction"])
                    for index in chosen]
            features = np.concatenate([reader.read(image_ids[index]).pool5[image_rows]
                                       for index, image_rows in zip(chosen, rows)])
            targets = np.concatenate([labels[index][image_rows] for index, image_rows in zip(chosen, rows)])
            return (torch.from_numpy(features.astype(np.float32)).to(ctx.device),
                    torch.from_numpy(targets).to(ctx.device))

        def loss_of(model, batch):
            features, targets = batch
            return torch.nn.functional.cross_entropy(model.head(model.fc(features)), targets)

        history = train(net, next_batch, settings, out.checkpoint, ctx.device, threads=ctx.config["torch_threads"],
                        desc="sppnet-finetune", loss_of=loss_of, parameters=fc_parameters)
        torch.save({"model": net.state_dict(), "backbone": backbone_params(ctx.config), "classes": ctx.dataset.classes,
                    "losses": history.losses, "fc6_input_dim": fc6_input_dim}, out.path)
        foreground = int(sum((image_labels > 0).sum() for image_labels in labels))
        return {"final_loss": float(np.mean(history.losses[-20:])), "foreground_windows": foreground,
                "background_windows": int(sum(len(image_labels) for image_labels in labels)) - foreground}


def window_labels(reader, image_id: str, fg_iou: float) -> np.ndarray:
    """int64[R] for an image's stored regions: the best-matching non-difficult ground-truth box's class + 1
    where IoU >= fg_iou, else 0 (background); -1 (never drawn) for difficult ground-truth boxes."""
    import torch

    from pipeline.regions import label_regions
    regions = reader.regions(image_id)
    gt_rows = (regions.gt_label >= 0) & ~regions.gt_difficult
    labels, _, _ = label_regions(torch.from_numpy(regions.boxes), torch.from_numpy(regions.boxes[gt_rows]),
                                 torch.from_numpy(regions.gt_label[gt_rows].astype(np.int64)), fg_iou)
    labels = labels.numpy()
    labels[regions.gt_difficult] = -1
    return labels
