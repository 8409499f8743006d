"""The Celery app: Redis broker and result backend, late acks, one training job at a time."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time

from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down

from app.config import Settings, get_settings, settings_or_exit
from app.experiments import TRAIN_TASK
from app.live import WORKER_KEY_PREFIX

log = logging.getLogger(__name__)

def create_celery(settings: Settings) -> Celery:
    url = settings.effective_redis_url
    app = Celery("selftune", broker=url, backend=url, include=["worker.tasks"])
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A fresh child per job: CUDA state and memory never leak from one run to the next.
        worker_max_tasks_per_child=1,
        worker_concurrency=settings.worker_concurrency,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        worker_hijack_root_logger=False,
        task_track_started=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


app = create_celery(settings_or_exit("worker"))


# --- Worker presence: a Redis key per worker, refreshed while it lives ---------------------

_worker_info: dict[str, str] = {}
_stop_heartbeat = threading.Event()


def worker_identity() -> dict[str, str]:
    return dict(_worker_info)


def _heartbeat_loop(hostname: str, info: dict[str, str]) -> None:
    import redis

    settings = get_settings()
    interval = settings.heartbeat_interval_s
    client = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=5)
    payload = json.dumps({"name": hostname, "device": info["name"], "torch_device": info["device"]})
    while not _stop_heartbeat.is_set():
        try:
            client.set(WORKER_KEY_PREFIX + hostname, payload, ex=max(3, int(interval * 3)))
        except redis.RedisError as exc:  # Redis restarting: keep trying, training goes on
            log.warning("worker heartbeat failed: %s", exc)
        _stop_heartbeat.wait(interval)
    try:
        client.delete(WORKER_KEY_PREFIX + hostname)
    except redis.RedisError:
        pass


# Whether this process has checked its data directory against the database: at start, or,
# when the database did not answer then, before the first run it takes (worker.tasks).
_data_dir_checked = False


def check_data_dir(settings: Settings) -> None:
    """Check, once per process, that the data directory is the database's and the database at
    this version (app.db.claim_data_dir). Raises StartupRefused, or what the driver raises
    when the database does not answer: then the next run's arrival tries again."""
    global _data_dir_checked
    if not _data_dir_checked:
        from app.db import claim_data_dir

        claim_data_dir(settings.data_dir, settings.sqlalchemy_url)
        _data_dir_checked = True


@worker_init.connect
def _on_worker_init(**_kwargs) -> None:
    """Refuse to start on another database's data directory (or on a database not migrated),
    before taking any message: such a worker would drop the runs its database does not know
    and write run folders, resume checkpoints included, that belong to the other database's
    runs of the same ids. A database that does not answer yet is not a refusal: the check is
    made when a run arrives (worker.tasks.TrainRequest), and a refusal then stops the worker
    as it would have stopped here. Nor on a device it cannot train on (SELFTUNE_WORKER_DEVICE
    set to a GPU the machine lacks), which would fail every run it took."""
    from sqlalchemy.exc import OperationalError

    from app.db import StartupRefused
    from worker.device import DeviceUnusable, probe_device

    settings = get_settings()
    try:
        check_data_dir(settings)
        _worker_info.update(probe_device(settings.worker_device))
    except (StartupRefused, DeviceUnusable) as exc:
        log.critical("worker cannot start: %s", exc)
        raise SystemExit(2) from None
    except OperationalError as exc:
        log.warning("worker could not check its data directory against the database "
                    "(%s); it does so before it takes a run", str(exc).splitlines()[0])
    remove_abandoned_caches(settings)


def remove_abandoned_caches(settings: Settings) -> None:
    """Half-written image caches whose writer died (a killed worker: one run at 1024 px
    reserves tens of GB) would stay until a run of the same dataset decodes again. Another
    worker's cache being written is left alone (`is_abandoned` checks its process)."""
    from worker.selftuning.files import remove_abandoned_temporaries

    try:
        folders = [path for path in settings.cache_dir.iterdir() if path.is_dir()]
    except FileNotFoundError:
        return
    for folder in folders:
        for removed in remove_abandoned_temporaries(folder):
            log.warning("removed an image cache left unfinished: %s", removed)


@worker_ready.connect
def _on_worker_ready(sender=None, **_kwargs) -> None:
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    _worker_info["hostname"] = hostname
    threading.Thread(
        target=_heartbeat_loop, args=(hostname, dict(_worker_info)), daemon=True
    ).start()
    log.info("worker %s ready on %s", hostname, _worker_info.get("name"))


@worker_shutdown.connect
def _on_worker_shutdown(**_kwargs) -> None:
    _stop_heartbeat.set()
    time.sleep(0.1)


@worker_shutting_down.connect
def _on_worker_shutting_down(**_kwargs) -> None:
    """The worker was told to stop (SIGTERM, Ctrl-C): pass it on to each pool process that
    trains a run, which then saves its state and puts the run back in the queue at its next
    iteration (worker.training.StopSignal). Celery itself would wait for the run to finish,
    hours maybe, and whatever stops the worker would kill it long before."""
    from celery.worker import state

    for request in list(state.active_requests):
        if request.name == TRAIN_TASK and request.worker_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(request.worker_pid, signal.SIGTERM)
