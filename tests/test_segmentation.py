"""The FCN's upsamplings against the lecture's worked examples, its metrics, and the segmentation stages."""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import config_sealed_while_stages_run
from PIL import Image
from test_rcnn_pipeline import assert_killed_training_resumes_identically, status
from tiny import options as rcnn_options

from pipeline.cli import main
from pipeline.data.voc import VOCDataset
from pipeline.engine.errors import BadInputError, ConfigError
from pipeline.models import build_region_net
from pipeline.segmentation import (
    FCN,
    UPSAMPLINGS,
    confusion_matrix,
    convolutionalized,
    out_channels,
    predict_mask,
    segmentation_metrics,
    trunk_levels,
    upsampler,
)
from pipeline.segmentation_data import SegmentationSet, load_training_masks, patches, random_crops, segment_by_windows
from pipeline.training import SGDSettings, train

TWO_BY_TWO = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]


def test_nearest_neighbour_unpooling_copies_each_value_into_its_block():
    expected = [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    assert upsampler("nearest", 1)(TWO_BY_TWO)[0, 0].tolist() == expected


def test_bed_of_nails_puts_each_value_at_the_top_left_of_its_block():
    expected = [[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]]
    assert upsampler("bed-of-nails", 1)(TWO_BY_TWO)[0, 0].tolist() == expected


def test_max_unpooling_puts_values_where_the_paired_pool_found_its_maxima():
    fcn = FCN(2, (1,), upsampling="max-unpool")
    pool, unpool = fcn.downsample[0], fcn.upsample[0]
    seen = torch.tensor([[1.0, 2, 6, 3], [3, 5, 2, 1], [1, 2, 2, 1], [7, 3, 4, 8]])[None, None]
    pooled, positions = pool(seen)
    assert pooled[0, 0].tolist() == [[5, 6], [7, 8]]
    expected = [[0, 0, 2, 0], [0, 1, 0, 0], [0, 0, 0, 0], [3, 0, 0, 4]]
    assert unpool(TWO_BY_TWO, positions)[0, 0].tolist() == expected


def test_one_dimensional_transpose_convolution_of_the_lecture():
    """Kernel (x, y, z), input (a, b), stride 2: output (ax, ay, az + bx, by, bz)."""
    x, y, z, a, b = 2.0, 3.0, 5.0, 7.0, 11.0
    output = F.conv_transpose1d(torch.tensor([[[a, b]]]), torch.tensor([[[x, y, z]]]), stride=2)
    assert output[0, 0].tolist() == [a * x, a * y, a * z + b * x, b * y, b * z]


def conv_matrix(convolve, input_shape) -> torch.Tensor:
    """The matrix X of a linear map: column j is the map applied to the j-th basis input."""
    size = int(np.prod(input_shape))
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    return torch.stack([convolve(e[None])[0].flatten() for e in basis], dim=1)


@pytest.mark.parametrize("stride", [1, 2])
def test_transpose_convolution_is_the_transposed_convolution_matrix_times_the_input(stride):
    kernel = torch.tensor([[[1.0, -2.0, 3.0]]], dtype=torch.float64)
    X = conv_matrix(lambda v: F.conv1d(v, kernel, stride=stride, padding=1), (1, 8))
    y = torch.arange(1.0, X.shape[0] + 1, dtype=torch.float64)
    transposed = F.conv_transpose1d(y.view(1, 1, -1), kernel, stride=stride, padding=1,
                                    output_padding=stride - 1)
    assert torch.allclose(transposed.flatten(), X.T @ y)


def test_the_fcns_transpose_convolution_doubles_the_size_and_transposes_its_strided_convolution():
    layer = upsampler("transpose-conv", 2).double()
    y = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    upsampled = layer(y) - layer.bias.view(1, 2, 1, 1)
    assert upsampled.shape == (1, 2, 6, 8)
    X = conv_matrix(lambda v: F.conv2d(v, layer.weight, stride=2, padding=1), (2, 6, 8))
    assert torch.allclose(upsampled.flatten(), X.T @ y.flatten())


@pytest.mark.parametrize("upsampling", UPSAMPLINGS)
@pytest.mark.parametrize("skips", [0, 2])
def test_fcn_scores_every_pixel(upsampling, skips):
    model = FCN(7, (4, 8, 8), upsampling, skips=skips).eval()
    assert model(torch.randn(2, 3, 16, 24)).shape == (2, 7, 16, 24)
    assert predict_mask(model, torch.randn(3, 13, 21)).shape == (13, 21)  # padded to the stride, cropped back


def test_a_classifiers_conv_layers_cut_at_its_pools_become_the_encoder():
    classifier = build_region_net("small", 7, 48)
    levels = trunk_levels(classifier.trunk)
    assert [out_channels(level) for level in levels] == [16, 32, 64, 64]
    fcn = FCN(7, upsampling="max-unpool", skips=1, encoder=levels).eval()
    assert fcn.encoder[0][0].weight is classifier.trunk[0].weight  # the classifier's weights, not copies
    assert fcn.stride == 16 and fcn(torch.randn(1, 3, 32, 48)).shape == (1, 7, 32, 48)
    with pytest.raises(ConfigError, match="does not halve"):
        trunk_levels(build_region_net("alexnet", 7, 227).trunk)


@pytest.mark.parametrize("name, input_size", [("small", 48), ("small", 32), ("vgg16", 224)])
def test_convolutionalized_fc_layers_give_the_classifiers_activations_at_every_cell(name, input_size):
    torch.manual_seed(0)
    classifier = build_region_net(name, 7, input_size).eval()
    fc_layers = convolutionalized(classifier).eval()
    pool5 = classifier.pool5(torch.randn(2, 3, input_size, input_size))
    centre = (classifier.roi_size - 1) // 2  # the cell whose window is the whole pool5 (even sizes too)
    with torch.no_grad():
        assert torch.allclose(fc_layers(pool5)[:, :, centre, centre], classifier.fc(pool5), atol=1e-5)
        wider = torch.randn(1, classifier.trunk_channels, classifier.roi_size + 2, classifier.roi_size + 4)
        window = wider[:, :, 1:1 + classifier.roi_size, 3:3 + classifier.roi_size]
        assert torch.allclose(fc_layers(wider)[:, :, 1 + centre, 3 + centre], classifier.fc(window), atol=1e-5)
    fcn = FCN(8, encoder=trunk_levels(classifier.trunk), fc_layers=fc_layers, skips=2).eval()
    assert fcn(torch.randn(1, 3, fcn.stride, 2 * fcn.stride)).shape == (1, 8, fcn.stride, 2 * fcn.stride)


def test_fcn_rejects_what_it_cannot_build_or_run():
    with pytest.raises(ConfigError, match="max-unpool needs"):
        FCN(3, (4, 8), "max-unpool", downsampling="strided-conv")
    with pytest.raises(ConfigError, match="fcn.upsampling 'bilinear'"):
        FCN(3, (4, 8), "bilinear")
    with pytest.raises(ValueError, match="multiples of 4"):
        FCN(3, (4, 8))(torch.randn(1, 3, 10, 12))


def test_metrics_of_a_hand_worked_confusion_matrix():
    truth = np.array([[0, 0, 0, 1], [1, 1, 255, 2]], np.uint8)
    predicted = np.array([[0, 0, 1, 1], [1, 0, 2, 2]], np.uint8)
    confusion = confusion_matrix(truth, predicted, 4)
    assert confusion.tolist() == [[2, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    metrics = segmentation_metrics(confusion)
    assert metrics["pixel_accuracy"] == pytest.approx(5 / 7)  # the void pixel is not counted
    assert metrics["accuracy"][:3] == pytest.approx([2 / 3, 2 / 3, 1.0]) and metrics["accuracy"][3] is None
    assert metrics["iou"][:3] == pytest.approx([2 / 4, 2 / 4, 1.0]) and metrics["iou"][3] is None
    assert metrics["mean_accuracy"] == pytest.approx(7 / 9)
    assert metrics["mean_iou"] == pytest.approx(2 / 3)


def test_a_label_predicted_but_absent_counts_as_iou_zero():
    metrics = segmentation_metrics(confusion_matrix(np.zeros((1, 4), np.uint8), np.array([[0, 0, 0, 3]]), 4))
    assert metrics["iou"] == [0.75, None, None, 0.0]
    assert metrics["mean_iou"] == pytest.approx(0.375)
    assert metrics["mean_accuracy"] == pytest.approx(0.75)


def test_the_reader_checks_masks(shapes_copy):
    dataset = VOCDataset(shapes_copy)
    image_id = dataset.segmentation_ids("test")[0]
    mask = dataset.read_segmentation(image_id)
    assert mask.shape == dataset.read_image(image_id).shape[:2]
    assert set(np.unique(mask)) <= {0, *range(1, len(dataset.classes) + 1), 255}
    Image.fromarray(np.full((4, 4), 9, np.uint8), mode="L").save(dataset.segmentation_path(image_id))
    with pytest.raises(BadInputError, match="is 4x4 but its annotation says"):
        dataset.read_segmentation(image_id)
    dataset.segmentation_path(image_id).unlink()
    with pytest.raises(BadInputError, match="segmentation mask is missing"):
        dataset.read_segmentation(image_id)


def tiny_training_set(shapes_root) -> SegmentationSet:
    return load_training_masks(VOCDataset(shapes_root), "train", "cpu")


@pytest.mark.parametrize("upsampling", UPSAMPLINGS)
def test_every_upsampling_trains_and_its_loss_goes_down(shapes_root, tmp_path, upsampling):
    training = tiny_training_set(shapes_root)
    params = {"crop_size": 64, "batch_size": 4, "augment": False}
    settings = SGDSettings(iterations=60, lr=0.05, momentum=0.9, weight_decay=0.0, step_every=1000, gamma=0.1,
                           seed=0, checkpoint_every=1000)
    model = FCN(7, (8, 16, 16), upsampling, skips=1)
    losses = train(model, random_crops(training, params), settings, tmp_path / "checkpoint", "cpu", threads=2,
                   loss_of=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], ignore_index=255)).losses
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_random_crops_pad_images_smaller_than_the_crop_with_void():
    image = torch.full((3, 150, 220), 200, dtype=torch.uint8)
    mask = np.zeros((150, 220), np.uint8)
    mask[:, :110] = 3
    training = SegmentationSet(["only"], [image], [mask])
    crops, masks = random_crops(training, {"crop_size": 200, "batch_size": 4, "augment": False})(
        np.random.default_rng(0))
    assert crops.shape == (4, 3, 200, 200) and masks.shape == (4, 200, 200) and masks.dtype == torch.int64
    assert (masks[:, 150:] == 255).all() and (crops[:, :, 150:] == 0).all()  # void, and the mean colour
    assert set(masks[:, :150].unique().tolist()) == {0, 3} and (crops[:, :, :150] > 0).all()
    for crop_mask in masks[:, :150]:  # each crop keeps its labels where its pixels are (flipped or not)
        assert {crop_mask[:, 0].unique().numel(), crop_mask[:, -1].unique().numel()} == {1}


def test_patches_are_centred_on_their_pixel():
    image = torch.zeros((3, 20, 30), dtype=torch.uint8)
    image[:, 7, 12] = 255
    patch = patches(image, np.array([7]), np.array([12]), 8)[0]
    assert patch.shape == (3, 8, 8)
    assert torch.nonzero(patch[0] == patch[0].max()).tolist() == [[4, 4]]


class CentreColour(torch.nn.Module):
    """Labels a patch 1 when its centre pixel is bright, else 0; counts the patches it sees."""
    def __init__(self):
        super().__init__()
        self.patches_seen = 0

    def forward(self, crops):
        self.patches_seen += len(crops)
        return torch.stack([-crops[:, 0, 2, 2], crops[:, 0, 2, 2]], dim=1)


def test_the_sliding_window_classifies_every_stride_th_pixel_and_fills_its_block():
    image = torch.zeros((3, 9, 10), dtype=torch.uint8)
    image[:, :4, :] = 255
    net = CentreColour()
    labels = segment_by_windows(net, image, patch_size=4, stride=2, batch_size=7)
    assert labels.shape == (9, 10) and net.patches_seen == 5 * 5
    assert (labels[:4] == 1).all() and (labels[4:] == 0).all()
    assert segment_by_windows(CentreColour(), image, patch_size=4, stride=1).tolist() == (image[0] > 0).int().tolist()


def test_the_sliding_window_at_half_scale_sees_a_quarter_of_the_pixels_and_answers_at_full_size():
    image = torch.zeros((3, 16, 20), dtype=torch.uint8)
    image[:, :8, :] = 255  # the top half bright
    net = CentreColour()
    labels = segment_by_windows(net, image, patch_size=4, stride=1, scale=0.5)
    assert labels.shape == (16, 20) and net.patches_seen == 8 * 10
    assert labels.tolist() == (image[0] > 0).int().tolist()


SEGMENTATION_TINY = ["pretrain.iterations=24", "pretrain.checkpoint_every=4", "fcn.iterations=30",
                     "fcn.checkpoint_every=10", "fcn.crop_size=64", "fcn.batch_size=4",
                     "fcn.channels=[8, 16, 16]", "pixel_classifier.iterations=30", "pixel_classifier.batch_size=32",
                     "fcn.baseline_images=2", "fcn.baseline_stride=4",
                     "fcn.images_per_shard=3", "fcn.pictures=2"]


def options(data, cache, reports, *sets):
    return rcnn_options(data, cache, reports, *SEGMENTATION_TINY, *sets)


@pytest.fixture(scope="module")
def fcn_run(shapes_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("fcn")
    with config_sealed_while_stages_run() as sealed_runs:
        assert main(["run", "--methods", "fcn", *options(shapes_root, work / "cache", work / "reports")]) == 0
    assert {"fcn-train", "pixel-classifier", "fcn-evaluate"} <= set(sealed_runs[0])
    return shapes_root, work / "cache", work / "reports"


@pytest.mark.slow
def test_fcn_stage_keeps_its_metrics_in_the_manifest_and_writes_a_report(fcn_run, capsys):
    data, cache, reports = fcn_run
    rows = status(data, cache, reports, capsys, *SEGMENTATION_TINY)
    metrics = rows["fcn-evaluate"]["metrics"]
    assert metrics["baseline_images"] == 2 and metrics["baseline_slowdown"] > 1
    assert set(metrics["iou"]) == {"background", "circle", "cross", "hexagon", "square", "star", "triangle"}
    present = [iou for iou in metrics["iou"].values() if iou is not None]
    assert metrics["mean_iou"] == pytest.approx(np.mean(present))
    report = reports / "demo" / "fcn-evaluate"
    table = (report / "segmentation.md").read_text()
    assert "| FCN, every test image |" in table and "sliding window (stride 4)" in table
    saved = json.loads((report / "segmentation.json").read_text())["fcn"]
    test_ids = (data / "ImageSets" / "Segmentation" / "test.txt").read_text().split()
    assert saved["images"] == len(test_ids)
    dataset = VOCDataset(data)
    labelled = sum(int((dataset.read_segmentation(image_id) != 255).sum()) for image_id in test_ids)
    assert np.sum(saved["confusion"]) == labelled  # every labelled test pixel counted once, void left out
    assert cv2.imread(str(report / "confusion.png")).shape[2] == 3
    assert len(list((report / "pictures").glob("*.png"))) == 2
    assert (reports / "demo" / "fcn-train" / "loss.png").is_file()


@pytest.mark.slow
def test_cached_fcn_recomputes_nothing_and_a_test_setting_keeps_the_training(fcn_run, capsys):
    data, cache, reports = fcn_run
    capsys.readouterr()
    assert main(["fcn-evaluate", *options(data, cache, reports)]) == 0
    assert " computed " not in capsys.readouterr().out
    assert main(["fcn-evaluate", *options(data, cache, reports, "fcn.baseline_images=1")]) == 0
    out = capsys.readouterr().out
    assert out.split("fcn-train", 1)[1].split()[0] == "cached"
    assert out.split("\nfcn-evaluate ", 1)[1].split()[0] == "computed"


@pytest.mark.slow
def test_killed_fcn_training_resumes_with_identical_weights(fcn_run, tmp_path, capsys):
    data, original_cache, reports = fcn_run
    key = status(data, original_cache, reports, capsys, *SEGMENTATION_TINY)["fcn-train"]["key"]
    assert_killed_training_resumes_identically("fcn-train", key, original_cache, tmp_path,
                                               lambda cache: options(data, cache, tmp_path / "reports"))
