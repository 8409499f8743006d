"""Pages that act on the server as it is now, not as it was when they loaded, in Chromium
against a real uvicorn, Redis and SQLite (no worker): a dataset's delete counts what it takes
along when it is clicked; signing out in one tab stops the live feeds of the others, and a
feed refused for its sign-in stops retrying; the start form shows what Start would refuse
while it is filled in."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import httpx
import pytest
import redis
from playwright.sync_api import expect

from app.live import experiment_stream_key, run_stream_key
from tests.browser import open_browser
from tests.support import add_dataset_row
from tests.test_experiments_cancel_delete import mark_running, start_sweep
from tests.test_pages_fixes import TOKEN, guarded, sign_in  # noqa: F401 - a fixture
from tests.test_run_metrics_pages import record
from worker.runs import RunRecorder

pytestmark = pytest.mark.browser

# Every EventSource a page opens, so a test can tell whether the page closed its feed.
TRACK_FEEDS = """
    window.feeds = [];
    const Original = window.EventSource;
    window.EventSource = class extends Original {
        constructor(...args) { super(...args); window.feeds.push(this); }
    };
"""
OPEN_FEEDS = "window.feeds.filter((f) => f.readyState !== EventSource.CLOSED).length"


def running_sweep(live_server) -> tuple[redis.Redis, int, list[int]]:
    """The Redis of the app's feeds, and a sweep of one seed (its experiment and run ids)
    whose first run a worker has taken."""
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(live_server.database_url),
                                             seeds=[0])
    mark_running(live_server.database_url, run_ids[0])
    return (redis.Redis.from_url(live_server.redis_url, decode_responses=True), experiment_id,
            run_ids)


def delete_question(page) -> str:
    """What Delete asks (answered Cancel: nothing is deleted)."""
    asked: list[str] = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", answer)
    page.click("button[data-delete-url]")
    for _ in range(100):  # the question comes once the count is read
        if asked:
            return asked[0]
        page.wait_for_timeout(100)
    raise AssertionError("Delete asked nothing")


def test_a_datasets_delete_counts_what_it_takes_along_when_it_is_clicked(live_server, request):
    """The question was written when the page loaded: an experiment started on the dataset in
    another tab afterwards was not in it, though the delete takes it along."""
    database_url = live_server.database_url
    with live_server.client() as client:
        used, unused = add_dataset_row(database_url), add_dataset_row(database_url)
        start_sweep(client, used)  # 2 methods x 2 seeds

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/datasets/{used}")
        page.wait_for_selector("button[data-delete-url]")
        with live_server.client() as client:  # "another tab", after the page loaded
            start_sweep(client, used, seeds=[0])  # 2 runs more
        assert delete_question(page) == (
            "Delete “shapes” with its 2 experiments and 6 runs, their trained models, "
            "checkpoints and downloads? This cannot be undone.")
        assert page.is_enabled("button[data-delete-url]")

        page.goto(f"{live_server.url}/datasets/{unused}")
        assert delete_question(page) == "Delete “shapes” and its images? This cannot be undone."

        # The count cannot be read: the question says what may go, and that it is not counted.
        page.route(re.compile(r"/api/experiments\?"), lambda route: route.fulfill(
            status=503, json={"detail": "the database is unavailable"}))
        assert delete_question(page) == (
            "Delete “shapes” with every experiment and run made on it, their trained models, "
            "checkpoints and downloads? (How many there are now could not be checked.) This "
            "cannot be undone.")
        page.unroute(re.compile(r"/api/experiments\?"))

        # Deleted in another tab: no question, and the page says so.
        with live_server.client() as client:
            assert client.delete(f"/api/datasets/{unused}").status_code == 204
            assert client.get(f"/api/datasets/{used}").status_code == 200  # Cancel kept it
        page.click("button[data-delete-url]")
        page.wait_for_selector("#delete-error:not([hidden])")
        assert page.inner_text("#delete-error") == (
            "This dataset no longer exists: it was deleted.")
        browser.screenshot("deleted-elsewhere")
        browser.assert_no_errors(expected=("status of 503", "status of 404"))


def test_signing_out_in_one_tab_stops_the_live_feeds_of_the_others(guarded, request):  # noqa: F811
    """An experiment's and a run's page kept their feeds open and said "● live" after a
    sign-out in another tab (an open stream outlives its cookie)."""
    url, database_url = guarded
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    experiment_path, run_path = f"/experiments/{experiment_id}", f"/runs/{run_ids[0]}"

    with open_browser(request.node.name) as browser:
        experiment_page = browser.page
        context = experiment_page.context
        context.add_init_script(TRACK_FEEDS)
        sign_in(experiment_page, url, experiment_path)
        experiment_page.wait_for_selector("#live-state:text-is('● live')")
        run_page = context.new_page()
        run_page.goto(f"{url}{run_path}")
        run_page.wait_for_selector("#live-state:text-is('● live')")

        other = context.new_page()
        other.goto(f"{url}/datasets")
        other.click("form.signout button")
        other.wait_for_url(re.compile(r"/login"))

        for page, error, path, what in ((experiment_page, "#action-error", experiment_path,
                                         "this experiment"),
                                        (run_page, "#cancel-error", run_path, "this run")):
            page.wait_for_selector(f"{error} a.sign-in-again", timeout=10_000)
            assert page.inner_text(error) == (
                f"You signed out in another tab: sign in again to follow {what} live.")
            assert page.get_attribute(f"{error} a", "href") == (
                f"/login?next={quote(path, safe='')}")
            assert page.inner_text("#live-state") == ""
            assert page.evaluate(OPEN_FEEDS) == 0
            assert page.is_hidden("form.signout")
        run_page.wait_for_timeout(2500)  # nothing reconnects
        assert run_page.evaluate("window.feeds.length") == 1
        assert experiment_page.evaluate("window.feeds.length") == 1
        browser.screenshot("1-signed-out-elsewhere")

        # Signed in again from one of them: the other follows its run again by itself.
        experiment_page.click("#action-error a.sign-in-again")
        experiment_page.fill("#token", TOKEN)
        experiment_page.click("button[type=submit]")
        experiment_page.wait_for_url(f"{url}{experiment_path}")
        experiment_page.wait_for_selector("#live-state:text-is('● live')")
        run_page.wait_for_selector("#live-state:text-is('● live')", timeout=15_000)
        run_page.wait_for_function("document.getElementById('cancel-error').textContent === ''")
        assert run_page.is_visible("form.signout")
        browser.assert_no_errors()


def test_a_live_feed_refused_for_its_sign_in_stops_instead_of_retrying(live_server, request):
    """A feed the server refused (401) was opened again every 1 to 30 s for as long as the
    page stayed open, the run's page read every 5 s, and both said "reconnecting…"."""
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(
            client, add_dataset_row(live_server.database_url), seeds=[0])
    refused = {"detail": "missing or wrong API token"}

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.context.add_init_script(TRACK_FEEDS)
        # The sign-in expired after the page was served: its feed and reads are refused.
        for path, error in ((f"/experiments/{experiment_id}", "#action-error"),
                            (f"/runs/{run_ids[0]}", "#cancel-error")):
            # (a run page reads its run with `?confusion=sparse`)
            page.route(re.compile(rf"/api{re.escape(path)}(/events)?(\?[^/]*)?$"),
                       lambda route: route.fulfill(status=401, json=refused))
            page.goto(f"{live_server.url}{path}")
            page.wait_for_selector(f"{error} a.sign-in-again", timeout=10_000)
            assert page.inner_text(error) == (
                "Your sign-in expired: sign in again, then try once more.")
            page.wait_for_timeout(4000)  # the feed's retries came after 1, 2 and 4 s
            assert page.evaluate("window.feeds.length") == 1, path
            assert page.evaluate(OPEN_FEEDS) == 0
            assert page.inner_text("#live-state") == ""
        browser.screenshot("feed-refused")
        browser.assert_no_errors(expected=("401",))


def test_the_start_form_shows_what_start_would_refuse_while_it_is_filled_in(
    live_server, request
):
    """The form showed the server's warnings as it was filled in, but its refusals (an
    unknown backbone, a budget out of range) only after Start."""
    dataset_id = add_dataset_row(live_server.database_url)
    backbone_error = '[data-field="backbone"] .field-error'
    budgets_error = '[data-field="budgets"] .field-error'
    with open_browser(request.node.name) as browser:
        page = browser.page
        sent = []  # starts (the form's checks go to /api/experiments/check)
        page.on("request", lambda r: sent.append(r.url) if r.method == "POST"
                and r.url.endswith("/api/experiments") else None)
        page.goto(f"{live_server.url}/experiments/new?dataset_id={dataset_id}")
        page.wait_for_selector("#run-count:has-text('runs')")
        assert page.get_attribute("#start", "class") in (None, "")
        assert page.is_hidden("#start-blocked")

        page.fill("#f-backbone", "no_such_network")
        page.wait_for_selector(backbone_error, state="visible", timeout=10_000)
        assert "unknown backbone 'no_such_network'" in page.inner_text(backbone_error)
        assert page.get_attribute("#start", "class") == "refused"
        assert page.get_attribute("#start", "aria-describedby") == "start-blocked"
        assert page.inner_text("#start-blocked") == "Cannot start yet: fix Backbone above."
        browser.screenshot("1-refused-before-start")

        # The form's own refusals show as well, and the reason names every field.
        page.fill("#f-budgets", "50%, lots")
        page.wait_for_selector(budgets_error, state="visible")
        assert page.inner_text(budgets_error) == (
            "“lots” is not a budget: write 15%, 0.15, 4/class or all")
        page.fill("#f-budgets", "50%, 150%")
        page.wait_for_selector(f"{budgets_error}:has-text('must be in (0, 1]')")
        page.fill("#f-backbone", "tf_efficientnet_lite0")
        page.wait_for_selector(backbone_error, state="hidden")
        assert page.inner_text("#start-blocked") == "Cannot start yet: fix Label budgets above."

        # Start stays reachable (greyed, not disabled): it puts the keyboard on the field to
        # fix, and the server refuses the experiment.
        page.click("#start")
        page.wait_for_function("document.activeElement.id === 'f-budgets'")
        with live_server.client() as client:
            assert client.get("/api/experiments").json() == []

        # Fixed: the refusal goes and Start is on again.
        page.fill("#f-budgets", "50%")
        page.wait_for_selector("#start-blocked", state="hidden")
        assert page.get_attribute("#start", "class") == ""
        assert page.is_hidden(budgets_error) and page.is_hidden(backbone_error)
        assert len(sent) == 1  # the Start above, which the server refused
        page.click("#start")
        page.wait_for_url(re.compile(r"/experiments/\d+$"))
        browser.assert_no_errors(expected=("status of 422",))


# The test says whether a page is shown (`window.setShown(false)`): headless, every page is.
EMULATE_VISIBILITY = """
    let hidden = false;
    Object.defineProperty(document, "visibilityState",
                          { configurable: true, get: () => (hidden ? "hidden" : "visible") });
    Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
    window.setShown = (shown) => {
        hidden = !shown;
        document.dispatchEvent(new Event("visibilitychange"));
    };
"""


def test_hidden_pages_let_their_feeds_go_so_a_seventh_tab_of_the_app_loads(live_server, request):
    """A browser opens at most six connections to a server (HTTP/1.1) and every live page held
    one: with six run pages open, a seventh page of the app never loaded. A page hidden for
    10 s lets its feed go, and takes it up again when shown, from the last event it had: what
    came meanwhile arrives, once."""
    database_url = live_server.database_url
    live, experiment_id, (run_id, _) = running_sweep(live_server)

    def progress(step: int) -> None:  # recorded, then sent, as the worker does
        record(database_url, run_id, "progress", range(step, step + 1))
        live.xadd(run_stream_key(run_id), {"data": json.dumps({
            "type": "progress", "run_id": run_id, "step": step, "total_steps": 20,
            "losses": {"ce": 1.0 / step}, "lr": 0.01, "images_per_s": 30.0})})

    progress(1)
    with open_browser(request.node.name) as browser:
        context = browser.page.context
        context.add_init_script(TRACK_FEEDS + EMULATE_VISIBILITY)
        tabs = [browser.page] + [context.new_page() for _ in range(5)]
        for tab in tabs:
            tab.goto(f"{live_server.url}/runs/{run_id}")
            tab.wait_for_selector("#live-state:text-is('● live')")
        for tab in tabs:
            tab.evaluate("window.setShown(false)")
        for tab in tabs:
            tab.wait_for_function(f"({OPEN_FEEDS}) === 0", timeout=20_000)
        progress(2)  # while every page is hidden

        seventh = context.new_page()
        seventh.goto(f"{live_server.url}/experiments/{experiment_id}", timeout=15_000)
        seventh.wait_for_selector("#live-state:text-is('● live')")

        page = tabs[0]
        page.evaluate("window.setShown(true)")
        page.wait_for_function(f"({OPEN_FEEDS}) === 1")
        resumed = page.evaluate("window.feeds.at(-1).url")
        assert re.search(r"/events\?last_event_id=\d+-\d+$", resumed), resumed
        losses = ("Chart.getChart(document.querySelector('#chart-losses'))"
                  ".data.datasets[0].data.map((point) => point.x).join()")
        page.wait_for_function(f"{losses} === '1,2'")  # step 2 came while it was hidden
        progress(3)
        page.wait_for_function(f"{losses} === '1,2,3'")
        # A glance away and back keeps the feed.
        page.evaluate("window.setShown(false); window.setShown(true)")
        page.wait_for_timeout(500)
        assert page.evaluate("window.feeds.length") == 2
        browser.assert_no_errors()


def test_a_page_opened_in_a_background_tab_opens_its_feed_when_first_shown(live_server,
                                                                         request):
    _, _, (run_id, _) = running_sweep(live_server)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.context.add_init_script(
            EMULATE_VISIBILITY.replace("let hidden = false", "let hidden = true") + TRACK_FEEDS)
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_selector("#run-status .badge.running")
        page.wait_for_timeout(500)
        assert page.evaluate("window.feeds.length") == 0
        page.evaluate("window.setShown(true)")
        page.wait_for_selector("#live-state:text-is('● live')")
        assert page.evaluate("window.feeds.map((feed) => feed.url)") == [
            f"{live_server.url}/api/runs/{run_id}/events"]
        browser.assert_no_errors()


@pytest.mark.browser
def test_an_ended_run_page_follows_its_run_again_when_it_is_run_again_elsewhere(
    live_server, request
):
    """The run cancelled, then run again from its experiment's page: its own page, left open
    in another tab, kept "cancelled" and its Run again button until it was reloaded. Shown
    again, it asks, and follows the run anew."""
    from playwright.sync_api import expect

    from tests.test_pages_accessibility import send_events

    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, [run_id] = start_sweep(
            client, add_dataset_row(live_server.database_url), methods=["fine-tune"], seeds=[0])
        assert client.post(f"/api/runs/{run_id}/cancel").status_code == 200
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_id}")
        expect(page.locator("#run-status")).to_contain_text("cancelled")
        expect(page.locator("#requeue")).to_be_visible()
        with live_server.client() as client:  # "Run again" on the experiment's page
            assert client.post(f"/api/runs/{run_id}/requeue").status_code == 200
        page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # shown again
        expect(page.locator("#run-status")).to_contain_text("queued")
        expect(page.locator("#requeue")).to_be_hidden()
        mark_running(live_server.database_url, run_id)
        send_events(live, experiment_id, run_id, {"type": "started", "step": 0},
                    {"type": "progress", "step": 4, "loss": 0.9, "lr": 0.01})
        expect(page.locator("#run-status")).to_contain_text("running")  # its feed again
        browser.assert_no_errors()


# Each message the page's feeds have had, by type (`window.feedTypes`).
COUNT_MESSAGES = """
    window.feedTypes = [];
    const Counted = window.EventSource;
    window.EventSource = class extends Counted {
        constructor(...args) {
            super(...args);
            this.addEventListener("message", (m) => window.feedTypes.push(JSON.parse(m.data).type));
        }
    };
"""


def test_pages_opened_late_follow_their_feeds_from_where_they_stood(live_server, request):
    """A page followed its feed from the start: a run page opened late had each of a long
    run's events again (20,000, 6 MB) on top of its record, and an experiment page drew its
    runs once per event of the whole sweep (3-5 s of script for 18,000). A page now follows
    from the event that was the last when it read the record, which already has their news:
    the curves from the record, a running run's latest evaluation from the experiment's
    answer (`live_top1`), and only what comes after from the feeds."""
    from tests.test_pages_accessibility import send_events

    database_url = live_server.database_url
    live, experiment_id, (run_id, queued_id) = running_sweep(live_server)
    # 200 steps and an evaluation at step 200, recorded and then sent, as the worker does.
    record(database_url, run_id, "progress", range(1, 201))
    record(database_url, run_id, "eval", range(200, 201))  # test_top1 0.2
    send_events(live, experiment_id, run_id, {"type": "started", "step": 0},
                *({"type": "progress", "step": step, "losses": {"ce": 1 / step}, "lr": 0.01}
                  for step in range(1, 201)), {"type": "eval", "step": 200, "test_top1": 0.2})
    with live_server.client() as client:
        runs = {run["id"]: run for run in client.get(f"/api/experiments/{experiment_id}")
                .json()["runs"]}
    assert runs[run_id]["live_top1"] == 0.2 and runs[queued_id]["live_top1"] is None

    def last(key: str) -> str:
        return live.xrevrange(key, count=1)[0][0]

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.context.add_init_script(TRACK_FEEDS + COUNT_MESSAGES)
        experiment_from = last(experiment_stream_key(experiment_id))
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        page.wait_for_selector("#live-state:text-is('● live')")
        accuracy = page.locator(f"tr[data-run-id='{run_id}'] td").nth(6)
        expect(accuracy).to_have_text("20.0%")  # from the record
        assert page.evaluate("window.feeds.map((feed) => feed.url)") == [
            f"{live_server.url}/api/experiments/{experiment_id}/events?last_event_id="
            f"{experiment_from}"]
        record(database_url, run_id, "eval", range(400, 401))
        send_events(live, experiment_id, run_id, {"type": "eval", "step": 400, "test_top1": 0.4})
        expect(accuracy).to_have_text("40.0%")
        assert page.evaluate("window.feedTypes") == ["eval"]  # nothing before it again

        run_from = last(run_stream_key(run_id))
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_selector("#live-state:text-is('● live')")
        losses = ("Chart.getChart(document.querySelector('#chart-losses'))"
                  ".data.datasets[0].data.length")
        page.wait_for_function(f"{losses} === 200")
        assert page.evaluate("window.feeds.map((feed) => feed.url)") == [
            f"{live_server.url}/api/runs/{run_id}/events?last_event_id="
            f"{run_from}"]
        page.wait_for_timeout(300)
        assert page.evaluate("window.feedTypes") == []
        browser.assert_no_errors()


def test_a_run_page_says_how_far_the_work_before_and_after_the_steps_is(live_server, settings,
                                                                         request):
    """Before its first step a run decodes its images, and after its last it labels its
    unlabeled images: minutes each on a large dataset, while the page said nothing (time
    left 0 s). Its `stage` events say how far each is, and the page says it with the time
    left at their pace."""
    from tests.test_pages_accessibility import send_events

    live, experiment_id, (run_id, _) = running_sweep(live_server)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_selector("#live-state:text-is('● live')")
        eta = page.locator("#eta")
        send_events(live, experiment_id, run_id, {"type": "stage", "step": 0, "time": 100.0,
                                                   "stage": "decoding", "done": 1000,
                                                   "total": 60000})
        expect(eta).to_have_text("before the first step: decoding the images, 1,000 of 60,000")
        send_events(live, experiment_id, run_id, {"type": "stage", "step": 0, "time": 110.0,
                                                   "stage": "decoding", "done": 2000,
                                                   "total": 60000})
        # 100 images a second: 58,000 to go.
        expect(eta).to_have_text("before the first step: decoding the images, 2,000 of "
                                 "60,000, about 9 min 40 s left")
        send_events(live, experiment_id, run_id, {"type": "started", "step": 0},
                    {"type": "progress", "step": 20, "losses": {"ce": 0.5}, "lr": 0.01},
                    {"type": "stage", "step": 20, "time": 200.0, "stage": "labeling",
                     "done": 500, "total": 52000})
        expect(eta).to_have_text("finishing: labeling the unlabeled images, 500 of 52,000 "
                                 "(past cancelling: it ends when it is done)")
        send_events(live, experiment_id, run_id, {"type": "eval", "step": 20, "test_top1": 0.5})
        expect(eta).to_have_text("finishing: labeling the unlabeled images, 500 of 52,000 "
                                 "(past cancelling: it ends when it is done)")
        browser.assert_no_errors()
    # The worker sends them to the run's feed only: the experiment's page draws each run's
    # step and score, and its feed is shared by up to 60 runs.
    before = live.xlen(experiment_stream_key(experiment_id))
    RunRecorder(settings, run_id, experiment_id).on_event(
        {"type": "stage", "step": 20, "total_steps": 20, "stage": "labeling", "done": 600,
         "total": 52000})
    assert json.loads(live.xrevrange(run_stream_key(run_id), count=1)[0][1]["data"])[
        "done"] == 600
    assert live.xlen(experiment_stream_key(experiment_id)) == before


def test_a_run_page_whose_run_ends_while_it_is_hidden_has_every_point(live_server, request):
    """Hidden, a page lets its feed go after 10 s, and its poller still sees the run end: it
    drew the results with the curves cut where the feed had stopped (12 of 30 points), and
    shown again it read nothing more. It reads the rest from the record."""
    from tests.test_experiments_cancel_delete import end_as_worker
    from tests.test_pages_accessibility import send_events

    database_url = live_server.database_url
    live, experiment_id, (run_id, _) = running_sweep(live_server)

    def train_to(steps: range) -> None:  # recorded, then sent, as the worker does
        record(database_url, run_id, "progress", steps)
        send_events(live, experiment_id, run_id, *(
            {"type": "progress", "step": step, "losses": {"ce": 1 / step}, "lr": 0.01}
            for step in steps))

    losses = ("(Chart.getChart(document.querySelector('#chart-losses'))"
              "?.data.datasets[0]?.data.length ?? 0)")
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.context.add_init_script(TRACK_FEEDS + EMULATE_VISIBILITY)
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_selector("#live-state:text-is('● live')")
        train_to(range(1, 6))
        page.wait_for_function(f"{losses} === 5")
        page.evaluate("window.setShown(false)")
        page.wait_for_function(f"({OPEN_FEEDS}) === 0", timeout=20_000)
        train_to(range(6, 21))
        end_as_worker(database_url, live, run_id, "cancelled")
        page.wait_for_selector("#run-status .badge.cancelled", timeout=20_000)
        page.evaluate("window.setShown(true)")
        page.wait_for_function(f"{losses} === 20")
        browser.assert_no_errors()
