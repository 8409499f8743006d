"""Import the engine's backbone checks (torch, timm) in the background as the web starts.

The web checks a backbone before it queues an experiment's runs (`app.experiments`): it
imports torch, torchvision and timm (about 5 s on a 2-core machine, once per process) and
puts one batch through the model on the meta device (about 1.5 s the first time, while torch
sets up its meta kernels; then 0.03 s). Done on the first check, that was a wait of 4-6 s on
the new-experiment form's first answer. Here it is done while nobody waits, with the check of
the form's defaults (the default backbone at the quick preset's image size), which is cached.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

_preloading: threading.Thread | None = None


def _import_engine() -> None:
    started = time.monotonic()
    try:
        from app.schemas import ExperimentIn
        from worker.selftuning.backbones import check_image_size
        from worker.selftuning.config import RunConfig

        check_image_size(ExperimentIn.model_fields["backbone"].default,
                         RunConfig.from_preset("quick").image_size)
    except Exception:
        # The check that needs them imports them again, and answers with what went wrong.
        log.exception("could not load the engine's backbone checks in the background")
        return
    log.info("backbone checks ready in %.1f s", time.monotonic() - started)


def start_preload() -> None:
    """Start importing the engine in a background thread (once per process)."""
    global _preloading
    if _preloading is None:
        _preloading = threading.Thread(target=_import_engine, name="engine-preload", daemon=True)
        _preloading.start()


def wait_for_preload() -> None:
    """Let a preload in progress finish before importing the engine here: one thread imports
    torch, not two at once (two threads importing one package's modules can deadlock on
    Python's per-module import locks)."""
    if _preloading is not None:
        _preloading.join()
