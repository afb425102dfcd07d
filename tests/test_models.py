import pytest
import torch

from pipeline.errors import ConfigError, UserError
from pipeline.models import build_region_net
from pipeline.weights import torchvision_weights_file


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


@pytest.mark.parametrize("name, size", [("small", 48), ("alexnet", 227), ("vgg16", 224)])
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
        torchvision_weights_file("alexnet", "torchvision")
    message = str(caught.value)
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message


def test_missing_weights_path_is_named(tmp_path):
    with pytest.raises(UserError, match="nope.pth: backbone weights file not found"):
        torchvision_weights_file("alexnet", str(tmp_path / "nope.pth"))


def test_small_backbone_has_no_torchvision_weights():
    with pytest.raises(ConfigError, match="no torchvision weights"):
        torchvision_weights_file("small", "torchvision")
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_region_net("small", 6, 50)
