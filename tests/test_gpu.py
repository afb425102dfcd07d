"""CUDA paths (skipped without a GPU): the same warps, features and detections as on the CPU, AMP training."""
import numpy as np
import pytest
import torch

from pipeline.detectors import build_detection_model, detect
from pipeline.features import pool5_features
from pipeline.models import build_region_net
from pipeline.regions import warp_regions
from pipeline.timing import Clock
from pipeline.training import SGDSettings, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKBONE = {"input_size": 48, "context_pad": 3}


def test_cuda_warp_matches_cpu():
    image = torch.randint(0, 255, (3, 120, 160), dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 5.0, 90.0, 60.0], [100.0, 40.0, 150.0, 119.0]])
    on_cpu = warp_regions(image, boxes, 48, 3)
    on_gpu = warp_regions(image.cuda(), boxes.cuda(), 48, 3).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-4)


def test_cuda_bf16_pool5_features_match_cpu_within_bf16_precision():
    torch.manual_seed(0)
    net = build_region_net("small", 7, 48).eval()
    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    boxes = np.array([[10, 5, 90, 60], [100, 40, 150, 119]], np.float32)
    on_cpu = pool5_features(net, rgb, boxes, BACKBONE, 256, "cpu", bf16=False)
    on_gpu = pool5_features(net.cuda(), rgb, boxes, BACKBONE, 256, "cuda", bf16=True)
    assert np.linalg.norm(on_gpu - on_cpu) / np.linalg.norm(on_cpu) < 2e-2


def test_amp_training_steps_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    net = build_region_net("small", 3, 48)
    settings = SGDSettings(iterations=30, lr=0.05, momentum=0.9, weight_decay=0.0005, step_every=100, gamma=0.1,
                           seed=0, checkpoint_every=10)

    def next_batch(rng):
        labels = rng.integers(3, size=64)
        crops = torch.from_numpy(rng.normal(size=(64, 3, 48, 48))).float()
        crops[:, 0] += torch.from_numpy(labels).float()[:, None, None]  # a learnable signal
        return crops.cuda(), torch.from_numpy(labels).cuda()

    losses = train(net, next_batch, settings, tmp_path / "ckpt", "cuda", amp=True).losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


DETECTOR_PARAMS = {"min_size": 120, "max_size": 200, "pooling": "roi_pool", "fg_iou": 0.5, "rois_per_image": 64,
                   "fg_fraction": 0.25, "nms_iou": 0.3, "max_per_image": 100, "anchor_sizes": [32, 64],
                   "aspect_ratios": [0.5, 1.0, 2.0], "rpn_pre_nms_train": 500, "rpn_post_nms_train": 100,
                   "rpn_pre_nms_test": 300, "rpn_post_nms_test": 50, "rpn_nms_iou": 0.7, "rpn_anchors_per_image": 128}


@pytest.mark.parametrize("method", ["fast", "faster"])
def test_cuda_detections_match_cpu(method):
    torch.manual_seed(0)
    model = build_detection_model(f"{method}-rcnn", build_region_net("small", 4, 48), 3, DETECTOR_PARAMS).eval()
    image = torch.randn(3, 120, 160)
    proposals = [torch.tensor([[10.0, 5.0, 90.0, 60.0], [100.0, 40.0, 150.0, 119.0]])] if method == "fast" else None
    on_cpu = detect(model, [image], proposals, Clock("cpu"))[0]
    on_gpu = detect(model.cuda(), [image.cuda()], [p.cuda() for p in proposals] if proposals else None,
                    Clock("cuda"))[0]
    top = min(5, len(on_cpu["scores"]))
    assert torch.allclose(on_cpu["scores"][:top], on_gpu["scores"][:top].cpu(), atol=1e-3)
