"""Upstream's streaming schedule (``CosyVoice2Model.tts`` + ``CosyVoice3Model.token2wav``).

This is the *recompute* strategy: each chunk re-runs the flow over every token so far (prompt
included) and HiFT over the whole mel so far, then keeps only the new part — O(n²) in the
utterance. It is kept as the reference the incremental engine is checked and benchmarked
against. Hop state is per call (upstream keeps it on the instance and never resets it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from worker.flow import Flow
from worker.hift import HiFTGenerator


@dataclass(frozen=True)
class Chunk:
    token_len: int  # tokens given to the flow (prefix of the utterance)
    token_offset: int  # first token whose mel is kept
    hop: int | None  # tokens advanced after this chunk (None: final)
    finalize: bool


def upstream_schedule(
    prompt_len: int,
    n_tokens: int,
    hop_len: int = 25,
    max_hop_len: int = 100,
    scale: int = 2,
    lookahead: int = 3,
) -> list[Chunk]:
    """Chunks for an utterance whose ``n_tokens`` are all available (LLM finished)."""
    pad = math.ceil(prompt_len / hop_len) * hop_len - prompt_len
    chunks, offset, base = [], 0, hop_len
    while True:
        this_hop = base + pad if offset == 0 else base
        if n_tokens - offset < this_hop + lookahead:
            break
        chunks.append(Chunk(offset + this_hop + lookahead, offset, this_hop, False))
        offset += this_hop
        base = min(max_hop_len, base * scale)
    chunks.append(Chunk(n_tokens, offset, None, True))
    return chunks


@torch.inference_mode()
def recompute_stream(
    flow: Flow,
    hift: HiFTGenerator,
    token: Tensor,  # (1, N)
    prompt_token: Tensor,  # (1, P)
    prompt_feat: Tensor,  # (1, 2P, 80)
    embedding: Tensor,  # (1, 192)
    hop_len: int = 25,
) -> Iterator[tuple[Chunk, Tensor, Tensor]]:
    """Yield ``(chunk, mel_kept (1,80,F), audio (1,S))`` per chunk, as upstream streams."""
    ratio = 2
    mel_cache = None
    speech_offset = 0
    for ch in upstream_schedule(prompt_token.shape[1], token.shape[1], hop_len):
        mel = flow.inference(
            token[:, : ch.token_len],
            prompt_token,
            prompt_feat,
            embedding,
            streaming=not ch.finalize,
            finalize=ch.finalize,
        )
        mel = mel[:, :, ratio * ch.token_offset :]
        mel_cache = mel if mel_cache is None else torch.cat([mel_cache, mel], dim=2)
        audio, _ = hift.inference(mel_cache, finalize=ch.finalize)
        audio = audio[:, speech_offset:]
        speech_offset += audio.shape[1]
        yield ch, mel, audio
