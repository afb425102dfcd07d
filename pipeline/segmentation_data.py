"""The data of semantic segmentation: images with their class masks, training crops, labelled pixels,
and the sliding-window segmenter (the baseline the lecture calls very inefficient).

Images and masks come from ImageSets/Segmentation/<split>.txt and SegmentationClass/ (the shapes set
writes both; VOC2007's segmentation subset has them).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from pipeline.engine.errors import DataSetError
from pipeline.regions import image_tensor, normalised, recolour, warp_regions
from pipeline.segmentation import resize


@dataclass
class SegmentationSet:
    """A split's images (uint8[3, H, W] on the device) and masks (uint8[H, W] numpy)."""
    image_ids: list[str]
    images: list
    masks: list[np.ndarray]


def load_segmentation_set(dataset, image_ids, device: str, scale: float = 1.0) -> SegmentationSet:
    """The images and masks of these ids, resized by `scale`, leaving out those skipped for bad input."""
    kept = SegmentationSet([], [], [])
    for image_id in image_ids:
        rgb, mask = dataset.read_image(image_id), dataset.read_segmentation(image_id)
        if rgb is not None and mask is not None:
            if scale != 1:
                size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
                rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
                mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
            kept.image_ids.append(image_id)
            kept.images.append(image_tensor(rgb, device))
            kept.masks.append(mask)
    return kept


def load_training_masks(dataset, split: str, device: str, scale: float = 1.0) -> SegmentationSet:
    """The split's images with masks, resized by `scale`; an error naming the split file when there are none."""
    training = load_segmentation_set(dataset, dataset.segmentation_ids(split), device, scale)
    if not training.image_ids:
        raise DataSetError(dataset.segmentation_split_file(split),
                            "no images with segmentation masks in this split")
    return training


def random_crops(training: SegmentationSet, params: dict):
    """next_batch(rng): batch_size random crop_size crops (normalised) and their masks (int64, 255 void),
    from random training images, each flipped with probability 1/2 and, with `augment`, recoloured."""
    side = params["crop_size"]

    def next_batch(rng: np.random.Generator):
        crops, masks = [], []
        for index in rng.integers(len(training.images), size=params["batch_size"]):
            image, mask = (training.images[index],
                           torch.from_numpy(training.masks[index]).to(training.images[index].device))
            height, width = mask.shape
            top, left = int(rng.integers(max(height - side, 0) + 1)), int(rng.integers(max(width - side, 0) + 1))
            crop = torch.zeros((3, side, side), device=image.device)
            crop_mask = torch.full((side, side), 255, dtype=torch.int64, device=image.device)
            window = (slice(top, top + side), slice(left, left + side))
            h, w = mask[window].shape
            crop[:, :h, :w], crop_mask[:h, :w] = normalised(image[(slice(None), *window)]), mask[window]
            if rng.random() < 0.5:
                crop, crop_mask = crop.flip(-1), crop_mask.flip(-1)
            crops.append(crop)
            masks.append(crop_mask)
        crops = torch.stack(crops)
        return recolour(crops, rng) if params["augment"] else crops, torch.stack(masks)
    return next_batch


@dataclass
class LabelledPixels:
    """Per image, the flat indices of its background pixels and of its object pixels (void left out)."""
    background: list[np.ndarray]
    objects: list[np.ndarray]
    widths: list[int]

    def sample(self, rng: np.random.Generator, count: int, background_fraction: float):
        """(image index, y, x) of `count` pixels: an image uniformly, then background with probability
        background_fraction (else an object pixel, when the image has one)."""
        image_index = rng.integers(len(self.widths), size=count)
        want_background = rng.random(count) < background_fraction
        ys, xs = np.empty(count, np.int64), np.empty(count, np.int64)
        for row, (index, background) in enumerate(zip(image_index, want_background)):
            pool = self.background[index] if background or not len(self.objects[index]) else self.objects[index]
            ys[row], xs[row] = divmod(int(pool[rng.integers(len(pool))]), self.widths[index])
        return image_index, ys, xs


def labelled_pixels(masks: list[np.ndarray]) -> LabelledPixels:
    return LabelledPixels([np.flatnonzero(mask == 0) for mask in masks],
                          [np.flatnonzero((mask > 0) & (mask != 255)) for mask in masks],
                          [mask.shape[1] for mask in masks])


def patches(image, ys: np.ndarray, xs: np.ndarray, size: int):
    """Normalised size x size patches of a uint8[3, H, W] image around pixels (ys, xs), each at row and
    column size // 2 of its patch, sampled exactly on the image's pixels; the mean colour outside it."""
    corners = torch.from_numpy(np.stack([xs, ys], axis=1).astype(np.float32)) - size // 2
    boxes = torch.cat([corners, corners + size], dim=1)
    return warp_regions(image, boxes, size, context_pad=0)


def segment_by_windows(net, image, patch_size: int, stride: int, scale: float = 1.0, batch_size: int = 1024):
    """The sliding-window baseline: classify a patch around every stride-th pixel (rows and columns) of
    the image resized by `scale` (the FCN's: objects then have the size the classifier was trained on),
    each label filling its stride x stride block, the labels resized back (nearest).
    uint8[3, H, W] image -> labels uint8[H, W] (numpy)."""
    full_height, full_width = image.shape[-2:]
    image = resize(image[None].float(), scale)[0].round().clamp(0, 255).to(torch.uint8)
    height, width = image.shape[-2:]
    ys = np.minimum(np.arange(0, height, stride) + stride // 2, height - 1)  # the centre of each block
    xs = np.minimum(np.arange(0, width, stride) + stride // 2, width - 1)
    grid_y, grid_x = (axis.ravel() for axis in np.meshgrid(ys, xs, indexing="ij"))
    labels = []
    with torch.no_grad():
        for start in range(0, len(grid_y), batch_size):
            crops = patches(image, grid_y[start:start + batch_size], grid_x[start:start + batch_size], patch_size)
            labels.append(net(crops).argmax(1).to(torch.uint8).cpu())
    grid = torch.cat(labels).numpy().reshape(len(ys), len(xs))
    blocks = np.repeat(np.repeat(grid, stride, axis=0), stride, axis=1)[:height, :width]
    return blocks if scale == 1 else cv2.resize(blocks, (full_width, full_height), interpolation=cv2.INTER_NEAREST)
