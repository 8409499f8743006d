"""A run whose worker vanished more often than the automatic requeues allow: it ends "lost",
its live feeds end, and a person can queue it again, behind the runs already waiting.
Real uvicorn, Redis and SQLite; no worker, so queued runs stay queued."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from app.db import session_scope
from app.models import Run, utcnow
from tests.browser import open_browser
from tests.support import app_env, make_image_archive, start_server, wait_for

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
                run.device = "cpu"
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
            assert client.get(f"/api/experiments/{first}").json()["status"] == (
                "finished with failures")
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
            page.click("#requeue")
            page.wait_for_selector("#run-status .badge.queued")
            page.wait_for_selector("#queue-row:not([hidden])")
            assert page.inner_text("#queue-position").startswith("2 ")
            assert page.is_hidden("#requeue") and page.is_visible("#cancel")
            assert page.is_hidden("#run-error")
            # Any free worker takes it now: where it ran is history.
            assert page.inner_text("#device") == "– (last ran on cpu on gone@host)"
            assert page.evaluate("window.sameDocument") is True  # no reload
            wait_for(lambda: page.inner_text("#live-state") == "● live", timeout=15,
                     message="the page to follow the run again")
            browser.screenshot("requeued")
            browser.assert_no_errors()

        with httpx.Client(base_url=url, timeout=30) as client:
            again = client.get(f"/api/runs/{run_id}").json()
            assert again["status"] == "queued" and again["queue_position"] == 2
            assert again["error"] is None and again["finished_at"] is None
            assert client.get(f"/api/runs/{waiting}").json()["queue_position"] == 1
    finally:
        web.stop()
