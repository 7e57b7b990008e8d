"""Stage cores and their messages: the wire form round-trips and refuses garbage; the LLM
decodes only a bounded distance ahead of the audio (credit); the flow serves first chunks
first, then round robin; segments come out in text order."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import max_abs
from worker.model_dir import load_model_dir
from worker.ordering import SegmentOrder
from worker.request import TTSRequest
from worker.stages.flow import FlowCore
from worker.stages.llm import LLMCore
from worker.stages.messages import (
    Abort,
    Audio,
    Credit,
    Failed,
    Mel,
    MessageError,
    Start,
    Tokens,
    decode,
    encode,
)


@pytest.fixture(scope="module")
def models(tiny_dir):
    return load_model_dir(tiny_dir)


def _req(flow_in, n: int, rid: str = "r") -> TTSRequest:
    return TTSRequest(
        text_ids=torch.arange(5, 15)[None], embedding=flow_in["embedding"],
        llm_prompt_speech=flow_in["prompt_token"].long(),
        flow_prompt_speech=flow_in["prompt_token"].long(), prompt_feat=flow_in["prompt_feat"],
        forced_tokens=flow_in["token"][0].long()[:n], request_id=rid, seed=3,
    )  # fmt: skip


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_every_message_kind_round_trips(golden):
    req = _req(golden["flow"], 40)
    msgs = [
        Start("s", req), Tokens("t", torch.tensor([1, 2, 3]), False),
        Tokens("t0", torch.zeros(0, dtype=torch.long), True),
        Mel("m", torch.randn(1, 80, 7), 4, True), Audio("a", 2, torch.randn(960), 1, False),
        Credit("c", 41), Abort("x", "cancelled", "by the client"), Failed("f", "internal", "boom"),
    ]  # fmt: skip
    for m in msgs:
        frames = [bytes(f) for f in encode(m)]
        back = decode(frames)
        assert type(back) is type(m) and back.rid == m.rid
        if isinstance(m, Start):
            for name in ("text_ids", "embedding", "prompt_feat", "forced_tokens", "seed",
                         "strategy", "request_id", "hop_tokens", "prompt_text_ids"):  # fmt: skip
                assert _same(getattr(back.req, name), getattr(m.req, name)), name
        else:
            for name, value in vars(m).items():
                assert _same(getattr(back, name), value), name


@pytest.mark.parametrize(
    "frames, problem",
    [
        ([], "empty"),
        ([b"\x00\x01garbage"], "bad header"),
        ([encode(Credit("c", 1))[0].replace(b"credit", b"crEdit")], "unknown message kind"),
        ([bytes(encode(Tokens("t", torch.tensor([1, 2]), False))[0])], "buffers"),
        ([bytes(encode(Tokens("t", torch.tensor([1, 2]), False))[0]), b"123"], "bytes"),
    ],
)
def test_malformed_stage_messages_are_refused(frames, problem):
    with pytest.raises(MessageError, match=problem):
        decode(frames)


def test_llm_decodes_only_a_bounded_distance_ahead_of_the_audio(models, golden):
    """P = 37 prompt tokens: the first chunk needs 25 + 13 (pad) + 3 tokens; the LLM may run
    one more hop ahead (66 tokens) and then waits for Credit."""
    core = LLMCore(models.llm, 2, 1024, hop_tokens=25, lookahead=3)
    core.handle(Start("r", _req(golden["flow"], 150)))
    sent = 0
    for _ in range(200):
        if not core.has_work():
            break
        sent += sum(m.tokens.numel() for m in core.step() if isinstance(m, Tokens))
    assert sent == 13 + 25 + 25 + 3 and not core.has_work()
    core.handle(Credit("r", 38))  # the first chunk's audio came out: 38 tokens covered
    while core.has_work():
        sent += sum(m.tokens.numel() for m in core.step() if isinstance(m, Tokens))
    assert sent == 38 + 66
    core.handle(Credit("r", 150))  # no limit left: decodes to the end, final Tokens
    out = []
    while core.has_work():
        out += [m for m in core.step() if isinstance(m, Tokens)]
    assert sum(m.tokens.numel() for m in out) + sent == 150 and out[-1].final


def test_llm_decodes_ahead_only_in_full_batches(models, golden):
    """Two requests: once neither is urgent (the flow has the tokens of its chunk in progress)
    and only one has credit left, the LLM waits; when both have credit it decodes them in one
    batch; an urgent request is decoded at once."""
    core = LLMCore(models.llm, 2, 1024, hop_tokens=25, lookahead=3)
    core.handle(Start("a", _req(golden["flow"], 150, "a")))
    core.handle(Start("b", _req(golden["flow"], 150, "b")))
    sent = {"a": 0, "b": 0}

    def run() -> int:
        steps = 0
        while core.has_work():
            steps += 1
            for m in core.step():
                if isinstance(m, Tokens):
                    sent[m.rid] += m.tokens.numel()
        return steps

    run()
    assert sent == {"a": 66, "b": 66}  # both to their limit, decoded together
    core.handle(Credit("a", 38))  # a has room, but its next chunk's tokens are there already
    assert sent["a"] >= 38 + 25 + 3 and not core.has_work()
    steps0 = core.batcher.decode_steps
    core.handle(Credit("b", 38))  # now both have room: one batch each step
    run()
    assert sent == {"a": 104, "b": 104} and core.batcher.decode_steps - steps0 == 38
    core.handle(Credit("a", 104))  # a's chunk in progress lacks tokens: urgent, decoded alone
    assert core.has_work()
    run()
    assert sent["a"] > 104 and sent["b"] == 104


def test_flow_serves_first_chunks_first_then_round_robin(models, golden):
    """Request a has streamed a chunk; b arrives later with none: b's first chunk runs before
    a's second, although a's is ready too; then they take turns."""
    f = golden["flow"]
    core = FlowCore(models.flow, 25, max_batch=1)
    tokens = f["token"][0].long()
    core.handle(Start("a", _req(f, 120, "a")))
    core.handle(Tokens("a", tokens[:120], True))
    order: list[str] = []
    while not order:  # a's prompt-only blocks, then its first chunk
        order += [m.rid for m in core.step() if isinstance(m, Mel)]
    core.handle(Start("b", _req(f, 120, "b")))
    core.handle(Tokens("b", tokens[:120], True))
    for _ in range(4):
        order += [m.rid for m in core.step() if isinstance(m, Mel)]
    assert order[:5] == ["a", "b", "a", "b", "a"]


def _flow_mels(core: FlowCore, reqs: dict[str, TTSRequest]) -> dict[str, torch.Tensor]:
    for rid, req in reqs.items():
        core.handle(Start(rid, req))
        core.handle(Tokens(rid, req.forced_tokens, True))
    mels: dict[str, list[torch.Tensor]] = {rid: [] for rid in reqs}
    while core.has_work():
        for m in core.step():
            assert isinstance(m, Mel), m
            mels[m.rid].append(m.mel)
    return {rid: torch.cat(m, dim=2) for rid, m in mels.items()}


def test_flow_batches_ready_chunks_and_each_request_equals_its_run_alone(models, golden):
    """Three requests (different voices, prompt lengths and lengths) with chunks ready at once
    run as packed DiT calls; each one's mel equals its run alone."""
    f = golden["flow"]
    short = dict(f, prompt_token=f["prompt_token"][:, :20], prompt_feat=f["prompt_feat"][:, :40])
    none = dict(f, prompt_token=f["prompt_token"][:, :0], prompt_feat=f["prompt_feat"][:, :0])
    reqs = {"a": _req(f, 150, "a"), "b": _req(short, 90, "b"), "c": _req(none, 60, "c")}
    core = FlowCore(models.flow, 25, max_batch=4)
    together = _flow_mels(core, reqs)
    assert core.calls < core.chunks  # chunks of several requests shared DiT calls
    for rid, req in reqs.items():
        alone = _flow_mels(FlowCore(models.flow, 25, max_batch=1), {rid: req})[rid]
        assert together[rid].shape == alone.shape
        # bit-identical here (tiny dims); GEMMs with more rows may block (round) differently
        assert max_abs(together[rid], alone) <= 1e-6, (rid, max_abs(together[rid], alone))


def test_segment_order_releases_in_text_order():
    o: SegmentOrder[str] = SegmentOrder(["s1", "s2", "s3"])
    assert o.push("s2", "b0", False) == []
    assert o.push("s3", "c0", True) == []
    assert o.push("s1", "a0", False) == ["a0"]
    assert o.push("s1", "a1", True) == ["a1", "b0"]
    assert not o.done and o.pending() == ["s2"]
    assert o.push("s2", "b1", True) == ["b1", "c0"] and o.done
    with pytest.raises(ValueError):
        o.push("s2", "late", True)
    with pytest.raises(KeyError):
        o.push("nope", "x", True)
