"""``python -m worker.verify``: passes on the fixture, fails on other weights, JSON contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tuning.random_model import write_model_dir


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.verify", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture(scope="module")
def fixture_json(tiny_dir):
    p = _run(str(tiny_dir), str(tiny_dir / "golden.pt"), "--json")
    return p.returncode, json.loads(p.stdout)


def test_verify_passes_on_fixture(fixture_json):
    rc, out = fixture_json
    results = out["results"]
    assert rc == 0
    assert all(set(r) == {"name", "max_abs", "mean_abs", "tol", "status"} for r in results)
    by = {r["name"]: r for r in results}
    for name in (
        "llm.logp_prefill",
        "llm.logp_forced",
        "llm.sampled_tokens[seed=1234]",
        "flow.mel_streaming_finalize",
        "dit.out_streaming_true",
        "hift.audio_finalize",
        "stream.audio_concat",
        "noise.hift_sine_waves_check_values",
    ):
        assert by[name]["status"] == "PASS", by[name]
        assert by[name]["max_abs"] <= by[name]["tol"]
    assert {r["status"] for r in results} <= {"PASS", "SKIP"}
    assert out["config"] == {  # no preset set: verify runs exact
        "llm_precision": "fp32", "flow_precision": "fp32", "hift_precision": "fp32",
        "flow_backend": "torch", "hift_backend": "torch", "llm_compile": False, "preset": "exact",
    }  # fmt: skip


def test_verify_passes_with_the_ort_backends(tiny_dir, tmp_path):
    """COSY_FLOW_BACKEND=ort COSY_HIFT_BACKEND=ort: the streamed outputs also go through the
    ORT steps (exported into the cache dir on first use) and meet the fp32 tolerances."""
    env = {"COSY_FLOW_BACKEND": "ort", "COSY_HIFT_BACKEND": "ort", "COSY_CACHE_DIR": str(tmp_path)}
    p = _run(str(tiny_dir), str(tiny_dir / "golden.pt"), "--json", "--strict", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert (out["config"]["flow_backend"], out["config"]["hift_backend"]) == ("ort", "ort")
    by = {r["name"]: r for r in out["results"]}
    for name in ("flow.mel_streaming_finalize[ort]", "dit.out_streaming_true[ort]",
                 "hift.audio_finalize[ort]", "hift.audio_nonfinal[ort]"):  # fmt: skip
        assert by[name]["status"] == "PASS" and by[name]["max_abs"] <= by[name]["tol"], by[name]
    assert list((tmp_path / "onnx").glob("dit-*.onnx")) and list((tmp_path / "onnx").glob("hift-*"))


def test_strict_passes_with_no_skip(fixture_json, tiny_dir):
    _, out = fixture_json
    names = {r["name"] for r in out["results"]}
    assert not [r for r in out["results"] if r["status"] == "SKIP"]
    assert "tokenizer.cases[0].ids" in names and "frontend.whisper_logmel_128" in names
    p = _run(str(tiny_dir), str(tiny_dir / "golden.pt"), "--strict")
    assert p.returncode == 0, p.stdout[-2000:]


def test_strict_fails_on_a_skipped_group(tmp_path, tiny_dir):
    import torch

    full = torch.load(tiny_dir / "golden.pt", weights_only=True)
    g = {"noise": full["noise"], "future_group": {"x": torch.zeros(1)}}  # uncovered group
    golden = tmp_path / "golden.pt"
    torch.save(g, golden)
    assert _run(str(tiny_dir), str(golden)).returncode == 0
    assert _run(str(tiny_dir), str(golden), "--strict").returncode == 1


def test_verify_fails_with_other_weights(tmp_path, tiny_dir):
    import torch

    d = write_model_dir(tmp_path / "other", "tiny", seed=11)
    full = torch.load(tiny_dir / "golden.pt", weights_only=True)
    torch.save({k: full[k] for k in ("llm_no_prompt", "noise")}, tmp_path / "g.pt")
    p = _run(str(d), str(tmp_path / "g.pt"), "--json")
    assert p.returncode == 1
    by = {r["name"]: r for r in json.loads(p.stdout)["results"]}
    assert by["llm_no_prompt.logp_prefill"]["status"] == "FAIL"
    assert by["noise.flow_rand_noise_first200"]["status"] == "PASS"  # dims-only, not weights


def test_verify_bad_model_dir_exit_2(tmp_path, tiny_dir):
    p = _run(str(tmp_path), str(tiny_dir / "golden.pt"))
    assert p.returncode == 2 and "cosyvoice3.yaml" in p.stderr
