"""The per-host ``auto`` precision of each stage: ISA first, then a short measurement.

Policy (design.md, "Precision and backends"):
- never bf16 without native bf16 (AVX512_BF16 or AMX): AVX2-only hosts emulate it many
  times slower, so it is not even measured there;
- among the remaining candidates of a stage (LLM: fp32, bf16, fp16, int8 weights; flow: fp32,
  bf16), the one whose Linear layers at *that stage's shapes*, with the kernels
  :mod:`worker.precision` installs, run fastest on this host (rows per call included: the
  DiT's M = 100 rows per chunk; the LLM decode's one row per sequence, where the bytes of
  weights read decide);
- the vocoder stays fp32 (the most quantization-sensitive part) unless chosen explicitly.

The measurement takes about a second per candidate and is cached per host (CPU model, ISA
flags, torch version, threads) in ``<cache_dir>/autotune.json``, so only the first start on
a host pays for it. :func:`choose` takes the facts and the measuring function as arguments,
so the policy is tested with injected ISAs and timings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.host import has_native_bf16

log = logging.getLogger(__name__)

# (M, K, N) of the Linear layers that dominate each stage at official dims
STAGE_SHAPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    # DiT: one 50-frame chunk x CFG 2 = 100 rows; attention projections and the feed-forward
    "flow": ((100, 1024, 1024), (100, 1024, 2048), (100, 2048, 1024)),
    # Qwen2 decode: one row; q/k/v/o, gate/up and down projections
    "llm": ((1, 896, 1152), (1, 896, 4864), (1, 4864, 896)),
}
# what ``auto`` may pick per stage (order: preference on a tie)
CANDIDATES: dict[str, tuple[str, ...]] = {
    "llm": ("fp32", "bf16", "fp16", "int8"),  # decode streams weights: fewer bytes, if fast
    "flow": ("fp32", "bf16"),
    "hift": ("fp32",),
}
CACHE_VERSION = 1


@dataclass(frozen=True)
class Choice:
    stage: str
    precision: str
    why: str
    seconds: Mapping[str, float] = field(default_factory=dict)  # candidate -> s per pass

    @property
    def ranking(self) -> list[str]:
        """Candidates fastest first, down to fp32 (what the fidelity gate falls back along)."""
        order = sorted(self.seconds, key=lambda p: self.seconds[p]) or [self.precision]
        return order[: order.index("fp32") + 1] if "fp32" in order else order + ["fp32"]


def host_key(facts: Mapping[str, Any], threads: int) -> str:
    """What a cached measurement is valid for: the CPU, its ISA, torch, the thread count."""
    isa = sorted(k for k, v in (facts.get("isa") or {}).items() if v)
    text = json.dumps(
        [facts.get("model_name"), isa, facts.get("torch_version"), threads, CACHE_VERSION]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _linear(precision: str, k: int, n: int, stage: str, g):
    """A (k -> n) Linear as ``stage`` runs it in ``precision`` -> (module, input dtype,
    autocast): the kernels :mod:`worker.precision` installs."""
    import torch
    from torch import nn

    from worker.precision import Fp16Linear, Int8Linear

    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * k**-0.5)
    if precision == "fp16":
        return Fp16Linear(lin), torch.float32, False
    if precision == "int8":
        return Int8Linear(lin), torch.float32, False
    if precision == "bf16":
        lin = lin.to(torch.bfloat16)
        # the DiT runs bf16 weights under autocast from fp32 activations; the LLM all bf16
        return (lin, torch.float32, True) if stage == "flow" else (lin, torch.bfloat16, False)
    return lin, torch.float32, False


def measure_stage(stage: str, precisions: tuple[str, ...], rows: int = 1,
                  budget_s: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Median seconds of one pass over the stage's Linear shapes (M scaled by ``rows``) with
    each precision's own kernels, interleaved so host noise hits all alike."""
    import torch

    g = torch.Generator().manual_seed(0)
    ops = {}
    for p in precisions:
        ops[p] = []
        for m, k, n in STAGE_SHAPES[stage]:
            mod, dtype, autocast = _linear(p, k, n, stage, g)
            ops[p].append((mod, torch.randn(m * rows, k, generator=g).to(dtype), autocast))

    def one(p: str) -> float:
        t0 = time.perf_counter()
        for mod, x, autocast in ops[p]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                mod(x)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {p: [] for p in precisions}
    with torch.inference_mode():
        for p in precisions:
            one(p)  # warm-up: packing, page faults
        t_end = time.perf_counter() + budget_s * len(precisions)
        while time.perf_counter() < t_end or min(len(v) for v in times.values()) < 5:
            for p in precisions:
                times[p].append(one(p))
    return {p: statistics.median(v) for p, v in times.items()}


def choose(
    stage: str,
    facts: Mapping[str, Any],
    measure: Callable[[str, tuple[str, ...]], Mapping[str, float]] = measure_stage,
    cache: Path | None = None,
    threads: int = 1,
) -> Choice:
    """The ``auto`` precision of ``stage`` on the host ``facts`` describes (see module doc)."""
    candidates = tuple(
        p for p in CANDIDATES[stage]
        if (p != "bf16" or has_native_bf16(facts)) and (p != "fp16" or _has_fbgemm())
    )
    if len(candidates) == 1:
        if stage == "hift":
            why = "the vocoder stays fp32 unless set explicitly (quantization-sensitive)"
        else:
            why = "fp32: this CPU has no native bf16 (AVX512_BF16 / AMX), so bf16 is not tried"
        return Choice(stage, candidates[0], why)
    key = f"{host_key(facts, threads)}:{stage}:{','.join(candidates)}"
    seconds = _read_cache(cache).get(key)
    source = "cached measurement"
    if seconds is None or set(seconds) != set(candidates):
        seconds = dict(measure(stage, candidates))
        source = "measured now"
        _write_cache(cache, key, seconds)
    best = min(candidates, key=lambda p: (seconds[p], candidates.index(p)))
    detail = ", ".join(f"{p} {seconds[p] * 1e3:.2f} ms" for p in candidates)
    why = f"{best} is fastest at the {stage} stage's GEMM shapes ({detail}; {source})"
    return Choice(stage, best, why, seconds)


def _has_fbgemm() -> bool:
    """fp16-packed Linear needs FBGEMM (x86 builds of torch)."""
    import torch

    return "fbgemm" in torch.backends.quantized.supported_engines


def _read_cache(path: Path | None) -> dict[str, dict[str, float]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path | None, key: str, seconds: Mapping[str, float]) -> None:
    """Best effort (a read-only cache dir only costs a re-measurement next start)."""
    if path is None:
        return
    data = _read_cache(path)
    data[key] = dict(seconds)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("autotune: cannot write %s (%s); will measure again next start", path, e)
