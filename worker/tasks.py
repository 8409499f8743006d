"""Celery tasks: thin glue between the queue, the database and the training engine."""

from __future__ import annotations

import logging
import traceback

from celery.exceptions import Retry
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
from worker.runs import DatabaseUnavailable, fail_unstarted_run, undo_hand_back
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
    sweep of 450 queued runs was cancelled, the next run waited 14 minutes behind them."""

    def revoked(self) -> bool:
        if super().revoked():
            return True
        run_id = self.args[0] if self.args else self.kwargs.get("run_id")
        if not self._may_take_runs(run_id):
            return True
        reason = not_to_train(get_settings(), run_id, self.id)
        if reason is None:
            return False
        log.info("run %s: task %s not run (%s)", run_id, self.id, reason)
        self._announce_revoked(reason, False, None, False)
        return True

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
        except Exception:
            log.exception("run %s: its task could not go back to the broker; the reaper will "
                          "queue it again once it finds the run silent", run_id)
            undo_hand_back(settings, run_id, self.request.id)
            raise
    return outcome
