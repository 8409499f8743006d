"""Database engine, sessions and Alembic upgrades for the configured URL."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, func, make_url, select, text
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

PROJECT_ROOT = Path(__file__).resolve().parent.parent


_ENGINES: dict[str, Engine] = {}  # this process's engine for each database URL


def get_engine(url: str) -> Engine:
    if (engine := _ENGINES.get(url)) is None:
        engine = _ENGINES.setdefault(url, _new_engine(url))  # of two made at once, one stays
    return engine


def _new_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", lambda connection, _record: sqlite_pragmas(connection))
        return engine
    return create_engine(url, pool_pre_ping=True)


def _leave_the_parents_connections() -> None:
    """In a forked process (a Celery worker's pool process, a loader process): the pooled
    connections are the parent's, and on PostgreSQL one server session for both, so each
    engine starts a pool of its own. Not closed: closing would end the parent's sessions."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_leave_the_parents_connections)


# The write-ahead log goes back to this size once it has been written back, after a large
# write (an upload of 100,000 images, a big delete); without a limit it kept its largest
# size for good (183 MB seen).
WAL_SIZE_LIMIT_BYTES = 64 * 1024**2


def sqlite_pragmas(connection: sqlite3.Connection) -> None:
    """Settings of every SQLite connection: foreign keys make cascades real, WAL lets the
    web read while a worker writes, the log does not keep its largest size, and a new
    database can give deleted rows' space back (`incremental_auto_vacuum`)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
    incremental_auto_vacuum(cursor)
    _use_wal(cursor)
    cursor.close()


def incremental_auto_vacuum(cursor: sqlite3.Cursor | sqlite3.Connection) -> None:
    """Put a new SQLite database in incremental auto-vacuum mode, in which its free pages
    can be given back to the disk (app.compact): without it the file kept its largest size
    for good, whatever was deleted. The mode can only be set before the file's first page
    is written (switching to WAL writes it), or by a VACUUM: on an existing database this
    only says what a VACUUM should make it (`python -m app.compact` runs one)."""
    cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")


def _use_wal(cursor: sqlite3.Cursor, wait_s: float = 30.0) -> None:
    """Switch the database to WAL unless it is already (the mode is stored in the file).

    Of two connections switching a new database at once (the web's start-up tasks, the
    worker), SQLite refuses one straight away with 'database is locked', busy timeout or not,
    since waiting could deadlock; that one tries again.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")  # ':memory:' answers 'memory'
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL (relative to the working directory where the URL's
    path is); None for another database, one in memory, or a URL that does not parse."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def ping_database(url: str) -> None:
    """Ask the database at `url` something trivial; raises what the driver raises when it
    does not answer."""
    with get_engine(url).connect() as connection:
        connection.execute(text("SELECT 1"))


@lru_cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


class StartupRefused(RuntimeError):
    """A database or data directory this version must not start with (the message says
    why and what to do)."""


def upgrade_to_head(url: str) -> None:
    """Apply every Alembic migration to the database at `url`."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if (path := sqlite_file(url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    config = alembic_config(url)
    try:
        command.upgrade(config, "head")
    except CommandError as exc:
        if "Can't locate revision" not in str(exc):
            raise
        head = ScriptDirectory.from_config(config).get_current_head()
        raise newer_version(url, str(exc), head) from None


def newer_version(url: str, detail: str, head: str) -> StartupRefused:
    """The refusal of a database a newer version of the app migrated (`detail`: to what)."""
    return StartupRefused(
        f"the database {shown_url(url)} was migrated by a newer version of this app ({detail}; "
        f"this version knows revisions up to {head}): run that version, or point "
        "SELFTUNE_DATABASE_URL at another database. Nothing was changed.")


def shown_url(url: str) -> str:
    """A database URL fit for a message: without its password (one that does not parse is not
    shown: it may hold one)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a database URL)"


MIGRATE = ("run `alembic upgrade head` (or start `make run` once, which migrates) with this "
           "SELFTUNE_DATABASE_URL. Nothing was changed.")


def not_migrated(url: str, detail: str = "") -> StartupRefused:
    return StartupRefused(f"the database {shown_url(url)} has not been migrated{detail}: {MIGRATE}")


def check_revision(connection, url: str) -> None:
    """Raise StartupRefused unless the database is at this version's migration: one an
    older release left behind lacks columns this code reads (every run page answered 500),
    one a newer release migrated has some this code does not write."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    revision = MigrationContext.configure(connection).get_current_revision()
    script = ScriptDirectory.from_config(alembic_config(url))
    head = script.get_current_head()
    if revision == head:
        return
    if revision is None:
        raise not_migrated(url)
    if revision not in {known.revision for known in script.walk_revisions()}:
        raise newer_version(url, f"to revision {revision}", head)
    raise StartupRefused(f"the database {shown_url(url)} is at migration {revision} and this "
                         f"version needs {head}: {MIGRATE}")


# Heartbeats are written by each worker's clock and judged by the web's: hosts whose clocks
# differ by more than this would call a live run lost (a worker's behind) again and again,
# or notice a dead one late (a worker's ahead).
MOST_CLOCK_SKEW_S = 60


def check_clock(connection, url: str, clock: Callable[[], datetime] | None = None) -> None:
    """Raise StartupRefused when this host's clock is more than MOST_CLOCK_SKEW_S away from
    the database server's, the clock every web and worker host is held to. Not for SQLite:
    its file and every process using it are on this host."""
    if connection.dialect.name == "sqlite":
        return
    server = connection.scalar(select(func.now()))
    if not isinstance(server, datetime) or server.tzinfo is None:
        return  # a server that does not say its time zone: nothing to compare safely
    skew = ((clock or (lambda: datetime.now(UTC)))() - server).total_seconds()
    if abs(skew) > MOST_CLOCK_SKEW_S:
        raise StartupRefused(
            f"this host's clock is {abs(skew):,.0f} s {'ahead of' if skew > 0 else 'behind'} "
            f"the database server's ({shown_url(url)}): runs are judged silent by their "
            "heartbeats' times, so a worker whose clock is behind has its runs called lost "
            "while they train. Set the clocks right (NTP) and start again. Nothing was "
            "changed.")


DATABASE_ID_FILE = "database-id"


def claim_data_dir(data_dir: Path, url: str) -> None:
    """Check that `data_dir` holds the files of the database at `url` (migrated), recording
    the database's id there the first time. Raises StartupRefused for another database's data
    directory: the web removes the dataset folders its database does not list, so a data
    directory started once with the wrong database (SELFTUNE_DATABASE_URL forgotten: a new,
    empty SQLite database) lost every dataset's files."""
    from app.models import Installation

    # A SQLite file that is not there is not made here (empty, it would no longer say so), nor
    # is an empty one written (a connection makes it a database); one whose folder is not
    # there either does not answer yet (a volume not mounted yet), unless that folder is the
    # data directory (the default database's: a data directory never started with, or
    # mistyped).
    path = sqlite_file(url)
    if path is not None and not data_dir.exists() and path.parent.absolute() == data_dir.absolute():
        raise not_migrated(url, f" (there is no data directory {data_dir})")
    if path is not None and path.parent.is_dir():
        if not path.exists():
            raise not_migrated(url, f" (there is no file {path})")
        if path.is_file() and path.stat().st_size == 0:
            raise not_migrated(url, f" (the file {path} is empty)")
    with session_scope(url) as session:
        check_revision(session.connection(), url)
        check_clock(session.connection(), url)
        database_id = session.scalar(select(Installation.database_id))
    marker = data_dir / DATABASE_ID_FILE
    try:
        recorded = marker.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        partial = marker.with_name(f".{marker.name}.{os.getpid()}")
        partial.write_text(database_id + "\n")
        try:  # a link, not a rename: a process claiming the same directory at once wins
            os.link(partial, marker)
        except FileExistsError:
            pass
        finally:
            partial.unlink()
        recorded = marker.read_text().strip()
    if recorded != database_id:
        raise StartupRefused(
            f"the data directory {data_dir} holds the files of another database (its "
            f"{DATABASE_ID_FILE} is {recorded}; {shown_url(url)} is {database_id}): start "
            "with the SELFTUNE_DATABASE_URL it was used with, or give this database a data "
            "directory of its own (SELFTUNE_DATA_DIR). Nothing was changed. (A database "
            "migrated down past revision 0006 and up again has a new id: if it is this "
            f"directory's database, delete {marker} and start again.)")
