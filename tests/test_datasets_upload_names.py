"""Accepted uploads with awkward file names: names in a legacy encoding (not UTF-8) and
images whose extension is missing or unknown (recognised by their content)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
import zlib
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from alembic import command

from app.db import alembic_config, get_engine
from tests.support import LiveServer, add_dataset_row
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
from worker.selftuning import load_folder_dataset

NOT_UTF8 = "file or folder name is not valid UTF-8: rename it"


def encoded(entries: dict[str, bytes]) -> dict[bytes, bytes]:
    return {name.encode(): data for name, data in entries.items()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def accepted(client: httpx.Client, data: bytes, filename: str) -> dict:
    response = upload(client, data, filename)
    assert response.status_code == 201, response.text
    return response.json()


def all_images(client: httpx.Client, dataset_id: int) -> list[dict]:
    response = client.get(f"/api/datasets/{dataset_id}/images", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()["items"]


def class_totals(summary: dict) -> dict[str, int]:
    return {item["name"]: item["train"] + item["test"] for item in summary["classes"]}


def assert_readable_everywhere(client: httpx.Client, summary: dict) -> str:
    """The dataset reads back the same over the API and renders as a page; returns the page."""
    again = client.get(f"/api/datasets/{summary['id']}")
    assert again.status_code == 200, again.text
    assert again.json() == summary
    listing = client.get("/api/datasets")
    assert listing.status_code == 200, listing.text
    all_images(client, summary["id"])
    page = client.get(f"/datasets/{summary['id']}")
    assert page.status_code == 200, page.text
    return page.text


def delete(server: LiveServer, client: httpx.Client, summary: dict) -> None:
    assert client.delete(f"/api/datasets/{summary['id']}").status_code == 204
    assert_nothing_left(server)


@pytest.mark.parametrize(("tar_format", "gz", "filename"), [
    (tarfile.GNU_FORMAT, True, "legacy.tar.gz"),
    (tarfile.PAX_FORMAT, False, "legacy.tar"),
    (tarfile.USTAR_FORMAT, True, "legacy.tgz"),
], ids=["gnu-gz", "pax", "ustar-gz"])
def test_tar_image_named_in_latin1_is_skipped_with_a_rename_reason(
    server: LiveServer, client: httpx.Client, tar_format: int, gz: bool, filename: str
) -> None:
    entries = {
        **encoded(class_entries(("cat", "dog"), per_class=3)),
        b"cat/caf\xe9.jpg": image_bytes(90101, fmt="JPEG"),
        # A whole class folder named in Latin-1: its images are skipped the same way.
        b"r\xe9sum\xe9/0.png": image_bytes(90102),
        b"r\xe9sum\xe9/1.png": image_bytes(90103),
    }
    summary = accepted(client, legacy_tar(entries, tar_format, gz), filename)

    assert summary["skipped"] == [
        {"path": "cat/caf\ufffd.jpg", "reason": NOT_UTF8},
        {"path": "r\ufffdsum\ufffd/0.png", "reason": NOT_UTF8},
        {"path": "r\ufffdsum\ufffd/1.png", "reason": NOT_UTF8},
    ]
    assert class_totals(summary) == {"cat": 3, "dog": 3}
    page = assert_readable_everywhere(client, summary)
    assert "cat/caf\ufffd.jpg" in page and NOT_UTF8 in page
    assert {image["original_path"] for image in all_images(client, summary["id"])} == set(
        class_entries(("cat", "dog"), per_class=3)
    )
    delete(server, client, summary)


def test_errors_that_names_not_in_utf8_explain_say_so(
    server: LiveServer, client: httpx.Client
) -> None:
    # A wrapping folder named in Latin-1: every image is skipped.
    wrapped = encoded(class_entries(("cat", "dog"), per_class=3))
    response = upload(client, legacy_tar({b"Fotos-\xe9t\xe9/" + name: data
                                          for name, data in wrapped.items()}), "fotos.tar.gz")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("the archive has no usable images (6 file(s) skipped because")
    assert "not valid UTF-8, such as 'Fotos-\ufffdt\ufffd/cat/0.png': rename them" in detail
    assert_nothing_left(server)

    # One of two class folders named in Latin-1: one class is left.
    entries = {**encoded(class_entries(("cat",), per_class=3)),
               b"chi\xe9n/0.png": image_bytes(90150), b"chi\xe9n/1.png": image_bytes(90151)}
    response = upload(client, legacy_tar(entries), "pets.tar.gz")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("found 1 class ('cat'); at least two are needed")
    assert "(2 file(s) skipped because their name or folder name is not valid UTF-8" in detail
    assert_nothing_left(server)


def test_tar_whose_only_odd_names_are_skipped_anyway_stores_readable_reports(
    server: LiveServer, client: httpx.Client
) -> None:
    entries = {
        **encoded(class_entries(("cat", "dog"), per_class=3)),
        b"notes-\xe9t\xe9.txt": b"shot in 2023",
        b"cat/.caf\xe9.png": image_bytes(90201),
        b"__MACOSX/dog/._\xe9.png": b"\0\5\26\7 resource fork",
    }
    summary = accepted(client, legacy_tar(entries), "odd.tar.gz")

    assert summary["skipped"] == [
        {"path": "notes-\ufffdt\ufffd.txt", "reason": NOT_UTF8},
        {"path": "cat/.caf\ufffd.png", "reason": "hidden file or folder"},
        {"path": "__MACOSX/dog/._\ufffd.png", "reason": "macOS metadata (__MACOSX)"},
    ]
    assert summary["image_count"] == 6
    page = assert_readable_everywhere(client, summary)
    assert "notes-\ufffdt\ufffd.txt" in page
    delete(server, client, summary)


def test_tar_with_labels_csv_and_names_not_in_utf8(
    server: LiveServer, client: httpx.Client
) -> None:
    images = {f"data/img/{n}.png": image_bytes(90300 + n) for n in range(6)}
    images["data/img/raw"] = image_bytes(90306, fmt="JPEG")  # no extension, listed in the csv
    csv_text = "path,label\n" + "".join(
        f"img/{n}.png,{'cat' if n < 3 else 'dog'}\n" for n in range(6)
    ) + "img/raw,dog\n"
    entries = {
        **encoded(images),
        b"data/img/caf\xe9.png": image_bytes(90310),
        b"data/labels.csv": csv_text.encode(),
    }
    summary = accepted(client, legacy_tar(entries), "csv.tar.gz")
    assert summary["skipped"] == [{"path": "data/img/caf\ufffd.png", "reason": NOT_UTF8}]
    assert class_totals(summary) == {"cat": 3, "dog": 4}
    assert "data/img/raw" in {image["original_path"] for image in all_images(client, summary["id"])}
    assert_readable_everywhere(client, summary)
    delete(server, client, summary)

    # labels.csv naming the file in UTF-8 while the archive has it in Latin-1.
    listed = {**entries, b"data/labels.csv": (csv_text + "img/café.png,cat\n").encode()}
    response = upload(client, legacy_tar(listed), "csv.tar.gz")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "'img/café.png'" in detail and "not valid UTF-8" in detail
    assert_nothing_left(server)

    # labels.csv itself in Latin-1.
    latin1 = {**entries, b"data/labels.csv": csv_text.replace("dog", "chi\xe9n").encode("latin-1")}
    response = upload(client, legacy_tar(latin1), "csv.tar.gz")
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == "data/labels.csv is not UTF-8 text: save it as UTF-8 CSV"
    assert_nothing_left(server)


def rename_in_zip(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replaces a name's bytes in both the local and the central header (same length)."""
    assert len(old) == len(new) and data.count(old) == 2
    return data.replace(old, new)


def test_zip_names_without_the_utf8_flag_are_cp437_and_a_false_flag_is_refused(
    server: LiveServer, client: httpx.Client
) -> None:
    # No UTF-8 flag (an old Windows zip): the bytes are read as cp437, always valid text.
    data = rename_in_zip(zip_bytes({**class_entries(), "cat/cafX.png": image_bytes(90401)}),
                         b"cat/cafX.png", b"cat/caf\xe9.png")
    summary = accepted(client, data, "old.zip")
    assert summary["skipped"] == []
    assert "cat/caf\u0398.png" in {image["original_path"]
                                   for image in all_images(client, summary["id"])}
    assert_readable_everywhere(client, summary)
    delete(server, client, summary)

    # The UTF-8 flag set on a name that is not UTF-8: the zip itself is broken.
    data = rename_in_zip(zip_bytes({**class_entries(), "cat/caf\u00e9.png": image_bytes(90402)}),
                         "cat/caf\u00e9.png".encode(), b"cat/caf\xe9\xe9.png")
    response = upload(client, data, "broken.zip")
    assert response.status_code == 422, response.text
    assert "not valid UTF-8" in response.json()["detail"]
    assert_nothing_left(server)


def infozip_bytes() -> bytes:
    """A zip as Linux's `zip` (Info-ZIP 3.0) writes it: UTF-8 names without the UTF-8 flag
    (written in ASCII, so unflagged, and their bytes then made UTF-8 of the same length)."""
    data = zip_bytes(class_entries(("cafX1", "dog")) | {"unlabeled/uuX.png": image_bytes(90403)})
    assert data.count(b"cafX1/") == 6
    return (data.replace(b"cafX1/", "caf\u00e9/".encode())
            .replace(b"unlabeled/uuX.png", "unlabeled/\u00fcX.png".encode()))


def test_zip_names_in_utf8_without_the_flag_are_read_as_utf8(
    server: LiveServer, client: httpx.Client
) -> None:
    # Read as cp437, the class would be "caf\u251c\u2310", and so would the exported model's label.
    data = infozip_bytes()
    summary = accepted(client, data, "infozip.zip")
    assert summary["skipped"] == []
    assert class_totals(summary) == {"caf\u00e9": 3, "dog": 3}
    paths = {image["original_path"] for image in all_images(client, summary["id"])}
    assert {"caf\u00e9/0.png", "unlabeled/\u00fcX.png"} <= paths
    assert "caf\u00e9" in assert_readable_everywhere(client, summary)
    delete(server, client, summary)


KOT = "\u043a\u043e\u0442"  # a class name in Cyrillic
KOT_AS_CP437 = "\u00ac\u00ab\u0393"  # its cp866 bytes (aa ae e2) read as cp437


def winzip_bytes(stale: bool = False) -> bytes:
    """A zip as WinZip (or Windows with a Russian code page) writes it: the class folder
    KOT in cp866 bytes, unflagged, each entry with the UTF-8 name in a Unicode Path
    field. `stale`: the fields hold a name from before the entries were renamed."""
    legacy = KOT.encode("cp866")
    entries = class_entries(("koX", "dog"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            if name.startswith("koX/"):
                raw = name.encode().replace(b"koX", legacy)
                utf8 = name.replace("koX", KOT).encode()
                crc = zlib.crc32(b"old" + raw if stale else raw)
                field = bytes([1]) + crc.to_bytes(4, "little") + utf8
                info.extra = (0x7075).to_bytes(2, "little") + len(field).to_bytes(
                    2, "little") + field
            archive.writestr(info, data)
    data = buffer.getvalue()
    assert data.count(b"koX/") == 6  # 3 local headers and 3 central ones
    return data.replace(b"koX/", legacy + b"/")


def test_zip_names_in_a_legacy_code_page_are_read_from_their_unicode_path_field(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    """Without the field's name the class was KOT_AS_CP437 (its cp866 bytes read as cp437), on
    the pages and as the exported model's label."""
    summary = accepted(client, winzip_bytes(), "winzip.zip")
    assert class_totals(summary) == {KOT: 3, "dog": 3}
    assert f"{KOT}/0.png" in {image["original_path"]
                              for image in all_images(client, summary["id"])}
    assert KOT in assert_readable_everywhere(client, summary)
    delete(server, client, summary)
    archive = tmp_path / "winzip.zip"
    archive.write_bytes(winzip_bytes())
    assert load_folder_dataset(archive)[0] == ["dog", KOT]

    # A field written for another name (the entry renamed since) is not believed.
    summary = accepted(client, winzip_bytes(stale=True), "renamed.zip")
    assert class_totals(summary) == {KOT_AS_CP437: 3, "dog": 3}
    delete(server, client, summary)


def test_the_command_line_reads_utf8_zip_names_without_the_flag_as_the_web_does(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "infozip.zip"
    archive.write_bytes(infozip_bytes())
    class_names, train, _, unlabeled = load_folder_dataset(archive)
    assert class_names == ["caf\u00e9", "dog"]
    assert len(train) == 6
    assert [Path(path).name for path in unlabeled] == ["\u00fcX.png"]


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_images_with_a_missing_or_unknown_extension_are_recognised_by_content(
    server: LiveServer, client: httpx.Client, kind: str
) -> None:
    good = class_entries(("cat", "dog"), per_class=3)
    jpeg = image_bytes(90501, size=24, fmt="JPEG")
    jpeg_large = image_bytes(90502, size=24, fmt="JPEG")
    png = image_bytes(90503)
    tiff = image_bytes(90504, fmt="TIFF")
    entries = {
        **good,
        "cat/photo": jpeg,
        "dog/photo.jpg_large": jpeg_large,
        "dog/scan.dat": png,
        "cat/IMG_0001.raw": tiff,
        "cat/README": b"read me first",
        "cat/notes.xyz": b"plain text",
        "dog/bm.log": b"BM looks like a bitmap signature but is text" * 3,
        "dog/cut": jpeg[: len(jpeg) // 2],
    }
    data = zip_bytes(entries) if kind == "zip" else tar_bytes(entries)
    summary = accepted(client, data, f"photos.{kind}")

    reasons = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert set(reasons) == {"cat/README", "cat/notes.xyz", "dog/bm.log", "dog/cut"}
    assert reasons["cat/README"].startswith("not an image (no extension)")
    assert reasons["cat/notes.xyz"].startswith("not an image (.xyz)")
    assert reasons["dog/bm.log"].startswith("not an image (.log)")
    assert reasons["dog/cut"].startswith("corrupt image")
    assert class_totals(summary) == {"cat": 5, "dog": 5}

    images = all_images(client, summary["id"])
    assert {"cat/photo", "dog/photo.jpg_large", "dog/scan.dat", "cat/IMG_0001.raw"} <= {
        image["original_path"] for image in images
    }
    # Stored byte for byte under the suffix of the format found, like any other image.
    by_sha = {sha256(path.read_bytes()): path.suffix for path in stored_files(server,
                                                                              summary["id"])}
    assert by_sha[sha256(jpeg)] == by_sha[sha256(jpeg_large)] == ".jpg"
    assert by_sha[sha256(png)] == ".png" and by_sha[sha256(tiff)] == ".tif"
    for image in images:
        thumb = client.get(f"/api/datasets/{summary['id']}/images/{image['id']}/thumbnail")
        assert thumb.status_code == 200, image
    assert_readable_everywhere(client, summary)
    delete(server, client, summary)


def test_skipped_names_stored_before_the_utf8_check_become_readable(
    database_url: str, tmp_path: Path, redis_url: str
):
    """Migration 0005: a dataset stored by the older code with a skipped file whose name was
    not UTF-8 (kept as lone surrogates) gave a 500 on its page and in the API; after the
    upgrade both answer, the bad bytes shown as U+FFFD."""
    # The row is made with today's schema, then taken back to 0004 (the model has columns
    # 0004 lacks), where the older code's list is written column by column.
    command.upgrade(alembic_config(database_url), "head")
    dataset_id = add_dataset_row(database_url)
    command.downgrade(alembic_config(database_url), "0004")
    stored = [
        {"path": "train/a/notes\udce9.txt", "reason": "not an image (.txt)"},
        {"path": "unlabeled/\udce9t\udce9.png", "reason": "corrupt or unsupported image"},
        {"path": "train/b/fine.txt", "reason": "not an image (.txt)"},
    ]
    datasets = sa.table("datasets", sa.column("id", sa.Integer), sa.column("skipped", sa.JSON))
    with get_engine(database_url).begin() as connection:
        connection.execute(datasets.update().where(datasets.c.id == dataset_id)
                           .values(skipped=stored))
    get_engine(database_url).dispose()

    with (
        dataset_server(tmp_path, redis_url, database_url=database_url) as server,
        server.client() as client,
    ):
        body = client.get(f"/api/datasets/{dataset_id}")
        page = client.get(f"/datasets/{dataset_id}")
    assert body.status_code == 200, body.text
    assert [item["path"] for item in body.json()["skipped"]] == [
        "train/a/notes\ufffd.txt", "unlabeled/\ufffdt\ufffd.png", "train/b/fine.txt"]
    assert page.status_code == 200 and "notes\ufffd.txt" in page.text


def test_a_name_typed_in_decomposed_unicode_counts_its_characters_once_composed(
    server: LiveServer, client: httpx.Client
) -> None:
    """150 accented letters typed as letter + combining accent (as macOS file names and some
    keyboards give them) were 300 code points, refused as over the 200 a name may have; the
    same name typed composed was accepted. Names are kept composed (NFC), as class names are."""
    decomposed, composed = "e\u0301" * 150, "\u00e9" * 150
    response = upload(client, zip_bytes(class_entries(("cat", "dog"))), name=decomposed)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == composed
    assert client.delete(f"/api/datasets/{response.json()['id']}").status_code == 204
    # One code point over, composed or not: still refused.
    too_long = upload(client, zip_bytes(class_entries(("cat", "dog"))), name="e\u0301" * 201)
    assert too_long.status_code == 422 and "at most 200 characters" in too_long.text
    assert_nothing_left(server)


def test_class_names_of_digit_like_characters_upload_and_number_as_on_the_command_line(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    """Python calls "①" and "²" digits (str.isdigit) but int() refuses them: class folders
    named so were a 500 on upload, and "invalid literal for int()" on the command line."""
    names = ["②", "①", "size_10²", "10", "2", "٣"]  # "٣" is the Arabic-Indic 3, a number
    data = zip_bytes(class_entries(names, per_class=2))
    summary = accepted(client, data, "digits.zip")
    order = [item["name"] for item in summary["classes"]]
    assert order[:3] == ["2", "٣", "10"] and set(order[3:]) == {"②", "①", "size_10²"}
    assert_readable_everywhere(client, summary)
    archive = tmp_path / "digits.zip"
    archive.write_bytes(data)
    assert load_folder_dataset(archive)[0] == order
    delete(server, client, summary)


def test_class_folders_named_with_spaces_around_are_the_classes_without_them(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    """labels.csv's cells are read without the spaces around them, so a class folder `cat `
    was a class that the app's own download (a labels.csv) gave back as `cat`: uploaded
    again, the dataset had other classes. A class is named without them wherever it is read;
    `cat ` beside `cat` is one class, and a folder named with spaces only is skipped."""
    entries = {**class_entries(("cat ", " dog"), per_class=3),
               **class_entries(("cat",), per_class=2, seed=1),
               **class_entries(("   ",), per_class=2, seed=2)}
    data = zip_bytes(entries)
    summary = accepted(client, data, "spaces.zip")
    assert class_totals(summary) == {"cat": 5, "dog": 3}
    assert summary["skipped"] == [
        {"path": f"   /{n}.png", "reason": "its class folder's name is blank (spaces only): "
         "rename the folder"} for n in range(2)]
    assert_readable_everywhere(client, summary)

    tar = client.get(f"/api/datasets/{summary['id']}/archive")
    assert tar.status_code == 200, tar.text
    again = accepted(client, tar.content, "spaces.tar")
    assert [c["name"] for c in again["classes"]] == ["cat", "dog"]
    assert {c["name"]: c["train"] + c["test"] for c in again["classes"]} == {"cat": 5, "dog": 3}

    archive = tmp_path / "spaces.zip"  # the command line reads the folders the same way
    archive.write_bytes(data)
    skipped: dict[str, str] = {}
    classes, train, _, _ = load_folder_dataset(archive, skipped)
    assert classes == ["cat", "dog"] and len(train) == 8
    assert sorted(Path(path).parent.name for path in skipped) == ["   ", "   "]
    assert set(skipped.values()) == {"its class folder's name is blank (spaces only): rename "
                                     "the folder"}
    assert client.delete(f"/api/datasets/{again['id']}").status_code == 204
    delete(server, client, summary)
