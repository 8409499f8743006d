"""The files a finished run leaves for users: a plain timm model and its reports."""

from __future__ import annotations

import os
import platform
from importlib import metadata as package_metadata
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from worker.selftuning.files import (
    CONFIG_FILE,
    MODEL_FILE,
    new_file_mode,
    replace_csv,
    write_json,
)
from worker.selftuning.images import Preprocessing
from worker.selftuning.metrics import TopClasses


def architecture_of(model: nn.Module) -> str:
    return str(model.pretrained_cfg["architecture"])


def export_model(
    out_dir: Path, model: nn.Module, class_names: list[str], preprocessing: Preprocessing
) -> None:
    """`model.safetensors` (the state dict of `timm.create_model(arch, num_classes=C)`) and
    `config.json` in timm's hub layout, so `timm.create_model` loads it as it is."""
    state = {key: value.detach().cpu().contiguous().clone()
             for key, value in model.state_dict().items()}
    temporary = out_dir / f".{MODEL_FILE}.tmp"
    save_file(state, str(temporary), metadata={"format": "pt"})
    # safetensors writes its files private (0600): the model is a download like the others,
    # so it gets the mode any new file gets here (0644 under the usual umask).
    os.chmod(temporary, new_file_mode(out_dir))
    os.replace(temporary, out_dir / MODEL_FILE)
    write_json(out_dir / CONFIG_FILE, {
        "architecture": architecture_of(model),
        "num_classes": len(class_names),
        "num_features": int(model.num_features),
        "label_names": list(class_names),
        "pretrained_cfg": preprocessing.pretrained_cfg(len(class_names)),
        # Images of more than 8 bits were scaled by this before training (pixels.to_8_bit):
        # scale yours the same way, e.g. 12-bit values by 255 / 4095.
        **({"input_white_level": preprocessing.white_level}
           if preprocessing.white_level not in (None, 255) else {}),
    })


# The columns of `prediction_row`, which every prediction file starts with.
PREDICTION_ROW_COLUMNS = ["path", "label", "confidence", "margin"]
PREDICTION_COLUMNS = [*PREDICTION_ROW_COLUMNS, "hidden_label"]


def prediction_row(path: str, probs: list[float], classes: list[int],
                   class_names: list[str]) -> dict[str, str]:
    """The columns every prediction file shares, from an image's top two classes: the
    predicted class name, its probability and the margin to the runner-up (the probability
    itself when the model has one class)."""
    margin = probs[0] - probs[1] if len(probs) > 1 else probs[0]
    return {"path": path, "label": class_names[classes[0]],
            "confidence": f"{probs[0]:.6f}", "margin": f"{margin:.6f}"}


def write_predictions(
    path: Path,
    paths: list[str],
    top: TopClasses,
    class_names: list[str],
    hidden: list[int | None],
) -> None:
    """One row per unlabeled image: predicted class name, its probability, the margin to
    the runner-up and, where the budget withheld the image's label, that label (empty for an
    image without one). The columns are the same for every run."""
    values, indices = top.values.tolist(), top.indices.tolist()
    rows = []
    for image, probs, classes, label in zip(paths, values, indices, hidden, strict=True):
        rows.append({**prediction_row(image, probs, classes, class_names),
                     "hidden_label": "" if label is None else class_names[label]})
    replace_csv(path, PREDICTION_COLUMNS, rows)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "numpy", "pillow", "safetensors"):
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
