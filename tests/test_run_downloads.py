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

import redis

from app.db import session_scope
from app.models import Artifact
from tests.support import add_dataset_row
from tests.test_experiments_cancel_delete import end_as_worker, start_sweep

MODEL_BYTES = 48 * 1024 * 1024  # big enough that zipping it takes a while


def record_export(data_dir, database_url: str, run_id: int) -> dict[str, bytes]:
    """The exported files of a finished run, on disk and recorded as artifacts."""
    files = {
        "model.safetensors": os.urandom(MODEL_BYTES),
        "config.json": json.dumps({"architecture": "test_efficientnet"}).encode(),
        "training.json": json.dumps({"metrics": {"test_top1": 0.5}}).encode(),
    }
    folder = data_dir / "runs" / str(run_id)
    folder.mkdir(parents=True)
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


def test_ranges_of_bytes_are_honoured_and_of_other_units_ignored(live_server):
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
        for header in ("items=0-5", "Pages=1-2"):
            whole = client.get(url, headers={"Range": header})
            assert whole.status_code == 200, (header, whole.text[:200])
            assert whole.content == files["config.json"]
        beyond = client.get(url, headers={"Range": f"bytes={10**6}-"})
        assert beyond.status_code == 416
