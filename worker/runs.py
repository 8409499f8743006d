"""Run bookkeeping for the worker: status changes, metrics, events on Redis, artifacts."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.live import experiment_stream_key, get_redis, run_cancel_key, run_stream_key
from app.models import Artifact, DatasetImage, Run, RunMetric

log = logging.getLogger(__name__)

EXPORTED_FILES = ("model.safetensors", "config.json", "training.json", "predictions.csv")


def utcnow() -> datetime:
    return datetime.now(UTC)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunRecorder:
    """Writes what a run does: the database is the record, Redis streams carry the live feed.

    Redis being away (restarting) never stops training: events are then only recorded in the
    database, and the stream picks up again when Redis is back.
    """

    def __init__(self, settings: Settings, run_id: int, experiment_id: int) -> None:
        self.settings = settings
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.redis = get_redis(settings.effective_redis_url)
        self.url = settings.sqlalchemy_url
        self.last_recorded = self._last_recorded_steps()
        self._last_cancel_check = 0.0
        self._cancelled = False

    def _last_recorded_steps(self) -> dict[str, int]:
        """Per kind (progress, eval), the last step already in the database."""
        with session_scope(self.url) as session:
            rows = session.execute(
                select(RunMetric.kind, func.max(RunMetric.step))
                .where(RunMetric.run_id == self.run_id)
                .group_by(RunMetric.kind)
            ).all()
        return {kind: int(step) for kind, step in rows}

    # --- live feed -------------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        event = {"run_id": self.run_id, "time": time.time(), **event}
        data = json.dumps(event, default=float)
        maxlen = self.settings.event_stream_maxlen
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(run_stream_key(self.run_id), {"data": data}, maxlen=maxlen, approximate=True)
            pipe.xadd(
                experiment_stream_key(self.experiment_id), {"data": data},
                maxlen=maxlen, approximate=True,
            )
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("run %s: live event not published (%s)", self.run_id, exc)

    # --- engine callbacks ------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        step = int(event.get("step", 0))
        if kind in ("progress", "eval"):
            # After a resume the engine repeats the steps since its last checkpoint; the
            # record and the feed keep their first copy so the series stays continuous.
            if step <= self.last_recorded.get(kind, 0):
                return
            values = {k: v for k, v in event.items() if k not in ("type", "step", "total_steps")}
            with session_scope(self.url) as session:
                self._upsert_metric(session, kind, step, values)
                run = session.get(Run, self.run_id)
                run.step = max(run.step, step)
                run.heartbeat_at = utcnow()
                if kind == "progress" and event.get("images_per_s"):
                    run.images_per_s = float(event["images_per_s"])
            self.last_recorded[kind] = step
        self.publish(event)

    def _upsert_metric(self, session: Session, kind: str, step: int, values: dict) -> None:
        existing = session.scalar(
            select(RunMetric).where(
                RunMetric.run_id == self.run_id, RunMetric.kind == kind, RunMetric.step == step
            )
        )
        if existing is None:
            session.add(RunMetric(run_id=self.run_id, kind=kind, step=step, values=values))
        else:
            existing.values = values

    def should_cancel(self) -> bool:
        """Checked every iteration: a Redis key (cheap), with the database as a fallback."""
        if self._cancelled:
            return True
        try:
            if self.redis.exists(run_cancel_key(self.run_id)):
                self._cancelled = True
                return True
        except redis.RedisError:
            pass
        now = time.monotonic()
        if now - self._last_cancel_check > 5:
            self._last_cancel_check = now
            with session_scope(self.url) as session:
                run = session.get(Run, self.run_id)
                run.heartbeat_at = utcnow()
                self._cancelled = bool(run.cancel_requested)
        return self._cancelled

    # --- outcomes --------------------------------------------------------------------------

    def record_artifacts(self, out_dir: Path) -> list[str]:
        names = []
        with session_scope(self.url) as session:
            for name in EXPORTED_FILES + ("test_predictions.json",):
                path = out_dir / name
                if not path.is_file():
                    continue
                relative = str(path.relative_to(self.settings.data_dir))
                artifact = session.scalar(
                    select(Artifact).where(Artifact.run_id == self.run_id, Artifact.name == name)
                )
                if artifact is None:
                    artifact = Artifact(run_id=self.run_id, name=name, path=relative, sha256="")
                    session.add(artifact)
                artifact.path = relative
                artifact.size_bytes = path.stat().st_size
                artifact.sha256 = sha256_of(path)
                names.append(name)
        return names

    def finish(self, status: str, *, metrics: dict | None = None, error: str | None = None) -> None:
        with session_scope(self.url) as session:
            run = session.get(Run, self.run_id)
            run.status = status
            run.finished_at = utcnow()
            run.error = error
            if metrics is not None:
                run.metrics = metrics
                run.step = run.total_steps
        self.publish({"type": "end", "status": status, "error": error,
                      "metrics": _headline(metrics)})
        try:
            self.redis.delete(run_cancel_key(self.run_id))
        except redis.RedisError:
            pass


def _headline(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    keys = ("test_top1", "test_mean_class_acc", "pseudo_label_acc", "train_pseudo_label_acc")
    return {key: metrics.get(key) for key in keys}


def rewrite_predictions(out_dir: Path, session: Session, dataset_root: Path, run: Run) -> None:
    """Give predictions.csv the archive's own paths and image ids instead of storage paths."""
    path = out_dir / "predictions.csv"
    if not path.is_file():
        return
    images = {
        str((dataset_root / image.path).resolve()): image
        for image in session.scalars(
            select(DatasetImage).where(DatasetImage.dataset_id == run.dataset_id)
        )
    }
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image_id" in rows[0]:
        return
    fieldnames = ["image_id", "path"] + [k for k in rows[0] if k != "path"]
    temp = path.with_suffix(".tmp")
    with open(temp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        for row in rows:
            image = images.get(str(Path(row["path"]).resolve()))
            row["image_id"] = image.id if image else ""
            row["path"] = image.original_path if image else Path(row["path"]).name
            writer.writerow(row)
    temp.replace(path)
