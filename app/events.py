"""Server-Sent Events from a run's (or an experiment's) Redis stream, resumable by id.

Each SSE `id` is the Redis stream entry id, so a browser that reconnects with
`Last-Event-ID` gets exactly the events it missed. When the stream is gone (expired, or a
Redis that lost its data) a finished run's history is rebuilt from the database.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def valid_last_event_id(value: str | None) -> str:
    """The stream id to read after; '0' (everything) for a missing or malformed id."""
    if value and STREAM_ID.match(value.strip()):
        return value.strip()
    return "0"


def sse(data: dict[str, Any], event_id: str | None = None) -> str:
    lines = [f"id: {event_id}"] if event_id else []
    lines.append("data: " + json.dumps(data, separators=(",", ":"), default=float))
    return "\n".join(lines) + "\n\n"


@dataclass
class Outcome:
    """What the database says now: whether the feed is over, and how to tell its story."""

    finished: bool
    history: list[dict[str, Any]] = field(default_factory=list)  # rebuilt from the database
    final: dict[str, Any] | None = None  # the event that closes the feed


async def stream_events(
    redis_url: str,
    key: str,
    last_id: str,
    *,
    outcome: Callable[[], Outcome],
    heartbeat_s: float,
    is_disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[str]:
    """SSE frames: the stream after `last_id`, then live entries, until the database says the
    feed is over and the final event has been sent."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield "retry: 2000\n\n"
    grace_used = False
    try:
        while not await is_disconnected():
            block_ms = 500 if grace_used else int(heartbeat_s * 1000)
            try:
                entries = await client.xread({key: last_id}, count=500, block=block_ms)
            except (redis.RedisError, OSError):
                yield ": live feed unavailable (Redis), retrying\n\n"
                await asyncio.sleep(1.0)
                continue
            for _stream, messages in entries or []:
                for entry_id, fields in messages:
                    last_id = entry_id
                    event = json.loads(fields["data"])
                    yield sse(event, event_id=entry_id)
                    if event.get("type") == "end":
                        state = await asyncio.to_thread(outcome)
                        if state.finished:
                            if state.final and state.final.get("type") != "end":
                                yield sse(state.final)
                            return
            if entries:
                continue
            state = await asyncio.to_thread(outcome)
            if not state.finished:
                yield ": heartbeat\n\n"
                continue
            if last_id == "0" and await _stream_is_empty(client, key):
                # The live feed is gone: tell the story from the database.
                for index, event in enumerate(state.history, start=1):
                    yield sse(event, event_id=f"0-{index}")
                if state.final:
                    yield sse(state.final, event_id=f"0-{len(state.history) + 1}")
                return
            if grace_used:
                # Finished and nothing after last_id: the client saw it all; close the feed.
                if state.final:
                    yield sse(state.final)
                return
            grace_used = True  # the end event may be a moment behind the database
    finally:
        await client.aclose()


async def _stream_is_empty(client: aioredis.Redis, key: str) -> bool:
    try:
        return await client.xlen(key) == 0
    except (redis.RedisError, OSError):
        return True
