"""Region features: R-CNN's pool5 of warped crops, and the cache files R-CNN and SPP-net keep them in.

Cache layout (one HDF5 file per image shard, one writer per file, a group per image id):
    boxes         float32[R, 4]  ground-truth boxes first (all of them, difficult included), then proposals
    gt_label      int16[R]       class index for ground-truth rows, -1 for proposals
    gt_difficult  bool[R]
    features      [R, D] as features.dtype says, chunked and compressed (features.compression); the file's
                                 attribute `kind` says what they are: R-CNN's flattened pool5, or SPP-net's
                                 spatial pyramid. float16 | float32: the values; uint8: each row quantised
                                 to 256 levels between its minimum and maximum, with
    feature_offset float32[R]    (uint8 only) each row's minimum, and
    feature_step  float32[R]     (uint8 only) its level spacing: value = code * step + offset, off by at most
                                 step / 2 = 1/510 of the row's range. Where pool5 follows a ReLU (the small
                                 network, AlexNet, VGG16, ResNet) a row's minimum is 0, so its zeros (about
                                 half the values) stay exact and compress; MobileNetV2's ends linear.
The SVMs and box regressors of both methods read them through FeatureReader, and compute fc6 / fc7
from them through the fine-tuned fc layers (layer_features).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.engine.cache import StageCache
from pipeline.engine.interrupt import check_stop
from pipeline.engine.schema import register_choices
from pipeline.models import in_padded_batch
from pipeline.precision import bf16_autocast
from pipeline.regions import image_tensor, mean_subtracted, warp_regions

DTYPES = ("uint8", "float16", "float32")
LEVELS = 255  # uint8 codes 0..255 span each row's range
COMPRESSIONS = ("lzf", "gzip", "none")
LAYERS = ("pool5", "fc6", "fc7")
register_choices("features.dtype", DTYPES)
register_choices("features.compression", COMPRESSIONS)
register_choices("svm.layer", LAYERS)


@dataclass
class ImageFeatures:
    boxes: np.ndarray         # float32[R, 4]
    gt_label: np.ndarray      # int16[R], -1 for proposals
    gt_difficult: np.ndarray  # bool[R]
    features: np.ndarray | None  # float16 or float32 [R, D] (uint8 decoded to float32); None when only the
                                 # regions were read

    @property
    def proposal_rows(self) -> np.ndarray:
        return np.flatnonzero(self.gt_label < 0)


def image_regions(dataset, image_id: str, proposals: np.ndarray) -> ImageFeatures:
    """The regions whose features are stored for an image: its ground-truth boxes, then its proposals."""
    gt_boxes, gt_labels, difficult = dataset.ground_truth(image_id)
    return ImageFeatures(np.concatenate([gt_boxes, proposals]).astype(np.float32),
                         np.concatenate([gt_labels, np.full(len(proposals), -1)]).astype(np.int16),
                         np.concatenate([difficult, np.zeros(len(proposals), bool)]), None)


def write_image_features(shard_file: h5py.File, image_id: str, regions: ImageFeatures, features: np.ndarray,
                         params: Mapping) -> None:
    """One image's group: boxes, labels, difficult flags and features, chunked and compressed per `params`
    (features.dtype and features.compression)."""
    group = shard_file.create_group(image_id)
    group["boxes"], group["gt_label"], group["gt_difficult"] = regions.boxes, regions.gt_label, regions.gt_difficult
    if params["dtype"] == "uint8":
        codes, group["feature_offset"], group["feature_step"] = quantise(features)
    else:
        codes = features.astype(params["dtype"])
    group.create_dataset("features", data=codes, chunks=(min(len(features), 128), features.shape[1]),
                         compression=None if params["compression"] == "none" else params["compression"])


def quantise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """features[R, D] -> (codes uint8[R, D], offset float32[R], step float32[R]), row by row between the
    row's minimum and maximum (a constant row gets step 1, its codes all 0)."""
    features = features.astype(np.float32, copy=False)
    offset = features.min(axis=1) if features.size else np.zeros(len(features), np.float32)
    span = (features.max(axis=1) if features.size else offset) - offset
    step = np.where(span > 0, span / LEVELS, 1.0).astype(np.float32)
    codes = np.rint((features - offset[:, None]) / step[:, None])
    return np.clip(codes, 0, LEVELS).astype(np.uint8), offset, step


def dequantise(codes: np.ndarray, offset: np.ndarray, step: np.ndarray) -> np.ndarray:
    """float32[R, D] from quantise's codes[R, D], offset[R] and step[R]."""
    return codes.astype(np.float32) * step[:, None] + offset[:, None]


def as_stored(features: np.ndarray, dtype: str) -> np.ndarray:
    """float32[R, D] features rounded as a feature cache of `dtype` stores them: what the SVMs and box
    regressors trained on, so that test features (computed from pixels) are scored as they were."""
    if dtype == "uint8":
        return dequantise(*quantise(features))
    return torch.from_numpy(features).to(getattr(torch, dtype)).float().numpy()  # torch converts faster than numpy


class FeatureReader:
    """Reads the cached features of one image at a time from a features output (R-CNN's or SPP-net's)."""

    def __init__(self, cache: StageCache):
        self.file_of: dict[str, Path] = {}
        for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}")):
            with h5py.File(path, "r") as shard_file:
                self.file_of.update({image_id: path for image_id in shard_file})

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.file_of

    def regions(self, image_id: str) -> ImageFeatures:
        """The image's regions without their features."""
        with h5py.File(self.file_of[image_id], "r") as shard_file:
            group = shard_file[image_id]
            return ImageFeatures(group["boxes"][()], group["gt_label"][()], group["gt_difficult"][()], None)

    def read(self, image_id: str, ground_truth_only: bool = False) -> ImageFeatures:
        """All regions of the image, or only its ground-truth boxes (stored first, so read alone). The SVMs and
        box regressors read every image's features here, so a run asked to stop stops here too."""
        check_stop()
        with h5py.File(self.file_of[image_id], "r") as shard_file:
            group = shard_file[image_id]
            rows = slice(int((group["gt_label"][()] >= 0).sum())) if ground_truth_only else slice(None)
            features = group["features"][rows]
            if "feature_step" in group:
                features = dequantise(features, group["feature_offset"][rows], group["feature_step"][rows])
            return ImageFeatures(group["boxes"][rows], group["gt_label"][rows], group["gt_difficult"][rows], features)


def training_image_ids(dataset, train_split: str, reader: FeatureReader) -> list[str]:
    """The training split's images that have cached features (those skipped for bad input have none)."""
    return [image_id for image_id in dataset.image_ids(train_split) if image_id in reader]


def features_summary(records: dict, device: str, dtype: str) -> dict:
    """Regions, bytes per region and throughput of a features output (R-CNN's or SPP-net's)."""
    regions = sum(record["metrics"]["regions"] for record in records.values())
    stored = sum(record["bytes"] for record in records.values())
    seconds = sum(record["seconds"] for record in records.values())
    return {"regions": regions, "bytes_per_region": stored / max(regions, 1), "bytes": stored,
            "regions_per_second": regions / max(seconds, 1e-9), "device": device,
            "feature_dim": max(record["metrics"]["feature_dim"] for record in records.values()), "dtype": dtype}


def pool5_features(net, rgb: np.ndarray, boxes: np.ndarray, backbone: Mapping, batch_size: int, device: str,
                   bf16: bool, clock=None) -> np.ndarray:
    """Flattened pool5 float32[R, D] of boxes[R, 4] in an RGB image, warped and run in batches, the CNN under
    bf16 autocast where `bf16` (pipeline.precision). A pipeline.timing.Clock, if given, gets the laps "warp"
    and "CNN on every crop" (to pool5)."""
    image = mean_subtracted(image_tensor(rgb, device))
    boxes = torch.from_numpy(boxes)
    outputs = []
    with torch.no_grad(), bf16_autocast(device, bf16):
        for batch in boxes.split(batch_size):
            crops = warp_regions(image, batch, backbone["input_size"], backbone["context_pad"])
            if clock is not None:
                clock.lap("warp")
            outputs.append(in_padded_batch(net.pool5, crops).flatten(1).float().cpu())
            if clock is not None:
                clock.lap("CNN on every crop")
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), np.float32)


def layer_features(net, features: np.ndarray, layer: str, device: str, batch_size: int = 4096) -> np.ndarray:
    """float32[R, D] activations of `layer`, computed from cached pool5 (or pyramid) features[R, P] through
    the fine-tuned fc layers."""
    if layer == "pool5":
        return features.astype(np.float32, copy=False)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = torch.from_numpy(features[start:start + batch_size]).to(device, torch.float32)
            outputs.append(in_padded_batch(lambda rows: net.fc(rows, layer), batch).cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, net.head.in_features), np.float32)


def mean_norm_scale(reader: FeatureReader, image_ids: list[str], transform, target_norm: float) -> float:
    """The factor that gives the features of these images a mean L2 norm of target_norm (R-CNN: 20)."""
    return feature_statistics(reader, image_ids, transform, target_norm, center=False)[1]


def feature_statistics(reader: FeatureReader, image_ids: list[str], transform, target_norm: float,
                       center: bool) -> tuple[np.ndarray | float, float]:
    """(mean, scale) such that (features - mean) * scale have a mean L2 norm of target_norm over these images'
    regions; the mean is their mean feature when `center`, else 0. Image by image (a pass for the mean, one
    for the norms), so that memory holds one image's features: the photos preset's 50 images of 1 000 regions
    of 4 704 pool5 values, held together and copied, were 1.9 GB (the voc2007 preset's 200 of 2 000 would be
    15 GB)."""
    mean = 0.0
    if center:
        total, count = np.zeros(()), 0
        for image_id in image_ids:
            features = transform(reader.read(image_id).features)
            total, count = total + features.sum(axis=0, dtype=np.float64), count + len(features)
        mean = (total / count).astype(np.float32)
    norms, count = 0.0, 0
    for image_id in image_ids:
        features = transform(reader.read(image_id).features)
        norms += float(np.linalg.norm(features - mean, axis=1).sum(dtype=np.float64))
        count += len(features)
    return mean, float(target_norm / (norms / count))
