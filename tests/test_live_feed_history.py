"""A live feed that has more to replay than one read from Redis returns: a long run (the paper
preset logs thousands of events) watched from the start, or a client reconnecting far behind.
Real uvicorn, Redis and SQLite; the events are written to the stream as the worker writes them."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import threading
import time

import anyio
import pytest
import redis
from playwright.sync_api import expect

from app.db import session_scope
from app.events import Hubs, Outcome, stream_events
from app.live import experiment_stream_key, run_stream_key
from app.models import Run, RunMetric, utcnow
from tests.browser import open_browser, wait_until_held
from tests.support import add_dataset_row
from tests.test_experiments_cancel_delete import SWEEP, end_as_worker, mark_running, start_sweep
from tests.test_lost_runs import sse_events
from tests.test_pages_live import EMULATE_VISIBILITY
from tests.test_run_metrics_pages import CE_POINTS, record

EVENTS = 12_345  # more than two pages of 5,000


def test_a_feed_longer_than_a_page_replays_every_event_in_order(live_server):
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        run_id = run_ids[0]
        with live.pipeline(transaction=False) as pipe:
            for step in range(1, EVENTS + 1):
                event = {"type": "progress", "run_id": run_id, "step": step}
                pipe.xadd(run_stream_key(run_id), {"data": json.dumps(event)})
            pipe.xadd(run_stream_key(run_id), {"data": json.dumps(
                {"type": "end", "run_id": run_id, "status": "succeeded"})})
            pipe.execute()
        with session_scope(database_url) as session:
            run = session.get(Run, run_id)
            run.status, run.finished_at = "succeeded", utcnow()

        replayed = sse_events(client, f"/api/runs/{run_id}/events", within_s=60)
        ids = [entry_id for entry_id, _ in live.xrange(run_stream_key(run_id), count=5)]
        resumed = sse_events(client, f"/api/runs/{run_id}/events", within_s=60,
                             headers={"Last-Event-ID": ids[2]})  # a browser reconnecting
    assert [event["step"] for event in replayed[:-1]] == list(range(1, EVENTS + 1))
    assert replayed[-1]["type"] == "end" and replayed[-1]["status"] == "succeeded"
    assert [event.get("step") for event in resumed[:-1]] == list(range(4, EVENTS + 1))



def test_a_feed_opened_anew_resumes_after_the_event_its_query_names(live_server):
    """A page that let its feed go (hidden) opens a new EventSource, which cannot send
    `Last-Event-ID`: `?last_event_id=` says where it was. The header, which the browser's own
    reconnects send with a later id, wins; an id that is not one reads from the start."""
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id, (run_id, *_) = start_sweep(client, add_dataset_row(database_url),
                                                  seeds=[0])
        for step in range(1, 6):
            live.xadd(run_stream_key(run_id), {"data": json.dumps(
                {"type": "progress", "run_id": run_id, "step": step})})
            live.xadd(experiment_stream_key(experiment_id), {"data": json.dumps(
                {"type": "progress", "run_id": run_id, "step": step})})
        ids = [entry_id for entry_id, _ in live.xrange(run_stream_key(run_id))]
        with session_scope(database_url) as session:
            for run in session.query(Run).filter_by(experiment_id=experiment_id):
                run.status, run.finished_at = "cancelled", utcnow()
        end_as_worker(database_url, live, run_id, "cancelled")

        def steps(path: str, **headers: str) -> list[int | None]:
            return [event.get("step") for event in sse_events(client, path, headers=headers)
                    if event["type"] == "progress"]

        feed = f"/api/runs/{run_id}/events"
        experiment_ids = [i for i, _ in live.xrange(experiment_stream_key(experiment_id))]
        assert steps(f"{feed}?last_event_id={ids[1]}") == [3, 4, 5]
        assert steps(f"{feed}?last_event_id={ids[1]}", **{"Last-Event-ID": ids[3]}) == [5]
        assert steps(f"{feed}?last_event_id=yesterday") == [1, 2, 3, 4, 5]
        assert steps(f"/api/experiments/{experiment_id}/events"
                     f"?last_event_id={experiment_ids[3]}") == [5]



LONG_RUN = 600  # steps of a run whose feed Redis trims to its last TRIMMED_TO events
TRIMMED_TO = 200


def record_long_run(database_url: str, live: redis.Redis, run_id: int,
                    experiment_id: int) -> list[str]:
    """A run that trained LONG_RUN steps, as its worker records and publishes it (to its
    experiment's feed too): a progress point each step and an eval every 50 up to step 300;
    then Redis trims its stream to the newest TRIMMED_TO events (progress 401-600) and it
    ends. Returns its stream's ids before the trim, one per event."""
    events = [{"type": "status", "status": "running", "step": 0},
              {"type": "started", "step": 0, "resumed_from_step": None}]
    with session_scope(database_url) as session:
        for step in range(1, LONG_RUN + 1):
            kinds = ["progress"] + (["eval"] if step % 50 == 0 and step <= 300 else [])
            for kind in kinds:
                values = {"lr": 0.01} if kind == "progress" else {"test_top1": step / 1000}
                session.add(RunMetric(run_id=run_id, kind=kind, step=step, values=values))
                events.append({"type": kind, "step": step, **values})
    with live.pipeline(transaction=False) as pipe:
        for event in events:
            data = {"data": json.dumps(
                {"run_id": run_id, "time": time.time(), "total_steps": LONG_RUN, **event})}
            pipe.xadd(run_stream_key(run_id), data)
            pipe.xadd(experiment_stream_key(experiment_id), data)
        ids = pipe.execute()[::2]
    live.xtrim(run_stream_key(run_id), maxlen=TRIMMED_TO, approximate=False)
    end_as_worker(database_url, live, run_id, "succeeded")
    return ids


def test_a_feed_that_would_skip_events_redis_trimmed_says_so_first(live_server):
    """Redis keeps a run's newest events only (SELFTUNE_EVENT_STREAM_MAXLEN): a long run's
    feed read from the start began where the stream did (at progress step 7,036 in the
    audit), and one resumed with the id of an event trimmed since went on at the oldest
    kept, neither saying that events were missing. A `dropped` event now says so first,
    and where the whole story is."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(
            client, add_dataset_row(database_url), seeds=[0],
            overrides={**SWEEP["overrides"], "iterations": LONG_RUN})
        for run_id in run_ids:
            ids = record_long_run(database_url, live, run_id, experiment_id)
        oldest_kept = live.xrange(run_stream_key(run_id), count=1)[0][0]
        from_start = sse_events(client, f"/api/runs/{run_id}/events", within_s=60)
        seen = ids[100]  # a client that had read this far
        resumed = sse_events(client, f"/api/runs/{run_id}/events", within_s=60,
                             headers={"Last-Event-ID": seen})
        untrimmed = sse_events(client, f"/api/runs/{run_id}/events", within_s=60,
                               headers={"Last-Event-ID": oldest_kept})
        shared = experiment_stream_key(experiment_id)  # its experiment's, trimmed too
        seen_there = live.xrange(shared, count=101)[-1][0]
        live.xtrim(shared, maxlen=100, approximate=False)  # the last run's last events
        oldest_there = live.xrange(shared, count=1)[0][0]
        resumed_experiment = sse_events(client, f"/api/experiments/{experiment_id}/events",
                                        headers={"Last-Event-ID": seen_there})
    read = f"/api/runs/{run_id}/metrics"
    assert from_start[0] == {"type": "dropped", "after": "0", "until": oldest_kept,
                             "read": read}
    assert resumed[0] == {"type": "dropped", "after": seen, "until": oldest_kept, "read": read}
    for events in (from_start, resumed):
        assert events[1]["step"] == 401 and events[-1]["type"] == "end"
        assert len(events) == 1 + TRIMMED_TO + 1
    assert untrimmed[0]["type"] == "progress" and untrimmed[0]["step"] == 402  # none missed
    assert resumed_experiment[0] == {"type": "dropped", "after": seen_there,
                                     "until": oldest_there,
                                     "read": f"/api/experiments/{experiment_id}"}
    assert [e["step"] for e in resumed_experiment[1:-2]] == list(range(502, 601))
    assert [e["type"] for e in resumed_experiment[-2:]] == ["end", "experiment_end"]


def train(database_url: str, live: redis.Redis, run_id: int, steps: range) -> None:
    """A progress point at each of `steps`, recorded, then sent to the run's feed, as its
    worker does."""
    record(database_url, run_id, "progress", steps)
    with live.pipeline(transaction=False) as pipe:
        for step in steps:
            pipe.xadd(run_stream_key(run_id), {"data": json.dumps({
                "type": "progress", "run_id": run_id, "time": time.time(), "step": step,
                "total_steps": 1000, "losses": {"ce": 1 / step}, "lr": 0.01})})
        pipe.execute()


def running_run(database_url: str, client) -> int:
    _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    mark_running(database_url, run_ids[0])
    return run_ids[0]


@pytest.mark.browser
def test_a_run_page_shown_after_redis_trimmed_what_it_had_not_read_reads_it(live_server,
                                                                           request):
    """A page opened in a background tab reads the record at once and opens its feed when
    first shown. Shown after the run trained on past what Redis keeps, its feed, read from the
    start, begins with `dropped` (after 0), which the page took for the one of a page just
    opened, whose first read of the record is to come: steps 301-400 were neither in its
    record nor in its feed, and never drawn. It reads the record on from where it had it."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        run_id = running_run(database_url, client)
    train(database_url, live, run_id, range(1, 301))
    pages = []
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("request", lambda r: pages.append(r.url.removeprefix(live_server.url))
                if "/metrics" in r.url else None)
        page.context.add_init_script(
            EMULATE_VISIBILITY.replace("let hidden = false", "let hidden = true"))
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_function(f"({CE_POINTS})() === 300")
        train(database_url, live, run_id, range(301, 601))
        live.xtrim(run_stream_key(run_id), maxlen=200, approximate=False)  # 401-600 kept
        page.evaluate("window.setShown(true)")
        expect(page.locator("#live-state")).to_have_text("● live")
        page.wait_for_function(f"({CE_POINTS})() === 600")
        browser.assert_no_errors()
    first = f"/api/runs/{run_id}/metrics?limit=5000"
    assert pages == [first, f"{first}&after=300:0"]


@pytest.mark.browser
def test_a_run_page_back_after_redis_trimmed_what_it_missed_reads_it_from_the_record(
        live_server, request, tmp_path):
    """The server restarts while the run trains on past what Redis keeps of its feed: the
    page's feed comes back with the id of the last event it had, older than any Redis keeps,
    and begins with `dropped`, then steps 401-600. The page reads the record on from the last
    step it had read (not again from its first page), and ends with every point."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        run_id = running_run(database_url, client)
    train(database_url, live, run_id, range(1, 301))
    last_had = live.xrevrange(run_stream_key(run_id), count=1)[0][0]  # step 300's
    feeds: list[tuple[str, str | None]] = []  # each feed asked for: its address, its header
    pages = []

    def sent(req) -> None:
        path = req.url.removeprefix(live_server.url)
        if "/metrics" in path:
            pages.append(path)
        elif "/events" in path:  # the header the browser adds is in all_headers() only
            feeds.append((path, req.all_headers().get("last-event-id")))

    restarted = None
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("request", sent)
        try:
            page.goto(f"{live_server.url}/runs/{run_id}")
            page.wait_for_function(f"({CE_POINTS})() === 300")  # from the record ...
            expect(page.locator("#live-state")).to_have_text("● live")
            # ... and the feed from after the last event before the page read the run.
            assert feeds == [(f"/api/runs/{run_id}/events?last_event_id={last_had}", None)]
            live_server.process.stop()  # the feed ends ...
            expect(page.locator("#live-state")).to_have_text("reconnecting…")
            train(database_url, live, run_id, range(301, 601))
            live.xtrim(run_stream_key(run_id), maxlen=200, approximate=False)  # 401-600 kept
            restarted = live_server.restart(tmp_path / "uvicorn-restarted.log")
            expect(page.locator("#live-state")).to_have_text("● live", timeout=30_000)
            page.wait_for_function(f"({CE_POINTS})() === 600")
            browser.assert_no_errors(expected=("ERR_CONNECTION_REFUSED",
                                               "ERR_INCOMPLETE_CHUNKED_ENCODING"))
        finally:
            if restarted is not None:
                restarted.stop()
    path, header = feeds[-1]  # ... and comes back after the last event it had
    assert header == last_had or path.endswith(f"last_event_id={last_had}"), feeds
    first = f"/api/runs/{run_id}/metrics?limit=5000"
    assert pages[:2] == [first, f"{first}&after=300:0"], pages
    assert all(later == f"{first}&after=600:0" for later in pages[2:]), pages


def test_a_redis_that_does_not_count_added_entries_takes_a_stream_at_its_cap_as_trimmed(
        redis_url):
    """Redis 6.2 (the embedded one of `make run`) does not say how many entries a stream
    ever had, only how many it keeps: a stream at its cap (SELFTUNE_EVENT_STREAM_MAXLEN) may
    have lost its oldest, one below it has lost none."""
    from app.events import _trimmed_after

    live = redis.Redis.from_url(redis_url, decode_responses=True)
    key = "selftune:test:redis-6"
    live.delete(key)
    for step in range(10):
        live.xadd(key, {"data": json.dumps({"type": "progress", "step": step})}, maxlen=5,
                  approximate=False)

    async def trimmed() -> list[bool]:
        hubs = Hubs(redis_url)
        real = hubs.client.xinfo_stream

        async def as_redis_6(name: str) -> dict:
            info = await real(name)
            return {field: value for field, value in info.items() if field not in (
                "max-deleted-entry-id", "entries-added", "recorded-first-entry-id")}

        hubs.client.xinfo_stream = as_redis_6
        try:
            return [await _trimmed_after(hubs, key, "0", maxlen) for maxlen in (5, 6, None)]
        finally:
            await hubs.close()

    try:
        assert asyncio.run(trimmed()) == [True, False, False]
    finally:
        live.delete(key)


@pytest.mark.slow
def test_a_feed_whose_run_is_deleted_while_watched_ends_cleanly(live_server):
    """The run's row goes while its feed waits for news (a delete straight after the run
    ended, before the page closed its feed): the feed ends, it does not break off."""
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        run_id = run_ids[0]
        watched: list = []

        def watch() -> None:
            try:
                watched.append(sse_events(client, f"/api/runs/{run_id}/events", within_s=40))
            except Exception as exc:  # noqa: BLE001 - the assertion below names it
                watched.append(exc)

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(1.0)  # the feed is open and waiting on the queued run
        with session_scope(database_url) as session:
            session.delete(session.get(Run, run_id))
        watcher.join(timeout=60)
    assert watched == [[]]


@pytest.mark.slow
@pytest.mark.browser
def test_a_run_page_says_so_when_its_run_is_deleted_elsewhere(live_server, request):
    database_url = live_server.database_url
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    run_id = run_ids[0]
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/runs/{run_id}")
        expect(page.locator("#live-state")).to_have_text("● live")
        expect(page.locator("#cancel")).to_be_visible()
        with session_scope(database_url) as session:  # a worker took it to its last step
            run = session.get(Run, run_id)
            run.status, run.step, run.images_per_s = "running", run.total_steps, 50.0
        # No time left to count: the final evaluation and the export are under way.
        expect(page.locator("#eta")).to_have_text(
            "finishing: final evaluation and export (past cancelling: it ends when it is "
            "done)", timeout=15_000)
        expect(page.locator("#cancel")).to_be_hidden()
        with session_scope(database_url) as session:  # another tab deleted it
            session.delete(session.get(Run, run_id))
        expect(page.locator("#run-error")).to_have_text(
            f"Run #{run_id} no longer exists: its experiment was deleted.", timeout=15_000)
        expect(page.locator("#run-status")).to_have_text("deleted")
        expect(page.locator("#cancel")).to_be_hidden()
        expect(page.locator("#live-state")).to_have_text("")
        browser.screenshot("deleted")
        browser.assert_no_errors(expected=("404",))


@pytest.mark.browser
def test_a_cancel_answered_after_the_feed_leaves_the_run_page_ended(live_server, request):
    """The cancel's answer is written while the run still runs. Where it reached the run page
    after the feed had said the run ended, the page showed the run running again, with
    "Cancelling…", and nothing (the feed and the polling stop at the end) corrected it. Such
    an answer now gives way to a read asked after it."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url)
    with live_server.client() as client:
        _, (run_id, _) = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    mark_running(database_url, run_id)
    cancel = f"{live_server.url}/api/runs/{run_id}/cancel"
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{live_server.url}/runs/{run_id}")
        expect(page.locator("#live-state")).to_have_text("● live")
        held = []
        page.route(cancel, lambda route: held.append(route))
        page.click("#cancel")
        wait_until_held(page, held)
        answer = held[0].fetch()  # the server asks the run to stop; the page has not heard
        assert answer.json()["status"] == "running" and answer.json()["cancel_requested"]

        end_as_worker(database_url, live, run_id, "cancelled")  # the feed says it first
        expect(page.locator("#run-status")).to_have_text("cancelled")
        expect(page.locator("#requeue")).to_be_visible()
        with page.expect_response(cancel):
            held[0].fulfill(response=answer)  # then the cancel's answer arrives
        # Two frames on, the page has taken the answer in (its handler runs as it arrives).
        page.evaluate("new Promise((done) => requestAnimationFrame(() => "
                      "requestAnimationFrame(done)))")
        expect(page.locator("#run-status")).to_have_text("cancelled")
        expect(page.locator("#cancel")).to_be_hidden()
        expect(page.locator("#requeue")).to_be_visible()
        browser.assert_no_errors()


@pytest.mark.browser
def test_an_experiment_page_says_so_when_it_was_deleted_in_another_tab(live_server, request):
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        for run_id in run_ids:
            end_as_worker(database_url, live, run_id, "failed")
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        expect(page.locator("#delete-experiment")).to_be_visible()
        with live_server.client() as client:
            assert client.delete(f"/api/experiments/{experiment_id}").status_code == 204
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete-experiment")
        expect(page.locator("#action-error")).to_have_text(
            f"Experiment #{experiment_id} no longer exists: it was deleted.")
        expect(page.locator("#experiment-status")).to_have_text("deleted")
        expect(page.locator("#delete-experiment")).to_be_hidden()
        browser.screenshot("deleted")
        browser.assert_no_errors(expected=("404",))


def test_an_event_that_arrives_while_the_feed_asks_the_database_is_sent_at_once(redis_url):
    """The feed checks the database when it has nothing to send; an event the hub reads
    meanwhile must go out then, not after the next heartbeat (10 s by default)."""
    live = redis.Redis.from_url(redis_url, decode_responses=True)
    key = "selftune:test:feed-during-check"
    live.delete(key)
    checks = []

    def outcome() -> Outcome:
        checks.append(time.monotonic())
        if len(checks) == 1:
            live.xadd(key, {"data": json.dumps({"type": "progress", "step": 1})})
            time.sleep(0.5)  # the hub reads the entry while the feed waits on this answer
        return Outcome(False)

    async def first_event_after() -> float:
        hubs = Hubs(redis_url)
        frames = stream_events(hubs, key, "0", outcome=outcome, heartbeat_s=30)
        try:
            assert await anext(frames) == "retry: 2000\n\n"
            frame = await asyncio.wait_for(anext(frames), timeout=60)
            assert '"step":1' in frame.replace(" ", "")
            return time.monotonic() - checks[0]
        finally:
            await frames.aclose()
            await hubs.close()

    assert asyncio.run(first_event_after()) < 5
    live.delete(key)


def test_a_client_gone_at_the_first_frame_leaves_no_subscription_behind(redis_url):
    """The first frame went out before the part that unsubscribes on the way out: a client
    gone then left the stream's reader running for good, with its Redis connection and up
    to 5,000 buffered entries."""
    key = "selftune:test:gone-at-once"

    async def leave_at_the_first_frame() -> dict:
        hubs = Hubs(redis_url)
        frames = stream_events(hubs, key, "0", outcome=lambda: Outcome(False), heartbeat_s=30)
        try:
            assert await anext(frames) == "retry: 2000\n\n"
            assert key in hubs.hubs
            await frames.aclose()
            return dict(hubs.hubs)
        finally:
            await hubs.close()

    assert asyncio.run(leave_at_the_first_frame()) == {}


def test_a_replay_of_many_ended_runs_asks_the_database_once_not_at_each_end(redis_url):
    """An experiment's feed holds an end per run. Replaying one still in progress asked the
    database at every end, each time for every run: 393 s before the first event at 60 runs
    of 1,000 classes. The history arrives as one batch and is asked about once."""
    live = redis.Redis.from_url(redis_url, decode_responses=True)
    key = "selftune:test:many-ends"
    live.delete(key)
    for run_id in range(1, 61):
        live.xadd(key, {"data": json.dumps({"type": "progress", "run_id": run_id, "step": 1})})
        live.xadd(key, {"data": json.dumps({"type": "end", "run_id": run_id})})
    checks = []

    def outcome() -> Outcome:
        checks.append(time.monotonic())
        return Outcome(False)  # one run is still to come

    async def replay() -> str:
        hubs = Hubs(redis_url)
        frames = stream_events(hubs, key, "0", outcome=outcome, heartbeat_s=30)
        try:
            assert await anext(frames) == "retry: 2000\n\n"
            return await asyncio.wait_for(anext(frames), timeout=60)
        finally:
            await frames.aclose()
            await hubs.close()

    history = asyncio.run(replay())
    live.delete(key)
    assert history.count('"type": "end"') + history.count('"type":"end"') == 60
    assert len(checks) == 1


def test_a_quiet_feed_stays_healthy_and_delivers_at_once(redis_url: str):
    """The hub's XREAD blocks 5 s; redis-py's async client timed out reads at 5 s too, so
    every quiet feed logged "Redis unavailable", sent "live feed unavailable" instead of
    heartbeats and paused a second before the next event."""
    live = redis.Redis.from_url(redis_url, decode_responses=True)
    key = "selftune:test:quiet-feed"
    live.delete(key)

    async def watch() -> tuple[bool, float]:
        hubs = Hubs(redis_url)
        try:
            hub = await hubs.subscribe(key)
            await asyncio.sleep(7)  # longer than one blocking read
            healthy = hub.healthy
            sent = time.monotonic()
            live.xadd(key, {"data": json.dumps({"type": "progress", "step": 1})})
            while not hub.after("0-0"):
                await asyncio.sleep(0.02)
            return healthy, time.monotonic() - sent
        finally:
            await hubs.close()

    healthy, delay = asyncio.run(watch())
    live.delete(key)
    assert healthy
    assert delay < 0.5


def test_a_finished_experiments_feed_replays_every_run_to_its_end(live_server):
    """An experiment's feed holds one end per run, and a requeued run's feed the end of its
    earlier try: the replay stopped at the first of them. The run's feed sends that earlier
    one as `earlier_end`: `end` is its last event, as documented (a script that stopped at
    `end` reported a run that then succeeded as cancelled)."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
        first, second = run_ids
        end_as_worker(database_url, live, first, "cancelled")
        assert client.post(f"/api/runs/{first}/requeue").status_code == 200
        for run_id in run_ids:
            end_as_worker(database_url, live, run_id, "failed")
        run_feed = sse_events(client, f"/api/runs/{first}/events")
        experiment_feed = sse_events(client, f"/api/experiments/{experiment_id}/events")
    assert [(e["type"], e["status"]) for e in run_feed if e["type"].endswith("end")] == [
        ("earlier_end", "cancelled"), ("end", "failed")]
    assert run_feed[-1]["type"] == "end"
    after = run_feed[[e["type"] for e in run_feed].index("earlier_end") + 1]
    assert (after["type"], after["status"]) == ("status", "queued")  # the run again
    ends = [(e["run_id"], e["status"]) for e in experiment_feed if e["type"] == "end"]
    assert ends == [(first, "cancelled"), (first, "failed"), (second, "failed")]
    assert experiment_feed[-1]["type"] == "experiment_end"


def test_open_feeds_end_at_once_when_the_server_is_stopped(live_server):
    """A stopping server kept every open feed until its graceful-shutdown time ran out (the
    launcher's 3 s; without one, for ever), then cut them with a CancelledError traceback
    each in the log. Now the feeds end cleanly and the server exits."""
    with live_server.client() as client:
        experiment_id, (run_id, _) = start_sweep(client, add_dataset_row(live_server.database_url),
                                                 seeds=[0])
    ended = {}

    def follow(path: str) -> None:
        with live_server.client() as client, client.stream("GET", path) as response:
            ended[path] = [line for line in response.iter_lines() if line.startswith("retry")]

    paths = [f"/api/runs/{run_id}/events", f"/api/experiments/{experiment_id}/events"]
    readers = [threading.Thread(target=follow, args=(path,)) for path in paths]
    for reader in readers:
        reader.start()
    time.sleep(2)  # both feeds are open and waiting: their queued runs say nothing
    assert not ended
    live_server.process.popen.send_signal(signal.SIGTERM)  # SIGINT takes the same path
    # It exits by itself (uvicorn then raises the signal again: it ends as the signal says).
    live_server.process.popen.wait(timeout=30)
    for reader in readers:
        reader.join(timeout=10)
    assert ended == {path: ["retry: 2000"] for path in paths}  # read to their end, no error
    log = live_server.process.log()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]


def test_a_feed_cancelled_while_another_opens_leaves_no_reader_behind(redis_url):
    """A browser gone while another feed opened a quiet stream: Starlette cancels the feed at
    every wait until it ends, and its way out waited for the lock that the opening feed held
    across a Redis read. Cancelled there, it left its stream's reader running for good, one
    Redis connection each: after about 1,200 feeds opened and dropped the web's pool of 100
    was taken, and no feed got an event."""
    left, opening = "selftune:test:feed-left", "selftune:test:feed-opening"

    async def scenario() -> set[str]:
        hubs = Hubs(redis_url)
        real = hubs.client.xrevrange

        async def slow_for_one(key, count):  # a Redis slow to answer the opening feed
            if key == opening:
                await asyncio.sleep(1.0)
            return await real(key, count=count)

        hubs.client.xrevrange = slow_for_one
        frames = stream_events(hubs, left, "0", outcome=lambda: Outcome(False), heartbeat_s=30)
        scopes = []

        async def watch() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                async for _ in frames:
                    pass

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch)
                await asyncio.sleep(0.3)  # the feed waits for entries
                group.start_soon(hubs.subscribe, opening)
                await asyncio.sleep(0.2)  # the opening feed holds the lock
                scopes[0].cancel()  # the browser goes, as Starlette cancels its response
            return set(hubs.hubs)
        finally:
            await hubs.close()

    assert asyncio.run(scenario()) == {opening}


def test_readers_of_feeds_that_end_at_once_stop(redis_url):
    """A finished run's feed ends a moment after it opens, as its stream's reader sends its
    first read: the reader's cancel was lost there (Python 3.11's `asyncio.wait_for`, which
    redis-py sends commands through, drops a cancel that lands as it completes), and it read
    on for good. Each feed of a finished run left one more: the pool's 100 connections were
    taken after about 2,000 feeds."""
    key = "selftune:test:ends-at-once"
    live = redis.Redis.from_url(redis_url, decode_responses=True)
    live.delete(key)
    live.xadd(key, {"data": json.dumps({"type": "end"})})

    async def open_and_leave() -> list[asyncio.Task]:
        hubs = Hubs(redis_url)
        readers = []
        try:
            for attempt in range(60):
                hub = await hubs.subscribe(key)
                readers.append(hub.task)
                await asyncio.sleep((attempt % 6) / 2000)  # 0-2.5 ms: as the first read goes
                hubs.unsubscribe(hub)
            await asyncio.wait(readers, timeout=8)  # a lost cancel: stopped after one read
            return [reader for reader in readers if not reader.done()]
        finally:
            await hubs.close()

    assert asyncio.run(open_and_leave()) == []
    live.delete(key)


def blocked_readers(live: redis.Redis, database: int) -> int:
    """Connections of this Redis database waiting in XREAD: the web's stream readers."""
    return sum(1 for client in live.client_list()
               if int(client["db"]) == database and client["cmd"] == "xread"
               and "b" in client["flags"])


def test_feeds_dropped_together_leave_no_reader_behind(live_server):
    """Real uvicorn and Redis: browsers opening and dropping feeds of several runs at once,
    as tabs opened and closed, left some streams' readers running with no one to read to
    (5 bursts of 10 left 5 in a soak, seen from Redis's client list)."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database = live.connection_pool.connection_kwargs.get("db", 0)
    with live_server.client() as client:
        _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0, 1, 2, 3])
    host, port = live_server.url.removeprefix("http://").split(":")
    rng = random.Random(0)

    def open_and_drop(run_id: int, after_s: float, for_s: float) -> None:
        time.sleep(after_s)
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(f"GET /api/runs/{run_id}/events HTTP/1.1\r\nHost: {host}\r\n"
                               "Accept: text/event-stream\r\n\r\n".encode())
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(for_s)  # then the browser goes, without a word

    for _ in range(3):
        threads = [threading.Thread(target=open_and_drop, args=(
            rng.choice(run_ids), rng.uniform(0, 0.3), rng.uniform(0, 0.3))) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    # A reader whose feeds are all gone stops at once; one left behind reads on.
    time.sleep(7)  # longer than one blocking read
    assert blocked_readers(live, database) == 0
    events = []
    with live_server.client() as client, client.stream(
            "GET", f"/api/runs/{run_ids[0]}/events") as response:
        live.xadd(run_stream_key(run_ids[0]), {"data": json.dumps(
            {"type": "progress", "run_id": run_ids[0], "step": 1})})
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                break
    assert events and events[0]["step"] == 1


def test_a_hundred_watched_streams_do_not_starve_the_next_feed(redis_url):
    """Each watched stream's reader holds a connection of the feeds' pool in XREAD, and
    redis-py's default pool holds 100: with 100 runs' pages open at once the next run's page
    got no event, only ': live feed unavailable' ("Too many connections")."""
    keys = [f"selftune:test:pool:{index}" for index in range(101)]
    live = redis.Redis.from_url(redis_url, decode_responses=True)
    live.delete(*keys)

    async def scenario() -> list[str]:
        hubs = Hubs(redis_url)
        held = [await hubs.subscribe(key) for key in keys[:100]]
        await asyncio.sleep(1.0)  # every reader blocks in XREAD
        frames: list[str] = []

        async def follow() -> None:
            async for frame in stream_events(hubs, keys[100], "0",
                                             outcome=lambda: Outcome(False), heartbeat_s=1.0):
                frames.append(frame)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.5)
        for step in range(3):
            live.xadd(keys[100], {"data": json.dumps({"type": "progress", "step": step})})
            await asyncio.sleep(0.3)
        await asyncio.sleep(2.0)
        task.cancel()
        for hub in held:
            hubs.unsubscribe(hub)
        await hubs.close()
        return frames

    try:
        frames = asyncio.run(scenario())
    finally:
        live.delete(*keys)
    assert len([frame for frame in frames if frame.startswith("id:")]) == 3, frames


def test_a_feed_asking_the_database_as_the_server_stops_ends_at_once(redis_url):
    """Hubs.stop wakes the feeds waiting on a hub at that moment: a feed asking the database
    then (its outcome, in a thread) went on to wait a whole heartbeat before it saw the stop,
    holding up the server's shutdown."""
    key = "selftune:test:stop-race"
    live = redis.Redis.from_url(redis_url, decode_responses=True)
    live.delete(key)
    live.xadd(key, {"data": json.dumps({"type": "progress", "step": 1})})

    async def scenario() -> float:
        hubs = Hubs(redis_url)
        asking = asyncio.Event()
        loop = asyncio.get_running_loop()

        def outcome() -> Outcome:
            loop.call_soon_threadsafe(asking.set)
            time.sleep(0.3)  # a busy database
            return Outcome(False)

        async def follow() -> None:
            async for _ in stream_events(hubs, key, "0", outcome=outcome, heartbeat_s=10.0):
                pass

        task = asyncio.create_task(follow())
        await asyncio.wait_for(asking.wait(), 5)
        stopped = time.monotonic()
        await hubs.stop()
        await asyncio.wait_for(task, 30)
        await hubs.close()
        return time.monotonic() - stopped

    try:
        assert asyncio.run(scenario()) < 2.0
    finally:
        live.delete(key)
