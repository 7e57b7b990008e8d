"""ONNX Runtime sessions: the one place they are built, and the process-level cache of them.

``session(path, threads, spin, optimized_cache)`` gives an ``InferenceSession`` on the CPU
execution provider (the only one) with ``threads`` intra-op threads, one inter-op thread
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
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

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
