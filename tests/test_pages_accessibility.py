"""Every page, in the states a user meets, audited by axe-core (WCAG 2.1 A and AA rules and
axe's best practices) in Chromium, on a desktop and a phone window, against a real uvicorn,
Redis and SQLite. No worker: the test writes what a worker would (a finished run with its
curves and pseudo-label quality, one of 60 classes whose per-class table has its sort buttons,
find box and show-all button, a running one, a failed one with its traceback). One class
has a 61-character name without spaces, as folder names can: tables that grow wider than
their card scroll sideways, and a keyboard must reach them."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import redis
from playwright.sync_api import expect

from app.db import session_scope
from app.live import experiment_stream_key, run_stream_key
from app.models import Artifact, Run, RunMetric
from tests.browser import DESKTOP, PHONE, Browser, open_browser, wait_until_held
from tests.support import PROJECT_ROOT, add_dataset_row, app_env, make_image_archive, start_server
from tests.test_datasets_support import upload
from tests.test_experiments_cancel_delete import mark_running, start_sweep
from tests.test_pages_fixes import finish, quality, runs_by

pytestmark = pytest.mark.browser

AXE = PROJECT_ROOT / "node_modules" / "axe-core" / "axe.min.js"  # package.json, `make test`
RULES = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]
TOKEN = "correct-horse-battery-staple"
LONG_CLASS = ("camera_trap_site_" * 4)[:61]
MANY = 60  # classes: more than the per-class table shows at first (run.js's PER_CLASS_SHOWN)


def violations(page) -> list[str]:
    """What axe finds on the page as it is now: rule, impact and the elements, one line each."""
    page.evaluate(AXE.read_text())  # as the tools do: a script tag is refused by the policy
    return page.evaluate("""async (rules) => {
        const found = await axe.run(document, {runOnly: rules});
        return found.violations.map((v) => `${v.id} (${v.impact}): ${v.help}: `
            + v.nodes.map((n) => n.target.join(" ")).join(", "));
    }""", RULES)


@pytest.fixture
def lab(settings, tmp_path):
    """A token-guarded server with an uploaded dataset and a sweep of four runs: one
    succeeded, one running, one queued and one failed. Returns (url, pages to audit)."""
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_API_TOKEN=TOKEN)
    url, process = start_server(env, tmp_path / "uvicorn.log")
    database_url = settings.sqlalchemy_url
    live = redis.Redis.from_url(settings.effective_redis_url)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        pages = _fill_the_lab(url, headers, database_url, live, tmp_path)
        yield url, pages
    finally:
        process.stop()


def _fill_the_lab(url: str, headers: dict, database_url: str, live: redis.Redis,
                  tmp_path) -> dict[str, str]:
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        archive = make_image_archive(tmp_path / "shapes.zip",
                                     classes=("circle", "square", LONG_CLASS))
        created = upload(client, archive.read_bytes())
        assert created.status_code == 201, created.text
        dataset_id = created.json()["id"]
        experiment_id, (done, running, queued, failed) = start_sweep(client, dataset_id)
        many_id = add_dataset_row(database_url, {f"species {n:02d}": {"train": 4, "test": 5}
                                                 for n in range(MANY)})
        many_experiment, (many,) = start_sweep(client, many_id, seeds=[0],
                                               methods=["fine-tune"])
    with session_scope(database_url) as session:
        for step in (10, 20):
            session.add(RunMetric(run_id=done, kind="progress", step=step, values={
                "loss_ce": 1 / step, "loss_pgc_labeled": 2 / step, "lr": 0.01,
                "images_per_s": 50.0}))
            session.add(RunMetric(run_id=done, kind="eval", step=step, values={
                "test_top1": 0.5, "test_mean_class_acc": 0.5, "pseudo_label_acc": 0.6,
                "queue_purity": 0.8}))
        session.add(Artifact(run_id=done, name="model.safetensors",
                             path=f"runs/{done}/model.safetensors", size_bytes=1536,
                             sha256="0" * 64))
    for run_id in (done, running, failed):
        mark_running(database_url, run_id)
    finish(database_url, live, done, {
        "test_top1": 0.5, "test_mean_class_acc": 0.5, "pseudo_label_acc": 0.7,
        "confusion_matrix": [[1, 1, 0], [0, 2, 0], [0, 0, 2]],
        "per_class_acc": [0.5, 1.0, 1.0], "pseudo_label_quality": quality(8, True)})
    finish(database_url, live, many, many_class_metrics())
    with session_scope(database_url) as session:
        session.get(Run, failed).error = "RuntimeError: out of memory\n\n" + (
            '  File "worker/training.py", line 1, in train\n' * 30)
    finish(database_url, live, failed, status="failed")
    pages = {  # path: what shows once the page has drawn itself
        "/": "main h1",
        "/datasets": "#datasets",
        "/datasets/new": "#file",
        f"/datasets/{dataset_id}": "#class-thumbnails img",
        "/experiments": "#experiments",
        f"/experiments/new?dataset_id={dataset_id}": "#f-backbone",
        f"/experiments/new?like={experiment_id}": "#like-note",
        f"/experiments/{experiment_id}": "#runs tbody tr",
        f"/experiments/compare?ids={experiment_id}&ids={many_experiment}": "#budget-table td",
        f"/runs/{done}": "#results:not([hidden]) #confusion td",
        f"/runs/{many}": "#results:not([hidden]) #per-class-more",
        f"/runs/{running}": "#run-status:has-text('running')",
        f"/runs/{queued}": "#run-status:has-text('queued')",
        f"/runs/{failed}": "#run-error:not([hidden])",
        "/runs/999999": "main h1",  # the error page
    }
    return pages


def many_class_metrics() -> dict:
    """A finished run of MANY classes, some confused with the next: the per-class table opens
    worst first on its first rows, the confusions are a list, the distribution chart a few
    classes of them."""
    confusion = [[5 if i == j else 0 for j in range(MANY)] for i in range(MANY)]
    for i in range(0, MANY, 3):
        confusion[i][i], confusion[i][(i + 1) % MANY] = 3, 2
    shares = [1 / MANY] * MANY
    return {
        "test_top1": 0.87, "test_mean_class_acc": 0.87, "confusion_matrix": confusion,
        "per_class_acc": [row[i] / 5 for i, row in enumerate(confusion)],
        "pseudo_label_quality": {
            **quality(8, True), "labeled_distribution": shares,
            "predicted_distribution": [share * (1 + (i % 5 - 2) / 4)
                                       for i, share in enumerate(shares)],
            "per_class_precision": [0.9] * MANY, "per_class_recall": [0.8] * MANY},
    }


@pytest.mark.parametrize("window", ["desktop", "phone"])
def test_every_page_passes_an_accessibility_audit(lab, window, request):
    url, pages = lab
    found: dict[str, list[str]] = {}
    with open_browser(request.node.name, {"desktop": DESKTOP, "phone": PHONE}[window],
                      content_security_policy=True) as browser:
        page = browser.page
        page.goto(f"{url}/login?next=/")
        page.fill("#token", "wrong")
        page.click("button[type=submit]")
        page.wait_for_selector("text=That token is not right.")
        found["/login, wrong token"] = violations(page)
        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/")

        for path, ready in pages.items():
            page.goto(url + path)
            page.wait_for_selector(ready)
            found[path] = violations(page)

        # The form with the API's messages beside its fields.
        page.goto(url + next(path for path in pages if path.startswith("/experiments/new")))
        page.fill("#f-lr", "0")
        page.fill("#f-budgets", "30%, lots")
        page.click("#start")
        page.wait_for_selector('[data-field="budgets"] .field-error:visible')
        found["/experiments/new, errors"] = violations(page)

        # An upload the server refuses, with its message.
        page.goto(url + "/datasets/new")
        page.set_input_files("#file", {"name": "notes.zip", "mimeType": "application/zip",
                                       "buffer": b"not a zip archive"})
        page.click("#upload-button")
        page.wait_for_selector("#upload-error:not([hidden])")
        found["/datasets/new, refused"] = violations(page)
        browser.screenshot("last-audited")
        # Only the refusals the test provokes: wrong token, no such run, not an archive, and
        # the form's invalid values.
        browser.assert_no_errors(expected=tuple(f"status of {code}" for code in (401, 404,
                                                                                  415, 422)))
    assert {where: lines for where, lines in found.items() if lines} == {}
    assert len(found) == len(pages) + 3  # every page was audited


# --- with a keyboard and a screen reader ----------------------------------------------------
# What axe cannot see: what a live region says while the page follows a run, and where the
# keyboard is after an action.

# The texts a live region took, one per change of its content (childList or text), from now.
WATCH_LIVE = """(selector) => {
    window.heard = [];
    const node = document.querySelector(selector);
    new MutationObserver(() => window.heard.push(node.textContent))
        .observe(node, {childList: true, subtree: true, characterData: true});
}"""


def send_events(live: redis.Redis, experiment_id: int, run_id: int, *events: dict) -> None:
    """Events as a training worker sends them, on the run's and the experiment's feeds."""
    for event in events:
        data = {"data": json.dumps({"run_id": run_id, "time": time.time(), "total_steps": 20,
                                    **event})}
        live.xadd(run_stream_key(run_id), data)
        live.xadd(experiment_stream_key(experiment_id), data)


@dataclass
class CancelAllPage:
    """The experiment page of a sweep with one run running and one queued, followed live,
    with its status watched (WATCH_LIVE); each confirm dialog accepted, its text in `asked`."""
    browser: Browser
    live: redis.Redis
    experiment_id: int
    running: int
    queued: int
    cancel: re.Pattern  # the page's request to cancel every run
    asked: list[str]


@contextmanager
def cancel_all_page(live_server, test_name: str) -> Iterator[CancelAllPage]:
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id, (running, queued) = start_sweep(client, add_dataset_row(database_url),
                                                       seeds=[0])
    mark_running(database_url, running)
    with open_browser(test_name) as browser:
        opened = CancelAllPage(browser, redis.Redis.from_url(live_server.redis_url),
                               experiment_id, running, queued,
                               re.compile(rf".*/api/experiments/{experiment_id}/cancel"), [])
        page = browser.page
        page.on("dialog", lambda dialog: (opened.asked.append(dialog.message), dialog.accept()))
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        expect(page.locator("#experiment-status")).to_have_text("running")
        expect(page.locator("#live-state")).to_have_text("● live")
        page.evaluate(WATCH_LIVE, "#experiment-status")
        yield opened


def test_a_running_status_is_announced_once_not_at_every_event(live_server, request):
    """The run's and the experiment's status (live regions) were drawn anew at every event
    and poll with the same word: a screen reader heard "running" every few seconds all
    through a run."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url)
    with live_server.client() as client:
        experiment_id, (run_id, _) = start_sweep(client, add_dataset_row(database_url),
                                                 seeds=[0])
    mark_running(database_url, run_id)
    with open_browser(request.node.name) as browser:
        run_page = browser.page
        run_page.goto(f"{live_server.url}/runs/{run_id}")
        experiment_page = run_page.context.new_page()
        experiment_page.goto(f"{live_server.url}/experiments/{experiment_id}")
        for page, status in ((run_page, "#run-status"), (experiment_page, "#experiment-status")):
            expect(page.locator(status)).to_have_text("running")
            expect(page.locator("#live-state")).to_have_text("● live")
            page.evaluate(WATCH_LIVE, status)
        # A status event makes the experiment page read its record again; progress redraws
        # the run page's status with its curves, and the run page polls every 5 s.
        send_events(live, experiment_id, run_id, {"type": "status", "status": "running",
                                                  "step": 0},
                    *({"type": "progress", "step": step, "lr": 0.01} for step in (1, 2, 3)))
        expect(run_page.locator("#step")).to_have_text("3 / 20")
        expect(experiment_page.locator(f'#runs tr[data-run-id="{run_id}"] .step')
               ).to_have_text("3 / 20")
        run_page.wait_for_timeout(6_000)  # a poll of the run page, a read of the experiment
        assert run_page.evaluate("window.heard") == []
        assert experiment_page.evaluate("window.heard") == []
        finish(database_url, live, run_id, {"test_top1": 0.5})
        expect(run_page.locator("#run-status")).to_have_text("succeeded")
        assert run_page.evaluate("window.heard") == ["succeeded"]  # said once
        browser.assert_no_errors()


def test_a_button_that_hides_itself_hands_the_keyboard_on(live_server, request):
    """Run again hides itself once pressed, Cancel run and Cancel all once the runs they
    cancel have ended, and Chromium then put the keyboard on <body>: Tab went on from the top
    of the page, and a screen reader said nothing of where the user was. The button shown in
    their place has the focus, else the page's heading with its status."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url)
    with live_server.client() as client:
        experiment_id, (failed, running) = start_sweep(client, add_dataset_row(database_url),
                                                       seeds=[0])
        mark_running(database_url, failed)
        finish(database_url, live, failed, status="failed")
        mark_running(database_url, running)
        with open_browser(request.node.name) as browser:
            page = browser.page
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(f"{live_server.url}/runs/{failed}")
            page.focus("#requeue")
            page.keyboard.press("Enter")
            expect(page.locator("#run-status")).to_have_text("queued")
            expect(page.locator("#cancel")).to_be_focused()
            page.keyboard.press("Enter")  # a queued run ends at once
            expect(page.locator("#run-status")).to_have_text("cancelled")
            expect(page.locator("#requeue")).to_be_focused()

            page.goto(f"{live_server.url}/runs/{running}")
            page.focus("#cancel")
            # The run ends (below) once the server has taken the cancel: ended before, the
            # cancel was refused (409) as too late.
            with page.expect_response(f"**/api/runs/{running}/cancel") as answer:
                page.keyboard.press("Enter")
            assert answer.value.ok, answer.value.status
            expect(page.locator("#cancel")).to_have_text("Cancelling…")
            expect(page.locator("#cancel")).to_be_focused()  # until the run has ended
            finish(database_url, live, running, status="cancelled", step=0)  # where it stopped
            expect(page.locator("#run-status")).to_have_text("cancelled")
            expect(page.locator("#requeue")).to_be_focused()

            assert client.post(f"/api/runs/{failed}/requeue").status_code == 200
            # The feed replays the runs' ends (the failed run's before its requeue: for a
            # moment none is left to cancel), then the page reads the record: settled.
            record = f"{live_server.url}/api/experiments/{experiment_id}"
            with page.expect_response(record):
                page.goto(record.replace("/api", ""))
            page.focus("#cancel-all")
            page.keyboard.press("Enter")  # the queued run ends at once: Delete in its place
            expect(page.locator("#experiment-status")).to_have_text("cancelled")
            expect(page.locator("#delete-experiment")).to_be_focused()
            browser.assert_no_errors()


def refused_then_held(page, button, url: str, error: str, idle: str,
                      busy: str = "Cancelling…", refused: str = "Could not cancel") -> list:
    """Press `button` (focused, confirmed) twice: the server refuses the first (said in
    `error` after `refused`, the button back as `idle` with the keyboard on it); the second
    ask (to `url`) is held and returned, the button off (`busy`, aria-disabled) with the
    keyboard on it, the refusal's word gone, and a third press asks nothing."""
    refusals, held = [], []

    def answer(route) -> None:  # one route for both asks: none goes by between two
        if refusals:
            held.append(route)
        else:
            refusals.append(route)
            route.fulfill(status=503, json={"detail": "the database did not answer"})

    page.route(url, answer)
    button.focus()
    page.keyboard.press("Enter")
    expect(page.locator(error)).to_have_text(f"{refused}: the database did not answer")
    expect(button).to_have_text(idle)
    expect(button).to_be_focused()
    assert button.get_attribute("aria-disabled") != "true"
    assert len(refusals) == 1 and not held

    page.keyboard.press("Enter")
    wait_until_held(page, held)
    expect(button).to_have_text(busy)
    expect(button).to_be_focused()
    assert button.get_attribute("aria-disabled") == "true"
    assert page.inner_text(error) == ""
    page.keyboard.press("Enter")  # off: it asks nothing more
    page.wait_for_timeout(200)
    assert len(held) == 1
    return held


def test_cancel_all_keeps_the_keyboard_until_the_server_answers(live_server, request):
    """Cancel all turned itself off as it was pressed, which put the keyboard on the page's
    heading before the server had answered: a screen reader read the heading with the
    status it had ("running"), and where the answer was a refusal, the button came back with
    the keyboard left on the heading. The button now keeps the keyboard, saying
    "Cancelling…" and off, until the answer: a refusal is said (an alert) with the keyboard
    still on it; once the runs have ended, the status says so once and Delete experiment,
    shown in its place, has the keyboard."""
    with cancel_all_page(live_server, request.node.name) as opened:
        page, cancel, asked = opened.browser.page, opened.cancel, opened.asked
        button = page.locator("#cancel-all")
        held = refused_then_held(page, button, cancel, "#action-error", "Cancel all runs")
        assert len(asked) == 2
        assert page.evaluate("window.heard") == []  # nothing said before the answer
        held[0].continue_()

        # The queued run ends at once, the running one within an iteration: until then the
        # keyboard stays on the button.
        expect(page.locator(f'#runs tr[data-run-id="{opened.queued}"] .badge')).to_have_text(
            "cancelled")
        expect(button).to_have_text("Cancelling…")
        expect(button).to_be_focused()
        finish(live_server.database_url, opened.live, opened.running, status="cancelled")
        expect(page.locator("#experiment-status")).to_have_text("cancelled")
        expect(page.locator("#delete-experiment")).to_be_focused()
        assert page.evaluate("window.heard") == ["cancelled"]
        opened.browser.assert_no_errors(expected=("status of 503",))


def test_cancel_run_keeps_the_keyboard_until_the_run_has_ended(live_server, request):
    """Cancel run turned itself off (disabled) once the cancel was asked, which put the
    keyboard on the page's heading before the server had answered, and left it there where
    the answer was a refusal. It now keeps the keyboard, saying "Cancelling…" and off
    (aria-disabled), until the answer: a refusal is said with the keyboard still on it, and a
    second press asks nothing. Once the run has ended, Run again, shown in its place, has
    the keyboard."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url)
    with live_server.client() as client:
        _, (running, _) = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    mark_running(database_url, running)
    with open_browser(request.node.name) as browser:
        page, asked = browser.page, []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
        page.goto(f"{live_server.url}/runs/{running}")
        expect(page.locator("#run-status")).to_have_text("running")
        expect(page.locator("#live-state")).to_have_text("● live")
        page.evaluate(WATCH_LIVE, "#run-status")
        button = page.locator("#cancel")
        held = refused_then_held(page, button, f"**/api/runs/{running}/cancel",
                                 "#cancel-error", "Cancel run")
        assert len(asked) == 2
        held[0].continue_()

        # Asked, the run stops within an iteration: until then the keyboard stays on Cancel.
        page.wait_for_timeout(1_000)
        expect(button).to_have_text("Cancelling…")
        expect(button).to_be_focused()
        assert button.get_attribute("aria-disabled") == "true"
        with session_scope(database_url) as session:
            assert session.get(Run, running).cancel_requested
        finish(database_url, live, running, status="cancelled", step=3)  # where it stopped
        expect(page.locator("#run-status")).to_have_text("cancelled")
        expect(page.locator("#requeue")).to_be_focused()
        assert page.evaluate("window.heard") == ["cancelled"]
        browser.assert_no_errors(expected=("status of 503",))


def test_run_again_pressed_twice_queues_the_run_once_and_says_no_failure(live_server, request):
    """Run again stayed on until the server answered: a double click asked twice, and the
    second ask, refused since the first had queued the run, was said as "Could not run it
    again" under a run that was queued. It now turns off ("Queuing…", aria-disabled, keeping
    the keyboard) until the answer, and comes back after a refusal; once the run is queued,
    Cancel run, shown in its place, has the keyboard."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url)
    with live_server.client() as client:
        _, (failed, _) = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    mark_running(database_url, failed)
    finish(database_url, live, failed, status="failed", step=0)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{failed}")
        expect(page.locator("#run-status")).to_have_text("failed")
        button, requeue = page.locator("#requeue"), f"**/api/runs/{failed}/requeue"
        held = refused_then_held(page, button, requeue, "#cancel-error", "Run again",
                                 busy="Queuing…", refused="Could not run it again")
        held[0].continue_()
        expect(page.locator("#run-status")).to_have_text("queued")
        expect(page.locator("#cancel")).to_be_focused()
        assert page.inner_text("#cancel-error") == ""
        page.unroute(requeue)

        # With the mouse: a double click queues the run once.
        page.on("dialog", lambda dialog: dialog.accept())
        page.locator("#cancel").press("Enter")  # a queued run ends at once
        expect(page.locator("#run-status")).to_have_text("cancelled")
        asked = []
        page.on("request", lambda sent: asked.append(sent.method)
                if sent.url.endswith(f"/api/runs/{failed}/requeue") else None)
        button.dblclick()
        expect(page.locator("#run-status")).to_have_text("queued")
        page.wait_for_timeout(500)
        assert asked == ["POST"]
        assert page.inner_text("#cancel-error") == ""
        browser.assert_no_errors(expected=("status of 503",))


def test_a_cancel_answered_after_the_feed_does_not_bring_an_ended_run_back(live_server, request):
    """The cancel's answer is written while the running run still runs. Where it reached
    the page after the feed had said the run ended, the page drew the run running again:
    Delete experiment hid itself with the keyboard on it, and the status said "running"
    with every run ended. Such an answer now gives way to a read asked after it."""
    with cancel_all_page(live_server, request.node.name) as opened:
        browser, page, cancel = opened.browser, opened.browser.page, opened.cancel
        experiment_id, running, queued = opened.experiment_id, opened.running, opened.queued
        held = []
        page.route(cancel, lambda route: held.append(route))
        page.locator("#cancel-all").focus()
        page.keyboard.press("Enter")
        wait_until_held(page, held)
        answer = held[0].fetch()  # the server cancels now; the page has not heard yet
        assert {run["id"]: run["status"] for run in answer.json()["runs"]} == {
            running: "running", queued: "cancelled"}

        finish(live_server.database_url, opened.live, running, status="cancelled")  # first
        expect(page.locator("#experiment-status")).to_have_text("cancelled")
        expect(page.locator("#delete-experiment")).to_be_focused()
        read_again = re.compile(rf".*/api/experiments/{experiment_id}$")
        with page.expect_response(lambda response: read_again.match(response.url)
                                  and response.request.method == "GET", timeout=10_000):
            held[0].fulfill(response=answer)  # then the cancel's answer arrives
        expect(page.locator(f'#runs tr[data-run-id="{running}"] .badge')).to_have_text(
            "cancelled")
        expect(page.locator("#delete-experiment")).to_be_visible()
        expect(page.locator("#delete-experiment")).to_be_focused()
        assert page.inner_text("#experiment-status") == "cancelled"
        assert page.evaluate("window.heard") == ["cancelled"]
        browser.assert_no_errors()


def hold(page, url: str, method: str) -> list:
    """Requests to `url` by `method` held until the test answers them (others go on)."""
    held = []
    page.route(url, lambda route: held.append(route) if route.request.method == method
               else route.continue_())
    return held


def test_a_refused_delete_leaves_the_keyboard_on_delete(live_server, request):
    """Delete experiment and a dataset's Delete turned themselves off as they were pressed,
    which sent the keyboard to <body>: where the server refused, the refusal was said with
    the keyboard at the top of the page. They now stay where they are, off (aria-disabled)
    and focused, until the answer."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url)
    dataset_id = add_dataset_row(database_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, dataset_id, seeds=[0])
    for run_id in run_ids:
        mark_running(database_url, run_id)
        finish(database_url, live, run_id, status="failed")
    pages = [
        (f"/experiments/{experiment_id}", "#delete-experiment",
         f"/api/experiments/{experiment_id}", "#action-error"),
        (f"/datasets/{dataset_id}", "button[data-delete-url]",
         f"/api/datasets/{dataset_id}", "#delete-error"),
    ]
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("dialog", lambda dialog: dialog.accept())
        for path, selector, api, error in pages:
            page.goto(live_server.url + path)
            held = hold(page, live_server.url + api, "DELETE")
            button = page.locator(selector)
            button.focus()
            page.keyboard.press("Enter")
            wait_until_held(page, held)
            expect(button).to_be_focused()
            assert button.get_attribute("aria-disabled") == "true"
            page.keyboard.press("Enter")  # off: it asks nothing more, sends nothing more
            page.wait_for_timeout(200)
            assert len(held) == 1
            held[0].fulfill(status=503, json={"detail": "the database did not answer"})
            expect(page.locator(error)).to_contain_text("the database did not answer")
            expect(button).to_be_focused()
            assert button.get_attribute("aria-disabled") == "false"
            page.unroute(live_server.url + api)
        browser.assert_no_errors(expected=("status of 503",))
    with live_server.client() as client:  # nothing was deleted
        assert client.get(f"/api/experiments/{experiment_id}").status_code == 200
        assert client.get(f"/api/datasets/{dataset_id}").status_code == 200

# Every XMLHttpRequest the page sends, kept where the test can make its upload progress.
KEEP_REQUESTS = """const send = XMLHttpRequest.prototype.send;
XMLHttpRequest.prototype.send = function (...args) {
    window.sent = this;
    return send.apply(this, args);
};"""
# What the upload form's live regions say, one entry per change (a region emptied says nothing).
WATCH_FORM = """() => {
    window.heard = [];
    for (const node of document.querySelectorAll('#upload-form [aria-live], #upload-form [role]')) {
        new MutationObserver(() => node.textContent && window.heard.push(node.textContent))
            .observe(node, {childList: true, subtree: true, characterData: true});
    }
}"""


def test_an_upload_is_told_in_steps_and_keeps_the_keyboard(live_server, request):
    """The upload's progress text was a live region changed at every progress event (several
    a second): a screen reader read byte counts all through the upload. And Upload (off while
    it runs) and Cancel upload (gone once pressed) left the keyboard on <body>."""
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.add_init_script(KEEP_REQUESTS)
        held = []  # the upload never reaches the server: it stays under way
        page.route("**/api/datasets", lambda route: held.append(route))
        page.goto(f"{live_server.url}/datasets/new")
        page.set_input_files("#file", {"name": "shapes.zip", "mimeType": "application/zip",
                                       "buffer": b"PK" + bytes(100_000)})
        page.evaluate(WATCH_FORM)
        page.focus("#upload-button")
        page.keyboard.press("Enter")
        expect(page.locator("#upload-cancel")).to_be_focused()
        page.evaluate("""async () => { for (let loaded = 1; loaded <= 100; loaded += 1) {
            window.sent.upload.dispatchEvent(new ProgressEvent("progress",
                {lengthComputable: true, loaded: loaded * 1000, total: 100_000}));
            await new Promise((resolve) => setTimeout(resolve));  // one event a task
        } }""")
        expect(page.locator("#progress-text")).to_contain_text("(100 %)")
        heard = page.evaluate("window.heard")
        assert heard == ["Uploading.", "Uploading: 25 %", "Uploading: 50 %", "Uploading: 75 %",
                         "Uploading: 100 %"], heard
        page.keyboard.press("Enter")
        expect(page.locator("#upload-cancelled")).to_be_visible()
        expect(page.locator("#upload-button")).to_be_focused()
        assert page.evaluate("window.heard").pop() == "Upload cancelled: nothing was kept."
        browser.assert_no_errors()


def test_a_skip_link_takes_the_keyboard_past_the_header(live_server, request):
    """Without one, a keyboard went through the header's five links and buttons on every page
    before reaching the page. The skip link is the first stop of Tab, shown only then, and
    Enter moves the keyboard to <main>: the next Tab is the page's first link."""
    with open_browser(request.node.name) as browser:
        page = browser.page
        for path, first_in_main in (("/datasets", "Upload a dataset"), ("/", "Upload a dataset"),
                                    ("/experiments", "Start an experiment")):
            page.goto(live_server.url + path)
            skip = page.get_by_role("link", name="Skip to main content")
            expect(skip).not_to_be_in_viewport()
            page.keyboard.press("Tab")
            expect(skip).to_be_focused()
            expect(skip).to_be_in_viewport(ratio=1)
            page.keyboard.press("Enter")
            expect(page.locator("main")).to_be_focused()
            page.keyboard.press("Tab")
            expect(page.get_by_role("link", name=first_in_main, exact=True)).to_be_focused()
        browser.assert_no_errors()


def test_progress_bars_say_whose_progress_they_show(live_server, request):
    """A run's progress bar, on its page and in its row of the experiment's runs, had no name:
    a screen reader said "progress bar, 25 %" and not of what, nor which run's."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    mark_running(database_url, run_ids[0])
    # Step 5 of 20, recorded and then sent, as the worker does.
    with session_scope(database_url) as session:
        session.get(Run, run_ids[0]).step = 5
    send_events(live, experiment_id, run_ids[0], {"type": "progress", "step": 5, "lr": 0.01})
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_ids[0]}")
        expect(page.get_by_role("progressbar", name="Training progress", exact=True)
               ).to_have_js_property("value", 0.25)
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        for run_id, share in zip(run_ids, (0.25, 0), strict=True):
            bar = page.get_by_role("progressbar", name=f"Training progress of run #{run_id}",
                                   exact=True)
            expect(bar).to_have_js_property("value", share)
        browser.assert_no_errors()


def test_links_to_runs_say_which_run(live_server, request):
    """The runs table's links read "#1", "#2": in a screen reader's list of links, out of the
    table, nothing said which run each one opens. The column still shows "#1"."""
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(live_server.database_url))
        runs = {run["id"]: run for run in client.get(f"/api/experiments/{experiment_id}").json()[
            "runs"]}
    titles = {"fine-tune": "Fine-tuning", "self-tuning": "Self-Tuning"}
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        for run_id in run_ids:
            run = runs[run_id]
            name = (f"Run #{run_id}: {titles[run['method']]}, {run['budget_label']}, "
                    f"seed {run['seed']}")
            link = page.get_by_role("link", name=name, exact=True)
            expect(link).to_have_text(f"#{run_id}")
            expect(link).to_have_attribute("href", f"/runs/{run_id}")
        assert len(run_ids) == 4 and page.get_by_role("link", name="Run #").count() == 4
        browser.assert_no_errors()


def test_thumbnails_are_told_apart_by_their_file_names(live_server, tmp_path, request):
    """Every thumbnail's alt text was its class's name, already the heading above them (or
    "unlabeled"): a screen reader heard "circle, circle, circle…" and nothing that tells one
    image from another. Each is named by its file's name in the archive."""
    archive = make_image_archive(tmp_path / "shapes.zip", classes=("circle", "square"),
                                 train_per_class=3, test_per_class=1, unlabeled=2)
    with live_server.client() as client:
        created = upload(client, archive.read_bytes())
    assert created.status_code == 201, created.text
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/datasets/{created.json()['id']}")
        thumbnails = page.locator("#class-thumbnails, #unlabeled").get_by_role("img")
        expect(thumbnails).to_have_count(8)
        names = [image.get_attribute("alt") for image in thumbnails.all()]
        assert names == [f"{name}_{n:03d}.png" for name in ("circle", "square") for n in range(3)
                         ] + ["u_000.png", "u_001.png"], names
        expect(page.locator("#class-thumbnails h3 + .thumbs").first.get_by_role(
            "img", name="circle_002.png", exact=True)).to_be_visible()
        browser.assert_no_errors()


# After each key in the find box: how many rows the table had, and how often the note spoke.
WATCH_FIND = """() => {
    window.afterKeys = [];
    document.getElementById("per-class-filter").addEventListener("input", () => window.afterKeys
        .push([document.querySelectorAll("#per-class tbody tr").length, window.heard.length]));
}"""


def test_finding_a_class_is_announced_once_typing_pauses(live_server, request):
    """The per-class table's note, a live region, was rewritten at each key typed into "Find
    a class": a screen reader spoke after every letter ("…holds “s”", "…holds “sp”", …). The
    rows still follow each key at once; the note says it once typing pauses."""
    database_url = live_server.database_url
    dataset_id = add_dataset_row(database_url, {f"species {n:02d}": {"train": 4, "test": 5}
                                                for n in range(MANY)})
    with live_server.client() as client:
        _, (run_id,) = start_sweep(client, dataset_id, seeds=[0], methods=["fine-tune"])
    mark_running(database_url, run_id)
    finish(database_url, redis.Redis.from_url(live_server.redis_url), run_id,
           many_class_metrics())
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_id}")
        note = page.locator("#per-class-note")
        expect(note).to_have_text("50 of 60 classes, by test accuracy, lowest first.")
        page.evaluate(WATCH_LIVE, "#per-class-note")
        page.evaluate(WATCH_FIND)
        page.get_by_role("searchbox", name="Find a class").focus()
        page.keyboard.type("species 1")  # as fast as keys come
        found = ("All of the 10 classes whose name holds “species 1”, by test accuracy, lowest "
                 "first.")
        expect(note).to_have_text(found)
        assert page.evaluate("window.heard") == [found]
        # Each key redrew the rows before the note said anything: 60 classes hold "s" (50
        # shown), 10 "species 1".
        after_keys = page.evaluate("window.afterKeys")
        assert after_keys[0] == [50, 0] and after_keys[-1] == [10, 0], after_keys
        assert len(after_keys) == len("species 1")

        # A press of a button (a sort) is said at once, as before.
        page.get_by_role("button", name="Test accuracy", exact=True).click()
        assert page.evaluate("window.heard").pop() == found.replace("lowest", "highest")
        browser.assert_no_errors()


def test_the_best_results_are_marked_in_words_not_by_colour_alone(live_server, request):
    """The results table marked each budget's best method, and the runs table each budget's
    best run, by a cell's colour (and weight) only: a screen reader said nothing of it and a
    colour-blind eye could miss it. A star shows it, and a screen reader hears "best"."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url)
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, add_dataset_row(database_url))  # seeds 0, 1
        ids = runs_by(client, experiment_id)
    top1 = {("self-tuning", 0): 0.9, ("self-tuning", 1): 0.7, ("fine-tune", 0): 0.6,
            ("fine-tune", 1): 0.6}
    for (method, _, seed), run_id in ids.items():
        finish(database_url, live, run_id, {"test_top1": top1[method, seed]})
    best_run = ids["self-tuning", "50%", 0]
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        result = page.locator("#budget-table tbody td")
        expect(result).to_have_count(2)
        self_tuning = result.and_(page.locator('tr[data-method="self-tuning"] td'))
        expect(self_tuning).to_have_accessible_name(re.compile(r"^best: 80\.0 ± \d+\.\d$"))
        star = self_tuning.locator(".best-mark [aria-hidden=true]")  # seen, not heard
        expect(star).to_be_visible()
        expect(star).to_have_text("★")
        expect(result.and_(page.locator('tr[data-method="fine-tune"] td'))
               ).to_have_accessible_name("60.0 ± 0.0")
        for (method, _, seed), run_id in ids.items():
            shown = f"{top1[method, seed] * 100:.1f}%"
            expect(page.locator(f'#runs tr[data-run-id="{run_id}"] td').last
                   ).to_have_accessible_name(f"best: {shown}" if run_id == best_run else shown)
        browser.assert_no_errors()


# Whether anything on the way up from the node is a live region (a screen reader speaks its
# changes).
IN_LIVE_REGION = """(node) => node.closest(
    '[aria-live]:not([aria-live=off]), [role=status], [role=alert], [role=log], [role=marquee]'
) !== null"""


def test_charts_are_named_and_summed_up_as_their_points_arrive(live_server, request):
    """A chart (a canvas) was only a name such as "loss terms over iterations": a screen reader
    learnt nothing of what it showed. Its name now sums it up (how far it goes, each line's
    latest and best value), written anew as points arrive, but not as a live region: it is
    read when the reader reaches the chart, not spoken at each point."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url)
    with live_server.client() as client:
        experiment_id, _ = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        ids = runs_by(client, experiment_id)
    running, ended = ids["self-tuning", "50%", 0], ids["fine-tune", "50%", 0]
    mark_running(database_url, running)
    mark_running(database_url, ended)
    finish(database_url, live, ended, {"test_top1": 0.8, "pseudo_label_quality": quality(8, True)})
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{running}")
        losses = page.get_by_role("img", name=re.compile("^loss terms over iterations"))
        expect(losses).to_have_accessible_name("loss terms over iterations: no points yet.")
        send_events(live, experiment_id, running,
                    *({"type": "progress", "step": step, "lr": 0.01,
                       "losses": {"ce": loss, "pgc": loss / 2}}
                      for step, loss in ((1, 2.0), (2, 1.25), (3, 1.5))),
                    {"type": "eval", "step": 3, "test_top1": 0.25})
        expect(losses).to_have_accessible_name(
            "loss terms over iterations: 2 lines up to iteration 3 of 20. ce: latest 1.5, lowest"
            " 1.25 at iteration 2; pgc: latest 0.75, lowest 0.625 at iteration 2.")
        accuracy = page.get_by_role("img", name=re.compile("^test accuracy over iterations"))
        expect(accuracy).to_have_accessible_name(
            "test accuracy over iterations: 1 line up to iteration 3 of 20. top-1: latest 25.0%.")
        send_events(live, experiment_id, running,
                    {"type": "progress", "step": 4, "lr": 0.005, "losses": {"ce": 1.0}},
                    {"type": "eval", "step": 4, "test_top1": 0.5})
        expect(accuracy).to_have_accessible_name(
            "test accuracy over iterations: 1 line up to iteration 4 of 20. top-1: latest 50.0%,"
            " highest 50.0% at iteration 4.")
        expect(page.get_by_role("img", name=re.compile("^learning rate over iterations"))
               ).to_have_accessible_name("learning rate over iterations: 1 line up to iteration"
                                         " 4 of 20. learning rate: latest 0.005.")
        for canvas in page.locator("canvas").all():
            assert canvas.get_attribute("role") == "img"
            assert not canvas.evaluate(IN_LIVE_REGION)

        # A finished run's pseudo-label quality: bar charts.
        page.goto(f"{live_server.url}/runs/{ended}")
        expect(page.get_by_role("img", name=re.compile("^confidence histogram"))
               ).to_have_accessible_name("confidence histogram: 10 bars. unlabeled images:"
                                         " highest 8 at 0.90, lowest 0 at 0.00.")
        expect(page.get_by_role("img", name=re.compile("^pseudo-label accuracy by"))
               ).to_have_accessible_name("pseudo-label accuracy by confidence: 1 bar."
                                         " pseudo-label accuracy: 75.0% at 0.9–1.0 (8).")

        # The experiment's accuracy against label budget.
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        expect(page.get_by_role("img", name=re.compile("^test accuracy against label budget"))
               ).to_have_accessible_name(re.compile(
                   r"per method: Fine-tuning: highest 80\.0% at 50% \(\d+ labels\), 1 of 1 budget"
                   r" measured; Self-Tuning: no result\. The table below has every value\.$"))
        browser.assert_no_errors()
