"""`Idempotency-Key` for POST /api/experiments: a script that retries after a timeout (the
sweep was made, the answer lost) gets the experiment its first try made, not a second sweep
of queued runs. The key lives in Redis for a day, with a digest of the request it came with,
naming its experiment even once deleted (a retry is then told so rather than making it
again). It also holds when that experiment was made: a database restored from a backup gives
its ids out again, and a retry must not be answered with another experiment of the same id."""

from __future__ import annotations

import hashlib

import redis
from fastapi import HTTPException

from app.experiments import unprocessable

KEY_TTL_S = 24 * 3600  # how long a key names its experiment
CLAIM_TTL_S = 120  # how long a request may hold a key while it makes the experiment
PENDING = "pending"


def _redis_key(key: str) -> str:
    return "selftune:idempotency:experiments:" + hashlib.sha256(key.encode()).hexdigest()


def request_digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def claim(live: redis.Redis, key: str, digest: str) -> tuple[int, str | None] | None:
    """The experiment an earlier request with `key` made, as (its id, when it was made: the
    ISO time `remember` was given, None from a version that kept the id alone), or None once
    this request holds the key (it then makes the experiment and calls `remember`, or
    `release` if it fails).
    The same key with another request body is a 422; while the first request with it is
    still being handled, a 409."""
    name = _redis_key(key)
    for _ in range(3):  # a claim that expires between SET and GET is taken again
        if live.set(name, f"{PENDING} {digest}", nx=True, ex=CLAIM_TTL_S):
            return None
        value = live.get(name)
        if value is None:
            continue
        state, _, stored_digest = value.partition(" ")
        if stored_digest != digest:
            raise unprocessable("Idempotency-Key", "this Idempotency-Key came with another "
                                "request body: use a new key for a new experiment", "header")
        if state == PENDING:
            raise HTTPException(409, detail="a request with this Idempotency-Key is still "
                                "being handled: ask again in a moment")
        made, _, created = state.partition("@")
        return int(made), created or None
    raise HTTPException(409, detail="this Idempotency-Key is changing hands: ask again")


def remember(live: redis.Redis, key: str, digest: str, experiment_id: int,
             created: str) -> None:
    live.set(_redis_key(key), f"{experiment_id}@{created} {digest}", ex=KEY_TTL_S)


def release(live: redis.Redis, key: str) -> None:
    """Free the key of a request that made nothing to return (refused, or the queue down):
    a retry then tries again."""
    try:
        live.delete(_redis_key(key))
    except (redis.RedisError, OSError):
        pass  # the claim expires by itself
