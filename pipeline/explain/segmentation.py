"""The FCN's pictures for `rcnn explain`: the lecture's worked examples of in-network upsampling, computed by
the FCN's own layers, and the prediction of every trained upsampling variant on the user's image.

    explain_fcn(run, registry, rgb, truth)   the section's title and pictures: the four worked examples, then
                                             each trained variant's mask beside the ground truth

The worked examples (slides "In-Network upsampling: Unpooling", "... Max Unpooling", "Learnable Upsampling:
Transpose Convolution", "Convolution as Matrix Multiplication (1D Example)") each have a function returning
their numbers and one drawing them; the numbers come from pipeline.segmentation.upsampler and the max-pool
the FCN pairs with its max-unpool, never from a second implementation drawn to look right.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from matplotlib.patches import Patch
from torch import nn

from pipeline.engine.cache import StageCache
from pipeline.engine.runner import RunContext, plan_stages
from pipeline.explain.drawing import figure, figure_image
from pipeline.explain.page import Picture
from pipeline.regions import image_tensor, normalised
from pipeline.reports import mask_palette, overlay_mask
from pipeline.segmentation import (
    FCN,
    UPSAMPLINGS,
    VOID,
    confusion_matrix,
    load_fcn,
    predict_mask,
    segmentation_metrics,
    upsampler,
)

log = logging.getLogger(__name__)
TITLE = "Semantic segmentation: FCN upsampling"
UPSAMPLE_INPUT = [[1.0, 2.0], [3.0, 4.0]]  # the slides' 2 x 2 input (and the max-unpooling's decoder input)
POOL_INPUT = [[1.0, 2.0, 6.0, 3.0], [3.0, 5.0, 2.0, 1.0], [1.0, 2.0, 2.0, 1.0], [7.0, 3.0, 4.0, 8.0]]
# 4x the bilinear kernel FCN (§3.3) initialises its upsampling with: integers, and each input's weight shows
TRANSPOSE_FILTER = [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
CELL_INCHES = 0.5  # the side of a number's cell in the pictures of grids
PRODUCT_WIDTH = 3  # cells of a written-out product ("bx + cy + dz = 33") are this many times as wide
KERNEL_NAMES, SIGNAL_NAMES, UPSAMPLED_NAMES = ("x", "y", "z"), ("a", "b", "c", "d"), ("a", "b")


def explain_fcn(run: RunContext, registry: dict, rgb: np.ndarray,
                truth: np.ndarray | None) -> tuple[str, list[Picture]]:
    """The FCN's section of an image's explain page: its title, the worked examples, and (when any upsampling
    variant is trained) their masks for `rgb` beside the ground truth `truth` (uint8[H, W] or None).
    `registry`: the stage registry (stages.REGISTRY, which only the CLI imports)."""
    variants = trained_variants(run, registry)
    if len(variants) < len(UPSAMPLINGS):
        log.info("fcn: not trained with upsampling %s (rcnn run --methods fcn --set fcn.upsampling=...)",
                 ", ".join(kind for kind in UPSAMPLINGS if kind not in variants))
    predictions = predicted_masks(rgb, variants, run.device)
    pictures = worked_example_pictures()
    if predictions:
        pictures += fcn_pictures(rgb, truth, predictions, ["background", *run.dataset.classes])
    return TITLE, pictures


def worked_example_pictures() -> list[Picture]:
    """The lecture's four worked examples of upsampling, in the slides' order."""
    return [unpooling_picture(), max_unpooling_picture(), transpose_convolution_picture(), matrix_form_picture()]


# ---- the trained variants -------------------------------------------------------------------------
def trained_variants(run: RunContext, registry: dict) -> dict[str, StageCache]:
    """upsampling -> the complete fcn-train output of the run's config with fcn.upsampling set to it (the
    variants `rcnn run --methods fcn --set fcn.upsampling=...` trained); those not trained are left out."""
    variants = {}
    for kind in UPSAMPLINGS:
        config = {**run.config, "fcn": {**run.config["fcn"], "upsampling": kind}}
        plan = plan_stages(["fcn-train"], registry, replace(run, config=config))[-1]
        if plan.cache.is_complete():
            variants[kind] = plan.cache
    return variants


def predicted_masks(rgb: np.ndarray, variants: dict[str, StageCache], device: str) -> dict[str, np.ndarray]:
    """upsampling -> the label uint8[H, W] of every pixel of `rgb`, as fcn-evaluate predicts it (at the scale
    the variant was trained at, which fcn-evaluate's key shares with it)."""
    masks = {}
    for kind, cache in variants.items():
        model, params = load_fcn(cache, device)
        masks[kind] = predict_mask(model, normalised(image_tensor(rgb, device)), params["scale"]).cpu().numpy()
    return masks


def fcn_pictures(rgb: np.ndarray, truth: np.ndarray | None, predictions: dict[str, np.ndarray],
                 labels: list[str]) -> list[Picture]:
    """One picture: the image, the ground truth and each upsampling variant's prediction, overlaid in the VOC
    colours (slide "Semantic Segmentation Idea: Fully Convolutional"); each titled with its mean IoU."""
    panels = mask_panels(rgb, truth, predictions, labels)
    drawn = figure(2.8 * len(panels) + 1.6, 2.8 * rgb.shape[0] / rgb.shape[1] + 0.8)
    for index, (title, image) in enumerate(panels):
        axes = drawn.add_subplot(1, len(panels), index + 1)
        axes.imshow(image)
        axes.set_title(title, fontsize=9)
        axes.axis("off")
    shown = [mask for mask in (truth, *predictions.values()) if mask is not None]
    axes.legend(handles=label_patches(shown, labels), loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    truth_said = "its ground truth" if truth is not None else "no ground truth (the image has no mask)"
    caption = (f"The image, {truth_said}, and the label the FCN trained with each upsampling "
               f"({', '.join(predictions)}) gives every pixel, blended over the image in the VOC colours (legend), "
               "with its mean IoU on this image when there is a truth; void pixels are not scored.")
    return [Picture("upsampling-variants", "Every trained upsampling, on this image",
                    "Semantic Segmentation Idea: Fully Convolutional", caption, figure_image(drawn))]


def mask_panels(rgb: np.ndarray, truth: np.ndarray | None, predictions: dict[str, np.ndarray],
                labels: list[str]) -> list[tuple[str, np.ndarray]]:
    """(title, RGB) of each panel of fcn_pictures: the image, the truth when there is one, each prediction."""
    panels = [("image", rgb)] + ([("ground truth", overlay_mask(rgb, truth))] if truth is not None else [])
    for kind, mask in predictions.items():
        score = "" if truth is None else (
            f"\nmean IoU {segmentation_metrics(confusion_matrix(truth, mask, len(labels)))['mean_iou']:.2f}")
        panels.append((f"{kind}{score}", overlay_mask(rgb, mask)))
    return panels


def label_patches(masks: list[np.ndarray], labels: list[str]) -> list[Patch]:
    """A legend entry in its VOC colour for each label (and void) some mask holds."""
    present = sorted(set().union(*(np.unique(mask).tolist() for mask in masks)))
    names = {**dict(enumerate(labels)), VOID: "void"}
    return [Patch(color=mask_palette()[label] / 255, label=names.get(label, str(label))) for label in present]


# ---- the worked examples: numbers ----------------------------------------------------------------
def as_map(values) -> torch.Tensor:
    """A 2-D grid of numbers as the [1, 1, H, W] map a layer takes."""
    return torch.tensor(values, dtype=torch.float32)[None, None]


def grid(map_: torch.Tensor) -> np.ndarray:
    return map_[0, 0].detach().numpy()


def unpooling_example() -> dict[str, np.ndarray]:
    """Slide "In-Network upsampling: Unpooling": the 2 x 2 input, upsampled to 4 x 4 by nearest neighbour and
    by bed of nails (the FCN's upsampler of each)."""
    seen = as_map(UPSAMPLE_INPUT)
    return {"input": grid(seen), "nearest": grid(upsampler("nearest", 1)(seen)),
            "bed-of-nails": grid(upsampler("bed-of-nails", 1)(seen))}


def max_unpooling_example() -> dict[str, np.ndarray]:
    """Slide "In-Network upsampling: Max Unpooling": the encoder's 2 x 2 max-pool of the 4 x 4 input, the
    positions it remembers (flat indices into the 4 x 4 map), and the paired max-unpool putting the decoder's
    2 x 2 values back at those positions. Pool and unpool are those of a one-level max-unpool FCN."""
    paired = FCN(1, (1,), upsampling="max-unpool", downsampling="max-pool")
    pool, unpool = paired.downsample[0], paired.upsample[0]
    pooled, positions = pool(as_map(POOL_INPUT))
    decoded = as_map(UPSAMPLE_INPUT)
    return {"input": np.array(POOL_INPUT, np.float32), "pooled": grid(pooled), "positions": grid(positions),
            "decoder input": grid(decoded), "unpooled": grid(unpool(decoded, positions))}


def transpose_convolution_example(filter_=TRANSPOSE_FILTER) -> dict:
    """Slide "Learnable Upsampling: Transpose Convolution" (3 x 3, stride 2, pad 1): the FCN's transpose-conv
    layer with `filter_` (no bias) on the 2 x 2 input. Each input value weights a copy of the filter placed
    2 output pixels from its neighbours' (`contributions`, (row, column) -> 4 x 4, the layer run on that value
    alone); where copies overlap they sum into `output`."""
    layer = transpose_layer(filter_)
    seen = as_map(UPSAMPLE_INPUT)
    contributions = {}
    for row, column in np.ndindex(seen.shape[-2:]):
        alone = torch.zeros_like(seen)
        alone[..., row, column] = seen[..., row, column]
        contributions[row, column] = grid(layer(alone))
    return {"input": grid(seen), "filter": np.array(filter_, np.float32), "contributions": contributions,
            "output": grid(layer(seen))}


def transpose_layer(filter_) -> nn.ConvTranspose2d:
    """pipeline.segmentation's transpose-conv upsampler on one channel, its weights set to `filter_`."""
    layer = upsampler("transpose-conv", 1)
    with torch.no_grad():
        layer.weight.copy_(as_map(filter_))
        layer.bias.zero_()
    return layer


def matrix_form_example(kernel=(2.0, 3.0, 5.0), signal=(1.0, 2.0, 3.0, 4.0), upsampled=(1.0, 2.0)) -> dict:
    """Slides "Convolution as Matrix Multiplication (1D Example)", kernel size 3, stride 2, padding 1: the
    convolution of the padded `signal` (0, a, b, c, d, 0) with kernel (x, y, z) is X times it, X (2 x 6) the
    matrix of the convolution (column j: the convolution of the j-th unit vector); the transpose convolution
    of `upsampled` (a, b) with the same kernel is X^T times it (6 values). Numbers, and (`symbols`) the
    slides' letters in the same places, found by the same layers run on unit kernels."""
    padded = nn.functional.pad(torch.tensor(signal), (1, 1))
    X = convolution_matrix(kernel, len(padded))
    smaller = torch.tensor(upsampled)
    with torch.no_grad():
        convolved = conv1d(kernel, padding=1)(torch.tensor(signal)[None, None])[0, 0]
        # padding 0: the slides' X^T a whole; the FCN's padding 1 (output padding 1) drops the padding's rows
        transposed = {padding: transpose_conv1d(kernel, padding)(smaller[None, None])[0, 0] for padding in (0, 1)}
    return {"X": X.numpy(), "padded input": padded.numpy(), "X a": (X @ padded).numpy(),
            "convolution": convolved.numpy(), "X^T": X.T.numpy(), "transposed input": smaller.numpy(),
            "X^T a": (X.T @ smaller).numpy(), "transpose convolution": transposed[0].numpy(),
            "transpose convolution, padding 1": transposed[1].numpy(), "symbols": matrix_form_symbols(len(padded))}


def conv1d(kernel, padding: int) -> nn.Conv1d:
    layer = nn.Conv1d(1, 1, len(kernel), stride=2, padding=padding, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(kernel).view(1, 1, -1))
    return layer


def transpose_conv1d(kernel, padding: int) -> nn.ConvTranspose1d:
    """The 1-D transpose convolution of `kernel`, stride 2, output padding 1 (as the FCN's 2-D one)."""
    layer = nn.ConvTranspose1d(1, 1, len(kernel), stride=2, padding=padding, output_padding=1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(kernel).view(1, 1, -1))
    return layer


def convolution_matrix(kernel, length: int) -> torch.Tensor:
    """X: the stride-2 convolution (no padding) of a `length`-long vector with `kernel`, as a matrix."""
    layer = conv1d(kernel, padding=0)
    with torch.no_grad():
        return torch.stack([layer(unit[None, None])[0, 0] for unit in torch.eye(length)], dim=1)


def matrix_form_symbols(length: int) -> dict[str, np.ndarray]:
    """The slides' X, X^T, padded input and both products in letters: X's entries are found by convolving
    with each unit kernel (x = (1, 0, 0), ...), so each entry is named by the kernel weight it multiplies."""
    X = np.full((2, length), "0", dtype=object)
    for index, name in enumerate(KERNEL_NAMES):
        X[convolution_matrix(np.eye(len(KERNEL_NAMES), dtype=np.float32)[index], length).numpy() == 1] = name
    padded = np.array(["0", *SIGNAL_NAMES, "0"], dtype=object)
    return {"X": X, "padded input": padded, "X a": products(X, padded), "X^T": X.T,
            "transposed input": np.array(UPSAMPLED_NAMES, dtype=object), "X^T a": products(X.T, UPSAMPLED_NAMES)}


def products(matrix: np.ndarray, vector) -> np.ndarray:
    """matrix times vector written out in letters: "ay + bz" (the vector's letter first, as the slides)."""
    return np.array([" + ".join(f"{value}{weight}" for weight, value in zip(row, vector) if "0" not in (weight, value))
                     or "0" for row in matrix], dtype=object)


# ---- the worked examples: pictures ---------------------------------------------------------------
def unpooling_picture() -> Picture:
    """The 2 x 2 input beside its nearest-neighbour and bed-of-nails 4 x 4 upsamplings."""
    numbers = unpooling_example()
    image = grids_in_a_row([(numbers["input"], "input 2 x 2"), (numbers["nearest"], "nearest neighbour 4 x 4"),
                            (numbers["bed-of-nails"], "bed of nails 4 x 4")])
    return Picture("unpooling", "Unpooling: nearest neighbour and bed of nails", 'In-Network upsampling: "Unpooling"',
                   "The FCN's nearest upsampling copies each value into its 2 x 2 block; bed of nails puts it at the "
                   "block's top left and zeros elsewhere (shaded: the cells that hold a value).", image)


def max_unpooling_picture() -> Picture:
    """Max pooling with its remembered positions, and max unpooling of the decoder's values to them."""
    numbers = max_unpooling_example()
    maxima = np.isin(np.arange(16).reshape(4, 4), numbers["positions"])
    positions = np.array([f"{int(p)} ({int(p) // 4},{int(p) % 4})" for p in numbers["positions"].flat]).reshape(2, 2)
    image = grids_in_a_row([(numbers["input"], "max pool: input 4 x 4", maxima),
                            (numbers["pooled"], "output 2 x 2"), (positions, "positions\nremembered"),
                            (numbers["decoder input"], "max unpool:\ninput 2 x 2"),
                            (numbers["unpooled"], "output 4 x 4", maxima)])
    return Picture("max-unpooling", "Max unpooling: the positions come from the paired max pool",
                   'In-Network upsampling: "Max Unpooling"',
                   "The FCN's 2 x 2 max pool keeps each block's maximum and remembers where it was (flat index, row "
                   "and column); the paired max unpool of the decoder puts each value back at that position, zeros "
                   "elsewhere (shaded: the maxima's positions).", image)


def transpose_convolution_picture() -> Picture:
    """Each input value weighting the filter, the copies 2 apart, and their sum: the 4 x 4 output."""
    numbers = transpose_convolution_example()
    copies = [(contribution, f"{numbers['input'][position]:g} x filter") for position, contribution
              in numbers["contributions"].items()]
    image = grids_in_a_row([(numbers["input"], "input 2 x 2"), (numbers["filter"], "filter 3 x 3"), *copies,
                            (numbers["output"], "output 4 x 4: sum")])
    return Picture("transpose-convolution", "Transpose convolution: the input weights the filter, overlaps sum",
                   "Learnable Upsampling: Transpose Convolution",
                   "The FCN's 3 x 3 transpose convolution, stride 2, pad 1 (output padding 1), with a fixed filter: "
                   "each input value gives the weight of a copy of the filter, the copies placed 2 output pixels "
                   "apart (padding 1 cuts their first row and column); where they overlap they sum.", image)


def matrix_form_picture() -> Picture:
    """X a (the strided convolution) and X^T a (the transpose convolution), in letters and numbers."""
    numbers = matrix_form_example()
    symbols = numbers["symbols"]

    def cells(name):
        return [f"{letters} = {value:g}" if letters != "0" else "0"
                for letters, value in zip(symbols[name], numbers[name])]

    drawn = figure(7.5, 8.4)
    rows = drawn.add_gridspec(2, 3, width_ratios=[6, 1, PRODUCT_WIDTH])
    products_drawn = [("X", "padded input", "X a"), ("X^T", "transposed input", "X^T a")]
    for row, (matrix, vector, product) in enumerate(products_drawn):
        for column, (values, title) in enumerate([(symbols[matrix], matrix), (symbols[vector], "a"),
                                                  (np.array(cells(product), dtype=object), f"= {product}")]):
            draw_grid(drawn.add_subplot(rows[row, column]), as_column(values), title,
                      cell_width=PRODUCT_WIDTH if column == 2 else 1)
    drawn.suptitle(f"kernel size 3, stride 2, padding 1: x, y, z = {listed(numbers['X'][0, :3])}\n"
                   f"top a, b, c, d = {listed(numbers['padded input'][1:-1])}; "
                   f"bottom a, b = {listed(numbers['transposed input'])}", fontsize=10)
    return Picture("transpose-convolution-1d", "Transpose convolution is the convolution's matrix, transposed",
                   "Convolution as Matrix Multiplication (1D Example)",
                   "Top: the convolution of a = (0, a, b, c, d, 0) (padding 1) with kernel (x, y, z), stride 2, is the "
                   "matrix X times a. Bottom: the transpose convolution of a = (a, b) with the same kernel is X^T "
                   "times it. X is found by running torch's Conv1d on unit vectors; ConvTranspose1d with the same "
                   "weights gives X^T a (with the FCN's padding 1 and output padding 1, all but its first and last "
                   "value, the padding's). With stride > 1 it is no longer a normal convolution.",
                   figure_image(drawn))


def listed(values) -> str:
    return ", ".join(f"{value:g}" for value in values)


def as_column(values: np.ndarray) -> np.ndarray:
    return values.reshape(-1, 1) if values.ndim == 1 else values


def grids_in_a_row(grids: list[tuple]) -> np.ndarray:
    """Grids of numbers side by side, each (values, title) or (values, title, shaded cells)."""
    heights, widths = zip(*(np.shape(values) for values, *_ in grids))
    # the figure in proportion to the grids' rows and columns: every grid's cells come out the same size
    drawn = figure(CELL_INCHES * sum(widths) + 0.4 * len(grids), CELL_INCHES * max(heights) + 0.7)
    panels = drawn.subplots(1, len(grids), gridspec_kw={"width_ratios": widths})
    for axes, (values, title, *shaded) in zip(panels, grids):
        draw_grid(axes, np.asarray(values), title, shaded[0] if shaded else None)
    return figure_image(drawn)


def draw_grid(axes, values: np.ndarray, title: str, shaded: np.ndarray | None = None, cell_width: float = 1) -> None:
    """A grid of numbers (or letters), one per cell, each cell_width times as wide as high; shaded: the cells
    to tint (default: those not zero)."""
    if shaded is None:
        shaded = np.array([[str(value) not in ("0", "0.0") for value in row] for row in values])
    rows, columns = values.shape
    axes.imshow(np.asarray(shaded, float), cmap="Blues", vmin=0, vmax=2.5,
                extent=(0, columns * cell_width, rows, 0))
    for (row, column), value in np.ndenumerate(values):
        axes.text((column + 0.5) * cell_width, row + 0.5,
                  f"{value:g}" if isinstance(value, (float, np.floating)) else str(value),
                  ha="center", va="center", fontsize=9)
    axes.set_xticks(np.arange(columns + 1) * cell_width)
    axes.set_yticks(np.arange(rows + 1))
    axes.grid(color="grey", linewidth=0.8)
    axes.tick_params(length=0, labelbottom=False, labelleft=False)
    axes.set_title(title, fontsize=9)
