"""Adding labels to a dataset: a `path,label` CSV gives some of its unlabeled images a class,
and the result is a new dataset that keeps the old one's test split, so that experiments on
the two score on the same images and their results compare.

The old dataset is left as it was (its experiments stay true to what they trained on). The
new one's files are hard links to the old one's where the disk allows, so it costs its rows,
not a second copy of the images.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import dataset_export, ingest
from app.config import Settings
from app.models import Dataset, DatasetImage
from app.responses import shortened
from worker.selftuning.labels_csv import (
    SWAPPED_FIX,
    LabelsRow,
    header_hint,
    parse_labels_csv,
    quoted_list,
    reads_like_a_path,
    spaced_path,
)

log = logging.getLogger(__name__)

CSV_NAME = "the labels CSV"
UPLOAD = ingest.UploadOf(
    "labels CSV", "labels.csv",
    "split it: each CSV makes a new dataset, and the next one can add its labels to that")


def _labels_by_path(data: bytes, paths: set[str]) -> dict[str, LabelsRow]:
    """The CSV's rows by image path (the dataset's are `paths`), but those with an empty
    label (their images stay unlabeled): the dataset's own labels.csv, its blanks filled in,
    is such a CSV."""
    try:
        rows = parse_labels_csv(data, CSV_NAME, lambda written: spaced_path(
            written, str, paths.__contains__))
    except ValueError as exc:
        message = str(exc)
        if re.search(r"got \d+ columns$", message):  # the app's CSVs have more: which two
            message += ("; keep two: the path column of predictions.csv or label-next.csv "
                        "and a label column you write (their label column is the model's "
                        "guess)")
        raise ingest.IngestError(message) from None
    labels = {path: row for path, row in rows.items() if row.label is not None}
    if not labels:
        raise ingest.IngestError(f"{CSV_NAME} gives no labels: write one 'path,label' line "
                                 "per image, the class name after the image's path")
    return labels


def _new_labels(source: Dataset, images: list[DatasetImage],
                labels: dict[str, LabelsRow]) -> dict[int, int]:
    """Class index by image id for the unlabeled images the CSV labels; a 4xx for paths
    that are not in the dataset, classes it does not have and images labeled otherwise,
    each kind found said in one message (not one kind per try)."""
    by_path = {image.original_path: image for image in images}
    problems = []
    if missing := [path for path in labels if path not in by_path]:
        problems.append(
            f"{CSV_NAME} names {len(missing):,} image(s) that dataset {source.id} does not have: "
            f"{quoted_list(missing)}; use the paths of its predictions.csv or "
            "label-next.csv (as named in the uploaded archive), or of its labels.csv"
            f"{header_hint(labels[path] for path in missing)}")
    class_index = {name: index for index, name in enumerate(source.class_names)}
    if unknown := sorted({row.label for row in labels.values() if row.label not in class_index}):
        # 'Cat' for 'cat': said, where it was left to be found in the list of classes.
        by_folding: dict[str, list[str]] = {}
        for name in source.class_names:
            by_folding.setdefault(name.casefold(), []).append(name)
        cased = [f"{label!r} is {' or '.join(map(repr, by_folding[label.casefold()]))}"
                 for label in unknown if label.casefold() in by_folding]
        problems.append(
            f"{CSV_NAME} uses {len(unknown):,} label(s) that are not classes of dataset "
            f"{source.id}: {quoted_list(unknown)}; its classes are "
            f"{quoted_list(source.class_names, limit=20)} (a new class needs an "
            "upload of its own, with test images of it)"
            + (f"; letter case counts: {', '.join(cased[:5])}" if cased else ""))
        if missing and any(label in by_path or reads_like_a_path(label) for label in unknown):
            problems.append(f"the labels read like the images' paths: are the columns "
                            f"swapped? ({SWAPPED_FIX})")
    added: dict[int, int] = {}
    to_test, relabeled = [], []
    for path, row in labels.items():
        image = by_path.get(path)
        if image is None or row.label not in class_index:
            continue
        if row.split == "test" and image.split != "test":
            to_test.append(f"line {row.line}: {path!r}")
        elif image.split == "unlabeled":
            added[image.id] = class_index[row.label]
        elif image.label != class_index[row.label]:
            relabeled.append(f"line {row.line}: {path!r} is already labeled "
                             f"{source.class_names[image.label]!r} ({image.split} split), not "
                             f"{row.label!r}")
    if to_test:
        problems.append(
            f"{CSV_NAME} {_some(to_test)} {'is' if len(to_test) == 1 else 'are'} put in the "
            "test split: added labels join the training images, and the test split stays as "
            "it is so that results compare with the earlier dataset's (leave the split "
            "column out)")
    if relabeled:
        problems.append(
            f"{CSV_NAME} {_some(relabeled)}: only unlabeled images take labels here; to "
            "correct a label, download the dataset (its page's Download, or "
            f"/api/datasets/{source.id}/archive), change the label in its labels.csv and "
            "upload it again")
    if len(problems) > 1:
        raise ingest.IngestError(" ".join(f"({number}) {problem}." for number, problem
                                          in enumerate(problems, start=1)))
    if problems:
        raise ingest.IngestError(problems[0])
    if not added:
        raise ingest.IngestError(f"{CSV_NAME} labels no unlabeled image: each image it names "
                                 "already has that label")
    return added


def _some(lines: list[str], most: int = 3) -> str:
    """The first `most` of a CSV's problem lines, and how many more."""
    more = f" (and {len(lines) - most:,} more)" if len(lines) > most else ""
    return "; ".join(lines[:most]) + more


def _place(source_file: Path, target: Path) -> None:
    """A hard link to the old dataset's file, or a copy where the disk refuses one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source_file, target)
    except FileNotFoundError:
        raise
    except OSError:  # a file system without hard links, or one file's links at their limit
        shutil.copyfile(source_file, target)


def prepare_labeled_copy(settings: Settings, source: Dataset, images: list[DatasetImage],
                         added: dict[int, int], work_dir: Path) -> ingest.PreparedDataset:
    """The source's images laid out under `work_dir/dataset`, those in `added` moved from
    the unlabeled images to the training images of their class; every other image keeps its
    split, label and stored name (so the test split is the same one)."""
    source_dir = ingest.dataset_dir(settings, source)
    directory = work_dir / "dataset"
    directory.mkdir()
    stored: list[ingest.StoredImage] = []
    for image in images:
        label, split, relative = image.label, image.split, image.path
        if image.id in added:
            label, split = added[image.id], "train"
            relative = f"train/{label}/{PurePosixPath(image.path).name}"
        try:
            _place(source_dir / image.path, directory / relative)
        except FileNotFoundError:
            raise ingest.IngestError(
                f"the file of image {image.id} ({image.original_path!r}) is missing from "
                f"dataset {source.id}: it was deleted meanwhile, or its folder was changed by "
                "hand", status_code=409) from None
        stored.append(ingest.StoredImage(
            relative, image.original_path, split, label, image.sha256, image.width,
            image.height, (directory / relative).stat().st_size))
    return ingest.PreparedDataset(
        directory, list(source.class_names), stored, [], source.test_source,
        ingest.dataset_white_level(settings, source), derived_from_id=source.id,
        labels_added=len(added), upload_warnings=list(source.upload_warnings))


def labeled_name(source: Dataset, added: int) -> str:
    """"pets + 120 labels", cut to fit the 200 characters of a name."""
    suffix = f" + {added:,} label{'s' if added != 1 else ''}"
    return shortened(source.name, 200 - len(suffix)) + suffix


def add_labels(session: Session, settings: Settings, source: Dataset, csv_path: Path,
               work_dir: Path, name: str | None = None) -> Dataset:
    """A new dataset: `source` with the labels of the CSV at `csv_path` (`path,label`) given
    to its unlabeled images, laid out in `work_dir` (which the caller removes). Raises
    IngestError with what to fix; nothing is kept then."""
    started = time.monotonic()
    images = list(session.scalars(
        select(DatasetImage).where(DatasetImage.dataset_id == source.id)
        .order_by(DatasetImage.id)))
    # The paths of the dataset's own labels.csv too (that of its download): without the
    # one folder that holds every image, where an upload had one (dataset_export). An
    # original path wins where one reads like another's archive path.
    originals = [image.original_path for image in images]
    _, in_archive = dataset_export.archive_paths(source, originals)
    aliases = dict(zip(in_archive, originals, strict=True)) | {path: path for path in originals}
    labels = {aliases.get(path, path): row
              for path, row in _labels_by_path(csv_path.read_bytes(), set(aliases)).items()}
    added = _new_labels(source, images, labels)
    name = ingest.dataset_name(name, "") if name and name.strip() else labeled_name(
        source, len(added))
    prepared = prepare_labeled_copy(settings, source, images, added, work_dir)
    dataset = ingest.publish_dataset(session, settings, prepared, name)
    try:
        ingest.record_white_level(settings, dataset, prepared.white_level)
    except OSError:
        log.warning("dataset %s: white level not recorded; thumbnails work it out", dataset.id)
    log.info("dataset %s (%r): dataset %s with %d labels added, in %.1fs", dataset.id, name,
             source.id, len(added), time.monotonic() - started)
    return dataset
