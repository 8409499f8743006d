"""Finds runs whose worker stopped heart-beating, marks them lost, and requeues them.

A worker killed outright (SIGKILL, power loss) leaves its Celery message unacknowledged
until the broker's visibility timeout, which must outlast the longest run. The heartbeat is
the faster signal: a run silent for `stale_after_s` is lost, and so is one silent since its
worker was seen killed by `make run`'s launcher (app.live.mark_worker_gone). A training process
that dies while its worker lives (the kernel's out-of-memory killer picks it: it holds the
memory) is not waited for at all: the worker ends its run as the reaper would, at once
(`Losses`, from worker.tasks.TrainRequest). A lost run is requeued with a new task id (the old
message, if it ever comes back, is then ignored) and resumes from its last training
checkpoint, up to `max_attempts` times. A requeue the broker does not take (Redis down) leaves
the run queued, saying so, and `requeue_lost_messages` sends it once Redis answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta

import redis
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import StartupRefused, ping_database, session_scope
from app.experiments import QueueUnavailable, enqueue_runs, send_tasks, stamp_runs
from app.live import forget_cancel, get_redis, gone_workers, publish_end, publish_status
from app.models import Run, utcnow
from app.responses import utc_text
from app.startup import DataDirCheck

log = logging.getLogger(__name__)


def stale_runs(session: Session, settings: Settings,
               gone: Mapping[str, tuple[datetime, str]] | None = None) -> list[Run]:
    """The running runs silent for `stale_after_s`, or since their worker is `gone`
    (app.live.gone_workers)."""
    running = session.scalars(select(Run).where(Run.status == "running")).all()
    return [run for run in running if is_stale(run, settings, silent_since(run, gone))]


def silent_since(run: Run, gone: Mapping[str, tuple[datetime, str]] | None) -> datetime | None:
    """When the run's worker was seen gone, if it was."""
    return gone[run.worker][0] if gone and run.worker in gone else None


def is_stale(run: Run, settings: Settings, gone_at: datetime | None = None) -> bool:
    """Whether the run's worker has been silent for `stale_after_s` (or never reported), or
    since it was seen gone at `gone_at`."""
    moment = run.heartbeat_at or run.started_at
    if moment is None:
        return True
    cutoff = silence_cutoff(settings, gone_at)
    if moment.tzinfo is None:  # SQLite returns naive UTC
        cutoff = cutoff.replace(tzinfo=None)
    return moment < cutoff


def silence_cutoff(settings: Settings, gone_at: datetime | None = None) -> datetime:
    """A run whose worker last reported before this is lost: `stale_after_s` ago, or when its
    worker was seen gone, whichever is later."""
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    return cutoff if gone_at is None else max(cutoff, gone_at)


def end_silent_run(session: Session, settings: Settings, run_id: int,
                   gone_at: datetime | None = None, *held: ColumnElement[bool],
                   **values) -> bool:
    """Write `values` (lost, or cancelled) on a run that is still running and still silent
    for `stale_after_s` (or since its worker was seen gone at `gone_at`), and meets the
    conditions `held`; returns whether it was. One conditional UPDATE: a heartbeat or an
    outcome its worker wrote after the reaper read the run keeps the run the worker's, where
    a plain write would mark lost (and queue again) a run that had just succeeded."""
    moment = func.coalesce(Run.heartbeat_at, Run.started_at)
    cutoff = silence_cutoff(settings, gone_at)
    return bool(session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == "running", or_(moment.is_(None), moment < cutoff),
               *held)
        .values(**values)
        .execution_options(synchronize_session="fetch")
    ).rowcount)


REQUEUEABLE = ("lost", "failed", "cancelled")
# Ends the note of a run whose task the broker did not take: `requeue_lost_messages` finds
# such runs (queued in the database, no message in the broker) and drops it when it sends them.
WAITING_FOR_QUEUE = "waiting for the queue (Redis) to come back"
# Ends the note of a queued run whose message a worker let go because another process still
# held the run's folder (worker/training.py); `requeue_lost_messages` sends it again.
FOLDER_HELD = ("its message was let go while another process still held its folder: "
               "it is sent again shortly")


def last_heartbeat(run: Run) -> str:
    """When the run's worker last said it trained, for a person: `2026-12-06T19:46:01Z`."""
    return utc_text(run.heartbeat_at) if run.heartbeat_at else "none"


def with_note(error: str | None, note: str) -> str:
    """A run's note (`Run.error`) with `note` added at its end."""
    return f"{error}; {note}" if error else note


def requeue(session: Session, live: redis.Redis, run_id: int, *, by_person: bool) -> Run | None:
    """Queue a lost, failed or cancelled run again under a new task id; it resumes from its
    last checkpoint. Returns it, or None (and rolls back) when it is not one of those. A
    person's requeue starts the count of attempts afresh, so the run again gets
    `max_attempts` automatic ones; the reaper's continues it.

    When the broker does not take the task, a person's requeue fails the run and answers 503
    (`enqueue_runs`): they see it at once. The reaper's leaves the run queued, its message
    unsent and the reason in its note (`send_or_wait`)."""
    run = claim_for_requeue(session, live, run_id, by_person=by_person)
    if run is not None and by_person:
        enqueue_runs(session, [run])
    elif run is not None:
        send_or_wait(session, [run])
    return run


def claim_for_requeue(session: Session, live: redis.Redis, run_id: int, *,
                      by_person: bool) -> Run | None:
    """Mark a lost, failed or cancelled run queued (not committed: the caller stamps it with
    a new task id first); None, rolled back, when it is not one of those.

    One conditional UPDATE checks and claims the run: of two requeues racing, or a requeue
    racing the delete of its experiment (which holds its locks until it commits), exactly one
    wins, and no second task is sent nor a row written that is gone."""
    # A person's requeue starts afresh; the reaper's keeps the reason it wrote (the worker
    # went silent) for the pages to show until a worker takes the run.
    fresh = {"attempts": 0, "error": None} if by_person else {}
    claimed = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status.in_(REQUEUEABLE))
        .values(status="queued", cancel_requested=False, finished_at=None, **fresh)
    ).rowcount
    if not claimed:
        session.rollback()
        return None
    forget_cancel(live, run_id)  # a run cancelled while queued keeps its flag for days
    return session.get(Run, run_id)


def send_or_wait(session: Session, runs: list[Run],
                 queue_down: QueueUnavailable | None = None) -> QueueUnavailable | None:
    """Stamp the runs with new task ids and send their tasks. Those the broker does not take
    (or all, given `queue_down`) stay queued, their messages unsent, with a note that says
    so: `requeue_lost_messages` sends them once Redis answers. Returns the broker's failure,
    or None. Not sending costs no attempt: a run's attempts count the times a worker took it."""
    stamp_runs(session, runs)
    unsent = runs
    if queue_down is None:
        try:
            send_tasks(runs)
            return None
        except QueueUnavailable as exc:
            queue_down, unsent = exc, exc.unsent
    for run in unsent:
        log.warning("run %s stays queued until Redis answers: %s", run.id, queue_down)
        run.error = with_note(run.error, f"{WAITING_FOR_QUEUE} "
                                         f"(it did not answer: {queue_down.reason})")
    session.commit()
    return queue_down


class Losses:
    """Ends, in one session, runs whose training process is gone: each is lost, its note
    saying why and what happens next, and queued again while it has attempts left (else it
    stays lost, its feeds ended). A run whose user had asked it to stop ends cancelled
    instead: its process is gone, so it has stopped. The reaper ends the runs it finds silent
    (`reap`); a worker whose training process died under it ends that one's run at once
    (worker.tasks.TrainRequest). Once the broker has failed, the runs after do not wait on it
    (`send_or_wait`)."""

    def __init__(self, session: Session, settings: Settings, live: redis.Redis) -> None:
        self.session, self.settings, self.live = session, settings, live
        self.queue_down: QueueUnavailable | None = None

    def end(self, run: Run, why: str, gone_at: datetime | None = None,
            *held: ColumnElement[bool]) -> bool:
        """End `run`, still running and silent for `stale_after_s` (or since its process was
        seen gone at `gone_at`) and meeting `held` (as its worker claimed it, say), saying
        `why` it is lost; returns whether it was ended. Commits."""
        if run.cancel_requested:
            if not end_silent_run(self.session, self.settings, run.id, gone_at, *held,
                                  status="cancelled", finished_at=utcnow()):
                return False
            log.warning("run %s ended cancelled: %s (last heartbeat %s) after a cancel",
                        run.id, why, run.heartbeat_at)
            self.session.commit()
            publish_end(self.live, run)
            return True
        max_attempts = self.settings.max_attempts
        error = f"{why} (last heartbeat {last_heartbeat(run)})"
        requeued = run.attempts < max_attempts
        if requeued:
            error += (f"; queued again to resume from its last checkpoint (attempt "
                      f"{run.attempts + 1} of {max_attempts})")
            ended = {}
        else:
            error += (f"; lost {run.attempts} times, so not requeued again "
                      "(requeue it to resume from its last checkpoint)")
            ended = {"finished_at": utcnow()}
        if not end_silent_run(self.session, self.settings, run.id, gone_at, *held,
                              status="lost", error=error, **ended):
            return False  # its worker reported after all
        log.warning("run %s lost: %s (last heartbeat %s)", run.id, why, run.heartbeat_at)
        if not requeued:
            self.session.commit()
            publish_end(self.live, run)
            return True
        # "lost", not yet committed, is what the requeue's conditional update claims
        if claim_for_requeue(self.session, self.live, run.id, by_person=False) is not None:
            self.queue_down = send_or_wait(self.session, [run], self.queue_down)
        publish_status(self.live, run)
        return True


def reap(settings: Settings) -> list[int]:
    """Mark stale running runs lost; requeue those with attempts left (`Losses`). Returns
    their ids."""
    live = get_redis(settings.effective_redis_url)
    try:
        gone = gone_workers(live)
    except redis.RedisError:  # Redis away: the heartbeats alone
        gone = {}
    reaped = []
    with session_scope(settings.sqlalchemy_url) as session:
        losses = Losses(session, settings, live)
        for run in stale_runs(session, settings, gone):
            gone_at = silent_since(run, gone)
            why = (f"worker {run.worker} stopped reporting" if gone_at is None else
                   f"worker {run.worker} was killed ({gone[run.worker][1]}) and started again")
            if losses.end(run, why, gone_at):
                reaped.append(run.id)
    return reaped


# Where Celery's Redis transport (kombu) keeps messages: the queue's list, one more list per
# priority, and the hash of those a worker has taken but not yet acknowledged.
QUEUE = "celery"
PRIORITY_SEPARATOR = "\x06\x16"
UNACKED = "unacked"


# Messages read from the broker at a time: 10,000 queued runs read at once were every
# message body in the web's memory together, at each pass that found a run queued long.
BROKER_PAGE = 500


def broker_task_ids(live: redis.Redis, wanted: Collection[str] | None = None) -> set[str]:
    """The task ids of the messages waiting in the queue or held by a worker: all of them,
    or those in `wanted` only (it stops reading once it has found them all). Read
    BROKER_PAGE messages at a time: each list by LRANGE pages from its head, then the hash
    of held ones by HSCAN. Reading in pages skips none still in a list: Celery adds at a
    list's head (which only moves the rest on, to be read twice) and takes from its tail.
    One taken meanwhile is in the hash, read last, or on its way there: the two looks of
    `requeue_lost_messages` are for that moment, as they were with one read of it all."""
    found: set[str] = set()
    wanted = None if wanted is None else set(wanted)

    def done() -> bool:
        return wanted is not None and len(found) == len(wanted)

    def keep(task_id: str | None) -> None:
        if task_id is not None and (wanted is None or task_id in wanted):
            found.add(task_id)

    for key in [QUEUE, *(f"{QUEUE}{PRIORITY_SEPARATOR}{p}" for p in range(1, 10))]:
        start = 0
        while not done():
            page = live.lrange(key, start, start + BROKER_PAGE - 1)
            for raw in page:
                keep(_task_id(raw, held=False))
            if len(page) < BROKER_PAGE:
                break
            start += BROKER_PAGE
    if not done():
        for _, raw in live.hscan_iter(UNACKED, count=BROKER_PAGE):
            keep(_task_id(raw, held=True))
    return found


def _task_id(raw: str | bytes, held: bool) -> str | None:
    """The task id in a queued message, or in a held one ([message, exchange, routing key])."""
    try:
        message = json.loads(raw)
        return (message[0] if held else message)["headers"]["id"]
    except (ValueError, TypeError, KeyError, IndexError):
        return None


def requeue_lost_messages(settings: Settings, pause_s: float = 1.0) -> list[int]:
    """Send again the task of each run queued in the database (for longer than
    `stale_after_s`) whose message the broker no longer has: a Redis that lost its data
    (restarted without persistence, flushed) left such runs "queued, position 1" for good,
    and so did a web killed as it made them, before it sent their tasks.
    A message is looked for twice, `pause_s` apart: a worker taking it moves it from the queue
    to its unacknowledged ones, and may be between the two at the first look. This also sends
    the runs the reaper queued again while Redis was down (`send_or_wait`), and those whose
    message a worker let go while their folder stayed held (FOLDER_HELD); should Redis fail
    once more, they wait for the next pass. Returns the ids of the runs queued again."""
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    with session_scope(settings.sqlalchemy_url) as session:
        # Ids and task ids only, at every pass: a sweep queues thousands of runs, whose rows
        # (configs, notes) this does not need unless their message is lost.
        # A run that has never been sent has no queue time: the web stopped between the
        # commit that made it and the one that stamps it (`stamp_runs`). Its age counts then.
        waiting = dict(session.execute(
            select(Run.id, Run.celery_task_id)
            .where(Run.status == "queued", func.coalesce(Run.queued_at, Run.created_at) < cutoff)
        ).all())
        if not waiting:
            return []
        live = get_redis(settings.effective_redis_url)
        missing = _not_in_broker(live, waiting)
        if missing:
            time.sleep(pause_s)
            missing = _not_in_broker(live, {run_id: waiting[run_id] for run_id in missing})
        lost = []
        if missing:  # their rows, still queued under the same task (else taken, or sent anew)
            queued = session.scalars(select(Run).where(Run.status == "queued").order_by(Run.id))
            lost = [run for run in queued
                    if run.id in missing and run.celery_task_id == waiting[run.id]]
        for run in lost:
            log.warning("run %s: its task %s is not in the queue; sending it again",
                        run.id, run.celery_task_id)
            for note in (WAITING_FOR_QUEUE, FOLDER_HELD):  # never sent, or let go: known
                if note in (run.error or ""):
                    run.error = run.error.partition(note)[0].removesuffix("; ") or None
                    break
            else:
                run.error = ("its message in the queue was lost (Redis lost its data?): "
                             "queued again")
        if lost:
            send_or_wait(session, lost)
            for run in lost:
                publish_status(live, run)
        return [run.id for run in lost]


def _not_in_broker(live: redis.Redis, task_ids: dict[int, str | None]) -> set[int]:
    """The runs (of run id: task id) whose message is neither queued nor held by a worker."""
    found = broker_task_ids(live, {task_id for task_id in task_ids.values() if task_id})
    return {run_id for run_id, task_id in task_ids.items() if task_id not in found}


class Reaper:
    """The web's reaper: every `interval` s, `reap` and `requeue_lost_messages`.

    While the database is away, the workers' heartbeats fail too, and their runs train on
    (worker/runs.py): when it answers again, every run looks silent. So after a pass finds it
    away, `reap` waits until the database has answered for `stale_after_s`, the time a worker
    is given to report, and only runs silent through that are lost."""

    def __init__(self, settings: Settings, data_dir_check: DataDirCheck | None = None,
                 clock=time.monotonic) -> None:
        self.settings, self.data_dir_check, self.clock = settings, data_dir_check, clock
        self.interval = max(1.0, min(30.0, settings.stale_after_s / 4))
        # The clock's time before which `reap` waits: never while the database is away.
        self.reap_from = -math.inf

    @property
    def database_away(self) -> bool:
        return self.reap_from == math.inf

    def run_once(self) -> None:
        if not self._data_dir_checked():
            return
        for check in (reap, requeue_lost_messages):
            if check is reap and self.clock() < self.reap_from:
                continue
            try:
                check(self.settings)
            except (OperationalError, redis.RedisError) as exc:  # away for now: one line
                log.warning("%s skipped: %s", check.__name__, str(exc).splitlines()[0])
                if isinstance(exc, OperationalError):
                    self.reap_from = math.inf
            except Exception:  # noqa: BLE001 - the loop must outlive a database hiccup
                log.exception("%s failed", check.__name__)
        if self.database_away and self._database_answers():
            self.reap_from = self.clock() + self.settings.stale_after_s
            log.warning("the database answers again: its workers have %s s to report before "
                        "a silent run is lost", self.settings.stale_after_s)

    def _data_dir_checked(self) -> bool:
        """Whether the web's data directory check has passed, making it when the database
        did not answer before: until it passes, a database that may be another's (or not
        migrated) is neither reaped nor sent runs, and after a refusal never is."""
        check = self.data_dir_check
        if check is None or check.passed:
            return True
        if check.refusal is not None:
            return False
        try:
            check.make()
        except StartupRefused as exc:
            log.critical("the web refuses to serve: %s", exc)
            return False
        except SQLAlchemyError as exc:
            log.warning("data directory check still waits for the database: %s",
                        str(exc).splitlines()[0])
            self.reap_from = math.inf
            return False
        except Exception:  # noqa: BLE001 - a clean-up that failed ended the reaper for good
            log.exception("data directory check failed; it is made again at the next pass")
            return False
        # Workers whose heartbeats failed through the outage get their time to report.
        self.reap_from = self.clock() + self.settings.stale_after_s
        log.warning("the database answers: data directory checked and cleaned; its workers "
                    "have %s s to report before a silent run is lost",
                    self.settings.stale_after_s)
        return True

    def _database_answers(self) -> bool:
        try:
            ping_database(self.settings.sqlalchemy_url)
            return True
        except SQLAlchemyError:
            return False


async def reap_forever(settings: Settings, data_dir_check: DataDirCheck | None = None) -> None:
    reaper = Reaper(settings, data_dir_check)
    while True:
        await asyncio.to_thread(reaper.run_once)
        await asyncio.sleep(reaper.interval)
