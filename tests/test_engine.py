"""The in-process streaming engine: exactness of incremental streaming, upstream's recompute
schedule reproduced, batched concurrent requests, per-request settings, no sleep polling."""

from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import REPO
from worker.engine import Engine
from worker.llm import decode_tokens
from worker.model_dir import load_model_dir
from worker.request import RequestError, TTSRequest


@pytest.fixture(scope="module")
def models(tiny_dir):
    return load_model_dir(tiny_dir)


@pytest.fixture(scope="module")
def flow_in(golden):
    return golden["flow"]


def _req(flow_in, rid: str, mode: str = "incremental", n: int | None = None, **kw) -> TTSRequest:
    tok = flow_in["token"][0].long()
    return TTSRequest(
        text_ids=torch.arange(5, 15)[None],
        embedding=flow_in["embedding"],
        llm_prompt_speech=flow_in["prompt_token"].long(),
        flow_prompt_speech=flow_in["prompt_token"].long(),
        prompt_feat=flow_in["prompt_feat"],
        forced_tokens=tok if n is None else tok[:n],
        request_id=rid,
        mode=mode,
        **kw,
    )


def _collect(engine: Engine, reqs) -> dict[str, list]:
    out: dict[str, list] = {}
    for ch in engine.run(reqs):
        out.setdefault(ch.request_id, []).append(ch)
    return out


@pytest.fixture(scope="module")
def reference_audio(models, flow_in):
    """One non-incremental block-causal pass over the whole utterance."""
    with torch.inference_mode():
        f = flow_in
        mel = models.flow.inference(
            f["token"], f["prompt_token"], f["prompt_feat"], f["embedding"], True, True
        )
        return models.hift.inference(mel, finalize=True)[0][0]


def test_incremental_stream_equals_one_block_causal_pass(models, flow_in, reference_audio):
    chunks = _collect(Engine(models, max_batch=2, max_seq=1024), [_req(flow_in, "a")])["a"]
    audio = torch.cat([c.audio for c in chunks])
    assert audio.shape == reference_audio.shape
    assert (audio - reference_audio).abs().max() <= 1e-4
    # chunk-aligned hops: first 25 + pad (P=37 -> pad 13), then 25 each, then the rest
    assert [c.tokens for c in chunks] == [38] + [25] * 6 + [12]
    assert [c.final for c in chunks] == [False] * 7 + [True]
    assert [c.seq for c in chunks] == list(range(8))


def test_recompute_mode_reproduces_upstream_streaming(models, flow_in, golden):
    """Same kernels, upstream's O(n^2) strategy and doubling hops: upstream's chunks."""
    chunks = _collect(Engine(models, max_batch=2, max_seq=1024), [_req(flow_in, "r", "recompute")])
    got = chunks["r"]
    ref = golden["stream"]["chunks"]
    assert [c.audio.numel() for c in got] == [k["audio_samples"] for k in ref]
    audio = torch.cat([c.audio for c in got])
    assert (audio - golden["stream"]["audio_concat"][0]).abs().max() <= 1e-4


def test_incremental_vs_upstream_stream_differs_only_in_final_chunk(models, flow_in, golden):
    """Upstream runs its final chunk with full attention; everything before it matches."""
    chunks = _collect(Engine(models, max_batch=2, max_seq=1024), [_req(flow_in, "a")])["a"]
    audio = torch.cat([c.audio for c in chunks])
    up = golden["stream"]["audio_concat"][0]
    last_start = golden["stream"]["chunks"][-1]["audio_start_in_concat"]
    # HiFT's causal receptive field reaches a few frames back from the final chunk's mel.
    safe = last_start - 8 * 480
    assert (audio[:safe] - up[:safe]).abs().max() <= 1e-4
    assert (audio[last_start:] - up[last_start:]).abs().max() > 1e-3


def test_concurrent_requests_equal_each_alone(models, flow_in):
    eng = Engine(models, max_batch=4, max_seq=1024)
    both = _collect(eng, [_req(flow_in, "x", n=120), _req(flow_in, "y", n=77, hop_tokens=50)])
    alone_x = _collect(Engine(models, max_batch=4, max_seq=1024), [_req(flow_in, "x", n=120)])
    alone_y = _collect(
        Engine(models, max_batch=4, max_seq=1024), [_req(flow_in, "y", n=77, hop_tokens=50)]
    )
    for rid, alone in (("x", alone_x), ("y", alone_y)):
        a = torch.cat([c.audio for c in both[rid]])
        b = torch.cat([c.audio for c in alone[rid]])
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
    assert [c.tokens for c in both["y"][:-1]] == [50 + 13] + [50] * (len(both["y"]) - 2)


def test_sampled_tokens_match_single_sequence_decoding(models, golden):
    """Batched engine decoding draws the same tokens as upstream's loop for the same seed."""
    g = golden["llm"]
    req = TTSRequest(
        text_ids=g["text"].long(),
        prompt_text_ids=g["prompt_text"].long(),
        llm_prompt_speech=g["prompt_speech_token"].long(),
        embedding=golden["flow"]["embedding"],
        seed=1005,
        request_id="s",
    )
    other = TTSRequest(text_ids=g["text"].long()[:, :20], embedding=req.embedding, seed=7,
                       request_id="o")  # fmt: skip
    eng = Engine(models, max_batch=4, max_seq=2048)
    for r in (req, other):
        eng.add_request(r)
    seen = []
    while eng.has_work():
        eng.step()
        if "s" in eng.llm.active:
            seen = list(eng.llm.active["s"].decoded)
    models.llm.setup_caches(1, 2048)
    want = list(
        decode_tokens(models.llm, g["lm_input"], g["min_len"], g["max_len"],
                      generator=torch.Generator().manual_seed(1005))
    )  # fmt: skip
    assert seen == want == golden["llm"]["sampled_runs"][1]["tokens"]


def test_bad_settings_are_refused(models, flow_in):
    eng = Engine(models, max_batch=1, max_seq=1024)
    with pytest.raises(RequestError, match="multiple of 25"):
        eng.add_request(_req(flow_in, "h", hop_tokens=30))
    with pytest.raises(RequestError, match="mode"):
        eng.add_request(_req(flow_in, "m", mode="fast"))
    eng.add_request(_req(flow_in, "d"))
    with pytest.raises(RequestError, match="already active"):
        eng.add_request(_req(flow_in, "d"))
    big = _req(flow_in, "big", n=None)
    big.forced_tokens = torch.zeros(5000, dtype=torch.long)
    with pytest.raises(RequestError, match="KV cache"):
        eng.add_request(big)


def test_cancel_frees_the_slot(models, flow_in):
    eng = Engine(models, max_batch=1, max_seq=1024)
    eng.add_request(_req(flow_in, "c1"))
    eng.step()
    assert not eng.llm.can_admit()
    eng.cancel("c1")
    assert eng.llm.can_admit() and not eng.has_work()


def test_no_sleep_polling_in_the_engine():
    for path in list((REPO / "worker").rglob("*.py")) + list((REPO / "cache").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"\btime\.sleep\(|\bsleep\(", text), path


def test_knobs_set_engine_defaults(models, flow_in):
    from worker.settings import Knobs

    knobs = Knobs.from_env({"COSY_HOP_TOKENS": "50", "COSY_MAX_BATCH": "3", "COSY_MAX_SEQ": "900"})
    eng = Engine(models, knobs=knobs)
    assert len(eng.llm.free) == 3 and eng.llm.max_seq == 900
    chunks = _collect(eng, [_req(flow_in, "k", n=150)])["k"]
    assert [c.tokens for c in chunks[:-1]] == [50 + 13, 50]  # hop from COSY_HOP_TOKENS
    explicit = _collect(Engine(models, knobs=knobs), [_req(flow_in, "e", n=150, hop_tokens=25)])
    assert explicit["e"][1].tokens == 25  # a request's own hop wins


def test_zero_and_few_tokens_end_cleanly(models, flow_in):
    """An utterance with no speech tokens ends with one empty final chunk; a very short one
    (shorter than the first hop) comes out whole in its final chunk."""
    eng = Engine(models, max_batch=2, max_seq=1024)
    empty = _req(flow_in, "z", n=0)
    short = _req(flow_in, "s", n=5)
    out = _collect(eng, [empty, short])
    assert [(c.final, c.audio.numel()) for c in out["z"]] == [(True, 0)]
    assert [c.final for c in out["s"]] == [True]
    assert out["s"][0].audio.numel() == 5 * 2 * 480 and out["s"][0].tokens == 5
    assert not eng.has_work() and eng.llm.can_admit()


def test_second_request_with_same_voice_reuses_prompt_blocks(models, flow_in, golden):
    """P = 37: the first (37 - 3) // 25 = 1 prompt block is computed once per voice."""
    eng = Engine(models, max_batch=2, max_seq=1024)
    first = _collect(eng, [_req(flow_in, "v1", n=80)])["v1"]
    assert (eng.prompt_kv.hits, eng.prompt_kv.misses) == (0, 1)
    second = _collect(eng, [_req(flow_in, "v2", n=80)])["v2"]
    assert (eng.prompt_kv.hits, eng.prompt_kv.misses) == (1, 1)
    a = torch.cat([c.audio for c in first])
    b = torch.cat([c.audio for c in second])
    assert torch.equal(a, b)
