"""Backbones made for one input size (ViT, DeiT, Swin, ...) and two-headed distilled models are
refused before training by `check_image_size`, which agrees with what training would do."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import timm.models._builder
import torch
from safetensors.torch import save_file

from tests.engine.helpers import tiny_config
from worker.selftuning import RunData, train
from worker.selftuning.backbones import BackboneError, check_image_size, create_backbone


@pytest.fixture(autouse=True)
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check must work offline: any attempt to load pre-trained weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("check_image_size tried to load pre-trained weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)


@pytest.mark.parametrize(("name", "size"), [
    ("vit_tiny_patch16_224", 224),
    ("swin_tiny_patch4_window7_224", 224),
    ("vit_base_patch16_384", 384),
    ("vit_tiny_patch16_224.augreg_in21k", 224),
])
def test_fixed_size_models_are_refused_at_another_size_and_accepted_at_theirs(name, size):
    check_image_size(name, size)
    for other in (64, 32, size + 32):
        with pytest.raises(BackboneError) as caught:
            check_image_size(name, other)
        assert str(caught.value) == (
            f"{name} takes {size} px images only: set image_size to {size}"
        )


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "levit_128"])
def test_two_headed_distilled_models_are_refused(name):
    with pytest.raises(BackboneError, match="two classifier heads .* not supported"):
        check_image_size(name, 224)


def test_size_free_models_pass_and_too_small_images_are_refused():
    for name, size in (("tf_efficientnet_lite0", 64), ("test_efficientnet", 32),
                       ("mobilenetv2_100", 64), ("resnet18", 32), ("convnext_atto", 32)):
        check_image_size(name, size)
    # The stem and the downsampling leave nothing for the last 2x2 convolution. torch's own
    # words for that differ between versions (2.14: "Kernel size can't be greater ...",
    # 2.11: "Output size is too small"), so only that they are passed on is checked.
    with pytest.raises(BackboneError, match=r"^convnext_atto cannot take 16 px images \(.+\): "
                                            r"choose another image_size; its default is 224$"):
        check_image_size("convnext_atto", 16)


def test_a_fixed_size_config_with_dynamic_image_size_takes_other_sizes():
    # timm's config says 160 px only, but the model is built with dynamic_img_size.
    check_image_size("test_vit", 32)
    with pytest.raises(BackboneError, match=r"test_vit cannot take 40 px images .*divisible"):
        check_image_size("test_vit", 40)


def test_unknown_backbones_are_refused():
    with pytest.raises(BackboneError, match="unknown backbone 'no_such_net'"):
        check_image_size("no_such_net", 64)


def test_a_local_weight_file_is_checked_as_its_architecture(tmp_path: Path):
    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit", num_classes=3).state_dict(), str(path))
    check_image_size(f"test_vit:{path}", 32)
    with pytest.raises(BackboneError, match="test_vit cannot take 40 px"):
        check_image_size(f"test_vit:{path}", 40)


@pytest.mark.parametrize(("name", "size"), [
    ("vit_tiny_patch16_224", 64),   # fixed 224: the first step fails
    ("test_vit", 32),               # dynamic: trains
    ("test_vit", 40),               # not a multiple of the patch: fails
    ("test_efficientnet", 32),      # any size: trains
])
def test_the_check_agrees_with_a_real_forward_pass(name, size):
    try:
        check_image_size(name, size)
        accepted = True
    except BackboneError:
        accepted = False
    model = create_backbone(name, 3, pretrained=False).train()
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, size, size))
        runs = True
    except (AssertionError, RuntimeError):
        runs = False
    assert accepted == runs


def test_what_the_check_refuses_fails_in_training_and_what_it_accepts_trains(
    tmp_path: Path, shapes_data: RunData
):
    refused = tiny_config(backbone="vit_tiny_patch16_224", image_size=32, iterations=1)
    with pytest.raises(BackboneError):
        check_image_size(refused.backbone, refused.image_size)
    with pytest.raises(AssertionError, match=r"Input height \(32\) doesn't match model \(224\)"):
        train(refused, shapes_data, tmp_path / "vit")

    distilled = tiny_config(backbone="deit_tiny_distilled_patch16_224", image_size=224,
                            iterations=1)
    with pytest.raises(BackboneError):
        check_image_size(distilled.backbone, distilled.image_size)
    with pytest.raises(BackboneError, match="not a linear layer"):
        train(distilled, shapes_data, tmp_path / "deit")

    accepted = tiny_config(backbone="test_vit", image_size=32, iterations=2, eval_interval=100,
                           checkpoint_interval=100)
    check_image_size(accepted.backbone, accepted.image_size)
    metrics = train(accepted, shapes_data, tmp_path / "test_vit")
    assert metrics["steps"] == 2
