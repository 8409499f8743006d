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


@app.task(name="selftune.train_run", bind=True)
def train_run(self, run_id: int) -> dict:
    """Train one run end to end. Redelivered after a worker loss, it resumes from the run's
    last training checkpoint (the engine finds it in the run's output directory)."""
    from worker.training import execute_run

    return execute_run(
        get_settings(), run_id, worker_name=self.request.hostname, task_id=self.request.id
    )
