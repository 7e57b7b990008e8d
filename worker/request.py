"""Typed request records shared by the frontend, the stage cores, the engine and the service."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


class RequestError(ValueError):
    """A request cannot be run as given (bad shapes, too long, bad settings)."""


@dataclass
class TTSRequest:
    """Model inputs for one utterance segment, as the frontend prepares them.

    ``text_ids`` are the tokens that count for min/max length (upstream excludes the zero-shot
    prompt text); ``prompt_text_ids`` precede them in the LLM input. ``llm_prompt_speech`` is
    empty for cross-lingual and instruct2; the flow prompt (``flow_prompt_speech`` +
    ``prompt_feat`` with 2 mel frames per token) is kept in every mode.
    """

    text_ids: Tensor  # (1, N) int
    embedding: Tensor  # (1, 192) speaker embedding
    prompt_text_ids: Tensor | None = None  # (1, M) int
    llm_prompt_speech: Tensor | None = None  # (1, P) int
    flow_prompt_speech: Tensor | None = None  # (1, P') int
    prompt_feat: Tensor | None = None  # (1, 2P', 80)
    request_id: str = ""
    hop_tokens: int | None = None  # streaming hop (multiple of 25); None: COSY_HOP_TOKENS
    seed: int | None = None
    forced_tokens: Tensor | None = None  # benchmarks: decode exactly these, EOS ignored
    # token2wav strategy: "incremental" (per-block caches, linear cost) or "recompute"
    # (upstream's O(n^2) strategy with the same kernels: worker/reference.py)
    strategy: str = "incremental"


STRATEGIES = ("incremental", "recompute")


def force_tokens(reqs: list[TTSRequest], n: int, seed: int | None, vocab: int) -> None:
    """Benchmarks: make every request decode exactly ``n`` speech tokens, drawn uniformly from
    ``vocab`` with ``seed`` (the protocol's ``forced_tokens``; the service bench draws the same
    ones in-process)."""
    import torch

    gen = torch.Generator().manual_seed(seed or 0)
    for r in reqs:
        r.forced_tokens = torch.randint(0, vocab, (n,), generator=gen)
