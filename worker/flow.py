"""The CosyVoice3 flow: speech tokens -> mel (upstream ``CausalMaskedDiffWithDiT``).

This file owns everything of the flow except the DiT estimator (:mod:`worker.dit`): token
embedding, speaker projection, the pre-lookahead conv layer, the conditional flow matching
Euler solver with classifier-free guidance and upstream's fixed noise, and the checkpoint
layout of ``flow.pt`` (:func:`checkpoint_shapes`, :func:`convert_checkpoint`,
:func:`load_flow`). Submodule names map 1:1 to the released keys.

``Flow.inference`` reproduces upstream ``CausalMaskedDiffWithDiT.inference`` (batch 1):
    tokens = cat(prompt_token, token) -> Embedding -> PreLookaheadLayer -> repeat x2 = mu
    cond = prompt_feat in the first T_p frames, zeros after
    10 Euler steps from z = fixed_noise[:, :, :T] with CFG 0.7 -> mel[:, :, T_p:]
With ``finalize=False`` the last ``pre_lookahead_len`` tokens are only lookahead context for
the pre-lookahead layer, so the mel covers ``2 * (N - pre_lookahead_len)`` frames.

:class:`FlowStream` is the incremental form of ``inference(streaming=True)`` for one request:
chunks of whole 50-frame DiT blocks, each computed from its new frames alone plus, per Euler
step, the K/V of every finished frame (:class:`StepCache`). Its concatenated output equals
``inference(all tokens, streaming=True, finalize=True)``; each chunk costs the same.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from worker.checkpoint import (
    assign_state_dict,
    check_state_dict,
    load_state_dict_file,
)
from worker.config import FlowConfig
from worker.dit import POS_CONV_GROUPS, POS_CONV_KERNEL, TIME_FREQ_DIM, DiT, rope_inv_freq
from worker.noise import FixedNoise

INV_FREQ_KEY = "decoder.estimator.rotary_embed.inv_freq"


class PreLookaheadLayer(nn.Module):
    """Residual 2-conv block: each token sees ``pre_lookahead_len`` future tokens (zeros at the
    end of the utterance, or the given ``context`` tokens for a non-final chunk)."""

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3)

    @property
    def history_len(self) -> int:
        """Tokens before x that conv2 (causal, k=3) sees through conv1: 2."""
        return self.conv2.kernel_size[0] - 1

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x (B, N, C), context (B, pre_lookahead_len, C) or None (zeros: end of utterance),
        # history (B, history_len, C): the tokens just before x, or None (x starts the
        # utterance: conv2 sees zero padding) -> (B, N, C)
        h = x.transpose(1, 2)  # (B, C, N)
        if history is not None:
            if history.shape[1] != self.history_len:
                raise ValueError(
                    f"history has {history.shape[1]} tokens, expected {self.history_len}"
                )
            h = torch.cat((history.transpose(1, 2), h), dim=2)  # (B, C, H + N)
        if context is None:
            h = F.pad(h, (0, self.pre_lookahead_len))
        else:
            if context.shape[1] != self.pre_lookahead_len:
                raise ValueError(
                    f"lookahead context has {context.shape[1]} tokens, "
                    f"expected {self.pre_lookahead_len}"
                )
            h = torch.cat((h, context.transpose(1, 2)), dim=2)  # (B, C, N + L)
        h = F.leaky_relu(self.conv1(h))  # (B, channels, [H +] N), slope 0.01
        if history is None:
            h = F.pad(h, (self.history_len, 0))
        h = self.conv2(h)  # (B, C, N)
        return h.transpose(1, 2) + x


def euler_schedule(n_timesteps: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (t (1,), dt ()) of each Euler step on upstream's cosine grid, with upstream's
    arithmetic: ``t = t + dt``, then ``dt = t_span[s + 1] - t``."""
    t_span = torch.linspace(0, 1, n_timesteps + 1, dtype=dtype)
    t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)  # (n+1,)
    t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
    steps = []
    for step in range(1, len(t_span)):
        steps.append((t, dt))
        t = t + dt
        if step < len(t_span) - 1:
            dt = t_span[step + 1] - t
    return steps


class CFMDecoder(nn.Module):
    """Upstream ``CausalConditionalCFM`` at inference: fixed-step Euler on a cosine time grid,
    the conditional and unconditional velocities computed as one batch of 2."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg_rate = cfg.inference_cfg_rate
        self.estimator = DiT(cfg.dit)

    def solve(
        self,
        z: torch.Tensor,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        n_timesteps: int,
        streaming: bool,
    ) -> torch.Tensor:
        # z, mu, cond: (1, 80, T); mask (1, 1, T); spks (1, 80) -> x (1, 80, T) float32
        B, _, T = z.shape
        # CFG batch: row 0 conditioned, row 1 with mu/spks/cond zeroed
        mask_in = mask.expand(2 * B, 1, T).contiguous()  # (2, 1, T)
        mu_in = torch.zeros(2 * B, *mu.shape[1:], dtype=spks.dtype)
        mu_in[:B] = mu
        spks_in = torch.zeros(2 * B, spks.shape[1], dtype=spks.dtype)
        spks_in[:B] = spks
        cond_in = torch.zeros(2 * B, *cond.shape[1:], dtype=spks.dtype)
        cond_in[:B] = cond
        x = z
        for t, dt in euler_schedule(n_timesteps, mu.dtype):
            x_in = torch.cat((x, x), dim=0)  # (2, 80, T)
            t_in = t.expand(2 * B).contiguous()  # (2,)
            v = self.estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming)
            v, v_uncond = torch.split(v, [B, B], dim=0)
            v = (1.0 + self.cfg_rate) * v - self.cfg_rate * v_uncond
            x = x + dt * v
        return x.float()


class Flow(nn.Module):
    def __init__(self, cfg: FlowConfig, noise: FixedNoise):
        super().__init__()
        self.cfg = cfg
        self.noise = noise  # plain attribute: never in the state dict, never moved to meta
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(
            cfg.input_size, cfg.pre_lookahead_channels, cfg.pre_lookahead_len
        )
        self.decoder = CFMDecoder(cfg)

    def spk_projection(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, 192) speaker embedding -> (B, 80): Linear(L2-normalized embedding)."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def embed_tokens(self, token: torch.Tensor) -> torch.Tensor:
        """(B, N) int -> (B, N, 80); negative ids are clamped to 0 as upstream does."""
        return self.input_embedding(torch.clamp(token, min=0))

    def pre_lookahead(
        self,
        token_embeds: torch.Tensor,
        context: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N, 80) [+ (B, pre_lookahead_len, 80) future context] [+ (B, 2, 80) preceding
        tokens, for a chunk that does not start the utterance] -> (B, N, 80)."""
        return self.pre_lookahead_layer(token_embeds, context, history)

    @torch.inference_mode()
    def inference(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        streaming: bool,
        finalize: bool,
    ) -> torch.Tensor:
        """token (1, N), prompt_token (1, P), prompt_feat (1, Tp, 80), embedding (1, 192)
        -> mel (1, 80, 2*(P+N') - Tp) float32, N' = N if finalize else N - pre_lookahead_len."""
        if token.shape[0] != 1:
            raise ValueError(f"flow inference takes batch 1, got token shape {tuple(token.shape)}")
        L = self.cfg.pre_lookahead_len
        spks = self.spk_projection(embedding)  # (1, 80)
        h = self.embed_tokens(torch.cat((prompt_token, token), dim=1))  # (1, P+N, 80)
        if finalize:
            h = self.pre_lookahead(h)
        else:  # the last L tokens (of prompt + token, as upstream) are lookahead context only
            if h.shape[1] <= L:
                raise ValueError(f"a non-final chunk needs more than {L} tokens with the prompt")
            h = self.pre_lookahead(h[:, :-L], context=h[:, -L:])  # (1, P+N-L, 80)
        mu = h.repeat_interleave(self.cfg.token_mel_ratio, dim=1)  # (1, T, 80)
        T, Tp = mu.shape[1], prompt_feat.shape[1]
        if Tp > T:
            raise ValueError(f"prompt_feat has {Tp} frames, more than the {T} of the request")
        cond = torch.zeros(1, T, self.cfg.output_size, dtype=mu.dtype)
        cond[:, :Tp] = prompt_feat
        mask = torch.ones(1, 1, T, dtype=mu.dtype)
        z = self.noise.flow(T).to(mu.dtype)  # (1, 80, T); temperature 1.0
        mel = self.decoder.solve(
            z,
            mu.transpose(1, 2).contiguous(),
            mask,
            spks,
            cond.transpose(1, 2),
            self.cfg.n_timesteps,
            streaming,
        )
        return mel[:, :, Tp:].float()


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
    ):
        cfg = flow.cfg
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
        pad = -P % self.block_tokens
        # tokens of the next chunk: the first one holds the prompt, the pad and one hop
        self.next_hop = P + pad + hop_tokens
        self.prompt_frames = prompt_feat.shape[1]
        with torch.inference_mode():
            self.prompt_feat = prompt_feat.transpose(1, 2)  # (1, 80, Tp)
            spks = flow.spk_projection(embedding)  # (1, 80)
            self.spks = torch.cat((spks, torch.zeros_like(spks)))  # (2, 80): CFG row 1 zeroed
            self.schedule = euler_schedule(cfg.n_timesteps, spks.dtype)
            # token ids from absolute index ``token_base`` on (prompt first): only the ones
            # still needed, i.e. the conv2 history of the next chunk and everything after
            self.tokens = prompt_token.long()
            self.token_base = 0
            self.done = 0  # absolute tokens (prompt included) whose frames are computed
            d = cfg.dit
            first = self.ratio * (P + pad + hop_tokens)
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
            _prompt_key(prompt_token, prompt_feat, embedding, n_steps=cfg.n_timesteps)
            if prompt_store is not None and self.prefix_tokens
            else None
        )
        self.prefix_reused = False
        self.frames_emitted = 0
        self.finished = False

    def _run_prefix(self) -> None:
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

    def ready(self) -> bool:
        """Whether a non-final chunk can run."""
        return not self.finished and self.tokens_known >= self.tokens_needed()

    @torch.inference_mode()
    def push(self, token: torch.Tensor | None = None, finalize: bool = False) -> torch.Tensor:
        """Append new tokens (1, n) and compute every chunk that is ready; with ``finalize``
        (no more tokens will come) also the final chunk over all remaining tokens.
        -> mel (1, 80, F) of the newly finished frames after the prompt (F may be 0)."""
        if self.finished:
            raise RuntimeError("push after the final chunk")
        if token is not None and token.shape[1]:
            self.tokens = torch.cat((self.tokens, token.long()), dim=1)
        mels = []
        if self.ready() or finalize:
            self._run_prefix()
        while self.ready():
            mels.append(self._chunk(self.done + self.next_hop, final=False))
            self.next_hop = self.hop_tokens
        if finalize:
            mels.append(self._chunk(self.tokens_known, final=True))
            self.finished = True
            self.caches = []  # the request is over: free its K/V now
        out = torch.cat(mels, dim=2) if mels else self.spks.new_zeros(1, self.spks.shape[1], 0)
        self.frames_emitted += out.shape[2]
        return out

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


def checkpoint_shapes(cfg: FlowConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released ``flow.pt`` (incl. the RoPE ``inv_freq`` buffer)."""
    d = cfg.dit
    inner = d.heads * d.dim_head
    ff = d.dim * d.ff_mult
    C = cfg.pre_lookahead_channels
    shapes: dict[str, tuple[int, ...]] = {
        "input_embedding.weight": (cfg.vocab_size, cfg.input_size),
        "spk_embed_affine_layer.weight": (cfg.output_size, cfg.spk_embed_dim),
        "spk_embed_affine_layer.bias": (cfg.output_size,),
        "pre_lookahead_layer.conv1.weight": (C, cfg.input_size, cfg.pre_lookahead_len + 1),
        "pre_lookahead_layer.conv1.bias": (C,),
        "pre_lookahead_layer.conv2.weight": (cfg.input_size, C, 3),
        "pre_lookahead_layer.conv2.bias": (cfg.input_size,),
    }
    e = "decoder.estimator."

    def linear(name: str, n_in: int, n_out: int) -> None:
        shapes[e + name + ".weight"] = (n_out, n_in)
        shapes[e + name + ".bias"] = (n_out,)

    linear("time_embed.time_mlp.0", TIME_FREQ_DIM, d.dim)
    linear("time_embed.time_mlp.2", d.dim, d.dim)
    linear("input_embed.proj", 2 * d.mel_dim + d.mu_dim + d.spk_dim, d.dim)
    for conv in ("conv1", "conv2"):
        key = f"{e}input_embed.conv_pos_embed.{conv}.0"
        shapes[key + ".weight"] = (d.dim, d.dim // POS_CONV_GROUPS, POS_CONV_KERNEL)
        shapes[key + ".bias"] = (d.dim,)
    shapes[INV_FREQ_KEY] = (d.dim_head // 2,)
    for i in range(d.depth):
        b = f"transformer_blocks.{i}."
        linear(b + "attn_norm.linear", d.dim, 6 * d.dim)
        for proj in ("to_q", "to_k", "to_v"):
            linear(b + "attn." + proj, d.dim, inner)
        linear(b + "attn.to_out.0", inner, d.dim)
        linear(b + "ff.ff.0.0", d.dim, ff)
        linear(b + "ff.ff.2", ff, d.dim)
    linear("norm_out.linear", d.dim, 2 * d.dim)
    linear("proj_out", d.dim, d.mel_dim)
    return shapes


def convert_checkpoint(
    sd: dict[str, torch.Tensor], cfg: FlowConfig, path: str | Path
) -> dict[str, torch.Tensor]:
    """Validate a ``flow.pt`` state dict against ``cfg`` (raises :class:`CheckpointError`
    naming every bad key) and return it ready for :func:`assign_state_dict`. A missing RoPE
    ``inv_freq`` buffer is recomputed (on the device of the other tensors, so meta works)."""
    sd = dict(sd)
    if INV_FREQ_KEY not in sd:
        device = next(iter(sd.values())).device if sd else torch.device("cpu")
        sd[INV_FREQ_KEY] = rope_inv_freq(cfg.dit.dim_head).to(device)
    check_state_dict(sd, checkpoint_shapes(cfg), path)
    return sd


def load_flow(path: str | Path, cfg: FlowConfig, noise: FixedNoise) -> Flow:
    """Build :class:`Flow` on the meta device and assign the checkpoint's tensors (no copy)."""
    sd = convert_checkpoint(load_state_dict_file(path), cfg, path)
    with torch.device("meta"):
        flow = Flow(cfg, noise)
    assign_state_dict(flow, sd, path)
    return flow.eval()
