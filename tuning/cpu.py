"""CPU facts and measured limits: ``python -m tuning.cpu [--limits] [--json]``.

``cpu_facts()`` says what this host is: vendor and model, the ISA extensions the worker cares
about (AVX2, AVX-512, VNNI, AVX512_BF16, AMX), logical / usable / physical CPUs, NUMA nodes,
cache and memory sizes, and what the installed torch / ONNX Runtime / IPEX see. It reads
``/proc`` and ``/sys`` and never fails on a missing file: it returns what it could learn
(unknown numbers are ``None``, unknown flags ``False``).

``measure_limits(threads)`` measures the two physical ceilings the benchmarks compare against
(design.md, "Numbers it is judged by"): weight-streaming bandwidth (batch-1 fp32 GEMV over a
matrix far larger than the last-level cache: what bounds LLM decode) and fp32 GEMM GFLOP/s
(what bounds the DiT), plus bf16 GEMM only where bf16 is native.

``parse_cpu_list("0-3,8")`` reads the kernel's cpu-list format (used by the affinity knobs).
torch is imported lazily so that reading the knobs does not pay for it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

# ISA extensions reported by cpu_facts()["isa"], spelled as /proc/cpuinfo spells them.
ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)

GEMM_SHAPE = (2048, 1024, 4096)  # M x K x N, the design's reference MatMul
_MB = 1 << 20


# ---------------------------------------------------------------------------------------------
# cpu lists


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-3,8"`` -> ``(0, 1, 2, 3, 8)``: sorted, without duplicates.

    The kernel's cpu-list format (``taskset -c``, ``/sys/.../cpulist``) without the stride
    form. Raises ``ValueError`` on an empty list, a non-number, a negative id or a reversed
    range.
    """
    cpus: set[int] = set()
    parts = [p.strip() for p in text.split(",")]
    if not text.strip():
        raise ValueError("empty cpu list")
    for part in parts:
        if not part:
            raise ValueError(f"empty item in cpu list {text!r}")
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = _cpu_id(lo_s)
            hi = _cpu_id(hi_s) if sep else lo
        except ValueError:
            raise ValueError(f"bad item {part!r} in cpu list {text!r}") from None
        if hi < lo:
            raise ValueError(f"reversed range {part!r} in cpu list {text!r}")
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def _cpu_id(s: str) -> int:
    s = s.strip()
    if not s.isdigit():  # rejects "", "-1", "+1", "1.5"
        raise ValueError(s)
    return int(s)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """``(0, 1, 2, 3, 8)`` -> ``"0-3,8"`` (the inverse of :func:`parse_cpu_list`)."""
    ids = sorted(set(cpus))
    runs: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        runs.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(runs)


def usable_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its affinity mask), sorted."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return tuple(range(os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# facts


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The parts of ``/proc/cpuinfo`` text we use: vendor, model, flags, physical cores.

    Flags are taken from the first processor block (they are uniform on the hosts we run on).
    Physical cores are the distinct ``(physical id, core id)`` pairs, ``None`` if the file
    does not list them (some VMs and non-x86 kernels).
    """
    out: dict[str, Any] = {"vendor": None, "model_name": None, "family": None, "model": None}
    flags: set[str] | None = None
    cores: set[tuple[str, str]] = set()
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
        if not fields:
            continue
        if flags is None and "flags" in fields:
            flags = set(fields["flags"].split())
        if out["vendor"] is None and "vendor_id" in fields:
            out["vendor"] = fields["vendor_id"]
        if out["model_name"] is None and "model name" in fields:
            out["model_name"] = fields["model name"]
        for name, key in (("family", "cpu family"), ("model", "model")):
            if out[name] is None and fields.get(key, "").isdigit():
                out[name] = int(fields[key])
        if "physical id" in fields and "core id" in fields:
            cores.add((fields["physical id"], fields["core id"]))
    out["flags"] = flags or set()
    out["physical_cores"] = len(cores) or None
    return out


def _physical_cores_from_sysfs() -> int | None:
    pairs = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        pkg, core = _read(topo / "physical_package_id"), _read(topo / "core_id")
        if pkg is None or core is None:
            return None
        pairs.add((pkg.strip(), core.strip()))
    return len(pairs) or None


def _numa_nodes() -> list[dict[str, Any]]:
    nodes = []
    root = Path("/sys/devices/system/node")
    for node in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        text = _read(node / "cpulist")
        try:
            cpus = list(parse_cpu_list(text)) if text and text.strip() else []
        except ValueError:
            cpus = []
        nodes.append({"id": int(node.name[4:]), "cpus": cpus})
    return nodes


def _llc_bytes() -> int | None:
    """Size of the largest data/unified cache of cpu0 (the last-level cache)."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index[0-9]*"):
        kind, size = _read(index / "type"), _read(index / "size")
        if not size or (kind or "").strip() == "Instruction":
            continue
        size = size.strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
        digits = size.rstrip("KMGkmg")
        if digits.isdigit():
            best = max(best or 0, int(digits) * unit)
    return best


def _meminfo() -> dict[str, int | None]:
    out: dict[str, int | None] = {"mem_total_bytes": None, "mem_available_bytes": None}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        name = {"MemTotal": "mem_total_bytes", "MemAvailable": "mem_available_bytes"}.get(key)
        parts = value.split()
        if name and parts and parts[0].isdigit():
            out[name] = int(parts[0]) * 1024  # the file says kB and means KiB
    return out


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup allows (``cpu.max`` / v1 CFS quota), ``None`` if unlimited."""
    text = _read("/sys/fs/cgroup/cpu.max")
    if text:
        quota, _, period = text.strip().partition(" ")
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            return int(quota) / int(period)
        return None
    quota, period = (
        _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
        _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    )
    if quota and period and quota.strip().isdigit() and period.strip().isdigit():
        if int(period) > 0:
            return int(quota) / int(period)
    return None


def _package_version(module: str, dist: str) -> str | None:
    """Version of an installed package, without importing it (``None`` if absent)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _torch_facts() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch_version": None, "torch_cpu_capability": None, "torch_threads": None}
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = None
    return {
        "torch_version": torch.__version__,
        "torch_cpu_capability": capability,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_mkldnn_bf16": mkldnn_bf16,
    }


def cpu_facts() -> dict[str, Any]:
    """What this host is. JSON-serializable; keys are always present, unknowns are ``None``.

    ``isa`` maps each of :data:`ISA_FLAGS` to a bool; ``native_bf16`` is AVX512_BF16 or AMX-BF16
    (hardware bf16 dot products), ``amx`` is AMX tiles with bf16. ``usable_cpus`` is the affinity
    mask; ``cgroup_cpu_quota`` the container's CPU limit (``None``: unlimited or unknown).
    """
    info = parse_cpuinfo(_read("/proc/cpuinfo") or "")
    flags = info["flags"]
    isa = {flag: flag in flags for flag in ISA_FLAGS}
    usable = usable_cpus()
    facts: dict[str, Any] = {
        "vendor": info["vendor"],
        "model_name": info["model_name"] or platform.processor() or None,
        "family": info["family"],
        "model": info["model"],
        "machine": platform.machine(),
        "hypervisor": "hypervisor" in flags,
        "isa": isa,
        "native_bf16": isa["avx512_bf16"] or isa["amx_bf16"],
        "amx": isa["amx_tile"] and isa["amx_bf16"],
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(usable),
        "usable_cpu_list": format_cpu_list(usable),
        "physical_cores": info["physical_cores"] or _physical_cores_from_sysfs(),
        "cgroup_cpu_quota": cgroup_cpu_quota(),
        "numa_nodes": _numa_nodes(),
        "llc_bytes": _llc_bytes(),
        **_meminfo(),
        **_torch_facts(),
        "ipex_available": importlib.util.find_spec("intel_extension_for_pytorch") is not None,
        "onnxruntime_version": _package_version("onnxruntime", "onnxruntime"),
    }
    return facts


def has_isa(facts: Mapping[str, Any], flag: str) -> bool:
    """Whether ``facts`` (from :func:`cpu_facts`, or a synthetic dict) report ``flag``."""
    return bool((facts.get("isa") or {}).get(flag, False))


def has_native_bf16(facts: Mapping[str, Any]) -> bool:
    """Hardware bf16 arithmetic: AVX512_BF16 or AMX-BF16 (anything else emulates it, slowly)."""
    return has_isa(facts, "avx512_bf16") or has_isa(facts, "amx_bf16")


def has_amx(facts: Mapping[str, Any]) -> bool:
    """AMX tiles with bf16: the matrix engine that makes bf16 GEMM ~7x fp32 (design.md)."""
    return has_isa(facts, "amx_tile") and has_isa(facts, "amx_bf16")


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
