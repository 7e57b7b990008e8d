"""``python -m cache``: see :mod:`cache.cli`."""

from cache.cli import main

raise SystemExit(main())
