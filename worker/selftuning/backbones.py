"""Backbones: timm models and where their pre-trained weights come from, offline first."""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from worker.selftuning.offline_weights import OFFLINE_WEIGHTS, installed_offline_backbones

DEFAULT_BACKBONE = "tf_efficientnet_lite0"


class BackboneError(ValueError):
    """A backbone that cannot be built or whose weights do not fit (message is for users)."""


# What timm loads from a model's hub repository (safetensors first, as timm does).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")


def hub_weights_problem(name: str, timeout_s: float = 3.0) -> str | None:
    """Why timm's hub weights of `name` cannot be had here, or None when they are in the
    local Hugging Face cache or the hub answers. Without them every run of the model would
    fail, each after the download's retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repository = getattr(cfg, "hf_hub_id", None)
    if repository:
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        if any(isinstance(try_to_load_from_cache(repository, file), str) for file in files):
            return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and they are not in the local cache"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                               timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return (f"the model hub ({constants.ENDPOINT}) cannot be reached from this server "
                f"({reason}) and they are not in its cache")
    return None


def create_backbone(name: str, num_classes: int, *, pretrained: bool = True) -> nn.Module:
    """A timm model with a fresh `num_classes` head, its weights taken from (in this order):
    a local `.safetensors` file, an installed offline weight package, or timm's hub download.

    `name` is a timm architecture, a path to a `.safetensors` file with timm's `config.json`
    beside it (what this engine exports), or `ARCH:PATH.safetensors`.
    """
    local = _local_weights(name)
    if local is not None:
        architecture, path, pretrained_cfg = local
        model = _create(architecture, pretrained=False, num_classes=num_classes)
        load_local_weights(model, path)
        model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg}
        return model
    if not pretrained or not timm.is_model(name):  # an unknown name says so, not "weights"
        return _create(name, pretrained=False, num_classes=num_classes)
    source = OFFLINE_WEIGHTS.get(name)
    weight_file = source.locate() if source else None
    if weight_file is not None:
        model = _create(name, pretrained=False)
        state = torch.load(weight_file, map_location="cpu", weights_only=True)
        load_in_order(model, state, source_name=str(weight_file))
        model.reset_classifier(num_classes)
        return model
    # Offline, timm's download retries for most of a minute before it gives up.
    if timm.is_model(name) and (problem := hub_weights_problem(name)):
        raise BackboneError(f"cannot get the pre-trained weights of {name!r}: {problem}. "
                            f"{_without_the_hub()}")
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as exc:  # noqa: BLE001 - any download failure means the same to a user
        raise BackboneError(
            f"could not get pre-trained weights for {name!r} ({type(exc).__name__}: {exc}). "
            f"{_without_the_hub()}"
        ) from exc


def _without_the_hub() -> str:
    return (f"Backbones that work offline here: {installed_offline_backbones()}; or train "
            "from scratch with pretrained=false, or give a local .safetensors file.")


def check_image_size(name: str, image_size: int) -> None:
    """Raise `BackboneError` (a ValueError) with a message for users when the backbone
    `name` (as `create_backbone` takes it) cannot train on `image_size` px square images:
    a model made for one input size only (timm's ViT, DeiT, Swin, ... at another size), a
    model that needs larger images, or one with two classifier heads (distilled DeiT, LeViT).

    Nothing is downloaded and no weights are allocated: the model is built on the meta device
    and one batch goes through it there, which checks every shape as training would.
    """
    local = _local_weights(name)
    architecture = local[0] if local is not None else name
    _check_image_size(architecture, int(image_size))


def check_forward_batch(name: str, image_size: int, batch: int) -> None:
    """Raise `BackboneError` when `batch` images of `image_size` px (what one training forward
    holds) cannot go through the backbone in training mode: batch norm needs more than one
    value per channel, so one image whose last feature map is 1x1 fails every step. Call
    after `check_image_size`, which has ruled out the size alone."""
    if batch >= 2:
        return
    local = _local_weights(name)
    architecture = local[0] if local is not None else name
    try:
        with torch.device("meta"):
            model = _create(architecture, pretrained=False, num_classes=2)
    except Exception:  # noqa: BLE001 - cannot build on meta: nothing to learn here
        return
    problem = _meta_forward_problem(model, int(image_size), batch=int(batch))
    if problem is not None:
        raise BackboneError(
            f"batch_size 1 at {image_size} px cannot train {architecture}: one image per "
            "step leaves its batch norm a single value per channel, which it cannot "
            "normalise; use batch_size 2 or more, or larger images"
        )


@functools.lru_cache(maxsize=128)
def _check_image_size(architecture: str, image_size: int) -> None:
    cfg = timm.models.get_pretrained_cfg(architecture) if timm.is_model(architecture) else None
    classifier = getattr(cfg, "classifier", None)
    if isinstance(classifier, (tuple, list)) and len(classifier) > 1:
        raise BackboneError(_two_heads(architecture))
    fixed = _fixed_size(cfg)
    try:
        with torch.device("meta"):
            model = _create(architecture, pretrained=False, num_classes=2)
    except BackboneError:
        raise
    except Exception:  # noqa: BLE001 - cannot build on meta: only timm's config can tell
        model = None
    if model is not None and not isinstance(model.get_classifier(), nn.Linear):
        raise BackboneError(_two_heads(architecture))
    if model is None:
        problem = None
    else:
        problem = _meta_forward_problem(model, image_size)
        if problem is None:  # it runs: some fixed-size configs take any size (dynamic_img_size)
            return
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    if fixed is not None and fixed != image_size and not (dynamic and problem is not None):
        raise BackboneError(
            f"{architecture} takes {fixed} px images only: set image_size to {fixed}"
        )
    if problem is not None:
        suggestion = fixed or (cfg.input_size[-1] if cfg and cfg.input_size else 224)
        raise BackboneError(
            f"{architecture} cannot take {image_size} px images ({problem}): choose another "
            f"image_size; its default is {suggestion}"
        )


def _fixed_size(cfg: object) -> int | None:
    """The one square input size a fixed-size model config states, else None."""
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return None
    input_size = getattr(cfg, "input_size", None) or ()
    if len(input_size) != 3:
        return None
    return int(input_size[-1])


def _two_heads(architecture: str) -> str:
    return (f"{architecture} has two classifier heads (a distilled model: class and "
            "distillation token), which is not supported: pick a model with one head, e.g. "
            "without 'distilled' in its name")


def _meta_forward_problem(model: nn.Module, image_size: int, batch: int = 2) -> str | None:
    """What goes wrong when `batch` images of `image_size` px go through `model` on the meta
    device, as in a training step; None when it works or the meta device cannot tell."""
    images = torch.empty(batch, 3, image_size, image_size, device="meta")
    model.train()
    try:
        with torch.no_grad():
            pooled_features(model, images)
            model(images)
    except NotImplementedError:
        return None  # an operation without a meta kernel: nothing learnt about the size
    except (AssertionError, RuntimeError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "meta" in message.lower():
            return None
        return message[:200]
    except Exception:  # noqa: BLE001 - anything else says nothing sure about the size
        return None
    return None


def load_in_order(
    model: nn.Module, source: Mapping[str, torch.Tensor], *, source_name: str = "weights"
) -> None:
    """Load `source` into `model` by position: the i-th tensor of one is the i-th of the other.

    Every tensor must be present with the same shape; the first mismatch is reported with
    both names, so a wrong architecture or a truncated file cannot load silently.
    """
    target = model.state_dict()
    if len(source) != len(target):
        # The architecture asked for: timm's class names are shared (mobilenetv2_100 is an
        # "EfficientNet"), so naming the class named the wrong model.
        architecture = (getattr(model, "pretrained_cfg", None) or {}).get(
            "architecture", type(model).__name__)
        raise BackboneError(
            f"{source_name} holds {len(source)} tensors but {architecture} has "
            f"{len(target)}: it was made for another architecture"
        )
    matched: OrderedDict[str, torch.Tensor] = OrderedDict()
    for index, ((target_key, target_value), (source_key, source_value)) in enumerate(
        zip(target.items(), source.items(), strict=True)
    ):
        if tuple(source_value.shape) != tuple(target_value.shape):
            raise BackboneError(
                f"{source_name}: tensor #{index} {source_key!r} has shape "
                f"{tuple(source_value.shape)} but {target_key!r} needs "
                f"{tuple(target_value.shape)}: it was made for another architecture"
            )
        matched[target_key] = source_value.to(target_value.dtype)
    model.load_state_dict(matched, strict=True)


def load_local_weights(model: nn.Module, path: Path) -> None:
    """Load a `.safetensors` state dict by name (timm's own keys) or else by position.

    The classifier is left as it is when its shape differs (a different number of classes).
    """
    _load_by_name_or_position(model, load_file(str(path)), source_name=str(path))


def check_local_weights(name: str) -> None:
    """Raise `BackboneError` when `name` is a local weight file that will not load into its
    architecture (a file made for another model, or an architecture named wrong), without
    reading a tensor: the file's header gives the shapes, the model is built on the meta
    device, and the same matching as `load_local_weights` runs on them."""
    local = _local_weights(name)
    if local is None:
        return
    architecture, path, _ = local
    try:
        with safe_open(str(path), framework="pt") as weights:
            keys = weights.keys()  # noqa: SIM118 - safe_open is not iterable
            shapes = {key: weights.get_slice(key).get_shape() for key in keys}
    except Exception as exc:  # noqa: BLE001 - any unreadable header means the same here
        raise BackboneError(f"{path} is not a readable .safetensors file ({exc})") from None
    with torch.device("meta"):
        model = _create(architecture, pretrained=False, num_classes=2)
        source = {key: torch.empty(shape) for key, shape in shapes.items()}
    try:
        _load_by_name_or_position(model, source, source_name=str(path))
    except RuntimeError as exc:  # load_state_dict's own shape complaint
        raise BackboneError(
            f"{path} does not fit {architecture}: {str(exc).splitlines()[-1].strip()}"
        ) from None


def _load_by_name_or_position(
    model: nn.Module, source: Mapping[str, torch.Tensor], *, source_name: str
) -> None:
    target = model.state_dict()
    head = _classifier_keys(model)
    usable = {
        key: value
        for key, value in source.items()
        if key in target and (key not in head or value.shape == target[key].shape)
    }
    needed = [key for key in target if key not in head]
    if all(key in usable for key in needed):
        model.load_state_dict(usable, strict=False)
        return
    load_in_order(model, source, source_name=source_name)


def feature_dim(model: nn.Module) -> int:
    """Size of the pooled feature that the classifier reads."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled feature vector, i.e. the classifier's input."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def reset_head(model: nn.Module) -> None:
    """Classifier weights N(0, 0.01), bias 0, as the method prescribes."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise BackboneError(
            f"{type(model).__name__}'s classifier is a {type(head).__name__}, not a linear layer"
        )
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)


def _classifier_keys(model: nn.Module) -> set[str]:
    prefixes = model.pretrained_cfg.get("classifier") or ()
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return {f"{prefix}.{suffix}" for prefix in prefixes for suffix in ("weight", "bias")}


def _create(name: str, **kwargs: object) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise BackboneError(f"unknown backbone {name!r}: not a timm architecture") from exc
        raise


def _local_weights(name: str) -> tuple[str, Path, dict] | None:
    """(architecture, file, pretrained_cfg overrides) for a local weight file, else None."""
    if not name.endswith(".safetensors"):
        return None
    architecture, _, location = name.rpartition(":") if ":" in name else ("", "", name)
    path = Path(location).expanduser()
    if not path.is_file():
        raise BackboneError(f"backbone weight file {path} does not exist")
    pretrained_cfg: dict = {}
    config_path = path.with_name("config.json")
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        architecture = architecture or config.get("architecture", "")
        saved = config.get("pretrained_cfg") or {}
        keep = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
        pretrained_cfg = {key: saved[key] for key in keep if key in saved}
    if not architecture:
        raise BackboneError(
            f"{path}: say which architecture it is, as ARCH:{path}, or put timm's config.json "
            "with an 'architecture' next to it"
        )
    return architecture, path, pretrained_cfg
