"""A finished run of many classes, from its record to its page: where does the time go?

Starts its own uvicorn (SQLite in a temporary data directory, the Redis named by
SELFTUNE_REDIS_URL or redis://127.0.0.1:6379/14), records a finished run of each class count
as the worker records one (its confusion matrix in `runs.details`, 5 test images a class, 2
of them taken for another class), then measures, in this process: the record's read from
the database (the SQL read, then the JSON parse of `details`), the answer as `read_run`
reads and builds it, pydantic's check and JSON serialisation as FastAPI does them, and gzip; over
HTTP: `GET /api/runs/{id}` (gzip, as a browser asks) and the run page's HTML; in headless
Chromium: the run page until its per-class table is drawn, with the main thread's busy time
(Chromium's own count). Each form of the answer named in --forms is measured (`dense` is
the answer without a `confusion` parameter). Times on a shared machine vary: compare the
rows of one run.

    .venv/bin/python bench/run_record.py --classes 1000 5000 --forms dense sparse none
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
from playwright.sync_api import sync_playwright
from pydantic import TypeAdapter
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings  # noqa: E402
from app.db import session_scope, upgrade_to_head  # noqa: E402
from app.experiments import create_experiment  # noqa: E402
from app.models import split_metrics, utcnow  # noqa: E402
from app.routers.runs import read_run  # noqa: E402
from app.schemas import ExperimentIn, RunOut  # noqa: E402
from tests.browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP  # noqa: E402
from tests.support import add_dataset_row, app_env, start_server  # noqa: E402

TEST_IMAGES = 5  # a class
WRONG = 2  # of them, each taken for a class drawn at random
READY = "#results:not([hidden]) #per-class tbody tr"


def final_metrics(classes: int, seed: int = 0) -> dict:
    """What the engine reports at the end of a run of `classes` classes."""
    draw = random.Random(seed)
    confusion = [[0] * classes for _ in range(classes)]
    for true in range(classes):
        confusion[true][true] = TEST_IMAGES - WRONG
        for _ in range(WRONG):
            predicted = draw.randrange(classes - 1)
            confusion[true][predicted + (predicted >= true)] += 1
    share = [1 / classes] * classes
    return {
        "test_top1": 1 - WRONG / TEST_IMAGES, "test_mean_class_acc": 1 - WRONG / TEST_IMAGES,
        "confusion_matrix": confusion,
        "per_class_acc": [row[i] / TEST_IMAGES for i, row in enumerate(confusion)],
        "pseudo_label_acc": 0.5, "train_pseudo_label_acc": 0.45,
        "pseudo_label_quality": {
            "confidence_bins": [{"lo": 0.9, "hi": 1.0, "count": classes, "judged": classes,
                                 "accuracy": 0.75}],
            "kept_share_at_095": 0.5, "kept_accuracy_at_095": 0.8,
            "predicted_distribution": [s * (1 + draw.uniform(-0.5, 0.5)) for s in share],
            "labeled_distribution": share,
            "per_class_precision": [draw.random() for _ in share],
            "per_class_recall": [draw.random() for _ in share],
            "confidence_histogram": {"edges": [i / 10 for i in range(11)],
                                     "counts": [0] * 9 + [classes]},
        },
    }


def finished_run(settings: Settings, classes: int) -> int:
    counts = {f"class {n:05d}": {"train": 4, "test": TEST_IMAGES} for n in range(classes)}
    dataset_id = add_dataset_row(settings.sqlalchemy_url, counts)
    payload = ExperimentIn(dataset_id=dataset_id, backbone="test_efficientnet",
                           methods=["fine-tune"], budgets=["all"],
                           overrides={"pretrained": False, "image_size": 32, "iterations": 10})
    with session_scope(settings.sqlalchemy_url) as session:
        run = create_experiment(session, settings, payload).runs[0]
        run.status, run.started_at, run.finished_at = "succeeded", utcnow(), utcnow()
        run.step = run.total_steps
        # As worker.runs records a run's end.
        run.metrics, run.details = split_metrics(final_metrics(classes))
        session.flush()
        return run.id


def ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def in_process(settings: Settings, run_id: int, form: str) -> dict:
    """The server's work on one answer, stage by stage (as read_run and FastAPI do it)."""
    with session_scope(settings.sqlalchemy_url) as session:
        started = time.perf_counter()
        stored = session.execute(text("SELECT details FROM runs WHERE id = :id"),
                                 {"id": run_id}).scalar_one()
        sql_ms = ms(started)
        started = time.perf_counter()
        json.loads(stored)
        parse_ms = ms(started)
    with session_scope(settings.sqlalchemy_url) as session:
        started = time.perf_counter()
        # `dense` is the call as it always was: the bench measures the code before the change.
        out = (read_run(run_id, session, settings) if form == "dense"
               else read_run(run_id, session, settings, confusion=form))
        read_ms = ms(started)
    adapter = TypeAdapter(RunOut)
    started = time.perf_counter()
    body = adapter.dump_json(adapter.validate_python(out))
    serialise_ms = ms(started)
    started = time.perf_counter()
    packed = gzip.compress(body, compresslevel=6)  # as the app's GZipMiddleware
    gzip_ms = ms(started)
    return {"stored_mb": len(stored) / 1e6, "sql_ms": sql_ms, "parse_ms": parse_ms,
            "answer_ms": read_ms, "serialise_ms": serialise_ms,
            "gzip_ms": gzip_ms, "json_mb": len(body) / 1e6, "gzip_mb": len(packed) / 1e6}


def over_http(base: str, run_id: int, form: str) -> dict:
    params = {} if form == "dense" else {"confusion": form}
    with httpx.Client(timeout=300, headers={"Accept-Encoding": "gzip"}) as client:
        started = time.perf_counter()
        response = client.get(f"{base}/api/runs/{run_id}", params=params)
        api_ms = ms(started)
        response.raise_for_status()
        wire = int(response.headers.get("content-length") or len(response.content))
        started = time.perf_counter()
        html = client.get(f"{base}/runs/{run_id}")
        html_ms = ms(started)
    return {"api_ms": api_ms, "api_wire_mb": wire / 1e6, "html_ms": html_ms,
            "html_mb": len(html.content) / 1e6}


def in_chromium(chromium, base: str, run_id: int) -> dict:
    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url.removeprefix(base))
            if r.url.startswith(f"{base}/api/runs/{run_id}") else None)
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    started = time.perf_counter()
    page.goto(f"{base}/runs/{run_id}", timeout=300_000)
    page.wait_for_selector(READY, timeout=300_000)
    drawn_ms = ms(started)
    metrics = cdp.send("Performance.getMetrics")["metrics"]
    busy = {m["name"]: m["value"] for m in metrics}
    context.close()
    return {"page_ms": drawn_ms, "page_busy_ms": busy["TaskDuration"] * 1000,
            "page_script_ms": busy["ScriptDuration"] * 1000, "page_asked": asked}


COLUMNS = [  # key, heading, format
    ("classes", "classes", "{:>7,}"), ("form", "form", "{:>6}"),
    ("stored_mb", "stored MB", "{:>9.1f}"), ("sql_ms", "SQL ms", "{:>6.0f}"),
    ("parse_ms", "parse ms", "{:>8.0f}"), ("answer_ms", "read_run ms", "{:>11.0f}"),
    ("serialise_ms", "serialise ms", "{:>12.0f}"), ("gzip_ms", "gzip ms", "{:>7.0f}"),
    ("json_mb", "JSON MB", "{:>7.2f}"), ("gzip_mb", "gzip MB", "{:>7.3f}"),
    ("api_ms", "HTTP ms", "{:>7.0f}"), ("html_mb", "page MB", "{:>7.2f}"),
    ("html_ms", "page HTTP ms", "{:>12.0f}"), ("page_ms", "drawn ms", "{:>8.0f}"),
    ("page_busy_ms", "main thread ms", "{:>14.0f}"),
    ("page_script_ms", "script ms", "{:>9.0f}"),
]


@contextmanager
def served_runs(class_counts: list[int], prefix: str) -> Iterator[tuple]:
    """(settings, the server's base URL, {classes: run id}, headless Chromium): a uvicorn on a
    temporary data directory (SQLite; the Redis named by SELFTUNE_REDIS_URL or
    redis://127.0.0.1:6379/14) holding a finished run of each class count. The server stops
    and the directory goes afterwards."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    redis_url = os.environ.get("SELFTUNE_REDIS_URL", "redis://127.0.0.1:6379/14")
    settings = Settings(data_dir=data_dir, redis_url=redis_url)
    redis.Redis.from_url(redis_url).ping()
    server = None
    try:
        upgrade_to_head(settings.sqlalchemy_url)
        runs = {classes: finished_run(settings, classes) for classes in class_counts}
        env = app_env(data_dir, settings.sqlalchemy_url, redis_url)
        base, server = start_server(env, data_dir / "uvicorn.log")
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield settings, base, runs, chromium
            finally:
                chromium.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def print_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """`rows` under the headings of `columns` (key, heading, format), each as wide as its
    format makes a value."""
    print("  ".join(f"{heading:>{len(fmt.format(0))}}" for _, heading, fmt in columns))
    for row in rows:
        print("  ".join(fmt.format(row[key]) for key, _, fmt in columns))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--forms", nargs="+", default=["dense", "sparse", "none"],
                        choices=["dense", "sparse", "none"])
    args = parser.parse_args()

    rows = []
    with served_runs(args.classes, "selftune-run-record-") as (settings, base, runs, chromium):
        for classes, run_id in runs.items():
            page = in_chromium(chromium, base, run_id)
            print(f"{classes:,} classes: the page asked for {page.pop('page_asked')}",
                  flush=True)
            for form in args.forms:
                rows.append({"classes": classes, "form": form, **page,
                             **in_process(settings, run_id, form),
                             **over_http(base, run_id, form)})
    print_table(COLUMNS, rows)
    print("SQL ms and parse ms: the read of `runs.details` and its JSON parse, which read_run"
          " ms (the\nwhole record, read and built) includes for dense and sparse; page MB,"
          " page HTTP ms, drawn ms,\nmain thread ms and script ms are the run page's own,"
          " the same on each row of a class count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
