"""Disk hygiene: a dataset's decoded-image caches go with it, deleted folders are removed
after the answer, and caches of deleted datasets and folders of deleted runs are swept at
start-up (the engine's own durable files: tests/engine/test_durable_files.py)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, insert, select

from app import ingest, trash
from app.config import Settings
from app.db import get_sessionmaker, session_scope
from app.experiments import delete_experiment_with_runs
from app.models import Dataset, Experiment, Run, RunMetric
from tests.engine.test_durable_files import HOUR_AGO, MEAN_STD, touch
from tests.support import LiveServer, add_dataset_row, app_env
from tests.test_datasets_support import (
    class_entries,
    dataset_server,
    stored_files,
    upload,
    zip_bytes,
)
from tests.test_worker_lifecycle import add_run
from worker.selftuning.images import Preprocessing, decode_all


def image_cache(data_dir: Path, dataset: dict) -> Path:
    """Where worker/training.py keeps a dataset's decoded images."""
    return data_dir / "cache" / f"dataset-{dataset['id']}-{dataset['fingerprint'][:12]}"


def age(path: Path, mtime: float) -> Path:
    for target in [*path.rglob("*"), path]:
        os.utime(target, (mtime, mtime))
    return path


# --- the decoded-image cache of a dataset --------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_url: str) -> Iterator[LiveServer]:
    with dataset_server(tmp_path_factory.mktemp("storage"), redis_url) as live:
        yield live


def test_deleting_a_dataset_removes_its_decoded_image_caches_of_every_size(
    server: LiveServer
) -> None:
    with server.client() as client:
        created = [upload(client, zip_bytes(class_entries(("cat", "dog"), seed=seed)),
                          name=f"d{seed}") for seed in (1, 2)]
        assert all(response.status_code == 201 for response in created)
        doomed, kept = (response.json() for response in created)
        for dataset in (doomed, kept):
            paths = [str(path) for path in stored_files(server, dataset["id"])]
            for size in (32, 64):  # two image sizes, as two experiments would make
                preprocessing = Preprocessing(image_size=size, **MEAN_STD)
                for kind in ("train", "eval"):
                    decode_all(paths, kind, preprocessing, image_cache(server.data_dir, dataset))
        assert len(list(image_cache(server.data_dir, doomed).glob("*.npy"))) == 4
        # Another id that starts with the same digits is not this dataset's.
        neighbour = server.data_dir / "cache" / f"dataset-{doomed['id']}0-0123456789ab"
        touch(neighbour / "train-40-x.npy")

        assert client.delete(f"/api/datasets/{doomed['id']}").status_code == 204

    assert not image_cache(server.data_dir, doomed).exists()
    assert len(list(image_cache(server.data_dir, kept).glob("*.npy"))) == 4
    assert neighbour.is_dir()


def test_a_dataset_delete_moves_its_images_aside_to_be_removed_after_the_answer(
    settings: Settings, tmp_path: Path
) -> None:
    """Removing 100,000 image files inside the request took 4-20 s (once 132 s), longer than
    clients and proxies wait. The delete moves the folders aside (a rename) and the answer
    goes before they are removed."""
    from tests.support import make_image_archive

    archive = make_image_archive(tmp_path / "shapes.zip")
    with session_scope(settings.sqlalchemy_url) as session:
        dataset = ingest.ingest_archive(session, settings, archive,
                                        ingest.new_work_dir(settings), "shapes")
        folder = ingest.dataset_dir(settings, dataset)
        images = sorted(path.name for path in folder.rglob("*") if path.is_file())
        _, _, aside = ingest.delete_dataset(session, settings, dataset)
    assert not folder.exists()
    assert sorted(path.name for f in aside for path in f.rglob("*") if path.is_file()
                  if path.suffix != ".json") == images  # moved, not removed yet
    trash.empty_trash(aside)
    assert not any(trash.trash_dir(settings).iterdir())


def test_a_deleted_datasets_images_are_gone_soon_after_the_answer(server: LiveServer) -> None:
    with server.client() as client:
        dataset = upload(client, zip_bytes(class_entries(("cat", "dog"), seed=9)),
                         name="gone").json()
        folder = stored_files(server, dataset["id"])[0].parent
        assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204
    assert not folder.exists()
    trash = server.data_dir / "trash"
    deadline = time.monotonic() + 30
    while trash.exists() and any(trash.iterdir()):
        assert time.monotonic() < deadline, list(trash.rglob("*"))[:5]
        time.sleep(0.1)


def test_startup_clean_up_finishes_a_removal_cut_short(settings: Settings) -> None:
    left = touch(trash.trash_dir(settings) / "0123abcd" / "images" / "1.png")
    assert ingest.cleanup_orphans(settings, grace_s=600) == [left.parents[1]]
    assert not any(trash.trash_dir(settings).iterdir())


def test_startup_clean_up_sweeps_caches_of_deleted_datasets(settings: Settings) -> None:
    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        dataset = Dataset(name="kept", storage_key="kept", fingerprint="abcdef0123456789" * 4)
        session.add(dataset)
        session.commit()
        kept = {"id": dataset.id, "fingerprint": dataset.fingerprint}
    cache = settings.cache_dir
    kept_cache = image_cache(settings.data_dir, kept)
    touch(kept_cache / "train-40-aa.npy", HOUR_AGO)
    deleted = age(touch(cache / "dataset-99-0123456789ab" / "eval-32-bb.npy").parent, HOUR_AGO)
    # The same id with another fingerprint: an earlier dataset that had this id.
    reused_id = age(touch(cache / f"dataset-{kept['id']}-ffffffffffff" / "a.npy").parent,
                    HOUR_AGO)
    recent = touch(cache / "dataset-98-0123456789ab" / "eval-32-bb.npy").parent
    not_ours = age(touch(cache / "something-else" / "file").parent, HOUR_AGO)

    removed = ingest.cleanup_orphans(settings, grace_s=600)

    assert set(removed) == {deleted, reused_id}
    assert (kept_cache / "train-40-aa.npy").is_file()
    assert recent.is_dir() and not_ours.is_dir()


def test_server_start_sweeps_the_image_cache(tmp_path: Path, redis_url: str) -> None:
    cache = tmp_path / "srv" / "data" / "cache"
    orphan = age(touch(cache / "dataset-7-0123456789ab" / "train-40-aa.npy").parent, HOUR_AGO)
    with dataset_server(tmp_path / "srv", redis_url) as server:
        assert not orphan.exists()
        with server.client() as client:
            dataset = upload(client, zip_bytes(class_entries(("cat", "dog")))).json()
    folder = age(touch(image_cache(tmp_path / "srv" / "data", dataset) / "eval-32-aa.npy")
                 .parent, HOUR_AGO)
    with dataset_server(tmp_path / "srv", redis_url) as server:
        with server.client() as client:
            assert client.get(f"/api/datasets/{dataset['id']}").status_code == 200
    assert folder.is_dir()  # its dataset is still there


# --- run folders -----------------------------------------------------------------------------


def test_startup_clean_up_removes_the_folders_of_deleted_runs_only(
    settings: Settings, tmp_path: Path
) -> None:
    """A worker paused through its run's delete could make the run's folder again (its
    checkpoint); nothing removed it. Only numbered folders of runs the database, read
    now, does not have go, and only once untouched for the grace period."""
    run_id = add_run(settings, tmp_path)
    runs = settings.runs_dir
    kept = age(touch(runs / str(run_id) / "state" / "checkpoint.pt").parent.parent, HOUR_AGO)
    deleted = age(touch(runs / str(run_id + 5) / "state" / "checkpoint.pt").parent.parent,
                  HOUR_AGO)
    recent = touch(runs / str(run_id + 6) / "state" / "checkpoint.pt").parent.parent
    not_runs = [age(touch(runs / name / "file").parent, HOUR_AGO)
                for name in ("notes", "0", f"0{run_id + 5}", f"{run_id + 5}a")]
    a_file = touch(runs / str(run_id + 7), HOUR_AGO)

    unreadable = get_sessionmaker(f"sqlite:///{tmp_path}/no-such-folder/selftune.db")
    assert ingest.cleanup_orphans(settings, unreadable, grace_s=600) == []
    assert deleted.is_dir()  # without the list of runs nothing is an orphan

    assert ingest.cleanup_orphans(settings, grace_s=600) == [deleted]
    assert not deleted.exists()
    assert (kept / "state" / "checkpoint.pt").is_file() and recent.is_dir()
    assert all(folder.is_dir() for folder in not_runs) and a_file.is_file()


# A finished run's folder as the worker leaves it, by path and size: its training state is
# several times the exported model. Sparse files: 2 GB without using the disk.
RUN_FILES = {"state/checkpoint.pt": 2 * 10**9, "state/checkpoint.prev.pt": 4096,
             "model.safetensors": 8192, "training.json": 100}


def ended_run_with_files(database_url: str, data_dir: Path, dataset_id: int) -> tuple[int, Path]:
    """An experiment of one succeeded run on the dataset, with RUN_FILES in its run folder:
    the experiment's id and the folder."""
    with session_scope(database_url) as session:
        experiment = Experiment(name="ended", dataset_id=dataset_id, backbone="b",
                                methods=["fine-tune"], budgets=[0.5], seeds=[0],
                                preset="quick")
        session.add(experiment)
        session.flush()
        run = Run(experiment_id=experiment.id, dataset_id=dataset_id, method="fine-tune",
                  budget=0.5, budget_label="50%", seed=0, config={}, status="succeeded")
        session.add(run)
        session.flush()
        experiment_id, run_id = experiment.id, run.id
    folder = data_dir / "runs" / str(run_id)
    for name, size in RUN_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "wb") as file:
            file.truncate(size)
    return experiment_id, folder


def files_in(folders: list[Path]) -> dict[str, int]:
    return {path.relative_to(folder).as_posix(): path.stat().st_size
            for folder in folders for path in folder.rglob("*") if path.is_file()}


def test_an_experiment_delete_moves_its_run_folders_aside_to_be_removed_after_the_answer(
    settings: Settings
) -> None:
    """Removing a run's checkpoints and export inside the delete request took 0.4 s for 2 GB
    written (a sweep's runs, as many times that). The delete renames the run folders into
    trash/ and the answer goes before they are removed, as a dataset's images do."""
    dataset_id = add_dataset_row(settings.sqlalchemy_url)
    experiment_id, folder = ended_run_with_files(settings.sqlalchemy_url, settings.data_dir,
                                                 dataset_id)
    live = redis.Redis.from_url(settings.effective_redis_url)
    with session_scope(settings.sqlalchemy_url) as session:
        aside = delete_experiment_with_runs(session, settings, live,
                                            session.get(Experiment, experiment_id))
    assert not folder.exists()
    assert all(path.parent == trash.trash_dir(settings) for path in aside)
    assert files_in(aside) == RUN_FILES  # moved, not removed yet
    trash.empty_trash(aside)
    assert not any(trash.trash_dir(settings).iterdir())


def test_a_dataset_delete_moves_its_runs_folders_aside_with_its_images(
    settings: Settings
) -> None:
    dataset_id = add_dataset_row(settings.sqlalchemy_url)
    _, folder = ended_run_with_files(settings.sqlalchemy_url, settings.data_dir, dataset_id)
    with session_scope(settings.sqlalchemy_url) as session:
        _, _, aside = ingest.delete_dataset(session, settings, session.get(Dataset, dataset_id))
    assert not folder.exists()
    assert files_in(aside) == RUN_FILES
    trash.empty_trash(aside)
    assert not any(trash.trash_dir(settings).iterdir())


def test_deleted_run_folders_are_out_of_runs_at_the_answer_and_gone_soon_after(
    server: LiveServer
) -> None:
    """Over HTTP, for an experiment's delete and a dataset's: the run folders are no longer
    in runs/ when the 204 arrives, and trash/ is empty soon after."""
    dataset_id = add_dataset_row(server.database_url)
    experiment_id, experiments_folder = ended_run_with_files(
        server.database_url, server.data_dir, dataset_id)
    _, datasets_folder = ended_run_with_files(server.database_url, server.data_dir, dataset_id)
    trash_folder = server.data_dir / "trash"
    with server.client() as client:
        assert client.delete(f"/api/experiments/{experiment_id}").status_code == 204
        assert not experiments_folder.exists() and datasets_folder.is_dir()
        assert client.delete(f"/api/datasets/{dataset_id}").status_code == 204
        assert not datasets_folder.exists()
    deadline = time.monotonic() + 30
    while trash_folder.exists() and any(trash_folder.iterdir()):
        assert time.monotonic() < deadline, list(trash_folder.rglob("*"))[:5]
        time.sleep(0.1)


# --- the database file -----------------------------------------------------------------------


def record_points(database_url: str, run_id: int, count: int) -> None:
    """`count` progress points of a run, as its worker records one a logged step."""
    with session_scope(database_url) as session:
        for start in range(0, count, 20_000):
            session.execute(insert(RunMetric), [
                {"run_id": run_id, "kind": "progress", "step": step,
                 "values": {"loss": 1.0 / step, "ce": 0.5 / step, "pgc": 0.25 / step,
                            "lr": 0.001, "images_per_s": 412.5}}
                for step in range(start + 1, min(start + 20_000, count) + 1)])


def database_file(database_url: str) -> Path:
    return Path(database_url.removeprefix("sqlite:///"))


def checkpointed_size(database_url: str) -> int:
    """The database file's size once its write-ahead log is copied back into it."""
    with sqlite3.connect(database_file(database_url), timeout=30) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return database_file(database_url).stat().st_size


def point_count(database_url: str, run_id: int) -> int:
    with session_scope(database_url) as session:
        return session.scalar(select(func.count()).select_from(RunMetric)
                              .where(RunMetric.run_id == run_id))


def doomed_and_kept(database_url: str, data_dir: Path) -> tuple[int, int, int]:
    """Two ended experiments on one dataset: (the one to delete, whose run recorded 120,000
    points, the one kept, whose run recorded 1,000, that run)."""
    dataset_id = add_dataset_row(database_url)
    doomed, _ = ended_run_with_files(database_url, data_dir, dataset_id)
    kept, kept_folder = ended_run_with_files(database_url, data_dir, dataset_id)
    with session_scope(database_url) as session:
        doomed_run = session.scalar(select(Run.id).where(Run.experiment_id == doomed))
    kept_run = int(kept_folder.name)
    record_points(database_url, doomed_run, 120_000)
    record_points(database_url, kept_run, 1_000)
    return doomed, kept, kept_run


def test_deleting_an_experiment_gives_its_metric_points_space_back_to_the_disk(
    server: LiveServer
) -> None:
    """The SQLite file kept its largest size for good: an experiment's 120,000 metric points
    deleted left their pages in it, free for later rows but never given back."""
    url = server.database_url
    doomed, kept, kept_run = doomed_and_kept(url, server.data_dir)
    peak = checkpointed_size(url)
    assert peak > 20 * 2**20

    with server.client() as client:
        assert client.delete(f"/api/experiments/{doomed}").status_code == 204
        deadline = time.monotonic() + 60
        while (size := database_file(url).stat().st_size) > peak // 5:
            assert time.monotonic() < deadline, f"{size:,} bytes of {peak:,} left"
            time.sleep(0.1)
        assert client.get(f"/api/experiments/{kept}").status_code == 200
    assert point_count(url, kept_run) == 1_000
    with sqlite3.connect(database_file(url)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_compact_converts_a_database_made_before_and_gives_its_space_back_while_the_app_runs(
    live_server: LiveServer
) -> None:
    """A database made before new ones were put in incremental auto-vacuum mode needs one
    full VACUUM to take it: `python -m app.compact` runs it, with the web serving, which
    reads and writes as before afterwards."""
    url = live_server.database_url
    with sqlite3.connect(database_file(url), isolation_level=None) as connection:
        assert connection.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # made now
        connection.execute("PRAGMA auto_vacuum=NONE")
        connection.execute("VACUUM")  # as versions before this one made it
        assert connection.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    doomed, kept, kept_run = doomed_and_kept(url, live_server.data_dir)
    with live_server.client() as client:
        assert client.delete(f"/api/experiments/{doomed}").status_code == 204
        assert client.get(f"/api/experiments/{doomed}").status_code == 404
        left = checkpointed_size(url)
        assert left > 20 * 2**20  # the delete alone gives nothing back in this mode

        done = subprocess.run([sys.executable, "-m", "app.compact"], env=live_server.env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        after = database_file(url).stat().st_size
        assert after < left // 5, (left, after)
        assert f"{database_file(url)}: " in done.stdout and "(converted" in done.stdout

        assert client.get(f"/api/experiments/{kept}").json()["status"] == "finished"
        assert client.delete(f"/api/experiments/{kept}").status_code == 204
    assert point_count(url, kept_run) == 0
    with sqlite3.connect(database_file(url)) as connection:
        assert connection.execute("PRAGMA auto_vacuum").fetchone() == (2,)
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    again = subprocess.run([sys.executable, "-m", "app.compact"], env=live_server.env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "converted" not in again.stdout, again.stdout


def test_compact_has_nothing_to_do_on_postgresql_and_refuses_a_missing_file(
    postgres_url: str, tmp_path: Path
) -> None:
    env = app_env(tmp_path / "data", postgres_url, "redis://127.0.0.1:9/0")
    done = subprocess.run([sys.executable, "-m", "app.compact"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr
    missing = f"sqlite:///{tmp_path / 'nowhere' / 'selftune.db'}"
    refused = subprocess.run([sys.executable, "-m", "app.compact"], capture_output=True,
                             env=app_env(tmp_path / "data", missing, "redis://127.0.0.1:9/0"),
                             text=True, timeout=60)
    assert refused.returncode == 2 and "no SQLite database at" in refused.stderr
    assert not (tmp_path / "nowhere").exists()
