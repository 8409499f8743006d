"""Which device a worker trains on, found without initialising CUDA in the parent process."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json, sys
import torch
want = sys.argv[1]
if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
    print(json.dumps({"device": "cpu", "name": "cpu"}))
else:
    index = int(want.split(":")[1]) if ":" in want else 0
    print(json.dumps({"device": f"cuda:{index}", "name": torch.cuda.get_device_name(index)}))
"""


def probe_device(setting: str = "auto") -> dict[str, str]:
    """{"device": "cpu"|"cuda:N", "name": human name}, probed in a child process.

    Celery's prefork pool forks training processes from the worker's main process; CUDA must
    not be initialised there before the fork, so the probe runs in a throwaway interpreter.
    """
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, setting],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"device": "unknown", "name": f"device probe failed: {exc}"}
