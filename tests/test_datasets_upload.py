"""Accepted uploads: layouts, skipped-file reports, formats, and the fixed test split."""

from __future__ import annotations

import hashlib
import io
import re

import httpx
from PIL import Image

from tests.support import LiveServer
from tests.test_datasets_support import (
    assert_nothing_left,
    class_entries,
    image_bytes,
    stored_files,
    tar_bytes,
    upload,
    zip_bytes,
)

STORED_PATH = re.compile(r"^(train|test)/\d+/\d+\.[a-z]+$|^unlabeled/\d+\.[a-z]+$")




def uploaded(client: httpx.Client, data: bytes, filename: str = "photos.zip", **kwargs) -> dict:
    response = upload(client, data, filename, **kwargs)
    assert response.status_code == 201, response.text
    return response.json()


def counts(summary: dict) -> dict[str, tuple[int, int]]:
    return {item["name"]: (item["train"], item["test"]) for item in summary["classes"]}


def all_images(client: httpx.Client, dataset_id: int, **params) -> list[dict]:
    response = client.get(f"/api/datasets/{dataset_id}/images", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return response.json()["items"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def delete_all(server: LiveServer, client: httpx.Client) -> None:
    for dataset in client.get("/api/datasets").json():
        assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204
    assert_nothing_left(server)


def test_upload_skips_and_reports_corrupt_non_image_macos_hidden_and_duplicate_files(
    server: LiveServer, client: httpx.Client
) -> None:
    good = class_entries(("cat", "dog"), per_class=3)
    valid_png = image_bytes(777)
    entries = {
        **good,
        "cat/broken.png": valid_png[: len(valid_png) // 2],
        "dog/fake.jpg": b"this is not a jpeg",
        "notes.txt": b"shot in 2023",
        "__MACOSX/cat/._0.png": b"\0\5\26\7 resource fork",
        ".DS_Store": b"\0\0\0\1Bud1",
        "cat/.hidden.png": image_bytes(778),
        ".git/objects/ab.png": image_bytes(779),
        "dog/copy-of-cat.png": good["cat/0.png"],
    }
    summary = uploaded(client, zip_bytes(entries))

    reasons = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert set(reasons) == {
        "cat/broken.png", "dog/fake.jpg", "notes.txt", "__MACOSX/cat/._0.png", ".DS_Store",
        "cat/.hidden.png", ".git/objects/ab.png", "dog/copy-of-cat.png",
    }
    assert reasons["cat/broken.png"].startswith("corrupt image")
    assert reasons["dog/fake.jpg"].startswith("corrupt or unsupported image")
    assert reasons["notes.txt"].startswith("not an image (.txt)")
    assert reasons["__MACOSX/cat/._0.png"] == "macOS metadata (__MACOSX)"
    assert reasons[".DS_Store"] == reasons["cat/.hidden.png"] == "hidden file or folder"
    assert reasons[".git/objects/ab.png"] == "hidden file or folder"
    # The same image in two class folders: one label is wrong, and the reason says so.
    assert reasons["dog/copy-of-cat.png"] == (
        "duplicate of cat/0.png, which is labeled 'cat': kept as 'cat', not 'dog' "
        "(conflicting labels: check which is right)")
    assert summary["skipped_count"] == 8

    # Three images a class; without test/ one of each (20 %, at least one) is held out.
    assert counts(summary) == {"cat": (2, 1), "dog": (2, 1)}
    assert summary["test_source"] == "holdout"
    assert summary["image_count"] == 6 and summary["unlabeled"] == 0

    # Stored: exactly the six kept originals, byte for byte, under sanitised names.
    files = stored_files(server, summary["id"])
    assert sorted(sha256(path.read_bytes()) for path in files) == sorted(
        sha256(data) for data in good.values()
    )
    root = files[0].parents[2]
    assert all(STORED_PATH.match(path.relative_to(root).as_posix()) for path in files)
    assert summary["size_bytes"] == sum(len(data) for data in good.values())
    assert not (server.data_dir / "tmp").exists() or not any((server.data_dir / "tmp").iterdir())
    delete_all(server, client)


def test_upload_looks_through_nested_wrapping_folders(
    server: LiveServer, client: httpx.Client
) -> None:
    entries = {
        **class_entries(("cat", "dog"), per_class=3, prefix="export/photos/train/"),
        **class_entries(("cat", "dog"), per_class=2, prefix="export/photos/test/", seed=1),
        "export/photos/train/unlabeled/u1.png": image_bytes(5001),
        "export/photos/train/unlabeled/u2.png": image_bytes(5002),
        "export/readme.txt": b"not an image, does not stop the look-through",
    }
    summary = uploaded(client, zip_bytes(entries), "export.zip")

    assert counts(summary) == {"cat": (3, 2), "dog": (3, 2)}
    assert summary["unlabeled"] == 2
    assert summary["test_source"] == "uploaded"
    assert summary["name"] == "export"
    unlabeled = all_images(client, summary["id"], split="unlabeled")
    assert {image["original_path"] for image in unlabeled} == {
        "export/photos/train/unlabeled/u1.png", "export/photos/train/unlabeled/u2.png",
    }
    assert all(image["label"] is None for image in unlabeled)
    delete_all(server, client)


def test_upload_with_labels_csv_uses_its_labels_splits_and_empty_labels_as_unlabeled(
    server: LiveServer, client: httpx.Client
) -> None:
    images = {f"data/img/{n}.png": image_bytes(6000 + n) for n in range(9)}
    csv_text = (
        "path,label,split\n"
        "img/0.png,class10,\nimg/1.png,class10,\nimg/2.png,class2,\nimg/3.png,class2,\n"
        "img/4.png,class10,test\nimg/5.png,class2,val\n"
        "img/6.png,,\nimg/7.png,,\n"
    )  # img/8.png is not listed
    summary = uploaded(client, zip_bytes({**images, "data/labels.csv": csv_text.encode()}))

    assert [item["name"] for item in summary["classes"]] == ["class2", "class10"]
    assert counts(summary) == {"class2": (2, 1), "class10": (2, 1)}
    assert summary["unlabeled"] == 2
    assert summary["test_source"] == "uploaded"
    assert summary["skipped"] == [
        {"path": "data/img/8.png", "reason": "not listed in data/labels.csv"}
    ]
    class10 = all_images(client, summary["id"], split="train", label=1)
    assert {image["original_path"] for image in class10} == {"data/img/0.png", "data/img/1.png"}
    delete_all(server, client)


def test_tar_gz_with_val_folder_uses_it_as_the_test_split_and_sorts_classes_naturally(
    server: LiveServer, client: httpx.Client
) -> None:
    names = ("class10", "class2", "class1")
    entries = {
        **class_entries(names, per_class=2, prefix="train/"),
        **class_entries(names, per_class=1, prefix="val/", seed=1),
        "unlabeled/u.png": image_bytes(7000),
    }
    summary = uploaded(client, tar_bytes(entries), "my-photos.tar.gz", name="  Shapes v2 ")

    assert summary["name"] == "Shapes v2"
    assert [item["name"] for item in summary["classes"]] == ["class1", "class2", "class10"]
    assert counts(summary) == {"class1": (2, 1), "class2": (2, 1), "class10": (2, 1)}
    assert summary["unlabeled"] == 1 and summary["test_source"] == "uploaded"
    test_of_class10 = all_images(client, summary["id"], split="test", label=2)
    assert [image["original_path"] for image in test_of_class10] == ["val/class10/0.png"]
    delete_all(server, client)


def frames_gif() -> bytes:
    frames = [Image.new("P", (12, 12), index * 40) for index in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def test_every_supported_format_is_verified_and_stored_byte_for_byte(
    server: LiveServer, client: httpx.Client
) -> None:
    originals = {
        "a/photo.jpg": image_bytes(1, size=40, fmt="JPEG"),
        "a/modern.webp": image_bytes(2, fmt="WEBP"),
        "a/old.bmp": image_bytes(3, fmt="BMP"),
        "a/scan.tiff": image_bytes(4, fmt="TIFF"),
        "b/animated.gif": frames_gif(),
        "b/alpha.png": image_bytes(5, mode="RGBA"),
        "b/grey.png": image_bytes(6, mode="L"),
        "b/misnamed.jpeg": image_bytes(7, fmt="PNG"),  # the content decides the format
    }
    summary = uploaded(client, zip_bytes(originals))
    assert summary["skipped"] == []
    assert summary["image_count"] == len(originals)

    files = stored_files(server, summary["id"])
    by_sha = {sha256(path.read_bytes()): path.suffix for path in files}
    expected_suffix = {"a/photo.jpg": ".jpg", "a/modern.webp": ".webp", "a/old.bmp": ".bmp",
                       "a/scan.tiff": ".tif", "b/animated.gif": ".gif", "b/alpha.png": ".png",
                       "b/grey.png": ".png", "b/misnamed.jpeg": ".png"}
    assert {by_sha[sha256(data)] for data in originals.values()} == set(expected_suffix.values())
    for name, data in originals.items():
        assert by_sha[sha256(data)] == expected_suffix[name]

    for image in all_images(client, summary["id"]):
        response = client.get(f"/api/datasets/{summary['id']}/images/{image['id']}/thumbnail")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(response.content))
        assert thumb.mode == "RGB" and max(thumb.size) <= 128
    delete_all(server, client)


def test_hold_out_is_stratified_seeded_and_the_same_for_the_same_images(
    server: LiveServer, client: httpx.Client
) -> None:
    entries = class_entries(("ant", "bee", "cow"), per_class=10)
    reversed_entries = dict(reversed(list(entries.items())))
    first = uploaded(client, zip_bytes(entries))
    second = uploaded(client, tar_bytes(reversed_entries), "same.tar.gz")

    for summary in (first, second):
        assert counts(summary) == {"ant": (8, 2), "bee": (8, 2), "cow": (8, 2)}
        assert summary["test_source"] == "holdout"
    assert first["fingerprint"] == second["fingerprint"]
    test_paths = [
        sorted(image["original_path"] for image in all_images(client, summary["id"], split="test"))
        for summary in (first, second)
    ]
    assert test_paths[0] == test_paths[1]
    assert len(test_paths[0]) == 6
    delete_all(server, client)


def test_a_dataset_keeps_the_first_thousand_skipped_files_and_counts_them_all(
    server: LiveServer, client: httpx.Client
) -> None:
    """199,000 skipped files were all kept: a 47 MB upload answer, and every dataset listing
    50 times slower for good (it read each list to count it)."""
    notes = {f"notes/{n}.txt": b"x" for n in range(1205)}
    summary = uploaded(client, zip_bytes({**class_entries(("cat", "dog")), **notes}))
    assert summary["skipped_count"] == 1205
    assert [item["path"] for item in summary["skipped"]] == [f"notes/{n}.txt" for n in range(1000)]
    listed = client.get("/api/datasets").json()
    assert [item["skipped_count"] for item in listed] == [1205]
    page = client.get(f"/datasets/{summary['id']}").text
    assert "Skipped files: 1205" in page
    assert re.search(r"And 705 more:\s+<a href=\"/api/datasets/\d+\">the API</a> names the "
                     r"first 1000\.", page)
    delete_all(server, client)
