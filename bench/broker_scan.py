"""How much memory and time the reaper's look for queued runs' messages takes
(app.reaper.broker_task_ids) with many messages waiting in the Celery queue.

Fills an empty Redis database (SELFTUNE_REDIS_URL, or redis://127.0.0.1:6379/14; one that
holds any key is refused, and what the bench wrote is removed at the end) with
--messages copies of a real train_run message as Celery sends it, each under its own task id,
plus --held of them in the unacknowledged hash as a worker holds them; then measures, in
this process, the peak of Python's allocations (tracemalloc: reply buffers and parsed bodies)
and the time of a look for every task id, and of a look for the queued runs' ids (the form
`requeue_lost_messages` uses, where the code has it). Times on a shared machine vary: compare
the rows of one run.

    SELFTUNE_REDIS_URL=redis://127.0.0.1:6394/14 .venv/bin/python bench/broker_scan.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import Celery  # noqa: E402

from app.live import get_redis  # noqa: E402
from app.reaper import QUEUE, UNACKED, broker_task_ids  # noqa: E402


def fill(url: str, messages: int, held: int) -> list[str]:
    """The queue with `messages` train_run messages and the hash with `held`; their ids."""
    live = get_redis(url)
    if keys := live.dbsize():
        sys.exit(f"{url} holds {keys:,} key(s): name an empty Redis database in "
                 "SELFTUNE_REDIS_URL (the bench fills it, then empties it)")
    sender = Celery("bench", broker=url)
    sender.send_task("selftune.train_run", args=[1], task_id="template")
    template = json.loads(live.rpop(QUEUE))
    ids = [str(uuid.uuid4()) for _ in range(messages + held)]
    with live.pipeline(transaction=False) as pipe:
        for index, task_id in enumerate(ids):
            message = {**template, "headers": {**template["headers"], "id": task_id}}
            if index < messages:
                pipe.lpush(QUEUE, json.dumps(message))
            else:
                pipe.hset(UNACKED, f"tag-{index}", json.dumps([message, "", QUEUE]))
        pipe.execute()
    print(f"{messages:,} queued and {held:,} held messages of {len(json.dumps(template)):,} "
          f"bytes each")
    return ids


def measure(name: str, look) -> None:
    tracemalloc.start()
    began = time.perf_counter()
    found = look()
    took = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{name:<28} found {len(found):>7,}  peak {peak / 2**20:8.1f} MiB  {took:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--held", type=int, default=1)
    args = parser.parse_args()
    url = os.environ.get("SELFTUNE_REDIS_URL", "redis://127.0.0.1:6379/14")
    ids = fill(url, args.messages, args.held)
    live = get_redis(url)
    measure("every task id", lambda: broker_task_ids(live))
    if "wanted" in inspect.signature(broker_task_ids).parameters:
        measure("the queued runs' ids", lambda: broker_task_ids(live, set(ids)))
    live.delete(QUEUE, UNACKED, *live.scan_iter("_kombu.*"))  # Celery's bindings too


if __name__ == "__main__":
    main()
