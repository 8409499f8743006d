"""A dataset taken back out (`GET /api/datasets/{id}/archive` and `/labels.csv`) over real
HTTP: the tar holds the uploaded images and a labels.csv with the labels given in the app and
the held-out test split, and uploaded again it gives the same dataset; the page's links."""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from app.dataset_export import Export, ExportedImage, archive, size
from app.responses import FILE_DELETED
from tests.browser import open_browser
from tests.support import LiveServer
from tests.test_add_labels import labels
from tests.test_datasets_support import (
    class_entries,
    image_bytes,
    stored_files,
    upload,
    zip_bytes,
)
from worker.selftuning import load_folder_dataset

# In one folder, as the upload page sends a folder: three labeled images of each class (one
# of each held out for testing) and three unlabeled.
FOLDER = {f"photos/{path}": data for path, data in {
    **class_entries(("cat", "dog"), per_class=3, seed=31),
    **{f"unlabeled/u{n}.png": image_bytes(7_000 + n) for n in range(3)}}.items()}


def images_by_path(client, dataset_id: int) -> dict[str, tuple[str, str | None]]:
    """Each image's (split, class name) by its uploaded path."""
    dataset = client.get(f"/api/datasets/{dataset_id}").json()
    names = [c["name"] for c in dataset["classes"]]
    items = client.get(f"/api/datasets/{dataset_id}/images", params={"limit": 1000}).json()
    return {image["original_path"]: (
        image["split"], None if image["label"] is None else names[image["label"]])
        for image in items["items"]}


def labeled_upload(client, entries: dict[str, bytes], name: str, line: str
                   ) -> tuple[dict, dict[str, tuple[str, str | None]]]:
    """Upload `entries` as `name`, then add the label of the labels CSV `line`: the new
    dataset, and its images' (split, class name) by uploaded path."""
    first = upload(client, zip_bytes(entries), name=name).json()
    made = labels(client, first["id"], line)
    assert made.status_code == 201, made.text
    return made.json(), images_by_path(client, made.json()["id"])


def test_an_upload_of_one_train_folder_downloads_named_after_the_dataset_and_the_cli_reads_it(
    server: LiveServer, tmp_path: Path,
) -> None:
    """Uploaded as one `train/` folder (classes and unlabeled/ in it), a dataset downloaded as
    train.tar holding `train/labels.csv`: a folder that reads as a train split, which the
    command line did, leaving its labels.csv out (the labels added in the app, the test
    split held out here). Downloads made so before are read through their labels.csv too."""
    train_only = {f"train/{path}": data for path, data in {
        **class_entries(("cat", "dog"), per_class=4, seed=37),
        **{f"unlabeled/u{n}.png": image_bytes(7_100 + n) for n in range(3)}}.items()}
    with server.client() as client:
        made, expected = labeled_upload(client, train_only, "moths", "train/unlabeled/u1.png,dog")
        response = client.get(f"/api/datasets/{made['id']}/archive")
        top = "moths + 1 label"  # the new dataset's name
        assert response.headers["content-disposition"] == f'attachment; filename="{top}.tar"'
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archived:
        assert archived.getnames()[0] == f"{top}/labels.csv"
        assert sorted(archived.getnames()[1:]) == sorted(f"{top}/{path}" for path in train_only)
        archived.extractall(tmp_path / "download", filter="data")

    def read(folder: Path) -> dict[str, tuple[str, str | None]]:
        """What the command line reads, as images_by_path gives the app's."""
        class_names, train, test, unlabeled = load_folder_dataset(folder)
        return ({path: ("train", class_names[label]) for path, label in train}
                | {path: ("test", class_names[label]) for path, label in test}
                | {path: ("unlabeled", None) for path in unlabeled})

    root = tmp_path / "download" / top
    assert read(tmp_path / "download") == {
        str(root / path): where for path, where in expected.items()}
    # The layout downloads had before: the folder train/, its paths without it.
    old = tmp_path / "old" / "train"
    shutil.copytree(root / "train", old)
    (old / "labels.csv").write_text((root / "labels.csv").read_text().replace("train/", ""))
    assert read(tmp_path / "old") == {
        str(old / path.removeprefix("train/")): where for path, where in expected.items()}


def test_a_dataset_with_labels_added_in_the_app_downloads_and_uploads_again_as_itself(
    server: LiveServer,
) -> None:
    """The labels given in the app stayed in the app, and so did the hold-out: a person who
    labeled images here could not take them to their own training code or another server."""
    with server.client() as client:
        made, expected = labeled_upload(client, FOLDER, "photos", "photos/unlabeled/u1.png,dog")
        dataset_id = made["id"]
        assert expected["photos/unlabeled/u1.png"] == ("train", "dog")
        assert sorted(split for split, _ in expected.values()).count("test") == 2  # held out

        response = client.get(f"/api/datasets/{dataset_id}/archive")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/x-tar"
        assert response.headers["content-disposition"] == 'attachment; filename="photos.tar"'
        assert int(response.headers["content-length"]) == len(response.content)
        tar = response.content
        # The page says about how big it is (it said the images' size alone: a third of it
        # for 350-byte images).
        page = client.get(f"/datasets/{dataset_id}").text
        number, unit = re.search(r"a tar of about ([\d.]+) (bytes|KiB|MiB):", page).groups()
        shown = float(number) * {"bytes": 1, "KiB": 1024, "MiB": 1024**2}[unit]
        assert 0.9 < shown / len(tar) < 1.1, (shown, len(tar))
        head = client.head(f"/api/datasets/{dataset_id}/archive")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(tar)

        csv_answer = client.get(f"/api/datasets/{dataset_id}/labels.csv")
        assert csv_answer.status_code == 200
        assert client.get(f"/api/datasets/{dataset_id}/labels.csv", headers={
            "If-None-Match": csv_answer.headers["etag"]}).status_code == 304

        again = upload(client, tar, filename="photos.tar")
        assert again.status_code == 201, again.text
        assert again.json()["name"] == "photos"
        assert again.json()["test_source"] == "uploaded"
        assert again.json()["classes"] == made["classes"]
        assert images_by_path(client, again.json()["id"]) == expected

    with tarfile.open(fileobj=io.BytesIO(tar)) as archived:
        names = archived.getnames()
        assert names[0] == "photos/labels.csv"
        assert sorted(names[1:]) == sorted(FOLDER)
        for name in names[1:]:
            assert archived.extractfile(name).read() == FOLDER[name]
        listed = archived.extractfile("photos/labels.csv").read()
    assert listed == csv_answer.content
    rows = list(csv.reader(io.StringIO(listed.decode())))
    assert rows[0] == ["path", "label", "split"]
    by_path = {path: (label, split) for path, label, split in rows[1:]}
    assert len(by_path) == len(FOLDER)
    assert by_path["unlabeled/u1.png"] == ("dog", "train")
    assert by_path["unlabeled/u0.png"] == ("", "")
    for path, (split, name) in expected.items():
        relative = path.removeprefix("photos/")
        assert by_path[relative] == (("", "") if split == "unlabeled" else (name, split))


def test_an_upload_without_one_top_folder_is_put_in_a_folder_named_after_the_dataset(
    server: LiveServer, tmp_path: Path,
) -> None:
    with server.client() as client:
        dataset = upload(client, zip_bytes(class_entries(("cat", "dog"), seed=32)),
                         name="../Chats/été").json()
        response = client.get(f"/api/datasets/{dataset['id']}/archive")
    assert response.status_code == 200
    # Not a path: the slashes and the leading dots go, and the name is UTF-8 (RFC 6266),
    # after an ASCII one for clients that read no other.
    assert response.headers["content-disposition"] == (
        "attachment; filename=\"Chats ete.tar\"; filename*=utf-8''Chats%20%C3%A9t%C3%A9.tar")
    # The README's `curl -OJ` saved it as `archive`, the address's last part.
    subprocess.run(["curl", "-sfOJ", f"{server.url}/api/datasets/{dataset['id']}/archive"],
                   cwd=tmp_path, check=True, timeout=60)
    assert [path.name for path in tmp_path.iterdir()] == ["Chats ete.tar"]
    assert (tmp_path / "Chats ete.tar").read_bytes() == response.content
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archived:
        names = archived.getnames()
    assert names[0] == "Chats été/labels.csv"
    assert sorted(names[1:]) == sorted(f"Chats été/{path}" for path in class_entries(
        ("cat", "dog"), seed=32))


def test_a_dataset_whose_file_is_gone_or_that_does_not_exist_answers_404(
    server: LiveServer,
) -> None:
    with server.client() as client:
        dataset = upload(client, zip_bytes(class_entries(("cat", "dog"), seed=33))).json()
        stored_files(server, dataset["id"])[0].unlink()
        response = client.get(f"/api/datasets/{dataset['id']}/archive")
        assert response.status_code == 404
        assert response.json()["detail"] == FILE_DELETED
        # The labels are the database's: labels.csv does not look at the files (60,000 took
        # 1.4 s), and has a line for each image, the lost one too.
        listed = client.get(f"/api/datasets/{dataset['id']}/labels.csv")
        assert listed.status_code == 200
        assert len(listed.text.splitlines()) == dataset["image_count"] + 1
        for what in ("archive", "labels.csv"):
            assert client.get(f"/api/datasets/999999/{what}").status_code == 404


def test_a_file_that_changes_while_it_is_sent_breaks_the_archive_off(tmp_path: Path) -> None:
    """The length was said first: an archive short of it is a failed download, where one
    that went on would look complete."""
    file = tmp_path / "a.png"
    file.write_bytes(b"x" * 3000)
    export = Export("photos", b"path,label,split\na.png,cat,train\n",
                    [ExportedImage("a.png", file, 3000)])
    whole = b"".join(archive(export, mtime=0))
    assert len(whole) == size(export, mtime=0)
    with tarfile.open(fileobj=io.BytesIO(whole)) as archived:
        assert archived.extractfile("photos/a.png").read() == b"x" * 3000
    for changed in (b"x" * 2000, b"x" * 4000):
        file.write_bytes(changed)
        with pytest.raises(OSError, match="has changed size since the download began"):
            b"".join(archive(export, mtime=0))


@pytest.mark.parametrize("folder", ["photos", "ф" * 30])
def test_the_length_counted_without_the_headers_is_the_archives(tmp_path: Path, folder):
    """The length counts a header as one block where tarfile writes no pax header for it,
    without making it: at and past 100 bytes of name, with non-ASCII names (in the folder's
    name, or the image's), with the CSV's header too."""
    names = ["a.png", "b" * (99 - len(folder) - 1), "b" * (100 - len(folder) - 1),
             "c" * (101 - len(folder) - 1), "d" * 150, "кот.png", "e/" * 60 + "f.png"]
    images = []
    for n, name in enumerate(names):
        (tmp_path / f"{n}.png").write_bytes(b"x" * (n * 300))
        images.append(ExportedImage(name, tmp_path / f"{n}.png", n * 300))
    export = Export(folder, b"path,label,split\n", images)
    whole = b"".join(archive(export, mtime=1_700_000_000))
    assert len(whole) == size(export, mtime=1_700_000_000)
    with tarfile.open(fileobj=io.BytesIO(whole)) as archived:
        assert archived.getnames()[1:] == [f"{folder}/{name}" for name in names]


def test_any_part_of_the_archive_is_that_part_of_the_whole_without_reading_what_is_before(
    tmp_path: Path,
) -> None:
    contents = [bytes([n]) * length for n, length in enumerate((700, 512, 1, 3000), start=1)]
    images = []
    for n, content in enumerate(contents):
        (tmp_path / f"{n}.png").write_bytes(content)
        images.append(ExportedImage(f"c/{n}.png", tmp_path / f"{n}.png", len(content)))
    export = Export("photos", b"path,label,split\n", images)
    whole = b"".join(archive(export, mtime=5))
    length = size(export, mtime=5)
    assert len(whole) == length
    for start in range(0, length, 97):
        for end in (start + 1, start + 511, start + 4000, length):
            end = min(end, length)
            assert b"".join(archive(export, 5, start, end)) == whole[start:end], (start, end)
    # The first image gone: a download resumed after it never opens it.
    images[0].file.unlink()
    after_first = whole.index(contents[1])
    assert b"".join(archive(export, 5, after_first)) == whole[after_first:]
    with pytest.raises(FileNotFoundError):
        b"".join(archive(export, 5, after_first - 1600))


@pytest.mark.skipif(shutil.which("curl") is None, reason="resumes with the curl command")
def test_a_download_that_broke_off_resumes_where_it_stopped_while_the_dataset_is_the_same(
    server: LiveServer, tmp_path: Path,
) -> None:
    """A dataset of many gigabytes downloaded again from the start each time the connection
    dropped: the archive had no ranges. `curl -C -` goes on from the bytes it holds."""
    with server.client() as client:
        dataset_id = upload(client, zip_bytes(FOLDER), name="photos").json()["id"]
        url = f"/api/datasets/{dataset_id}/archive"
        whole = client.get(url)
        tar, etag = whole.content, whole.headers["etag"]
        assert whole.headers["accept-ranges"] == "bytes"
        assert client.head(url).headers["etag"] == etag
        held = client.get(url, headers={"If-None-Match": etag})  # as every download answers
        assert (held.status_code, held.content, held.headers["etag"]) == (304, b"", etag)

        partial = tmp_path / "photos.tar"
        partial.write_bytes(tar[:len(tar) // 3])
        subprocess.run(["curl", "-sS", "--fail", "-C", "-", "-o", str(partial),
                        f"{server.url}{url}"], check=True, timeout=60)
        assert partial.read_bytes() == tar

        rest = client.get(url, headers={"Range": "bytes=1000-", "If-Range": etag})
        assert rest.status_code == 206
        assert rest.headers["content-range"] == f"bytes 1000-{len(tar) - 1}/{len(tar)}"
        assert rest.content == tar[1000:]
        assert int(rest.headers["content-length"]) == len(tar) - 1000
        middle = client.get(url, headers={"Range": "bytes=600-2047"})
        assert middle.status_code == 206 and middle.content == tar[600:2048]
        last = client.get(url, headers={"Range": "bytes=-100"})
        assert last.status_code == 206 and last.content == tar[-100:]

        # What the server cannot use or need not: the whole archive, as RFC 9110 allows.
        for headers in ({"Range": "bytes=9-0"}, {"Range": "items=0-5"},
                        {"Range": "bytes=0-9,20-29"}):
            answer = client.get(url, headers=headers)
            assert answer.status_code == 200 and answer.content == tar, headers
        past = client.get(url, headers={"Range": f"bytes={len(tar)}-"})
        assert past.status_code == 416
        assert past.headers["content-range"] == f"bytes */{len(tar)}"
        assert past.json()["detail"] == f"the range starts past the end ({len(tar)} bytes)"

        # Renamed since, a dataset without one top folder is in a folder of its new name:
        # the archive is another, and a resume gets it whole.
        loose_id = upload(client, zip_bytes(class_entries(("cat", "dog"), seed=34)),
                          name="before").json()["id"]
        url = f"/api/datasets/{loose_id}/archive"
        etag = client.get(url).headers["etag"]
        assert client.get(url, headers={"Range": "bytes=10-", "If-Range": etag}
                          ).status_code == 206
        assert client.patch(f"/api/datasets/{loose_id}", json={"name": "after"}
                            ).status_code == 200
        changed = client.get(url, headers={"Range": "bytes=10-", "If-Range": etag})
        assert changed.status_code == 200
        assert changed.headers["etag"] != etag
        with tarfile.open(fileobj=io.BytesIO(changed.content)) as archived:
            assert archived.getnames()[0] == "after/labels.csv"


@pytest.mark.browser
def test_the_dataset_page_downloads_the_dataset_and_its_labels(
    server: LiveServer, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with server.client() as client:
        dataset = upload(client, zip_bytes(FOLDER), name="downloads").json()
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/datasets/{dataset['id']}")
        with page.expect_download() as tar_download:
            page.click("#dataset-downloads a:text('the dataset')")
        assert tar_download.value.suggested_filename == "photos.tar"
        with tarfile.open(tar_download.value.path()) as archived:
            assert len(archived.getnames()) == len(FOLDER) + 1
        with page.expect_download() as csv_download:
            page.click("#dataset-downloads a:text('labels.csv')")
        assert csv_download.value.suggested_filename == f"dataset-{dataset['id']}-labels.csv"
        assert len(Path(csv_download.value.path()).read_text().splitlines()) == len(FOLDER) + 1
        browser.assert_no_errors()
