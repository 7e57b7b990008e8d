"""Where the tools write their reports by default: ``.cache/results/`` at the repo root
(git-ignored), never the caller's working directory. A ``--json``/``--plot`` flag overrides."""

from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / ".cache" / "results"


def default_out(name: str, ext: str) -> Path:
    """``.cache/results/<name>-<YYYYmmdd-HHMMSS>.<ext>`` (the folder is created)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.{ext}"
