"""Helpers for the engine tests: synthetic image datasets and tiny run configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from worker.selftuning import RunConfig, RunData

CLASS_COLOURS = {"circle": (220, 40, 40), "square": (40, 180, 60), "triangle": (40, 70, 220)}
SHARED_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def draw_shape(kind: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A coloured shape on a noisy background: easy enough for a tiny model to learn."""
    width, height = size
    noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 60, (height, width, 3))
    image = Image.fromarray(noise.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    side = min(width, height) * rng.uniform(0.5, 0.8)
    left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
    box = (left, top, left + side, top + side)
    colour = CLASS_COLOURS[kind]
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left, top + side), (left + side, top + side), (left + side / 2, top)],
                     fill=colour)
    return image


def write_shapes_dataset(root: Path, train_per_class: int = 10, test_per_class: int = 4,
                         unlabeled: int = 4, with_test: bool = True, seed: int = 0) -> Path:
    """train/<class>/*.png, test/<class>/*.png and unlabeled/*.png of random sizes."""
    rng = random.Random(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        if split == "test" and not with_test:
            continue
        for kind in CLASS_COLOURS:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = (rng.randint(28, 48), rng.randint(28, 48))
                draw_shape(kind, size, rng).save(folder / f"{kind}_{i:03d}.png")
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    for i in range(unlabeled):
        kind = rng.choice(sorted(CLASS_COLOURS))
        draw_shape(kind, (36, 36), rng).save(root / "unlabeled" / f"u_{i:03d}.png")
    return root


def tiny_config(**overrides: object) -> RunConfig:
    """A run that takes seconds on a CPU: a tiny random-init timm model at 32 px."""
    values = {
        "method": "self-tuning",
        "backbone": "test_efficientnet",
        "pretrained": False,
        "image_size": 32,
        "batch_size": 4,
        "unlabeled_batch_size": 4,
        "iterations": 6,
        "lr": 0.01,
        "queue_size": 4,
        "projector_dim": 16,
        "eval_interval": 3,
        "checkpoint_interval": 3,
        "log_interval": 2,
        "num_workers": 0,
        "device": "cpu",
        # One thread: these models are too small to gain from two, and a second thread
        # only waits on a loaded machine.
        "cpu_threads": 1,
    }
    values.update(overrides)
    return RunConfig(**values)


def predicted_classes(out: Path, data: RunData) -> list[int]:
    """The class index the run's exported model gave each test image, from
    test_predictions.json (which names them), in `data.test`'s order."""
    rows = json.loads((out / "test_predictions.json").read_text())
    assert [row["path"] for row in rows] == [path for path, _ in data.test]
    return [data.class_names.index(row["predicted"]) for row in rows]
