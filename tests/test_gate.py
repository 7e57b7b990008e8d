"""The fidelity gate at load (worker/stages/build.py): a non-fp32 stage runs only if it keeps
the output; auto falls back along its ranking, an explicit setting is refused naming the
figure, verdicts are cached per host and model."""

from __future__ import annotations

import pytest
import torch

import worker.fidelity as fidelity
import worker.stages.build as build
from worker.settings import KnobError, Knobs

AVX512_BF16 = {"model_name": "test", "isa": {"avx2": True, "avx512_bf16": True}}


def _knobs(tmp_path, **env) -> Knobs:
    return Knobs.from_env({"COSY_CACHE_DIR": str(tmp_path), "COSY_PRESET": "fast", **env})


def test_a_passing_setting_is_loaded_and_its_verdict_cached(tiny_dir, tmp_path, monkeypatch):
    k = _knobs(tmp_path, COSY_LLM_PRECISION="fp16")
    config = {"llm_precision": "fp16"}
    m = build.load_models(tiny_dir, ("llm",), config, k, AVX512_BF16)
    assert config["llm_precision"] == m.precision["llm"] == "fp16"
    assert (tmp_path / "fidelity.json").is_file()
    monkeypatch.setattr(build, "gate_figures", lambda *a: pytest.fail("measured again"))
    again = build.load_models(tiny_dir, ("llm",), {"llm_precision": "fp16"}, k, AVX512_BF16)
    assert again.precision["llm"] == "fp16"  # cached verdict, still transformed:
    assert again.llm.layers[0].mlp.__class__ is m.llm.layers[0].mlp.__class__


def test_an_explicit_setting_that_fails_is_refused_with_its_figures(tiny_dir, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.setitem(fidelity.GATE, "top1", (">=", 1.01))  # nothing non-fp32 can pass
    k = _knobs(tmp_path, COSY_LLM_PRECISION="int8")
    with pytest.raises(KnobError, match=r"COSY_LLM_PRECISION=int8 fails the fidelity gate.*top1"):
        build.load_models(tiny_dir, ("llm",), {"llm_precision": "int8"}, k, AVX512_BF16)


def test_auto_falls_back_along_its_ranking_to_fp32(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(fidelity.GATE, "mel_snr_db", (">=", 1e9))  # bf16 cannot pass
    k = _knobs(tmp_path)
    monkeypatch.setattr(
        Knobs, "precision_ranking", lambda self, stage, facts, m=None: ["bf16", "fp32"]
    )
    config = {"flow_precision": "bf16"}
    m = build.load_models(tiny_dir, ("flow",), config, k, AVX512_BF16)
    assert config["flow_precision"] == m.precision["flow"] == "fp32"
    dit = m.flow.decoder.estimator
    assert (
        dit.autocast_dtype is None
        and dit.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32
    )


def test_exact_never_gates(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "gate_figures", lambda *a: pytest.fail("gated under exact"))
    k = Knobs.from_env({"COSY_CACHE_DIR": str(tmp_path), "COSY_PRESET": "exact"})
    m = build.load_models(tiny_dir, ("llm",), {"llm_precision": "fp32"}, k, AVX512_BF16)
    assert m.precision["llm"] == "fp32"
