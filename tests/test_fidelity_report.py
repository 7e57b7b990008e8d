"""``python -m tuning.fidelity`` on the tiny fixture: exact is identical to fp32, a setting
moves the figures, and a configuration that fails the gate is refused naming the figure."""

from __future__ import annotations

import json

import pytest

import worker.fidelity as fidelity
from tuning.fidelity import main


def test_exact_preset_is_identical_to_fp32(tiny_dir, tmp_path, capsys):
    out = tmp_path / "f.json"
    rc = main(["--model-dir", str(tiny_dir), "--preset", "exact", "--seconds", "2",
               "--json", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    assert rc == 0 and r["pass"] is True and r["failures"] == []
    assert r["mel_snr_db"] is None and r["wave_snr_db"] is None  # identical: infinite SNR
    assert r["top1"] == 1.0 and r["kl"] == pytest.approx(0.0, abs=1e-12)
    assert set(r) >= {"preset", "config", "mel_snr_db", "wave_snr_db", "top1", "kl", "pass"}
    assert r["config"]["flow_precision"] == "fp32" and r["preset"] == "exact"
    assert "PASS" in capsys.readouterr().out


def test_a_setting_that_fails_the_gate_is_refused(tiny_dir, tmp_path, monkeypatch, capsys):
    """int8 LLM weights and the ORT vocoder move the figures a little; with a gate stricter
    than they reach, the report fails and names the figure that failed."""
    monkeypatch.setitem(fidelity.GATE, "wave_snr_db", (">=", 1000.0))
    out = tmp_path / "f.json"
    rc = main(["--model-dir", str(tiny_dir), "--preset", "exact", "--seconds", "2",
               "--knob", "COSY_LLM_PRECISION=int8", "--knob", "COSY_HIFT_BACKEND=ort",
               "--knob", f"COSY_CACHE_DIR={tmp_path}", "--json", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    assert rc == 1 and r["pass"] is False
    assert r["config"]["llm_precision"] == "int8" and r["config"]["hift_backend"] == "ort"
    assert 60 < r["wave_snr_db"] < 1000  # ORT vs torch: float rounding only
    assert r["top1"] >= 0.9 and 0 <= r["kl"] < 1e-3  # int8 weights: close
    assert r["failures"] == [f"wave_snr_db {r['wave_snr_db']:.1f} dB (needs >= 1000 dB)"]
    assert "FAIL: wave_snr_db" in capsys.readouterr().out


def test_bad_knob_is_refused(tiny_dir):
    with pytest.raises(SystemExit):
        main(["--model-dir", str(tiny_dir), "--knob", "FLOW=1"])
    assert main(["--model-dir", str(tiny_dir), "--knob", "COSY_FLOW_PRECISION=int4"]) == 2
