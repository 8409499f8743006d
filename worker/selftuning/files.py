"""Files that survive a crash: written beside their target, synced, renamed over it; and the
temporaries a killed writer leaves, told apart from those still being written."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

# A temporary file whose writer cannot be checked (another host, or a name from before the
# host was part of it) counts as abandoned once untouched this long.
STALE_TEMPORARY_S = 24 * 3600.0

# What a finished run leaves in its output folder (worker.selftuning.export).
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_FILE = "training.json"
PREDICTIONS_FILE = "predictions.csv"
TEST_PREDICTIONS_FILE = "test_predictions.json"
# Made from the export when asked for (worker.selftuning.onnx_export).
ONNX_FILE = "model.onnx"
# `.<name>.<pid>.<host>.tmp`, or `<...>.<pid>.tmp` as written before the host was added.
_TEMPORARY = re.compile(r"\.(?P<pid>\d+)(?:\.(?P<host>[A-Za-z0-9_-]+))?\.tmp$")


def checkpoint_path(out_dir: Path) -> Path:
    """Where a run's training state lives in its output folder (here, torch-free, because
    the web asks whether a run has one to resume from)."""
    return Path(out_dir) / "state" / "checkpoint.pt"


def host_tag() -> str:
    """This machine's name as it goes into temporary file names."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "localhost"


def temporary_path(target: Path, *, one_of_several: bool = False) -> Path:
    """Where `target` is written before the rename: names the writing process and host, so
    a later clean-up can tell an abandoned file from one being written. `one_of_several`:
    the process may write several at once (a web's requests), each gets a name of its own."""
    several = f".{uuid.uuid4().hex}" if one_of_several else ""
    return target.with_name(f".{target.name}{several}.{os.getpid()}.{host_tag()}.tmp")


def reserve_disk_space(path: Path, what: str) -> None:
    """Give the file at `path` real disk blocks for its whole size, or raise a clear OSError
    (ENOSPC) saying how much `what` needs and how much is free. A memory-mapped file is
    sparse: a write into it that finds the disk full kills the process with SIGBUS instead
    of raising, which a queue worker would meet again on every retry."""
    size = path.stat().st_size
    with path.open("rb+") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return  # a file system that cannot reserve (EINVAL): write as before
            free = shutil.disk_usage(path.parent).free
            raise OSError(exc.errno, f"not enough disk space for {what} in {path.parent}: "
                          f"{size / 2**20:,.0f} MiB needed, {free / 2**20:,.0f} MiB free; "
                          "free some space and start the run again") from None


def new_file_mode(folder: Path) -> int:
    """The permission bits a file created in `folder` gets (0o666 less the umask), found by
    creating one: reading the umask means setting it, which other threads would see."""
    probe = folder / f".mode.{os.getpid()}.{host_tag()}.tmp"
    probe.touch()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def fsync_directory(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is all there is
    finally:
        os.close(descriptor)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    return True


def is_abandoned(path: Path, *, max_age_s: float = STALE_TEMPORARY_S,
                 now: float | None = None) -> bool:
    """Whether `path` is a temporary file whose writer is gone: a dead process of this host,
    or (when the writer cannot be checked) untouched for `max_age_s`."""
    match = _TEMPORARY.search(path.name)
    if match is None:
        return False
    pid, host = int(match["pid"]), match["host"]
    if host == host_tag() and pid != os.getpid() and not process_alive(pid):
        return True
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > max_age_s


def remove_abandoned_temporaries(folder: Path, *, max_age_s: float = STALE_TEMPORARY_S
                                 ) -> list[Path]:
    """Delete the temporary files in `folder` that `is_abandoned`; returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if entry.name.endswith(".tmp") and entry.is_file() and is_abandoned(
            entry, max_age_s=max_age_s
        ):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV file's columns and rows, as `replace_csv` takes them back."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def write_json(path: Path, value: object) -> None:
    """Write the file beside `path` and rename it over, so a reader never sees half of it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(readable_json(value) + "\n")
    os.replace(temporary, path)


def readable_json(value: object, depth: int = 0) -> str:
    """JSON indented by two spaces a level, as `json.dumps(indent=2)` writes it, except that a
    list of plain values (numbers, strings) stays on one line: a confusion matrix reads as
    rows, one line a class, where `indent=2` gave each count a line of its own (a million
    lines, 11 MB, at 1,000 classes; 3 MB now)."""
    inner, outer = "  " * (depth + 1), "  " * depth
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key if isinstance(key, str) else json.dumps(key))}: "
                 f"{readable_json(item, depth + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, list | tuple) and any(isinstance(item, dict | list | tuple)
                                               for item in value):
        items = [inner + readable_json(item, depth + 1) for item in value]
        return "[\n" + ",\n".join(items) + f"\n{outer}]"
    return json.dumps(value, allow_nan=False)


def replace_csv(path: Path, columns: list[str], rows: list[dict[str, object]]) -> None:
    """Write the file beside `path` and rename it over, so a reader never sees half of it.
    The header is written even without rows."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)
