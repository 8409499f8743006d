"""A succeeded run's model as ONNX, made from its export on the first download and kept
beside it (`model.onnx`): runs that no one takes to ONNX cost no disk for it."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from app.engine_preload import wait_for_preload
from app.responses import READ_ONLY
from worker.selftuning.files import MODEL_FILE, ONNX_FILE, new_file_mode, temporary_path

# One conversion at a time: the exporter's state is global, and each takes every core.
_CONVERTING = threading.Lock()


def onnx_file(folder: Path) -> tuple[Path, bool]:
    """The ONNX file of the model exported in `folder`, and whether it is a temporary one to
    delete once sent (the folder cannot be written). Made again when the model is newer (a
    run exported again). A ValueError when the model does not convert, FileNotFoundError when
    its files are gone."""
    wait_for_preload()  # one thread imports torch (app.engine_preload)
    from worker.selftuning.onnx_export import export_onnx

    target = folder / ONNX_FILE
    with _CONVERTING:
        weights = (folder / MODEL_FILE).stat()
        try:
            if target.stat().st_mtime_ns >= weights.st_mtime_ns:
                return target, False
        except FileNotFoundError:
            pass
        temp = temporary_path(target)  # one conversion at a time: one name a process
        try:
            temp.touch()
        except OSError as exc:
            if exc.errno not in READ_ONLY:
                raise
            handle, name = tempfile.mkstemp(prefix="selftune-", suffix=".onnx")
            os.close(handle)
            try:
                export_onnx(folder, Path(name))
            except BaseException:
                Path(name).unlink(missing_ok=True)
                raise
            return Path(name), True
        try:
            export_onnx(folder, temp)
            os.chmod(temp, new_file_mode(folder))
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
    return target, False
