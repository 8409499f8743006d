"""Trying a finished run's model on images of one's own (`POST /api/runs/{id}/predict` and the
run page's "Try the model"), and the start form suggesting it to go on from, against a real
uvicorn, Redis and SQLite and, for the page, Chromium. The run's export is a real one: a tiny
model trained here by the engine, placed where a worker writes it (no worker: the run's end is
recorded as a worker records it)."""

from __future__ import annotations

import io
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from playwright.sync_api import expect

from app.routers.runs import TRYING_AT_ONCE
from app.try_model import MAX_BODY_BYTES, MAX_IMAGES
from tests.browser import open_browser
from tests.engine.helpers import tiny_config, write_shapes_dataset
from tests.support import add_dataset_row, wait_for
from tests.test_datasets_support import png_with_declared_size
from tests.test_experiments_cancel_delete import start_sweep
from tests.test_pages_fixes import finish
from tests.test_run_downloads import record_export
from worker.selftuning import load_folder_dataset, make_budget_data
from worker.selftuning.loop import train
from worker.selftuning.offline_weights import installed_offline_backbones

EXPORTED = ("model.safetensors", "config.json", "training.json")


@dataclass(frozen=True)
class Tried:
    run_id: int
    queued_run_id: int  # a run of the same sweep that has not trained
    other_run_id: int  # another run of the sweep that succeeded, with the same export
    broken_run_id: int  # a run of another experiment that succeeded, its model damaged since
    answers: dict[str, str]  # the run's own evaluation: test image path -> predicted class
    url: str


@pytest.fixture(scope="module")
def tried(server, tmp_path_factory) -> Tried:
    """A 3-class run trained for 2 iterations, its export recorded as the worker records it
    for two runs of a sweep (15% and 50%; 30% queued), and damaged for a run of another."""
    root = write_shapes_dataset(tmp_path_factory.mktemp("shapes"))
    class_names, train_items, test_items, unlabeled = load_folder_dataset(root)
    data, _ = make_budget_data(class_names, train_items, test_items, unlabeled,
                               {"per_class": 4}, seed=0)
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(iterations=2, method="fine-tune"), data, out)
    counts = {name: {"train": 10, "test": 4} for name in class_names}
    dataset_id = add_dataset_row(server.database_url, counts)
    with server.client() as client:
        _, run_ids = start_sweep(client, dataset_id, seeds=[0], methods=["fine-tune"],
                                 budgets=["15%", "30%", "50%"])
        _, (broken,) = start_sweep(client, dataset_id, seeds=[0], methods=["fine-tune"],
                                   budgets=["all"])
    live = redis.Redis.from_url(server.redis_url, decode_responses=True)
    for run_id, damaged in ((run_ids[0], {}), (run_ids[2], {}),
                            (broken, {"model.safetensors": b"junk"})):
        record_export(server.data_dir, server.database_url, run_id,
                      {name: (out / name).read_bytes() for name in EXPORTED} | damaged)
        finish(server.database_url, live, run_id, {"test_top1": 0.5})
    answers = {row["path"]: row["predicted"]
               for row in json.loads((out / "test_predictions.json").read_text())}
    return Tried(run_ids[0], run_ids[1], run_ids[2], broken, answers, server.url)


def as_jpeg(path: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_images_sent_get_the_classes_the_run_gave_them_and_the_rest_a_reason(tried, client):
    chosen = sorted(tried.answers)[::2]  # 6 of the 12 test images, PNG as uploaded
    files = [("file", (Path(path).name, Path(path).read_bytes(), "image/png"))
             for path in chosen]
    files[3:3] = [("file", ("notes.txt", b"not an image", "text/plain")),
                  ("file", ("bomb.png", png_with_declared_size(50_000, 50_000), "image/png")),
                  ("file", ("", b"", "application/octet-stream"))]  # an empty part, no name
    # `top` is a query parameter: as a form field it was dropped, five classes answered.
    misplaced = client.post(f"/api/runs/{tried.run_id}/predict", files=files,
                            data={"top": "2"})
    assert misplaced.status_code == 422
    assert misplaced.json()["detail"] == ("the form has a field 'top', which this request "
                                          "does not take: send each image in a field named "
                                          "'file' (curl -F file=@cat.jpg ...)")
    answer = client.post(f"/api/runs/{tried.run_id}/predict", files=files)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["run_id"] == tried.run_id and body["seconds"] >= 0
    images = body["images"]
    assert [image["index"] for image in images] == list(range(9))  # in the order sent
    assert [image["name"] for image in images] == [
        *(Path(path).name for path in chosen[:3]), "notes.txt", "bomb.png", "image 6",
        *(Path(path).name for path in chosen[3:])]
    skipped = {image["name"]: image for image in images if image["skipped"] is not None}
    assert skipped["notes.txt"]["skipped"].startswith("not an image this app reads (unsupported")
    assert skipped["bomb.png"]["skipped"] == (
        "50000x50000 = 2,500,000,000 pixels, over the limit of 40,000,000 "
        "(SELFTUNE_MAX_IMAGE_PIXELS)")
    assert skipped["image 6"]["skipped"] == "the file is empty"
    for image in skipped.values():
        assert image["label"] is None and image["top"] == []

    labeled = [image for image in images if image["skipped"] is None]
    # The model as plain timm loads the export gives what the run's own evaluation gave.
    assert [image["label"] for image in labeled] == [tried.answers[path] for path in chosen]
    for image in labeled:
        top = image["top"]
        assert len(top) == 3  # the 5 asked for by default, of 3 classes
        assert {choice["label"] for choice in top} == {"circle", "square", "triangle"}
        probabilities = [choice["probability"] for choice in top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert top[0]["label"] == image["label"]
        assert image["confidence"] == pytest.approx(probabilities[0])
        assert image["margin"] == pytest.approx(probabilities[0] - probabilities[1])

    # JPEG too, and `top` cuts the list; the model loaded once serves the next request.
    answer = client.post(f"/api/runs/{tried.run_id}/predict?top=1",
                         files=[("file", ("photo.jpg", as_jpeg(chosen[0]), "image/jpeg"))])
    assert answer.status_code == 200, answer.text
    (image,) = answer.json()["images"]
    assert [choice["label"] for choice in image["top"]] == [image["label"]]

    # A 4 kB PNG of 4,000,000 x 1 pixels (within the pixel limit) was a 500 for every image
    # sent with it: timm's resize of the whole needed hundreds of GB (MemoryError).
    strip = io.BytesIO()
    Image.new("L", (4_000_000, 1), 128).save(strip, format="PNG")
    answer = client.post(f"/api/runs/{tried.run_id}/predict", files=[
        ("file", ("strip.png", strip.getvalue(), "image/png")),
        ("file", (Path(chosen[0]).name, Path(chosen[0]).read_bytes(), "image/png"))])
    assert answer.status_code == 200, answer.text
    assert [(image["skipped"], image["label"] is not None)
            for image in answer.json()["images"]] == [(None, True), (None, True)]


def test_what_cannot_be_labeled_is_refused_with_what_to_do(tried, client):
    image = Path(sorted(tried.answers)[0]).read_bytes()
    one = [("file", ("a.png", image, "image/png"))]
    cases = [
        (client.post(f"/api/runs/{tried.queued_run_id}/predict", files=one), 409,
         f"run {tried.queued_run_id} has no model: it is queued; a run exports its "
         "model when it succeeds"),
        (client.post("/api/runs/999999/predict", files=one), 404, "run 999999 does not exist"),
        (client.post(f"/api/runs/{tried.broken_run_id}/predict", files=one), 409,
         f"run {tried.broken_run_id}'s model does not load: model.safetensors does not load as "
         "timm's 'test_efficientnet' with 3 classes: Error while deserializing header: "
         "header too small"),
        (client.post(f"/api/runs/{tried.run_id}/predict", json={"file": "a.png"}), 415,
         "send the images as multipart/form-data, each in a field named 'file' "
         "(curl -F file=@cat.jpg -F file=@dog.png ...)"),
        (client.post(f"/api/runs/{tried.run_id}/predict", files=[("image", ("a.png", image))]),
         422, "the form has a field 'image', which this request does not take: send each image "
         "in a field named 'file' (curl -F file=@cat.jpg ...)"),
        (client.post(f"/api/runs/{tried.run_id}/predict", headers={
            "Content-Type": "multipart/form-data; boundary=b"}, content=b"--b--\r\n"),
         422, "no image in the form: send each in a field named 'file' (curl -F file=@cat.jpg "
         "...)"),
        (client.post(f"/api/runs/{tried.run_id}/predict",
                     files=[("file", (f"{n}.png", image))
                            for n in range(MAX_IMAGES + 1)]), 422,
         f"send at most {MAX_IMAGES} images at a time (the form has more 'file' fields); "
         "label a folder with the command line's predict"),
        (client.post(f"/api/runs/{tried.run_id}/predict",
                     files=[("file", ("huge.png", b"\0" * (MAX_BODY_BYTES + 1)))]), 413,
         "the images add up to more than 64.0 MiB: send fewer or smaller ones (the model sees "
         "them at its own input size)"),
        (client.post(f"/api/runs/{tried.run_id}/predict",
                     files=[("file", ("a.txt", b"text")), ("file", ("b.png", b"\x89PNG"))]),
         422, "none of the 2 files is an image this app can label: a.txt: not an image this "
         "app reads (unsupported; JPEG, PNG, WebP, BMP, TIFF or GIF); b.png: not an image "
         "this app reads (unsupported; JPEG, PNG, WebP, BMP, TIFF or GIF)"),
        (client.post(f"/api/runs/{tried.run_id}/predict",
                     files=[("file", (f"{n}.png", b"")) for n in range(7)]),
         422, "none of the 7 files is an image this app can label: "
         + "; ".join(f"{n}.png: the file is empty" for n in range(5)) + "; and 2 more"),
    ]
    for answer, status, detail in cases:
        assert (answer.status_code, answer.json()["detail"]) == (status, detail)
    answer = client.post(f"/api/runs/{tried.run_id}/predict?top=0", files=one)
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "top"]


def test_the_run_page_labels_the_images_chosen_and_says_which_it_could_not_read(
        tried, tmp_path, request):
    chosen = sorted(tried.answers)[1:4]
    junk = tmp_path / "readme.txt"
    junk.write_text("not an image")
    # Stored 40 x 20 and marked to be shown turned a quarter (EXIF orientation 6), as phones
    # store photos: the model sees it as stored, and so should its preview.
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 40, 40)).save(sideways, exif=exif)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{tried.url}/runs/{tried.run_id}")
        card = page.locator("#try-model")
        expect(card).to_be_visible()
        page.set_input_files("#try-files", [*chosen, str(junk), str(sideways)])
        expect(page.locator("#try-results figure.tried")).to_have_count(5, timeout=30_000)
        status = page.inner_text("#try-status")
        assert status.startswith("Labeled 4 images in ") and status.endswith(
            "; 1 file could not be read."), status
        # Drawn in its 96 px box: red 96 wide and 48 high as stored, not 48 x 96 turned.
        preview = page.locator("#try-results figure.tried").nth(4).locator("img")
        preview.evaluate("(img) => img.decode()")
        shot = Image.open(io.BytesIO(preview.screenshot())).convert("RGB")
        red = Image.eval(shot, lambda value: 255 if value > 150 else 0).split()[0]
        left, top, right, bottom = Image.composite(
            red, Image.new("L", shot.size), shot.split()[1].point(lambda v: 255 * (v < 100))
        ).getbbox()
        assert right - left > 1.5 * (bottom - top), (left, top, right, bottom)
        figures = page.locator("#try-results figure.tried")
        for n, path in enumerate(chosen):
            figure = figures.nth(n)
            assert figure.locator(".tried-name").inner_text() == Path(path).name
            assert figure.locator(".tried-label strong").inner_text() == tried.answers[path]
            assert figure.locator(".tried-top tr").count() == 3
            # The preview is the file chosen, shown by the browser.
            assert figure.locator("img").evaluate("(img) => img.naturalWidth") > 0
        assert figures.nth(3).locator(".error").inner_text().startswith(
            "not an image this app reads")
        browser.screenshot("tried")
        assert page.inner_text("#snippet-try") == (
            f"curl -F file=@photo.jpg -F file=@another.png {tried.url}/api/runs/{tried.run_id}"
            "/predict")

        # Dropped on the card: more than the most at a time sends the first of them.
        over = page.evaluate("""async (count) => {
            const canvas = document.createElement("canvas");
            canvas.width = canvas.height = 40;
            canvas.getContext("2d").fillRect(10, 10, 20, 20);
            const blob = await new Promise((done) => canvas.toBlob(done, "image/png"));
            const data = new DataTransfer();
            for (let n = 0; n < count; n += 1) {
                data.items.add(new File([blob], `dropped ${n}.png`, { type: "image/png" }));
            }
            const card = document.getElementById("try-model");
            const options = { dataTransfer: data, bubbles: true, cancelable: true };
            card.dispatchEvent(new DragEvent("dragover", options));
            const over = card.classList.contains("over");
            card.dispatchEvent(new DragEvent("drop", options));
            return over && !card.classList.contains("over");
        }""", MAX_IMAGES + 1)
        assert over
        expect(page.locator("#try-results figure.tried")).to_have_count(MAX_IMAGES)
        expect(page.locator("#try-results .tried-name").last).to_have_text(
            f"dropped {MAX_IMAGES - 1}.png")
        assert page.inner_text("#try-status").endswith(
            f"; the first {MAX_IMAGES} of the {MAX_IMAGES + 1} chosen (at most {MAX_IMAGES} "
            "at a time).")

        # A run that has not trained has no model to try.
        page.goto(f"{tried.url}/runs/{tried.queued_run_id}")
        page.wait_for_selector("#run-status .badge")
        assert page.locator("#try-model").is_hidden()
        assert browser.errors == []


def test_the_start_form_suggests_the_offline_backbones_and_finished_runs_models(tried, client):
    """The backbone was a blank text field: which names work offline, and that a run's model
    can be gone on from, were in the README only."""
    page = client.get("/experiments/new").text
    options = re.findall(r'<option value="([^"]*)" label="([^"]*)"></option>', page)
    offline = installed_offline_backbones()
    assert offline  # the packages of pyproject.toml
    assert options[:len(offline)] == [
        (name, "ImageNet weights installed here: works offline") for name in offline]
    # The latest finished first; the queued run has no model.
    assert options[len(offline):] == [
        (f"runs/{run_id}/model.safetensors",
         f"run #{run_id}&#39;s model (Fine-tuning, {budget}, shapes: top-1 50.0%)")
        for run_id, budget in ((tried.broken_run_id, "all"), (tried.other_run_id, "50%"),
                               (tried.run_id, "15%"))]
    hint = re.search(r'<p class="hint muted" id="backbone-hint">(.*?)</p>', page, re.S)[1]
    assert all(f"<code>{name}</code>" in hint for name in offline)

    # A suggested model is a backbone an experiment can start from.
    check = client.post("/api/experiments/check", json={
        "dataset_id": client.get(f"/api/runs/{tried.run_id}").json()["dataset_id"],
        "backbone": f"runs/{tried.run_id}/model.safetensors", "methods": ["fine-tune"],
        "budgets": ["15%"], "seeds": [0],
        "overrides": {"image_size": 32, "batch_size": 4, "iterations": 2}})
    assert check.status_code == 200, check.text


def test_forms_past_the_most_at_once_are_asked_to_come_back(tried, client):
    """Each form is held in memory until it is labeled: four at once, the fifth a 429 that
    says when to come back. The four are held open by bodies that stop half-way."""
    image = Path(sorted(tried.answers)[0]).read_bytes()
    boundary = "held-form"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"'
            "\r\nContent-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    go_on = threading.Event()

    def held_body():
        yield head + image[:20]
        go_on.wait(60)
        yield image[20:] + tail

    def held_post():
        with httpx.Client(base_url=tried.url, timeout=90) as own:
            return own.post(f"/api/runs/{tried.run_id}/predict", content=held_body(),
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    one = [("file", ("a.png", image, "image/png"))]
    with ThreadPoolExecutor(TRYING_AT_ONCE) as pool:
        held = [pool.submit(held_post) for _ in range(TRYING_AT_ONCE)]
        try:
            # Until all four are in, the probe is taken and answered at once (415: not a form),
            # never holding a place one of them needs; then it is refused.
            refused = wait_for(lambda: (answer := client.post(
                f"/api/runs/{tried.run_id}/predict", json={})).status_code == 429 and answer,
                timeout=30, message="a fifth request refused")
        finally:
            go_on.set()
        answers = [future.result() for future in held]
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["detail"] == (
        f"{TRYING_AT_ONCE} forms of images are being labeled already: try again in a moment")
    assert [answer.status_code for answer in answers] == [200] * TRYING_AT_ONCE
    assert {answer.json()["images"][0]["label"] for answer in answers} == {
        tried.answers[sorted(tried.answers)[0]]}
    assert client.post(f"/api/runs/{tried.run_id}/predict", files=one).status_code == 200


def test_the_experiment_page_puts_the_same_images_through_each_model(tried, request, tmp_path):
    """One model per method and budget that has finished, a column each; the queued one has
    none. A file no model reads says why once, and shows no broken picture."""
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    chosen = [*sorted(tried.answers)[4:7], str(junk)]
    with open_browser(request.node.name) as browser:
        page = browser.page
        with httpx.Client(base_url=tried.url) as client:
            experiment_id = client.get(f"/api/runs/{tried.run_id}").json()["experiment_id"]
        page.goto(f"{tried.url}/experiments/{experiment_id}")
        expect(page.locator("#try-models")).to_be_visible()
        page.set_input_files("#try-models-files", chosen)
        expect(page.locator("#try-models-status")).to_have_text(
            "4 images through 2 models.", timeout=30_000)
        headers = page.locator("#try-models-table thead th").all_inner_texts()
        assert [" ".join(text.split()) for text in headers] == [
            "Image", "Fine-tuning 15%, seed 0", "Fine-tuning 50%, seed 0"]
        rows = page.locator("#try-models-table tbody tr")
        assert rows.count() == 4
        unread = rows.nth(3).locator("td")
        assert unread.count() == 1 and unread.get_attribute("colspan") == "2"
        assert unread.inner_text().startswith("not an image this app reads")
        expect(rows.nth(3).locator(".no-preview")).to_have_text("no preview")
        for n, path in enumerate(chosen[:3]):
            assert rows.nth(n).locator("th").inner_text().strip() == Path(path).name
            labels = rows.nth(n).locator("td strong").all_inner_texts()
            assert labels == [tried.answers[path]] * 2
        browser.screenshot("tried-models")
        assert browser.errors == []
