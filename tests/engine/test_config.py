"""The run config: JSON round trip, strict keys, range checks and presets."""

from __future__ import annotations

import json

import pytest

from worker.selftuning import PRESETS, RunConfig
from worker.selftuning.config import AUTO_LOADERS


def test_config_round_trips_through_json():
    config = RunConfig.from_preset("paper", method="fixmatch", seed=3, device="cuda:1")
    restored = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.lr_milestones == pytest.approx((6 / 27, 12 / 27, 18 / 27, 24 / 27))


def test_unknown_keys_are_rejected_by_name():
    values = RunConfig().to_dict() | {"learning_rate": 0.1, "epochs": 3}
    expected = r"unknown run config key\(s\) \['epochs', 'learning_rate'\]"
    with pytest.raises(ValueError, match=expected):
        RunConfig.from_dict(values)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "mixmatch"}, "method 'mixmatch' is not one of"),
        ({"lr": 0}, r"lr = 0(\.0)? must be in \(0"),
        ({"batch_size": 0}, "batch_size = 0 must be between 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"iterations": True}, "iterations must be an integer"),
        ({"temperature": -1.0}, "temperature = -1.0 must be in"),
        ({"ema_momentum": 1.5}, "ema_momentum = 1.5 must be in"),
        ({"fixmatch_threshold": "high"}, "fixmatch_threshold must be a finite number"),
        ({"lr_milestones": [0.7, 0.3]}, "lr_milestones .* must be increasing fractions"),
        ({"lr_milestones": [1.5]}, "lr_milestones .* must be increasing fractions"),
        ({"device": "gpu"}, "device 'gpu' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"pretrained": "yes"}, "pretrained must be true or false"),
        ({"image_size": 8}, "image_size = 8 must be between 16"),
        ({"labeled_query_view": "blurry"}, "labeled_query_view 'blurry' must be one of"),
        ({"num_workers": -2}, "num_workers = -2 must be between -1"),
    ],
)
def test_out_of_range_values_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(RunConfig().to_dict() | change)


def test_presets_and_overrides():
    assert set(PRESETS) >= {"quick", "paper"}
    quick = RunConfig.from_preset("quick")
    assert quick == RunConfig()
    assert quick.image_size <= 96 and quick.batch_size <= 32 and quick.iterations <= 1000
    paper = RunConfig.from_preset("paper", iterations=27_000)
    assert (paper.image_size, paper.batch_size, paper.unlabeled_batch_size) == (224, 24, 24)
    assert paper.milestone_steps() == [6000, 12000, 18000, 24000]
    assert (paper.lr, paper.head_lr_ratio, paper.projector_lr_ratio) == (0.001, 10.0, 1.0)
    # The authors' strong labeled view in `paper`; fine-tuning's crop + flip in `quick`.
    assert (paper.labeled_query_view, quick.labeled_query_view) == ("strong", "weak")
    # Both leave the number of loader processes to the device the run lands on.
    assert paper.num_workers == quick.num_workers == AUTO_LOADERS
    assert RunConfig.from_preset("quick", lr=0.003).lr == 0.003
    with pytest.raises(ValueError, match="preset 'slow' is not one of"):
        RunConfig.from_preset("slow")


def test_milestones_scale_with_the_number_of_iterations():
    paper = RunConfig.from_preset("paper", iterations=2700)
    assert paper.milestone_steps() == [600, 1200, 1800, 2400]
