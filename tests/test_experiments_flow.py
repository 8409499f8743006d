"""The whole flow over real HTTP with a real Celery worker: upload, sweep, live events,
results, checkpoint download loaded by plain timm, and cancel."""

from __future__ import annotations

import io
import json
import re
import time
import zipfile

import httpx
import pytest
import redis

from app.experiments import as_shown
from app.live import experiment_stream_key, run_stream_key
from tests.support import make_image_archive, start_worker, wait_for
from tests.test_experiments_cancel_delete import start_sweep
from tests.test_worker_lifecycle import assert_documented

TINY = {
    "backbone": "test_efficientnet",
    "preset": "quick",
    "overrides": {"pretrained": False, "image_size": 32, "batch_size": 8,
                  "unlabeled_batch_size": 8, "iterations": 24, "eval_interval": 12,
                  "log_interval": 4, "checkpoint_interval": 12, "lr": 0.01},
}


def read_sse(client: httpx.Client, path: str, last_event_id: str | None = None,
             timeout: float = 300) -> list[tuple[str | None, dict]]:
    """(id, event) pairs until the server closes the stream."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[tuple[str | None, dict]] = []
    event_id, data = None, []
    with client.stream("GET", path, headers=headers, timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                events.append((event_id, json.loads("\n".join(data))))
                event_id, data = None, []
    return events


def untimed(event: dict) -> dict:
    return {name: value for name, value in event.items() if name != "time"}


@pytest.fixture
def dataset_id(live_server, tmp_path):
    archive = make_image_archive(tmp_path / "shapes.zip")
    with live_server.client() as client, open(archive, "rb") as handle:
        response = client.post("/api/datasets", files={"file": ("shapes.zip", handle)},
                               data={"name": "shapes"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.slow
def test_sweep_streams_events_and_ends_with_a_checkpoint_plain_timm_loads(
    live_server, celery_worker, dataset_id, tmp_path
):
    import timm
    import torch
    from PIL import Image

    with live_server.client() as client:
        created = client.post("/api/experiments", json={
            "dataset_id": dataset_id, "methods": ["self-tuning", "fine-tune"],
            "budgets": [0.5], "seeds": [0], **TINY,
        })
        assert created.status_code == 201, created.text
        experiment = created.json()
        assert [(r["method"], r["budget"], r["seed"], r["status"]) for r in experiment["runs"]] == [
            ("self-tuning", 0.5, 0, "queued"), ("fine-tune", 0.5, 0, "queued")]
        run_id = experiment["runs"][0]["id"]

        events = read_sse(client, f"/api/runs/{run_id}/events")
        kinds = [event["type"] for _, event in events]
        assert kinds[-1] == "end" and events[-1][1]["status"] == "succeeded"
        assert "progress" in kinds and "eval" in kinds
        steps = [event["step"] for _, event in events if event["type"] in ("progress", "eval")]
        assert steps == sorted(steps) and steps[-1] == 24
        # A checkpoint's step, not where the worker keeps it (an absolute path of its disk).
        saved = [event for _, event in events if event["type"] == "checkpoint"]
        assert saved and not any("path" in event for event in saved)
        ids = [event_id for event_id, _ in events if event_id]
        assert len(ids) == len(set(ids)) == len(events)

        # Reconnect after the middle event: exactly the rest comes again.
        middle = len(events) // 2
        replay = read_sse(client, f"/api/runs/{run_id}/events", last_event_id=ids[middle])
        assert [e for _, e in replay] == [e for _, e in events[middle + 1:]]
        # A late client after the end gets the history and the final event.
        late = read_sse(client, f"/api/runs/{run_id}/events")
        assert [e for _, e in late] == [e for _, e in events]
        # Its stream gone from Redis, the feed rebuilt from the database tells the same story
        # in the same, documented words: the scores and the whole end event.
        live = redis.Redis.from_url(live_server.redis_url)
        live.delete(run_stream_key(run_id))
        rebuilt = [e for _, e in read_sse(client, f"/api/runs/{run_id}/events")]
        recorded = [e for _, e in events if e["type"] in ("progress", "eval", "end")]
        assert [untimed(e) for e in rebuilt] == [untimed(e) for e in recorded]
        for event in [e for _, e in events] + rebuilt:
            assert_documented(event)
            assert event["time"] > 0

        wait_for(lambda: client.get(f"/api/experiments/{experiment['id']}").json()["status"]
                 == "finished", timeout=300, message="both runs to finish")
        summary = client.get(f"/api/experiments/{experiment['id']}").json()
        feed = [e for _, e in read_sse(client, f"/api/experiments/{experiment['id']}/events")]
        live.delete(experiment_stream_key(experiment["id"]))
        again = [e for _, e in read_sse(client, f"/api/experiments/{experiment['id']}/events")]
        for event in feed + again:
            assert_documented(event)
        assert [untimed(e) for e in again] == [
            untimed(e) for e in feed if e["type"] in ("end", "experiment_end")]
        assert {row["method"] for row in summary["budget_table"]} == {"self-tuning", "fine-tune"}
        assert all(row["finished"] == 1 and row["std_top1"] is None  # one seed: no spread
                   for row in summary["budget_table"])
        best = max(row["mean_top1"] for row in summary["budget_table"])
        assert all(row["best"] == (as_shown(row["mean_top1"]) == as_shown(best))
                   for row in summary["budget_table"])
        assert {row["labeled_count"] for row in summary["budget_table"]} == {3 * 8}
        assert summary["label_estimates"] == []  # one budget: no curve to extend

        run = client.get(f"/api/runs/{run_id}").json()
        assert run["status"] == "succeeded" and run["step"] == 24 and run["attempts"] == 1
        metrics = run["metrics"]
        for key in ("test_top1", "test_mean_class_acc", "pseudo_label_acc"):
            assert 0.0 <= metrics[key] <= 1.0, key
        assert metrics["labeled_count"] == 3 * 8  # half of each class's 16 labeled images
        assert run["device"] == "cpu" and run["worker"].startswith("test-")
        series = client.get(f"/api/runs/{run_id}/metrics").json()["points"]
        assert [p["step"] for p in series if p["kind"] == "eval"] == [12, 24]

        archive = client.get(f"/api/runs/{run_id}/checkpoint")
        assert archive.status_code == 200
        # Download managers ask HEAD first, and come back with the version they hold.
        for download in ("checkpoint", "files/model.safetensors", "predictions.csv",
                         "label-next.csv"):
            head = client.head(f"/api/runs/{run_id}/{download}")
            full = client.get(f"/api/runs/{run_id}/{download}")
            assert head.status_code == 200, download
            assert head.headers["content-length"] == str(len(full.content)), download
        head = client.head(f"/api/runs/{run_id}/checkpoint")
        assert head.headers["content-length"] == str(len(archive.content))
        assert head.headers["etag"] == archive.headers["etag"]
        unchanged = client.get(f"/api/runs/{run_id}/checkpoint",
                               headers={"If-None-Match": archive.headers["etag"]})
        assert unchanged.status_code == 304 and unchanged.content == b""
        stale = client.get(f"/api/runs/{run_id}/checkpoint", headers={"If-None-Match": '"x"'})
        assert stale.status_code == 200 and stale.content == archive.content
        with zipfile.ZipFile(io.BytesIO(archive.content)) as bundle:
            assert sorted(bundle.namelist()) == ["config.json", "model.safetensors",
                                                 "training.json"]
            bundle.extractall(tmp_path / "checkpoint")
        single = client.get(f"/api/runs/{run_id}/files/config.json").json()
        predictions = client.get(f"/api/runs/{run_id}/predictions.csv").text.splitlines()
        label_next = client.get(f"/api/runs/{run_id}/label-next.csv").text.splitlines()
        with_withheld = client.get(f"/api/runs/{run_id}/label-next.csv",
                                   params={"include_withheld": "true", "limit": 30})
        no_rows = client.get(f"/api/runs/{run_id}/label-next.csv", params={"limit": 0})
        negative = client.get(f"/api/runs/{run_id}/label-next.csv", params={"limit": -5})

    assert single["architecture"] == "test_efficientnet" and single["num_classes"] == 3
    assert predictions[0] == "image_id,path,label,confidence,margin,hidden_label"
    assert len(predictions) == 1 + 12 + 3 * 8  # unlabeled + hidden-label half of each class
    assert label_next[0].startswith("rank,image_id,path")
    assert len(label_next) == 1 + 12  # only images that have no label at all
    assert len(with_withheld.text.splitlines()) == 1 + 30
    assert no_rows.text.splitlines() == label_next[:1]  # the same columns without rows
    assert negative.status_code == 422 and "limit" in negative.text
    margins = [float(row.split(",")[5]) for row in label_next[1:]]
    assert margins == sorted(margins)

    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    model = timm.create_model(
        config["architecture"], pretrained=True, num_classes=config["num_classes"],
        pretrained_cfg_overlay=dict(
            file=str(tmp_path / "checkpoint" / "model.safetensors"), **config["pretrained_cfg"]
        ),
    ).eval()
    data_config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_config)
    correct = total = 0
    with zipfile.ZipFile(tmp_path / "shapes.zip") as source:
        for name in source.namelist():
            if not name.startswith("test/"):
                continue
            label = config["label_names"].index(name.split("/")[1])
            image = Image.open(io.BytesIO(source.read(name))).convert("RGB")
            with torch.no_grad():
                predicted = model(transform(image).unsqueeze(0)).argmax(1).item()
            correct += predicted == label
            total += 1
    assert total == 18
    assert correct / total == pytest.approx(metrics["test_top1"], abs=1e-9)

    # An experiment can start from this run's model. It is stored as named, relative to the
    # data directory (it was the server's absolute path), and the worker finds the file.
    backbone = f"test_efficientnet:runs/{run_id}/model.safetensors"
    with live_server.client() as client:
        created = client.post("/api/experiments", json={
            "dataset_id": dataset_id, "methods": ["fine-tune"], "budgets": [0.5], "seeds": [0],
            **{**TINY, "backbone": backbone}})
        assert created.status_code == 201, created.text
        assert created.json()["backbone"] == backbone
        follow_up = created.json()["runs"][0]["id"]
        run = wait_for(lambda: (r := client.get(f"/api/runs/{follow_up}").json())["status"]
                       in ("succeeded", "failed") and r, timeout=300,
                       message="the run from the model to end")
    assert run["status"] == "succeeded", run["error"]
    assert run["config"]["backbone"] == backbone


def test_cancelling_a_running_run_ends_it_as_cancelled(live_server, celery_worker, dataset_id):
    long = json.loads(json.dumps(TINY))
    long["overrides"].update(iterations=5000, eval_interval=1000)
    with live_server.client() as client:
        experiment = client.post("/api/experiments", json={
            "dataset_id": dataset_id, "methods": ["self-tuning"], "budgets": ["all"],
            "seeds": [0], **long,
        }).json()
        run_id = experiment["runs"][0]["id"]
        wait_for(lambda: client.get(f"/api/runs/{run_id}").json()["step"] > 0, timeout=180,
                 message="the run to make progress")
        cancelled_at = time.monotonic()
        response = client.post(f"/api/runs/{run_id}/cancel")
        assert response.status_code == 200 and response.json()["cancel_requested"]
        run = wait_for(lambda: (r := client.get(f"/api/runs/{run_id}").json())["status"]
                       == "cancelled" and r, timeout=60, message="cancelled status")
        assert time.monotonic() - cancelled_at < 30
        assert run["step"] < 5000 and run["finished_at"]
        events = read_sse(client, f"/api/runs/{run_id}/events")
        assert events[-1][1] == {**events[-1][1], "type": "end", "status": "cancelled"}
        # The record says where "Run again" resumes: the state saved on the cancel, which
        # may be past the last progress point (pages showed two different steps).
        saved = [event["step"] for _, event in events if event["type"] == "checkpoint"]
        assert run["step"] == saved[-1] > 0 and run["resumable"] is True
        again = client.post(f"/api/runs/{run_id}/cancel")
        assert again.status_code == 409


def test_cancelling_a_queued_run_ends_it_at_once(live_server, dataset_id):
    """No worker is running here, so the run stays queued until cancelled."""
    with live_server.client() as client:
        experiment = client.post("/api/experiments", json={
            "dataset_id": dataset_id, "methods": ["fine-tune"], "budgets": [0.5], **TINY,
        }).json()
        run_id = experiment["runs"][0]["id"]
        assert client.get(f"/api/runs/{run_id}").json()["queue_position"] == 1
        assert client.post(f"/api/runs/{run_id}/cancel").json()["status"] == "cancelled"
        events = read_sse(client, f"/api/runs/{run_id}/events", timeout=30)
        assert events[-1][1]["type"] == "end" and events[-1][1]["status"] == "cancelled"


@pytest.mark.slow
def test_messages_of_cancelled_runs_are_dropped_without_a_process_each(
    live_server, dataset_id, tmp_path
):
    """A cancelled sweep's messages each took a fresh pool process (1-3 s) to be found dead:
    450 cancelled runs kept the next one waiting 14 minutes while its page said "next". The
    worker's own process now drops them; the run queued after them trains at once."""
    with live_server.client() as client:
        cancelled_id, cancelled = start_sweep(client, dataset_id, seeds=[0, 1, 2])
        assert client.post(f"/api/experiments/{cancelled_id}/cancel").status_code == 200
        _, (waiting,) = start_sweep(client, dataset_id, methods=["fine-tune"], seeds=[0],
                                    overrides={"pretrained": False, "image_size": 32,
                                               "batch_size": 8, "iterations": 4})
        assert client.get(f"/api/runs/{waiting}").json()["queue_position"] == 1
        worker = start_worker(live_server.env, tmp_path / "worker.log")
        try:
            wait_for(lambda: client.get(f"/api/runs/{waiting}").json()["status"] == "succeeded",
                     timeout=180, message="the run queued after the cancelled ones to succeed")
        finally:
            worker.stop()
    dropped = re.findall(r"INFO/(\w+)\] run (\d+): task \w+ not run \(cancelled\)", worker.log())
    assert sorted(int(run_id) for _, run_id in dropped) == sorted(cancelled)
    assert {process for process, _ in dropped} == {"MainProcess"}
