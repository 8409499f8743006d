"""GET /api/health: database, Redis and the workers that are alive, with their devices."""

from __future__ import annotations

from typing import Any, Literal

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app import __version__
from app.config import Settings
from app.db import ping_database
from app.deps import SettingsDep
from app.live import get_redis, live_workers

router = APIRouter(tags=["health"])
# Without the token: what an uptime monitor or a load balancer may know, and no more.
public_router = APIRouter(tags=["health"])


class WorkerOut(BaseModel):
    name: str
    device: str


class HealthOut(BaseModel):
    database: str
    redis: str
    workers: list[WorkerOut]
    version: str


def check_health(settings: Settings, refusal: str | None = None) -> dict[str, Any]:
    """What answers; `refusal`: why the web refused its database (app.startup), which is
    then the database's status even though it answers."""
    status: dict[str, Any] = {"version": __version__, "workers": []}
    try:
        ping_database(settings.sqlalchemy_url)
        status["database"] = "ok" if refusal is None else f"refused: {refusal}"
    except Exception as exc:  # any driver error means the database is not usable
        status["database"] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    try:
        client = get_redis(settings.effective_redis_url)
        client.ping()
        status["redis"] = "ok"
        status["workers"] = live_workers(client)
    except (redis.RedisError, RuntimeError) as exc:
        status["redis"] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    return status


def is_healthy(status: dict[str, Any]) -> bool:
    """Whether `check_health` found the database and Redis answering."""
    return status["database"] == "ok" and status["redis"] == "ok"


@router.get(
    "/api/health",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "database or Redis is down"}},
)
def health(request: Request, settings: SettingsDep) -> JSONResponse:
    status = check_health(settings, request.app.state.data_dir_check.refusal)
    return JSONResponse(status, status_code=200 if is_healthy(status) else 503)


class LivenessOut(BaseModel):
    status: Literal["ok", "unavailable"]


@public_router.get(
    "/healthz",
    response_model=LivenessOut,
    responses={503: {"model": LivenessOut, "description": "database or Redis is down"}},
)
def liveness(request: Request, settings: SettingsDep) -> JSONResponse:
    """For uptime monitors and load balancers: needs no token, and says only whether the
    database and Redis answer (/api/health has the details)."""
    healthy = is_healthy(check_health(settings, request.app.state.data_dir_check.refusal))
    return JSONResponse({"status": "ok" if healthy else "unavailable"},
                        status_code=200 if healthy else 503)
