"""HTML pages (Jinja2): thin views over the same data the REST API serves."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlparse

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlalchemy.exc import SQLAlchemyError

from app import __version__
from app.config import Settings
from app.db import get_sessionmaker
from app.deps import AUTH_COOKIE, SettingsDep, presented_token, token_accepted, token_checked
from app.experiments import GOING, as_shown
from app.live import get_redis
from app.models import MAX_ID, Dataset
from app.responses import csp_nonce, in_utc, utc_text
from app.routers.datasets import dataset_names, newest_datasets
from app.routers.experiments import experiment_items
from app.routers.health import check_health
from app.schemas import ExperimentListItem, TimeLeft
from worker.selftuning.pixels import IMAGE_SUFFIXES

METHOD_TITLES = {"self-tuning": "Self-Tuning", "fine-tune": "Fine-tuning", "fixmatch": "FixMatch"}
HOME_SHOWN = 5  # the newest experiments and datasets on the home page

TEMPLATES_DIR = Path(__file__).resolve().parent.parent.parent / "templates"
# Every page's inline scripts carry the answer's nonce, which its Content-Security-Policy names.
templates = Jinja2Templates(directory=TEMPLATES_DIR,
                            context_processors=[lambda request: {"csp_nonce": csp_nonce(request)}])
templates.env.globals["version"] = __version__
# What a page's image input (Try the model) offers to choose: the images an upload reads.
templates.env.globals["image_accept"] = ",".join((
    "image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "image/gif",
    *IMAGE_SUFFIXES))


def signed_in(request: Request) -> bool:
    """Signed in through the login page with the token in force (a cookie from before the
    token changed does not count): then the pages offer to sign out."""
    settings = request.app.state.settings
    cookie = request.cookies.get(AUTH_COOKIE)
    return (settings.token is not None and bool(cookie)
            and token_checked(request, settings, cookie) is True)


templates.env.globals["signed_in"] = signed_in


def moment(value: datetime) -> Markup:
    """A stored time (UTC; SQLite gives it back without a zone) as a <time> element that says
    UTC; /static/times.js rewrites it in the reader's own time zone."""
    return Markup('<time datetime="{}">{} UTC</time>').format(
        utc_text(value), in_utc(value).strftime("%Y-%m-%d %H:%M"))


def percent(share: float, unit: str = "%") -> str:
    """A share as the pages' scripts write it (`pct` in /static/charts.js): "91.7%"."""
    return f"{as_shown(share)}{unit}"


templates.env.filters["moment"] = moment
templates.env.filters["percent"] = percent
# An experiment in one of these has runs to go: a list that shows it reads itself again
# (/static/read_again.js) until it has ended.
templates.env.globals["going"] = GOING


def roughly(seconds: float) -> str:
    """A time left as a person says it, as the experiment page writes it: "under a minute",
    "12 min", "3 h 5 min"."""
    if seconds < 60:
        return "under a minute"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 2 * 24 * 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes // (24 * 60)} d {minutes % (24 * 60) // 60} h"


def time_left_text(left: TimeLeft | None) -> str:
    """A list's word on an experiment's time left: "about 12 min left", "over 12 min left"
    while some runs (its own, or those ahead of them) are not timed yet (their method has not
    trained), "" while none of them is."""
    if left is None:
        return ""
    if left.untimed_runs or left.ahead_untimed_runs:
        if not left.seconds:
            return ""
        return f"over {roughly(left.seconds)} left" if left.seconds >= 60 else \
            "a minute or more left"
    return f"about {roughly(left.seconds)} left" if left.seconds >= 60 else \
        "under a minute left"


templates.env.filters["time_left"] = time_left_text

router = APIRouter(include_in_schema=False)

LIST_PAGE_SIZE = 100  # rows of the dataset and experiment lists per page
PageNumber = Annotated[int, Query(ge=1, le=MAX_ID, description="page of the list, from 1")]


@dataclass(frozen=True)
class Pager:
    """One page of a list, newest first, and the addresses of the pages beside it."""

    request: Request
    page: int
    total: int
    size: int = LIST_PAGE_SIZE

    @classmethod
    def fetch(cls, request: Request, page: int,
              rows: Callable[[int, int], tuple[int, list[Any]]]) -> tuple[Pager, list[Any]]:
        """Page `page` of a list: `rows(limit, offset)` gives its total and that page's rows."""
        total, items = rows(LIST_PAGE_SIZE, (page - 1) * LIST_PAGE_SIZE)
        return cls(request, page, total), items

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.size))

    @property
    def first_item(self) -> int:
        return min(self.offset + 1, self.total)

    @property
    def last_item(self) -> int:
        return min(self.offset + self.size, self.total)

    @property
    def newer(self) -> int | None:
        """The page before this one (the last page, from past the end)."""
        return min(self.page - 1, self.pages) if self.page > 1 else None

    @property
    def older(self) -> int | None:
        return self.page + 1 if self.page < self.pages else None

    def url(self, page: int) -> str:
        """This list's address at another page (its other parameters kept)."""
        return f"{self.request.url.path}?{self.request.url.include_query_params(page=page).query}"


def page_guard(request: Request, settings) -> Response | None:
    """Redirect to the login form when a token is configured and not presented."""
    if token_accepted(request, settings, presented_token(request)):
        return None
    # The whole address comes back after the login (a form's ?dataset_id=5 included).
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)


def render(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, template, context, status_code=status_code)


@dataclass
class Latest:
    """The newest experiments and datasets, as the home page lists them."""

    experiments: list[ExperimentListItem]
    experiments_total: int
    dataset_names: dict[int, str]  # of the datasets the experiments ran on
    datasets: list[Dataset]
    datasets_total: int


def latest_work(settings: Settings) -> Latest:
    """The newest HOME_SHOWN experiments (how each stands, its best model) and datasets."""
    with get_sessionmaker(settings.sqlalchemy_url)() as session:
        experiments_total, experiments = experiment_items(
            session, get_redis(settings.effective_redis_url), None, HOME_SHOWN, 0)
        datasets_total, datasets = newest_datasets(session, HOME_SHOWN, 0)
        names = dataset_names(session, {e.dataset_id for e in experiments})
    return Latest(experiments, experiments_total, names, datasets, datasets_total)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, settings: SettingsDep) -> Response:
    """Where the work stands (the newest experiments and datasets), or where to start, and
    whether database, Redis and workers answer."""
    if (redirect := page_guard(request, settings)) is not None:
        return redirect
    health = check_health(settings)
    latest = None
    if health["database"] == "ok":
        try:
            latest = latest_work(settings)
        except SQLAlchemyError as exc:  # gone since the health check: its status says so
            health["database"] = f"error: {type(exc).__name__}"
    return render(request, "home.html", health=health, latest=latest,
                  method_titles=METHOD_TITLES)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, settings: SettingsDep, next: str = "/") -> Response:
    if settings.token is None:  # nothing to sign in to (the form said "protected")
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "login.html", next=next, error=None)


def _safe_next(target: str) -> str:
    """Where to go after signing in: an address on this server, else "/". Browsers read
    "///host", "/\\host" and "/<tab>/host" as another site (Python's urlparse does not)."""
    if (not target.startswith("/") or target.startswith(("//", "/\\"))
            or any(ord(c) < 32 or c == "\x7f" for c in target)):
        return "/"
    parsed = urlparse(target)
    if parsed.scheme or parsed.netloc:
        return "/"
    return target


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    settings: SettingsDep,
    token: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/",
) -> Response:
    if settings.token is None:  # any token "signed in" and set a cookie
        return RedirectResponse(_safe_next(next), status_code=303)
    try:
        accepted = token_accepted(request, settings, token)
    except HTTPException as exc:  # too many wrong tokens: the form says so
        return templates.TemplateResponse(
            request, "login.html", {"next": next, "error": f"{exc.detail[:1].upper()}"
                                    f"{exc.detail[1:]}."},
            status_code=exc.status_code, headers=exc.headers,
        )
    if not accepted:
        return templates.TemplateResponse(
            request, "login.html", {"next": next, "error": "That token is not right."},
            status_code=401,
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        AUTH_COOKIE, token, httponly=True, samesite="strict",
        secure=request.url.scheme == "https", max_age=30 * 24 * 3600,
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(AUTH_COOKIE)
    return response
