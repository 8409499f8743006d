"""Refuses what a browser sends on another site's behalf.

Without a token the app listens on loopback only and trusts whoever reaches it from this
computer; a client elsewhere (a server started by hand on 0.0.0.0, an image run without a
token) is refused, whatever Host it names. A page on any
other site can still make the user's browser reach it: a cross-site form POST (cancel a run,
queue one again, upload an archive) needs no CORS preflight, and a host name an attacker
points at 127.0.0.1 (DNS rebinding) makes their page same-origin with the app. So state-changing
requests that the browser marks as coming from another site (`Sec-Fetch-Site`, or `Origin`
from browsers too old for it) are refused, and a server without a token answers to local host
names only. API clients (curl, scripts) send neither header and are not affected.
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as a dual-stack socket reports IPv4 (::ffff:127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def host_name(host: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class BrowserGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        # Whatever SELFTUNE_HOST says: uvicorn started by hand binds where its --host says.
        self.local_only = settings.token is None and not settings.allow_public_without_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (reason := self.refusal(scope)):
            await JSONResponse({"detail": reason}, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def from_another_site(headers: Headers) -> bool:
        """What the browser says of the page that sent the request: Sec-Fetch-Site, or from a
        browser too old for it, Origin (sent with every cross-origin POST; "null" from a
        sandboxed or local page) against the address it was sent to."""
        site = headers.get("sec-fetch-site")
        if site is not None:
            return site in ("cross-site", "same-site")
        origin = headers.get("origin")
        if origin is None:
            return False  # API clients (curl, scripts) send neither
        return origin.partition("://")[2].lower() != headers.get("host", "").lower()

    def refusal(self, scope: Scope) -> str | None:
        headers = Headers(scope=scope)
        if scope["method"] in UNSAFE_METHODS and self.from_another_site(headers):
            return "refused: a page on another site asked your browser to send this request"
        host = headers.get("host", "")
        peer = (scope.get("client") or ("127.0.0.1", 0))[0]  # none: a Unix socket's, local
        if self.local_only and not _loopback(peer):
            # The Host header is the client's to write: the peer is what says where it is
            # (a server started by hand on 0.0.0.0, the image's own command without a token,
            # served anyone who sent `Host: localhost`).
            return (f"this server answers to this computer only, not to {peer}: it runs "
                    "without SELFTUNE_API_TOKEN. Set a token to serve other computers")
        if self.local_only and host_name(host).lower() not in LOCAL_NAMES:
            return (f"this server answers to localhost only, not to {host!r}: it runs without "
                    "SELFTUNE_API_TOKEN. Open it as http://localhost:<port>, or set a token to "
                    "serve it under other names")
        return None
