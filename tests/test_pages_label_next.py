"""The run page's "label next" on a dataset without images of its own to label: the budget
only withheld labels the user gave. Real uvicorn, Redis and SQLite in Chromium; the run's
predictions are written as the worker writes them."""

from __future__ import annotations

import csv
import hashlib
import io
import re

import pytest
import redis
from playwright.sync_api import expect

from app.db import session_scope
from app.models import Artifact
from tests.browser import open_browser
from tests.support import add_dataset_row
from tests.test_experiments_cancel_delete import end_as_worker, start_sweep

pytestmark = pytest.mark.browser


def record_predictions(data_dir, database_url: str, run_id: int, hidden: list[str],
                       label: str | list[str] = "cat", margins: list[float] | None = None,
                       images: list[tuple[int | str, str]] | None = None) -> None:
    """predictions.csv with one row per image the budget left unlabeled, as rewritten by
    the worker (image ids and the archive's paths: `images`, by default no id and
    cat/0.png, cat/1.png, ...), each predicted `label` (one for all, or one each) with its
    margin (by default 0.2, 0.3, ...)."""
    labels = [label] * len(hidden) if isinstance(label, str) else label
    if margins is None:
        margins = [0.2 + index / 10 for index in range(len(hidden))]
    if images is None:
        images = [("", f"cat/{index}.png") for index in range(len(hidden))]
    folder = data_dir / "runs" / str(run_id)
    folder.mkdir(parents=True)
    path = folder / "predictions.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "path", "label", "confidence", "margin", "hidden_label"])
        for (image_id, image_path), hidden_label, margin, predicted in zip(
                images, hidden, margins, labels, strict=True):
            writer.writerow([image_id, image_path, predicted, 0.6, margin, hidden_label])
    with session_scope(database_url) as session:
        session.add(Artifact(run_id=run_id, name="predictions.csv",
                             path=f"runs/{run_id}/predictions.csv",
                             size_bytes=path.stat().st_size,
                             sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


@pytest.mark.parametrize("hidden", [["cat", "dog"], []], ids=["withheld", "none"])
def test_label_next_offers_the_withheld_images_only_when_the_budget_hid_some(
    live_server, request, hidden
):
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        record_predictions(live_server.data_dir, database_url, run_ids[0], hidden)
        end_as_worker(database_url, live, run_ids[0], "succeeded")
        answer = client.get(f"/api/runs/{run_ids[0]}/label-next.csv",
                            params={"include_withheld": "true"})
        ranked = answer.text.splitlines()
        # Its own file name: both lists were saved as run-N-label-next.csv.
        assert answer.headers["content-disposition"] == (
            f'attachment; filename="run-{run_ids[0]}-label-next-with-withheld.csv"')
        assert client.get(f"/api/runs/{run_ids[0]}/label-next.csv").headers[
            "content-disposition"] == f'attachment; filename="run-{run_ids[0]}-label-next.csv"'
    assert len(ranked) == 1 + len(hidden)

    with open_browser(request.node.name) as browser:
        browser.page.goto(f"{live_server.url}/runs/{run_ids[0]}")
        box = browser.page.wait_for_selector("#label-next-thumbs p")  # set once, when known
        text = box.inner_text()
        assert text.startswith("No unlabeled images: every image has a label.")
        link = browser.page.query_selector("#label-next-thumbs a")
        # The images the budget hid, ranked as label next ranks: smallest margin first.
        shown = browser.page.locator("#label-next-thumbs figcaption").all_inner_texts()
        if hidden:
            assert "The budget only hid some of them" in text
            assert link.get_attribute("href") == (
                f"/api/runs/{run_ids[0]}/label-next.csv?include_withheld=true")
            assert shown == ["cat\nmargin 20%", "cat\nmargin 30%"]
            # The caption ends each: no choice (they have labels), nor a stray index where it
            # would be.
            assert [text.split("\n")[-2:] for text in browser.page.locator(
                "#label-next-thumbs figure").all_inner_texts()] == [
                caption.split("\n") for caption in shown]
        else:
            assert link is None and "hid" not in text and shown == []
        browser.screenshot("label-next")
        browser.assert_no_errors()


def test_a_thumbnails_margin_is_shown_whole_and_a_long_label_is_cut(live_server, request):
    """A thumbnail's caption was one line cut to the thumbnail's width: "margin 100%" read
    "margin 10…", a sure prediction shown as any other. The label (a folder name, any length)
    is still cut to one line, whole on hover; the margin is shown whole, and to two decimals
    below 1 %: the images first in line all read "margin 0%". On hover, an image whose label
    the budget withheld also says that label."""
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    label = "camera_trap_site_" * 3
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        record_predictions(live_server.data_dir, database_url, run_ids[0],
                           ["cat", "dog", "cat", "dog", "cat"], label=label,
                           margins=[1.0, 0.05, 0.0042, 0.00003, 0.0])
        end_as_worker(database_url, live, run_ids[0], "succeeded")

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_ids[0]}")
        page.wait_for_selector("#label-next-thumbs figure")
        captions = page.evaluate("""() => [...document.querySelectorAll(
            '#label-next-thumbs figure')].map((figure) => {
                const part = (name) => {
                    const node = figure.querySelector(`figcaption .${name}`);
                    return {text: node.textContent, cut: node.scrollWidth > node.clientWidth,
                            lines: Math.round(node.getBoundingClientRect().height
                                              / parseFloat(getComputedStyle(node).lineHeight))};
                };
                return {label: part("label"), margin: part("margin"), title: figure.title,
                        width: figure.getBoundingClientRect().width};
            })""")
        browser.screenshot("margins")
        assert [caption["margin"]["text"] for caption in captions] == [
            "margin 0%", "margin <0.01%", "margin 0.42%", "margin 5%", "margin 100%"]
        assert not any(caption["margin"]["cut"] for caption in captions)
        assert all(caption["label"] == {"text": label, "cut": True, "lines": 1}
                   for caption in captions)
        assert all(caption["width"] == 76 for caption in captions)  # the thumbnails' grid
        assert captions[4]["title"] == f"cat/0.png: {label}, confidence 60%; labeled cat"
        assert captions[1]["title"] == f"cat/3.png: {label}, confidence 60%; labeled dog"
        browser.assert_no_errors()


def test_label_next_with_images_to_label_points_to_adding_their_labels(live_server, request):
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        _, run_ids = start_sweep(client, dataset_id, seeds=[0])
        record_predictions(live_server.data_dir, database_url, run_ids[0], ["", ""])
        end_as_worker(database_url, live, run_ids[0], "succeeded")

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_ids[0]}")
        hint = page.wait_for_selector("#add-labels-hint")
        assert page.locator("#label-next-thumbs figure").count() == 2
        assert hint.inner_text() == ("Labeled others? Add their labels to the dataset as a "
                                     "CSV of path,label lines.")
        assert hint.query_selector("a").get_attribute("href") == (
            f"/datasets/{dataset_id}#add-labels-title")
        browser.assert_no_errors()


def test_label_next_shows_more_images_to_label_on_request(live_server, request):
    """Label next showed the first 24 images and no more: someone labeling a hundred had to
    write the rest into a CSV by hand. "Show more" adds 24 at a time, each with its choice,
    up to the 500 the page reads; the CSV has the rest."""
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        record_predictions(live_server.data_dir, database_url, run_ids[0], [""] * 510,
                           margins=[index / 1000 for index in range(510)])
        end_as_worker(database_url, live, run_ids[0], "succeeded")

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_ids[0]}")
        more = page.locator("#label-next-more")
        expect(more).to_have_text("Show 24 more")
        figures = page.locator("#label-next-thumbs figure")
        assert figures.count() == 24
        browser.screenshot("first-24")
        more.click()
        assert figures.count() == 48
        # On to the first image shown, in rank order after the others.
        assert page.evaluate("document.activeElement.getAttribute('aria-label')") == (
            "Label of cat/24.png")
        page.select_option("select[aria-label='Label of cat/30.png']", "b")
        for _ in range(18):
            more.click()
        expect(more).to_have_text("Show 20 more")
        more.click()
        assert figures.count() == 500
        assert more.is_hidden()
        assert page.inner_text("#label-next-rest") == (
            "These are the first 500; the rest are in the CSV.")
        page.select_option("select[aria-label='Label of cat/499.png']", "a")
        assert page.inner_text("#label-next-form span") == (
            "2 labeled: the new dataset has the same images and test split")
        assert page.locator("#label-next-thumbs figcaption .margin").nth(499).inner_text() == (
            "margin 50%")  # the 500th, in rank order
        browser.screenshot("shown-more")
        browser.assert_no_errors()


def test_label_next_can_spread_its_images_over_the_predicted_classes(live_server, request):
    """The least certain images are often all of the two classes the model confuses most:
    `order=spread` takes the least certain of each predicted class in turn. On the page the
    order is chosen above the images, and the labels given stay through a change of order."""
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        record_predictions(live_server.data_dir, database_url, run_ids[0], [""] * 6,
                           label=["a", "a", "a", "b", "b", "a"],
                           margins=[0.1, 0.2, 0.3, 0.4, 0.5, 0.05])
        end_as_worker(database_url, live, run_ids[0], "succeeded")
        url = f"/api/runs/{run_ids[0]}/label-next.csv"
        by_margin = client.get(url)
        spread = client.get(url, params={"order": "spread", "limit": 3})
        unknown = client.get(url, params={"order": "random"})

    def paths(answer) -> list[str]:
        return [row["path"] for row in csv.DictReader(io.StringIO(answer.text))]

    assert paths(by_margin) == [f"cat/{n}.png" for n in (5, 0, 1, 2, 3, 4)]
    # Each round the next of each class, least certain first: (a 0.05, b 0.4), (a 0.1, ...
    assert paths(spread) == ["cat/5.png", "cat/3.png", "cat/0.png"]
    assert [row["rank"] for row in csv.DictReader(io.StringIO(spread.text))] == ["1", "2", "3"]
    assert spread.headers["content-disposition"] == (
        f'attachment; filename="run-{run_ids[0]}-label-next-spread.csv"')
    assert unknown.status_code == 422

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_ids[0]}")
        figures = page.locator("#label-next-thumbs figure")
        expect(figures).to_have_count(6)
        page.select_option("select[aria-label='Label of cat/1.png']", "b")
        # The other order not read (the server down a moment): the choice says what is shown.
        page.route("**/label-next.csv?order=spread*", lambda route: route.fulfill(status=503))
        page.select_option("#label-next-order", "spread")
        expect(page.locator("#label-next-order")).to_be_enabled()
        assert page.input_value("#label-next-order") == "margin"
        assert figures.nth(1).get_attribute("title").startswith("cat/0.png")
        page.unroute("**/label-next.csv?order=spread*")
        page.select_option("#label-next-order", "spread")
        # cat/5.png leads both orders: the second image tells the new order has come
        expect(figures.nth(1)).to_have_attribute("title", re.compile(r"^cat/3\.png"))
        assert [title.split(":")[0] for title in figures.evaluate_all(
            "(all) => all.map((figure) => figure.title)")] == [
            f"cat/{n}.png" for n in (5, 3, 0, 4, 1, 2)]
        assert page.input_value("select[aria-label='Label of cat/1.png']") == "b"
        assert page.inner_text("#label-next-form span") == (
            "1 labeled: the new dataset has the same images and test split")
        browser.screenshot("spread")
        browser.assert_no_errors(expected=("503",))
