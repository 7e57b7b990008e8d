"""Upstream's streaming token2wav strategy, reproduced with our kernels: the reference.

Upstream (``CosyVoice3Model.token2wav`` in a streaming loop) re-runs the flow over *all*
tokens known so far for every chunk and keeps the new frames, and re-runs HiFT over *all* mel
so far and keeps the new samples; its hops double (25 + pad, 50, 100, 100, ...), and its
final chunk runs the DiT with full attention. Cost grows with the square of the length. It
is kept for two reasons: ``worker.verify`` checks it against upstream's golden chunks, and
the benchmark's ``recompute`` strategy times it as the stand-in for upstream.

:class:`RecomputeFlow` and :class:`RecomputeHiFT` have the interface of
:class:`worker.flow_stream.FlowStream` / :class:`worker.hift_stream.HiFTStream` (``feed``,
``ready``, ``next_chunk`` / ``push``), so the stage cores run either strategy per request.
:func:`reference_stream` runs the whole thing for a known token sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from worker.flow import Flow
from worker.flow_stream import first_hop
from worker.hift import HiFTGenerator

MAX_HOP = 100  # upstream's cap on the doubling hop


@dataclass(frozen=True)
class ChunkInfo:
    """What one reference chunk ran on (checked against upstream's schedule)."""

    token_len: int  # tokens (after the prompt) given to the flow, lookahead included
    token_offset: int  # first token whose audio this chunk produced
    hop: int | None  # tokens advanced (None: the final chunk)
    finalize: bool
    mel: Tensor  # (1, 80, F) mel of the new frames


class RecomputeFlow:
    """Upstream's flow side: the flow over all tokens per chunk, new frames kept."""

    def __init__(
        self,
        flow: Flow,
        prompt_token: Tensor,  # (1, P) int
        prompt_feat: Tensor,  # (1, 2P, 80)
        embedding: Tensor,  # (1, 192)
        hop_tokens: int = 25,
        n_steps: int | None = None,
    ):
        self.flow, self.n_steps = flow, n_steps
        self.prompt_token, self.prompt_feat, self.embedding = prompt_token, prompt_feat, embedding
        self.ratio = flow.cfg.token_mel_ratio
        self.lookahead = flow.cfg.pre_lookahead_len
        self.P = prompt_token.shape[1]
        self.hop = hop_tokens
        self.tokens: list[int] = []  # after the prompt
        self.offset = 0  # tokens whose audio has been produced
        self.finished = False
        self.chunks: list[ChunkInfo] = []

    def feed(self, token: Tensor) -> None:
        self.tokens.extend(token.reshape(-1).tolist())

    def _need(self) -> int:
        hop = first_hop(self.P, self.hop) if self.offset == 0 else self.hop
        return self.offset + hop + self.lookahead

    def ready(self) -> bool:
        return not self.finished and len(self.tokens) >= self._need()

    def prefix_pending(self) -> bool:
        return False  # upstream recomputes everything per chunk: no prompt-only chunk

    @torch.inference_mode()
    def next_chunk(self, finalize: bool = False) -> tuple[Tensor, int] | None:
        if self.finished or not (finalize or self.ready()):
            return None
        need = self._need()
        final = len(self.tokens) < need
        token_len = len(self.tokens) if final else need
        end = token_len if final else need - self.lookahead
        mel = self.flow.inference(
            torch.tensor([self.tokens[:token_len]], dtype=torch.long),
            self.prompt_token, self.prompt_feat, self.embedding,
            streaming=not final, finalize=final, n_timesteps=self.n_steps,
        )[:, :, self.ratio * self.offset :]  # fmt: skip
        covered = end - self.offset
        hop = None if final else covered
        self.chunks.append(ChunkInfo(token_len, self.offset, hop, final, mel))
        self.offset = end
        self.hop = min(MAX_HOP, self.hop * 2)  # upstream's doubling hops
        self.finished = final
        return mel, covered


class RecomputeHiFT:
    """Upstream's HiFT side: HiFT over all mel so far per chunk, new samples kept."""

    MIN_FRAMES = 9  # upstream skips HiFT while fewer mel frames are known (non-final)

    def __init__(self, hift: HiFTGenerator):
        self.hift = hift
        self.mel: Tensor | None = None
        self.emitted = 0
        self.frames_in = 0

    @torch.inference_mode()
    def push(self, mel: Tensor, finalize: bool = False) -> Tensor:
        """mel (1, 80, F) -> audio (1, S) of the new samples."""
        self.mel = mel if self.mel is None else torch.cat([self.mel, mel], 2)
        self.frames_in = self.mel.shape[2]
        if self.frames_in == 0 or (not finalize and self.frames_in < self.MIN_FRAMES):
            return mel.new_zeros(1, 0)
        audio, _ = self.hift.inference(self.mel, finalize=finalize)
        audio = audio[:, self.emitted :]
        self.emitted += audio.shape[1]
        return audio


def reference_stream(
    flow: Flow,
    hift: HiFTGenerator,
    tokens: Tensor,  # (1, N) all speech tokens
    prompt_token: Tensor,
    prompt_feat: Tensor,
    embedding: Tensor,
    hop_tokens: int = 25,
) -> list[tuple[ChunkInfo, Tensor]]:
    """Upstream's streamed token2wav with every token known: [(chunk info, audio (1, S))]."""
    f = RecomputeFlow(flow, prompt_token, prompt_feat, embedding, hop_tokens)
    h = RecomputeHiFT(hift)
    f.feed(tokens)
    out = []
    while (chunk := f.next_chunk(finalize=True)) is not None:
        out.append((f.chunks[-1], h.push(chunk[0], finalize=f.finished)))
    return out
