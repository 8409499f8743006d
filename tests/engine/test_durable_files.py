"""Durable files of the engine: checkpoints and decoded-image caches are synced before their
rename, survive a crash (or a run survives a bad one), and the temporaries of killed writers
are swept without touching those still being written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.helpers import tiny_config
from tests.support import PROJECT_ROOT, small_disk
from worker.selftuning import RunData, train
from worker.selftuning.checkpoint import (
    CheckpointUnreadable,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)
from worker.selftuning.files import checkpoint_path, host_tag, temporary_path, write_json
from worker.selftuning.images import Preprocessing, decode_all

DAYS_AGO = time.time() - 3 * 24 * 3600
HOUR_AGO = time.time() - 3600
MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child.pid
    child.kill()
    child.wait()


def touch(path: Path, mtime: float | None = None, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def temporaries(folder: Path, live: int) -> dict[str, Path]:
    """Temporary files as the engine names them, one for each case of the clean-up."""
    other_host = "another-host"
    return {
        "dead writer here": touch(folder / f".train-40-ab.npy.{dead_pid()}.{host_tag()}.tmp"),
        "live writer here": touch(folder / f".train-40-cd.npy.{live}.{host_tag()}.tmp"),
        "other host, recent": touch(folder / f".eval-32-ef.npy.{live}.{other_host}.tmp",
                                    HOUR_AGO),
        "other host, old": touch(folder / f".eval-32-01.npy.{live}.{other_host}.tmp", DAYS_AGO),
        "old name, recent": touch(folder / f"train-40-23.{dead_pid()}.tmp", HOUR_AGO),
        "old name, old": touch(folder / f"train-40-45.{dead_pid()}.tmp", DAYS_AGO),
    }


ABANDONED = {"dead writer here", "other host, old", "old name, old"}


# --- the decoded-image cache -----------------------------------------------------------------


def test_decoding_removes_abandoned_temporaries_and_redoes_a_truncated_cache(
    tmp_path: Path, shapes_root: Path, live_pid: int
) -> None:
    paths = [str(path) for path in sorted((shapes_root / "test").rglob("*.png"))]
    preprocessing = Preprocessing(image_size=32, **MEAN_STD)
    temps = temporaries(tmp_path, live_pid)
    first = decode_all(paths, "eval", preprocessing, tmp_path)
    expected = np.array(first.array)
    for case, path in temps.items():
        assert path.exists() == (case not in ABANDONED), case
    assert not list(tmp_path.glob(f"*.{os.getpid()}.*tmp"))

    # What a power loss before the data reached the disk leaves: the name, cut short.
    target = first.path
    del first
    target.write_bytes(target.read_bytes()[:200])
    again = decode_all(paths, "eval", preprocessing, tmp_path)
    assert np.array_equal(again.array, expected)


DECODE_ON_A_FULL_DISK = """
import sys
from worker.selftuning.images import Preprocessing, decode_all
paths, cache = sys.argv[2:], sys.argv[1]
try:
    decode_all(paths, "train", Preprocessing(128, (0.5,) * 3, (0.5,) * 3), cache)
except OSError as exc:
    print(exc)
small = decode_all(paths[:2], "train", Preprocessing(32, (0.5,) * 3, (0.5,) * 3), cache)
print("then", len(small))
"""


def test_a_cache_that_does_not_fit_on_the_disk_is_a_clear_error_not_a_crash(
    tmp_path: Path, shapes_root: Path
) -> None:
    """On a real 1 MiB file system, 46 squares of 146 px (2.9 MiB) do not fit. Writing into a
    sparse memory-mapped file killed the process with SIGBUS (a worker, on every retry)."""
    paths = [str(path) for path in sorted(shapes_root.rglob("*.png"))]
    with small_disk(tmp_path / "disk", "1m") as disk:
        done = subprocess.run([sys.executable, "-c", DECODE_ON_A_FULL_DISK, str(disk), *paths],
                              capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
        assert done.returncode == 0, (done.returncode, done.stderr)
        error, then = done.stdout.splitlines()
        assert "[Errno 28] not enough disk space for the decoded images of 46 files" in error
        assert "3 MiB needed, 1 MiB free" in error
        # Nothing of it stays to fill the disk: the smaller cache after it fits.
        assert then == "then 2"
        assert [path.name.split("-")[0] for path in disk.iterdir()] == ["train"]


# --- checkpoints ---------------------------------------------------------------------------


def test_a_checkpoint_is_synced_before_its_rename_and_its_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        name = os.readlink(f"/proc/self/fd/{descriptor}")
        calls.append(f"fsync {Path(name).name}")
        real_fsync(descriptor)

    def replace(source, target) -> None:
        calls.append(f"replace {Path(source).name} -> {Path(target).name}")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = checkpoint_path(tmp_path)
    save_checkpoint(path, {"step": 1})
    temporary = temporary_path(path).name
    assert calls == [f"fsync {temporary}", f"replace {temporary} -> checkpoint.pt",
                     "fsync state"]

    calls.clear()
    save_checkpoint(path, {"step": 2})
    assert calls[0] == f"fsync {temporary}" and calls[-2:] == [
        f"replace {temporary} -> checkpoint.pt", "fsync state"]
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(previous_path(path))["step"] == 1


def test_saving_removes_temporaries_of_dead_writers_only(tmp_path: Path, live_pid: int) -> None:
    path = checkpoint_path(tmp_path)
    dead = touch(path.parent / f".checkpoint.pt.{dead_pid()}.{host_tag()}.tmp")
    live = touch(path.parent / f".checkpoint.pt.{live_pid}.{host_tag()}.tmp")
    old_format = touch(path.parent / f".checkpoint.pt.{dead_pid()}.tmp", DAYS_AGO)
    save_checkpoint(path, {"step": 1})
    assert not dead.exists() and not old_format.exists()
    assert live.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["checkpoint.pt", live.name])


def test_a_checkpoint_does_not_make_again_a_run_folder_deleted_meanwhile(tmp_path: Path) -> None:
    """A worker paused through its run's delete made the folder again on its next save (a
    27 MB checkpoint nobody would ever remove): the run's folder is made when training
    starts, and a later save only makes its own `state` folder inside it."""
    out_dir = tmp_path / "runs" / "7"
    out_dir.mkdir(parents=True)
    path = checkpoint_path(out_dir)
    save_checkpoint(path, {"step": 1})
    shutil.rmtree(out_dir)
    with pytest.raises(FileNotFoundError, match=f"the output folder {out_dir} is gone"):
        save_checkpoint(path, {"step": 2})
    assert not out_dir.exists()


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_a_clear_error_and_keeps_the_last_ones(
    tmp_path: Path
) -> None:
    """On a real 3 MiB file system holding two 1 MiB checkpoints, a 4 MiB one does not fit.
    torch said only `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos
    11073408 vs 11073304`."""
    with small_disk(tmp_path / "disk", "3m") as disk:
        path = checkpoint_path(disk)
        for step in (1, 2):
            save_checkpoint(path, {"step": step, "model": torch.zeros(256, 1024)})
        with pytest.raises(OSError) as raised:
            save_checkpoint(path, {"step": 3, "model": torch.zeros(1024, 1024)})
        assert raised.value.errno == errno.ENOSPC
        message = str(raised.value)
        assert message.startswith(f"[Errno 28] not enough disk space for the training state "
                                  f"(checkpoint) in {path.parent}: 4 MiB needed, "), message
        assert message.endswith(" MiB free; free some space and start the run again"), message
        assert sorted(p.name for p in path.parent.iterdir()) == [
            "checkpoint.previous.pt", "checkpoint.pt"]  # no temporary left to fill the disk
        assert load_checkpoint(path)["step"] == 2
        assert load_checkpoint(previous_path(path))["step"] == 1


def test_a_checkpoint_that_fails_for_another_reason_on_a_nearly_full_disk_says_that_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error is not a full disk, even where the disk could not have held the state.
    The disk is real (3 MiB); the I/O error is simulated, as a failing device cannot be made
    here."""
    def failing_save(obj: object, handle: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with small_disk(tmp_path / "disk", "3m") as disk:
        path = checkpoint_path(disk)
        save_checkpoint(path, {"step": 1, "model": torch.zeros(256, 1024)})
        monkeypatch.setattr(torch, "save", failing_save)
        with pytest.raises(OSError) as raised:
            save_checkpoint(path, {"step": 2, "model": torch.zeros(1024, 1024)})  # 4 MiB
        assert (raised.value.errno, raised.value.strerror) == (errno.EIO, "Input/output error")
        assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]
        assert load_checkpoint(path)["step"] == 1


def test_a_truncated_checkpoint_resumes_from_the_previous_one(tmp_path: Path,
                                                              shapes_data: RunData) -> None:
    config = tiny_config(iterations=6, checkpoint_interval=3, eval_interval=100)
    train(config, shapes_data, tmp_path / "straight")
    out = tmp_path / "crashed"
    train(config, shapes_data, out)
    state = checkpoint_path(out)
    assert load_checkpoint(previous_path(state))["step"] == 3
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    events: list[dict] = []
    train(config, shapes_data, out, on_event=events.append)

    assert events[0]["type"] == "started" and events[0]["resumed_from_step"] == 3
    straight = torch.load(checkpoint_path(tmp_path / "straight"), weights_only=True)["model"]
    again = torch.load(state, weights_only=True)["model"]
    assert all(torch.equal(straight[key], again[key]) for key in straight)


def test_a_checkpoint_without_a_readable_copy_is_set_aside_so_the_run_starts_over(
    tmp_path: Path, shapes_data: RunData
) -> None:
    config = tiny_config(iterations=4, checkpoint_interval=2, eval_interval=100)
    train(config, shapes_data, tmp_path)
    state = checkpoint_path(tmp_path)
    state.write_bytes(b"")  # what a power loss before the data was written leaves
    previous_path(state).write_bytes(state.read_bytes()[:10])

    with pytest.raises(CheckpointUnreadable, match="cannot be read .*EOFError"):
        load_checkpoint(state)
    assert not state.exists() and not previous_path(state).exists()
    assert (state.parent / "checkpoint.pt.corrupt").is_file()

    # A run that meets such a checkpoint starts again from step 0, in the same attempt.
    state.write_bytes(b"")
    events: list[dict] = []
    train(config, shapes_data, tmp_path, on_event=events.append)
    assert events[0]["type"] == "started" and events[0]["resumed_from_step"] is None
    assert "cannot be read" in events[0]["checkpoint_unreadable"]
    assert load_checkpoint(state)["step"] == 4


def test_an_io_error_is_not_taken_for_a_corrupt_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = checkpoint_path(tmp_path)
    save_checkpoint(path, {"step": 1})

    def failing_load(*args, **kwargs):
        raise OSError(5, "Input/output error")

    real_open = Path.open

    def failing_open(self, *args, **kwargs):
        if self == path:
            raise OSError(5, "Input/output error")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(torch, "load", failing_load)
    monkeypatch.setattr(Path, "open", failing_open)
    with pytest.raises(OSError, match="Input/output error"):
        load_checkpoint(path)
    assert path.is_file()


def test_previous_copy_is_used_only_when_the_latest_is_unreadable(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path)
    for step in (1, 2):
        save_checkpoint(path, {"step": step})
    assert load_checkpoint(path)["step"] == 2
    path.write_bytes(b"garbage" * 50)
    recovered = load_checkpoint(path)
    assert recovered["step"] == 1 and "checkpoint.pt" in recovered["recovery_reason"]
    assert path.is_file()  # only set aside when no copy can be read



@pytest.mark.parametrize("value", [
    {}, [], [[]], "café", {"a": [1, 2.5, [3, {"b": None}]], "m": [[1, 2], [3, 4]], "e": {}},
    {1: True, None: "x", 2.5: [], False: (1, 2)},
])
def test_json_files_read_back_as_json_dumps_writes_them(tmp_path: Path, value) -> None:
    write_json(tmp_path / "v.json", value)
    assert json.loads((tmp_path / "v.json").read_text()) == json.loads(json.dumps(value))


def test_json_files_refuse_nan_as_json_does(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json(tmp_path / "v.json", {"loss": [float("nan")]})
    assert not (tmp_path / "v.json").exists()
