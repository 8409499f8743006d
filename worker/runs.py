"""Run bookkeeping for the worker: status changes, metrics, events on Redis, artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.live import (
    add_to_feeds,
    cancels,
    forget_feeds,
    get_redis,
    headline,
    publish_end,
    publish_status,
    run_cancel_key,
)
from app.models import Artifact, DatasetImage, Experiment, Run, RunMetric, split_metrics
from app.reaper import Losses
from worker.selftuning.files import (
    CONFIG_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    TEST_PREDICTIONS_FILE,
    TRAINING_FILE,
    read_csv,
    replace_csv,
    write_json,
)

log = logging.getLogger(__name__)

EXPORTED_FILES = (MODEL_FILE, CONFIG_FILE, TRAINING_FILE, PREDICTIONS_FILE, TEST_PREDICTIONS_FILE)

# The errors of a database that cannot be reached (down, restarting, locked, its file gone):
# worth trying again later, unlike a bug in a query.
DATABASE_DOWN = (OperationalError, InterfaceError)


class RunDeleted(Exception):
    """The run's row is gone: it was deleted (with its experiment or dataset) while this
    worker still held it, say paused or silent long enough for the reaper to end it first.
    Nothing more is recorded or published for it; worker.training removes its folder."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} no longer exists (deleted)")
        self.run_id = run_id


class RunTakenAway(Exception):
    """The run is no longer this process's: while it was paused (SIGSTOP, a VM freeze, a long
    stall) past `stale_after_s`, the reaper ended it or queued it again under a new task, which
    another worker may have claimed since. Nothing more is recorded or published for it, and its
    folder stays for the attempt that has it (see `RunRecorder.hold`)."""

    def __init__(self, run_id: int, state: str) -> None:
        super().__init__(f"run {run_id} was taken from this worker (it is now {state})")
        self.run_id = run_id


def held_by(worker: str, task_id: str | None) -> ColumnElement[bool]:
    """Where a run is still the one `worker` claimed for `task_id` (`holds`, in SQL)."""
    held = (Run.status == "running") & (Run.worker == worker)
    if task_id is not None:
        held &= Run.celery_task_id.is_(None) | (Run.celery_task_id == task_id)
    return held


def holds(run: Run, worker: str, task_id: str | None) -> bool:
    """Whether the run is still "running" as `worker` claimed it for `task_id`: a requeue
    stamps a new task id (the reaper's, or a person's), and a claim writes its worker's name."""
    return (run.status == "running" and run.worker == worker
            and (task_id is None or run.celery_task_id in (None, task_id)))


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


T = TypeVar("T")


@lru_cache
def _feed_client(url: str) -> redis.Redis:
    """The worker's own client for what it asks Redis during training. app.live's client
    waits 10 s for an answer and tries 3 more times: against a Redis that hangs (stopped,
    its connections neither answered nor refused) that was 10-40 s at every step."""
    return redis.Redis.from_url(
        url, socket_timeout=LiveFeed.timeout_s, socket_connect_timeout=LiveFeed.timeout_s,
        retry=Retry(NoBackoff(), 0), decode_responses=True,
    )


class LiveFeed:
    """Redis as training uses it, at most every iteration: a call costs at most `timeout_s`,
    and after a failed one Redis is left alone for `pause_s`, so a Redis that is down or
    hangs costs training at most `timeout_s` every `pause_s`. One warning per outage."""

    timeout_s = 0.5
    pause_s = 5.0

    def __init__(self, url: str, run_id: int) -> None:
        self.client = _feed_client(url)
        self.run_id = run_id
        self._skip_until = 0.0
        self._away_since: float | None = None

    def call(self, action: Callable[[redis.Redis], T], default: T, *, now: bool = False) -> T:
        """`action(client)`, or `default` when Redis fails or is being left alone (`now`:
        tried all the same, for what happens once in a run)."""
        if not now and time.monotonic() < self._skip_until:
            return default
        try:
            result = action(self.client)
        except redis.RedisError as exc:
            failed_at = time.monotonic()
            self._skip_until = failed_at + self.pause_s
            if self._away_since is None:
                self._away_since = failed_at
                log.warning("run %s: Redis is not answering (%s); training goes on without "
                            "the live feed (metrics are recorded in the database, which also "
                            "carries a cancel), trying Redis again every %.0fs",
                            self.run_id, exc, self.pause_s)
            return default
        if self._away_since is not None:
            log.info("run %s: Redis answers again, after %.0fs", self.run_id,
                     time.monotonic() - self._away_since)
            self._away_since = None
        return result


# The events an experiment's feed gets of each run only once per this share of its steps.
THINNED_FOR_EXPERIMENT = ("progress", "eval", "checkpoint")
EXPERIMENT_FEED_SHARE = 0.01


class RunRecorder:
    """Writes what a run does: the database is the record, Redis streams carry the live feed.

    Redis being away (restarting, or hanging) never stops training: events are then kept in
    memory, and the stream gets them, in order, when Redis is back (`LiveFeed` keeps what each
    iteration asks of it short). Nor does the database being
    away: events still go to Redis, the metric points wait in memory (the newest
    `MAX_UNSAVED`) and are written with the next point that gets through; only if the database
    is still away at the end, after `finish_retry_s` of trying, are they and the outcome lost.

    A run whose row is gone was deleted: the recorder then raises `RunDeleted` (the cancel
    check, writing a point, recording an outcome) and writes and publishes nothing more. Once
    the task has claimed the run (`hold`), a run taken from this process is treated alike
    (`RunTakenAway`), but keeps its folder.
    """

    MAX_UNSAVED = 10_000
    finish_retry_s = 300.0
    database_check_s = 5.0  # how often `should_cancel` asks the database

    def __init__(self, settings: Settings, run_id: int, experiment_id: int) -> None:
        self.settings = settings
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.live = LiveFeed(settings.effective_redis_url, run_id)
        self.redis = self.live.client
        self.url = settings.sqlalchemy_url
        self.last_recorded = self._last_recorded_steps()
        self._unsaved: list[tuple[str, int, dict[str, Any]]] = []  # (kind, step, values)
        self._last_cancel_check = 0.0
        self._read_database_next = False  # the next cancel check reads the database
        self._cancelled = False
        self.deleted = False
        self.saved_step = 0  # the step of the newest training state (a checkpoint event)
        # Set by `hold` once the run is claimed; until then nothing is checked.
        self.worker: str | None = None
        self.task_id: str | None = None
        self.folder_locked = False
        self.taken_away: str | None = None  # what the run had become, once it was taken
        # Per kind of event thinned for the experiment's feed, the step of the last sent there.
        self._sent_to_experiment: dict[str, int] = {}
        # (event, whether for the experiment's feed too) not in the feeds yet: those Redis did
        # not take while it was away go with the next that gets through, before it, so the
        # feed is whole again (a client following it had the points of the outage missing, an
        # evaluation among them, without a word). As many as a feed keeps.
        self._unsent: deque[tuple[str, bool]] = deque(maxlen=settings.event_stream_maxlen)
        self.save_when_taken = False  # whether the engine saves its state as it stops then

    def hold(self, worker: str, task_id: str | None, *, folder_locked: bool) -> None:
        """The task has claimed the run (worker/training.py `_claim`): from now on the recorder
        writes only while the run is still "running" for this worker and task (`holds`).

        One taken away is noticed at the database check (`should_cancel`) or when a point
        would be written. At the check, the engine is told to stop, so it saves its training
        state first, if nobody else can be writing the run's folder: this process holds its
        lock (`folder_locked`), so the new attempt cannot have started training, and the run
        is not "running" for another worker (one that claimed it would have had to pass the
        lock, so the lock would not be worth trusting). Every point until then is recorded, so
        the new attempt resumes there losing no work and leaving no hole in the series. At a
        point that could not be recorded, the engine has gone past what the record holds: it
        stops at once (`RunTakenAway`), without saving, so the new attempt resumes from the
        training state before and records that point itself."""
        self.worker, self.task_id, self.folder_locked = worker, task_id, folder_locked

    def _check_held(self, run: Run) -> None:
        """Raise RunTakenAway unless the run is still this process's (once `hold` was called)."""
        if self.taken_away is None and (
                self.worker is None or holds(run, self.worker, self.task_id)):
            return
        if self.taken_away is None:
            self.taken_away = (f"{run.status}, task {run.celery_task_id}, worker {run.worker}, "
                               f"attempt {run.attempts}")
        raise RunTakenAway(self.run_id, self.taken_away)

    def _last_recorded_steps(self) -> dict[str, int]:
        """Per kind (progress, eval), the last step already in the database."""
        with session_scope(self.url) as session:
            rows = session.execute(
                select(RunMetric.kind, func.max(RunMetric.step))
                .where(RunMetric.run_id == self.run_id)
                .group_by(RunMetric.kind)
            ).all()
        return {kind: int(step) for kind, step in rows}

    def _row(self, session: Session, **options: Any) -> Run:
        """The run's row, or RunDeleted."""
        run = session.get(Run, self.run_id, **options)
        if run is None:
            self.deleted = True
            raise RunDeleted(self.run_id)
        return run

    def _own_row(self, session: Session) -> Run:
        """The run's row, locked, while it is this process's; else RunDeleted or
        RunTakenAway."""
        run = self._row(session, with_for_update=True)
        self._check_held(run)
        return run

    def check_not_deleted(self) -> None:
        """Raise RunDeleted if the run's row is gone (an error from its folder, removed with
        it, is no failure to record); a database that cannot say is taken as a no."""
        if self.deleted:
            raise RunDeleted(self.run_id)
        try:
            with session_scope(self.url) as session:
                self._row(session)
        except SQLAlchemyError:
            pass

    # --- live feed -------------------------------------------------------------------------

    def publish(self, event: dict[str, Any], *, now: bool = False) -> None:
        """Add the event to the run's stream and, if it is one for its page
        (`_for_experiment`), to its experiment's (see `LiveFeed.call`)."""
        if self.deleted:  # its feed was deleted with it: an event would only bring it back
            return
        if self.taken_away:  # the feed is the new attempt's now
            return
        event = {"run_id": self.run_id, "time": time.time(), **event}
        maxlen = self.settings.event_stream_maxlen
        self._unsent.append((json.dumps(event, default=float), self._for_experiment(event)))

        def send(client: redis.Redis) -> bool:
            pipe = client.pipeline(transaction=False)
            for data, to_experiment in self._unsent:
                add_to_feeds(pipe, self.run_id, self.experiment_id, {"data": data}, maxlen,
                             to_experiment=to_experiment)
            pipe.execute()
            return True

        if self.live.call(send, False, now=now):
            self._unsent.clear()

    def _for_experiment(self, event: dict[str, Any]) -> bool:
        """Whether the event goes to the experiment's feed too. Its stream is shared by up to
        60 runs and trimmed at the length of one run's (`event_stream_maxlen`): with each
        run's every point in it, the earlier runs' events were trimmed away, their ends
        too (7 ends of 60 were left after 60 runs of 27,000 steps with a point every 10).
        Its page only draws each run's step and last score, so it gets a progress, eval or
        checkpoint event of a run once per EXPERIMENT_FEED_SHARE of its steps at most (and
        at the last step); the run's own feed has every one."""
        kind, step, total = event.get("type"), event.get("step"), event.get("total_steps")
        if kind == "stage":  # how far a run's decoding or labeling is: its own page's news
            return False
        if kind not in THINNED_FOR_EXPERIMENT or not isinstance(step, int) or not total:
            return True
        last = self._sent_to_experiment.get(kind)
        if last is not None and step < total and step - last < total * EXPERIMENT_FEED_SHARE:
            return False
        self._sent_to_experiment[kind] = step
        return True

    def forget_feed(self) -> None:
        """Delete the run's live feed and cancel flag again, once it is known to be deleted,
        and its experiment's feed once that is gone too (a run is deleted with its
        experiment): events published before that brought them back."""
        try:
            with session_scope(self.url) as session:
                gone = [] if session.get(Experiment, self.experiment_id) else [self.experiment_id]
        except SQLAlchemyError:
            gone = []  # the database cannot say: the experiment's feed may be in use
        forget_feeds(self.redis, gone, [self.run_id])

    # --- engine callbacks ------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        step = int(event.get("step", 0))
        if kind == "checkpoint":
            self.saved_step = max(self.saved_step, step)
            # Where the worker keeps the state is its own business (an absolute path on its
            # file system, gone once the run succeeds): the feed says the step.
            event = {key: value for key, value in event.items() if key != "path"}
        if kind == "started" and step < max(self.last_recorded.values(), default=0):
            # Resumed from a checkpoint before the last recorded step (or from the start,
            # with none): the run is back there, and its time left is from there.
            self._record_position(step)
        if kind == "progress" and step == event.get("total_steps"):
            # The last step, recorded below: a cancel committed before that was accepted (the
            # web refuses one after, app.experiments.cancel_runs), its Redis flag perhaps not
            # set yet. The engine's check after the last step reads the database.
            self._read_database_next = True
        if kind in ("progress", "eval"):
            # After a resume the engine repeats the steps since its last checkpoint; the
            # record and the feed keep their first copy so the series stays continuous, but
            # the step it is at and the speed are this attempt's, for the ETA.
            if step <= self.last_recorded.get(kind, 0):
                if kind == "progress":
                    self._record_position(step, event.get("images_per_s"))
                return
            values = {k: v for k, v in event.items() if k not in ("type", "step", "total_steps")}
            self._unsaved.append((kind, step, values))
            self.last_recorded[kind] = step
            self._save_metrics()
        self.publish(event)

    def _record_position(self, step: int, images_per_s: float | None = None) -> None:
        """The step the run is at, where it re-does steps the record has (after a resume)."""
        try:
            with session_scope(self.url) as session:
                run = self._own_row(session)
                run.step = step
                if images_per_s:
                    run.images_per_s = float(images_per_s)
                run.heartbeat_at = utcnow()
        except SQLAlchemyError as exc:  # a database outage must not stop training
            log.warning("run %s: step not recorded (%s)", self.run_id, exc)

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
        run = self._own_row(session)
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
        """Checked every iteration: a Redis key (cheap, skipped while Redis is away), and every
        `database_check_s` the database, which also carries a cancel. Raises RunDeleted once
        the run's row is gone: the engine stops there, without saving its state. A run taken
        from this process stops it too, saving its state when that is safe (see `hold`)."""
        if self.deleted:
            raise RunDeleted(self.run_id)
        if self.taken_away:
            return self._stop_taken()
        if self._cancelled:
            return True
        if cancels(self.live.call(lambda client: client.get(run_cancel_key(self.run_id)), None),
                   self.task_id):
            self._cancelled = True
            return True
        now = time.monotonic()
        if self._read_database_next or now - self._last_cancel_check > self.database_check_s:
            self._last_cancel_check, self._read_database_next = now, False
            try:
                with session_scope(self.url) as session:
                    run = self._row(session, with_for_update=True)
                    if self.worker is not None and not holds(run, self.worker, self.task_id):
                        self.save_when_taken = self.folder_locked and run.status != "running"
                        self._check_held(run)  # raises, before any heartbeat is written
                    run.heartbeat_at = utcnow()
                    self._cancelled = bool(run.cancel_requested)
            except RunTakenAway:
                return self._stop_taken()
            except SQLAlchemyError as exc:  # training goes on; Redis still carries a cancel
                log.warning("run %s: cancel check in the database failed (%s)", self.run_id, exc)
        return self._cancelled

    def _stop_taken(self) -> bool:
        """Stop the engine on a run taken away: with its state saved when that is safe."""
        if self.save_when_taken:
            return True
        raise RunTakenAway(self.run_id, self.taken_away)

    # --- outcomes --------------------------------------------------------------------------

    def record_artifacts(self, out_dir: Path) -> list[str]:
        return retry_while_database_down(
            lambda: self._record_artifacts(out_dir), f"run {self.run_id}: recording artifacts",
            self.finish_retry_s,
        )

    def _record_artifacts(self, out_dir: Path) -> list[str]:
        names = []
        with session_scope(self.url) as session:
            self._own_row(session)
            for name in EXPORTED_FILES:
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

        def record() -> dict[str, int]:
            with session_scope(self.url) as session:
                run = self._own_row(session)
                self._write_unsaved(session)
                run.status = status
                run.finished_at = utcnow()
                run.error = error
                # A cancel saves the state at the step reached, which may be past the last
                # progress point: the record says where a "Run again" resumes, as the feed did.
                run.step = max(run.step, self.saved_step)
                if metrics is not None:
                    run.metrics, run.details = split_metrics(metrics)
                    run.step = run.total_steps
                return {"step": run.step, "total_steps": run.total_steps}

        steps = retry_while_database_down(record, f"run {self.run_id}: recording it {status}",
                                          self.finish_retry_s)
        self._unsaved.clear()
        self.publish({"type": "end", "status": status, **steps, "error": error,
                      "metrics": headline(metrics)}, now=True)
        self.live.call(lambda client: client.delete(run_cancel_key(self.run_id)), None, now=True)

    def step_aside(self) -> bool:
        """The worker is stopping (see worker.training.StopSignal): the run, its training state
        saved at `saved_step`, goes back to the queue under the same task, behind the runs
        already waiting, to resume from there on the next worker. The stop is not the run's
        doing, so this attempt does not count against it. Returns whether the run was still
        this worker's to hand back (RunDeleted when it is gone; RunTakenAway, once `hold` was
        called, when the reaper or another worker has it now)."""

        def record() -> Run | None:
            with session_scope(self.url) as session:
                run = self._own_row(session)
                if run.status != "running":  # reaped meanwhile
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


def lose_run_of_dead_process(settings: Settings, run_id: int, worker: str,
                             task_id: str | None, why: str) -> bool:
    """The pool process that trained the run died while its worker lives on (the kernel's
    out-of-memory killer picks the process that holds the memory: the training one); `why`
    says which process and how it ended. The worker's own process learns it at once
    (Celery's WorkerLostError, worker.tasks.TrainRequest) and takes its next run: the run is
    lost now and queued again as the reaper does it (app.reaper.Losses), the attempt counted,
    to resume from its last checkpoint. Left to the reaper, it showed "running" for
    `stale_after_s` beside the run the worker trained next. Only a run still this worker's
    under this task is touched (the reaper may have queued it again while the process was
    paused, and another worker taken it); returns whether it was."""
    died_by = utcnow()  # whatever the process last wrote, it wrote before this
    with session_scope(settings.sqlalchemy_url) as session:
        run = session.get(Run, run_id)
        if run is None or not holds(run, worker, task_id):
            return False
        losses = Losses(session, settings, get_redis(settings.effective_redis_url))
        return losses.end(run, why, died_by, held_by(worker, task_id))


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


def rewrite_exports(out_dir: Path, session: Session, dataset_root: Path, run: Run) -> None:
    """Give predictions.csv and test_predictions.json the archive's own paths and image ids
    instead of storage paths, and training.json the backbone as the run's record names it (an
    earlier run's model relative to the data directory) instead of where this worker opened
    it (again after a retry: each says whether it was done)."""
    path = out_dir / TRAINING_FILE
    stored = (run.config or {}).get("backbone")
    if path.is_file() and stored:
        record = json.loads(path.read_text())
        if record.get("config", {}).get("backbone", stored) != stored:
            record["config"]["backbone"] = stored
            write_json(path, record)

    images = {
        str((dataset_root / image.path).resolve()): image
        for image in session.scalars(
            select(DatasetImage).where(DatasetImage.dataset_id == run.dataset_id)
        )
    }

    def as_uploaded(row: dict) -> dict:
        image = images.get(str(Path(row["path"]).resolve()))
        return {"image_id": image.id if image else "",
                **row, "path": image.original_path if image else Path(row["path"]).name}

    path = out_dir / PREDICTIONS_FILE
    if path.is_file():
        columns, rows = read_csv(path)
        if "image_id" not in columns:
            replace_csv(path, ["image_id", "path"] + [k for k in columns if k != "path"],
                        [as_uploaded(row) for row in rows])
    path = out_dir / TEST_PREDICTIONS_FILE
    if path.is_file():
        rows = json.loads(path.read_text())
        if rows and "image_id" not in rows[0]:
            write_json(path, [as_uploaded(row) for row in rows])
