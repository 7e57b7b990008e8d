"""Frontend modes: text + voice -> the model inputs upstream builds (reference §1.1/§1.2),
the prompt cache in front of the ONNX encoders, and clear errors for bad input."""

from __future__ import annotations

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

PROMPT_WAV = FIXTURES / "prompts" / "en_1272_128104_000003_000001.wav"
SYSTEM = "You are a helpful assistant.<|endofprompt|>"
TRANSCRIPT = (FIXTURES / "prompts" / "en_1272_128104_000003_000001.txt").read_text().strip()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("fe") / "tiny", "tiny", seed=1)


@pytest.fixture()
def fe(model_dir, tmp_path):
    return Frontend(model_dir, PromptCache(tmp_path / "cache", max_mb=64))


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
    fresh = Frontend(fe.model_dir, PromptCache(fe.cache.root, max_mb=64))  # survives restarts
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
