"""The run page (/runs/{id}) with a long run's history, in headless Chromium: do its costs
grow with the number of points logged, and not with their square?

Starts its own uvicorn (SQLite in a temporary data directory, the Redis named by
SELFTUNE_REDIS_URL or redis://127.0.0.1:6379/14), records a running run's history as a worker
does (a progress point a step and an eval every 100 steps, in the database and in the run's
Redis stream), opens the run's page and measures: when the loss chart holds every point, the
main thread's work until the page is quiet (busy seconds, long tasks, the longest), then its
busy share while live events arrive at a set rate and how far the charts lag behind them.
It does so for each history size and prints a table and the ratio of the costs between the
largest size and the smallest: about the ratio of the points where costs are linear, its
square where they are quadratic. Ratios measured in one run say more than absolute times
on a shared machine.

    .venv/bin/python bench/run_page.py --points 2000 20000 --rate 20 --live-seconds 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis
from playwright.sync_api import sync_playwright
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings  # noqa: E402
from app.db import session_scope, upgrade_to_head  # noqa: E402
from app.experiments import create_experiment  # noqa: E402
from app.live import run_stream_key  # noqa: E402
from app.models import Run, RunMetric, utcnow  # noqa: E402
from app.schemas import ExperimentIn  # noqa: E402
from tests.browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP  # noqa: E402
from tests.support import add_dataset_row, app_env, start_server  # noqa: E402

EVAL_EVERY = 100
CHECKPOINT_EVERY = 1000
STREAM_KEPT_S = 3600  # a bench killed halfway leaves its streams for an hour, not a week

# Registered before the page's scripts run: every main-thread task over 50 ms.
LONG_TASKS = """
window.benchLongTasks = [];
new PerformanceObserver((list) => {
  for (const task of list.getEntries()) window.benchLongTasks.push([task.startTime, task.duration]);
}).observe({ type: "longtask" });
"""
# The last step the loss chart's "ce" line holds, and how many points it has (while Chart.js
# decimates a line, `data` is what it draws and `_data` what it was given).
CE_LINE = """() => {
  const chart = window.Chart && Chart.getChart("chart-losses");
  const line = chart && chart.data.datasets.find((d) => d.label === "ce");
  const data = line ? (line._decimated ? line._data : line.data) : [];
  return data.length ? [data.at(-1).x, data.length] : [0, 0];
}"""
LONG_TASKS_SINCE = """(since) => {
  const tasks = window.benchLongTasks.filter(([start]) => start >= since);
  return { count: tasks.length, ms: tasks.reduce((sum, [, d]) => sum + d, 0),
           longest: Math.max(0, ...tasks.map(([, d]) => d)) };
}"""


def engine_events(first: int, last: int, total: int) -> list[dict]:
    """Steps first..last as the Self-Tuning engine reports them (see app.schemas.FEED_EVENTS)."""
    events = []
    for step in range(first, last + 1):
        t = step / total
        events.append({
            "type": "progress", "step": step, "total_steps": total,
            "losses": {"ce": 2.3 * math.exp(-3 * t) + 0.1 * (step % 7) / 7,
                       "pgc_labeled": 5.9 - 2 * t, "pgc_unlabeled": 5.9 - 2 * t},
            "lr": 0.001 * (0.1 if t > 0.5 else 1.0), "images_per_s": 2100 + step % 50,
        })
        if step % EVAL_EVERY == 0:
            events.append({
                "type": "eval", "step": step, "total_steps": total,
                "test_top1": 0.5 + 0.4 * t, "test_mean_class_acc": 0.5 + 0.4 * t,
                "pseudo_label_acc": 0.4 + 0.4 * t, "queue_purity": 0.8,
                "queue_purity_truth": 0.7,
            })
        if step % CHECKPOINT_EVERY == 0:
            events.append({"type": "checkpoint", "step": step, "total_steps": total})
    return events


def publish(live: redis.Redis, settings: Settings, run_id: int, events: list[dict]) -> None:
    """Into the run's stream, with the fields and trimming worker.runs.RunRecorder.publish adds."""
    key = run_stream_key(run_id)
    pipe = live.pipeline(transaction=False)
    for event in events:
        data = json.dumps({"run_id": run_id, "time": time.time(), **event})
        pipe.xadd(key, {"data": data}, maxlen=settings.event_stream_maxlen, approximate=True)
    pipe.expire(key, STREAM_KEPT_S)
    pipe.execute()


def running_run(settings: Settings, live: redis.Redis, dataset_id: int, points: int,
                total: int) -> int:
    """An experiment of one Self-Tuning run, taken by a (pretend) worker, `points` steps in."""
    payload = ExperimentIn(dataset_id=dataset_id, backbone="test_efficientnet",
                           methods=["self-tuning"], budgets=[0.5],
                           overrides={"pretrained": False, "image_size": 32, "batch_size": 8,
                                      "iterations": total})
    with session_scope(settings.sqlalchemy_url) as session:
        experiment = create_experiment(session, settings, payload)
        run = experiment.runs[0]
        run.status, run.worker, run.device, run.attempts = "running", "bench@host", "cpu", 1
        run.started_at = run.heartbeat_at = utcnow()
        run_id = run.id
    if live.exists(run_stream_key(run_id)):
        raise SystemExit(f"{run_stream_key(run_id)} exists in {settings.effective_redis_url}: "
                         "another bench or test uses that database")
    history = engine_events(1, points, total)
    # The database keeps progress and eval points, as RunRecorder.on_event records them.
    rows = [{"run_id": run_id, "kind": e["type"], "step": e["step"],
             "values": {k: v for k, v in e.items() if k not in ("type", "step", "total_steps")}}
            for e in history if e["type"] in ("progress", "eval")]
    with session_scope(settings.sqlalchemy_url) as session:
        session.execute(insert(RunMetric), rows)
        run = session.get(Run, run_id)
        run.step, run.images_per_s = points, history[-1].get("images_per_s", 2100.0)
    started = {"type": "started", "step": 0, "total_steps": total, "resumed_from_step": None,
               "loader_processes": 0}
    status = {"type": "status", "status": "running", "worker": "bench@host", "device": "cpu",
              "attempt": 1, "step": 0, "total_steps": total}
    publish(live, settings, run_id, [status, started, *history])
    return run_id


def task_seconds(cdp) -> float:
    """Main-thread task time of the page so far (Chromium's own count, short tasks too)."""
    metrics = cdp.send("Performance.getMetrics")["metrics"]
    return next(m["value"] for m in metrics if m["name"] == "TaskDuration")


def measure(chromium, base: str, settings: Settings, live: redis.Redis, run_id: int,
            points: int, args) -> dict:
    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.add_init_script(LONG_TASKS)
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    result: dict = {"points": points}
    opened = time.perf_counter()
    page.goto(f"{base}/runs/{run_id}")
    page.wait_for_function(f"({CE_LINE})()[0] >= {points}", timeout=args.timeout * 1000)
    result["charted_s"] = time.perf_counter() - opened
    # The feed replays the stream after the recorded points are drawn: the page has loaded
    # once a whole second passes with its main thread mostly idle.
    busy = task_seconds(cdp)
    while time.perf_counter() - opened < args.timeout:
        time.sleep(1.0)
        busy, before = task_seconds(cdp), busy
        if busy - before < 0.1:
            break
    result["loaded_s"] = time.perf_counter() - opened
    result["load_busy_s"] = busy
    tasks = page.evaluate(LONG_TASKS_SINCE, 0)
    result["load_long_ms"], result["load_longest_ms"] = tasks["ms"], tasks["longest"]

    # Live: a worker logging `rate` steps a second, published the way it publishes them.
    since = page.evaluate("performance.now()")
    busy_before, live_started = task_seconds(cdp), time.perf_counter()
    steps = int(args.rate * args.live_seconds)
    for event in engine_events(points + 1, points + steps, points + steps):
        if event["type"] == "progress":
            time.sleep(max(0.0, live_started + (event["step"] - points) / args.rate
                           - time.perf_counter()))
        publish(live, settings, run_id, [event])
    published = time.perf_counter()
    page.wait_for_function(f"({CE_LINE})()[0] >= {points + steps}", timeout=args.timeout * 1000)
    result["live_lag_s"] = time.perf_counter() - published
    busy_share = (task_seconds(cdp) - busy_before) / (time.perf_counter() - live_started)
    result["live_busy_pct"] = 100 * busy_share
    result["live_longest_ms"] = page.evaluate(LONG_TASKS_SINCE, since)["longest"]
    drawn = page.evaluate(CE_LINE)[1]
    if drawn != points + steps:
        raise SystemExit(f"{points} points: the loss chart holds {drawn}, not {points + steps}")
    context.close()
    return result


COLUMNS = [  # key, heading, format
    ("points", "points", "{:>8,}"), ("charted_s", "charted s", "{:>9.2f}"),
    ("loaded_s", "loaded s", "{:>8.2f}"), ("load_busy_s", "busy s", "{:>7.2f}"),
    ("load_long_ms", "long ms", "{:>8.0f}"), ("load_longest_ms", "longest", "{:>7.0f}"),
    ("live_busy_pct", "live busy %", "{:>11.1f}"), ("live_longest_ms", "live longest", "{:>12.0f}"),
    ("live_lag_s", "lag s", "{:>6.2f}"),
]


def report(results: list[dict]) -> None:
    print("  ".join(f"{heading:>{len(fmt.format(0))}}" for _, heading, fmt in COLUMNS))
    for row in results:
        print("  ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS))
    small, large = results[0], results[-1]
    grown = large["points"] / small["points"]
    print(f"\n{large['points']:,} against {small['points']:,} points (x{grown:g}; linear costs "
          f"grow about x{grown:g}, quadratic ones x{grown * grown:g}):")
    for key, heading in [("charted_s", "until the chart holds every point"),
                         ("load_busy_s", "main-thread busy while loading"),
                         ("load_long_ms", "long tasks while loading"),
                         ("live_busy_pct", "busy share while live")]:
        print(f"  {heading:36s} x{large[key] / max(small[key], 1e-3):.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[2000, 20000],
                        help="history sizes, progress points (one a step)")
    parser.add_argument("--rate", type=float, default=20.0, help="live events per second")
    parser.add_argument("--live-seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds a page may take to load or to catch up")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="selftune-run-page-"))
    redis_url = os.environ.get("SELFTUNE_REDIS_URL", "redis://127.0.0.1:6379/14")
    settings = Settings(data_dir=data_dir, redis_url=redis_url)
    live = redis.Redis.from_url(redis_url)
    run_ids: list[int] = []
    server = None
    try:
        upgrade_to_head(settings.sqlalchemy_url)
        dataset_id = add_dataset_row(settings.sqlalchemy_url)
        live_steps = int(args.rate * args.live_seconds)
        for points in sorted(args.points):
            run_ids.append(running_run(settings, live, dataset_id, points, points + live_steps))
        # Silence from the pretend worker must not get its runs called lost while measured.
        env = app_env(data_dir, settings.sqlalchemy_url, redis_url, SELFTUNE_STALE_AFTER_S="3600")
        base, server = start_server(env, data_dir / "uvicorn.log")
        results = []
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for run_id, points in zip(run_ids, sorted(args.points), strict=True):
                print(f"{points:,} points: opening /runs/{run_id}, then {live_steps} live steps "
                      f"at {args.rate:g}/s ...", flush=True)
                results.append(measure(chromium, base, settings, live, run_id, points, args))
            chromium.close()
        print()
        report(results)
        return 0
    finally:
        if server is not None:
            server.stop()
        for run_id in run_ids:
            live.delete(run_stream_key(run_id))
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
