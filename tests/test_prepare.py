"""Frontend modes: text + voice -> the model inputs upstream builds (reference §1.1/§1.2),
the prompt cache in front of the ONNX encoders, and clear errors for bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from cache import PromptCache, UnknownSpeaker
from tests.conftest import FIXTURES
from tuning.random_model import write_model_dir
from worker.frontend.prepare import Frontend, Voice
from worker.llm import load_llm
from worker.request import RequestError
from worker.settings import Knobs

PROMPT_WAV = FIXTURES / "prompts" / "en_1272_128104_000003_000001.wav"
SYSTEM = "You are a helpful assistant.<|endofprompt|>"
TRANSCRIPT = (FIXTURES / "prompts" / "en_1272_128104_000003_000001.txt").read_text().strip()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("fe") / "tiny", "tiny", seed=1)


KNOBS = Knobs.from_env({})  # explicit settings: a stray COSY_* changes no test


@pytest.fixture()
def fe(model_dir, tmp_path):
    return Frontend(model_dir, PromptCache(tmp_path / "cache", max_mb=64), knobs=KNOBS)


def test_zero_shot_layout(fe, model_dir):
    text = "Hello there. This is a test of the frontend."
    reqs = fe.requests("zero_shot", text, Voice(PROMPT_WAV, SYSTEM + TRANSCRIPT))
    assert len(reqs) >= 1
    r = reqs[0]
    tok = fe.tokenizer
    assert r.prompt_text_ids[0].tolist() == tok.encode(SYSTEM + TRANSCRIPT)
    assert tok.endofprompt_id in r.prompt_text_ids[0].tolist()
    P = r.flow_prompt_speech.shape[1]
    assert P > 0 and torch.equal(r.llm_prompt_speech, r.flow_prompt_speech)
    assert r.prompt_feat.shape == (1, 2 * P, 80)  # 1:2 token:mel alignment
    assert r.embedding.shape == (1, 192)
    joined = "".join(tok.decode(q.text_ids[0].tolist()) for q in reqs)
    assert joined.replace(" ", "").lower().startswith("hello")
    # The LLM input has upstream's layout: [sos, prompt_text ++ text, task_id, prompt speech].
    cfg = fe.config
    llm = load_llm(model_dir / "llm.pt", cfg.llm)
    x = llm.build_lm_input(r.text_ids, r.prompt_text_ids, r.llm_prompt_speech)
    M, N = r.prompt_text_ids.shape[1], r.text_ids.shape[1]
    assert x.shape[1] == 1 + M + N + 1 + P
    assert torch.equal(x[0, 0], llm.speech_embedding.weight[cfg.llm.sos])
    assert torch.equal(x[0, 1 + M + N], llm.speech_embedding.weight[cfg.llm.task_id])
    assert torch.equal(x[0, -1], llm.speech_embedding.weight[r.llm_prompt_speech[0, -1]])


def test_cross_lingual_and_instruct2_layouts(fe):
    voice = Voice(PROMPT_WAV)
    (r,) = fe.requests("cross_lingual", SYSTEM + "Bonjour tout le monde.", voice)
    assert r.prompt_text_ids is None and r.llm_prompt_speech is None
    assert fe.tokenizer.endofprompt_id in r.text_ids[0].tolist()  # system prompt is in the text
    assert r.flow_prompt_speech.shape[1] > 0  # flow prompt kept
    instruct = "You are a helpful assistant. Speak slowly.<|endofprompt|>"
    reqs = fe.requests("instruct2", "Good morning.", voice, instruct_text=instruct)
    assert reqs[0].prompt_text_ids[0].tolist() == fe.tokenizer.encode(instruct)
    assert reqs[0].llm_prompt_speech is None
    assert torch.equal(reqs[0].flow_prompt_speech, r.flow_prompt_speech)


def test_cache_hit_skips_encoders_and_named_speaker(fe, tmp_path):
    voice = Voice(PROMPT_WAV, SYSTEM + TRANSCRIPT)
    a = fe.requests("zero_shot", "One.", voice)[0]
    assert fe.encoder_calls == 1
    key, _, hit = fe.prompt(PROMPT_WAV, SYSTEM + TRANSCRIPT)
    assert hit and fe.encoder_calls == 1  # second time: a hit, encoders not run
    fe.cache.add_speaker("libri", key)
    fresh = Frontend(fe.model_dir, PromptCache(fe.cache.root, max_mb=64), knobs=KNOBS)
    b = fresh.requests("zero_shot", "One.", Voice(speaker="libri"))[0]
    assert fresh.encoder_calls == 0
    for f in ("prompt_text_ids", "llm_prompt_speech", "prompt_feat", "embedding"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    with pytest.raises(UnknownSpeaker, match="nobody"):
        fresh.requests("zero_shot", "One.", Voice(speaker="nobody"))


def test_long_text_becomes_ordered_segments(fe):
    sentence = "This sentence is about a dozen words long, give or take a few more. "
    reqs = fe.requests("zero_shot", sentence * 12, Voice(PROMPT_WAV, SYSTEM + TRANSCRIPT))
    assert len(reqs) > 1
    total = sum(r.text_ids.shape[1] for r in reqs)
    assert total >= 12 * 10


@pytest.mark.parametrize(
    "mode, text, voice_kw, instruct, match",
    [
        ("zero_shot", "   ", {"prompt_text": SYSTEM + "x"}, "", "empty"),
        ("zero_shot", "Hi.", {"prompt_text": "no marker"}, "", "endofprompt"),
        ("cross_lingual", "Hi.", {}, "", "endofprompt"),
        ("instruct2", "Hi.", {}, "Speak slowly.", "endofprompt"),
        ("shouting", "Hi.", {}, "", "mode"),
    ],
)
def test_bad_requests_name_the_problem(fe, mode, text, voice_kw, instruct, match):
    with pytest.raises(RequestError, match=match):
        fe.requests(mode, text, Voice(PROMPT_WAV, **voice_kw), instruct_text=instruct)


def test_bad_prompt_audio(fe, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"definitely not audio" * 10)
    with pytest.raises(RequestError, match="not a readable audio file"):
        fe.prompt(junk)
    long = tmp_path / "long.wav"
    sf.write(long, (np.random.default_rng(0).standard_normal(31 * 16000) * 0.1), 16000)
    with pytest.raises(RequestError, match="at most 30 s"):
        fe.prompt(long)
    low = tmp_path / "low.wav"
    sf.write(low, np.zeros(8000 * 2) + 0.01, 8000)
    with pytest.raises(RequestError, match="16000"):
        fe.prompt(low)


# -- settings -----------------------------------------------------------------------------------


def test_threads_come_from_the_knobs_passed_in(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COSY_FRONTEND_THREADS", "5")  # not read when knobs are given
    knobs = Knobs.from_env({"COSY_FRONTEND_THREADS": "3"})
    assert Frontend(model_dir, knobs=knobs).threads == 3
    assert Frontend(model_dir, threads=2, knobs=knobs).threads == 2
    assert Frontend(model_dir).threads == 5  # neither given: Knobs.from_env() (os.environ)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        Frontend(model_dir, threads=0)
    with pytest.raises(ValueError, match=f"model dir not found: {tmp_path / 'nope'}"):
        Frontend(tmp_path / "nope", knobs=knobs)


# -- the voice ----------------------------------------------------------------------------------


def test_voice_needs_exactly_one_source(fe):
    with pytest.raises(RequestError, match=r"either prompt_wav .* or speaker='x' .*not both"):
        Voice(PROMPT_WAV, SYSTEM + TRANSCRIPT, speaker="x")
    with pytest.raises(RequestError, match="needs prompt_wav .* or speaker"):
        Voice()
    with pytest.raises(RequestError, match="prompt_text goes with prompt_wav only"):
        Voice(speaker="x", prompt_text=SYSTEM + TRANSCRIPT)
    with pytest.raises(RequestError, match="path or the audio file's bytes, got int"):
        Voice(123)
    voice = Voice(speaker="x")
    voice.prompt_wav = PROMPT_WAV  # changed after construction: caught on use, before encoding
    with pytest.raises(RequestError, match="not both"):
        fe.requests("cross_lingual", SYSTEM + "Hi.", voice)
    assert fe.encoder_calls == 0


def _flac_bytes(path) -> bytes:
    data, sr = sf.read(path, dtype="int16")
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def test_prompt_as_bytes_in_any_format_equals_the_file(fe):
    voice = Voice(PROMPT_WAV, SYSTEM + TRANSCRIPT)
    (a,) = fe.requests("zero_shot", "One.", voice)
    assert fe.encoder_calls == 1
    flac = _flac_bytes(PROMPT_WAV)
    assert flac[:4] == b"fLaC"
    for data in (PROMPT_WAV.read_bytes(), flac, bytearray(flac)):
        v = Voice(data, SYSTEM + TRANSCRIPT)
        assert isinstance(v.prompt_wav, bytes) and f"<{len(data)} bytes>" in repr(v)
        (b,) = fe.requests("zero_shot", "One.", v)
        for f in ("prompt_text_ids", "llm_prompt_speech", "prompt_feat", "embedding"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert fe.encoder_calls == 1  # same decoded samples: same key, a cache hit each time


def test_zero_shot_without_transcript_is_refused_before_encoding(fe):
    for text in ("", "  ", SYSTEM, SYSTEM + "  "):  # a system prompt alone is no transcript
        with pytest.raises(RequestError, match="zero_shot needs the prompt's transcript"):
            fe.requests("zero_shot", "Hi.", Voice(PROMPT_WAV, text))
    with pytest.raises(RequestError, match="endofprompt"):
        fe.requests("zero_shot", "Hi.", Voice(PROMPT_WAV, TRANSCRIPT))
    assert fe.encoder_calls == 0


def _tone(amplitude: float, sr: int = 16000, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.zeros(32000, np.float32),  # digital silence
        lambda: _tone(10 ** (-70 / 20)),  # a hum at -70 dBFS
        lambda: np.full(32000, 0.05, np.float32),  # DC offset only
        lambda: np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 1e-4,
    ],
    ids=["zeros", "hum-70dB", "dc", "noise-80dB"],
)
def test_silent_prompts_are_refused(fe, tmp_path, make):
    path = tmp_path / "silent.wav"
    sf.write(path, make(), 16000, subtype="FLOAT")
    for source in (path, path.read_bytes()):
        with pytest.raises(RequestError, match="prompt audio is silent") as info:
            fe.requests("cross_lingual", SYSTEM + "Hi.", Voice(source))
        assert "-60 dBFS" in str(info.value)
    assert fe.encoder_calls == 0 and fe.cache.stats().entries == 0


def test_a_quiet_real_prompt_is_accepted(fe, tmp_path):
    x, sr = sf.read(PROMPT_WAV, dtype="float32")
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, x * (10 ** (-45 / 20) / np.abs(x).max()), sr, subtype="FLOAT")  # peak -45 dB
    (r,) = fe.requests("cross_lingual", SYSTEM + "Hi.", Voice(quiet))
    assert fe.encoder_calls == 1 and r.flow_prompt_speech.shape[1] > 0


def _wav_bytes() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, _tone(0.3), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind, make, match",
    [
        ("random bytes", lambda: np.random.default_rng(1).bytes(4000), "not a readable audio"),
        ("text", lambda: b"Just a transcript, not audio.\n" * 40, "not a readable audio"),
        ("truncated wav", lambda: _wav_bytes()[: len(_wav_bytes()) // 2], "truncated"),
        ("wav header only", lambda: _wav_bytes()[:44], "truncated"),
        ("torn header", lambda: _wav_bytes()[:30], "not a readable audio"),
        ("empty", lambda: b"", "empty"),
    ],
)
def test_prompts_that_are_not_audio_name_the_problem(fe, tmp_path, kind, make, match):
    data = make()
    path = tmp_path / "prompt.wav"
    path.write_bytes(data)
    for source, name in ((path, str(path)), (data, "bytes")):
        with pytest.raises(RequestError, match=match) as info:
            fe.requests("cross_lingual", SYSTEM + "Hi.", Voice(source))
        msg = str(info.value)
        assert msg.startswith("prompt audio: ") and name in msg, msg
    assert fe.encoder_calls == 0
