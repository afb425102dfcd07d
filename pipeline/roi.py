"""Pooling regions of a shared conv map (SPP-net's pyramid, Fast R-CNN's RoI pooling) and Fast R-CNN's
truncated SVD.

Region boxes are (x1, y1, x2, y2) in the pipeline's continuous pixel coordinates (x2 is one past the
last pixel). torchvision's roi_pool follows Caffe, whose boxes name their last pixel, so boxes are
shifted by one there; roi_align(aligned=True) takes continuous coordinates as they are.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.ops import roi_align, roi_pool

from pipeline.engine.schema import register_choices
from pipeline.precision import bf16_autocast
from pipeline.regions import image_tensor, normalised

POOLINGS = ("roi_pool", "roi_align")
register_choices("*.pooling", POOLINGS)


def pool_regions(feature_map: torch.Tensor, boxes: list[torch.Tensor], output_size: int, spatial_scale: float,
                 method: str = "roi_pool") -> torch.Tensor:
    """feature_map[B, C, h, w], boxes[K_b, 4] per image (image pixels) -> pooled[sum K_b, C, s, s].

    `spatial_scale` maps image pixels to map cells (1 / the conv stride, times any image rescaling).
    """
    if method == "roi_pool":
        last_pixel = [image_boxes - image_boxes.new_tensor([0, 0, 1, 1]) for image_boxes in boxes]
        return roi_pool(feature_map, last_pixel, output_size, spatial_scale)
    if method == "roi_align":
        return roi_align(feature_map, boxes, output_size, spatial_scale, sampling_ratio=2, aligned=True)
    raise ValueError(f"pooling {method!r}: expected one of {', '.join(POOLINGS)}")


def pooling_bins(box, output_size: int, spatial_scale: float,
                 method: str = "roi_pool") -> tuple[np.ndarray, np.ndarray]:
    """Where pool_regions pools each of the output_size x output_size bins of a box (x1, y1, x2, y2 in image
    pixels) on a map at spatial_scale: (x spans, y spans), each float[output_size, 2] of (start, end) in map
    cells, cell k covering [k, k + 1). roi_pool (torchvision's Caffe rule) rounds the box to whole cells and
    takes whole cells per bin, floor to ceil, so neighbouring bins can share a cell (a bin also stops at the map's
    edge, which these spans do not clip); roi_align (aligned=True) divides the box exactly, in continuous
    coordinates."""
    x1, y1, x2, y2 = (float(value) for value in box)
    if method == "roi_pool":
        starts = np.floor(np.array([x1, y1]) * spatial_scale + 0.5)  # C++ std::round of positive values
        ends = np.floor((np.array([x2, y2]) - 1) * spatial_scale + 0.5)  # pool_regions names the last pixel
        sizes = np.maximum(ends - starts + 1, 1) / output_size
        bins = np.arange(output_size)
        return tuple(np.stack([np.floor(bins * size) + start, np.ceil((bins + 1) * size) + start], axis=1)
                     for start, size in zip(starts, sizes))
    if method == "roi_align":
        starts, ends = np.array([x1, y1]) * spatial_scale, np.array([x2, y2]) * spatial_scale
        edges = [start + (end - start) * np.arange(output_size + 1) / output_size for start, end in zip(starts, ends)]
        return tuple(np.stack([edge[:-1], edge[1:]], axis=1) for edge in edges)
    raise ValueError(f"pooling {method!r}: expected one of {', '.join(POOLINGS)}")


def spatial_pyramid_pool(feature_map: torch.Tensor, boxes: list[torch.Tensor], levels: list[int],
                         spatial_scale: float) -> torch.Tensor:
    """SPP-net's pyramid: each region max-pooled into l x l bins for every level l, flattened and
    concatenated (per level: channel-major, as .flatten(1) orders it) -> [K, C * sum(l * l)].

    One level of the pyramid is exactly RoI pooling (Fast R-CNN §2.1), so each level is roi_pool.
    """
    return torch.cat([pool_regions(feature_map, boxes, level, spatial_scale).flatten(1) for level in levels], dim=1)


def spp_dim(channels: int, levels: list[int]) -> int:
    return channels * sum(level * level for level in levels)


class RoIPooler(nn.Module):
    """The RoI pooling layer in the form torchvision's RoIHeads calls it: (features, proposals, image sizes).

    Pools the single map `features["0"]` at 1 / stride, the scale of the (resized) image the boxes are in.
    """

    def __init__(self, output_size: int, stride: int, method: str = "roi_pool"):
        super().__init__()
        if method not in POOLINGS:
            raise ValueError(f"pooling {method!r}: expected one of {', '.join(POOLINGS)}")
        self.output_size, self.spatial_scale, self.method = output_size, 1.0 / stride, method

    def forward(self, features: dict, proposals: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        return pool_regions(features["0"], proposals, self.output_size, self.spatial_scale, self.method)


def truncated_svd(linear: nn.Linear, rank: int) -> nn.Sequential:
    """Fast R-CNN §3.1: W[out, in] ~ U_t S_t V_t^T as two layers, S_t V_t^T (no bias) then U_t (W's bias).

    Parameters fall from out * in to rank * (out + in); the layer's output is the best rank-t one.
    """
    U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    rank = min(rank, len(S))
    first = nn.Linear(linear.in_features, rank, bias=False)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        first.weight.copy_(S[:rank, None] * Vh[:rank])
        second.weight.copy_(U[:, :rank])
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
    return nn.Sequential(first, second)


def compress_fc(block: nn.Sequential, rank: int) -> None:
    """Replace the Linear layers of an fc block (e.g. fc6 = [Dropout, Linear, ReLU]) by their truncated SVD."""
    for index, layer in enumerate(block):
        if isinstance(layer, nn.Linear) and rank and rank < min(layer.in_features, layer.out_features):
            block[index] = truncated_svd(layer, rank)


def conv5_at_scales(trunk, rgb: np.ndarray, scales, device: str, amp: bool) -> list[tuple[float, torch.Tensor]]:
    """SPP-net's image pyramid: (resize factor, conv5 float32[C, h, w] on the device) of an RGB image
    resized so that its shorter side is each of `scales`."""
    maps = []
    for scale in scales:
        factor = scale / min(rgb.shape[:2])
        size = (round(rgb.shape[1] * factor), round(rgb.shape[0] * factor))
        resized = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR if factor > 1 else cv2.INTER_AREA)
        image = normalised(image_tensor(resized, device))
        with torch.no_grad(), bf16_autocast(device, amp and device == "cuda"):
            maps.append((factor, trunk(image[None])[0].float()))
    return maps


def best_scale(boxes: np.ndarray, factors: list[float], input_size: int) -> np.ndarray:
    """For each box[R, 4], the index of the factor at which its area is closest to input_size^2 (SPP-net §3.1)."""
    sides = np.sqrt(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1))
    return np.abs(np.log(sides[:, None] * np.asarray(factors)[None, :] / input_size)).argmin(axis=1)


def pyramid_features(maps: list, boxes: np.ndarray, levels, stride: int, input_size: int) -> np.ndarray:
    """float32[R, C * sum(l^2)] (numpy): each box[R, 4] pooled by the pyramid on its best scale's conv5
    map (maps: (resize factor, conv5[C, h, w] as a numpy array or a tensor on any device))."""
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
