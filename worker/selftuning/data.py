"""What a run trains on (`RunData`), folder/archive datasets, and applying a label budget."""

from __future__ import annotations

import errno
import hashlib
import json
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath

from PIL import Image

from worker.selftuning.budgets import Budget, BudgetError, select_labeled, split_holdout
from worker.selftuning.labels_csv import (
    BLANK_CLASS_FOLDER,
    LABELS_CSV,
    class_name,
    folder_disagreements,
    header_hint,
    lost_class_warnings,
    natural_key,
    parse_labels_csv,
    skip_reason_by_name,
    spaced_path,
)
from worker.selftuning.pixels import (
    IMAGE_SUFFIXES,
    SNIFF_BYTES,
    SUPPORTED_TEXT,
    looks_like_image,
)

Item = tuple[str, int]
SPECIAL_FOLDERS = {"train", "test", "val", "unlabeled"}  # in any letter case
# Why the images of test/unlabeled/ are skipped, here and by uploads (app/ingest.py).
UNLABELED_IN_TEST = ("an unlabeled image in the test split: accuracy is scored on test images, "
                     "so each needs a class folder; put unlabeled images in unlabeled/")


@dataclass
class RunData:
    """The images of one run: labeled, unlabeled (with the withheld label where one exists,
    else None) and test, as (path, class index) pairs into `class_names`."""

    class_names: list[str]
    labeled: list[tuple[str, int]]
    unlabeled: list[tuple[str, int | None]] = field(default_factory=list)
    test: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.class_names = [str(name) for name in self.class_names]
        self.labeled = [(str(path), int(label)) for path, label in self.labeled]
        self.unlabeled = [
            (str(path), None if label is None else int(label)) for path, label in self.unlabeled
        ]
        self.test = [(str(path), int(label)) for path, label in self.test]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_hidden_labels(self) -> bool:
        return any(label is not None for _, label in self.unlabeled)

    def validate(self) -> None:
        """Raise ValueError with what to fix."""
        if len(self.class_names) < 2:
            raise ValueError("a run needs at least two classes")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class names must be distinct")
        if not self.labeled:
            raise ValueError("a run needs at least one labeled image")
        if not self.test:
            raise ValueError("a run needs test images to be scored on")
        for part, items in (("labeled", self.labeled), ("unlabeled", self.unlabeled),
                            ("test", self.test)):
            for path, label in items:
                if label is not None and not 0 <= label < self.num_classes:
                    raise ValueError(
                        f"{part} image {path} has label {label}, outside 0..{self.num_classes - 1}"
                    )

    def counts(self) -> dict[str, int]:
        """How many images each list holds, as training.json and checkpoints record them."""
        return {"labeled_count": len(self.labeled), "unlabeled_count": len(self.unlabeled),
                "test_count": len(self.test)}

    def fingerprint(self) -> str:
        """A digest of the image lists and labels: a resumed run must see the same data.
        Paths count from the folder that holds every image, so the same images in a moved
        folder (a data directory mounted elsewhere) keep the fingerprint."""
        parts = (self.labeled, self.unlabeled, self.test)
        try:
            root = os.path.commonpath(
                [os.path.dirname(path) for items in parts for path, _ in items])
        except ValueError:  # absolute and relative paths mixed: nothing shared to drop
            return self.fingerprint_with_full_paths()
        relative = [[(os.path.relpath(path, root), label) for path, label in items]
                    for items in parts]
        return _digest([self.class_names, *relative])

    def fingerprint_with_full_paths(self) -> str:
        """The fingerprint as checkpoints written before 2026-12 carry it (paths as given)."""
        return _digest([self.class_names, self.labeled, self.unlabeled, self.test])

    def fingerprints(self) -> set[str]:
        """Every fingerprint a recorded run of these data may carry (a checkpoint, a
        training.json), older ones included."""
        return {self.fingerprint(), self.fingerprint_with_full_paths()}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def load_folder_dataset(
    path: str | os.PathLike, skipped: dict[str, str] | None = None,
    warnings: list[str] | None = None,
) -> tuple[list[str], list[Item], list[Item], list[str]]:
    """Read a dataset folder, or a .zip/.tar/.tar.gz/.tar.bz2/.tar.xz of one, for the
    command line.

    Layout: `train/<class>/*`, optional `test/<class>/*` (or `val/`), optional `unlabeled/*`;
    without `train/`, the class folders sit at the top. As in uploads, a class folder's
    images may sit in folders of their own inside it, and `test/unlabeled/` is skipped. Or
    images anywhere plus a top-level `labels.csv` (see `read_labels_csv`), which then decides
    alone. One wrapping folder is looked through. Folder names are read as uploads read them:
    split and `unlabeled/` in any letter case, class names in Unicode's composed form without
    the spaces around them,
    classes numbered in natural order (`natural_key`) as on the web. Images are listed in
    path order; the web lists them in the archive's order, so a seed draws the same labeled
    subset here and there only from an archive that stores its images in path order (as
    `zip -r` and `tar` of a folder usually do), and a dataset without `test/` is held out
    differently (the web by content hash). Files too: images without an image extension are
    known by their content; files that are not images or do not open are left out with the
    reason in `skipped` (path: reason), as is every other file that is not read, as an
    upload says it (a hidden file, macOS metadata, a file outside the class folders or not
    listed in labels.csv). What looks like a mistake but is read as it says goes in
    `warnings` (a labels.csv that relabels images in class folders: `folder_disagreements`; a
    class folder all of whose files were skipped: `lost_class_warnings`).
    Returns (class_names, train_items, test_items, unlabeled_paths); items are (path, index).
    Archives are unpacked once into the temp folder.
    """
    top = Path(path)
    if not top.exists():
        raise ValueError(f"dataset {path} does not exist")
    ours: set[Path] = set()  # what the engine put beside an archive's files: not the user's
    if top.is_file():
        top = _unpack(top)
        ours.add(top / UNPACKED_MARKER)
    if not top.is_dir():
        raise ValueError(f"dataset {path} is neither a folder nor a .zip/.tar archive")
    root = _look_through_wrapper(top)
    by_csv = (root / LABELS_CSV).is_file()
    found = dict(skipped or {})  # noted whether asked for or not: the rest is unread
    read = (read_labels_csv(root / LABELS_CSV, found, warnings) if by_csv
            else _read_folders(root, path, found, warnings))
    if skipped is not None:
        skipped.update(found)
        skipped.update(_unread_files(top, root, read, {*found, *map(str, ours)}, by_csv))
    return read


def _unread_files(top: Path, root: Path, read: tuple[list[str], list[Item], list[Item],
                  list[str]], skipped: set[str], by_csv: bool) -> dict[str, str]:
    """The files under `top` neither read nor `skipped` (nor the engine's), each with why,
    in an upload's words: hidden ones and macOS metadata, then those a labels.csv does not
    list, or those outside the class folders."""
    _, train_items, test_items, unlabeled = read
    used = {path for path, _ in train_items} | {path for path, _ in test_items} | set(unlabeled)
    splits = {root, _folder(root, "train"), _folder(root, "test"), _folder(root, "val")}
    unread = {}
    for file in sorted(top.rglob("*")):
        name = str(file)
        if name in used or name in skipped or not file.is_file():
            continue
        if by_csv and file == root / LABELS_CSV:
            continue
        if reason := skip_reason_by_name(file.relative_to(top).parts):
            unread[name] = reason
        elif problem := _image_problem(name):  # an upload says what a file is first
            unread[name] = problem
        elif by_csv:
            unread[name] = f"not listed in {LABELS_CSV}"
        elif file.parent in splits:
            unread[name] = "not inside a class folder: put it in <class>/ or unlabeled/"
        else:
            unread[name] = "outside the train/ and test/ folders"
    return unread


def _read_folders(root: Path, path: str | os.PathLike, skipped: dict[str, str],
                  warnings: list[str] | None) -> tuple[list[str], list[Item], list[Item],
                                                       list[str]]:
    """A dataset laid out in folders (`load_folder_dataset`), from `root`."""

    def images(folder: Path, recursive: bool = False) -> list[Path]:
        return _images(folder, recursive, skipped)

    def named(folder: Path, in_folder: list[Path]) -> bool:
        """Whether a class folder has a name (BLANK_CLASS_FOLDER: its images skipped)."""
        if class_name(folder.name):
            return True
        skipped.update((str(p), BLANK_CLASS_FOLDER) for p in in_folder)
        return False

    train_root = _folder(root, "train") or root
    found: dict[str, list[Path]] = {}  # images by class: "café" and "cafe\u0301" are one
    lost: Counter[str] = Counter()  # class folders whose files were all skipped
    for entry in sorted(train_root.iterdir()):
        if (not entry.is_dir() or _hidden(entry.name)
                or entry.name.lower() in SPECIAL_FOLDERS):
            continue
        before = len(skipped)
        if (in_folder := images(entry, True)) and named(entry, in_folder):
            found.setdefault(class_name(entry.name), []).extend(in_folder)
        elif not in_folder and len(skipped) > before and class_name(entry.name):
            lost[class_name(entry.name)] += len(skipped) - before
    for name in found:
        del lost[name]  # its files in another folder of the same name ("café", "cafe\u0301")
    if warnings is not None:
        warnings.extend(lost_class_warnings(lost))
    class_names = sorted(found, key=natural_key)
    if len(class_names) < 2:
        raise ValueError(
            f"{path}: found {len(class_names)} class folder(s) with images; need at least two "
            "(train/<class>/image.png)"
        )
    index = {name: i for i, name in enumerate(class_names)}
    train_items = [(str(p), index[name]) for name in class_names for p in found[name]]
    test_items: list[Item] = []
    test_root, val_root = _folder(root, "test"), _folder(root, "val")
    if test_root and val_root:
        raise ValueError(f"{path} has both {test_root.name}/ and {val_root.name}/ folders: "
                         "keep one of them as the test split")
    if split_root := test_root or val_root:
        for entry in sorted(split_root.iterdir()):
            if not entry.is_dir() or _hidden(entry.name):
                continue
            in_folder = images(entry, True)
            if not in_folder or not named(entry, in_folder):
                continue
            if entry.name.lower() == "unlabeled":
                skipped.update((str(p), UNLABELED_IN_TEST) for p in in_folder)
                continue
            if class_name(entry.name) not in index:
                raise ValueError(f"{split_root.name}/{entry.name} is not a class of train/")
            test_items.extend((str(p), index[class_name(entry.name)]) for p in in_folder)
    unlabeled_paths: list[str] = []
    for folder in {_folder(root, "unlabeled"), _folder(train_root, "unlabeled")} - {None}:
        unlabeled_paths.extend(str(p) for p in images(folder, recursive=True))
    return class_names, train_items, test_items, sorted(set(unlabeled_paths))


def _folder(root: Path, name: str) -> Path | None:
    """The sub-folder of `root` called `name` in any letter case (Train/, TEST/), as uploads
    read them."""
    return next((entry for entry in sorted(root.iterdir())
                 if entry.is_dir() and entry.name.lower() == name), None)


def drop_duplicates(
    train_items: list[Item], test_items: list[Item], unlabeled_paths: list[str],
) -> tuple[list[Item], list[Item], list[str], list[tuple[str, str]]]:
    """The dataset without files whose bytes repeat an earlier one, as uploads store it: a
    test image that is also a training image would score the model on what it learnt, and an
    unlabeled copy of a labeled image would give it back its own label. As an upload keeps
    the first copy in archive order, a labeled one before an unlabeled one: the labeled
    images (training and test alike) in path order, then the unlabeled ones in theirs.
    Returns the kept lists, in their order, and (dropped, kept copy) pairs."""
    first: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    labeled = sorted(path for path, _ in [*train_items, *test_items])
    for path in [*labeled, *unlabeled_paths]:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if digest in first:
            dropped.append((path, first[digest]))
        else:
            first[digest] = path
    gone = {path for path, _ in dropped}
    return ([item for item in train_items if item[0] not in gone],
            [item for item in test_items if item[0] not in gone],
            [path for path in unlabeled_paths if path not in gone], dropped)


def read_labels_csv(
    csv_path: Path, skipped: dict[str, str] | None = None, warnings: list[str] | None = None,
) -> tuple[list[str], list[Item], list[Item], list[str]]:
    """A labels.csv dataset (`parse_labels_csv`), read as the web reads an upload's: paths
    relative to the CSV's folder; listed files that are not images, or do not open, are left
    out with the reason in `skipped`. Returns what `load_folder_dataset` does; images the CSV
    does not list are not used."""
    folder = csv_path.parent

    def inside_folder(raw: str) -> str:
        # As uploads read it: Windows' backslashes are folder separators.
        relative = PurePosixPath(raw.replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts or re.match(r"^[A-Za-z]:", raw):
            raise ValueError(f"path {raw!r} must be relative to the folder of {LABELS_CSV}, "
                             "without '..' or a leading '/'")
        return str(relative)

    rows = parse_labels_csv(csv_path.read_bytes(), str(csv_path), lambda written: spaced_path(
        written, inside_folder, lambda relative: (folder / relative).is_file()))
    for relative, row in rows.items():
        if not (folder / relative).is_file():
            raise ValueError(f"{csv_path} line {row.line}: {relative!r} does not exist in "
                             f"{folder}{header_hint([row])}")
    unusable = {relative: problem for relative in rows
                if (problem := _image_problem(str(folder / relative)))}
    if skipped is not None:
        skipped.update({str(folder / relative): problem for relative, problem in unusable.items()})
    rows = {relative: row for relative, row in rows.items() if relative not in unusable}
    if warnings is not None:
        warnings.extend(folder_disagreements(
            ((relative, row.label) for relative, row in rows.items()), str(csv_path),
            "run again"))

    class_names = sorted({row.label for row in rows.values() if row.label and row.split == "train"},
                         key=natural_key)
    if len(class_names) < 2:
        found = ", ".join(repr(name) for name in class_names)
        raise ValueError(f"{csv_path}: found {len(class_names)} class(es) with training images "
                         f"({found}); need at least two")
    if only_tested := sorted({row.label for row in rows.values() if row.split == "test"}
                             - set(class_names)):
        raise ValueError(f"{csv_path}: {', '.join(map(repr, only_tested))} only in the test "
                         "split: add training images for them or remove them")
    index = {name: i for i, name in enumerate(class_names)}

    def items(part: str) -> list[Item]:
        return sorted(((str(folder / relative), index[row.label])
                       for relative, row in rows.items() if row.label and row.split == part),
                      key=lambda item: (item[1], item[0]))

    unlabeled = sorted(str(folder / relative) for relative, row in rows.items()
                       if not row.label)
    return class_names, items("train"), items("test"), unlabeled


def hold_out_items(
    train_items: list[Item], fraction: float, seed: int
) -> tuple[list[Item], list[Item]]:
    """(kept, held_out) train items: a stratified hold-out (`split_holdout`) to score on."""
    kept, held = split_holdout([label for _, label in train_items], fraction, seed)
    return [train_items[i] for i in kept], [train_items[i] for i in held]


def make_budget_data(
    class_names: list[str],
    train_items: list[Item],
    test_items: list[Item],
    unlabeled_paths: list[str],
    budget: Budget | object,
    seed: int,
) -> tuple[RunData, dict]:
    """Apply a label budget: a class-balanced subset of the labeled pool keeps its labels,
    the rest joins the unlabeled pool with its labels hidden (they measure pseudo-labels)."""
    budget = Budget.parse(budget)
    labels = [label for _, label in train_items]
    if not labels:
        raise BudgetError("the labeled pool is empty")
    chosen = set(select_labeled(labels, budget, seed))
    labeled = [item for i, item in enumerate(train_items) if i in chosen]
    hidden = [(path, label) for i, (path, label) in enumerate(train_items) if i not in chosen]
    unlabeled = hidden + [(path, None) for path in unlabeled_paths]
    data = RunData(class_names=class_names, labeled=labeled, unlabeled=unlabeled, test=test_items)
    per_class = Counter(label for _, label in labeled)
    info = {
        "budget": budget.to_json(),
        "budget_label": budget.label,
        "seed": seed,
        "labeled_pool_size": len(train_items),
        "labeled_count": len(labeled),
        "labeled_per_class": [per_class.get(i, 0) for i in range(len(class_names))],
        "unlabeled_count": len(unlabeled),
        "hidden_label_count": len(hidden),
        "test_count": len(test_items),
    }
    return data, info


def find_images(folder: Path, skipped: dict[str, str] | None = None) -> list[Path]:
    """Every image in `folder` and its sub-folders, as an upload finds them (`_images`)."""
    return _images(folder, recursive=True, skipped=skipped)


def _images(folder: Path, recursive: bool = False,
            skipped: dict[str, str] | None = None) -> list[Path]:
    """The images in `folder`, as uploads find them (`_image_problem`); the other files,
    less hidden ones and macOS metadata, go into `skipped` with the reason."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for p in sorted(pattern):
        if not p.is_file() or any(_hidden(part) for part in p.relative_to(folder).parts):
            continue
        if problem := _image_problem(str(p)):
            if skipped is not None:
                skipped[str(p)] = problem
        else:
            found.append(p)
    return found


def _image_problem(path: str) -> str | None:
    """Why the file at `path` is not an image to train on, as an upload would say it; None
    for an image. Without an image extension its content decides; Pillow must open it.
    Asked once per version of a file (folders are scanned more than once)."""
    stat = os.stat(path)
    return _file_problem(path, stat.st_size, stat.st_mtime_ns)


@cache
def _file_problem(path: str, _size: int, _mtime_ns: int) -> str | None:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        with open(path, "rb") as handle:
            if not looks_like_image(handle.read(SNIFF_BYTES)):
                return f"not an image ({suffix or 'no extension'}); supported: {SUPPORTED_TEXT}"
    try:
        with Image.open(path) as image:
            image.load()  # a whole decode, as an upload's: verify() let truncated data by
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a damaged file
        return f"corrupt or unsupported image ({str(exc).strip() or type(exc).__name__})"
    return None


def _hidden(name: str) -> bool:
    return skip_reason_by_name((name,)) is not None


def _look_through_wrapper(root: Path) -> Path:
    """Step into a single wrapping folder (zips often have one) unless it is `train/` or
    `unlabeled/`. A test split alone (`test/`, `val/`) is one: it would leave nothing to
    train on, so it is a dataset's val/ folder packed by itself, as uploads read it. One
    that holds labels.csv is one whatever its name, as an upload reads it (the app's
    download of a dataset uploaded as one train/ folder was `train/labels.csv`)."""
    while True:
        entries = [e for e in root.iterdir() if not _hidden(e.name)]
        if len(entries) == 1 and entries[0].is_dir() and (
                (entries[0] / LABELS_CSV).is_file()
                or (entries[0].name.lower() not in ("train", "unlabeled")
                    and not _images(entries[0]))):
            root = entries[0]
        else:
            return root


def unpacked_folder(archive: Path) -> Path:
    """Where `load_folder_dataset` reads `archive` from: its unpacked copy in the temp folder
    (unpacked now if it is not there)."""
    return _unpack(archive)


# Unpacked copies are kept for the next run of the same archive. One whose archive has gone
# or changed since (a new copy is made under another name), or a staging folder a killed
# unpack left, is removed by a later unpack once unused this long: a run touches its copy's
# marker as it starts and ends, and has decoded every image it reads by then.
UNUSED_COPY_S = 7 * 24 * 3600.0
UNPACKED_MARKER = ".complete"  # holds the identity of the archive the copy came from
COPIES_FOLDER = "selftuning-datasets"  # in the temp folder: the archives' unpacked copies


def _unpack(archive: Path) -> Path:
    """Unpack once into a folder named after the archive's identity; refuse unsafe members
    and archives the temp folder has no room for."""
    stat = archive.stat()
    source = {"path": str(archive.resolve()), "size": stat.st_size,
              "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(
        f"{source['path']}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / COPIES_FOLDER / key
    if (target / UNPACKED_MARKER).is_file():
        _mark_used(target / UNPACKED_MARKER)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_unused_copies(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=target.parent))
    try:
        _extract(archive, staging)
        (staging / UNPACKED_MARKER).write_text(json.dumps(source))
        try:
            os.replace(staging, target)
        except OSError:
            # Another process unpacked the same archive first; use theirs.
            if not (target / UNPACKED_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it became the target
    return target


def _mark_used(marker: Path) -> None:
    try:
        os.utime(marker)
    except OSError:
        pass  # a temp folder shared read-only: the copy is only kept less surely


def _remove_unused_copies(folder: Path) -> None:
    """Remove the copies of archives that are gone or changed, and staging folders, unused
    for UNUSED_COPY_S (see there). A copy of an archive still as it was stays however old."""
    now = time.time()
    for entry in folder.iterdir():
        marker = entry / UNPACKED_MARKER
        try:
            used = (marker if marker.is_file() else entry).stat().st_mtime
            if now - used < UNUSED_COPY_S or _archive_unchanged(marker):
                continue
            shutil.rmtree(entry)
        except OSError:
            continue  # removed by another process meanwhile, or not ours to remove


def _archive_unchanged(marker: Path) -> bool:
    """Whether the archive a copy's marker names is still there as it was unpacked. A
    staging folder has no marker; a copy unpacked before markers named their archive has an
    empty one: neither can tell."""
    try:
        source = json.loads(marker.read_text())
        stat = Path(source["path"]).stat()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (stat.st_size, stat.st_mtime_ns) == (source["size"], source["mtime_ns"])


UNICODE_PATH_FIELD = 0x7075  # Info-ZIP's Unicode Path extra field (APPNOTE 4.6.9)


def zip_entry_name(info: zipfile.ZipInfo) -> str:
    """An entry's name as its bytes were meant. zipfile reads a name not flagged as UTF-8 as
    cp437, the zip format's old encoding, but Linux's `zip` (Info-ZIP) and many other tools
    store UTF-8 without the flag ("café/" would come out "caf├⌐/"): bytes that are valid
    UTF-8 are read as UTF-8. Tools that write a legacy code page (WinZip, older Windows)
    add the name in UTF-8 in a Unicode Path field, used while it still matches the name
    (its CRC). Others are read as cp437, which maps every byte, so nothing is lost."""
    if info.flag_bits & 0x800:
        return info.filename
    raw = info.orig_filename.encode("cp437")
    unicode_name = _unicode_path(info.extra, raw)
    if unicode_name is not None:
        return unicode_name
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeDecodeError:
        return info.filename


def _unicode_path(extra: bytes, raw_name: bytes) -> str | None:
    """The UTF-8 name of a Unicode Path field in `extra` written for `raw_name` (a field
    left from before a tool renamed the entry has another CRC: it is ignored), or None."""
    at = 0
    while at + 4 <= len(extra):
        kind, size = int.from_bytes(extra[at:at + 2], "little"), int.from_bytes(
            extra[at + 2:at + 4], "little")
        field = extra[at + 4:at + 4 + size]
        at += 4 + size
        if kind != UNICODE_PATH_FIELD or len(field) < 5 or field[0] != 1:
            continue
        if int.from_bytes(field[1:5], "little") != zlib.crc32(raw_name):
            continue
        try:
            name = field[5:].decode("utf-8")
        except UnicodeDecodeError:
            return None
        return name.split("\x00")[0] or None
    return None


# As the web's upload takes them (tarfile reads each compression).
class TarInfoSeeingTheEnd(tarfile.TarInfo):
    """Marks the archive it reads (`tar_end_read`) when its end-of-archive block (512 zero
    bytes) comes. tarfile ends its entries without a word where the data ends instead, or
    where a header is cut: a tar cut where an entry ends (`tar | curl` whose tar died, a copy
    broken off) reads as a whole one with fewer images."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            tarfile_.selftune_end_read = True  # type: ignore[attr-defined]
            raise


def tar_end_read(archive: tarfile.TarFile) -> bool:
    """Whether the entries of `archive` (opened with TarInfoSeeingTheEnd) ended at its
    end-of-archive block, not where its data did."""
    return getattr(archive, "selftune_end_read", False)


# Why a tar that ends without that block is refused, after "damaged or truncated".
TAR_CUT_SHORT = "it ends without the end-of-archive block that tar writes last"

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


# What a file costs a file system beyond its bytes (a part-filled block, its entry): counted
# so that an archive of many small files is not let through to fill the disk after all.
FILE_OVERHEAD_BYTES = 4096


class _Room:
    """The free space where an archive unpacks, claimed member by member: one that would fill
    the disk is refused before it does (zip and tar state each member's size, and unpacking
    writes no more than that)."""

    def __init__(self, archive: Path, folder: Path) -> None:
        self.archive, self.folder = archive, folder
        self.free = shutil.disk_usage(folder).free
        self.needed = 0

    def take(self, size: int) -> None:
        self.needed += size + FILE_OVERHEAD_BYTES
        if self.needed > self.free:
            raise ValueError(
                f"{self.archive} needs more than {self.needed / 2**20:,.0f} MiB unpacked and "
                f"the temp folder {self.folder.parent} has {self.free / 2**20:,.0f} MiB free: "
                "free some space, point TMPDIR at a disk with room, or unpack the archive "
                "yourself and give its folder")

    def took(self, member: tarfile.TarInfo) -> tarfile.TarInfo:
        self.take(member.size)
        return member


def _extract(archive: Path, destination: Path) -> None:
    """Unpack a .zip or .tar (TAR_SUFFIXES); a damaged or unsafe archive is a ValueError
    naming it."""
    name = archive.name.lower()
    room = _Room(archive, destination)
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                for member in bundle.infolist():
                    # Where extract() writes it: a backslash is a folder, as an upload reads
                    # it (some Windows tools write them).
                    member.filename = zip_entry_name(member).replace("\\", "/")
                    relative = PurePosixPath(member.filename)
                    if relative.is_absolute() or ".." in relative.parts:
                        raise ValueError(
                            f"{archive}: member {member.filename!r} escapes the archive")
                    if member.is_dir():  # (__MACOSX/ too, which the read reports)
                        continue
                    room.take(member.file_size)
                    bundle.extract(member, destination)
        elif name.endswith(TAR_SUFFIXES):
            with tarfile.open(archive, tarinfo=TarInfoSeeingTheEnd) as bundle:
                # The 'data' filter refuses absolute paths, '..', links out and device files.
                bundle.extractall(destination, filter="data",
                                  members=(room.took(member) for member in bundle))
                if not tar_end_read(bundle):
                    raise ValueError(f"{archive} is damaged or truncated (cut short by an "
                                     f"incomplete download?): {TAR_CUT_SHORT}; make or "
                                     "download the archive again")
        else:
            raise ValueError(f"{archive}: use a folder, .zip, .tar, .tar.gz, .tar.bz2 or "
                             ".tar.xz")
    except tarfile.FilterError as exc:
        raise ValueError(f"{archive}: {exc}; an archive may not reach outside itself") from exc
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
            OSError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
            # 255 characters may take up to 1,020 bytes, and file systems keep 255 bytes.
            raise ValueError(
                f"{archive}: {exc.filename or 'a member'} has a file or folder name longer than "
                "this file system keeps (255 bytes in UTF-8): rename it shorter, or upload the "
                "archive on the web page, which stores files under names of its own") from None
        # bzip2 says "Invalid data stream" as an OSError without an errno; one with an errno
        # (a full disk) is not the archive's.
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        kind = ".zip" if name.endswith(".zip") else ".tar (.gz, .bz2, .xz)"
        raise ValueError(f"{archive} is not a readable {kind} archive: is it complete?") from exc
