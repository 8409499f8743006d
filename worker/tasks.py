"""Celery tasks: thin glue between the queue, the database and the training engine."""

from __future__ import annotations

import logging
import re
import traceback

from billiard.einfo import ExceptionWithTraceback
from celery.exceptions import Retry, WorkerLostError
from celery.worker import state as worker_state
from celery.worker.request import Request
from celery.worker.state import task_ready
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from app.config import get_settings
from app.db import StartupRefused, session_scope
from app.experiments import TRAIN_TASK
from app.models import Dataset
from worker.celery_app import app, check_data_dir, worker_identity
from worker.runs import (
    DatabaseUnavailable,
    fail_unstarted_run,
    lose_run_of_dead_process,
    undo_hand_back,
)
from worker.training import not_to_train

log = logging.getLogger(__name__)


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


class TrainRequest(Request):
    """A training message, discarded in the worker's own process when its run is not to be
    trained: deleted, ended (a queued run cancelled), or queued again under a newer task. Each
    such message used to take a fresh pool process (one per task) to find that out: after a
    sweep of 450 queued runs was cancelled, the next run waited 14 minutes behind them. Also
    where the worker's own process learns that the process training the run died
    (`on_failure`)."""

    @property
    def run_id(self) -> object:
        return self.args[0] if self.args else self.kwargs.get("run_id")

    def revoked(self) -> bool:
        if super().revoked():
            return True
        run_id = self.run_id
        if not self._may_take_runs(run_id):
            return True
        reason = not_to_train(get_settings(), run_id, self.id)
        if reason is None:
            return False
        log.info("run %s: task %s not run (%s)", run_id, self.id, reason)
        self._announce_revoked(reason, False, None, False)
        return True

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        """Also where the worker's own process learns that the pool process training the run
        died (billiard's pool raises WorkerLostError here, celery.worker.request): the run
        is lost now, and queued again (`lose_run_of_dead_process`), before Celery puts the
        message back in the queue (acks_late, reject_on_worker_lost) and the worker takes
        its next run. That message, superseded by the new task, is then dropped (`revoked`).
        Celery sends no task_failure signal for a message it puts back, hence here. The reaper
        remains for what this cannot record (the database away)."""
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):  # as billiard hands it over
            exc = exc.exc
        if isinstance(exc, WorkerLostError):
            self._lose_run(exc)
        return super().on_failure(exc_info, send_failed_event=send_failed_event,
                                  return_ok=return_ok)

    def _lose_run(self, exc: WorkerLostError) -> None:
        why = (f"its training process (pid {self.worker_pid}) on worker {self.hostname} "
               f"{how_it_died(exc)}")
        try:
            lose_run_of_dead_process(get_settings(), int(self.run_id), self.hostname, self.id,
                                     why)
        except Exception:  # noqa: BLE001 - Celery must still put the message back
            log.exception("run %s: %s, and this could not be recorded; the reaper finds the "
                          "run lost once its heartbeats have stopped", self.run_id, why)

    def _may_take_runs(self, run_id: object) -> bool:
        """Whether this worker's data directory check (made here, in the worker's own process,
        when the database did not answer at start) lets it take runs. The check not made for
        want of a database is no refusal: the task waits for the database and checks again in
        its process (`train_run`). A refusal puts the message back in the queue, the run
        queued for a worker on the right database, and stops the worker with exit status 2,
        as at start; a worker on another database would otherwise write run folders of that
        database's runs."""
        try:
            check_data_dir(get_settings())
        except OperationalError:
            return True
        except StartupRefused as exc:
            log.critical("worker stops taking runs: %s (run %s stays queued)", exc, run_id)
            self.reject(requeue=True)
            task_ready(self)
            worker_state.should_stop = 2  # the worker's loop stops, and the process exits 2
            return False
        return True


def how_it_died(exc: WorkerLostError) -> str:
    """How a pool process ended, as billiard's WorkerLostError says it ("Worker exited
    prematurely: signal 9 (SIGKILL) Job: 4.", billiard.common.human_status): "was killed
    (SIGKILL)", or "exited (exitcode 1)"."""
    said = str(exc).removeprefix("Worker exited prematurely: ").split(" Job:")[0].rstrip(".")
    killed = re.fullmatch(r"signal \d+ \((\w+)\)", said)
    return f"was killed ({killed[1]})" if killed else f"exited ({said})"


# A run whose database cannot be reached when its task arrives is neither started nor marked
# failed (worker.training.execute_run): the task tries again, under the same id, after 5 s,
# 10 s, ... up to every 5 minutes, for as long as it takes; the run is queued in the
# database, and nothing else would ever pick it up.
@app.task(name=TRAIN_TASK, bind=True, autoretry_for=(DatabaseUnavailable,), max_retries=None,
          retry_backoff=5, retry_backoff_max=300, Request=TrainRequest)
def train_run(self, run_id: int) -> dict:
    """Train one run end to end. Redelivered after a worker loss, it resumes from the run's
    last training checkpoint (the engine finds it in the run's output directory)."""
    settings = get_settings()
    try:  # the worker's process checked when the message came, unless the database was away
        check_data_dir(settings)
    except OperationalError:
        raise DatabaseUnavailable(run_id) from None
    except StartupRefused:
        # Back to the broker under the same id: the worker's process checks again when it
        # comes, and refuses there (TrainRequest).
        raise self.retry(countdown=0, max_retries=None) from None
    try:
        from worker.training import REQUEUED, execute_run

        outcome = execute_run(settings, run_id, worker_name=self.request.hostname,
                              task_id=self.request.id)
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        # execute_run ends a run that fails to start or to train itself; this is for what
        # happens before it can (see fail_unstarted_run).
        reason = "".join(traceback.format_exception_only(exc)).strip()
        try:
            fail_unstarted_run(settings, run_id, self.request.id,
                               f"could not start on worker {self.request.hostname}: {reason}")
        except Exception:  # the database is away too: the first error is the one to report
            log.exception("run %s: could not record that it failed to start", run_id)
        raise
    if outcome["status"] == REQUEUED:
        # The worker is stopping and the run is queued again: the task goes back to the broker
        # under the same id, behind the runs already waiting, for the next worker to resume it
        # from its saved state. (A retry, not a Reject: Celery logs a Reject as a warning with
        # a traceback, though nothing went wrong.)
        log.info("run %s: handed back to the queue at step %s", run_id, outcome.get("step", 0))
        try:
            raise self.retry(countdown=0, max_retries=None)
        except Retry:
            raise
        except Exception as exc:
            # The broker is away (the cause is known: a traceback of its chained errors was
            # 40 lines for one line's news).
            log.error("run %s: its task could not go back to the broker (%s); the reaper "
                      "will queue it again once it finds the run silent", run_id,
                      "".join(traceback.format_exception_only(exc)).strip())
            undo_hand_back(settings, run_id, self.request.id)
            raise
    return outcome
