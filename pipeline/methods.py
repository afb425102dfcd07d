"""One record per detection method: its stages, variants, published figures and test-time detector.

A Method names the stages that train it (their time is its training time in the timing table), the
trained outputs its detector loads, whether it reads region proposals, its variants (the first is
its result; the others are the ablations its evaluation compares with it) and the config values its
detector reads. `build_detector` turns trained outputs into a Detector: one function from an image
(and its proposals) to detections per variant, with the time of each part on a Clock. The detect
stage runs it on the test split, the timing table on its timed images, `rcnn predict` on new ones:
one test path per method, timed where it is evaluated. Each method's stages are named after it:
`<name>-detect` and `<name>-evaluate`, and `rcnn run --methods <name>` runs them with what they need.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.cache import StageCache
from pipeline.detections import NO_DETECTIONS, detection_rows
from pipeline.timing import Clock


@dataclass(frozen=True)
class Published:
    """A row of the papers' tables (VOC07 test, VGG16, Nvidia K40): training hours, test seconds per
    image without proposal time, mAP in %."""
    train_h: float | None
    test_s: float | None
    map: float | None


@dataclass(frozen=True)
class Variant:
    name: str                        # as detections are stored: svm_bbox, fast_rcnn, svd, ...
    title: str                       # in the evaluation report
    metric: str | None = None        # the evaluation's headline metric map_voc07_11pt_<metric>, if any
    timed: str | None = None         # its row in the timing table, if timed
    published: Published | None = None


@dataclass(frozen=True)
class Detector:
    """detect(rgb uint8[H, W, 3], proposals float32[R, 4] or None, variants, clock) -> variant ->
    float32[D, 6] rows (x1, y1, x2, y2, score, class index), the laps of each part on the clock."""
    classes: list[str]
    detect: Callable[[np.ndarray, np.ndarray | None, tuple[str, ...], Clock], dict[str, np.ndarray]]

    def __call__(self, rgb: np.ndarray, proposals: np.ndarray | None, variants: tuple[str, ...],
                 clock: Clock) -> dict[str, np.ndarray]:
        return self.detect(rgb, proposals, variants, clock)


@dataclass(frozen=True)
class Method:
    name: str                                  # the CLI's name and its stages' prefix
    title: str
    training: tuple[str, ...]                  # the stages whose time is its training time
    trained: Mapping[str, str]                 # role -> the stage whose output its detector loads
    uses_proposals: bool
    variants: tuple[Variant, ...]              # the first is the method's result
    test_params: Callable[[dict], dict]        # config -> what its detector reads (and images_per_shard)
    build_detector: Callable[[dict[str, StageCache], Mapping, str], Detector]  # (role -> output, params, device)
    # the score from which `rcnn predict` keeps a detection by default: 0 is an SVM's decision boundary,
    # 0.5 a softmax probability's even odds
    score_threshold: float = 0.5

    @property
    def detect_stage(self) -> str:
        return f"{self.name}-detect"

    @property
    def evaluate_stage(self) -> str:
        return f"{self.name}-evaluate"

    @property
    def result(self) -> str:
        return self.variants[0].name

    def detector(self, inputs: dict[str, StageCache], params: Mapping, device: str) -> Detector:
        """The detector, from the outputs of its trained stages (inputs: stage name -> output)."""
        return self.build_detector({role: inputs[stage] for role, stage in self.trained.items()}, params, device)


# ---- test-time settings each method's detector reads -------------------------------------------------
def rcnn_test_params(config: dict) -> dict:
    """R-CNN and SPP-net: NMS and the test split's shards (detect), how pool5 is computed and stored."""
    return {**config["detect"], "crops_per_batch": config["features"]["batch_size"],
            "feature_dtype": config["features"]["dtype"]}


def sppnet_test_params(config: dict) -> dict:
    return {**config["detect"], "scales": config["sppnet"]["scales"], "levels": config["sppnet"]["levels"],
            "feature_dtype": config["features"]["dtype"]}


# the settings of a Fast / Faster R-CNN section that only change detection, not training
NETWORK_TEST_PARAMS = ("svd_ranks", "nms_iou", "max_per_image", "rpn_pre_nms_test", "rpn_post_nms_test",
                       "images_per_shard")


def network_test_params(section: str) -> Callable[[dict], dict]:
    return lambda config: {name: value for name, value in config[section].items() if name in NETWORK_TEST_PARAMS}


# ---- the detectors -------------------------------------------------------------------------------------
def svm_detector(spp: bool) -> Callable[[dict, Mapping, str], Detector]:
    """R-CNN (every proposal warped and run through the whole CNN) or SPP-net (conv5 once per scale, each
    proposal pooled by the pyramid), then fc layers, SVM scores, box regression and per-class NMS
    (pipeline.classifiers.score_regions). Features are rounded to features.dtype, as the SVMs' training
    features were stored."""
    def build(trained: dict[str, StageCache], params: Mapping, device: str) -> Detector:
        from pipeline.classifiers import load_regressors, load_svms, score_regions
        from pipeline.features import pool5_features
        from pipeline.roi import conv5_at_scales, pyramid_features
        from pipeline.weights import load_finetuned
        net, backbone, classes = load_finetuned(trained["finetune"], device)
        svms, regressors = load_svms(trained["svm"], len(classes)), load_regressors(trained["bbox"], len(classes))

        def detect(rgb, proposals, variants, clock):
            if not len(proposals):
                return {variant: NO_DETECTIONS for variant in variants}
            if spp:
                maps = conv5_at_scales(net.trunk, rgb, params["scales"], device, amp=False)
                clock.lap("conv5 at every scale")
                features = pyramid_features(maps, proposals, params["levels"], net.trunk_stride, backbone["input_size"])
                clock.lap("pyramid pooling")
            else:
                features = pool5_features(net, rgb, proposals, backbone, params["crops_per_batch"], device, amp=False)
                clock.lap("warp + CNN on every crop")
            rows = score_regions(net, svms, regressors, proposals, features.astype(params["feature_dtype"]),
                                 rgb.shape[1], rgb.shape[0], params, device, variants)
            clock.lap("fc + SVM + bbox + NMS")
            return rows
        return Detector(classes, detect)
    return build


def network_detector(trained: dict[str, StageCache], params: Mapping, device: str) -> Detector:
    """Fast R-CNN (given the proposals) or Faster R-CNN (its RPN proposes): pipeline.detectors.detect;
    the variant svd is the same model with fc6 and fc7 replaced by their truncated SVD (svd_ranks)."""
    import torch

    from pipeline.detectors import detect as detect_with, load_detection_model, with_truncated_svd
    from pipeline.regions import image_tensor, normalised
    model, saved_params, classes = load_detection_model(trained["model"], device, params)
    models = {"svd": with_truncated_svd(model, saved_params["svd_ranks"])} if "svd_ranks" in saved_params else {}

    def detect(rgb, proposals, variants, clock):
        image = normalised(image_tensor(rgb, device))
        given = [torch.from_numpy(proposals).to(device)] if proposals is not None else None
        return {variant: detection_rows(detect_with(models.get(variant, model), [image], given, clock)[0])
                for variant in variants}
    return Detector(classes, detect)


def sliding_window_detector(trained: dict[str, StageCache], params: Mapping, device: str) -> Detector:
    """R-CNN's fine-tuned classifier on a grid of windows (pipeline.sliding_window)."""
    from pipeline.sliding_window import classify_windows, grid_windows
    from pipeline.weights import load_finetuned
    net, backbone, classes = load_finetuned(trained["finetune"], device)

    def detect(rgb, _proposals, variants, clock):
        windows = grid_windows(rgb.shape[1], rgb.shape[0], params["sizes"], params["aspect_ratios"], params["step"])
        rows = classify_windows(net, backbone, rgb, windows, params, device)
        clock.lap("warp + CNN on every window + NMS")
        return {variant: rows for variant in variants}
    return Detector(classes, detect)


# ---- the methods ---------------------------------------------------------------------------------------
# Girshick, "Fast R-CNN" (ICCV 2015), Table 4 (VGG16 = model L, VOC07, K40, proposal time excluded);
# Ren et al., "Faster R-CNN" (NIPS 2015), Table 5: 198 ms per image with its own proposals, mAP 69.9.
RCNN_VARIANTS = (
    Variant("svm_bbox", "R-CNN: SVM + bbox regression", timed="R-CNN", published=Published(84.0, 47.0, 66.0)),
    Variant("svm", "SVM, no bbox regression", metric="without_bbox"),
    Variant("softmax_bbox", "fine-tuned softmax + bbox regression", metric="softmax"),
    Variant("softmax", "fine-tuned softmax, no bbox regression"))
SLIDING_WINDOW = Method(
    "sliding-window", "Sliding window", training=("finetune",), trained={"finetune": "finetune"},
    uses_proposals=False,
    variants=(Variant("sliding_window", "sliding window: R-CNN's fine-tuned classifier on a grid of windows",
                      timed="Sliding window", published=Published(None, None, None)),),
    test_params=lambda config: dict(config["sliding_window"]), build_detector=sliding_window_detector)
RCNN = Method(
    "rcnn", "R-CNN", training=("finetune", "features", "svm", "bbox"),
    trained={"finetune": "finetune", "svm": "svm", "bbox": "bbox"}, uses_proposals=True, variants=RCNN_VARIANTS,
    test_params=rcnn_test_params, build_detector=svm_detector(spp=False), score_threshold=0.0)
SPPNET = Method(
    "sppnet", "SPP-net", training=("sppnet-conv5", "sppnet-features", "sppnet-finetune", "sppnet-svm", "sppnet-bbox"),
    trained={"finetune": "sppnet-finetune", "svm": "sppnet-svm", "bbox": "sppnet-bbox"}, uses_proposals=True,
    variants=(Variant("svm_bbox", "SPP-net: SVM + bbox regression", timed="SPP-net",
                      published=Published(25.0, 2.3, 63.1)), *RCNN_VARIANTS[1:]),
    test_params=sppnet_test_params, build_detector=svm_detector(spp=True), score_threshold=0.0)
FAST_RCNN = Method(
    "fast-rcnn", "Fast R-CNN", training=("fast-rcnn-train",), trained={"model": "fast-rcnn-train"},
    uses_proposals=True,
    variants=(Variant("fast_rcnn", "Fast R-CNN", timed="Fast R-CNN", published=Published(9.5, 0.32, 66.9)),
              Variant("svd", "Fast R-CNN, truncated SVD of fc6 and fc7", metric="svd", timed="Fast R-CNN (SVD)",
                      published=Published(9.5, 0.22, 66.6))),
    test_params=network_test_params("fast_rcnn"), build_detector=network_detector)
FASTER_RCNN = Method(
    "faster-rcnn", "Faster R-CNN", training=("faster-rcnn-train",), trained={"model": "faster-rcnn-train"},
    uses_proposals=False,
    variants=(Variant("faster_rcnn", "Faster R-CNN (RPN + Fast R-CNN, shared conv5)", timed="Faster R-CNN",
                      published=Published(None, 0.198, 69.9)),),
    test_params=network_test_params("faster_rcnn"), build_detector=network_detector)

METHODS = {method.name: method for method in (SLIDING_WINDOW, RCNN, SPPNET, FAST_RCNN, FASTER_RCNN)}
# the other tasks on the same data, and the stage that ends each: `rcnn run --methods fcn` (semantic
# segmentation); localize needs single-object data (`rcnn data shapes --single-object`)
TASKS = {"fcn": "fcn-evaluate", "localize": "localize"}
PUBLISHED_PROPOSALS_S = 1.51  # selective search, seconds per image (Faster R-CNN, Table 5)
