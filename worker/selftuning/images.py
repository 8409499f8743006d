"""Decoding images once into uint8 arrays at working resolution, kept in memory or on disk:
training squares for the random crops, timm's exact eval crops for test images (and, at the
end of a run, for the unlabeled images the exported model labels)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from worker.selftuning.files import (
    fsync_directory,
    remove_abandoned_temporaries,
    reserve_disk_space,
    temporary_path,
)
from worker.selftuning.pixels import to_rgb

_CACHE_FORMAT = 1


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone wants its input: the numbers of timm's `pretrained_cfg` at our size."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    # How images of more than 8 bits become 8-bit ones (`pixels.to_8_bit`): the dataset's
    # white level, or None to read values above 255 as 16-bit.
    white_level: int | None = None

    @classmethod
    def from_model(cls, model: object, image_size: int) -> Preprocessing:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return cls(
            image_size=image_size,
            mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=str(cfg.get("interpolation") or "bicubic"),
            crop_pct=float(cfg.get("crop_pct") or 0.875),
        )

    @property
    def scale_size(self) -> int:
        """Shorter side before the centre crop, as timm's eval transform computes it."""
        return math.floor(self.image_size / self.crop_pct)

    @property
    def interpolation_mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    @property
    def fill(self) -> tuple[int, int, int]:
        """The mean colour as pixels: what cut-out and geometric augmentations paint with."""
        return tuple(round(255 * m) for m in self.mean)

    def pretrained_cfg(self, num_classes: int) -> dict:
        """timm's `pretrained_cfg` for the exported model (what config.json carries)."""
        return {
            "input_size": [3, self.image_size, self.image_size],
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "num_classes": num_classes,
        }


def open_rgb(path: str | os.PathLike, draft_size: int | None = None,
             white_level: int | None = None) -> Image.Image:
    """Decode an image the way a plain timm user does (`Image.open(p).convert('RGB')`), so
    the exported model sees the same pixels; first frame of GIF/TIFF, high-bit-depth images
    scaled to 8 bits by `white_level` (`pixels.to_8_bit`).

    `draft_size` lets a JPEG decode at a reduced scale that still covers that size (much
    faster for large photos); evaluation images never use it, so they stay exact.
    """
    with Image.open(path) as image:
        image.seek(0)
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        return to_rgb(image, white_level)


def eval_crop(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """timm's eval transform up to ToTensor: resize the shorter side, then centre crop."""
    return _resized_centre(image, preprocessing, preprocessing.image_size)


def train_square(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """The square that training crops are cut from: shorter side to `scale_size`, centre."""
    return _resized_centre(image, preprocessing, preprocessing.scale_size)


# Resizing the shorter side to `scale_size` keeps the whole longer side: an image far longer
# than wide became a strip of that many crops (one 20000 x 1 image took 6 GB at 224 px, and
# a 2 KB PNG of 4,000,000 x 1, within the upload's pixel limit, would take hundreds). Beyond
# this many crops' length only what the centre crop keeps is resized.
MOST_RESIZED_CROPS = 64


def _resized_centre(image: Image.Image, preprocessing: Preprocessing, crop: int) -> np.ndarray:
    """torchvision's resize of the shorter side to `scale_size`, then its centre crop of
    `crop`. For a very elongated image (MOST_RESIZED_CROPS), Pillow resizes the crop's part
    alone (`box`) at the same scale, with the same filter: a pixel may differ by a few levels
    from a whole resize (the filter's positions are rounded otherwise)."""
    size, mode = preprocessing.scale_size, preprocessing.interpolation_mode
    width, height = image.size
    longer = int(size * max(width, height) / min(width, height))  # torchvision's rounding
    if longer <= MOST_RESIZED_CROPS * size or crop > size:
        image = TF.center_crop(TF.resize(image, size, mode), crop)
        return np.array(image, dtype=np.uint8)
    new_width, new_height = (size, longer) if width <= height else (longer, size)
    left = int(round((new_width - crop) / 2.0))  # TF.center_crop's offsets
    top = int(round((new_height - crop) / 2.0))
    x_scale, y_scale = width / new_width, height / new_height
    box = (left * x_scale, top * y_scale, (left + crop) * x_scale, (top + crop) * y_scale)
    image = image.resize((crop, crop), TF.pil_modes_mapping[mode], box=box)
    return np.array(image, dtype=np.uint8)


def center_crop_array(images: np.ndarray, size: int) -> np.ndarray:
    """Centre crop a [N, S, S, 3] batch of training squares to `size` (torchvision's rounding)."""
    height, width = images.shape[1:3]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[:, top : top + size, left : left + size]


class ImageArray:
    """A [N, H, W, 3] uint8 array, or some of its rows (`select`), that survives being sent
    to DataLoader workers cheaply: a disk-backed one is reopened by path there instead of
    being pickled whole. Index it for images (`images[i]`, `images[a:b]`)."""

    def __init__(self, array: np.ndarray, path: Path | None = None,
                 rows: np.ndarray | None = None):
        self._array = array
        self.path = path
        self.rows = rows

    @property
    def array(self) -> np.ndarray:
        """All of its images as one array (a copy when it is a selection)."""
        return self._stored() if self.rows is None else self._stored()[self.rows]

    def _stored(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def select(self, rows: Sequence[int]) -> ImageArray:
        """These rows of the array, without copying it: one run's subset of a cached pool."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.rows is not None:
            rows = self.rows[rows]
        return ImageArray(self._array, self.path, rows)

    def __getitem__(self, index: int | slice) -> np.ndarray:
        """One image (an int) or a run of them (a slice, copied from a selection)."""
        return self._stored()[index if self.rows is None else self.rows[index]]

    def __len__(self) -> int:
        return len(self._stored()) if self.rows is None else len(self.rows)

    def __getstate__(self) -> dict:
        if self.path is not None:
            return {"_array": None, "path": self.path, "rows": self.rows}
        return {"_array": self._array, "path": None, "rows": self.rows}


Progress = Callable[[int, int], None]  # (done, total)


def counted_on(on_progress: Progress | None, offset: int, whole: int) -> Progress | None:
    """`on_progress` for a part of a larger count: its part's `done` after `offset` images
    done before it, out of `whole`."""
    return None if on_progress is None else (
        lambda done, _: on_progress(offset + done, whole))


class DecodingStopped(Exception):
    """`should_stop` answered True while images were being decoded (nothing was kept)."""


def decode_all(
    paths: Sequence[str],
    kind: str,
    preprocessing: Preprocessing,
    cache_dir: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Progress | None = None,
) -> ImageArray:
    """Decode every image once into a uint8 array: `kind` is 'train' (squares of scale_size
    for random crops) or 'eval' (timm's centre crop at image_size). With `cache_dir` the
    array is kept as a .npy file keyed by the files and the preprocessing, and reused.
    `should_stop` is asked every few dozen images (decoding a large pool at a large size
    takes minutes): True raises DecodingStopped. `on_progress(done, total)` hears as often how
    many are decoded (not called for a cached array)."""
    size = preprocessing.scale_size if kind == "train" else preprocessing.image_size
    shape = (len(paths), size, size, 3)

    def decode(index: int) -> np.ndarray:
        return _decode_one(paths[index], kind, preprocessing)

    if cache_dir is None:
        array = np.empty(shape, dtype=np.uint8)
        _fill(array, decode, should_stop, on_progress)
        return ImageArray(array)

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(cache_dir)
    target = cache_dir / f"{kind}-{size}-{_fingerprint(paths, kind, preprocessing)}.npy"
    cached = _open_cached(target, shape)
    if cached is not None:
        return cached
    temporary = temporary_path(target)
    array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
    try:
        reserve_disk_space(temporary, f"the decoded images of {len(paths):,} files")
        _fill(array, decode, should_stop, on_progress)
        array.flush()
        del array
        with temporary.open("rb+") as handle:  # on disk before the name says it is whole
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        fsync_directory(cache_dir)
    finally:
        temporary.unlink(missing_ok=True)
    return ImageArray(np.load(target, mmap_mode="r"), target)


def decode_pool(
    subsets: Sequence[Sequence[str]],
    kind: str,
    preprocessing: Preprocessing,
    cache_dir: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Progress | None = None,
) -> list[ImageArray]:
    """`decode_all` of each subset of one pool of images. With `cache_dir` the pool (every
    path of the subsets, sorted) is decoded once into one cache file and each subset is a
    selection of it, so that runs on other subsets of the pool (every budget and seed of a
    dataset splits its training images differently) share that file instead of writing
    their own; without one, each subset is decoded in memory on its own."""
    if cache_dir is None:
        before = [sum(map(len, subsets[:index])) for index in range(len(subsets))]
        whole = sum(map(len, subsets))  # one count over the subsets together
        return [decode_all(paths, kind, preprocessing, should_stop=should_stop,
                           on_progress=counted_on(on_progress, offset, whole))
                for paths, offset in zip(subsets, before, strict=True)]
    pool = sorted({path for paths in subsets for path in paths})
    position = {path: row for row, path in enumerate(pool)}
    images = decode_all(pool, kind, preprocessing, cache_dir, should_stop, on_progress)
    return [images.select([position[path] for path in paths]) for paths in subsets]


def eval_crops_in_chunks(paths: Sequence[str], preprocessing: Preprocessing,
                         chunk_size: int = 512) -> Iterator[np.ndarray]:
    """timm's eval crops of `paths` (the pixels a plain timm user's model sees), decoded
    `chunk_size` at a time and not kept: for predictions made once, over many images."""
    size = preprocessing.image_size
    for start in range(0, len(paths), chunk_size):
        chunk = paths[start : start + chunk_size]
        array = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
        _fill(array, lambda index, chunk=chunk: _decode_one(chunk[index], "eval", preprocessing))
        yield array


def _decode_one(path: str, kind: str, preprocessing: Preprocessing) -> np.ndarray:
    """One image as a training square ('train', JPEGs drafted at reduced scale) or as timm's
    exact eval crop ('eval')."""
    try:
        white = preprocessing.white_level
        if kind == "train":
            return train_square(open_rgb(path, preprocessing.scale_size, white), preprocessing)
        return eval_crop(open_rgb(path, white_level=white), preprocessing)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc


def _open_cached(target: Path, shape: tuple[int, ...]) -> ImageArray | None:
    """The cached array when it is there and whole; a file that does not hold the expected
    array (cut short by a crash, say) is removed so that it is decoded again."""
    if not target.is_file():
        return None
    try:
        array = np.load(target, mmap_mode="r")
        if array.shape == shape and array.dtype == np.uint8:
            return ImageArray(array, target)
    except (OSError, ValueError, EOFError):
        pass
    target.unlink(missing_ok=True)
    return None


STOP_CHECK_EVERY = 32  # images
DECODED_AHEAD_PER_THREAD = 2  # images handed to a decoding thread before their turn to be stored


def decoding_threads() -> int:
    return min(4, os.cpu_count() or 1)


def _fill(array: np.ndarray, decode, should_stop: Callable[[], bool] | None = None,
          on_progress: Progress | None = None) -> None:
    # PIL releases the GIL while decoding and resizing, so threads overlap real work. Each
    # thread keeps about two images ahead of the one stored next: all of them handed to the
    # pool at once (Executor.map), a stop was seen only once the threads had decoded far past
    # it (a whole small pool on a busy machine), and the images decoded before their turn to
    # be stored waited in memory, as many as the threads outran the writes.
    threads = decoding_threads()
    ahead = DECODED_AHEAD_PER_THREAD * threads
    pool = ThreadPoolExecutor(max_workers=threads)
    pending: deque[Future[np.ndarray]] = deque()
    try:
        for index in range(len(array)):
            while len(pending) < ahead and index + len(pending) < len(array):
                pending.append(pool.submit(decode, index + len(pending)))
            array[index] = pending.popleft().result()
            if should_stop is not None and index % STOP_CHECK_EVERY == 0 and should_stop():
                raise DecodingStopped
            if on_progress is not None and (index % STOP_CHECK_EVERY == 0
                                            or index == len(array) - 1):
                on_progress(index + 1, len(array))
    finally:
        pool.shutdown(cancel_futures=True)  # a stop or an error: the images not yet begun


def _fingerprint(paths: Sequence[str], kind: str, preprocessing: Preprocessing) -> str:
    digest = hashlib.sha256()
    header = {"format": _CACHE_FORMAT, "kind": kind, "preprocessing": repr(preprocessing)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]
