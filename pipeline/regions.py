"""Warping regions to the network's input, and labelling them against the ground truth.

R-CNN (Appendix A) dilates each region so that, once warped to S x S, it has exactly `context_pad`
pixels of image context on every side, then warps it anisotropically; pixels outside the image take
the mean colour. Here the warp is torchvision.ops.roi_align over the mean-subtracted image (so the
zeros it samples outside the image are the mean colour), batched on the device: no per-crop Python loop.
One bilinear sample per output pixel (sampling_ratio 1), as R-CNN's own crop (rcnn_im_crop.m: imresize
'bilinear' with 'antialiasing' false); roi_align's adaptive sampling averages up to ceil(side / S)^2
samples per pixel, an anti-aliased warp that costs several times the work of this one on a CPU
(docs/speed.md, bench/rcnn_test_time.py).
Boxes are (x1, y1, x2, y2) in the pipeline's continuous pixel coordinates (pipeline.boxes), which is
what roi_align(aligned=True) expects.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou, roi_align

# ImageNet statistics: what torchvision's weights were trained with, and a fine default otherwise.
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)


def context_boxes(boxes: torch.Tensor, output_size: int, context_pad: float) -> torch.Tensor:
    """boxes[K, 4] dilated so that the original box fills the warped crop but for `context_pad` pixels."""
    scale = output_size / (output_size - 2 * context_pad)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    half_sizes = (boxes[:, 2:] - boxes[:, :2]) / 2 * scale
    return torch.cat([centers - half_sizes, centers + half_sizes], dim=1)


def image_tensor(rgb: np.ndarray, device: str) -> torch.Tensor:
    """An RGB uint8[H, W, 3] image (as the data set reads it) as uint8[3, H, W] on the device."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(device)


def mean_subtracted(image: torch.Tensor) -> torch.Tensor:
    """uint8[3, H, W] RGB -> float32[3, H, W] in [0, 1] minus the mean colour."""
    mean = torch.tensor(MEAN_RGB, device=image.device).view(3, 1, 1)
    return image.float().div_(255).sub_(mean)


def warp_regions(image: torch.Tensor, boxes: torch.Tensor, output_size: int, context_pad: float) -> torch.Tensor:
    """Normalised crops[K, 3, S, S] of boxes[K, 4] from a uint8[3, H, W] image (or a mean_subtracted one)."""
    if image.dtype == torch.uint8:
        image = mean_subtracted(image)
    rois = context_boxes(boxes.to(image.device, torch.float32), output_size, context_pad)
    crops = roi_align(image[None], [rois], output_size=output_size, spatial_scale=1.0, sampling_ratio=1,
                      aligned=True)
    return crops.div_(torch.tensor(STD_RGB, device=image.device).view(1, 3, 1, 1))


class ImageBank:
    """A split's images as uint8[3, H, W] tensors, for warping windows drawn from many images at once.

    On a GPU they are kept in its memory. On the CPU each is decoded once into a nameless file in
    `spill_dir` (the stage's cache folder, on the disk the user chose for large data; it vanishes when the
    bank or the process does, killed or not) and read back when used, so the process holds none of them and
    the kernel's page cache keeps what the machine's memory allows. Holding them all would cost H x W x 3
    bytes per image, growing with the data set (a few hundred 12-megapixel phone photos: several GB;
    docs/speed.md); reading one back is a copy, a small part of warping it.
    """

    def __init__(self, device: str, spill_dir: Path):
        self.device, self.spill_dir = device, spill_dir
        self.on_device: list[torch.Tensor] = []
        self.placed: list[tuple[int, tuple[int, int, int]]] = []  # where each image lies in the file, its shape
        self.file = tempfile.TemporaryFile(dir=spill_dir) if torch.device(device).type == "cpu" else None

    def add(self, rgb: np.ndarray) -> None:
        """Append an RGB uint8[H, W, 3] image (as the data set reads it)."""
        if self.file is None:
            self.on_device.append(image_tensor(rgb, self.device))
            return
        pixels = np.ascontiguousarray(rgb.transpose(2, 0, 1))
        self.placed.append((self.file.tell(), pixels.shape))
        self.file.write(pixels.data)
        self.file.flush()  # read back below the buffer, by position

    def __len__(self) -> int:
        return len(self.on_device) + len(self.placed)

    def image(self, index: int) -> torch.Tensor:
        """The index-th image as uint8[3, H, W] on the device."""
        if self.file is None:
            return self.on_device[index]
        offset, shape = self.placed[index]
        pixels = bytearray(int(np.prod(shape)))
        if os.preadv(self.file.fileno(), [pixels], offset) != len(pixels):
            raise OSError(f"{self.spill_dir}: the image bank's file was cut short")
        return torch.frombuffer(pixels, dtype=torch.uint8).view(shape)

    def warp(self, image_index: np.ndarray, boxes: torch.Tensor, output_size: int, context_pad: float) -> torch.Tensor:
        """Crops[K, 3, S, S] for windows given as (image_index[K], boxes[K, 4]), in that order."""
        crops = torch.empty((len(image_index), 3, output_size, output_size), device=self.device)
        for index in np.unique(image_index):
            rows = torch.from_numpy(np.flatnonzero(image_index == index))  # indexes `boxes`, wherever it lives
            crops[rows.to(self.device)] = warp_regions(self.image(index), boxes[rows.to(boxes.device)], output_size,
                                                       context_pad)
        return crops


def label_regions(boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                  fg_iou: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match boxes[R, 4] to ground truth gt_boxes[G, 4] with class indices gt_labels[G].

    Returns labels[R] (gt class index + 1 where the best IoU >= fg_iou, else 0 = background),
    best IoU[R] and the index of the best-matching ground-truth box[R] (0 when there is none).
    """
    if len(gt_boxes) == 0:
        zeros = torch.zeros(len(boxes), dtype=torch.int64)
        return zeros, torch.zeros(len(boxes)), zeros
    best_iou, best_gt = box_iou(boxes, gt_boxes).max(dim=1)
    labels = torch.where(best_iou >= fg_iou, gt_labels[best_gt] + 1, torch.zeros_like(best_gt))
    return labels, best_iou, best_gt


def sample_windows(rng: np.random.Generator, labels: np.ndarray, count: int, fg_fraction: float) -> np.ndarray:
    """Rows of a mini-batch of `count` windows: fg_fraction foreground (label > 0), the rest background (0).

    Rows labelled < 0 are never drawn. Where there are fewer foreground windows than asked, background
    makes up the rest (Fast R-CNN §2.3); a pool smaller than asked is drawn with replacement.
    """
    foreground, background = np.flatnonzero(labels > 0), np.flatnonzero(labels == 0)
    fg_count = min(round(count * fg_fraction), len(foreground)) if len(background) else count
    return np.concatenate([draw(rng, foreground, fg_count), draw(rng, background, count - fg_count)])


def draw(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    """`count` distinct members of pool, with replacement only when the pool is smaller (none from an empty one)."""
    return rng.choice(pool, size=count, replace=len(pool) < count) if count and len(pool) else pool[:0]


def augment_crops(crops: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random horizontal flips, then `recolour`, of normalised crops[K, 3, S, S]."""
    flip = torch.from_numpy(rng.random(len(crops)) < 0.5).to(crops.device)
    return recolour(torch.where(flip[:, None, None, None], crops.flip(-1), crops), rng)


def recolour(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random colour changes of normalised images[K, 3, H, W] (crops or whole images).

    A random permutation of the RGB channels, then a random gain in [0.6, 1.4] and offset in
    [-0.3, 0.3]: they keep the shape and change the colours, so that for classes defined by shape a
    network trained on few objects does not learn the colours of the training instances.
    """
    count, device = len(images), images.device
    channels = torch.from_numpy(np.stack([rng.permutation(3) for _ in range(count)])).to(device)
    images = images[torch.arange(count, device=device)[:, None], channels]
    gain = torch.from_numpy(rng.uniform(0.6, 1.4, (count, 1, 1, 1))).float().to(device)
    offset = torch.from_numpy(rng.uniform(-0.3, 0.3, (count, 1, 1, 1))).float().to(device)
    return images * gain + offset


def normalised(image: torch.Tensor) -> torch.Tensor:
    """uint8[3, H, W] RGB -> float32[3, H, W] normalised with the ImageNet mean and std (zero = mean colour)."""
    return mean_subtracted(image).div_(torch.tensor(STD_RGB, device=image.device).view(3, 1, 1))


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """boxes[K, 4] mirrored left-right in an image `width` pixels wide (continuous coordinates)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


@dataclass
class TrainingImages:
    """A split's images (an ImageBank) and their non-difficult ground truth."""
    image_ids: list[str]
    bank: ImageBank
    gt_boxes: list[np.ndarray]   # float32[G, 4] per image
    gt_labels: list[np.ndarray]  # int64[G] per image (class indices)


def load_training_images(dataset, split: str, device: str, spill_dir: Path) -> TrainingImages:
    """Every readable image of `split` (those skipped for bad input left out) with its non-difficult boxes,
    in an ImageBank (spilled to a file in `spill_dir` on the CPU)."""
    image_ids, bank, gt_boxes, gt_labels = [], ImageBank(device, spill_dir), [], []
    for image_id in dataset.image_ids(split):
        rgb = dataset.read_image(image_id)
        if rgb is None:  # skipped for bad input
            continue
        boxes, labels, difficult = dataset.ground_truth(image_id)
        image_ids.append(image_id)
        bank.add(rgb)
        gt_boxes.append(boxes[~difficult])
        gt_labels.append(labels[~difficult])
    return TrainingImages(image_ids, bank, gt_boxes, gt_labels)


def predict_classes(net, bank: ImageBank, image_index: np.ndarray, boxes: torch.Tensor, input_size: int,
                    context_pad: float, batch_size: int) -> torch.Tensor:
    """The network's arg-max class of each window (image_index[K], boxes[K, 4]), warped and run in batches of
    the training's size (a larger batch would set the stage's peak memory: MobileNetV2, 96 px crops, 256 at a
    time: 1 GB) in eval mode (no dropout, BatchNorm's running statistics left as they are)."""
    net.eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(image_index), batch_size):
            crops = bank.warp(image_index[start:start + batch_size], boxes[start:start + batch_size], input_size,
                              context_pad)
            predicted.append(net(crops).argmax(1).cpu())
    return torch.cat(predicted)
