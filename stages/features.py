"""pool5 features of every ground-truth box and proposal of every image (R-CNN §2.2), cached in HDF5.

One HDF5 file per image shard (one writer per file), a group per image id:
    boxes         float32[R, 4]  ground-truth boxes first (all of them, difficult included), then proposals
    gt_label      int16[R]       class index for ground-truth rows, -1 for proposals
    gt_difficult  bool[R]
    pool5         float16[R, D]  (features.dtype) the fine-tuned network's flattened pool5, chunked and compressed
Regions are warped on the device with context padding (pipeline.regions) and run through the conv
layers in batches; the manifest records the bytes stored per region.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.cache import StageCache
from pipeline.errors import ConfigError
from pipeline.stage import RunContext, Shard, ShardOutput, Stage, split_shards

DTYPES = ("float16", "float32")
COMPRESSIONS = ("lzf", "gzip", "none")


@dataclass
class ImageFeatures:
    boxes: np.ndarray         # float32[R, 4]
    gt_label: np.ndarray      # int16[R], -1 for proposals
    gt_difficult: np.ndarray  # bool[R]
    pool5: np.ndarray         # float16 or float32 [R, D]

    @property
    def proposal_rows(self) -> np.ndarray:
        return np.flatnonzero(self.gt_label < 0)


class Features(Stage):
    """pool5 features of every ground-truth box and proposal, in HDF5 per image shard."""

    name = "features"
    version = "2"
    inputs = ("proposals", "finetune")
    headline_metrics = ("regions", "bytes_per_region", "regions_per_second")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        params = {**config["features"], "amp": config["amp"]}
        if params["dtype"] not in DTYPES or params["compression"] not in COMPRESSIONS:
            raise ConfigError(f"features.dtype must be one of {DTYPES} and features.compression one of "
                              f"{COMPRESSIONS} (got {params['dtype']!r}, {params['compression']!r})")
        return params

    def shards(self, ctx: RunContext) -> list[Shard]:
        return split_shards(ctx, ctx.config["features"]["images_per_shard"])

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        from stages.finetune import load_finetuned
        from stages.proposals import read_proposals

        params = ctx.config["features"]
        net, backbone = load_finetuned(inputs["finetune"], ctx.device)
        proposals = read_proposals(inputs["proposals"], shard.items)
        regions = 0
        with h5py.File(out.path, "w") as shard_file:
            for image_id in shard.items:
                rgb = ctx.dataset.read_image(image_id)
                if rgb is None or image_id not in proposals:  # skipped for bad input
                    continue
                regions_of_image = image_regions(ctx, image_id, proposals[image_id])
                pool5 = pool5_features(net, rgb, regions_of_image.boxes, backbone, params["batch_size"], ctx.device,
                                       ctx.config["amp"])
                write_image_features(shard_file, image_id, regions_of_image, pool5, params)
                regions += len(pool5)
        return {"regions": regions, "pool5_dim": int(pool5.shape[1]) if regions else 0}

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        return features_summary(ctx, records)


def features_summary(ctx: RunContext, records: dict) -> dict:
    """Regions, bytes per region and throughput of a features output (R-CNN's or SPP-net's)."""
    regions = sum(record["metrics"]["regions"] for record in records.values())
    stored = sum(record["bytes"] for record in records.values())
    seconds = sum(record["seconds"] for record in records.values())
    return {"regions": regions, "bytes_per_region": stored / max(regions, 1), "bytes": stored,
            "regions_per_second": regions / max(seconds, 1e-9), "device": ctx.device,
            "pool5_dim": max(record["metrics"]["pool5_dim"] for record in records.values()),
            "dtype": ctx.config["features"]["dtype"]}


def image_regions(ctx: RunContext, image_id: str, proposals: np.ndarray) -> ImageFeatures:
    """The regions whose features are stored for an image: its ground-truth boxes, then its proposals."""
    gt_boxes, gt_labels, difficult = ctx.dataset.ground_truth(image_id)
    return ImageFeatures(np.concatenate([gt_boxes, proposals]).astype(np.float32),
                         np.concatenate([gt_labels, np.full(len(proposals), -1)]).astype(np.int16),
                         np.concatenate([difficult, np.zeros(len(proposals), bool)]), None)


def write_image_features(shard_file: h5py.File, image_id: str, regions: ImageFeatures, pool5: np.ndarray,
                         params: dict) -> None:
    """One image's group: boxes, labels, difficult flags and features, chunked and compressed per `params`."""
    group = shard_file.create_group(image_id)
    group["boxes"], group["gt_label"], group["gt_difficult"] = regions.boxes, regions.gt_label, regions.gt_difficult
    group.create_dataset("pool5", data=pool5.astype(params["dtype"]), chunks=(min(len(pool5), 128), pool5.shape[1]),
                         compression=None if params["compression"] == "none" else params["compression"])


def pool5_features(net, rgb: np.ndarray, boxes: np.ndarray, backbone: dict, batch_size: int, device: str,
                   amp: bool) -> np.ndarray:
    """Flattened pool5 float32[R, D] of boxes[R, 4] in an RGB image, warped and run in batches."""
    import torch

    from pipeline.regions import image_tensor, mean_subtracted, warp_regions
    image = mean_subtracted(image_tensor(rgb, device))
    boxes = torch.from_numpy(boxes)
    outputs = []
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and device == "cuda"):
        for batch in boxes.split(batch_size):
            crops = warp_regions(image, batch, backbone["input_size"], backbone["context_pad"])
            outputs.append(net.pool5(crops).flatten(1).float().cpu())
    return torch.cat(outputs).numpy()


class FeatureReader:
    """Reads the cached features of one image at a time from a features output."""

    def __init__(self, cache: StageCache):
        self.file_of: dict[str, Path] = {}
        for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}")):
            with h5py.File(path, "r") as shard_file:
                self.file_of.update({image_id: path for image_id in shard_file})

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.file_of

    def regions(self, image_id: str) -> ImageFeatures:
        """The image's regions without their features (pool5 is None)."""
        with h5py.File(self.file_of[image_id], "r") as shard_file:
            group = shard_file[image_id]
            return ImageFeatures(group["boxes"][()], group["gt_label"][()], group["gt_difficult"][()], None)

    def read(self, image_id: str, ground_truth_only: bool = False) -> ImageFeatures:
        """All regions of the image, or only its ground-truth boxes (stored first, so read alone)."""
        with h5py.File(self.file_of[image_id], "r") as shard_file:
            group = shard_file[image_id]
            rows = slice(int((group["gt_label"][()] >= 0).sum())) if ground_truth_only else slice(None)
            return ImageFeatures(group["boxes"][rows], group["gt_label"][rows], group["gt_difficult"][rows],
                                 group["pool5"][rows])


LAYERS = ("pool5", "fc6", "fc7")


def layer_features(net, pool5: np.ndarray, layer: str, device: str, batch_size: int = 4096) -> np.ndarray:
    """float32[R, D] activations of `layer`, computed from cached pool5[R, P] through the fine-tuned fc layers."""
    import torch
    if layer == "pool5":
        return pool5.astype(np.float32)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(pool5), batch_size):
            batch = torch.from_numpy(pool5[start:start + batch_size].astype(np.float32)).to(device)
            outputs.append(net.fc(batch, layer).cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, net.head.in_features), np.float32)


def mean_norm_scale(reader: FeatureReader, image_ids: list[str], transform, target_norm: float) -> float:
    """The factor that gives the features of these images a mean L2 norm of target_norm (R-CNN: 20)."""
    norms = [np.linalg.norm(transform(reader.read(image_id).pool5), axis=1) for image_id in image_ids]
    return float(target_norm / np.concatenate(norms).mean())
