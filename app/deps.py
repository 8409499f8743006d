"""Shared FastAPI dependencies: settings, database sessions, Redis, and the API token."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import get_sessionmaker
from app.live import get_redis
from app.models import MAX_ID
from app.schemas import ErrorOut

AUTH_COOKIE = "selftune_token"

# Past MAX_ID a lookup failed inside the database driver with a 500; now the request is a 422.
DatasetId = Annotated[int, Path(ge=1, le=MAX_ID, description="Dataset id")]
ExperimentId = Annotated[int, Path(ge=1, le=MAX_ID, description="Experiment id")]
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="Run id")]
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="Image id")]
DatasetFilter = Annotated[int | None, Query(ge=1, le=MAX_ID, description="Dataset id")]
ExperimentFilter = Annotated[int | None, Query(ge=1, le=MAX_ID, description="Experiment id")]
# Lists: everything unless a client asks for a page (their answer was always the whole list).
PageLimit = Annotated[int | None, Query(
    ge=1, le=1000, description="at most this many items (all when absent); X-Total-Count "
    "counts every item, and a Link header gives the next and previous pages")]
PageOffset = Annotated[int, Query(ge=0, le=MAX_ID, description="items to skip")]
# An EventSource cannot set `Last-Event-ID` on a feed it opens anew (a page that let its feed
# go while hidden): it names the event to go on after here. The header, sent by the browser's
# own reconnects, wins over it.
LastEventId = Annotated[str | None, Query(
    description="resume after this event id, as the `Last-Event-ID` header does (which wins "
    "when both are sent); a malformed id reads from the start", examples=["1733389200000-0"])]


def page_headers(request: Request, response: Response, total: int, limit: int | None,
                 offset: int) -> None:
    """X-Total-Count, and RFC 8288 Link headers to the pages around this one."""
    response.headers["X-Total-Count"] = str(total)
    if limit is None:
        return
    links = []
    if offset + limit < total:
        links.append((offset + limit, "next"))
    if offset > 0:  # from past the end, the page that ends with the last item
        links.append((max(0, min(offset - limit, total - limit)), "prev"))
    if links:
        response.headers["Link"] = ", ".join(
            f'<{request.url.path}?{request.url.include_query_params(offset=at).query}>; '
            f'rel="{rel}"' for at, rel in links)


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    session = get_sessionmaker(settings.sqlalchemy_url)()
    try:
        yield session
    finally:
        session.close()


DbDep = Annotated[Session, Depends(get_db)]


def get_live(settings: SettingsDep) -> redis.Redis:
    return get_redis(settings.effective_redis_url)


RedisDep = Annotated[redis.Redis, Depends(get_live)]


def token_matches(settings: Settings, presented: str | None) -> bool:
    expected = settings.token
    if expected is None:
        return True
    if not presented:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


class WrongTokens:
    """The wrong tokens each client address (each IPv6 /64 network, see guessing_address)
    presented lately. Past `limit` different ones within `window_s`, that address's token
    checks are refused, the right token's too, until enough of its guesses are older than
    the window. Different ones: a browser tab with a cookie from before the token changed
    repeats one token, a guesser does not. Kept in the web process (the app runs one);
    behind a proxy, uvicorn's --proxy-headers gives the client's address."""

    def __init__(self, limit: int = 10, window_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 most_addresses: int = 150_000) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        # Addresses remembered at most (about 1.4 KB each): past it, those whose last guess
        # is oldest are forgotten. Guesses from more addresses than that within the window
        # (a botnet's, say) grew the record without bound.
        self.most_addresses = most_addresses
        # address -> token digest -> when; in the order of each address's last guess
        self._guesses: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._swept_at = -math.inf

    def _recent(self, address: str, now: float) -> dict[str, float]:
        guesses = self._guesses.get(address, {})
        recent = {digest: at for digest, at in guesses.items() if now - at < self.window_s}
        if recent:
            self._guesses[address] = recent
        else:
            self._guesses.pop(address, None)
        return recent

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may present a token again (0: now)."""
        with self._lock:
            now = self.clock()
            recent = self._recent(address, now)
            if len(recent) < self.limit:
                return 0
            # Refused ones are not recorded: the count falls below the limit once the
            # oldest guesses leave the window.
            times = sorted(recent.values())
            return max(1, math.ceil(times[len(times) - self.limit] + self.window_s - now))

    def record(self, address: str, token: str) -> None:
        digest = hashlib.sha256(token.encode(errors="replace")).hexdigest()
        with self._lock:
            now = self.clock()
            # Many addresses: forget the stale ones, at most once a minute (each sweep reads
            # them all, and while they are recent a sweep on every guess held the lock).
            if len(self._guesses) > 100_000 and now - self._swept_at >= 60:
                self._swept_at = now
                for stale in list(self._guesses):
                    self._recent(stale, now)
            recent = self._recent(address, now)
            self._guesses.pop(address, None)
            self._guesses[address] = {**recent, digest: now}
            while len(self._guesses) > self.most_addresses:
                del self._guesses[next(iter(self._guesses))]


def guessing_address(host: str) -> str:
    """Whom WrongTokens counts a guess against: an IPv4 address, or an IPv6 address's /64
    network. One network (a home's, a host's) hands out its 2^64 addresses at will, so one
    guesser counted per IPv6 address had a fresh allowance of guesses with each."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an address (a Unix socket's client, say): as it is
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


def token_accepted(request: Request, settings: Settings, presented: str | None) -> bool:
    """token_matches, counting the wrong tokens a client presents (WrongTokens): a client
    past the limit gets a 429 that says when to try again."""
    if (accepted := token_checked(request, settings, presented)) is None:
        wrong_tokens: WrongTokens = request.app.state.wrong_tokens
        wait_s = wrong_tokens.retry_after(client_address(request))
        raise HTTPException(
            status_code=429, headers={"Retry-After": str(wait_s)},
            detail=f"too many wrong tokens from this address ({wrong_tokens.limit} different "
                   f"ones): try again in {wait_s} s")
    return accepted


def token_checked(request: Request, settings: Settings, presented: str | None) -> bool | None:
    """Whether `presented` is the token, a wrong one counted (WrongTokens); None while the
    client's address has presented too many wrong ones. Every check of a token a client
    sends goes through here: the pages' "Sign out" asked token_matches alone, and was a
    way to guess the token without limit."""
    if settings.token is None:
        return True
    wrong_tokens: WrongTokens = request.app.state.wrong_tokens
    address = client_address(request)
    if wrong_tokens.retry_after(address):
        return None
    if token_matches(settings, presented):
        return True
    if presented:
        wrong_tokens.record(address, presented)
    return False


def client_address(request: Request) -> str:
    return guessing_address(request.client.host) if request.client else "unknown"


def presented_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.cookies.get(AUTH_COOKIE)


# Declares the token in the OpenAPI schema (Swagger UI's "Authorize"); the check itself is
# require_token's, which also takes the login page's cookie.
BEARER = HTTPBearer(auto_error=False,
                    description="the server's SELFTUNE_API_TOKEN (when it has one)")


# What every API route may answer because of the token, for the OpenAPI schema.
TOKEN_RESPONSES = {
    401: {"model": ErrorOut, "description": "missing or wrong API token (only when the server "
          "has one)", "headers": {"WWW-Authenticate": {"schema": {"type": "string"},
                                                      "description": "Bearer"}}},
    429: {"model": ErrorOut, "description": "this client address presented too many different "
          "wrong tokens; every request from it is refused, the right token's too, until then",
          "headers": {"Retry-After": {"schema": {"type": "integer"},
                                      "description": "seconds to wait"}}},
}


def require_token(request: Request, settings: SettingsDep,
                  _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
    """With SELFTUNE_API_TOKEN set, every API route needs `Authorization: Bearer <token>`
    (or the HttpOnly cookie the login page sets)."""
    if not token_accepted(request, settings, presented_token(request)):
        raise token_refused()


def token_refused() -> HTTPException:
    return HTTPException(
        status_code=401,
        detail="missing or wrong API token: send 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": "Bearer"},
    )
