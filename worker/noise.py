"""The fixed noises upstream draws at construction, replayed bit-exactly for any config dims.

Upstream ``CausalConditionalCFM.__init__`` seeds the global RNG with 0 and draws
``rand_noise = randn(1, 80, 15000)``; every module built after it keeps drawing from the same
stream (flow ``input_embedding``, ``spk_embed_affine_layer``, the HiFT f0 predictor), and then
``SineGen2`` draws ``rand_ini = rand(1, 9)`` and ``sine_waves = rand(1, 7_200_000, 9)``.
We replay that stream on a private ``torch.Generator`` (the global RNG is never touched) and keep
only what is needed: the flow noise in full (4.8 MB), and for the sine buffer the generator
state, from which any prefix of rows is drawn on demand instead of upstream's 259 MB buffer.
"""

from __future__ import annotations

import torch

FLOW_NOISE_FRAMES = 15000  # 300 s of mel at 50 Hz: upstream's hard cap per request (incl. prompt)
SINE_BUFFER_ROWS = 300 * 24000  # upstream's sine buffer length in samples


def _consume(gen: torch.Generator, shape: tuple[int, ...], kind: str) -> None:
    t = torch.empty(shape)
    if kind == "normal":
        t.normal_(generator=gen)
    else:
        t.uniform_(generator=gen)


class FixedNoise:
    """Replays upstream's construction-time RNG stream.

    ``mel_channels``, ``flow_vocab``, ``flow_spk_dim``: flow embedding and speaker projection
    dims; ``f0_in``/``f0_channels``: the HiFT f0 predictor's input and ``cond_channels``;
    ``harmonics``: ``nb_harmonics + 1`` columns of the sine buffer.
    """

    def __init__(
        self,
        mel_channels: int = 80,
        flow_vocab: int = 6561,
        flow_spk_dim: int = 192,
        flow_out: int = 80,
        f0_in: int = 80,
        f0_channels: int = 512,
        f0_layers: int = 5,
        f0_classes: int = 1,
        harmonics: int = 9,
    ):
        gen = torch.Generator().manual_seed(0)
        # (1, 80, 15000): CFM noise; each call uses the prefix [:, :, :T]
        self.flow_noise = torch.randn(1, mel_channels, FLOW_NOISE_FRAMES, generator=gen)
        _consume(gen, (flow_vocab, mel_channels), "normal")  # flow.input_embedding
        _consume(gen, (flow_out, flow_spk_dim), "uniform")  # flow.spk_embed_affine_layer.weight
        _consume(gen, (flow_out,), "uniform")  # .bias
        _consume(gen, (f0_channels, f0_in, 4), "uniform")  # f0_predictor.condnet.0
        _consume(gen, (f0_channels,), "uniform")
        for _ in range(f0_layers - 1):
            _consume(gen, (f0_channels, f0_channels, 3), "uniform")
            _consume(gen, (f0_channels,), "uniform")
        _consume(gen, (f0_classes, f0_channels), "uniform")  # f0_predictor.classifier
        _consume(gen, (f0_classes,), "uniform")
        self.rand_ini = torch.rand(1, harmonics, generator=gen)  # no effect on outputs
        self.rand_ini[:, 0] = 0
        self.harmonics = harmonics
        self._sine_state = gen.get_state()
        self._sine_cache = torch.empty(1, 0, harmonics)

    def flow(self, frames: int) -> torch.Tensor:
        """(1, 80, frames) prefix of the CFM noise."""
        if frames > FLOW_NOISE_FRAMES:
            raise ValueError(
                f"request needs {frames} mel frames; the fixed flow noise has {FLOW_NOISE_FRAMES}"
                " (300 s including the prompt)"
            )
        return self.flow_noise[:, :, :frames]

    def sine(self, rows: int) -> torch.Tensor:
        """(1, rows, harmonics) prefix of the HiFT sine-noise buffer (uniform [0,1))."""
        if rows > SINE_BUFFER_ROWS:
            raise ValueError(
                f"request needs {rows} samples; the sine buffer has {SINE_BUFFER_ROWS}"
            )
        have = self._sine_cache.shape[1]
        if rows > have:
            # uniform_ draws serially, so a longer draw from the saved state extends the prefix.
            want = min(SINE_BUFFER_ROWS, max(rows, 2 * have, 24000 * 30))
            gen = torch.Generator()
            gen.set_state(self._sine_state)
            self._sine_cache = torch.rand(1, want, self.harmonics, generator=gen)
        return self._sine_cache[:, :rows]

    def sine_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at arbitrary indices, drawn in bounded chunks (for checks of the whole buffer)."""
        out = torch.empty(len(index), self.harmonics)
        gen = torch.Generator()
        gen.set_state(self._sine_state)
        chunk, start = 1 << 20, 0
        order = torch.argsort(index)
        pos = 0
        while pos < len(order) and start < SINE_BUFFER_ROWS:
            n = min(chunk, SINE_BUFFER_ROWS - start)
            block = torch.rand(n, self.harmonics, generator=gen)
            while pos < len(order) and index[order[pos]] < start + n:
                out[order[pos]] = block[index[order[pos]] - start]
                pos += 1
            start += n
        return out


def fixed_noise_for(cfg) -> FixedNoise:
    """The noise stream for a :class:`worker.config.ModelConfig`."""
    return FixedNoise(
        mel_channels=cfg.flow.output_size,
        flow_vocab=cfg.flow.vocab_size,
        flow_spk_dim=cfg.flow.spk_embed_dim,
        flow_out=cfg.flow.output_size,
        f0_in=cfg.hift.f0_in_channels,
        f0_channels=cfg.hift.f0_cond_channels,
        f0_classes=cfg.hift.f0_num_class,
        harmonics=cfg.hift.nb_harmonics + 1,
    )


def max_audio_seconds(cfg, prompt_tokens: int = 0) -> float:
    """Longest audio (seconds, after a prompt of ``prompt_tokens``) the fixed noise covers:
    upstream's 300 s cap per request, prompt included (``cfg``: a ModelConfig)."""
    frames_per_s = cfg.flow.token_mel_ratio * cfg.token_frame_rate
    flow_s = FLOW_NOISE_FRAMES / frames_per_s
    sine_s = SINE_BUFFER_ROWS / cfg.sample_rate
    return min(flow_s, sine_s) - prompt_tokens / cfg.token_frame_rate
