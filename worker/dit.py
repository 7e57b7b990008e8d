"""The DiT velocity estimator of the CosyVoice3 flow (upstream ``cosyvoice/flow/DiT``).

This file owns the estimator ``v(x, mask, mu, t, spks, cond)`` that the CFM Euler solver in
:mod:`worker.flow` calls: time embedding, input embedding (projection + causal conv position
embedding), ``depth`` AdaLN-zero transformer blocks with RoPE, the final AdaLN and projection.
Submodule names follow the released ``flow.pt`` keys under ``decoder.estimator.``.

Numerics follow upstream op for op, including its quirks:
- RoPE (x_transformers, interleaved pairs) is applied to q/k of width ``heads * dim_head``
  *before* the head split, so only channels ``0..dim_head-1`` (head 0) are rotated.
- The time embedding is ``sin/cos(1000 * t * freq)``; the final norm chunks into (scale, shift).
- ``streaming=True`` is block-causal attention: query i sees key j iff
  ``j < (i // static_chunk_size + 1) * static_chunk_size``.

Attention is split into separable steps (``Attention.project`` -> :func:`apply_rotary` with
the cos/sin of explicit positions (``RotaryEmbedding.rope``) -> :func:`attend` ->
``Attention.to_out``), so an incremental per-block step can keep K/V of finished blocks as
plain tensors and reuse everything else.

``DiT.forward_chunk`` is that step: with block-causal attention a finished 50-frame block
never changes, so a chunk of new frames (whole blocks, or the final partial one) is computed
from the new frames alone plus, per layer, the roped K and the V of every earlier frame and
the last ``kernel - 1`` inputs of each causal position conv. Cache in, new cache pieces out,
all plain tensors (no module state), so the step exports to ONNX as it is.

``DiT.forward_segments`` is the same step for several streams at once (and the form streams
run): the new frames of every :class:`Segment` are packed along time, so every Linear sees
``sum(frames)`` rows per CFG row (one GEMM for k requests' chunks, not k); only the position
convs and attention run per segment, each over its own cache. A segment whose cache buffer has
room writes its new K/V into it and attends over views (no copy of the past); a block-aligned
chunk of one block attends without a mask (all keys visible), so SDPA takes its fast path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.config import DiTConfig

TIME_FREQ_DIM = 256  # sinusoidal time features before the time MLP
POS_CONV_KERNEL = 31
POS_CONV_GROUPS = 16
ROPE_BASE = 10000.0
NORM_EPS = 1e-6


def rope_inv_freq(dim_head: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(dim_head//2,) ``1 / 10000^(arange(0, d, 2) / d)``, as x_transformers computes it."""
    return 1.0 / (ROPE_BASE ** (torch.arange(0, dim_head, 2, device=device).float() / dim_head))


def block_causal_mask(size: int, block: int, device: torch.device | None = None) -> torch.Tensor:
    """(size, size) bool: query i sees key j iff ``j < (i // block + 1) * block``."""
    pos = torch.arange(size, device=device)
    block_end = (torch.div(pos, block, rounding_mode="trunc") + 1) * block
    return pos.unsqueeze(0) < block_end.unsqueeze(1)


def chunk_attention_mask(
    start: int | torch.Tensor, n_new: int, n_past: int, block: int
) -> torch.Tensor:
    """(n_new, n_past + n_new) bool mask for new queries at absolute frames
    ``start .. start + n_new - 1``: every past key is visible, new keys block-causally (by
    absolute position, as :func:`block_causal_mask` rows ``start..`` restricted to them)."""
    pos = start + torch.arange(n_new)  # (n_new,) absolute frames of the new queries/keys
    block_end = (torch.div(pos, block, rounding_mode="floor") + 1) * block
    new = pos.unsqueeze(0) < block_end.unsqueeze(1)  # (n_new, n_new)
    past = torch.ones(n_new, n_past, dtype=torch.bool)
    return torch.cat((past, new), dim=1)


@dataclass
class Segment:
    """One stream's new frames in a packed :meth:`DiT.forward_segments` call: absolute frames
    ``start .. start + frames - 1`` of its utterance.

    ``k`` / ``v`` (depth, 2, H, cap, Dh) hold the roped K and the V of its ``start`` earlier
    frames. With ``in_place`` (cap >= start + frames) the new K/V are written into them at
    ``start`` and attention reads views; otherwise (cap == start, the functional form that
    exports) the new K/V are concatenated. ``conv_ctx`` (2, 2, D, k-1) is the position convs'
    context before the segment, or None to continue from the previous segment of the same
    call (one stream's frames split in two, e.g. a voice's prompt-only blocks and its first
    hop). After the call ``conv_ctx_out`` holds the context after the segment."""

    start: int
    frames: int
    spks: torch.Tensor  # (2, spk)
    k: torch.Tensor
    v: torch.Tensor
    conv_ctx: torch.Tensor | None
    in_place: bool = True
    conv_ctx_out: torch.Tensor | None = None

    def mask(self, block: int) -> torch.Tensor | None:
        """(frames, start + frames) bool, or None when every key is visible: the segment is
        at most one block and starts on a block boundary (past frames are all visible)."""
        if isinstance(self.start, int) and self.start % block == 0 and self.frames <= block:
            return None
        n_past = self.start if self.in_place else self.k.shape[3]  # an int when exporting too
        return chunk_attention_mask(self.start, self.frames, n_past, block)


def kv_extend(cache: torch.Tensor, new: torch.Tensor, start: int, in_place: bool) -> torch.Tensor:
    """cache (B, H, cap, Dh) holding ``start`` frames, new (B, H, Tn, Dh) -> (B, H, start+Tn,
    Dh): written into the cache (a view: the past is not copied), or concatenated."""
    if not in_place:
        return torch.cat((cache, new), dim=2)
    cache[:, :, start : start + new.shape[2]] = new
    return cache[:, :, : start + new.shape[2]]


def attention_mask(mask: torch.Tensor, block: int) -> torch.Tensor | None:
    """Boolean SDPA mask from the padding mask (B, 1, T), as upstream ``add_optional_chunk_mask``
    with all left chunks (``block=0``: full attention). Without padding this is None (full) or
    a broadcast (1, 1, T, T) block-causal mask, which SDPA computes bit-identically to
    upstream's (B, 1, T, T) copies; with padding it is upstream's (B, 1, T, T)."""
    valid = mask.bool()  # (B, 1, T)
    T = valid.shape[-1]
    if bool(valid.all()):
        return None if block <= 0 else block_causal_mask(T, block, valid.device)[None, None]
    if block > 0:
        m = valid & block_causal_mask(T, block, valid.device).unsqueeze(0)  # (B, T, T)
    else:
        m = valid  # (B, 1, T)
    empty = m.sum(dim=-1) == 0  # upstream lets a query that sees nothing see everything
    if empty.any():
        m = m.clone()
        m[empty] = True
    if block <= 0:
        m = m.repeat(1, T, 1)  # (B, T, T)
    return m.unsqueeze(1)  # (B, 1, T, T)


def sinusoidal_time(t: torch.Tensor, dim: int = TIME_FREQ_DIM, scale: float = 1000) -> torch.Tensor:
    """(B,) -> (B, dim): ``cat(sin, cos)(scale * t * exp(-ln(1e4) * i / (dim/2 - 1)))``."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, device=t.device).float() * -step)  # (half,)
    arg = scale * t.unsqueeze(1) * freq.unsqueeze(0)  # (B, half)
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        return self.time_mlp(sinusoidal_time(t).to(t.dtype))


class CausalConvPositionEmbedding(nn.Module):
    """Two left-padded grouped convs with Mish; depends on the last 2*(k-1) frames only."""

    def __init__(self, dim: int, kernel_size: int = POS_CONV_KERNEL, groups: int = POS_CONV_GROUPS):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        h = x.permute(0, 2, 1)  # (B, D, T)
        h = self.conv1(F.pad(h, (self.kernel_size - 1, 0)))
        h = self.conv2(F.pad(h, (self.kernel_size - 1, 0)))
        return h.permute(0, 2, 1)

    def forward_chunk(
        self, x: torch.Tensor, ctx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, Tn, D) new frames; ctx (2, B, D, k-1): the k-1 frames before x at the input
        of conv1 and of conv2 (zeros at the utterance start, like the left padding)
        -> (B, Tn, D), the next ctx."""
        keep = self.kernel_size - 1
        h = torch.cat((ctx[0], x.permute(0, 2, 1)), dim=2)  # (B, D, k-1+Tn)
        ctx1 = h[:, :, -keep:]
        h = torch.cat((ctx[1], self.conv1(h)), dim=2)  # (B, D, k-1+Tn)
        ctx2 = h[:, :, -keep:]
        h = self.conv2(h)  # (B, D, Tn)
        return h.permute(0, 2, 1), torch.stack((ctx1, ctx2))


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, mu_dim: int, spk_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * mel_dim + mu_dim + spk_dim, dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor
    ) -> torch.Tensor:
        # x, cond: (B, T, mel); mu: (B, T, mu); spks: (B, spk) -> (B, T, D)
        spks = spks.unsqueeze(1).expand(-1, x.shape[1], -1)  # (B, T, spk)
        h = self.proj(torch.cat((x, cond, mu, spks), dim=-1))
        return self.conv_pos_embed(h) + h

    def forward_segments(
        self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor, segs: list[Segment]
    ) -> torch.Tensor:
        """x, cond (B, sum Tn, mel); mu (B, sum Tn, mu): the segments' frames packed along time
        -> (B, sum Tn, D). Sets each segment's ``conv_ctx_out``."""
        spks = torch.cat([s.spks.unsqueeze(1).expand(-1, s.frames, -1) for s in segs], dim=1)
        h = self.proj(torch.cat((x, cond, mu, spks), dim=-1))  # (B, sum Tn, D)
        out, o, ctx = [], 0, None
        for s in segs:
            ctx = s.conv_ctx if s.conv_ctx is not None else ctx
            pos, ctx = self.conv_pos_embed.forward_chunk(h[:, o : o + s.frames], ctx)
            s.conv_ctx_out = ctx
            out.append(pos)
            o += s.frames
        return (out[0] if len(out) == 1 else torch.cat(out, dim=1)) + h


class RotaryEmbedding(nn.Module):
    """x_transformers ``RotaryEmbedding(dim_head)``: the ``inv_freq`` buffer is in flow.pt."""

    def __init__(self, dim_head: int):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(dim_head))  # (dim_head//2,)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) integer positions -> (T, dim_head) angles, each frequency repeated for its
        interleaved pair: [p*f0, p*f0, p*f1, p*f1, ...]."""
        freqs = positions.to(self.inv_freq.dtype).unsqueeze(1) * self.inv_freq  # (T, dim_head/2)
        return torch.stack((freqs, freqs), dim=-1).flatten(-2)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) positions -> (cos, sin) of their angles, each (T, dim_head): computed once
        per call, shared by every layer."""
        angles = self.angles(positions)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the first ``r`` channels of x (B, T, C) by the angles whose (cos, sin) are
    ``rope`` (each (T, r)) in interleaved pairs: y[2i] = x[2i] cos - x[2i+1] sin,
    y[2i+1] = x[2i+1] cos + x[2i] sin."""
    cos, sin = rope
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    pairs = rot.unflatten(-1, (r // 2, 2))  # (B, T, r/2, 2)
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (B, T, r)
    rot = rot * cos + swapped * sin
    return torch.cat((rot, rest), dim=-1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """q (B, Tq, H*Dh), k/v (B, Tk, H*Dh), bool mask (B|1, 1, Tq, Tk) or None (all visible)
    -> (B, Tq, H*Dh)."""
    B = q.shape[0]
    dh = k.shape[-1] // heads
    q = q.view(B, -1, heads, dh).transpose(1, 2)  # (B, H, Tq, Dh)
    k = k.view(B, -1, heads, dh).transpose(1, 2)  # (B, H, Tk, Dh)
    v = v.view(B, -1, heads, dh).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Tq, Dh)
    return out.transpose(1, 2).reshape(B, -1, heads * dh)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # key "to_out.0" (1 was dropout)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """x (B, T, D), rope (cos, sin) (T, dim_head) -> roped q, roped k, v, each (B, T, H*Dh)."""
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return apply_rotary(q, rope), apply_rotary(k, rope), v

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        q, k, v = self.project(x, rope)
        out = self.to_out[0](attend(q, k, v, self.heads, mask))  # (B, T, D)
        if mask is None:
            return out
        # upstream zeroes rows by the last query's mask row (a no-op for unpadded input)
        return out.masked_fill(~mask[:, 0, -1].unsqueeze(-1), 0.0)

    def forward_segments(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        segs: list[Segment],
        layer: int,
        block: int,
        kv_out: list | None = None,
    ) -> torch.Tensor:
        """x (B, sum Tn, D) the segments' new frames packed along time, rope (cos, sin)
        (sum Tn, dim_head) -> (B, sum Tn, D). Each segment attends over its own
        layer-``layer`` cache extended by its new K/V (appended to ``kv_out`` as
        (B, H, sum Tn, Dh) when given)."""
        B, T, _ = x.shape
        q, k, v = (a.view(B, T, self.heads, -1).transpose(1, 2) for a in self.project(x, rope))
        if kv_out is not None:  # (B, H, sum Tn, Dh)
            kv_out.append((k, v))
        outs, o = [], 0
        for s in segs:
            n = s.frames
            k_all = kv_extend(s.k[layer], k[:, :, o : o + n], s.start, s.in_place)
            v_all = kv_extend(s.v[layer], v[:, :, o : o + n], s.start, s.in_place)
            outs.append(F.scaled_dot_product_attention(
                q[:, :, o : o + n], k_all, v_all, attn_mask=s.mask(block)
            ))  # (B, H, n, Dh)  # fmt: skip
            o += n
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, H, sum Tn, Dh)
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        inner = dim * mult
        # keys ff.0.0 / ff.2; index 1 was dropout (identity in eval)
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
            nn.Identity(),
            nn.Linear(inner, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: LayerNorm(x) (no affine, eps 1e-6) * (1 + scale) + shift; x (B, T, D), rest (B, D)."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """SiLU(t) -> Linear(D, 6D) -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
    gate_mlp (in that order); norm is LayerNorm without affine, eps 1e-6."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (B, D) -> 6 x (B, D)
        return torch.chunk(self.linear(F.silu(t)), 6, dim=1)


class AdaLayerNormZeroFinal(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale, shift = torch.chunk(self.linear(F.silu(t)), 2, dim=1)  # (B, D) each: scale first
        return modulate(x, shift, scale)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # x (B, T, D), t (B, D), rope (cos, sin) (T, dim_head), mask (B|1, 1, T, T) or None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(t)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(x, shift_msa, scale_msa), rope, mask)
        h = modulate(x, shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.ff(h)

    def forward_segments(
        self,
        x: torch.Tensor,
        mod: tuple[torch.Tensor, ...],
        rope: tuple[torch.Tensor, torch.Tensor],
        segs: list[Segment],
        layer: int,
        block: int,
        kv_out: list | None = None,
    ) -> torch.Tensor:
        # x (B, sum Tn, D), mod: attn_norm(t) (6 x (B, D)), rope (cos, sin) (sum Tn, dim_head)
        # -> x (B, sum Tn, D); the segments' caches are extended (see Attention)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = modulate(x, shift_msa, scale_msa)
        attn = self.attn.forward_segments(h, rope, segs, layer, block, kv_out)
        x = x + gate_msa.unsqueeze(1) * attn
        h = modulate(x, shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.ff(h)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding(cfg.dim)
        self.input_embed = InputEmbedding(cfg.mel_dim, cfg.mu_dim, cfg.spk_dim, cfg.dim)
        self.rotary_embed = RotaryEmbedding(cfg.dim_head)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(cfg.dim, cfg.heads, cfg.dim_head, cfg.ff_mult) for _ in range(cfg.depth)
        )
        self.norm_out = AdaLayerNormZeroFinal(cfg.dim)
        self._mod_memo: dict = {}  # see modulations()
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_dim)
        # bf16 (worker.precision): the Linear weights are stored in bf16 and both forward
        # paths run under CPU autocast; the residual stream, norms and output stay fp32
        self.autocast_dtype: torch.dtype | None = None

    def _autocast(self):
        return torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)  # fmt: skip

    @property
    def cache_dtype(self) -> torch.dtype:
        """dtype of a stream's K/V cache: that of the attention projections' weights."""
        return self.transformer_blocks[0].attn.to_k.weight.dtype

    def embed(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x/mu/cond (B, 80, T), t (B,) or (), spks (B, 80) -> h (B, T, D), t_emb (B, D)."""
        if t.ndim == 0:
            t = t.repeat(x.shape[0])
        t_emb = self.time_embed(t)
        h = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)
        return h, t_emb

    def head(self, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> velocity (B, 80, T)."""
        return self.proj_out(self.norm_out(h, t_emb)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        streaming: bool = False,
    ) -> torch.Tensor:
        # x, mu, cond: (B, 80, T); mask: (B, 1, T); t: (B,); spks: (B, 80) -> (B, 80, T)
        with self._autocast():
            h, t_emb = self.embed(x, mu, t, spks, cond)
            T = h.shape[1]
            rope = self.rotary_embed.rope(torch.arange(T, device=h.device))  # 2 x (T, dim_head)
            attn_mask = attention_mask(mask, self.cfg.static_chunk_size if streaming else 0)
            for block in self.transformer_blocks:
                h = block(h, t_emb, rope, attn_mask)
            return self.head(h, t_emb).to(x.dtype)

    def forward_segments(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor,
        segs: list[Segment],
        kv_out: list | None = None,
    ) -> torch.Tensor:
        """One incremental step of the block-causal (``streaming=True``) estimator for the
        segments' new frames, packed along time.

        x, mu, cond (B, 80, sum Tn): the segments' frames in order; t (B,) or ().
        -> velocity (B, 80, sum Tn). Each segment's cache is extended (:class:`Segment`) and
        its ``conv_ctx_out`` set; with ``kv_out`` the new K/V of every layer are appended to it.
        Per segment this equals ``forward(..., streaming=True)`` over its utterance's frames,
        restricted to the new ones."""
        B = x.shape[0]
        if t.ndim == 0:
            t = t.repeat(B)
        with self._autocast():
            t_emb, mods, final_mod = self.modulations(t)
            h = self.input_embed.forward_segments(
                x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), segs
            )  # (B, sum Tn, D)
            pos = torch.cat([s.start + torch.arange(s.frames) for s in segs])  # (sum Tn,)
            rope = self.rotary_embed.rope(pos)  # 2 x (sum Tn, dim_head)
            block = self.cfg.static_chunk_size
            for i, blk in enumerate(self.transformer_blocks):
                h = blk.forward_segments(h, mods[i], rope, segs, i, block, kv_out)
            scale, shift = final_mod
            return self.proj_out(modulate(h, shift, scale)).transpose(1, 2).to(x.dtype)

    def forward_chunk(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        cond: torch.Tensor,
        spks: torch.Tensor,
        t: torch.Tensor,
        start: int | torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        conv_ctx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The functional form of one stream's step (caches in, new pieces out: what exports).

        x, mu, cond (B, 80, Tn): the new frames only, absolute frames ``start .. start+Tn-1``
            (``start`` a block boundary; Tn whole blocks, or the utterance's last partial one)
        spks (B, 80), t (B,) or ()
        start: absolute index of the first new frame (prompt included) = frames in the cache
        k_cache, v_cache (depth, B, H, start, Dh): roped K and V of all earlier frames
        conv_ctx (2, B, D, 30): the last 30 inputs of the two position convs (zeros at start 0)
        -> velocity (B, 80, Tn), k_new / v_new (depth, B, H, Tn, Dh) to append to the caches,
           the next conv_ctx (2, B, D, 30).
        """
        seg = Segment(start, x.shape[2], spks, k_cache, v_cache, conv_ctx, in_place=False)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        out = self.forward_segments(x, mu, cond, t, [seg], kv_out=kv)
        k_new = torch.stack([k for k, _ in kv])
        v_new = torch.stack([v for _, v in kv])
        return out, k_new, v_new, seg.conv_ctx_out

    def modulations(self, t: torch.Tensor):
        """Time embedding and every AdaLN modulation for the times ``t`` (B,).

        They depend on ``t`` alone, and a stream uses the same 10 Euler times for every chunk
        and request, so they are memoized (keyed by the time values, dtype and the weights'
        storage): each chunk skips 22 Linear(D, 6D) weight reads per step (~8% of a chunk at
        official dims). Same ops as :meth:`forward`, so results are bit-identical.
        -> t_emb (B, D), [6 x (B, D)] per block, (scale, shift) of the final norm."""
        memo = torch.is_inference_mode_enabled() and not torch.jit.is_tracing()
        w = self.norm_out.linear.weight
        key = (t.dtype, tuple(t.tolist()), w.dtype, w.data_ptr()) if memo else None
        hit = self._mod_memo.get(key) if memo else None
        if hit is None:
            t_emb = self.time_embed(t)
            mods = [block.attn_norm(t_emb) for block in self.transformer_blocks]
            final = tuple(torch.chunk(self.norm_out.linear(F.silu(t_emb)), 2, dim=1))
            hit = (t_emb, mods, final)
            if memo:  # only inference tensors are kept (export/tracing recomputes)
                if len(self._mod_memo) >= 64:
                    self._mod_memo.clear()
                self._mod_memo[key] = hit
        return hit
