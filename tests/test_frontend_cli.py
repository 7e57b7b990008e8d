"""``python -m worker.frontend``: results, and every error as one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import FIXTURES, REPO
from tests.test_cache import one_error_line
from tuning.random_model import write_model_dir
from worker.frontend.__main__ import main

PROMPT_WAV = FIXTURES / "prompts" / "en_1272_128104_000003_000001.wav"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("cli") / "tiny", "tiny", seed=1)


@pytest.fixture()
def bad_yaml_dir(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "cosyvoice3.yaml").write_text("llm: !new:foo [\n")
    return d


def test_features_and_tokenize_print_json(model_dir, capsys):
    env = {"COSY_FRONTEND_THREADS": "2"}
    assert main(["--model-dir", str(model_dir), "features", "--prompt-wav", str(PROMPT_WAV)],
                env=env) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["threads"] == 2 and out["sample_rate"] == 24000
    assert out["speaker_embedding"]["shape"] == [192]
    argv = ["--model-dir", str(model_dir), "features", "--prompt-wav", str(PROMPT_WAV)]
    assert main([*argv, "--threads", "1"], env=env) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == 1
    assert main(["--model-dir", str(model_dir), "tokenize", "Hello there."], env={}) == 0
    assert json.loads(capsys.readouterr().out)["segments"][0]["ids"]


def test_errors_are_one_line(model_dir, bad_yaml_dir, tmp_path, capsys):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio" * 50)
    md = ["--model-dir", str(model_dir), "features", "--prompt-wav"]
    nope = str(tmp_path / "nope")
    cases = [
        (["--model-dir", nope, "tokenize", "hi"], {}, f"--model-dir: not a directory: {nope}"),
        (["--model-dir", nope, "features", "--prompt-wav", str(PROMPT_WAV)], {},
         "--model-dir: not a directory"),
        (["--model-dir", str(bad_yaml_dir), "features", "--prompt-wav", str(PROMPT_WAV)], {},
         f"{bad_yaml_dir / 'cosyvoice3.yaml'}: while parsing"),
        ([*md, str(junk)], {}, f"prompt audio: not a readable audio file: {junk}"),
        ([*md, str(silent)], {}, "prompt audio is silent"),
        ([*md, str(tmp_path / "missing.wav")], {}, "prompt audio: audio file not found"),
        ([*md, str(PROMPT_WAV)], {"COSY_FRONTEND_THREADS": "many"},
         "bad COSY_* setting: COSY_FRONTEND_THREADS='many' is not allowed"),
        ([*md, str(PROMPT_WAV), "--threads", "0"], {}, "argument --threads: expected a positive"),
        (["--model-dir", str(model_dir)], {}, "the following arguments are required"),
    ]  # fmt: skip
    for argv, env, start in cases:
        assert main(argv, env=env) == 2, argv
        line = one_error_line(capsys)
        assert line.startswith(start), (argv, line)


def test_no_traceback_from_the_process(bad_yaml_dir):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    argv = ["--model-dir", str(bad_yaml_dir), "features", "--prompt-wav", str(PROMPT_WAV)]
    out = subprocess.run(
        [sys.executable, "-m", "worker.frontend", *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert "cosyvoice3.yaml" in out.stderr and "Traceback" not in out.stderr
