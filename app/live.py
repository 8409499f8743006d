"""Redis as the live feed: key names, the client, and per-run event streams."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import redis

WORKER_KEY_PREFIX = "selftune:worker:"
# A worker `make run`'s launcher saw killed (app.launcher), by name: when, and by which signal.
WORKER_GONE_PREFIX = "selftune:worker-gone:"
WORKER_GONE_KEEP_S = 24 * 3600


def mark_worker_gone(client: redis.Redis, name: str, how: str) -> None:
    """Say that the worker `name` is gone, every process of it, from now on: its runs need
    not be waited for (app.reaper)."""
    client.set(WORKER_GONE_PREFIX + name, json.dumps({"at": time.time(), "how": how}),
               ex=WORKER_GONE_KEEP_S)


def gone_workers(client: redis.Redis) -> dict[str, tuple[datetime, str]]:
    """The workers said to be gone (mark_worker_gone): when, and how."""
    return {name: (datetime.fromtimestamp(mark["at"], UTC), mark["how"])
            for name, mark in _marks(client, WORKER_GONE_PREFIX)}


def _marks(client: redis.Redis, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The JSON values of the keys named `prefix` + a name, by name (a key gone meanwhile
    left out)."""
    for key in client.scan_iter(match=prefix + "*", count=100):
        raw = client.get(key)
        if raw:
            yield key.removeprefix(prefix), json.loads(raw)


def run_stream_key(run_id: int) -> str:
    return f"selftune:run:{run_id}:events"


def run_cancel_key(run_id: int) -> str:
    """A run's cancel flag: its value is the task id of the attempt cancelled (ANY_ATTEMPT for
    a run that had none), so that a flag set late, after a requeue sent the run again under
    another task, does not stop the new attempt (`cancels`)."""
    return f"selftune:run:{run_id}:cancel"


ANY_ATTEMPT = "*"


def cancels(flag: str | None, task_id: str | None) -> bool:
    """Whether a run's cancel flag (`run_cancel_key`'s value) stops its attempt `task_id`."""
    return flag is not None and (task_id is None or flag in (ANY_ATTEMPT, task_id))


def experiment_stream_key(experiment_id: int) -> str:
    return f"selftune:experiment:{experiment_id}:events"


# A feed no event has reached for this long goes from Redis: its story is in the database,
# from which a feed that is missing is told again (app.events). Kept until their experiment
# was deleted, feeds grew Redis by megabytes per experiment for good.
FEED_KEEP_S = 7 * 24 * 3600


# The answer header of a requeue: the last event of the feed the page follows (the run's, or
# the experiment's) before the requeue's own. A page following again after it names this
# (`?last_event_id=`) and gets what came since, instead of the whole story again.
FEED_POSITION_HEADER = "Feed-Last-Event-ID"
FEED_POSITION_OUT = {"headers": {FEED_POSITION_HEADER: {
    "description": "the followed feed's last event before the requeue's own (absent when "
    "Redis has none): give it as `last_event_id` to read on from there",
    "schema": {"type": "string"}}}}


def feed_position(client: redis.Redis, key: str) -> str | None:
    """The id of the last event of the feed at `key`, or None when it has none in Redis (gone,
    or Redis does not answer): its story is then told from the start."""
    try:
        last = client.xrevrange(key, count=1)
    except redis.RedisError:
        return None
    return last[0][0] if last else None


def add_to_feeds(pipe: Any, run_id: int, experiment_id: int, data: dict[str, str],
                 maxlen: int | None = None, *, to_experiment: bool = True) -> None:
    """Queue on `pipe` the event `data` for the run's and (unless not `to_experiment`) its
    experiment's feeds, each kept FEED_KEEP_S after its last event."""
    keys = [run_stream_key(run_id)]
    if to_experiment:
        keys.append(experiment_stream_key(experiment_id))
    for key in keys:
        pipe.xadd(key, data, maxlen=maxlen, approximate=True)
        pipe.expire(key, FEED_KEEP_S)


@lru_cache
def get_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=15,
        decode_responses=True,
    )


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Workers that refreshed their presence key recently, sorted by name."""
    workers = [{"name": info["name"], "device": info["device"],
                "torch_device": info.get("torch_device")}
               for _, info in _marks(client, WORKER_KEY_PREFIX)]
    return sorted(workers, key=lambda w: w["name"])


# The final scores an `end` event carries (the rest are in the run's record).
HEADLINE_METRICS = ("test_top1", "test_mean_class_acc", "pseudo_label_acc",
                    "train_pseudo_label_acc")


def headline(metrics: dict | None) -> dict | None:
    """The `metrics` of an `end` event: None for a run without final scores."""
    if not metrics:
        return None
    return {key: metrics.get(key) for key in HEADLINE_METRICS}


def end_event(run: Any) -> dict[str, str]:
    """The stream entry that ends a run's feed, for a run ended outside the worker (cancelled
    while queued, lost for good)."""
    return {"data": json.dumps(ended(run, time.time()))}


def ended(run: Any, moment: float | None = None) -> dict[str, Any]:
    """A run's `end` event from its record, at `moment` (else when it finished): what the
    worker's own says (worker.runs.RunRecorder.finish), for feeds rebuilt or ended by the
    web."""
    if moment is None:
        moment = timestamp(run.finished_at) or time.time()
    return _run_fields(run, "end", moment, error=run.error, metrics=headline(run.metrics))


def timestamp(moment: datetime | None) -> float | None:
    """Seconds since the epoch of a recorded moment (SQLite's are naive UTC)."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _run_event(run: Any, kind: str, **extra: Any) -> dict[str, str]:
    """A stream entry about a run's state, written by the web or the reaper (the worker's
    own events carry the same fields, worker.runs.RunRecorder.publish)."""
    return {"data": json.dumps(_run_fields(run, kind, time.time(), **extra))}


def _run_fields(run: Any, kind: str, moment: float, **extra: Any) -> dict[str, Any]:
    """An event about a run's state, from its record, sent (or recorded) at `moment`."""
    return {"type": kind, "run_id": run.id, "time": moment, "status": run.status,
            "step": run.step, "total_steps": run.total_steps, **extra}


def publish_end(client: redis.Redis, run: Any) -> None:
    """End the run's feed and tell its experiment's page."""
    publish_ends(client, [run])


def publish_ends(client: redis.Redis, runs: list[Any]) -> None:
    """End each run's feed and tell their experiments' pages, in one round trip."""
    if not runs:
        return
    try:
        with client.pipeline(transaction=False) as pipe:
            for run in runs:
                add_to_feeds(pipe, run.id, run.experiment_id, end_event(run))
            pipe.execute()
    except redis.RedisError:
        pass  # the database has the state; the feeds also check it


def forget_cancel(client: redis.Redis, run_id: int) -> None:
    """Drop a run's cancel flag before it is queued again, or its worker would stop it at once.
    Without Redis there is no flag to drop, and no queue either: the enqueue says so."""
    try:
        client.delete(run_cancel_key(run_id))
    except redis.RedisError:
        pass


def forget_feeds(client: redis.Redis, experiment_ids: list[int], run_ids: list[int]) -> None:
    """Delete the live feeds and cancel flags of deleted experiments and runs: nothing reads
    them again, since ids are never handed out twice (migration 0004)."""
    keys = [experiment_stream_key(experiment_id) for experiment_id in experiment_ids]
    keys += [key for run_id in run_ids for key in (run_stream_key(run_id), run_cancel_key(run_id))]
    if not keys:
        return
    try:
        client.delete(*keys)
    except redis.RedisError:
        pass  # best effort: the record is gone; only stale live events would stay behind


def publish_status(client: redis.Redis, run: Any) -> None:
    """Tell open pages that a run changed state outside the worker (requeued, lost)."""
    try:
        with client.pipeline(transaction=False) as pipe:
            add_to_feeds(pipe, run.id, run.experiment_id, _run_event(run, "status"))
            pipe.execute()
    except redis.RedisError:
        pass  # the database has the state; pages also poll it
