"""Export a model dir's ONNX Runtime graphs ahead of the first start:
``python -m tuning.export --model-dir DIR [--cache-dir DIR] [--only NAME ...]``.

This file owns the command line and the registry of exporters (:data:`EXPORTERS`): a name
(the stage) -> a function ``(model_dir, export_dir, progress) -> [paths]`` that returns that
stage's cached graphs, exporting the missing ones: ``flow`` (the DiT step,
:func:`worker.ort_flow.dit_onnx_path`) and ``hift`` (the vocoder's step and final graphs,
:func:`worker.ort_hift.hift_onnx_paths`); all of them by default. Each stage's module owns its
export and its cache naming; :func:`worker.ort.cached_export` is the shared cache mechanics. A
stage whose graphs are cached costs a fingerprint (no model is loaded).

Progress lines go to stderr, one ``NAME: PATH`` line per graph to stdout. The export dir
defaults to ``<COSY_CACHE_DIR>/onnx``, where the worker looks; exit status 1 with the reason
when a graph is missing and cannot be written there.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from worker.hyperyaml import ConfigError
from worker.ort import ExportError, export_dir
from worker.ort_flow import dit_onnx_path
from worker.ort_hift import hift_onnx_paths
from worker.settings import KnobError, Knobs

Exporter = Callable[[Path, Path, Callable[[str], None]], list[Path]]


def _flow(model_dir: Path, out: Path, progress: Callable[[str], None]) -> list[Path]:
    return [dit_onnx_path(model_dir, out, progress=progress)]


def _hift(model_dir: Path, out: Path, progress: Callable[[str], None]) -> list[Path]:
    return list(hift_onnx_paths(model_dir, out, progress=progress))


EXPORTERS: dict[str, Exporter] = {"flow": _flow, "hift": _hift}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuning.export", description=__doc__)
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument(
        "--cache-dir", type=Path, help="the worker's cache dir (default: COSY_CACHE_DIR's)"
    )
    ap.add_argument("--only", choices=sorted(EXPORTERS), action="append", help="repeatable")
    args = ap.parse_args(argv)
    if args.cache_dir is None:
        try:
            args.cache_dir = Knobs.from_env().cache_dir
        except KnobError as e:
            print(e, file=sys.stderr)
            return 2
    out = export_dir(args.cache_dir)
    for name in args.only or list(EXPORTERS):

        def progress(line: str, name: str = name) -> None:
            print(f"{name}: {line}", file=sys.stderr, flush=True)

        t0 = time.monotonic()
        try:
            paths = EXPORTERS[name](args.model_dir, out, progress)
        except (ExportError, ConfigError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
        progress(f"ready in {time.monotonic() - t0:.1f} s")
        for p in paths:
            print(f"{name}: {p}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
