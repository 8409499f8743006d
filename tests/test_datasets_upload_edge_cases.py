"""Uploads at the edges of the formats and of HTTP: one image both labeled and unlabeled, a
stray image beside the class folders of a wrapping folder, a zip cut short, 16-bit images,
thumbnails under a lowered pixel limit, a part without a filename, a trailing slash, and an
upload the client abandons."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app import ingest
from app.config import Settings
from tests.support import LiveServer
from tests.test_datasets_support import (
    assert_nothing_left,
    class_entries,
    image_bytes,
    tar_bytes,
    upload,
    zip_bytes,
)
from worker.selftuning import load_folder_dataset
from worker.selftuning.data import UNLABELED_IN_TEST, drop_duplicates

NOT_IN_A_CLASS_FOLDER = "not inside a class folder: put it in <class>/ or unlabeled/"


def uploaded(client: httpx.Client, data: bytes, filename: str = "photos.zip") -> dict:
    response = upload(client, data, filename)
    assert response.status_code == 201, response.text
    return response.json()


def totals(summary: dict) -> dict[str, int]:
    return {item["name"]: item["train"] + item["test"] for item in summary["classes"]}


def delete_all(server: LiveServer, client: httpx.Client) -> None:
    for dataset in client.get("/api/datasets").json():
        assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204
    assert_nothing_left(server)


def prepared(tmp_path: Path, entries: dict[str, bytes]) -> ingest.PreparedDataset:
    """The dataset an archive of `entries` becomes, without a server."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    archive = tmp_path / "photos.zip"
    archive.write_bytes(zip_bytes(entries))
    return ingest.prepare_dataset(archive, tmp_path / "work", Settings(data_dir=tmp_path))


# --- Duplicates: a labeled copy wins over an unlabeled one ----------------------------------


def test_an_image_both_in_a_class_and_in_unlabeled_keeps_its_class(
    server: LiveServer, client: httpx.Client
) -> None:
    # Zip tools list entries alphabetically, so unlabeled/ comes before zebra/.
    classes = class_entries(("ant", "bee", "zebra"), per_class=6)
    zebra = [data for path, data in classes.items() if path.startswith("zebra/")]
    entries = {
        **classes,
        **{f"unlabeled/u{n}.png": image_bytes(9000 + n) for n in range(4)},
        **{f"unlabeled/z{n}.png": data for n, data in enumerate(zebra)},
    }
    summary = uploaded(client, zip_bytes(dict(sorted(entries.items()))))

    assert totals(summary) == {"ant": 6, "bee": 6, "zebra": 6}
    assert summary["unlabeled"] == 4
    assert summary["skipped"] == [
        {"path": f"unlabeled/z{n}.png", "reason": f"duplicate of zebra/{n}.png"} for n in range(6)
    ]
    delete_all(server, client)


def test_labeled_copies_win_over_unlabeled_ones_in_every_split_and_in_labels_csv(
    tmp_path: Path,
) -> None:
    shared = image_bytes(8000)
    folders = prepared(tmp_path / "folders", {  # in this order, as a tar may list them
        "train/unlabeled/shared.png": shared,
        **class_entries(("ant", "bee"), per_class=2, prefix="train/"),
        **class_entries(("ant", "bee"), per_class=1, prefix="test/", seed=1),
        "test/bee/shared.png": shared,
    })
    assert [(item.path, item.reason) for item in folders.skipped] == [
        ("train/unlabeled/shared.png", "duplicate of test/bee/shared.png"),
    ]
    assert folders.unlabeled_count == 0

    csv_text = "path,label\na.png,\nb.png,bee\nc.png,ant\nd.png,bee\ne.png,ant\n"
    by_csv = prepared(tmp_path / "csv", {
        "a.png": shared, "b.png": shared, "c.png": image_bytes(8001),
        "d.png": image_bytes(8002), "e.png": image_bytes(8003),
        "labels.csv": csv_text.encode(),
    })
    assert [(item.path, item.reason) for item in by_csv.skipped] == [
        ("a.png", "duplicate of b.png"),
    ]
    assert by_csv.unlabeled_count == 0
    assert {name: sum(split.values()) for name, split in by_csv.class_counts.items()} == {
        "ant": 2, "bee": 2,
    }


# --- Wrapping folders: a stray image beside the class folders -------------------------------


def test_a_stray_image_in_a_wrapping_folder_is_skipped_not_made_the_only_class(
    server: LiveServer, client: httpx.Client
) -> None:
    classes = class_entries(("ant", "zebra"), per_class=6)
    cover = image_bytes(9100)
    wrapped = uploaded(client, zip_bytes({
        "photos/cover.png": cover, **{f"photos/{path}": data for path, data in classes.items()},
    }))
    unwrapped = uploaded(client, zip_bytes({"cover.png": cover, **classes}))

    for summary, prefix in ((wrapped, "photos/"), (unwrapped, "")):
        assert totals(summary) == {"ant": 6, "zebra": 6}
        assert summary["skipped"] == [
            {"path": f"{prefix}cover.png", "reason": NOT_IN_A_CLASS_FOLDER}
        ]
    delete_all(server, client)


SPLITS = {
    **class_entries(("ant", "bee"), per_class=2, prefix="train/"),
    **class_entries(("ant", "bee"), per_class=1, prefix="test/", seed=1),
    "train/unlabeled/u.png": image_bytes(9200),
}


@pytest.mark.parametrize(("entries", "classes", "unlabeled", "skipped"), [
    pytest.param(class_entries(("ant", "zebra")), {"ant": 3, "zebra": 3}, 0, {},
                 id="class-folders-at-the-top"),
    pytest.param({**class_entries(("ant", "zebra")), "unlabeled/u.png": image_bytes(9201)},
                 {"ant": 3, "zebra": 3}, 1, {}, id="class-folders-and-unlabeled-at-the-top"),
    pytest.param({"data/cover.png": image_bytes(9202),
                  **{f"data/{path}": data for path, data in SPLITS.items()}},
                 {"ant": 3, "bee": 3}, 1,
                 {"data/cover.png": "outside the train/ and test/ folders"},
                 id="stray-beside-split-folders"),
    pytest.param({"a/b/cover.png": image_bytes(9203),
                  **{f"a/b/{path}": data for path, data in class_entries(("ant", "bee")).items()}},
                 {"ant": 3, "bee": 3}, 0, {"a/b/cover.png": NOT_IN_A_CLASS_FOLDER},
                 id="stray-in-the-inner-of-nested-wrappers"),
    pytest.param({"photos/unlabeled/u.png": image_bytes(9204), "photos/cover.png":
                  image_bytes(9205), **{f"photos/{path}": data for path, data
                                        in class_entries(("ant", "bee")).items()}},
                 {"ant": 3, "bee": 3}, 1, {"photos/cover.png": NOT_IN_A_CLASS_FOLDER},
                 id="stray-beside-classes-and-unlabeled"),
    pytest.param({"data/cover.png": image_bytes(9206),
                  "data/img/a.png": image_bytes(9207), "data/img/b.png": image_bytes(9208),
                  "data/img/c.png": image_bytes(9209), "data/img/d.png": image_bytes(9210),
                  "data/labels.csv": b"path,label\nimg/a.png,ant\nimg/b.png,ant\n"
                                     b"img/c.png,bee\nimg/d.png,bee\n"},
                 {"ant": 2, "bee": 2}, 0, {"data/cover.png": "not listed in data/labels.csv"},
                 id="labels-csv-in-a-wrapper"),
])
def test_layouts_around_wrapping_folders(
    tmp_path: Path, entries: dict[str, bytes], classes: dict[str, int], unlabeled: int,
    skipped: dict[str, str],
) -> None:
    dataset = prepared(tmp_path, entries)
    assert {name: sum(split.values()) for name, split in dataset.class_counts.items()} == classes
    assert dataset.unlabeled_count == unlabeled
    assert {item.path: item.reason for item in dataset.skipped} == skipped


@pytest.mark.parametrize("top", ["val", "test", "Val"])
def test_an_archive_of_one_test_split_folder_is_a_wrapper_not_a_test_split_alone(
    tmp_path: Path, top: str,
) -> None:
    """Zipping the `val/` folder of a dataset gives an archive with nothing to train on if
    `val/` is read as the test split: it is read as a wrapping folder instead, so its class
    folders train, with a hold-out for testing as for any archive without a test split."""
    entries = {f"{top}/{path}": data for path, data in class_entries(("ant", "bee")).items()}
    dataset = prepared(tmp_path, {**entries, f"{top}/unlabeled/u.png": image_bytes(9310)})
    assert {name: sum(split.values()) for name, split in dataset.class_counts.items()} == {
        "ant": 3, "bee": 3}
    assert dataset.unlabeled_count == 1
    assert dataset.test_source == "holdout"
    assert dataset.skipped == []


def test_a_single_folder_of_images_without_class_folders_is_still_one_class(
    tmp_path: Path,
) -> None:
    with pytest.raises(ingest.IngestError) as caught:
        prepared(tmp_path, {"photos/a.png": image_bytes(9300), "photos/b.png": image_bytes(9301)})
    assert caught.value.detail.startswith("found 1 class ('photos'); at least two are needed")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_second_file_with_the_same_path_is_skipped_and_listed(
    server: LiveServer, client: httpx.Client, kind: str
) -> None:
    # `tar -r` and `zip` appends can store one path twice; unpacking keeps one of them, and
    # two images with one path would make predictions.csv ambiguous.
    entries = [*class_entries().items(), ("cat/0.png", image_bytes(90601))]
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as archive, pytest.warns(UserWarning, match="Duplicate"):
            for name, data in entries:
                archive.writestr(name, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    summary = uploaded(client, buffer.getvalue(), f"twice.{kind}")
    assert summary["skipped"] == [{
        "path": "cat/0.png",
        "reason": "a second file with the same path in the archive (added twice?): "
                  "the first one is kept"}]
    assert totals(summary) == {"cat": 3, "dog": 3}
    images = client.get(f"/api/datasets/{summary['id']}/images", params={"limit": 100}).json()
    paths = [image["original_path"] for image in images["items"]]
    assert len(paths) == len(set(paths)) == 6
    delete_all(server, client)


# --- Archives cut short -------------------------------------------------------------------


def good_zip() -> bytes:
    return zip_bytes(class_entries(("ant", "zebra"), per_class=6))


def good_tar(gz: bool) -> bytes:
    return tar_bytes(class_entries(("ant", "zebra"), per_class=6), gz=gz)


def entry_offset(tar: bytes, index: int) -> int:
    """Where the header of a tar's entry `index` begins."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return archive.getmembers()[index].offset


@pytest.mark.parametrize(("build", "filename"), [
    pytest.param(lambda: good_zip()[:-100], "a.zip", id="zip-without-its-last-100-bytes"),
    pytest.param(lambda: good_zip()[:len(good_zip()) // 2], "a.zip", id="zip-cut-in-half"),
    pytest.param(lambda: zip_bytes({})[:10], "a.zip", id="empty-zip-cut-short"),
    pytest.param(lambda: good_tar(gz=True)[:-100], "a.tar.gz",
                 id="tar-gz-without-its-last-100-bytes"),
    pytest.param(lambda: good_tar(gz=False)[:3000], "a.tar", id="tar-cut-inside-an-image"),
    # Where the 7th entry begins: ant/ whole, zebra/ missing, and tarfile reads no error.
    pytest.param(lambda: good_tar(gz=False)[:entry_offset(good_tar(gz=False), 6)], "a.tar",
                 id="tar-cut-where-an-entry-ends"),
    pytest.param(lambda: good_tar(gz=False)[:entry_offset(good_tar(gz=False), 6) + 200],
                 "a.tar", id="tar-cut-inside-a-header"),
])
def test_an_archive_cut_short_is_refused_as_damaged_and_leaves_nothing(
    server: LiveServer, client: httpx.Client, build, filename: str
) -> None:
    response = upload(client, build(), filename)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    kind = "zip" if filename.endswith(".zip") else "tar"
    assert detail.startswith(f"the {kind} archive is damaged or truncated (cut short by an "
                             "incomplete download?): ")
    assert detail.endswith("make or download the archive again")
    assert_nothing_left(server)


# --- 16-bit images ------------------------------------------------------------------------


def png16(seed: int) -> bytes:
    """A 16-bit grayscale PNG holding 12-bit values (0..4095), as scientific cameras write."""
    values = np.random.default_rng(seed).integers(0, 4096, size=(48, 64), dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 4095
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnails_and_trained_pixels(
    client: httpx.Client, originals: dict[str, bytes], tmp_path: Path,
    white_level: int | None = None,
) -> Iterator[tuple[dict, np.ndarray, httpx.Response]]:
    """Upload `originals` (archive path -> bytes); for each stored image, the pixels the
    worker's decoder gives it (with `white_level`) and the answer for its thumbnail."""
    from worker.selftuning.images import open_rgb  # the worker's decoder (imports torch)

    summary = uploaded(client, zip_bytes(originals))
    images = client.get(f"/api/datasets/{summary['id']}/images").json()["items"]
    assert len(images) == len(originals)
    source = tmp_path / "original.png"
    for image in images:
        source.write_bytes(originals[image["original_path"]])
        trained_on = np.asarray(open_rgb(source, white_level=white_level), dtype=np.float64)
        response = client.get(f"/api/datasets/{summary['id']}/images/{image['id']}/thumbnail")
        assert response.status_code == 200
        yield image, trained_on, response


def test_a_16_bit_image_thumbnail_shows_what_the_worker_trains_on(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    originals = {f"{name}/{n}.png": png16(100 * index + n)
                 for index, name in enumerate(("cellA", "cellB")) for n in range(3)}
    assert Image.open(io.BytesIO(originals["cellA/0.png"])).mode in ("I;16", "I")
    # Scaled by the dataset's white level, 12 bits (see test_data's white level tests):
    # values of 0..4095 average mid-grey, not the near black of 16-bit scaling.
    for _, trained_on, response in thumbnails_and_trained_pixels(client, originals, tmp_path,
                                                                 white_level=4095):
        assert 120 < trained_on.mean() < 135
        assert response.headers["etag"].endswith('-w4095"')  # made with the white level
        thumbnail = Image.open(io.BytesIO(response.content))
        assert thumbnail.mode == "RGB"
        assert abs(np.asarray(thumbnail, dtype=np.float64).mean() - trained_on.mean()) < 3
    delete_all(server, client)


def float_tiff(seed: int, poison: float | None = None) -> bytes:
    """A 32-bit float TIFF of values in 0-1, its first pixel `poison` when given."""
    values = np.random.default_rng(seed).random((16, 16), dtype=np.float32)
    if poison is not None:
        values[0, 0] = poison
    buffer = io.BytesIO()
    Image.fromarray(values, "F").save(buffer, "TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_float_images_marking_no_data_with_nan_or_infinity_are_taken(
    server: LiveServer, client: httpx.Client, tmp_path: Path, poison: float
) -> None:
    """Scientific float TIFFs mark "no data" with NaN (or an infinity): working out the
    white level took math.ceil of it, and the upload was a 500."""
    originals = {f"{name}/{n}.tif": float_tiff(10 * index + n, poison if n == 0 else None)
                 for index, name in enumerate(("a", "b")) for n in range(3)}
    for image, trained_on, response in thumbnails_and_trained_pixels(client, originals,
                                                                     tmp_path, white_level=1):
        assert response.headers["etag"].endswith('-w1"')  # 0-1 values: white is 1
        thumbnail = np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.float64)
        assert abs(thumbnail.mean() - trained_on.mean()) < 3, image["original_path"]
        if image["original_path"].endswith("/0.tif"):  # no data reads black, inf white
            assert trained_on[0, 0, 0] == (0 if poison != poison else 255)
    delete_all(server, client)


def test_a_white_level_recorded_by_an_older_version_is_worked_out_again(
    server: LiveServer, client: httpx.Client
) -> None:
    """Before 1 was a white level, an upload of 0-1 float images recorded 255, and the web
    kept that record for good: the thumbnails stayed black while every run, which works the
    level out from the files, trained on them at 1."""
    delete_all(server, client)  # this upload's record is the only one
    originals = {f"{name}/{n}.tif": float_tiff(10 * index + n)
                 for index, name in enumerate(("a", "b")) for n in range(3)}
    summary = uploaded(client, zip_bytes(originals))
    (record,) = (server.data_dir / "cache" / "thumbs").glob(f"*/{ingest.WHITE_LEVEL_FILE}")
    assert json.loads(record.read_text())["white_level"] == 1
    record.write_text(json.dumps({"white_level": 255}))  # as the older version wrote it
    image = client.get(f"/api/datasets/{summary['id']}/images").json()["items"][0]
    response = client.get(f"/api/datasets/{summary['id']}/images/{image['id']}/thumbnail")
    assert response.headers["etag"].endswith('-w1"')
    assert json.loads(record.read_text())["white_level"] == 1
    delete_all(server, client)


def transparent_logo(mode: str, shift: int) -> bytes:
    """A white opaque square on a black ground that is wholly transparent."""
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), (24 + shift, 24, 40 + shift, 40))
    image = {"RGBA": rgba, "LA": rgba.convert("LA"),
             "P": rgba.convert("RGB").convert("P")}[mode]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"transparency": 0} if mode == "P" else {}))
    return buffer.getvalue()


def test_thumbnails_of_transparent_images_show_what_the_worker_trains_on(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    """Thumbnails painted transparency white while the worker, as timm's convert("RGB"),
    drops it: a white logo on a transparent black ground showed all white and trained white
    on black (107-187 levels apart on average)."""
    originals = {f"{mode}/{n}.png": transparent_logo(mode, n) for mode in ("RGBA", "LA", "P")
                 for n in range(2)}
    for image, trained_on, response in thumbnails_and_trained_pixels(client, originals,
                                                                     tmp_path):
        assert trained_on[0, 0].tolist() == [0, 0, 0] and trained_on[32, 32].tolist() == [
            255, 255, 255]
        thumbnail = np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.float64)
        assert thumbnail.shape == trained_on.shape
        assert np.abs(thumbnail - trained_on).mean() < 3, image["original_path"]
    delete_all(server, client)


def test_an_upload_of_8_bit_images_records_that_it_has_no_white_level(
    server: LiveServer, client: httpx.Client
) -> None:
    from app.db import get_sessionmaker
    from app.models import Dataset

    summary = uploaded(client, zip_bytes(class_entries()))
    settings = Settings(data_dir=server.data_dir, database_url=server.database_url)
    with get_sessionmaker(server.database_url)() as session:
        dataset = session.get(Dataset, summary["id"])
        record = ingest.thumbnail_dir(settings, dataset) / ingest.WHITE_LEVEL_FILE
        assert json.loads(record.read_text())["white_level"] is None
    delete_all(server, client)


def test_thumbnails_made_while_the_white_level_is_worked_out_are_not_deleted(
    server: LiveServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload records its white level for the thumbnails. A dataset uploaded before it
    did gets it worked out by the first thumbnail requests, which a dataset page sends
    together: each request that worked it out deleted the thumbnails made so far, under the
    requests serving them (500s and 404s, broken images on the page). Here the server's code
    runs in this process, on the uploaded dataset less its record, with working the level
    out slowed down so that the second request is still at it when the first has made its
    thumbnail."""
    from sqlalchemy.orm import selectinload

    from app.db import get_sessionmaker
    from app.models import Dataset

    originals = {f"{name}/{n}.png": png16(1000 + 100 * index + n)
                 for index, name in enumerate(("cellA", "cellB")) for n in range(3)}
    summary = uploaded(client, zip_bytes(originals))
    settings = Settings(data_dir=server.data_dir, database_url=server.database_url)
    with get_sessionmaker(server.database_url)() as session:
        dataset = session.get(Dataset, summary["id"], options=[selectinload(Dataset.images)])
        first, second = dataset.images[:2]
        record = ingest.thumbnail_dir(settings, dataset) / ingest.WHITE_LEVEL_FILE
        assert json.loads(record.read_text())["white_level"] == 4095  # from the upload
        record.unlink()
        slow = ingest.white_level_of
        calls = []

        def slowly(paths):
            calls.append(1)
            time.sleep(0.3)
            return slow(paths)

        def request(image):  # what the thumbnail route does
            level = ingest.dataset_white_level(settings, dataset)
            return ingest.thumbnail(settings, dataset, image, level)

        monkeypatch.setattr(ingest, "white_level_of", slowly)
        with ThreadPoolExecutor(2) as pool:
            made = pool.submit(request, first)
            time.sleep(0.1)
            also = pool.submit(request, second)
            first_path, second_path = made.result(), also.result()
        assert first_path.is_file() and second_path.is_file()
        assert len(calls) == 1  # the second request waited for the first one's answer
        assert json.loads(record.read_text())["white_level"] == 4095
    response = client.get(f"/api/datasets/{summary['id']}/images/{first.id}/thumbnail")
    assert response.status_code == 200
    assert response.content == first_path.read_bytes()
    delete_all(server, client)


def test_a_datasets_white_level_lock_lasts_only_while_a_request_holds_it(
    server: LiveServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock that lets one request at a time work a dataset's white level out stayed in
    the web process for good, one for every dataset ever shown. It goes once the requests
    that held it have their answer."""
    from sqlalchemy.orm import selectinload

    from app.db import get_sessionmaker
    from app.models import Dataset

    originals = {f"cell{name}/{n}.png": png16(2000 + 10 * index + n)
                 for index, name in enumerate("AB") for n in range(2)}
    summary = uploaded(client, zip_bytes(originals))
    settings = Settings(data_dir=server.data_dir, database_url=server.database_url)
    with get_sessionmaker(server.database_url)() as session:
        dataset = session.get(Dataset, summary["id"], options=[selectinload(Dataset.images)])
    (ingest.thumbnail_dir(settings, dataset) / ingest.WHITE_LEVEL_FILE).unlink()
    working, finish = threading.Event(), threading.Event()
    real = ingest.white_level_of

    def held(paths):
        working.set()
        assert finish.wait(30)
        return real(paths)

    monkeypatch.setattr(ingest, "white_level_of", held)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ingest.dataset_white_level, settings, dataset)
        assert working.wait(30)
        second = pool.submit(ingest.dataset_white_level, settings, dataset)
        assert ingest._WHITE_LEVEL_LOCKS[dataset.storage_key].locked()
        finish.set()
        assert first.result(30) == second.result(30) == 4095
    assert dataset.storage_key not in ingest._WHITE_LEVEL_LOCKS
    assert ingest.dataset_white_level(settings, dataset) == 4095  # from its record now
    delete_all(server, client)


def test_thumbnails_of_images_accepted_before_the_pixel_limit_was_lowered(
    tmp_path: Path, redis_url: str
) -> None:
    """SELFTUNE_MAX_IMAGE_PIXELS guards uploads; images stored under a higher setting keep
    their thumbnails after a restart with a lower one (they were a plain-text 500). Only
    files of the size checked at upload are decoded: one replaced behind the app's back by
    a huge one is not."""
    from app.db import session_scope
    from app.models import Dataset, DatasetImage
    from tests.test_datasets_support import dataset_server, png_with_declared_size

    entries = class_entries(per_class=2)  # 16 x 16 = 256 pixels each
    with dataset_server(tmp_path, redis_url) as server, server.client() as client:
        dataset_id = uploaded(client, zip_bytes(entries))["id"]
    with (dataset_server(tmp_path, redis_url, SELFTUNE_MAX_IMAGE_PIXELS="100") as server,
          server.client() as client):
        images = client.get(f"/api/datasets/{dataset_id}/images").json()["items"]
        assert len(images) == len(entries)
        replaced, kept = images[0], images[1:]
        for image in kept:
            response = client.get(f"/api/datasets/{dataset_id}/images/{image['id']}/thumbnail")
            assert response.status_code == 200, response.text
            assert Image.open(io.BytesIO(response.content)).size == (16, 16)
        refused = upload(client, zip_bytes(class_entries(per_class=2, prefix="again/")))
        assert refused.status_code == 422
        assert "declares 16x16 = 256 pixels, over the limit of 100" in refused.text

        with session_scope(server.database_url) as session:
            stored = session.get(DatasetImage, replaced["id"])
            storage_key = session.get(Dataset, dataset_id).storage_key
            path = server.data_dir / "datasets" / storage_key / stored.path
        path.write_bytes(png_with_declared_size(100_000, 100_000))
        response = client.get(f"/api/datasets/{dataset_id}/images/{replaced['id']}/thumbnail")
        assert response.status_code == 404
        assert response.json()["detail"].endswith("is missing or was replaced")


def test_an_archive_sent_without_a_filename_is_taken_by_its_content(
    server: LiveServer, client: httpx.Client
) -> None:
    """`curl -F 'file=<photos.zip'` sends the bytes of a `file` part without a filename
    (it was refused as 'no archive in the form'); the dataset gets the default name."""
    boundary = "selftune-no-filename"
    archive = zip_bytes(class_entries(per_class=2))
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + archive + (
        f"\r\n--{boundary}--\r\n").encode()
    response = client.post("/api/datasets", content=body,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 201, response.text
    summary = response.json()
    assert summary["name"] == "dataset" and totals(summary) == {"cat": 2, "dog": 2}
    delete_all(server, client)


@pytest.mark.parametrize("ending", [b"", b"\r\n--selftune-cut\r\n"],
                         ids=["no-closing-boundary", "a-boundary-that-is-not-the-last"])
def test_a_form_that_ends_before_its_closing_boundary_is_refused(
    server: LiveServer, client: httpx.Client, ending: bytes
) -> None:
    """A form cut short between two writes of its file (its client died) was taken whole:
    the closing `--boundary--` is what says the file ended. A tar cut where an entry ends
    reads well too, and was stored with a class and the test split missing."""
    archive = good_tar(gz=False)
    body = (b'--selftune-cut\r\nContent-Disposition: form-data; name="file"; '
            b'filename="a.tar"\r\n\r\n' + archive[:entry_offset(archive, 6)] + ending)
    response = client.post("/api/datasets", content=body, headers={
        "Content-Type": "multipart/form-data; boundary=selftune-cut"})
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == (
        "the multipart body is incomplete: it ends before the form's closing boundary (cut "
        "short?): send it again")
    assert_nothing_left(server)


def test_api_addresses_with_a_trailing_slash_are_the_same_addresses(
    server: LiveServer, client: httpx.Client
) -> None:
    """`curl -F file=@photos.zip .../api/datasets/` got a 307 that curl does not follow, so
    the upload was lost without a word; now it lands like the address without the slash."""
    response = client.post("/api/datasets/", files={"file": ("photos.zip",
                                                              zip_bytes(class_entries()))})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    assert client.get(f"/api/datasets/{dataset_id}/").json()["id"] == dataset_id
    assert [d["id"] for d in client.get("/api/datasets/").json()] == [dataset_id]
    delete_all(server, client)


def test_an_upload_the_client_abandons_leaves_nothing_and_logs_no_traceback(
    server: LiveServer, client: httpx.Client
) -> None:
    """Closing the tab mid-upload: the half-received archive goes, and the server log says
    nothing alarming (it held a ClientDisconnect traceback)."""
    import socket
    import time
    from urllib.parse import urlsplit

    log = server.data_dir.parent / "uvicorn.log"
    logged_before = log.read_text()
    boundary = "selftune-abandoned"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename=\"photos.zip\"\r\n\r\n").encode() + zip_bytes(class_entries())[:200]
    address = urlsplit(server.url)
    work = server.data_dir / "tmp"

    def receiving() -> bool:
        return work.is_dir() and any(work.iterdir())

    with socket.create_connection((address.hostname, address.port)) as connection:
        connection.sendall(
            (f"POST /api/datasets HTTP/1.1\r\nHost: {address.netloc}\r\n"
             f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
             "Content-Length: 1000000\r\n\r\n").encode() + head)
        deadline = time.monotonic() + 20
        while not receiving():  # the server has begun to store the upload
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
    deadline = time.monotonic() + 20
    while receiving():
        assert time.monotonic() < deadline, list(work.rglob("*"))
        time.sleep(0.2)
    assert client.get("/api/datasets").json() == []
    time.sleep(1)  # what the server logs on the way out comes after the clean-up
    assert "Traceback" not in log.read_text()[len(logged_before):]


def test_an_upload_the_client_leaves_while_it_is_verified_is_not_stored(
    server: LiveServer, client: httpx.Client
) -> None:
    """Verifying a large upload takes minutes: a client that went away meanwhile (the tab
    closed, curl interrupted) still got its dataset stored. It is dropped now."""
    import socket
    from urllib.parse import urlsplit

    log = server.data_dir.parent / "uvicorn.log"
    logged_before = log.read_text()
    boundary = "selftune-left"
    archive = zip_bytes(class_entries([f"class{c}" for c in range(20)], per_class=100))
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename=\"photos.zip\"\r\n\r\n").encode() + archive + (
            f"\r\n--{boundary}--\r\n").encode()
    address = urlsplit(server.url)
    work = server.data_dir / "tmp"

    def verifying() -> bool:
        return any(work.glob("*/incoming/*"))

    with socket.create_connection((address.hostname, address.port)) as connection:
        connection.sendall(
            (f"POST /api/datasets HTTP/1.1\r\nHost: {address.netloc}\r\n"
             f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
             f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        deadline = time.monotonic() + 30
        while not verifying():  # the whole body is in; its images are being checked
            assert time.monotonic() < deadline, "the verification never started"
            time.sleep(0.02)
    deadline = time.monotonic() + 60
    while any(work.iterdir()):
        assert time.monotonic() < deadline, list(work.rglob("*"))[:5]
        time.sleep(0.2)
    assert client.get("/api/datasets").json() == []
    assert not any((server.data_dir / "datasets").glob("*"))
    time.sleep(1)
    assert "Traceback" not in log.read_text()[len(logged_before):]


# --- The web and the command line read one layout alike -----------------------------------


def test_the_web_and_the_command_line_read_one_layout_alike(tmp_path: Path) -> None:
    """Class names in both Unicode spellings ("café" composed, and "cafe" plus a combining
    accent as macOS writes it) are one class; `Unlabeled/` in capitals is the unlabeled
    folder; classes are numbered in natural order (class2 before class10), so one seed draws
    the same labeled subset from an upload and from `python -m worker.selftuning`; a class's
    images in folders inside its folder are its own; hidden folders are left out; and an
    unlabeled image in the test split is skipped, saying why (test images are what accuracy
    is scored on). The command line used to ignore the images in a class's inner folders
    (a class of only those vanished), take hidden folders' images, and refuse
    `test/unlabeled/` as "not a class of train/"."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    entries = {
        # One image twice, first in the test split: the copy in test/ stays on both sides.
        "test/class10/twice.png": image_bytes(9404),
        **class_entries((composed, "class10", "class2"), per_class=2, prefix="train/"),
        "train/class10/twice.png": image_bytes(9404),
        **class_entries((decomposed,), per_class=2, prefix="train/", seed=1),
        **class_entries((decomposed, "class10", "class2"), per_class=1, prefix="test/", seed=2),
        **class_entries(("2019", "2020"), per_class=1, prefix="train/class2/", seed=3),
        **class_entries(("summer",), per_class=2, prefix="train/deep/", seed=4),
        "test/deep/1.png": image_bytes(9402),
        "Unlabeled/u.png": image_bytes(9400),
        "Unlabeled/.thumbnails/h.png": image_bytes(9403),
        "test/unlabeled/t.png": image_bytes(9401),
    }
    web = prepared(tmp_path / "web", entries)
    assert web.class_names == [composed, "class2", "class10", "deep"]
    assert web.class_counts[composed] == {"train": 4, "test": 1}
    assert web.class_counts["class2"] == {"train": 4, "test": 1}
    assert web.class_counts["deep"] == {"train": 2, "test": 1}
    assert web.class_counts["class10"] == {"train": 2, "test": 2}
    assert web.unlabeled_count == 1
    web_skipped = {item.path: item.reason for item in web.skipped}
    assert web_skipped == {"Unlabeled/.thumbnails/h.png": "hidden file or folder",
                           "test/unlabeled/t.png": UNLABELED_IN_TEST,
                           "train/class10/twice.png": "duplicate of test/class10/twice.png"}

    folder = tmp_path / "cli"
    for path, data in entries.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    skipped: dict[str, str] = {}
    class_names, train, test, unlabeled = load_folder_dataset(folder, skipped)
    train, test, unlabeled, dropped = drop_duplicates(train, test, unlabeled)
    assert class_names == web.class_names
    assert Counter(label for _, label in train) == {0: 4, 1: 4, 2: 2, 3: 2}
    assert Counter(label for _, label in test) == {0: 1, 1: 1, 2: 2, 3: 1}
    assert dropped == [(str(folder / "train/class10/twice.png"),
                        str(folder / "test/class10/twice.png"))]
    assert [Path(path).name for path in unlabeled] == ["u.png"]
    assert skipped == {str(folder / path): reason for path, reason in web_skipped.items()
                       if not path.startswith("train/class10/")}  # duplicates: dropped


def test_a_test_image_without_a_label_in_labels_csv_is_refused_with_its_line(
    tmp_path: Path,
) -> None:
    """It used to join the unlabeled training images without a word."""
    with pytest.raises(ingest.IngestError) as caught:
        prepared(tmp_path, {
            "a.png": image_bytes(9500), "b.png": image_bytes(9501), "c.png": image_bytes(9502),
            "labels.csv": b"path,label,split\na.png,ant\nb.png,bee\nc.png,,test\n",
        })
    assert caught.value.detail.startswith(
        "labels.csv line 4: 'c.png' is in the test split without a label: accuracy is scored "
        "on test images, so each needs one")


def test_class_names_with_control_characters_are_refused_or_skipped(tmp_path: Path) -> None:
    """A NUL, tab or line break in a class name is a mistake (a stray quote in labels.csv, a
    mangled folder name) that was kept, and reached the exported model's label names."""
    images = {"a.png": image_bytes(9510), "b.png": image_bytes(9511), "c.png": image_bytes(9512)}
    for label in ("b\x00ee", "b\tee", "b\nee"):
        cell = '"b\nee"' if "\n" in label else label
        with pytest.raises(ingest.IngestError) as caught:
            csv_text = f"path,label\na.png,ant\nb.png,{cell}\nc.png,ant\n"
            prepared(tmp_path / str(ord(label[1])), {**images, "labels.csv": csv_text.encode()})
        assert caught.value.detail == (
            f"labels.csv line 3: the label {label!r} has a control character (a tab, line break "
            "or NUL): class names may not")

    dataset = prepared(tmp_path / "folders", {**class_entries(("ant", "bee", "b\tee"))})
    assert dataset.class_names == ["ant", "bee"]
    assert {item.path: item.reason for item in dataset.skipped} == {
        f"b\tee/{n}.png": "its class folder's name has a control character (a tab or line "
                          "break): rename the folder" for n in range(3)}
