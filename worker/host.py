"""Host facts the runtime needs: CPU lists and affinity, ISA flags, cgroup quota.

``cpu_facts()`` says what this host is: vendor and model, the ISA extensions the worker cares
about (AVX2, AVX-512, VNNI, AVX512_BF16, AMX), logical / usable / physical CPUs, NUMA nodes,
cache and memory sizes, and what the installed torch / ONNX Runtime / IPEX see. It reads
``/proc`` and ``/sys`` and never fails on a missing file: it returns what it could learn
(unknown numbers are ``None``, unknown flags ``False``).

``parse_cpu_list("0-3,8")`` reads the kernel's cpu-list format (used by the affinity knobs).
torch is imported lazily so that reading the settings does not pay for it. Measurements of
the host's limits (GEMM, weight streaming) live in ``tuning/cpu.py``, which imports this.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from collections.abc import Iterable, Mapping
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
