"""A web or a worker started while its database does not answer makes the data directory
check (app.db.claim_data_dir) when it first does, and refuses then as clearly as at start:
it used to skip the check for good, serving 500s or writing another database's run folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import redis

from app.config import Settings
from app.db import DATABASE_ID_FILE, claim_data_dir, upgrade_to_head
from app.reaper import broker_task_ids
from tests.support import app_env, start_server, wait_for
from tests.test_worker_lifecycle import TASK_ID, a_task_waiting_for_its_database, read_run

HOUR_AGO = time.time() - 3600


def unreachable_sqlite(tmp_path: Path) -> str:
    """A SQLite database in a folder that does not exist yet: it cannot be opened until
    `upgrade_to_head` makes the folder and the migrated file."""
    return f"sqlite:///{tmp_path / 'later' / 'selftune.db'}"


def old_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "file.bin").write_bytes(b"x")
    for target in (path / "file.bin", path):
        os.utime(target, (HOUR_AGO, HOUR_AGO))
    return path


def health(client: httpx.Client) -> tuple[int, dict]:
    answer = client.get("/api/health")
    return answer.status_code, answer.json()


def web_env(data_dir: Path, url: str, redis_url: str) -> dict[str, str]:
    # A reaper pass every 2 s (stale_after_s / 4): the late check is made at the first one
    # after the database answers.
    return app_env(data_dir, url, redis_url, SELFTUNE_HEARTBEAT_INTERVAL_S="2",
                   SELFTUNE_STALE_AFTER_S="8")


def test_a_web_started_before_its_database_answers_checks_and_cleans_once_it_does(
    tmp_path: Path, redis_url: str
) -> None:
    data_dir, url = tmp_path / "data", unreachable_sqlite(tmp_path)
    leftover = old_folder(data_dir / "datasets" / "half-published")
    base, web = start_server(web_env(data_dir, url, redis_url), tmp_path / "uvicorn.log")
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            status, body = health(client)
            assert status == 503 and body["database"].startswith("error:"), body
            assert leftover.exists()  # nothing removed on a database not yet read

            upgrade_to_head(url)
            wait_for(lambda: health(client)[0] == 200, timeout=30,
                     message="the web to find its database answering")
            wait_for(lambda: not leftover.exists(), timeout=30,
                     message="the crash leftover to be removed after the late check")
            assert (data_dir / DATABASE_ID_FILE).is_file()
            assert client.get("/api/datasets").status_code == 200
    finally:
        web.stop()
    assert "data directory check and clean-up wait for the database" in web.log()


def test_a_web_started_before_another_databases_answers_refuses_it_with_the_reason(
    tmp_path: Path, redis_url: str
) -> None:
    """The data directory is another database's: once the database answers, health says
    503 with the reason, the API refuses work with it, and nothing of the directory goes."""
    data_dir, url = tmp_path / "data", unreachable_sqlite(tmp_path)
    owner_url = f"sqlite:///{tmp_path / 'owner.db'}"
    upgrade_to_head(owner_url)
    claim_data_dir(data_dir, owner_url)
    owners_dataset = old_folder(data_dir / "datasets" / "owners-dataset")
    base, web = start_server(web_env(data_dir, url, redis_url), tmp_path / "uvicorn.log")
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            assert health(client)[0] == 503
            upgrade_to_head(url)

            def refused() -> dict | None:
                status, body = health(client)
                return body if status == 503 and body["database"] != "ok" and \
                    not body["database"].startswith("error:") else None

            body = wait_for(refused, timeout=30, message="the late check's refusal")
            assert body["database"].startswith("refused: the data directory")
            assert "holds the files of another database" in body["database"]
            assert client.get("/healthz").status_code == 503
            listing = client.get("/api/datasets")
            assert listing.status_code == 503
            assert "holds the files of another database" in listing.json()["detail"]
            page = client.get("/datasets", headers={"Accept": "text/html"})
            assert page.status_code == 503 and "holds the files of another database" in page.text
            created = client.post("/api/experiments", json={})
            assert created.status_code == 503
    finally:
        web.stop()
    assert owners_dataset.exists()
    assert "the web refuses to serve: the data directory" in web.log()


def test_a_worker_started_before_another_databases_answers_stops_and_leaves_the_run_queued(
    settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    """The data directory is another database's, which the worker could not check at start:
    when its database answers, the worker stops before it trains the run it was given (exit
    status 2, as at start), its message back in the queue and the run queued, untouched."""
    claim_data_dir(settings.data_dir, settings.sqlalchemy_url)  # the directory's own database
    # The database away, the run waits for it (the task retries) without a check made.
    with a_task_waiting_for_its_database(settings, redis_url, tmp_path, "late-check") as (
            run_id, worker, database_answers):
        reached = database_answers()
        wait_for(lambda: worker.popen.poll() is not None, timeout=120,
                 message=f"the worker to stop:\n{worker.log()[-3000:]}")
    assert worker.popen.returncode == 2, worker.log()
    assert "worker stops taking runs: the data directory" in worker.log()
    assert "holds the files of another database" in worker.log()
    run = read_run(reached, run_id)
    assert (run.status, run.attempts, run.celery_task_id) == ("queued", 0, TASK_ID)
    assert TASK_ID in broker_task_ids(redis.Redis.from_url(redis_url))
    assert not (settings.data_dir / "runs" / str(run_id)).exists()
