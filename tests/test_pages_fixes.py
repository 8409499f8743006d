"""Page fixes in Chromium against a real uvicorn, Redis and SQLite (no worker: the tests write what
a worker would): an ended experiment's page notices a run queued again; a failed cancel gives
its button back; a delete from the page reads nothing more while it is answered; the budget
chart's x axis is the labeled count on a log scale; an expired sign-in links to the sign-in page
and keeps the start form; a number the form cannot read is reported; the run page names what its
pseudo-label numbers measure; the results table says which runs have no result; sizes in the
units of the server's messages."""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import httpx
import pytest
import redis
from PIL import Image
from playwright.sync_api import expect

from app.db import session_scope
from app.live import publish_end, publish_status, run_stream_key
from app.models import Artifact, Run, RunMetric, utcnow
from tests.browser import DESKTOP, PHONE, open_browser
from tests.support import add_dataset_row, app_env, start_server
from tests.test_experiments_cancel_delete import end_as_worker, mark_running, start_sweep
from tests.test_run_metrics_pages import record

pytestmark = pytest.mark.browser

TOKEN = "correct-horse-battery-staple"
BADGES = "[...document.querySelectorAll('#runs tbody .badge')].map((b) => b.textContent)"
CELLS = "[...document.querySelectorAll('#budget-table tbody td')].map((c) => c.textContent)"


def finish(database_url: str, live: redis.Redis, run_id: int, metrics: dict | None = None,
           status: str = "succeeded", step: int | None = None) -> None:
    """What a worker records when a run ends (its final metrics), then the feeds' end event.
    The run ends at `step`, else at its last (a cancelled run ends where it stopped)."""
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        run.status, run.finished_at = status, utcnow()
        run.step = run.total_steps if step is None else step
        if metrics is not None:
            run.metrics = metrics
    publish_end(live, run)


def runs_by(client, experiment_id: int) -> dict[tuple[str, str, int], int]:
    """Run ids by (method, budget label, seed)."""
    body = client.get(f"/api/experiments/{experiment_id}").json()
    return {(r["method"], r["budget_label"], r["seed"]): r["id"] for r in body["runs"]}


@pytest.fixture
def guarded(settings, tmp_path):
    """A server with an API token: pages need a sign-in, API calls the token."""
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_API_TOKEN=TOKEN)
    url, process = start_server(env, tmp_path / "uvicorn.log")
    yield url, settings.sqlalchemy_url
    process.stop()


def sign_in(page, url: str, next_path: str) -> None:
    page.goto(f"{url}/login?next={quote(next_path, safe='')}")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}{next_path}")


# --- 1. an ended experiment's page follows a run queued again -----------------------------

def test_ended_experiment_page_shows_a_run_queued_again_elsewhere_without_a_reload(
    live_server, request
):
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(
            client, add_dataset_row(live_server.database_url), seeds=[0])
        assert client.post(f"/api/experiments/{experiment_id}/cancel").status_code == 200

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#experiment-status .badge:text-is('cancelled')")
        page.wait_for_selector("#delete-experiment:not([hidden])")
        assert page.is_hidden("#cancel-all") and page.inner_text("#live-state") == ""
        page.evaluate("window.sameDocument = true")

        # "Run again" in another tab (here: the API).
        with live_server.client() as client:
            assert client.post(f"/api/runs/{run_ids[0]}/requeue").status_code == 200
        page.wait_for_selector(f"#runs tr[data-run-id='{run_ids[0]}'] .badge:text-is('queued')",
                               timeout=15_000)
        assert page.is_visible("#cancel-all") and page.is_hidden("#delete-experiment")
        page.wait_for_selector("#experiment-status .badge:text-is('in progress')")
        page.wait_for_selector("#live-state:text-is('● live')")  # following it again
        browser.screenshot("1-requeued-run-shown")

        # Followed live: its end shows as it happens, and the page is idle again after it.
        end_as_worker(live_server.database_url, live, run_ids[0], "cancelled")
        page.wait_for_function(f"{BADGES}.every((s) => s === 'cancelled')")
        page.wait_for_selector("#delete-experiment:not([hidden])")
        page.wait_for_selector("#live-state:text-is('')", state="attached")
        # And a second requeue is noticed as well.
        with live_server.client() as client:
            assert client.post(f"/api/runs/{run_ids[1]}/requeue").status_code == 200
        page.wait_for_selector(f"#runs tr[data-run-id='{run_ids[1]}'] .badge:text-is('queued')",
                               timeout=15_000)
        assert page.evaluate("window.sameDocument") is True  # no reload
        browser.assert_no_errors()


# --- 2. a cancel that fails, and the refresh after it too -----------------------------------

def test_cancel_all_failing_with_its_refresh_shows_the_error_and_gives_the_buttons_back(
    live_server, request
):
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(
            client, add_dataset_row(live_server.database_url), seeds=[0])

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#live-state:text-is('● live')")
        page.route(re.compile(rf"/api/experiments/{experiment_id}/cancel$"), lambda route:
                   route.fulfill(status=500, json={"detail": "the database is unavailable"}))
        page.route(re.compile(rf"/api/experiments/{experiment_id}$"), lambda route:
                   route.fulfill(status=503, json={"detail": "the database is unavailable"}))

        with page.expect_response(re.compile(rf"/api/experiments/{experiment_id}$")):
            page.click("#cancel-all")  # the cancel fails, then the refresh after it
        page.wait_for_timeout(300)
        assert page.inner_text("#action-error") == "Could not cancel: the database is unavailable"
        assert page.inner_text("#cancel-all") == "Cancel all runs"
        assert page.is_enabled("#cancel-all") and page.is_hidden("#delete-experiment")
        assert page.evaluate(BADGES) == ["queued", "queued"]
        browser.screenshot("cancel-failed")

        # The server answers again: the same button cancels.
        page.unroute(re.compile(rf"/api/experiments/{experiment_id}/cancel$"))
        page.unroute(re.compile(rf"/api/experiments/{experiment_id}$"))
        page.click("#cancel-all")
        page.wait_for_function(f"{BADGES}.every((s) => s === 'cancelled')")
        page.wait_for_selector("#delete-experiment:not([hidden])")
        browser.assert_no_errors(expected=("status of 500", "status of 503"))
    with live_server.client() as client:
        assert {r["status"] for r in client.get(f"/api/experiments/{experiment_id}").json()[
            "runs"]} == {"cancelled"}


def test_a_delete_from_the_page_reads_nothing_more_while_it_is_answered(live_server, request):
    """The ended page looks at its record every 5 s; one look sent while the delete was being
    answered came back 404, which Chromium logs as an error (seen in CI as a flaky test)."""
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(
            client, add_dataset_row(live_server.database_url), seeds=[0])
        assert client.post(f"/api/experiments/{experiment_id}/cancel").status_code == 200
    address = re.compile(rf"/api/experiments/{experiment_id}$")

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#delete-experiment:not([hidden])")
        sent = []
        page.on("request", lambda r: sent.append(r.method) if address.search(r.url) else None)

        def answer_slowly(route):
            if route.request.method != "DELETE":
                route.continue_()
                return
            deleted = route.fetch()  # done on the server; its answer is held past a look
            page.wait_for_timeout(6_000)
            route.fulfill(response=deleted)

        page.route(address, answer_slowly)
        page.click("#delete-experiment")
        page.wait_for_url(f"{live_server.url}/experiments")
        assert sent == ["DELETE"]
        browser.assert_no_errors()


# --- 3. the budget chart's x axis ------------------------------------------------------------

def test_budget_chart_places_budgets_by_labeled_count_on_a_log_axis_and_leaves_gaps(
    live_server, request
):
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url, {name: {"train": 30, "test": 2}
                                                for name in ("a", "b")})
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, dataset_id, seeds=[0],
                                       budgets=[{"per_class": 1}, {"per_class": 3}, 0.5])
        ids = runs_by(client, experiment_id)
    # 2, 6 and 30 labeled images. Fine-tuning has no result at 3/class.
    for (method, budget, _), run_id in ids.items():
        if (method, budget) == ("fine-tune", "3/class"):
            finish(database_url, live, run_id, status="cancelled")
        else:
            finish(database_url, live, run_id, {"test_top1": 0.6 if budget == "1/class" else 0.8})

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#experiment-status .badge:text-is('partly cancelled')")
        axis = page.evaluate("""() => {
            const chart = Chart.getChart(document.getElementById('budget-chart'));
            const x = chart.scales.x;
            return {type: x.type, ticks: x.ticks.map((t) => t.label),
                    pixels: [2, 6, 30].map((n) => x.getPixelForValue(n)),
                    points: chart.getDatasetMeta(chart.data.datasets.findIndex(
                        (d) => d.label === 'Self-Tuning')).data.map((p) => p.x)};
        }""")
        assert axis["type"] == "logarithmic"
        assert axis["ticks"] == ["1/class (2)", "3/class (6)", "50% (30)"]
        # Distances follow log(labeled images): 2 -> 6 is log 3, 6 -> 30 is log 5.
        left, middle, right = axis["pixels"]
        assert (middle - left) / (right - middle) == pytest.approx(math.log(3) / math.log(5),
                                                                   rel=0.02)
        assert axis["points"] == pytest.approx(axis["pixels"], abs=0.5)  # Self-Tuning's points

        # Fine-tuning's line stops at the missing budget instead of joining 2 and 30.
        segments = page.evaluate("""() => {
            const chart = Chart.getChart(document.getElementById('budget-chart'));
            const index = chart.data.datasets.findIndex((d) => d.label === 'Fine-tuning');
            return chart.getDatasetMeta(index).dataset.segments
                .map((s) => [s.start, s.end]);
        }""")
        assert not any(start < 1 < end for start, end in segments), segments
        assert browser.chart_points("#budget-chart") == {"Self-Tuning": 3, "Fine-tuning": 2}
        browser.screenshot("budget-chart")
        browser.assert_no_errors()


# --- 4. an expired sign-in ------------------------------------------------------------------

def test_an_expired_sign_in_links_to_the_sign_in_page_and_the_form_keeps_what_was_typed(
    guarded, tmp_path, request
):
    url, database_url = guarded
    dataset_id = add_dataset_row(database_url)
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        experiment_id, run_ids = start_sweep(client, dataset_id, seeds=[0])
    experiment_path = f"/experiments/{experiment_id}"
    link = "#action-error a.sign-in-again"

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("dialog", lambda dialog: dialog.accept())
        sign_in(page, url, experiment_path)

        # Cancel all after the sign-in expired: a link to sign in again, the button back.
        page.wait_for_selector("#cancel-all:not([hidden])")
        page.context.clear_cookies()
        page.click("#cancel-all")
        page.wait_for_selector(link)
        assert page.inner_text("#action-error") == (
            "Your sign-in expired: sign in again, then try once more.")
        assert page.get_attribute(link, "href") == f"/login?next={quote(experiment_path, safe='')}"
        assert page.inner_text("#cancel-all") == "Cancel all runs"
        assert page.is_enabled("#cancel-all")
        browser.screenshot("1-cancel-all-expired")
        page.click(link)  # ... and back here once signed in
        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}{experiment_path}")

        # The same on a run's page.
        page.goto(f"{url}/runs/{run_ids[0]}")
        page.wait_for_selector("#cancel:not([hidden])")
        page.context.clear_cookies()
        page.click("#cancel")
        page.wait_for_selector("#cancel-error a.sign-in-again")
        assert "Authorization" not in page.inner_text("#cancel-error")
        assert page.get_attribute("#cancel-error a", "href") == (
            f"/login?next={quote(f'/runs/{run_ids[0]}', safe='')}")

        # The upload page.
        sign_in(page, url, "/datasets/new")
        page.set_input_files("#file", {"name": "photos.zip", "mimeType": "application/zip",
                                       "buffer": b"PK\x05\x06" + b"\0" * 18})
        page.context.clear_cookies()
        page.click("#upload-button")
        page.wait_for_selector("#upload-error a.sign-in-again")
        assert page.inner_text("#upload-error") == (
            "Your sign-in expired: sign in again, then upload the archive once more.")
        assert page.get_attribute("#upload-error a", "href") == "/login?next=%2Fdatasets%2Fnew"
        assert page.is_enabled("#upload-button")
        browser.screenshot("2-upload-expired")

        # The start form: sent after the sign-in expired, it goes to the sign-in page and
        # comes back as it was typed.
        form_path = f"/experiments/new?dataset_id={dataset_id}"
        sign_in(page, url, form_path)
        page.select_option("#f-preset", "paper")
        page.fill("#f-name", "kept across the sign-in")
        page.fill("#f-budgets", "1/class, all")
        page.fill("#f-seeds", "3, 4")
        page.check("input[name=methods][value=fixmatch]")
        page.uncheck("input[name=methods][value=self-tuning]")
        page.fill("#f-iterations", "12")
        page.uncheck("#f-pretrained")
        page.context.clear_cookies()
        page.click("#start")
        page.wait_for_url(re.compile(r"/login\?"))
        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}{form_path}")
        page.wait_for_selector("#draft-note:not([hidden])")
        assert page.input_value("#f-preset") == "paper"
        assert page.input_value("#f-name") == "kept across the sign-in"
        assert page.input_value("#f-budgets") == "1/class, all"
        assert page.input_value("#f-seeds") == "3, 4"
        assert page.input_value("#f-iterations") == "12"
        assert page.input_value("#f-image_size") == "224"  # the paper preset's, not quick's
        assert not page.is_checked("#f-pretrained")
        assert page.is_checked("input[name=methods][value=fixmatch]")
        assert not page.is_checked("input[name=methods][value=self-tuning]")
        assert page.is_checked("input[name=methods][value=fine-tune]")
        assert "8 runs" in page.inner_text("#run-count")  # 2 methods x 2 budgets x 2 seeds
        browser.screenshot("3-form-restored")
        with page.expect_request("**/api/experiments") as sent:
            page.click("#start")
        page.wait_for_url(re.compile(r"/experiments/\d+$"))
        body = sent.value.post_data_json
        assert body["name"] == "kept across the sign-in" and body["preset"] == "paper"
        assert body["methods"] == ["fine-tune", "fixmatch"] and body["seeds"] == [3, 4]
        assert body["overrides"] == {"iterations": 12, "pretrained": False}
        # Restored once: the form opened again starts afresh.
        page.goto(f"{url}{form_path}")
        assert page.input_value("#f-name") == "" and page.is_hidden("#draft-note")
        browser.assert_no_errors(expected=("status of 401",))


def test_a_live_feed_refused_for_an_expired_sign_in_says_so_and_links_to_sign_in(
    settings, tmp_path, request
):
    """The experiment page's feed reconnects after a drop (here: the server restarts);
    refused (401) it said only "reconnecting…", for ever. It reads the record then, which
    says why."""
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_API_TOKEN=TOKEN)
    url, process = start_server(env, tmp_path / "uvicorn.log")
    try:
        with httpx.Client(base_url=url, timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            experiment_id, _ = start_sweep(client, add_dataset_row(settings.sqlalchemy_url),
                                           seeds=[0])
        experiment_path = f"/experiments/{experiment_id}"
        with open_browser(request.node.name) as browser:
            page = browser.page
            sign_in(page, url, experiment_path)
            page.wait_for_selector("#live-state:text-is('● live')")
            page.context.clear_cookies()
            process.stop()  # the connection drops ...
            page.wait_for_selector("#live-state:text-is('reconnecting…')")
            _, process = start_server(env, tmp_path / "uvicorn-2.log",
                                      port=int(url.rsplit(":", 1)[1]))
            # ... and the next try is refused: the page says why.
            page.wait_for_selector("#action-error a.sign-in-again", timeout=30_000)
            assert page.inner_text("#action-error") == (
                "Your sign-in expired: sign in again, then try once more.")
            browser.screenshot("feed-refused")

            # Signed in again (as in another tab): the feed comes back, the message goes.
            sign_in_tab = page.context.new_page()
            sign_in(sign_in_tab, url, experiment_path)
            sign_in_tab.close()
            page.wait_for_selector("#live-state:text-is('● live')", timeout=60_000)
            page.wait_for_function(
                "document.getElementById('action-error').textContent === ''")
            browser.assert_no_errors(expected=(  # the restart cuts the stream, then refuses
                "status of 401", "ERR_INCOMPLETE_CHUNKED_ENCODING", "ERR_CONNECTION_REFUSED"))
    finally:
        process.stop()


def test_recorded_curves_refused_for_a_sign_in_are_read_once_signed_in_again(
    guarded, request
):
    """The run page reads its recorded curves as it opens. Refused (401: the sign-in expired
    meanwhile), the read ended there: the page said nothing of it, and signed in again (in
    another tab) it went on live with the curves' first points missing for good. The page
    now says why, and reads them once signed in again."""
    url, database_url = guarded
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        _, (run_id, _) = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    mark_running(database_url, run_id)
    record(database_url, run_id, "progress", range(1, 11))
    run_path = f"/runs/{run_id}"
    with open_browser(request.node.name) as browser:
        page = browser.page
        held = []
        page.route(re.compile(rf".*/api/runs/{run_id}/metrics.*"), lambda r: held.append(r))
        sign_in(page, url, run_path)
        page.wait_for_selector("#live-state:text-is('● live')")
        assert len(held) == 1
        page.context.clear_cookies()  # the sign-in expires ...
        held[0].continue_()  # ... and the server refuses the read
        page.unroute(re.compile(rf".*/api/runs/{run_id}/metrics.*"))
        expect(page.locator("#cancel-error")).to_have_text(
            "Your sign-in expired: sign in again, then try once more.")
        losses = page.get_by_role("img", name=re.compile("^loss terms over iterations"))
        expect(losses).to_have_accessible_name("loss terms over iterations: no points yet.")

        sign_in_tab = page.context.new_page()  # signed in again, as in another tab
        sign_in(sign_in_tab, url, run_path)
        sign_in_tab.close()
        expect(losses).to_have_accessible_name(re.compile(
            r"^loss terms over iterations: 1 line up to iteration 10 of \d+\."))
        expect(page.locator("#cancel-error")).to_have_text("")
        browser.assert_no_errors(expected=("status of 401",))

# --- 5. a number the form cannot read -------------------------------------------------------

def test_a_malformed_hyper_parameter_is_an_error_next_to_it_and_nothing_is_sent(
    live_server, request
):
    dataset_id = add_dataset_row(live_server.database_url)
    with open_browser(request.node.name) as browser:
        page = browser.page
        sent = []  # starts (the form's checks as it is filled in go to /api/experiments/check)
        page.on("request", lambda r: sent.append(r.url) if r.method == "POST"
                and r.url.endswith("/api/experiments") else None)
        page.goto(f"{live_server.url}/experiments/new?dataset_id={dataset_id}")
        page.fill("#f-lr", "")
        page.locator("#f-lr").press_sequentially("1e-")
        page.click("#start")
        error = page.locator('[data-field="overrides.lr"] .field-error')
        error.wait_for(state="visible")
        assert error.inner_text().startswith("Not a number")
        assert page.evaluate("document.activeElement.id") == "f-lr"
        page.wait_for_timeout(500)
        assert sent == [] and page.url.endswith(f"/experiments/new?dataset_id={dataset_id}")
        browser.screenshot("lr-not-a-number")

        # A whole-number field is not told to write "1e-3".
        page.fill("#f-lr", "1e-3")
        page.fill("#f-iterations", "")
        page.locator("#f-iterations").press_sequentially("3e")
        page.click("#start")
        expect(page.locator('[data-field="overrides.iterations"] .field-error')).to_have_text(
            "Not a whole number: write it like 300.")
        page.wait_for_timeout(500)
        assert sent == []

        # Written right, it goes.
        page.fill("#f-iterations", "1e3")
        with page.expect_request("**/api/experiments") as request_sent:
            page.click("#start")
        assert request_sent.value.post_data_json["overrides"] == {"lr": 0.001, "iterations": 1000}
        page.wait_for_url(re.compile(r"/experiments/\d+$"))
        browser.assert_no_errors()


# --- 6, 7, 8 (fine-tuning's chart), 9 (heading, sizes): the run page -------------------------

def test_run_pages_say_what_their_pseudo_label_numbers_measure(live_server, request):
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, add_dataset_row(database_url), seeds=[0],
                                       methods=["fixmatch", "fine-tune"],
                                       budgets=[{"per_class": 1}])
        ids = runs_by(client, experiment_id)
    fixmatch, fine_tune = ids[("fixmatch", "1/class", 0)], ids[("fine-tune", "1/class", 0)]
    for run_id, pseudo in ((fixmatch, 0.9), (fine_tune, None)):
        with session_scope(database_url) as session:
            session.add(RunMetric(run_id=run_id, kind="eval", step=10, values={
                "test_top1": 0.5, "test_mean_class_acc": 0.5, "pseudo_label_acc": pseudo,
                **({"fixmatch_mask_rate": 0.3} if pseudo else {})}))
            session.add(Artifact(run_id=run_id, name="model.safetensors",
                                 path=f"runs/{run_id}/model.safetensors", size_bytes=1536,
                                 sha256="0" * 64))
        finish(database_url, live, run_id, {
            "test_top1": 0.5, "test_mean_class_acc": 0.5, "pseudo_label_acc": 0.7,
            "train_pseudo_label_acc": pseudo, "confusion_matrix": [[1, 1], [0, 2]],
            "per_class_acc": [0.5, 1.0], "pseudo_label_quality": {},
            **({"fixmatch_mask_rate": 0.4} if pseudo else {})})

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{fixmatch}")
        page.wait_for_selector("#results:not([hidden])")
        assert page.inner_text("h1 #budget") == "1 labeled image per class"
        headline = page.locator("#headline th").all_inner_texts()
        assert ("Pseudo-label accuracy during training, of the kept pseudo-labels "
                "(confidence ≥ 0.95)") in headline
        page.wait_for_function(
            "Chart.getChart(document.getElementById('chart-pseudo')).data.datasets.length > 0")
        # What training used since the last evaluation, which the note under it says (the
        # final model's accuracy was drawn under the same name). The mask rate since the
        # last evaluation is left to the progress points' own line.
        assert browser.chart_points("#chart-pseudo") == {
            "training's pseudo-labels right (kept: confidence ≥ 0.95)": 1}
        assert "since the previous one" in page.inner_text("#curves .chart-note")
        # One evaluation: the axis still runs from iteration 0 to the run's last, in whole
        # iterations (it was 9.5-10.5 around the point), as the loss chart's does.
        with live_server.client() as client:
            total = client.get(f"/api/runs/{fixmatch}").json()["total_steps"]
        assert total > 10
        axis = page.evaluate("""() => {
            const x = Chart.getChart(document.getElementById('chart-accuracy')).scales.x;
            return [x.min, x.max, x.ticks.every((tick) => Number.isInteger(tick.value))];
        }""")
        assert axis == [0, total, True]
        # Label next ranks by the margin between the top two classes, and says so.
        text = page.inner_text("main")
        assert "least confident" not in text
        assert "the smallest margin between its top two classes" in page.inner_text(
            "#label-next h2")
        assert "smallest margin between the top two classes first" in page.inner_text(
            "#downloads")
        # Sizes in the server's units (its messages say "4.0 GiB").
        page.wait_for_selector("#downloads li:has-text('model.safetensors')")
        assert page.inner_text("#downloads li:has-text('model.safetensors')") == (
            "model.safetensors 1.5 KiB")
        # Without a token the command has no header; the note names the one to add as the
        # command does when there is one (it said $TOKEN).
        page.wait_for_selector("#snippet-download:has-text('curl')")
        assert "Authorization" not in page.inner_text("#snippet-download")
        assert page.is_visible("#snippet-token-note")
        assert '-H "Authorization: Bearer $SELFTUNE_API_TOKEN"' in page.inner_text(
            "#snippet-token-note")
        browser.screenshot("1-fixmatch")

        page.goto(f"{live_server.url}/runs/{fine_tune}")
        page.wait_for_selector("#results:not([hidden])")
        page.wait_for_function(
            "Chart.getChart(document.getElementById('chart-accuracy')).data.datasets.length > 0")
        said = page.evaluate("getComputedStyle(document.getElementById('chart-pseudo')"
                             ".parentNode, '::after').content")
        assert said == '"none: fine-tuning trains on the labeled images only"'
        assert not any("during training" in th
                       for th in page.locator("#headline th").all_inner_texts())
        browser.screenshot("2-fine-tune")
        browser.assert_no_errors()


# --- 8. the results table: what became of the runs without a result -------------------------

def cells_by_method(page) -> dict[str, str]:
    return dict(zip(page.locator("#budget-table tbody th").all_inner_texts(),
                    page.evaluate(CELLS), strict=True))


def test_results_table_names_the_cancelled_runs_of_a_cell(live_server, request):
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, add_dataset_row(database_url))  # seeds 0, 1
        ids = runs_by(client, experiment_id)
    finish(database_url, live, ids[("fine-tune", "50%", 0)], {"test_top1": 0.8})
    finish(database_url, live, ids[("fine-tune", "50%", 1)], status="cancelled")
    finish(database_url, live, ids[("self-tuning", "50%", 0)], status="cancelled")
    # Self-Tuning's seed 1 stays queued.

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#live-state:text-is('● live')")
        page.wait_for_function(f"{CELLS}.length === 2")
        assert cells_by_method(page) == {"Self-Tuning": "0/2 runs (1 queued, 1 cancelled)",
                                         "Fine-tuning": "★ best: 80.0 (1 of 2; 1 cancelled)"}

        with live_server.client() as client:
            assert client.post(f"/api/experiments/{experiment_id}/cancel").status_code == 200
        page.wait_for_selector("#experiment-status .badge:text-is('partly cancelled')")
        page.wait_for_function(f"{CELLS}.includes('no result')")
        assert cells_by_method(page) == {"Self-Tuning": "no result",
                                         "Fine-tuning": "★ best: 80.0 (1 of 2; 1 cancelled)"}
        browser.screenshot("results-table")
        browser.assert_no_errors()


# --- 9. sizes on the upload page ------------------------------------------------------------

@pytest.mark.server_env(SELFTUNE_MAX_UPLOAD_BYTES=str(1024 * 1024))
def test_upload_page_gives_sizes_in_the_units_of_the_servers_messages(live_server, request):
    url = live_server.url
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{url}/datasets/new")
        assert "up to 1.0 MiB" in page.inner_text(".lead")  # the server's text
        page.set_input_files("#file", {"name": "big.zip", "mimeType": "application/zip",
                                       "buffer": b"\0" * (1536 * 1024)})
        assert page.inner_text("#chosen") == "big.zip (1.5 MiB)"
        assert page.inner_text("#upload-error") == (
            "This file is 1.5 MiB; the server accepts at most 1.0 MiB. "
            "Split it into smaller archives.")
        page.set_input_files("#file", {"name": "small.zip", "mimeType": "application/zip",
                                       "buffer": b"\0" * 1000})
        assert page.inner_text("#chosen") == "small.zip (1000 bytes)"
        browser.screenshot("upload-sizes")
        browser.assert_no_errors()


# --- The pseudo-label quality card says what it has nothing about ---------------------------

def quality(unlabeled: int, queue: bool, withheld: bool = True) -> dict:
    """pseudo_label_quality as the engine records it (worker/selftuning/metrics.py);
    `withheld`: some unlabeled images have a withheld label."""
    counts = [0] * 9 + [unlabeled]
    judged = unlabeled if withheld else 0
    recorded = {
        "confidence_bins": [{"lo": 0.9, "hi": 1.0, "count": unlabeled, "judged": judged,
                             "accuracy": 0.75 if judged else None}],
        "kept_share_at_095": 0.5 if unlabeled else None,
        "kept_accuracy_at_095": 0.8 if judged else None,
        "kept_judged_at_095": judged // 2,
        "predicted_distribution": [0.5, 0.5] if unlabeled else None,
        "labeled_distribution": [0.5, 0.5],
        "confidence_histogram": {"edges": [i / 10 for i in range(11)], "counts": counts},
    }
    if queue:
        recorded.update(queue_purity=0.9, queue_purity_truth=0.7 if unlabeled else None)
    return recorded


def test_the_quality_card_shows_queue_rows_for_self_tuning_only_and_says_when_it_has_nothing(
    live_server, request
):
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, add_dataset_row(database_url), seeds=[0, 1])
        ids = runs_by(client, experiment_id)
    finished = {
        "fine-tune": (ids[("fine-tune", "50%", 0)], quality(4, queue=False)),
        "self-tuning": (ids[("self-tuning", "50%", 0)], quality(4, queue=True)),
        "nothing": (ids[("self-tuning", "50%", 1)], quality(0, queue=True)),
        "no withheld labels": (ids[("fine-tune", "50%", 1)],
                               quality(6, queue=False, withheld=False)),
    }
    for run_id, recorded in finished.values():
        finish(database_url, live, run_id, {
            "test_top1": 0.5, "test_mean_class_acc": 0.5, "confusion_matrix": [[1, 1], [0, 2]],
            "per_class_acc": [0.5, 1.0], "pseudo_label_quality": recorded})

    with open_browser(request.node.name) as browser:
        page = browser.page

        def facts(key: str) -> list[str]:
            page.goto(f"{live_server.url}/runs/{finished[key][0]}")
            page.wait_for_selector("#results:not([hidden])")
            return page.locator("#quality-facts th").all_inner_texts()

        def values() -> list[str]:
            return page.locator("#quality-facts td").all_inner_texts()

        assert facts("fine-tune") == ["Images a 0.95 threshold keeps", "Accuracy of what it keeps"]
        assert values() == ["2 of 4 (50.0%)", "80.0% (of the 2 with a withheld label)"]
        facts("no withheld labels")
        assert values() == ["3 of 6 (50.0%)", "– (none of them has a withheld label)"]
        assert page.is_hidden("#quality-none") and page.is_visible("#quality-details")
        assert facts("self-tuning")[2:] == [
            "Queue purity (agrees with the model)",
            "Pseudo-labeled queue keys that are right (withheld labels)"]
        facts("nothing")
        assert page.is_visible("#quality-none") and page.is_hidden("#quality-details")
        assert "nothing to pseudo-label" in page.inner_text("#quality-none")
        browser.screenshot("no-unlabeled-images")
        browser.assert_no_errors()


def test_the_run_page_describes_the_batches_a_run_draws(live_server):
    """Self-Tuning and FixMatch with every label kept on a dataset without unlabeled images
    were described as drawing "8 + 16 unlabeled" images a step."""
    dataset_id = add_dataset_row(live_server.database_url)  # labeled images only
    overrides = {"pretrained": False, "image_size": 32, "batch_size": 8, "iterations": 20}
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, dataset_id, budgets=["all", 0.5], seeds=[0],
                                       methods=["self-tuning", "fixmatch", "fine-tune"])
        ids = runs_by(client, experiment_id)
        _, (left_out,) = start_sweep(client, dataset_id, methods=["self-tuning"], seeds=[0],
                                     overrides={**overrides, "unlabeled_batch_size": 0})

        def batches(run_id: int) -> str:
            page = client.get(f"/runs/{run_id}")
            assert page.status_code == 200
            return " ".join(re.search(r"batches (.*?), lr", page.text, re.S).group(1).split())

        assert batches(ids[("self-tuning", "all", 0)]) == (
            "8 (no unlabeled image to draw: every image has its label)")
        assert batches(ids[("fixmatch", "all", 0)]) == batches(ids[("self-tuning", "all", 0)])
        assert batches(ids[("fine-tune", "all", 0)]) == "8"
        assert batches(ids[("self-tuning", "50%", 0)]) == "8 + 16 unlabeled"
        assert batches(ids[("fixmatch", "50%", 0)]) == "8 + 16 unlabeled"
        assert batches(left_out) == "8 (unlabeled images left out)"


def running_for_5_min(session, run_id: int, heartbeat_age_s: float) -> Run:
    """A run a worker took 5 minutes ago, its last heartbeat `heartbeat_age_s` old."""
    run = session.get(Run, run_id)
    run.status, run.worker, run.device, run.attempts = "running", "w@host", "cpu", 1
    run.started_at = utcnow() - timedelta(minutes=5)
    run.heartbeat_at = utcnow() - timedelta(seconds=heartbeat_age_s)
    return run


@pytest.mark.browser
def test_a_run_whose_worker_went_silent_says_so_before_it_is_queued_again(live_server, request):
    """A killed worker left its run "running" with a frozen "Training time left 1 min 33 s"
    for two minutes, until the server gave up on it."""
    database_url = live_server.database_url
    with live_server.client() as client:
        _, (silent, fresh) = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        with session_scope(database_url) as session:
            for run_id, age in ((silent, 75), (fresh, 2)):
                run = running_for_5_min(session, run_id, heartbeat_age_s=age)
                run.images_per_s, run.step = 20.0, 5
        assert 75 <= client.get(f"/api/runs/{silent}").json()["silent_s"] < 100
        assert client.get(f"/api/runs/{fresh}").json()["silent_s"] is None
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{silent}")
        page.wait_for_selector("#eta:has-text('no word from its worker for 1 min')")
        assert "it may have stopped" in page.inner_text("#eta")
        browser.screenshot("silent-worker")
        page.goto(f"{live_server.url}/runs/{fresh}")
        page.wait_for_selector("#run-status .badge.running")
        assert "no word" not in page.inner_text("#eta")
        browser.assert_no_errors()


@pytest.mark.browser
def test_long_names_without_spaces_do_not_widen_the_pages(live_server, request):
    """A 175-character dataset and experiment name made the dataset, experiment and run
    pages 2,955 px wide, on a desktop too."""
    name = "wildlife_camera_traps_2024_11_final_cleaned_" * 4
    dataset_id = add_dataset_row(live_server.database_url)
    with session_scope(live_server.database_url) as session:
        from app.models import Dataset

        session.get(Dataset, dataset_id).name = name
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id, name=name, seeds=[0],
                                             methods=["fine-tune"], budgets=[0.5])
    with open_browser(request.node.name, viewport=PHONE) as browser:
        page = browser.page
        for path in (f"/datasets/{dataset_id}", f"/experiments/{experiment_id}",
                     f"/runs/{run_ids[0]}"):
            page.goto(f"{live_server.url}{path}")
            page.wait_for_selector("h1")
            assert name[:40] in page.inner_text("main")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], (path, width)
        browser.screenshot("run-on-a-phone")


@pytest.mark.browser
def test_an_ended_run_says_when_it_ran_and_its_mean_speed(live_server, request):
    """A finished run's page showed the images/s of its last logged steps as its speed, and
    neither when it started nor when it ended."""
    database_url = live_server.database_url
    started = datetime(2026, 3, 1, 22, 30, tzinfo=UTC)  # the next day in Tokyo
    with live_server.client() as client:
        _, (ended, running) = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    with session_scope(database_url) as session:
        for run_id in (ended, running):
            run = session.get(Run, run_id)
            run.status, run.worker, run.device, run.attempts = "running", "w@host", "cpu", 2
            run.started_at, run.heartbeat_at = started, utcnow()
            run.images_per_s, run.step = 30.0, 3
            # The ended run's last stretch is 1 step, not 2 (iterations not a multiple of the
            # log interval).
            stretches = ((2, 10.0), (4, 20.0), (5, 30.0)) if run_id == ended else (
                (1, 10.0), (2, 20.0), (3, 30.0))
            for step, speed in stretches:
                session.add(RunMetric(run_id=run_id, kind="progress", step=step,
                                      values={"losses": {"ce": 1.0}, "images_per_s": speed}))
    with session_scope(database_url) as session:
        session.get(Run, ended).status = "cancelled"
        session.get(Run, ended).finished_at = started + timedelta(minutes=6, seconds=12)

    with open_browser(request.node.name, timezone_id="Asia/Tokyo") as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{ended}")
        page.wait_for_selector("#images-per-s:has-text('on average')")
        # Over the time taken: 5 / (2/10 + 2/20 + 1/30), not the speeds' mean (20.0), nor
        # with a weight a point, 3 / (1/10 + 1/20 + 1/30) = 16.4.
        assert page.inner_text("#images-per-s") == "15.0 on average while training"
        assert page.inner_text("#started") == "2026-03-02 07:30"
        assert page.get_attribute("#started", "title") == "2026-03-01 22:30:00 UTC"
        assert page.inner_text("#ended") == (
            "2026-03-02 07:36 (6 min 12 s after it started, over 2 attempts)")
        # No evaluation came before the end, and none will.
        empty = ("getComputedStyle(document.getElementById('chart-accuracy').parentNode, "
                 "'::after').content")
        assert page.evaluate(empty) == '"none: the run ended before its first point"'
        browser.screenshot("ended")

        page.goto(f"{live_server.url}/runs/{running}")
        page.wait_for_selector("#run-status .badge.running")
        assert page.inner_text("#images-per-s") == "30.0"
        assert page.inner_text("#started") == "2026-03-02 07:30"
        assert not page.is_visible("#ended-row")
        assert page.evaluate(empty) == '"no points yet"'
        # A resumed attempt logs step 3 again: its point replaces the first in the mean. The
        # page has read the record's first: a read answered after the live point would put
        # it back.
        losses = page.get_by_role("img", name=re.compile("^loss terms over iterations"))
        expect(losses).to_have_accessible_name(re.compile(r"up to iteration 3 of "))
        live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
        live.xadd(run_stream_key(running), {"data": json.dumps({
            "type": "progress", "run_id": running, "step": 3, "total_steps": 10,
            "losses": {"ce": 1.0}, "lr": 0.01, "images_per_s": 90.0})})
        expect(page.locator("#images-per-s")).to_have_text("90.0")
        end_as_worker(database_url, live, running, "failed")
        expect(page.locator("#images-per-s")).to_have_text("18.6 on average while training")
        browser.assert_no_errors()


@pytest.mark.slow
@pytest.mark.browser
def test_the_experiment_page_shows_where_its_queued_runs_stand_in_the_shared_queue(
    live_server, request
):
    """Only a run's own page said where a queued run stood; the experiment page showed a row
    of "queued" badges, though another experiment's runs might all go first."""
    dataset_id = add_dataset_row(live_server.database_url)
    with live_server.client() as client:
        _, first = start_sweep(client, dataset_id, seeds=[0])  # two runs, queued first
        experiment_id, later = start_sweep(client, dataset_id, seeds=[0])
        runs = {r["id"]: r for r in client.get(f"/api/experiments/{experiment_id}").json()["runs"]}
        assert [runs[i]["queue_position"] for i in later] == [3, 4]
        # The same numbers as each run's own record gives.
        assert [client.get(f"/api/runs/{i}").json()["queue_position"] for i in later] == [3, 4]

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        position = ("(id) => document.querySelector("
                    "`#runs tr[data-run-id='${id}'] .queue-position`)?.textContent")
        page.wait_for_selector(".queue-position")
        assert [page.evaluate(position, i) for i in later] == [" position 3", " position 4"]
        # The other experiment's first run starts: nothing on this page's feed says so.
        mark_running(live_server.database_url, first[0])
        page.wait_for_function(f"({position})({later[0]}) === ' position 2'", timeout=20_000)
        assert page.evaluate(position, later[1]) == " position 3"
        mark_running(live_server.database_url, first[1])
        page.wait_for_function(f"({position})({later[0]}) === ' next'", timeout=20_000)
        browser.screenshot("queue-positions")
        # A run that is not queued shows its status alone.
        mark_running(live_server.database_url, later[0])
        status = f"#runs tr[data-run-id='{later[0]}'] td:nth-child(5)"
        page.wait_for_selector(f"{status} .badge:text-is('running')", timeout=20_000)
        assert page.inner_text(status) == "running"
        assert page.evaluate(position, later[1]) == " next"
        browser.assert_no_errors()
    with live_server.client() as client:  # a running run has no position
        summaries = client.get(f"/api/experiments/{experiment_id}").json()["runs"]
        assert [run["queue_position"] for run in summaries] == [None, 1]
        assert client.get(f"/api/runs/{first[0]}").json()["queue_position"] is None


def edge_shades(page, card) -> tuple[int, int]:
    """How dark (0 white .. 255 black) the card's first and last pixel columns inside its
    border are, halfway down it."""
    card.scroll_into_view_if_needed()
    box = card.bounding_box()
    shot = Image.open(io.BytesIO(page.screenshot(clip={
        "x": box["x"] + 2, "y": box["y"] + box["height"] / 2, "width": box["width"] - 4,
        "height": 1}))).convert("L")
    return 255 - shot.getpixel((0, 0)), 255 - shot.getpixel((shot.width - 1, 0))


@pytest.mark.browser
def test_a_card_that_scrolls_sideways_on_a_phone_shades_the_edge_with_more_beyond(
    live_server, request
):
    """At 375 px the runs table scrolled inside its card with nothing to say its last
    columns were there."""
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, add_dataset_row(live_server.database_url),
                                       seeds=[0])
    with open_browser(request.node.name, viewport=PHONE) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#runs tbody tr .badge")
        card = page.locator("section.card:has(#runs)")
        assert card.evaluate("(c) => c.scrollWidth > c.clientWidth")  # it does scroll
        left, right = edge_shades(page, card)
        assert left < 4 and right > 12, (left, right)  # more to the right only
        card.evaluate("(c) => { c.scrollLeft = (c.scrollWidth - c.clientWidth) / 2; }")
        left, right = edge_shades(page, card)
        assert left > 12 and right > 12, (left, right)  # both ways
        card.evaluate("(c) => { c.scrollLeft = c.scrollWidth; }")
        left, right = edge_shades(page, card)
        assert left > 12 and right < 4, (left, right)  # the end: more to the left only
        # A card that fits has no shade.
        fits = page.locator("section.card:has(#runs) ~ section.card, section.card").first
        assert fits.evaluate("(c) => c.scrollWidth <= c.clientWidth")
        assert max(edge_shades(page, fits)) < 4
        browser.screenshot("phone-runs-card")
        browser.assert_no_errors()


@pytest.mark.browser
def test_budgets_that_keep_as_many_labels_stand_apart_on_the_budget_chart(live_server, request):
    """3/class and 10% of classes of 40 and 20 images both keep 6 labels (3 + 3 against
    4 + 2): their results were drawn at one x, joined like an error bar, and the tick named
    only one of them."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url, {"a": {"train": 40, "test": 2},
                                                "b": {"train": 20, "test": 2}})
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, dataset_id, seeds=[0], methods=["fine-tune"],
                                       budgets=[{"per_class": 3}, 0.1])
        body = client.get(f"/api/experiments/{experiment_id}").json()
        assert [(row["budget_label"], row["labeled_count"]) for row in body["budget_table"]] == [
            ("10%", 6), ("3/class", 6)]
        ids = runs_by(client, experiment_id)
    finish(database_url, live, ids[("fine-tune", "3/class", 0)], {"test_top1": 0.625})
    finish(database_url, live, ids[("fine-tune", "10%", 0)], {"test_top1": 0.792})

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#experiment-status .badge:text-is('finished')")
        chart = page.evaluate("""() => {
            const chart = Chart.getChart(document.getElementById('budget-chart'));
            const points = chart.getDatasetMeta(0).data;
            const title = chart.options.plugins.tooltip.callbacks.title;
            return {ticks: chart.scales.x.ticks.map((t) => t.label),
                    xs: points.map((p) => p.x),
                    titles: points.map((p, i) => title([{dataIndex: i, parsed: {x: p.x}}]))};
        }""")
        assert chart["ticks"] == ["10% · 3/class (6)"]  # in the results table's order
        assert chart["xs"][1] - chart["xs"][0] > 8  # pixels apart
        assert chart["titles"] == ["10% (6)", "3/class (6)"]
        # One labeled count is not enough to fit a line through, and the page says why.
        assert page.inner_text("#estimates-note") == (
            "An estimate appears here for each method once it has results at two or more "
            "budgets that keep different numbers of labels.")
        browser.screenshot("same-count-budgets")
        browser.assert_no_errors()


@pytest.mark.browser
def test_budget_names_close_on_the_axis_go_on_lines_of_their_own(live_server, request):
    """6/class and 8/class keep 12 and 16 labels: on a log axis a phone's width wide their
    tick names were written over each other ("6/class8/class (12)(16)")."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url, {"a": {"train": 40, "test": 2},
                                                "b": {"train": 40, "test": 2}})
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, dataset_id, seeds=[0], methods=["fine-tune"],
                                       budgets=[{"per_class": 6}, {"per_class": 8}, 0.5,
                                                "all"])
        ids = runs_by(client, experiment_id)
    for run_id in ids.values():
        finish(database_url, live, run_id, {"test_top1": 0.7})
    names = """() => {
        const chart = Chart.getChart(document.getElementById('budget-chart'));
        const x = chart.scales.x;
        x.ctx.font = `${Chart.defaults.font.size}px ${Chart.defaults.font.family}`;
        return x.ticks.map((t) => {
            const lines = [t.label].flat();
            const text = lines.at(-1);
            const half = x.ctx.measureText(text).width / 2;
            const centre = x.getPixelForValue(t.value);
            return {text, line: lines.length - 1, left: centre - half, right: centre + half};
        });
    }"""
    for viewport, staggered in ((DESKTOP, False), (PHONE, True)):
        with open_browser(request.node.name, viewport=viewport) as browser:
            page = browser.page
            page.goto(f"{live_server.url}/experiments/{experiment_id}")
            page.wait_for_selector("#experiment-status .badge:text-is('finished')")
            ticks = page.evaluate(names)
            assert [tick["text"] for tick in ticks] == [
                "6/class (12)", "8/class (16)", "50% (40)", "all (80)"]
            for one, other in itertools.combinations(ticks, 2):
                if one["line"] == other["line"]:  # names on one line stand apart
                    assert one["right"] < other["left"] or other["right"] < one["left"], ticks
            assert any(tick["line"] for tick in ticks) == staggered, ticks
            browser.screenshot(f"budget-names-{viewport['width']}")
            browser.assert_no_errors()


@pytest.mark.browser
def test_long_class_names_leave_the_distribution_chart_its_bars(live_server, request):
    """Ten class names of about 45 characters took the chart box for their rotated ticks,
    leaving the bars a corner of it; they are cut on the axis and whole in the tooltip."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    names = [f"{animal} — a rather long class name number {i}"
             for i, animal in enumerate(["elephant", "giraffe", "zebra", "lion", "tiger",
                                         "bear", "wolf", "fox", "deer", "moose"])]
    dataset_id = add_dataset_row(database_url, {n: {"train": 4, "test": 1} for n in names})
    with live_server.client() as client:
        _, (run_id, _) = start_sweep(client, dataset_id, seeds=[0])
    recorded = {**quality(10, queue=False), "predicted_distribution": [0.1] * 10,
                "labeled_distribution": [0.1] * 10}
    finish(database_url, live, run_id, {
        "test_top1": 0.5, "test_mean_class_acc": 0.5, "confusion_matrix": [[1] * 10] * 10,
        "per_class_acc": [0.1] * 10, "pseudo_label_quality": recorded})
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_selector("#results:not([hidden])")
        page.wait_for_function("Chart.getChart(document.getElementById('chart-distribution'))")
        chart = page.evaluate("""() => {
            const chart = Chart.getChart(document.getElementById('chart-distribution'));
            chart.tooltip.setActiveElements([{datasetIndex: 0, index: 0}], {x: 0, y: 0});
            chart.update();
            return {ticks: chart.scales.x.ticks.map((t) => t.label), area: chart.chartArea,
                    height: chart.height, title: chart.tooltip.title};
        }""")
        assert all(len(tick) <= 16 for tick in chart["ticks"]), chart["ticks"]
        assert chart["ticks"][0] == "elephant — a ra…"
        assert chart["area"]["bottom"] - chart["area"]["top"] > chart["height"] / 3
        assert chart["title"] == [names[0]]  # whole in the tooltip
        browser.screenshot("long-class-names")
        browser.assert_no_errors()


@pytest.mark.slow
@pytest.mark.browser
def test_status_changes_are_announced_to_screen_readers(live_server, request):
    """The run's and the experiment's status badges changed without a live region: a screen
    reader user waiting on the page was never told the run had ended."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, (run_id, other) = start_sweep(client, add_dataset_row(database_url),
                                                     seeds=[0])
    with open_browser(request.node.name) as browser:
        browser.page.goto(f"{live_server.url}/runs/{run_id}")
        experiment_page = browser.page.context.new_page()
        experiment_page.goto(f"{live_server.url}/experiments/{experiment_id}")
        run_status = browser.page.get_by_role("status")
        experiment_status = experiment_page.get_by_role("status")
        expect(run_status).to_have_text("queued")
        expect(experiment_status).to_have_text("queued")
        mark_running(database_url, run_id)
        expect(run_status).to_have_text("running", timeout=15_000)
        expect(experiment_status).to_have_text("running", timeout=15_000)
        for ended in (run_id, other):
            finish(database_url, live, ended, {"test_top1": 0.5})
        expect(run_status).to_have_text("succeeded", timeout=15_000)
        expect(experiment_status).to_have_text("finished", timeout=15_000)
        browser.assert_no_errors()


@pytest.mark.browser
def test_a_pseudo_label_accuracy_that_cannot_be_measured_says_why(live_server, request):
    """At budget "all" Self-Tuning's pseudo-label accuracies showed a bare "–"."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, add_dataset_row(database_url), seeds=[0],
                                       methods=["self-tuning", "fixmatch"],
                                       budgets=["all", 0.5])
        ids = runs_by(client, experiment_id)
    cases = {
        ids[("self-tuning", "all", 0)]: (None, ["– (no image with a withheld label)"] * 2),
        ids[("fixmatch", "50%", 0)]: (0.7, ["70.0%", "– (none reached confidence 0.95)"]),
    }
    for run_id, (final, _) in cases.items():
        finish(database_url, live, run_id, {
            "test_top1": 0.5, "test_mean_class_acc": 0.5, "pseudo_label_acc": final,
            "train_pseudo_label_acc": None, "confusion_matrix": [[1, 1], [0, 2]],
            "per_class_acc": [0.5, 1.0], "pseudo_label_quality": {}})
    with open_browser(request.node.name) as browser:
        page = browser.page
        for run_id, (_, shown) in cases.items():
            page.goto(f"{live_server.url}/runs/{run_id}")
            page.wait_for_selector("#results:not([hidden])")
            values = page.locator("#headline td").all_inner_texts()
            assert values[2:4] == shown, values
        browser.assert_no_errors()


@pytest.mark.browser
def test_many_classes_list_their_most_frequent_confusions_instead_of_a_matrix(
    live_server, request
):
    """1,000 classes drew a million-cell confusion matrix, which took the page a minute."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    names = [f"class {n:02d}" for n in range(40)]
    dataset_id = add_dataset_row(database_url, {n: {"train": 4, "test": 10} for n in names})
    with live_server.client() as client:
        _, (run_id, _) = start_sweep(client, dataset_id, seeds=[0])
    confusion = [[10 if i == j else 0 for j in range(40)] for i in range(40)]
    for (i, j, n) in ((3, 7, 4), (12, 5, 6), (0, 39, 1)):
        confusion[i][i] -= n
        confusion[i][j] = n
    finish(database_url, live, run_id, {
        "test_top1": 0.9725, "test_mean_class_acc": 0.9725, "confusion_matrix": confusion,
        "per_class_acc": [row[i] / 10 for i, row in enumerate(confusion)],
        "pseudo_label_quality": {}})
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_selector("#results:not([hidden])")
        assert page.inner_text("#confusion-title").startswith("Most frequent confusions (40")
        rows = [page.locator("#confusion tbody tr").nth(k).locator("td").all_inner_texts()
                for k in range(page.locator("#confusion tbody tr").count())]
        assert rows == [["class 12", "class 05", "6", "60.0%"],
                        ["class 03", "class 07", "4", "40.0%"],
                        ["class 00", "class 39", "1", "10.0%"]]
        browser.assert_no_errors()


@pytest.mark.browser
def test_an_experiments_results_and_runs_download_as_csv_from_its_page(live_server, request):
    """The results lived on the page and in the API's JSON only: a table for a paper or a
    notebook had to be copied by hand."""
    import csv

    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url, {"a": {"train": 10, "test": 2},
                                                "b": {"train": 10, "test": 2}})
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, dataset_id)  # 2 methods x 50% x seeds 0, 1
        ids = runs_by(client, experiment_id)
    for seed, top1 in ((0, 0.8), (1, 0.9)):
        run_id = ids[("self-tuning", "50%", seed)]
        mark_running(database_url, run_id)
        finish(database_url, live, run_id, {
            "test_top1": top1, "test_mean_class_acc": top1 - 0.05, "pseudo_label_acc": 0.75,
            "train_pseudo_label_acc": 0.6, "labeled_count": 10, "seconds_per_iteration": 0.25})
    failed = ids[("fine-tune", "50%", 0)]
    mark_running(database_url, failed)
    with session_scope(database_url) as session:
        session.get(Run, failed).error = "RuntimeError: out of memory\n\nTraceback ..."
    finish(database_url, live, failed, status="failed")

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        with page.expect_download() as summary_download:
            page.click("#result-downloads a:text-is('this table')")
        assert summary_download.value.suggested_filename == (
            f"experiment-{experiment_id}-summary.csv")
        summary = list(csv.DictReader(io.StringIO(summary_download.value.path().read_text())))
        with page.expect_download() as runs_download:
            page.click("#result-downloads a:text-is('every run')")
        assert runs_download.value.suggested_filename == f"experiment-{experiment_id}-runs.csv"
        runs = list(csv.DictReader(io.StringIO(runs_download.value.path().read_text())))
        browser.assert_no_errors()

    assert [(row["method"], row["budget_label"], row["labeled_count"], row["runs"],
             row["finished"], row["pending"], row["best"]) for row in summary] == [
        ("fine-tune", "50%", "10", "2", "0", "1", "False"),  # the page's order
        ("self-tuning", "50%", "10", "2", "2", "0", "True")]
    assert summary[0]["mean_top1"] == summary[0]["std_top1"] == ""
    assert float(summary[1]["mean_top1"]) == pytest.approx(0.85)
    assert float(summary[1]["std_top1"]) == pytest.approx(0.0707, abs=1e-4)

    by_id = {int(row["run_id"]): row for row in runs}
    assert sorted(by_id) == sorted(ids.values())
    best = by_id[ids[("self-tuning", "50%", 1)]]
    assert (best["method"], best["seed"], best["status"], best["labeled_count"]) == (
        "self-tuning", "1", "succeeded", "10")
    # Rounded: 0.9 - 0.05 is 0.8500000000000001 in floating point.
    assert [best[key] for key in ("test_top1", "test_mean_class_acc", "pseudo_label_acc",
                                  "train_pseudo_label_acc", "seconds_per_iteration")] == [
        "0.9", "0.85", "0.75", "0.6", "0.25"]
    assert datetime.fromisoformat(best["finished_at"]) >= datetime.fromisoformat(
        best["first_started_at"])
    assert datetime.fromisoformat(best["last_queued_at"]).tzinfo is not None
    # In UTC with a Z, as the JSON API gives its times (a sheet sorts them as text).
    assert all(best[key].endswith("Z") and len(best[key]) == 20
               for key in ("first_started_at", "finished_at", "last_queued_at"))
    assert best["error"] == ""
    assert by_id[failed]["status"] == "failed"
    assert by_id[failed]["error"] == "RuntimeError: out of memory"
    waiting = by_id[ids[("fine-tune", "50%", 1)]]
    assert (waiting["status"], waiting["test_top1"], waiting["first_started_at"],
            waiting["seconds_per_iteration"], waiting["labeled_count"]) == (
        "queued", "", "", "", "10")
    with live_server.client() as client:
        assert client.get("/api/experiments/999999/runs.csv").status_code == 404
        head = client.head(f"/api/experiments/{experiment_id}/summary.csv")
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/csv")


@pytest.mark.browser
def test_a_finishing_run_offers_no_cancel_and_a_silent_cancelled_one_says_how_it_ends(
    live_server, request
):
    """Past its last step the page offered "Cancel run" ("stops within about one
    iteration"), which the server then refused; a silent run whose cancel was asked said it
    would be queued again, while the server ends it cancelled."""
    database_url = live_server.database_url
    with live_server.client() as client:
        _, (finishing, silent) = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        total = client.get(f"/api/runs/{finishing}").json()["total_steps"]
        with session_scope(database_url) as session:
            running_for_5_min(session, finishing, heartbeat_age_s=1).step = total
            running_for_5_min(session, silent, heartbeat_age_s=75)
            session.get(Run, silent).cancel_requested = True
        refused = client.post(f"/api/runs/{finishing}/cancel")
        assert refused.status_code == 409 and "it ends when that is done" in refused.text
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{finishing}")
        page.wait_for_selector("#eta:has-text('finishing: final evaluation and export')")
        assert "past cancelling" in page.inner_text("#eta")
        assert page.locator("#cancel").is_hidden()
        page.goto(f"{live_server.url}/runs/{silent}")
        page.wait_for_selector("#eta:has-text('no word from its worker')")
        assert "(the run ends cancelled if the silence lasts)" in page.inner_text("#eta")
        browser.assert_no_errors(expected=("status of 409",))


@pytest.mark.browser
def test_a_running_experiment_is_not_said_in_progress_in_the_moment_between_two_runs(
    live_server, request
):
    """One worker ends a run and takes the next a second later: the badge flickered running,
    in progress, running at each run's end."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, (first, second, third) = start_sweep(
            client, add_dataset_row(database_url), methods=["fine-tune"], budgets=["all"],
            seeds=[0, 1, 2])

    def take(run_id: int) -> None:  # as a worker takes a run, and pages are told
        mark_running(database_url, run_id)
        with session_scope(database_url) as session:
            publish_status(live, session.get(Run, run_id))

    take(first)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#experiment-status .badge:text-is('running')")
        page.evaluate("""() => {
            window.shown = [];
            new MutationObserver(() => window.shown.push(
                document.getElementById('experiment-status').innerText.trim()))
                .observe(document.getElementById('experiment-status'),
                         { childList: true, subtree: true, characterData: true });
        }""")
        finish(database_url, live, first, {"test_top1": 0.7})
        page.wait_for_selector(f"#runs tr[data-run-id='{first}'] .badge:text-is('succeeded')")
        time.sleep(1)
        take(second)
        page.wait_for_selector(f"#runs tr[data-run-id='{second}'] .badge:text-is('running')")
        time.sleep(5)  # past the moment a gap is waited out
        assert "in progress" not in page.evaluate("window.shown")
        expect(page.locator("#experiment-status")).to_have_text("running")

        # A gap that lasts (the worker took another experiment's run) is said.
        finish(database_url, live, second, {"test_top1": 0.7})
        page.wait_for_selector("#experiment-status .badge:text-is('in progress')",
                               timeout=15_000)
        browser.assert_no_errors()


@pytest.mark.browser
def test_an_experiment_whose_runs_all_ended_without_a_result_says_none_will_appear(
    live_server, request
):
    """A cancelled sweep still said "Results appear here as runs finish"; and once it did not,
    a run queued again (Run again, in another tab) left "No run ... ended with a result"."""
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(live_server.database_url))
        assert client.post(f"/api/experiments/{experiment_id}/cancel").status_code == 200
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#experiment-status .badge:text-is('cancelled')")
        expect(page.locator("#results-note")).to_have_text(
            "No run of this experiment ended with a result: see the runs below.")

        with live_server.client() as client:
            assert client.post(f"/api/runs/{run_ids[0]}/requeue").status_code == 200
        page.wait_for_selector("#experiment-status .badge:text-is('in progress')",
                               timeout=15_000)
        expect(page.locator("#results-note")).to_have_text(re.compile(
            r"^Results appear here as runs finish: mean over seeds,\s+with the spread"))
        browser.assert_no_errors()


@pytest.mark.browser
def test_runs_tied_for_the_best_result_of_a_budget_are_all_highlighted(live_server, request):
    """Two runs of one budget with the same final top-1: the results table highlighted both
    methods (it says "ties each"), the runs table only the first of the two runs."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, add_dataset_row(database_url))  # seeds 0, 1
        ids = runs_by(client, experiment_id)
    for (_, _, seed), run_id in ids.items():
        finish(database_url, live, run_id, {"test_top1": 0.75 if seed == 0 else 0.5})

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#runs tbody tr.best")
        best = page.evaluate("[...document.querySelectorAll('#runs tbody tr.best')]"
                             ".map((tr) => Number(tr.dataset.runId))")
        assert sorted(best) == sorted([ids[("fine-tune", "50%", 0)],
                                       ids[("self-tuning", "50%", 0)]])
        assert page.locator("#budget-table td.best").count() == 2
        browser.screenshot("tied-best")
        browser.assert_no_errors()


LONG_CLASS_NAMES = [(f"c{i}_" + "camera_trap_site_" * 4)[:61] for i in range(6)]


def cards_scrolling_sideways(page) -> list[str]:
    """The cards whose content is wider than they are (they scroll sideways), by heading."""
    return page.evaluate("""[...document.querySelectorAll('section.card')]
        .filter((card) => card.scrollWidth > card.clientWidth)
        .map((card) => card.querySelector('h2')?.textContent || card.querySelector('[id]').id)""")


@pytest.mark.browser
def test_long_names_in_tables_wrap_and_the_confusion_matrix_shortens_its_column_names(
    live_server, request
):
    """At 1280 px, a 200-character experiment name without spaces made the experiments list
    scroll sideways, a 61-character class name the dataset page's classes table, and the
    confusion matrix, headed by full class names, showed one column at a time."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    dataset_id = add_dataset_row(database_url, {name: {"train": 10, "test": 2}
                                                for name in LONG_CLASS_NAMES})
    experiment_name = ("wildlife_camera_traps_2024_11_final_cleaned_" * 5)[:200]
    with live_server.client() as client:
        experiment_id, (run_id,) = start_sweep(
            client, dataset_id, name=experiment_name, seeds=[0], methods=["fine-tune"],
            budgets=[0.5])
        again, _ = start_sweep(client, dataset_id, name=experiment_name, seeds=[0],
                               methods=["fine-tune"], budgets=[0.5])
    classes = len(LONG_CLASS_NAMES)
    finish(database_url, live, run_id, {
        "test_top1": 1.0, "test_mean_class_acc": 1.0,
        "confusion_matrix": [[2 if i == j else 0 for j in range(classes)]
                             for i in range(classes)],
        "per_class_acc": [1.0] * classes, "pseudo_label_quality": {}})

    with open_browser(request.node.name) as browser:
        page = browser.page
        for path, ready in (("/experiments", "#experiments"),
                            (f"/experiments/compare?ids={experiment_id}&ids={again}",
                             "#budget-table td"),
                            (f"/datasets/{dataset_id}", "#class-counts"),
                            (f"/runs/{run_id}", "#results:not([hidden]) #confusion td")):
            page.goto(f"{live_server.url}{path}")
            page.wait_for_selector(ready)
            assert cards_scrolling_sideways(page) == [], path
            assert browser.horizontal_overflow() == 0, path
            browser.screenshot(path.strip("/").replace("/", "-"))

        # The matrix's columns are named as the charts name classes, cut to 16 characters;
        # the whole name is the header's tooltip and what a screen reader reads.
        first = page.locator("#confusion thead th").nth(1)
        assert first.locator("[aria-hidden=true]").inner_text() == f"{LONG_CLASS_NAMES[0][:15]}…"
        assert first.get_attribute("title") == LONG_CLASS_NAMES[0]
        for name in LONG_CLASS_NAMES:
            assert page.get_by_role("columnheader", name=name, exact=True).count() == 1
        browser.assert_no_errors()


@pytest.mark.browser
def test_a_long_runs_steps_and_time_left_read_at_a_glance(live_server, request):
    """A run of a million steps showed "990190 / 1000000", and days left as "109 h 0 min"."""
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id, (run_id, _) = start_sweep(client, add_dataset_row(database_url),
                                                 seeds=[0])
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)  # fine-tuning, 8 images a step
        run.status, run.worker, run.device, run.attempts = "running", "w@host", "cpu", 1
        run.started_at = run.heartbeat_at = utcnow()
        run.step, run.total_steps, run.images_per_s = 990_190, 1_000_000, 0.2
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_id}")
        expect(page.locator("#step")).to_have_text("990,190 / 1,000,000")
        expect(page.locator("#eta")).to_have_text("4 d 13 h")  # 9,810 steps x 8 / 0.2 a second
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        expect(page.locator("span.step").first).to_have_text("990,190 / 1,000,000")
        browser.assert_no_errors()
