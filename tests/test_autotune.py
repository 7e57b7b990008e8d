"""The ``auto`` precision policy (worker/autotune.py), with injected ISAs and timings."""

from __future__ import annotations

import json

import pytest

from worker.autotune import choose, host_key, measure_stage

AVX2 = {"model_name": "EPYC zen3", "isa": {"avx2": True, "avx512_bf16": False, "amx_bf16": False}}
ZEN4 = {"model_name": "EPYC zen4", "isa": {"avx2": True, "avx512_bf16": True, "amx_bf16": False}}
AMX = {"model_name": "Xeon", "isa": {"avx2": True, "avx512_bf16": True, "amx_bf16": True}}


def _never(stage, candidates):
    raise AssertionError(f"measured {stage} {candidates}")


def test_no_bf16_without_native_support():
    c = choose("flow", AVX2, measure=_never)  # fp32 is the only flow candidate left
    assert c.precision == "fp32" and "no native bf16" in c.why
    seen = []
    bf16_fastest = lambda s, cands: seen.append(cands) or {p: 1.0 for p in cands} | {"bf16": 0.1}  # noqa: E731
    assert choose("llm", AVX2, measure=bf16_fastest).precision != "bf16"
    assert "bf16" not in seen[0]


@pytest.mark.parametrize("facts", [ZEN4, AMX], ids=["avx512_bf16", "amx"])
def test_bf16_for_the_dit_where_it_measures_faster(facts):
    c = choose("flow", facts, measure=lambda s, cands: {"fp32": 2.0, "bf16": 0.5})
    assert c.precision == "bf16" and "bf16 500.00 ms" in c.why and "measured now" in c.why
    assert c.seconds == {"fp32": 2.0, "bf16": 0.5}


def test_fp32_where_bf16_measures_slower():  # Zen 4 at M = 100 rows
    c = choose("flow", ZEN4, measure=lambda s, cands: {"fp32": 1.0, "bf16": 1.3})
    assert c.precision == "fp32"


def test_vocoder_stays_fp32():
    assert choose("hift", AMX, measure=_never).precision == "fp32"


def test_measurement_is_cached_per_host(tmp_path):
    cache = tmp_path / "autotune.json"
    calls = []

    def measure(stage, cands):
        calls.append(stage)
        return {"fp32": 1.0, "bf16": 0.4}

    first = choose("flow", ZEN4, measure=measure, cache=cache, threads=2)
    again = choose("flow", ZEN4, measure=_never, cache=cache, threads=2)
    assert first.precision == again.precision == "bf16" and calls == ["flow"]
    assert "cached" in again.why
    other = choose("flow", AMX, measure=measure, cache=cache, threads=2)  # another host
    assert calls == ["flow", "flow"] and other.precision == "bf16"
    assert host_key(ZEN4, 2) != host_key(ZEN4, 1)  # thread count matters
    assert len(json.loads(cache.read_text())) == 2


def test_unreadable_cache_is_remeasured(tmp_path):
    cache = tmp_path / "autotune.json"
    cache.write_text("{not json")
    c = choose("llm", ZEN4, measure=lambda s, cands: dict.fromkeys(cands, 2.0) | {"fp32": 1.0},
               cache=cache)  # fmt: skip
    assert c.precision == "fp32" and json.loads(cache.read_text())  # rewritten


def test_measure_stage_times_every_candidate_with_its_kernel():
    out = measure_stage("llm", ("fp32", "bf16", "fp16", "int8"), budget_s=0.01)
    assert set(out) == {"fp32", "bf16", "fp16", "int8"} and all(v > 0 for v in out.values())
    assert set(measure_stage("flow", ("fp32", "bf16"), budget_s=0.01)) == {"fp32", "bf16"}


def test_llm_candidates_include_narrow_weights():
    seen = []
    choose("llm", ZEN4, measure=lambda s, cands: seen.append(cands) or dict.fromkeys(cands, 1.0))
    assert set(seen[0]) >= {"fp32", "bf16", "int8"}  # fp16 too where FBGEMM exists
    seen.clear()
    choose("llm", AVX2, measure=lambda s, cands: seen.append(cands) or dict.fromkeys(cands, 1.0))
    assert "bf16" not in seen[0] and "int8" in seen[0]
