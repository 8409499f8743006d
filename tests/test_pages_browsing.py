"""Pages as people browse them, in Chromium against a real uvicorn, Redis and SQLite (no
worker: the tests write what a worker would): a phone's window and one that narrows, Back to a
page the browser kept, and printing."""

from __future__ import annotations

import re

import pytest
import redis
from playwright.sync_api import expect

from tests.browser import PHONE, open_browser
from tests.support import add_dataset_row, make_image_archive
from tests.test_experiments_cancel_delete import mark_running, start_sweep
from tests.test_pages_accessibility import violations
from tests.test_pages_fixes import cards_scrolling_sideways, finish, quality

pytestmark = pytest.mark.browser

LONG_CLASS = "triangle_with_a_longer_name"  # over the 16 characters a column's name shows
# What Chromium lays a page out at to print it on A4 with its default margins.
A4_WIDTH = {"width": 718, "height": 1000}


def finished_run(live_server, classes: tuple[str, ...] = ("circle", "square", LONG_CLASS)) -> int:
    """A succeeded run with its scores, confusion matrix and pseudo-label charts."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url, {name: {"train": 10, "test": 2}
                                                for name in classes})
    with live_server.client() as client:
        _, (run_id,) = start_sweep(client, dataset_id, seeds=[0], methods=["self-tuning"],
                                   budgets=[0.5])
    finish(database_url, live, run_id, {
        "test_top1": 0.75, "test_mean_class_acc": 0.75, "pseudo_label_acc": 0.7,
        "train_pseudo_label_acc": 0.6, "confusion_matrix": [[2, 0, 0], [0, 1, 1], [0, 0, 2]],
        "per_class_acc": [1.0, 0.5, 1.0], "pseudo_label_quality": {
            **quality(12, queue=True), "predicted_distribution": [0.25, 0.25, 0.5],
            "labeled_distribution": [0.3, 0.3, 0.4]}})
    return run_id


def canvases_wider_than_their_cards(page) -> list[str]:
    return page.evaluate("""[...document.querySelectorAll('canvas')]
        .filter((canvas) => canvas.offsetParent)
        .filter((canvas) => canvas.getBoundingClientRect().right
            > canvas.closest('.card').getBoundingClientRect().right)
        .map((canvas) => canvas.id)""")


def test_a_run_page_on_a_phone_is_not_widened_by_its_class_names_read_aloud(
    live_server, request
):
    """The whole name of a confusion matrix column cut short, there for screen readers, was
    placed against the page rather than its card: at 375 px it stuck out past the scrolling
    card and made the run page 398 px wide."""
    run_id = finished_run(live_server)
    with open_browser(request.node.name, viewport=PHONE) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_selector("#results:not([hidden]) #confusion td")
        assert page.locator("#confusion thead .sr-only").all_inner_texts() == [LONG_CLASS]
        assert browser.horizontal_overflow() == 0
        browser.screenshot("run-on-a-phone")
        browser.assert_no_errors()


def test_side_by_side_charts_shrink_with_the_window(live_server, request):
    """The pseudo-label quality charts sat in columns at least 320 px wide, and a canvas
    drawn wider held its column: a run page opened on a desktop and narrowed to a phone's
    375 px kept them 336 px wide in a 315 px card, cut off at its edge."""
    run_id = finished_run(live_server)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_selector("#results:not([hidden]) #confusion td")
        page.wait_for_function("Chart.getChart(document.getElementById('chart-bins'))")
        for width in (768, PHONE["width"], 320):
            page.set_viewport_size({"width": width, "height": 800})
            page.wait_for_timeout(400)  # Chart.js resizes on the next frames
            assert canvases_wider_than_their_cards(page) == [], width
            assert "quality" not in cards_scrolling_sideways(page), width
            assert browser.horizontal_overflow() == 0, width
        browser.screenshot("narrowed-to-320")
        browser.assert_no_errors()


def test_back_to_the_upload_page_after_an_upload_offers_the_next_one(
    live_server, request, tmp_path
):
    """Back from the new dataset's page, Chromium showed the upload page as it was left:
    "Done." under a full bar, and Upload greyed until the page was reloaded."""
    archive = make_image_archive(tmp_path / "shapes.zip", train_per_class=4, test_per_class=2,
                                 unlabeled=2)
    with open_browser(request.node.name, back_forward_cache=True) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/datasets/new")
        page.evaluate("window.keptByTheBrowser = true")
        page.set_input_files("#file", str(archive))
        page.click("#upload-button")
        page.wait_for_url(re.compile(r"/datasets/\d+$"))
        page.wait_for_selector("h1")
        page.go_back(wait_until="commit")  # a page from the cache fires no load event
        page.wait_for_function("window.keptByTheBrowser === true")  # not loaded afresh
        page.wait_for_selector("#upload-button:enabled")
        assert page.is_hidden("#upload-progress")
        browser.screenshot("back-to-upload")
        browser.assert_no_errors()


def test_back_to_a_page_whose_item_was_deleted_says_it_is_gone(live_server, request):
    """Deleted from its page, an experiment (and with it its runs) or a dataset came back on
    Back from the browser's back/forward cache as it was left: the experiment with Delete
    greyed for ever, its failed run with Run again, the dataset with Start an experiment. A
    page shown again from that cache reads what it shows and, where that is gone, says so
    and offers nothing more; where it is still there, nothing changes."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        experiment_id, (run_id, other_run) = start_sweep(client, dataset_id, seeds=[0])
    for run in (run_id, other_run):
        mark_running(database_url, run)
        finish(database_url, live, run, status="failed")
    restored = "window.keptByTheBrowser === true"  # shown from the cache, not loaded afresh
    with open_browser(request.node.name, back_forward_cache=True) as browser:
        page = browser.page
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{live_server.url}/runs/{run_id}")
        expect(page.locator("#requeue")).to_be_visible()
        page.evaluate("window.keptByTheBrowser = true")
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.evaluate("window.keptByTheBrowser = true")
        page.click("#delete-experiment")
        page.wait_for_url(re.compile(r"/experiments$"))

        page.go_back(wait_until="commit")  # a page from the cache fires no load event
        page.wait_for_function(restored)
        expect(page.locator("#action-error")).to_have_text(
            f"Experiment #{experiment_id} no longer exists: it was deleted.")
        expect(page.locator("#experiment-status")).to_have_text("deleted")
        assert page.is_hidden("#delete-experiment") and page.is_hidden("#cancel-all")
        browser.screenshot("experiment-gone")

        page.go_back(wait_until="commit")
        page.wait_for_function(restored)
        expect(page.locator("#run-error")).to_have_text(
            f"Run #{run_id} no longer exists: its experiment was deleted.")
        expect(page.locator("#run-status")).to_have_text("deleted")
        assert page.is_hidden("#requeue")

        # A dataset that is still there: its page comes back as it was.
        dataset_page = f"{live_server.url}/datasets/{dataset_id}"
        page.goto(dataset_page)
        page.evaluate("window.keptByTheBrowser = true")
        page.get_by_role("link", name="All datasets", exact=True).click()
        page.wait_for_url(re.compile(r"/datasets$"))
        with page.expect_response(f"{live_server.url}/api/datasets/{dataset_id}") as read:
            page.go_back(wait_until="commit")
        assert read.value.status == 200
        page.wait_for_function(restored)
        assert page.is_hidden("#delete-error") and page.is_enabled("button[data-delete-url]")

        page.click("button[data-delete-url]")
        page.wait_for_url(re.compile(r"/datasets$"))
        page.go_back(wait_until="commit")
        page.wait_for_function(restored)
        expect(page.locator("#delete-error")).to_have_text(
            "This dataset no longer exists: it was deleted.")
        assert page.is_hidden("button[data-delete-url]") and page.is_hidden("#start-experiment")
        browser.screenshot("dataset-gone")
        browser.assert_no_errors(expected=("status of 404",))


def test_back_to_a_list_shows_it_without_what_was_deleted_since(live_server, request):
    """Back to the list of experiments (or of datasets) from the page of one deleted since,
    Chromium showed the list as it was left, from its back/forward cache: the deleted one
    still listed, its link to a page that is gone. A list shown again is read again."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id, seeds=[0])
    for run in run_ids:
        mark_running(database_url, run)
        finish(database_url, live, run, status="failed")
    with open_browser(request.node.name, back_forward_cache=True) as browser:
        page = browser.page
        page.on("dialog", lambda dialog: dialog.accept())
        for listing, item, delete in [
            ("/experiments", f"/experiments/{experiment_id}", "#delete-experiment"),
            ("/datasets", f"/datasets/{dataset_id}", "button[data-delete-url]"),
        ]:
            link = page.locator(f'main a[href="{item}"]')
            page.goto(live_server.url + listing)
            expect(link).to_have_count(1)
            link.first.click()
            page.click(delete)
            page.wait_for_url(re.compile(f"{listing}$"))
            expect(link).to_have_count(0)
            page.go_back(wait_until="commit")  # the deleted item's page, which says so
            page.wait_for_url(re.compile(f"{item}$"), wait_until="commit")
            page.go_back(wait_until="commit")  # the list as it was left, from the cache
            page.wait_for_url(re.compile(f"{listing}$"), wait_until="commit")
            expect(link).to_have_count(0)
        browser.assert_no_errors(expected=("status of 404",))

def test_a_printed_experiment_keeps_every_column_of_its_results(live_server, request):
    """Printed on A4, the results card cut the label estimates' table after "Estimated with
    twice the labels": a card scrolls its wide tables sideways, which paper cannot."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(
            client, add_dataset_row(database_url), seeds=[0, 1], methods=["fine-tune"],
            budgets=[0.2, 0.5])
    for index, run_id in enumerate(run_ids):
        finish(database_url, live, run_id, {"test_top1": 0.5 + index / 10})
    with open_browser(request.node.name, viewport=A4_WIDTH) as browser:
        page = browser.page
        page.emulate_media(media="print")
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#label-estimates:not([hidden]) tbody tr")
        assert cards_scrolling_sideways(page) == []
        right = page.evaluate("""() => Math.max(...[...document.querySelectorAll(
            '#label-estimates th, #label-estimates td')]
            .map((cell) => cell.getBoundingClientRect().right))""")
        card = page.evaluate(
            "document.getElementById('results').getBoundingClientRect().right")
        assert right <= card
        browser.screenshot("printed")
        browser.assert_no_errors()


def test_the_home_page_shows_the_latest_work_or_where_to_start(live_server, request):
    """The home page said only whether the database and Redis answered: someone coming back
    went through the lists to find the sweep they started. It names the newest experiments
    (how each stands, its best model) and datasets, and before any upload, the steps."""
    database_url = live_server.database_url
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/")
        assert page.is_visible("#getting-started") and page.locator("#latest").count() == 0
        assert page.locator("#getting-started li").count() == 3

        dataset_ids = [add_dataset_row(database_url, name=f"photos {n}") for n in range(6)]
        page.goto(f"{live_server.url}/")
        assert page.locator("#getting-started").count() == 0
        assert page.locator("#latest-experiments").inner_text().endswith(
            "None yet: start one on a dataset, to compare the methods across label budgets.")
        datasets = page.locator("#latest-datasets li > a")
        assert datasets.all_inner_texts() == [f"photos {n}" for n in (5, 4, 3, 2, 1)]
        assert datasets.first.get_attribute("href") == f"/datasets/{dataset_ids[5]}"
        assert page.inner_text("#latest-datasets li >> nth=0").startswith(
            "photos 5\n2 classes, 0 images, 0 unlabeled · 20")  # a row without images
        assert page.inner_text("#latest-datasets p:last-child") == "All 6 datasets ›"

        with live_server.client() as client:
            experiment_id, (run_id, other_id) = start_sweep(
                client, dataset_ids[2], seeds=[0], methods=["self-tuning", "fine-tune"],
                budgets=[0.5], name="the sweep")
        finish(database_url, redis.Redis.from_url(live_server.redis_url), run_id,
               {"test_top1": 0.8125})
        page.goto(f"{live_server.url}/")
        item = page.locator("#latest-experiments li")
        assert item.count() == 1
        assert item.locator("a").first.get_attribute("href") == f"/experiments/{experiment_id}"
        assert " ".join(item.inner_text().split()) == (
            "the sweep in progress on photos 2 · 1 queued, 1 succeeded · best 81.3% "
            "(Self-Tuning, 50%)")
        assert item.locator("a", has_text="81.3%").get_attribute("href") == f"/runs/{run_id}"
        assert page.inner_text("#latest-experiments p:last-child") == "All 1 experiment ›"
        assert violations(page) == []
        browser.screenshot("latest")

        # Left open, the home page and the experiments list follow the sweep until it ends
        # (read once, they said "in progress" long after it had finished).
        listing = page.context.new_page()
        listing.goto(f"{live_server.url}/experiments")
        expect(listing.locator(f"#status-{experiment_id}")).to_have_text("in progress")
        reads = []
        for tab in (page, listing):
            tab.evaluate("window.sameDocument = true")  # a reload would drop it
            tab.on("request", lambda asked: reads.append(asked.url)
                   if asked.resource_type == "fetch" else None)
        finish(database_url, redis.Redis.from_url(live_server.redis_url), other_id,
               {"test_top1": 0.9})
        expect(item.locator(".badge")).to_have_text("finished", timeout=15_000)
        assert " ".join(item.inner_text().split()) == (
            "the sweep finished on photos 2 · 2 succeeded · best 90.0% (Fine-tuning, 50%)")
        expect(listing.locator(f"#status-{experiment_id}")).to_have_text("finished",
                                                                          timeout=15_000)
        expect(listing.locator(f"#runs-{experiment_id}")).to_have_text("2 succeeded")
        expect(listing.locator(f"#best-{experiment_id} a")).to_have_text("90.0%")
        assert page.evaluate("window.sameDocument") and listing.evaluate("window.sameDocument")
        # Nothing left to go: they stop reading.
        page.wait_for_timeout(500)
        settled = len(reads)
        page.wait_for_timeout(6_000)
        assert len(reads) == settled, reads
        browser.assert_no_errors()
