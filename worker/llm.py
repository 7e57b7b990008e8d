"""The CosyVoice3 LLM: a Qwen2 decoder with a static KV cache and the speech head.

gpt-fast style: plain modules, an explicit static cache (:class:`LLMCache`: one
:class:`KVCache` per layer with preallocated buffers, plus the RoPE tables) sized once,
``forward(embeds, input_pos, slots, cache=...)`` runs prefill (T > 1) or one decode step
(T == 1) for several sequences at once. Each sequence owns a cache *slot* (a row of the
buffers), so concurrent requests at different positions decode in one batched step.

The cache is an object of its own, owned by whoever decodes (the LLM stage core owns one;
``setup_caches`` gives the model a default one for single-user checks such as ``verify``), so
two users of the same weights never share or re-allocate each other's cache. The decode loop
and the length policy live in :mod:`worker.stages.llm`.

``forward`` is compile-friendly when the caller passes ``kv_len`` (a host int it knows from its
own positions): no tensor is read back to the host, the mask is a slice of the cache's fixed
position table, and every shape is a function of (B, T, kv_len) only, so ``torch.compile`` with
dynamic shapes traces a decoder block once per shape class, never per position or length
(:mod:`worker.compile`).
Precision transforms (bf16 / int8 ...) live in :mod:`worker.precision`; the cache takes the
model's activation dtype (:attr:`CosyVoice3LM.dtype`).

The Qwen2 text ``lm_head`` (151,936 x 896) is never loaded or computed: only the speech head
(``llm_decoder``, 6761 logits) is. Checkpoint keys ``llm.model.model.*`` map onto this module
1:1 minus the prefix; ``llm.model.lm_head.weight`` stays untouched in the mmap.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.checkpoint import assign_state_dict, check_state_dict, load_state_dict_file
from worker.config import LLMConfig

_QWEN_PREFIX = "llm.model.model."
_LM_HEAD = "llm.model.lm_head.weight"


SKINNY_ROWS = 16  # batched decode: at most this many rows per matmul


class Linear(nn.Linear):
    """``nn.Linear`` whose batched-decode matmuls (2..16 rows) run as ``W @ x.T``: on CPU that
    picks a weight-streaming kernel (~3x the GB/s of ``F.linear``'s small-M GEMM measured on
    AVX-512), so B concurrent sequences cost about one weight read. One row (single-sequence
    decode, what upstream runs) and prefill keep ``F.linear``, bit for bit. Only fp32: with
    bf16 weights ``F.linear`` is the faster of the two (4 rows x 24 MLP matrices: 29 vs 42 ms
    on AVX512_BF16 without AMX)."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if 1 < rows <= SKINNY_ROWS and x.dtype == self.weight.dtype == torch.float32:
            x2 = x.reshape(rows, x.shape[-1]).t()  # (in, rows)
            if self.bias is None:
                y = self.weight @ x2
            else:
                y = torch.addmm(self.bias[:, None], self.weight, x2)
            return y.t().contiguous().reshape(*x.shape[:-1], self.weight.shape[0])  # (.., out)
        return F.linear(x, self.weight, self.bias)


def _embedding(n: int, dim: int) -> nn.Embedding:
    """An embedding whose weight is left uninitialized (it is always loaded): skips ``normal_``,
    which is very slow on the meta device."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


class KVCache(nn.Module):
    def __init__(self, max_batch: int, n_kv: int, max_seq: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        # One spare position: no kv_len equals the buffer length, so a slice's contiguity never
        # depends on kv_len (a compiled graph would specialize on it).
        shape = (max_batch, n_kv, max_seq + 1, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(
        self, input_pos: Tensor, k: Tensor, v: Tensor, slots: Tensor | None, kv_len: int
    ) -> tuple[Tensor, Tensor]:
        # input_pos: (B, T); k, v: (B, n_kv, T, hd) -> caches (B, n_kv, kv_len, hd)
        b = k.shape[0]
        rows = torch.arange(b) if slots is None else slots
        self.k_cache[rows[:, None], :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[rows[:, None], :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        if slots is None:
            return self.k_cache[:b, :, :kv_len], self.v_cache[:b, :, :kv_len]
        return self.k_cache[slots, :, :kv_len], self.v_cache[slots, :, :kv_len]


class LLMCache:
    """The static decode state of one user of the weights: per-layer K/V buffers of
    ``max_batch`` slots x ``max_seq`` positions, and the RoPE tables up to ``max_seq``."""

    def __init__(self, cfg: LLMConfig, max_batch: int, max_seq: int, dtype: torch.dtype):
        q = cfg.qwen
        self.max_batch, self.max_seq = max_batch, max_seq
        self.layers = [
            KVCache(max_batch, q.num_kv_heads, max_seq, q.head_dim, dtype)
            for _ in range(q.num_layers)
        ]
        hd = q.head_dim
        inv_freq = 1.0 / (q.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)  # (S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()
        self.positions = torch.arange(max_seq)  # (S,): masks are slices of it

    @property
    def nbytes(self) -> int:
        return sum(c.k_cache.nbytes + c.v_cache.nbytes for c in self.layers)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.q_proj = Linear(dim, n_heads * head_dim, bias=True)
        self.k_proj = Linear(dim, n_kv * head_dim, bias=True)
        self.v_proj = Linear(dim, n_kv * head_dim, bias=True)
        self.o_proj = Linear(n_heads * head_dim, dim, bias=False)

    def forward(
        self,
        x: Tensor,  # (B, T, D)
        cos: Tensor,  # (B, 1, T, hd)
        sin: Tensor,
        mask: Tensor,  # (B, 1, T, S) bool
        input_pos: Tensor,  # (B, T)
        slots: Tensor | None,
        kv_len: int,
        kv_cache: KVCache,
    ) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = kv_cache.update(input_pos, k, v, slots, kv_len)  # (B, n_kv, S, hd)
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=self.n_heads != self.n_kv
        )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        q = cfg.qwen
        self.self_attn = Attention(q.hidden_size, q.num_heads, q.num_kv_heads, q.head_dim)
        self.mlp = FeedForward(q.hidden_size, q.intermediate_size)
        self.input_layernorm = RMSNorm(q.hidden_size, q.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(q.hidden_size, q.rms_norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, slots, kv_len, kv_cache) -> Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, cos, sin, mask, input_pos, slots, kv_len, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CosyVoice3LM(nn.Module):
    """Qwen2 body + CosyVoice3 speech head. Hidden states come out after the final RMSNorm."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        q = cfg.qwen
        self.cfg = cfg
        self.embed_tokens = _embedding(q.vocab_size, q.hidden_size)  # text ids
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(q.num_layers))
        self.norm = RMSNorm(q.hidden_size, q.rms_norm_eps)
        self.speech_embedding = _embedding(cfg.num_speech_logits, q.hidden_size)
        self.llm_decoder = Linear(q.hidden_size, cfg.num_speech_logits, bias=False)
        self.cache: LLMCache | None = None

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (hidden states, K/V): the embeddings' dtype, which every precision
        transform keeps in step with the activations (:mod:`worker.precision`)."""
        return self.speech_embedding.weight.dtype

    def new_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None) -> LLMCache:
        """A static cache of ``max_batch`` slots x ``max_seq`` positions for this model."""
        return LLMCache(self.cfg, max_batch, max_seq, dtype or self.dtype)

    def setup_caches(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None) -> None:
        """Give the model a default cache (used when ``forward`` gets no ``cache``): for
        single-user checks. Decoding services own their cache (:meth:`new_cache`)."""
        self.cache = self.new_cache(max_batch, max_seq, dtype)

    def embed_text(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)

    def embed_speech(self, ids: Tensor) -> Tensor:
        return self.speech_embedding(ids)

    def build_lm_input(
        self,
        text_ids: Tensor,
        prompt_text_ids: Tensor | None = None,
        prompt_speech: Tensor | None = None,
    ) -> Tensor:
        """(1, L, D) = [sos, embed(prompt_text ++ text), task_id, speech_embed(prompt_speech)]."""
        c = self.cfg
        ids = text_ids if prompt_text_ids is None else torch.cat([prompt_text_ids, text_ids], dim=1)
        parts = [
            self.speech_embedding.weight[c.sos].reshape(1, 1, -1),
            self.embed_tokens(ids.long()),
            self.speech_embedding.weight[c.task_id].reshape(1, 1, -1),
        ]
        if prompt_speech is not None and prompt_speech.numel():
            parts.append(self.speech_embedding(prompt_speech.long()))
        return torch.cat(parts, dim=1)

    def forward(
        self,
        embeds: Tensor,  # (B, T, D)
        input_pos: Tensor,  # (B, T) absolute positions
        slots: Tensor | None = None,  # (B,) cache rows; None = rows 0..B-1
        kv_len: int | None = None,  # attend over cache[:kv_len] (> every position in input_pos)
        cache: LLMCache | None = None,  # default: the one setup_caches() made
    ) -> Tensor:
        """Hidden states after the final norm, (B, T, D). Pass ``kv_len`` to keep the step free
        of host syncs (compiled code must); without it, it is read from ``input_pos``."""
        cache = cache or self.cache
        if cache is None:
            raise RuntimeError("no KV cache: pass cache=model.new_cache(...) or setup_caches()")
        if kv_len is None:
            kv_len = int(input_pos.max()) + 1  # host sync: eager convenience only
        if kv_len > cache.max_seq:
            raise ValueError(f"sequence of {kv_len} positions exceeds the cache ({cache.max_seq})")
        cos = cache.rope_cos[input_pos].unsqueeze(1).to(embeds.dtype)  # (B, 1, T, hd)
        sin = cache.rope_sin[input_pos].unsqueeze(1).to(embeds.dtype)
        mask = cache.positions[:kv_len] <= input_pos[:, :, None]  # (B, T, S)
        mask = mask.unsqueeze(1)  # (B, 1, T, S)
        x = embeds
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            x = layer(x, cos, sin, mask, input_pos, slots, kv_len, kv)
        return self.norm(x)

    def logp(self, hidden: Tensor) -> Tensor:
        """Speech-token log-probs (float32) from hidden states (..., D) -> (..., 6761)."""
        return self.llm_decoder(hidden).float().log_softmax(dim=-1)


def checkpoint_shapes(cfg: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released ``llm.pt`` for this config."""
    q = cfg.qwen
    d, hd = q.hidden_size, q.head_dim
    p = _QWEN_PREFIX
    shapes: dict[str, tuple[int, ...]] = {p + "embed_tokens.weight": (q.vocab_size, d)}
    for i in range(q.num_layers):
        lp = f"{p}layers.{i}."
        shapes.update(
            {
                lp + "self_attn.q_proj.weight": (q.num_heads * hd, d),
                lp + "self_attn.q_proj.bias": (q.num_heads * hd,),
                lp + "self_attn.k_proj.weight": (q.num_kv_heads * hd, d),
                lp + "self_attn.k_proj.bias": (q.num_kv_heads * hd,),
                lp + "self_attn.v_proj.weight": (q.num_kv_heads * hd, d),
                lp + "self_attn.v_proj.bias": (q.num_kv_heads * hd,),
                lp + "self_attn.o_proj.weight": (d, q.num_heads * hd),
                lp + "mlp.gate_proj.weight": (q.intermediate_size, d),
                lp + "mlp.up_proj.weight": (q.intermediate_size, d),
                lp + "mlp.down_proj.weight": (d, q.intermediate_size),
                lp + "input_layernorm.weight": (d,),
                lp + "post_attention_layernorm.weight": (d,),
            }
        )
    shapes[p + "norm.weight"] = (d,)
    shapes[_LM_HEAD] = (q.vocab_size, d)
    shapes["speech_embedding.weight"] = (cfg.num_speech_logits, d)
    shapes["llm_decoder.weight"] = (cfg.num_speech_logits, d)
    return shapes


def convert_checkpoint(
    sd: dict[str, Tensor], cfg: LLMConfig, path: str | Path = "llm.pt"
) -> dict[str, Tensor]:
    """Validate a released ``llm.pt`` and map it onto :class:`CosyVoice3LM` keys (no copies).
    The tied text ``lm_head`` may be absent; it is dropped either way."""
    expected = checkpoint_shapes(cfg)
    if _LM_HEAD not in sd:
        expected.pop(_LM_HEAD)
    check_state_dict(sd, expected, path)
    out = {}
    for k, v in sd.items():
        if k == _LM_HEAD:
            continue
        out[k[len(_QWEN_PREFIX) :] if k.startswith(_QWEN_PREFIX) else k] = v
    return out


def load_llm(path: str | Path, cfg: LLMConfig) -> CosyVoice3LM:
    sd = convert_checkpoint(load_state_dict_file(path), cfg, path)
    with torch.device("meta"):
        model = CosyVoice3LM(cfg)
    assign_state_dict(model, sd, path)
    return model.eval()
