"""Measured host limits, and the CLI ``python -m tuning.cpu [--limits] [--json]``.

The facts (ISA, cores, NUMA: ``cpu_facts()``) belong to the runtime (``worker/host.py``);
this module measures.

``measure_limits(threads)`` measures the two physical ceilings the benchmarks compare against
(design.md, "Numbers it is judged by"): weight-streaming bandwidth (batch-1 fp32 GEMV over a
matrix far larger than the last-level cache: what bounds LLM decode) and fp32 GEMM GFLOP/s
(what bounds the DiT), plus bf16 GEMM only where bf16 is native.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from worker.host import (  # noqa: F401  (re-exported for the CLI and tests)
    ISA_FLAGS,
    cpu_facts,
    format_cpu_list,
    has_amx,
    has_native_bf16,
    usable_cpus,
)

GEMM_SHAPE = (2048, 1024, 4096)  # M x K x N, the design's reference MatMul
_MB = 1 << 20

# ---------------------------------------------------------------------------------------------
# measured limits


def _timed_median(fn: Callable[[], object], budget_s: float, min_reps: int, max_reps: int):
    """Median seconds per call of ``fn`` after one warm-up call; as many reps as fit the budget."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(warm, 1e-9))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), reps


def _gemv_bytes(facts: Mapping[str, Any]) -> int:
    """Bandwidth test matrix: >= 256 MB and 8x the LLC, <= 512 MB and 1/4 of free RAM."""
    size = max(256 * _MB, 8 * (facts.get("llc_bytes") or 0))
    size = min(size, 512 * _MB)
    if facts.get("mem_available_bytes"):
        size = min(size, facts["mem_available_bytes"] // 4)
    return max(size, 16 * _MB)


def _time_gemv(n_bytes: int, budget_s: float) -> tuple[int, float, int]:
    """Batch-1 fp32 ``F.linear`` over an n_bytes weight (LLM decode): bytes, median s, reps."""
    import torch
    import torch.nn.functional as F

    cols = 4096
    rows = max(1, n_bytes // (4 * cols))
    w = torch.empty(rows, cols).fill_(0.5)  # touched now, so no page faults while timed
    x = torch.full((1, cols), 0.25)
    seconds, reps = _timed_median(lambda: F.linear(x, w), budget_s, 3, 30)
    return w.numel() * w.element_size(), seconds, reps


def _time_linear(a, b, budget_s: float, max_reps: int) -> tuple[float, int]:
    import torch.nn.functional as F

    return _timed_median(lambda: F.linear(a, b), budget_s, 3, max_reps)


def measure_limits(
    threads: int,
    seconds: float = 5.0,
    *,
    gemv_mb: float | None = None,
    gemm_shape: tuple[int, int, int] = GEMM_SHAPE,
    bf16: bool | None = None,
) -> dict[str, Any]:
    """Measure this host's weight-streaming bandwidth and GEMM throughput with ``threads`` threads.

    - ``gemv_fp32_gbs``: GB/s (1e9 B/s) of batch-1 fp32 ``F.linear`` over a weight matrix of
      ``gemv_mb`` MB (default: >= 256 MB and 8x the last-level cache, <= 512 MB), i.e. the
      rate at which a memory-bound decode step can stream weights.
    - ``gemm_fp32_gflops``: fp32 ``F.linear`` of an M x K input by an N x K weight
      (``gemm_shape`` = M, K, N; default the design's 2048 x 1024 x 4096).
    - ``gemm_bf16_gflops``: the same in bf16, measured only when bf16 is native (AVX512_BF16 or
      AMX; ``bf16=None`` decides from :func:`cpu_facts`), else ``None``.

    Each figure is the median of several timed repeats after a warm-up; the number of repeats
    is chosen so the whole call takes about ``seconds`` (at least 3 repeats each, so a tiny
    budget still gives medians). torch's thread count is restored afterwards.
    """
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    facts = cpu_facts()
    if bf16 is None:
        bf16 = has_native_bf16(facts)
    n_bytes = int(gemv_mb * _MB) if gemv_mb else _gemv_bytes(facts)
    m, k, n = gemm_shape
    budget = max(seconds, 0.0)
    shares = (0.4, 0.3, 0.3) if bf16 else (0.55, 0.45, 0.0)
    old_threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            gemv_bytes, t_gemv, reps_gemv = _time_gemv(n_bytes, budget * shares[0])
            a, b = torch.rand(m, k), torch.rand(n, k)
            t_fp32, reps_fp32 = _time_linear(a, b, budget * shares[1], 20)
            t_bf16 = reps_bf16 = None
            if bf16:
                t_bf16, reps_bf16 = _time_linear(a.bfloat16(), b.bfloat16(), budget * shares[2], 40)
    finally:
        torch.set_num_threads(old_threads)
    flops = 2.0 * m * k * n
    return {
        "threads": threads,
        "gemv_fp32_gbs": gemv_bytes / t_gemv / 1e9,
        "gemv_bytes": gemv_bytes,
        "gemv_reps": reps_gemv,
        "gemm_shape": [m, k, n],
        "gemm_fp32_gflops": flops / t_fp32 / 1e9,
        "gemm_fp32_reps": reps_fp32,
        "gemm_bf16_gflops": flops / t_bf16 / 1e9 if t_bf16 else None,
        "gemm_bf16_reps": reps_bf16,
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------
# CLI


def _table(facts: dict[str, Any], limits: dict[str, Any] | None) -> str:
    def fmt(value: Any) -> str:
        if value is None:
            return "?"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value)

    rows: list[tuple[str, str]] = []
    for key, value in facts.items():
        if key == "isa":
            have = [f for f, on in value.items() if on]
            lack = [f for f, on in value.items() if not on]
            rows.append(("isa", " ".join(have) or "-"))
            rows.append(("isa (absent)", " ".join(lack) or "-"))
        elif key == "numa_nodes":
            text = "; ".join(f"node{n['id']}: {format_cpu_list(n['cpus'])}" for n in value)
            rows.append(("numa_nodes", text or "?"))
        elif key.endswith("_bytes") and isinstance(value, int):
            rows.append((key.removesuffix("_bytes") + " (MiB)", f"{value / _MB:.0f}"))
        else:
            rows.append((key, fmt(value)))
    if limits:
        rows.append(("", ""))
        rows.append((f"limits ({limits['threads']} threads)", ""))
        gemv_mb = limits["gemv_bytes"] / _MB
        rows.append(("  weight streaming fp32 GEMV", f"{limits['gemv_fp32_gbs']:.1f} GB/s"))
        rows.append(("    matrix", f"{gemv_mb:.0f} MiB, median of {limits['gemv_reps']}"))
        shape = "x".join(map(str, limits["gemm_shape"]))
        rows.append((f"  GEMM fp32 {shape}", f"{limits['gemm_fp32_gflops']:.0f} GFLOP/s"))
        bf16 = limits["gemm_bf16_gflops"]
        rows.append(
            (
                f"  GEMM bf16 {shape}",
                f"{bf16:.0f} GFLOP/s" if bf16 else "not measured (no native bf16)",
            )
        )
        rows.append(("  took", f"{limits['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" if k else "" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tuning.cpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--limits", action="store_true", help="also measure GB/s and GFLOP/s")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for --limits (default: usable CPUs)"
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="time budget for --limits (default 5)"
    )
    args = parser.parse_args(argv)
    facts = cpu_facts()
    limits = None
    if args.limits:
        limits = measure_limits(args.threads or facts["usable_cpus"], args.seconds)
    if args.json:
        out = dict(facts)
        if limits is not None:
            out["limits"] = limits
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(facts, limits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
