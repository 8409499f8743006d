"""Training views and the evaluation transform."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from tests.engine.helpers import draw_shape
from worker.selftuning.augment import Normalize, ViewMaker, build_randaugment_ops
from worker.selftuning.images import Preprocessing, eval_crop, train_square

PREPROCESSING = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_posterize_to_zero_bits_gives_black_instead_of_crashing():
    # Why the guard exists: Pillow >= 13 refuses 0 bits (older Pillow gives black). The
    # engine allows pillow >= 10, so the outcome is checked, not Pillow's own behaviour.
    image = Image.new("RGB", (16, 16), (200, 120, 40))
    (posterize,) = build_randaugment_ops(PREPROCESSING, ["PosterizeIncreasing"])
    posterize.prob = 1.0
    posterize.magnitude, posterize.magnitude_std = 10, 0  # level 10 -> keep 0 bits
    assert posterize.level_fn(10, posterize.hparams) == (0,)

    result = posterize(image)

    assert result.size == image.size and result.getextrema() == ((0, 0),) * 3


def test_randaugment_with_magnitude_noise_asks_posterize_for_zero_bits_and_survives():
    maker = ViewMaker(PREPROCESSING)
    # timm's usual pool and magnitude noise around m=10 reach level 10, i.e. 0 bits, half
    # the time.
    maker.randaugment_ops = build_randaugment_ops(
        PREPROCESSING, ["PosterizeIncreasing", "Rotate", "Invert"], magnitude_std=0.5
    )
    posterize = maker.randaugment_ops[0]
    guarded, asked = posterize.aug_fn, []

    def recording(image, bits, **kwargs):
        asked.append(bits)
        return guarded(image, bits, **kwargs)

    posterize.aug_fn = recording
    square = np.asarray(draw_shape("circle", (36, 36), random.Random(0)))
    for seed in range(400):
        view = maker.strong(square, random.Random(seed))
        assert view.shape == (32, 32, 3) and view.dtype == np.uint8
    assert 0 in asked


def test_the_strong_view_draws_from_fixmatchs_pool():
    ops = build_randaugment_ops(PREPROCESSING)
    names = {op.name for op in ops}
    assert len(ops) == 14 and "Identity" in names
    assert not names & {"Invert", "SolarizeAdd", "PosterizeIncreasing"}
    posterize = next(op for op in ops if op.name.startswith("Posterize"))
    kept_bits = {posterize.level_fn(level / 2, posterize.hparams)[0] for level in range(21)}
    assert kept_bits == {4, 5, 6, 7, 8}  # never fewer than 4 bits, as in FixMatch
    rotate = next(op for op in ops if op.name == "Rotate")
    assert all(op.prob == 0.5 and op.magnitude_std == float("inf") for op in ops
               if op.name != "Identity")
    assert abs(rotate.level_fn(10, rotate.hparams)[0]) == 30
    translate = next(op for op in ops if op.name == "TranslateXRel")
    assert abs(translate.level_fn(10, translate.hparams)[0]) == pytest.approx(0.3)


def test_views_are_a_function_of_the_seed_and_two_draws_differ():
    maker = ViewMaker(PREPROCESSING)
    square = np.asarray(draw_shape("square", (36, 36), random.Random(1)))
    first = random.Random("run/0/5/1")
    again = random.Random("run/0/5/1")
    query, key = maker.strong(square, first), maker.strong(square, first)
    assert np.array_equal(query, maker.strong(square, again))
    assert not np.array_equal(query, key)
    assert maker.weak(square, random.Random(3)).shape == (32, 32, 3)


@pytest.mark.parametrize("size", [(50, 30), (31, 77), (32, 32), (200, 150)])
def test_eval_pixels_equal_timms_eval_transform_bitwise(size):
    image = draw_shape("triangle", size, random.Random(sum(size))).convert("RGB")
    pretrained_cfg = PREPROCESSING.pretrained_cfg(num_classes=3)
    transform = create_transform(**resolve_data_config(pretrained_cfg=pretrained_cfg))
    expected = transform(image)

    pixels = torch.from_numpy(eval_crop(image, PREPROCESSING))[None].permute(0, 3, 1, 2)
    ours = Normalize(PREPROCESSING.mean, PREPROCESSING.std)(pixels)[0]

    assert torch.equal(ours, expected)


def test_training_square_covers_the_crop_region():
    image = draw_shape("circle", (60, 40), random.Random(2))
    square = train_square(image, PREPROCESSING)
    assert square.shape == (PREPROCESSING.scale_size, PREPROCESSING.scale_size, 3)


@pytest.mark.parametrize("size", [(3000, 17), (23, 2500)])
def test_very_elongated_images_are_cut_as_timm_cuts_them(size):
    """Past MOST_RESIZED_CROPS only the centre crop's part is resized: the pixels of timm's
    whole resize and crop, within rounding (Pillow's filter windows fall a little otherwise
    when it enlarges: up to 20 levels at a few pixels of random noise)."""
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pretrained_cfg = PREPROCESSING.pretrained_cfg(num_classes=3)
    transform = create_transform(**resolve_data_config(pretrained_cfg=pretrained_cfg))
    expected = (transform(image) * torch.tensor(PREPROCESSING.std)[:, None, None]
                + torch.tensor(PREPROCESSING.mean)[:, None, None]) * 255
    ours = torch.from_numpy(eval_crop(image, PREPROCESSING)).permute(2, 0, 1).float()
    assert (ours - expected).abs().mean() < 0.5
    square = train_square(image, PREPROCESSING)
    assert square.shape == (PREPROCESSING.scale_size, PREPROCESSING.scale_size, 3)


def test_a_very_long_strip_decodes_in_little_memory(tmp_path):
    """A 2 KB PNG of 1,000,000 x 1 px passes the upload's pixel limit; resized whole at
    32 px it became a 36 x 36,000,000 strip (3.9 GB), at 224 px hundreds of GB."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (1_000_000, 1), (90, 160, 30)).save(path)
    script = (
        "import resource, sys\n"
        "from worker.selftuning.images import Preprocessing, _decode_one\n"
        "p = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "crops = [_decode_one(sys.argv[1], kind, p) for kind in ('eval', 'train')]\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(grown // 1024, [c.shape for c in crops], crops[0][0, 0].tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    grown_mb, described = done.stdout.split(" ", 1)
    assert int(grown_mb) < 200, done.stdout
    assert described.strip() == "[(32, 32, 3), (36, 36, 3)] [90, 160, 30]"
