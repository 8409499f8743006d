"""The test suite's own Redis databases: each test session (each pytest-xdist process) holds
one of databases 1-15, and no other session may take it while it empties it between tests."""

from __future__ import annotations

import threading

import pytest
import redis

from tests.conftest import CLAIM_KEY, SESSION, claim_redis_database, reset_redis


def db_number(url: str) -> int:
    return int(url.rsplit("/", 1)[-1])


def test_a_database_being_emptied_cannot_be_claimed_by_another_session(redis_url):
    """Emptied by a flush and claimed again after it, a database was free for a moment:
    the other xdist process, starting, claimed it too, and the two sessions' tests then read
    each other's live feeds (a page drew another test's runs as ended)."""
    ours = db_number(redis_url)
    stop = threading.Event()
    taken = []

    def another_session_starting():
        while not stop.is_set() and not taken:
            if claim_redis_database([ours], "another-session") is not None:
                taken.append(ours)

    claimer = threading.Thread(target=another_session_starting)
    claimer.start()
    try:
        for _ in range(1500):
            reset_redis(redis_url)
            if taken:
                break
    finally:
        stop.set()
        claimer.join()
        redis.Redis.from_url(redis_url).set(CLAIM_KEY, SESSION)  # ours, whatever happened
    assert taken == []


def test_a_database_held_by_another_session_is_not_emptied(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.set("kept", "1")
    client.set(CLAIM_KEY, "another-session")
    try:
        with pytest.raises(RuntimeError, match="held by test session b'another-session'"):
            reset_redis(redis_url)
        assert client.get("kept") == b"1"
    finally:
        client.set(CLAIM_KEY, SESSION)
