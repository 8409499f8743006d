"""Training views and the evaluation transform."""

from __future__ import annotations

import random

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
