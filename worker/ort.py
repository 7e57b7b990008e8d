"""ONNX Runtime in the worker: the one place sessions are built (and cached per process), and
the cache of ONNX exports they are built from.

Sessions. ``session(path, threads, spin, optimized_cache)`` gives an ``InferenceSession`` on
the CPU execution provider (the only one) with ``threads`` intra-op threads, one inter-op thread
(sequential execution) and all graph optimizations; ``spin`` sets
``session.intra_op.allow_spinning`` (a spinning pool keeps its cores busy between runs, which
starves the other stages on shared cores).

``optimized_cache``: a file for the optimized graph. The first build writes it
(``optimized_model_filepath``, renamed into place atomically); later builds load it with the
optimizations off while it is newer than ``path``. It is specific to this host's CPU and ORT
version (layout optimizations), so it belongs in a local cache dir.

Sessions are built once per process and reused, keyed by (resolved path, threads, spin); a
session built from an older version of the file (size or mtime changed) is replaced. A forked
child starts with an empty cache (ORT sessions are not fork-safe).

Exports (the mechanics every exporting module shares; each stage's module owns its graph, its
file names and what its fingerprint covers: :mod:`worker.ort_flow`, :mod:`worker.ort_hift`):

- :func:`model_fingerprint`: sha256 of a weights file (name, size, mtime, first and last MiB),
  the torch / onnx versions and the caller's ``extra`` (config, exported code, opset);
- :func:`cached_export`: ``cache_dir / name``, exported on first use with progress lines,
  written atomically under a lock; :class:`ExportError` names the directory when it is
  missing there and cannot be written;
- :func:`export_dir`: ``<cache dir>/onnx``, where the worker keeps them;
- :func:`load_session`: :func:`session` of an export with its optimized graph cached beside it
  (:func:`optimized_path`) when the cache dir allows, else optimized in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FINGERPRINT_PROBE = 1 << 20  # bytes hashed at each end of a weights file

_lock = threading.Lock()
_cache: dict[tuple[str, int, bool], tuple[tuple[int, int], Any]] = {}  # key -> (file stamp, .)
_cache_pid = os.getpid()


def clear_cache() -> None:
    """Drop every cached session (each is freed once nothing else holds it)."""
    with _lock:
        _cache.clear()


def session(
    path: str | Path, threads: int, spin: bool = False, optimized_cache: str | Path | None = None
) -> Any:
    """The cached ``onnxruntime.InferenceSession`` of ``path`` (built on first use; errors from
    ORT, e.g. for a file that is not a valid model, propagate)."""
    global _cache_pid
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    p = Path(path).resolve()
    st = p.stat()
    stamp = (st.st_size, st.st_mtime_ns)
    key = (str(p), threads, bool(spin))
    with _lock:
        if _cache_pid != os.getpid():  # forked: the parent's sessions are not ours to use
            _cache.clear()
            _cache_pid = os.getpid()
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        sess = _build(p, threads, spin, None if optimized_cache is None else Path(optimized_cache))
        _cache[key] = (stamp, sess)
    return sess


def _build(p: Path, threads: int, spin: bool, optimized: Path | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    providers = ["CPUExecutionProvider"]
    if optimized is None:
        return ort.InferenceSession(str(p), sess_options=opts, providers=providers)
    if optimized.is_file() and optimized.stat().st_mtime_ns >= p.stat().st_mtime_ns:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(optimized), sess_options=opts, providers=providers)
    optimized.parent.mkdir(parents=True, exist_ok=True)
    tmp = optimized.with_name(f".{optimized.name}.{os.getpid()}.tmp")
    opts.optimized_model_filepath = str(tmp)
    sess = ort.InferenceSession(str(p), sess_options=opts, providers=providers)
    os.replace(tmp, optimized)
    return sess


# ---- the export cache ------------------------------------------------------------------------


class ExportError(RuntimeError):
    """An ONNX export that is missing and cannot be written."""


def model_fingerprint(weights: Path, *extra: str | bytes) -> str:
    """sha256 of a weights file (name, size, mtime, first and last MiB), the torch and onnx
    versions and ``extra`` (the code, config and opset an export depends on)."""
    import onnx
    import torch

    st = weights.stat()
    h = hashlib.sha256(f"{weights.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    with open(weights, "rb") as f:
        h.update(f.read(FINGERPRINT_PROBE))
        f.seek(max(st.st_size - FINGERPRINT_PROBE, 0))
        h.update(f.read(FINGERPRINT_PROBE))
    h.update(f"torch {torch.__version__} onnx {onnx.__version__}".encode())
    for e in extra:
        h.update(hashlib.sha256(e.encode() if isinstance(e, str) else e).digest())
    return h.hexdigest()


def cached_export(
    cache_dir: str | Path,
    name: str,
    export: Callable[[Path], object],
    progress: Callable[[str], None] | None = None,
) -> Path:
    """``cache_dir / name``, written by ``export(path)`` first if it is not there (to a temp
    file renamed into place, under a lock so concurrent starters export once).

    Raises :class:`ExportError` naming ``cache_dir`` when it is missing and not writable."""
    say = progress or log.info
    cache_dir = Path(cache_dir)
    path = cache_dir / name
    if path.is_file():
        say(f"using {path}")
        return path
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / f".{name}.lock", "w")  # held across the export
    except OSError as e:
        raise ExportError(
            f"{name} is not exported yet and the export cache {cache_dir} is not writable "
            f"({e.strerror or e}): point the cache dir (COSY_CACHE_DIR) at a writable "
            f"directory, or export there once with python -m tuning.export"
        ) from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():  # another process exported it while we waited
            return path
        tmp = cache_dir / f".{name}.{os.getpid()}.tmp"
        say(f"exporting {name} to {cache_dir} (once per model) ...")
        t0 = time.monotonic()
        try:
            export(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        mb = path.stat().st_size / 2**20
        say(f"exported {name}: {mb:.0f} MiB in {time.monotonic() - t0:.1f} s")
    return path


def export_dir(cache_dir: str | Path) -> Path:
    """Where the ONNX exports live in the worker's cache dir (``COSY_CACHE_DIR``)."""
    return Path(cache_dir) / "onnx"


def optimized_path(onnx_path: str | Path) -> Path:
    """Where :func:`load_session` keeps the optimized graph of ``onnx_path``: beside it, keyed
    by the ORT version and this CPU (its layout optimizations are host specific)."""
    import onnxruntime

    from worker.host import cpu_facts

    onnx_path = Path(onnx_path)
    f = cpu_facts()
    flags = ",".join(k for k, on in sorted(f["isa"].items()) if on)
    host = f"{f['machine']}|{f['vendor']}|{f['family']}|{f['model']}|{flags}"
    tag = hashlib.sha256(f"{onnxruntime.__version__}|{host}".encode()).hexdigest()[:12]
    return onnx_path.with_name(f"{onnx_path.stem}.opt-{tag}.onnx")


def load_session(onnx_path: str | Path, threads: int, spin: bool = False) -> Any:
    """:func:`session` of an export with its optimized graph cached beside it
    (:func:`optimized_path`): loaded from there when it is usable (newer than the export),
    written there when the directory is writable, else (a read-only cache without it) the
    graph is optimized in memory at every start."""
    path = Path(onnx_path)
    optimized: Path | None = optimized_path(path)
    usable = optimized.is_file() and optimized.stat().st_mtime_ns >= path.stat().st_mtime_ns
    if not usable and not _writable(path.parent):
        optimized = None
    return session(path, threads, spin, optimized)


def _writable(directory: Path) -> bool:
    """Whether a file can be created in ``directory`` (tried: access(2) says yes to root)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False
