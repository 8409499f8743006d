"""Celery tasks: thin glue between the queue, the database and the training engine."""

from __future__ import annotations

from sqlalchemy import func, select

from app.config import get_settings
from app.db import session_scope
from app.models import Dataset
from worker.celery_app import app, worker_identity


@app.task(name="selftune.health_probe", bind=True)
def health_probe(self) -> dict:
    """Round trip through a worker and the database: proves the worker can do real work."""
    settings = get_settings()
    with session_scope(settings.sqlalchemy_url) as session:
        datasets = session.scalar(select(func.count()).select_from(Dataset))
    return {
        "worker": self.request.hostname,
        "device": worker_identity().get("name"),
        "datasets": datasets,
    }
