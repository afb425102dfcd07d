"""Region proposals: the class-agnostic boxes R-CNN, SPP-net and Fast R-CNN score (R-CNN §2.1).

`proposals.method` picks a ProposalMethod, registered where it is defined (`register_proposal_method`):
its function takes an RGB image and the proposals params and returns rectangles (x, y, w, h) in rank order,
best first, and it names the proposals.* options it reads besides the common ones (COMMON_OPTIONS), so that
a key covers exactly what its method reads (`proposal_params`). `propose` wraps any of them the same way: a
larger image is searched at `search_side`, the boxes are scaled back, rounded, clipped, small and duplicate
boxes dropped, near-duplicates moved back (`near_duplicate_iou`, below), and the first `max_proposals` kept.
To add a method: docs/development.md.

selective-search, `proposals.mode`:
  rcnn-fast       R-CNN's "fast" selective search: HSV and Lab images, graph segmentations with
                  k = 50 and 100 (min size = k, sigma 0.8), strategies colour+texture+size+fill and
                  texture+size+fill (Uijlings et al. 2013, Table 5), built from ximgproc's lower-level
                  calls. OpenCV's own fast preset differs: it runs k = 150, 300, 450.
  opencv-fast     ximgproc's switchToSelectiveSearchFast(), as OpenCV ships it.
  opencv-quality  ximgproc's switchToSelectiveSearchQuality(), as OpenCV ships it.
Determinism: OpenCV ranks regions with an unseeded libc rand(), so its output order changes from run
to run and thread to thread, while the *set* of boxes does not. We therefore keep the set and rank it
ourselves: first by how many segmentations produced the box (boxes that several colour spaces and
scales agree on are likelier objects), then by a hash of the box's coordinates, a fixed stand-in for
selective search's random diversification.

Near-duplicates: 99 % of the boxes of a photo come from one segmentation only, so the votes rarely decide
and the rank is mostly that hash, and many boxes differ from another by a few pixels. A cap then spends
part of its budget on near-copies of boxes it already has while other objects get none. With
`near_duplicate_iou` below 1, a box overlapping a better-ranked box by more than that IoU moves behind
every box that does not (greedy NMS over the rank order, whose suppressed boxes are kept, in order, after
the survivors): the set is the same, the count under the cap too, but the first boxes cover more of the image.
"""
from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from torchvision.ops import nms

from pipeline.boxes import clip_boxes, drop_small_and_duplicates
from pipeline.engine.cache import StageCache, content_digest
from pipeline.engine.config import register_neutral_option
from pipeline.engine.errors import ConfigError
from pipeline.engine.schema import register_check, register_choices

SELECTIVE_SEARCH_MODES = ("rcnn-fast", "opencv-fast", "opencv-quality")
RCNN_FAST_COLOUR_SPACES = (cv2.COLOR_RGB2HSV, cv2.COLOR_RGB2Lab)
RCNN_FAST_KS = (50, 100)
RCNN_FAST_SIGMA = 0.8


@dataclass(frozen=True)
class ProposalMethod:
    name: str                                                          # proposals.method
    rectangles: Callable[[np.ndarray, Mapping], list]                  # (rgb, params) -> ranked (x, y, w, h)
    options: tuple[str, ...] = ()                                      # the proposals.* keys it reads of its own
    title: Callable[[Mapping], str] = lambda params: params["method"]  # for reports: what ran, with what
    files: Callable[[Mapping], list[str]] = lambda params: []          # files it reads (a model): their bytes


# what `propose` reads of every method's params, and the proposals stage's own settings
COMMON_OPTIONS = ("method", "search_side", "min_size", "max_proposals", "near_duplicate_iou", "recall_at",
                  "images_per_shard")
PROPOSAL_METHODS: dict[str, ProposalMethod] = {}
register_choices("proposals.method", PROPOSAL_METHODS)
register_neutral_option("proposals.near_duplicate_iou", 1.0)  # added later: 1 moves no box


def register_proposal_method(method: ProposalMethod) -> ProposalMethod:
    PROPOSAL_METHODS[method.name] = method
    return method


def proposal_params(config: Mapping) -> dict:
    """The proposals section as the chosen method reads it: the common options and its own, no other
    method's (they would change its key without changing its boxes)."""
    method = PROPOSAL_METHODS[config["proposals"]["method"]]
    return {name: value for name, value in config["proposals"].items()
            if name in COMMON_OPTIONS or name in method.options}


def proposal_files_digests(params: Mapping) -> dict:
    """What the key of a stage that runs `propose` holds beyond its params: the digest of every file its
    method reads (none for selective search)."""
    files = PROPOSAL_METHODS[params["method"]].files(params)
    return {"proposal_files_sha256": {name: content_digest(name) for name in files}} if files else {}


def proposal_title(params: Mapping) -> str:
    """e.g. 'selective search (rcnn-fast)'."""
    return PROPOSAL_METHODS[params["method"]].title(params)


def propose(rgb: np.ndarray, params: Mapping) -> np.ndarray:
    """Ranked proposals float32[N, 4] (x1, y1, x2, y2) in the image's own pixels, N <= max_proposals.

    An image whose longer side exceeds `search_side` is shrunk to it first (0: never; selective search's
    time grows with the pixels, so a 6000 x 4000 photo would take minutes); boxes are scaled back, rounded
    to whole pixels, clipped, and those narrower or shorter than `min_size` pixels, degenerate boxes and
    duplicates are dropped, and near-duplicates moved back (module docstring).
    """
    height, width = rgb.shape[:2]
    scale = search_scale(width, height, params["search_side"])
    if scale != 1.0:
        rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    rects = PROPOSAL_METHODS[params["method"]].rectangles(rgb, params)
    boxes = np.array([(x, y, x + w, y + h) for x, y, w, h in rects], np.float32).reshape(-1, 4) / scale
    boxes = clip_boxes(np.round(boxes), width, height)
    boxes = drop_small_and_duplicates(boxes, params["min_size"])
    return defer_near_duplicates(boxes, params["near_duplicate_iou"])[:params["max_proposals"]]


def defer_near_duplicates(boxes: np.ndarray, iou: float) -> np.ndarray:
    """boxes[N, 4] in rank order, re-ranked: each overlapping a better-ranked survivor by more than `iou` goes
    behind all survivors, the moved ones keeping their order. iou 1: unchanged (no two distinct boxes overlap more)."""
    if iou >= 1 or len(boxes) < 2:
        return boxes

    ranks = torch.arange(len(boxes), 0, -1, dtype=torch.float32)  # nms keeps the highest score: the best rank
    survivors = nms(torch.from_numpy(boxes), ranks, iou).numpy()  # in rank order
    moved = np.setdiff1d(np.arange(len(boxes)), survivors)        # sorted: in rank order
    return boxes[np.concatenate([survivors, moved])]


def search_scale(width: int, height: int, search_side: int) -> float:
    """The factor an image is searched at: 1, or less when its longer side exceeds search_side (> 0)."""
    return min(1.0, search_side / max(width, height)) if search_side else 1.0


def selective_search(rgb: np.ndarray, params: Mapping) -> list[tuple[int, int, int, int]]:
    """Selective-search rectangles (x, y, w, h), ranked (see the module docstring)."""
    return rank_rects(selective_search_votes(rgb, params["mode"]))


def selective_search_votes(rgb: np.ndarray, mode: str) -> Counter:
    """Selective-search rectangles (x, y, w, h) -> how many segmentations produced each."""
    segmentation = cv2.ximgproc.segmentation
    votes = Counter()
    if mode == "rcnn-fast":
        for colour_space in RCNN_FAST_COLOUR_SPACES:
            for k in RCNN_FAST_KS:
                search = segmentation.createSelectiveSearchSegmentation()
                search.addImage(cv2.cvtColor(rgb, colour_space))
                search.addGraphSegmentation(segmentation.createGraphSegmentation(RCNN_FAST_SIGMA, float(k), k))
                search.addStrategy(_strategy(colour=True))
                search.addStrategy(_strategy(colour=False))
                votes.update({tuple(int(v) for v in rect) for rect in search.process()})
        return votes
    search = segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if mode == "opencv-fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    votes.update({tuple(int(v) for v in rect) for rect in search.process()})
    return votes


def _strategy(colour: bool):
    """Selective search's merge similarity: (colour +) texture + size + fill."""
    segmentation = cv2.ximgproc.segmentation
    parts = [segmentation.createSelectiveSearchSegmentationStrategyTexture(),
             segmentation.createSelectiveSearchSegmentationStrategySize(),
             segmentation.createSelectiveSearchSegmentationStrategyFill()]
    if colour:
        parts.insert(0, segmentation.createSelectiveSearchSegmentationStrategyColor())
    return segmentation.createSelectiveSearchSegmentationStrategyMultiple(*parts)


def rank_rects(votes: Counter) -> list[tuple[int, int, int, int]]:
    """Most votes first; ties broken by a hash of the coordinates (stable across runs and machines)."""
    def key(rect):
        return -votes[rect], hashlib.blake2b(np.asarray(rect, np.int32).tobytes(), digest_size=8).digest()
    return sorted(votes, key=key)


register_proposal_method(ProposalMethod("selective-search", selective_search, options=("mode",),
                                        title=lambda params: f"selective search ({params['mode']})"))
register_choices("proposals.mode", SELECTIVE_SEARCH_MODES)


def edge_boxes(rgb: np.ndarray, params: Mapping) -> list[tuple[int, int, int, int]]:
    """EdgeBoxes (Zitnick and Dollar, ECCV 2014) through OpenCV's ximgproc: boxes scored by how many edge
    contours lie wholly inside them, best first. The edge map is the structured forest's of the model file
    `proposals.edge_model` names (OpenCV's samples use opencv_extra's model.yml.gz), or without one (""),
    Canny's thinned edges of the Lab image weighted by their gradient magnitude, with the gradient's direction
    as orientation: no learnt edges, so fewer object contours stand out (the report says which ran)."""
    edges, orientation = (structured_edges(rgb, params["edge_model"]) if params["edge_model"]
                          else gradient_edges(rgb))
    # a new object per image: one reused keeps state between calls and returns other boxes the second time
    search = cv2.ximgproc.createEdgeBoxes(maxBoxes=4 * params["max_proposals"],
                                          minBoxArea=float(params["min_size"] ** 2))
    rects, _scores = search.getBoundingBoxes(edges, orientation)
    return [tuple(int(value) for value in rect) for rect in rects]


def structured_edges(rgb: np.ndarray, model_file: str) -> tuple[np.ndarray, np.ndarray]:
    """The structured forest's edges, thinned by its non-maximum suppression, and their orientation."""
    detector = cv2.ximgproc.createStructuredEdgeDetection(model_file)
    edges = detector.detectEdges(rgb.astype(np.float32) / 255)
    orientation = detector.computeOrientation(edges)
    return detector.edgesNms(edges, orientation), orientation


def gradient_edges(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges without a model: on the Lab image smoothed by a Gaussian of sigma 1, each pixel's strongest
    channel gradient (Sobel), kept where Canny finds an edge in the lightness (its thinning), scaled to
    [0, 1]; orientation: the gradient's direction modulo pi."""
    lab = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab).astype(np.float32) / 255, (0, 0), 1.0)
    gradient_x, gradient_y = cv2.Sobel(lab, cv2.CV_32F, 1, 0), cv2.Sobel(lab, cv2.CV_32F, 0, 1)
    magnitudes = np.hypot(gradient_x, gradient_y)
    strongest = magnitudes.argmax(axis=2)[..., None]
    magnitude = np.take_along_axis(magnitudes, strongest, 2)[..., 0]
    orientation = np.mod(np.arctan2(np.take_along_axis(gradient_y, strongest, 2)[..., 0],
                                    np.take_along_axis(gradient_x, strongest, 2)[..., 0]), np.pi)
    thin = cv2.Canny(np.round(lab[..., 0] * 255).astype(np.uint8), 20, 60) > 0
    edges = np.where(thin, magnitude / max(float(magnitude.max()), 1e-6), 0)
    return edges.astype(np.float32), orientation.astype(np.float32)


def edge_boxes_title(params: Mapping) -> str:
    return (f"EdgeBoxes (structured edges: {Path(params['edge_model']).name})" if params["edge_model"]
            else "EdgeBoxes (gradient edges, no model file)")


def check_edge_model(config: dict) -> None:
    """The schema runs this at config load: a named model file must exist before anything runs."""
    proposals = config["proposals"]
    if proposals["method"] == "edge-boxes" and proposals["edge_model"] and not Path(proposals["edge_model"]).is_file():
        raise ConfigError(f"proposals.edge_model {proposals['edge_model']}: no such structured-edge model file (\"\" "
                          f"runs EdgeBoxes on gradient edges without one)")


register_check(check_edge_model)
register_proposal_method(ProposalMethod("edge-boxes", edge_boxes, options=("edge_model",), title=edge_boxes_title,
                                        files=lambda params: [params["edge_model"]] if params["edge_model"] else []))


def read_proposals(cache: StageCache, image_ids=None) -> dict[str, np.ndarray]:
    """image id -> boxes float32[N, 4] from a proposals output, for every image or only `image_ids` (read from
    the shard files that hold them)."""
    if image_ids is None:
        paths = sorted(cache.dir.glob(f"*{cache.shard_suffix}"))
    else:
        file_of = shard_files_of_images(cache.dir, cache.shard_suffix)
        paths = sorted({file_of[image_id] for image_id in image_ids if image_id in file_of})
    wanted = None if image_ids is None else set(image_ids)
    proposals = {}
    for path in paths:
        with h5py.File(path, "r") as shard_file:
            proposals.update({image_id: dataset[()] for image_id, dataset in shard_file.items()
                              if wanted is None or image_id in wanted})
    return proposals


@functools.lru_cache(maxsize=16)
def shard_files_of_images(output_dir: Path, shard_suffix: str) -> dict[str, Path]:
    """image id -> the shard file of a complete proposals output that holds it, listed once per process (the
    folder's name is the output's content key, and which shard holds an image follows from it). Without it
    every features or detect shard opened every proposals shard to find its ten images: a cost per image that
    grew with the data set (+30 % at 2 000 images, docs/speed.md)."""
    file_of = {}
    for path in sorted(output_dir.glob(f"*{shard_suffix}")):
        with h5py.File(path, "r") as shard_file:
            file_of.update(dict.fromkeys(shard_file, path))
    return file_of
