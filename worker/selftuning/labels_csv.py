"""labels.csv, one of the dataset layouts (`path,label[,split]`), read the same way by the
web's uploads and the command line, and how both name and order classes. Without torch, so
the web can import it."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Callable, Iterable
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
