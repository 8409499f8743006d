"""A run's record read a page at a time (`/api/runs/{id}/metrics?limit=...`): a paper-length
run holds 110,000 points, 23 MB in one answer, which the run page waited for before it drew
a line. Real uvicorn and Redis, SQLite and PostgreSQL; the points are written as the worker
writes them, without training."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from playwright.sync_api import expect
from sqlalchemy import event, insert, select

from app.db import session_scope
from app.events import sse
from app.live import ended, experiment_stream_key, run_stream_key, timestamp
from app.main import create_app
from app.models import Experiment, Run, RunMetric, utcnow
from app.routers.runs import FEED_PAGE
from tests.browser import open_browser
from tests.support import LiveServer, add_dataset_row
from tests.test_datasets_support import dataset_server
from tests.test_experiments_cancel_delete import end_as_worker, start_sweep

STEPS = 600
EVAL_EVERY = 50
PAGE_CAP = 10_000


@pytest.fixture
def metrics_server(database_url: str, tmp_path: Path, redis_url: str) -> Iterator[LiveServer]:
    """uvicorn on SQLite, then on PostgreSQL (the row-value cursor is SQL on both)."""
    with dataset_server(tmp_path, redis_url, database_url=database_url) as live:
        yield live


def new_run(client: httpx.Client, database_url: str) -> int:
    _, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0],
                             methods=["fine-tune"])
    return run_ids[0]


def record(database_url: str, run_id: int, kind: str, steps: range) -> None:
    """Points of one kind, written in one go as a worker writes them one at a time."""
    rows = [{"run_id": run_id, "kind": kind, "step": step, "created_at": utcnow(),
             "values": ({"losses": {"ce": 1 / step}, "lr": 0.01} if kind == "progress"
                        else {"test_top1": step / 1000})} for step in steps]
    with session_scope(database_url) as session:
        session.execute(insert(RunMetric), rows)


def record_run(database_url: str, run_id: int) -> None:
    """A progress point each step, then an eval every EVAL_EVERY steps recorded after them
    all: ids do not follow steps, so a page that went by id would come out of order."""
    record(database_url, run_id, "progress", range(1, STEPS + 1))
    record(database_url, run_id, "eval", range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))


def read_pages(client: httpx.Client, first: str) -> list[dict]:
    """Each page's body, following `next` from `first` until it is null."""
    pages, url = [], first
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        url = pages[-1]["next"]
        # The same address in a Link header, as the other lists give theirs.
        assert response.headers.get("link") == (None if url is None else f'<{url}>; rel="next"')
    return pages


def test_pages_put_together_are_the_whole_record_in_its_order(metrics_server):
    server = metrics_server
    with server.client() as client:
        run_id = new_run(client, server.database_url)
        record_run(server.database_url, run_id)
        read = f"/api/runs/{run_id}/metrics"
        whole = client.get(read).json()
        # Without a paging parameter the answer is what it always was: every point, no `next`.
        assert list(whole) == ["run_id", "points"] and whole["run_id"] == run_id
        assert len(whole["points"]) == STEPS + STEPS // EVAL_EVERY
        assert whole["points"][:3] == [
            {"step": 1, "kind": "progress", "values": {"losses": {"ce": 1.0}, "lr": 0.01}},
            {"step": 2, "kind": "progress", "values": {"losses": {"ce": 0.5}, "lr": 0.01}},
            {"step": 3, "kind": "progress", "values": {"losses": {"ce": 1 / 3}, "lr": 0.01}}]
        assert [(p["step"], p["kind"]) for p in whole["points"][49:52]] == [
            (50, "progress"), (50, "eval"), (51, "progress")]

        # 7 splits steps that hold two points; 612 and 613 are the whole record in one page.
        for limit in (7, 50, 612, 613, PAGE_CAP):
            pages = read_pages(client, f"{read}?limit={limit}")
            assert [point for page in pages for point in page["points"]] == whole["points"]
            assert len(pages) == -(-len(whole["points"]) // limit)  # no empty last page
            assert all(len(page["points"]) == limit for page in pages[:-1])
            assert all(page["run_id"] == run_id for page in pages)
            first = pages[0]["next"]
            assert first is None or re.fullmatch(
                rf"/api/runs/{run_id}/metrics\?limit={limit}&after=\d+:\d+", first)

        # `after` alone reads on from there, a page of the cap at most.
        cursor = read_pages(client, f"{read}?limit=50")[0]["next"].split("after=")[1]
        rest = client.get(read, params={"after": cursor}).json()
        assert rest["points"] == whole["points"][50:] and rest["next"] is None
        # `<step>:0` starts at a step's first point: what a client that has read the record
        # up to step 50 asks for later (the run page, at a resync).
        from_step = client.get(read, params={"after": "50:0", "limit": 10}).json()
        assert from_step["points"] == whole["points"][49:59]
        assert "&after=58:" in from_step["next"]
        # A run without points has one empty page; a run that does not exist is a 404.
        empty = new_run(client, server.database_url)
        assert client.get(f"/api/runs/{empty}/metrics", params={"limit": 10}).json() == {
            "run_id": empty, "points": [], "next": None}
        missing = client.get("/api/runs/424242/metrics", params={"limit": 10})
        assert missing.status_code == 404


def test_a_point_recorded_between_two_pages_comes_in_a_later_one(metrics_server):
    """The cursor is the last point's (step, id): a training run records at higher steps
    only (a resumed one keeps the points of the steps it repeats, as they were first
    recorded), and its new points come after it."""
    database_url = metrics_server.database_url
    with metrics_server.client() as client:
        run_id = new_run(client, database_url)
        record(database_url, run_id, "progress", range(1, 101))
        first = client.get(f"/api/runs/{run_id}/metrics", params={"limit": 40}).json()
        assert [p["step"] for p in first["points"]] == list(range(1, 41))

        record(database_url, run_id, "progress", range(101, 120))
        record(database_url, run_id, "eval", range(119, 120))
        with session_scope(database_url) as session:  # a point read already, written again
            point = session.scalar(select(RunMetric).where(
                RunMetric.run_id == run_id, RunMetric.step == 5))
            point.values = {"losses": {"ce": 9.0}, "lr": 0.01}

        later = read_pages(client, first["next"])
        assert len(later) == 2  # 80 points: 40, 40, and the last says so
        read = first["points"] + [p for page in later for p in page["points"]]
        whole = client.get(f"/api/runs/{run_id}/metrics").json()["points"]
    assert [(p["step"], p["kind"]) for p in read] == [(p["step"], p["kind"]) for p in whole]
    assert read[-2:] == whole[-2:] and read[-1] == {
        "step": 119, "kind": "eval", "values": {"test_top1": 0.119}}
    assert read[4]["values"]["losses"]["ce"] == 0.2  # as it was when its page was read
    assert [p for p in read if p["step"] != 5] == [p for p in whole if p["step"] != 5]


REFUSED = [  # (query, the parameter refused, what its message says)
    ({"limit": 0}, "limit", "greater than or equal to 1"),
    ({"limit": -5}, "limit", "greater than or equal to 1"),
    ({"limit": "ten"}, "limit", 'must be a whole number, not "ten"'),
    ({"limit": ""}, "limit", 'must be a whole number, not ""'),
    ({"limit": PAGE_CAP + 1}, "limit", f"less than or equal to {PAGE_CAP}"),
    ({"limit": 10**30}, "limit", f"less than or equal to {PAGE_CAP}"),
    ({"after": "abc"}, "after", "`next`"),
    ({"after": ""}, "after", "`next`"),
    ({"after": "12"}, "after", "`next`"),
    ({"after": "-1:3"}, "after", "`next`"),
    ({"after": "1:-3"}, "after", "`next`"),
    ({"after": "1:2:3"}, "after", "`next`"),
    ({"after": "1.5:2"}, "after", "`next`"),
    ({"after": "\u0661:\u0662"}, "after", "`next`"),  # digits, but not ASCII ones
    ({"after": "99999999999:1"}, "after", "`next`"),  # past what a step or an id can be
    ({"after": f"1:{2**31}"}, "after", "`next`"),
    ({"limit": 10, "after": "9" * 5000}, "after", "`next`"),
]


def test_paging_parameters_it_cannot_use_are_422s_that_say_why(live_server):
    with live_server.client() as client:
        run_id = new_run(client, live_server.database_url)
        record(live_server.database_url, run_id, "progress", range(1, 11))
        answers = [client.get(f"/api/runs/{run_id}/metrics", params=params)
                   for params, _, _ in REFUSED]
    for (params, field, says), response in zip(REFUSED, answers, strict=True):
        assert response.status_code == 422, (params, response.text)
        [error] = response.json()["detail"]
        assert error["loc"] == ["query", field], params
        assert says in error["msg"], (params, error)


# How many points the run page's loss chart holds on its `ce` line (before decimation).
CE_POINTS = """() => {
    const chart = Chart.getChart(document.getElementById('chart-losses'));
    const line = chart && chart.data.datasets.find((d) => d.label === 'ce');
    return line ? (line._decimated ? line._data : line.data).length : 0;
}"""


@pytest.mark.browser
def test_a_run_page_draws_a_long_history_a_page_at_a_time(live_server, request):
    """12,000 steps: the page asks for three pages of 5,000 points, draws the first before
    the others arrive (held back here), and ends with every point on its charts."""
    database_url = live_server.database_url
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    with live_server.client() as client:
        run_id = new_run(client, database_url)
        record(database_url, run_id, "progress", range(1, 12_001))
        record(database_url, run_id, "eval", range(500, 12_001, 500))
        end_as_worker(database_url, live, run_id, "succeeded")
        whole = client.get(f"/api/runs/{run_id}/metrics").json()["points"]
    on_first_page = sum(point["kind"] == "progress" for point in whole[:5000])

    asked: list[str] = []
    held = []
    let_through = False

    def hold_later_pages(route) -> None:
        if let_through:
            route.continue_()
        else:
            held.append(route)

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("request", lambda r: asked.append(r.url) if "/metrics" in r.url else None)
        page.route(re.compile(r"/metrics\?.*after="), hold_later_pages)
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_function(f"({CE_POINTS})() === {on_first_page}")
        assert len(held) == 1  # the first page is drawn while the second is on its way
        browser.screenshot("1-first-page")
        let_through = True
        for route in held:
            route.continue_()
        page.wait_for_function(f"({CE_POINTS})() === 12000")
        points = browser.chart_points("#chart-accuracy")
        assert points == {"top-1": 24}
        browser.screenshot("2-every-page")
        browser.assert_no_errors()
    paths = [url.removeprefix(live_server.url) for url in asked]
    assert paths[0] == f"/api/runs/{run_id}/metrics?limit=5000"
    assert len(paths) == 3 and all("after=" in path for path in paths[1:])


def refuse_the_feed_once_then_hold_it(page, run_id: int) -> list:
    """The run's feed refused at its first try (a proxy's 502 while the app restarts) and held
    at its second until the test lets it through (`continue_()`): the page then resyncs. The
    tries' routes, as they come."""
    tries = []

    def route_feed(route) -> None:
        tries.append(route)
        if len(tries) == 1:
            route.fulfill(status=502, body="bad gateway")
        elif len(tries) > 2:
            route.continue_()

    page.route(re.compile(rf"/api/runs/{run_id}/events"), route_feed)
    return tries


def resync_while_the_last_page_is_held(page, base: str, database_url: str, run_id: int,
                                       last_page: list, feed_tries: list) -> None:
    """Open the run's page on its record of 7,000 points (two pages) and wait until its read
    has asked for the last page (held by the test's route, which fills `last_page`) and its
    feed has tried again (held, `refuse_the_feed_once_then_hold_it`); record 10 points more,
    on no page the read has, then let the feed through: the page resyncs, its read running."""
    page.goto(f"{base}/runs/{run_id}")
    page.wait_for_function(f"({CE_POINTS})() === 5000")
    deadline = time.monotonic() + 20
    while not (last_page and len(feed_tries) == 2):  # the page runs the routes meanwhile
        assert time.monotonic() < deadline, "the last page asked for, the feed tried again"
        page.wait_for_timeout(50)
    record(database_url, run_id, "progress", range(7_001, 7_011))
    feed_tries[1].continue_()
    expect(page.locator("#live-state")).to_have_text("● live")  # it resynced


@pytest.mark.browser
def test_a_history_read_asked_for_while_one_runs_joins_it(live_server, request):
    """The feed is refused once (a proxy's 502 while the app restarts) and comes back while the
    page reads the record's last page: its resync asks for the record again. Two reads side by
    side each read every page (a long run's 22, twice); the one running now reads on, and as
    its last page was answered before points recorded meanwhile, on from that page's last
    step: one request at a time, and every point, those too, on the charts."""
    database_url = live_server.database_url
    with live_server.client() as client:
        run_id = new_run(client, database_url)  # queued: the page follows its feed
    record(database_url, run_id, "progress", range(1, 7_001))  # two pages of 5,000

    asked: list[str] = []
    in_flight = most_in_flight = 0

    def sent(req) -> None:
        nonlocal in_flight, most_in_flight
        if "/metrics" in req.url:
            asked.append(req.url.removeprefix(live_server.url))
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)

    def done(req) -> None:
        nonlocal in_flight
        in_flight -= "/metrics" in req.url

    last_page = []  # the route and the server's answer to it, which the browser gets later

    def answer_last_page_later(route) -> None:
        if last_page:
            route.continue_()
        else:
            last_page.append((route, route.fetch()))

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("request", sent)
        page.on("requestfinished", done)
        page.on("requestfailed", done)
        page.route(re.compile(r"/metrics\?.*after="), answer_last_page_later)
        feed_tries = refuse_the_feed_once_then_hold_it(page, run_id)
        # Its 10 points more are recorded after the server answered the last page.
        resync_while_the_last_page_is_held(page, live_server.url, database_url, run_id,
                                           last_page, feed_tries)
        route, answer = last_page[0]
        route.fulfill(response=answer)
        page.wait_for_function(f"({CE_POINTS})() === 7010")
        browser.assert_no_errors(expected=("502",))
    first = f"/api/runs/{run_id}/metrics?limit=5000"
    assert most_in_flight == 1, asked
    assert asked[0] == first and len(asked) == 3, asked
    assert "after=5000:" in asked[1], asked
    assert asked[2] == f"{first}&after=7000:0", asked  # on from the last step read


@pytest.mark.browser
def test_a_history_read_that_fails_is_asked_again_for_what_joined_it(live_server, request):
    """The record's last page fails (a proxy's 502) after the feed's resync joined the read:
    the read ended there, the resync's with it, and the page kept the first page's points
    with nothing to ask again. The page asks for the page again after a pause, once: its
    answer holds the points recorded before the resync too, and every point is drawn. The
    first page, which gets no answer at all the first time, is asked for again too."""
    database_url = live_server.database_url
    with live_server.client() as client:
        run_id = new_run(client, database_url)  # queued: the page follows its feed
    record(database_url, run_id, "progress", range(1, 7_001))  # two pages of 5,000

    asked: list[str] = []
    last_page = []  # the first try is held, then failed; the next go through

    def hold_the_first_try(route) -> None:
        last_page.append(route)
        if len(last_page) > 1:
            route.continue_()

    first_page = []

    def no_answer_the_first_time(route) -> None:
        first_page.append(route)
        if len(first_page) == 1:
            route.abort("connectionreset")
        else:
            route.continue_()

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("request", lambda r: asked.append(r.url.removeprefix(live_server.url))
                if "/metrics" in r.url else None)
        page.route(re.compile(r"/metrics\?limit=5000$"), no_answer_the_first_time)
        page.route(re.compile(r"/metrics\?.*after="), hold_the_first_try)
        feed_tries = refuse_the_feed_once_then_hold_it(page, run_id)
        resync_while_the_last_page_is_held(page, live_server.url, database_url, run_id,
                                           last_page, feed_tries)
        last_page[0].fulfill(status=502, body="bad gateway")
        page.wait_for_function(f"({CE_POINTS})() === 7010")
        browser.assert_no_errors(expected=("502", "ERR_CONNECTION_RESET"))
    first = f"/api/runs/{run_id}/metrics?limit=5000"
    assert len(asked) == 4 and asked[:2] == [first, first], asked
    assert asked[3] == asked[2] and "after=" in asked[2], asked  # the failed page, again


@pytest.mark.browser
def test_a_resync_after_the_history_was_read_reads_only_what_is_newer(live_server, request):
    """The feed comes back after the page had read the whole record: its resync read every
    page again from the first (here 2 requests and 7,010 points for 10 new ones; a
    paper-length run's 22 pages, 23 MB, at each reconnect). It reads on from the step of the
    last point it has (`after=<step>:0`: that step's points again, then the new ones)."""
    database_url = live_server.database_url
    with live_server.client() as client:
        run_id = new_run(client, database_url)  # queued: the page follows its feed
    record(database_url, run_id, "progress", range(1, 7_001))  # two pages of 5,000

    # Each page's answer, as it comes (its body is read at the end: a handler that waits for
    # it lets the test run on before the answer is counted).
    answers = []

    def read() -> list[tuple[str, int]]:
        """Each page asked for, and how many points it held."""
        return [(answer.url.removeprefix(live_server.url), len(answer.json()["points"]))
                for answer in answers]

    with open_browser(request.node.name) as browser:
        page = browser.page
        page.on("response", lambda r: answers.append(r) if "/metrics" in r.url else None)
        feed_tries = refuse_the_feed_once_then_hold_it(page, run_id)
        page.goto(f"{live_server.url}/runs/{run_id}")
        page.wait_for_function(f"({CE_POINTS})() === 7000")
        deadline = time.monotonic() + 20
        while len(feed_tries) < 2:  # the page runs the routes meanwhile
            assert time.monotonic() < deadline, "the feed tried again"
            page.wait_for_timeout(50)
        assert len(answers) == 2  # the whole record, read before the feed came back
        record(database_url, run_id, "progress", range(7_001, 7_011))
        feed_tries[1].continue_()
        expect(page.locator("#live-state")).to_have_text("● live")
        page.wait_for_function(f"({CE_POINTS})() === 7010")
        browser.assert_no_errors(expected=("502",))
        pages = read()
    assert pages[2:] == [(f"/api/runs/{run_id}/metrics?limit=5000&after=7000:0", 11)], pages


def retold_as_before(database_url: str, run_id: int, after: int = 0) -> str:
    """The feed of a finished run whose stream is gone as it was told when the whole record
    was read in one query: each point as the event its worker sent, `0-1` on, then the end,
    whose id is the last point's marked as the end (`0-<n>.end`, app.events.END_MARK); the
    events after the `after`-th only."""
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        events = [{"type": m.kind, "run_id": run_id, "time": timestamp(m.created_at),
                   "step": m.step, "total_steps": run.total_steps, **m.values}
                  for m in session.scalars(select(RunMetric).where(RunMetric.run_id == run_id)
                                           .order_by(RunMetric.step, RunMetric.id))]
        end = sse(ended(run), event_id=f"0-{len(events)}.end")
    frames = [sse(event, event_id=f"0-{index}")
              for index, event in enumerate(events, start=1) if index > after]
    return "retry: 2000\n\n" + "".join(frames) + end


def finished_run_without_stream(database_url: str, redis_url: str) -> int:
    """A run of 12,000 progress points and an eval each 500 steps (two pages and a bit),
    ended, whose Redis stream has expired since."""
    with session_scope(database_url) as session:
        experiment = Experiment(name="long", dataset_id=add_dataset_row(database_url),
                                backbone="b", methods=["fine-tune"], budgets=[0.5], seeds=[0],
                                preset="quick")
        session.add(experiment)
        session.flush()
        run = Run(experiment_id=experiment.id, dataset_id=experiment.dataset_id,
                  method="fine-tune", budget=0.5, budget_label="50%", status="succeeded",
                  total_steps=12_000, step=12_000, started_at=utcnow(), finished_at=utcnow(),
                  metrics={"test_top1": 0.5})
        session.add(run)
        session.flush()
        run_id = run.id
    record(database_url, run_id, "progress", range(1, 12_001))
    record(database_url, run_id, "eval", range(500, 12_001, 500))
    redis.Redis.from_url(redis_url).delete(run_stream_key(run_id))
    return run_id


def test_a_feed_retold_from_the_record_in_pages_is_the_feed_told_at_once(metrics_server):
    """A run's feed without its stream is read from the database a page at a time now: what
    a client gets is byte for byte what one query for the whole record gave."""
    server = metrics_server
    with server.client() as client:
        run_id = finished_run_without_stream(server.database_url, server.redis_url)
        with client.stream("GET", f"/api/runs/{run_id}/events") as response:
            assert response.status_code == 200
            told = "".join(response.iter_text())
    expected = retold_as_before(server.database_url, run_id)
    assert told.count("\ndata: ") == 12_000 + 24 + 1
    assert told == expected


def test_a_feed_retold_from_the_record_resumes_after_the_last_event_its_client_had(
        metrics_server):
    """A feed told from the record counts its events in their ids (`0-1` on). A client cut off
    in it that came back with the id of the last event it had (`Last-Event-ID: 0-5000`) got
    the end alone, missing the 7,024 points after it with nothing said; an experiment's, the
    ends of the runs after. Each now goes on after that event."""
    server = metrics_server
    live = redis.Redis.from_url(server.redis_url, decode_responses=True)
    with server.client() as client:
        run_id = finished_run_without_stream(server.database_url, server.redis_url)

        def told(path: str, last_event_id: str) -> str:
            with client.stream("GET", path, headers={"Last-Event-ID": last_event_id}) as answer:
                assert answer.status_code == 200
                return "".join(answer.iter_text())

        resumed = told(f"/api/runs/{run_id}/events", "0-5000")
        # An id from before ends were marked (the end's was `0-<n + 1>`) gets the end again;
        # the end's own id, nothing more (204: an EventSource stops).
        had_the_end = told(f"/api/runs/{run_id}/events", "0-12025")
        with client.stream("GET", f"/api/runs/{run_id}/events",
                           headers={"Last-Event-ID": "0-12024.end"}) as answer:
            assert answer.status_code == 204

        experiment_id, run_ids = start_sweep(client, add_dataset_row(server.database_url),
                                             seeds=[0])
        for other in run_ids:
            end_as_worker(server.database_url, live, other, "failed")
        live.delete(experiment_stream_key(experiment_id), *map(run_stream_key, run_ids))
        experiment_feed = f"/api/experiments/{experiment_id}/events"
        whole = sse_frames(told(experiment_feed, "0"))
        after_first = sse_frames(told(experiment_feed, "0-1"))
    assert resumed == retold_as_before(server.database_url, run_id, after=5000)
    assert resumed.count("\ndata: ") == 12_024 - 5000 + 1
    assert had_the_end == retold_as_before(server.database_url, run_id, after=12_024)
    assert [frame["type"] for frame in whole] == ["end", "end", "experiment_end"]
    assert after_first == whole[1:]


def sse_frames(text: str) -> list[dict]:
    """The events of a feed's text, each with its `id`."""
    frames = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            frames.append({**json.loads(fields["data"]), "id": fields.get("id")})
    return frames


def test_a_feed_retold_from_the_record_reads_no_further_than_it_has_sent(settings):
    """The feed of a finished run whose stream expired read the whole record in one query
    and held it while it was sent (27,000-110,000 events on a long run). Now each page of it
    goes out before the next is read: served in-process (the app's own routes and
    middleware, real Redis and SQLite) to count the points loaded at each write."""
    database_url = settings.sqlalchemy_url
    loaded = [0]

    def count_load(_target, _context) -> None:
        loaded[0] += 1

    async def tell(run_id: int) -> list[tuple[int, int]]:
        """(events in each write that has some, points loaded so far then)."""
        app = create_app(settings)
        writes: list[tuple[int, int]] = []
        asked, done = [], asyncio.Event()

        async def receive() -> dict:
            if not asked:
                asked.append(True)
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()  # the client stays until the feed ends
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                assert message["status"] == 200
            elif message["type"] == "http.response.body":
                if events := message.get("body", b"").count(b"\ndata: "):
                    writes.append((events, loaded[0]))
                if not message.get("more_body"):
                    done.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": f"/api/runs/{run_id}/events",
                 "raw_path": f"/api/runs/{run_id}/events".encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"127.0.0.1")],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(scope, receive, send), timeout=120)
        return writes

    run_id = finished_run_without_stream(database_url, settings.effective_redis_url)
    event.listen(RunMetric, "load", count_load)
    try:
        writes = asyncio.run(tell(run_id))
    finally:
        event.remove(RunMetric, "load", count_load)
    points = 12_000 + 24
    sent = list(itertools.accumulate(events for events, _ in writes))
    assert sent[-1] == points + 1  # and the end
    # Each write went out with no point read beyond it: the first at one page, not all.
    assert writes[0][1] <= FEED_PAGE, writes[:3]
    assert [read for _, read in writes] == [min(total, points) for total in sent], writes
    assert loaded[0] == points  # each point read once
