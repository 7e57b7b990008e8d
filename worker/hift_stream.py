"""Incremental HiFT for streaming: one :class:`HiFTStream` per request. The vocoder and its
step with all carried causal state are :mod:`worker.hift`; this is the bookkeeping around it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.hift import HiFTGenerator

Step = Callable[
    [torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], bool],
    tuple[torch.Tensor, tuple[torch.Tensor, ...]],
]


class HiFTStream:
    """Incremental HiFT for one utterance: ``push(mel chunk)`` -> the audio that is final so far.

    Built per request from a shared (read-only) ``HiFTGenerator``; nothing is shared between
    streams. After the last push (``finalize=True``) the concatenated output equals
    ``model.inference(whole mel, finalize=True)[0]``, and after a non-final push with M mel frames
    in total, (M - 8) * 480 samples have been emitted, as upstream's recompute-everything
    streaming emits.

    Each push is one ``step`` (default ``model.forward_chunk``; any callable with its signature,
    e.g. :class:`worker.ort_hift.OrtHiFTStep`) on the new frames, which carries every causal
    dependency in its state tensors, so a push costs what its new frames cost wherever it is in
    the utterance. This class only counts frames, hands each step its slice of the fixed sine
    noise, and drops the samples the step returns from before the utterance start.
    """

    def __init__(self, model: HiFTGenerator, step: Step | None = None):
        if model.noise is None:
            raise RuntimeError("HiFTGenerator was built without its FixedNoise")
        self.model = model
        self.step = model.forward_chunk if step is None else step
        self.state = model.initial_state()
        self.frames_in = 0  # M: mel frames pushed
        self.finalized = False

    @torch.inference_mode()
    def push(self, mel: torch.Tensor, finalize: bool = False) -> torch.Tensor:
        """mel (1, 80, F) float32, the next F frames (F >= 0) -> audio (1, S) float32.

        Non-final: S brings the total to 480 * (M - 8) for M frames pushed so far (0 while
        M <= 8). Final: the rest, 480 * M in total; the stream is closed afterwards."""
        m = self.model
        if self.finalized:
            raise RuntimeError("HiFTStream.push after finalize")
        if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != m.cfg.in_channels:
            raise ValueError(
                f"HiFTStream needs a (1, {m.cfg.in_channels}, F) mel, got {tuple(mel.shape)}"
            )
        if finalize and self.frames_in + mel.shape[2] == 0:
            raise ValueError("HiFTStream: finalize without any mel frame")
        if mel.shape[2] == 0 and not finalize:
            return mel.new_zeros(1, 0)
        noise = m.chunk_noise(self.frames_in, mel.shape[2], finalize)
        audio, self.state = self.step(mel.to(torch.float32), noise, self.state, finalize)
        first = (self.frames_in - m.out_delay) * m.upsample_scale  # sample index of audio[:, 0]
        self.frames_in += mel.shape[2]
        self.finalized = finalize
        return audio[:, max(0, -first) :]
