"""Disk hygiene: a dataset's decoded-image caches go with it, and caches of deleted datasets
and folders of deleted runs are swept at start-up (the engine's own durable files:
tests/engine/test_durable_files.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import ingest
from app.config import Settings
from app.db import get_sessionmaker
from app.models import Dataset
from tests.engine.test_durable_files import HOUR_AGO, MEAN_STD, touch
from tests.support import LiveServer
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
    from app.db import session_scope
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
    ingest.empty_trash(aside)
    assert not any(ingest.trash_dir(settings).iterdir())


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
    left = touch(ingest.trash_dir(settings) / "0123abcd" / "images" / "1.png")
    assert ingest.cleanup_orphans(settings, grace_s=600) == [left.parents[1]]
    assert not any(ingest.trash_dir(settings).iterdir())


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
