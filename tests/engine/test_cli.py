"""The command line trains a run from a dataset folder and prints the final metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.helpers import write_shapes_dataset
from worker.selftuning.cli import main, parse_budget

ROOT = Path(__file__).resolve().parents[2]


def test_cli_trains_with_a_held_out_test_split(tmp_path: Path, capsys):
    data = write_shapes_dataset(tmp_path / "data", train_per_class=8, with_test=False)
    code = main(["train", "--data", str(data), "--method", "fine-tune", "--budget", "0.5",
                 "--iterations", "2", "--image-size", "32", "--backbone", "test_efficientnet",
                 "--no-pretrained", "--device", "cpu", "--cpu-threads", "1",
                 "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "no test/ split: holding out 6 labeled images" in printed
    final = json.loads(printed.strip().splitlines()[-1].removeprefix("final "))
    assert 0 <= final["test_top1"] <= 1
    training = json.loads((tmp_path / "out" / "training.json").read_text())
    assert training["budget"]["labeled_per_class"] == [3, 3, 3]  # half of the 6 kept


def test_cli_rejects_a_bad_budget_with_a_message(tmp_path: Path, capsys):
    code = main(["train", "--data", str(tmp_path), "--budget", "lots",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "budget 'lots'" in capsys.readouterr().err


def test_module_entry_point_shows_usage():
    result = subprocess.run([sys.executable, "-m", "worker.selftuning", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "train" in result.stdout


@pytest.mark.parametrize(("text", "label"), [("0.05", "5%"), ("15%", "15%"),
                                             ("4/class", "4/class"), ("all", "all")])
def test_budget_spellings(text, label):
    assert parse_budget(text).label == label
