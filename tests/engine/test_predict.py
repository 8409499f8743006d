"""`python -m worker.selftuning predict` labels images with a run's exported model, as plain
timm loaded from the export labels them."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.helpers import tiny_config
from worker.selftuning import RunData
from worker.selftuning.cli import main
from worker.selftuning.images import open_rgb
from worker.selftuning.loop import train
from worker.selftuning.predict import classify, load_exported

CPU = ["--device", "cpu", "--cpu-threads", "1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shapes_data: RunData) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(iterations=2), shapes_data, out)
    return out


def answers(out: Path) -> dict[str, str]:
    """What the run's own evaluation predicted for each test image, by path."""
    return {row["path"]: row["predicted"]
            for row in json.loads((out / "test_predictions.json").read_text())}


def test_a_run_folder_labels_its_test_images_as_the_run_scored_them(
        exported: Path, shapes_root: Path, tmp_path: Path, capsys):
    written = tmp_path / "labels" / "test.csv"  # its folder is made
    code = main(["predict", "--model", str(exported), "--images", str(shapes_root / "test"),
                 "--out", str(written), "--batch-size", "5", *CPU])
    assert code == 0
    with written.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "confidence", "margin"]
    assert {row["path"]: row["label"] for row in rows} == answers(exported)  # 12 images
    for row in rows:
        confidence, margin = float(row["confidence"]), float(row["margin"])
        assert 1 / 3 <= confidence <= 1 and 0 <= margin <= confidence
    assert capsys.readouterr().err.startswith("labeled 12 image(s) into 3 classes in ")


def test_the_checkpoint_zip_of_a_runs_page_labels_files_and_prints_them(
        exported: Path, tmp_path: Path, capsys):
    zipped = tmp_path / "run-1-checkpoint.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        for name in ("model.safetensors", "config.json", "training.json"):
            archive.write(exported / name, name)
    chosen = sorted(answers(exported))[::4]
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(chosen[0], folder / "photo")  # an image without an extension is one
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are left out, as uploads do
    code = main(["predict", "--model", str(zipped), "--images", *chosen[1:], str(folder), *CPU])
    printed = capsys.readouterr()
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(printed.out)))
    # The files in the order given, then the folder's images.
    assert [row["path"] for row in rows] == [*chosen[1:], str(folder / "photo")]
    assert [row["label"] for row in rows] == [answers(exported)[path]
                                              for path in (*chosen[1:], chosen[0])]
    assert printed.err.splitlines()[:2] == [
        "skipped 1 file(s):", "  1 × not an image (.txt); supported: JPEG, PNG, WebP, BMP, "
        f"TIFF or GIF (e.g. {folder / 'notes.txt'})"]
    assert printed.err.splitlines()[2].startswith("labeled 3 image(s) into 3 classes")


def test_images_in_memory_get_their_classes_in_order_with_the_files_probabilities(
        exported: Path, capsys):
    """`classify` (the web's "Try the model") labels decoded images as `predict` labels the
    files: the same class, the same probability, the rest of the classes after it."""
    paths = sorted(answers(exported))[::3]
    model = load_exported(exported, torch.device("cpu"))
    top = classify(model, [model.transform(open_rgb(path)) for path in paths], k=5)
    assert main(["predict", "--model", str(exported), "--images", *paths, *CPU]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    for path, classes, row in zip(paths, top, rows, strict=True):
        assert len(classes) == 3  # every class, when fewer than asked for
        assert sorted(label for label, _ in classes) == ["circle", "square", "triangle"]
        probabilities = [probability for _, probability in classes]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert classes[0][0] == row["label"] == answers(exported)[path]
        assert probabilities[0] == pytest.approx(float(row["confidence"]), abs=1e-5)
        assert probabilities[0] - probabilities[1] == pytest.approx(float(row["margin"]),
                                                                     abs=1e-5)
    assert [len(classes) for classes in classify(
        model, [model.transform(open_rgb(paths[0]))], k=1)] == [1]


def test_an_image_far_longer_than_wide_is_labeled_without_resizing_all_of_it(
        exported: Path, tmp_path: Path, capsys):
    """A 4 kB PNG of 4,000,000 x 1 pixels (within the upload's pixel limit): timm's resize of
    the whole scaled it to 292 M pixels (MemoryError, a 500 on "Try the model"); the part its
    centre crop keeps is resized alone, as the engine's evaluation does. Beyond 64 crops'
    length only, and near enough to timm's whole resize there."""
    from PIL import Image

    model = load_exported(exported, torch.device("cpu"))
    size = model.preprocessing.image_size
    strip = tmp_path / "strip.png"
    Image.new("L", (4_000_000, 1), 128).save(strip)
    gray = tmp_path / "gray.png"
    Image.new("L", (40, 40), 128).save(gray)
    assert main(["predict", "--model", str(exported), "--images", str(strip), str(gray),
                 *CPU]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["path"] for row in rows] == [str(strip), str(gray)]
    assert rows[0]["label"] == rows[1]["label"]  # one grey, cut either way
    assert model.pixels(open_rgb(strip)).shape == (3, size, size)
    assert torch.equal(model.pixels(open_rgb(strip)), model.pixels(open_rgb(gray)))

    # Just past 64 crops long: the crop's part resized alone, near the whole resized (noise,
    # the worst case: a pixel may differ by a few levels where the filter's positions round).
    rng = np.random.default_rng(3)
    wide = Image.fromarray(rng.integers(0, 256, (3, 3 * 65 * 2 + 1, 3), dtype=np.uint8))
    tall = wide.transpose(Image.Transpose.ROTATE_90)
    for image in (wide, tall):
        assert (model.pixels(image) - model.transform(image)).abs().mean() < 0.03
    square = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    assert torch.equal(model.pixels(square), model.transform(square))  # timm's own


@pytest.mark.parametrize(("damage", "message"), [
    ({"model.safetensors": b"junk"}, "model.safetensors does not load as timm's "
     "'test_efficientnet' with 3 classes: Error while deserializing header"),
    ({"config.json": b"{"}, "config.json is not a run's export (JSONDecodeError: "),
    ({"config.json": json.dumps({"architecture": "no_such_net", "num_classes": 3,
                                 "label_names": ["a", "b", "c"], "pretrained_cfg": {}}).encode()},
     "model.safetensors does not load as timm's 'no_such_net' with 3 classes: Unknown model"),
    ({"config.json": json.dumps({"architecture": "test_efficientnet", "num_classes": 3,
                                 "label_names": ["a"], "pretrained_cfg": {}}).encode()},
     "config.json names 1 labels for 3 classes"),
])
def test_an_export_that_does_not_load_is_one_line(exported: Path, shapes_root: Path,
                                                  tmp_path: Path, capsys, damage, message):
    model = tmp_path / "model"
    shutil.copytree(exported, model, ignore=shutil.ignore_patterns("state"))
    for name, content in damage.items():
        (model / name).write_bytes(content)
    code = main(["predict", "--model", str(model), "--images", str(shapes_root / "test"), *CPU])
    printed = capsys.readouterr()
    assert code == 2 and printed.out == ""
    assert printed.err.startswith("error: " + message) and len(printed.err.splitlines()) == 1


@pytest.mark.parametrize(("given", "message"), [
    ({"model": "empty"}, "--model {tmp}/empty has no config.json or model.safetensors: give a "
     "run's --out folder, the checkpoint zip a run's page downloads, or a folder with its "
     "config.json and model.safetensors"),
    ({"model": "notes.txt"}, "--model {tmp}/notes.txt is not a zip or a folder: give a run's"),
    ({"images": "nowhere"}, "--images {tmp}/nowhere does not exist"),
    ({"images": "empty"}, "no image in --images {tmp}/empty"),
    ({"out": "empty"}, "--out {tmp}/empty is a folder: give the CSV file to write"),
    ({"batch": "0"}, "--batch-size 0: give 1 or more"),
    ({"images": "notes.txt"}, "none of the 1 file(s) given opens as an image (e.g. "
     "{tmp}/notes.txt: not an image Pillow can read (UnidentifiedImageError))"),
])
def test_a_mistake_is_one_line_and_writes_nothing(exported: Path, shapes_root: Path,
                                                  tmp_path: Path, capsys, given, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    model = tmp_path / given["model"] if "model" in given else exported
    images = tmp_path / given["images"] if "images" in given else shapes_root / "test"
    out = tmp_path / given.get("out", "labels.csv")
    code = main(["predict", "--model", str(model), "--images", str(images), "--out", str(out),
                 "--batch-size", given.get("batch", "8"), *CPU])
    printed = capsys.readouterr().err
    assert code == 2
    assert printed.startswith("error: " + message.format(tmp=tmp_path))
    assert len(printed.splitlines()) == 1
    assert not (tmp_path / "labels.csv").exists()
