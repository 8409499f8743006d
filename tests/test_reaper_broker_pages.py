"""The reaper's look for queued runs' messages reads the broker a page at a time: with 10,000
queued runs it read every message body at once (17.7 MiB at each pass, bench/broker_scan.py),
and it still finds a lost message and leaves a present one be. Real Redis and SQLite."""

from __future__ import annotations

import json
import tracemalloc
import uuid
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import app.reaper
from app.config import Settings, get_settings
from app.live import get_redis
from app.models import utcnow
from app.reaper import BROKER_PAGE, QUEUE, UNACKED, broker_task_ids, requeue_lost_messages
from tests.test_worker_lifecycle import add_sweep, read_run, update_run


def message(task_id: str, run_id: int = 0) -> str:
    """A train_run message as the queue's list holds it (its body as Celery encodes it)."""
    return json.dumps({
        "body": "W1swXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbH1d",
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "selftune.train_run", "id": task_id,
                    "root_id": task_id, "argsrepr": f"[{run_id}]", "kwargsrepr": "{}",
                    "origin": "gen1@host", "retries": 0, "eta": None, "expires": None},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0,
                       "delivery_tag": str(uuid.uuid4()), "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "celery"}},
    })


def held_message(task_id: str, run_id: int = 0) -> str:
    """The same message as a worker holds it, unacknowledged: [message, exchange, queue]."""
    return json.dumps([json.loads(message(task_id, run_id)), "", QUEUE])


def test_a_lost_message_is_found_and_present_ones_left_among_pages_of_others(
    settings: Settings, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SELFTUNE_REDIS_URL", settings.effective_redis_url)
    get_settings.cache_clear()
    import worker.celery_app  # the web's Celery app, which sends the lost run again

    monkeypatch.setattr(worker.celery_app, "app", worker.celery_app.create_celery(settings))
    _, (deep, held, lost) = add_sweep(settings, tmp_path, seeds=(0, 1, 2))
    for run_id in (deep, held, lost):
        update_run(settings, run_id, celery_task_id=f"task-of-{run_id}",
                   queued_at=utcnow() - timedelta(hours=1))
    live = get_redis(settings.effective_redis_url)
    others = [message(str(uuid.uuid4())) for _ in range(3 * BROKER_PAGE)]
    # The list's head is index 0: `deep` sits in the middle of its third page.
    live.rpush(QUEUE, *others[:int(2.5 * BROKER_PAGE)], message(f"task-of-{deep}", deep),
               *others[int(2.5 * BROKER_PAGE):])
    live.hset(UNACKED, mapping={f"tag-{n}": held_message(str(uuid.uuid4()))
                                for n in range(2 * BROKER_PAGE)})
    live.hset(UNACKED, "tag-held", held_message(f"task-of-{held}", held))

    assert broker_task_ids(live, {f"task-of-{deep}", f"task-of-{held}", f"task-of-{lost}"}) \
        == {f"task-of-{deep}", f"task-of-{held}"}
    assert len(broker_task_ids(live)) == 5 * BROKER_PAGE + 2
    assert requeue_lost_messages(settings, pause_s=0.1) == [lost]
    assert read_run(settings, deep).celery_task_id == f"task-of-{deep}"  # not sent again
    assert read_run(settings, held).celery_task_id == f"task-of-{held}"
    resent = read_run(settings, lost)
    assert resent.status == "queued" and resent.celery_task_id != f"task-of-{lost}"
    assert resent.celery_task_id in broker_task_ids(live, {resent.celery_task_id})
    assert live.llen(QUEUE) == 3 * BROKER_PAGE + 2


def test_a_run_taken_or_sent_anew_between_the_two_looks_is_not_sent_again(
    settings: Settings, tmp_path: Path, monkeypatch
) -> None:
    """The two looks for a message are a pause apart; a run a worker took meanwhile, or one
    queued again under a new task, has no lost message. Sent again from the rows read before
    the pause, the taken run's task id was overwritten (its own worker's task then looked
    stale) and a second message sent for it. The pass now reads, after the pause, the rows
    still queued under the task it looked for."""
    monkeypatch.setenv("SELFTUNE_REDIS_URL", settings.effective_redis_url)
    get_settings.cache_clear()
    import worker.celery_app

    monkeypatch.setattr(worker.celery_app, "app", worker.celery_app.create_celery(settings))
    _, (taken, sent_anew, lost) = add_sweep(settings, tmp_path, seeds=(0, 1, 2))
    for run_id in (taken, sent_anew, lost):
        update_run(settings, run_id, celery_task_id=f"task-of-{run_id}",
                   queued_at=utcnow() - timedelta(hours=1))

    def meanwhile(_seconds: float) -> None:  # the pause between the looks
        update_run(settings, taken, status="running", worker="w@host")
        update_run(settings, sent_anew, celery_task_id="a-new-task", queued_at=utcnow())

    monkeypatch.setattr(app.reaper, "time", SimpleNamespace(sleep=meanwhile))
    assert requeue_lost_messages(settings, pause_s=0.1) == [lost]
    assert read_run(settings, taken).celery_task_id == f"task-of-{taken}"
    assert read_run(settings, sent_anew).celery_task_id == "a-new-task"
    live = get_redis(settings.effective_redis_url)
    assert broker_task_ids(live) == {read_run(settings, lost).celery_task_id}

def test_a_run_the_web_made_but_never_sent_is_sent_by_the_reaper(
    settings: Settings, tmp_path: Path, monkeypatch
) -> None:
    """A web killed between the commit that makes an experiment's runs and the one that
    stamps them left a run queued with no queue time and no task: the reaper looks for runs
    queued before a moment, and skipped it for good ("queued, position 1", nothing in Redis,
    its dataset and experiment not deletable)."""
    monkeypatch.setenv("SELFTUNE_REDIS_URL", settings.effective_redis_url)
    get_settings.cache_clear()
    import worker.celery_app

    monkeypatch.setattr(worker.celery_app, "app", worker.celery_app.create_celery(settings))
    _, (young, old) = add_sweep(settings, tmp_path, seeds=(0, 1))
    for run_id in (young, old):
        update_run(settings, run_id, celery_task_id=None, queued_at=None)
    update_run(settings, old, created_at=utcnow() - timedelta(hours=1))
    assert requeue_lost_messages(settings, pause_s=0.1) == [old]
    sent = read_run(settings, old)
    assert sent.status == "queued" and sent.queued_at is not None
    live = get_redis(settings.effective_redis_url)
    assert broker_task_ids(live) == {sent.celery_task_id}
    assert read_run(settings, young).celery_task_id is None  # still being made, perhaps


def test_looking_through_ten_thousand_queued_messages_holds_a_page_of_them_at_a_time(
    settings: Settings,
) -> None:
    live = get_redis(settings.effective_redis_url)
    ids = [str(uuid.uuid4()) for _ in range(10_000)]
    with live.pipeline(transaction=False) as pipe:
        for task_id in ids:
            pipe.lpush(QUEUE, message(task_id))
        pipe.execute()
    tracemalloc.start()
    try:
        found = broker_task_ids(live, set(ids[-10:]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == set(ids[-10:])
    # Every body at once was 17.7 MiB; a page of them and their ids is under 4 MiB.
    assert peak < 6 * 2**20, f"{peak / 2**20:.1f} MiB"
