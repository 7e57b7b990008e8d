"""The LLM stage core: Start in, speech tokens out.

:class:`LLMBatcher` is the one decode loop: sequences in the slots of its own
:class:`worker.llm.LLMCache`, prefill on admission, one batched forward per step for every
decoding sequence, per-sequence sampling with upstream's exact RNG use. :func:`decode_tokens`
(upstream's single-sequence loop, used by ``verify`` and the tests) is the same batcher with
one slot. :class:`LLMCore` puts it behind messages: it queues Starts until a slot is free,
forwards each Start downstream when it admits it, applies the silence filter and emits
:class:`Tokens` per step. :func:`length_bounds` is the length policy (2x / 20x the text).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from worker.flow_stream import first_hop
from worker.llm import CosyVoice3LM
from worker.request import TTSRequest
from worker.sampling import SilenceFilter, sampling_ids
from worker.stages.messages import Abort, Credit, Failed, Message, Start, Tokens

log = logging.getLogger(__name__)


def length_bounds(n_text: int) -> tuple[int, int]:
    """Upstream's policy: at least 2x and at most 20x the text tokens of speech tokens."""
    return int(n_text * 2), int(n_text * 20)


def request_positions(req: TTSRequest) -> tuple[int, int]:
    """(LLM input positions, most speech tokens it may decode) of a request."""
    L = 2 + req.text_ids.shape[1]
    L += sum(x.shape[1] for x in (req.prompt_text_ids, req.llm_prompt_speech) if x is not None)
    if req.forced_tokens is not None:
        return L, int(req.forced_tokens.numel())
    return L, length_bounds(req.text_ids.shape[1])[1]


@dataclass
class Sequence:
    rid: str
    slot: int
    min_len: int
    max_len: int
    gen: torch.Generator | None  # None: torch's global RNG, as upstream
    forced: list[int] | None = None
    pos: int = 0
    decoded: list[int] = field(default_factory=list)
    done: bool = False
    last_token: int = -1


class LLMBatcher:
    """Static-KV-cache slots and batched decoding for many sequences (one cache per batcher)."""

    def __init__(self, llm: CosyVoice3LM, max_batch: int, max_seq: int):
        self.llm = llm
        self.cfg = llm.cfg
        self.cache = llm.new_cache(max_batch, max_seq)
        self.max_batch, self.max_seq = max_batch, max_seq
        self.free = list(range(max_batch))
        self.seqs: dict[str, Sequence] = {}
        self.prefill_s = self.decode_s = 0.0
        self.decode_steps = self.tokens = 0

    def can_admit(self) -> bool:
        return bool(self.free)

    def admit(
        self,
        rid: str,
        lm_input: Tensor,  # (1, L, D)
        min_len: int,
        max_len: int,
        generator: torch.Generator | None = None,
        forced: list[int] | None = None,
    ) -> list[int]:
        """Prefill into a free slot and sample the first token. -> tokens decoded (0 or 1)."""
        if not self.free:
            raise RuntimeError("no free KV-cache slot")
        L = lm_input.shape[1]
        if L + max_len > self.max_seq:
            raise ValueError(
                f"{L} input positions + up to {max_len} speech tokens exceed the KV cache "
                f"({self.max_seq} positions; raise COSY_MAX_SEQ or split the text)"
            )
        seq = Sequence(rid, self.free.pop(0), min_len, max_len, generator, forced)
        self.seqs[rid] = seq
        try:
            t0 = time.perf_counter()
            hidden = self.llm(lm_input, torch.arange(L)[None], torch.tensor([seq.slot]), L,
                              cache=self.cache)  # fmt: skip
            self.prefill_s += time.perf_counter() - t0
            seq.pos = L
            if max_len == 0:
                seq.done = True
                return []
            return self._sample(seq, self.llm.logp(hidden[:, -1])[0])
        except Exception:
            self.release(rid)
            raise

    def _sample(self, seq: Sequence, logp: Tensor) -> list[int]:
        i = len(seq.decoded)
        if seq.forced is not None:
            tok = seq.forced[i]
        else:
            tok = sampling_ids(logp, seq.decoded, self.cfg, ignore_eos=i < seq.min_len,
                               generator=seq.gen)  # fmt: skip
        if tok >= self.cfg.speech_token_size:
            seq.done = True
            return []
        seq.decoded.append(tok)
        seq.last_token = tok
        self.tokens += 1
        if len(seq.decoded) >= seq.max_len:
            seq.done = True
        return [tok]

    def _forward(self, seqs: list[Sequence]) -> Tensor:
        toks = torch.tensor([s.last_token for s in seqs])
        emb = self.llm.speech_embedding(toks)[:, None]  # (B, 1, D)
        pos = torch.tensor([[s.pos] for s in seqs])
        slots = torch.tensor([s.slot for s in seqs])
        if torch.equal(slots, torch.arange(len(seqs))):
            slots = None  # rows 0..B-1: attend over cache views, no gather
        kv_len = max(s.pos for s in seqs) + 1  # a host int: no tensor read back
        return self.llm.logp(self.llm(emb, pos, slots, kv_len, cache=self.cache)[:, -1])  # (B, V)

    def step(
        self, rids: list[str] | None = None
    ) -> tuple[dict[str, list[int]], dict[str, Exception]]:
        """One batched decode step for every unfinished sequence (of ``rids``, if given).
        -> (rid -> new tokens, rid -> the error that failed that sequence alone)."""
        seqs = [s for s in self.seqs.values() if not s.done and (rids is None or s.rid in rids)]
        new: dict[str, list[int]] = {}
        failed: dict[str, Exception] = {}
        if not seqs:
            return new, failed
        t0 = time.perf_counter()
        try:
            rows = list(zip(seqs, self._forward(seqs), strict=True))
        except Exception:  # isolate: each sequence alone (rewrites the same cache positions)
            rows = []
            for s in seqs:
                try:
                    rows.append((s, self._forward([s])[0]))
                except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                    failed[s.rid] = e
        for s, row in rows:
            try:
                s.pos += 1
                new[s.rid] = self._sample(s, row)
            except Exception as e:  # noqa: BLE001
                failed[s.rid] = e
        self.decode_s += time.perf_counter() - t0
        self.decode_steps += 1
        return new, failed

    def release(self, rid: str) -> None:
        seq = self.seqs.pop(rid, None)
        if seq is not None:
            self.free.append(seq.slot)
            self.free.sort()


@torch.inference_mode()
def decode_tokens(
    model: CosyVoice3LM,
    lm_input: Tensor,  # (1, L, D)
    min_len: int,
    max_len: int,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Upstream's single-sequence decoding loop (``Qwen2LM.inference_wrapper``): sample with
    ``ras_sampling``, stop on any id >= speech_token_size, yield the tokens. Uses ``generator``
    (default: torch's global RNG, as upstream). The batcher's loop with one slot."""
    b = LLMBatcher(model, 1, lm_input.shape[1] + max_len + 1)
    yield from b.admit("seq", lm_input, min_len, max_len, generator)
    while not b.seqs["seq"].done:
        new, failed = b.step()
        if failed:
            raise failed["seq"]
        yield from new["seq"]


@dataclass
class _Active:
    ahead: int | None  # most tokens decoded beyond what audio covers (None: no limit)
    first_need: int = 0  # tokens the first chunk needs (first hop + lookahead)
    next_need: int = 0  # tokens a later chunk needs beyond the audio (hop + lookahead)
    filt: SilenceFilter = field(default_factory=SilenceFilter)
    sent: int = 0  # tokens passed on (after the silence filter)
    covered: int = 0  # tokens covered by audio that came out (Credit)

    def may_decode(self) -> bool:
        return self.ahead is None or self.sent - self.covered < self.ahead

    def urgent(self) -> bool:
        """The flow's chunk in progress still lacks tokens of this request."""
        if self.ahead is None:
            return True
        need = self.first_need if self.covered == 0 else self.next_need
        return self.sent < self.covered + need


class LLMCore:
    """The LLM stage behind messages (see the module docstring)."""

    name = "llm"

    def __init__(self, llm: CosyVoice3LM, max_batch: int, max_seq: int, hop_tokens: int = 25,
                 lookahead: int = 3):  # fmt: skip
        self.batcher = LLMBatcher(llm, max_batch, max_seq)
        self.hop_tokens, self.lookahead = hop_tokens, lookahead
        self.llm = llm
        self.pending: deque[Start] = deque()
        self.active: dict[str, _Active] = {}

    def check(self, req: TTSRequest) -> None:
        """Raise ValueError if ``req`` can never fit this stage's KV cache."""
        L, n = request_positions(req)
        if L + n > self.batcher.max_seq:
            raise ValueError(
                f"{L} input positions + up to {n} speech tokens exceed the KV cache "
                f"({self.batcher.max_seq} positions; raise COSY_MAX_SEQ or split the text)"
            )

    def handle(self, msg: Message) -> list[Message]:
        if isinstance(msg, Start):
            self.pending.append(msg)
            return []
        if isinstance(msg, Credit):
            a = self.active.get(msg.rid)
            if a is not None:
                a.covered = max(a.covered, msg.tokens)
            return []
        if isinstance(msg, (Abort, Failed)):
            self.pending = deque(m for m in self.pending if m.rid != msg.rid)
            self.drop(msg.rid)
            return [msg]
        return [Failed(msg.rid, "internal", f"llm stage got a {type(msg).__name__} message")]

    def _ahead(self, req: TTSRequest) -> int | None:
        """Tokens a request may be decoded beyond its audio: the chunk the flow is computing
        and the next one (the first one padded to the prompt's block edge, as the flow does).
        Recompute requests (upstream's doubling hops) are not limited."""
        if req.strategy != "incremental":
            return None
        return self._first_need(req) + (req.hop_tokens or self.hop_tokens)

    def _first_need(self, req: TTSRequest) -> int:
        P = 0 if req.flow_prompt_speech is None else req.flow_prompt_speech.shape[1]
        return first_hop(P, req.hop_tokens or self.hop_tokens) + self.lookahead

    def drop(self, rid: str) -> None:
        self.active.pop(rid, None)
        self.batcher.release(rid)

    def _decodable(self) -> list[str]:
        """Sequences to decode this step: every one with credit, but only when one of them
        is urgent (the flow waits for its tokens) or all of them have credit. Decoding ahead
        then happens in full batches, not one sequence at a time against the flow's cores."""
        act = self.active
        ready = [rid for rid, s in self.batcher.seqs.items()
                 if not s.done and rid in act and act[rid].may_decode()]  # fmt: skip
        if len(ready) == len(act) or any(act[r].urgent() for r in ready):
            return ready
        return []

    def has_work(self) -> bool:
        return bool(self.pending and self.batcher.can_admit()) or bool(self._decodable())

    def active_ids(self) -> list[str]:
        return [m.rid for m in self.pending] + list(self.active)

    def _admit(self, msg: Start) -> list[Message]:
        req, rid = msg.req, msg.rid
        try:
            self.check(req)
            lm_input = self.llm.build_lm_input(
                req.text_ids, req.prompt_text_ids, req.llm_prompt_speech
            )
            min_len, max_len = length_bounds(req.text_ids.shape[1])
            forced = None
            if req.forced_tokens is not None:
                forced = [int(t) for t in req.forced_tokens.reshape(-1)]
                min_len = max_len = len(forced)
            gen = torch.Generator()
            gen.manual_seed(req.seed if req.seed is not None else int(torch.randint(2**62, ())))
            first = self.batcher.admit(rid, lm_input, min_len, max_len, gen, forced)
        except ValueError as e:
            return [Failed(rid, "bad_request", str(e))]
        except Exception as e:  # noqa: BLE001 - one request's failure stays its own
            log.exception("llm: prefill of %s failed", rid)
            return [Failed(rid, "internal", f"llm prefill failed: {e}")]
        hop = req.hop_tokens or self.hop_tokens
        self.active[rid] = _Active(self._ahead(req), self._first_need(req), hop + self.lookahead)
        return [msg, *self._tokens(rid, first)]

    def _tokens(self, rid: str, new: list[int]) -> list[Message]:
        seq = self.batcher.seqs[rid]
        a = self.active[rid]
        kept = [t for t in new if a.filt.keep(t)]
        a.sent += len(kept)
        if seq.done:
            self.drop(rid)
        if not kept and not seq.done:
            return []
        return [Tokens(rid, torch.tensor(kept, dtype=torch.long), seq.done)]

    @torch.inference_mode()
    def step(self) -> list[Message]:
        """Admit what fits, then one batched decode step. -> Start / Tokens / Failed."""
        out: list[Message] = []
        while self.pending and self.batcher.can_admit():
            out += self._admit(self.pending.popleft())
        new, failed = self.batcher.step(self._decodable())
        for rid, e in failed.items():
            log.error("llm: decoding %s failed: %r", rid, e)
            self.drop(rid)
            out.append(Failed(rid, "internal", f"llm decode failed: {e}"))
        for rid, toks in new.items():
            out += self._tokens(rid, toks)
        return out

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Page in the weights and run one prefill + decode step (a scratch sequence), so the
        first request does not pay for reading the mmap'd checkpoint."""
        b = self.batcher
        if not b.can_admit():
            return
        lm_input = self.llm.build_lm_input(torch.zeros(1, 4, dtype=torch.long))
        b.admit("__warmup__", lm_input, 2, 2, forced=[0, 0])
        b.step()
        b.release("__warmup__")
        b.prefill_s = b.decode_s = 0.0
        b.decode_steps = b.tokens = 0

    def stats(self) -> dict[str, float | int]:
        b = self.batcher
        return {
            "active": len(self.active), "pending": len(self.pending), "free_slots": len(b.free),
            "prefill_s": round(b.prefill_s, 3), "decode_s": round(b.decode_s, 3),
            "decode_steps": b.decode_steps, "tokens": b.tokens,
        }  # fmt: skip
