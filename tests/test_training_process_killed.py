"""The kernel's out-of-memory killer takes the process that holds the memory: a worker's
training process (its Celery pool process), the worker's own process living on. Real uvicorn,
Celery worker, Redis and SQLite; the process is killed with SIGKILL, as that killer does. The
record of such a loss is also tested on its own, without a worker, where it must leave a run
alone."""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest
import redis
from billiard.exceptions import WorkerLostError
from sqlalchemy import select

from app.db import session_scope
from app.live import run_stream_key
from app.models import Run, utcnow
from tests.support import LiveServer, Process, make_image_archive, wait_for
from tests.test_worker_lifecycle import (  # noqa: F401 - queue: a fixture
    TASK_ID,
    add_run,
    feed,
    queue,
    read_run,
    update_run,
)
from worker.runs import lose_run_of_dead_process

# Long enough that no heartbeat goes stale in this test: only the worker can find the run lost.
STALE_AFTER_S = 3600
# More steps than can pass between two looks, so the process is killed mid-run.
ITERATIONS = 200


def start_two_runs(client, tmp_path) -> int:
    """One experiment of two runs, queued one behind the other for the worker: its id."""
    archive = make_image_archive(tmp_path / "shapes.zip", train_per_class=6, test_per_class=2,
                                 unlabeled=3)
    with open(archive, "rb") as handle:
        uploaded = client.post("/api/datasets", files={"file": ("shapes.zip", handle)})
    assert uploaded.status_code == 201, uploaded.text
    created = client.post("/api/experiments", json={
        "dataset_id": uploaded.json()["id"], "backbone": "test_efficientnet",
        "preset": "quick", "methods": ["fine-tune"], "budgets": [0.5], "seeds": [0, 1],
        "overrides": {"pretrained": False, "image_size": 32, "batch_size": 4,
                      "iterations": ITERATIONS, "eval_interval": ITERATIONS,
                      "log_interval": 2, "checkpoint_interval": 10},
    })
    assert created.status_code == 201, created.text
    return created.json()["id"]


def statuses(database_url: str) -> dict[int, str]:
    with session_scope(database_url) as session:
        return dict(session.execute(select(Run.id, Run.status)).all())


def training_process(worker: Process) -> psutil.Process:
    """The worker's pool process: a fork of its main process, so with its command line."""
    main = psutil.Process(worker.popen.pid)
    (pool,) = [child for child in main.children() if child.cmdline() == main.cmdline()]
    return pool


@pytest.mark.slow
@pytest.mark.server_env(SELFTUNE_STALE_AFTER_S=str(STALE_AFTER_S))
def test_a_run_whose_training_process_is_killed_is_queued_again_at_once_and_resumes(
    settings, live_server: LiveServer, celery_worker: Process, tmp_path
):
    """Celery puts the message back behind the runs waiting and its worker takes the next one
    at once. Before the fix the killed run stayed "running" until its heartbeats had been
    silent for SELFTUNE_STALE_AFTER_S (2 minutes by default): two runs "running" on one worker,
    and the time left counted on two workers."""
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id = start_two_runs(client, tmp_path)

        def killable() -> Run | None:
            for run_id, status in statuses(database_url).items():
                checkpoint = live_server.data_dir / "runs" / str(run_id) / "state"
                run = read_run(settings, run_id)
                if status == "running" and run.step >= 12 and checkpoint.exists():
                    return run
            return None

        first = wait_for(killable, timeout=240, interval=0.1,
                         message=f"a checkpoint and progress:\n{celery_worker.log()[-3000:]}")
        (second_id,) = set(statuses(database_url)) - {first.id}
        pool = training_process(celery_worker)
        pool.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        # From the kill on, never two runs running on the one worker, and the killed one is
        # lost and queued again within seconds, not STALE_AFTER_S.
        while (now := statuses(database_url))[first.id] == "running":
            assert list(now.values()).count("running") <= 1, now
            assert time.monotonic() - killed_at < 30, (
                f"the killed run is still running:\n{celery_worker.log()[-3000:]}")
            time.sleep(0.05)
        lost = read_run(settings, first.id)
        assert lost.status == "queued" and lost.attempts == 1, (lost.status, lost.error)
        assert lost.error.startswith(
            f"its training process (pid {pool.pid}) on worker {first.worker} was killed "
            "(SIGKILL) (last heartbeat 20"), lost.error
        assert lost.error.endswith(
            "; queued again to resume from its last checkpoint (attempt 2 of 3)"), lost.error
        assert lost.celery_task_id != first.celery_task_id  # sent again, as the reaper does

        # The worker goes on with the run that waited; the pages count one worker, one run.
        wait_for(lambda: statuses(database_url)[second_id] == "running", timeout=60,
                 message=f"the next run to start:\n{celery_worker.log()[-3000:]}")
        page = client.get(f"/api/runs/{first.id}").json()
        assert page["status"] == "queued" and "was killed (SIGKILL)" in page["error"]
        assert client.get(f"/api/experiments/{experiment_id}").json()["time_left"][
            "workers"] == 1

        wait_for(lambda: not {"queued", "running"} & set(statuses(database_url).values()),
                 timeout=600, interval=0.5,
                 message=f"both runs to end:\n{celery_worker.log()[-3000:]}")
        runs = {run_id: client.get(f"/api/runs/{run_id}").json()
                for run_id in (first.id, second_id)}
    resumed = runs[first.id]
    assert runs[second_id]["status"] == "succeeded", runs[second_id]["error"]
    assert resumed["status"] == "succeeded", resumed["error"]
    assert resumed["attempts"] == 2 and resumed["step"] == ITERATIONS
    events = [json.loads(fields["data"]) for _, fields in
              redis.Redis.from_url(live_server.redis_url, decode_responses=True)
              .xrange(run_stream_key(first.id))]
    started = [event for event in events if event["type"] == "started"]
    assert len(started) == 2 and started[1]["resumed_from_step"] >= 10
    assert [event["type"] for event in events].count("end") == 1
    assert "WorkerLostError" in celery_worker.log()


DIED = "its training process (pid 7) on worker me@host was killed (SIGKILL)"


def test_a_run_taken_from_the_process_that_died_is_left_alone(settings, tmp_path, queue):  # noqa: F811
    """The reaper queued the run again while its process was paused, and another worker has
    it now (or this one, under the new task): the old process's death is no news of it."""
    run_id = add_run(settings, tmp_path)
    for worker, task_id in [("other@host", TASK_ID), ("me@host", "newer-task")]:
        update_run(settings, run_id, status="running", worker=worker, celery_task_id=task_id,
                   attempts=2, started_at=utcnow(), heartbeat_at=utcnow())
        assert not lose_run_of_dead_process(settings, run_id, "me@host", TASK_ID, DIED)
        run = read_run(settings, run_id)
        assert (run.status, run.worker, run.attempts, run.error) == ("running", worker, 2, None)
    assert queue.llen("celery") == 0


def test_a_run_whose_process_died_at_its_last_attempt_ends_lost(settings, tmp_path, queue):  # noqa: F811
    """As the reaper ends it: not queued again, its feed ended, its page saying how to."""
    run_id = add_run(settings, tmp_path)
    update_run(settings, run_id, status="running", worker="me@host", attempts=3,
               started_at=utcnow(), heartbeat_at=utcnow())
    assert lose_run_of_dead_process(settings, run_id, "me@host", TASK_ID, DIED)
    run = read_run(settings, run_id)
    assert run.status == "lost" and run.finished_at is not None and run.attempts == 3
    assert run.error.startswith(DIED + " (last heartbeat 20") and run.error.endswith(
        "; lost 3 times, so not requeued again (requeue it to resume from its last checkpoint)")
    assert queue.llen("celery") == 0
    assert feed(settings, run_id)[-1]["status"] == "lost"


@pytest.mark.parametrize(("said", "how"), [
    ("Worker exited prematurely: signal 9 (SIGKILL) Job: 4.", "was killed (SIGKILL)"),
    ("Worker exited prematurely: signal 11 (SIGSEGV) Job: 0.", "was killed (SIGSEGV)"),
    ("Worker exited prematurely: exitcode 1 Job: 12.", "exited (exitcode 1)"),
    ("Worker exited prematurely: exitcode 0.", "exited (exitcode 0)"),
])
def test_how_a_training_process_died_is_said_from_celerys_error(queue, said, how):  # noqa: F811
    from worker.tasks import how_it_died  # reads the settings `queue` gives, on import

    assert how_it_died(WorkerLostError(said)) == how
