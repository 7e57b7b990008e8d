"""Saved speakers through the frontend (what the service and ``python -m cache add`` use):
``Frontend.add_speaker`` / ``list_speakers`` / ``delete_speaker``, and their use in requests."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from cache import (
    CacheError,
    InvalidSpeakerName,
    PromptCache,
    ReadOnlyCache,
    SpeakerExists,
    UnknownSpeaker,
)
from cache.cli import main as cache_cli
from tests.conftest import FIXTURES
from tests.test_cache import one_error_line
from tests.test_cache_readonly import read_only  # noqa: F401 -- fixture
from tuning.random_model import write_model_dir
from worker.frontend.prepare import Frontend, Voice
from worker.request import RequestError
from worker.settings import Knobs

PROMPTS = FIXTURES / "prompts"
PROMPT_WAV = PROMPTS / "en_1272_128104_000003_000001.wav"
OTHER_WAV = PROMPTS / "en_1272_128104_000007_000001.wav"
SYSTEM = "You are a helpful assistant.<|endofprompt|>"
TRANSCRIPT = (PROMPTS / "en_1272_128104_000003_000001.txt").read_text().strip()
KNOBS = Knobs.from_env({})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("spk") / "tiny", "tiny", seed=1)


@pytest.fixture()
def fe(model_dir, tmp_path):
    return Frontend(model_dir, PromptCache(tmp_path / "cache", max_mb=64), knobs=KNOBS)


def test_add_list_use_delete(fe):
    info = fe.add_speaker("libri", PROMPT_WAV.read_bytes(), SYSTEM + TRANSCRIPT)
    key, _, hit = fe.prompt(PROMPT_WAV, SYSTEM + TRANSCRIPT)  # the same prompt as a file
    assert info == {"name": "libri", "key": key, "has_transcript": True}
    assert hit and fe.encoder_calls == 1

    (row,) = fe.list_speakers()
    assert row["name"] == "libri" and row["key"] == key and row["available"]
    assert row["has_transcript"] and row["prompt_text"] == SYSTEM + TRANSCRIPT
    assert row["duration_s"] == pytest.approx(sf.info(PROMPT_WAV).duration, abs=0.1)

    (a,) = fe.requests("zero_shot", "One.", Voice(PROMPT_WAV, SYSTEM + TRANSCRIPT))
    (b,) = fe.requests("zero_shot", "One.", Voice(speaker="libri"))
    for f in ("prompt_text_ids", "llm_prompt_speech", "prompt_feat", "embedding"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f

    assert fe.delete_speaker("libri") == key
    assert fe.list_speakers() == []
    assert key in fe.cache  # the entry stays until evicted
    with pytest.raises(UnknownSpeaker) as e:
        fe.delete_speaker("libri")
    assert isinstance(e.value, KeyError) and isinstance(e.value, CacheError)
    assert str(e.value) == "unknown speaker 'libri'; known speakers: (none)"


def test_unknown_speaker_names_it_and_the_known_ones(fe):
    fe.add_speaker("a", PROMPT_WAV)
    fe.add_speaker("b", OTHER_WAV)
    with pytest.raises(UnknownSpeaker) as e:
        fe.requests("cross_lingual", SYSTEM + "Hi.", Voice(speaker="zed"))
    assert str(e.value) == "unknown speaker 'zed'; known speakers: 'a', 'b'"


def test_add_speaker_checks_before_encoding(fe, tmp_path):
    fe.add_speaker("libri", PROMPT_WAV, SYSTEM + TRANSCRIPT)
    assert fe.encoder_calls == 1
    with pytest.raises(SpeakerExists, match="'libri' already exists.*overwrite=True"):
        fe.add_speaker("libri", OTHER_WAV)
    with pytest.raises(InvalidSpeakerName, match="path separator"):
        fe.add_speaker("a/b", OTHER_WAV)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(32000, np.float32), 16000)
    with pytest.raises(RequestError, match="prompt audio is silent"):
        fe.add_speaker("quiet", silent)
    with pytest.raises(RequestError, match="prompt audio: not a readable audio file"):
        fe.add_speaker("junk", b"\x00\x01not audio" * 50)
    assert fe.encoder_calls == 1
    assert [s["name"] for s in fe.list_speakers()] == ["libri"]

    old_key = fe.cache.speaker_key("libri")
    info = fe.add_speaker("libri", OTHER_WAV, overwrite=True)
    assert info["key"] != old_key and not info["has_transcript"]
    assert fe.cache.speaker_key("libri") == info["key"]


def test_speaker_without_transcript_is_refused_for_zero_shot_only(fe):
    info = fe.add_speaker("mute", PROMPT_WAV)
    assert info["has_transcript"] is False
    assert fe.add_speaker("sys", PROMPT_WAV, SYSTEM)["has_transcript"] is False
    with pytest.raises(RequestError, match="saved speaker 'sys' has no transcript"):
        fe.requests("zero_shot", "Hi.", Voice(speaker="sys"))
    with pytest.raises(RequestError) as e:
        fe.requests("zero_shot", "Hi.", Voice(speaker="mute"))
    msg = str(e.value)
    assert "saved speaker 'mute' has no transcript" in msg
    assert "zero_shot needs the prompt's transcript" in msg
    assert "cross_lingual" in msg and "--prompt-text" in msg
    (r,) = fe.requests("cross_lingual", SYSTEM + "Hi.", Voice(speaker="mute"))
    assert r.flow_prompt_speech.shape[1] > 0
    instruct = "You are a helpful assistant. Speak slowly.<|endofprompt|>"
    assert fe.requests("instruct2", "Hi.", Voice(speaker="mute"), instruct_text=instruct)


def test_speakers_need_a_cache(model_dir):
    fe = Frontend(model_dir, cache=None, knobs=KNOBS)
    with pytest.raises(CacheError, match="cannot add speaker 'x': this Frontend has no"):
        fe.add_speaker("x", PROMPT_WAV)
    with pytest.raises(CacheError, match="no prompt cache"):
        fe.list_speakers()


def test_add_speaker_on_a_read_only_cache_fails_before_encoding(fe, read_only):  # noqa: F811
    fe.add_speaker("libri", PROMPT_WAV, SYSTEM + TRANSCRIPT)
    read_only(fe.cache.root)
    with pytest.raises(ReadOnlyCache, match=f"cannot add speaker 'b'.*{fe.cache.root} is read-"):
        fe.add_speaker("b", OTHER_WAV)
    assert fe.encoder_calls == 1
    assert [s["name"] for s in fe.list_speakers()] == ["libri"]  # reads still work
    assert fe.requests("zero_shot", "Hi.", Voice(speaker="libri"))


def test_cache_cli_add_runs_the_same_code(fe, model_dir, tmp_path, capsys):
    root = tmp_path / "cli-cache"
    argv = ["--dir", str(root), "add", "libri", "--model-dir", str(model_dir)]
    argv += ["--prompt-wav", str(PROMPT_WAV), "--prompt-text", SYSTEM + TRANSCRIPT]
    assert cache_cli(argv, env={}) == 0
    assert "added speaker 'libri'" in capsys.readouterr().out
    info = fe.add_speaker("libri", PROMPT_WAV.read_bytes(), SYSTEM + TRANSCRIPT)
    assert PromptCache(root, 64).speakers() == {"libri": info["key"]}
    assert PromptCache(root, 64).speaker("libri").same_as(fe.cache.speaker("libri"))

    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(32000, np.float32), 16000)
    bad = ["--dir", str(root), "add", "quiet", "--model-dir", str(model_dir)]
    assert cache_cli([*bad, "--prompt-wav", str(silent)], env={}) == 2
    assert one_error_line(capsys).startswith("prompt audio is silent")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all" * 20)
    assert cache_cli([*bad, "--prompt-wav", str(junk)], env={}) == 2
    assert one_error_line(capsys).startswith(f"prompt audio: not a readable audio file: {junk}")
    assert PromptCache(root, 64).speakers() == {"libri": info["key"]}
