"""Dataset upload, rejection and deletion against PostgreSQL (the docker-compose database)."""

from __future__ import annotations

from pathlib import Path

from app.db import upgrade_to_head
from tests.test_datasets_support import (
    assert_nothing_left,
    class_entries,
    dataset_server,
    image_bytes,
    legacy_tar,
    stored_files,
    tar_bytes,
    upload,
    zip_bytes,
)


def test_upload_rejection_and_delete_work_on_postgresql(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    upgrade_to_head(postgres_url)
    with (
        dataset_server(tmp_path, redis_url, database_url=postgres_url) as server,
        server.client() as client,
    ):
        slip = upload(client, zip_bytes({**class_entries(), "../../evil.png": image_bytes(1)}))
        assert slip.status_code == 422
        assert "outside the archive" in slip.json()["detail"]
        assert_nothing_left(server)

        entries = {
            **class_entries(("cat", "dog"), per_class=5, prefix="train/"),
            **class_entries(("cat", "dog"), per_class=2, prefix="test/", seed=1),
            "train/unlabeled/u.png": image_bytes(4242),
            ".hidden.png": image_bytes(4243),
        }
        created = upload(client, tar_bytes(entries), "pets.tar.gz")
        assert created.status_code == 201, created.text
        summary = created.json()
        assert summary["classes"] == [{"name": "cat", "train": 5, "test": 2},
                                      {"name": "dog", "train": 5, "test": 2}]
        assert summary["unlabeled"] == 1 and summary["test_source"] == "uploaded"
        assert summary["skipped"] == [{"path": ".hidden.png",
                                       "reason": "hidden file or folder"}]
        assert client.get(f"/api/datasets/{summary['id']}").json() == summary
        assert len(stored_files(server, summary["id"])) == 15
        images = client.get(f"/api/datasets/{summary['id']}/images",
                            params={"split": "test"}).json()
        assert images["total"] == 4
        thumb = client.get(
            f"/api/datasets/{summary['id']}/images/{images['items'][0]['id']}/thumbnail"
        )
        assert thumb.status_code == 200
        # Labels added make a second dataset (its images' rows and the source's id).
        labeled = client.post(f"/api/datasets/{summary['id']}/labels",
                              files={"file": ("labels.csv", b"train/unlabeled/u.png,dog\n")})
        assert labeled.status_code == 201, labeled.text
        assert labeled.json()["classes"][1] == {"name": "dog", "train": 6, "test": 2}
        assert (labeled.json()["derived_from"], labeled.json()["unlabeled"]) == (summary["id"], 0)
        assert client.get(f"/api/datasets/{labeled.json()['id']}/images").json()["total"] == 15

        for dataset_id in (summary["id"], labeled.json()["id"]):
            assert client.delete(f"/api/datasets/{dataset_id}").status_code == 204
        assert_nothing_left(server)


def test_names_not_in_utf8_are_skipped_and_the_dataset_stays_readable_on_postgresql(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    """PostgreSQL refuses text with lone surrogates, which tarfile makes of Latin-1 names."""
    upgrade_to_head(postgres_url)
    entries = {name.encode(): data for name, data in class_entries(per_class=3).items()}
    entries[b"cat/caf\xe9.png"] = image_bytes(91001)
    entries[b"notes-\xe9t\xe9.txt"] = b"shot in 2023"
    entries[b"dog/photo"] = image_bytes(91002, fmt="JPEG")  # no extension
    with (
        dataset_server(tmp_path, redis_url, database_url=postgres_url) as server,
        server.client() as client,
    ):
        created = upload(client, legacy_tar(entries), "latin1.tar.gz")
        assert created.status_code == 201, created.text
        summary = created.json()
        reason = "file or folder name is not valid UTF-8: rename it"
        assert summary["skipped"] == [{"path": "cat/caf\ufffd.png", "reason": reason},
                                      {"path": "notes-\ufffdt\ufffd.txt", "reason": reason}]
        assert summary["image_count"] == 7
        assert client.get(f"/api/datasets/{summary['id']}").json() == summary
        images = client.get(f"/api/datasets/{summary['id']}/images").json()
        assert "dog/photo" in {image["original_path"] for image in images["items"]}
        page = client.get(f"/datasets/{summary['id']}")
        assert page.status_code == 200 and "cat/caf\ufffd.png" in page.text
        assert client.delete(f"/api/datasets/{summary['id']}").status_code == 204
        assert_nothing_left(server)
