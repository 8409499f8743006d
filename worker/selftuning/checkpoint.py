"""The training-state checkpoint: everything needed to continue a run bit for bit."""

from __future__ import annotations

import errno
import os
import random
import shutil
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from worker.selftuning.files import (
    fsync_directory,
    remove_abandoned_temporaries,
    temporary_path,
)

CHECKPOINT_FORMAT = 1
# Fields that do not change what is computed, so a run may resume with other values.
RESUMABLE_CHANGES = {"eval_interval", "checkpoint_interval", "log_interval", "num_workers",
                     "device", "cpu_threads"}


class CheckpointUnreadable(ValueError):
    """No copy of the checkpoint can be read (truncated or corrupt, e.g. after a power loss).

    The unreadable files were renamed to `*.corrupt`, so the run starts again from step 0
    instead of failing on them at every attempt."""


def previous_path(path: Path) -> Path:
    """The checkpoint before the latest one, kept in case the latest cannot be read."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write the state next to the target, fsync it, keep the last checkpoint as the previous
    copy and rename the new one over the target, then fsync the folder: after a crash or a
    power loss the folder holds the old or the new checkpoint, whole.

    The folder above the checkpoint's own (the run's output folder) must exist: it is made
    when training starts, and gone since means the run was deleted, which a late save must
    not undo. A save that finds the disk full raises a plain OSError (ENOSPC) saying how much
    it needs; either way the checkpoints already there are left as they were."""
    try:
        path.parent.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, f"the output folder {path.parent.parent} is gone (deleted while "
            "training?): the training state is not saved, nor the folder made again") from None
    remove_abandoned_temporaries(path.parent)
    temporary = temporary_path(path)
    checkpoint = {"format": CHECKPOINT_FORMAT, "rng": capture_rng(), **state}
    try:
        try:
            with temporary.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, RuntimeError) as exc:
            temporary.unlink(missing_ok=True)  # first: what it took counts as free below
            _raise_if_disk_full(exc, path.parent, _storage_bytes(checkpoint))
            raise
        _keep_previous(path)
        os.replace(temporary, path)
        fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    """Load with `weights_only=True`: tensors and plain Python values, no code.

    When the checkpoint cannot be read, the previous copy is used; when no copy can be read
    the unreadable files are renamed aside and `CheckpointUnreadable` is raised. A failure to
    read the file at all (an I/O error) is raised as it is and leaves the files in place.
    """
    path = Path(path)
    remove_abandoned_temporaries(path.parent)
    problems, unreadable = [], []
    for candidate in (path, previous_path(path)):
        if not candidate.is_file():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
            _raise_if_unreadable_storage(candidate)
            problems.append(f"{candidate.name}: {type(exc).__name__}: {str(exc)[:200]}")
            unreadable.append(candidate)
            continue
        if not isinstance(state, dict):
            problems.append(f"{candidate.name}: holds a {type(state).__name__}, not a dict")
            unreadable.append(candidate)
            continue
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{candidate} has checkpoint format {state.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT}")
        if candidate != path:
            state["recovered_from"] = str(candidate)
            state["recovery_reason"] = "; ".join(problems)
        return state
    for candidate in unreadable:
        os.replace(candidate, candidate.with_name(candidate.name + ".corrupt"))
    if unreadable:
        fsync_directory(path.parent)
    raise CheckpointUnreadable(
        f"the checkpoint in {path.parent} cannot be read ({'; '.join(problems) or 'missing'}); "
        "it was renamed to *.corrupt, so training starts again from step 0"
    )


# Settings added after checkpoints were first written, with the value a run trained with
# before it had them: a checkpoint saved by an older release lacks the key (the database's
# copy of its run settings gained it in migration 0002, with the same value).
ADDED_SETTINGS = {"labeled_query_view": "strong"}


def check_compatible(saved_config: dict, config: dict, saved_fingerprint: str,
                     fingerprints: Collection[str], saved_counts: dict | None,
                     counts: dict[str, int],
                     what: str = "the checkpoint in this run folder") -> None:
    """A checkpoint continues only the same run: same data (one of the fingerprints the data
    answers to) and the same hyper-parameters. Settings are named first: another seed also
    draws other labeled images. Other data are told by their image counts (`RunData.counts`)
    where the run recorded them (checkpoints before 2026-12 did not)."""
    saved_config = {**ADDED_SETTINGS, **saved_config}
    changed = sorted(
        key for key in set(saved_config) | set(config)
        if key not in RESUMABLE_CHANGES and saved_config.get(key) != config.get(key)
    )
    if changed:
        raise ValueError(f"{what} was made with other settings ({', '.join(changed)}); use a "
                         "new output folder")
    if saved_fingerprint not in fingerprints:
        raise ValueError(f"{what} was made with other images or labels"
                         f"{_counts_then_and_now(saved_counts, counts)}; use a new output "
                         "folder")


def check_same_budget(saved_label: str | None, label: str | None,
                      what: str = "the checkpoint in this run folder") -> None:
    """A run folder takes only its own budget again: another that draws the same labeled
    images (4/class and 5 % of 80 a class) would train the same model and record it under
    the other's name. Runs that did not record theirs are not checked."""
    if saved_label is not None and label is not None and saved_label != label:
        raise ValueError(f"{what} was made with budget {saved_label}, not {label}; use a new "
                         "output folder")


def _counts_then_and_now(saved: dict | None, counts: dict[str, int]) -> str:
    """" (then 4 labeled, 8 unlabeled and 3 test images; now 8, 4 and 3: another label
    budget?)", or nothing where the run did not record its counts or they are the same."""
    keys = ("labeled_count", "unlabeled_count", "test_count")
    then = [saved.get(key) for key in keys] if isinstance(saved, dict) else [None]
    now = [counts[key] for key in keys]
    if None in then or then == now:
        return ""
    budget = (then[0] != now[0] and then[0] + then[1] == now[0] + now[1]
              and then[2] == now[2])
    return (f" (then {then[0]:,} labeled, {then[1]:,} unlabeled and {then[2]:,} test images; "
            f"now {now[0]:,}, {now[1]:,} and {now[2]:,}"
            f"{': another label budget?' if budget else ''})")


def capture_rng() -> dict:
    """Every global random generator's state, as tensors and plain values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937",
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _keep_previous(path: Path) -> None:
    """Make the current checkpoint the previous copy, by a hard link so the target keeps
    existing until the new file replaces it (no copy where links are not supported)."""
    if not path.is_file():
        return
    previous = previous_path(path)
    link = temporary_path(previous)
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        link.unlink(missing_ok=True)


def _storage_bytes(value: object) -> int:
    """About what `torch.save` writes for `value`: the bytes of the tensors' storages (each
    once), which dwarf the rest."""
    seen: dict[int, int] = {}

    def walk(item: object) -> None:
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            for element in item.values():
                walk(element)
        elif isinstance(item, list | tuple):
            for element in item:
                walk(element)

    walk(value)
    return sum(seen.values())


def _raise_if_disk_full(exc: BaseException, folder: Path, needed: int) -> None:
    """Raise a plain ENOSPC error for a save that failed on a full disk. torch reports its
    failed write as `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected
    pos ...`, the OSError that caused it only in the exception's context, if at all: with
    none to say, a disk with less free than the state needs is taken to be the cause. Any
    other OSError (an I/O error, a read-only file system) is left to say what it is."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.errno not in (errno.ENOSPC, errno.EDQUOT):
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if cause is not None or free < needed:
        raise OSError(errno.ENOSPC, f"not enough disk space for the training state "
                      f"(checkpoint) in {folder}: {needed / 2**20:,.0f} MiB needed, "
                      f"{free / 2**20:,.0f} MiB free; free some space and start the run "
                      "again") from None


def _raise_if_unreadable_storage(path: Path) -> None:
    """Re-raise an I/O error of the file system (the file may be fine once it is back)
    rather than calling the checkpoint corrupt: read it through once."""
    with path.open("rb") as handle:
        while handle.read(1 << 24):
            pass
