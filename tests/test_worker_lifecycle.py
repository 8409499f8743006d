"""The training task's life around the training itself: a run that cannot start, a message
the broker hands out again, a run whose training process keeps dying, the database away.

`execute_run` and `RunRecorder` are called directly, in this process, on a migrated SQLite
database and the real Redis; two tests run a real Celery worker. A database outage is a
database file that cannot be opened: `Outage` points the worker modules' sessions at one
while it is on (and only then)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import psutil
import pytest
import redis
from celery import Celery
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

import worker.runs
import worker.training
from app.config import Settings, get_settings
from app.db import DATABASE_ID_FILE, get_engine, session_scope, upgrade_to_head
from app.experiments import create_experiment, enqueue_runs
from app.ingest import ingest_archive, new_work_dir
from app.live import get_redis, run_stream_key
from app.models import Dataset, DatasetImage, Installation, Run, RunMetric, utcnow
from app.reaper import (
    QUEUE,
    UNACKED,
    _task_id,
    broker_task_ids,
    reap,
    requeue,
    requeue_lost_messages,
)
from app.schemas import FEED_COMMON_FIELDS, FEED_EVENTS, FEED_OWN_EVENTS, ExperimentIn
from tests.support import Process, app_env, make_image_archive, start_worker, wait_for
from worker.runs import DatabaseUnavailable, RunRecorder, rewrite_exports
from worker.training import execute_run

TASK_ID = "task-1"


def add_run(settings: Settings, tmp_path: Path, iterations: int = 6, unlabeled: int = 3,
            budget: float | str = 0.5, method: str = "fine-tune", **overrides) -> int:
    """A dataset and a one-run experiment (queued, task TASK_ID), as the web would make them;
    `overrides` add to the run settings."""
    _, (run_id,) = add_sweep(settings, tmp_path, iterations, unlabeled, budget, method,
                             **overrides)
    return run_id


def add_sweep(settings: Settings, tmp_path: Path, iterations: int = 6, unlabeled: int = 3,
              budget: float | str = 0.5, method: str = "fine-tune", seeds: tuple = (0,),
              **overrides) -> tuple[int, list[int]]:
    """A dataset and an experiment of one run per seed (queued, task TASK_ID): its id and
    its runs'."""
    archive = make_image_archive(tmp_path / "shapes.zip", train_per_class=6, test_per_class=2,
                                 unlabeled=unlabeled)
    with session_scope(settings.sqlalchemy_url) as session:
        dataset = ingest_archive(session, settings, archive, new_work_dir(settings), "shapes")
        payload = ExperimentIn.model_validate({
            "dataset_id": dataset.id, "backbone": "test_efficientnet", "methods": [method],
            "budgets": [budget], "seeds": list(seeds),
            "overrides": {"pretrained": False, "image_size": 32, "batch_size": 4,
                          "iterations": iterations, "log_interval": 2,
                          "eval_interval": iterations, "checkpoint_interval": 2, **overrides},
        })
        experiment = create_experiment(session, settings, payload)
        for run in experiment.runs:
            run.celery_task_id = TASK_ID
        session.flush()
        return experiment.id, sorted(run.id for run in experiment.runs)


@pytest.fixture
def queue(settings, monkeypatch) -> Iterator[redis.Redis]:
    """The web's Celery app sending to this test's Redis (tasks go to the `celery` list)."""
    monkeypatch.setenv("SELFTUNE_REDIS_URL", settings.effective_redis_url)
    monkeypatch.setenv("SELFTUNE_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    import worker.celery_app

    monkeypatch.setattr(worker.celery_app, "app", worker.celery_app.create_celery(settings))
    yield redis.Redis.from_url(settings.effective_redis_url)
    get_settings.cache_clear()


def update_run(settings: Settings, run_id: int, **values) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        run = session.get(Run, run_id)
        for name, value in values.items():
            setattr(run, name, value)


def read_run(settings: Settings, run_id: int) -> Run:
    with session_scope(settings.sqlalchemy_url) as session:
        return session.get(Run, run_id)


def feed(settings: Settings, run_id: int) -> list[dict]:
    client = redis.Redis.from_url(settings.effective_redis_url, decode_responses=True)
    return [json.loads(fields["data"]) for _, fields in client.xrange(run_stream_key(run_id))]


def progress_steps(settings: Settings, run_id: int) -> list[int]:
    with session_scope(settings.sqlalchemy_url) as session:
        return list(session.scalars(select(RunMetric.step).where(
            RunMetric.run_id == run_id, RunMetric.kind == "progress").order_by(RunMetric.step)))


class Outage:
    """While `down` is set, the sessions of worker.runs and worker.training (the recorder,
    the task body, the heartbeat) go to a database file that cannot be opened, and fail with
    SQLite's own OperationalError."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.down = threading.Event()
        unreachable = f"sqlite:///{tmp_path}/no-such-folder/selftune.db"

        def scope(url: str):
            return session_scope(unreachable if self.down.is_set() else url)

        monkeypatch.setattr(worker.runs, "session_scope", scope)
        monkeypatch.setattr(worker.training, "session_scope", scope)


# --- a run that cannot start ----------------------------------------------------------------


def _no_such_device(settings: Settings, run_id: int) -> Settings:
    # On a CPU-only host as on a GPU one: there is no 100th CUDA device.
    return settings.model_copy(update={"worker_device": "cuda:99"})


def _dataset_row_gone(settings: Settings, run_id: int) -> Settings:
    # Past the foreign key, as a database edited by hand or restored in part would be.
    connection = sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///"))
    connection.execute("DELETE FROM dataset_images")
    connection.execute("DELETE FROM datasets")
    connection.commit()
    connection.close()
    return settings


def _dataset_files_gone(settings: Settings, run_id: int) -> Settings:
    for folder in settings.datasets_dir.iterdir():
        folder.rename(settings.data_dir / f"moved-{folder.name}")
    return settings


def _dataset_folder_gone(settings: Settings, run_id: int) -> Settings:
    for folder in settings.datasets_dir.glob("*/train"):
        shutil.rmtree(folder)
    return settings


@pytest.mark.parametrize(("break_it", "reason", "attempts"), [
    (_no_such_device, "'cuda:99' (SELFTUNE_WORKER_DEVICE)", 0),
    (_dataset_row_gone, "no longer exists", 0),
    (_dataset_files_gone, "are missing from", 0),
    # Some of its files gone: found as training reads them. The reason said
    # "FileNotFoundError: [Errno 2] No such file or directory: '/data/datasets/...'" alone.
    (_dataset_folder_gone, "an image of its dataset is missing: train/", 1),
])
def test_a_run_that_cannot_start_ends_failed_with_the_reason(settings, tmp_path, break_it,
                                                              reason, attempts):
    """Before the fix each of these raised before training began: the message was consumed
    and the run stayed "queued" for ever (the missing files case ended failed, but with a
    traceback from the image loader instead of the reason)."""
    run_id = add_run(settings, tmp_path)
    result = execute_run(break_it(settings, run_id), run_id, "me@host", TASK_ID)
    run = read_run(settings, run_id)
    assert result["status"] == run.status == "failed", run.error
    assert run.error.startswith(reason) if attempts else reason in run.error
    assert run.finished_at is not None and run.attempts == attempts
    end = feed(settings, run_id)[-1]
    assert end["type"] == "end" and end["status"] == "failed" and reason in end["error"]


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:", "cuda:x", "cuda 0", ""])
def test_a_device_torch_cannot_name_is_refused_at_start(device):
    """SELFTUNE_WORKER_DEVICE=gpu was taken: every run then failed with torch's list of
    device types, and the health page showed the device probe's Python source."""
    with pytest.raises(ValidationError) as refused:
        Settings(worker_device=device)
    [error] = refused.value.errors()
    assert error["loc"] == ("worker_device",)
    assert error["msg"] == ("Value error, must be auto, cpu, cuda or cuda:N (N a GPU's "
                            f"index), not {device!r}")
    assert [Settings(worker_device=fine).worker_device for fine in (
        "auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]


def test_a_cancelled_run_on_a_worker_with_no_such_device_ends_cancelled(settings, tmp_path):
    """The device is found before the run is read (see the next test); its error still comes
    after the checks that end the message for other reasons, as it did."""
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, cancel_requested=True)
    result = execute_run(_no_such_device(settings, run_id), run_id, "me@host", TASK_ID)
    run = read_run(settings, run_id)
    assert result["status"] == run.status == "cancelled" and run.error is None


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_device_is_found_with_no_database_transaction_open(
    settings, tmp_path, monkeypatch, request, database
):
    """The first resolve_device in a pool process imports torch (seconds; CUDA's start on a
    GPU): before the fix the worker held its claim's transaction open meanwhile, "idle in
    transaction" on PostgreSQL for 1.7-2.4 s a task, in the way of a migration."""
    if database == "postgresql":
        settings = settings.model_copy(
            update={"database_url": request.getfixturevalue("postgres_url")})
        upgrade_to_head(settings.sqlalchemy_url)
    run_id = add_run(settings, tmp_path)
    real, seen = worker.training.resolve_device, []

    def checked(name):
        seen.append(get_engine(settings.sqlalchemy_url).pool.checkedout())
        return real(name)

    monkeypatch.setattr(worker.training, "resolve_device", checked)
    job = worker.training._claim(settings, run_id, "me@host", TASK_ID)
    assert seen == [0] and job.config["device"] == "cpu"
    assert read_run(settings, run_id).status == "running"


def test_a_task_that_finds_the_database_down_asks_to_retry_and_leaves_the_run_queued(
    settings, tmp_path, monkeypatch
):
    """Before the fix the OperationalError went out as is: the task failed for good (Celery
    acks a failed task), and nothing would ever pick the queued run up again."""
    run_id = add_run(settings, tmp_path)
    outage = Outage(monkeypatch, tmp_path)
    outage.down.set()
    with pytest.raises(DatabaseUnavailable):
        execute_run(settings, run_id, "me@host", TASK_ID)
    assert read_run(settings, run_id).status == "queued"


@contextmanager
def a_task_waiting_for_its_database(settings: Settings, redis_url: str, tmp_path: Path,
                                    name: str) -> Iterator[tuple[int, Process, Callable]]:
    """A run in a migrated database that a real Celery worker cannot reach yet (it looks in a
    folder that does not exist), and the run's task sent to that worker, retrying. Yields the
    run's id, the worker, and `database_answers`, which puts the database where the worker
    looks and returns the settings that reach it there."""
    home, later = tmp_path / "db-home", tmp_path / "db-later"
    ours = settings.model_copy(update={"database_url": f"sqlite:///{home}/selftune.db"})
    upgrade_to_head(ours.sqlalchemy_url)
    run_id = add_run(ours, tmp_path)
    env = app_env(settings.data_dir, f"sqlite:///{later}/selftune.db", redis_url)
    worker_process = start_worker(env, tmp_path / "logs" / "worker.log", name=name)
    client = Celery("client", broker=redis_url, backend=redis_url)

    def database_answers() -> Settings:
        get_engine(ours.sqlalchemy_url).dispose()
        home.rename(later)
        return settings.model_copy(update={"database_url": f"sqlite:///{later}/selftune.db"})

    try:
        client.send_task("selftune.train_run", args=[run_id], task_id=TASK_ID)
        wait_for(lambda: client.AsyncResult(TASK_ID).state == "RETRY", timeout=120,
                 message=f"the task to retry:\n{worker_process.log()[-3000:]}")
        yield run_id, worker_process, database_answers
    finally:
        worker_process.stop()
        client.close()


@pytest.mark.slow
def test_the_task_of_a_run_waits_out_a_database_outage_then_trains_it(
    settings, redis_url, tmp_path
):
    """A real Celery worker whose database file is not there yet (its folder is missing):
    the task retries under the same id, and trains the run once the database appears.
    Before the fix the task failed once and the run stayed queued."""
    with a_task_waiting_for_its_database(settings, redis_url, tmp_path, "patient") as (
            run_id, worker_process, database_answers):
        reached = database_answers()  # the database is back
        run = wait_for(lambda: (r := read_run(reached, run_id)).status
                       in ("succeeded", "failed") and r, timeout=180,
                       message=f"the run to end:\n{worker_process.log()[-3000:]}")
        assert run.status == "succeeded", run.error
        assert run.attempts == 1
        # The data directory check the worker could not make at start was made before the
        # run trained: the directory is this database's now.
        with session_scope(reached.sqlalchemy_url) as session:
            database_id = session.scalar(select(Installation.database_id))
        assert (settings.data_dir / DATABASE_ID_FILE).read_text().strip() == database_id


def test_a_celery_worker_on_postgresql_trains_run_after_run(settings, postgres_url, redis_url,
                                                            tmp_path):
    """Each run is trained in a pool process forked from the worker's main process, which
    has used the database: on PostgreSQL they shared its connection, and from the second
    run on the process failed with "prepared statement "_pg3_0" already exists" (the run
    failed to start, or stayed running once trained until the reaper called it lost)."""
    ours = settings.model_copy(update={"database_url": postgres_url})
    upgrade_to_head(postgres_url)
    run_ids = []
    for number in range(3):
        (tmp_path / f"run{number}").mkdir()
        run_ids.append(add_run(ours, tmp_path / f"run{number}"))
        update_run(ours, run_ids[-1], celery_task_id=f"task-{number}")
    env = app_env(settings.data_dir, postgres_url, redis_url)
    worker_process = start_worker(env, tmp_path / "logs" / "worker.log", name="postgres")
    client = Celery("client", broker=redis_url, backend=redis_url)
    try:
        for number, run_id in enumerate(run_ids):
            client.send_task("selftune.train_run", args=[run_id], task_id=f"task-{number}")
        runs = wait_for(lambda: (runs := [read_run(ours, run_id) for run_id in run_ids])
                        and all(run.status not in ("queued", "running") for run in runs)
                        and runs, timeout=150,
                        message=f"the runs to end:\n{worker_process.log()[-3000:]}")
        assert [(run.status, run.error) for run in runs] == [("succeeded", None)] * 3
        assert "DuplicatePreparedStatement" not in worker_process.log()
    finally:
        worker_process.stop()
        client.close()


@pytest.mark.slow
def test_a_celery_worker_builds_the_batches_in_loader_processes(settings, redis_url,
                                                                 tmp_path):
    """`num_workers` loader processes start under the real worker's pool process (a daemonic
    process, where multiprocessing refuses children) and are gone when the run ends. They
    used to be dropped there: a GPU worker built every batch on one core."""
    run_id = add_run(settings, tmp_path, iterations=200, num_workers=2)
    env = app_env(settings.data_dir, settings.sqlalchemy_url, redis_url)
    worker_process = start_worker(env, tmp_path / "logs" / "worker.log", name="loaders")
    client = Celery("client", broker=redis_url, backend=redis_url)
    # Processes forked by a pool process while the run trained: in how many looks each.
    seen: Counter[int] = Counter()

    def ended() -> Run | None:
        # Forks of a pool process, as loader processes are: the worker's device probe, also
        # a child of the worker, runs `ldconfig` as it imports torch, once counted here.
        for pool_process in psutil.Process(worker_process.popen.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                command = pool_process.cmdline()
                seen.update(child.pid for child in pool_process.children()
                            if child.cmdline() == command)
        run = read_run(settings, run_id)
        return run if run.status in ("succeeded", "failed") else None

    try:
        client.send_task("selftune.train_run", args=[run_id], task_id=TASK_ID)
        run = wait_for(ended, timeout=240, interval=0.05,
                       message=f"the run to end:\n{worker_process.log()[-3000:]}")
        assert run.status == "succeeded", run.error
        # A loader process lasts the whole training, over hundreds of looks. A fork that runs
        # another program (a library's subprocess) has the pool process's command line only
        # until its exec: one was seen once, in one CI run of many.
        loaders = [pid for pid, looks in seen.items() if looks >= 3]
        assert len(loaders) == 2, seen
        assert not [pid for pid in seen if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    finally:
        worker_process.stop()
        client.close()


# --- who owns a run -----------------------------------------------------------------------


def test_a_message_handed_out_again_leaves_a_run_another_worker_trains_alone(settings,
                                                                             tmp_path):
    """Before the fix the second worker trained the run too, into the same folder."""
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, status="running", worker="other@host", attempts=1, step=3,
               started_at=utcnow(), heartbeat_at=utcnow())
    result = execute_run(settings, run_id, "me@host", TASK_ID)
    run = read_run(settings, run_id)
    assert result["status"] == "busy"
    assert (run.status, run.worker, run.attempts, run.step) == ("running", "other@host", 1, 3)
    assert feed(settings, run_id) == [] and not (settings.runs_dir / str(run_id)).exists()


def test_a_worker_trains_again_a_run_of_its_own_only_once_its_process_is_gone(settings,
                                                                                tmp_path):
    """Same worker name, fresh heartbeat: a live process holding the run's folder (here this
    test, through the lock the training process takes) means busy; once it lets go (the
    process died: the OS drops its lock), the redelivered message resumes the run. Before the
    fix there was no such lock (this test fails on its import)."""
    from worker.training import _run_dir_lock

    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, status="running", worker="me@host", attempts=1,
               started_at=utcnow(), heartbeat_at=utcnow())
    with _run_dir_lock(settings.runs_dir / str(run_id)):
        assert execute_run(settings, run_id, "me@host", TASK_ID)["status"] == "busy"
    assert read_run(settings, run_id).attempts == 1
    result = execute_run(settings, run_id, "me@host", TASK_ID)
    run = read_run(settings, run_id)
    assert result["status"] == run.status == "succeeded", run.error
    assert run.attempts == 2


def test_a_run_whose_process_keeps_dying_ends_lost_and_a_requeue_trains_it_again(
    settings, tmp_path, queue
):
    """The OOM killer takes the training process at the same point every time: Celery
    (reject_on_worker_lost) hands the message out again at once, with the heartbeat fresh, so
    the reaper's cap never applies. Before the fix attempt N+1, N+2, ... went on for ever.
    A person's requeue then gives the run its automatic attempts again."""
    settings = settings.model_copy(update={"max_attempts": 2})
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, status="running", worker="me@host", attempts=2,
               started_at=utcnow(), heartbeat_at=utcnow())
    result = execute_run(settings, run_id, "me@host", TASK_ID)
    run = read_run(settings, run_id)
    assert result["status"] == run.status == "lost"
    assert run.attempts == 2 and run.finished_at is not None
    assert "me@host" in run.error and "requeue it" in run.error
    end = feed(settings, run_id)[-1]
    assert end["type"] == "end" and end["status"] == "lost"

    # POST /api/runs/{id}/requeue: queued under a new task, sent to this test's Redis.
    with session_scope(settings.sqlalchemy_url) as session:
        assert requeue(session, queue, run_id, by_person=True).attempts == 0
    new_task = read_run(settings, run_id).celery_task_id
    assert new_task != TASK_ID and queue.llen("celery") == 1
    assert execute_run(settings, run_id, "me@host", TASK_ID)["status"] == "superseded"
    # Its process dies once more: within the fresh allowance, the redelivery trains it.
    update_run(settings, run_id, status="running", worker="me@host", attempts=1,
               heartbeat_at=utcnow())
    result = execute_run(settings, run_id, "me@host", new_task)
    run = read_run(settings, run_id)
    assert result["status"] == run.status == "succeeded", run.error
    assert run.attempts == 2


def test_a_run_queued_again_announces_the_step_its_record_stands_at(settings, tmp_path):
    """A run cancelled at step 4 and queued again: its worker's first event said step 0, then
    training went on from 4, so a client following the feed saw 4 -> 0 -> 4."""
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, step=4)
    assert execute_run(settings, run_id, "me@host", TASK_ID)["status"] == "succeeded"
    status = feed(settings, run_id)[0]
    assert status["type"] == "status" and status["status"] == "running"
    assert (status["step"], status["attempt"]) == (4, 1)


def test_a_run_the_reaper_queues_again_says_why_until_a_worker_takes_it(settings, tmp_path,
                                                                        queue):
    """Its worker went silent: the run went from "running" back to "queued" with no word
    (the requeue cleared the reason the reaper had just written)."""
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, status="running", worker="gone@host", attempts=1,
               started_at=utcnow() - timedelta(hours=1),
               heartbeat_at=datetime(2026, 12, 6, 18, 46, 1, 181285))
    assert reap(settings) == [run_id]
    run = read_run(settings, run_id)
    assert run.status == "queued" and queue.llen("celery") == 1
    # To the second, in UTC, as the pages write times ("2026-12-06 18:46:01.181285" was read).
    assert run.error.startswith(
        "worker gone@host stopped reporting (last heartbeat 2026-12-06T18:46:01Z); ")
    assert run.error.endswith(
        f"queued again to resume from its last checkpoint (attempt 2 of {settings.max_attempts})")
    # A worker takes it: the note has done its work.
    result = execute_run(settings, run_id, "me@host", read_run(settings, run_id).celery_task_id)
    run = read_run(settings, run_id)
    assert result["status"] == run.status == "succeeded" and run.error is None


def test_the_reaper_requeue_keeps_counting_attempts(settings, tmp_path, queue):
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, status="lost", attempts=2)
    with session_scope(settings.sqlalchemy_url) as session:
        assert requeue(session, queue, run_id, by_person=False).attempts == 2
    assert read_run(settings, run_id).status == "queued" and queue.llen("celery") == 1


# --- the database away while training -----------------------------------------------------


def test_training_goes_on_through_a_database_outage_and_records_every_point(
    settings, tmp_path, monkeypatch
):
    """The database is away from the progress event of step 4 until that of step 8 (the
    recorder's on_event switches the outage, then runs as usual); a cancel check falls in the
    outage too. Before the fix the first failed write ended the run failed."""
    run_id = add_run(settings, tmp_path, iterations=12)
    outage = Outage(monkeypatch, tmp_path)
    on_event = RunRecorder.on_event
    cancel_checks_while_down = []

    def switching(recorder, event):
        if event.get("type") == "progress":
            if event["step"] == 4:
                outage.down.set()
                recorder._last_cancel_check = 0.0  # the next iteration asks the database
            elif event["step"] == 8:
                outage.down.clear()
        on_event(recorder, event)

    should_cancel = RunRecorder.should_cancel

    def checking(recorder):
        if outage.down.is_set() and recorder._last_cancel_check == 0.0:
            cancel_checks_while_down.append(True)
        return should_cancel(recorder)

    monkeypatch.setattr(RunRecorder, "on_event", switching)
    monkeypatch.setattr(RunRecorder, "should_cancel", checking)
    result = execute_run(settings, run_id, "me@host", TASK_ID)
    run = read_run(settings, run_id)
    assert result["status"] == run.status == "succeeded", run.error
    assert run.attempts == 1 and run.step == 12 and cancel_checks_while_down
    assert progress_steps(settings, run_id) == [2, 4, 6, 8, 10, 12]
    live = [e["step"] for e in feed(settings, run_id) if e["type"] == "progress"]
    assert live == [2, 4, 6, 8, 10, 12]  # the feed went on during the outage


def test_the_outcome_is_recorded_after_a_short_outage_and_given_up_after_a_long_one(
    settings, tmp_path, monkeypatch
):
    """Before the fix `finish` raised at once, leaving the run "running" until the reaper
    called it lost."""
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, status="running", worker="me@host", attempts=1)
    recorder = RunRecorder(settings, run_id, read_run(settings, run_id).experiment_id)
    outage = Outage(monkeypatch, tmp_path)
    outage.down.set()
    recorder.on_event({"type": "progress", "step": 2, "total_steps": 6, "loss": 1.0})
    assert recorder.should_cancel() is False
    threading.Timer(1.5, outage.down.clear).start()
    recorder.finish("succeeded", metrics={"test_top1": 0.5})
    run = read_run(settings, run_id)
    assert run.status == "succeeded" and run.metrics == {"test_top1": 0.5}
    assert progress_steps(settings, run_id) == [2]  # the point held during the outage

    outage.down.set()
    recorder.finish_retry_s = 2.0
    started = time.monotonic()
    with pytest.raises(OperationalError):
        recorder.finish("failed", error="late")
    assert time.monotonic() - started < 10
    assert read_run(settings, run_id).status == "succeeded"



def test_a_resumed_run_gives_its_eta_from_the_speed_of_this_attempt(settings, tmp_path):
    """A run lost on a fast worker and resumed on a slow one kept the speed of the attempt
    before, and so an ETA far too short, until it passed the step of its last recorded
    progress point: up to a checkpoint interval later (1,000 steps in the paper preset)."""
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, attempts=1, step=4, images_per_s=1000.0)
    with session_scope(settings.sqlalchemy_url) as session:  # the attempt before got to 4
        session.add(RunMetric(run_id=run_id, kind="progress", step=4,
                              values={"loss": 1.0, "images_per_s": 1000.0}))
    worker.training._claim(settings, run_id, "slow@host", TASK_ID)
    assert read_run(settings, run_id).images_per_s is None  # no ETA rather than a wrong one

    recorder = RunRecorder(settings, run_id, read_run(settings, run_id).experiment_id)
    recorder.hold("slow@host", TASK_ID, folder_locked=True)
    # Back at its checkpoint's step: the time left is from there. The run said step 4 (and a
    # time left for 2 steps) until the steps re-done passed it.
    recorder.on_event({"type": "started", "step": 1, "total_steps": 6,
                       "resumed_from_step": 1})
    assert read_run(settings, run_id).step == 1
    recorder.on_event({"type": "progress", "step": 2, "total_steps": 6, "loss": 1.5,
                       "images_per_s": 10.0})  # repeated from the last checkpoint
    run = read_run(settings, run_id)
    assert (run.status, run.images_per_s, run.step) == ("running", 10.0, 2)
    assert progress_steps(settings, run_id) == [4]  # the series keeps its first copy
    recorder.on_event({"type": "progress", "step": 5, "total_steps": 6, "loss": 1.4,
                       "images_per_s": 10.0})
    assert (read_run(settings, run_id).step, progress_steps(settings, run_id)) == (5, [4, 5])


def test_a_succeeded_run_keeps_its_export_but_not_its_training_state(settings, tmp_path,
                                                                       monkeypatch):
    """The training state (model, key encoder, optimiser) is several times the exported model
    and nothing resumes a finished run; a run that stops before the end keeps it to resume."""
    run_id = add_run(settings, tmp_path)
    (tmp_path / "second").mkdir()
    cancelled_id = add_run(settings, tmp_path / "second")
    update_run(settings, cancelled_id, celery_task_id="task-2")
    checks = {"n": 0}
    should_cancel = RunRecorder.should_cancel

    def cancel_after_a_checkpoint(self):
        if self.run_id != cancelled_id:
            return should_cancel(self)
        checks["n"] += 1
        return checks["n"] > 3  # checkpoint_interval is 2

    monkeypatch.setattr(RunRecorder, "should_cancel", cancel_after_a_checkpoint)
    assert execute_run(settings, run_id, "w@host", TASK_ID)["status"] == "succeeded"
    assert execute_run(settings, cancelled_id, "w@host", "task-2")["status"] == "cancelled"
    folder = settings.runs_dir / str(run_id)
    assert (folder / "model.safetensors").is_file() and not (folder / "state").exists()
    assert (settings.runs_dir / str(cancelled_id) / "state" / "checkpoint.pt").is_file()


@pytest.mark.usefixtures("queue")
def test_a_run_whose_results_cannot_be_written_ends_failed_and_run_again_only_exports(
        settings, tmp_path, monkeypatch):
    """Trained, but its results could not be written for another reason than the database
    being away (the disk filling as predictions.csv is rewritten with the archive's paths):
    the error left the task with the run "running" until the reaper called it lost, again on
    each attempt, never saying why. It now ends failed with the reason, its training state
    kept, and Run again evaluates and exports without training again. (The full disk is
    injected: it must strike after training and before the export is recorded.)"""
    run_id = add_run(settings, tmp_path)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(worker.training, "rewrite_exports", disk_full)
        assert execute_run(settings, run_id, "w@host", TASK_ID)["status"] == "failed"
    run = read_run(settings, run_id)
    assert (run.status, run.metrics) == ("failed", {}) and run.finished_at is not None
    assert run.error.startswith("trained, but its results could not be recorded: OSError: "
                                "[Errno 28] No space left on device"), run.error
    assert feed(settings, run_id)[-1]["status"] == "failed"
    assert (settings.runs_dir / str(run_id) / "state" / "checkpoint.pt").is_file()

    with session_scope(settings.sqlalchemy_url) as session:  # Run again
        requeue(session, get_redis(settings.effective_redis_url), run_id, by_person=True)
    assert execute_run(settings, run_id, "w@host",
                       read_run(settings, run_id).celery_task_id)["status"] == "succeeded"
    run = read_run(settings, run_id)
    assert run.status == "succeeded" and run.error is None and "test_top1" in run.metrics
    events = feed(settings, run_id)
    again = [i for i, event in enumerate(events) if event["type"] == "started"][-1]
    assert events[again]["resumed_from_step"] == 6
    assert [event["type"] for event in events[again + 1:]] == ["end"]  # no step trained


def test_the_confusion_matrix_is_kept_apart_and_no_experiment_read_loads_it(settings,
                                                                            tmp_path):
    """classes² numbers (3 MB a run at 1,000 classes) were in the metrics every experiment
    read loads for each run: 4-6 s a read at 60 runs. They are in `details`, sparse (75 MB
    dense at 5,000 classes), read by the run's own record only, which still shows the
    engine's metrics whole."""
    from sqlalchemy import inspect as inspect_row

    from app.confusion import sparse_confusion
    from app.live import get_redis
    from app.routers.experiments import experiment_out, run_rows
    from app.routers.runs import read_run as run_record

    run_id = add_run(settings, tmp_path)
    assert execute_run(settings, run_id, "w@host", TASK_ID)["status"] == "succeeded"
    with session_scope(settings.sqlalchemy_url) as session:
        run = session.get(Run, run_id)
        assert "confusion_matrix" not in run.metrics and "test_top1" in run.metrics
        experiment = run.experiment
        experiment_out(experiment, get_redis(settings.effective_redis_url))
        run_rows(experiment, session)
        assert "details" in inspect_row(run).unloaded  # neither read loaded it
        assert list(run.details) == ["confusion_sparse"]
        stored = run.details["confusion_sparse"]
        record = run_record(run_id, session, settings)
    matrix = record.metrics["confusion_matrix"]
    assert sum(map(sum, matrix)) == 6  # 2 test images x 3 classes
    assert stored == sparse_confusion(matrix) and sum(stored["row_totals"]) == 6
    assert record.metrics["test_top1"] == run.metrics["test_top1"]


def test_live_feeds_go_from_redis_a_week_after_their_last_event(settings, tmp_path):
    """Feeds stayed in Redis until their experiment was deleted (megabytes per experiment,
    for good). Each event now keeps its feeds a week; after that the pages tell the story
    from the database."""
    from app.live import FEED_KEEP_S, experiment_stream_key, publish_status

    run_id = add_run(settings, tmp_path)
    assert execute_run(settings, run_id, "w@host", TASK_ID)["status"] == "succeeded"
    client = redis.Redis.from_url(settings.effective_redis_url)
    run = read_run(settings, run_id)
    keys = [run_stream_key(run_id), experiment_stream_key(run.experiment_id)]
    for key in keys:  # the worker's events
        assert FEED_KEEP_S - 60 < client.ttl(key) <= FEED_KEEP_S, key
    client.expire(keys[0], 100)
    client.expire(keys[1], 100)
    publish_status(client, run)  # the web's (a requeue, a lost run)
    for key in keys:
        assert FEED_KEEP_S - 60 < client.ttl(key) <= FEED_KEEP_S, key
    client.close()


def test_an_experiments_feed_keeps_the_end_of_every_run_however_long_its_runs(
        settings, tmp_path):
    """Each run sent every event to its experiment's stream too, which Redis trims at the
    length of one run's: after 60 runs of 27,000 steps, a point every 10, it held the end
    of 7. Its page only draws each run's step and last score: it now gets a run's progress,
    eval and checkpoint events once per 1 % of the steps, and keeps every end."""
    from app.live import experiment_stream_key

    settings = settings.model_copy(update={"event_stream_maxlen": 2000})
    iterations = 300
    experiment_id, run_ids = add_sweep(settings, tmp_path, iterations, seeds=range(6))
    for run_id in run_ids:
        recorder = RunRecorder(settings, run_id, experiment_id)
        recorder.publish({"type": "status", "status": "running", "step": 0,
                          "total_steps": iterations})
        recorder.publish({"type": "started", "step": 0, "total_steps": iterations})
        for step in range(1, iterations + 1):
            for kind in ("progress", "eval", "checkpoint"):
                recorder.publish({"type": kind, "step": step, "total_steps": iterations})
        recorder.publish({"type": "end", "status": "succeeded", "step": iterations,
                          "total_steps": iterations}, now=True)
    client = redis.Redis.from_url(settings.effective_redis_url, decode_responses=True)
    shared = [json.loads(fields["data"])
              for _, fields in client.xrange(experiment_stream_key(experiment_id))]
    assert [event["run_id"] for event in shared if event["type"] == "end"] == run_ids
    for run_id in run_ids:
        steps = [event["step"] for event in shared
                 if event["run_id"] == run_id and event["type"] == "progress"]
        assert steps[0] == 1 and steps[-1] == iterations and len(steps) <= 101
        between = [b - a for a, b in zip(steps[:-2], steps[1:-1], strict=True)]
        assert min(between) == 3  # 1 % of the steps; the last step's is sent all the same
        assert {event["type"] for event in shared if event["run_id"] == run_id} == {
            "status", "started", "progress", "eval", "checkpoint", "end"}
    # The run's own feed has every event.
    assert len(feed(settings, run_ids[-1])) == 3 + 3 * iterations
    client.close()


PREDICTION_COLUMNS = "image_id,path,label,confidence,margin,hidden_label"


@pytest.mark.parametrize(("unlabeled", "budget", "rows"), [
    (3, 0.5, 3 + 3 * 3),  # unlabeled images and withheld labels
    (3, "all", 3),  # unlabeled images only
    (0, "all", 0),  # nothing to predict
], ids=["withheld", "unlabeled-only", "none"])
def test_predictions_csv_has_the_same_columns_for_every_run(settings, tmp_path, unlabeled,
                                                           budget, rows):
    """Scripts read the file's columns by name: a run without unlabeled images got no
    image_id column, and one without withheld labels no hidden_label column."""
    run_id = add_run(settings, tmp_path, unlabeled=unlabeled, budget=budget)
    assert execute_run(settings, run_id, "w@host", TASK_ID)["status"] == "succeeded"
    lines = (settings.runs_dir / str(run_id) / "predictions.csv").read_text().splitlines()
    assert lines[0] == PREDICTION_COLUMNS
    assert len(lines) == 1 + rows
    assert all(line.split(",")[0].isdigit() for line in lines[1:])  # every image known


def assert_documented(event: dict) -> None:
    """The event and each of its fields are in the feeds' documentation (app.schemas,
    shown in /docs), as are its loss terms."""
    kind = event["type"]
    assert kind in FEED_EVENTS, event
    fields = FEED_EVENTS[kind][1]
    common = {"type"} if kind in FEED_OWN_EVENTS else set(FEED_COMMON_FIELDS)
    assert common <= set(event) <= common | set(fields), (kind, sorted(event))
    for term in event.get("losses", {}):
        assert re.search(rf"\b{term}\b", fields["losses"]), term


@pytest.mark.usefixtures("queue")
@pytest.mark.parametrize("method", ["self-tuning", "fixmatch", "fine-tune"])
def test_every_event_a_run_sends_is_documented(settings, tmp_path, method):
    run_id = add_run(settings, tmp_path, method=method, iterations=4)
    update_run(settings, run_id, status="lost")  # queued again by a person: the web's
    # "status" event joins the worker's in the feed
    with session_scope(settings.sqlalchemy_url) as session:
        requeue(session, get_redis(settings.effective_redis_url), run_id, by_person=True)
    assert execute_run(settings, run_id, "w@host",
                       read_run(settings, run_id).celery_task_id)["status"] == "succeeded"
    events = feed(settings, run_id)
    assert {event["type"] for event in events} == {
        "status", "started", "progress", "eval", "checkpoint", "end"}
    for event in events:
        assert_documented(event)
    assert events[-1]["metrics"]["test_top1"] == read_run(settings, run_id).metrics["test_top1"]


def test_test_predictions_name_the_uploaded_images_not_where_the_server_keeps_them(
        settings, tmp_path):
    """test_predictions.json (downloadable) said where the server stores each test image."""
    run_id = add_run(settings, tmp_path)
    assert execute_run(settings, run_id, "w@host", TASK_ID)["status"] == "succeeded"
    rows = json.loads((settings.runs_dir / str(run_id) / "test_predictions.json").read_text())
    with session_scope(settings.sqlalchemy_url) as session:
        dataset_id = read_run(settings, run_id).dataset_id
        tested = {image.id: image for image in session.scalars(select(DatasetImage).where(
            DatasetImage.dataset_id == dataset_id, DatasetImage.split == "test"))}
        names = session.get(Dataset, dataset_id).class_names
    assert sorted(row["image_id"] for row in rows) == sorted(tested)
    for row in rows:
        image = tested[row["image_id"]]
        assert row["path"] == image.original_path and row["path"].startswith("test/")
        assert row["label"] == names[image.label] and row["predicted"] in names
    # A retry of the rewrite (the database was away) leaves it as it is.
    with session_scope(settings.sqlalchemy_url) as session:
        root = settings.datasets_dir / session.get(Dataset, dataset_id).storage_key
        rewrite_exports(settings.runs_dir / str(run_id), session, root,
                            session.get(Run, run_id))
    assert json.loads((settings.runs_dir / str(run_id) / "test_predictions.json")
                      .read_text()) == rows


def test_training_json_names_an_earlier_runs_model_as_the_record_does(settings, tmp_path):
    """A run trained from an earlier run's model recorded where this worker opened it, an
    absolute path on the server (/srv/data/runs/9/model.safetensors) that says where the
    server keeps its files and is not the model once the data directory moves."""
    _, (first, second) = add_sweep(settings, tmp_path, seeds=(0, 1))
    assert execute_run(settings, first, "w@host", TASK_ID)["status"] == "succeeded"
    stored = f"runs/{first}/model.safetensors"
    update_run(settings, second, config={**read_run(settings, second).config,
                                         "backbone": stored})
    assert execute_run(settings, second, "w@host", TASK_ID)["status"] == "succeeded"
    record = json.loads((settings.runs_dir / str(second) / "training.json").read_text())
    assert record["config"]["backbone"] == stored


def test_a_worker_whose_training_code_does_not_load_ends_the_run_failed_with_the_reason(
        settings, tmp_path, monkeypatch):
    """The run stayed "running" at step 0, the ImportError only in the worker's log, until
    the reaper called the worker silent and the run ended lost, for another reason."""
    run_id = add_run(settings, tmp_path)
    monkeypatch.delitem(sys.modules, "worker.selftuning.loop", raising=False)
    monkeypatch.setitem(sys.modules, "worker.selftuning.loop", None)  # importing it fails
    assert execute_run(settings, run_id, "w@host", TASK_ID)["status"] == "failed"
    run = read_run(settings, run_id)
    assert run.status == "failed" and run.finished_at is not None
    assert run.error.startswith("could not start on worker w@host: ModuleNotFoundError: import of "
                                "worker.selftuning.loop halted"), run.error
    assert feed(settings, run_id)[-1]["type"] == "end"


def test_a_task_that_cannot_take_its_run_ends_the_run_failed_not_queued(settings, tmp_path,
                                                                         monkeypatch):
    """Before execute_run can take the run (and end it itself on an error) the task may fail:
    the training code does not load on a half-upgraded worker, the data directory cannot be
    written. The run was left queued forever; now it ends failed with the reason, and its
    feed ends."""
    monkeypatch.setenv("SELFTUNE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("SELFTUNE_REDIS_URL", settings.effective_redis_url)
    get_settings.cache_clear()
    from worker.tasks import train_run

    run_id = add_run(settings, tmp_path)

    @contextmanager
    def disk_full(folder: Path):
        raise OSError(28, "No space left on device")
        yield

    monkeypatch.setattr(worker.training, "_run_dir_lock", disk_full)
    try:
        result = train_run.apply(args=[run_id], task_id=TASK_ID)
    finally:
        get_settings.cache_clear()
    assert result.failed()
    run = read_run(settings, run_id)
    assert run.status == "failed" and run.finished_at is not None
    assert "could not start on worker" in run.error and "No space left on device" in run.error
    assert feed(settings, run_id)[-1]["type"] == "end"
    assert feed(settings, run_id)[-1]["status"] == "failed"

    # A message for a run that is no longer queued for it leaves the run alone.
    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'weights_in_use' from 'app.experiments'")

    monkeypatch.setattr(worker.training, "execute_run", broken)
    update_run(settings, run_id, status="queued", error=None, celery_task_id="task-newer")
    try:
        assert train_run.apply(args=[run_id], task_id=TASK_ID).failed()
        assert read_run(settings, run_id).status == "queued"
        assert train_run.apply(args=[run_id], task_id="task-newer").failed()
    finally:
        get_settings.cache_clear()
    run = read_run(settings, run_id)
    assert run.status == "failed" and "cannot import name 'weights_in_use'" in run.error

    # With the database away as well, the task still reports the error that stopped it.
    def database_away(*args, **kwargs):
        raise OperationalError("UPDATE runs", {}, Exception("connection refused"))

    monkeypatch.setattr(sys.modules["worker.tasks"], "fail_unstarted_run", database_away)
    try:
        result = train_run.apply(args=[run_id], task_id=TASK_ID)
    finally:
        get_settings.cache_clear()
    assert isinstance(result.result, ImportError)


def test_a_cancel_between_the_workers_read_and_claim_wins(settings, tmp_path, monkeypatch):
    """The worker read the run as queued; a person cancelled it before the worker marked it
    running. The cancel stands (it was overwritten: the page said "cancelled", then the run
    trained)."""
    from app.experiments import cancel_runs

    run_id = add_run(settings, tmp_path)
    real = worker.training.dataset_items  # read between the worker's read and its claim

    def cancel_meanwhile(*args):
        with session_scope(settings.sqlalchemy_url) as session:
            live = redis.Redis.from_url(settings.effective_redis_url, decode_responses=True)
            cancel_runs(session, live, [session.get(Run, run_id)])
        return real(*args)

    monkeypatch.setattr(worker.training, "dataset_items", cancel_meanwhile)
    outcome = execute_run(settings, run_id, "w@host", TASK_ID)
    assert outcome["status"] == "changed"
    run = read_run(settings, run_id)
    assert run.status == "cancelled" and run.attempts == 0 and run.worker is None


def test_a_queued_run_whose_message_the_broker_lost_is_sent_again(settings, tmp_path, queue):
    """A Redis that lost its data (restarted without persistence, flushed) left its queued
    runs "queued, position 1" for good: nothing looked for their messages."""
    lost, held = add_run(settings, tmp_path), add_run(settings, tmp_path)
    with session_scope(settings.sqlalchemy_url) as session:
        enqueue_runs(session, [session.get(Run, lost), session.get(Run, held)])
    live = redis.Redis.from_url(settings.effective_redis_url, decode_responses=True)
    messages = {_task_id(raw, held=False): raw for raw in live.lrange(QUEUE, 0, -1)}
    old_task, held_task = read_run(settings, lost).celery_task_id, read_run(
        settings, held).celery_task_id
    assert set(messages) == {old_task, held_task} == broker_task_ids(live)
    # One message gone with Redis's data; the other taken by a worker, not yet acknowledged.
    live.lrem(QUEUE, 0, messages[old_task])
    live.lrem(QUEUE, 0, messages[held_task])
    live.hset(UNACKED, "tag-1", json.dumps([json.loads(messages[held_task]), "", QUEUE]))
    assert broker_task_ids(live) == {held_task}

    impatient = settings.model_copy(update={"stale_after_s": 0.01})
    time.sleep(0.05)  # queued for longer than stale_after_s
    assert requeue_lost_messages(impatient, pause_s=0.1) == [lost]
    again = read_run(settings, lost)
    assert again.status == "queued" and again.celery_task_id != old_task
    assert again.celery_task_id in broker_task_ids(live)
    assert "its message in the queue was lost" in again.error
    assert read_run(settings, held).celery_task_id == held_task
    assert read_run(settings, held).error is None
    assert requeue_lost_messages(impatient, pause_s=0.1) == []  # both accounted for now
