"""A finished feed answers 204 to a client that reconnects after its end: an EventSource
left open (a third-party dashboard's) got the end again on every reconnect and reconnected
every 2 s for ever. A client reading it from the start still gets the whole story and its end.
Real uvicorn, Redis and SQLite, and a browser's own EventSource."""

from __future__ import annotations

import json

import pytest
import redis

from app.live import run_stream_key
from tests.browser import open_browser
from tests.support import add_dataset_row
from tests.test_experiments_cancel_delete import end_as_worker, start_sweep


def frames(client, path: str, **headers: str) -> tuple[int, list[tuple[str | None, dict]]]:
    """The answer's status and its events with their ids, read until the server closes."""
    with client.stream("GET", path, headers=headers, timeout=30) as answer:
        if answer.status_code != 200:
            return answer.status_code, []
        events, event_id = [], None
        for line in answer.iter_lines():
            if line.startswith("id: "):
                event_id = line.removeprefix("id: ")
            elif line.startswith("data: "):
                events.append((event_id, json.loads(line.removeprefix("data: "))))
                event_id = None
    return 200, events


def ended_sweep(live_server) -> tuple[int, list[int], redis.Redis]:
    live = redis.Redis.from_url(live_server.redis_url, decode_responses=True)
    database_url = live_server.database_url
    with live_server.client() as client:
        experiment_id, run_ids = start_sweep(client, add_dataset_row(database_url), seeds=[0])
    for run_id in run_ids:
        live.xadd(run_stream_key(run_id), {"data": json.dumps(
            {"type": "progress", "run_id": run_id, "step": 1})})
        end_as_worker(database_url, live, run_id, "failed")
    return experiment_id, run_ids, live


def test_a_reconnect_after_a_finished_feeds_end_gets_204_and_a_new_reader_the_whole_feed(
    live_server,
) -> None:
    experiment_id, (run_id, _), live = ended_sweep(live_server)
    run_feed, experiment_feed = f"/api/runs/{run_id}/events", \
        f"/api/experiments/{experiment_id}/events"
    with live_server.client() as client:
        # The run's feed, its end an entry of the stream.
        status, whole = frames(client, run_feed)
        assert status == 200 and whole[-1][1]["type"] == "end"
        assert [event["type"] for _, event in whole] == ["progress", "end"]
        assert frames(client, run_feed, **{"Last-Event-ID": whole[-1][0]}) == (204, [])
        # One cut off before the end still gets it, and then nothing more.
        status, rest = frames(client, run_feed, **{"Last-Event-ID": whole[0][0]})
        assert status == 200 and [event["type"] for _, event in rest] == ["end"]
        # The page's query parameter (a feed opened anew) is a reconnect too.
        assert frames(client, f"{run_feed}?last_event_id={whole[-1][0]}") == (204, [])

        # The experiment's feed: its closing event is not an entry of the stream.
        status, story = frames(client, experiment_feed)
        assert status == 200 and story[-1][1]["type"] == "experiment_end"
        assert story[-1][0] is not None and story[-1][0].endswith(".end")
        assert frames(client, experiment_feed, **{"Last-Event-ID": story[-1][0]}) == (204, [])
        status, again = frames(client, experiment_feed, **{"Last-Event-ID": story[-2][0]})
        assert status == 200 and [event["type"] for _, event in again] == ["experiment_end"]

        # The stream gone (expired): the story is told from the database, ids 0-<n>.
        live.delete(run_stream_key(run_id))
        status, retold = frames(client, run_feed)
        assert status == 200 and retold[-1][1]["type"] == "end"
        assert frames(client, run_feed, **{"Last-Event-ID": retold[-1][0]}) == (204, [])

        # Run again (requeued): the feed is not over, and a reconnect is served as before.
        assert client.post(f"/api/runs/{run_id}/requeue").status_code == 200
        with client.stream("GET", run_feed, headers={"Last-Event-ID": whole[-1][0]},
                           timeout=30) as answer:
            assert answer.status_code == 200
            data = next(line for line in answer.iter_lines() if line.startswith("data: "))
            assert json.loads(data.removeprefix("data: "))["status"] == "queued"


@pytest.mark.browser
def test_a_browsers_eventsource_left_open_on_a_finished_feed_stops_after_its_end(
    live_server, request
) -> None:
    """An EventSource that does not close itself at `end`: it gets the story once, then the
    server's 204 closes it for good (readyState CLOSED) instead of a reconnect every 2 s."""
    experiment_id, (run_id, _), _ = ended_sweep(live_server)
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/experiments/{experiment_id}")
        for feed in (f"/api/runs/{run_id}/events", f"/api/experiments/{experiment_id}/events"):
            page.evaluate("""(url) => {
                window.received = [];
                window.opened = 0;
                window.dashboard = new EventSource(url);
                window.dashboard.onopen = () => { window.opened += 1; };
                window.dashboard.onmessage = (m) => window.received.push(JSON.parse(m.data).type);
            }""", feed)
            page.wait_for_function("window.dashboard.readyState === EventSource.CLOSED",
                                   timeout=20_000)
            received = page.evaluate("window.received")
            assert received[-1] in ("end", "experiment_end") and received.count(received[-1]) == 1
            assert page.evaluate("window.opened") == 1
