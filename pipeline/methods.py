"""One record per detection method: its stages, variants, published figures and test-time detector.

A Method names the stages that train it (their time is its training time in the timing table), the
trained outputs its detector loads, whether it reads region proposals, its variants (the first is
its result; the others are the ablations its evaluation compares with it; those with a timing row are
timed), the config values its detector reads and how its settings read in a report. `assemble` turns
what it detects with (`load`ed from the trained outputs, or `fresh`, untrained, for `rcnn timing-table
--test-only`) into a Detector: one function from an image (and its proposals) to detections per
variant, with the time of each part on a Clock. The detect stage runs it on the test split, the timing
tables on their timed images, `rcnn predict` on new ones: one test path per method, timed where it is
evaluated. Each method's stages are named after it: `<name>-detect` and `<name>-evaluate` (and
`<name>-train` for a network trained end to end, `network_method`); the stage registry (stages/) is
built from these records, and `rcnn run --methods <name>` runs them with what they need.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.classifiers import RegionModels, load_regressors, load_svms, region_features, score_regions
from pipeline.detections import NO_DETECTIONS, detection_rows
from pipeline.detectors import LATER_OPTIONS, build_detection_model, load_detection_model, with_truncated_svd
from pipeline.detectors import detect as detect_with
from pipeline.engine.cache import StageCache
from pipeline.engine.config import register_neutral_option
from pipeline.explain.networks import FAST_RCNN_EXPLAINER, FASTER_RCNN_EXPLAINER, SLIDING_WINDOW_EXPLAINER
from pipeline.explain.page import Explainer
from pipeline.explain.regions import RCNN_EXPLAINER, SPPNET_EXPLAINER
from pipeline.models import on_device
from pipeline.precision import cpu_amp_param, test_time_bf16
from pipeline.regions import image_tensor, normalised
from pipeline.roi import spp_dim
from pipeline.sliding_window import detect_by_windows
from pipeline.timing import Clock
from pipeline.weights import initial_net, load_finetuned


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
    published: Published | None = None     # VGG16 (Fast R-CNN's model L)
    published_small: Published | None = None  # an AlexNet-class network (model S: CaffeNet; ZF for Faster R-CNN)


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
    training_stages: tuple[str, ...]           # the stages whose time is its training time
    model_stages: Mapping[str, str]            # role -> the stage whose output its detector loads
    uses_proposals: bool
    variants: tuple[Variant, ...]              # the first is the method's result
    test_params: Callable[[dict], dict]        # config -> what its detector reads (and images_per_shard)
    load: Callable[[dict[str, StageCache], Mapping, str], object]  # (role -> trained output, params, device) -> models
    fresh: Callable[[Mapping, list[str], str], object]  # (settings, classes, device) -> untrained models
    assemble: Callable[[object, Mapping, str], Detector]  # (models, params, device) -> its test-time detector
    # (test params, the params its model was trained with) -> its settings in words, for the timing reports
    describe: Callable[[Mapping, Mapping], str]
    # the score from which `rcnn predict` keeps a detection by default: 0 is an SVM's decision boundary,
    # 0.5 a softmax probability's even odds
    score_threshold: float = 0.5
    section: str | None = None                 # its own config section, when it has one
    end_to_end: bool = False                   # trained by `<name>-train` from its section (network_method)
    reference: bool = False                    # the 1x of the speedups (R-CNN, as in the papers)
    explainer: Explainer | None = None         # what `rcnn explain` draws of its steps (pipeline.explain)

    @property
    def detect_stage(self) -> str:
        return f"{self.name}-detect"

    @property
    def evaluate_stage(self) -> str:
        return f"{self.name}-evaluate"

    @property
    def result(self) -> str:
        return self.variants[0].name

    @property
    def timed_variants(self) -> tuple[Variant, ...]:
        return tuple(variant for variant in self.variants if variant.timed)

    def models(self, inputs: dict[str, StageCache], params: Mapping, device: str):
        """What its detector runs, loaded from the outputs of its trained stages (inputs: stage name -> output)."""
        return self.load({role: inputs[stage] for role, stage in self.model_stages.items()}, params, device)

    def detector(self, inputs: dict[str, StageCache], params: Mapping, device: str) -> Detector:
        """The detector, from the outputs of its trained stages (inputs: stage name -> output)."""
        return self.assemble(self.models(inputs, params, device), params, device)

    def fresh_detector(self, settings: Mapping, classes: list[str], params: Mapping, device: str) -> Detector:
        """The same detector on untrained models (`rcnn timing-table --test-only`): settings hold the
        backbone, the methods' test params and the config sections a fresh model is built from."""
        return self.assemble(self.fresh(settings, classes, device), params, device)


# ---- test-time settings each method's detector reads -------------------------------------------------
def rcnn_test_params(config: dict) -> dict:
    """R-CNN and SPP-net: NMS and the test split's shards (detect), how pool5 is computed (R-CNN: in bf16 on a
    CPU with bf16 units where cpu_amp is on, as the features stage computed it: pipeline.precision) and stored."""
    return {**config["detect"], "crops_per_batch": config["features"]["batch_size"],
            "feature_dtype": config["features"]["dtype"], **cpu_amp_param(config)}


def sppnet_test_params(config: dict) -> dict:
    return {**config["detect"], "scales": config["sppnet"]["scales"], "levels": config["sppnet"]["levels"],
            "feature_dtype": config["features"]["dtype"]}


# the settings of a Fast / Faster R-CNN section that only change detection, not training
NETWORK_TEST_PARAMS = ("svd_ranks", "nms_iou", "max_per_image", "rpn_pre_nms_test", "rpn_post_nms_test",
                       "images_per_shard")


def network_test_params(section: str) -> Callable[[dict], dict]:
    """The section's test-time settings, and whether the trunk may run in bf16 on the CPU (pipeline.precision)."""
    return lambda config: {**{name: value for name, value in config[section].items() if name in NETWORK_TEST_PARAMS},
                           **cpu_amp_param(config)}


# ---- the detectors: what each runs (loaded from its trained outputs, or fresh), and how -------------------
def load_region_models(trained: dict[str, StageCache], params: Mapping, device: str) -> RegionModels:
    net, backbone, classes = load_finetuned(trained["finetune"], device)
    return RegionModels(net, backbone, classes, load_svms(trained["svm"], len(classes)),
                        load_regressors(trained["bbox"], len(classes)))


def fresh_region_models(spp: bool) -> Callable[[Mapping, list[str], str], RegionModels]:
    """The networks from backbone.weights (ImageNet or random) with random heads, random SVMs and box
    regressors that move nothing: what the test pass costs does not depend on what was learnt."""
    def fresh(settings: Mapping, classes: list[str], device: str) -> RegionModels:
        net = initial_net(settings["backbone"], len(classes), {}).eval()
        if spp:
            features = spp_dim(net.trunk_channels, settings["methods"]["sppnet"]["levels"])
            net.set_fc6_input(features)
        else:
            features = net.pool5_dim(settings["backbone"]["input_size"])
        with torch.no_grad():
            fc7 = net.fc(torch.zeros(1, features)).shape[1]
        rng, count = np.random.default_rng(0), len(classes)
        svms = {"weights": rng.normal(0, 0.01, (count, fc7)).astype(np.float32), "biases": np.zeros(count),
                "layer": "fc7"}
        regressors = {"coef": np.zeros((count, 4, features), np.float32), "intercept": np.zeros((count, 4), np.float32),
                      "target_mean": np.zeros((count, 4), np.float32), "target_std": np.ones((count, 4), np.float32),
                      "scale": 1.0}
        return RegionModels(on_device(net, device).eval(), settings["backbone"], classes, svms, regressors)
    return fresh


def svm_detector(spp: bool) -> Callable[[RegionModels, Mapping, str], Detector]:
    """R-CNN (every proposal warped and run through the whole CNN) or SPP-net (conv5 once per scale, each
    proposal pooled by the pyramid), then fc layers, SVM scores, box regression and per-class NMS
    (pipeline.classifiers.score_regions). Features are rounded to features.dtype (pipeline.features.as_stored),
    as the SVMs' training features were stored."""
    def assemble(models: RegionModels, params: Mapping, device: str) -> Detector:
        def detect(rgb, proposals, variants, clock):
            if not len(proposals):
                return {variant: NO_DETECTIONS for variant in variants}
            features = region_features(spp, models, rgb, proposals, params, device, clock)
            return score_regions(models.net, models.svms, models.regressors, proposals, features, rgb.shape[1],
                                 rgb.shape[0], params, device, variants, clock)
        return Detector(models.classes, detect)
    return assemble


@dataclass
class NetworkModel:
    """What Fast and Faster R-CNN detect with: the trained model, the params it was built with, its classes."""
    model: object
    params: Mapping
    classes: list[str]


def load_network(trained: dict[str, StageCache], params: Mapping, device: str) -> NetworkModel:
    return NetworkModel(*load_detection_model(trained["model"], device, params))


def fresh_network(architecture: str, section: str) -> Callable[[Mapping, list[str], str], NetworkModel]:
    """The detection model on the backbone from backbone.weights, its other layers random; settings["sections"]
    holds its config section."""
    def fresh(settings: Mapping, classes: list[str], device: str) -> NetworkModel:
        params = {**settings["sections"][section], **settings["methods"][architecture]}
        model = build_detection_model(architecture, initial_net(settings["backbone"], len(classes), {}), len(classes),
                                      params)
        return NetworkModel(on_device(model, device).eval(), params, classes)
    return fresh


def network_detector(models: NetworkModel, params: Mapping, device: str) -> Detector:
    """Fast R-CNN (given the proposals) or Faster R-CNN (its RPN proposes): pipeline.detectors.detect;
    the variant svd is the same model with fc6 and fc7 replaced by their truncated SVD (svd_ranks)."""
    model = models.model
    svd = {"svd": with_truncated_svd(model, models.params["svd_ranks"])} if "svd_ranks" in models.params else {}
    bf16 = test_time_bf16(device, params["cpu_amp"])

    def detect(rgb, proposals, variants, clock):
        image = normalised(image_tensor(rgb, device))
        given = [torch.from_numpy(proposals).to(device)] if proposals is not None else None
        return {variant: detection_rows(detect_with(svd.get(variant, model), [image], given, clock, bf16=bf16)[0])
                for variant in variants}
    return Detector(models.classes, detect)


def load_classifier(trained: dict[str, StageCache], params: Mapping, device: str) -> RegionModels:
    net, backbone, classes = load_finetuned(trained["finetune"], device)
    return RegionModels(net, backbone, classes, {}, {})


def fresh_classifier(settings: Mapping, classes: list[str], device: str) -> RegionModels:
    net = initial_net(settings["backbone"], len(classes), {})
    return RegionModels(on_device(net, device).eval(), settings["backbone"], classes, {}, {})


def sliding_window_detector(models: RegionModels, params: Mapping, device: str) -> Detector:
    """R-CNN's fine-tuned classifier on a grid of windows (pipeline.sliding_window)."""
    def detect(rgb, _proposals, variants, clock):
        _, rows = detect_by_windows(models.net, models.backbone, rgb, params, device)
        clock.lap("warp + CNN on every window + NMS")
        return {variant: rows for variant in variants}
    return Detector(models.classes, detect)


# ---- how each method's settings read in a report --------------------------------------------------------
def describe_sliding_window(test: Mapping, trained: Mapping) -> str:
    return (f"windows of sides {list(test['sizes'])} px, aspect ratios {list(test['aspect_ratios'])}, every "
            f"{test['step']} of a window's side, through R-CNN's fine-tuned classifier (so its training time is "
            f"fine-tuning's); no proposals")


def describe_rcnn(test: Mapping, trained: Mapping) -> str:
    return f"each proposal warped to the backbone's input size, {test['crops_per_batch']} crops per forward"


def describe_sppnet(test: Mapping, trained: Mapping) -> str:
    return f"conv5 at shorter sides {list(test['scales'])}, pyramid levels {list(test['levels'])}"


def describe_network(test: Mapping, trained: Mapping) -> str:
    own_proposals = (f"; its RPN's {test['rpn_post_nms_test']} proposals per image" if "rpn_post_nms_test" in test
                     else "")
    return f"shorter side {trained['min_size']} (longer at most {trained['max_size']}), one image per forward" \
        + own_proposals


def network_method(name: str, title: str, uses_proposals: bool, variants: tuple[Variant, ...],
                   explainer: Explainer) -> Method:
    """A network trained end to end by its stage `<name>-train` (stages/detector_train.py) from its config
    section (`name` with underscores), built by pipeline.detectors.build_detection_model(name, ...)."""
    section = name.replace("-", "_")
    for option, neutral_value in LATER_OPTIONS.items():  # added after the first models were cached
        register_neutral_option(f"{section}.{option}", neutral_value)
    return Method(name, title, training_stages=(f"{name}-train",), model_stages={"model": f"{name}-train"},
                  uses_proposals=uses_proposals, variants=variants, test_params=network_test_params(section),
                  load=load_network, fresh=fresh_network(name, section), assemble=network_detector,
                  describe=describe_network, section=section, end_to_end=True, explainer=explainer)


# ---- the methods ---------------------------------------------------------------------------------------
# Girshick, "Fast R-CNN" (ICCV 2015), Table 4 (VGG16 = model L, VOC07, K40, proposal time excluded);
# Ren et al., "Faster R-CNN" (NIPS 2015), Table 5: 198 ms per image with its own proposals, mAP 69.9.
RCNN_VARIANTS = (
    Variant("svm_bbox", "R-CNN: SVM + bbox regression", timed="R-CNN", published=Published(84.0, 47.0, 66.0),
            published_small=Published(22.0, 9.8, 58.5)),
    Variant("svm", "SVM, no bbox regression", metric="without_bbox"),
    Variant("softmax_bbox", "fine-tuned softmax + bbox regression", metric="softmax"),
    Variant("softmax", "fine-tuned softmax, no bbox regression"))
SLIDING_WINDOW = Method(
    "sliding-window", "Sliding window", training_stages=("finetune",), model_stages={"finetune": "finetune"},
    uses_proposals=False,
    variants=(Variant("sliding_window", "sliding window: R-CNN's fine-tuned classifier on a grid of windows",
                      timed="Sliding window", published=Published(None, None, None)),),
    test_params=lambda config: dict(config["sliding_window"]), load=load_classifier, fresh=fresh_classifier,
    assemble=sliding_window_detector, describe=describe_sliding_window, section="sliding_window",
    explainer=SLIDING_WINDOW_EXPLAINER)
RCNN = Method(
    "rcnn", "R-CNN", training_stages=("finetune", "features", "svm", "bbox"),
    model_stages={"finetune": "finetune", "svm": "svm", "bbox": "bbox"}, uses_proposals=True,
    variants=RCNN_VARIANTS, test_params=rcnn_test_params, load=load_region_models,
    fresh=fresh_region_models(spp=False), assemble=svm_detector(spp=False), describe=describe_rcnn,
    score_threshold=0.0, reference=True, explainer=RCNN_EXPLAINER)
SPPNET = Method(
    "sppnet", "SPP-net",
    training_stages=("sppnet-conv5", "sppnet-features", "sppnet-finetune", "sppnet-svm", "sppnet-bbox"),
    model_stages={"finetune": "sppnet-finetune", "svm": "sppnet-svm", "bbox": "sppnet-bbox"}, uses_proposals=True,
    variants=(Variant("svm_bbox", "SPP-net: SVM + bbox regression", timed="SPP-net",
                      published=Published(25.0, 2.3, 63.1)), *RCNN_VARIANTS[1:]),
    test_params=sppnet_test_params, load=load_region_models, fresh=fresh_region_models(spp=True),
    assemble=svm_detector(spp=True), describe=describe_sppnet, score_threshold=0.0, section="sppnet",
    explainer=SPPNET_EXPLAINER)
FAST_RCNN = network_method(
    "fast-rcnn", "Fast R-CNN", uses_proposals=True,
    variants=(Variant("fast_rcnn", "Fast R-CNN", timed="Fast R-CNN", published=Published(9.5, 0.32, 66.9),
                      published_small=Published(1.2, 0.10, 57.1)),
              Variant("svd", "Fast R-CNN, truncated SVD of fc6 and fc7", metric="svd", timed="Fast R-CNN (SVD)",
                      published=Published(9.5, 0.22, 66.6), published_small=Published(1.2, 0.06, 56.5))),
    explainer=FAST_RCNN_EXPLAINER)
FASTER_RCNN = network_method(
    "faster-rcnn", "Faster R-CNN", uses_proposals=False,
    variants=(Variant("faster_rcnn", "Faster R-CNN (RPN + Fast R-CNN, shared conv5)", timed="Faster R-CNN",
                      published=Published(None, 0.198, 69.9), published_small=Published(None, 0.059, None)),),
    explainer=FASTER_RCNN_EXPLAINER)

# in the lecture's order: each method answers the cost of the one before
METHODS = {method.name: method for method in (SLIDING_WINDOW, RCNN, SPPNET, FAST_RCNN, FASTER_RCNN)}
REFERENCE = next(method for method in METHODS.values() if method.reference)
# the other tasks on the same data, and the stage that ends each: `rcnn run --methods fcn` (semantic
# segmentation); localize needs single-object data (`rcnn data shapes --single-object`)
TASKS = {"fcn": "fcn-evaluate", "localize": "localize"}
PUBLISHED_PROPOSALS_S = 1.51  # selective search, seconds per image (Faster R-CNN, Table 5)
# the papers' tables, as the timing reports print them beside their measured counterparts
FAST_RCNN_TABLE4 = (
    "| | Fast R-CNN S | Fast R-CNN M | Fast R-CNN L | R-CNN S | R-CNN M | R-CNN L | SPP-net L |\n"
    "|---|---|---|---|---|---|---|---|\n"
    "| train time (h) | 1.2 | 2.0 | 9.5 | 22 | 28 | 84 | 25 |\n"
    "| train speedup | 18.3x | 14.0x | 8.8x | 1x | 1x | 1x | 3.4x |\n"
    "| test rate (s/im) | 0.10 | 0.15 | 0.32 | 9.8 | 12.1 | 47.0 | 2.3 |\n"
    "| with SVD | 0.06 | 0.08 | 0.22 | - | - | - | - |\n"
    "| test speedup | 98x | 80x | 146x | 1x | 1x | 1x | 20x |\n"
    "| with SVD | 169x | 150x | 213x | - | - | - | - |\n"
    "| VOC07 mAP | 57.1 | 59.2 | 66.9 | 58.5 | 60.2 | 66.0 | 63.1 |\n"
    "| with SVD | 56.5 | 58.7 | 66.6 | - | - | - | - |\n")
FASTER_RCNN_TABLE5 = (
    "| model | system | conv (ms) | proposal (ms) | region-wise (ms) | total (ms) | rate |\n"
    "|---|---|---|---|---|---|---|\n"
    "| VGG | SS + Fast R-CNN | 146 | 1510 | 174 | 1830 | 0.5 fps |\n"
    "| VGG | RPN + Fast R-CNN | 141 | 10 | 47 | 198 | 5 fps |\n"
    "| ZF | RPN + Fast R-CNN | 31 | 3 | 25 | 59 | 17 fps |\n")
