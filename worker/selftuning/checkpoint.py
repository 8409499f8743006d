"""The training-state checkpoint: everything needed to continue a run bit for bit."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = 1
# Fields that do not change what is computed, so a run may resume with other values.
RESUMABLE_CHANGES = {"eval_interval", "checkpoint_interval", "log_interval", "num_workers",
                     "device", "cpu_threads"}


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / "state" / "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write the state next to the target, then rename it over: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"format": CHECKPOINT_FORMAT, "rng": capture_rng(), **state}, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    """Load with `weights_only=True`: tensors and plain Python values, no code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {state.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT}")
    return state


def check_compatible(saved_config: dict, config: dict, saved_fingerprint: str,
                     fingerprint: str) -> None:
    """A checkpoint continues only the same run: same data and the same hyper-parameters."""
    if saved_fingerprint != fingerprint:
        raise ValueError("the checkpoint in this run folder was made with other images or "
                         "labels; use a new output folder")
    changed = sorted(
        key for key in set(saved_config) | set(config)
        if key not in RESUMABLE_CHANGES and saved_config.get(key) != config.get(key)
    )
    if changed:
        raise ValueError(f"the checkpoint in this run folder was made with other settings "
                         f"({', '.join(changed)}); use a new output folder")


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
