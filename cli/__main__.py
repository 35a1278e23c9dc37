"""``python -m epwatch.cli``: the ``epwatch`` command without its console script."""

from epwatch.cli import main

raise SystemExit(main())
