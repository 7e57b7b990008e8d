"""The in-process driver over the stage cores: exactness of incremental streaming, upstream's
recompute schedule reproduced, batched concurrent requests, per-request settings, failures
that stay one request's, text order for an utterance, no sleep polling."""

from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import REPO
from worker.engine import RECENT, Engine
from worker.model_dir import load_model_dir
from worker.request import RequestError, TTSRequest
from worker.settings import Knobs
from worker.stages.llm import LLMBatcher, decode_tokens, length_bounds


def _engine(models, max_batch=2, max_seq=1024, **env) -> Engine:
    knobs = Knobs.from_env({f"COSY_{k.upper()}": str(v) for k, v in env.items()})
    return Engine(models, max_batch=max_batch, max_seq=max_seq, knobs=knobs)


@pytest.fixture(scope="module")
def models(tiny_dir):
    return load_model_dir(tiny_dir)


@pytest.fixture(scope="module")
def flow_in(golden):
    return golden["flow"]


def _req(flow_in, rid: str, strategy: str = "incremental", n: int | None = None, **kw):
    tok = flow_in["token"][0].long()
    return TTSRequest(
        text_ids=torch.arange(5, 15)[None],
        embedding=flow_in["embedding"],
        llm_prompt_speech=flow_in["prompt_token"].long(),
        flow_prompt_speech=flow_in["prompt_token"].long(),
        prompt_feat=flow_in["prompt_feat"],
        forced_tokens=tok if n is None else tok[:n],
        request_id=rid,
        strategy=strategy,
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
    chunks = _collect(_engine(models), [_req(flow_in, "a")])["a"]
    audio = torch.cat([c.audio for c in chunks])
    assert audio.shape == reference_audio.shape
    assert (audio - reference_audio).abs().max() <= 1e-4
    # chunk-aligned hops: first 25 + pad (P=37 -> pad 13), then 25 each, then the rest
    assert [c.tokens for c in chunks] == [38] + [25] * 6 + [12]
    assert [c.final for c in chunks] == [False] * 7 + [True]
    assert [c.seq for c in chunks] == list(range(8))


def test_recompute_mode_reproduces_upstream_streaming(models, flow_in, golden):
    """Same kernels, upstream's O(n^2) strategy and doubling hops: upstream's chunks."""
    chunks = _collect(_engine(models), [_req(flow_in, "r", "recompute")])
    got = chunks["r"]
    ref = golden["stream"]["chunks"]
    assert [c.audio.numel() for c in got] == [k["audio_samples"] for k in ref]
    audio = torch.cat([c.audio for c in got])
    assert (audio - golden["stream"]["audio_concat"][0]).abs().max() <= 1e-4


def test_incremental_vs_upstream_stream_differs_only_in_final_chunk(models, flow_in, golden):
    """Upstream runs its final chunk with full attention; everything before it matches."""
    chunks = _collect(_engine(models), [_req(flow_in, "a")])["a"]
    audio = torch.cat([c.audio for c in chunks])
    up = golden["stream"]["audio_concat"][0]
    last_start = golden["stream"]["chunks"][-1]["audio_start_in_concat"]
    # HiFT's causal receptive field reaches a few frames back from the final chunk's mel.
    safe = last_start - 8 * 480
    assert (audio[:safe] - up[:safe]).abs().max() <= 1e-4
    assert (audio[last_start:] - up[last_start:]).abs().max() > 1e-3


def test_concurrent_requests_equal_each_alone(models, flow_in):
    eng = _engine(models, 4)
    both = _collect(eng, [_req(flow_in, "x", n=120), _req(flow_in, "y", n=77, hop_tokens=50)])
    alone_x = _collect(_engine(models, 4), [_req(flow_in, "x", n=120)])
    alone_y = _collect(
        _engine(models, 4), [_req(flow_in, "y", n=77, hop_tokens=50)]
    )
    for rid, alone in (("x", alone_x), ("y", alone_y)):
        a = torch.cat([c.audio for c in both[rid]])
        b = torch.cat([c.audio for c in alone[rid]])
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
    assert [c.tokens for c in both["y"][:-1]] == [50 + 13] + [50] * (len(both["y"]) - 2)


def test_batched_decoding_matches_single_sequence_decoding(models, golden):
    """Two sequences decoded in one batch draw the same tokens as upstream's loop (the
    batcher with one slot) for the same seed, and that is the golden run."""
    g = golden["llm"]
    llm = models.llm
    lm_input = llm.build_lm_input(g["text"].long(), g["prompt_text"].long(),
                                  g["prompt_speech_token"].long())  # fmt: skip
    other = llm.build_lm_input(g["text"].long()[:, :20])
    b = LLMBatcher(llm, 4, 2048)
    got = {"s": [], "o": []}
    with torch.inference_mode():
        got["o"] += b.admit("o", other, *length_bounds(20), torch.Generator().manual_seed(7))
        got["s"] += b.admit("s", lm_input, g["min_len"], g["max_len"],
                            torch.Generator().manual_seed(1005))  # fmt: skip
        while any(not q.done for q in b.seqs.values()):
            new, failed = b.step()
            assert not failed
            for rid, toks in new.items():
                got[rid] += toks
    want = list(decode_tokens(llm, g["lm_input"], g["min_len"], g["max_len"],
                              generator=torch.Generator().manual_seed(1005)))  # fmt: skip
    assert got["s"] == want == golden["llm"]["sampled_runs"][1]["tokens"]


def test_engine_decodes_a_text_request_to_the_end(models, golden):
    """A sampled (not forced) request runs through all three cores and ends with stats."""
    g = golden["llm"]
    req = TTSRequest(text_ids=g["text"].long()[:, :6], embedding=golden["flow"]["embedding"],
                     seed=3, request_id="t")  # fmt: skip
    chunks = _collect(_engine(models), [req])["t"]
    assert chunks[-1].final and chunks[-1].error is None
    st = chunks[-1].stats
    assert st.tokens == sum(c.tokens for c in chunks) and st.tokens <= length_bounds(6)[1]
    assert st.audio_s == pytest.approx(sum(c.audio.numel() for c in chunks) / 24000)


def test_bad_settings_are_refused(models, flow_in):
    eng = _engine(models, 1)
    with pytest.raises(RequestError, match="multiple of 25"):
        eng.add_request(_req(flow_in, "h", hop_tokens=30))
    with pytest.raises(RequestError, match="strategy"):
        eng.add_request(_req(flow_in, "m", strategy="fast"))
    eng.add_request(_req(flow_in, "d"))
    with pytest.raises(RequestError, match="already active"):
        eng.add_request(_req(flow_in, "d"))
    big = _req(flow_in, "big", n=None)
    big.forced_tokens = torch.zeros(5000, dtype=torch.long)
    with pytest.raises(RequestError, match="KV cache"):
        eng.add_request(big)


def test_cancel_frees_every_stage(models, flow_in):
    eng = _engine(models, 1)
    eng.add_request(_req(flow_in, "c1"))
    for _ in range(60):  # until the flow has run a chunk: state in all three cores
        if eng.step():
            break
    assert eng.llm.active_ids() == ["c1"] and eng.flow.active_ids() == ["c1"]
    assert eng.hift.active_ids() == ["c1"]
    eng.cancel("c1")
    assert not eng.has_work() and eng.step() == []
    assert eng.llm.active_ids() == eng.flow.active_ids() == eng.hift.active_ids() == []
    assert eng.llm.batcher.can_admit() and eng.stats.cancelled == 1
    # the slot is reusable at once
    out = _collect(eng, [_req(flow_in, "c2", n=30)])["c2"]
    assert out[-1].final and out[-1].error is None


def test_a_failing_request_fails_alone(models, flow_in, monkeypatch):
    """An exception in one request's flow work (half way through the Euler steps of a
    batched DiT call) ends that request with an internal error; the other request in the same
    batch is retried alone and finishes with the same audio as alone."""
    alone = _collect(_engine(models), [_req(flow_in, "ok", n=60)])["ok"]
    eng = _engine(models)
    original = eng.flow._open

    def open_(msg):
        r = original(msg)
        if msg.rid == "bad":
            def boom(*args, **kwargs):
                raise RuntimeError("kaboom")
            r.stream.caches[3].segment = boom  # steps 0-2 of the batch have run by then
        return r

    monkeypatch.setattr(eng.flow, "_open", open_)
    out = _collect(eng, [_req(flow_in, "bad", n=60), _req(flow_in, "ok", n=60)])
    assert [(c.final, c.error) for c in out["bad"]] == [(True, ("internal", "flow failed: kaboom"))]
    a = torch.cat([c.audio for c in out["ok"]])
    assert torch.equal(a, torch.cat([c.audio for c in alone]))
    assert not eng.has_work() and eng.stats.failed == 1 and eng.stats.finished == 1


def test_stream_yields_an_utterance_in_text_order(models, flow_in):
    """Segments of different lengths finish out of order; stream() still yields segment
    1's audio, then 2's, then 3's, renumbered, no empty chunk, one final."""
    lengths = {"u1": 120, "u2": 30, "u3": 70}
    eng = _engine(models, 4)
    run_order = [c.request_id for c in eng.run([_req(flow_in, r, n=n) for r, n in
                                                lengths.items()]) if c.final]  # fmt: skip
    assert run_order != list(lengths)  # concurrently computed: they end out of order
    alone = {r: torch.cat([c.audio for c in _collect(_engine(models), [_req(flow_in, r, n=n)])[r]])
             for r, n in lengths.items()}  # fmt: skip
    chunks = list(_engine(models, 4).stream([_req(flow_in, r, n=n) for r, n in lengths.items()]))
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.audio.numel() for c in chunks) and {c.request_id for c in chunks} == {"u1"}
    audio = torch.cat([c.audio for c in chunks])
    assert torch.equal(audio, torch.cat([alone[r] for r in lengths]))


def test_stats_are_bounded(models, flow_in):
    eng = _engine(models)
    assert eng.stats.recent.maxlen == RECENT
    _collect(eng, [_req(flow_in, "s1", n=10), _req(flow_in, "s2", n=10)])
    assert eng.stats.finished == 2 and len(eng.stats.recent) == 2 and not eng.tracks


def test_engines_sharing_models_do_not_share_kv_caches(models, golden):
    """Two engines on the same weights each own their LLM cache (no silent re-allocation)."""
    a, b = _engine(models, 2, 512), _engine(models, 3, 900)
    assert a.llm.batcher.cache is not b.llm.batcher.cache
    assert a.llm.batcher.cache.max_seq == 512 and b.llm.batcher.cache.max_seq == 900
    assert models.flow.cfg.n_timesteps == 10
    _engine(models, 1, 128, flow_steps=3)
    assert models.flow.cfg.n_timesteps == 10  # the shared config is never mutated


def test_no_sleep_polling_in_the_engine():
    for path in list((REPO / "worker").rglob("*.py")) + list((REPO / "cache").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"\btime\.sleep\(|\bsleep\(", text), path


def test_knobs_set_engine_defaults(models, flow_in):
    knobs = Knobs.from_env({"COSY_HOP_TOKENS": "50", "COSY_MAX_BATCH": "3", "COSY_MAX_SEQ": "900"})
    eng = Engine(models, knobs=knobs)
    assert len(eng.llm.batcher.free) == 3 and eng.llm.batcher.max_seq == 900
    chunks = _collect(eng, [_req(flow_in, "k", n=150)])["k"]
    assert [c.tokens for c in chunks[:-1]] == [50 + 13, 50]  # hop from COSY_HOP_TOKENS
    explicit = _collect(Engine(models, knobs=knobs), [_req(flow_in, "e", n=150, hop_tokens=25)])
    assert explicit["e"][1].tokens == 25  # a request's own hop wins


def test_zero_and_few_tokens_end_cleanly(models, flow_in):
    """An utterance with no speech tokens ends with one empty final chunk; a very short one
    (shorter than the first hop) comes out whole in its final chunk."""
    eng = _engine(models)
    empty = _req(flow_in, "z", n=0)
    short = _req(flow_in, "s", n=5)
    out = _collect(eng, [empty, short])
    assert [(c.final, c.audio.numel()) for c in out["z"]] == [(True, 0)]
    assert [c.final for c in out["s"]] == [True]
    assert out["s"][0].audio.numel() == 5 * 2 * 480 and out["s"][0].tokens == 5
    assert not eng.has_work() and eng.llm.batcher.can_admit()


def test_second_request_with_same_voice_reuses_prompt_blocks(models, flow_in, golden):
    """P = 37: the first (37 - 3) // 25 = 1 prompt block is computed once per voice."""
    eng = _engine(models)
    first = _collect(eng, [_req(flow_in, "v1", n=80)])["v1"]
    assert (eng.flow.prompt_kv.hits, eng.flow.prompt_kv.misses) == (0, 1)
    second = _collect(eng, [_req(flow_in, "v2", n=80)])["v2"]
    assert (eng.flow.prompt_kv.hits, eng.flow.prompt_kv.misses) == (1, 1)
    a = torch.cat([c.audio for c in first])
    b = torch.cat([c.audio for c in second])
    assert torch.equal(a, b)
