"""Every iteration's batch as a pure function of (seed, step), served through a DataLoader.

Sampling order and augmentation are both derived from the step number, so a resumed run
sees exactly the batches an uninterrupted one would, however many workers build them.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from worker.selftuning.augment import Normalize, ViewMaker
from worker.selftuning.config import AUTO_LOADERS
from worker.selftuning.images import ImageArray
from worker.selftuning.methods import Batch


class StepBatches(Dataset):
    """`dataset[step]` is the uint8 batch of iteration `step`.

    Images are drawn epoch by epoch from seeded permutations of each pool; each image's views
    come from a generator seeded by (seed, pool, step, position).
    """

    def __init__(
        self,
        *,
        labeled_squares: ImageArray,
        labeled_targets: Sequence[int],
        unlabeled_squares: ImageArray | None,
        unlabeled_hidden: Sequence[int],
        labeled_views: Sequence[str],
        unlabeled_views: Sequence[str],
        batch_size: int,
        unlabeled_batch_size: int,
        seed: int,
        view_maker: ViewMaker,
        total_steps: int,
    ):
        self.labeled_squares = labeled_squares
        self.labeled_targets = torch.as_tensor(labeled_targets, dtype=torch.long)
        self.unlabeled_squares = unlabeled_squares
        self.unlabeled_hidden = torch.as_tensor(unlabeled_hidden, dtype=torch.long)
        self.labeled_views = tuple(labeled_views)
        self.unlabeled_views = tuple(unlabeled_views)
        has_unlabeled = unlabeled_squares is not None and len(unlabeled_squares) > 0
        self.batch_size = batch_size
        self.unlabeled_batch_size = (
            unlabeled_batch_size if has_unlabeled and self.unlabeled_views else 0
        )
        self.seed = seed
        self.view_maker = view_maker
        self.total_steps = total_steps
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        labeled = self._indices(0, step, len(self.labeled_squares), self.batch_size)
        size = self.view_maker.size
        batch = {
            "labeled_index": torch.from_numpy(labeled),
            "targets": self.labeled_targets[labeled],
        }
        saved_state = random.getstate()  # the views reseed `random`; leave the caller's alone
        try:
            batch["labeled"] = self._views(0, step, self.labeled_squares, labeled,
                                           self.labeled_views)
            if self.unlabeled_batch_size:
                unlabeled = self._indices(
                    1, step, len(self.unlabeled_squares), self.unlabeled_batch_size
                )
                batch["unlabeled"] = self._views(1, step, self.unlabeled_squares, unlabeled,
                                                 self.unlabeled_views)
                # Unlabeled images are numbered after the labeled ones.
                batch["unlabeled_index"] = torch.from_numpy(unlabeled + len(self.labeled_squares))
                batch["hidden"] = self.unlabeled_hidden[unlabeled]
            else:
                empty = torch.empty(len(self.unlabeled_views), 0, 3, size, size, dtype=torch.uint8)
                batch["unlabeled"] = empty
                batch["unlabeled_index"] = torch.empty(0, dtype=torch.long)
                batch["hidden"] = torch.empty(0, dtype=torch.long)
        finally:
            random.setstate(saved_state)
        return batch

    def _indices(self, pool: int, step: int, pool_size: int, count: int) -> np.ndarray:
        """Positions step*count .. step*count+count-1 of an endless run of seeded epochs."""
        start = step * count
        picked = np.empty(count, dtype=np.int64)
        for offset in range(count):
            epoch, position = divmod(start + offset, pool_size)
            picked[offset] = self._order(pool, epoch, pool_size)[position]
        return picked

    def _order(self, pool: int, epoch: int, pool_size: int) -> np.ndarray:
        key = (pool, epoch)
        if key not in self._orders:
            if len(self._orders) > 8:
                self._orders.clear()
            self._orders[key] = np.random.default_rng([self.seed, pool, epoch]).permutation(
                pool_size
            )
        return self._orders[key]

    def _views(
        self, pool: int, step: int, squares: ImageArray, indices: np.ndarray,
        kinds: Sequence[str],
    ) -> torch.Tensor:
        """[V, N, 3, H, W] uint8: V independent views of each image."""
        views = np.empty((len(kinds), len(indices), self.view_maker.size, self.view_maker.size, 3),
                         dtype=np.uint8)
        for position, index in enumerate(indices):
            rng = random.Random(f"{self.seed}/{pool}/{step}/{position}")
            square = np.asarray(squares[index])
            for view, kind in enumerate(kinds):
                views[view, position] = self.view_maker(kind, square, rng)
        return torch.from_numpy(views).permute(0, 1, 4, 2, 3)


MOST_AUTO_LOADERS = 16


def loader_processes(requested: int, device: torch.device, cores: int | None = None) -> int:
    """How many processes build the batches: `requested`, or for `AUTO_LOADERS` (the
    presets) what the device wants. A GPU step waits on its batches unless most cores build
    them: on an H200 with 16 cores, Self-Tuning at 224 px took 61 ms a step with 4 loader
    processes, 29 ms with 8, against a 22 ms step on the GPU. So there one per core the
    process may use beyond its own, at most `MOST_AUTO_LOADERS`. On a CPU the cores train
    (torch's threads) and the training process builds the batches between steps.
    """
    if requested != AUTO_LOADERS:
        return requested
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, min(cores - 1, MOST_AUTO_LOADERS))


def leave_sigterm_to_the_trainer(_worker_id: int) -> None:
    """In a loader process: ignore SIGTERM. One sent to the whole process group (`kill` of a
    job, `timeout`, a batch scheduler's time limit) is the training process's to act on: it
    saves its state and stops, and its loader processes end with it (torch's worker loop
    watches its parent). torch's own handler there died of any SIGTERM its parent had not
    sent, and the training process then failed in the middle of saving."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def start_batches(
    dataset: StepBatches, start: int, num_workers: int, pin_memory: bool
) -> Iterator[dict]:
    """The batches of steps start .. end, built by `num_workers` processes (0: this one).

    Celery's prefork pool runs each task in a daemonic process, and multiprocessing refuses
    children to those ("daemonic processes are not allowed to have children"), lest a daemon's
    exit orphan them. A loader's processes are daemonic too and each ends by itself when its
    parent is gone (torch's worker loop watches the parent's pid), so the flag is lifted while
    they start. Without them a worker built every batch on one core: at 224 px a Self-Tuning
    step's views take about 130 ms there, and the step itself 22 ms on an H200.
    """
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, len(dataset)),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        # Its own generator, so creating the loader does not draw from the global torch RNG.
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=leave_sigterm_to_the_trainer,
    )
    process = multiprocessing.current_process()
    daemonic = process.daemon
    process._config["daemon"] = False  # (its setter refuses a process already started)
    try:
        return iter(loader)  # the processes start here
    finally:
        process._config["daemon"] = daemonic


def to_device_batch(
    raw: dict[str, torch.Tensor],
    normalize: Normalize,
    device: torch.device,
    memory_format: torch.memory_format,
) -> Batch:
    """Move a uint8 batch to the device and normalise it there (less to copy than floats)."""

    def images(views: torch.Tensor) -> list[torch.Tensor]:
        return [
            normalize(view.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            for view in views
        ]

    return Batch(
        labeled=images(raw["labeled"]),
        targets=raw["targets"].to(device),
        labeled_index=raw["labeled_index"].to(device),
        unlabeled=images(raw["unlabeled"]),
        hidden=raw["hidden"].to(device),
        unlabeled_index=raw["unlabeled_index"].to(device),
    )
