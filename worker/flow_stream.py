"""Incremental flow for streaming: one :class:`FlowStream` per request.

:class:`FlowStream` is the incremental form of ``Flow.inference(streaming=True)``: chunks of
whole 50-frame DiT blocks, each computed from its new frames alone plus, per Euler step, the
K/V of every finished frame (:class:`StepCache`). Its concatenated output equals
``inference(all tokens, streaming=True, finalize=True)``; each chunk costs the same.
:class:`PromptKVStore` keeps, per voice, the state after the prompt-only blocks.

A chunk is planned (:meth:`FlowStream.plan_chunk`: token embedding, pre-lookahead, noise ->
:class:`ChunkJob`), solved (:func:`run_chunks`: the Euler steps, several streams' jobs packed
into one DiT call per step) and finished (:meth:`FlowStream.finish_chunk`: the mel after the
prompt). ``next_chunk`` is the three for one stream.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from worker.dit import POS_CONV_KERNEL, Segment
from worker.flow import Flow, cfg_euler_update, euler_schedule
from worker.noise import FLOW_NOISE_FRAMES

log = logging.getLogger(__name__)


class StepCache:
    """One Euler step's state of a stream: the roped K and the V of every finished frame for
    every DiT layer and both CFG rows, and the position-conv context.

    K/V live in preallocated (depth, 2, H, capacity, Dh) buffers; the DiT writes a chunk's new
    K/V into them at ``length`` and attends over views, so no chunk copies the past. The
    capacity is reserved for the longest utterance up front (:meth:`for_stream`): an untouched
    buffer costs address space, not memory (pages are committed as frames are written), so
    resident memory tracks ``length`` and no chunk ever stalls on a reallocation. Should the
    reservation be refused (strict overcommit), the buffers start small and grow x1.5 by copy.
    """

    GROWTH = 1.5

    def __init__(
        self,
        depth: int,
        heads: int,
        dim_head: int,
        dim: int,
        conv_ctx: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
    ):
        self.k = torch.empty(depth, 2, heads, capacity, dim_head, dtype=dtype)
        self.v = torch.empty(depth, 2, heads, capacity, dim_head, dtype=dtype)
        self.length = 0  # finished frames held
        self.conv_ctx = torch.zeros(2, 2, dim, conv_ctx, dtype=dtype)  # (conv, B, D, k-1)
        self.reallocations = 0

    @classmethod
    def for_stream(cls, cfg, capacity: int, fallback: int, dtype=torch.float32) -> StepCache:
        """A cache reserving ``capacity`` frames (virtual), or ``fallback`` frames (growing)
        when the reservation is refused. ``cfg``: the DiT config."""
        args = (cfg.depth, cfg.heads, cfg.dim_head, cfg.dim, POS_CONV_KERNEL - 1)
        try:
            return cls(*args, capacity, dtype)
        except RuntimeError as e:  # e.g. vm.overcommit_memory=2
            log.warning("flow K/V reservation of %d frames refused (%s): grows by copy",
                        capacity, e)
            return cls(*args, fallback, dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (depth, 2, H, length, Dh) of the finished frames' K and V."""
        return self.k[:, :, :, : self.length], self.v[:, :, :, : self.length]

    def reserve(self, frames: int) -> None:
        if frames <= self.capacity:
            return
        capacity = max(frames, math.ceil(self.capacity * self.GROWTH))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:3], capacity, old.shape[4])
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)
        self.reallocations += 1

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, conv_ctx: torch.Tensor) -> None:
        """k_new, v_new (depth, 2, H, Tn, Dh) of the next frames; conv_ctx (2, 2, D, k-1)."""
        n = k_new.shape[3]
        self.reserve(self.length + n)
        self.k[:, :, :, self.length : self.length + n] = k_new
        self.v[:, :, :, self.length : self.length + n] = v_new
        self.length += n
        self.conv_ctx = conv_ctx

    def segment(self, frames: int, spks: torch.Tensor, split: int = 0) -> list[Segment]:
        """The DiT segment(s) of the next ``frames`` frames (``split``: the first ``split`` as
        a segment of their own, the rest continuing it)."""
        self.reserve(self.length + frames)
        if not split:
            return [Segment(self.length, frames, spks, self.k, self.v, self.conv_ctx)]
        return [
            Segment(self.length, split, spks, self.k, self.v, self.conv_ctx),
            Segment(self.length + split, frames - split, spks, self.k, self.v, None),
        ]


class PromptKVStore:
    """In-memory LRU of the flow state after a prompt's *prompt-only* DiT blocks.

    Blocks that end at least ``pre_lookahead_len`` tokens before the prompt's end depend only on
    the prompt (tokens, mel, speaker embedding) and the fixed noise: their per-step K/V and conv
    contexts are the same for every request with that voice. A stream that finds them here skips
    those blocks (the first chunk, which carries the prompt, shrinks accordingly). Bounded by
    bytes; ``max_bytes=0`` disables it.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = (
            OrderedDict()
        )
        self.hits = self.misses = 0

    @staticmethod
    def _nbytes(snap) -> int:
        return sum(t.numel() * t.element_size() for step in snap for t in step)

    def get(self, key: str):
        snap = self.entries.get(key)
        if snap is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return snap

    def put(self, key: str, snap) -> None:
        size = self._nbytes(snap)
        if size > self.max_bytes:
            return
        self.entries[key] = snap
        self.entries.move_to_end(key)
        while sum(self._nbytes(s) for s in self.entries.values()) > self.max_bytes:
            self.entries.popitem(last=False)


def first_hop(prompt_tokens: int, hop_tokens: int, block_tokens: int = 25) -> int:
    """Speech tokens (after the prompt) of the first chunk: one hop plus the pad that puts the
    prompt's end on a DiT block boundary, as upstream. The one place this rule lives."""
    return hop_tokens + (-prompt_tokens % block_tokens)


def _prompt_key(*tensors: torch.Tensor, n_steps: int) -> str:
    h = hashlib.sha256(f"{n_steps}".encode())
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class ChunkJob:
    """One planned chunk of a stream: absolute tokens [start, end), frames [f0, f1).

    ``x`` (1, 80, Tn) the fixed noise (the Euler state), ``mu`` / ``cond`` (2, 80, Tn) the CFG
    pair's conditions (row 1 zeroed). ``split`` > 0: the first ``split`` frames are the
    voice's prompt-only blocks, computed in the same call and stored afterwards."""

    stream: FlowStream
    start: int
    end: int
    final: bool
    x: torch.Tensor
    mu: torch.Tensor
    cond: torch.Tensor
    split: int = 0
    prefix_ctx: list = field(default_factory=list)  # per step: conv ctx after the split

    @property
    def frames(self) -> int:
        return self.x.shape[2]


def run_chunks(jobs: list[ChunkJob]) -> list[torch.Tensor]:
    """The Euler steps of several streams' planned chunks, packed into one DiT call per step
    (every Linear sees all the jobs' frames as rows; attention stays per stream).
    -> the final Euler state x (1, 80, Tn) of each job. Equal to running them one by one
    (within float rounding of the larger GEMMs). The jobs' streams must share one flow and
    one Euler schedule, and be distinct."""
    first = jobs[0].stream
    if len({id(j.stream) for j in jobs}) != len(jobs):
        raise ValueError("run_chunks: one chunk per stream")
    if any(j.stream.dit is not first.dit or j.stream.n_steps != first.n_steps for j in jobs):
        raise ValueError("run_chunks: the streams must share the DiT step and the Euler steps")
    dit, cfg_rate = first.dit, first.flow.decoder.cfg_rate
    one = len(jobs) == 1
    x = jobs[0].x if one else torch.cat([j.x for j in jobs], dim=2)  # (1, 80, sum Tn)
    mu = jobs[0].mu if one else torch.cat([j.mu for j in jobs], dim=2)  # (2, 80, sum Tn)
    cond = jobs[0].cond if one else torch.cat([j.cond for j in jobs], dim=2)
    done = []  # (job, cache, its segments) per step: applied once every step has run
    for step, (t, dt) in enumerate(first.schedule):
        segs = []
        for j in jobs:
            cache = j.stream.caches[step]
            part = cache.segment(j.frames, j.stream.spks, j.split)
            segs += part
            done.append((j, cache, part))
        v = dit.forward_segments(torch.cat((x, x)), mu, cond, t.expand(2).contiguous(), segs)
        x = cfg_euler_update(x, v, dt, cfg_rate)  # (1, 80, sum Tn)
    # only now are the new frames part of the caches: a call that raised half way left every
    # stream as it was (its K/V writes lie past ``length``), so each can be retried alone
    for j, cache, part in done:
        if j.split:
            j.prefix_ctx.append(part[0].conv_ctx_out)
        if not j.final:  # the final chunk's K/V is never read again
            cache.length += j.frames
            cache.conv_ctx = part[-1].conv_ctx_out
    return [x] if one else list(torch.split(x, [j.frames for j in jobs], dim=2))


class FlowStream:
    """Incremental block-causal flow for one request: tokens in, mel of finished frames out.

    Chunks follow upstream's schedule with a fixed hop: the first hop is padded by
    ``pad = ceil(P/25)*25 - P`` tokens so the prompt ends on a DiT block boundary (it covers
    the prompt's frames too, which are computed but not returned); a non-final chunk of
    ``hop`` tokens runs once ``hop + pre_lookahead_len`` tokens past the last chunk are known
    (the lookahead tokens are right context, as upstream ``finalize=False``); the final chunk
    takes every remaining token with zero right padding. Per chunk the 10 Euler steps run over
    the new frames only, each step reading and extending its own :class:`StepCache`.

    Concatenated output == ``flow.inference(all tokens, ..., streaming=True, finalize=True)``.
    All state is per object: requests never share anything mutable.
    """

    def __init__(
        self,
        flow: Flow,
        prompt_token: torch.Tensor,  # (1, P) int
        prompt_feat: torch.Tensor,  # (1, Tp, 80), Tp = 2P after upstream's alignment
        embedding: torch.Tensor,  # (1, 192)
        hop_tokens: int = 25,
        capacity_frames: int | None = None,  # K/V frames reserved (default: the noise's)
        prompt_store: PromptKVStore | None = None,
        n_steps: int | None = None,  # Euler steps (default: the model config's)
        dit=None,  # the DiT step: DiT.forward_segments and a cache_dtype (default: the flow's)
    ):
        cfg = flow.cfg
        self.n_steps = n_steps = n_steps or cfg.n_timesteps
        self.flow = flow
        self.dit = dit or flow.decoder.estimator
        self.ratio = cfg.token_mel_ratio
        self.block_tokens = cfg.dit.static_chunk_size // cfg.token_mel_ratio  # 25
        if hop_tokens <= 0 or hop_tokens % self.block_tokens:
            raise ValueError(
                f"hop_tokens must be a positive multiple of {self.block_tokens}, got {hop_tokens}"
            )
        if prompt_token.shape[0] != 1:
            raise ValueError(f"a stream takes batch 1, got {tuple(prompt_token.shape)}")
        self.hop_tokens = hop_tokens
        self.lookahead = cfg.pre_lookahead_len
        self.history = flow.pre_lookahead_layer.history_len
        P = prompt_token.shape[1]
        self.P = P
        # tokens of the next chunk: the first one holds the prompt, the pad and one hop
        self.next_hop = P + first_hop(P, hop_tokens, self.block_tokens)
        self.prompt_frames = prompt_feat.shape[1]
        with torch.inference_mode():
            self.prompt_feat = prompt_feat.transpose(1, 2)  # (1, 80, Tp)
            spks = flow.spk_projection(embedding)  # (1, 80)
            self.spks = torch.cat((spks, torch.zeros_like(spks)))  # (2, 80): CFG row 1 zeroed
            self.schedule = euler_schedule(n_steps, spks.dtype)
            # token ids from absolute index ``token_base`` on (prompt first): only the ones
            # still needed, i.e. the conv2 history of the next chunk and everything after
            self.tokens = prompt_token.long()
            self.token_base = 0
            self.done = 0  # absolute tokens (prompt included) whose frames are computed
            fallback = self.ratio * (self.next_hop + hop_tokens)  # the first two chunks
            capacity = capacity_frames or FLOW_NOISE_FRAMES
            dtype = getattr(self.dit, "cache_dtype", torch.float32)  # bf16 DiT: bf16 K/V
            self.caches = [
                StepCache.for_stream(cfg.dit, capacity, fallback, dtype) for _ in self.schedule
            ]
        # prompt-only blocks: computed as a chunk of their own (identical results whether or
        # not they come from ``prompt_store``), reused across requests with the same voice
        self.prefix_tokens = max(0, (P - self.lookahead) // self.block_tokens) * self.block_tokens
        self.prompt_store = prompt_store
        self._prefix_key = (
            _prompt_key(prompt_token, prompt_feat, embedding, n_steps=n_steps)
            if prompt_store is not None and self.prefix_tokens
            else None
        )
        self.prefix_reused = False
        self.frames_emitted = 0
        self.finished = False

    def _restore_prefix(self) -> bool:
        """Restore the prompt-only blocks from the store; False if they are not there."""
        snap = self.prompt_store.get(self._prefix_key) if self._prefix_key else None
        if snap is None:
            return False
        for cache, (k, v, ctx) in zip(self.caches, snap, strict=True):
            cache.reserve(k.shape[3])
            cache.k[:, :, :, : k.shape[3]] = k
            cache.v[:, :, :, : v.shape[3]] = v
            cache.length = k.shape[3]
            cache.conv_ctx = ctx.clone()
        self._advance(self.prefix_tokens)
        self.prefix_reused = True
        return True

    def _store_prefix(self, ctxs: list[torch.Tensor]) -> None:
        """Store the prompt-only blocks' state: K/V of their frames and the conv context
        after them (``ctxs``, per step)."""
        if self._prefix_key:
            n = self.ratio * self.prefix_tokens
            snap = [
                (c.k[:, :, :, :n].clone(), c.v[:, :, :, :n].clone(), ctx.clone())
                for c, ctx in zip(self.caches, ctxs, strict=True)
            ]
            self.prompt_store.put(self._prefix_key, snap)

    def run_prefix(self) -> None:
        """Compute (or restore) the prompt-only blocks ahead of the first chunk (a stage runs
        them while the LLM decodes the first hop)."""
        if not self.prefix_pending() or self._restore_prefix():
            return
        job = self._plan(self.prefix_tokens, final=False)
        self.finish_chunk(job, run_chunks([job])[0])
        self._store_prefix([c.conv_ctx for c in self.caches])

    @property
    def tokens_known(self) -> int:
        """Absolute number of tokens given so far, prompt included."""
        return self.token_base + self.tokens.shape[1]

    def tokens_needed(self) -> int:
        """Absolute tokens (prompt included) to know before the next non-final chunk runs:
        its hop plus the lookahead tokens."""
        return self.done + self.next_hop + self.lookahead

    def prefix_pending(self) -> bool:
        """The prompt-only blocks are still to compute (they need no speech token: a stage
        can run them while the LLM decodes the first hop)."""
        return bool(self.prefix_tokens) and self.done == 0 and not self.finished

    def ready(self) -> bool:
        """Whether a non-final chunk can run."""
        return not self.finished and self.tokens_known >= self.tokens_needed()

    def feed(self, token: torch.Tensor) -> None:
        """Append new tokens (1, n)."""
        if self.finished:
            raise RuntimeError("tokens after the final chunk")
        if token.shape[1]:
            self.tokens = torch.cat((self.tokens, token.long()), dim=1)

    @torch.inference_mode()
    def plan_chunk(self, finalize: bool = False) -> ChunkJob | None:
        """The next chunk if one is ready, or with ``finalize`` (no more tokens will come)
        the final chunk over every remaining token; None if there is none. A voice's
        prompt-only blocks still pending are restored from the store or become the first
        ``split`` frames of the same job (one DiT call for them and the first hop)."""
        if self.finished or not (finalize or self.ready()):
            return None
        pending = self.prefix_pending() and not self._restore_prefix()
        if self.ready():
            job = self._plan(self.done + self.next_hop, final=False)
        else:
            job = self._plan(self.tokens_known, final=True)
        if pending:
            job.split = self.ratio * self.prefix_tokens
        return job

    @torch.inference_mode()
    def finish_chunk(self, job: ChunkJob, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Account a solved job (``x`` (1, 80, Tn): its final Euler state) -> (mel (1, 80, F)
        of the newly finished frames after the prompt, speech tokens after the prompt the
        chunk covers)."""
        if job.split:
            self._store_prefix(job.prefix_ctx)
        covered = max(job.end - max(job.start, self.P), 0)
        self._advance(job.end)
        if job.final:
            self.finished = True
            self.caches = []  # the request is over: free its K/V now
        elif job.end > self.prefix_tokens or job.start:
            self.next_hop = self.hop_tokens
        mel = x.float()[:, :, max(self.prompt_frames - self.ratio * job.start, 0) :]
        self.frames_emitted += mel.shape[2]
        return mel, covered

    def next_chunk(self, finalize: bool = False) -> tuple[torch.Tensor, int] | None:
        """Plan, solve and finish the next chunk (:meth:`plan_chunk`) -> (mel (1, 80, F) of
        the newly finished frames after the prompt, speech tokens after the prompt the chunk
        covers), or None."""
        job = self.plan_chunk(finalize)
        if job is None:
            return None
        with torch.inference_mode():
            return self.finish_chunk(job, run_chunks([job])[0])

    def push(self, token: torch.Tensor | None = None, finalize: bool = False) -> torch.Tensor:
        """Append new tokens (1, n) and compute every chunk that is ready; with ``finalize``
        (no more tokens will come) also the final chunk over all remaining tokens.
        -> mel (1, 80, F) of the newly finished frames after the prompt (F may be 0)."""
        if self.finished:
            raise RuntimeError("push after the final chunk")
        if token is not None:
            self.feed(token)
        mels = []
        while (chunk := self.next_chunk()) is not None:
            mels.append(chunk[0])
        if finalize:
            mels.append(self.next_chunk(finalize=True)[0])
        if not mels:
            return self.spks.new_zeros(1, self.spks.shape[1], 0)
        return torch.cat(mels, dim=2)

    def _advance(self, end: int) -> None:
        """Tokens before ``end`` are computed: shrink the hop still due before the next
        chunk and drop token ids no later chunk needs (it keeps the conv2 history)."""
        self.next_hop -= end - self.done
        self.done = end
        keep = max(self.done - self.history, 0)
        self.tokens = self.tokens[:, keep - self.token_base :]
        self.token_base = keep

    def _plan(self, end: int, final: bool) -> ChunkJob:
        """Inputs of absolute tokens [self.done, end): their conditions and noise."""
        flow, start = self.flow, self.done
        # pre-lookahead: conv2 history on the left (zeros at the utterance start), the
        # lookahead tokens on the right (zeros at the end)
        lo = max(start - self.history, 0)
        hi = self.tokens_known if final else end + self.lookahead
        emb = flow.embed_tokens(self.tokens[:, lo - self.token_base : hi - self.token_base])
        n_hist, n = start - lo, end - start
        h = flow.pre_lookahead(
            emb[:, n_hist : n_hist + n],
            context=None if final else emb[:, n_hist + n :],
            history=emb[:, :n_hist] if n_hist else None,
        )  # (1, n, 80)
        mu = h.repeat_interleave(self.ratio, dim=1).transpose(1, 2)  # (1, 80, Tn)
        f0, f1 = self.ratio * start, self.ratio * end  # absolute frames of this chunk
        Tn = f1 - f0
        cond = mu.new_zeros(1, mu.shape[1], Tn)
        if f0 < self.prompt_frames:
            cond[:, :, : min(f1, self.prompt_frames) - f0] = self.prompt_feat[:, :, f0:f1]
        x = flow.noise.flow(f1)[:, :, f0:].to(mu.dtype)  # (1, 80, Tn): the fixed noise
        return ChunkJob(
            self, start, end, final, x,
            torch.cat((mu, torch.zeros_like(mu))),  # (2, 80, Tn): CFG row 1 zeroed
            torch.cat((cond, torch.zeros_like(cond))),
        )  # fmt: skip
