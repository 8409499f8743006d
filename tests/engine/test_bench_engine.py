"""bench/engine.py runs the budgets x methods table on any dataset the command line takes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.engine.helpers import write_shapes_dataset

ROOT = Path(__file__).resolve().parents[2]
# Runs of seconds: a tiny random-init model at 32 px for one iteration, on one CPU thread.
TINY = ["--methods", "fine-tune", "--iterations", "1", "--backbone", "test_efficientnet",
        "--set", "pretrained=false", "--set", "image_size=32", "--set", "device=cpu",
        "--set", "cpu_threads=1", "--set", "num_workers=0", "--skip-micro"]


def _bench(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/engine.py", "--cache-dir",
                           str(tmp_path / "cache"), *arguments, *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_takes_count_per_class_budgets_and_a_dataset_without_a_test_split(
    tmp_path: Path,
):
    """"4/class" crashed on float(), a dataset without test/ crashed in the engine ("a run
    needs test images"), and the table was headed animal-mnist whatever --data named."""
    data = write_shapes_dataset(tmp_path / "shapes", train_per_class=4, with_test=False)
    runs = tmp_path / "runs"
    result = _bench(tmp_path, "--data", str(data), "--budgets", "2/class,all", "--out",
                    str(runs))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    heading = next(line for line in lines if line.startswith(f"{data}, preset quick"))
    # As the command line does: 1 of each class's 4 images held out and scored on.
    assert ("scored on a hold-out of 3 train images (the dataset has no test/ split)"
            in heading)
    assert "animal-mnist" not in result.stdout
    table = lines[lines.index(heading) + 2:]
    assert [line.split()[:4] for line in table[:2]] == [["2/class", "fine-tune", "0", "6"],
                                                        ["all", "fine-tune", "0", "9"]]
    for folder, labeled in (("fine-tune-2-per-class-seed0", 6), ("fine-tune-all-seed0", 9)):
        training = json.loads((runs / folder / "training.json").read_text())
        assert training["data"]["labeled_count"] == labeled
        assert training["data"]["test_count"] == 3


def test_bench_refuses_a_budget_the_command_line_refuses_before_running_anything(
    tmp_path: Path,
):
    data = write_shapes_dataset(tmp_path / "shapes", train_per_class=2, test_per_class=1)
    result = _bench(tmp_path, "--data", str(data), "--budgets", "0.05,4 classes")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "engine.py: error: budget '4 classes': use a fraction in (0, 1] such as 0.05, a "
        "percentage such as 5%, N/class such as 4/class, or all")
    assert result.stdout == ""


def test_bench_explains_itself():
    """--help crashed: the budgets' help says "5%", which argparse read as a format."""
    result = subprocess.run([sys.executable, "bench/engine.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "a percentage such as 5%," in " ".join(result.stdout.split())
