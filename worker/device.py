"""Which device a worker trains on, found without initialising CUDA in the parent process."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json, sys
want = sys.argv[1]
try:
    import torch
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        found = {"device": "cpu", "name": "cpu"}
    else:
        index = int(want.split(":")[1]) if ":" in want else 0
        count = torch.cuda.device_count()
        if index >= count:
            found = {"error": f"this worker is set to train on {want!r} "
                              f"(SELFTUNE_WORKER_DEVICE) but has {count} usable CUDA device(s)"}
        else:
            found = {"device": f"cuda:{index}", "name": torch.cuda.get_device_name(index)}
except Exception as exc:
    found = {"error": f"{type(exc).__name__}: {exc}".strip()}
print(json.dumps(found))
"""


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
