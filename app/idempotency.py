"""`Idempotency-Key` for the requests that make something (POST /api/experiments, a dataset's
upload, adding labels to one): a script that retries after a timeout (the thing was made, the
answer lost) gets what its first try made, not a second sweep of queued runs or a second copy
of a dataset. The key lives in Redis for a day, with a digest of the request it came with,
naming what it made even once deleted (a retry is then told so rather than making it again).
It also holds when that was made: a database restored from a backup gives its ids out again,
and a retry must not be answered with another experiment or dataset of the same id."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Protocol, TypeVar

import redis
from fastapi import Header, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.experiments import as_utc
from app.schemas import ErrorOut

KEY_TTL_S = 24 * 3600  # how long a key names what it made
CLAIM_TTL_S = 120  # how long a request may hold a key without saying it still works on it
PENDING = "pending"


class Row(Protocol):  # an Experiment or a Dataset
    id: int
    created_at: datetime


Made = TypeVar("Made", bound=Row)

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
    description="any string of yours (a UUID, say): a retry with the same key and request "
    "within a day gets what the first request made (with Idempotent-Replayed: true) instead "
    "of making it again, or a 410 once that has been deleted")]


def keyed_answers(model: type[BaseModel], noun: str, sent: str) -> dict:
    """The OpenAPI answers a route that takes an Idempotency-Key gives besides its own, for
    the `noun` it makes from the request (`sent`: "body", "form")."""
    return {
        200: {"model": model, "description": f"the {noun} an earlier request with this "
              f"Idempotency-Key and the same {sent} made (Idempotent-Replayed: true)"},
        409: {"model": ErrorOut, "description": "the first request with this Idempotency-Key "
              "is still being handled"},
        410: {"model": ErrorOut, "description": f"the {noun} the first request with this "
              "Idempotency-Key made was deleted since: nothing is made (a new key makes it "
              "again)"},
    }


def replayed(response: Response, location: str) -> None:
    """Answer what an earlier request with the key made: 200, Idempotent-Replayed."""
    response.status_code = 200
    response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = location


class KeyRefused(Exception):
    """A request its Idempotency-Key stops: `status_code` 409, 410, 422 or 503."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        # When to ask again, where asking again is the answer: the first request is still
        # being handled (409), or Redis does not answer (503).
        self.headers = {"Retry-After": "2"} if status_code in (409, 503) else None


def _redis_key(key: str, noun: str) -> str:
    return f"selftune:idempotency:{noun}s:" + hashlib.sha256(key.encode()).hexdigest()


def request_digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def claim(live: redis.Redis, key: str, digest: str, noun: str = "experiment"
          ) -> tuple[int, str | None] | None:
    """The id of the `noun` an earlier request with `key` made, and when it was made (the ISO
    time `remember` was given, None from a version that kept the id alone), or None once this
    request holds the key (it then makes it and calls `remember`, or `release` if it fails).
    The same key with another request is a 422; while the first request with it is still
    being handled, a 409 (KeyRefused both)."""
    name = _redis_key(key, noun)
    for _ in range(3):  # a claim that expires between SET and GET is taken again
        if live.set(name, f"{PENDING} {digest}", nx=True, ex=CLAIM_TTL_S):
            return None
        value = live.get(name)
        if value is None:
            continue
        state, _, stored_digest = value.partition(" ")
        if stored_digest != digest:
            raise KeyRefused(422, "this Idempotency-Key came with another request body: use "
                             f"a new key for a new {noun}")
        if state == PENDING:
            raise KeyRefused(409, "a request with this Idempotency-Key is still being handled: "
                             "ask again in a moment")
        made, _, created = state.partition("@")
        return int(made), created or None
    raise KeyRefused(409, "this Idempotency-Key is changing hands: ask again")


def made_before(live: redis.Redis, key: str, digest: str, noun: str,
                find: Callable[[int], Made | None]) -> Made | None:
    """What an earlier request with `key` made (`find` reads it by id), to be answered again;
    or None once this request holds the key (`claim`). KeyRefused when it was deleted since
    (410: making it again is what the key is there to prevent) and when Redis does not
    answer (503)."""
    try:
        made = claim(live, key, digest, noun)
    except (redis.RedisError, OSError) as exc:
        raise KeyRefused(503, "the queue (Redis) is not reachable, so this Idempotency-Key "
                         f"cannot be checked: {exc}") from exc
    if made is None:
        return None
    found = find(made[0])
    if found is not None and made[1] in (None, made_at(found)):
        return found
    # Gone, or another under its id (a restored backup's).
    raise KeyRefused(410, f"{noun} {made[0]}, which the first request with this "
                     f"Idempotency-Key made, was deleted since: to make it again, send it with "
                     "a new key")


async def keep_claim(live: redis.Redis, key: str, noun: str, stop: asyncio.Event) -> None:
    """Hold the key of a request that takes longer than CLAIM_TTL_S (verifying a large
    upload takes minutes) until `stop` is set; a server that stops holding it frees it by
    itself. Awaited once stopped, it has no EXPIRE left on its way (one landing after
    `remember` would cut the day the key is kept to CLAIM_TTL_S): a cancelled task's thread
    would still send it."""
    name = _redis_key(key, noun)
    while True:
        try:
            await asyncio.wait_for(stop.wait(), CLAIM_TTL_S / 4)
            return
        except TimeoutError:
            pass
        try:
            # Plain EXPIRE (a missing key stays missing): the bundled Redis 6.2 has no XX.
            await run_in_threadpool(live.expire, name, CLAIM_TTL_S)
        except (redis.RedisError, OSError):
            pass  # asked again next time round


def made_at(made: Row) -> str:
    """When `made` was made, as its key keeps it (to the microsecond, as both databases store
    it)."""
    return as_utc(made.created_at).isoformat()


def remember(live: redis.Redis, key: str, digest: str, made: Row,
             noun: str = "experiment") -> None:
    live.set(_redis_key(key, noun), f"{made.id}@{made_at(made)} {digest}", ex=KEY_TTL_S)


def release(live: redis.Redis, key: str, noun: str = "experiment") -> None:
    """Free the key of a request that made nothing to return (refused, or the queue down):
    a retry then tries again."""
    try:
        live.delete(_redis_key(key, noun))
    except (redis.RedisError, OSError):
        pass  # the claim expires by itself
