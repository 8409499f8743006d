"""A live feed that has more to replay than one read from Redis returns: a long run (the paper
preset logs thousands of events) watched from the start, or a client reconnecting far behind.
Real uvicorn, Redis and SQLite; the events are written to the stream as the worker writes them."""

from __future__ import annotations

import json

import redis

from app.db import session_scope
from app.live import run_stream_key
from app.models import Run, utcnow
from tests.support import add_dataset_row
from tests.test_experiments_cancel_delete import start_sweep
from tests.test_lost_runs import sse_events

EVENTS = 12_345  # more than two pages of 5,000


def test_a_feed_longer_than_a_page_replays_every_event_in_order(live_server):
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        run_id = run_ids[0]
        with live.pipeline(transaction=False) as pipe:
            for step in range(1, EVENTS + 1):
                event = {"type": "progress", "run_id": run_id, "step": step}
                pipe.xadd(run_stream_key(run_id), {"data": json.dumps(event)})
            pipe.xadd(run_stream_key(run_id), {"data": json.dumps(
                {"type": "end", "run_id": run_id, "status": "succeeded"})})
            pipe.execute()
        with session_scope(database_url) as session:
            run = session.get(Run, run_id)
            run.status, run.finished_at = "succeeded", utcnow()

        replayed = sse_events(client, f"/api/runs/{run_id}/events", within_s=60)
        ids = [entry_id for entry_id, _ in live.xrange(run_stream_key(run_id), count=5)]
        resumed = sse_events(client, f"/api/runs/{run_id}/events", within_s=60,
                             headers={"Last-Event-ID": ids[2]})  # a browser reconnecting
    assert [event["step"] for event in replayed[:-1]] == list(range(1, EVENTS + 1))
    assert replayed[-1]["type"] == "end" and replayed[-1]["status"] == "succeeded"
    assert [event.get("step") for event in resumed[:-1]] == list(range(4, EVENTS + 1))

