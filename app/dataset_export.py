"""A dataset taken back out of the app: its images as they were uploaded, and a `labels.csv`
(`path,label,split`) that names each one's class and split, in the layout an upload reads.

The labels given in the app (Add labels, the images to label next) and the test split held
out of the labeled images are in the CSV, so the archive uploaded again (here or to another
server) gives the same classes, labels and test images. The archive is a plain tar streamed
as it is read from disk: images barely compress, and nothing is held in memory or written.
Its bytes are the same at each request while the dataset is, so a download that broke off
resumes from an offset (`Range`) without the images before it being read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import ingest
from app.config import Settings
from app.models import Dataset, DatasetImage
from worker.selftuning.labels_csv import LABELS_CSV, SPLITS, UNLABELED_FOLDER

CHUNK_BYTES = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class ExportedImage:
    path: str  # in the archive and in labels.csv, relative to labels.csv's folder
    file: Path
    size: int


@dataclass(frozen=True)
class Export:
    """What the archive holds: `folder/labels.csv` and each image at `folder/path`."""

    folder: str
    labels_csv: bytes
    images: list[ExportedImage]


def archive_paths(dataset: Dataset, original_paths: list[str]) -> tuple[str, list[str]]:
    """The archive's one top folder, and each image's path inside it. An upload of one folder
    (`photos/cat/1.png`, what a folder chosen on the upload page sends) keeps that folder, and
    the paths are the images' within it; else the folder is named after the dataset. So is
    an archive whose one folder was `train/` (or another split's): named so, it read as the
    train split of a folder with none around it (the command line read it so, and left its
    labels.csv out)."""
    tops = {path.split("/", 1)[0] for path in original_paths}
    if len(tops) == 1 and all("/" in path for path in original_paths):
        (top,) = tops
        if top.lower() not in SPLITS and top.lower() != UNLABELED_FOLDER:
            return top, [path.split("/", 1)[1] for path in original_paths]
    # A file name: no slash, no control characters, not hidden (an upload skips hidden files).
    name = "".join(" " if ch == "/" or ord(ch) < 32 or ch == "\x7f" else ch
                   for ch in dataset.name).strip().lstrip(".").strip()
    return name or f"dataset-{dataset.id}", original_paths


def labels_csv(rows: list[tuple[str, str, str]]) -> bytes:
    """`path,label,split` lines: a labeled image's class and split (train or test), an
    unlabeled image's path alone."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "split"])
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def plan(db: Session, settings: Settings, dataset: Dataset, *, sizes: bool = True) -> Export:
    """What the dataset's archive holds. Raises FileNotFoundError for a missing image file.
    Without `sizes` (labels.csv alone), no file is looked at and each image's size is 0."""
    directory = ingest.dataset_dir(settings, dataset)
    stored = db.execute(
        select(DatasetImage.original_path, DatasetImage.path, DatasetImage.split,
               DatasetImage.label)
        .where(DatasetImage.dataset_id == dataset.id).order_by(DatasetImage.id)
    ).all()
    folder, paths = archive_paths(dataset, [row.original_path for row in stored])
    rows, images = [], []
    for path, row in zip(paths, stored, strict=True):
        if row.label is None:
            rows.append((path, "", ""))
        else:
            rows.append((path, dataset.class_names[row.label], row.split))
        file = directory / row.path
        images.append(ExportedImage(path, file, os.stat(file).st_size if sizes else 0))
    return Export(folder, labels_csv(rows), images)


def _header(name: str, size: int, mtime: int) -> bytes:
    """A tar header for a file (pax, for names over 100 bytes or not ASCII)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def tag(export: Export, mtime: int) -> str:
    """The archive's ETag: its bytes follow from these (an image file is never rewritten), so
    a download resumed with `If-Range` goes on only if the labels, paths and sizes are the
    same (a label added in the app since changes labels.csv, and so every offset after it)."""
    digest = hashlib.sha256(f"{export.folder}\0{mtime}\0".encode() + export.labels_csv)
    for image in export.images:
        digest.update(f"\0{image.size}".encode())
    return '"' + digest.hexdigest()[:32] + '"'


def size(export: Export, mtime: int) -> int:
    """The archive's length in bytes, counted without making its headers where their length
    is known (`_Header`): made, they took 2.4 s of a 60,000-image dataset's HEAD, its 304
    and the start of its download. They are made again to send rather than held: 200,000
    images' are 100 MB or more."""
    return sum(map(_length, _parts(export, mtime)))


@dataclass(frozen=True)
class _Header:
    """A file's tar header, made when it is sent (`_header`)."""

    name: str
    size: int
    mtime: int

    def length(self) -> int:
        """One block where the name and size fit the ustar fields (a name of at most 100
        ASCII bytes, a size under 8 GiB), so that tarfile writes no pax header; else the
        made header's."""
        if len(self.name) <= tarfile.LENGTH_NAME and self.name.isascii() and self.size < 8**11:
            return BLOCK
        return len(self.made())

    def made(self) -> bytes:
        return _header(self.name, self.size, self.mtime)


def _length(part: bytes | _Header | ExportedImage) -> int:
    if isinstance(part, ExportedImage):
        return part.size
    return part.length() if isinstance(part, _Header) else len(part)


def size_estimate(dataset: Dataset) -> int:
    """About the archive's length, from what the dataset's row says (the page shows it: the
    images' size alone was a third of the tar of 350-byte images): each image has a header
    and is padded to whole blocks (half a block on average; images under a block, to one),
    and labels.csv has a line an image. Names over 100 bytes take a header more."""
    if not dataset.image_count:
        return dataset.size_bytes + 4 * BLOCK
    mean = dataset.size_bytes / dataset.image_count
    padding = BLOCK - mean if mean < BLOCK else BLOCK / 2
    per_image = BLOCK + padding + 48
    return round(dataset.size_bytes + dataset.image_count * per_image + 4 * BLOCK)


def archive(export: Export, mtime: int, start: int = 0, end: float = math.inf
            ) -> Iterator[bytes]:
    """The tar's bytes from offset `start` to `end` (exclusive), a chunk at a time; an image
    wholly before `start` is not read. A file that has changed size or gone since `plan`
    raises OSError partway: the answer breaks off short of its length, so the client knows the
    download failed (a complete-looking archive would be missing files)."""
    # Gathered into pieces of CHUNK_BYTES: each piece the server sends costs a hop to a
    # thread and back: animal-mnist (9,716 images, 10.8 MB) took 2.7 s a piece each, 0.6 s so.
    buffer = bytearray()
    for piece in _window(_parts(export, mtime), start, end):
        buffer += piece
        if len(buffer) >= CHUNK_BYTES:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def _parts(export: Export, mtime: int) -> Iterator[bytes | _Header | ExportedImage]:
    """The tar in order: headers, padding as bytes, each image's content as the image."""
    csv_name = f"{export.folder}/{LABELS_CSV}"
    yield _Header(csv_name, len(export.labels_csv), mtime)
    yield export.labels_csv + _padding(len(export.labels_csv))
    for image in export.images:
        yield _Header(f"{export.folder}/{image.path}", image.size, mtime)
        yield image
        yield _padding(image.size)
    yield b"\0" * (2 * BLOCK)


def _window(parts: Iterator[bytes | _Header | ExportedImage], start: int, end: float
            ) -> Iterator[bytes]:
    """The bytes of `parts` from offset `start` to `end`; a header before `start` is not
    made, an image before it not read."""
    position = 0
    for part in parts:
        size = _length(part)
        low, high = max(start - position, 0), min(end - position, size)
        position += size
        if low < high:
            if isinstance(part, ExportedImage):
                yield from _read(part, low, high)
            else:
                yield (part.made() if isinstance(part, _Header) else part)[low:high]
        if position >= end:
            return


def _read(image: ExportedImage, low: int, high: int) -> Iterator[bytes]:
    with image.file.open("rb") as stream:
        if os.fstat(stream.fileno()).st_size != image.size:
            raise OSError(f"{image.file} has changed size since the download began")
        stream.seek(low)
        left = high - low
        while left:
            chunk = stream.read(min(CHUNK_BYTES, left))
            if not chunk:
                raise OSError(f"{image.file} has changed size since the download began")
            left -= len(chunk)
            yield chunk
