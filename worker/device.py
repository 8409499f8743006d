"""Which device a worker trains on, found without initialising CUDA in the parent process."""

from __future__ import annotations

import json
import subprocess
import sys

# In a throwaway interpreter: what the pool processes will make of the setting.
_PROBE = """
import json, sys
from worker.device import resolve_device
try:
    device, name = resolve_device(sys.argv[1])
    found = {"device": device, "name": name}
except RuntimeError as exc:
    found = {"error": str(exc)}
except Exception as exc:
    found = {"error": f"{type(exc).__name__}: {exc}".strip()}
print(json.dumps(found))
"""


def resolve_device(setting: str) -> tuple[str, str]:
    """(torch device, human name). Runs inside the pool process, after the fork (and in the
    probe's interpreter, `probe_device`)."""
    import torch

    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return "cpu", "cpu"
    device = torch.device("cuda:0" if setting in ("auto", "cuda") else setting)
    if device.type != "cuda" or (device.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(
            f"this worker is set to train on {setting!r} (SELFTUNE_WORKER_DEVICE) but has "
            f"{torch.cuda.device_count()} usable CUDA device(s)"
        )
    return str(device), torch.cuda.get_device_name(device)


class DeviceUnusable(RuntimeError):
    """The device the worker is set to train on is not there (the message says why)."""


def probe_device(setting: str = "auto") -> dict[str, str]:
    """{"device": "cpu"|"cuda:N", "name": human name}, probed in a child process; raises
    DeviceUnusable when the device cannot be used (a worker set to `cuda` on a machine with
    none took runs and failed each, its health showing the probe's Python source).

    Celery's prefork pool forks training processes from the worker's main process; CUDA must
    not be initialised there before the fork, so the probe runs in a throwaway interpreter.
    """
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, setting], capture_output=True,
                             text=True, timeout=120)
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        raise DeviceUnusable("the device probe did not answer in 120 s") from None
    except (ValueError, IndexError):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeviceUnusable(f"the device probe failed: {last}") from None
    if "error" in found:
        raise DeviceUnusable(found["error"])
    return found
