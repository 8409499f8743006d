"""Entry point of `python -m worker.selftuning`."""

import signal
import sys

ctrl_c = []  # set while torch and timm load (seconds): a library's bare `except:` in an
# optional import can swallow the KeyboardInterrupt, and the command then trained on as if
# the key had never been pressed.


def _stop_loading(signum, frame):
    ctrl_c.append(signum)
    raise KeyboardInterrupt


previous = signal.signal(signal.SIGINT, _stop_loading)
try:
    from worker.selftuning.cli import main
except KeyboardInterrupt:
    ctrl_c.append(signal.SIGINT)
signal.signal(signal.SIGINT, previous)
if ctrl_c:  # nothing has begun
    print("stopped before training began", file=sys.stderr)
    raise SystemExit(130)

raise SystemExit(main())
