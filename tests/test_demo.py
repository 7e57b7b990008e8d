"""``run.sh demo`` through the service: real subprocesses from a caller's directory outside the
repo (tiny dims: seconds), plus the demo's pure helpers (normalization, WAV, checks)."""

from __future__ import annotations

import io
import os
import re
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.test_run_sh import clean_env, run_sh
from worker import demo


def _read_wav(path: Path | io.BytesIO) -> tuple[wave._wave_params, np.ndarray]:
    with wave.open(path if isinstance(path, io.BytesIO) else str(path)) as w:
        params = w.getparams()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return params, pcm


def _check_demo_wav(path: Path) -> np.ndarray:
    params, pcm = _read_wav(path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 24000)
    assert pcm.size > 0 and np.count_nonzero(pcm)
    target = round(10 ** (demo.TARGET_DBFS / 20) * 32767)
    assert abs(int(np.abs(pcm.astype(np.int32)).max()) - target) <= 2  # normalized to -1 dBFS
    return pcm


def test_demo_tiny_writes_demo_wav_in_the_callers_dir(tmp_path):
    cwd = tmp_path / "caller"
    cwd.mkdir()
    r = run_sh("demo", "--dims", "tiny", cwd=cwd, env=clean_env(tmp_path), timeout=300)
    out = r.stdout
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "RANDOM weights" in out and "noise, not speech" in out
    assert re.search(r"first audio \d+\.\d+ s", out), out
    assert re.search(r"RTF \d+\.\d+", out), out
    assert re.search(r"normalized: peak -\d+\.\d dBFS, gain \+\d+\.\d dB", out), out
    wav = cwd / "demo.wav"
    assert f"wrote {wav}" in out
    _check_demo_wav(wav)
    assert sorted(p.name for p in cwd.iterdir()) == ["demo.wav"]


def test_demo_relative_model_dir_and_seconds(tmp_path):
    model_dir = demo.random_model_dir("tiny")  # the cached one (written once)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    rel = os.path.relpath(model_dir, cwd)
    r = run_sh("demo", "--model-dir", rel, "--seconds", "0.5", "--text", "Short and sweet.",
               cwd=cwd, env=clean_env(tmp_path), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"model dir {model_dir}" in r.stdout
    pcm = _check_demo_wav(cwd / "demo.wav")
    assert pcm.size <= 12000  # --seconds 0.5 at 24 kHz: the stream was cut


@pytest.mark.slow
def test_demo_official_dims(tmp_path):
    r = run_sh("demo", "--seconds", "2", cwd=tmp_path, env=clean_env(tmp_path), timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "normalized" in r.stdout
    _check_demo_wav(tmp_path / "demo.wav")


# ---------------------------------------------------------------------------------------------
# helpers


def test_normalize_random_weights_audio():
    x = (np.sin(np.arange(2400) / 7) * 1e-5).astype(np.float32)
    y, note, ok = demo.normalize(x, enabled=True)
    assert ok and "normalized" in note and "dB" in note
    assert np.isclose(np.abs(y).max(), 10 ** (demo.TARGET_DBFS / 20), rtol=1e-4)
    y2, note2, ok2 = demo.normalize(x, enabled=False)
    assert ok2 and "not normalized" in note2 and np.array_equal(y2, x)


@pytest.mark.parametrize(
    ("audio", "fragment"),
    [(np.zeros(0, np.float32), "no audio"), (np.zeros(100, np.float32), "silence")],
)
def test_normalize_says_when_there_is_nothing(audio, fragment):
    _, note, ok = demo.normalize(audio, enabled=True)
    assert not ok and fragment in note


def test_wav_bytes_and_tone():
    params, pcm = _read_wav(io.BytesIO(demo.tone_wav(3.0)))
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 24000)
    assert pcm.size == 72000 and np.count_nonzero(pcm)
    _, pcm = _read_wav(io.BytesIO(demo.wav_bytes(np.array([2.0, -2.0, 0.5], np.float32))))
    assert pcm.tolist() == [32767, -32767, 16384]


def test_check_model_dir_messages(tmp_path):
    with pytest.raises(demo.InputError, match="does not exist"):
        demo.check_model_dir(tmp_path / "nope")
    with pytest.raises(demo.InputError, match="is empty"):
        demo.check_model_dir(tmp_path)
    (tmp_path / "cosyvoice3.yaml").write_text("llm: [\n  : :\n")
    with pytest.raises(demo.InputError) as e:
        demo.check_model_dir(tmp_path)
    assert "\n" not in str(e.value) and "cosyvoice3.yaml" in str(e.value)


def test_the_worker_does_not_import_tuning():
    text = (REPO / "worker" / "demo.py").read_text()
    assert not re.search(r"^\s*(from|import) tuning", text, re.M)


def test_demo_service_failure_is_one_line_with_the_log(tmp_path):
    import shutil

    from tuning.random_model import write_model_dir

    model_dir = write_model_dir(tmp_path / "broken", "tiny", seed=1)
    (model_dir / "llm.pt").write_bytes(b"garbage")
    r = run_sh("demo", "--model-dir", str(model_dir), cwd=tmp_path, env=clean_env(tmp_path),
               timeout=300)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "the worker did not start" in lines[0] and "llm" in lines[0]
    log = Path(lines[0].rsplit("; log: ", 1)[1])
    try:
        assert log.is_file() and "llm.pt" in log.read_text()
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)
    assert not (tmp_path / "demo.wav").exists()


def test_default_voice_falls_back_to_a_tone(monkeypatch, tmp_path):
    assert demo.default_voice().mode == "zero_shot"  # the fixture prompt is there
    monkeypatch.setattr(demo, "PROMPT", tmp_path / "missing")
    v = demo.default_voice()
    assert v.mode == "cross_lingual" and v.prompt_text is None and v.seconds == 3.0
    assert "tone" in v.label and v.wav[:4] == b"RIFF"
