"""The datasets REST API and pages over real HTTP: the shared animal-mnist archive, lookups,
image listings, thumbnails, deletion rules and the HTML pages."""

from __future__ import annotations

import io
import re

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from app.db import get_sessionmaker
from app.models import Artifact, Dataset, DatasetImage, Experiment, Run, RunMetric
from tests.support import DATASETS, LiveServer
from tests.test_datasets_support import (
    assert_nothing_left,
    class_entries,
    image_bytes,
    upload,
    zip_bytes,
)


def test_animal_mnist_upload_gives_ten_classes_and_its_own_test_split(
    server: LiveServer,
) -> None:
    with server.client(timeout=120) as client, open(DATASETS / "animal-mnist.zip", "rb") as f:
        response = client.post("/api/datasets", files={"file": ("animal-mnist.zip", f)})
        assert response.status_code == 201, response.text
        summary = response.json()
        assert summary["name"] == "animal-mnist"
        assert [item["name"] for item in summary["classes"]] == [
            "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
        ]
        assert sum(item["train"] for item in summary["classes"]) == 7716
        assert all(item["test"] == 200 for item in summary["classes"])
        assert summary["test_source"] == "uploaded"
        assert summary["unlabeled"] == 0 and summary["skipped"] == []
        assert summary["image_count"] == 9716
        assert len(summary["fingerprint"]) == 64

        dataset_id = summary["id"]
        assert client.get(f"/api/datasets/{dataset_id}").json() == summary
        answer = client.get(f"/api/datasets/{dataset_id}/images",
                            params={"split": "test", "label": 9, "limit": 5, "offset": 5})
        page = answer.json()
        assert page["total"] == 200
        # Paged as the other lists are (the headers were missing here alone).
        assert answer.headers["X-Total-Count"] == "200"
        assert answer.headers["Link"] == (
            f'</api/datasets/{dataset_id}/images?split=test&label=9&limit=5&offset=10>; '
            f'rel="next", </api/datasets/{dataset_id}/images?split=test&label=9&limit=5'
            '&offset=0>; rel="prev"')
        assert [image["original_path"].split("/")[:2] for image in page["items"]] == [
            ["test", "zebra"]] * 5
        thumb = client.get(f"/api/datasets/{dataset_id}/images/{page['items'][0]['id']}/thumbnail")
        assert thumb.status_code == 200
        assert Image.open(io.BytesIO(thumb.content)).size == (28, 28)  # never enlarged
        # No unlabeled/ folder, yet the semi-supervised methods have images below "all":
        # the page must not say they have nothing to use.
        shown = " ".join(client.get(f"/datasets/{dataset_id}").text.split())
        assert ("the labeled images a budget leaves out are what Self-Tuning and FixMatch use "
                "as unlabeled") in shown

        assert client.delete(f"/api/datasets/{dataset_id}").status_code == 204
        assert client.get(f"/api/datasets/{dataset_id}").status_code == 404
    assert not any((server.data_dir / "cache" / "thumbs").iterdir())
    assert_nothing_left(server)


def small_dataset(client: httpx.Client, name: str, seed: int = 0) -> dict:
    entries = {
        **class_entries(("cat", "dog"), per_class=5, seed=seed),
        "unlabeled/u.png": image_bytes(90_000 + seed),
        "cat/notes.txt": b"skipped",
    }
    response = upload(client, zip_bytes(entries), name=name)
    assert response.status_code == 201, response.text
    return response.json()


def test_unknown_or_malformed_dataset_ids_are_answered_clearly(client: httpx.Client) -> None:
    for method, path in [("GET", "/api/datasets/4242"), ("DELETE", "/api/datasets/4242"),
                         ("GET", "/api/datasets/4242/images"),
                         ("GET", "/api/datasets/4242/images/1/thumbnail")]:
        response = client.request(method, path)
        assert response.status_code == 404
        assert response.json()["detail"] == "dataset 4242 does not exist"
    assert client.get("/api/datasets/abc").status_code == 422
    assert client.get("/api/datasets/1/images", params={"split": "holdout"}).status_code == 422
    page = client.get("/datasets/4242")
    assert page.status_code == 404 and "There is no dataset 4242" in page.text


def test_list_is_newest_first_and_leaves_out_skipped_lists(
    server: LiveServer, client: httpx.Client
) -> None:
    older = small_dataset(client, "older", seed=1)
    newer = small_dataset(client, "newer", seed=2)
    listed = client.get("/api/datasets").json()
    assert [item["name"] for item in listed] == ["newer", "older"]
    assert "skipped" not in listed[0] and listed[0]["skipped_count"] == 1
    assert [item["path"] for item in newer["skipped"]] == ["cat/notes.txt"]
    for dataset in (older, newer):
        assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204
    assert_nothing_left(server)


def test_images_are_listed_by_split_and_label_with_paging(
    server: LiveServer, client: httpx.Client
) -> None:
    dataset = small_dataset(client, "paging", seed=3)
    base = f"/api/datasets/{dataset['id']}/images"
    everything = client.get(base).json()
    assert everything["total"] == 11
    assert {image["split"] for image in everything["items"]} == {"train", "test", "unlabeled"}
    cats = client.get(base, params={"split": "train", "label": 0}).json()
    assert cats["total"] == 4 and {image["label"] for image in cats["items"]} == {0}
    assert all(image["original_path"].startswith("cat/") for image in cats["items"])
    first, second = (client.get(base, params={"limit": 6, "offset": offset}).json()
                     for offset in (0, 6))
    ids = [image["id"] for image in first["items"] + second["items"]]
    assert ids == sorted(image["id"] for image in everything["items"])
    assert client.get(base, params={"limit": 0}).status_code == 422
    assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204
    assert_nothing_left(server)


def test_thumbnail_is_cached_and_refused_for_an_image_of_another_dataset(
    server: LiveServer, client: httpx.Client
) -> None:
    first = small_dataset(client, "first", seed=4)
    second = small_dataset(client, "second", seed=5)
    image = client.get(f"/api/datasets/{first['id']}/images", params={"limit": 1}).json()
    image_id = image["items"][0]["id"]
    url = f"/api/datasets/{first['id']}/images/{image_id}/thumbnail"
    assert client.get(url).status_code == 200
    cached = list((server.data_dir / "cache" / "thumbs").rglob("*.jpg"))
    assert [path.name for path in cached] == [f"{image_id}-t2.jpg"]
    again = client.get(url)
    assert again.content == cached[0].read_bytes()
    etag = again.headers["etag"]
    # As run files answer it: the tag alone, weak, in a list, or `*` (these sent it all).
    for held in (etag, f"W/{etag}", f'"x", {etag}', "*"):
        revalidated = client.get(url, headers={"If-None-Match": held})
        assert revalidated.status_code == 304 and revalidated.content == b"", held
        assert revalidated.headers["etag"] == etag
    assert client.get(url, headers={"If-None-Match": '"x"'}).content == cached[0].read_bytes()
    # A Range Starlette cannot parse is ignored (it was a bare text/plain 400).
    for malformed in ("bytes=9-0", "bytes=abc", "bytes="):
        whole = client.get(url, headers={"Range": malformed})
        assert whole.status_code == 200 and whole.content == cached[0].read_bytes(), malformed

    other = client.get(f"/api/datasets/{second['id']}/images/{image_id}/thumbnail")
    assert other.status_code == 404
    assert other.json()["detail"] == f"dataset {second['id']} has no image {image_id}"
    for dataset in (first, second):
        assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204
    assert not any((server.data_dir / "cache" / "thumbs").iterdir())
    assert_nothing_left(server)


def test_a_larger_thumbnail_shows_what_an_image_is_and_is_cached_apart(
    server: LiveServer, client: httpx.Client
) -> None:
    """128 px is too small to label a photo by: `size=512` gives a larger one (for the
    images to label next), cached and revalidated on its own."""
    entries = {**class_entries(per_class=2, seed=6), "cat/wide.png": image_bytes(7, size=600)}
    dataset = upload(client, zip_bytes(entries), name="wide").json()
    images = client.get(f"/api/datasets/{dataset['id']}/images").json()["items"]
    wide = next(image for image in images if image["original_path"] == "cat/wide.png")
    url = f"/api/datasets/{dataset['id']}/images/{wide['id']}/thumbnail"
    small, large = client.get(url), client.get(url, params={"size": 512})
    assert Image.open(io.BytesIO(small.content)).size == (128, 128)
    assert Image.open(io.BytesIO(large.content)).size == (512, 512)
    assert large.headers["content-type"] == "image/jpeg"
    assert large.headers["etag"] != small.headers["etag"]
    assert client.get(url, params={"size": 512},
                      headers={"If-None-Match": large.headers["etag"]}).status_code == 304
    assert client.get(url, headers={"If-None-Match": large.headers["etag"]}).status_code == 200
    cached = sorted(path.name for path in (server.data_dir / "cache" / "thumbs").rglob("*.jpg"))
    assert cached == [f"{wide['id']}-t2-512px.jpg", f"{wide['id']}-t2.jpg"]
    tiny = next(image for image in images if image["original_path"] != "cat/wide.png")
    never_enlarged = client.get(f"/api/datasets/{dataset['id']}/images/{tiny['id']}/thumbnail",
                                params={"size": 512})
    assert Image.open(io.BytesIO(never_enlarged.content)).size == (16, 16)
    refused = client.get(url, params={"size": 300})
    assert refused.status_code == 422  # in the shape the schema gives a 422
    assert refused.json()["detail"] == [{"loc": ["query", "size"], "type": "value_error",
                                         "msg": "must be 128 or 512, not 300"}]
    schema = client.get("/openapi.json").json()["paths"][
        "/api/datasets/{dataset_id}/images/{image_id}/thumbnail"]["get"]["parameters"]
    assert next(p for p in schema if p["name"] == "size")["schema"]["enum"] == [128, 512]
    no_class = client.get(f"/api/datasets/{dataset['id']}/images", params={"label": 2})
    assert (no_class.status_code, no_class.json()["detail"]) == (422, [{
        "loc": ["query", "label"], "type": "value_error",
        "msg": f"dataset {dataset['id']} has 2 classes: a class index is 0 to 1, not 2"}])
    assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204


def add_run(server: LiveServer, dataset_id: int, status: str) -> int:
    """An experiment with one run on the dataset, a metric, an artifact and a run folder."""
    with get_sessionmaker(server.database_url)() as session:
        experiment = Experiment(dataset_id=dataset_id, backbone="resnet18", methods=["finetune"],
                                budgets=[0.5], seeds=[0], preset="quick")
        session.add(experiment)
        session.flush()
        run = Run(experiment_id=experiment.id, dataset_id=dataset_id, method="finetune",
                  budget=0.5, budget_label="50%", status=status)
        session.add(run)
        session.flush()
        session.add(RunMetric(run_id=run.id, kind="eval", step=1, values={"top1": 0.5}))
        session.add(Artifact(run_id=run.id, name="model.safetensors",
                             path=f"runs/{run.id}/model.safetensors", sha256="0" * 64))
        session.commit()
        run_dir = server.data_dir / "runs" / str(run.id)
        run_dir.mkdir(parents=True)
        (run_dir / "model.safetensors").write_bytes(b"weights")
        return run.id


def set_status(server: LiveServer, run_id: int, status: str) -> None:
    with get_sessionmaker(server.database_url)() as session:
        session.get(Run, run_id).status = status
        session.commit()


def count_rows(server: LiveServer) -> dict[str, int]:
    with get_sessionmaker(server.database_url)() as session:
        return {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Dataset, DatasetImage, Experiment, Run, RunMetric, Artifact)}


def test_head_is_answered_wherever_get_is_with_the_same_headers_and_no_body(
    server: LiveServer, client: httpx.Client
) -> None:
    """Link checkers and uptime monitors ask HEAD; pages, JSON and thumbnails answered 405."""
    dataset = small_dataset(client, "heads", seed=6)
    image_id = client.get(f"/api/datasets/{dataset['id']}/images").json()["items"][0]["id"]
    for path in ["/", "/datasets", f"/datasets/{dataset['id']}", "/api/health",
                 f"/api/datasets/{dataset['id']}", "/api/experiments",
                 f"/api/datasets/{dataset['id']}/images/{image_id}/thumbnail"]:
        for encoding in ("gzip", "identity"):
            asked = {"Accept-Encoding": encoding}
            got, head = client.get(path, headers=asked), client.head(path, headers=asked)
            assert (got.status_code, head.status_code) == (200, 200), path
            assert head.content == b"", path
            assert head.headers["content-type"] == got.headers["content-type"], path
            assert head.headers.get("content-encoding") == got.headers.get("content-encoding")
            # Health: live figures. A page compressed: its script nonce is new in every answer.
            if "content-length" in got.headers and path != "/api/health" and (
                    encoding == "identity" or path.startswith("/api/")):
                assert head.headers["content-length"] == got.headers["content-length"], path
    # An address without a page, or a method a route does not take, is answered as for GET.
    assert client.head("/no-such-page").status_code == 404
    assert client.head(f"/api/datasets/{dataset['id']}/images/999999/thumbnail").status_code == 404
    # Live feeds never end, so they have no HEAD, with a trailing slash too: that one ran
    # the feed (the run's whole history) and held the connection.
    run_id = add_run(server, dataset["id"], "succeeded")
    experiment_id = client.get(f"/api/runs/{run_id}").json()["experiment_id"]
    for feed in (f"/api/runs/{run_id}/events", f"/api/experiments/{experiment_id}/events"):
        for path in (feed, f"{feed}/"):
            assert client.head(path, timeout=10).status_code == 405, path
    assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204


@pytest.mark.parametrize("status", ["queued", "running"])
def test_delete_is_refused_while_a_run_is_active_then_removes_runs_and_their_files(
    server: LiveServer, client: httpx.Client, status: str
) -> None:
    dataset = small_dataset(client, "busy", seed=6)
    run_id = add_run(server, dataset["id"], status)

    refused = client.delete(f"/api/datasets/{dataset['id']}")
    assert refused.status_code == 409
    assert "1 queued or running run(s)" in refused.json()["detail"]
    assert client.get(f"/api/datasets/{dataset['id']}").status_code == 200

    set_status(server, run_id, "succeeded")
    assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204
    assert count_rows(server) == {"datasets": 0, "dataset_images": 0, "experiments": 0,
                                  "runs": 0, "run_metrics": 0, "artifacts": 0}
    assert not (server.data_dir / "runs" / str(run_id)).exists()
    assert_nothing_left(server)


def test_pages_list_datasets_offer_the_upload_form_and_show_a_dataset(
    server: LiveServer, client: httpx.Client
) -> None:
    dataset = small_dataset(client, "Pets <b>", seed=7)
    listing = client.get("/datasets")
    assert listing.status_code == 200
    assert f'href="/datasets/{dataset["id"]}">Pets &lt;b&gt;</a>' in listing.text

    form = client.get("/datasets/new")
    assert form.status_code == 200
    for part in ('id="dropzone"', 'id="progress-bar"', 'src="/static/upload.js"', 'name="file"'):
        assert part in form.text
    script = client.get("/static/upload.js")
    assert script.status_code == 200 and "upload.onprogress" in script.text

    page = client.get(f"/datasets/{dataset['id']}")
    assert page.status_code == 200
    assert f'href="/experiments/new?dataset_id={dataset["id"]}"' in page.text
    assert page.text.count(f'src="/api/datasets/{dataset["id"]}/images/') == 4 + 4 + 1
    assert 'loading="lazy"' in page.text
    assert "cat/notes.txt" in page.text and "not an image (.txt)" in page.text
    assert '<td id="unlabeled-count">1</td>' in page.text
    assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204
    assert_nothing_left(server)


def test_the_dataset_page_says_when_its_thumbnails_are_the_first_few(
    server: LiveServer, client: httpx.Client
) -> None:
    """Twelve thumbnails of more images showed as though they were all of them."""
    entries = {**class_entries(("cat", "dog"), per_class=3, seed=9),
               **{f"cat/more{n}.png": image_bytes(9700 + n) for n in range(17)},
               **{f"unlabeled/u{n}.png": image_bytes(9800 + n) for n in range(14)}}
    response = upload(client, zip_bytes(entries), name="many")
    assert response.status_code == 201, response.text
    dataset = response.json()
    page = client.get(f"/datasets/{dataset['id']}").text
    cat = next(item for item in dataset["classes"] if item["name"] == "cat")
    assert cat["train"] > 12
    headings = [re.sub(r"<[^>]+>", "", heading) for heading in re.findall(
        r'<h3 id="class-\d+"[^>]*>(.*?)</h3>', page, re.S)]  # as read, without the markup
    dog = next(item for item in dataset["classes"] if item["name"] == "dog")
    assert headings == [f'cat ({cat["train"]} train: the first 12)', f'dog ({dog["train"]} train)']
    assert re.search(r'Unlabeled images: 14</h2>\s*<p class="muted" id="unlabeled-note">The '
                     r'first 12\.</p>', page)
    assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204


def test_class_folders_that_differ_only_in_case_are_kept_apart_with_a_warning(
    server: LiveServer, client: httpx.Client
) -> None:
    """`Dog/` and `dog/` are two classes on Linux and one folder on macOS and Windows: likely
    one class split by accident, so the upload says so (it trained as two, silently)."""
    archive = zip_bytes(class_entries(("Dog", "dog", "cat"), seed=8))
    response = upload(client, archive, name="cases")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert [c["name"] for c in dataset["classes"]] == ["cat", "Dog", "dog"]
    warning = ("classes 'Dog' and 'dog' differ only in letter case: they are two classes "
               "here (macOS and Windows keep one folder for both); if they are one class, "
               "merge their folders and upload again")
    assert dataset["warnings"] == [warning]
    assert client.get(f"/api/datasets/{dataset['id']}").json()["warnings"] == [warning]
    page = client.get(f"/datasets/{dataset['id']}").text
    assert "differ only in letter case" in page and "&#39;Dog&#39;" in page
    plain = small_dataset(client, "plain", seed=9)
    assert plain["warnings"] == []
    assert "differ only in letter case" not in client.get(f"/datasets/{plain['id']}").text
    # The British spelling of unlabeled/ is a class: its images trained as one, silently.
    british = upload(client, zip_bytes(class_entries(("cat", "dog", "Unlabelled"), seed=10)),
                     name="british").json()
    assert [c["name"] for c in british["classes"]] == ["cat", "dog", "Unlabelled"]
    assert british["warnings"] == [
        "class 'Unlabelled' is a class here, not the unlabeled/ folder: if its images have no "
        "label, rename the folder to unlabeled/ and upload again"]
    for item in (dataset, plain, british):
        assert client.delete(f"/api/datasets/{item['id']}").status_code == 204


def test_an_upload_with_the_same_content_as_another_dataset_is_kept_with_a_warning(
    server: LiveServer, client: httpx.Client
) -> None:
    """A script that retries an upload after a timeout stores it twice; so does a person
    who forgot the first. Both are kept (a copy may be meant), and each names the other."""
    archive = zip_bytes(class_entries(("cat", "dog"), seed=21))
    answer = upload(client, archive, name="first")
    first = answer.json()
    assert answer.headers["location"] == f"/api/datasets/{first['id']}"  # where it now lives
    second = upload(client, archive, name="again").json()
    other = small_dataset(client, "other", seed=22)
    assert first["fingerprint"] == second["fingerprint"] != other["fingerprint"]
    assert second["warnings"] == [
        f"the same images, labels and splits as dataset {first['id']} ('first'): delete one "
        "of them if it was uploaded twice by mistake"]
    assert client.get(f"/api/datasets/{first['id']}").json()["warnings"] == [
        f"the same images, labels and splits as dataset {second['id']} ('again'): delete one "
        "of them if it was uploaded twice by mistake"]
    assert "uploaded twice by mistake" in client.get(f"/datasets/{second['id']}").text
    assert other["warnings"] == []
    assert client.delete(f"/api/datasets/{second['id']}").status_code == 204
    assert client.get(f"/api/datasets/{first['id']}").json()["warnings"] == []
    for item in (first, other):
        assert client.delete(f"/api/datasets/{item['id']}").status_code == 204


def test_a_labels_csv_that_relabels_images_in_class_folders_is_used_with_a_warning(
    server: LiveServer, client: httpx.Client
) -> None:
    """Class folders and a labels.csv that swapped them (a stale CSV, say): the CSV's labels
    were taken without a word, and every image trained under the other class."""
    entries = class_entries(("cat", "dog"), per_class=3, seed=23)
    swapped = {"cat": "dog", "dog": "cat"}
    rows = [f"{path},{swapped[path.split('/')[0]]}" for path in sorted(entries)]
    rows[0] = f"{sorted(entries)[0]},"  # and one left unlabeled
    archive = zip_bytes({**entries, "labels.csv": ("path,label\n" + "\n".join(rows)).encode()})
    response = upload(client, archive, name="swapped")
    assert response.status_code == 201, response.text
    dataset = response.json()
    first, second, third = sorted(entries)[:3]
    warning = (f"6 images are in a class's folder but labeled another class or none by "
               f"labels.csv ({first!r} as unlabeled, {second!r} as 'dog', {third!r} as 'dog' "
               "and more): its labels are used; if the folders are right, remove labels.csv "
               "and upload again")
    assert dataset["warnings"] == [warning]
    assert client.get(f"/api/datasets/{dataset['id']}").json()["warnings"] == [warning]
    assert "if the folders are right" in client.get(f"/datasets/{dataset['id']}").text
    # A dataset made from it by adding labels has the same images under the same labels.
    made = client.post(f"/api/datasets/{dataset['id']}/labels",
                       files={"file": ("labels.csv", f"{first},cat")})
    assert made.status_code == 201, made.text
    assert made.json()["warnings"] == [warning]

    # A labels.csv that agrees with the folders, and labels images elsewhere (the layout a
    # dataset downloaded from here has): nothing to say.
    agreeing = zip_bytes({**entries, "loose/u1.png": image_bytes(24), "labels.csv": (
        "path,label\n" + "\n".join(f"{path},{path.split('/')[0]}" for path in entries)
        + "\nloose/u1.png,dog\n").encode()})
    fine = upload(client, agreeing, name="agreeing").json()
    assert fine["warnings"] == []
    for item in (made.json(), dataset, fine):
        assert client.delete(f"/api/datasets/{item['id']}").status_code == 204


def test_a_class_folder_whose_every_file_is_skipped_is_said_gone(
    server: LiveServer, client: httpx.Client
) -> None:
    """A folder of iPhone HEIC photos, or of files that do not open, is no class: it was
    gone from the classes with a word only in the list of skipped files."""
    entries = {**class_entries(("cat", "dog"), per_class=3, seed=28),
               "photos/heic/IMG_1.HEIC": b"\0\0\0\x18ftypheic" + bytes(64),
               "photos/heic/IMG_2.HEIC": b"\0\0\0\x18ftypheic" + bytes(65),
               "photos/broken/a.jpg": b"",
               "photos/unlabeled/u.txt": b"notes", "photos/loose.txt": b"notes"}
    entries = {(path if path.startswith("photos/") else f"photos/{path}"): data
               for path, data in entries.items()}
    dataset = upload(client, zip_bytes(entries), name="lost classes").json()
    assert [c["name"] for c in dataset["classes"]] == ["cat", "dog"]
    assert dataset["warnings"] == [
        "The file in the class folder 'broken' was skipped (the skipped files say why), so "
        "'broken' is not a class of this dataset: fix it and upload again if it should be one",
        "All 2 files in the class folder 'heic' were skipped (the skipped files say why), so "
        "'heic' is not a class of this dataset: fix them and upload again if it should be one"]
    assert "is not a class of this dataset" in client.get(f"/datasets/{dataset['id']}").text
    reasons = {entry["path"]: entry["reason"] for entry in dataset["skipped"]}
    assert reasons["photos/broken/a.jpg"] == "the file is empty"
    assert reasons["photos/heic/IMG_1.HEIC"].endswith(
        "; an iPhone's HEIC photo: export it as JPEG (or set the iPhone's Camera › Formats to "
        "Most Compatible)")
    kept = small_dataset(client, "all kept", seed=29)
    assert kept["warnings"] == []

    # A zip of class folders made on a Mac, and a hidden folder: no class is said gone (the
    # warnings named '__MACOSX' and '.git' as classes whose files were all skipped).
    zipped = class_entries(("cat", "dog"), per_class=3, seed=30)
    mac = upload(client, zip_bytes({
        **zipped, **{f"__MACOSX/{path.rsplit('/', 1)[0]}/._{path.rsplit('/', 1)[1]}": b"\0\5"
                     for path in zipped},
        ".git/objects/ab": b"x"}), name="from a Mac").json()
    assert [c["name"] for c in mac["classes"]] == ["cat", "dog"]
    assert len(mac["skipped"]) == 7 and mac["warnings"] == []
    for item in (dataset, kept, mac):
        assert client.delete(f"/api/datasets/{item['id']}").status_code == 204


def test_an_uploaded_test_split_without_a_class_is_kept_with_a_warning(
    server: LiveServer, client: httpx.Client
) -> None:
    """test/ with no images of a class that train/ has: its runs were scored on the other
    classes alone, and nothing said the class was never tested."""
    entries = {**{f"train/{path}": data for path, data in class_entries(
        ("big dog", "cat", "small dog"), per_class=3, seed=25).items()},
        **{f"test/{path}": data for path, data in class_entries(
            ("cat",), per_class=2, seed=26).items()}}
    dataset = upload(client, zip_bytes(entries), name="untested").json()
    assert dataset["test_source"] == "uploaded"
    assert dataset["warnings"] == [
        "classes 'big dog', 'small dog' have no images in the given test split: runs train "
        "on them but never score them, and test top-1 is over the other classes alone; add "
        "their images to test/ (or leave test/ out to hold out a share of each class)"]
    assert "never score them" in client.get(f"/datasets/{dataset['id']}").text
    # and an experiment on it is told so before it starts, and on its record
    sweep = {"dataset_id": dataset["id"], "backbone": "test_efficientnet",
             "methods": ["fine-tune"], "budgets": ["all"], "seeds": [0], "preset": "quick",
             "overrides": {"pretrained": False}}
    checked = client.post("/api/experiments/check", json=sweep)
    assert checked.status_code == 200, checked.text
    assert dataset["warnings"][0] in checked.json()["warnings"]
    started = client.post("/api/experiments", json=sweep).json()
    assert dataset["warnings"][0] in client.get(
        f"/api/experiments/{started['id']}").json()["warnings"]
    assert client.post(f"/api/experiments/{started['id']}/cancel").status_code == 200
    held_out = small_dataset(client, "held out", seed=27)  # no test/: every class is held out
    assert held_out["warnings"] == []
    for item in (dataset, held_out):
        assert client.delete(f"/api/datasets/{item['id']}").status_code == 204
