"""A run whose worker vanished more often than the automatic requeues allow: it ends "lost",
its live feeds end, and a person can queue it again, behind the runs already waiting.
Real uvicorn, Redis and SQLite; no worker, so queued runs stay queued."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from app.config import Settings
from app.db import session_scope
from app.models import Run, utcnow
from tests.browser import open_browser
from tests.support import (
    app_env,
    free_port,
    make_image_archive,
    start_process,
    start_server,
    wait_for,
)

TINY = {
    "backbone": "test_efficientnet", "preset": "quick", "methods": ["fine-tune"],
    "budgets": [0.5], "seeds": [0],
    "overrides": {"pretrained": False, "image_size": 32, "batch_size": 8, "iterations": 20},
}


def sse_events(client: httpx.Client, path: str, within_s: float = 30,
               headers: dict[str, str] | None = None) -> list[dict]:
    """Every event of a feed, read until the server ends it; fails if it has not ended
    `within_s` (heartbeats keep an endless feed talking, so a read timeout would not)."""
    events = []
    deadline = time.monotonic() + within_s
    with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
            assert time.monotonic() < deadline, f"{path} did not end; events: {events}"
    return events


def start_experiment(client: httpx.Client, dataset_id: int) -> int:
    created = client.post("/api/experiments", json={"dataset_id": dataset_id, **TINY})
    assert created.status_code == 201, created.text
    return created.json()["id"]


@pytest.mark.browser
def test_a_run_lost_for_good_ends_its_feeds_and_can_be_run_again_from_its_page(
    settings, tmp_path: Path, request
):
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_MAX_ATTEMPTS="1", SELFTUNE_STALE_AFTER_S="2",
                  SELFTUNE_HEARTBEAT_INTERVAL_S="0.5",
                  SELFTUNE_SSE_HEARTBEAT_S="1")
    url, web = start_server(env, tmp_path / "logs" / "web.log")
    archive = make_image_archive(tmp_path / "shapes.zip", train_per_class=6, test_per_class=2,
                                 unlabeled=3)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            with open(archive, "rb") as handle:
                uploaded = client.post("/api/datasets", files={"file": ("shapes.zip", handle)})
            assert uploaded.status_code == 201, uploaded.text
            dataset_id = uploaded.json()["id"]
            first = start_experiment(client, dataset_id)
            run_id = client.get(f"/api/experiments/{first}").json()["runs"][0]["id"]
            # Its worker took it once (the one attempt allowed) and then went silent.
            with session_scope(settings.sqlalchemy_url) as session:
                run = session.get(Run, run_id)
                run.status, run.attempts, run.worker = "running", 1, "gone@host"
                run.device, run.images_per_s = "cpu", 8.4
                run.started_at = run.heartbeat_at = utcnow() - timedelta(hours=1)

            run_feed = sse_events(client, f"/api/runs/{run_id}/events")
            assert run_feed[-1]["type"] == "end" and run_feed[-1]["status"] == "lost"
            experiment_feed = sse_events(client, f"/api/experiments/{first}/events")
            assert experiment_feed[-1] == {"type": "experiment_end", "experiment_id": first,
                                           "runs": {str(run_id): "lost"}}
            lost = client.get(f"/api/runs/{run_id}").json()
            assert lost["status"] == "lost" and lost["finished_at"] is not None
            assert lost["resumable"] is False  # no training state was ever saved
            assert "gone@host" in lost["error"] and "requeue" in lost["error"]
            assert client.get(f"/api/experiments/{first}").json()["status"] == "failed"
            refused = client.post(f"/api/runs/{run_id}/cancel")
            assert refused.status_code == 409 and "lost" in refused.json()["detail"]

            # A run started later is already waiting; the lost one, queued again, goes behind.
            second = start_experiment(client, dataset_id)
            waiting = client.get(f"/api/experiments/{second}").json()["runs"][0]["id"]
            assert client.get(f"/api/runs/{waiting}").json()["queue_position"] == 1

        with open_browser(request.node.name) as browser:
            page = browser.page
            page.goto(f"{url}/runs/{run_id}")
            page.wait_for_selector("#run-status .badge.lost")
            page.evaluate("window.sameDocument = true")
            assert page.is_hidden("#cancel") and page.is_visible("#requeue")
            assert "requeue it" in page.inner_text("#run-error")
            assert page.inner_text("#device") == "cpu on gone@host"
            # Lost before any step: nothing to resume from, and the page does not claim it.
            assert page.inner_text("#requeue-note") == "starts from the beginning"
            feeds, answers = [], []
            page.on("request", lambda asked: feeds.append(asked.url)
                    if asked.url.split("?")[0].endswith("/events") else None)
            page.on("response", lambda answer: answers.append(answer.headers)
                    if answer.url.endswith("/requeue") else None)
            page.click("#requeue")
            page.wait_for_selector("#run-status .badge.queued")
            page.wait_for_selector("#queue-row:not([hidden])")
            assert page.inner_text("#queue-position").startswith("2 ")
            assert page.is_hidden("#requeue") and page.is_visible("#cancel")
            assert page.is_hidden("#run-error")
            # Any free worker takes it now: where it ran is history.
            assert page.inner_text("#device") == "– (last ran on cpu on gone@host)"
            # Nor does it train at its last attempt's speed (it read "8.4" as though it did).
            assert page.inner_text("#images-per-s") == "– (8.4 on its last attempt)"
            assert page.evaluate("window.sameDocument") is True  # no reload
            wait_for(lambda: page.inner_text("#live-state") == "● live", timeout=15,
                     message="the page to follow the run again")
            # It reads on from the run's last event before the requeue, which the answer
            # names, instead of being told the run's whole story again (a long run's is
            # 100,000 points).
            (before,) = [headers["feed-last-event-id"] for headers in answers]
            assert feeds == [f"{url}/api/runs/{run_id}/events?last_event_id={before}"], feeds
            browser.screenshot("requeued")
            browser.assert_no_errors()

        with httpx.Client(base_url=url, timeout=30) as client:
            again = client.get(f"/api/runs/{run_id}").json()
            assert again["status"] == "queued" and again["queue_position"] == 2
            assert again["error"] is None and again["finished_at"] is None
            assert client.get(f"/api/runs/{waiting}").json()["queue_position"] == 1
    finally:
        web.stop()


@pytest.mark.parametrize(("heartbeat", "stale", "accepted"), [
    (10.0, 120.0, True),  # the defaults
    (10.0, 30.0, True),
    (1.0, 6.0, True),
    (10.0, 29.9, False),
    (10.0, 10.0, False),
    (10.0, 2.0, False),
    (0.5, 1.0, False),
])
def test_stale_after_must_be_a_few_heartbeats(heartbeat, stale, accepted):
    """A run is called lost after SELFTUNE_STALE_AFTER_S of silence; a worker speaks every
    SELFTUNE_HEARTBEAT_INTERVAL_S, and a heartbeat can be late under load. Set at or near the
    heartbeat, every run still training was declared lost and queued again."""
    if accepted:
        assert Settings(heartbeat_interval_s=heartbeat, stale_after_s=stale).stale_after_s == stale
        return
    with pytest.raises(ValidationError) as refused:
        Settings(heartbeat_interval_s=heartbeat, stale_after_s=stale)
    [error] = refused.value.errors()
    assert error["loc"] == ("stale_after_s",)
    assert f"at least 3 heartbeats, {3 * heartbeat:g} s" in error["msg"]


def exit_and_output(env: dict[str, str], args: list[str], log_path: Path) -> tuple[int | None, str]:
    """How a process started with `args` exited (None: it ran on, and was stopped at 60 s
    with what it started) and what it printed."""
    process = start_process([sys.executable, *args], env, log_path)
    try:
        returncode = process.popen.wait(timeout=60)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        process.stop()  # SIGTERM: a launcher that started stops its web and worker too
    return returncode, process.log()


def test_a_run_called_lost_at_the_first_late_heartbeat_is_refused_at_start(settings, tmp_path):
    """`make run`, the web alone and a worker alone (docker-compose) refuse to start with
    SELFTUNE_STALE_AFTER_S under three heartbeats, and say which setting and what it needs,
    in one line."""
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_HEARTBEAT_INTERVAL_S="10", SELFTUNE_STALE_AFTER_S="15",
                  SELFTUNE_PORT=str(free_port()))
    says = ("must be at least 3 heartbeats, 30 s with SELFTUNE_HEARTBEAT_INTERVAL_S at 10 s: "
            "a run whose worker is silent this long is declared lost")
    returncode, output = exit_and_output(env, ["-m", "app.launcher"], tmp_path / "run.log")
    assert returncode == 2, output
    assert f"SELFTUNE_STALE_AFTER_S: {says}" in output and "Traceback" not in output
    for name, command in [
        ("web", ["-m", "uvicorn", "--factory", "app.main:app_factory", "--port", str(free_port())]),
        ("worker", ["-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo"]),
    ]:
        returncode, output = exit_and_output(env, command, tmp_path / f"{name}.log")
        assert returncode not in (0, None), (name, output)
        # Named as it is set, in one line (a traceback named pydantic's field, stale_after_s).
        assert f"{name} cannot start: SELFTUNE_STALE_AFTER_S: {says}" in output, (name, output)
        assert "Traceback" not in output, (name, output)
