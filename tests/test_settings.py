"""Knobs: every COSY_* variable parsed and validated, typos caught, the precision policy."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import worker.settings as knobs_mod
from tuning.cpu import ISA_FLAGS
from worker.settings import KNOWN_VARS, KnobError, Knobs
from worker.stages.build import run_config

HOST_CPUS = (0, 1, 2, 3, 4, 5, 6, 7)


@pytest.fixture(autouse=True)
def eight_cpu_host(monkeypatch):
    """Pretend the process may use CPUs 0-7 and no cgroup quota applies, on any test host."""
    monkeypatch.setattr(knobs_mod, "usable_cpus", lambda: HOST_CPUS)
    monkeypatch.setattr(knobs_mod, "cgroup_cpu_quota", lambda: None)


def facts_with(*flags: str) -> dict:
    return {"isa": {f: f in flags for f in ISA_FLAGS}}


AVX2_ONLY = facts_with("avx2", "fma", "f16c")  # AMD EPYC (Zen 2/3) of design.md
AVX512_BF16 = facts_with("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")
AMX = facts_with(
    "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
    "amx_int8",
)  # fmt: skip


def error_for(env: dict) -> str:
    with pytest.raises(KnobError) as info:
        Knobs.from_env(env)
    return str(info.value)


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_from_an_empty_environment():
    k = Knobs.from_env({})
    assert (k.llm_threads, k.flow_threads, k.hift_threads, k.frontend_threads) == (8, 8, 8, 8)
    assert k.llm_cpus is k.flow_cpus is k.hift_cpus is k.frontend_cpus is None
    assert k.hop_tokens == 25 and k.flow_steps == 10
    assert k.precision == "auto"
    assert (k.llm_precision, k.flow_precision, k.hift_precision) == ("auto",) * 3
    assert k.max_batch == 8 and k.max_seq == 4096
    assert k.cache_dir == Path("~/.cache/cosyvoice-worker").expanduser()
    assert k.cache_max_mb == 2048 and k.compile is False and k.log_level == "INFO"
    assert k.bind == "tcp://127.0.0.1:5555" and k.model_dir is None and k.cpus is None
    assert (k.max_active, k.max_queue, k.max_kv_gb) == (4, 16, 8.0)
    assert k.from_environment == ()


def test_default_threads_follow_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(knobs_mod, "cgroup_cpu_quota", lambda: 2.5)
    assert Knobs.from_env({}).llm_threads == 3


def test_from_env_reads_os_environ_by_default(monkeypatch):
    for var in [v for v in os.environ if v.startswith("COSY_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("COSY_FLOW_STEPS", "7")
    assert Knobs.from_env().flow_steps == 7


def test_empty_value_means_default():
    assert Knobs.from_env({"COSY_HOP_TOKENS": "", "COSY_LLM_THREADS": "  "}).hop_tokens == 25


def test_knobs_are_frozen():
    k = Knobs.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.hop_tokens = 50  # type: ignore[misc]


# --- good values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "var, text, attr, value",
    [
        ("COSY_LLM_THREADS", "4", "llm_threads", 4),
        ("COSY_FLOW_THREADS", "1", "flow_threads", 1),
        ("COSY_HIFT_THREADS", "2", "hift_threads", 2),
        ("COSY_FRONTEND_THREADS", "3", "frontend_threads", 3),
        ("COSY_LLM_CPUS", "0-3,7", "llm_cpus", (0, 1, 2, 3, 7)),
        ("COSY_FLOW_CPUS", "4-5", "flow_cpus", (4, 5)),
        ("COSY_HIFT_CPUS", "6", "hift_cpus", (6,)),
        ("COSY_FRONTEND_CPUS", " 7 ", "frontend_cpus", (7,)),
        ("COSY_HOP_TOKENS", "50", "hop_tokens", 50),
        ("COSY_HOP_TOKENS", "100", "hop_tokens", 100),
        ("COSY_FLOW_STEPS", "1", "flow_steps", 1),
        ("COSY_FLOW_STEPS", "100", "flow_steps", 100),
        ("COSY_PRECISION", "exact", "precision", "exact"),
        ("COSY_PRECISION", "AUTO", "precision", "auto"),
        ("COSY_PRECISION", "exact", "preset", "exact"),  # the older name of COSY_PRESET
        ("COSY_PRESET", "fast", "preset", "fast"),
        ("COSY_LLM_PRECISION", "fp32", "llm_precision", "fp32"),
        ("COSY_LLM_PRECISION", "int8", "llm_precision", "int8"),
        ("COSY_FLOW_PRECISION", "BF16", "flow_precision", "bf16"),
        ("COSY_FLOW_BACKEND", "ort", "flow_backend", "ort"),
        ("COSY_HIFT_BACKEND", "torch", "hift_backend", "torch"),
        ("COSY_LLM_COMPILE", "1", "llm_compile", "1"),
        ("COSY_LLM_COMPILE", "off", "llm_compile", "0"),
        ("COSY_COMPILE", "1", "llm_compile", "1"),  # the older name
        ("COSY_FLOW_PRECISION", "auto", "flow_precision", "auto"),
        ("COSY_HIFT_PRECISION", "fp32", "hift_precision", "fp32"),
        ("COSY_MAX_BATCH", "32", "max_batch", 32),
        ("COSY_MAX_SEQ", "8192", "max_seq", 8192),
        ("COSY_CACHE_MAX_MB", "100", "cache_max_mb", 100),
        ("COSY_CACHE_MAX_MB", "0.5", "cache_max_mb", 0.5),
        ("COSY_CACHE_MAX_MB", "inf", "cache_max_mb", float("inf")),
        ("COSY_COMPILE", "0", "compile", False),
        ("COSY_COMPILE", "false", "compile", False),
        ("COSY_MODEL_DIR", "/models/x", "model_dir", Path("/models/x")),
        ("COSY_BIND", "tcp://127.0.0.1:6000", "bind", "tcp://127.0.0.1:6000"),
        ("COSY_BIND", "ipc:///tmp/cosy.sock", "bind", "ipc:///tmp/cosy.sock"),
        ("COSY_CPUS", "0-1", "cpus", (0, 1)),
        ("COSY_MAX_ACTIVE", "2", "max_active", 2),
        ("COSY_MAX_QUEUE", "0", "max_queue", 0),
        ("COSY_MAX_KV_GB", "1.5", "max_kv_gb", 1.5),
        ("COSY_REQUEST_TIMEOUT_S", "30", "request_timeout_s", 30.0),
        ("COSY_MAX_FRAME_MB", "4", "max_frame_mb", 4.0),
        ("COSY_TORCH_PROFILE", "/tmp/prof", "torch_profile", Path("/tmp/prof")),
        ("COSY_LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("COSY_LOG_LEVEL", "warn", "log_level", "WARNING"),
    ],
)
def test_good_values_parse(var, text, attr, value):
    k = Knobs.from_env({var: text})
    assert getattr(k, attr) == value
    assert k.from_environment == (var,)


def test_cache_dir_expands_home(tmp_path):
    assert Knobs.from_env({"COSY_CACHE_DIR": "~/x"}).cache_dir == Path.home() / "x"
    assert Knobs.from_env({"COSY_CACHE_DIR": str(tmp_path)}).cache_dir == tmp_path


def test_pinned_stage_defaults_to_one_thread_per_cpu():
    k = Knobs.from_env({"COSY_LLM_CPUS": "0-2", "COSY_FLOW_CPUS": "3-7", "COSY_HIFT_THREADS": "2"})
    assert (k.llm_threads, k.flow_threads, k.hift_threads, k.frontend_threads) == (3, 5, 2, 8)
    assert k.threads("flow") == 5 and k.stage_cpus("flow") == (3, 4, 5, 6, 7)
    assert k.stage_cpus("hift") is None


# --- bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "var, text, allowed",
    [
        ("COSY_LLM_THREADS", "0", "1..1024"),
        ("COSY_FLOW_THREADS", "two", "1..1024"),
        ("COSY_HIFT_THREADS", "-1", "1..1024"),
        ("COSY_FRONTEND_THREADS", "1.5", "1..1024"),
        ("COSY_LLM_CPUS", "3-1", "reversed range"),
        ("COSY_FLOW_CPUS", "0-3,", "cpu list like 0-3,8"),
        ("COSY_HIFT_CPUS", "a-b", "cpu list like 0-3,8"),
        ("COSY_FRONTEND_CPUS", "6-9", "not usable: 8-9"),
        ("COSY_HOP_TOKENS", "30", "positive multiple of 25"),
        ("COSY_HOP_TOKENS", "0", "positive multiple of 25"),
        ("COSY_HOP_TOKENS", "-25", "positive multiple of 25"),
        ("COSY_FLOW_STEPS", "0", "1..100"),
        ("COSY_FLOW_STEPS", "101", "1..100"),
        ("COSY_PRECISION", "fp32", "auto, exact, fast"),
        ("COSY_PRESET", "quick", "auto, exact, fast"),
        ("COSY_LLM_PRECISION", "fp8", "auto, fp32, bf16, fp16, int8"),
        ("COSY_FLOW_PRECISION", "int4", "auto, fp32, bf16"),
        ("COSY_FLOW_PRECISION", "fp16", "not implemented for the flow stage"),
        ("COSY_HIFT_PRECISION", "int8", "not implemented for the hift stage"),
        ("COSY_FLOW_BACKEND", "onnx", "auto, torch, ort"),
        ("COSY_LLM_COMPILE", "maybe", "auto, 1 or 0"),
        ("COSY_MAX_BATCH", "0", "1..4096"),
        ("COSY_MAX_SEQ", "lots", "1..1048576"),
        ("COSY_CACHE_MAX_MB", "0", "> 0"),
        ("COSY_CACHE_MAX_MB", "nan", "> 0"),
        ("COSY_COMPILE", "2", "0 or 1"),
        ("COSY_BIND", "127.0.0.1:5555", "tcp://HOST:PORT"),
        ("COSY_BIND", "tcp://127.0.0.1:99999", "tcp://HOST:PORT"),
        ("COSY_CPUS", "9", "not usable: 9"),
        ("COSY_MAX_ACTIVE", "0", "1..4096"),
        ("COSY_MAX_QUEUE", "-1", "0..1048576"),
        ("COSY_MAX_KV_GB", "inf", "a number > 0"),
        ("COSY_REQUEST_TIMEOUT_S", "0", "a number > 0"),
        ("COSY_MAX_FRAME_MB", "x", "a number > 0"),
        ("COSY_LOG_LEVEL", "LOUD", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ],
)
def test_bad_values_name_variable_value_and_what_is_allowed(var, text, allowed):
    message = error_for({var: text})
    assert f"{var}={text!r}" in message
    assert allowed in message


def test_cache_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "f"
    path.write_text("")
    assert "COSY_CACHE_DIR" in error_for({"COSY_CACHE_DIR": str(path)})


def test_every_problem_is_reported_at_once():
    with pytest.raises(KnobError) as info:
        Knobs.from_env({"COSY_HOP_TOKENS": "30", "COSY_FLOW_STEPS": "0", "COSY_LLM_THREDS": "2"})
    assert len(info.value.problems) == 3
    assert isinstance(info.value, ValueError)


def test_exact_preset_with_fp32_stages():
    k = Knobs.from_env({"COSY_PRECISION": "exact", "COSY_LLM_PRECISION": "fp32"})
    assert k.precision == "exact"


# --- unknown variables ------------------------------------------------------------------------


def test_typo_is_caught_with_a_suggestion_and_the_known_list():
    message = error_for({"COSY_LLM_THREAD": "4"})
    assert "COSY_LLM_THREAD is not a known variable" in message
    assert "did you mean COSY_LLM_THREADS?" in message
    for var in KNOWN_VARS:
        assert var in message


def test_unrelated_unknown_variable_has_no_suggestion():
    message = error_for({"COSY_ZZZZZZZZZ": "1"})
    assert "COSY_ZZZZZZZZZ is not a known variable;" in message


def test_other_variables_are_ignored():
    assert Knobs.from_env({"OMP_NUM_THREADS": "1", "HOME": "/x", "cosy_lower": "1"}).max_batch == 8


def test_other_owned_cosy_variables_are_not_typos(monkeypatch):
    monkeypatch.setattr(knobs_mod, "OTHER_VARS", frozenset({"COSY_SOMETHING_ELSE"}))
    Knobs.from_env({"COSY_SOMETHING_ELSE": "/models/x"})


def test_known_vars_cover_every_field():
    assert len(KNOWN_VARS) == 36
    assert {"COSY_PRESET", "COSY_LLM_COMPILE", "COSY_FLOW_BACKEND", "COSY_HIFT_BACKEND"} <= set(
        KNOWN_VARS
    )
    assert "COSY_PROMPT_KV_MB" in KNOWN_VARS
    assert "COSY_FRONTEND_CPUS" in KNOWN_VARS and "COSY_FROM_ENVIRONMENT" not in KNOWN_VARS


# --- precision policy -------------------------------------------------------------------------


def _no_measuring(stage, candidates):
    raise AssertionError(f"measured {stage}: the policy should not have needed to")


def _knobs(tmp_path, env=None) -> Knobs:
    return Knobs.from_env({"COSY_CACHE_DIR": str(tmp_path), **(env or {})})


@pytest.mark.parametrize("stage", ["flow", "hift"])
def test_avx2_only_host_is_fp32_never_bf16(tmp_path, stage):
    k = _knobs(tmp_path)
    assert k.resolve_precision(stage, AVX2_ONLY, measure=_no_measuring) == "fp32"
    assert k.resolve_precision(stage, {}, measure=_no_measuring) == "fp32"  # facts unknown


def test_llm_auto_never_tries_bf16_without_it_and_ranks_down_to_fp32(tmp_path):
    k = _knobs(tmp_path)
    seen = []

    def measure(stage, cands):  # bf16 would be fastest, were it tried
        seen.append(cands)
        times = {"fp32": 3.0, "fp16": 1.0, "int8": 0.9, "bf16": 0.1}
        return {p: times[p] for p in cands}

    ranking = k.precision_ranking("llm", AVX2_ONLY, measure=measure)
    assert "bf16" not in seen[0] and ranking == ["int8", "fp16", "fp32"]


def test_auto_takes_bf16_for_the_dit_where_it_measures_faster(tmp_path):
    k = _knobs(tmp_path)
    faster = lambda stage, cands: {"fp32": 1.0, "bf16": 0.4}  # noqa: E731
    slower = lambda stage, cands: {"fp32": 1.0, "bf16": 1.4}  # noqa: E731
    assert k.resolve_precision("flow", AVX512_BF16, measure=faster) == "bf16"
    assert _knobs(tmp_path / "b").resolve_precision("flow", AMX, measure=slower) == "fp32"
    assert k.resolve_precision("hift", AMX, measure=_no_measuring) == "fp32"  # vocoder


def test_explicit_bf16_on_a_cpu_without_it_is_refused(tmp_path):
    k = _knobs(tmp_path, {"COSY_FLOW_PRECISION": "bf16"})
    with pytest.raises(KnobError, match="no native bf16"):
        k.resolve_precision("flow", AVX2_ONLY)
    assert k.resolve_precision("flow", AVX512_BF16) == "bf16"


def test_exact_preset_is_fp32_torch_eager_even_on_amx(tmp_path):
    for env in ({"COSY_PRESET": "exact"}, {"COSY_PRECISION": "exact"}):
        k = _knobs(tmp_path, env)
        r = run_config(k, AMX)
        assert r == {"llm_precision": "fp32", "flow_precision": "fp32", "hift_precision": "fp32",
                     "flow_backend": "torch", "hift_backend": "torch", "llm_compile": False,
                     "preset": "exact"}  # fmt: skip


def test_stage_knobs_override_the_preset(tmp_path):
    k = _knobs(tmp_path, {"COSY_PRESET": "exact", "COSY_LLM_PRECISION": "int8",
                          "COSY_FLOW_BACKEND": "ort", "COSY_LLM_COMPILE": "1"})  # fmt: skip
    r = run_config(k, AVX2_ONLY)
    assert (r["llm_precision"], r["flow_precision"], r["flow_backend"]) == ("int8", "fp32", "ort")
    assert r["llm_compile"] is True and r["preset"] == "exact"


def test_an_ort_flow_runs_fp32(tmp_path):
    k = _knobs(tmp_path, {"COSY_FLOW_BACKEND": "ort"})
    assert run_config(k, AMX, stages=("flow",))["flow_precision"] == "fp32"  # auto: no measuring
    k = _knobs(tmp_path, {"COSY_FLOW_BACKEND": "ort", "COSY_FLOW_PRECISION": "bf16"})
    with pytest.raises(KnobError, match="the ORT graph runs fp32"):
        run_config(k, AMX, stages=("flow",))


def test_older_names_that_contradict_the_new_ones_are_refused():
    assert "the same knob" in error_for({"COSY_PRECISION": "exact", "COSY_PRESET": "fast"})
    assert "the same knob" in error_for({"COSY_COMPILE": "1", "COSY_LLM_COMPILE": "0"})
    assert Knobs.from_env({"COSY_PRECISION": "fast", "COSY_PRESET": "fast"}).preset == "fast"


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="frontend"):
        Knobs.from_env({}).resolve_precision("frontend", AMX)
    with pytest.raises(ValueError, match="vocoder"):
        Knobs.from_env({}).threads("vocoder")


# --- describe / apply_threads -----------------------------------------------------------------


def test_describe_is_json_ready(tmp_path):
    k = Knobs.from_env({"COSY_LLM_CPUS": "0-3,7", "COSY_CACHE_DIR": str(tmp_path),
                        "COSY_PRESET": "exact"})  # fmt: skip
    d = k.describe(AMX)
    assert json.loads(json.dumps(d)) == d
    assert d["llm_cpus"] == "0-3,7" and d["cache_dir"] == str(tmp_path) and d["llm_threads"] == 5
    assert d["resolved"]["flow_precision"] == "fp32" and d["resolved"]["preset"] == "exact"
    assert d["from_environment"] == ["COSY_CACHE_DIR", "COSY_LLM_CPUS", "COSY_PRESET"]
    assert "resolved" not in k.describe()


def test_apply_threads_sets_torch_threads_and_affinity():
    """In a child process: the pytest process's own affinity is never changed."""
    import subprocess
    import sys

    from tests.conftest import REPO

    real = sorted(os.sched_getaffinity(0))
    code = (
        "import json, os, torch\n"
        "from worker.settings import Knobs\n"
        f"k = Knobs.from_env({{'COSY_HIFT_CPUS': '{real[-1]}'}})\n"
        "applied = k.apply_threads('hift')\n"
        "tids = os.listdir('/proc/self/task')\n"
        "print(json.dumps([applied, torch.get_num_threads(),"
        " [sorted(os.sched_getaffinity(int(t))) for t in tids]]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSY_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    applied, threads, per_thread = json.loads(out.stdout)
    assert applied["stage"] == "hift" and applied["threads"] == threads == 1
    assert per_thread and all(cpus == [real[-1]] for cpus in per_thread)
    assert sorted(os.sched_getaffinity(0)) == real


def test_to_env_rebuilds_the_same_knobs():
    k = Knobs.from_env({"COSY_LLM_CPUS": "0-3,7", "COSY_CACHE_MAX_MB": "inf", "COSY_CPUS": "1",
                        "COSY_MAX_KV_GB": "1.5", "COSY_MODEL_DIR": "/m", "COSY_HOP_TOKENS": "50"})
    again = Knobs.from_env(k.to_env())
    assert dataclasses.replace(again, from_environment=()) == dataclasses.replace(
        k, from_environment=())
    assert all(v.startswith("COSY_") for v in k.to_env())


def test_flow_batch():
    assert Knobs.from_env({}).flow_batch == 4
    assert Knobs.from_env({"COSY_FLOW_BATCH": "1"}).flow_batch == 1
    with pytest.raises(KnobError, match="COSY_FLOW_BATCH"):
        Knobs.from_env({"COSY_FLOW_BATCH": "0"})


def test_prompt_kv_mb():
    assert Knobs.from_env({}).prompt_kv_mb == 2048
    assert Knobs.from_env({"COSY_PROMPT_KV_MB": "0"}).prompt_kv_mb == 0
    with pytest.raises(KnobError, match="COSY_PROMPT_KV_MB"):
        Knobs.from_env({"COSY_PROMPT_KV_MB": "-1"})
