"""labels.csv, one of the dataset layouts (`path,label[,split]`), read the same way by the
web's uploads and the command line, and how both name and order classes. Without torch, so
the web can import it."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath
from typing import NamedTuple

LABELS_CSV = "labels.csv"
# The split names a dataset may use (as folders, or in the split column) and what each means.
SPLITS = {"train": "train", "test": "test", "val": "test"}
# Not in a class name (nor a dataset's name: PostgreSQL text cannot hold a NUL).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def class_name(raw: str) -> str:
    """A class as named by a folder or a label cell, in Unicode's composed form (NFC): macOS
    writes "café" as "cafe" plus a combining accent, and those two spellings are one class."""
    return unicodedata.normalize("NFC", raw)


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
    for the web's uploads and the command line alike. `clean_path` gives a path's normal
    form or a ValueError saying why it is refused. A mistake is a ValueError naming `name`
    and the line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not UTF-8 text: save it as UTF-8 CSV") from None
    rows: dict[str, LabelsRow] = {}
    for line_number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if line_number == 1 and [cell.lower() for cell in cells[:2]] == ["path", "label"]:
            continue
        where = f"{name} line {line_number}"
        if len(cells) not in (2, 3):
            raise ValueError(f"{where}: expected 'path,label' (or 'path,label,split'), got "
                             f"{len(cells)} columns")
        try:
            path = clean_path(cells[0])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        split = cells[2].lower() if len(cells) == 3 and cells[2] else "train"
        if split not in SPLITS:
            raise ValueError(f"{where}: split {cells[2]!r} must be train, test or val")
        if path in rows:
            raise ValueError(f"{where}: {cells[0]!r} is listed twice")
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
    differing = [(path, label) for path, label in labels
                 if (folder := class_name(PurePosixPath(path).parent.name)) in classes
                 and label != folder]
    if not differing:
        return []
    shown = ", ".join(f"{_cut(path)!r} as " + ("unlabeled" if label is None else repr(label))
                      for path, label in differing[:3])
    count = len(differing)
    return [f"{csv_name} labels {count} image{'' if count == 1 else 's'} in a class's folder "
            f"as another class or none ({shown}{' and more' if count > 3 else ''}): its "
            f"labels are used; if the folders are right, remove {csv_name} and {again}"]


def _cut(path: str, chars: int = 80) -> str:
    """A long path as a message shows it: its end, where the file's name is."""
    return path if len(path) <= chars else f"…{path[-(chars - 1):]}"
