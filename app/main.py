"""The FastAPI application: REST routers under /api, Jinja2 pages, static assets."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.config import Settings, get_settings
from app.deps import require_token
from app.routers import (
    dataset_pages,
    datasets,
    experiment_pages,
    experiments,
    health,
    pages,
    runs,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"

API_ROUTERS = [health.router, datasets.router, experiments.router, runs.router]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        from app.events import Hubs
        from app.reaper import reap_forever

        reaper = asyncio.create_task(reap_forever(settings))
        _app.state.hubs = Hubs(settings.effective_redis_url) if settings.redis_url else None
        yield
        reaper.cancel()
        if _app.state.hubs is not None:
            await _app.state.hubs.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Self-Tuning Lab",
        version=__version__,
        description="Labeling-budget experiments: Self-Tuning vs fine-tuning vs FixMatch.",
    )
    app.state.settings = settings
    for router in API_ROUTERS:
        app.include_router(router, dependencies=[Depends(require_token)])
    app.include_router(pages.router)
    app.include_router(dataset_pages.router)
    app.include_router(experiment_pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def app_factory() -> FastAPI:
    """Entry point for `uvicorn --factory app.main:app_factory`."""
    return create_app()
