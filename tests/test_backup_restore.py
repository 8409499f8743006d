"""Backing up and moving an installation: a SQLite data directory copied (`cp -a`) to another
path while the app is stopped, or backed up by `python -m app.backup` while it runs, serves the
same datasets, thumbnails, experiments, runs and downloads there, and a run's model is still a
backbone. Real uvicorn, Redis and SQLite; the run's files are written as the worker writes them
(no training)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from app.backup import BackupRefused, backup, copy_files, copy_sqlite, missing_from
from app.db import (
    DATABASE_ID_FILE,
    claim_data_dir,
    get_engine,
    session_scope,
    upgrade_to_head,
)
from app.models import Artifact, Dataset, Experiment, Run, utcnow
from tests.support import PROJECT_ROOT, LiveServer, add_dataset_row, app_env, start_server
from tests.test_datasets_support import class_entries, upload, zip_bytes
from tests.test_experiments_cancel_delete import SWEEP, add_run_files, end_as_worker, start_sweep
from worker.selftuning.config import backbone_in


def serve(data_dir: Path, redis_url: str, log: Path) -> LiveServer:
    url = f"sqlite:///{data_dir / 'selftune.db'}"
    upgrade_to_head(url)  # what `make run` does first (a no-op on a migrated database)
    env = app_env(data_dir, url, redis_url)
    server_url, process = start_server(env, log)
    return LiveServer(server_url, data_dir, url, redis_url, process, env)


def build_installation(server: LiveServer) -> dict[str, int]:
    """An uploaded dataset, an experiment and a finished run with its exported files."""
    live = redis.Redis.from_url(server.redis_url, decode_responses=True)
    with server.client() as client:
        uploaded = upload(client, zip_bytes(class_entries(("cat", "dog"), per_class=6)))
        assert uploaded.status_code == 201, uploaded.text
        dataset_id = uploaded.json()["id"]
        experiment_id, run_ids = start_sweep(client, dataset_id, seeds=[0])
    run_id = run_ids[0]
    folder = add_run_files(server.data_dir, server.database_url, run_id)
    with session_scope(server.database_url) as session:
        for name, data in {"config.json": b'{"architecture": "test_efficientnet"}',
                           "training.json": b'{"metrics": {"test_top1": 0.5}}'}.items():
            (folder / name).write_bytes(data)
            session.add(Artifact(run_id=run_id, name=name, path=f"runs/{run_id}/{name}",
                                 size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    end_as_worker(server.database_url, live, run_id, "succeeded")
    return {"dataset": dataset_id, "experiment": experiment_id, "run": run_id}


def answers(client: httpx.Client, ids: dict[str, int]) -> dict[str, object]:
    """What the API, the pages and the downloads say about the installation."""
    dataset, experiment, run = ids["dataset"], ids["experiment"], ids["run"]
    images = client.get(f"/api/datasets/{dataset}/images", params={"limit": 1000}).json()
    found: dict[str, object] = {
        "datasets": client.get("/api/datasets").json(),
        "dataset": client.get(f"/api/datasets/{dataset}").json(),
        "images": images,
        "thumbnails": [
            client.get(f"/api/datasets/{dataset}/images/{image['id']}/thumbnail").content
            for image in images["items"]
        ],
        "experiment": client.get(f"/api/experiments/{experiment}").json(),
        "run": client.get(f"/api/runs/{run}").json(),
        "model": client.get(f"/api/runs/{run}/files/model.safetensors").content,
        "training.json": client.get(f"/api/runs/{run}/files/training.json").content,
        "checkpoint": client.get(f"/api/runs/{run}/checkpoint").status_code,
    }
    for page in ("/datasets", f"/datasets/{dataset}", f"/experiments/{experiment}",
                 f"/runs/{run}"):
        found[page] = client.get(page).status_code
    return found


def start_from_model(client: httpx.Client, ids: dict[str, int]) -> httpx.Response:
    """A new experiment whose backbone is the run's model, named relative to the data dir."""
    return client.post("/api/experiments", json={
        **SWEEP, "dataset_id": ids["dataset"], "seeds": [0], "methods": ["fine-tune"],
        "backbone": f"runs/{ids['run']}/model.safetensors"})


def served_from(data_dir: Path, settings, tmp_path: Path,
                ids: dict[str, int]) -> tuple[dict[str, object], httpx.Response]:
    """What a server started on the copy `data_dir` answers, and its answer to an experiment
    started from the run's model there."""
    new = serve(data_dir, settings.effective_redis_url, tmp_path / "new.log")
    try:
        with new.client() as client:
            return answers(client, ids), start_from_model(client, ids)
    finally:
        new.process.stop()
        get_engine(new.database_url).dispose()


def move(data_dir: Path, to: Path) -> Path:
    """`cp -a` the stopped installation's data directory to `to`, then delete the original."""
    get_engine(f"sqlite:///{data_dir / 'selftune.db'}").dispose()
    to.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(data_dir), str(to)], check=True)
    shutil.rmtree(data_dir)
    return to


def test_a_data_directory_copied_elsewhere_while_stopped_serves_the_same(settings, tmp_path):
    old = serve(settings.data_dir, settings.effective_redis_url, tmp_path / "old.log")
    try:
        ids = build_installation(old)
        with old.client() as client:
            before = answers(client, ids)
    finally:
        old.process.stop()
    assert len(before["thumbnails"]) == 12 and all(before["thumbnails"])
    assert before["model"] and before["checkpoint"] == 200

    moved = move(settings.data_dir, tmp_path / "elsewhere" / "data")

    after, started = served_from(moved, settings, tmp_path, ids)
    assert after == before
    assert started.status_code == 201, started.text
    assert started.json()["backbone"] == f"runs/{ids['run']}/model.safetensors"
    assert not settings.data_dir.exists()  # nothing was written at the old place


def test_a_run_stored_with_an_absolute_backbone_runs_again_after_a_move(settings, tmp_path):
    """Experiments started from a run's model before backbones were stored relative to the
    data directory hold its absolute path, which is gone once the directory moved."""
    old = serve(settings.data_dir, settings.effective_redis_url, tmp_path / "old.log")
    live = redis.Redis.from_url(old.redis_url, decode_responses=True)
    one_run = {"seeds": [0], "methods": ["fine-tune"]}
    try:
        with old.client() as client:
            dataset_id = add_dataset_row(old.database_url)
            source_experiment, (source,) = start_sweep(client, dataset_id, **one_run)
            add_run_files(old.data_dir, old.database_url, source)
            end_as_worker(old.database_url, live, source, "succeeded")
            experiment_id, (follower,) = start_sweep(
                client, dataset_id, **one_run,
                backbone=f"test_efficientnet:runs/{source}/model.safetensors")
    finally:
        old.process.stop()
    absolute = str(settings.data_dir / "runs" / str(source) / "model.safetensors")
    with session_scope(old.database_url) as session:  # as such an experiment was stored
        stored = f"test_efficientnet:{absolute}"
        session.get(Experiment, experiment_id).backbone = stored
        run = session.get(Run, follower)
        run.config = {**run.config, "backbone": stored}
        run.status, run.finished_at = "failed", utcnow()

    moved = move(settings.data_dir, tmp_path / "elsewhere" / "data")
    new = serve(moved, settings.effective_redis_url, tmp_path / "new.log")
    try:
        with new.client() as client:
            requeued = client.post(f"/api/runs/{follower}/requeue")
            deleted = client.delete(f"/api/experiments/{source_experiment}")
    finally:
        new.process.stop()
    get_engine(new.database_url).dispose()
    assert requeued.status_code == 200, requeued.text
    # The queued run starts from the source run's model: deleting it waits for the run.
    assert deleted.status_code == 409, deleted.text
    assert f"run(s) {follower}" in deleted.json()["detail"]
    # The worker opens the model where it is now.
    assert backbone_in(absolute, moved) == str(moved / "runs" / str(source) / "model.safetensors")
    assert backbone_in(f"test_efficientnet:{absolute}", moved) == (
        f"test_efficientnet:{moved / 'runs' / str(source) / 'model.safetensors'}")


def run_backup(env: dict[str, str], destination: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.backup", str(destination)], env=env,
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


def test_a_backup_taken_while_the_app_runs_serves_the_same(settings, tmp_path):
    old = serve(settings.data_dir, settings.effective_redis_url, tmp_path / "old.log")
    try:
        ids = build_installation(old)
        with old.client() as client:
            client.get(f"/api/runs/{ids['run']}/checkpoint")  # a zip and thumbnails in cache/
            destination = tmp_path / "backups" / "monday"
            done = run_backup(old.env, destination)
            before = answers(client, ids)
    finally:
        old.process.stop()
    assert done.returncode == 0, done.stderr
    assert f"backed up 1 dataset(s) and 2 run(s) to {destination}" in done.stdout
    # The database, the dataset and run folders, the database's id; no cache, Redis or temp.
    assert sorted(path.name for path in destination.iterdir()) == [
        "database-id", "datasets", "runs", "selftune.db"]

    after, started = served_from(destination, settings, tmp_path, ids)
    assert after == before
    assert started.status_code == 201, started.text


def test_a_backup_names_what_its_database_lists_and_the_copy_lacks(settings, tmp_path):
    """A dataset or run deleted while its files were copied is named: back up again."""
    dataset_id = add_dataset_row(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = session.get(Dataset, dataset_id).storage_key
    (settings.data_dir / "datasets" / key).mkdir(parents=True)
    claim_data_dir(settings.data_dir, settings.sqlalchemy_url)
    destination = tmp_path / "copy"
    assert backup(settings, destination).missing == []

    shutil.rmtree(destination / "datasets" / key)  # as a delete during the copy leaves it
    assert missing_from(destination) == (1, 0, [f"datasets/{key}"])


def test_a_backup_refuses_a_database_whose_data_directory_is_another_databases(
        settings, tmp_path):
    """Run with another SQLite database than the data directory's (SELFTUNE_DATABASE_URL
    forgotten or mistyped), it copied the two together: a backup the app refuses to start
    on, found out when it is needed."""
    claim_data_dir(settings.data_dir, settings.sqlalchemy_url)
    other = tmp_path / "other.db"
    upgrade_to_head(f"sqlite:///{other}")
    wrong = settings.model_copy(update={"database_url": f"sqlite:///{other}"})
    with pytest.raises(BackupRefused, match=(
            f"the data directory {settings.data_dir} holds the files of another database .* "
            "a copy of the two would not start: back up with the SELFTUNE_DATABASE_URL the "
            "app runs with. Nothing was copied.")):
        backup(wrong, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    get_engine(f"sqlite:///{other}").dispose()
    assert backup(settings, tmp_path / "copy").missing == []  # its own database's


def test_a_backup_keeps_the_files_datasets_share_as_one(tmp_path):
    """A dataset made by adding labels shares its images' files with its source (hard
    links): the copy shares them too, instead of holding them twice."""
    data_dir, destination = tmp_path / "data", tmp_path / "copy"
    (data_dir / "datasets" / "source").mkdir(parents=True)
    (data_dir / "datasets" / "labeled" / "train").mkdir(parents=True)
    (data_dir / "datasets" / "source" / "0.png").write_bytes(b"shared image")
    (data_dir / "datasets" / "source" / "1.png").write_bytes(b"its own image")
    os.link(data_dir / "datasets" / "source" / "0.png",
            data_dir / "datasets" / "labeled" / "train" / "0.png")
    (data_dir / DATABASE_ID_FILE).write_text("0" * 32)
    copy_files(data_dir, destination)
    shared = [destination / "datasets" / "source" / "0.png",
              destination / "datasets" / "labeled" / "train" / "0.png"]
    assert [path.read_bytes() for path in shared] == [b"shared image"] * 2
    assert shared[0].samefile(shared[1]) and shared[0].stat().st_nlink == 2
    assert (destination / "datasets" / "source" / "1.png").stat().st_nlink == 1


def test_a_backup_refuses_a_folder_in_use_or_inside_the_data_directory(settings, tmp_path):
    claim_data_dir(settings.data_dir, settings.sqlalchemy_url)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "selftune.db").write_bytes(b"an earlier backup")
    with pytest.raises(BackupRefused, match="not an empty folder"):
        backup(settings, earlier)
    with pytest.raises(BackupRefused, match="inside the data directory"):
        backup(settings, settings.data_dir / "backups")
    assert (earlier / "selftune.db").read_bytes() == b"an earlier backup"
    assert not (settings.data_dir / "backups").exists()


def test_on_postgresql_a_backup_asks_for_the_dump_first_then_copies_the_files_beside_it(
    tmp_path,
):
    data_dir = tmp_path / "data"
    (data_dir / "runs" / "3").mkdir(parents=True)
    (data_dir / "runs" / "3" / "model.safetensors").write_bytes(b"weights")
    (data_dir / "cache").mkdir()
    (data_dir / DATABASE_ID_FILE).write_text("0" * 32)
    env = app_env(data_dir, "postgresql+psycopg://selftune:secret@db.example:5432/selftune",
                  "redis://127.0.0.1:1")  # neither is reached: the files are all it copies
    copy = tmp_path / "copy"
    asked = run_backup(env, copy)
    assert asked.returncode == 2, asked.stdout
    assert (f"pg_dump -Fc -d postgresql://selftune:***@db.example:5432/selftune > "
            f"{copy / 'selftune.dump'}") in asked.stderr
    assert "secret" not in asked.stderr + asked.stdout
    assert not copy.exists()  # nothing copied before the dump

    copy.mkdir()
    (copy / "selftune.dump").write_bytes(b"a dump")  # as pg_dump leaves it
    done = run_backup(env, copy)
    assert done.returncode == 0, done.stderr
    assert "selftune.dump" in done.stdout
    assert (copy / "runs" / "3" / "model.safetensors").read_bytes() == b"weights"
    assert sorted(path.name for path in copy.iterdir()) == [
        "database-id", "runs", "selftune.dump"]


def test_a_file_the_backup_cannot_copy_stops_it_naming_the_file(settings, tmp_path):
    """A file still there that cannot be copied (a full disk, say) is not taken for one
    deleted during the copy: the backup stops and says the copy is not whole. Here the file
    is a named pipe, which copying refuses (a disk cannot be filled in a test)."""
    add_dataset_row(settings.sqlalchemy_url)  # a database to copy
    claim_data_dir(settings.data_dir, settings.sqlalchemy_url)
    folder = settings.data_dir / "runs" / "4"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    os.mkfifo(folder / "predictions.csv")
    with pytest.raises(BackupRefused, match=r"1 file\(s\) could not be copied, the first "
                                            r".*runs/4/predictions.csv.*is not whole"):
        backup(settings, tmp_path / "copy")


def test_a_database_or_folder_the_backup_cannot_write_stops_it_in_one_line(settings, tmp_path):
    """The database's copy on a full disk, or a DEST that cannot be made, was a traceback and
    exit 1: the code that says a file was deleted during the copy. (A disk cannot be filled
    in a test: a folder where the copy's file would go refuses it alike.)"""
    add_dataset_row(settings.sqlalchemy_url)  # a database to copy
    claim_data_dir(settings.data_dir, settings.sqlalchemy_url)
    source = Path(settings.sqlalchemy_url.removeprefix("sqlite:///"))
    with pytest.raises(BackupRefused, match=f"the database {source} could not be copied to "
                                            f"{tmp_path}: .*; the copy is not whole"):
        copy_sqlite(source, tmp_path)
    (tmp_path / "a file").write_bytes(b"")
    with pytest.raises(BackupRefused, match="cannot make the folder .*a file/copy: "):
        backup(settings, tmp_path / "a file" / "copy")
