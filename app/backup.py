"""`python -m app.backup DEST`: a copy of the installation while it runs, which the app serves
when started with `SELFTUNE_DATA_DIR=DEST` (see README, Backing up and moving).

The database is copied first, then the files: a dataset or run added meanwhile has files the
copy's database does not list (the copy's first start removes them), and one the copy's
database lists was on disk when the copy began. Only one deleted during the copy is missing,
and the check at the end names it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

from app.config import SQLITE_FILE, Settings, get_settings
from app.db import DATABASE_ID_FILE, sqlite_file

DUMP_FILE = "selftune.dump"  # where a PostgreSQL installation's dump goes, before the files
# What the copy needs; caches, uploads in progress, deletes not finished, the embedded
# Redis's files and the launcher's bookkeeping are made again, or are not needed, at start.
COPIED_FOLDERS = ("datasets", "runs")


class BackupRefused(Exception):
    """A backup not made (a destination it will not write to, a database dump not yet taken:
    nothing written) or not finished (a file it could not copy: the copy is not whole)."""


@dataclass
class Backup:
    """What a backup copied, and what its database lists that is not in it."""

    destination: Path
    dump: Path | None = None  # PostgreSQL: the dump taken first, the files beside it
    datasets: int = 0
    runs: int = 0
    missing: list[str] = field(default_factory=list)


def check_destination(destination: Path, data_dir: Path, allowed: tuple[str, ...] = ()) -> None:
    """Refuse a folder inside the data directory, or one holding anything but `allowed`."""
    if destination.is_relative_to(data_dir):
        raise BackupRefused(f"{destination} is inside the data directory {data_dir}: "
                            "choose a folder outside it")
    if destination.exists() and (not destination.is_dir() or any(
            entry.name not in allowed for entry in destination.iterdir())):
        raise BackupRefused(f"{destination} exists and is not an empty folder: name a new "
                            "one, so that no earlier backup's files are mixed into this one")


def check_database_id(database: Path, data_dir: Path) -> None:
    """Refuse to copy a SQLite database with a data directory that is not its own (the app
    would refuse to start on the copy: SELFTUNE_DATABASE_URL forgotten or mistyped, say)."""
    if not database.is_file():
        raise BackupRefused(f"no SQLite database at {database}: is SELFTUNE_DATA_DIR (or "
                            "SELFTUNE_DATABASE_URL) the running app's?")
    recorded = (data_dir / DATABASE_ID_FILE).read_text().strip()
    try:
        reading = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
        try:
            (database_id,) = reading.execute("SELECT database_id FROM installation").fetchone()
        finally:
            reading.close()
    except (sqlite3.Error, TypeError) as exc:  # not the app's database, or an empty table
        raise BackupRefused(f"{database} is not a database this app has migrated ({exc})"
                            ) from None
    if database_id != recorded:
        raise BackupRefused(
            f"the data directory {data_dir} holds the files of another database (its "
            f"{DATABASE_ID_FILE} is {recorded}; {database} is {database_id}), and a copy of "
            "the two would not start: back up with the SELFTUNE_DATABASE_URL the app runs "
            "with. Nothing was copied.")


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of the SQLite database at `source`, written while the app may be
    writing it: SQLite's online backup reads one snapshot (a file copy could catch a page
    half-written, or miss what the write-ahead log holds)."""
    if not source.is_file():
        raise BackupRefused(f"no SQLite database at {source}: is SELFTUNE_DATA_DIR (or "
                            "SELFTUNE_DATABASE_URL) the running app's?")
    reading = sqlite3.connect(source, timeout=30)
    try:
        writing = sqlite3.connect(target)
        try:
            reading.backup(writing)
            # One file, no write-ahead log beside it to lose (the app turns WAL on again).
            writing.execute("PRAGMA journal_mode=DELETE")
        finally:
            writing.close()
    except sqlite3.Error as exc:  # a full disk, a target it may not write
        raise BackupRefused(f"the database {source} could not be copied to {target}: {exc}; "
                            "the copy is not whole") from None
    finally:
        reading.close()


class LinkedCopies:
    """A copy function for copytree that keeps hard links: the datasets made by adding labels
    share their images' files with the dataset they were made from (app.add_labels), and a
    copy of each would take the space of every dataset of them again."""

    def __init__(self) -> None:
        self.copied: dict[tuple[int, int], str] = {}  # (device, inode) -> its first copy

    def __call__(self, source: str, target: str) -> str:
        found = os.stat(source)
        if found.st_nlink > 1:
            key = (found.st_dev, found.st_ino)
            if (first := self.copied.get(key)) is not None:
                try:
                    os.link(first, target)
                    return target
                except OSError:  # a file system without hard links: a copy, as before
                    pass
            else:
                self.copied[key] = target
        return shutil.copy2(source, target)


def copy_files(data_dir: Path, destination: Path) -> None:
    """The dataset and run folders and the database-id file. A file deleted during the copy
    (a dataset or run deleted meanwhile, a checkpoint replaced) is skipped: whether the copy
    misses something is for `missing_from` to say, from the copy's own database."""
    linked = LinkedCopies()
    for name in COPIED_FOLDERS:
        source = data_dir / name
        if not source.is_dir():
            continue
        try:
            shutil.copytree(source, destination / name, symlinks=True,
                            ignore=shutil.ignore_patterns("*.tmp"),
                            copy_function=linked, dirs_exist_ok=True)
        except shutil.Error as exc:
            # copytree copies all it can, then raises with every file it could not. One
            # deleted meanwhile is for `missing_from`; one still there (a full disk, a file
            # it may not read) means the copy is not whole.
            failed = [(src, why) for src, _, why in exc.args[0] if Path(src).exists()]
            if failed:
                src, why = failed[0]
                raise BackupRefused(f"{len(failed)} file(s) could not be copied, the first "
                                    f"{src}: {why}; the copy in {destination} is not whole"
                                    ) from None
    shutil.copy2(data_dir / DATABASE_ID_FILE, destination / DATABASE_ID_FILE)


def missing_from(destination: Path) -> tuple[int, int, list[str]]:
    """The datasets and runs the copy's database lists, and the folders and exported files
    among them that are not in `destination` (paths relative to it)."""
    connection = sqlite3.connect(f"file:{destination / SQLITE_FILE}?mode=ro", uri=True)
    try:
        datasets = [key for (key,) in connection.execute("SELECT storage_key FROM datasets")]
        runs = connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        exports = [path for (path,) in connection.execute("SELECT path FROM artifacts")]
    finally:
        connection.close()
    listed = [f"datasets/{key}" for key in datasets] + exports
    return len(datasets), runs, sorted(path for path in listed
                                       if not (destination / path).exists())


def backup(settings: Settings, destination: Path) -> Backup:
    data_dir = settings.data_dir
    destination = destination.expanduser().resolve()
    url = make_url(settings.sqlalchemy_url)
    database = sqlite_file(settings.sqlalchemy_url)
    sqlite = database is not None
    # PostgreSQL's dump is taken first, into DEST (see the module's docstring for the order).
    check_destination(destination, data_dir, allowed=() if sqlite else (DUMP_FILE,))
    if not (data_dir / DATABASE_ID_FILE).is_file():
        raise BackupRefused(f"{data_dir} has no {DATABASE_ID_FILE}: it is not a data "
                            "directory the app has started with")
    if sqlite:
        check_database_id(database, data_dir)
    if not sqlite and not (destination / DUMP_FILE).is_file():
        shown = url.set(drivername=url.get_backend_name())  # pg_dump names no driver
        raise BackupRefused(
            f"the database is PostgreSQL, which this command cannot copy: dump it into "
            f"{destination} first, `mkdir -p {destination} && pg_dump -Fc -d "
            f"{shown.render_as_string(hide_password=True)} > {destination / DUMP_FILE}` (with "
            "the password the app has), then run this again to copy the files; the files "
            "after the dump, so that every dataset and run it lists has its files")
    try:
        destination.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupRefused(f"cannot make the folder {destination}: "
                            f"{exc.strerror or exc}") from None
    if not sqlite:
        copy_files(data_dir, destination)
        return Backup(destination, dump=destination / DUMP_FILE)
    copy_sqlite(database, destination / SQLITE_FILE)
    copy_files(data_dir, destination)
    datasets, runs, missing = missing_from(destination)
    return Backup(destination, None, datasets, runs, missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.backup",
        description="Copy the installation (SELFTUNE_DATA_DIR, its SQLite database) to DEST "
                    "while the app runs; start a copy with SELFTUNE_DATA_DIR=DEST.")
    parser.add_argument("dest", type=Path, help="a new or empty folder outside the data dir")
    args = parser.parse_args(argv)
    try:
        done = backup(get_settings(), args.dest)
    except BackupRefused as exc:
        print(f"backup refused: {exc}", file=sys.stderr)
        return 2
    if done.dump:
        print(f"copied the datasets and runs to {done.destination}, beside the database's "
              f"dump {done.dump}; restore the dump with pg_restore (see README, "
              "Backing up and moving)")
        return 0
    if done.missing:
        print(f"{len(done.missing)} of the files the copied database lists were deleted "
              f"during the copy: {', '.join(done.missing)}. Back up again (to a new folder).",
              file=sys.stderr)
        return 1
    print(f"backed up {done.datasets} dataset(s) and {done.runs} run(s) to "
          f"{done.destination}; start it with SELFTUNE_DATA_DIR={done.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
