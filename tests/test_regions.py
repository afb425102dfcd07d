from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.regions import (
    MEAN_RGB,
    STD_RGB,
    ImageBank,
    augment_crops,
    context_boxes,
    label_regions,
    mean_subtracted,
    warp_regions,
)


def normalised(values_rgb: np.ndarray) -> torch.Tensor:
    """The normalisation warp_regions applies: (x / 255 - mean) / std, per channel."""
    mean, std = np.array(MEAN_RGB)[:, None, None], np.array(STD_RGB)[:, None, None]
    return torch.from_numpy((values_rgb / 255.0 - mean) / std).float()


def test_context_boxes_leave_exactly_the_padding_around_the_box():
    box = torch.tensor([[10.0, 20.0, 50.0, 40.0]])  # 40 x 20
    dilated = context_boxes(box, output_size=48, context_pad=8)
    # the original 40 px must map to 48 - 2 * 8 = 32 warped px: 8 warped px = 10 image px each side
    assert torch.allclose(dilated, torch.tensor([[0.0, 15.0, 60.0, 45.0]]))


def test_warp_without_context_copies_the_pixels_exactly():
    image = torch.arange(3 * 6 * 8, dtype=torch.uint8).reshape(3, 6, 8)
    crop = warp_regions(image, torch.tensor([[2.0, 1.0, 6.0, 5.0]]), output_size=4, context_pad=0)
    assert torch.allclose(crop[0], normalised(image[:, 1:5, 2:6].numpy().astype(float)), atol=1e-5)


def test_warp_pads_outside_the_image_with_the_mean_colour():
    image = torch.full((3, 4, 4), 200, dtype=torch.uint8)
    # roi_align repeats the edge pixels up to one pixel outside the image; further out it samples zeros,
    # which in the mean-subtracted image are the mean colour, normalised to 0
    crop = warp_regions(image, torch.tensor([[6.0, 0.0, 10.0, 4.0]]), output_size=4, context_pad=0)
    assert torch.allclose(crop, torch.zeros_like(crop), atol=1e-6)


def test_warp_is_anisotropic():
    image = torch.zeros((3, 10, 40), dtype=torch.uint8)
    crop = warp_regions(image, torch.tensor([[0.0, 0.0, 40.0, 10.0]]), output_size=8, context_pad=0)
    assert crop.shape == (1, 3, 8, 8)


def test_image_bank_returns_crops_in_window_order(tmp_path):
    first = np.zeros((8, 8, 3), np.uint8)
    second = np.full((8, 8, 3), 255, np.uint8)
    bank = ImageBank("cpu", tmp_path)
    bank.add(first)
    bank.add(second)
    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 4], [4, 4, 8, 8]])
    crops = bank.warp(np.array([1, 0, 1]), boxes, output_size=2, context_pad=0)
    assert crops[0].mean() > crops[1].mean() and torch.allclose(crops[0], crops[2])


def anonymous_resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssAnon:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from Linux's /proc")
def test_image_bank_on_the_cpu_holds_its_images_in_a_file_not_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (600, 800, 3), dtype=np.uint8) for _ in range(3)]
    before = anonymous_resident_bytes()
    bank = ImageBank("cpu", tmp_path)
    for _ in range(20):  # 20 x 3 images of 1.44 MB: 86 MB that a bank in memory would hold
        for image in images:
            bank.add(image)
    grown = anonymous_resident_bytes() - before
    assert len(bank) == 60 and grown < 20 * 2 ** 20
    for index in (0, 31, 59):
        assert torch.equal(bank.image(index), torch.from_numpy(images[index % 3].transpose(2, 0, 1).copy()))
    assert list(tmp_path.iterdir()) == []  # the file has no name: nothing is left behind, even by a killed run


def test_mean_subtracted_image_gives_the_same_crop_as_uint8():
    image = torch.randint(0, 255, (3, 12, 12), dtype=torch.uint8)
    boxes = torch.tensor([[1.5, 2.0, 9.0, 11.0]])
    assert torch.allclose(warp_regions(image, boxes, 6, 1), warp_regions(mean_subtracted(image), boxes, 6, 1))


def test_label_regions_by_best_iou():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    gt_labels = torch.tensor([3, 1])
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20], [20, 20, 30, 32], [50, 50, 60, 60]])
    labels, best_iou, best_gt = label_regions(boxes, gt_boxes, gt_labels, fg_iou=0.5)
    assert labels.tolist() == [4, 4, 2, 0]  # class + 1; IoU 0.5 counts as foreground; 0 = background
    assert best_iou[1].item() == pytest.approx(0.5) and best_gt.tolist()[:3] == [0, 0, 1]


def test_label_regions_without_ground_truth_is_all_background():
    labels, _, _ = label_regions(torch.rand(3, 4), torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), 0.5)
    assert labels.tolist() == [0, 0, 0]


def test_augment_keeps_shape_and_changes_colours_but_not_layout():
    crops = torch.zeros((64, 3, 5, 5))
    crops[:, 0, :, 0] = 1.0  # a red left column
    augmented = augment_crops(crops, np.random.default_rng(0))
    assert augmented.shape == crops.shape
    # each crop is one of: column on the left or on the right (flip); the other columns stay uniform
    edge = ((augmented[..., 0] - augmented[..., 2]).abs().amax(dim=(1, 2))
            + (augmented[..., 4] - augmented[..., 2]).abs().amax(dim=(1, 2)))
    assert (edge > 0).all() and (augmented[..., 1] == augmented[..., 2]).all()
    assert not torch.allclose(augmented[:, 0], augmented[:1, 0].expand(64, 5, 5))  # colours differ between crops
