"""Downloads asked for at the same moment: several people (or a download manager's parallel
connections) fetching a run's checkpoint zip before it was ever built. Real uvicorn, Redis
and SQLite; the run's files are written as the worker writes them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from app.db import session_scope
from app.models import Artifact, RunMetric
from tests.support import add_dataset_row, wait_for
from tests.test_experiments_cancel_delete import end_as_worker, start_sweep

MODEL_BYTES = 48 * 1024 * 1024  # big enough that zipping it takes a while


def record_export(data_dir, database_url: str, run_id: int,
                  files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The exported files of a finished run (a large random model unless `files` are
    given), on disk and recorded as artifacts."""
    files = files or {
        "model.safetensors": os.urandom(MODEL_BYTES),
        "config.json": json.dumps({"architecture": "test_efficientnet"}).encode(),
        "training.json": json.dumps({"metrics": {"test_top1": 0.5}}).encode(),
    }
    folder = data_dir / "runs" / str(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    with session_scope(database_url) as session:
        for name, data in files.items():
            (folder / name).write_bytes(data)
            session.add(Artifact(run_id=run_id, name=name, path=f"runs/{run_id}/{name}",
                                 size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return files


def test_checkpoint_zips_asked_for_together_are_all_whole(live_server):
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        files = record_export(live_server.data_dir, database_url, run_ids[0])
        end_as_worker(database_url, live, run_ids[0], "succeeded")

        def fetch(_: int):
            return client.get(f"/api/runs/{run_ids[0]}/checkpoint")

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(fetch, range(8)))
        responses.append(fetch(8))  # the bundle kept on disk

    for response in responses:
        assert response.status_code == 200, response.text[:200]
    # One version, one tag: requests that zipped at once each served their own file's tag,
    # so a client holding one of them got the whole zip again instead of a 304.
    assert len({response.headers["etag"] for response in responses}) == 1
    for response in responses:
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            assert archive.testzip() is None
            assert {name: archive.read(name) for name in archive.namelist()} == files
    folder = live_server.data_dir / "runs" / str(run_ids[0])
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [*files, f"run-{run_ids[0]}-checkpoint.zip"])  # no temporary zips left behind


def test_ranges_of_bytes_are_honoured_and_others_ignored(live_server):
    """`Range: items=0-5` was a 400; RFC 9110 says to ignore a unit one does not know."""
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        files = record_export(live_server.data_dir, database_url, run_ids[0])
        end_as_worker(database_url, live, run_ids[0], "succeeded")
        url = f"/api/runs/{run_ids[0]}/files/config.json"
        part = client.get(url, headers={"Range": "bytes=2-9"})
        assert part.status_code == 206 and part.content == files["config.json"][2:10]
        # Named for its run, as the zip and the ONNX model are: two runs' config.json were
        # one name in a downloads folder.
        assert part.headers["content-disposition"] == (
            f'attachment; filename="run-{run_ids[0]}-config.json"')
        # Another unit, or bytes written wrong (Starlette's bare text/plain 400 before):
        # RFC 9110 (14.2) lets a server ignore a Range it cannot use.
        for header in ("items=0-5", "Pages=1-2", "bytes=9-0", "bytes=abc", "bytes=", "bytes=-"):
            whole = client.get(url, headers={"Range": header})
            assert whole.status_code == 200, (header, whole.text[:200])
            assert whole.content == files["config.json"]
        beyond = client.get(url, headers={"Range": f"bytes={10**6}-"})
        assert beyond.status_code == 416


def test_pages_json_and_assets_come_compressed_and_downloads_as_they_are(live_server):
    """Nothing was compressed: a run's metrics (a few hundred kB of JSON for a long run) and
    every page crossed the network whole."""
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    run_id = run_ids[0]
    files = {"model.safetensors": bytes(200_000),  # compressible, yet sent as it is
             "config.json": json.dumps({"label_names": ["cat"] * 2000}).encode(),
             "training.json": json.dumps({"metrics": {"test_top1": 0.5}}).encode(),
             "predictions.csv": b"image_id,path,label,confidence,margin,hidden_label\n"
             + b"1,unlabeled/a.png,cat,0.9,0.5,\n" * 3000,
             "test_predictions.json": json.dumps([{
                 "image_id": 2, "path": "test/cat/b.png", "label": "cat", "predicted": "cat",
             }] * 500).encode()}
    record_export(live_server.data_dir, database_url, run_id, files)
    with session_scope(database_url) as session:
        for step in range(1, 301):
            session.add(RunMetric(run_id=run_id, kind="progress", step=step,
                                  values={"loss_ce": 1 / step, "lr": 0.01, "images_per_s": 40.0}))
    end_as_worker(database_url, live, run_id, "succeeded")

    gzip_ok = {"Accept-Encoding": "gzip"}
    with live_server.client() as client:
        for path in (f"/runs/{run_id}", f"/experiments/{experiment_id}",
                     f"/api/runs/{run_id}/metrics", f"/api/experiments/{experiment_id}",
                     "/static/vendor/chart.umd.min.js", "/static/app.css"):
            packed = client.get(path, headers=gzip_ok)
            plain = client.get(path, headers={"Accept-Encoding": "identity"})
            assert packed.status_code == plain.status_code == 200, path
            assert packed.headers.get("content-encoding") == "gzip", path
            assert packed.num_bytes_downloaded < len(plain.content) / 2, path
            assert "content-encoding" not in plain.headers, path
            if path.startswith("/api/") or path.startswith("/static/"):
                assert packed.content == plain.content, path  # httpx unpacked it
        assert len(client.get(f"/api/runs/{run_id}/metrics").json()["points"]) >= 300

        for name, data in files.items():
            sent = client.get(f"/api/runs/{run_id}/files/{name}", headers=gzip_ok)
            assert sent.status_code == 200 and "content-encoding" not in sent.headers, name
            assert int(sent.headers["content-length"]) == len(data) and sent.content == data
        for path in (f"/api/runs/{run_id}/checkpoint", f"/api/runs/{run_id}/predictions.csv",
                     f"/api/runs/{run_id}/label-next.csv"):
            sent = client.get(path, headers=gzip_ok)
            assert sent.status_code == 200 and "content-encoding" not in sent.headers, path
        with client.stream("GET", f"/api/runs/{run_id}/events", headers=gzip_ok) as feed:
            assert feed.headers["content-type"].startswith("text/event-stream")
            assert "content-encoding" not in feed.headers
            assert any(line.startswith("data: {") for line in feed.iter_lines())


def test_csv_lists_are_tagged_by_content_and_a_held_version_is_a_304(live_server):
    """runs.csv, summary.csv and label-next.csv had no ETag: a client polling them (a
    notebook, a sheet's import, a monitor) downloaded the whole table every time."""
    from tests.test_pages_label_next import record_predictions

    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        lists = [f"/api/experiments/{experiment_id}/runs.csv",
                 f"/api/experiments/{experiment_id}/summary.csv"]
        before = {url: client.get(url) for url in lists}
        for url, response in before.items():
            tag = response.headers["etag"]
            assert response.status_code == 200 and response.headers["cache-control"] == "no-cache"
            for held in (tag, f"W/{tag}", f'"other", {tag}', "*"):
                again = client.get(url, headers={"If-None-Match": held})
                assert again.status_code == 304 and again.content == b"", (url, held)
                assert again.headers["etag"] == tag
            assert client.get(url, headers={"If-None-Match": '"other"'}).text == response.text
            assert client.head(url, headers={"If-None-Match": tag}).status_code == 304

        record_predictions(live_server.data_dir, database_url, run_ids[0], ["cat", "dog"])
        end_as_worker(database_url, live, run_ids[0], "succeeded")
        for url, response in before.items():  # a run ended: the tables changed, so do tags
            after = client.get(url, headers={"If-None-Match": response.headers["etag"]})
            assert after.status_code == 200 and after.text != response.text
            assert after.headers["etag"] != response.headers["etag"]

        label_next = f"/api/runs/{run_ids[0]}/label-next.csv"
        ranked = client.get(label_next, params={"include_withheld": "true"})
        assert len(ranked.text.splitlines()) == 3
        tag = ranked.headers["etag"]
        assert client.get(label_next, params={"include_withheld": "true"},
                          headers={"If-None-Match": tag}).status_code == 304
        # Another list (the withheld images left out) is another version.
        assert client.get(label_next, headers={"If-None-Match": tag}).status_code == 200


def test_a_checkpoint_of_a_run_folder_the_server_cannot_write_still_downloads(live_server):
    """The zip is made in the run's folder: where that folder is read-only (a read-only
    mount, its permissions) the download was a bare 500. It is made in the temp folder for
    that request instead, with one tag for one version, and deleted once sent."""
    import shutil
    import subprocess
    import tempfile

    from tests.support import small_disk

    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        files = record_export(live_server.data_dir, database_url, run_ids[0], files={
            "model.safetensors": os.urandom(256 * 1024),
            "config.json": b'{"architecture": "test_efficientnet"}',
            "training.json": b'{"metrics": {"test_top1": 0.5}}'})
        end_as_worker(database_url, live, run_ids[0], "succeeded")
        folder = live_server.data_dir / "runs" / str(run_ids[0])
        shutil.rmtree(folder)
        temps_before = set(Path(tempfile.gettempdir()).glob("selftune-checkpoint-*"))
        with small_disk(folder, "4m"):
            for name, data in files.items():
                (folder / name).write_bytes(data)
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            url = f"/api/runs/{run_ids[0]}/checkpoint"
            first, second = client.get(url), client.get(url)
            assert first.status_code == 200, first.text[:300]
            with zipfile.ZipFile(io.BytesIO(first.content)) as archive:
                assert {name: archive.read(name) for name in archive.namelist()} == files
            assert first.headers["etag"] == second.headers["etag"]
            assert first.headers["content-disposition"].endswith(
                f'filename="run-{run_ids[0]}-checkpoint.zip"')
            part = client.get(url, headers={"Range": "bytes=100-199"})
            assert part.status_code == 206 and part.content == first.content[100:200]
            held = client.get(url, headers={"If-None-Match": first.headers["etag"]})
            assert held.status_code == 304
            assert sorted(path.name for path in folder.iterdir()) == sorted(files)
        # Each request's zip went once it was sent (a task after the answer's last byte).
        wait_for(lambda: set(Path(tempfile.gettempdir()).glob("selftune-checkpoint-*"))
                 == temps_before, timeout=10, message="the temporary zips to be deleted")
