"""The FastAPI application: REST routers under /api, Jinja2 pages, static assets."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import re
import secrets
import shutil
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from types import FrameType

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm.exc import ObjectDeletedError, StaleDataError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.routing import Match

from app import __version__, openapi
from app.config import Settings, get_settings, settings_or_exit
from app.db import StartupRefused
from app.deps import (
    TOKEN_RESPONSES,
    WrongTokens,
    presented_token,
    require_token,
    token_accepted,
    token_refused,
)
from app.engine_preload import start_preload
from app.guard import BrowserGuard
from app.responses import csp_nonce
from app.routers import (
    dataset_pages,
    datasets,
    experiment_pages,
    experiments,
    health,
    pages,
    runs,
)
from app.startup import DataDirCheck, check_at_start, refuse_work

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR_URL = "/static/vendor"  # filled by `make` from package.json (no CDN)

API_ROUTERS = [health.router, datasets.router, experiments.router, runs.router]


class StaticAssets(StaticFiles):
    """The static folder, less hidden files (a name starting with a dot anywhere in the
    path): build markers and editor leftovers are not assets."""

    async def get_response(self, path: str, scope) -> Response:
        if any(part.startswith(".") for part in PurePosixPath(path).parts):
            raise StarletteHTTPException(404)
        return await super().get_response(path, scope)


class ApiWithoutTrailingSlash:
    """`/api/datasets/` is `/api/datasets`. FastAPI would answer 307 to the address without
    the slash, which `curl -F` does not follow: the upload was lost without a word. The same
    for `/healthz/`: many load balancers count a redirect as down (or as up, unchecked)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and path.endswith("/") and (
                path.startswith("/api/") or path == "/healthz/"):
            raw = scope.get("raw_path") or path.encode()
            scope = {**scope, "path": path.rstrip("/"), "raw_path": raw.rstrip(b"/")}
        await self.app(scope, receive, send)


# The largest body a request other than an upload may send: an experiment's JSON is a few
# kB. Parsing a 40 MB one held the whole server for 20 s (health checks included).
MAX_BODY_BYTES = 1 << 20
# The routes that read their body as a stream, each to a limit of its own: a dataset's archive
# (SELFTUNE_MAX_UPLOAD_BYTES), the labels CSV added to a dataset (ingest.MAX_LABELS_CSV_BYTES:
# a dataset's own labels.csv passes 1 MiB at about 30,000 images) and the images a run's model
# is tried on (app.try_model).
OWN_BODY_LIMITS = re.compile(r"/api/datasets(/[0-9]+/labels)?|/api/runs/[0-9]+/predict")


class TokenBeforeBody:
    """With a token set, an API request with a body is refused (401, or 429 for an address
    guessing tokens) before its body is read: FastAPI reads and parses a route's JSON body
    before the route's dependencies run, require_token among them, so anyone could make the
    server parse megabytes (8 clients slowed /healthz from 9 ms to 1.8 s) and learn from a
    422 what the body lacked."""

    def __init__(self, app, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and self.settings.token is not None
                and scope["method"] in BODY_METHODS and scope["path"].startswith("/api/")):
            request = Request(scope)
            try:
                if not token_accepted(request, self.settings, presented_token(request)):
                    raise token_refused()
            except StarletteHTTPException as refused:  # fastapi.HTTPException derives from it
                response = JSONResponse({"detail": refused.detail}, refused.status_code,
                                        headers=refused.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class BodyLimit:
    """413 for a body over MAX_BODY_BYTES on any route but those with a limit of their own
    (OWN_BODY_LIMITS): by its Content-Length before anything is read, or while it streams in
    without one."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or OWN_BODY_LIMITS.fullmatch(scope["path"].rstrip("/")):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await self._refuse(scope, receive, send)
            return
        # Without a Content-Length (chunked), read it here, up to the limit.
        if declared == "" and scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                size += len(message.get("body", b""))
                if size > MAX_BODY_BYTES:
                    await self._refuse(scope, receive, send)
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            replayed = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

            async def replay():
                nonlocal replayed
                if replayed is not None:
                    message, replayed = replayed, None
                    return message
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send) -> None:
        detail = (f"the request body is over {MAX_BODY_BYTES // 1024} KiB, the most this "
                  "route takes (only dataset uploads, labels CSVs and images to try a model on "
                  "are larger)")
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


# On every answer: no other site may frame the pages (one click in an invisible frame
# queued a run again), browsers take content types as sent, and addresses (run ids, dataset
# names in query strings) do not leak to other sites through Referer.
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


def content_security_policy(nonce: str) -> bytes:
    """Scripts run only from this server's files or when they carry this answer's nonce: a
    name that slipped past escaping into a page could not run a script with the signed-in
    user's cookie. No plugins, no <base> to redirect the pages' relative addresses."""
    return (f"script-src 'self' 'nonce-{nonce}'; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'").encode()


class SecurityHeaders:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(18)
        scope = {**scope, "state": {**scope.get("state", {}), "csp_nonce": nonce}}
        headers = [*SECURITY_HEADERS, (b"content-security-policy", content_security_policy(nonce))]

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                added = [(n, v) for n, v in headers if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, with_headers)


class Compressed:
    """gzip for pages, JSON and static assets when the client accepts it (a run's metrics
    are a few hundred kB of JSON, Chart.js 200 kB). Downloads pass as they are: files a
    person saves keep their size for the progress bar, their ranges and their ETags; images,
    archives and live feeds are left alone by content type."""

    def __init__(self, app) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=1024, compresslevel=6)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not is_download(scope.get("path", "")):
            await self.gzip(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class HeadAsGet:
    """HEAD is GET without the body (RFC 9110), wherever GET is answered: FastAPI's routes
    take only the methods they declare, so pages, JSON and thumbnails answered HEAD with 405
    (link checkers and uptime monitors ask HEAD). Routes that declare HEAD themselves (the
    downloads, which then skip reading the file) keep it; live feeds never end, so they have
    none."""

    def __init__(self, app, router) -> None:
        self.app = app
        self.router = router

    @staticmethod
    def covers(path: str) -> bool:
        """Whether HEAD is answered as GET at `path` (not the live feeds)."""
        return not path.endswith("/events")

    def _declared(self, scope) -> bool:
        return any(route.matches(scope)[0] == Match.FULL for route in self.router.routes)

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or scope["method"] != "HEAD"
                or not self.covers(scope["path"]) or self._declared(scope)):
            await self.app(scope, receive, send)
            return

        async def headers_only(message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def on_exit_signal(callback: Callable[[], object]) -> Callable[[], None] | None:
    """Have `callback` run in the event loop when SIGINT or SIGTERM arrives, before the
    handler already installed (uvicorn's, which starts its graceful shutdown); returns what
    puts the previous handlers back, or None where signals cannot be caught (not the main
    thread: an in-process test client)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    loop = asyncio.get_running_loop()
    previous = {}

    def handle(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(callback)
        handler = previous[sig]
        if callable(handler):
            handler(sig, frame)
        elif handler == signal.SIG_DFL:  # what the signal would have done
            signal.signal(sig, handler)
            signal.raise_signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        from app.events import Hubs
        from app.reaper import reap_forever

        # First: a start refused here (another database's data directory, a database not at
        # this version) changes nothing; the reaper had requeued runs before it. A database
        # that does not answer yet is checked when it does, before the reaper acts on it.
        check = _app.state.data_dir_check
        if not check.tried:  # app_factory makes it first
            await run_in_threadpool(check_at_start, check)
        if settings.preload_engine:  # once the start is not refused
            start_preload()
        reaper = asyncio.create_task(reap_forever(settings, check))
        hubs = _app.state.hubs = Hubs(settings.effective_redis_url) if settings.redis_url else None

        def stop_feeds() -> None:  # the task is kept: the loop holds tasks only weakly
            _app.state.stopping_feeds = asyncio.create_task(hubs.stop())

        restore = on_exit_signal(stop_feeds) if hubs else None
        yield
        if restore is not None:
            restore()
        reaper.cancel()
        if _app.state.hubs is not None:
            await _app.state.hubs.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Self-Tuning Lab",
        version=__version__,
        description="Labeling-budget experiments: Self-Tuning vs fine-tuning vs FixMatch.",
        docs_url=None,  # FastAPI's own /docs and /redoc load a CDN; see _add_docs
        redoc_url=None,
        # Operation ids are the functions' names (upload_dataset, not FastAPI's
        # upload_dataset_api_datasets_post): clients generated from the schema read them.
        generate_unique_id_function=lambda route: route.name,
        dependencies=[Depends(refuse_work)],
    )
    app.state.settings = settings
    app.state.data_dir_check = DataDirCheck(settings)
    app.state.wrong_tokens = WrongTokens()
    app.add_middleware(BodyLimit)
    app.add_middleware(TokenBeforeBody, settings=settings)  # outside: before any body is read
    app.add_middleware(BrowserGuard, settings=settings)
    app.add_middleware(Compressed)  # inside HeadAsGet: HEAD gets GET's encoding and length
    app.add_middleware(HeadAsGet, router=app.router)
    # Outside HeadAsGet, which then sees `/events/` as `/events` (a feed: no HEAD).
    app.add_middleware(ApiWithoutTrailingSlash)
    app.add_middleware(SecurityHeaders)
    for router in API_ROUTERS:
        app.include_router(router, dependencies=[Depends(require_token)],
                           responses=TOKEN_RESPONSES)
    app.include_router(health.public_router)
    app.include_router(pages.router)
    app.include_router(dataset_pages.router)
    app.include_router(experiment_pages.router)
    app.mount("/static", StaticAssets(directory=STATIC_DIR), name="static")
    _add_docs(app)
    openapi.install(app)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OSError, _disk_full)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(StaleDataError, _deleted_meanwhile)
    app.add_exception_handler(ObjectDeletedError, _deleted_meanwhile)
    return app


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs, public like /openapi.json, from the app's own static files."""
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return _with_nonce(request, get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{VENDOR_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR_URL}/swagger-ui.css",
            swagger_favicon_url=f"{VENDOR_URL}/favicon-32x32.png",
            oauth2_redirect_url=oauth2_redirect_url,
            swagger_ui_parameters={"validatorUrl": None},  # its default asks swagger.io
        ))

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_oauth2_redirect(request: Request) -> HTMLResponse:
        return _with_nonce(request, get_swagger_ui_oauth2_redirect_html())


def _with_nonce(request: Request, page: HTMLResponse) -> HTMLResponse:
    """FastAPI's Swagger UI page with this answer's nonce on its scripts (one is inline)."""
    html = re.sub(r"<script(?=[\s>])", f'<script nonce="{csp_nonce(request)}"',
                  page.body.decode())
    return HTMLResponse(html, status_code=page.status_code)


def _wants_page(request: Request) -> bool:
    """A browser asking for a page (not the API, not an asset) gets errors as HTML."""
    path = request.url.path
    return (not path.startswith(("/api/", "/static/"))
            and "text/html" in request.headers.get("accept", ""))


def _error_page(request: Request, status_code: int, title: str, detail: str) -> Response:
    from app.routers.pages import templates

    return templates.TemplateResponse(
        request, "error.html", {"title": title, "detail": detail}, status_code=status_code
    )


# API answers that are files: a browser sent to sign in would save the sign-in page as one.
DOWNLOADS = ("/checkpoint", "/events", "/thumbnail", ".csv", "/archive", ".onnx")


def is_download(path: str) -> bool:
    return "/files/" in path or path.endswith(DOWNLOADS)


def _browser_opening_api(request: Request) -> bool:
    """A person's browser opening an API address (a page's "API" link): it asks for HTML."""
    path = request.url.path
    return (request.method == "GET" and path.startswith("/api/")
            and not is_download(path)
            and "text/html" in request.headers.get("accept", ""))


# FastAPI's whole answer to a body it could not decode for another reason than its JSON
# syntax (a 422 says that one).
UNREADABLE_BODY = "There was an error parsing the body"


HTTP_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route answers at this path (RFC 9110: a 405 lists them all). The
    router names only those of the first route that matched the path, and a download's HEAD
    and GET are two routes."""
    routes = request.app.router.routes
    allowed = {method for method in HTTP_METHODS if any(
        route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)}
    if "GET" in allowed and HeadAsGet.covers(request.scope["path"]):
        allowed.add("HEAD")
    return ", ".join(sorted(allowed))


def _unreadable_body(cause: BaseException | None) -> str:
    """UNREADABLE_BODY, saying what was wrong."""
    if isinstance(cause, UnicodeDecodeError):
        reason = "it is not UTF-8 text, which JSON must be"
    elif isinstance(cause, RecursionError):
        reason = "its JSON is nested too deeply"
    elif isinstance(cause, ValueError):  # an integer of more than 4,300 digits
        reason = str(cause).split(";")[0]
    else:
        reason = type(cause).__name__ if cause else "no reason given"
    return f"the request body could not be read: {reason}"


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 400 and exc.detail == UNREADABLE_BODY:
        exc = StarletteHTTPException(400, _unreadable_body(exc.__cause__))
    if exc.status_code == 405:
        exc = StarletteHTTPException(405, exc.detail, headers={
            **(exc.headers or {}), "Allow": _allowed_methods(request)})
    if exc.status_code == 401 and _browser_opening_api(request):
        from app.routers.pages import page_guard  # sign in, then back to this address

        if (redirect := page_guard(request, request.app.state.settings)) is not None:
            return redirect
    if not _wants_page(request):
        return await http_exception_handler(request, exc)
    if exc.status_code == 404:
        if exc.detail == "Not Found":  # no route at all
            return _error_page(request, 404, "Not found", "There is no page at this address.")
        detail = str(exc.detail)
        return _error_page(request, 404, "Not found",
                           f"{detail[:1].upper()}{detail[1:]}. It may have been deleted.")
    return _error_page(request, exc.status_code, f"Error {exc.status_code}", str(exc.detail))


async def _disk_full(request: Request, exc: OSError) -> Response:
    """A full disk is a 507 that says so (routes that write remove what they wrote); any
    other OSError stays the server error it is."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise exc
    settings: Settings = request.app.state.settings
    free = shutil.disk_usage(settings.data_dir).free
    detail = (f"the server's disk is full ({exc.strerror}; {free / 2**20:,.0f} MiB free in its "
              "data directory): nothing was kept; free some space and try again")
    return _insufficient_storage(request, detail)


DELETED_MEANWHILE = "it was deleted by another request while this one was being answered"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def _nothing_changed(request: Request) -> str:
    """What a refused request that would have changed something adds: that it changed nothing
    (a page read says nothing of changes it never meant to make)."""
    return "" if request.method in SAFE_METHODS else ": nothing was changed"


async def _deleted_meanwhile(request: Request, exc: StaleDataError | ObjectDeletedError
                             ) -> Response:
    """A row another request deleted while this one read or changed it (a rename as its
    dataset was deleted, its page read as it went): a 404, for it is gone, not a 500."""
    log.info("%s %s: %s", request.method, request.url.path, exc)
    detail = DELETED_MEANWHILE + _nothing_changed(request)
    if _wants_page(request):
        return _error_page(request, 404, "Not found", f"{detail[:1].upper()}{detail[1:]}.")
    return JSONResponse(status_code=404, content={"detail": detail})


# SQLite's SQLITE_FULL ("database or disk is full") and PostgreSQL's disk_full.
DATABASE_FULL = {sqlite3.SQLITE_FULL, "53100"}
# A database that cannot be reached or used for now: SQLite's file cannot be opened or stays
# locked; PostgreSQL refuses or drops the connection (SQLSTATE class 08, 57P: shutting down,
# not accepting connections), or none could be made at all (no SQLSTATE).
SQLITE_UNAVAILABLE = {sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


async def _database_error(request: Request, exc: OperationalError) -> Response:
    """The database's disk is full: a 507 like a full data directory (the write was rolled
    back, and routes that write files remove them). The database unreachable: a 503 that
    says so (it was a bare 500, text for the API too). Any other database error stays a 500."""
    cause = exc.orig
    sqlite_code = getattr(cause, "sqlite_errorcode", None)
    sqlstate = getattr(cause, "sqlstate", None)
    if (sqlite_code or sqlstate) in DATABASE_FULL:
        detail = (f"the database's disk is full ({str(cause).strip()}): nothing was kept; free "
                  "some space where the database keeps its files and try again")
        return _insufficient_storage(request, detail)
    unavailable = (sqlite_code in SQLITE_UNAVAILABLE if sqlite_code is not None
                   else sqlstate is None or sqlstate.startswith(("08", "57P")))
    if not unavailable:
        raise exc
    reason = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause)
    detail = (f"the database cannot be reached ({reason}){_nothing_changed(request)}; try "
              "again in a moment")
    if _wants_page(request):
        return _error_page(request, 503, "Database unavailable", detail)
    return JSONResponse(status_code=503, content={"detail": detail},
                        headers={"Retry-After": "5"})


def _insufficient_storage(request: Request, detail: str) -> Response:
    if _wants_page(request):
        return _error_page(request, 507, "Disk full", detail)
    return JSONResponse(status_code=507, content={"detail": detail})


def _json_safe(value):
    """JSON has no NaN or infinity, UTF-8 no lone surrogate (JSON's "\\ud800"): name them, so
    that an error can echo what was sent."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


# How much of a refused input a 422 echoes: a 100 MB name came back whole.
ECHO_CHARS, ECHO_ITEMS = 200, 20


def _echo(value):
    """A refused input as an error shows it: long text and long lists cut, saying so."""
    if isinstance(value, str) and len(value) > ECHO_CHARS:
        return f"{value[:ECHO_CHARS]}… ({len(value):,} characters)"
    if isinstance(value, list) and len(value) > ECHO_ITEMS:
        return [*map(_echo, value[:ECHO_ITEMS]), f"… ({len(value):,} items)"]
    if isinstance(value, list):
        return [_echo(item) for item in value]
    if isinstance(value, dict):
        shown = {key: _echo(item) for key, item in list(value.items())[:ECHO_ITEMS]}
        if len(value) > ECHO_ITEMS:
            shown["…"] = f"{len(value):,} keys"
        return shown
    return value


# pydantic's "Input should be a valid integer" (of 2.5, of "0.5 0.8"), in words a form can
# show beside its field: what is wanted, and what came.
NUMBER_WANTED = {"int_from_float": "a whole number", "int_parsing": "a whole number",
                 "int_type": "a whole number", "float_parsing": "a number",
                 "float_type": "a number"}
# Numbers apart without a comma ("0.5 0.8", "0.5; 0.8"): a list typed another way.
SEVERAL_NUMBERS = re.compile(r"\d\s*[\s;]\s*[-+.]?\d")


def _in_words(error: dict) -> dict:
    """A validation error with its message in words where pydantic's is about a type."""
    wanted = NUMBER_WANTED.get(error.get("type", ""))
    if wanted is None or "input" not in error:
        return error
    sent = error["input"]
    shown = json.dumps(_json_safe(_echo(sent)), ensure_ascii=False)
    message = f"must be {wanted}, not {shown}"
    if isinstance(sent, str) and SEVERAL_NUMBERS.search(sent):
        message += ": separate the values with commas"
    return {**error, "msg": message}


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    if not _wants_page(request):
        # FastAPI's own handler echoes each bad input, and a NaN sent as JSON made it a 500.
        errors = [{**error, "input": _echo(error["input"])} if "input" in error else error
                  for error in map(_in_words, exc.errors())]
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "application/json" and any(
                tuple(error.get("loc", ())) == ("body",) for error in errors):
            # A JSON body sent as a form (`curl -d` without the header) reads as no object.
            said = f"Content-Type {kind}" if kind else "no Content-Type"
            errors = [{"type": "json_content_type", "loc": ["body"],
                       "msg": f"send the body as JSON with the header Content-Type: "
                              f"application/json (it came with {said})"}]
        return JSONResponse(status_code=422,
                            content={"detail": _json_safe(jsonable_encoder(errors))})
    if any(error.get("loc", ())[:1] == ("path",) for error in exc.errors()):
        # /runs/abc: no such page, whatever the reason.
        return _error_page(request, 404, "Not found", "There is no page at this address.")
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error.get('loc', ())[1:])}: {_in_words(error)['msg']}"
        for error in exc.errors()
    )
    return _error_page(request, 422, "This address has a bad parameter", problems)


def app_factory() -> FastAPI:
    """Entry point for `uvicorn --factory app.main:app_factory`. A start the data directory
    check refuses (app.startup: an unmigrated database, another database's directory) exits
    with status 2 and the reason in one line, as a worker does; from the lifespan it was a
    traceback of 70 lines."""
    app = create_app(settings_or_exit("web"))
    try:
        check_at_start(app.state.data_dir_check)
    except StartupRefused as exc:
        print(f"[selftune] web cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return app
