"""The broker (Redis) down when a run has to be queued: the reaper's requeue of a lost run
waits for Redis and is sent once it answers, instead of failing the run for good; a person's
start still answers 503 at once. The reason shown is the connection's, in plain words, not
Celery's "The Celery application must be restarted".

The reaper and the enqueue run in this process on a migrated SQLite database, sending through
the web's Celery app to a redis-server of the test's own (the shared one must never be
stopped), stopped and started again on the same port without persistence, as
`redis-cli shutdown nosave` leaves it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fastapi import HTTPException, Response

from app.config import Settings, get_settings
from app.db import session_scope, upgrade_to_head
from app.experiments import enqueue_runs
from app.models import Run, utcnow
from app.reaper import QUEUE, broker_task_ids, reap, requeue_lost_messages
from tests.support import free_port, wait_for
from tests.test_worker_lifecycle import add_run, add_sweep, read_run, update_run


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


class PrivateRedis:
    """A redis-server of the test's own on a fixed port, to stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _pings(self.url), timeout=20, message="the test's redis-server")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # no persistence: its data is gone, as with nosave
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None
        assert not _pings(self.url)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def outage_settings(data_dir: Path, broker: PrivateRedis, monkeypatch) -> Iterator[Settings]:
    """Settings on a migrated SQLite database and the test's Redis, with the web's Celery app
    sending there."""
    settings = Settings(data_dir=data_dir, redis_url=broker.url, stale_after_s=0.5,
                        heartbeat_interval_s=0.1)
    upgrade_to_head(settings.sqlalchemy_url)
    monkeypatch.setenv("SELFTUNE_REDIS_URL", broker.url)
    monkeypatch.setenv("SELFTUNE_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    import worker.celery_app  # reads the settings on import

    celery = worker.celery_app.create_celery(settings)
    monkeypatch.setattr(worker.celery_app, "app", celery)
    yield settings
    get_settings.cache_clear()


def enqueue(settings: Settings, run_id: int) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        enqueue_runs(session, [session.get(Run, run_id)])


def test_a_run_lost_while_redis_is_down_waits_queued_and_is_sent_once_redis_is_back(
    outage_settings: Settings, broker: PrivateRedis, tmp_path: Path
):
    """It ended "failed" for good: "could not be queued: Retry limit exceeded ... The Celery
    application must be restarted"."""
    settings = outage_settings
    run_id = add_run(settings, tmp_path)
    enqueue(settings, run_id)  # the web has sent tasks before: its result backend listens
    first_task = read_run(settings, run_id).celery_task_id
    # A worker took it (its first attempt), then Redis went down and the worker was killed.
    update_run(settings, run_id, status="running", worker="gone@host", attempts=1,
               started_at=utcnow() - timedelta(hours=1),
               heartbeat_at=utcnow() - timedelta(hours=1))
    broker.stop()

    assert reap(settings) == [run_id]
    run = read_run(settings, run_id)
    assert run.status == "queued" and run.finished_at is None
    assert run.attempts == 1  # not sent, so no attempt spent: a worker taking it counts one
    assert run.celery_task_id != first_task  # the old message, should it come back, is stale
    assert run.error.startswith("worker gone@host stopped reporting (last heartbeat ")
    assert (f"queued again to resume from its last checkpoint (attempt 2 of "
            f"{settings.max_attempts}); waiting for the queue (Redis) to come back "
            "(it did not answer: ") in run.error
    assert str(broker.port) in run.error  # the connection's own reason
    assert "must be restarted" not in run.error
    # The resend pass cannot look into a Redis that is down: it is skipped (the reaper's
    # loop logs one line), and the run waits on.
    with pytest.raises(redis.RedisError):
        requeue_lost_messages(settings, pause_s=0.1)
    assert read_run(settings, run_id).status == "queued"

    broker.start()  # same port, empty: the message was never sent
    live = redis.Redis.from_url(broker.url)
    assert live.llen(QUEUE) == 0
    assert reap(settings) == []  # queued, not running: the reaper leaves it to the resend
    time.sleep(settings.stale_after_s)  # the resend pass looks at runs queued for longer
    assert requeue_lost_messages(settings, pause_s=0.1) == [run_id]
    run = read_run(settings, run_id)
    assert run.status == "queued" and run.attempts == 1
    assert live.llen(QUEUE) == 1 and broker_task_ids(live) == {run.celery_task_id}
    # Its note goes back to why it was queued again, until a worker takes it.
    assert run.error.endswith(
        f"queued again to resume from its last checkpoint (attempt 2 of {settings.max_attempts})")
    assert "waiting for the queue" not in run.error
    assert requeue_lost_messages(settings, pause_s=0.1) == []  # sent once, not twice
    assert live.llen(QUEUE) == 1


def test_a_run_started_while_redis_is_down_fails_at_once_saying_redis_did_not_answer(
    outage_settings: Settings, broker: PrivateRedis, tmp_path: Path
):
    """A person's start keeps its contract (503, the runs stored failed with the reason).
    The reason is the connection's, not Celery's result backend's "The Celery application
    must be restarted", which the second send after Redis went down gave after 20 s."""
    settings = outage_settings
    enqueue(settings, add_run(settings, tmp_path))  # sent while Redis answered
    broker.stop()
    for _ in range(2):
        run_id = add_run(settings, tmp_path)
        asked = time.monotonic()
        with pytest.raises(HTTPException) as refused:
            enqueue(settings, run_id)
        # Not a hang: the second send waited out the result backend's 20 reconnections
        # (about 20 s) before its 503, though the web never reads a task's result.
        assert time.monotonic() - asked < 10
        assert refused.value.status_code == 503
        assert refused.value.detail.startswith("the queue (Redis) is not reachable: ")
        assert str(broker.port) in refused.value.detail
        run = read_run(settings, run_id)
        assert run.status == "failed"
        assert run.error.startswith("could not be queued: the queue (Redis) did not answer: ")
        assert "\n" not in run.error and "must be restarted" not in run.error
        assert "must be restarted" not in refused.value.detail

    broker.start()  # the web needs no restart: the next start is sent
    run_id = add_run(settings, tmp_path)
    enqueue(settings, run_id)
    assert broker_task_ids(redis.Redis.from_url(broker.url)) == {
        read_run(settings, run_id).celery_task_id}


def test_an_experiments_requeue_while_redis_is_down_fails_the_first_and_leaves_the_rest(
    outage_settings: Settings, broker: PrivateRedis, tmp_path: Path
):
    """As a run's own requeue: 503 at once, the run it could not send stored failed with the
    reason; those after it stay cancelled, to run again once Redis is back."""
    from app.routers.experiments import requeue_experiment

    settings = outage_settings
    experiment_id, run_ids = add_sweep(settings, tmp_path, seeds=(0, 1, 2))
    for run_id in run_ids:
        update_run(settings, run_id, status="cancelled")
    live = redis.Redis.from_url(broker.url, decode_responses=True)
    broker.stop()
    with session_scope(settings.sqlalchemy_url) as session, pytest.raises(
            HTTPException) as refused:
        requeue_experiment(experiment_id, session, settings, live, Response())
    assert refused.value.status_code == 503
    assert refused.value.detail.startswith("the queue (Redis) is not reachable: ")
    runs = [read_run(settings, run_id) for run_id in run_ids]
    assert [run.status for run in runs] == ["failed", "cancelled", "cancelled"]
    assert runs[0].error.startswith("could not be queued: the queue (Redis) did not answer: ")

    broker.start()
    with session_scope(settings.sqlalchemy_url) as session:
        answer = requeue_experiment(experiment_id, session, settings, live, Response())
    assert [run.status for run in answer.runs] == ["queued"] * 3
    assert broker_task_ids(redis.Redis.from_url(broker.url)) == {
        read_run(settings, run_id).celery_task_id for run_id in run_ids}
