"""A finished run's page shows the test images its model got wrong (from its
test_predictions.json, as the worker rewrites it with image ids), a pair of a class and an
answer at a time, reached from the confusion matrix's counts; in Chromium, against a real
uvicorn, Redis and SQLite and a dataset uploaded for real (the thumbnails are its images)."""

from __future__ import annotations

import json
import re

import pytest
import redis
from playwright.sync_api import expect

from tests.browser import open_browser
from tests.support import LiveServer
from tests.test_datasets_support import image_bytes, upload, zip_bytes
from tests.test_experiments_cancel_delete import start_sweep
from tests.test_pages_fixes import finish
from tests.test_run_downloads import record_export

READY = "#results:not([hidden]) #per-class tbody tr"
TEST_IMAGES = {"cat": 32, "dog": 4, "fox": 4}


def uploaded(client) -> tuple[int, list[dict]]:
    """A dataset with a test split of TEST_IMAGES, and its test images (id, path, class)."""
    paths = [f"{split}/{name}/{i}.png" for name, n in TEST_IMAGES.items()
             for split in ("train", "test") for i in range(n)]
    entries = {path: image_bytes(8_000 + seed) for seed, path in enumerate(paths)}
    dataset = upload(client, zip_bytes(entries), name="mistakes").json()
    names = [c["name"] for c in dataset["classes"]]
    items = client.get(f"/api/datasets/{dataset['id']}/images",
                       params={"split": "test", "limit": 1000}).json()["items"]
    return dataset["id"], [{"image_id": item["id"], "path": item["original_path"],
                            "label": names[item["label"]]} for item in items]


def finished_run(server: LiveServer, client, dataset_id: int, answers: list[dict]) -> int:
    """A succeeded run of the dataset whose exported model answered `answers` (its
    test_predictions.json) and whose matrix counts them."""
    _, (run_id,) = start_sweep(client, dataset_id, seeds=[0], methods=["fine-tune"])
    record_export(server.data_dir, server.database_url, run_id, {
        "test_predictions.json": json.dumps(answers).encode()})
    names = sorted(TEST_IMAGES)
    matrix = [[0] * len(names) for _ in names]
    for row in answers:
        matrix[names.index(row["label"])][names.index(row["predicted"])] += 1
    right = sum(matrix[i][i] for i in range(len(names))) / len(answers)
    finish(server.database_url, redis.Redis.from_url(server.redis_url, decode_responses=True),
           run_id, {"test_top1": right, "test_mean_class_acc": right, "confusion_matrix": matrix,
                    "per_class_acc": [matrix[i][i] / sum(matrix[i]) for i in range(len(names))]})
    return run_id


def figures(page) -> list[dict]:
    return page.eval_on_selector_all("#mistakes-thumbs figure", """(figures) => figures.map(
        (f) => ({title: f.title, src: f.querySelector('img')?.getAttribute('src'),
                 caption: f.querySelector('figcaption').innerText}))""")


def test_the_mistakes_show_by_pair_from_the_matrix_and_open_larger(
    server: LiveServer, request: pytest.FixtureRequest
) -> None:
    with server.client() as client:
        dataset_id, tested = uploaded(client)
        # 30 of the cats taken for dogs, 2 foxes for cats, a dog for a fox, the rest right.
        cats, dogs, foxes = ([row for row in tested if row["label"] == name]
                             for name in ("cat", "dog", "fox"))
        wrong = ({id(row): "dog" for row in cats[:30]} | {id(row): "cat" for row in foxes[:2]}
                 | {id(dogs[0]): "fox"})
        answers = [{**row, "predicted": wrong.get(id(row), row["label"])} for row in tested]
        run_id = finished_run(server, client, dataset_id, answers)
        right_run = finished_run(server, client, dataset_id,
                                 [{**row, "predicted": row["label"]} for row in tested])
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{server.url}/runs/{run_id}")
        page.wait_for_selector(READY)
        # Drawn once test_predictions.json has come (run.js, drawMistakes), after the table.
        page.wait_for_selector("#mistakes-pair option", state="attached")
        options = page.eval_on_selector_all("#mistakes-pair option",
                                            "(options) => options.map((o) => o.textContent)")
        assert options == ["every mistake (33 of 40 test images)", "cat taken for dog (30)",
                           "fox taken for cat (2)", "dog taken for fox (1)"]
        # The most frequent pair's first, each pair's in test order; 24 at first, then the 9
        # left.
        expect(page.locator("#mistakes-thumbs figure")).to_have_count(24)
        in_order = [row for row in answers if row["predicted"] != row["label"]]
        in_order = ([row for row in in_order if row["label"] == "cat"]
                    + [row for row in in_order if row["label"] == "fox"]
                    + [row for row in in_order if row["label"] == "dog"])
        assert [row["label"] for row in answers if row["predicted"] != row["label"]][30] == "dog"
        assert [f["src"] for f in figures(page)] == [
            f"/api/datasets/{dataset_id}/images/{row['image_id']}/thumbnail"
            for row in in_order[:24]]
        thumbnail = page.request.get(server.url + figures(page)[0]["src"])
        assert thumbnail.ok and thumbnail.headers["content-type"] == "image/jpeg"
        first = figures(page)[0]
        assert first["title"] == f"{in_order[0]['path']}: cat, taken for dog"
        assert first["caption"].split("\n") == ["cat", "→ dog"]
        page.click("#mistakes-more")
        expect(page.locator("#mistakes-thumbs figure")).to_have_count(33)
        assert [f["src"] for f in figures(page)][24:] == [
            f"/api/datasets/{dataset_id}/images/{row['image_id']}/thumbnail"
            for row in in_order[24:]]
        assert page.is_hidden("#mistakes-rest")

        page.select_option("#mistakes-pair", label="fox taken for cat (2)")
        expect(page.locator("#mistakes-thumbs figure")).to_have_count(2)
        assert [f["title"] for f in figures(page)] == [
            f"{row['path']}: fox, taken for cat" for row in foxes[:2]]

        # The matrix's count of cats taken for dogs shows those; a diagonal count is no link.
        link = page.locator("#confusion a.mistakes-link", has_text="30")
        assert link.get_attribute("title") == "show the 30 test images of cat taken for dog"
        assert page.locator("#confusion td.diagonal a").count() == 0
        link.click()
        assert page.input_value("#mistakes-pair").split("\0") == ["cat", "dog"]
        expect(page.locator("#mistakes-thumbs figure")).to_have_count(24)
        assert page.url.endswith("#mistakes")
        # A thumbnail opens larger, and → goes on to the next mistake.
        page.locator("#mistakes-thumbs a.enlarge").first.click()
        expect(page.locator("#image-viewer")).to_be_visible()
        viewer = page.locator("#viewer-image")
        expect(viewer).to_have_attribute("src", re.compile(
            rf"/images/{in_order[0]['image_id']}/thumbnail\?size=512$"))
        page.keyboard.press("ArrowRight")
        expect(viewer).to_have_attribute("src", re.compile(
            rf"/images/{in_order[1]['image_id']}/thumbnail\?size=512$"))
        browser.screenshot("mistakes")

        page.goto(f"{server.url}/runs/{right_run}")
        page.wait_for_selector(READY)
        expect(page.locator("#mistakes-thumbs")).to_have_text(
            "None: the model got each of the 40 test images right.")
        assert page.is_hidden("#mistakes-choice")
        browser.assert_no_errors()
