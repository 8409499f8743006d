"""The worker when what it relies on goes wrong under it: a Redis that hangs (stopped, so its
connections neither answer nor refuse), and a run deleted while its worker still trains it.

Like tests/test_worker_lifecycle.py, `execute_run` and `RunRecorder` run in this process on a
migrated SQLite database; the hung Redis is a redis-server of the test's own, SIGSTOPped."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

import worker.training
from app.config import Settings
from app.db import session_scope
from app.experiments import delete_experiment_with_runs
from app.live import experiment_stream_key, get_redis, run_cancel_key, run_stream_key
from app.models import Experiment, RunMetric
from tests.support import free_port, wait_for
from tests.test_worker_lifecycle import TASK_ID, add_run, feed, progress_steps, read_run, update_run
from worker.runs import RunRecorder
from worker.training import execute_run


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A redis-server of this test's own (the shared one must never be stopped): its URL and
    process, to SIGSTOP. Woken and ended afterwards, however the test ends."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _pings(url), timeout=20, message="the test's redis-server")
        yield url, server
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def in_thread(action, timeout: float) -> None:
    """Run `action` in a thread for at most `timeout` seconds: a call stuck on the hung Redis
    fails the test then, and is freed when the fixture wakes the server."""
    errors = []

    def target() -> None:
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still not done after {timeout}s"
    if errors:
        raise errors[0]


def progress(step: int) -> dict:
    return {"type": "progress", "step": step, "total_steps": 100, "loss": 1.0}


# --- a Redis that hangs -----------------------------------------------------------------------


def test_a_hung_redis_costs_each_iteration_little_and_a_cancel_still_arrives_by_the_database(
    settings: Settings, tmp_path: Path, own_redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix each cancel check and each event waited out the 10 s timeout of the
    web's Redis client, and its retries: 10-20 s per training step."""
    url, server = own_redis
    settings = settings.model_copy(update={"redis_url": url})
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, status="running", worker="me@host", attempts=1)
    experiment_id = read_run(settings, run_id).experiment_id
    recorder = RunRecorder(settings, run_id, experiment_id)
    recorder.database_check_s = 0.5  # 5 s in the worker
    recorder.on_event(progress(1))
    assert [event["step"] for event in feed(settings, run_id)] == [1]

    server.send_signal(signal.SIGSTOP)
    caplog.set_level(logging.INFO, logger="worker.runs")
    took = []

    def train_for_a_while() -> None:
        for step in range(2, 42):
            started = time.monotonic()
            assert recorder.should_cancel() is False
            recorder.on_event(progress(step))
            took.append(time.monotonic() - started)
            time.sleep(0.02)  # the training step

    in_thread(train_for_a_while, timeout=15)
    assert sum(took) / len(took) < 0.1 and max(took) < 1.5, took
    assert progress_steps(settings, run_id) == list(range(1, 42))  # the record is complete
    away = [r for r in caplog.records if "Redis is not answering" in r.getMessage()]
    assert len(away) == 1, [r.getMessage() for r in caplog.records]  # once per outage

    # A cancel while Redis hangs: the web's flag in Redis cannot be set, the database's is.
    checker = RunRecorder(settings, run_id, experiment_id)
    checker.database_check_s = 0.5
    update_run(settings, run_id, cancel_requested=True)
    seen = []

    def wait_for_the_cancel() -> None:
        started = time.monotonic()
        while not checker.should_cancel():
            time.sleep(0.02)
        seen.append(time.monotonic() - started)

    in_thread(wait_for_the_cancel, timeout=5)
    assert seen[0] < 2.0

    # Redis back: within its pause between tries (5 s) the same recorder publishes and reads
    # the flag there again.
    server.send_signal(signal.SIGCONT)
    back = time.monotonic()
    published = []

    def publish_one_more() -> bool:
        published.append(42 + len(published))
        recorder.on_event(progress(published[-1]))
        return len(feed(settings, run_id)) > 1

    wait_for(publish_one_more, timeout=10, interval=0.1, message="events in the stream again")
    assert time.monotonic() - back < 6
    # What was published while Redis was away is in the database only.
    assert [event["step"] for event in feed(settings, run_id)] == [1, published[-1]]
    recorder.database_check_s = float("inf")  # only Redis can tell it now
    redis.Redis.from_url(url).set(run_cancel_key(run_id), "1")
    assert recorder.should_cancel() is True
    assert any("Redis answers again" in r.getMessage() for r in caplog.records)


# --- a run deleted under its worker -----------------------------------------------------------


def delete_experiment_of(settings: Settings, run_id: int) -> None:
    """What happens to a run whose worker was paused through it: the reaper ends the silent
    run, then a person deletes its experiment, with the app's own delete."""
    update_run(settings, run_id, status="lost")
    experiment_id = read_run(settings, run_id).experiment_id
    with session_scope(settings.sqlalchemy_url) as session:
        delete_experiment_with_runs(session, settings, get_redis(settings.effective_redis_url),
                                    session.get(Experiment, experiment_id))


def assert_nothing_left(settings: Settings, run_id: int, experiment_id: int) -> None:
    assert not (settings.runs_dir / str(run_id)).exists()
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.scalar(select(func.count()).select_from(RunMetric)
                              .where(RunMetric.run_id == run_id)) == 0
    live = redis.Redis.from_url(settings.effective_redis_url)
    assert not live.exists(run_stream_key(run_id), experiment_stream_key(experiment_id))


@pytest.mark.parametrize("noticed_by", ["cancel check", "progress point", "checkpoint save"])
def test_a_run_deleted_under_its_worker_stops_it_quietly_and_leaves_nothing_behind(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, noticed_by: str
) -> None:
    """The delete lands mid-training, just before what notices it first. Before the fix the
    worker went on, made the run's folder again for its checkpoint (left there for good), and
    died on `'NoneType' object has no attribute 'heartbeat_at'` (or 'step')."""
    run_id = add_run(settings, tmp_path, iterations=8)
    experiment_id = read_run(settings, run_id).experiment_id
    should_cancel, on_event = RunRecorder.should_cancel, RunRecorder.on_event
    checks = []

    def cancel_check(recorder: RunRecorder) -> bool:
        checks.append(True)
        if noticed_by == "cancel check" and len(checks) == 4:
            delete_experiment_of(settings, run_id)
            recorder._last_cancel_check = 0.0  # the database's turn, not in 5 s
        return should_cancel(recorder)

    def event(recorder: RunRecorder, event: dict) -> None:
        at_step_4 = event.get("type") == "progress" and event["step"] == 4
        if at_step_4 and noticed_by == "progress point":
            delete_experiment_of(settings, run_id)
        on_event(recorder, event)
        if at_step_4 and noticed_by == "checkpoint save":  # checkpoint_interval is 2
            delete_experiment_of(settings, run_id)

    monkeypatch.setattr(RunRecorder, "should_cancel", cancel_check)
    monkeypatch.setattr(RunRecorder, "on_event", event)
    caplog.set_level(logging.INFO)

    result = execute_run(settings, run_id, "me@host", TASK_ID)

    assert result == {"run_id": run_id, "status": "deleted"}
    assert_nothing_left(settings, run_id, experiment_id)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], [
        r.getMessage() for r in caplog.records]
    assert any("was deleted while this worker had it" in r.getMessage()
               for r in caplog.records)


def test_a_run_deleted_between_the_workers_first_look_and_its_claim_leaves_no_folder(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker takes the run's folder (its lock) before claiming the run: a delete that
    removed the folders just before left the one the lock made again behind for good."""
    run_id = add_run(settings, tmp_path)
    experiment_id = read_run(settings, run_id).experiment_id
    run_dir_lock = worker.training._run_dir_lock

    def deleted_first(out_dir: Path):
        delete_experiment_of(settings, run_id)
        return run_dir_lock(out_dir)

    monkeypatch.setattr(worker.training, "_run_dir_lock", deleted_first)
    assert execute_run(settings, run_id, "me@host", TASK_ID) == {
        "run_id": run_id, "status": "missing"}
    assert_nothing_left(settings, run_id, experiment_id)
