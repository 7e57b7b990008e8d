"""Incremental flow for streaming: one :class:`FlowStream` per request.

:class:`FlowStream` is the incremental form of ``Flow.inference(streaming=True)``: chunks of
whole 50-frame DiT blocks, each computed from its new frames alone plus, per Euler step, the
K/V of every finished frame (:class:`StepCache`). Its concatenated output equals
``inference(all tokens, streaming=True, finalize=True)``; each chunk costs the same.
:class:`PromptKVStore` keeps, per voice, the state after the prompt-only blocks.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import torch

from worker.dit import POS_CONV_KERNEL
from worker.flow import Flow, euler_schedule


class StepCache:
    """One Euler step's state of a stream: the roped K and the V of every finished frame for
    every DiT layer and both CFG rows, and the position-conv context.

    K/V live in preallocated (depth, 2, H, capacity, Dh) buffers that grow geometrically, so
    appends are amortized O(1); ``past()`` returns views, never copies. Growth is x1.5, not
    x2: at official dims (fp32) a frame costs 22 layers x 2 CFG rows x (K+V) x 1024 x 4 B =
    352 KiB per step, 3.4 MiB over the 10 steps, so overshoot matters more than the copies.
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
        capacity_frames: int | None = None,  # initial K/V capacity (default: first 2 chunks)
        prompt_store: PromptKVStore | None = None,
        n_steps: int | None = None,  # Euler steps (default: the model config's)
    ):
        cfg = flow.cfg
        n_steps = n_steps or cfg.n_timesteps
        self.flow = flow
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
            d = cfg.dit
            first = self.ratio * self.next_hop
            capacity = capacity_frames or first + self.ratio * hop_tokens
            self.caches = [
                StepCache(d.depth, d.heads, d.dim_head, d.dim, POS_CONV_KERNEL - 1, capacity)
                for _ in self.schedule
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

    def run_prefix(self) -> None:
        """Compute (or restore) the prompt-only blocks before the first real chunk."""
        n = self.prefix_tokens
        if n == 0 or self.done:
            return
        snap = self.prompt_store.get(self._prefix_key) if self._prefix_key else None
        if snap is None:
            self._chunk(n, final=False)  # returns no frames: all of them are prompt
            if self._prefix_key:
                snap = [
                    (c.past()[0].clone(), c.past()[1].clone(), c.conv_ctx.clone())
                    for c in self.caches
                ]
                self.prompt_store.put(self._prefix_key, snap)
        else:
            for cache, (k, v, ctx) in zip(self.caches, snap, strict=True):
                cache.reserve(k.shape[3])
                cache.k[:, :, :, : k.shape[3]] = k
                cache.v[:, :, :, : v.shape[3]] = v
                cache.length = k.shape[3]
                cache.conv_ctx = ctx.clone()
            self.done = n
            keep = max(self.done - self.history, 0)
            self.tokens = self.tokens[:, keep - self.token_base :]
            self.token_base = keep
            self.prefix_reused = True
        self.next_hop -= n

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
    def next_chunk(self, finalize: bool = False) -> tuple[torch.Tensor, int] | None:
        """Run the next chunk if one is ready, or with ``finalize`` (no more tokens will come)
        the final chunk over every remaining token. -> (mel (1, 80, F) of the newly finished
        frames after the prompt, speech tokens after the prompt the chunk covers), or None."""
        if self.finished or not (finalize or self.ready()):
            return None
        self.run_prefix()
        start = max(self.done, self.P)
        if self.ready():
            end = self.done + self.next_hop
            mel = self._chunk(end, final=False)
            self.next_hop = self.hop_tokens
        else:
            end = self.tokens_known
            mel = self._chunk(end, final=True)
            self.finished = True
            self.caches = []  # the request is over: free its K/V now
        self.frames_emitted += mel.shape[2]
        return mel, max(end - start, 0)

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

    def _chunk(self, end: int, final: bool) -> torch.Tensor:
        """Compute absolute tokens [self.done, end) -> their mel after the prompt (1, 80, F)."""
        flow, start = self.flow, self.done
        if end <= start:
            return self.spks.new_zeros(1, self.spks.shape[1], 0)
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
        mu_in = torch.cat((mu, torch.zeros_like(mu)))  # (2, 80, Tn): CFG row 1 zeroed
        cond_in = torch.cat((cond, torch.zeros_like(cond)))
        x = flow.noise.flow(f1)[:, :, f0:].to(mu.dtype)  # (1, 80, Tn): the fixed noise
        estimator, cfg_rate = flow.decoder.estimator, flow.decoder.cfg_rate
        for (t, dt), cache in zip(self.schedule, self.caches):
            k_past, v_past = cache.past()
            v, k_new, v_new, conv_ctx = estimator.forward_chunk(
                torch.cat((x, x)),
                mu_in,
                cond_in,
                self.spks,
                t.expand(2).contiguous(),
                f0,
                k_past,
                v_past,
                cache.conv_ctx,
            )  # v (2, 80, Tn)
            if not final:
                cache.append(k_new, v_new, conv_ctx)
            v, v_uncond = torch.split(v, [1, 1], dim=0)
            v = (1.0 + cfg_rate) * v - cfg_rate * v_uncond
            x = x + dt * v
        self.done = end
        keep = max(self.done - self.history, 0)  # drop token ids no later chunk needs
        self.tokens = self.tokens[:, keep - self.token_base :]
        self.token_base = keep
        return x.float()[:, :, max(self.prompt_frames - f0, 0) :]
