"""The runtime settings: one frozen, validated :class:`Knobs` built from ``COSY_*`` variables.

This is the one reader of ``COSY_*`` in the worker (the prompt cache, the engine, the server
and the stage processes all take a :class:`Knobs`). ``Knobs.from_env()`` reads every knob
once, checks it, and raises one :class:`KnobError` listing every bad value (variable, value,
what is allowed) and every unknown ``COSY_*`` variable (a typo, with the closest known name).
An empty value means "use the default". Tests build ``Knobs.from_env({...})`` explicitly, so
a stray ``COSY_*`` in the environment changes no test.

| variable | meaning | default |
|---|---|---|
| ``COSY_{LLM,FLOW,HIFT,FRONTEND}_THREADS`` | intra-op threads of that stage | see below |
| ``COSY_{LLM,FLOW,HIFT,FRONTEND}_CPUS`` | affinity, cpu-list syntax ``0-3,8`` | inherit |
| ``COSY_HOP_TOKENS`` | speech tokens per streamed hop, multiple of 25 | 25 |
| ``COSY_FLOW_STEPS`` | Euler steps of the flow ODE, 1..100 | 10 |
| ``COSY_FLOW_BATCH`` | requests whose ready flow chunks run as one packed DiT call, 1..64 | 4 |
| ``COSY_PRESET`` | ``exact`` (fp32 torch eager: upstream), ``fast`` / ``auto``: per host | auto |
| ``COSY_PRECISION`` | the older name of ``COSY_PRESET`` | auto |
| ``COSY_LLM_PRECISION`` | ``auto``, ``fp32``, ``bf16``, ``fp16``, ``int8`` (weights) | auto |
| ``COSY_FLOW_PRECISION`` | ``auto``, ``fp32``, ``bf16`` | auto |
| ``COSY_HIFT_PRECISION`` | ``auto``, ``fp32`` (``auto`` = fp32) | auto |
| ``COSY_LLM_COMPILE`` | ``torch.compile`` of the LLM: ``auto``, 1, 0 | auto (= 0) |
| ``COSY_{FLOW,HIFT}_BACKEND`` | ``auto``, ``torch``, ``ort`` | auto |
| ``COSY_MAX_BATCH`` | concurrent LLM sequences (KV cache slots) | 8 |
| ``COSY_MAX_SEQ`` | KV cache positions per sequence | 4096 |
| ``COSY_CACHE_DIR`` | prompt cache directory | ``~/.cache/cosyvoice-worker`` |
| ``COSY_CACHE_MAX_MB`` | prompt cache size cap, MiB (``inf``: no cap) | 2048 |
| ``COSY_COMPILE`` | the older name of ``COSY_LLM_COMPILE`` (1 or 0) | 0 |
| ``COSY_LOG_LEVEL`` | DEBUG, INFO, WARNING, ERROR, CRITICAL | INFO |
| ``COSY_MODEL_DIR`` | model dir for ``run.sh serve`` / the server | none |
| ``COSY_BIND`` | ROUTER address, ``tcp://host:port`` or ``ipc://path`` | tcp://127.0.0.1:5555 |
| ``COSY_CPUS`` | ``run.sh serve``: the whole worker under ``taskset -c`` | inherit |
| ``COSY_MAX_ACTIVE`` | requests in flight through the stages | 4 |
| ``COSY_MAX_QUEUE`` | admitted requests waiting behind them; beyond: ``overloaded`` | 16 |
| ``COSY_MAX_KV_GB`` | flow K/V memory the in-flight requests may reach (estimated) | 8 |
| ``COSY_REQUEST_TIMEOUT_S`` | deadline of a request, seconds | 300 |
| ``COSY_MAX_FRAME_MB`` | largest request frame (the prompt audio file) | 16 |
| ``COSY_TORCH_PROFILE`` | directory: each stage writes a ``torch.profiler`` table and trace | off |
| ``COSY_SHUTDOWN_GRACE_S`` | on SIGTERM/SIGINT: time running requests get to finish | 30 |

Default threads: a stage pinned with ``COSY_<STAGE>_CPUS`` gets one thread per pinned CPU;
otherwise every stage gets all usable CPUs (affinity mask, capped by a cgroup CPU quota).

Precision: :meth:`Knobs.resolve_precision` turns ``auto`` into a concrete precision for this
host (:mod:`worker.autotune`: ISA, then a short measurement cached per host); a stage's own
knob overrides the preset; bf16 on a CPU without native bf16 is refused.
:func:`worker.stages.build.run_config` is the whole configuration that runs.
``apply_threads(stage)`` is the first thing a stage process does.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from worker.host import (
    cgroup_cpu_quota,
    format_cpu_list,
    parse_cpu_list,
    usable_cpus,
)

log = logging.getLogger(__name__)

PREFIX = "COSY_"
THREAD_STAGES = ("llm", "flow", "hift", "frontend")
PRECISION_STAGES = ("llm", "flow", "hift")
# what each stage implements (worker/precision.py); a value another stage has is refused
# with the list of this stage's
STAGE_PRECISIONS = {
    "llm": ("auto", "fp32", "bf16", "fp16", "int8"),
    "flow": ("auto", "fp32", "bf16"),
    "hift": ("auto", "fp32"),
}
ALL_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
BACKEND_STAGES = ("flow", "hift")
BACKENDS = ("auto", "torch", "ort")
DEFAULT_BIND = "tcp://127.0.0.1:5555"
PRESETS = ("auto", "exact", "fast")
HOP_UNIT = 25  # speech tokens per 50-frame DiT attention block
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_CACHE_DIR = "~/.cache/cosyvoice-worker"
MAX_THREADS = 1024

# COSY_* variables that other parts of the worker own (server, run.sh). They are not knobs,
# but they are not typos either: add a name here when another module starts reading one.
OTHER_VARS: frozenset[str] = frozenset()


class KnobError(ValueError):
    """Bad ``COSY_*`` settings. ``problems`` holds one line per bad variable."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(problems)
        head = "bad COSY_* setting" if n == 1 else f"{n} bad COSY_* settings"
        super().__init__(head + ":\n  " + "\n  ".join(problems))


class _Invalid(Exception):
    """Raised by a parser: the text says what is allowed."""


# ---------------------------------------------------------------------------------------------
# value parsers: str -> value, or _Invalid("what is allowed")


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise _Invalid(allowed) from None
        if value < lo or (hi is not None and value > hi):
            raise _Invalid(allowed)
        return value

    return parse


def _hop_tokens(text: str) -> int:
    allowed = f"a positive multiple of {HOP_UNIT} ({HOP_UNIT}, {2 * HOP_UNIT}, {3 * HOP_UNIT}, ...)"
    try:
        value = int(text, 10)
    except ValueError:
        raise _Invalid(allowed) from None
    if value <= 0 or value % HOP_UNIT:
        raise _Invalid(allowed)
    return value


def _choice(options: tuple[str, ...], elsewhere: tuple[str, ...] = (), why: str = "") -> Callable:
    """One of ``options`` (case-insensitive); a value in ``elsewhere`` gets ``why``."""

    def parse(text: str) -> str:
        value = text.lower()
        if value in elsewhere and value not in options:
            raise _Invalid("one of " + ", ".join(options) + f" ({value!r}: {why})")
        if value not in options:
            raise _Invalid("one of " + ", ".join(options))
        return value

    return parse


def _positive_float(allow_inf: bool = False) -> Callable[[str], float]:
    allowed = "a number > 0" + (" (or inf for no limit)" if allow_inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _Invalid(allowed) from None
        if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
            raise _Invalid(allowed)
        return value

    return parse


def _auto_flag(text: str) -> str:
    """auto, or a boolean as "1" / "0"."""
    if text.lower() == "auto":
        return "auto"
    try:
        return "1" if _flag(text) else "0"
    except _Invalid:
        raise _Invalid("auto, 1 or 0") from None


def _bind(text: str) -> str:
    allowed = "tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555) or ipc:///path"
    if text.startswith("ipc://") and len(text) > len("ipc://"):
        return text
    if text.startswith("tcp://"):
        host, sep, port = text[len("tcp://") :].rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return text
    raise _Invalid(allowed)


def _dir_path(text: str) -> Path:
    return Path(text).expanduser()


def _flag(text: str) -> bool:
    value = text.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise _Invalid("0 or 1 (also true/false, yes/no, on/off)")


def _log_level(text: str) -> str:
    value = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(text.upper(), text.upper())
    if value not in LOG_LEVELS:
        raise _Invalid("one of " + ", ".join(LOG_LEVELS))
    return value


def _cache_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise _Invalid("a directory path (this path exists and is not a directory)")
    return path


def _cpus(usable: tuple[int, ...]) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        try:
            cpus = parse_cpu_list(text)
        except ValueError as e:
            raise _Invalid(f"a cpu list like 0-3,8 ({e})") from None
        outside = [c for c in cpus if c not in usable]
        if outside:
            raise _Invalid(
                f"CPUs this process may use ({format_cpu_list(usable)}); "
                f"not usable: {format_cpu_list(outside)}"
            )
        return cpus

    return parse


# ---------------------------------------------------------------------------------------------
# the knobs


@dataclass(frozen=True)
class Knobs:
    """Every tunable of the worker, validated. Build with :meth:`from_env`."""

    llm_threads: int
    flow_threads: int
    hift_threads: int
    frontend_threads: int
    llm_cpus: tuple[int, ...] | None = None
    flow_cpus: tuple[int, ...] | None = None
    hift_cpus: tuple[int, ...] | None = None
    frontend_cpus: tuple[int, ...] | None = None
    hop_tokens: int = 25
    flow_steps: int = 10
    precision: str = "auto"  # COSY_PRECISION: the preset's older name (same values)
    preset: str = "auto"  # exact: fp32 + torch eager everywhere; fast / auto: per-host choice
    llm_precision: str = "auto"
    flow_precision: str = "auto"
    hift_precision: str = "auto"
    llm_compile: str = "auto"  # "auto" | "1" | "0"
    flow_backend: str = "auto"
    hift_backend: str = "auto"
    max_batch: int = 8
    max_seq: int = 4096
    cache_dir: Path = field(default_factory=lambda: Path(DEFAULT_CACHE_DIR).expanduser())
    cache_max_mb: float = 2048.0  # math.inf: no cap
    prompt_kv_mb: int = 2048  # in-memory per-speaker flow K/V of prompt-only DiT blocks; 0 = off
    flow_batch: int = 4  # requests whose ready flow chunks run as one packed DiT call
    compile: bool = False  # COSY_COMPILE: the older name of COSY_LLM_COMPILE=1
    log_level: str = "INFO"
    # the service (worker/server.py, run.sh serve)
    model_dir: Path | None = None
    bind: str = DEFAULT_BIND
    cpus: tuple[int, ...] | None = None  # run.sh serve: taskset -c for the whole worker
    max_active: int = 4
    max_queue: int = 16
    max_kv_gb: float = 8.0
    request_timeout_s: float = 300.0
    max_frame_mb: float = 16.0
    torch_profile: Path | None = None
    shutdown_grace_s: float = 30.0
    # COSY_* variables that were set (not defaulted), for describe()
    from_environment: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Knobs:
        """Read and validate the ``COSY_*`` variables of ``env`` (default ``os.environ``).

        Raises :class:`KnobError` naming every bad variable, its value and what is allowed,
        and every unknown ``COSY_*`` variable with the closest known name.
        """
        env = os.environ if env is None else env
        usable = usable_cpus()
        parsers: dict[str, Callable[[str], Any]] = {
            "hop_tokens": _hop_tokens,
            "flow_steps": _int_in(1, 100),
            "precision": _choice(PRESETS),
            "preset": _choice(PRESETS),
            "llm_compile": _auto_flag,
            "max_batch": _int_in(1, 4096),
            "max_seq": _int_in(1, 1 << 20),
            "cache_dir": _cache_dir,
            "cache_max_mb": _positive_float(allow_inf=True),
            "prompt_kv_mb": _int_in(0),
            "flow_batch": _int_in(1, 64),
            "compile": _flag,
            "log_level": _log_level,
            "model_dir": _dir_path,
            "bind": _bind,
            "cpus": _cpus(usable),
            "max_active": _int_in(1, 4096),
            "max_queue": _int_in(0, 1 << 20),
            "max_kv_gb": _positive_float(),
            "request_timeout_s": _positive_float(),
            "max_frame_mb": _positive_float(),
            "torch_profile": _dir_path,
            "shutdown_grace_s": _positive_float(),
        }
        for stage in THREAD_STAGES:
            parsers[f"{stage}_threads"] = _int_in(1, MAX_THREADS)
            parsers[f"{stage}_cpus"] = _cpus(usable)
        for stage in PRECISION_STAGES:
            parsers[f"{stage}_precision"] = _choice(
                STAGE_PRECISIONS[stage], ALL_PRECISIONS, f"not implemented for the {stage} stage"
            )
        for stage in BACKEND_STAGES:
            parsers[f"{stage}_backend"] = _choice(BACKENDS)

        problems: list[str] = []
        values: dict[str, Any] = {}
        for name, parse in parsers.items():
            var = env_var(name)
            raw = env.get(var)
            if raw is None or not raw.strip():
                continue
            try:
                values[name] = parse(raw.strip())
            except _Invalid as e:
                problems.append(f"{var}={raw!r} is not allowed: expected {e}")

        known = set(KNOWN_VARS) | OTHER_VARS
        for var in sorted(k for k in env if k.startswith(PREFIX) and k not in known):
            close = difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(
                f"{var} is not a known variable{hint}; known: {', '.join(sorted(known))}"
            )

        given = tuple(sorted(env_var(name) for name in values))
        # the older names: COSY_PRECISION is COSY_PRESET, COSY_COMPILE=1 is COSY_LLM_COMPILE=1
        if "precision" in values and "preset" in values and values["precision"] != values["preset"]:
            problems.append(f"COSY_PRECISION={env['COSY_PRECISION']!r} contradicts COSY_PRESET="
                            f"{env['COSY_PRESET']!r} (the same knob): set one")  # fmt: skip
        values.setdefault("preset", values.get("precision", "auto"))
        values["precision"] = values["preset"]
        if values.get("compile") and values.get("llm_compile") == "0":
            problems.append(
                "COSY_COMPILE=1 contradicts COSY_LLM_COMPILE=0 (the same knob): set one"
            )
        if values.get("compile"):
            values.setdefault("llm_compile", "1")
        if problems:
            raise KnobError(problems)

        set_vars = given
        # Default thread plan: a stage pinned to CPUs uses one thread per pinned CPU; otherwise
        # every stage may use every usable CPU (right in-process, where stages take turns).
        default_threads = _default_threads(usable)
        for stage in THREAD_STAGES:
            cpus = values.get(f"{stage}_cpus")
            values.setdefault(f"{stage}_threads", len(cpus) if cpus else default_threads)
        return cls(**values, from_environment=set_vars)

    # -----------------------------------------------------------------------------------------

    def threads(self, stage: str) -> int:
        """Intra-op threads of ``stage`` (one of :data:`THREAD_STAGES`)."""
        return getattr(self, f"{_check_stage(stage, THREAD_STAGES)}_threads")

    def stage_cpus(self, stage: str) -> tuple[int, ...] | None:
        """CPUs ``stage`` is pinned to, ``None`` to inherit the parent's affinity."""
        return getattr(self, f"{_check_stage(stage, THREAD_STAGES)}_cpus")

    def resolve_precision(
        self, stage: str, cpu_facts: Mapping[str, Any], measure: Callable | None = None
    ) -> str:
        """The precision ``stage`` runs in on the host ``cpu_facts`` describes: the stage's
        own knob if set; else fp32 under the ``exact`` preset; else the per-host ``auto``
        choice (:func:`worker.autotune.choose`: never bf16 without native bf16, otherwise the
        fastest at the stage's shapes, measured once per host; ``measure`` injects timings).
        An explicit bf16 on a CPU without native bf16 is refused (emulated: many times slower).
        """
        from worker.host import has_native_bf16

        stage = _check_stage(stage, PRECISION_STAGES)
        chosen = getattr(self, f"{stage}_precision")
        if chosen == "bf16" and not has_native_bf16(cpu_facts):
            raise KnobError([f"{env_var(stage + '_precision')}=bf16: this CPU has no native "
                             "bf16 (AVX512_BF16 or AMX); it would be emulated, many times "
                             "slower than fp32"])  # fmt: skip
        return self.precision_ranking(stage, cpu_facts, measure)[0]

    def precision_ranking(
        self, stage: str, cpu_facts: Mapping[str, Any], measure: Callable | None = None
    ) -> list[str]:
        """The precisions ``stage`` may run in, preferred first: the stage's own knob alone;
        fp32 under ``exact``; else ``auto``'s candidates fastest first down to fp32 (the
        fidelity gate at load takes the first that passes: :mod:`worker.stages.build`)."""
        from worker.autotune import choose

        chosen = getattr(self, f"{_check_stage(stage, PRECISION_STAGES)}_precision")
        if chosen != "auto":
            return [chosen]
        if self.preset == "exact":
            return ["fp32"]
        kwargs = {} if measure is None else {"measure": measure}
        c = choose(stage, cpu_facts, cache=self.cache_dir / "autotune.json",
                   threads=self.threads(stage), **kwargs)  # fmt: skip
        log.info("%s precision auto -> %s: %s", stage, c.precision, c.why)
        return c.ranking

    def resolve_backend(self, stage: str) -> str:
        """``torch`` or ``ort`` for ``stage`` (flow, hift): its knob if set; ``exact`` and
        ``auto`` run torch until a measurement on this host says ORT is faster (the stage
        measures both at start-up where an export exists: :mod:`worker.ort_flow`)."""
        chosen = getattr(self, f"{_check_stage(stage, BACKEND_STAGES)}_backend")
        return "torch" if chosen == "auto" else chosen

    def resolve_compile(self) -> bool:
        """Whether the LLM runs under ``torch.compile``: its knob if set; off under ``exact``;
        ``auto``: off (measured slower than eager on the hosts seen so far: see README)."""
        if self.llm_compile != "auto":
            return self.llm_compile == "1"
        return False

    def describe(self, cpu_facts: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """JSON-ready dict of every knob, for logs and benchmark reports.

        With ``cpu_facts`` it also holds ``resolved_precision`` (stage -> dtype on that host).
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_cpus"):
                value = format_cpu_list(value) if value else None
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        if cpu_facts is not None:
            from worker.stages.build import run_config

            out["resolved"] = run_config(self, cpu_facts)
        return out

    def to_env(self) -> dict[str, str]:
        """``COSY_*`` variables from which :meth:`from_env` rebuilds these knobs: what a
        parent passes to the stage processes it starts (so a test's explicit knobs, not the
        test runner's environment, reach them)."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "from_environment" or value is None:
                continue
            if f.name == "cpus" or f.name.endswith("_cpus"):
                text = format_cpu_list(value)
            elif isinstance(value, bool):
                text = "1" if value else "0"
            else:
                text = str(value)  # floats round-trip, inf as "inf"
            out[env_var(f.name)] = text
        return out

    def apply_threads(self, stage: str) -> dict[str, Any]:
        """Give this process ``stage``'s thread count and CPU affinity. Returns what was set.

        Call it first thing in a stage process, before torch runs anything in parallel: the
        affinity is set on every thread the process already has (``sched_setaffinity`` acts
        per thread) and thread pools created later inherit it.
        """
        import torch

        threads, cpus = self.threads(stage), self.stage_cpus(stage)
        if cpus is not None:
            _set_process_affinity(cpus)
        torch.set_num_threads(threads)
        return {
            "stage": stage,
            "threads": torch.get_num_threads(),
            "cpus": format_cpu_list(usable_cpus()),
        }


# ---------------------------------------------------------------------------------------------
# helpers


def env_var(name: str) -> str:
    """Field name -> environment variable: ``hop_tokens`` -> ``COSY_HOP_TOKENS``."""
    return PREFIX + name.upper()


KNOWN_VARS: tuple[str, ...] = tuple(
    sorted(env_var(f.name) for f in fields(Knobs) if f.name != "from_environment")
)


def _check_stage(stage: str, stages: tuple[str, ...]) -> str:
    if stage not in stages:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(stages)}")
    return stage


def _default_threads(usable: tuple[int, ...]) -> int:
    """All usable CPUs, capped by the cgroup's CPU quota when there is one."""
    n = len(usable)
    quota = cgroup_cpu_quota()
    if quota:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, min(n, MAX_THREADS))


def _set_process_affinity(cpus: tuple[int, ...]) -> None:
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def configure_logging(knobs: Knobs) -> None:
    """Root logging at ``COSY_LOG_LEVEL`` (for entry points; libraries just log)."""
    logging.basicConfig(
        level=knobs.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
