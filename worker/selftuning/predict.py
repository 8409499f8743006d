"""Labels new images with an exported model: `python -m worker.selftuning predict`.

The model is loaded as plain timm loads it (the snippet on a run's page): its architecture,
classes and preprocessing from `config.json`, its weights from `model.safetensors`. So the
labels are the ones a user's own script would give, and a run's test images get the answers
its `test_predictions.json` records.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors import SafetensorError
from timm.data import create_transform, resolve_data_config
from torch import nn

from worker.selftuning.data import find_images
from worker.selftuning.export import prediction_row
from worker.selftuning.files import CONFIG_FILE, MODEL_FILE
from worker.selftuning.images import MOST_RESIZED_CROPS, Preprocessing, eval_crop, open_rgb
from worker.selftuning.metrics import top_classes

WHAT_A_MODEL_IS = (f"give a run's --out folder, the checkpoint zip a run's page downloads, or "
                   f"a folder with its {CONFIG_FILE} and {MODEL_FILE}")


@dataclass
class Exported:
    """A model as a run exported it, ready to label images."""

    model: nn.Module
    transform: object  # timm's evaluation transform: resize, centre crop, normalise
    label_names: list[str]
    white_level: int | None  # images of more than 8 bits are scaled by it, as in training
    preprocessing: Preprocessing  # the same numbers, for the engine's own eval crop

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """What the model is given for `image`: timm's evaluation transform. An image far
        longer than wide has only the part its centre crop keeps resized, as the engine's
        evaluation does it (`images.eval_crop`): timm resizes the whole, and a 4 kB PNG of
        4,000,000 x 1 pixels then needs hundreds of GB."""
        width, height = image.size
        if max(width, height) <= MOST_RESIZED_CROPS * min(width, height):
            return self.transform(image)
        crop = torch.from_numpy(eval_crop(image, self.preprocessing)).permute(2, 0, 1)
        return TF.normalize(crop.float().div(255), list(self.preprocessing.mean),
                            list(self.preprocessing.std))


@contextmanager
def exported_files(path: Path) -> Iterator[Path]:
    """The folder holding `config.json` and `model.safetensors`: `path` itself, or for a
    checkpoint zip a temporary folder they are unpacked into (gone after the block)."""
    if path.is_dir():
        missing = [name for name in (CONFIG_FILE, MODEL_FILE) if not (path / name).is_file()]
        if missing:
            raise ValueError(f"--model {path} has no {' or '.join(missing)}: {WHAT_A_MODEL_IS}")
        yield path
        return
    if not path.is_file():
        raise ValueError(f"--model {path} does not exist: {WHAT_A_MODEL_IS}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"--model {path} is not a zip or a folder: {WHAT_A_MODEL_IS}")
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as folder:
        names = set(archive.namelist())
        missing = [name for name in (CONFIG_FILE, MODEL_FILE) if name not in names]
        if missing:
            raise ValueError(f"--model {path} holds no {' or '.join(missing)}: "
                             f"{WHAT_A_MODEL_IS}")
        for name in (CONFIG_FILE, MODEL_FILE):
            (Path(folder) / name).write_bytes(archive.read(name))
        yield Path(folder)


def load_exported(folder: Path, device: torch.device) -> Exported:
    """The model of `folder` as `timm.create_model` builds it from the run's config.json."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        architecture, classes = config["architecture"], int(config["num_classes"])
        label_names, pretrained_cfg = list(config["label_names"]), dict(config["pretrained_cfg"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{CONFIG_FILE} is not a run's export ({type(exc).__name__}: "
                         f"{exc})") from None
    if len(label_names) != classes:
        raise ValueError(f"{CONFIG_FILE} names {len(label_names)} labels for {classes} classes")
    try:
        model = timm.create_model(
            architecture, pretrained=True, num_classes=classes,
            pretrained_cfg_overlay=dict(file=str(folder / MODEL_FILE), **pretrained_cfg))
    except (RuntimeError, SafetensorError) as exc:  # an unknown architecture, other weights
        raise ValueError(f"{MODEL_FILE} does not load as timm's {architecture!r} with "
                         f"{classes} classes: {str(exc).splitlines()[0]}") from None
    data_config = resolve_data_config({}, model=model)
    return Exported(model.eval().to(device), create_transform(**data_config), label_names,
                    config.get("input_white_level"),
                    Preprocessing.from_model(model, data_config["input_size"][-1]))


def image_files(paths: list[Path], skipped: dict[str, str]) -> list[Path]:
    """The images of `paths` (files, and every image inside folders, as an upload finds
    them); folders' other files go into `skipped` with the reason."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(find_images(path, skipped))
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"--images {path} does not exist")
    return found


@torch.inference_mode()
def predict(exported: Exported, files: list[Path], device: torch.device, batch_size: int,
            skipped: dict[str, str]) -> Iterator[dict[str, str]]:
    """One row per image that decodes, in the order given: the model's label, its
    probability and the margin to the runner-up (what predictions.csv holds); an image that
    does not decode goes into `skipped`."""
    batch: list[tuple[Path, torch.Tensor]] = []

    def label(batch: list[tuple[Path, torch.Tensor]]) -> Iterator[dict[str, str]]:
        images = torch.stack([tensor for _, tensor in batch]).to(device)
        probabilities = exported.model(images).float().softmax(dim=1)
        top = top_classes(probabilities)
        for (path, _), values, indices in zip(batch, top.values.tolist(),
                                              top.indices.tolist(), strict=True):
            yield prediction_row(str(path), values, indices, exported.label_names)

    for path in files:
        try:
            image = open_rgb(path, white_level=exported.white_level)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a damaged file
            skipped[str(path)] = f"not an image Pillow can read ({type(exc).__name__})"
            continue
        batch.append((path, exported.pixels(image)))
        if len(batch) == batch_size:
            yield from label(batch)
            batch = []
    if batch:
        yield from label(batch)


@torch.inference_mode()
def classify(exported: Exported, pixels: Sequence[torch.Tensor], k: int
             ) -> list[list[tuple[str, float]]]:
    """Each image's `k` most likely classes (every class when there are fewer) with their
    probabilities, most likely first, the images given as the model's evaluation transform
    makes them (`exported.pixels(image)`, as `predict` sends files), in one batch."""
    device = next(exported.model.parameters()).device
    batch = torch.stack(list(pixels)).to(device)
    top = top_classes(exported.model(batch).float().softmax(dim=1), k)
    return [[(exported.label_names[index], probability)
             for probability, index in zip(values, indices, strict=True)]
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
