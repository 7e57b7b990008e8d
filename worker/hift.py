"""HiFT vocoder of CosyVoice3 (upstream ``CausalHiFTGenerator``): mel (50 Hz) -> 24 kHz audio.

This file owns the vocoder modules, its released checkpoint layout (``checkpoint_shapes``), the
checkpoint conversion (prefix strip, weight-norm folding, f0 predictor in float64) and loading.

Pipeline of ``HiFTGenerator.inference(mel, finalize)`` (numbers at official dims):

  mel (1, 80, M) --f0 predictor (float64)--> f0 (1, M) --nearest x480--> SineGen2 + Linear(9, 1)
  --> source s (1, 1, 480 M) --STFT(16, hop 4)--> (1, 18, 120 M + 1)
  mel --conv_pre--> (1, 512, M) --3 x [lrelu, nearest-up + causal conv, + source branch,
  mean of 3 ResBlocks]--> (1, 64, 120 M + 1) --conv_post--> (1, 18, .) --iSTFT--> (1, 480 M)

All convolutions are causal (padding on one side). ``finalize=False`` treats the last
3 (f0 predictor) + 4 (conv_pre) mel frames as lookahead only and returns (M - 8) * 480 samples,
a bit-exact prefix of what ``finalize=True`` returns on the same mel.

``HiFTStream`` (:mod:`worker.hift_stream`, ``model.stream()``, one per request) is the
incremental form: ``push(mel chunk)`` returns the samples that are final so far, carrying each
causal conv's input context, the f0 lookahead, the NSF phase sum, the STFT/iSTFT overlaps and
the held-back samples, so each push costs what its new frames cost (upstream re-runs the whole
mel per chunk: O(n^2)).

The ops run in upstream's order and layout so that fp32 results match the reference bit for bit
on the same CPU. The module's state dict holds folded weights (``X.weight``); the f0 predictor's
parameters are float64, as upstream casts that module before its first use.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worker.checkpoint import (
    assign_state_dict,
    canonical_weight_norm_keys,
    check_state_dict,
    fold_weight_norm,
    load_state_dict_file,
    strip_prefix,
)
from worker.config import HiFTConfig
from worker.noise import FixedNoise

F0_PREDICTOR_LAYERS = 5  # condnet: Conv(k4, right) + 4 x Conv(k3, left), each followed by ELU
F0_FIRST_KERNEL = 4
F0_KERNEL = 3
CONV_POST_KERNEL = 7
SNAKE_EPS = 1e-9


def causal_padding(kernel_size: int, dilation: int = 1) -> int:
    """Upstream ``CausalConv1d`` pad: ``(k*d - d)//2*2 + (k+1)%2`` (= d*(k-1) for odd k)."""
    return (kernel_size * dilation - dilation) // 2 * 2 + (kernel_size + 1) % 2


def hann_window(n: int) -> torch.Tensor:
    """(n,) float32 periodic Hann window computed as scipy's ``get_window('hann', n,
    fftbins=True)`` in float64 and then cast (torch's float32 ``hann_window`` differs by 1 ulp)."""
    fac = np.linspace(-np.pi, np.pi, n + 1)
    w = np.zeros(n + 1)
    w += 0.5 * np.cos(0 * fac)
    w += 0.5 * np.cos(1 * fac)
    return torch.from_numpy(w[:n].astype(np.float32))


class CausalConv1d(nn.Conv1d):
    """Stride-1 Conv1d whose padding sits on one side: 'left' pads past frames (causal),
    'right' pads future frames (lookahead). Output length = input length."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        causal_type: str = "left",
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation, dtype=dtype)
        assert causal_type in ("left", "right")
        self.causal_padding = causal_padding(kernel_size, dilation)
        self.causal_type = causal_type

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C_in, T); context: (B, C_in, causal_padding) real frames instead of zeros
        if context is None:
            context = torch.zeros(
                x.shape[0], x.shape[1], self.causal_padding, dtype=x.dtype, device=x.device
            )
        x = torch.cat([context, x] if self.causal_type == "left" else [x, context], dim=2)
        return super().forward(x)  # (B, C_out, T)


class CausalConv1dDownSample(nn.Conv1d):
    """Strided Conv1d (kernel 2*stride) with stride-1 zeros on the left."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__(in_channels, out_channels, kernel_size, stride)
        self.causal_padding = stride - 1

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C_in, T); context: (B, C_in, P) real past frames instead of the stride - 1 zeros
        # -> (B, C_out, (P + T - kernel) // stride + 1)
        if context is None:
            return super().forward(F.pad(x, (self.causal_padding, 0), value=0.0))
        return super().forward(torch.cat([context, x], dim=2))


class CausalConv1dUpsample(nn.Conv1d):
    """Nearest x``rate`` upsample, then a Conv1d with kernel-1 zeros on the left."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, rate: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.rate = rate
        self.causal_padding = kernel_size - 1

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C_in, T); context: (B, C_in, kernel - 1) upsampled past samples instead of zeros
        # -> (B, C_out, T * rate)
        x = F.interpolate(x, scale_factor=float(self.rate), mode="nearest")
        if context is None:
            return super().forward(F.pad(x, (self.causal_padding, 0), value=0.0))
        return super().forward(torch.cat([context, x], dim=2))


class Snake(nn.Module):
    """x + sin^2(alpha x) / (alpha + 1e-9), alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)  # (1, C, 1)
        return x + (1.0 / (alpha + SNAKE_EPS)) * torch.pow(torch.sin(x * alpha), 2)


class ResBlock(nn.Module):
    """For each dilation d: x += conv(k, 1)(snake(conv(k, d)(snake(x)))), all left-causal."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            CausalConv1d(channels, channels, kernel_size, dilation=d) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            CausalConv1d(channels, channels, kernel_size) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, T) -> (B, C, T)
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            xt = c2(a2(c1(a1(x))))
            x = xt + x
        return x


class F0Predictor(nn.Module):
    """Upstream ``CausalConvRNNF0Predictor``, float64 parameters: mel (B, 80, T) -> |f0| (B, T)."""

    def __init__(self, in_channels: int, channels: int, num_class: int):
        super().__init__()
        f64 = torch.float64
        layers: list[nn.Module] = [
            CausalConv1d(in_channels, channels, F0_FIRST_KERNEL, causal_type="right", dtype=f64),
            nn.ELU(),
        ]
        for _ in range(F0_PREDICTOR_LAYERS - 1):
            layers += [CausalConv1d(channels, channels, F0_KERNEL, dtype=f64), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_class, dtype=f64)

    @property
    def lookahead(self) -> int:  # 3 mel frames
        return self.condnet[0].causal_padding

    def forward(self, x: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        # x: (B, 80, T) float64 -> (B, T) if finalize else (B, T - lookahead)
        p = self.lookahead
        if finalize:
            x = self.condnet[0](x)
        else:
            x = self.condnet[0](x[:, :, :-p], x[:, :, -p:])
        for layer in self.condnet[1:]:
            x = layer(x)
        x = x.transpose(1, 2)  # (B, T, C)
        return torch.abs(self.classifier(x).squeeze(-1))


class SourceModule(nn.Module):
    """Upstream ``SourceModuleHnNSF`` with causal ``SineGen2``: upsampled f0 -> excitation."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.harmonics = cfg.nb_harmonics + 1
        self.sampling_rate = cfg.sampling_rate
        self.upsample_scale = cfg.samples_per_frame
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def sine_gen(
        self,
        f0: torch.Tensor,
        noise: FixedNoise,
        start: int = 0,
        cycles: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0: (1, L, 1) float32 Hz for samples [start, start + L), L a multiple of the frame
        size; cycles: (1, 1, H) float64 phase (in cycles) summed over the frames before ``start``
        -> noisy harmonic sines (1, L, H) and the running phase after the last frame."""
        harm = torch.arange(1, self.harmonics + 1, dtype=torch.float32).view(1, 1, -1)
        fn = torch.multiply(f0, harm)  # (1, L, H)
        rad = (fn / self.sampling_rate) % 1
        if start == 0:
            # upstream adds the fixed initial phase at sample 0; the linear 1/scale downsample
            # below never reads sample 0, so it has no effect, but it is kept for exactness.
            rad[:, 0, :] = rad[:, 0, :] + noise.rand_ini
        # phase integrated at the frame rate, then held for each frame's samples (causal)
        rad = F.interpolate(
            rad.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear"
        ).transpose(1, 2)  # (1, T = L / scale, H)
        # upstream: torch.cumsum(rad, dim=1) in float32. torch's CPU cumsum accumulates float32 in
        # a float64 running sum and rounds each output, so continuing the float64 sum from
        # ``cycles`` reproduces the one-shot cumsum bit for bit (the phase reaches 1e4..1e5 rad,
        # where one float32 ulp already moves the audio).
        if cycles is None:
            cycles = torch.zeros(1, 1, self.harmonics, dtype=torch.float64)
        acc = torch.cumsum(torch.cat([cycles, rad.to(torch.float64)], dim=1), dim=1)[:, 1:]
        phase = acc.to(torch.float32) * 2 * math.pi  # (1, T, H)
        phase = F.interpolate(
            phase.transpose(1, 2) * self.upsample_scale,
            scale_factor=float(self.upsample_scale),
            mode="nearest",
        ).transpose(1, 2)  # (1, L, H)
        sines = torch.sin(phase) * self.sine_amp
        uv = (f0 > self.voiced_threshold).type(torch.float32)  # (1, L, 1)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        # upstream's fixed uniform [0, 1) buffer, indexed by absolute sample: (1, L, H)
        noise_part = noise_amp * noise.sine(start + sines.shape[1])[:, start:]
        return sines * uv + noise_part, acc[:, -1:]

    def excitation(
        self,
        f0: torch.Tensor,
        noise: FixedNoise,
        start: int = 0,
        cycles: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # f0: (1, L, 1) -> source (1, L, 1), running phase (1, 1, H) float64
        sines, cycles = self.sine_gen(f0, noise, start, cycles)
        return torch.tanh(self.l_linear(sines)), cycles

    def forward(self, f0: torch.Tensor, noise: FixedNoise) -> torch.Tensor:
        # f0: (1, L, 1) -> (1, L, 1)
        return self.excitation(f0, noise)[0]


class HiFTGenerator(nn.Module):
    """Upstream ``CausalHiFTGenerator`` (inference only, eval semantics, folded weight norm)."""

    def __init__(self, cfg: HiFTConfig, noise: FixedNoise | None = None):
        super().__init__()
        n_up = len(cfg.upsample_rates)
        if not (
            len(cfg.upsample_kernel_sizes) == n_up
            and len(cfg.source_resblock_kernel_sizes) == n_up
            and len(cfg.source_resblock_dilation_sizes) == n_up
            and len(cfg.resblock_kernel_sizes) == len(cfg.resblock_dilation_sizes)
        ):
            raise ValueError(f"inconsistent HiFT stage lists in {cfg}")
        self.cfg = cfg
        self.noise = noise  # plain attribute: a fixed RNG replay, not part of the state dict
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.num_upsamples = n_up
        self.n_fft = cfg.n_fft
        self.hop_len = cfg.hop_len
        self.upsample_scale = cfg.samples_per_frame  # 480 audio samples per mel frame
        self.stft_frames_per_mel = self.upsample_scale // cfg.hop_len  # 120
        self.conv_pre_look_right = cfg.conv_pre_look_right
        self.stft_window = hann_window(cfg.n_fft)  # plain CPU tensor, even under meta

        base, n_src = cfg.base_channels, cfg.n_fft + 2
        self.m_source = SourceModule(cfg)
        self.conv_pre = CausalConv1d(
            cfg.in_channels, base, cfg.conv_pre_look_right + 1, causal_type="right"
        )
        self.ups = nn.ModuleList(
            CausalConv1dUpsample(base // 2**i, base // 2 ** (i + 1), k, u)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (r, k, d) in enumerate(
            zip(
                _source_down_rates(cfg),
                cfg.source_resblock_kernel_sizes,
                cfg.source_resblock_dilation_sizes,
            )
        ):
            ch = base // 2 ** (i + 1)
            if r == 1:
                self.source_downs.append(CausalConv1d(n_src, ch, 1))
            else:
                self.source_downs.append(CausalConv1dDownSample(n_src, ch, 2 * r, r))
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))
        self.resblocks = nn.ModuleList()
        for i in range(n_up):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, tuple(d)))
        self.conv_post = CausalConv1d(base // 2**n_up, n_src, CONV_POST_KERNEL)
        self.f0_predictor = F0Predictor(cfg.f0_in_channels, cfg.f0_cond_channels, cfg.f0_num_class)

    # ---- pieces ----

    def _stft(self, x: torch.Tensor, center: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (1, L) -> real, imag: (1, n_fft/2 + 1, L / hop + 1) (center, reflect-padded) or
        # (1, n_fft/2 + 1, (L - n_fft) / hop + 1) (not centered)
        spec = torch.stft(
            x,
            self.n_fft,
            self.hop_len,
            self.n_fft,
            window=self.stft_window,
            center=center,
            return_complex=True,
        )
        spec = torch.view_as_real(spec)
        return spec[..., 0], spec[..., 1]

    def _spectrum(self, x: torch.Tensor) -> torch.Tensor:
        # conv_post output (1, n_fft + 2, F) -> complex spectrum (1, n_fft/2 + 1, F)
        nb = self.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :nb, :]), max=1e2)
        phase = torch.sin(x[:, nb:, :])
        return torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))

    def _istft(self, spec: torch.Tensor) -> torch.Tensor:
        # (1, n_fft/2 + 1, F) complex -> (1, hop * (F - 1)), centered
        return torch.istft(spec, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window)

    def f0(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """(1, 80, M) float32 mel -> (1, M) (finalize) or (1, M - 3) float32 f0 in Hz."""
        return self.f0_predictor(mel.to(torch.float64), finalize=finalize).to(mel)

    def source(self, f0: torch.Tensor) -> torch.Tensor:
        """(1, T) f0 at the frame rate -> (1, 1, T * 480) NSF excitation."""
        if self.noise is None:
            raise RuntimeError("HiFTGenerator was built without its FixedNoise")
        s = F.interpolate(f0[:, None], scale_factor=float(self.upsample_scale), mode="nearest")
        s = self.m_source(s.transpose(1, 2), self.noise)  # (1, L, 1)
        return s.transpose(1, 2)  # (1, 1, L)

    def decode(self, x: torch.Tensor, s: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        # x: (1, 80, T) mel, s: (1, 1, T * 480) -> audio (1, T * 480) if finalize,
        # else (1, (T - 5) * 480): the last conv_pre_look_right frames are lookahead only.
        s_real, s_imag = self._stft(s.squeeze(1))  # (1, 9, 120 T + 1) each
        if finalize:
            x = self.conv_pre(x)  # (1, C, T)
        else:
            r = self.conv_pre_look_right
            x = self.conv_pre(x[:, :, :-r], x[:, :, -r:])  # (1, C, T - r)
            trim = self.stft_frames_per_mel * r
            s_real, s_imag = s_real[:, :, :-trim], s_imag[:, :, :-trim]
        s_stft = torch.cat([s_real, s_imag], dim=1)  # (1, 18, 120 T' + 1)

        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.cfg.lrelu_slope)
            x = self.ups[i](x)
            if i == self.num_upsamples - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # (1, C_i, 120 T' + 1)
            si = self.source_downs[i](s_stft)
            si = self.source_resblocks[i](si)
            x = x + si
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs += self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels

        x = F.leaky_relu(x)
        x = self.conv_post(x)  # (1, n_fft + 2, F)
        x = self._istft(self._spectrum(x))
        if not finalize:
            x = x[:, : -self.upsample_scale]
        return torch.clamp(x, -self.cfg.audio_limit, self.cfg.audio_limit)

    # ---- entry point ----

    @torch.inference_mode()
    def inference(
        self, mel: torch.Tensor, finalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (1, 80, M) float32 -> (audio (1, N), source (1, 1, L)).

        finalize=True: N = L = 480 M. finalize=False: the last 3 frames are f0 lookahead and the
        4 before them conv_pre lookahead; N = 480 (M - 8), L = 480 (M - 3).
        """
        f0_look = self.f0_predictor.lookahead
        min_frames = 1 if finalize else f0_look + self.conv_pre_look_right + 1
        if mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels or mel.shape[2] < min_frames:
            raise ValueError(
                f"HiFT needs a (1, {self.cfg.in_channels}, >= {min_frames}) mel for "
                f"finalize={finalize}, got {tuple(mel.shape)}"
            )
        f0 = self.f0(mel, finalize)  # (1, M) or (1, M - 3)
        s = self.source(f0)  # (1, 1, 480 M')
        x = mel if finalize else mel[:, :, :-f0_look]
        return self.decode(x, s, finalize), s

    def stream(self):
        """A new incremental stream (one per request) over this model
        (:class:`worker.hift_stream.HiFTStream`)."""
        from worker.hift_stream import HiFTStream

        return HiFTStream(self)


def _source_down_rates(cfg: HiFTConfig) -> list[int]:
    """Cumulative downsample rate of the STFT frames for each stage's source branch
    ([15, 3, 1] for upsample [8, 5, 3])."""
    rates = [1] + list(cfg.upsample_rates[::-1][:-1])
    return [int(r) for r in np.cumprod(rates)[::-1]]


def checkpoint_shapes(cfg: HiFTConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a released ``hift.pt`` for ``cfg`` (weight norm not folded)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def wn_conv(name: str, c_out: int, c_in: int, k: int) -> None:
        shapes[f"{name}.bias"] = (c_out,)
        shapes[f"{name}.parametrizations.weight.original0"] = (c_out, 1, 1)
        shapes[f"{name}.parametrizations.weight.original1"] = (c_out, c_in, k)

    def resblock(name: str, ch: int, k: int, dilations: tuple[int, ...]) -> None:
        for conv in ("convs1", "convs2"):
            for j in range(len(dilations)):
                wn_conv(f"{name}.{conv}.{j}", ch, ch, k)
        for act in ("activations1", "activations2"):
            for j in range(len(dilations)):
                shapes[f"{name}.{act}.{j}.alpha"] = (ch,)

    base, n_src, h = cfg.base_channels, cfg.n_fft + 2, cfg.nb_harmonics + 1
    shapes["m_source.l_linear.weight"] = (1, h)
    shapes["m_source.l_linear.bias"] = (1,)
    wn_conv("conv_pre", base, cfg.in_channels, cfg.conv_pre_look_right + 1)
    for i, k in enumerate(cfg.upsample_kernel_sizes):
        wn_conv(f"ups.{i}", base // 2 ** (i + 1), base // 2**i, k)
    for i, r in enumerate(_source_down_rates(cfg)):
        ch = base // 2 ** (i + 1)
        shapes[f"source_downs.{i}.weight"] = (ch, n_src, 1 if r == 1 else 2 * r)
        shapes[f"source_downs.{i}.bias"] = (ch,)
    for i, (k, d) in enumerate(
        zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)
    ):
        resblock(f"source_resblocks.{i}", base // 2 ** (i + 1), k, tuple(d))
    n = 0
    for i in range(len(cfg.upsample_rates)):
        for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
            resblock(f"resblocks.{n}", base // 2 ** (i + 1), k, tuple(d))
            n += 1
    wn_conv("conv_post", n_src, base // 2 ** len(cfg.upsample_rates), CONV_POST_KERNEL)
    c = cfg.f0_cond_channels
    wn_conv("f0_predictor.condnet.0", c, cfg.f0_in_channels, F0_FIRST_KERNEL)
    for i in range(1, F0_PREDICTOR_LAYERS):
        wn_conv(f"f0_predictor.condnet.{2 * i}", c, c, F0_KERNEL)
    shapes["f0_predictor.classifier.weight"] = (cfg.f0_num_class, c)
    shapes["f0_predictor.classifier.bias"] = (cfg.f0_num_class,)
    return shapes


def convert_checkpoint(
    sd: dict[str, torch.Tensor], cfg: HiFTConfig, path: str | Path = "hift.pt"
) -> dict[str, torch.Tensor]:
    """Released ``hift.pt`` state dict -> ``HiFTGenerator`` state dict.

    Strips a ``generator.`` prefix, accepts old-style ``weight_g``/``weight_v`` keys, refuses
    missing/unexpected/mis-shaped keys (``CheckpointError`` naming ``path``), and folds weight
    norm (the f0 predictor in float64). Works on meta tensors."""
    sd = canonical_weight_norm_keys(strip_prefix(sd, "generator."))
    check_state_dict(sd, checkpoint_shapes(cfg), path)
    return fold_weight_norm(sd, float64_prefixes=("f0_predictor.",))


def load_hift(path: str | Path, cfg: HiFTConfig, noise: FixedNoise) -> HiFTGenerator:
    """Build ``HiFTGenerator`` on the meta device and assign the converted ``hift.pt``."""
    sd = convert_checkpoint(load_state_dict_file(path), cfg, path)
    with torch.device("meta"):
        model = HiFTGenerator(cfg, noise)
    assign_state_dict(model, sd, path)
    return model.requires_grad_(False).eval()
