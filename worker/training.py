"""The body of the training task: load the run, build the engine's inputs, train, record."""

from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.models import Dataset, DatasetImage, Run
from app.schemas import TERMINAL_STATUSES
from worker.runs import RunRecorder, rewrite_predictions, utcnow

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> tuple[str, str]:
    """(torch device, human name). Runs inside the pool process, after the fork."""
    import torch

    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return "cpu", "cpu"
    device = "cuda:0" if setting in ("auto", "cuda") else setting
    return device, torch.cuda.get_device_name(torch.device(device))


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

    def __init__(self, settings: Settings, run_id: int) -> None:
        self.settings, self.run_id = settings, run_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.settings.heartbeat_interval_s):
            try:
                with session_scope(self.settings.sqlalchemy_url) as session:
                    session.get(Run, self.run_id).heartbeat_at = utcnow()
            except Exception as exc:  # noqa: BLE001 - a missed beat must not stop training
                log.warning("run %s: heartbeat failed: %s", self.run_id, exc)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()


def execute_run(
    settings: Settings, run_id: int, worker_name: str, task_id: str | None = None
) -> dict[str, Any]:
    from worker.selftuning.config import RunConfig
    from worker.selftuning.data import make_budget_data
    from worker.selftuning.loop import TrainingCancelled, train

    with session_scope(settings.sqlalchemy_url) as session:
        run = session.get(Run, run_id)
        if run is None:
            log.warning("run %s no longer exists; dropping its task", run_id)
            return {"run_id": run_id, "status": "missing"}
        if run.status in TERMINAL_STATUSES:  # a lost run trains again only once requeued
            return {"run_id": run_id, "status": run.status}
        if task_id and run.celery_task_id and task_id != run.celery_task_id:
            # A message from before a requeue came back: the newer task owns the run.
            return {"run_id": run_id, "status": "superseded"}
        dataset = session.get(Dataset, run.dataset_id)
        experiment_id = run.experiment_id
        recorder = RunRecorder(settings, run_id, experiment_id)
        if run.cancel_requested:
            run.status = "cancelled"
            run.finished_at = utcnow()
            session.commit()
            recorder.publish({"type": "end", "status": "cancelled", "error": None,
                              "metrics": None})
            return {"run_id": run_id, "status": "cancelled"}
        device, device_name = resolve_device(settings.worker_device)
        run.status = "running"
        run.started_at = run.started_at or utcnow()
        run.heartbeat_at = utcnow()
        run.worker = worker_name
        run.device = device_name
        run.attempts += 1
        run.error = None
        config_values = dict(run.config, device=device)
        budget, seed = run.budget, run.seed
        dataset_root = settings.datasets_dir / dataset.storage_key
        class_names, train_items, test_items, unlabeled = dataset_items(
            session, dataset, dataset_root
        )
        metadata = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "dataset_id": dataset.id,
            "dataset_name": dataset.name,
            "dataset_fingerprint": dataset.fingerprint,
        }
        attempt = run.attempts
    recorder.publish({"type": "status", "status": "running", "worker": worker_name,
                      "device": device_name, "attempt": attempt, "step": 0,
                      "total_steps": config_values["iterations"]})
    out_dir = settings.runs_dir / str(run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = RunConfig.from_dict(config_values)
        data, budget_info = make_budget_data(
            class_names, train_items, test_items, unlabeled, budget, seed
        )
        metadata["budget"] = budget_info
        with _Heartbeat(settings, run_id):
            metrics = train(
                config, data, out_dir,
                on_event=recorder.on_event,
                should_cancel=recorder.should_cancel,
                metadata=metadata,
                cache_dir=settings.cache_dir / f"dataset-{dataset.id}-{dataset.fingerprint[:12]}",
            )
    except TrainingCancelled:
        recorder.finish("cancelled")
        return {"run_id": run_id, "status": "cancelled"}
    except Exception as exc:  # noqa: BLE001 - any failure ends the run with its message
        log.exception("run %s failed", run_id)
        detail = "".join(traceback.format_exception_only(exc)).strip()
        tail = "".join(traceback.format_tb(exc.__traceback__)[-3:])
        recorder.finish("failed", error=f"{detail}\n\n{tail}"[:8000])
        return {"run_id": run_id, "status": "failed", "error": detail}
    with session_scope(settings.sqlalchemy_url) as session:
        rewrite_predictions(out_dir, session, dataset_root, session.get(Run, run_id))
    recorder.record_artifacts(out_dir)
    # The labeled count puts the run on the accuracy-against-labels curve (app.estimates).
    metrics = {**metrics, "labeled_count": budget_info["labeled_count"]}
    recorder.finish("succeeded", metrics=metrics)
    return {"run_id": run_id, "status": "succeeded", "test_top1": metrics.get("test_top1")}
