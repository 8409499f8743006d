"""Disk hygiene: a dataset's decoded-image caches go with it, and caches of deleted datasets
are swept at start-up (the engine's own durable files: tests/engine/test_durable_files.py)."""

from __future__ import annotations

import os
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
