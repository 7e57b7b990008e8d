"""The in-process streaming engine: prepared requests in, audio chunks out.

One :class:`Engine` owns the three stages' per-request state and advances all active requests
with :meth:`Engine.step`: admit (LLM prefill into a free KV-cache slot), one *batched* LLM
decode step for every decoding request (concurrent streams share the weight traffic), then a
flow + HiFT chunk for every request that has a full hop of tokens (+3 lookahead) or has
finished. Chunk boundaries are aligned with the DiT's 50-frame attention blocks, and the flow
and HiFT keep their per-request caches, so each chunk costs the same (``mode="incremental"``).
``mode="recompute"`` runs upstream's strategy with the same kernels (re-run the flow over all
tokens and HiFT over all mel for each chunk, upstream's doubling hops): the O(n²) baseline the
benchmark compares against. The service, the CLI, tests and benchmarks all drive this class.
Nothing here sleeps or polls: :meth:`step` does work or returns nothing.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from worker.flow_stream import FlowStream, PromptKVStore
from worker.hift_stream import HiFTStream
from worker.model_dir import CosyVoice3Models
from worker.request import RequestError, TTSRequest
from worker.sampling import SilenceFilter, sampling_ids
from worker.settings import Knobs

MODES = ("incremental", "recompute")


@dataclass
class AudioChunk:
    request_id: str
    seq: int
    audio: Tensor  # (S,) float32 at the model's sample rate
    final: bool
    tokens: int = 0  # speech tokens this chunk covers


@dataclass
class _Seq:
    req: TTSRequest
    slot: int
    lm_input: Tensor
    min_len: int
    max_len: int
    gen: torch.Generator
    pos: int = 0
    decoded: list[int] = field(default_factory=list)
    llm_done: bool = False
    last_token: int = -1


class LLMBatcher:
    """Static-KV-cache slots and batched decoding for many sequences."""

    def __init__(self, models: CosyVoice3Models, max_batch: int, max_seq: int):
        self.llm = models.llm
        self.cfg = models.config.llm
        self.llm.setup_caches(max_batch, max_seq)
        self.max_seq = max_seq
        self.free = list(range(max_batch))
        self.active: dict[str, _Seq] = {}
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "tokens": 0}

    def can_admit(self) -> bool:
        return bool(self.free)

    def admit(self, rid: str, req: TTSRequest) -> None:
        llm = self.llm
        n_text = req.text_ids.shape[1]
        lm_input = llm.build_lm_input(req.text_ids, req.prompt_text_ids, req.llm_prompt_speech)
        min_len, max_len = int(n_text * 2), int(n_text * 20)
        if req.forced_tokens is not None:
            min_len = max_len = int(req.forced_tokens.numel())
        if lm_input.shape[1] + max_len > self.max_seq:
            raise RequestError(
                f"request {rid}: {lm_input.shape[1]} input + up to {max_len} speech tokens "
                f"exceed the KV cache ({self.max_seq} positions; raise COSY_MAX_SEQ)"
            )
        gen = torch.Generator()
        gen.manual_seed(req.seed if req.seed is not None else int(torch.randint(2**62, ())))
        seq = _Seq(req, self.free.pop(0), lm_input, min_len, max_len, gen)
        t0 = time.perf_counter()
        L = lm_input.shape[1]
        hidden = llm(lm_input, torch.arange(L)[None], torch.tensor([seq.slot]))
        seq.pos = L
        self.stats["prefill_s"] += time.perf_counter() - t0
        self.active[rid] = seq
        if max_len == 0:
            seq.llm_done = True
        else:
            self._sample(seq, llm.logp(hidden[:, -1])[0])

    def _sample(self, seq: _Seq, logp: Tensor) -> None:
        i = len(seq.decoded)
        if seq.req.forced_tokens is not None:
            tok = int(seq.req.forced_tokens.reshape(-1)[i])
        else:
            tok = sampling_ids(logp, seq.decoded, self.cfg, ignore_eos=i < seq.min_len,
                               generator=seq.gen)  # fmt: skip
        if tok >= self.cfg.speech_token_size:
            seq.llm_done = True
            return
        seq.decoded.append(tok)
        seq.last_token = tok
        self.stats["tokens"] += 1
        if len(seq.decoded) >= seq.max_len:
            seq.llm_done = True

    def step(self) -> None:
        """One batched decode step for every unfinished sequence."""
        seqs = [s for s in self.active.values() if not s.llm_done]
        if not seqs:
            return
        t0 = time.perf_counter()
        toks = torch.tensor([s.last_token for s in seqs])
        emb = self.llm.speech_embedding(toks)[:, None]  # (B, 1, D)
        pos = torch.tensor([[s.pos] for s in seqs])
        slots = torch.tensor([s.slot for s in seqs])
        if torch.equal(slots, torch.arange(len(seqs))):
            slots = None  # rows 0..B-1: attend over cache views, no gather
        logp = self.llm.logp(self.llm(emb, pos, slots)[:, -1])  # (B, V)
        for s, row in zip(seqs, logp, strict=True):
            s.pos += 1
            self._sample(s, row)
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["decode_steps"] += 1

    def release(self, rid: str) -> None:
        seq = self.active.pop(rid, None)
        if seq is not None:
            self.free.append(seq.slot)
            self.free.sort()


@dataclass(frozen=True)
class ChunkInfo:
    """What one token2wav chunk ran on (for checks against upstream's schedule)."""

    token_len: int  # tokens (after the prompt) given to the flow, lookahead included
    token_offset: int  # first token whose audio this chunk produced
    hop: int | None  # tokens advanced (None: the final chunk)
    finalize: bool
    mel: Tensor  # (1, 80, F) mel of the new frames


def _threads(knobs: Knobs | None, stage: str) -> None:
    """In-process, stages take turns on the same cores: switch intra-op threads per stage."""
    if knobs is not None:
        n = knobs.threads(stage)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


class Token2Wav:
    """Per-request flow + HiFT streaming state.

    ``incremental``: a :class:`FlowStream` (per-step K/V of finished DiT blocks) and a
    :class:`HiFTStream` (carried causal state); tokens are handed over one chunk at a time so
    every chunk costs the same. ``recompute``: upstream's strategy with the same kernels.
    """

    def __init__(
        self,
        models: CosyVoice3Models,
        req: TTSRequest,
        mode: str,
        knobs: Knobs | None = None,
        prompt_store: PromptKVStore | None = None,
    ):
        cfg = models.config
        self.knobs = knobs
        self.models, self.mode = models, mode
        self.ratio = cfg.flow.token_mel_ratio
        self.lookahead = cfg.flow.pre_lookahead_len
        empty = torch.zeros(1, 0, dtype=torch.long)
        self.prompt_token = req.flow_prompt_speech if req.flow_prompt_speech is not None else empty
        self.prompt_feat = (
            req.prompt_feat
            if req.prompt_feat is not None
            else torch.zeros(1, 0, cfg.flow.output_size)
        )
        self.embedding = req.embedding
        P = self.prompt_token.shape[1]
        self.P = P
        self.pad = math.ceil(P / cfg.chunk_size) * cfg.chunk_size - P
        hop = req.hop_tokens or (knobs.hop_tokens if knobs else cfg.chunk_size)
        self.base_hop = hop  # recompute mode doubles it, as upstream
        self.tokens: list[int] = []
        self.offset = 0  # tokens (after the prompt) whose audio has been produced
        self.pushed = 0  # incremental: tokens handed to the FlowStream
        self.flow_s = self.hift_s = 0.0
        if mode == "incremental":
            self.flow = FlowStream(models.flow, self.prompt_token, self.prompt_feat,
                                   self.embedding, hop_tokens=hop,
                                   prompt_store=prompt_store)  # fmt: skip
            self.hift = HiFTStream(models.hift)
        else:
            self.mel_cache: Tensor | None = None
            self.speech_offset = 0

    def _need(self) -> int:
        """Tokens (after the prompt) needed before the next non-final chunk can run."""
        if self.mode == "incremental":
            return self.flow.tokens_needed() - self.P
        hop = self.base_hop + self.pad if self.offset == 0 else self.base_hop
        return self.offset + hop + self.lookahead

    def ready(self, llm_done: bool) -> bool:
        """A full hop (+ lookahead) is there, or the LLM is done (final chunk)."""
        return llm_done or len(self.tokens) >= self._need()

    def chunk(self) -> tuple[Tensor, int, bool]:
        """Run one chunk: returns (audio (S,), tokens covered, final). Final when the tokens
        for a full hop are not there (call it only when :meth:`ready`)."""
        need = self._need()
        final = len(self.tokens) < need
        end = len(self.tokens) if final else need - self.lookahead
        _threads(self.knobs, "flow")
        t0 = time.perf_counter()
        token_len = len(self.tokens) if final else need
        if self.mode == "incremental":
            new = torch.tensor([self.tokens[self.pushed : token_len]], dtype=torch.long)
            self.pushed = token_len
            mel = self.flow.push(new, finalize=final)
        else:
            token = torch.tensor([self.tokens[:token_len]])
            mel = self.models.flow.inference(
                token, self.prompt_token, self.prompt_feat, self.embedding,
                streaming=not final, finalize=final,
            )[:, :, self.ratio * self.offset :]  # fmt: skip
        _threads(self.knobs, "hift")
        t1 = time.perf_counter()
        if self.mode == "incremental":
            if final and self.hift.frames_in + mel.shape[2] == 0:
                audio = mel.new_zeros(1, 0)  # nothing was generated at all
            else:
                audio = self.hift.push(mel, finalize=final)
        else:
            self.mel_cache = mel if self.mel_cache is None else torch.cat([self.mel_cache, mel], 2)
            if self.mel_cache.shape[2] == 0 or (not final and self.mel_cache.shape[2] < 9):
                audio = mel.new_zeros(1, 0)
            else:
                audio, _ = self.models.hift.inference(self.mel_cache, finalize=final)
            audio = audio[:, self.speech_offset :]
            self.speech_offset += audio.shape[1]
            self.base_hop = min(100, self.base_hop * 2)  # upstream's doubling hops
        self.flow_s += t1 - t0
        self.hift_s += time.perf_counter() - t1
        covered = end - self.offset
        self.last = ChunkInfo(token_len, self.offset, None if final else covered, final, mel)
        self.offset = end
        return audio.reshape(-1), covered, final


@dataclass
class _Active:
    rid: str
    t2w: Token2Wav
    filt: SilenceFilter
    seq_no: int = 0
    consumed: int = 0  # LLM tokens already passed through the silence filter
    t_start: float = 0.0
    t_first_audio: float | None = None
    done: bool = False


class Engine:
    """Runs many requests at once; see the module docstring."""

    def __init__(
        self,
        models: CosyVoice3Models,
        max_batch: int | None = None,
        max_seq: int | None = None,
        knobs: Knobs | None = None,
    ):
        """``knobs`` (default: ``Knobs.from_env()``) give the defaults: KV-cache slots and
        length, hop size, flow steps (applied to ``models.flow``) and threads per stage."""
        if models.llm is None or models.flow is None or models.hift is None:
            raise ValueError("Engine needs all three stages loaded")
        self.knobs = knobs or Knobs.from_env()
        self.models = models
        if models.flow.cfg.n_timesteps != self.knobs.flow_steps:
            models.flow.cfg = replace(models.flow.cfg, n_timesteps=self.knobs.flow_steps)
        self.llm = LLMBatcher(
            models, max_batch or self.knobs.max_batch, max_seq or self.knobs.max_seq
        )
        # per-voice flow state of the prompt-only DiT blocks (COSY_PROMPT_KV_MB)
        self.prompt_kv = PromptKVStore(self.knobs.prompt_kv_mb << 20)
        self.pending: deque[tuple[str, TTSRequest]] = deque()
        self.active: dict[str, _Active] = {}
        self._ids = itertools.count()
        self.finished: dict[str, dict] = {}

    def add_request(self, req: TTSRequest) -> str:
        if req.mode not in MODES:
            raise RequestError(f"mode {req.mode!r}: choose from {MODES}")
        block = self.models.config.chunk_size
        if req.hop_tokens is None:
            req = replace(req, hop_tokens=self.knobs.hop_tokens)
        if req.hop_tokens <= 0 or req.hop_tokens % block:
            raise RequestError(
                f"hop_tokens {req.hop_tokens}: must be a positive multiple of {block}"
            )
        if req.text_ids.ndim != 2 or req.text_ids.shape[0] != 1 or req.text_ids.shape[1] == 0:
            raise RequestError("text_ids must have shape (1, N) with N > 0")
        L = 2 + req.text_ids.shape[1]
        L += sum(x.shape[1] for x in (req.prompt_text_ids, req.llm_prompt_speech) if x is not None)
        n_max = (
            req.forced_tokens.numel()
            if req.forced_tokens is not None
            else 20 * req.text_ids.shape[1]
        )
        if L + n_max > self.llm.max_seq:
            raise RequestError(
                f"{L} input positions + up to {n_max} speech tokens exceed the KV cache "
                f"({self.llm.max_seq} positions; raise COSY_MAX_SEQ or split the text)"
            )
        rid = req.request_id or f"req-{next(self._ids)}"
        if rid in self.active or any(r == rid for r, _ in self.pending):
            raise RequestError(f"request id {rid!r} is already active")
        self.pending.append((rid, req))
        return rid

    def has_work(self) -> bool:
        return bool(self.pending or self.active)

    def cancel(self, rid: str) -> None:
        self.pending = deque((r, q) for r, q in self.pending if r != rid)
        self.active.pop(rid, None)
        self.llm.release(rid)

    @torch.inference_mode()
    def step(self) -> list[AudioChunk]:
        out: list[AudioChunk] = []
        _threads(self.knobs, "llm")
        while self.pending and self.llm.can_admit():
            rid, req = self.pending.popleft()
            t2w = Token2Wav(self.models, req, req.mode, self.knobs, self.prompt_kv)
            a = _Active(rid, t2w, SilenceFilter(),
                        t_start=time.perf_counter())  # fmt: skip
            self.active[rid] = a
            self.llm.admit(rid, req)
        _threads(self.knobs, "llm")
        self.llm.step()
        for rid, a in list(self.active.items()):
            seq = self.llm.active[rid]
            for tok in seq.decoded[a.consumed :]:
                if a.filt.keep(tok):
                    a.t2w.tokens.append(tok)
            a.consumed = len(seq.decoded)
            while not a.done and a.t2w.ready(seq.llm_done):
                audio, covered, final = a.t2w.chunk()
                if a.t_first_audio is None:
                    a.t_first_audio = time.perf_counter()
                out.append(AudioChunk(rid, a.seq_no, audio, final, covered))
                a.seq_no += 1
                a.done = final
            if a.done:
                self.finished[rid] = {
                    "tokens": len(seq.decoded),
                    "first_audio_s": (a.t_first_audio or time.perf_counter()) - a.t_start,
                    "total_s": time.perf_counter() - a.t_start,
                    "flow_s": a.t2w.flow_s,
                    "hift_s": a.t2w.hift_s,
                }
                del self.active[rid]
                self.llm.release(rid)
        return out

    def run(self, requests: Iterable[TTSRequest]) -> Iterator[AudioChunk]:
        """Add ``requests`` and yield their chunks as they are made, until all are done."""
        for r in requests:
            self.add_request(r)
        while self.has_work():
            yield from self.step()

    def synthesize(self, req: TTSRequest) -> Tensor:
        """The whole utterance at once, (S,) float32."""
        return torch.cat([c.audio for c in self.run([req])])
