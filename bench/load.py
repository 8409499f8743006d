"""Live-feed load on loopback: N concurrent SSE clients follow one streaming run.

Starts its own uvicorn (SQLite in a temporary data directory, the Redis named by
SELFTUNE_REDIS_URL or redis://127.0.0.1:6379/14), publishes progress events into the run's
Redis stream the way a worker does, and prints: events lost per client, publish-to-receipt
latency p50/p95/max, and the latency of GET /api/runs/{id} at a fixed request rate.

    .venv/bin/python bench/load.py --clients 200 --events 200 --rate 10 --status-rps 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings  # noqa: E402
from app.db import session_scope, upgrade_to_head  # noqa: E402
from app.live import run_stream_key  # noqa: E402
from app.models import Dataset, Experiment, Run  # noqa: E402
from tests.support import app_env, start_server  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def follow(client: httpx.AsyncClient, path: str, connected: asyncio.Event,
                 counter: list[int], total: int, receipts: list[tuple[int, float]]) -> None:
    async with client.stream("GET", path) as response:
        response.raise_for_status()
        counted = False
        async for line in response.aiter_lines():
            if not counted:
                counted = True
                counter[0] += 1
                if counter[0] == total:
                    connected.set()
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "time" in event:  # when it was published
                    receipts.append((event.get("step", -1), time.time() - event["time"]))
                if event["type"] == "end":
                    return


async def run_sse(base: str, run_id: int, args, settings: Settings) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        connected = asyncio.Event()
        counter = [0]
        receipts: list[list[tuple[int, float]]] = [[] for _ in range(args.clients)]
        tasks = [
            asyncio.create_task(follow(client, f"/api/runs/{run_id}/events", connected,
                                       counter, args.clients, receipts[i]))
            for i in range(args.clients)
        ]
        await asyncio.wait_for(connected.wait(), timeout=120)
        publisher = redis.Redis.from_url(settings.effective_redis_url)
        key = run_stream_key(run_id)
        interval = 1.0 / args.rate
        started = time.perf_counter()
        for step in range(1, args.events + 1):
            event = {"type": "progress", "run_id": run_id, "step": step,
                     "total_steps": args.events, "time": time.time(), "losses": {"ce": 1.0}}
            publisher.xadd(key, {"data": json.dumps(event)})
            await asyncio.sleep(max(0.0, started + step * interval - time.perf_counter()))
        with session_scope(settings.sqlalchemy_url) as session:
            session.get(Run, run_id).status = "succeeded"
        publisher.xadd(key, {"data": json.dumps({"type": "end", "run_id": run_id,
                                                 "status": "succeeded", "time": time.time()})})
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    latencies = [lat for client in receipts for step, lat in client if step > 0]
    lost = [args.events - sum(1 for step, _ in client if step > 0) for client in receipts]
    return {
        "clients": args.clients,
        "events_per_client": args.events,
        "lost_events": sum(lost),
        "clients_missing_events": sum(1 for n in lost if n),
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * percentile(latencies, 0.95),
        "max_ms": 1000 * max(latencies),
    }


async def run_status(base: str, run_id: int, rps: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def one() -> None:
            nonlocal errors
            begin = time.perf_counter()
            response = await client.get(f"/api/runs/{run_id}")
            latencies.append(time.perf_counter() - begin)
            errors += response.status_code != 200

        tasks = []
        started = time.perf_counter()
        for n in range(int(rps * seconds)):
            await asyncio.sleep(max(0.0, started + n / rps - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies), "achieved_rps": len(latencies) / elapsed, "errors": errors,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * percentile(latencies, 0.95),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="events per second")
    parser.add_argument("--status-rps", type=int, default=100)
    parser.add_argument("--status-seconds", type=float, default=10.0)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="selftune-load-"))
    redis_url = os.environ.get("SELFTUNE_REDIS_URL", "redis://127.0.0.1:6379/14")
    settings = Settings(data_dir=data_dir, redis_url=redis_url)
    upgrade_to_head(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        dataset = Dataset(name="load", storage_key="load", fingerprint="0" * 64)
        session.add(dataset)
        session.flush()
        experiment = Experiment(dataset_id=dataset.id, backbone="-", preset="quick")
        session.add(experiment)
        session.flush()
        run = Run(experiment_id=experiment.id, dataset_id=dataset.id, method="self-tuning",
                  budget=0.05, budget_label="5%", status="running", total_steps=args.events)
        session.add(run)
        session.flush()
        run_id = run.id
    redis.Redis.from_url(redis_url).delete(run_stream_key(run_id))
    env = app_env(data_dir, settings.sqlalchemy_url, redis_url)
    base, server = start_server(env, data_dir / "uvicorn.log")
    try:
        print(f"SSE: {args.clients} clients, {args.events} events at {args.rate:g}/s ...")
        sse = asyncio.run(run_sse(base, run_id, args, settings))
        for key, value in sse.items():
            print(f"  {key:24s} {value:.1f}" if isinstance(value, float) else
                  f"  {key:24s} {value}")
        print(f"status endpoint: {args.status_rps} requests/s for {args.status_seconds:g}s ...")
        status = asyncio.run(run_status(base, run_id, args.status_rps, args.status_seconds))
        for key, value in status.items():
            print(f"  {key:24s} {value:.1f}" if isinstance(value, float) else
                  f"  {key:24s} {value}")
        ok = sse["lost_events"] == 0 and sse["p95_ms"] < 100 and status["errors"] == 0
        print("targets (0 lost, p95 < 100 ms, no errors):", "met" if ok else "NOT met")
        return 0 if ok else 1
    finally:
        server.stop()
        redis.Redis.from_url(redis_url).delete(run_stream_key(run_id))


if __name__ == "__main__":
    sys.exit(main())
