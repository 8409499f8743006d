"""Stopping a whole sweep and deleting an experiment: cancel-all ends queued runs at once and
flags running ones; delete is refused while a run is active and otherwise takes the runs, their
rows, folders and live feeds with it, leaving the dataset and its other experiments alone.
Real uvicorn, Redis and SQLite (and PostgreSQL); no worker, so queued runs stay queued and a
running run is one the test marks running, as a worker would."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
import timm
from playwright.sync_api import expect
from safetensors.torch import save_file
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.experiments import cancel_runs, delete_run_rows, source_run
from app.live import (
    WORKER_KEY_PREFIX,
    experiment_stream_key,
    publish_end,
    publish_status,
    run_cancel_key,
    run_stream_key,
)
from app.models import Artifact, Dataset, Experiment, Run, RunMetric, utcnow
from app.reaper import reap
from app.routers.runs import error_line
from app.schemas import ERROR_LINE_MAX
from tests.browser import open_browser
from tests.support import add_dataset_row
from tests.test_datasets_support import dataset_server
from tests.test_lost_runs import sse_events
from tests.test_worker_lifecycle import read_run, update_run
from worker.runs import RunRecorder

SWEEP = {
    "backbone": "test_efficientnet", "preset": "quick", "methods": ["fine-tune", "self-tuning"],
    "budgets": [0.5], "seeds": [0, 1],
    "overrides": {"pretrained": False, "image_size": 32, "batch_size": 8, "iterations": 20},
}


def start_sweep(client: httpx.Client, dataset_id: int, **changes) -> tuple[int, list[int]]:
    created = client.post("/api/experiments", json={"dataset_id": dataset_id, **SWEEP, **changes})
    assert created.status_code == 201, created.text
    body = created.json()
    return body["id"], [run["id"] for run in body["runs"]]


def mark_running(database_url: str, run_id: int) -> None:
    """What a worker does when it takes a run."""
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        run.status, run.worker, run.attempts = "running", "test@host", 1
        run.started_at = run.heartbeat_at = utcnow()


def end_as_worker(database_url: str, live: redis.Redis, run_id: int, status: str) -> None:
    """What a worker does when its run stops: the record first, then the feeds' end event."""
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        run.status, run.finished_at = status, utcnow()
    publish_end(live, run)


def add_run_files(data_dir: Path, database_url: str, run_id: int) -> Path:
    """A run folder with a checkpoint and an export (test_efficientnet's weights, which an
    experiment can start from), recorded as the worker records them."""
    folder = data_dir / "runs" / str(run_id)
    folder.mkdir(parents=True)
    (folder / "train_state.pt").write_bytes(b"\0" * 1024)
    model = timm.create_model("test_efficientnet", num_classes=2)
    save_file(model.state_dict(), folder / "model.safetensors")
    with session_scope(database_url) as session:
        session.add(Artifact(run_id=run_id, name="model.safetensors",
                             path=f"runs/{run_id}/model.safetensors",
                             size_bytes=(folder / "model.safetensors").stat().st_size,
                             sha256="0" * 64))
        session.add(RunMetric(run_id=run_id, kind="eval", step=10, values={"test_top1": 0.5}))
    return folder


def rows_of_runs(database_url: str, run_ids: list[int]) -> dict[str, int]:
    with session_scope(database_url) as session:
        return {
            model.__name__: session.scalar(
                select(func.count()).select_from(model).where(column.in_(run_ids)))
            for model, column in ((Run, Run.id), (RunMetric, RunMetric.run_id),
                                  (Artifact, Artifact.run_id))
        }


def statuses(client: httpx.Client, experiment_id: int) -> dict[int, str]:
    body = client.get(f"/api/experiments/{experiment_id}").json()
    return {run["id"]: run["status"] for run in body["runs"]}


def test_cancel_all_ends_queued_runs_at_once_and_flags_the_running_one(live_server):
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id)
        other_id, other_runs = start_sweep(client, dataset_id, seeds=[0])
        running, *queued = run_ids
        mark_running(database_url, running)

        response = client.post(f"/api/experiments/{experiment_id}/cancel")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == experiment_id and body["status"] == "running"
        assert {run["id"]: run["status"] for run in body["runs"]} == {
            running: "running", **{run_id: "cancelled" for run_id in queued}}
        with session_scope(database_url) as session:
            runs = {run.id: run for run in session.scalars(
                select(Run).where(Run.experiment_id == experiment_id))}
        assert all(run.cancel_requested for run in runs.values())
        assert all(runs[run_id].finished_at is not None for run_id in queued)
        assert runs[running].finished_at is None
        # The running run's worker checks this key every iteration.
        assert live.get(run_cancel_key(running)) == runs[running].celery_task_id
        # Pages learn at once that the queued runs ended.
        for run_id in queued:
            [(_, entry)] = live.xrange(run_stream_key(run_id))
            event = json.loads(entry["data"])
            assert (event["type"], event["run_id"], event["status"]) == ("end", run_id, "cancelled")
        assert live.xlen(experiment_stream_key(experiment_id)) == len(queued)
        # Another experiment on the same dataset is not touched.
        assert set(statuses(client, other_id).values()) == {"queued"}

        # Again: nothing more to cancel, the same answer.
        again = client.post(f"/api/experiments/{experiment_id}/cancel")
        assert again.status_code == 200
        assert statuses(client, experiment_id) == {
            running: "running", **{run_id: "cancelled" for run_id in queued}}
        assert live.xlen(experiment_stream_key(experiment_id)) == len(queued)
        assert client.post(f"/api/runs/{queued[0]}/cancel").status_code == 409

        # The worker sees the flag and stops: the experiment's feed ends with every run.
        end_as_worker(database_url, live, running, "cancelled")
        feed = sse_events(client, f"/api/experiments/{experiment_id}/events")
        assert feed[-1] == {"type": "experiment_end", "experiment_id": experiment_id,
                            "runs": {str(run_id): "cancelled" for run_id in run_ids}}
        assert client.get(f"/api/experiments/{experiment_id}").json()["status"] == "cancelled"
        assert client.post(f"/api/experiments/{experiment_id}/cancel").json()["status"] == (
            "cancelled")

        assert client.post("/api/experiments/999999/cancel").status_code == 404


def test_a_sweep_of_queued_runs_cancelled_at_once_ends_its_feed(live_server):
    dataset_id = add_dataset_row(live_server.database_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id)
        assert client.post(f"/api/experiments/{experiment_id}/cancel").json()["status"] == (
            "cancelled")
        feed = sse_events(client, f"/api/experiments/{experiment_id}/events")
        assert feed[0]["type"] == "end" and feed[0]["status"] == "cancelled"
        assert feed[-1] == {"type": "experiment_end", "experiment_id": experiment_id,
                            "runs": {str(run_id): "cancelled" for run_id in run_ids}}


def test_delete_is_refused_while_a_run_runs_then_takes_runs_files_and_feeds(live_server):
    database_url, data_dir = live_server.database_url, live_server.data_dir
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id)
        other_id, other_runs = start_sweep(client, dataset_id, seeds=[0])
        folders = [add_run_files(data_dir, database_url, run_id) for run_id in run_ids]
        other_folder = add_run_files(data_dir, database_url, other_runs[0])
        # The other experiment has live feeds of its own, which must survive.
        assert client.post(f"/api/runs/{other_runs[0]}/cancel").status_code == 200
        mark_running(database_url, run_ids[0])

        refused = client.delete(f"/api/experiments/{experiment_id}")
        assert refused.status_code == 409
        detail = refused.json()["detail"]
        assert "4 queued or running run(s)" in detail and "cancel" in detail
        assert client.get(f"/api/experiments/{experiment_id}").status_code == 200
        assert all(folder.is_dir() for folder in folders)
        assert rows_of_runs(database_url, run_ids) == {"Run": 4, "RunMetric": 4, "Artifact": 4}

        client.post(f"/api/experiments/{experiment_id}/cancel")
        still = client.delete(f"/api/experiments/{experiment_id}")
        assert still.status_code == 409 and "1 queued or running" in still.json()["detail"]

        end_as_worker(database_url, live, run_ids[0], "cancelled")
        assert live.exists(run_stream_key(run_ids[0]), experiment_stream_key(experiment_id)) == 2
        deleted = client.delete(f"/api/experiments/{experiment_id}")
        assert deleted.status_code == 204, deleted.text

        assert client.get(f"/api/experiments/{experiment_id}").status_code == 404
        for run_id in run_ids:
            assert client.get(f"/api/runs/{run_id}").status_code == 404
            assert client.get(f"/api/runs/{run_id}/events").status_code == 404
        assert experiment_id not in {e["id"] for e in client.get("/api/experiments").json()}
        assert rows_of_runs(database_url, run_ids) == {"Run": 0, "RunMetric": 0, "Artifact": 0}
        assert not any(folder.exists() for folder in folders)
        keys = [experiment_stream_key(experiment_id)] + [
            key for run_id in run_ids for key in (run_stream_key(run_id), run_cancel_key(run_id))]
        assert live.exists(*keys) == 0

        # The dataset and its other experiment stay, with their files and feeds.
        with session_scope(database_url) as session:
            assert session.get(Dataset, dataset_id) is not None
            assert session.get(Experiment, other_id) is not None
        assert statuses(client, other_id) == {other_runs[0]: "cancelled",
                                              **{r: "queued" for r in other_runs[1:]}}
        assert rows_of_runs(database_url, other_runs[:1]) == {
            "Run": 1, "RunMetric": 1, "Artifact": 1}
        assert other_folder.is_dir()
        assert live.exists(run_stream_key(other_runs[0]), experiment_stream_key(other_id)) == 2

        assert client.delete(f"/api/experiments/{experiment_id}").status_code == 404
        assert client.post(f"/api/experiments/{experiment_id}/cancel").status_code == 404


def test_a_model_that_queued_runs_start_from_stays_until_they_end(live_server):
    """An experiment may start from an earlier run's model (`runs/<id>/model.safetensors`).
    Deleting that run's experiment or dataset would pull the weights from under the queued
    runs: refused (409) naming them; once they end it goes, and a requeue of one of them is
    then a 409 saying why instead of a run that fails."""
    database_url, data_dir = live_server.database_url, live_server.data_dir
    source_dataset, other_dataset = add_dataset_row(database_url), add_dataset_row(database_url)
    with live_server.client() as client:
        source_id, source_runs = start_sweep(client, source_dataset, seeds=[0])
        folder = add_run_files(data_dir, database_url, source_runs[0])
        client.post(f"/api/experiments/{source_id}/cancel")
        backbone = f"test_efficientnet:runs/{source_runs[0]}/model.safetensors"
        user_id, user_runs = start_sweep(client, other_dataset, seeds=[0], backbone=backbone)

        for url in (f"/api/experiments/{source_id}", f"/api/datasets/{source_dataset}"):
            refused = client.delete(url)
            assert refused.status_code == 409, refused.text
            detail = refused.json()["detail"]
            assert f"run(s) {user_runs[0]}, {user_runs[1]} start from" in detail, detail
        assert folder.is_dir() and client.get(f"/api/experiments/{source_id}").status_code == 200

        client.post(f"/api/experiments/{user_id}/cancel")
        assert client.delete(f"/api/experiments/{source_id}").status_code == 204
        assert not folder.exists()
        requeued = client.post(f"/api/runs/{user_runs[0]}/requeue")
        assert requeued.status_code == 409
        assert requeued.json()["detail"].startswith(
            f"run {user_runs[0]} cannot run again: run {source_runs[0]}, whose model "
            f"runs/{source_runs[0]}/model.safetensors is the backbone, was deleted")
        assert str(data_dir.resolve()) not in requeued.text  # the server's own folders
        # Its experiment's requeue, the same, and queues none of its runs.
        all_again = client.post(f"/api/experiments/{user_id}/requeue")
        assert all_again.status_code == 409 and all_again.json() == requeued.json()
        # A new experiment on it is refused, and the start form's check says so first.
        again = {"dataset_id": other_dataset, **SWEEP, "backbone": backbone}
        checked = client.post("/api/experiments/check", json=again)
        started = client.post("/api/experiments", json=again)
        assert checked.status_code == started.status_code == 422
        assert checked.json() == started.json()
        assert "a weight file must exist" in checked.json()["detail"][0]["msg"]
        assert statuses(client, user_id)[user_runs[0]] == "cancelled"


def test_a_check_on_a_model_whose_run_is_being_deleted_says_so_without_holding_it(
        live_server):
    """The run's row is gone and its folder not yet (a delete between its two steps): the
    start form's check refuses the backbone in the words a start would."""
    database_url = live_server.database_url
    with live_server.client() as client:
        source_id, source_runs = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        add_run_files(live_server.data_dir, database_url, source_runs[0])
        client.post(f"/api/experiments/{source_id}/cancel")
        with session_scope(database_url) as session:
            delete_run_rows(session, [source_runs[0]])
        again = {"dataset_id": add_dataset_row(database_url), **SWEEP,
                 "backbone": f"test_efficientnet:runs/{source_runs[0]}/model.safetensors"}
        checked = client.post("/api/experiments/check", json=again)
        started = client.post("/api/experiments", json=again)
    assert checked.status_code == started.status_code == 422
    assert checked.json() == started.json()
    assert checked.json()["detail"][0]["msg"] == (
        f"run {source_runs[0]}, whose model runs/{source_runs[0]}/model.safetensors is the "
        "backbone, was deleted")


def test_an_experiment_started_from_a_model_being_deleted_is_refused(server_on_each_database):
    """The delete of the run whose model is the backbone holds its locks while the new
    experiment checks the model: the experiment waits, then hears that run is gone (it was
    queued on weights about to vanish)."""
    server = server_on_each_database
    database_url, data_dir = server.database_url, server.data_dir
    with server.client() as client:
        source_id, source_runs = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        add_run_files(data_dir, database_url, source_runs[0])
        client.post(f"/api/experiments/{source_id}/cancel")
        other_dataset = add_dataset_row(database_url)

        backbone = f"test_efficientnet:runs/{source_runs[0]}/model.safetensors"
        delete_source = experiment_delete(source_id, source_runs)
        created = sent_while_held(database_url, delete_source, lambda: client.post(
            "/api/experiments", json={"dataset_id": other_dataset, **SWEEP, "backbone": backbone}))
        assert created.status_code == 422, created.text
        detail = created.json()["detail"][0]["msg"]
        assert detail.startswith(f"run {source_runs[0]}, whose model") and "was deleted" in detail
        assert client.get("/api/experiments", params={"dataset_id": other_dataset}).json() == []


def test_a_sweep_after_a_delete_gets_new_ids_and_starts_clean(live_server):
    """Ids are never reused (migration 0004: SQLite would hand the deleted rows' ids to the
    next ones), and nothing of the deleted runs stays behind under their ids: no checkpoint
    (a run would resume from it), no live events (a page would replay them), no cancel flag."""
    database_url, data_dir = live_server.database_url, live_server.data_dir
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id)
        for run_id in run_ids:
            add_run_files(data_dir, database_url, run_id)
        client.post(f"/api/experiments/{experiment_id}/cancel")
        assert client.delete(f"/api/experiments/{experiment_id}").status_code == 204

        again_id, again_runs = start_sweep(client, dataset_id)
        assert again_id > experiment_id and min(again_runs) > max(run_ids)
        assert client.get(f"/api/runs/{run_ids[-1]}").status_code == 404
        assert not any((data_dir / "runs" / str(run_id)).exists() for run_id in run_ids)
        assert live.exists(experiment_stream_key(experiment_id),
                           *[run_stream_key(run_id) for run_id in run_ids],
                           *[run_cancel_key(run_id) for run_id in run_ids]) == 0
        assert rows_of_runs(database_url, again_runs) == {"Run": 4, "RunMetric": 0, "Artifact": 0}
        assert set(statuses(client, again_id).values()) == {"queued"}


def test_a_deleted_datasets_runs_leave_no_feeds_or_cancel_flags(live_server):
    """The same for a deleted dataset: its runs' feeds and cancel flags (a run cancelled while
    queued keeps one for days) go with it, and the ids are not handed out again."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id)
        client.post(f"/api/experiments/{experiment_id}/cancel")
        assert live.exists(*[run_cancel_key(run_id) for run_id in run_ids]) == len(run_ids)
        assert client.delete(f"/api/datasets/{dataset_id}").status_code == 204

        assert live.exists(experiment_stream_key(experiment_id),
                           *[run_stream_key(run_id) for run_id in run_ids],
                           *[run_cancel_key(run_id) for run_id in run_ids]) == 0
        new_dataset = add_dataset_row(database_url)
        again_id, again_runs = start_sweep(client, new_dataset)
        assert new_dataset > dataset_id
        assert again_id > experiment_id and min(again_runs) > max(run_ids)


def test_delete_works_on_postgresql(tmp_path: Path, redis_url: str, postgres_url: str):
    live = redis.Redis.from_url(redis_url, decode_responses=True)
    with (
        dataset_server(tmp_path, redis_url, database_url=postgres_url) as server,
        server.client() as client,
    ):
        dataset_id = add_dataset_row(postgres_url)
        experiment_id, run_ids = start_sweep(client, dataset_id)
        other_id, _ = start_sweep(client, dataset_id, seeds=[0])
        folders = [add_run_files(server.data_dir, postgres_url, run_id) for run_id in run_ids]
        mark_running(postgres_url, run_ids[0])

        assert client.delete(f"/api/experiments/{experiment_id}").status_code == 409
        cancelled = client.post(f"/api/experiments/{experiment_id}/cancel").json()
        assert [run["status"] for run in cancelled["runs"]] == ["running"] + ["cancelled"] * 3
        end_as_worker(postgres_url, live, run_ids[0], "failed")

        assert client.delete(f"/api/experiments/{experiment_id}").status_code == 204
        assert client.get(f"/api/experiments/{experiment_id}").status_code == 404
        assert rows_of_runs(postgres_url, run_ids) == {"Run": 0, "RunMetric": 0, "Artifact": 0}
        assert not any(folder.exists() for folder in folders)
        assert live.exists(experiment_stream_key(experiment_id),
                           *[run_stream_key(run_id) for run_id in run_ids]) == 0
        assert set(statuses(client, other_id).values()) == {"queued"}


API_TOKEN = "correct-horse-battery-staple"


@pytest.mark.server_env(SELFTUNE_API_TOKEN=API_TOKEN)
def test_cancel_all_and_delete_need_the_api_token(live_server, settings):
    url = live_server.url
    dataset_id = add_dataset_row(settings.sqlalchemy_url)
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {API_TOKEN}"}) as client:
        experiment_id, run_ids = start_sweep(client, dataset_id)
    with httpx.Client(base_url=url, timeout=60) as anonymous:
        for method, path in (("POST", f"/api/experiments/{experiment_id}/cancel"),
                             ("POST", f"/api/experiments/{experiment_id}/requeue"),
                             ("DELETE", f"/api/experiments/{experiment_id}")):
            response = anonymous.request(method, path)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    with session_scope(settings.sqlalchemy_url) as session:
        assert {run.status for run in session.scalars(
            select(Run).where(Run.id.in_(run_ids)))} == {"queued"}


@pytest.mark.browser
def test_experiment_page_cancels_every_run_live_then_deletes_the_experiment(
    live_server, settings, request
):
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id)
        other_id, _ = start_sweep(client, dataset_id, seeds=[0])
    mark_running(database_url, run_ids[0])
    dialogs: list[str] = []
    badges = "[...document.querySelectorAll('#runs tbody .badge')].map((b) => b.textContent)"

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#live-state:has-text('live')")
        page.evaluate("window.sameDocument = true")
        assert page.is_visible("#cancel-all") and page.is_hidden("#delete-experiment")
        cells = "[...document.querySelectorAll('#budget-table tbody td')].map((c) => c.textContent)"
        assert page.evaluate(cells) == ["0/2 runs", "0/2 runs"]  # results still to come
        browser.screenshot("1-active")

        # The running run evaluates once: its row shows that latest evaluation.
        accuracy = f"document.querySelector('tr[data-run-id=\"{run_ids[0]}\"] td:last-child')"
        RunRecorder(settings, run_ids[0], experiment_id).on_event(
            {"type": "eval", "step": 10, "total_steps": 20, "test_top1": 0.467})
        page.wait_for_function(f"{accuracy}.textContent === '46.7%'")
        assert page.evaluate(f"{accuracy}.title") == "latest evaluation"

        page.click("#cancel-all")
        page.wait_for_function(f"{badges}.filter((s) => s === 'cancelled').length === 3")
        assert "Cancel the 4 runs" in dialogs[-1]
        assert "3 queued end at once" in dialogs[-1] and "1 running stops" in dialogs[-1]
        assert page.inner_text("#cancel-all") == "Cancelling…"
        assert page.is_disabled("#cancel-all") and page.is_hidden("#delete-experiment")

        # The worker stops the running run: the page hears it on the live feed.
        end_as_worker(database_url, live, run_ids[0], "cancelled")
        page.wait_for_function(f"{badges}.every((s) => s === 'cancelled')")
        page.wait_for_selector("#delete-experiment:not([hidden])")
        assert page.is_hidden("#cancel-all")
        page.wait_for_function("document.getElementById('live-state').textContent === ''")
        page.wait_for_selector("#experiment-status .badge.cancelled")  # the last refresh
        page.wait_for_function(f"{cells}.every((text) => text === 'no result')")  # never
        # A run that ended without a result has no accuracy (it showed its last evaluation).
        assert page.evaluate(f"{accuracy}.textContent") == "–"
        assert page.evaluate(f"{accuracy}.title") == ""
        assert page.evaluate("window.sameDocument") is True  # no reload
        browser.screenshot("2-all-cancelled")

        # Someone queued a run again behind the page's back: the delete is refused inline.
        # The page looks for such a run every few seconds while it is shown (see
        # tests/test_pages_fixes.py); it reads as hidden here, so the click meets it stale.
        page.evaluate("Object.defineProperty(document, 'hidden', "
                      "{value: true, configurable: true})")
        with live_server.client() as client:
            assert client.post(f"/api/runs/{run_ids[1]}/requeue").status_code == 200
        page.click("#delete-experiment")
        page.wait_for_selector("#action-error:has-text('queued or running')")
        page.evaluate("delete document.hidden")
        assert "4 runs" in dialogs[-1]
        page.wait_for_selector("#cancel-all:not([hidden])")
        assert page.is_hidden("#delete-experiment")
        page.wait_for_selector("#live-state:has-text('live')")  # following the run again
        browser.screenshot("3-delete-refused")
        page.click("#cancel-all")
        page.wait_for_selector("#delete-experiment:not([hidden])")
        assert "Cancel the 1 run " in dialogs[-1]
        assert page.inner_text("#action-error") == ""
        page.wait_for_function("document.getElementById('live-state').textContent === ''")
        assert page.evaluate("window.sameDocument") is True

        page.click("#delete-experiment")
        page.wait_for_url(f"{live_server.url}/experiments")
        assert page.locator(f"a[href='/experiments/{experiment_id}']").count() == 0
        assert page.locator(f"a[href='/experiments/{other_id}']").count() == 1
        browser.screenshot("4-deleted")
        browser.assert_no_errors(expected=("status of 409",))

    with live_server.client() as client:
        assert client.get(f"/api/experiments/{experiment_id}").status_code == 404
        assert all(client.get(f"/api/runs/{run_id}").status_code == 404 for run_id in run_ids)


@pytest.fixture
def server_on_each_database(database_url: str, tmp_path: Path, redis_url: str):
    with dataset_server(tmp_path, redis_url, database_url=database_url) as server:
        yield server


def experiment_delete(experiment_id: int, run_ids: list[int]) -> Callable[[Session], None]:
    """What deleting the experiment does in its transaction (its locks, then the rows), for
    `sent_while_held` to keep open."""

    def hold(session: Session) -> None:
        session.execute(update(Experiment).where(Experiment.id == experiment_id)
                        .values(name=Experiment.name))
        session.execute(select(Run.id).where(Run.experiment_id == experiment_id)
                        .with_for_update()).all()
        delete_run_rows(session, run_ids)
        session.execute(delete(Experiment).where(Experiment.id == experiment_id))

    return hold


def sent_while_held(database_url: str, hold: Callable[[Session], None],
                    send: Callable[[], httpx.Response]) -> httpx.Response:
    """`send()` from another thread while a transaction that did `hold` keeps its locks: the
    request must still be waiting 3 s later; then the transaction commits, and the request's
    answer is returned."""
    answers: list[httpx.Response] = []
    with session_scope(database_url) as session:
        hold(session)
        waiter = threading.Thread(target=lambda: answers.append(send()))
        waiter.start()
        waiter.join(timeout=3)
        assert waiter.is_alive(), "the request did not wait for the transaction's locks"
    waiter.join(timeout=30)
    return answers[0]


def test_a_requeue_racing_the_delete_of_its_experiment_is_a_404(server_on_each_database):
    """"Run again" on a run whose experiment someone is deleting at that moment: the delete
    holds its locks, the requeue waits for them and then finds the run gone (404, nothing
    queued), instead of failing with a 500 on a row that vanished under it."""
    server = server_on_each_database
    database_url = server.database_url
    with server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        client.post(f"/api/experiments/{experiment_id}/cancel")

        requeued = sent_while_held(database_url, experiment_delete(experiment_id, run_ids),
                                   lambda: client.post(f"/api/runs/{run_ids[0]}/requeue"))
        assert requeued.status_code == 404, requeued.text
        assert f"run {run_ids[0]} does not exist" in requeued.json()["detail"]
        assert client.get(f"/api/experiments/{experiment_id}").status_code == 404
        assert rows_of_runs(database_url, run_ids) == {"Run": 0, "RunMetric": 0, "Artifact": 0}


def test_a_run_requeued_twice_is_queued_once(live_server):
    """A double click on "Run again": the second request finds the run queued (409)."""
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(live_server.database_url),
                                             seeds=[0])
        client.post(f"/api/experiments/{experiment_id}/cancel")
        first = client.post(f"/api/runs/{run_ids[0]}/requeue")
        second = client.post(f"/api/runs/{run_ids[0]}/requeue")
        assert first.status_code == 200 and first.json()["status"] == "queued"
        assert second.status_code == 409 and "is queued" in second.json()["detail"]
        assert client.post(f"/api/runs/{run_ids[1]}/requeue").json()["status"] == "queued"


def test_run_again_after_a_cancel_while_queued_trains_instead_of_stopping_at_once(
    settings, live_server
):
    """Cancelling a queued run leaves a cancel flag in Redis for days; "Run again" drops it,
    or the worker taking the requeued run would find it and stop at step 0."""
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(live_server.database_url),
                                             seeds=[0])
        client.post(f"/api/experiments/{experiment_id}/cancel")
        assert RunRecorder(settings, run_ids[0], experiment_id).should_cancel()
        assert client.post(f"/api/runs/{run_ids[0]}/requeue").status_code == 200

    assert live.exists(run_cancel_key(run_ids[0])) == 0
    assert not RunRecorder(settings, run_ids[0], experiment_id).should_cancel()
    assert RunRecorder(settings, run_ids[1], experiment_id).should_cancel()  # not requeued


def test_a_cancel_that_raced_run_again_does_not_stop_the_new_attempt(settings, live_server):
    """Cancel and "Run again" at once: the cancel set its Redis flag after the requeue had
    dropped it, and the run, queued again, trained a few seconds and ended cancelled, which
    nobody had asked of it then. The flag names the attempt (task) it cancels now, and a
    cancel whose run was sent again meanwhile leaves the new attempt alone."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, [run_id] = start_sweep(client, add_dataset_row(database_url),
                                              methods=["fine-tune"], seeds=[0])
        with session_scope(database_url) as session:  # the run as the cancel read it
            stale = session.get(Run, run_id)
            session.expunge(stale)
        client.post(f"/api/runs/{run_id}/cancel")
        assert live.get(run_cancel_key(run_id)) == stale.celery_task_id
        assert client.post(f"/api/runs/{run_id}/requeue").json()["status"] == "queued"
    again = read_run(settings, run_id).celery_task_id
    assert again != stale.celery_task_id

    with session_scope(database_url) as session:  # a cancel that read the run before
        assert cancel_runs(session, live, [stale]) == []
    run = read_run(settings, run_id)
    assert (run.status, run.cancel_requested) == ("queued", False)
    assert live.exists(run_cancel_key(run_id)) == 0

    live.set(run_cancel_key(run_id), stale.celery_task_id)  # the racing cancel's late flag
    update_run(settings, run_id, status="running", worker="w@host", started_at=utcnow())
    recorder = RunRecorder(settings, run_id, experiment_id)
    recorder.hold("w@host", again, folder_locked=True)
    assert not recorder.should_cancel()
    live.set(run_cancel_key(run_id), again)  # a cancel of this attempt stops it
    assert recorder.should_cancel()


def test_a_cancel_as_the_last_step_is_recorded_is_refused_or_seen(settings, live_server):
    """A cancel read the run one step short of its last and was accepted, but the engine looked
    for a cancel before each step only: the run ended succeeded, flagged cancelled. Now a
    cancel that lands after the worker recorded the last step is refused (409), and one
    committed before is read from the database by the check after the last step, its Redis
    flag not set yet."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, [run_id] = start_sweep(client, add_dataset_row(database_url),
                                              methods=["fine-tune"], seeds=[0])
    mark_running(database_url, run_id)
    update_run(settings, run_id, step=19, total_steps=20)
    with session_scope(database_url) as session:  # the run as the cancel read it
        read = session.get(Run, run_id)
        session.expunge(read)
    update_run(settings, run_id, step=20)  # the worker records the last step meanwhile
    with session_scope(database_url) as session:
        assert cancel_runs(session, live, [read]) == []
    assert read_run(settings, run_id).cancel_requested is False
    assert live.exists(run_cancel_key(run_id)) == 0
    with live_server.client() as client:
        refused = client.post(f"/api/runs/{run_id}/cancel")
    assert refused.status_code == 409 and "has trained all 20 steps" in refused.json()["detail"]

    update_run(settings, run_id, step=19)
    recorder = RunRecorder(settings, run_id, experiment_id)
    recorder.hold("test@host", read.celery_task_id, folder_locked=True)
    recorder.database_check_s = float("inf")  # between the checks that read the database
    recorder.should_cancel()
    update_run(settings, run_id, cancel_requested=True)  # committed; its Redis flag not yet
    recorder.on_event({"type": "progress", "step": 20, "total_steps": 20, "loss": 0.5})
    assert recorder.should_cancel()
    with live_server.client() as client:  # asked again: the cancel stands, no 409 saying
        again = client.post(f"/api/runs/{run_id}/cancel")  # the run ends as it would
    assert again.status_code == 200 and again.json()["status"] == "running"


def test_a_cancelled_run_whose_worker_vanished_ends_cancelled_not_requeued(settings, live_server):
    """The user cancelled a running run, then its worker went silent: the reaper ends it
    cancelled (it has stopped, as asked) instead of queueing it again as a lost run."""
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        mark_running(database_url, run_ids[0])
        mark_running(database_url, run_ids[1])
        client.post(f"/api/runs/{run_ids[0]}/cancel")
    with session_scope(database_url) as session:
        for run in session.scalars(select(Run).where(Run.id.in_(run_ids))):
            run.heartbeat_at = utcnow() - timedelta(hours=1)
            run.attempts = settings.max_attempts  # no automatic requeue: no Celery needed here

    assert sorted(reap(settings)) == run_ids
    with session_scope(database_url) as session:
        cancelled, lost = (session.get(Run, run_id) for run_id in run_ids)
        assert (cancelled.status, cancelled.error) == ("cancelled", None)
        assert cancelled.finished_at is not None
        assert lost.status == "lost" and "stopped reporting" in lost.error


def test_an_experiment_started_while_its_dataset_is_deleted_is_a_422(server_on_each_database):
    """The dataset is read, then deleted (by someone else) before the experiment's rows are
    written: the foreign key refuses them, and the answer says the dataset is gone (it was
    a 500). Nothing is stored."""
    server = server_on_each_database
    database_url = server.database_url
    with server.client() as client:
        dataset_id = add_dataset_row(database_url)
        with session_scope(database_url) as session:
            before = session.scalar(select(func.count()).select_from(Experiment))
        created = sent_while_held(
            database_url,
            lambda session: session.execute(delete(Dataset).where(Dataset.id == dataset_id)),
            lambda: client.post("/api/experiments", json={"dataset_id": dataset_id, **SWEEP}),
        )
        assert created.status_code == 422, created.text
        assert f"dataset {dataset_id} does not exist" in created.text
        with session_scope(database_url) as session:
            assert session.scalar(select(func.count()).select_from(Experiment)) == before


def test_two_deletes_of_one_experiment_or_dataset_racing_give_one_204_and_one_404(
    server_on_each_database,
):
    """A double click on Delete: the second request waits for the first's locks and then
    finds nothing to delete (it answered 204 as if it had deleted it)."""
    server = server_on_each_database
    database_url = server.database_url
    with server.client() as client:
        dataset_id = add_dataset_row(database_url)
        experiment_id, run_ids = start_sweep(client, dataset_id, seeds=[0])
        client.post(f"/api/experiments/{experiment_id}/cancel")

        second = sent_while_held(database_url, experiment_delete(experiment_id, run_ids),
                                 lambda: client.delete(f"/api/experiments/{experiment_id}"))
        assert second.status_code == 404, second.text
        assert second.json()["detail"] == f"experiment {experiment_id} does not exist"

        def delete_dataset(session: Session) -> None:
            session.execute(update(Dataset).where(Dataset.id == dataset_id)
                            .values(name=Dataset.name))
            session.execute(delete(Dataset).where(Dataset.id == dataset_id))

        second = sent_while_held(database_url, delete_dataset,
                                 lambda: client.delete(f"/api/datasets/{dataset_id}"))
        assert second.status_code == 404, second.text
        assert second.json()["detail"] == f"dataset {dataset_id} does not exist"


def test_a_run_past_its_last_step_is_not_cancelled_but_told_so(live_server):
    """The engine checks the cancel flag between training steps; a run scoring and exporting
    its model ends succeeded whatever the flag says, and the answer was a 200 "cancel
    requested" all the same."""
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url))
        finishing, training = run_ids[0], run_ids[1]
        for run_id in (finishing, training):
            mark_running(database_url, run_id)
        with session_scope(database_url) as session:
            run = session.get(Run, finishing)
            run.step = run.total_steps

        refused = client.post(f"/api/runs/{finishing}/cancel")
        assert refused.status_code == 409, refused.text
        assert "has trained all 20 steps and is scoring and exporting" in refused.json()["detail"]

        answer = client.post(f"/api/experiments/{experiment_id}/cancel")
        assert answer.status_code == 200
        runs = {run["id"]: run for run in answer.json()["runs"]}
        assert runs[finishing]["status"] == "running"
        assert {runs[run_id]["status"] for run_id in run_ids[2:]} == {"cancelled"}
        flags = {run_id: client.get(f"/api/runs/{run_id}").json()["cancel_requested"]
                 for run_id in (finishing, training)}
        assert flags == {finishing: False, training: True}


def test_a_cancel_whose_runs_are_deleted_as_it_commits_is_a_404(database_url, redis_url,
                                                                 tmp_path):
    """Cancel-all and a delete of the experiment at once: the delete landed between the
    cancel's commit and its re-read of the runs, and the refresh of a row gone answered 500
    ("Could not refresh instance"). Seen with 8 cancels and 8 deletes of one experiment."""
    from fastapi import HTTPException

    from app.config import Settings
    from app.db import get_sessionmaker, upgrade_to_head
    from app.experiments import delete_experiment_with_runs

    upgrade_to_head(database_url)
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url,
                        database_url=database_url)
    dataset_id = add_dataset_row(database_url)
    with session_scope(database_url) as session:
        experiment = Experiment(name="raced", dataset_id=dataset_id, backbone="b",
                                methods=["fine-tune"], budgets=[0.5], seeds=[0], preset="quick")
        session.add(experiment)
        session.flush()
        session.add(Run(experiment_id=experiment.id, dataset_id=dataset_id, method="fine-tune",
                        budget=0.5, budget_label="50%", seed=0, config={}, status="queued"))
        experiment_id = experiment.id
    live = redis.Redis.from_url(redis_url)
    cancelling = get_sessionmaker(database_url)()
    runs = list(cancelling.get(Experiment, experiment_id).runs)
    commit = cancelling.commit

    def commit_then_the_delete_lands():
        commit()
        with session_scope(database_url) as deleting:
            delete_experiment_with_runs(deleting, settings, live,
                                        deleting.get(Experiment, experiment_id))

    cancelling.commit = commit_then_the_delete_lands
    try:
        with pytest.raises(HTTPException) as refused:
            cancel_runs(cancelling, live, runs)
    finally:
        cancelling.close()
    assert refused.value.status_code == 404
    assert refused.value.detail == (f"run {runs[0].id} was deleted, with its experiment, while "
                                    "it was being cancelled")
    with session_scope(database_url) as session:
        assert session.get(Experiment, experiment_id) is None


@pytest.mark.parametrize(("folder", "run_id"), [
    ("12", 12), ("2147483647", 2147483647),
    ("²", None), ("012", None), ("١٢", None), ("0", None), ("2147483648", None),
    ("99999999999999999999", None), ("shared", None),
])
def test_a_weight_file_is_a_runs_model_only_in_a_folder_named_as_runs_are(tmp_path: Path,
                                                                          folder, run_id):
    """A weight file under runs/ in a folder an administrator made (`²` was a 500 when an
    experiment started from it; `012` and `١٢` counted as run 12's model, so deleting run 12
    waited on it)."""
    settings = Settings(data_dir=tmp_path)
    path = settings.runs_dir.resolve() / folder / "model.safetensors"
    assert source_run(settings, path) == run_id


def test_an_experiments_ended_runs_are_queued_again_in_one_request(live_server):
    """A sweep whose runs failed (Redis down when they were sent, say) or were cancelled was
    run again one run page at a time. The experiment's requeue queues each lost, failed or
    cancelled run again, as its own "Run again" would, and leaves the others alone."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url),
                                             seeds=[0, 1])
        assert len(run_ids) == 4
        client.post(f"/api/experiments/{experiment_id}/cancel")
        with session_scope(database_url) as session:
            failed = session.get(Run, run_ids[1])
            failed.status, failed.attempts = "failed", 2
            failed.error = "RuntimeError: out of memory\n\n  File \"worker/training.py\", line 1"
            session.get(Run, run_ids[2]).status = "succeeded"
        tasks = task_ids(database_url, run_ids)
        before = live.xrevrange(experiment_stream_key(experiment_id), count=1)[0][0]
        # Why it failed, in the list of runs: the first line, without where it came from.
        assert [run["error_line"] for run in client.get(
            f"/api/experiments/{experiment_id}").json()["runs"]] == [
            None, "RuntimeError: out of memory", None, None]

        answer = client.post(f"/api/experiments/{experiment_id}/requeue")
        assert answer.status_code == 200, answer.text
        # Where its page's feed reads on from: the experiment's last event before the requeue.
        assert answer.headers["Feed-Last-Event-ID"] == before
        assert [json.loads(data["data"])["status"] for _, data in live.xrange(
            experiment_stream_key(experiment_id), min=f"({before}")] == ["queued"] * 3
        assert [run["status"] for run in answer.json()["runs"]] == [
            "queued", "queued", "succeeded", "queued"]
        assert answer.json()["status"] == "in progress"
        again = client.get(f"/api/runs/{run_ids[1]}").json()
        assert again["error"] is None and again["attempts"] == 0  # afresh, as "Run again"
        assert all(run["error_line"] is None for run in answer.json()["runs"])
        sent = task_ids(database_url, run_ids)
        assert [sent[id_] != tasks[id_] for id_ in run_ids] == [True, True, False, True]
        assert live.exists(run_cancel_key(run_ids[0])) == 0  # or it stops at once

        # Nothing ended left to run again: the experiment as it is.
        assert client.post(f"/api/experiments/{experiment_id}/requeue").json()[
            "runs"] == client.get(f"/api/experiments/{experiment_id}").json()["runs"]
        assert task_ids(database_url, run_ids) == sent
        assert client.post("/api/experiments/999999/requeue").status_code == 404


def test_a_runs_error_line_is_its_first_line_cut_to_a_list_cells_length():
    assert error_line(None) is None and error_line("  \n") is None
    assert error_line("\n  ValueError: no\n\nTraceback ...") == "ValueError: no"
    cut = error_line("RuntimeError: " + "x" * 400)
    assert len(cut) == ERROR_LINE_MAX and cut.endswith("x…")


@pytest.mark.browser
def test_experiment_page_says_how_long_its_runs_still_to_go_would_train(live_server, request):
    """A sweep of 18 runs on a CPU takes an evening; its page said which run trained but not
    when the last would be done. The time left counts each run still to go at what its
    method's runs took so far; a method not yet timed is said to be."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id)
    with session_scope(database_url) as session:
        runs = [session.get(Run, run_id) for run_id in run_ids]
        assert [run.method for run in runs] == ["fine-tune"] * 2 + ["self-tuning"] * 2

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        expect(page.locator("#time-left")).to_have_text(
            "4 runs to go: timed once the first has trained a little")

        # The first fine-tuning run took 10 minutes for its 20 steps (queued before that).
        with session_scope(database_url) as session:
            run = session.get(Run, run_ids[0])
            run.queued_at = utcnow() - timedelta(minutes=11)
            run.started_at, run.step = utcnow() - timedelta(minutes=10), 20
        end_as_worker(database_url, live, run_ids[0], "succeeded")
        expect(page.locator("#time-left")).to_have_text(
            "over 10 min: 3 runs to go, one after another; the 2 Self-Tuning runs are timed "
            "once one has trained a little")

        # A Self-Tuning run trains 8 + 16 images a step at 2.4 a second: 10 s a step; it is
        # half done.
        mark_running(database_url, run_ids[2])
        with session_scope(database_url) as session:
            run = session.get(Run, run_ids[2])
            run.step, run.images_per_s = 10, 2.4
            publish_status(live, run)
        # 10 min for the fine-tuning run, 100 s and 200 s for the Self-Tuning ones.
        expect(page.locator("#time-left")).to_have_text(
            "about 15 min: 3 runs to go, one after another")
        browser.screenshot("time-left")
        # The lists say it too, beside the experiment's status.
        lists = page.context.new_page()
        lists.goto(f"{live_server.url}/experiments")
        assert lists.inner_text(f"#status-{experiment_id} small") == "about 15 min left"
        lists.goto(f"{live_server.url}/")
        assert lists.inner_text("#latest-experiments li").endswith(
            "· 2 queued, 1 running, 1 succeeded · about 15 min left")
        lists.close()
        with live_server.client() as client:
            (listed,) = client.get("/api/experiments").json()
        assert listed["time_left"]["runs"] == 3 and listed["time_left"]["untimed_runs"] == 0
        assert listed["time_left"]["seconds"] == pytest.approx(900, abs=5)

        # A second sweep queued behind this one waits for its 3 runs (15 min), then trains
        # its own. None has finished yet: its fine-tuning runs are timed by the first's (10 min
        # each), its Self-Tuning runs not yet (the first's has not finished).
        with live_server.client() as client:
            second_id, _ = start_sweep(client, dataset_id)
            left = client.get(f"/api/experiments/{second_id}").json()["time_left"]
        assert (left["runs"], left["untimed_runs"], left["ahead_runs"]) == (4, 2, 3)
        assert left["seconds"] == pytest.approx(900 + 2 * 600, abs=5)
        second = page.context.new_page()
        second.goto(f"{live_server.url}/experiments/{second_id}")
        expect(second.locator("#time-left")).to_have_text(
            "over 35 min: 4 runs to go, after 3 runs of other experiments, one after another; "
            "the 2 Self-Tuning runs are timed once one has trained a little")
        second.goto(f"{live_server.url}/experiments")
        assert second.inner_text(f"#status-{second_id} small") == "over 35 min left"
        assert second.inner_text(f"#status-{experiment_id} small") == "about 15 min left"
        second.close()
        # Two workers answer: the fine-tuning run (10 min) beside the Self-Tuning runs
        # (100 s, then 200 s).
        for name in ("one@host", "two@host"):
            live.set(WORKER_KEY_PREFIX + name, json.dumps(
                {"name": name, "device": "cpu", "torch_device": "cpu"}), ex=60)
        with live_server.client() as client:
            left = client.get(f"/api/experiments/{experiment_id}").json()["time_left"]
            assert (left["workers"], left["ahead_runs"]) == (2, 0)
            assert left["seconds"] == pytest.approx(600, abs=5)
            client.post(f"/api/experiments/{second_id}/cancel")

        # Every run ended: nothing to time.
        with live_server.client() as client:
            client.post(f"/api/experiments/{experiment_id}/cancel")
        end_as_worker(database_url, live, run_ids[2], "cancelled")
        expect(page.locator("#time-left-row")).to_be_hidden()
        browser.assert_no_errors()
    with live_server.client() as client:
        assert client.get(f"/api/experiments/{experiment_id}").json()["time_left"] is None


def task_ids(database_url: str, run_ids: list[int]) -> dict[int, str]:
    """Each run's current Celery task id (a new one each time it is sent)."""
    with session_scope(database_url) as session:
        return {run_id: session.get(Run, run_id).celery_task_id for run_id in run_ids}


@pytest.mark.browser
def test_experiment_page_runs_its_ended_runs_again_in_one_click(live_server, request):
    """Run again was on each run's page only: a cancelled sweep of 12 runs took 12 pages."""
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url))
        client.post(f"/api/experiments/{experiment_id}/cancel")
    with session_scope(database_url) as session:
        failed = session.get(Run, run_ids[3])
        failed.status, failed.error = "failed", "MemoryError: 12 GiB asked for\n\n  File ..."
    badges = "[...document.querySelectorAll('#runs tbody .badge')].map((b) => b.textContent)"
    reasons = "[...document.querySelectorAll('#runs tbody tr')].map((tr) => " \
              "tr.querySelector('.run-reason')?.textContent ?? null)"

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        again = page.locator("#requeue-all")
        expect(again).to_have_text("Run 4 runs again")
        assert again.get_attribute("title") == (
            "Queue again the runs that ended without finishing (1 failed, 3 cancelled); each "
            "resumes from its last checkpoint")
        assert page.is_hidden("#cancel-all") and page.is_visible("#delete-experiment")
        # Why the failed run ended, without opening its page (cancelled runs have no reason).
        assert page.evaluate(reasons) == [None, None, None, "MemoryError: 12 GiB asked for"]
        # Refused (the queue down): said beside it, and it stays to be pressed again.
        page.route(f"**/api/experiments/{experiment_id}/requeue", lambda route: route.fulfill(
            status=503, json={"detail": "the queue (Redis) is not reachable: gone"}))
        again.click()
        expect(page.locator("#action-error")).to_contain_text(
            "Could not queue them again: the queue (Redis) is not reachable: gone")
        expect(again).to_have_text("Run 4 runs again")
        page.unroute(f"**/api/experiments/{experiment_id}/requeue")

        page.evaluate("""() => {
            window.shownStatuses = [];
            new MutationObserver(() => window.shownStatuses.push(
                [...document.querySelectorAll('#runs tbody .badge')].map((b) => b.textContent)
            )).observe(document.querySelector('#runs tbody'), {subtree: true, childList: true});
        }""")
        again.focus()
        page.keyboard.press("Enter")
        page.wait_for_selector("#live-state:has-text('live')")  # followed again
        # The feed reads on from where it was before the requeue (its answer says where):
        # it told the runs' whole history again, and they went back through "cancelled" and
        # "failed" before they settled. The keyboard is where they can be stopped again.
        page.wait_for_function(f"{badges}.every((s) => s === 'queued')")
        page.wait_for_timeout(1000)  # what a replay would have shown, had there been one
        shown = page.evaluate("window.shownStatuses")
        assert shown and all(statuses == ["queued"] * 4 for statuses in shown), shown
        expect(page.locator("#cancel-all")).to_be_focused()
        expect(again).to_be_hidden()
        assert page.evaluate(reasons) == [None] * 4  # queued afresh: the old reason went
        assert page.inner_text("#action-error") == ""
        assert page.is_hidden("#delete-experiment")
        browser.screenshot("queued-again")
        browser.assert_no_errors(expected=("503",))
    with live_server.client() as client:
        assert [run["status"] for run in client.get(
            f"/api/experiments/{experiment_id}").json()["runs"]] == ["queued"] * 4
