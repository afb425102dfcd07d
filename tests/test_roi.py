"""RoI pooling, SPP pooling and truncated SVD against small hand-worked tensors."""
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.roi import (
    RoIPooler,
    best_scale,
    compress_fc,
    pool_regions,
    pyramid_features,
    spatial_pyramid_pool,
    spp_dim,
    truncated_svd,
)

# a 4 x 4 map whose value at (row, column) is 4 * row + column
MAP = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)


def test_roi_pool_of_the_whole_map_takes_the_max_of_each_quadrant():
    whole = [torch.tensor([[0.0, 0.0, 4.0, 4.0]])]  # continuous pixels: all four columns and rows
    pooled = pool_regions(MAP, whole, output_size=2, spatial_scale=1.0)
    assert torch.equal(pooled, torch.tensor([[[[5.0, 7.0], [13.0, 15.0]]]]))


def test_roi_pool_of_a_window_pools_only_inside_it():
    # columns 1-2, rows 0-1: values [[1, 2], [5, 6]]
    window = [torch.tensor([[1.0, 0.0, 3.0, 2.0]])]
    assert torch.equal(pool_regions(MAP, window, 1, 1.0), torch.tensor([[[[6.0]]]]))
    assert torch.equal(pool_regions(MAP, window, 2, 1.0), torch.tensor([[[[1.0, 2.0], [5.0, 6.0]]]]))


def test_roi_pool_maps_image_pixels_to_cells_by_the_stride():
    # Caffe's quantisation at stride 2: pixels 4..6 x 0..2 (the box's first and last pixels) round to
    # cells 2..3 x 0..1, whose values are [[2, 3], [6, 7]]
    pooled = pool_regions(MAP, [torch.tensor([[4.0, 0.0, 7.0, 3.0]])], 1, spatial_scale=0.5)
    assert pooled.item() == 7.0


def test_spatial_pyramid_concatenates_the_levels_channel_major():
    maps = torch.cat([MAP, 100 + MAP], dim=1)  # two channels
    pooled = spatial_pyramid_pool(maps, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], levels=[2, 1], spatial_scale=1.0)
    expected = [5, 7, 13, 15, 105, 107, 113, 115, 15, 115]  # level 2 (channel 0, channel 1), then level 1
    assert pooled.tolist() == [expected]
    assert pooled.shape[1] == spp_dim(2, [2, 1])


def test_roi_align_option_and_pooler_module_agree_with_the_function():
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 3.0]])]
    pooler = RoIPooler(output_size=2, stride=1, method="roi_align")
    aligned = pooler({"0": MAP}, boxes)
    assert torch.allclose(aligned, pool_regions(MAP, boxes, 2, 1.0, "roi_align"))
    # roi_align averages bilinear samples: the top-left bin of the whole map is the mean of 0, 1, 4, 5
    assert aligned[0, 0, 0, 0].item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="roi_pool, roi_align"):
        RoIPooler(2, 1, method="max")


def test_best_scale_brings_each_box_nearest_the_input_size():
    boxes = np.array([[0, 0, 24, 24], [0, 0, 48, 48], [0, 0, 96, 96]], np.float32)
    assert best_scale(boxes, [0.5, 1.0, 2.0], input_size=48).tolist() == [2, 1, 0]


def test_pyramid_features_pool_each_box_on_its_scale():
    small_scale, large_scale = (0.5, MAP[0]), (2.0, 100 + MAP[0])
    boxes = np.array([[0, 0, 8, 8], [0, 0, 1, 1]], np.float32)  # best at 0.5 (side 4) and at 2.0 (side 2)
    pooled = pyramid_features([small_scale, large_scale], boxes, levels=[1], stride=1, input_size=4)
    assert pooled[:, 0].tolist() == [15.0, 105.0]  # whole small map; cells 0-1 x 0-1 of the large one


def test_truncated_svd_at_full_rank_is_the_layer_and_at_low_rank_is_smaller():
    torch.manual_seed(0)
    layer = nn.Linear(12, 8)
    inputs = torch.randn(5, 12)
    assert torch.allclose(truncated_svd(layer, 8)(inputs), layer(inputs), atol=1e-5)
    compressed = truncated_svd(layer, 3)
    assert sum(p.numel() for p in compressed.parameters()) == 3 * (12 + 8) + 8
    # the best rank-3 approximation: the error is the weight beyond the third singular value
    singular = torch.linalg.svdvals(layer.weight.detach())
    error = (compressed[1].weight @ compressed[0].weight - layer.weight).norm()
    assert error.item() == pytest.approx(singular[3:].norm().item(), rel=1e-4)


def test_compress_fc_replaces_only_the_linear_layer():
    block = nn.Sequential(nn.Dropout(), nn.Linear(16, 16), nn.ReLU())
    compress_fc(block, 4)
    assert isinstance(block[0], nn.Dropout) and isinstance(block[1], nn.Sequential) and isinstance(block[2], nn.ReLU)
