"""Entry point of `python -m worker.selftuning`."""

from worker.selftuning.cli import main

raise SystemExit(main())
