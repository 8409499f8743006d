"""Shared fixtures: real Redis, migrated SQLite/PostgreSQL, live uvicorn and Celery workers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from app.config import Settings
from app.db import upgrade_to_head
from tests.support import LiveServer, app_env, start_server, start_worker, wait_for

# The apps the tests make in this process import the engine when a test asks them, as this
# process does (app.engine_preload; tests/test_engine_preload.py turns it on).
os.environ["SELFTUNE_PRELOAD_ENGINE"] = "0"
REDIS_BASE = os.environ.get("SELFTUNE_TEST_REDIS", "redis://127.0.0.1:6379")
POSTGRES_ADMIN_URL = os.environ.get(
    "SELFTUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


CLAIM_KEY = "__selftune_test_session__"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `slow` tests first, otherwise in file order: `make test` runs the suite in two
    processes (pytest-xdist), and a minute-long test handed out last kept one of them busy
    alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


CLAIM_S = 6 * 3600
SESSION = str(os.getpid())  # this test session (one per pytest-xdist process), as a claim names it


def claim_redis_database(candidates: list[int], holder: str) -> str | None:
    """The URL of the first of Redis databases `candidates` that no other test session
    holds, now held by `holder`; None when every one is held."""
    for db in candidates:
        url = f"{REDIS_BASE}/{db}"
        client = redis.Redis.from_url(url)
        try:
            if client.set(CLAIM_KEY, holder, nx=True, ex=CLAIM_S):
                return url
        except redis.RedisError as exc:
            pytest.exit(f"Redis is not answering at {url} ({exc}); .ci/run starts one",
                        returncode=3)
    return None


def reset_redis(url: str) -> None:
    """Empty this session's Redis database, keeping the claim on it. The flush and the claim
    are one transaction: flushed first and claimed after, the database was free for a moment,
    and a test session starting beside this one (pytest-xdist's other process) could claim it
    too. The two then shared their feeds and flushed each other's keys mid-test."""
    with redis.Redis.from_url(url).pipeline() as pipe:
        pipe.watch(CLAIM_KEY)
        held_by = pipe.get(CLAIM_KEY)
        if held_by is not None and held_by.decode() != SESSION:
            raise RuntimeError(f"the Redis database {url} is held by test session {held_by!r}")
        pipe.multi()
        pipe.flushdb()
        pipe.set(CLAIM_KEY, SESSION, ex=CLAIM_S)
        pipe.execute()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database of its own for this test session on the real server: databases 1-15
    are claimed atomically, so test sessions running side by side never flush each other."""
    if os.environ.get("SELFTUNE_TEST_REDIS_DB"):
        candidates = [int(os.environ["SELFTUNE_TEST_REDIS_DB"])]
    else:
        candidates = list(range(1, 16))
    url = claim_redis_database(candidates, SESSION)
    if url is None:
        pytest.exit("every Redis database 1-15 is claimed by another test session", returncode=3)
    reset_redis(url)
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def settings(data_dir: Path, redis_url: str) -> Settings:
    """Settings on a private data directory with a migrated SQLite database."""
    reset_redis(redis_url)  # no queued task or presence key from an earlier test
    settings = Settings(data_dir=data_dir, redis_url=redis_url)
    upgrade_to_head(settings.sqlalchemy_url)
    return settings


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    name = f"selftune_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - report why PostgreSQL is unusable
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not usable: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    from app.db import get_engine

    for engine_url in [url]:
        try:
            get_engine(engine_url).dispose()
        except Exception:  # noqa: BLE001
            pass
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind the app supports: a SQLite file, then PostgreSQL."""
    if request.param == "postgresql":
        yield request.getfixturevalue("postgres_url")
        return
    url = f"sqlite:///{tmp_path / 'selftune.db'}"
    yield url
    from app.db import get_engine

    get_engine(url).dispose()


@pytest.fixture
def live_server(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path
                ) -> Iterator[LiveServer]:
    """The app served by a real uvicorn process over HTTP (SQLite, real Redis); a test's
    `server_env` marker adds environment settings to it."""
    marker = request.node.get_closest_marker("server_env")
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  **(marker.kwargs if marker else {}))
    url, process = start_server(env, tmp_path / "logs" / "uvicorn.log")
    server = LiveServer(url, settings.data_dir, settings.sqlalchemy_url,
                        settings.effective_redis_url, process, env)
    yield server
    process.stop()


@pytest.fixture
def celery_worker(live_server: LiveServer, tmp_path: Path):
    """A real Celery worker process on the live server's Redis, database and data directory."""
    worker = start_worker(live_server.env, tmp_path / "logs" / "worker.log")
    with live_server.client() as client:
        try:
            wait_for(
                lambda: client.get("/api/health").json()["workers"], timeout=90,
                message="the worker to report in /api/health",
            )
        except AssertionError:
            worker.stop()
            raise AssertionError(f"worker did not come up:\n{worker.log()[-4000:]}") from None
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory, redis_url: str
           ) -> Iterator[LiveServer]:
    """A uvicorn process shared by one test module, on its own data directory; the module's
    `SERVER_ENV` dict, if any, adds environment settings (upload limits, say). Its database
    is new, so Redis is emptied first, as for each `live_server`: the feeds of an earlier
    test's experiment or run of the same id would be read as this one's."""
    from tests.test_datasets_support import dataset_server

    reset_redis(redis_url)
    extra_env = getattr(request.module, "SERVER_ENV", {})
    base = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    with dataset_server(base, redis_url, **extra_env) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http
