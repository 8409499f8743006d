"""labels.csv, one of the dataset layouts (`path,label[,split]`), read the same way by the
web's uploads and the command line, how both name and order classes, and what both warn of in
a dataset's classes and labels. Without torch, so the web can import it."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath
from typing import NamedTuple

from worker.selftuning.pixels import IMAGE_SUFFIXES

LABELS_CSV = "labels.csv"
# The split names a dataset may use (as folders, or in the split column) and what each means.
SPLITS = {"train": "train", "test": "test", "val": "test"}
# The folder of images without a label, in any letter case (not a class).
UNLABELED_FOLDER = "unlabeled"
# How a labels.csv with its columns the wrong way round is put right.
SWAPPED_FIX = "each line is 'path,label' or 'path,label,split'"
# Not in a class name (nor a dataset's name: PostgreSQL text cannot hold a NUL).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def class_name(raw: str) -> str:
    """A class as named by a folder or a label cell, in Unicode's composed form (NFC): macOS
    writes "café" as "cafe" plus a combining accent, and those two spellings are one class.
    Without spaces around it, as labels.csv's cells are read: a folder `cat ` is the class
    `cat`, so a dataset downloaded from the app (whose labels.csv names it) comes back with
    the classes it had. Empty for a name of spaces only (BLANK_CLASS_FOLDER)."""
    return unicodedata.normalize("NFC", raw).strip()


# Why the images of a class folder named with spaces only are skipped.
BLANK_CLASS_FOLDER = "its class folder's name is blank (spaces only): rename the folder"


def natural_key(name: str) -> tuple:
    """Sort key that puts "class2" before "class10"; the name itself breaks ties. Classes
    are numbered in this order on the web and on the command line, so both give a class the
    same index."""
    # The split's group puts the runs of digits at odd positions: \d takes the decimal digits
    # int() reads, where str.isdigit() also takes "①" or "²", which it refuses (a 500).
    parts = tuple(
        (0, int(token), "") if position % 2 else (1, 0, token.casefold())
        for position, token in enumerate(re.split(r"(\d+)", name))
        if token
    )
    return parts, name


class LabelsRow(NamedTuple):
    label: str | None  # None: an unlabeled image
    split: str  # train | test
    line: int


def parse_labels_csv(
    data: bytes, name: str, clean_path: Callable[[str], str]
) -> dict[str, LabelsRow]:
    """The rows of a labels.csv (`path,label[,split]`; a `path,label` header line is
    optional; an empty label for an unlabeled image; split train, test or val) by path,
    for the web's uploads and the command line alike. Cells are read without the spaces
    around them (`a.png, cat`), but for the path `clean_path` gets the cell as written
    (`spaced_path`): it gives the path's normal form or a ValueError saying why it is
    refused. A mistake is a ValueError naming `name` and the line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not UTF-8 text: save it as UTF-8 CSV") from None
    rows: dict[str, LabelsRow] = {}
    for line_number, written in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [cell.strip() for cell in written]
        if not any(cells):
            continue
        header = [cell.lower() for cell in cells[:2]] if line_number == 1 else []
        if header == ["path", "label"]:
            continue
        where = f"{name} line {line_number}"
        if header == ["label", "path"]:
            raise ValueError(f"{where}: the columns are 'label,path': write the path first, "
                             f"then the label ({SWAPPED_FIX})")
        if len(cells) not in (2, 3):
            raise ValueError(f"{where}: expected 'path,label' (or 'path,label,split'), got "
                             f"{len(cells)} column{'' if len(cells) == 1 else 's'}"
                             + ("; its columns are separated by ';' (a spreadsheet in a language "
                                "that writes decimal commas saves CSV so): separate them with "
                                "commas" if len(cells) == 1 and ";" in cells[0] else ""))
        try:
            path = clean_path(written[0])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        split = cells[2].lower() if len(cells) == 3 and cells[2] else "train"
        if split not in SPLITS:
            raise ValueError(f"{where}: split {cells[2]!r} must be train, test or val")
        if path in rows:
            swapped = reads_like_a_path(cells[1]) and not reads_like_a_path(cells[0])
            raise ValueError(f"{where}: {cells[0]!r} is listed twice" + (
                f"; the label {cells[1]!r} reads like an image's path: are the columns "
                f"swapped? ({SWAPPED_FIX})" if swapped else ""))
        if CONTROL_CHARACTERS.search(cells[1]):
            raise ValueError(f"{where}: the label {cells[1]!r} has a control character (a tab, "
                             "line break or NUL): class names may not")
        if not cells[1] and SPLITS[split] == "test":
            raise ValueError(
                f"{where}: {cells[0]!r} is in the {split} split without a label: accuracy is "
                "scored on test images, so each needs one; for an unlabeled image leave the "
                "split empty")
        rows[path] = LabelsRow(class_name(cells[1]) if cells[1] else None, SPLITS[split],
                               line_number)
    return rows


def reads_like_a_path(cell: str) -> bool:
    """Whether a labels.csv cell names an image file (a label that does was most likely
    written in the path's column, and the path in the label's)."""
    return PurePosixPath(cell).suffix.lower() in IMAGE_SUFFIXES


def spaced_path(written: str, clean: Callable[[str], str], exists: Callable[[str], bool]
                ) -> str:
    """The file a labels.csv's path cell names (`clean` gives a path's normal form): the cell
    as written where such a file exists (a file or folder's name may begin or end with a
    space, and this app's download writes it so), else without the spaces around it."""
    if written != written.strip() and exists(path := clean(written)):
        return path
    return clean(written.strip())


def header_hint(missing: Iterable[LabelsRow]) -> str:
    """For a labels.csv that names files that are not there: when line 1 is one of them, it
    is most likely a header under other names (`filename,class`), read as an image."""
    if any(row.line == 1 for row in missing):
        return ("; line 1 is read as an image and its label: a header line must be "
                "'path,label' (or 'path,label,split')")
    return ""


def folder_disagreements(labels: Iterable[tuple[str, str | None]], csv_name: str,
                         again: str = "upload again") -> list[str]:
    """A labels.csv that gives images in a class's folder (a folder named as one of its
    classes) another class, or none: `labels` are each image's (path, class or None). The
    CSV's labels are used, as the layout says, but a stale or swapped CSV would relabel the
    images without a word: said, with a few of them, and what to do (`again`)."""
    labels = list(labels)
    classes = {label for _, label in labels} - {None}
    differing = sorted((path, label) for path, label in labels
                       if (folder := class_name(PurePosixPath(path).parent.name)) in classes
                       and label != folder)
    if not differing:
        return []
    shown = ", ".join(f"{_cut(path)!r} as " + ("unlabeled" if label is None else repr(label))
                      for path, label in differing[:3])
    count = len(differing)
    # Begun with the count: a page writes a warning's first letter large, and a file's name
    # is not to be changed.
    return [f"{count} image{' is' if count == 1 else 's are'} in a class's folder but labeled "
            f"another class or none by {csv_name} ({shown}{' and more' if count > 3 else ''}): "
            f"its labels are used; if the folders are right, remove {csv_name} and {again}"]


def _cut(path: str, chars: int = 80) -> str:
    """A long path as a message shows it: its end, where the file's name is."""
    return path if len(path) <= chars else f"…{path[-(chars - 1):]}"


def class_name_warnings(class_names: list[str], again: str = "upload again") -> list[str]:
    """Class folders whose names differ only in letter case (`Dog/`, `dog/`): two classes
    here, one folder on macOS and Windows, so most likely one class split by accident; and
    `unlabelled/`, a class where `unlabeled/` was meant. They are kept as they came (a person
    may mean them), and said, with what to do (`again`)."""
    by_folding: dict[str, list[str]] = {}
    for name in class_names:
        by_folding.setdefault(name.casefold(), []).append(name)
    return [
        f"classes {' and '.join(repr(name) for name in names)} differ only in letter case: "
        f"they are {'two' if len(names) == 2 else len(names)} classes here (macOS and Windows "
        f"keep one folder for both); if they are one class, merge their folders and {again}"
        for names in by_folding.values() if len(names) > 1
    ] + [
        # The British spelling: its images were trained as a class named so.
        f"class {name!r} is a class here, not the {UNLABELED_FOLDER}/ folder: if its images "
        f"have no label, rename the folder to {UNLABELED_FOLDER}/ and {again}"
        for name in class_names if name.casefold() == "unlabelled"
    ]


def skip_reason_by_name(parts: list[str] | tuple[str, ...]) -> str | None:
    """Why a file is skipped by its path's parts alone: macOS metadata, a hidden file or one
    in a hidden folder; None for any other."""
    if any(part.lower() == "__macosx" for part in parts):
        return "macOS metadata (__MACOSX)"
    if any(part.startswith(".") for part in parts):
        return "hidden file or folder"
    return None


def lost_class_warnings(lost: dict[str, int]) -> list[str]:
    """Class folders of the training images none of whose files is kept (each skipped:
    HEIC photos, files that do not open), by name with how many files each had: the class is
    gone without a word but the skipped files' list."""
    return [f"{'The' if count == 1 else f'All {count:,}'} file{'' if count == 1 else 's'} "
            f"in the class folder {name!r} "
            f"{'was' if count == 1 else 'were'} skipped (the skipped files say why), so "
            f"{name!r} is not a class of this dataset: fix "
            f"{'it' if count == 1 else 'them'} and upload again if it should be one"
            for name, count in sorted(lost.items(), key=lambda item: natural_key(item[0]))]


def untested_class_warnings(untested: list[str]) -> list[str]:
    """Classes that a given test split has no image of: they are trained but never scored,
    and test top-1 is over the other classes alone."""
    if not untested:
        return []
    them, its = ("it", "its") if len(untested) == 1 else ("them", "their")
    return [f"{classes_phrase(untested, 'has', 'have')} no images in the given test split: "
            f"runs train on {them} but never score {them}, and test top-1 is over the other "
            f"classes alone; add {its} images to test/ (or leave test/ out to hold out a share "
            "of each class)"]


def classes_phrase(names: list[str], singular: str, plural: str) -> str:
    """"class 'a' has" or "classes 'a', 'b' have"."""
    if len(names) == 1:
        return f"class {names[0]!r} {singular}"
    return f"classes {quoted_list(names)} {plural}"


def quoted_list(items: list[str], limit: int = 5) -> str:
    """"'a', 'b', 'c', 'd', 'e' and 2 more"."""
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
