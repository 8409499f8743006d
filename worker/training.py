"""The body of the training task: check the message, claim the run, train, record."""

from __future__ import annotations

import fcntl
import logging
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from app.config import Settings
from app.db import session_scope
from app.ingest import image_cache_dir
from app.models import Dataset, DatasetImage, Run
from app.reaper import FOLDER_HELD, is_stale, last_heartbeat, with_note
from app.schemas import TERMINAL_STATUSES
from worker.device import resolve_device
from worker.runs import (
    DATABASE_DOWN,
    DatabaseUnavailable,
    RunDeleted,
    RunRecorder,
    RunTakenAway,
    held_by,
    retry_while_database_down,
    rewrite_exports,
    utcnow,
)

log = logging.getLogger(__name__)


def dataset_items(session, dataset: Dataset, root: Path):
    """(class_names, train_items, test_items, unlabeled_paths) from the stored image rows."""
    train, test, unlabeled = [], [], []
    rows = session.scalars(
        select(DatasetImage).where(DatasetImage.dataset_id == dataset.id).order_by(DatasetImage.id)
    )
    for image in rows:
        path = root / image.path
        if image.split == "test":
            test.append((path, image.label))
        elif image.split == "train" and image.label is not None:
            train.append((path, image.label))
        else:
            unlabeled.append(path)
    return list(dataset.class_names), train, test, unlabeled


class _Heartbeat:
    """Refreshes the run's heartbeat while training, so a dead worker shows up as stale."""

    def __init__(self, settings: Settings, run_id: int, worker: str,
                 task_id: str | None) -> None:
        self.settings, self.run_id = settings, run_id
        self.worker, self.task_id = worker, task_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.settings.heartbeat_interval_s):
            try:
                with session_scope(self.settings.sqlalchemy_url) as session:
                    # A conditional update, not a read: a deleted run has no row to beat for,
                    # and one taken from this process (requeued while it was paused, say) is
                    # not its to beat for (the recorder notices either and stops training).
                    session.execute(update(Run)
                                    .where(Run.id == self.run_id,
                                           held_by(self.worker, self.task_id))
                                    .values(heartbeat_at=utcnow()))
            except Exception as exc:  # noqa: BLE001 - a missed beat must not stop training
                log.warning("run %s: heartbeat failed: %s", self.run_id, exc)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()


# What execute_run returns when the worker stopped before the run could finish: the run is
# queued again and its message must go back to the broker (worker/tasks.py).
REQUEUED = "requeued"

# How long a message for a run queued under it waits for the run's folder, when a process
# still holds that: one the run was taken from (paused past `stale_after_s`, its run queued
# again by the reaper), which lets go at its next check, within RunRecorder.database_check_s
# of resuming, plus a step and a save. Dropped at once instead, the message left the run
# queued until the reaper's `requeue_lost_messages` sent it again. One still frozen after
# this keeps the folder; the message is then dropped, and that pass remains.
FOLDER_WAIT_S = 60.0
FOLDER_POLL_S = 0.2


class StopSignal:
    """SIGTERM while this process holds a run: the worker is stopping (`make run`'s Ctrl-C,
    `docker compose stop`, systemd; the worker's main process passes its own shutdown on,
    worker/celery_app.py). Training stops at its next iteration, saves its state and hands the
    run back to the queue, instead of dying mid-step when the worker's time to stop runs out.

    Without it the pool process dies at once: its run stays "running" until its heartbeat goes
    stale (`stale_after_s`), then counts the attempt as lost.
    """

    def __init__(self) -> None:
        self.received = False
        self.previous = None

    def _handle(self, _signum, _frame) -> None:
        self.received = True

    def __enter__(self) -> StopSignal:
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (execute_run called by a test's thread)
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class _Skip(Exception):
    """This message does not train the run and leaves it as it is; the status says why."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class _End(Exception):
    """The run ends without training, with this status and error (RunRecorder.finish)."""

    def __init__(self, status: str, error: str | None = None) -> None:
        super().__init__(status, error)
        self.status, self.error = status, error


@dataclass
class _Job:
    """What training a claimed run needs, read from the database while claiming it."""

    config: dict[str, Any]
    budget: Any
    seed: int
    items: tuple  # dataset_items()
    metadata: dict[str, Any]
    cache_dir: Path
    dataset_root: Path
    status_event: dict[str, Any]  # the live feed's "running" event


def execute_run(
    settings: Settings, run_id: int, worker_name: str, task_id: str | None = None
) -> dict[str, Any]:
    """Train the run this message is for, if it should; returns a summary for the task result.

    A run that cannot start (no such device, its dataset gone, ...) ends "failed" with the
    reason. Raises DatabaseUnavailable when the database cannot be reached to start the run
    or to record its outcome: the task then tries again later (worker/tasks.py).
    """
    try:
        return _execute(settings, run_id, worker_name, task_id)
    except DATABASE_DOWN as exc:
        log.warning("run %s: the database is unreachable (%s); the task will retry", run_id, exc)
        raise DatabaseUnavailable(f"run {run_id}: the database is unreachable: {exc}") from exc


def _execute(settings: Settings, run_id: int, worker_name: str, task_id: str | None):
    out_dir = settings.runs_dir / str(run_id)
    try:
        # Checked once before taking the run's folder, so a message for a deleted or ended
        # run makes no folder, and again under the lock (_claim): it may have changed since.
        with session_scope(settings.sqlalchemy_url) as session:
            run = session.get(Run, run_id)
            _check_message(settings, run, worker_name, task_id)
            experiment_id = run.experiment_id
            # The run's current message: whoever holds its folder is about to let go of it.
            wait_s = FOLDER_WAIT_S if run.status == "queued" else 0.0
        with StopSignal() as stop, ExitStack() as folder:
            try:
                folder_locked = _hold_folder(folder, out_dir, wait_s, stop)
            except _Skip as skip:
                if skip.status == "busy" and wait_s:
                    _note_let_go(settings, run_id, task_id)
                raise
            if stop.received:  # stopping before the run was taken: it stays queued as it is
                return {"run_id": run_id, "status": REQUEUED}
            recorder = RunRecorder(settings, run_id, experiment_id)
            try:
                try:
                    job = _claim(settings, run_id, worker_name, task_id)
                except (_Skip, *DATABASE_DOWN):
                    raise
                except _End as end:
                    recorder.finish(end.status, error=end.error)
                    return {"run_id": run_id, "status": end.status, "error": end.error}
                except Exception as exc:  # noqa: BLE001 - the run ends with the reason
                    return _fail(recorder, exc, f"could not start on worker {worker_name}: ")
                recorder.hold(worker_name, task_id, folder_locked=folder_locked)
                return _train(settings, recorder, job, out_dir, stop)
            except RunDeleted:
                return _forget_deleted(recorder, out_dir)
            except RunTakenAway:
                return _let_go(recorder)
            except _Skip as skip:
                if skip.status == "missing":  # deleted since the first look: the lock above
                    shutil.rmtree(out_dir, ignore_errors=True)  # made its folder again
                raise
    except _Skip as skip:
        log.info("run %s: task %s not run (%s)", run_id, task_id, skip.status)
        return {"run_id": run_id, "status": skip.status}


def not_to_train(settings: Settings, run_id: object, task_id: str) -> str | None:
    """Why a message for `run_id` will not train it whatever worker takes it (the run is
    deleted or ended, or a newer task owns it), or None: let the task look closer. Also None
    when the database cannot say: the task then waits for it."""
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            run = session.get(Run, int(run_id))
            _check_message(settings, run, worker_name="", task_id=task_id, busy=False)
    except _Skip as skip:
        return skip.status
    except Exception:  # noqa: BLE001 - a question the training task asks again, properly
        return None
    return None


def _check_message(settings: Settings, run: Run | None, worker_name: str,
                   task_id: str | None, busy: bool = True) -> None:
    """Raise _Skip unless this message may train the run now (with `busy` false, whatever
    another worker does with it)."""
    if run is None:
        raise _Skip("missing")
    if run.status in TERMINAL_STATUSES:  # a lost run trains again only once requeued
        raise _Skip(run.status)
    if task_id and run.celery_task_id and task_id != run.celery_task_id:
        # A message from before a requeue came back: the newer task owns the run.
        raise _Skip("superseded")
    if busy and run.status == "running" and run.worker != worker_name and not is_stale(
            run, settings):
        # The broker gave this message out again (visibility timeout, a worker's connection
        # lost) while another worker still trains the run. If that worker is dead after all,
        # its heartbeat goes stale and the reaper requeues the run.
        log.warning("run %s is still trained by %s; not starting it here", run.id, run.worker)
        raise _Skip("busy")


def _hold_folder(stack: ExitStack, out_dir: Path, wait_s: float, stop: StopSignal) -> bool:
    """Take the run's folder (`_run_dir_lock`) for as long as `stack` is open, waiting up to
    `wait_s` for it while another process holds it; returns whether it is locked. Raises
    _Skip("busy") when it stays held, or _Skip(REQUEUED) if the worker stops meanwhile."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return bool(stack.enter_context(_run_dir_lock(out_dir)))
        except _Skip as skip:
            if skip.status != "busy":
                raise
            if stop.received:
                raise _Skip(REQUEUED) from None
            if time.monotonic() >= deadline:
                log.warning("%s is held by another live process; not training it here",
                            out_dir)
                raise
        time.sleep(FOLDER_POLL_S)


def _note_let_go(settings: Settings, run_id: int, task_id: str | None) -> None:
    """Say in the note of the queued run that its message was let go because its folder
    stayed held (FOLDER_HELD): the reaper's resend then says nothing of a lost queue."""
    with session_scope(settings.sqlalchemy_url) as session:
        run = session.get(Run, run_id)
        if run is None or FOLDER_HELD in (run.error or ""):
            return
        session.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == "queued", Run.celery_task_id == task_id)
            .values(error=with_note(run.error, FOLDER_HELD))
        )


@contextmanager
def _run_dir_lock(out_dir: Path) -> Iterator[bool]:
    """Hold the run's folder for this process while it trains, or raise _Skip("busy"); yields
    whether it is locked (not on a file system without locks).

    What owns a run is the process training it, not the worker's name: a worker keeps its
    name when its pool child dies, or when it restarts. An flock names the process, and the
    operating system drops it when the process dies, however it dies: a redelivered message
    finds the folder free when the process that had it was killed, and taken while it still
    trains (on this host, or on any host where a shared data directory supports flock).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _Skip("busy") from None
        except OSError as exc:  # a file system without locks: the heartbeat check remains
            log.warning("cannot lock %s (%s); training it without the lock", out_dir, exc)
            yield False
            return
        yield True


def _claim(settings: Settings, run_id: int, worker_name: str, task_id: str | None) -> _Job:
    """Mark the run running on this worker and read what training needs. Raises _Skip or
    _End when this message must not train it; any other error ends the run failed."""
    # Found before the transaction opens: the first call imports torch and starts CUDA
    # (seconds), which held the run's row read meanwhile ("idle in transaction" on
    # PostgreSQL, in the way of a migration). A bad setting still ends the run only where
    # it did, after the checks that skip or end this message for other reasons.
    try:
        device = resolve_device(settings.worker_device)
    except Exception as exc:  # noqa: BLE001 - raised below, in its place
        device = exc
    with session_scope(settings.sqlalchemy_url) as session:
        run = session.get(Run, run_id)
        _check_message(settings, run, worker_name, task_id)
        if run.cancel_requested:
            raise _End("cancelled")
        # A message that finds its run "running" is a redelivery: the process that started
        # it died without a word (the OOM killer, a power cut). Enqueueing, by a person or
        # the reaper, always sets "queued" first, so the cap stops only automatic
        # redeliveries, with the reaper's rule (attempts counted since a person last queued
        # the run).
        if run.status == "running" and run.attempts >= settings.max_attempts:
            raise _End("lost", (
                f"worker {run.worker} stopped during attempt {run.attempts} (last heartbeat "
                f"{last_heartbeat(run)}); lost {run.attempts} times, so not started again "
                "(requeue it to resume from its last checkpoint)"
            ))
        if isinstance(device, Exception):
            raise device
        device, device_name = device
        dataset = session.get(Dataset, run.dataset_id)
        if dataset is None:
            raise _End("failed", f"its dataset {run.dataset_id} no longer exists")
        dataset_root = settings.datasets_dir / dataset.storage_key
        if not dataset_root.is_dir():
            raise _End("failed", f"the files of dataset {dataset.id} ({dataset.name!r}) are "
                                 f"missing from {dataset_root}")
        job = _Job(
            config=dict(run.config, device=device),
            budget=run.budget,
            seed=run.seed,
            items=dataset_items(session, dataset, dataset_root),
            metadata={
                "run_id": run_id,
                "experiment_id": run.experiment_id,
                "dataset_id": dataset.id,
                "dataset_name": dataset.name,
                "dataset_fingerprint": dataset.fingerprint,
            },
            cache_dir=image_cache_dir(settings, dataset),
            dataset_root=dataset_root,
            status_event={"type": "status", "status": "running", "worker": worker_name,
                          # Where the record stands (a run queued again keeps its step),
                          # as the web's status events say: not 0 before a resume.
                          "device": device_name, "attempt": run.attempts + 1, "step": run.step,
                          "total_steps": run.config["iterations"]},
        )
        # Only if nobody changed the run since it was read: a cancel (or a delete) that got
        # in between wins, instead of being overwritten with "running" (it was, and the run
        # trained after the page had said "cancelled").
        taken = session.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == run.status, Run.attempts == run.attempts,
                   Run.cancel_requested.is_(False))
            .values(status="running", started_at=run.started_at or utcnow(),
                    heartbeat_at=utcnow(), worker=worker_name, device=device_name,
                    attempts=Run.attempts + 1, error=None,
                    images_per_s=None)  # an attempt before (on a GPU, say) is no guide
            .execution_options(synchronize_session=False)
        ).rowcount
        if not taken:
            raise _Skip("changed")
    return job


def _train(settings: Settings, recorder: RunRecorder, job: _Job, out_dir: Path,
           stop: StopSignal) -> dict[str, Any]:
    try:
        from worker.selftuning.config import RunConfig, backbone_in
        from worker.selftuning.data import make_budget_data
        from worker.selftuning.files import checkpoint_path
        from worker.selftuning.loop import TrainingCancelled, train
    except Exception as exc:  # noqa: BLE001 - a worker whose training code does not load
        # (a package missing, an upgrade half done): the run it took ends failed, saying so,
        # rather than sitting "running" until the reaper calls its worker silent.
        return _fail(recorder, exc, f"could not start on worker {recorder.worker}: ")

    run_id = recorder.run_id
    recorder.publish(job.status_event)
    # Also while recording: that may wait for the database.
    with _Heartbeat(settings, run_id, recorder.worker, recorder.task_id):
        try:
            # A weight file is stored relative to the data directory (app.experiments).
            backbone = backbone_in(job.config["backbone"], settings.data_dir.resolve())
            config = RunConfig.from_dict({**job.config, "backbone": backbone})
            data, budget_info = make_budget_data(*job.items, job.budget, job.seed)
            metrics = train(
                config, data, out_dir,
                on_event=recorder.on_event,
                should_cancel=lambda: recorder.should_cancel() or stop.received,
                metadata={**job.metadata, "budget": budget_info},
                cache_dir=job.cache_dir,
            )
        except TrainingCancelled:
            if recorder.taken_away:  # its state saved (RunRecorder.hold)
                raise RunTakenAway(run_id, recorder.taken_away) from None
            # A person's cancel wins over the worker stopping: the run ends as they asked.
            if stop.received and not recorder.should_cancel():
                recorder.step_aside()
                return {"run_id": run_id, "status": REQUEUED, "step": recorder.saved_step}
            recorder.finish("cancelled")
            return {"run_id": run_id, "status": "cancelled"}
        except (RunDeleted, RunTakenAway):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends the run with its message
            # Unless the run was deleted: its folder went with it, hence the error.
            recorder.check_not_deleted()
            return _fail(recorder, exc, _missing_image(exc, job))

        def rewrite() -> None:
            with session_scope(settings.sqlalchemy_url) as session:
                run = session.get(Run, run_id)
                if run is None:
                    raise RunDeleted(run_id)
                rewrite_exports(out_dir, session, job.dataset_root, run)

        try:
            retry_while_database_down(rewrite, f"run {run_id}: rewriting its exported files",
                                      recorder.finish_retry_s)
            recorder.record_artifacts(out_dir)
            # The labeled count puts the run on the accuracy-against-labels curve
            # (app.estimates).
            metrics = {**metrics, "labeled_count": budget_info["labeled_count"]}
            recorder.finish("succeeded", metrics=metrics)
        except (RunDeleted, RunTakenAway, *DATABASE_DOWN):
            raise
        except Exception as exc:  # noqa: BLE001 - a full disk, say: the run ends saying so
            # rather than "running" until the reaper calls it lost, attempt after attempt. Its
            # training state stays: "Run again" only evaluates and exports.
            recorder.check_not_deleted()
            return _fail(recorder, exc, "trained, but its results could not be recorded: ")
    # Recorded: nothing resumes a finished run, and its training state (model, key encoder,
    # optimiser: several times the exported model) would stay on disk for good.
    shutil.rmtree(checkpoint_path(out_dir).parent, ignore_errors=True)
    return {"run_id": run_id, "status": "succeeded", "test_top1": metrics.get("test_top1")}


def _forget_deleted(recorder: RunRecorder, out_dir: Path) -> dict[str, Any]:
    """The run was deleted while this process had it: remove what it may have made again
    since (its folder, its live feed), and say so; nothing failed."""
    shutil.rmtree(out_dir, ignore_errors=True)
    recorder.forget_feed()
    log.info("run %s was deleted while this worker had it: stopped, and its folder removed",
             recorder.run_id)
    return {"run_id": recorder.run_id, "status": "deleted"}


def _let_go(recorder: RunRecorder) -> dict[str, Any]:
    """The run was taken from this process (see RunRecorder.hold): nothing more is recorded,
    and its folder stays, with its training state, for the attempt that has it now; leaving
    here releases the folder's lock for it."""
    saved = (f"newest training state saved here: step {recorder.saved_step}"
             if recorder.saved_step else "no training state saved here")
    log.warning("run %s was taken from this worker while it was paused or cut off (it is now "
                "%s): stopped without recording anything more; its folder stays for the "
                "attempt that has it (%s)", recorder.run_id, recorder.taken_away, saved)
    return {"run_id": recorder.run_id, "status": "taken"}


def _missing_image(exc: Exception, job: _Job) -> str:
    """The reason, in words, for a run stopped by one of its dataset's files gone (removed or
    moved by hand since the run was queued: the whole folder gone is found before training,
    in _claim); nothing for any other error."""
    missing = Path(exc.filename) if isinstance(exc, FileNotFoundError) and exc.filename else None
    if missing is None or not missing.is_relative_to(job.dataset_root):
        return ""
    return (f"an image of its dataset is missing: {missing.relative_to(job.dataset_root)} is "
            f"not in {job.dataset_root} (deleted or moved by hand?): ")


def _fail(recorder: RunRecorder, exc: Exception, context: str = "") -> dict[str, Any]:
    """End the run failed, with the error and where it came from."""
    log.exception("run %s failed", recorder.run_id)
    detail = context + "".join(traceback.format_exception_only(exc)).strip()
    tail = "".join(traceback.format_tb(exc.__traceback__)[-3:])
    recorder.finish("failed", error=f"{detail}\n\n{tail}"[:8000])
    return {"run_id": recorder.run_id, "status": "failed", "error": detail}
