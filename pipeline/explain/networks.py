"""Fast R-CNN's and Faster R-CNN's steps, drawn for one image (and the sliding window's): the conv feature map
of the whole image with one region projected onto it and its RoI pooling bins; Faster R-CNN's anchors at one
position, the RPN's objectness and its top proposals.

`compute` runs the detector itself (pipeline.detectors.detect, which hands over the resized image, the
feature maps and the proposals it pooled) and pools the chosen region with the model's own RoI pooling layer.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torchvision.ops import box_iou

from pipeline.detections import detection_rows
from pipeline.detectors import detect
from pipeline.explain.drawing import COLOURS, blend, draw_boxes, figure, figure_image, pooling_picture
from pipeline.explain.page import Explainer, Picture, Scene
from pipeline.explain.regions import final_detections, proposal_pictures
from pipeline.regions import image_tensor, normalised
from pipeline.roi import pooling_bins
from pipeline.sliding_window import detect_by_windows
from pipeline.timing import Clock

RPN_BOXES_SHOWN = 20


def network_arrays(models, rgb: np.ndarray, proposals: np.ndarray | None, params: Mapping, device: str) -> dict:
    """The detections, conv5's channel mean, one region (the one best overlapping the top detection) in image
    pixels and pooled by the model's RoI pooling layer, and for Faster R-CNN its RPN's outputs."""
    model, seen = models.model, {}
    given = [torch.from_numpy(proposals).to(device)] if proposals is not None else None
    rows = detection_rows(detect(model, [normalised(image_tensor(rgb, device))], given, Clock(device), seen)[0])
    image_list, features = seen["image_list"], seen["features"]
    resized = np.array(image_list.image_sizes[0], np.float32)  # (height, width) the transform resized to
    ratio = np.tile(resized[::-1] / np.array(rgb.shape[1::-1], np.float32), 2)  # image pixels -> resized pixels
    regions = seen["proposals"][0]
    pooler = model.roi_heads.box_roi_pool
    # RoIPooler pools at 1 / the trunk's stride; a pyramid's MultiScaleRoIAlign picks a level per region
    stride = 1.0 / pooler.spatial_scale if hasattr(pooler, "spatial_scale") else \
        image_list.tensors.shape[-1] / features["0"].shape[-1]
    # the map's cells over the image, not over the padding the transform adds to batch images
    inside = [int(np.ceil(side / stride)) for side in resized]
    arrays = {"detections": rows, "ratio": ratio, "stride": stride, "channels": features["0"].shape[1],
              "conv_summary": features["0"][0].mean(0)[:inside[0], :inside[1]].cpu().numpy(),
              "pooling": models.params.get("pooling", "roi_pool"),
              "feature_pyramid": bool(models.params.get("feature_pyramid", False)),
              "proposals": proposals if proposals is not None else np.zeros((0, 4), np.float32)}
    if len(regions):
        arrays.update(pooled_region(pooler, features, image_list, regions, rows, ratio))
    if proposals is None:
        arrays.update(rpn_arrays(model, image_list, features, regions, ratio, inside))
    return arrays


def pooled_region(pooler, features: dict, image_list, regions: torch.Tensor, rows: np.ndarray,
                  ratio: np.ndarray) -> dict:
    """One region (the one best overlapping the top detection, or the first when there is none) in image pixels,
    and its cells as the model's RoI pooling layer pools them (mean over channels)."""
    scaled = torch.from_numpy(rows[:1, :4] * ratio).to(regions.device)
    region = int(box_iou(regions, scaled).argmax()) if len(rows) else 0
    pooled = pooler(features, [regions[region:region + 1]], image_list.image_sizes)
    return {"pool_box": regions[region].cpu().numpy() / ratio, "pooled": pooled[0].mean(0).cpu().numpy(),
            "pool_of_detection": bool(len(rows))}


def rpn_arrays(model, image_list, features: dict, rpn_boxes: torch.Tensor, ratio: np.ndarray,
               inside: list[int]) -> dict:
    """The RPN on the finest map: the objectness of its best anchor at each position over the image, every
    anchor at the position scoring highest, and its top proposals, in image pixels."""
    maps = list(features.values())
    with torch.no_grad():
        objectness, _ = model.rpn.head(maps)
        anchors = model.rpn.anchor_generator(image_list, maps)[0]
    best = torch.sigmoid(objectness[0][0]).amax(0)  # [h, w], the padding included
    per_position, width = objectness[0].shape[1], best.shape[1]
    row, column = divmod(int(best[:inside[0], :inside[1]].flatten().argmax()), inside[1])
    position = row * width + column
    return {"objectness": best[:inside[0], :inside[1]].cpu().numpy(),
            "anchors": anchors[position * per_position:(position + 1) * per_position].cpu().numpy() / ratio,
            "anchor_cell": np.array([row, column]), "rpn_boxes": rpn_boxes[:RPN_BOXES_SHOWN].cpu().numpy() / ratio}


def sliding_window_arrays(models, rgb: np.ndarray, proposals, params: Mapping, device: str) -> dict:
    windows, rows = detect_by_windows(models.net, models.backbone, rgb, params, device)
    return {"windows": windows, "detections": rows}


def roi_pooling_picture(scene: Scene, method: str) -> list[Picture]:
    """conv5 of the whole image, one region projected onto it, its pooling grid and the pooled cells (none when
    the image has no region to pool)."""
    arrays = scene.arrays
    if "pooled" not in arrays:
        return []
    stride, box = float(arrays["stride"]), arrays["pool_box"] * arrays["ratio"]
    cells = arrays["pooled"]
    if arrays["feature_pyramid"]:  # MultiScaleRoIAlign picks a level per region: the grid is not drawn
        bins = (np.zeros((0, 2)), np.zeros((0, 2)))
        how = "a feature pyramid's RoIAlign, on the level it picks for the region (the finest level shown)"
    else:
        bins = pooling_bins(box, cells.shape[0], 1.0 / stride, str(arrays["pooling"]))
        how = {"roi_pool": "RoI max pooling", "roi_align": "RoIAlign"}[str(arrays["pooling"])]
    image = pooling_picture(arrays["conv_summary"], box / stride, [bins], [cells],
                            [f"{cells.shape[0]} x {cells.shape[1]} bins"])
    channels, (height, width) = int(arrays["channels"]), arrays["conv_summary"].shape
    region_w, region_h = (box[2:] - box[:2]) / stride
    which = "the one best overlapping the top detection" if arrays["pool_of_detection"] else "the first proposal"
    return [Picture("roi-pooling", "RoI pooling on the conv feature map", f"{method}: RoI pooling",
                   f"Hi-res conv features of the whole image, computed once: {channels} x {height} x {width} (the "
                   f"image resized so its shorter side is the model's min_size; shown: the mean over channels). One "
                   f"region (white: {which}) projected onto them at 1/{stride:g} "
                   f"of its pixels is {channels} x {region_h:.1f} x {region_w:.1f} (varies per proposal); {how} "
                   f"divides it into {cells.shape[0]} x {cells.shape[1]} bins (red), giving the RoI conv features "
                   f"{channels} x {cells.shape[0]} x {cells.shape[1]} (below, mean over channels) that the "
                   f"fully-connected layers expect.", image)]


def anchors_picture(scene: Scene) -> Picture:
    arrays = scene.arrays
    row, column = (int(value) for value in arrays["anchor_cell"])
    stride, ratio = float(arrays["stride"]), arrays["ratio"]
    centre = (int(column * stride / ratio[0]), int(row * stride / ratio[1]))
    drawn = draw_boxes(scene.rgb, arrays["anchors"], COLOURS["anchor"], 1)
    drawn[max(centre[1] - 2, 0):centre[1] + 3, max(centre[0] - 2, 0):centre[0] + 3] = COLOURS["anchor"]
    return Picture("anchors", "Anchors at one position", "Faster R-CNN: region proposal network, anchors",
                   f"The {len(arrays['anchors'])} anchors (every size and aspect ratio) at the feature-map position "
                   f"(row {row}, column {column}) where the RPN's objectness is highest; the RPN scores each anchor as "
                   f"object / not object and regresses it to a proposal.", drawn)


def objectness_picture(scene: Scene) -> Picture:
    arrays = scene.arrays
    drawn = figure(9, 3.6)
    axes = drawn.add_subplot(1, 2, 1)
    axes.imshow(arrays["objectness"], cmap="magma", vmin=0, vmax=1)
    axes.set_title("objectness (best anchor at each position)", fontsize=9)
    axes = drawn.add_subplot(1, 2, 2)
    faint = blend(scene.rgb, draw_boxes(scene.rgb, arrays["rpn_boxes"], COLOURS["proposal"], 2), 0.8)
    axes.imshow(faint)
    axes.set_title(f"the RPN's top {len(arrays['rpn_boxes'])} proposals", fontsize=9)
    for axis in drawn.axes:
        axis.set_xticks([])
        axis.set_yticks([])
    return Picture("rpn", "The RPN's objectness and its proposals", "Faster R-CNN: region proposal network",
                   "Left: the sigmoid of the RPN's objectness score, the best of the anchors at each position of the "
                   "conv feature map. Right: its best proposals after NMS, which the RoI head classifies and refines.",
                   figure_image(drawn))


def windows_picture(scene: Scene) -> Picture:
    windows = scene.arrays["windows"]
    sizes = np.sqrt(np.prod(windows[:, 2:] - windows[:, :2], axis=1))
    smallest = windows[np.isclose(sizes, sizes.min())]
    drawn = blend(scene.rgb, draw_boxes(scene.rgb, smallest, COLOURS["proposal"], 1), 0.6)
    return Picture("windows", "Every window", "Sliding window: classify every crop",
                   f"The {len(smallest)} windows of the smallest size (of {len(windows)} in all, every size and aspect "
                   f"ratio): each is warped and classified by the CNN, the cost region proposals avoid.", drawn)


def draw_fast_rcnn(scene: Scene) -> list[Picture]:
    return [*proposal_pictures(scene), *roi_pooling_picture(scene, "Fast R-CNN"),
            final_detections(scene, "Fast R-CNN", scene.arrays["detections"])]


def draw_faster_rcnn(scene: Scene) -> list[Picture]:
    return [anchors_picture(scene), objectness_picture(scene), *roi_pooling_picture(scene, "Faster R-CNN"),
            final_detections(scene, "Faster R-CNN", scene.arrays["detections"])]


def draw_sliding_window(scene: Scene) -> list[Picture]:
    return [windows_picture(scene), final_detections(scene, "Sliding window", scene.arrays["detections"])]


FAST_RCNN_EXPLAINER = Explainer("Fast R-CNN", network_arrays, draw_fast_rcnn)
FASTER_RCNN_EXPLAINER = Explainer("Faster R-CNN", network_arrays, draw_faster_rcnn)
SLIDING_WINDOW_EXPLAINER = Explainer("Sliding window", sliding_window_arrays, draw_sliding_window)
