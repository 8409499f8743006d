"""Run bookkeeping for the worker: status changes, metrics, events on Redis, artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select, update
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.live import (
    experiment_stream_key,
    get_redis,
    publish_end,
    publish_status,
    run_cancel_key,
    run_stream_key,
)
from app.models import Artifact, DatasetImage, Run, RunMetric
from worker.selftuning.files import read_csv, replace_csv

log = logging.getLogger(__name__)

EXPORTED_FILES = ("model.safetensors", "config.json", "training.json", "predictions.csv")

# The errors of a database that cannot be reached (down, restarting, locked, its file gone):
# worth trying again later, unlike a bug in a query.
DATABASE_DOWN = (OperationalError, InterfaceError)


class DatabaseUnavailable(Exception):
    """The database could not be reached to start a run or to record its outcome: the
    training task retries later (worker/celery_app.py), as nothing else would pick the run up
    again."""


def retry_while_database_down(action, what: str, within_s: float):
    """`action()`, tried again while the database is unreachable, for up to `within_s`
    seconds; then its error is raised."""
    deadline = time.monotonic() + within_s
    delay = 0.5
    while True:
        try:
            return action()
        except DATABASE_DOWN as exc:
            if time.monotonic() + delay > deadline:
                log.error("%s: gave up after %.0fs, the database is unreachable (%s)",
                          what, within_s, exc)
                raise
            log.warning("%s: the database is unreachable (%s); trying again in %.1fs",
                        what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


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
    database, and the stream picks up again when Redis is back. Nor does the database being
    away: events still go to Redis, the metric points wait in memory (the newest
    `MAX_UNSAVED`) and are written with the next point that gets through; only if the database
    is still away at the end, after `finish_retry_s` of trying, are they and the outcome lost.
    """

    MAX_UNSAVED = 10_000
    finish_retry_s = 300.0

    def __init__(self, settings: Settings, run_id: int, experiment_id: int) -> None:
        self.settings = settings
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.redis = get_redis(settings.effective_redis_url)
        self.url = settings.sqlalchemy_url
        self.last_recorded = self._last_recorded_steps()
        self._unsaved: list[tuple[str, int, dict[str, Any]]] = []  # (kind, step, values)
        self._last_cancel_check = 0.0
        self._cancelled = False
        self.saved_step = 0  # the step of the newest training state (a checkpoint event)

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
        if kind == "checkpoint":
            self.saved_step = max(self.saved_step, step)
            # Where the worker keeps the state is its own business (an absolute path on its
            # file system, gone once the run succeeds): the feed says the step.
            event = {key: value for key, value in event.items() if key != "path"}
        if kind in ("progress", "eval"):
            # After a resume the engine repeats the steps since its last checkpoint; the
            # record and the feed keep their first copy so the series stays continuous.
            if step <= self.last_recorded.get(kind, 0):
                return
            values = {k: v for k, v in event.items() if k not in ("type", "step", "total_steps")}
            self._unsaved.append((kind, step, values))
            self.last_recorded[kind] = step
            self._save_metrics()
        self.publish(event)

    def _save_metrics(self) -> None:
        """Write the points not yet in the database; while it is away they wait for the next."""
        try:
            with session_scope(self.url) as session:
                self._write_unsaved(session)
        except SQLAlchemyError as exc:  # a database outage must not stop training
            del self._unsaved[:-self.MAX_UNSAVED]
            log.warning("run %s: %d metric point(s) not recorded yet (%s)",
                        self.run_id, len(self._unsaved), exc)
            return
        self._unsaved.clear()

    def _write_unsaved(self, session: Session) -> None:
        if not self._unsaved:
            return
        run = session.get(Run, self.run_id)
        for kind, step, values in self._unsaved:
            self._upsert_metric(session, kind, step, values)
            run.step = max(run.step, step)
            if kind == "progress" and values.get("images_per_s"):
                run.images_per_s = float(values["images_per_s"])
        run.heartbeat_at = utcnow()

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
            try:
                with session_scope(self.url) as session:
                    run = session.get(Run, self.run_id)
                    run.heartbeat_at = utcnow()
                    self._cancelled = bool(run.cancel_requested)
            except SQLAlchemyError as exc:  # training goes on; Redis still carries a cancel
                log.warning("run %s: cancel check in the database failed (%s)", self.run_id, exc)
        return self._cancelled

    # --- outcomes --------------------------------------------------------------------------

    def record_artifacts(self, out_dir: Path) -> list[str]:
        return retry_while_database_down(
            lambda: self._record_artifacts(out_dir), f"run {self.run_id}: recording artifacts",
            self.finish_retry_s,
        )

    def _record_artifacts(self, out_dir: Path) -> list[str]:
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
        """Record the outcome (and any metric points still unsaved), trying for up to
        `finish_retry_s` while the database is unreachable; then end the live feed."""

        def record() -> None:
            with session_scope(self.url) as session:
                self._write_unsaved(session)
                run = session.get(Run, self.run_id)
                run.status = status
                run.finished_at = utcnow()
                run.error = error
                # A cancel saves the state at the step reached, which may be past the last
                # progress point: the record says where a "Run again" resumes, as the feed did.
                run.step = max(run.step, self.saved_step)
                if metrics is not None:
                    run.metrics = metrics
                    run.step = run.total_steps

        retry_while_database_down(record, f"run {self.run_id}: recording it {status}",
                                  self.finish_retry_s)
        self._unsaved.clear()
        self.publish({"type": "end", "status": status, "error": error,
                      "metrics": _headline(metrics)})
        try:
            self.redis.delete(run_cancel_key(self.run_id))
        except redis.RedisError:
            pass

    def step_aside(self) -> bool:
        """The worker is stopping (see worker.training.StopSignal): the run, its training state
        saved at `saved_step`, goes back to the queue under the same task, behind the runs
        already waiting, to resume from there on the next worker. The stop is not the run's
        doing, so this attempt does not count against it. Returns whether the run was still
        this worker's to hand back."""

        def record() -> Run | None:
            with session_scope(self.url) as session:
                run = session.get(Run, self.run_id, with_for_update=True)
                if run is None or run.status != "running":  # deleted, or reaped meanwhile
                    return None
                self._write_unsaved(session)
                run.status = "queued"
                run.queued_at = utcnow()  # where the broker puts it: behind those waiting
                run.attempts = max(run.attempts - 1, 0)
                run.step = max(run.step, self.saved_step)
                return run

        run = retry_while_database_down(record, f"run {self.run_id}: putting it back in the "
                                        "queue", self.finish_retry_s)
        self._unsaved.clear()
        if run is not None:
            publish_status(self.redis, run)
        return run is not None


def undo_hand_back(settings: Settings, run_id: int, task_id: str | None) -> bool:
    """The run was handed back (`RunRecorder.step_aside`) but its task could not be sent to
    the broker again (Redis is away): as "queued" nothing would ever take it. It is set back
    to "running", its heartbeat left to go stale, so the reaper finds it silent and queues it
    again with a new task once the broker is back; it resumes from the state it saved. Only
    a run still queued under this task is touched; returns whether it was."""
    with session_scope(settings.sqlalchemy_url) as session:
        return bool(session.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == "queued", Run.celery_task_id == task_id)
            .values(status="running")
        ).rowcount)


def fail_unstarted_run(settings: Settings, run_id: int, task_id: str | None,
                       error: str) -> bool:
    """The task's last resort when it could not even take its run (the worker cannot load its
    training code, the data directory cannot be written, ...): end the run failed with the
    reason instead of leaving it queued, where nothing would ever pick it up. Only a run
    still queued for this task is touched; returns whether it was."""
    with session_scope(settings.sqlalchemy_url) as session:
        ended = session.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == "queued",
                   (Run.celery_task_id == task_id) | Run.celery_task_id.is_(None))
            .values(status="failed", error=error[:8000], finished_at=utcnow())
        ).rowcount
        run = session.get(Run, run_id) if ended else None  # kept loaded past the commit
    if run is not None:  # after the commit: a page reading the record sees the end
        publish_end(get_redis(settings.effective_redis_url), run)
    return run is not None


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
    columns, rows = read_csv(path)
    if "image_id" in columns:
        return
    for row in rows:
        image = images.get(str(Path(row["path"]).resolve()))
        row["image_id"] = image.id if image else ""
        row["path"] = image.original_path if image else Path(row["path"]).name
    replace_csv(path, ["image_id", "path"] + [k for k in columns if k != "path"], rows)
