"""Notify me when it ends: an experiment's and a run's page, asked to, show a desktop
notification once what they follow has ended, in Chromium against a real uvicorn, Redis and
SQLite (the runs end as a worker ends them). Headless Chromium shows no notifications, so the
page's `Notification` is a stand-in that records them and answers the permission asked."""

from __future__ import annotations

import re

import pytest
import redis
from playwright.sync_api import expect

from tests.browser import open_browser
from tests.support import LiveServer, add_dataset_row
from tests.test_experiments_cancel_delete import end_as_worker, start_sweep
from tests.test_pages_fixes import finish

# The browser's answer to the permission asked is the tab's `notify-answer` (sessionStorage,
# so that it lasts through a reload as a browser's does).
NOTIFICATION_STAND_IN = """
window.notified = [];
class StandIn {
  constructor(title, options) { window.notified.push({ title, body: options.body }); }
  close() {}
  static get permission() { return sessionStorage.getItem("notify-permission") ?? "default"; }
  static async requestPermission() {
    const answer = sessionStorage.getItem("notify-answer") ?? "granted";
    sessionStorage.setItem("notify-permission", answer);
    return answer;
  }
}
window.Notification = StandIn;
"""


def test_an_experiment_notifies_once_every_run_has_ended(
    server: LiveServer, request: pytest.FixtureRequest
) -> None:
    """A sweep on a CPU trains for hours: its page, in a tab left behind, said nothing."""
    with server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(server.database_url),
                                             seeds=[0], budgets=["15%", "30%"],
                                             methods=["fine-tune"], name="pets")
    live = redis.Redis.from_url(server.redis_url, decode_responses=True)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.add_init_script(NOTIFICATION_STAND_IN)
        page.goto(f"{server.url}/experiments/{experiment_id}")
        button = page.locator("#notify-end")
        expect(button).to_have_text("Notify me when it ends")
        expect(button).to_have_attribute("aria-pressed", "false")
        button.click()
        expect(button).to_have_text("You will be notified when it ends")
        expect(button).to_have_attribute("aria-pressed", "true")
        page.reload()  # the wish lasts while the tab is open
        expect(button).to_have_attribute("aria-pressed", "true")

        end_as_worker(server.database_url, live, run_ids[0], "succeeded")
        expect(page).to_have_title(re.compile(r"^1/2 · pets"))
        assert page.evaluate("window.notified") == []  # one run is still to go
        end_as_worker(server.database_url, live, run_ids[1], "failed")
        page.wait_for_function("window.notified.length > 0")
        assert page.evaluate("window.notified") == [{
            "title": "pets: every run has ended",
            "body": f"1 succeeded, 1 failed (experiment #{experiment_id})"}]
        expect(button).to_be_hidden()  # nothing left to wait for
        browser.assert_no_errors()


def test_a_run_notifies_when_it_ends_and_a_refusal_says_what_to_do(
    server: LiveServer, request: pytest.FixtureRequest
) -> None:
    with server.client() as client:
        _, (run_id, other_id) = start_sweep(client, add_dataset_row(server.database_url),
                                            seeds=[0], budgets=["50%", "all"],
                                            methods=["fine-tune"])
    live = redis.Redis.from_url(server.redis_url, decode_responses=True)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.add_init_script(NOTIFICATION_STAND_IN)
        page.goto(f"{server.url}/runs/{run_id}")
        page.locator("#notify-end").click()
        expect(page.locator("#notify-end")).to_have_attribute("aria-pressed", "true")
        finish(server.database_url, live, run_id, {"test_top1": 0.875})
        page.wait_for_function("window.notified.length > 0")
        assert page.evaluate("window.notified") == [{
            "title": f"Run #{run_id} succeeded: test top-1 87.5%",
            "body": "Fine-tuning, 50% of the labels, seed 0"}]
        expect(page.locator("#notify-end")).to_be_hidden()

        # The person answers Block when the browser asks: the page says where to allow them.
        page.evaluate("""() => {
            sessionStorage.setItem('notify-permission', 'default');
            sessionStorage.setItem('notify-answer', 'denied');
        }""")
        page.goto(f"{server.url}/runs/{other_id}")
        page.locator("#notify-end").click()
        expect(page.locator("#notify-note")).to_have_text(
            "The browser does not let this site notify you: allow its notifications in the "
            "site's settings (the icon left of the address).")
        expect(page.locator("#notify-end")).to_have_attribute("aria-pressed", "false")
        browser.assert_no_errors()
