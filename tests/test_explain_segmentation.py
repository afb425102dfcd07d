"""The FCN's explain pictures: the lecture's worked examples of upsampling, computed by the FCN's layers, and
each trained upsampling variant's mask beside the ground truth."""
import numpy as np
import torch

from pipeline.cli import build_parser, main, make_context
from pipeline.explain.segmentation import (
    TRANSPOSE_FILTER,
    explain_fcn,
    fcn_pictures,
    mask_panels,
    matrix_form_example,
    max_unpooling_example,
    trained_variants,
    transpose_convolution_example,
    unpooling_example,
    worked_example_pictures,
)
from pipeline.regions import image_tensor, normalised
from pipeline.segmentation import UPSAMPLINGS, build_fcn, predict_mask
from stages import REGISTRY

LABELS = ["background", "circle", "square"]


def test_unpooling_upsamples_the_lectures_two_by_two_by_nearest_neighbour_and_bed_of_nails():
    numbers = unpooling_example()
    assert numbers["input"].tolist() == [[1, 2], [3, 4]]
    assert numbers["nearest"].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    assert numbers["bed-of-nails"].tolist() == [[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]]


def test_max_unpooling_puts_the_decoders_values_where_the_paired_pool_found_the_maxima():
    numbers = max_unpooling_example()
    assert numbers["pooled"].tolist() == [[5, 6], [7, 8]]
    assert numbers["positions"].tolist() == [[5, 2], [12, 15]]  # flat indices of 5, 6, 7, 8 in the 4 x 4 input
    assert numbers["decoder input"].tolist() == [[1, 2], [3, 4]]
    assert numbers["unpooled"].tolist() == [[0, 0, 2, 0], [0, 1, 0, 0], [0, 0, 0, 0], [3, 0, 0, 4]]


def test_transpose_convolution_weights_a_filter_copy_by_each_input_two_apart_and_sums_the_overlaps():
    numbers = transpose_convolution_example()
    filter_ = np.array(TRANSPOSE_FILTER)
    for (row, column), contribution in numbers["contributions"].items():
        canvas = np.zeros((6, 6))  # the output before padding 1 cuts one row and column each side
        canvas[2 * row:2 * row + 3, 2 * column:2 * column + 3] = numbers["input"][row, column] * filter_
        assert contribution.tolist() == canvas[1:5, 1:5].tolist()
    assert numbers["output"].tolist() == [[4, 6, 8, 4], [8, 10, 12, 6], [12, 14, 16, 8], [6, 7, 8, 4]]
    assert numbers["output"].tolist() == sum(numbers["contributions"].values()).tolist()


def test_the_one_dimensional_transpose_convolution_is_the_convolution_matrix_transposed():
    (x, y, z), (a, b, c, d), (a2, b2) = (2.0, 3.0, 5.0), (1.0, 2.0, 3.0, 4.0), (1.0, 2.0)
    numbers = matrix_form_example((x, y, z), (a, b, c, d), (a2, b2))
    assert numbers["X"].tolist() == [[x, y, z, 0, 0, 0], [0, 0, x, y, z, 0]]
    assert numbers["X^T"].tolist() == numbers["X"].T.tolist()
    assert numbers["padded input"].tolist() == [0, a, b, c, d, 0]
    assert numbers["X a"].tolist() == numbers["convolution"].tolist() == [a * y + b * z, b * x + c * y + d * z]
    expected = [a2 * x, a2 * y, a2 * z + b2 * x, b2 * y, b2 * z, 0]
    assert numbers["X^T a"].tolist() == numbers["transpose convolution"].tolist() == expected
    assert numbers["transpose convolution, padding 1"].tolist() == expected[1:5]


def test_the_matrix_form_is_written_in_the_slides_letters():
    symbols = matrix_form_example()["symbols"]
    assert symbols["X"].tolist() == [["x", "y", "z", "0", "0", "0"], ["0", "0", "x", "y", "z", "0"]]
    assert symbols["X a"].tolist() == ["ay + bz", "bx + cy + dz"]
    assert symbols["X^T a"].tolist() == ["ax", "ay", "az + bx", "by", "bz", "0"]


def assert_rgb_picture(image):
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) > 100 and (image < 250).any()  # something drawn on the white


def test_the_worked_examples_are_drawn():
    pictures = worked_example_pictures()
    assert [p.name for p in pictures] == ["unpooling", "max-unpooling", "transpose-convolution",
                                          "transpose-convolution-1d"]
    for picture in pictures:
        assert_rgb_picture(picture.image)
        assert picture.title and picture.slide and picture.caption


def tiny_predictions(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Each upsampling's (untrained) FCN's labels for the image, predicted as fcn-evaluate does."""
    predictions = {}
    for kind in UPSAMPLINGS:
        torch.manual_seed(0)
        params = {"encoder": "scratch", "channels": [4, 8], "upsampling": kind, "downsampling": "max-pool",
                  "skips": 1}
        model = build_fcn(params, len(LABELS) - 1, None).eval()
        predictions[kind] = predict_mask(model, normalised(image_tensor(rgb, "cpu")), 0.5).numpy()
    return predictions


def test_fcn_pictures_draw_one_panel_per_variant_beside_the_truth():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    truth = np.zeros((40, 56), np.uint8)
    truth[8:24, 10:30], truth[30:, :] = 1, 255  # a circle's pixels and a void strip
    predictions = tiny_predictions(rgb)
    assert all(mask.shape == (40, 56) for mask in predictions.values())
    panels = mask_panels(rgb, truth, predictions, LABELS)
    assert [title.split("\n")[0] for title, _ in panels] == ["image", "ground truth", *UPSAMPLINGS]
    assert all("mean IoU" in title for title, _ in panels[2:])
    assert [title for title, _ in mask_panels(rgb, None, predictions, LABELS)] == ["image", *UPSAMPLINGS]
    pictures = fcn_pictures(rgb, truth, predictions, LABELS)
    assert len(pictures) == 1
    assert_rgb_picture(pictures[0].image)


FCN_TINY = ["fcn.encoder=scratch", "fcn.channels=[4, 8]", "fcn.iterations=2", "fcn.checkpoint_every=1",
            "fcn.crop_size=32", "fcn.batch_size=2"]


def test_explain_fcn_runs_only_the_trained_variants(shapes_root, tmp_path):
    options = ["--data", str(shapes_root), "--cache", str(tmp_path / "cache"), "--reports", str(tmp_path / "reports"),
               "--device", "cpu", *(item for value in FCN_TINY for item in ("--set", value))]
    assert main(["fcn-train", *options, "--set", "fcn.upsampling=nearest"]) == 0
    run = make_context(build_parser().parse_args(["status", *options]))  # the config names transpose-conv
    assert list(trained_variants(run, REGISTRY)) == ["nearest"]
    image_id = run.dataset.segmentation_ids(run.splits["test"])[0]
    rgb, truth = run.dataset.read_image(image_id), run.dataset.read_segmentation(image_id)
    title, pictures = explain_fcn(run, REGISTRY, rgb, truth)
    assert title and [p.name for p in pictures][-1] == "upsampling-variants" and len(pictures) == 5
    assert_rgb_picture(pictures[-1].image)


def test_without_a_trained_variant_only_the_worked_examples_are_drawn(shapes_root, tmp_path):
    run = make_context(build_parser().parse_args(["status", "--data", str(shapes_root), "--cache",
                                                  str(tmp_path / "cache")]))
    rgb = np.zeros((32, 32, 3), np.uint8)
    assert [p.name for p in explain_fcn(run, REGISTRY, rgb, None)[1]] == [p.name for p in worked_example_pictures()]
