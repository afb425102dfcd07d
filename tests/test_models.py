import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from test_gpu import DETECTOR_PARAMS
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.detectors import build_detection_model, detect, detection_backbone, jitter_training_scale, roi_pooler
from pipeline.engine.errors import ConfigError, UserError
from pipeline.methods import fresh_region_models
from pipeline.models import build_region_net, on_device
from pipeline.timing import Clock
from pipeline.weights import imagenet_weights_file, initial_backbone, initial_net, load_state, weights_key_extras

SHARED_MOBILENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "weights" / "mobilenet_v2_imagenet.pth"


def test_small_net_splits_at_pool5_fc6_fc7():
    net = build_region_net("small", num_outputs=7, input_size=48).eval()
    crops = torch.randn(2, 3, 48, 48)
    pool5 = net.pool5(crops)
    assert pool5.shape == (2, 64, 3, 3)
    assert net.fc(pool5, "fc6").shape == (2, 256) and net.fc(pool5, "fc7").shape == (2, 256)
    assert torch.allclose(net(crops), net.head(net.fc(pool5)))


@pytest.mark.parametrize("name, size, pool5_shape", [("alexnet", 227, (256, 6, 6)), ("vgg16", 224, (512, 7, 7))])
def test_torchvision_backbones_have_the_papers_pool5(name, size, pool5_shape):
    net = build_region_net(name, num_outputs=21, input_size=size).eval()
    with torch.no_grad():
        pool5 = net.pool5(torch.randn(1, 3, size, size))
        assert pool5.shape[1:] == pool5_shape
        assert net.fc(pool5).shape == (1, 4096) and net(torch.randn(1, 3, size, size)).shape == (1, 21)


@pytest.mark.parametrize("name, size, channels", [("mobilenet_v2", 112, 96), ("resnet18", 112, 256),
                                                   ("resnet50", 224, 1024)])
def test_imagenet_backbones_cut_at_stride_16_with_new_fc6_and_fc7(name, size, channels):
    net = build_region_net(name, num_outputs=4, input_size=size).eval()
    with torch.no_grad():
        conv5 = net.trunk(torch.randn(2, 3, size, size))
        pool5 = net.pool5(torch.randn(2, 3, size, size))
    assert conv5.shape == (2, channels, size // 16, size // 16) and net.trunk_stride == 16
    assert pool5.shape == (2, channels, 7, 7) and net.roi_size == 7
    assert (net.fc(pool5, "fc6").shape == (2, 1024) and net.fc(pool5).shape == (2, 1024)
            and net.trunk_channels == channels)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.trunk.modules())  # frozen, as in detection
    assert any(isinstance(m, FrozenBatchNorm2d) for m in net.trunk.modules())


def test_a_network_trained_from_scratch_learns_batchnorm_and_its_statistics_are_then_frozen():
    """The pretrain stage's network normalises with batch statistics while it trains; what it saves loads
    into the frozen network every later stage builds, which then computes what it computed in eval mode."""
    scratch = build_region_net("mobilenet_v2", 3, 96, frozen_batchnorm=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scratch.trunk.modules())
    crops = torch.randn(8, 3, 96, 96)
    scratch.train()(crops * 3 + 1)  # one training-mode pass moves the running statistics off the identity
    frozen = build_region_net("mobilenet_v2", 3, 96)
    frozen.load_state_dict(scratch.state_dict())  # strict: BatchNorm's num_batches_tracked is the one extra
    with torch.no_grad():
        assert torch.allclose(frozen.eval()(crops), scratch.eval()(crops), atol=1e-5)


def test_a_random_start_trains_its_batchnorm_and_says_so_in_its_key():
    """backbone.weights=none: frozen at their initial identity, MobileNetV2's BatchNorm layers would leave
    it without normalisation (the pretrain stage's defect); a random start learns them instead."""
    backbone = {"name": "mobilenet_v2", "input_size": 96, "context_pad": 6, "weights": "none"}
    net = initial_net(backbone, 3, {})
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.trunk.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in net.trunk.modules())
    net.train()(torch.randn(4, 3, 96, 96) * 3 + 1)
    assert not torch.equal(net.trunk[0][1].running_mean, torch.zeros_like(net.trunk[0][1].running_mean))
    assert weights_key_extras(backbone) != weights_key_extras({**backbone, "weights": "pretrain"})


def test_the_random_network_test_only_timing_builds_is_probed_in_eval_mode():
    """Its shape probes (a zero image through pool5) must neither fail on a 1 x 1 conv5 nor move BatchNorm."""
    settings = {"backbone": {"name": "mobilenet_v2", "input_size": 16, "context_pad": 2, "weights": "none"}}
    models = fresh_region_models(spp=False)(settings, ["a", "b"], "cpu")
    batchnorm = next(m for m in models.net.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(batchnorm.running_var, torch.ones_like(batchnorm.running_var)) and not models.net.training


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "resnet50"])
def test_a_torchvision_state_dict_loads_whole_and_its_trunk_is_kept(name):
    model = getattr(torchvision.models, name)(weights=None)
    state = model.state_dict()
    net = build_region_net(name, 4, 112, imagenet_state=state)  # load_state_dict(strict): no key missing
    first_conv = next(m for m in net.trunk.modules() if isinstance(m, torch.nn.Conv2d))
    assert torch.equal(first_conv.weight, next(v for k, v in state.items() if k.endswith("weight") and v.dim() == 4))


@pytest.mark.skipif(not SHARED_MOBILENET.is_file(),
                    reason="../shared/data/weights is absent (the shared ImageNet weights)")
def test_the_shared_mobilenet_v2_imagenet_weights_load_and_classify_into_imagenet_classes():
    state = load_state(SHARED_MOBILENET)
    net = build_region_net("mobilenet_v2", 4, 112, imagenet_state=state)
    classifier = torchvision.models.mobilenet_v2(weights=None)
    classifier.load_state_dict(state)
    assert torch.equal(net.trunk[0][0].weight, classifier.features[0][0].weight)


@pytest.mark.parametrize("name, size", [("small", 48), ("alexnet", 227), ("vgg16", 224), ("mobilenet_v2", 112),
                                        ("resnet18", 112), ("efficientnet_lite0", 112)])
def test_trunk_runs_on_any_image_size_at_its_stride(name, size):
    net = build_region_net(name, num_outputs=3, input_size=size).eval()
    with torch.no_grad():
        conv5 = net.trunk(torch.randn(1, 3, 160, 224))
    assert conv5.shape[1] == net.trunk_channels
    assert abs(conv5.shape[2] - 160 / net.trunk_stride) <= 1 and abs(conv5.shape[3] - 224 / net.trunk_stride) <= 1


def test_fc6_input_dim_gives_a_new_fc6():
    net = build_region_net("small", 6, 48, fc6_input_dim=64 * 14)
    assert net.fc(torch.randn(2, 64 * 14)).shape == (2, 256)


def test_replace_head_keeps_the_rest():
    net = build_region_net("small", 6, 48)
    conv_weight = net.trunk[0].weight.clone()
    net.replace_head(7)
    assert net.head.out_features == 7 and torch.equal(net.trunk[0].weight, conv_weight)


def test_missing_torchvision_weights_say_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError) as caught:
        imagenet_weights_file("alexnet", "torchvision")
    message = str(caught.value)
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message


def test_missing_weights_path_is_named(tmp_path):
    with pytest.raises(UserError, match="nope.pth: backbone weights file not found"):
        imagenet_weights_file("alexnet", str(tmp_path / "nope.pth"))


def test_small_backbone_has_no_torchvision_weights():
    with pytest.raises(ConfigError, match="backbone small has no ImageNet weights"):
        imagenet_weights_file("small", "torchvision")
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_region_net("small", 6, 50)


def pickled_module(path):
    path.write_bytes(pickle.dumps({"model": torch.nn.Linear(2, 2)}))


@pytest.mark.parametrize("write, problem", [
    (pickled_module, "not a PyTorch state dict that can be read safely"),
    (lambda path: path.write_text("these are not weights\n" * 20), "not a PyTorch state dict that can be read safely"),
    (lambda path: torch.save([torch.zeros(2)], path), "holds a list, not a state dict of tensors"),
])
def test_an_unreadable_weights_file_is_one_error_naming_it(tmp_path, write, problem):
    path = tmp_path / "weights.pth"
    write(path)
    with pytest.raises(UserError) as caught:
        load_state(path)
    assert str(caught.value).startswith(f"{path}: {problem}") and "weights_only=False" not in str(caught.value)


def test_weights_of_another_network_are_named_as_such(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    backbone = {"name": "mobilenet_v2", "input_size": 112, "context_pad": 8, "weights": str(path)}
    with pytest.raises(UserError, match=rf"{path}: does not hold ImageNet weights of mobilenet_v2 \(Missing key"):
        initial_net(backbone, 3, {})


def test_a_weights_file_gives_one_key_however_its_path_is_spelt(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    backbone = {"name": "mobilenet_v2", "input_size": 96, "context_pad": 6}
    spellings = ["../w.pth", str(tmp_path / "w.pth"), f"{tmp_path}/run/../w.pth"]
    assert ({initial_backbone({**backbone, "weights": path})["weights"] for path in spellings}
            == {str(tmp_path / "w.pth")})
    for source in ("torchvision", "pretrain", "none"):
        assert initial_backbone({**backbone, "weights": source})["weights"] == source


# test_gpu's detectors, with room for the larger jittered size (144 x 216)
JITTER_PARAMS = {**DETECTOR_PARAMS, "max_size": 400}


@pytest.mark.parametrize("architecture", ["fast-rcnn", "faster-rcnn"])
def test_scale_jitter_draws_each_training_images_size_and_detection_keeps_min_size(architecture):
    torch.manual_seed(0)
    model = build_detection_model(architecture, build_region_net("small", 3, 48), 2, JITTER_PARAMS)
    jitter_training_scale(model, [96, 144])
    image = torch.zeros(3, 100, 150)
    model.train()
    sizes = {tuple(model.transform([image, image])[0].image_sizes[i]) for _ in range(10) for i in range(2)}
    assert sizes == {(96, 144), (144, 216)}
    built_for_detection = build_detection_model(architecture, build_region_net("small", 3, 48), 2, JITTER_PARAMS)
    assert built_for_detection.eval().transform([image])[0].image_sizes == [(120, 180)]


# test_gpu's detectors with a feature pyramid: three anchor sizes, one per level, and RoIAlign
PYRAMID_PARAMS = {**DETECTOR_PARAMS, "feature_pyramid": True, "pooling": "roi_align", "anchor_sizes": [16, 32, 64]}


@pytest.mark.parametrize("name", ["small", "alexnet", "vgg16", "mobilenet_v2", "resnet18", "resnet50",
                                  "efficientnet_lite0", "efficientnet_lite2"])
def test_the_feature_pyramid_reads_half_the_trunks_stride_and_keeps_its_channels(name):
    net = build_region_net(name, 3, 64 if name == "small" else 112)
    backbone = detection_backbone(net, PYRAMID_PARAMS).eval()
    with torch.no_grad():
        maps = backbone(torch.zeros(1, 3, 256, 256))
    fine, trunk, pool = maps.values()
    assert list(maps) == ["0", "1", "pool"] and backbone.out_channels == net.trunk_channels
    assert {m.shape[1] for m in maps.values()} == {net.trunk_channels}
    assert trunk.shape[2:] == net.trunk(torch.zeros(1, 3, 256, 256)).shape[2:]
    assert fine.shape[2] in (2 * trunk.shape[2], 2 * trunk.shape[2] + 1)  # AlexNet's kernels do not tile exactly
    assert pool.shape[2] == -(-trunk.shape[2] // 2)


def test_the_pyramid_pools_small_regions_from_the_fine_map_and_large_ones_from_the_coarse():
    pooler = roi_pooler(build_region_net("mobilenet_v2", 3, 112), PYRAMID_PARAMS)
    maps = {"0": torch.ones(1, 4, 64, 64), "1": torch.full((1, 4, 32, 32), 2.0)}  # strides 8 and 16
    boxes = [torch.tensor([[10.0, 10.0, 60.0, 60.0], [0.0, 0.0, 400.0, 300.0], [100.0, 100.0, 200.0, 200.0]])]
    pooled = pooler(maps, boxes, [(512, 512)])
    assert pooled.shape == (3, 4, 7, 7)
    assert pooled.mean(dim=(1, 2, 3)).tolist() == [1.0, 2.0, 1.0]  # 50 and 100 px: under 112, stride 8


@pytest.mark.parametrize("architecture", ["fast-rcnn", "faster-rcnn"])
def test_detectors_with_a_pyramid_train_its_layers_and_reload_from_their_state(architecture):
    torch.manual_seed(0)
    model = build_detection_model(architecture, build_region_net("small", 3, 48), 2, PYRAMID_PARAMS).train()
    images = [torch.randn(3, 120, 160), torch.randn(3, 120, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0], [60.0, 20.0, 150.0, 110.0]]),
                "labels": torch.tensor([1, 2])}] * 2
    # regions under 112 px are pooled from the fine map, the whole image's from the trunk's: both levels learn
    proposals = [torch.tensor([[8.0, 12.0, 42.0, 48.0], [55.0, 25.0, 140.0, 115.0], [0.0, 0.0, 160.0, 120.0]])] * 2
    losses = model(images, proposals, targets) if architecture == "fast-rcnn" else model(images, targets)
    assert len(losses) == (2 if architecture == "fast-rcnn" else 4)
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.fpn.parameters())
    reloaded = build_detection_model(architecture, build_region_net("small", 3, 48), 2, PYRAMID_PARAMS)
    reloaded.load_state_dict(model.state_dict())  # strict: the same layers under the same names
    detections = detect(reloaded.eval(), images[:1], proposals[:1] if architecture == "fast-rcnn" else None,
                        Clock())[0]
    assert len(detections["boxes"]) > 0 and (detections["boxes"][:, 2:] <= torch.tensor([160.0, 120.0])).all()


@pytest.mark.parametrize("change, problem", [({"anchor_sizes": [16, 32]}, "a multiple of 3 sizes"),
                                             ({"pooling": "roi_pool"}, "the pyramid pools with roi_align")])
def test_pyramid_settings_it_cannot_use_are_a_config_error(change, problem):
    with pytest.raises(ConfigError, match=problem):
        build_detection_model("faster-rcnn", build_region_net("small", 3, 48), 2, {**PYRAMID_PARAMS, **change})


def test_networks_run_channels_last_with_the_default_layouts_outputs_and_state():
    torch.manual_seed(0)
    net = build_region_net("mobilenet_v2", 4, 96).eval()
    crops = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        expected = net.fc(net.pool5(crops))
        moved = on_device(net, "cpu")
        assert moved.trunk[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        assert moved.pool5(crops).is_contiguous(memory_format=torch.channels_last)  # NCHW input, NHWC activations
        torch.testing.assert_close(moved.fc(moved.pool5(crops)), expected, rtol=1e-4, atol=1e-4)
    model = build_detection_model("faster-rcnn", build_region_net("small", 4, 48), 3, DETECTOR_PARAMS).eval()
    image = [torch.randn(3, 120, 160)]
    expected = detect(model, image, None, Clock())[0]
    reloaded = build_detection_model("faster-rcnn", build_region_net("small", 4, 48), 3, DETECTOR_PARAMS)
    reloaded.load_state_dict(on_device(model, "cpu").state_dict())  # a channels-last state loads into NCHW layers
    for layers in (model, reloaded.eval()):
        found = detect(layers, image, None, Clock())[0]
        torch.testing.assert_close(found["boxes"], expected["boxes"], rtol=1e-4, atol=1e-3)
