"""Uploads that must be refused with a 4xx saying what to fix, leaving no file and no row."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app import ingest
from app.config import Settings
from tests.support import LiveServer, small_disk
from tests.test_datasets_support import (
    assert_nothing_left,
    class_entries,
    dataset_server,
    image_bytes,
    leftovers,
    png_with_declared_size,
    tar_bytes,
    upload,
    zip_bytes,
)

MAX_FILES = 40
MAX_PIXELS = 1_000_000
MAX_UPLOAD = 200_000

SERVER_ENV = {
    "SELFTUNE_MAX_ARCHIVE_FILES": str(MAX_FILES),
    "SELFTUNE_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
    "SELFTUNE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
}



def two_classes(**extra: bytes) -> dict[str, bytes]:
    return {**class_entries(("cat", "dog")), **extra}


def solid_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_tar_gz() -> bytes:
    data = tar_bytes(class_entries(("cat", "dog"), per_class=6))
    return data[: len(data) // 2]


CSV_WITH_UNKNOWN = b"path,label\nimages/a.png,cat\nimages/b.png,dog\nimages/missing.png,cat\n"

REJECTIONS: list = [
    pytest.param(lambda: zip_bytes(two_classes(**{"../evil.png": image_bytes(99)})),
                 "a.zip", 422, "outside the archive", id="zip-slip-zip"),
    pytest.param(lambda: tar_bytes(two_classes(**{"cat/../../evil.png": image_bytes(99)})),
                 "a.tar.gz", 422, "outside the archive", id="zip-slip-tar"),
    pytest.param(lambda: zip_bytes(two_classes(**{"/tmp/evil.png": image_bytes(99)})),
                 "a.zip", 422, "absolute path", id="absolute-path-zip"),
    pytest.param(lambda: tar_bytes(two_classes(**{"/etc/evil.png": image_bytes(99)}), gz=False),
                 "a.tar", 422, "absolute path", id="absolute-path-tar"),
    pytest.param(lambda: zip_bytes(two_classes(**{"C:/evil.png": image_bytes(99)})),
                 "a.zip", 422, "absolute path", id="drive-letter-zip"),
    pytest.param(lambda: zip_bytes(two_classes(), symlinks={"cat/link.png": "/etc/passwd"}),
                 "a.zip", 422, "is a link", id="symlink-zip"),
    pytest.param(lambda: tar_bytes(two_classes(), symlinks={"cat/link.png": "/etc/passwd"}),
                 "a.tgz", 422, "is a link", id="symlink-tar"),
    pytest.param(lambda: tar_bytes(two_classes(), hardlinks={"cat/hard.png": "cat/0.png"}),
                 "a.tgz", 422, "is a link", id="hardlink-tar"),
    pytest.param(lambda: zip_bytes(two_classes(**{"cat/zeros.png": bytes(8 * 1024**2)})),
                 "a.zip", 413, "expands more than 200 times", id="zip-bomb-by-ratio"),
    pytest.param(lambda: tar_bytes(two_classes(**{"cat/zeros.png": bytes(8 * 1024**2)})),
                 "a.tar.gz", 413, "expands more than 200 times", id="tar-gz-bomb-by-ratio"),
    pytest.param(lambda: zip_bytes(two_classes(**{"dog/bomb.png":
                                                  png_with_declared_size(100_000, 100_000)})),
                 "a.zip", 422, "decompression bombs", id="decompression-bomb-header"),
    pytest.param(lambda: zip_bytes(two_classes(**{"dog/big.png": solid_png(1100, 1000)})),
                 "a.zip", 422, "1100x1000 = 1,100,000 pixels", id="image-over-pixel-limit"),
    pytest.param(lambda: zip_bytes(class_entries(("cat",), per_class=5)),
                 "a.zip", 422, "found 1 class ('cat'); at least two", id="single-class"),
    pytest.param(lambda: zip_bytes({"notes/readme.txt": b"hello", "data.json": b"{}"}),
                 "a.zip", 422, "the archive has no images", id="no-images"),
    pytest.param(lambda: zip_bytes({"cat/1.png": b"garbage", "dog/1.jpg": b"junk"}),
                 "a.zip", 422, "no usable images (2 skipped: 2 corrupt", id="only-corrupt-images"),
    pytest.param(lambda: zip_bytes({"images/a.png": image_bytes(1), "images/b.png":
                                    image_bytes(2), "labels.csv": CSV_WITH_UNKNOWN}),
                 "a.zip", 422, "'images/missing.png'", id="labels-csv-unknown-path"),
    pytest.param(lambda: zip_bytes({"a.png": image_bytes(1), "b.png": image_bytes(2),
                                    "labels.csv": b"../x.png,cat\na.png,cat\nb.png,dog\n"}),
                 "a.zip", 422, "labels.csv line 1: path '../x.png' must be relative",
                 id="labels-csv-escaping-path"),
    pytest.param(lambda: zip_bytes({"a.png": image_bytes(1), "b.png": image_bytes(2),
                                    "labels.csv": b"filename,class\na.png,cat\nb.png,dog\n"}),
                 "a.zip", 422, "'filename'; paths are relative to the folder of labels.csv; "
                 "line 1 is read as an image and its label: a header line must be 'path,label'",
                 id="labels-csv-other-header"),
    pytest.param(lambda: os.urandom(5000), "a.zip", 415, "not a zip or tar archive",
                 id="random-bytes"),
    pytest.param(lambda: image_bytes(5), "photo.png", 415, "not a zip or tar archive",
                 id="image-instead-of-archive"),
    pytest.param(lambda: b"", "a.zip", 415, "empty", id="empty-file"),
    pytest.param(lambda: zip_bytes(class_entries(("cat", "dog"), per_class=21)),
                 "a.zip", 413, f"more than {MAX_FILES} files", id="too-many-files-zip"),
    pytest.param(lambda: tar_bytes(class_entries(("cat", "dog"), per_class=21)),
                 "a.tgz", 413, f"more than {MAX_FILES} files", id="too-many-files-tar"),
    pytest.param(lambda: zip_bytes({**class_entries(("cat", "dog"), prefix="train/"),
                                    **class_entries(("cat", "bird"), prefix="test/", seed=1)}),
                 "a.zip", 422, "'bird' has test images but no training", id="class-only-in-test"),
    pytest.param(lambda: zip_bytes({**class_entries(("cat",), per_class=4),
                                    **class_entries(("dog",), per_class=1, seed=1)}),
                 "a.zip", 422, "'dog' has only one labeled image", id="holdout-needs-two"),
    # Three files, two of them copies of the first: said (it read as a wrong count).
    pytest.param(lambda: zip_bytes({**class_entries(("cat",), per_class=4),
                                    **{f"dog/{n}.png": image_bytes(9) for n in range(3)}}),
                 "a.zip", 422, "class 'dog' has only one labeled image (2 more are copies of "
                 "it, skipped as duplicates): without a test/ folder", id="holdout-copies"),
    pytest.param(lambda: zip_bytes({**class_entries(("cat",), per_class=4),
                                    **{f"dog/{n}.png": image_bytes(9) for n in range(2)},
                                    "emu/0.png": image_bytes(8)}),
                 "a.zip", 422, "classes 'dog', 'emu' have only one labeled image ('dog': 1 "
                 "more is a copy of its image, skipped as duplicates): without",
                 id="holdout-copies-two-classes"),
    pytest.param(lambda: zip_bytes({**class_entries(("cat", "dog"), prefix="train/"),
                                    **class_entries(("cat", "dog"), prefix="test/", seed=1),
                                    **class_entries(("cat", "dog"), prefix="val/", seed=2)}),
                 "a.zip", 422, "both test/ and val/", id="test-and-val"),
    pytest.param(truncated_tar_gz, "a.tar.gz", 422, "damaged or truncated", id="truncated-tar-gz"),
    pytest.param(lambda: os.urandom(MAX_UPLOAD + 10), "a.zip", 413, "upload limit",
                 id="over-max-upload-bytes-while-streaming"),
    pytest.param(lambda: os.urandom(MAX_UPLOAD + 1_100_000), "a.zip", 413, "upload limit",
                 id="over-max-upload-bytes-by-content-length"),
]


@pytest.mark.parametrize(("build", "filename", "status", "detail"), REJECTIONS)
def test_bad_upload_is_rejected_with_a_reason_and_leaves_nothing(
    server: LiveServer, client: httpx.Client, build: Callable[[], bytes], filename: str,
    status: int, detail: str,
) -> None:
    response = upload(client, build(), filename)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert_nothing_left(server)


def test_upload_over_the_limit_without_content_length_is_stopped_while_streaming(
    server: LiveServer, client: httpx.Client
) -> None:
    boundary = "selftune-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.zip\"\r\nContent-Type: application/zip\r\n\r\n").encode()
    sent = []

    def body():  # a generator body is sent chunked, so the server cannot check a length first
        yield head
        for _ in range(40):
            sent.append(1)
            yield b"\0" * 16_384
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/api/datasets", content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413
    assert "SELFTUNE_MAX_UPLOAD_BYTES" in response.json()["detail"]
    assert_nothing_left(server)


def test_upload_that_is_not_multipart_is_rejected(server: LiveServer,
                                                   client: httpx.Client) -> None:
    response = client.post("/api/datasets", json={"file": "photos.zip"})
    assert response.status_code == 415
    assert "multipart/form-data in a field named 'file'" in response.json()["detail"]
    assert_nothing_left(server)


def test_upload_without_a_file_field_is_rejected(server: LiveServer,
                                                 client: httpx.Client) -> None:
    response = client.post("/api/datasets", files={"archive": ("a.zip", b"PK")})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "the form has a field 'archive', which this request does not take: send the archive in "
        "a field named 'file' and, if you like, its name in one named 'name' (curl -F "
        "file=@photos.zip -F name=...)")
    nameless = client.post("/api/datasets", headers={
        "Content-Type": "multipart/form-data; boundary=b"},
        content=b"--b\r\nContent-Disposition: form-data\r\n\r\nPK\r\n--b--\r\n")
    assert nameless.status_code == 422
    assert nameless.json()["detail"].startswith("the form has a field '', which")
    assert_nothing_left(server)


def test_a_misspelt_field_is_refused_not_dropped(server: LiveServer,
                                                 client: httpx.Client) -> None:
    """`curl -F file=@photos.zip -F nmae=cats` stored the dataset named "photos": the field
    with the name was dropped without a word."""
    archive = zip_bytes(class_entries(("cat", "dog"), per_class=3))
    response = client.post("/api/datasets", files={"file": ("photos.zip", archive)},
                           data={"nmae": "cats"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("the form has a field 'nmae', which")
    assert_nothing_left(server)


def test_rejected_uploads_leave_the_server_usable(server: LiveServer,
                                                  client: httpx.Client) -> None:
    response = upload(client, zip_bytes(class_entries(("cat", "dog"), per_class=3)))
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    assert client.delete(f"/api/datasets/{dataset_id}").status_code == 204
    assert_nothing_left(server)


def test_extraction_counts_actual_bytes_and_stops_at_the_limit(tmp_path: Path) -> None:
    # Archive headers can lie about sizes; the bytes really written are counted too.
    settings = Settings(data_dir=tmp_path, max_uncompressed_bytes=1_000_000,
                        max_compression_ratio=1000)
    budget = ingest._ByteBudget(settings, archive_size=1_000_000)
    budget.check_declared(10)  # what the archive claimed
    with pytest.raises(ingest.IngestError) as caught:
        ingest._copy_member(io.BytesIO(bytes(3_000_000)), tmp_path / "out", budget)
    assert caught.value.status_code == 413
    assert "SELFTUNE_MAX_UNCOMPRESSED_BYTES" in caught.value.detail
    assert budget.used < 3_000_000  # stopped at the first chunk over, not at the end


def test_leftover_check_sees_files(server: LiveServer) -> None:
    # Guards the guard: the emptiness check must notice a stray file.
    stray = server.data_dir / "tmp" / "upload-stray"
    stray.mkdir(parents=True)
    try:
        assert leftovers(server) == ["tmp/upload-stray"]
    finally:
        stray.rmdir()


@pytest.mark.parametrize("entries", [41, 70_000])  # 70,000 needs zip64 records
def test_zip_entries_are_counted_before_the_zip_is_opened(tmp_path: Path, entries: int) -> None:
    # zipfile holds an object per entry once opened; the count must come from the headers.
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        zipped.writestr("cat/", b"")  # a folder entry, which does not count
        for n in range(entries):
            zipped.writestr(f"cat/{n}", b"")
    settings = Settings(data_dir=tmp_path, max_archive_files=entries)
    ingest._check_zip_entry_count(archive, settings)  # exactly at the limit: fine
    with pytest.raises(ingest.IngestError) as caught:
        ingest._check_zip_entry_count(archive, settings.model_copy(
            update={"max_archive_files": entries - 1}))
    assert caught.value.status_code == 413
    assert f"more than {entries - 1} files" in caught.value.detail


def test_a_dataset_name_with_control_characters_is_refused(
    server: LiveServer, client: httpx.Client
) -> None:
    """PostgreSQL refuses NUL in text (it was a 500 there); no name needs a control character."""
    archive = zip_bytes(class_entries(("cat", "dog")))
    for name in ("nul\x00name", "two\nlines"):
        response = upload(client, archive, name=name)
        assert response.status_code == 422, response.text
        assert "must not contain control characters" in response.json()["detail"]
        assert_nothing_left(server)


def test_a_dataset_name_not_in_utf8_is_refused_and_a_long_file_name_shortened(
    server: LiveServer, client: httpx.Client
) -> None:
    """A name field in another encoding was kept with U+FFFD for its letters ("caf\ufffd");
    an archive's file name, the name when none is given, over 200 characters refused the
    upload for a name the user never typed."""
    archive = zip_bytes(class_entries(("cat", "dog")))
    for raw in (b"caf\xe9", b"\xff\xfe"):
        response = client.post("/api/datasets", files={
            "file": ("photos.zip", archive), "name": (None, raw)})
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith("the 'name' field is not UTF-8 text")
        assert_nothing_left(server)

    response = upload(client, archive, filename=f"{'n' * 230}.zip")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == f"{'n' * 199}\u2026"
    assert client.delete(f"/api/datasets/{response.json()['id']}").status_code == 204


def test_an_upload_that_fills_the_disk_is_a_507_that_says_so_and_keeps_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    """The data directory on a real 3 MiB file system: the archive (1.8 MiB of noise that
    does not compress) fits, it and its extracted images together do not."""
    noise = {
        f"{'cat' if n % 2 else 'dog'}/{n}.png": noise_png(n) for n in range(16)
    }
    archive = zip_bytes(noise, compression=zipfile.ZIP_STORED)
    assert 1.5 * 2**20 < len(archive) < 3 * 2**20
    with small_disk(tmp_path / "base" / "data", "3m"), dataset_server(
        tmp_path / "base", redis_url, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"
    ) as server, server.client() as client:
        response = upload(client, archive)
        assert response.status_code == 507, response.text
        detail = response.json()["detail"]
        assert "disk is full" in detail and "MiB free" in detail
        assert_nothing_left(server)
        # The space is given back: the server goes on, and a small upload is whole.
        assert upload(client, zip_bytes(class_entries())).status_code == 201


def test_an_upload_when_the_database_disk_is_full_is_a_507_that_says_so_and_keeps_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    """The SQLite file on a real 1 MiB file system, filled up after the migrations: the images
    fit in the data directory, the rows do not (SQLite's "database or disk is full" was a 500)."""
    with small_disk(tmp_path / "db", "1m") as db_dir, dataset_server(
        tmp_path / "base", redis_url, database_url=f"sqlite:///{db_dir / 'db.sqlite'}"
    ) as server, server.client() as client:
        filler = db_dir / "filler"
        with open(filler, "wb", buffering=0) as handle, pytest.raises(OSError):
            while True:  # to the last block
                handle.write(b"\0" * 4096)
        response = upload(client, zip_bytes(class_entries(per_class=20)))
        assert response.status_code == 507, response.text
        detail = response.json()["detail"]
        assert "database's disk is full" in detail and "nothing was kept" in detail
        filler.unlink()
        assert_nothing_left(server)
        # The space is back: the server goes on, and the same upload is whole.
        response = upload(client, zip_bytes(class_entries(per_class=20)))
        assert response.status_code == 201, response.text
        assert response.json()["image_count"] == 40


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def tar_with_folders(folders: int) -> bytes:
    """A tar.gz of a small dataset plus `folders` empty folder entries."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in class_entries(("cat", "dog")).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for n in range(folders):
            info = tarfile.TarInfo(f"empty/{n}")
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize("filename", ["a.zip", "a.tgz"])
def test_folder_entries_have_a_limit_of_their_own(server: LiveServer, client: httpx.Client,
                                                   filename: str) -> None:
    """Folder entries did not count: 3 million empty ones (a 282 MB zip) were read whole,
    taking 2 GB of the web's memory, and accepted."""
    folders = MAX_FILES + 1
    if filename == "a.zip":
        archive = zip_bytes({**class_entries(("cat", "dog")),
                             **{f"empty/{n}/": b"" for n in range(folders)}})
    else:
        archive = tar_with_folders(folders)
    response = upload(client, archive, filename)
    assert response.status_code == 413, response.text
    assert f"more than {MAX_FILES} folder entries" in response.json()["detail"]
    assert_nothing_left(server)
    # As many folders as files are fine.
    fine = zip_bytes({**class_entries(("cat", "dog")), "cat/": b"", "dog/": b""})
    created = upload(client, fine, "b.zip")
    assert created.status_code == 201, created.text
    assert client.delete(f"/api/datasets/{created.json()['id']}").status_code == 204
