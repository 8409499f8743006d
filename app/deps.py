"""Shared FastAPI dependencies: settings, database sessions, Redis, and the API token."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import get_sessionmaker
from app.live import get_redis
from app.models import MAX_ID

AUTH_COOKIE = "selftune_token"

# Past MAX_ID a lookup failed inside the database driver with a 500; now the request is a 422.
DatasetId = Annotated[int, Path(ge=1, le=MAX_ID, description="Dataset id")]
ExperimentId = Annotated[int, Path(ge=1, le=MAX_ID, description="Experiment id")]
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="Run id")]
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="Image id")]
DatasetFilter = Annotated[int | None, Query(ge=1, le=MAX_ID, description="Dataset id")]


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


def require_token(request: Request, settings: SettingsDep,
                  _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
    """With SELFTUNE_API_TOKEN set, every API route needs `Authorization: Bearer <token>`
    (or the HttpOnly cookie the login page sets)."""
    if not token_matches(settings, presented_token(request)):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
