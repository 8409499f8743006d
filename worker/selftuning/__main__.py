"""Entry point of `python -m worker.selftuning`."""

import sys

try:
    from worker.selftuning.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch loads (seconds): nothing has begun
    print("stopped before training began", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
