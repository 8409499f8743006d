"""Server-Sent Events from a run's (or an experiment's) Redis stream, resumable by id.

Each SSE `id` is the Redis stream entry id, so a browser that reconnects with
`Last-Event-ID` gets exactly the events it missed. One reader per stream and web process
fans new entries out to every connected browser (a hundred viewers of one run cost one
Redis read, not a hundred). When the stream is gone (expired, or a Redis that lost its data)
a finished run's history is rebuilt from the database, a page at a time, with ids that count
its events, so that a client cut off in it resumes there too. Where Redis trimmed a
long run's oldest entries, a feed that would skip some says so first (`dropped`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

log = logging.getLogger(__name__)

# A feed's closing event, when it is not an entry of the stream, has the id of the event
# before it with this added: a reconnect that names it had the end (`client_had_the_end`).
END_MARK = ".end"
LAST_EVENT_ID = re.compile(r"^(\d{1,20}-\d{1,20}|0)(\.end)?$")
HUB_BUFFER = 5000  # entries a hub keeps for subscribers that fall behind
HISTORY_PAGE = 5000  # entries read from Redis at a time when catching up


def valid_last_event_id(value: str | None) -> str:
    """The stream id to read after; '0' (everything) for a missing or malformed id."""
    return parse_last_event_id(value)[0]


def parse_last_event_id(value: str | None) -> tuple[str, bool]:
    """The stream id to read after ('0', everything, for a missing or malformed id), and
    whether the id was a closing event's (END_MARK)."""
    if value and (match := LAST_EVENT_ID.match(value.strip())):
        return match[1], match[2] is not None
    return "0", False


def retold_before(last_id: str) -> int | None:
    """How many events of a feed told from the database (whose ids count them, `0-1` on) a
    client had: 0 for one that had none, None for an id of the stream's (Redis never gives
    an entry an id of 0 milliseconds)."""
    if last_id == "0":
        return 0
    millis, _, seq = last_id.partition("-")
    return int(seq) if int(millis) == 0 else None


def id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def sse(data: dict[str, Any], event_id: str | None = None) -> str:
    lines = [f"id: {event_id}"] if event_id else []
    lines.append("data: " + json.dumps(data, separators=(",", ":"), default=float))
    return "\n".join(lines) + "\n\n"


@dataclass
class Entry:
    """One stream entry, its SSE frame encoded once for every subscriber."""

    id: str
    event: dict[str, Any]
    frame: str


def to_entry(entry_id: str, fields: dict[str, str]) -> Entry:
    event = json.loads(fields["data"])
    return Entry(entry_id, event, f"id: {entry_id}\ndata: {fields['data']}\n\n")


@dataclass
class Outcome:
    """What the database says now: whether the feed is over, and how to tell its story."""

    finished: bool
    # The feed rebuilt from the database, in pages of events that are read as they are sent
    # (and only when the stream is gone): a long run's record is 110,000 points, which were
    # read in one query and held, however slow the client, at every check of the outcome.
    history: Iterable[list[dict[str, Any]]] = ()
    final: dict[str, Any] | None = None  # the event that closes the feed


BLOCK_MS = 5000  # how long one XREAD waits for new entries


def most_connections() -> int:
    """How many Redis connections the feeds of one web process may hold: each stream
    watched holds one in XREAD for as long as it is watched, so redis-py's default of 100 let
    100 runs' pages open at once starve every other feed ("Too many connections"). A quarter
    of the process's file limit, leaving the rest to the browsers' own connections."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 5000 if soft == resource.RLIM_INFINITY else max(100, soft // 4)


class StreamHub:
    """One Redis reader for one stream key, shared by every subscriber in this process."""

    def __init__(self, client: aioredis.Redis, key: str, start_id: str) -> None:
        self.client, self.key = client, key
        self.start_id = start_id
        self.entries: deque[Entry] = deque(maxlen=HUB_BUFFER)
        # Set when entries arrive, then replaced: waiting on it takes no lock, so a feed
        # cancelled while it waits (a browser gone) cannot leave one held.
        self.arrived = asyncio.Event()
        self.subscribers = 0
        self.healthy = True
        self.closed = False  # its last feed left: the reader stops (`close`)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        last_id = self.start_id
        while not self.closed:
            try:
                result = await self.client.xread({self.key: last_id}, count=1000, block=BLOCK_MS)
                self.healthy = True
            except (redis.RedisError, OSError) as exc:
                if self.healthy:
                    log.warning("live feed %s: Redis unavailable (%s)", self.key, exc)
                self.healthy = False
                await asyncio.sleep(1.0)
                continue
            if not result:
                continue
            for _stream, messages in result:
                for entry_id, fields in messages:
                    self.entries.append(to_entry(entry_id, fields))
                    last_id = entry_id
            self.wake()

    def close(self) -> None:
        """Stop the reader. A cancel alone did not always: on Python 3.11 one that lands while
        redis-py sends a command (a new hub's first read) is lost in its `asyncio.wait_for`
        (CPython gh-86296), and the reader read on for good, a Redis connection each, until
        the pool's 100 were taken. The flag stops it after that read at the latest."""
        self.closed = True
        self.task.cancel()

    def wake(self) -> None:
        """Wake every feed waiting on this hub."""
        arrived, self.arrived = self.arrived, asyncio.Event()
        arrived.set()

    def after(self, last_id: str) -> list[Entry] | None:
        """Buffered entries after `last_id`; None when the buffer no longer reaches back."""
        if not self.entries:
            return []
        wanted = id_key(last_id)
        if self.entries.maxlen and len(self.entries) == self.entries.maxlen and (
            id_key(self.entries[0].id) > wanted
        ):
            return None
        return [entry for entry in self.entries if id_key(entry.id) > wanted]

    async def wait(self, timeout: float) -> None:
        """Until entries arrive (or the server stops), at most `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self.arrived.wait()
        except TimeoutError:
            pass


class Hubs:
    """The stream hubs of this web process, created on first subscriber, dropped on last."""

    def __init__(self, redis_url: str) -> None:
        # XREAD blocks up to BLOCK_MS; a socket timeout below that (redis-py's async default is
        # 5 s) turned every quiet feed into "Redis unavailable" and a 1 s pause.
        self.client = aioredis.Redis.from_url(
            redis_url, decode_responses=True, socket_timeout=BLOCK_MS / 1000 + 10,
            socket_connect_timeout=5, max_connections=most_connections())
        self.hubs: dict[str, StreamHub] = {}
        self.lock = asyncio.Lock()
        self.stopping = False  # the server is shutting down: open feeds end

    async def stop(self) -> None:
        """End every open feed now: the server is going down, and a feed held open would
        only be cut when its graceful-shutdown time runs out (a traceback per feed in the
        log). Browsers reconnect to the next server by themselves."""
        self.stopping = True
        for hub in list(self.hubs.values()):
            hub.wake()

    async def subscribe(self, key: str) -> StreamHub:
        # The lock makes one hub of feeds that open a quiet stream at once; the count goes up
        # with no wait after it, so a feed cancelled here has nothing to undo.
        async with self.lock:
            hub = self.hubs.get(key)
            if hub is None:
                try:
                    newest = await self.client.xrevrange(key, count=1)
                    start = newest[0][0] if newest else "0-0"
                except (redis.RedisError, OSError):
                    start = "0-0"
                hub = self.hubs[key] = StreamHub(self.client, key, start)
            hub.subscribers += 1
            return hub

    def unsubscribe(self, hub: StreamHub) -> None:
        """Without a wait: a feed leaves as its browser goes, while Starlette cancels it at
        every wait. It waited for the lock, held by a feed opening another stream, and was
        cancelled there: its hub's reader ran on, one Redis connection each, until the pool's
        100 were taken and no feed got an event (1,200 feeds opened and dropped)."""
        hub.subscribers -= 1
        if hub.subscribers <= 0 and self.hubs.get(hub.key) is hub:
            del self.hubs[hub.key]
            hub.close()

    async def history(self, key: str, after_id: str, limit: int = HISTORY_PAGE) -> list[Entry]:
        start = "-" if after_id == "0" else f"({after_id}"
        rows = await self.client.xrange(key, min=start, max="+", count=limit)
        return [to_entry(entry_id, fields) for entry_id, fields in rows]

    async def close(self) -> None:
        for hub in self.hubs.values():
            hub.close()
        await self.client.aclose()


async def stream_events(
    hubs: Hubs,
    key: str,
    last_id: str,
    *,
    outcome: Callable[[], Outcome],
    heartbeat_s: float,
    earlier_ends: bool = False,
    maxlen: int | None = None,
    record: str | None = None,
) -> AsyncIterator[str]:
    """SSE frames: the stream after `last_id`, then live entries, until the database says the
    feed is over and the final event has been sent. With `earlier_ends` (a run's feed), an
    `end` that the stream already holds more after (a run run again) goes out as
    `earlier_end`, so that `end` is always a feed's last event.

    Redis trims a stream at `maxlen` entries (a long run's): a feed that would go on past
    entries trimmed after `last_id` (read from the start, resumed, or reading slower than
    the stream grows) first says so, with a `dropped` event naming `record`, where the whole
    story is."""
    hub = await hubs.subscribe(key)  # before reading history, so nothing falls in between
    try:  # from here on: a client gone at the first frame leaves no subscription behind
        yield "retry: 2000\n\n"
        pending, more_history, gap = await _history_page(hubs, key, last_id, maxlen, record)
        had = retold_before(last_id)
        if not pending and had is not None:
            state = await asyncio.to_thread(outcome)
            if state.finished and await _stream_is_empty(hubs, key):
                # The live feed is gone: tell the story from the database, after the events
                # a client cut off in it had (it got the end alone, and missed the rest).
                told = 0
                async for events in _pages(state.history):
                    frames = "".join(sse(event, event_id=f"0-{index}")
                                     for index, event in enumerate(events, start=told + 1)
                                     if index > had)
                    if frames:
                        yield frames
                    told += len(events)
                if state.final:
                    yield sse(state.final, event_id=f"0-{told}{END_MARK}")
                return
        check_outcome = True  # a client that already saw the end must not wait a heartbeat
        ended: Outcome | None = None  # the database said "over" at an end event
        while not hubs.stopping:
            # Entries that arrived together go out in one write, after a `dropped` frame where
            # Redis trimmed some before them.
            batch, gap = [gap] if gap else [], ""
            any_end = False
            for index, entry in enumerate(pending):
                last_id = entry.id
                if (earlier_ends and entry.event.get("type") == "end"
                        and (index + 1 < len(pending) or more_history or hub.after(last_id) != [])):
                    batch.append(sse({**entry.event, "type": "earlier_end"}, event_id=entry.id))
                    continue
                batch.append(entry.frame)
                any_end = any_end or entry.event.get("type") == "end"
            # Asked once for the whole batch: a replay of an experiment's history holds an end
            # per run, and asking at each read every run that many times.
            if any_end and ended is None:
                state = await asyncio.to_thread(outcome)
                if state.finished:
                    ended = state
            # An end is the last word only once the stream holds nothing after it: an
            # experiment's feed has one per run, a requeued run's the end of an earlier try.
            if ended is not None and not more_history and not hub.after(last_id):
                if ended.final and ended.final.get("type") != "end":
                    batch.append(sse(ended.final, event_id=f"{last_id}{END_MARK}"))
                yield "".join(batch)
                return
            if batch:
                yield "".join(batch)
            if more_history:  # the hub only holds what came after it started: page on
                pending, more_history, gap = await _history_page(hubs, key, last_id, maxlen,
                                                                 record)
                continue
            if not pending:
                if check_outcome:
                    state = await asyncio.to_thread(outcome)
                    if state.finished:
                        await hub.wait(0.5)  # the end event may be a moment behind the database
                        if not hub.after(last_id):
                            if state.final:
                                yield sse(state.final, event_id=f"{last_id}{END_MARK}")
                            return
                # What came during the check is not waited for, nor a stop that came then:
                # Hubs.stop wakes only the feeds waiting at that moment.
                if hub.after(last_id) == [] and not hubs.stopping:
                    await hub.wait(heartbeat_s)
                check_outcome = not hub.after(last_id)
                if check_outcome:
                    yield ": heartbeat\n\n" if hub.healthy else ": live feed unavailable\n\n"
            pending = hub.after(last_id)
            if pending is None:  # fell behind the hub's buffer: read from Redis itself
                pending, more_history, gap = await _history_page(hubs, key, last_id, maxlen,
                                                                 record)
    finally:
        hubs.unsubscribe(hub)


async def _pages(history: Iterable[list[dict[str, Any]]]) -> AsyncIterator[list[dict[str, Any]]]:
    """The pages of a rebuilt history, each read off the event loop (reading one may be a
    query), and the next only once the one before has been sent."""
    pages = iter(history)
    while (page := await asyncio.to_thread(next, pages, None)) is not None:
        yield page


async def _history_page(hubs: Hubs, key: str, after_id: str, maxlen: int | None,
                        record: str | None) -> tuple[list[Entry], bool, str]:
    """The stream's entries after `after_id`, a page at a time, whether more may follow (the
    page is full), and the `dropped` frame that goes before them when Redis trimmed entries
    after `after_id` ("" when it did not)."""
    try:
        page = await hubs.history(key, after_id)
    except (redis.RedisError, OSError):
        return [], False, ""
    gap = ""
    if page and await _trimmed_after(hubs, key, after_id, maxlen):
        gap = _dropped(after_id, page[0].id, record)
    return page, len(page) == HISTORY_PAGE, gap


async def _trimmed_after(hubs: Hubs, key: str, after_id: str, maxlen: int | None) -> bool:
    """Whether Redis trimmed entries of the stream that came after `after_id`: the oldest it
    keeps is younger, and entries were trimmed. Redis 7 counts the entries ever added; an
    older one (the embedded Redis is 6.2) only says how long the stream is, and one at its
    cap may have lost its oldest. A client that had read up to the very entry before the
    oldest kept is told of a gap it does not have."""
    if not maxlen:
        return False
    try:
        info = await hubs.client.xinfo_stream(key)
    except (redis.RedisError, OSError):
        return False
    first = info.get("first-entry")
    if not first or id_key(after_id) >= id_key(first[0]):
        return False
    if info.get("entries-added") is not None:
        return int(info["entries-added"]) > int(info["length"])
    return int(info["length"]) >= maxlen


def _dropped(after_id: str, until_id: str, record: str | None) -> str:
    """The event saying the feed skips the entries Redis trimmed after the client's last
    one, and where the story is whole (app.schemas.FEED_EVENTS)."""
    return sse({"type": "dropped", "after": after_id, "until": until_id, "read": record})


async def _stream_is_empty(hubs: Hubs, key: str) -> bool:
    try:
        return await hubs.client.xlen(key) == 0
    except (redis.RedisError, OSError):
        return True


async def client_had_the_end(hubs: Hubs, key: str, last_id: str, had_end_mark: bool,
                             outcome: Callable[[], Outcome], end_entries_close: bool) -> bool:
    """Whether a client resuming after `last_id` already had the end of a feed that is over
    (the database says so, and the stream holds nothing after it): its last event was the
    closing one (`had_end_mark`), or, where an `end` entry closes the feed
    (`end_entries_close`: a run's, not an experiment's, which has one per run), that entry.
    Such a feed would only send its end again, and an EventSource left open (a dashboard's)
    would reconnect for that every 2 s for ever. Where Redis cannot say, no."""
    try:
        if not had_end_mark:
            if not end_entries_close or retold_before(last_id) is not None:
                return False  # a feed told from the database marks its end: not had
            entry = await hubs.client.xrange(key, min=last_id, max=last_id)
            if not entry or json.loads(entry[0][1]["data"]).get("type") != "end":
                return False
        if await hubs.client.xrange(key, min=f"({last_id}", max="+", count=1):
            return False  # more came after it (the run was run again)
    except (redis.RedisError, OSError, ValueError, KeyError):
        return False
    return (await asyncio.to_thread(outcome)).finished


async def event_stream_response(request, key: str, outcome: Callable[[], Outcome],
                                heartbeat_s: float, earlier_ends: bool = False, *,
                                maxlen: int | None = None, record: str | None = None,
                                last_event_id: str | None = None):
    """The SSE response for one stream key, resuming after the request's Last-Event-ID
    header, or else after `last_event_id` (the query's). A client that already had the end
    of a feed that is over gets 204 No Content, which stops an EventSource for good (HTML
    spec); one that reads it from the start still gets the whole story and its end."""
    from fastapi.responses import Response, StreamingResponse

    last_id, had_end_mark = parse_last_event_id(
        request.headers.get("last-event-id") or last_event_id)
    hubs = request.app.state.hubs
    if (last_id != "0" or had_end_mark) and await client_had_the_end(
            hubs, key, last_id, had_end_mark, outcome, end_entries_close=earlier_ends):
        return Response(status_code=204, headers={"Cache-Control": "no-cache"})
    frames = stream_events(
        hubs,
        key,
        last_id,
        outcome=outcome,
        heartbeat_s=heartbeat_s,
        earlier_ends=earlier_ends,
        maxlen=maxlen,
        record=record,
    )
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
