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

The incremental (streaming) form lives in :mod:`worker.flow_stream`.
"""

from __future__ import annotations

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


def cfg_euler_update(
    x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, cfg_rate: float
) -> torch.Tensor:
    """One Euler step with classifier-free guidance: x (B, 80, T), v (2B, 80, T) the
    conditioned rows then the unconditioned ones -> x + dt * ((1 + r) v_c - r v_u)."""
    B = x.shape[0]
    v, v_uncond = torch.split(v, [B, B], dim=0)
    return x + dt * ((1.0 + cfg_rate) * v - cfg_rate * v_uncond)


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
            x = cfg_euler_update(x, v, dt, self.cfg_rate)
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
        n_timesteps: int | None = None,
    ) -> torch.Tensor:
        """token (1, N), prompt_token (1, P), prompt_feat (1, Tp, 80), embedding (1, 192)
        -> mel (1, 80, 2*(P+N') - Tp) float32, N' = N if finalize else N - pre_lookahead_len.
        ``n_timesteps``: Euler steps (default: the config's)."""
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
            n_timesteps or self.cfg.n_timesteps,
            streaming,
        )
        return mel[:, :, Tp:].float()


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
