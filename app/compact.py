"""Giving deleted rows' space back to the disk. A SQLite file never shrinks by itself: the
pages of deleted rows (a run's metric points, thousands a run) stay in it as free pages,
reused by later writes but kept. A database in incremental auto-vacuum mode (every one made
since; app.db) gives them back after each delete of an experiment or a dataset (the web, once
it has answered); `python -m app.compact` (`make compact`) does it on demand, and converts a
database made before with one full VACUUM. PostgreSQL needs none of it: its autovacuum makes
deleted rows' space reusable."""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app.config import get_settings
from app.db import get_engine, sqlite_file
from app.responses import human_bytes

log = logging.getLogger(__name__)

INCREMENTAL = 2  # what PRAGMA auto_vacuum answers in incremental mode
# Free pages given back in one write transaction (8 MiB at SQLite's 4 KiB pages, 20-40 ms
# here): the web's and the workers' writes wait for one batch at most.
BATCH_PAGES = 2048


def release_free_pages(url: str) -> int:
    """Give a SQLite database's free pages back to the file system, BATCH_PAGES a write
    transaction, pausing after each as long as it took so that other writers get their
    turn; returns how many pages went. Only in incremental auto-vacuum mode (a database made
    before stays as it is until `python -m app.compact`); nothing for other databases. A
    database that stays locked ends it quietly: the next delete, or `python -m app.compact`,
    gives back the rest."""
    if sqlite_file(url) is None:
        return 0
    connection = get_engine(url).raw_connection()
    released = 0
    try:
        raw = connection.driver_connection
        if raw.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
            return 0
        free = raw.execute("PRAGMA freelist_count").fetchone()[0]
        while free > 0:
            started = time.monotonic()
            # executescript steps the pragma to its end: execute() stops at its first result
            # row, and gives back one page.
            raw.executescript(f"PRAGMA incremental_vacuum({BATCH_PAGES});")
            left = raw.execute("PRAGMA freelist_count").fetchone()[0]
            if left >= free:  # others freed pages as fast: leave them to the next time
                break
            released, free = released + free - left, left
            time.sleep(time.monotonic() - started)
        # The file is cut to its new size when the write-ahead log is copied back into it.
        raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.OperationalError as exc:
        log.warning("giving the database's free pages back stopped after %d: %s", released, exc)
    finally:
        connection.close()
    return released


def files_size(database: Path) -> int:
    """The database file's size with its write-ahead log's."""
    return sum(path.stat().st_size for path in (database, Path(f"{database}-wal"))
               if path.exists())


class CompactRefused(Exception):
    """Nothing to compact (no database file where the settings point): nothing changed."""


@dataclass
class Compaction:
    database: Path
    before: int  # bytes, the file and its write-ahead log
    after: int
    converted: bool  # made incremental by a full VACUUM (a database made before)


def compact(url: str) -> Compaction | None:
    """Give a SQLite database's free pages back, converting it to incremental auto-vacuum
    first where it is not (one VACUUM, which rewrites the whole file); None for another
    database. Safe while the app runs: readers go on, writers wait (see README, Backing up
    and moving)."""
    database = sqlite_file(url)
    if database is None:
        return None
    if not database.is_file():  # connecting would make an empty one
        raise CompactRefused(f"no SQLite database at {database}: is SELFTUNE_DATA_DIR (or "
                             "SELFTUNE_DATABASE_URL) the app's?")
    before = files_size(database)
    connection = get_engine(url).raw_connection()
    try:
        raw = connection.driver_connection
        converted = raw.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL
        if converted:
            raw.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect with the VACUUM
            raw.executescript("VACUUM;")
    finally:
        connection.close()
    if not converted:
        release_free_pages(url)
    connection = get_engine(url).raw_connection()
    try:  # the write-ahead log back to nothing, its pages in the file
        connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        connection.close()
    return Compaction(database, before, files_size(database), converted)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m app.compact",
        description="Give the space of deleted rows back to the disk (SQLite; with the app's "
                    "SELFTUNE_* settings). Safe while the app runs.").parse_args(argv)
    try:
        done = compact(get_settings().sqlalchemy_url)
    except CompactRefused as exc:
        print(f"compact refused: {exc}", file=sys.stderr)
        return 2
    except sqlite3.OperationalError as exc:  # a full disk, a lock held past the timeout
        print(f"compact failed, nothing changed: {exc}", file=sys.stderr)
        return 1
    if done is None:
        print("the database is not SQLite: nothing to do (PostgreSQL's autovacuum makes "
              "deleted rows' space reusable)")
        return 0
    print(f"{done.database}: {human_bytes(done.before)} -> {human_bytes(done.after)}"
          + (" (converted: from now on the web gives deleted rows' space back after each "
             "delete)" if done.converted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
