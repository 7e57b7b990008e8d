"""HiFT vocoder of CosyVoice3 (upstream ``CausalHiFTGenerator``): mel (50 Hz) -> 24 kHz audio.

This file owns the vocoder modules and their one computation, the step
``HiFTGenerator.forward_chunk(mel, noise, state, finalize) -> (audio, state)``; the released
checkpoint layout (``checkpoint_shapes``), its conversion (prefix strip, weight-norm folding, f0
predictor in float64) and loading. The step's ONNX export, its cached graphs and the ONNX
Runtime adapter are in worker/ort_hift.py (which imports this file, never the reverse).

Pipeline (numbers at official dims; M mel frames):

  mel (1, 80, M) --f0 predictor (float64)--> f0 (1, M) --SineGen2 + Linear(9, 1)--> source
  (1, 480 M) --STFT(16, hop 4)--> (1, 18, 120 M + 1)
  mel --conv_pre--> (1, 512, M) --3 x [lrelu, nearest-up + causal conv, + source branch,
  mean of 3 ResBlocks]--> (1, 64, 120 M + 1) --conv_post--> (1, 18, .) --iSTFT--> (1, 480 M)

The step. Every layer is causal, so each one is written in chunk form: new frames plus its
carried context in, output plus next context out (``CausalConv1d``, ``CausalConv1dUpsample``,
``ResBlock``, ``F0Predictor``, ``SourceModule`` with its phase sum, the STFT's source samples and
frames, the iSTFT's overlap-add tail). ``forward_chunk`` runs the whole vocoder on T new mel
frames with a fixed delay per part, so every chunk costs what its frames cost and the state is a
flat tuple of fixed-shape tensors (``initial_state()``: zeros, as upstream's left padding):

  f0 + source   frames [P - 3, M - 3)   (3 = the f0 predictor's lookahead)
  decoder       frames [P - 4, M - 4)   (4 = conv_pre's lookahead; the source is a frame ahead)
  audio         samples [480 (P - 8), 480 (M - 8)), upstream's non-final emission

for P frames before the chunk and M = P + T. ``finalize=True`` pads the lookaheads with zeros and
the source STFT by reflection, as upstream's one-shot pass does, and returns up to 480 M. With
these delays the first chunk's first 3 (f0) / 4 (decoder) frames lie before the utterance start:
they are computed too, masked so that every causal conv sees zeros there (upstream's left
padding), and the start's reflect paddings (the source STFT's, the last stage's one step)
are taken at sample / step 0 wherever it falls; the caller drops the audio before sample 0.
``inference`` is one step from the initial state; :class:`worker.hift_stream.HiFTStream` calls
it chunk by chunk. The fixed sine noise is an input (``chunk_noise``), so the step depends on no
Python state: it exports to ONNX as it is, one graph per ``finalize`` value
(:func:`worker.ort_hift.export_hift_step`).

Numerics. The ops run in upstream's order and layout, so f0 and the source match the reference
bit for bit on the same CPU. The STFT and iSTFT are convolutions with a DFT basis (ONNX has no
iSTFT and the exporter takes no complex tensors); against torch's FFT that moves the audio by
~1e-7. The f0 predictor's float64 convs run as im2col + GEMM (bit-identical to torch's float64
conv; ORT's CPU provider has no float64 Conv). The state dict holds folded weights
(``X.weight``); the f0 predictor's parameters are float64, as upstream casts that module before
its first use.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten_with_path, tree_leaves, tree_structure, tree_unflatten

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

F0_PREDICTOR_LAYERS = 5  # condnet: Conv(k4, lookahead) + 4 x Conv(k3, causal), each followed by ELU
F0_FIRST_KERNEL = 4
F0_KERNEL = 3
CONV_POST_KERNEL = 7
SNAKE_EPS = 1e-9
ENVELOPE_MIN = 1e-11  # torch.istft's bound for a nonzero window envelope


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


def stft_bases(n_fft: int) -> tuple[Tensor, Tensor]:
    """The Hann-windowed real DFT as conv weights, float32 (computed in float64):

    - forward (n_fft + 2, 1, n_fft): ``conv1d(x, ., stride=hop)`` gives the real parts of bins
      0..n_fft/2 then the imaginary parts, i.e. upstream's ``cat([stft.real, stft.imag])``;
    - inverse (n_fft + 2, 1, n_fft): ``conv_transpose1d(cat([re, im]), ., stride=hop)`` is the
      windowed ``irfft`` of each frame, overlap-added (divide by the window envelope after).
    """
    w = hann_window(n_fft).double().numpy()
    f = np.arange(n_fft // 2 + 1)[:, None]
    angle = 2 * np.pi * f * np.arange(n_fft)[None, :] / n_fft  # (n_fft/2 + 1, n_fft)
    forward = np.concatenate([np.cos(angle), -np.sin(angle)]) * w
    weight = np.where((f == 0) | (f == n_fft // 2), 1.0, 2.0) / n_fft  # one-sided irfft
    inverse = np.concatenate([weight * np.cos(angle), -weight * np.sin(angle)]) * w
    return (
        torch.from_numpy(forward.astype(np.float32))[:, None],
        torch.from_numpy(inverse.astype(np.float32))[:, None],
    )


def _valid(x: Tensor, first: Tensor) -> Tensor:
    """(1, 1, T) mask in x's dtype for x (.., T) whose frame 0 is ``first`` (() int64): 1 from
    the utterance start on, 0 before it."""
    return (first + torch.arange(x.shape[-1]) >= 0).to(x.dtype).view(1, 1, -1)


def _conv1d(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """``conv`` (stride 1) on x (1, C_in, T) without padding. float64 runs as im2col + GEMM:
    that is torch's own float64 conv (bit-identical) and exports to ops ORT's CPU provider has
    in float64 (it has no float64 Conv)."""
    if x.dtype != torch.float64:
        return F.conv1d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation)
    k, d = conv.kernel_size[0], conv.dilation[0]
    taps = [x[:, :, i * d : (i - k + 1) * d or None] for i in range(k)]
    cols = torch.stack(taps, dim=2).flatten(1, 2)[0]  # (C_in * k, T - d (k - 1))
    return torch.addmm(conv.bias[:, None], conv.weight.flatten(1), cols)[None]


class CausalConv1d(nn.Conv1d):
    """Stride-1 Conv1d padded on the left by its carried context: the last ``causal_padding``
    input frames of the previous chunk (zeros at the utterance start, upstream's padding)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation, dtype=dtype)
        self.causal_padding = causal_padding(kernel_size, dilation)

    def initial_state(self) -> Tensor:
        return torch.zeros(1, self.in_channels, self.causal_padding, dtype=self.weight.dtype)

    def forward(self, x: Tensor, ctx: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        # x (1, C_in, T); ctx (1, C_in, p); valid (1, 1, T), 0 on frames before the utterance
        # start (zeros there, as upstream's padding) -> (1, C_out, T), next ctx
        x = torch.cat([ctx, x * valid], dim=2)  # (1, C_in, p + T)
        return _conv1d(self, x), x[:, :, -self.causal_padding :].clone()


class CausalConv1dUpsample(nn.Conv1d):
    """Nearest x``rate`` upsample, then a Conv1d padded on the left by the last ``kernel - 1``
    upsampled samples of the previous chunk (zeros at the start)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, rate: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.rate = rate
        self.causal_padding = kernel_size - 1

    def initial_state(self) -> Tensor:
        return torch.zeros(1, self.in_channels, self.causal_padding)

    def forward(self, x: Tensor, ctx: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        # x (1, C_in, T); ctx (1, C_in, k - 1); valid (1, 1, T) -> (1, C_out, T * rate), next ctx
        x = F.interpolate(x * valid, scale_factor=float(self.rate), mode="nearest")
        x = torch.cat([ctx, x], dim=2)
        return super().forward(x), x[:, :, -self.causal_padding :].clone()


class Snake(nn.Module):
    """x + sin^2(alpha x) / (alpha + 1e-9), alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
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

    def initial_state(self) -> list[Tensor]:
        # per dilation: the contexts of conv1 and conv2
        return [c.initial_state() for pair in zip(self.convs1, self.convs2) for c in pair]

    def forward(self, x: Tensor, ctx: list[Tensor], valid: Tensor) -> tuple[Tensor, list[Tensor]]:
        # x (1, C, T); ctx: per dilation, conv1's and conv2's; valid (1, 1, T) -> (1, C, T),
        # next ctx
        layers = zip(self.convs1, self.convs2, self.activations1, self.activations2)
        new = []
        for (c1, c2, a1, a2), ctx1, ctx2 in zip(layers, ctx[0::2], ctx[1::2]):
            xt, ctx1 = c1(a1(x), ctx1, valid)
            xt, ctx2 = c2(a2(xt), ctx2, valid)
            x = xt + x
            new += [ctx1, ctx2]
        return x, new


class F0Predictor(nn.Module):
    """Upstream ``CausalConvRNNF0Predictor``, float64 parameters: mel (1, 80, .) -> |f0|."""

    def __init__(self, in_channels: int, channels: int, num_class: int):
        super().__init__()
        f64 = torch.float64
        layers: list[nn.Module] = [
            nn.Conv1d(in_channels, channels, F0_FIRST_KERNEL, dtype=f64),  # lookahead
            nn.ELU(),
        ]
        for _ in range(F0_PREDICTOR_LAYERS - 1):
            layers += [CausalConv1d(channels, channels, F0_KERNEL, dtype=f64), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_class, dtype=f64)

    @property
    def lookahead(self) -> int:  # 3 mel frames
        return self.condnet[0].kernel_size[0] - 1

    def initial_state(self) -> list[Tensor]:
        return [conv.initial_state() for conv in self.condnet[2::2]]

    def forward(self, x: Tensor, ctx: list[Tensor], first: Tensor) -> tuple[Tensor, list[Tensor]]:
        # x (1, 80, T + 3) float64: mel frames [first, first + T + 3), zeros past the end when
        # finalizing -> |f0| (1, T) of frames [first, first + T) (0 before the start), next ctx
        x = self.condnet[1](_conv1d(self.condnet[0], x))  # (1, C, T)
        valid = _valid(x, first)
        new = []
        for conv, elu, c in zip(self.condnet[2::2], self.condnet[3::2], ctx):
            x, c = conv(x, c, valid)
            x = elu(x)
            new.append(c)
        f0 = torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))  # (1, T)
        return f0 * valid[0], new


class SourceModule(nn.Module):
    """Upstream ``SourceModuleHnNSF`` with causal ``SineGen2``: f0 -> excitation, per chunk."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.harmonics = cfg.nb_harmonics + 1
        self.sampling_rate = cfg.sampling_rate
        self.upsample_scale = cfg.samples_per_frame
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def initial_state(self) -> Tensor:
        return torch.zeros(1, 1, self.harmonics, dtype=torch.float64)

    def forward(self, f0: Tensor, noise: Tensor, cycles: Tensor) -> tuple[Tensor, Tensor]:
        """f0 (1, T) float32 Hz per frame; noise (1, 480 T, H) the fixed uniform noise of these
        samples; cycles (1, 1, H) float64 phase (in cycles) summed over the frames before
        -> source (1, 480 T), the phase sum after the last frame.

        Upstream computes the phase increment per sample and takes it at the frame rate with a
        linear 1/480 interpolation that reads two samples of the same frame with weights 1/2:
        exactly the frame's value, so it is computed per frame here. Its phase is a float32
        ``torch.cumsum``, which on CPU accumulates in float64 and rounds each output, so
        continuing the float64 sum from ``cycles`` reproduces it bit for bit (the phase reaches
        1e4..1e5 rad, where one float32 ulp already moves the audio). Upstream's random initial
        phase sits on sample 0, which that interpolation never reads, so it has no effect.
        """
        harm = torch.arange(1, self.harmonics + 1, dtype=torch.float32)  # (H,)
        rad = (f0[:, :, None] * harm / self.sampling_rate) % 1  # (1, T, H)
        acc = torch.cumsum(torch.cat([cycles, rad.to(torch.float64)], dim=1), dim=1)[:, 1:]
        phase = acc.to(torch.float32) * 2 * math.pi  # (1, T, H)
        uv = (f0 > self.voiced_threshold).type(torch.float32)[:, None]  # (1, 1, T)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        # from here per sample, (1, H, 480 T) as upstream lays it out (the Linear's GEMM
        # rounds differently on another layout; and torch's SIMD and scalar sin differ in the
        # last bit, per sample every element takes the SIMD path)
        n = self.upsample_scale
        sines = torch.sin(_hold(phase.transpose(1, 2) * n, n)) * self.sine_amp
        sines = sines * _hold(uv, n) + _hold(noise_amp, n) * noise.transpose(1, 2)
        return torch.tanh(self.l_linear(sines.transpose(1, 2)))[:, :, 0], acc[:, -1:]


def _hold(x: Tensor, n: int) -> Tensor:
    """(1, C, T) -> (1, C, T * n): each value repeated n times (nearest upsampling)."""
    return x[:, :, :, None].expand(-1, -1, -1, n).flatten(2)


def _reflect_start(x: Tensor, first: Tensor) -> Tensor:
    """x (1, L) holds samples [first, first + L) (``first`` () int64): the negative samples
    become the reflection of the positive ones, -j <- j (upstream's centered STFT padding)."""
    n = first + torch.arange(x.shape[1])  # (L,) sample index
    mirror = (-n - first).clamp(0, x.shape[1] - 1)  # position of sample -n
    return torch.where(n < 0, x.gather(1, mirror[None]), x)


def _reflect_first_step(x: Tensor, first: Tensor) -> Tensor:
    """x (1, C, L) holds the last stage's steps [first, first + L), step k being upsampled
    sample k - 1: step 0 becomes sample 1 (upstream's reflect pad of one step), i.e. step 2."""
    k = (first + torch.arange(x.shape[2])).view(1, 1, -1)
    return torch.where(k == 0, torch.roll(x, -2, dims=2), x)


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
        self.down_rates = _source_down_rates(cfg)  # STFT frames per step of each source branch
        if self.down_rates[-1] != 1 or min(self.down_rates[:-1], default=2) < 2:
            raise ValueError(f"HiFT needs upsample rates > 1, got {cfg.upsample_rates}")
        if cfg.n_fft % cfg.hop_len or cfg.n_fft // 2 % cfg.hop_len:
            raise ValueError("HiFT needs n_fft and n_fft / 2 to be multiples of hop_len")
        self.cfg = cfg
        self.noise = noise  # plain attribute: a fixed RNG replay, not part of the state dict
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.num_upsamples = n_up
        self.n_fft = cfg.n_fft
        self.hop_len = cfg.hop_len
        self.upsample_scale = cfg.samples_per_frame  # 480 audio samples per mel frame
        # plain CPU tensors (even under meta), not in the state dict: (18, 1, 16) DFT bases and
        # the (1, 1, 16) squared window whose overlap-add is the iSTFT's envelope
        self.stft_basis, self.istft_basis = stft_bases(cfg.n_fft)
        self.window_sq = (hann_window(cfg.n_fft) ** 2).view(1, 1, -1)

        base, n_src = cfg.base_channels, cfg.n_fft + 2
        self.m_source = SourceModule(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, base, cfg.conv_pre_look_right + 1)  # lookahead
        self.ups = nn.ModuleList(
            CausalConv1dUpsample(base // 2**i, base // 2 ** (i + 1), k, u)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.source_downs = nn.ModuleList()  # strided (kernel 2r) over the STFT frames, or 1x1
        self.source_resblocks = nn.ModuleList()
        for i, (r, k, d) in enumerate(
            zip(
                self.down_rates,
                cfg.source_resblock_kernel_sizes,
                cfg.source_resblock_dilation_sizes,
            )
        ):
            ch = base // 2 ** (i + 1)
            self.source_downs.append(nn.Conv1d(n_src, ch, 1 if r == 1 else 2 * r, r))
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))
        self.resblocks = nn.ModuleList()
        for i in range(n_up):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, tuple(d)))
        self.conv_post = CausalConv1d(base // 2**n_up, n_src, CONV_POST_KERNEL)
        self.f0_predictor = F0Predictor(cfg.f0_in_channels, cfg.f0_cond_channels, cfg.f0_num_class)

        # delays of the step in mel frames (see the module docstring) and the held samples
        self.f0_delay = self.f0_predictor.lookahead  # 3
        self.dec_delay = cfg.conv_pre_look_right  # 4
        self.out_delay = self.f0_delay + self.dec_delay + 1  # 8: upstream holds one more frame
        self.steps_per_frame = self.upsample_scale // cfg.hop_len  # 120 STFT frames per mel frame
        half = cfg.n_fft // 2
        if self.upsample_scale * (self.dec_delay - self.f0_delay) < half:
            raise ValueError("HiFT needs the source a frame ahead of conv_pre's lookahead")
        # source samples [480 (M - 4) - 4, 480 (M - 3)): the next STFT frames' window starts
        self.source_hold = (
            self.upsample_scale * (self.dec_delay - self.f0_delay) + half - cfg.hop_len
        )
        # audio samples [480 (M - 8), 480 (M - 4) - 8): final but not yet due
        self.audio_hold = self.upsample_scale * (self.out_delay - self.dec_delay) - half
        self._state_spec = tree_structure(self._zero_state())

    # ---- state ----

    def _zero_state(self) -> dict:
        """The step's state as named groups of tensors; ``initial_state`` flattens it."""
        cfg = self.cfg
        tail = cfg.n_fft - cfg.hop_len  # overlap-add samples still open
        return {
            "frames": torch.zeros((), dtype=torch.int64),  # P: mel frames before the chunk
            "mel": torch.zeros(1, cfg.in_channels, self.dec_delay),  # frames [P - 4, P)
            "f0": self.f0_predictor.initial_state(),
            "cycles": self.m_source.initial_state(),
            "source": torch.zeros(1, self.source_hold),
            "stft": torch.zeros(1, cfg.n_fft + 2, self.down_rates[0]),  # (120 (P-4) - 15, ..]
            "ups": [up.initial_state() for up in self.ups],
            "last": torch.zeros(1, self.ups[-1].out_channels, 1),  # upsampled 120 (P - 4) - 1
            "source_resblocks": [b.initial_state() for b in self.source_resblocks],
            "resblocks": [b.initial_state() for b in self.resblocks],
            "post": self.conv_post.initial_state(),
            "ola": torch.zeros(1, 1, tail),  # iSTFT numerator and envelope of samples whose
            "envelope": torch.zeros(1, 1, tail),  # frames are not all in: [480 (P-4) - 8, +12)
            "audio": torch.zeros(1, self.audio_hold),
        }

    def initial_state(self) -> tuple[Tensor, ...]:
        """The flat state of a fresh utterance: zeros, fixed shapes (float32 except the f0
        contexts and the phase sum, float64, and the frame count, () int64)."""
        return tuple(tree_leaves(self._zero_state()))

    def state_names(self) -> list[str]:
        """A name per state tensor, in order ("mel", "f0.0", "resblocks.3.1", ...)."""
        paths = tree_flatten_with_path(self._zero_state())[0]
        return [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]

    def chunk_noise(self, frames_before: int, frames: int, finalize: bool) -> Tensor:
        """(1, 480 F, H) the fixed sine noise of the source samples the step computes for a chunk
        of ``frames`` after ``frames_before``: frames [P - 3, M - 3), or [P - 3, M) when
        finalizing (zeros before sample 0)."""
        if self.noise is None:
            raise RuntimeError("HiFTGenerator was built without its FixedNoise")
        first = frames_before - self.f0_delay
        start = first * self.upsample_scale
        end = start + (frames + (self.f0_delay if finalize else 0)) * self.upsample_scale
        rows = self.noise.sine(max(end, 0))[:, max(start, 0) :]
        return F.pad(rows, (0, 0, min(end, 0) - min(start, 0), 0))

    # ---- the step ----

    def forward_chunk(
        self, mel: Tensor, noise: Tensor, state: tuple[Tensor, ...], finalize: bool = False
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """mel (1, 80, T) float32, the T >= 0 frames after the P in ``state``; noise
        ``chunk_noise(P, T, finalize)``; state from ``initial_state()`` or the previous step
        -> audio samples [480 (P - 8), 480 (M - 8)) (finalize: to 480 M), the next state.
        Samples before 0 are the utterance's pre-start (to be dropped)."""
        audio, _, state = self._step(mel, noise, state, finalize)
        return audio, state

    def _step(
        self, mel: Tensor, noise: Tensor, state: tuple[Tensor, ...], finalize: bool
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        # forward_chunk, also returning the source samples [480 (P - 3), ..) it computed
        st = tree_unflatten(list(state), self._state_spec)
        cfg, spf, hop, half = self.cfg, self.upsample_scale, self.hop_len, self.n_fft // 2
        start, look = st["frames"], self.dec_delay  # P, 4
        window = torch.cat([st["mel"], mel], dim=2)  # (1, 80, 4 + T): frames [P - 4, M)
        st["frames"] = start + mel.shape[2]
        st["mel"] = window[:, :, -look:].clone()
        if finalize:  # upstream's zero right padding of both lookahead convs
            window = F.pad(window, (0, look))
        skip = look - self.f0_delay
        f0_in = window[:, :, skip:-skip] if finalize else window[:, :, skip:]

        # f0 and source of frames [P - 3, M - 3) (finalizing: [P - 3, M)), T_f of them
        f0, st["f0"] = self.f0_predictor(f0_in.to(torch.float64), st["f0"], start - self.f0_delay)
        source, st["cycles"] = self.m_source(f0.to(torch.float32), noise, st["cycles"])

        # source STFT frames (120 (P - 4), 120 (M - 4)] (finalizing: to 120 M); frame k covers
        # samples [4 k - 8, 4 k + 8)
        first = start - look  # the decoder's first frame
        buf = torch.cat([st["source"], source], dim=1)  # (1, 484 + 480 T_f)
        buf = _reflect_start(buf, first * spf - (half - hop))  # samples from 480 (P - 4) - 4
        if finalize:  # upstream's centered STFT: reflect padding at the end
            buf = F.pad(buf[:, None], (0, half), mode="reflect")[:, 0]
        else:
            st["source"] = buf[:, -self.source_hold :].clone()
            buf = buf[:, : -(self.source_hold - (self.n_fft - hop))]  # to 480 (M - 4) + 8
        spec = F.conv1d(buf[:, None], self.stft_basis, stride=hop)  # (1, 18, 120 T)
        spec = spec * _valid(spec, first * self.steps_per_frame + 1)  # frames < 0: upstream's
        stft = torch.cat([st["stft"], spec], dim=2)  # zero padding of the strided convs
        st["stft"] = stft[:, :, -self.down_rates[0] :].clone()  # from 120 (P - 4) - 14

        # decoder: frames [P - 4, M - 4) (finalizing: [P - 4, M))
        x = self.conv_pre(window)  # (1, 512, T)
        rate = 1  # steps per frame at the current stage
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x, st["ups"][i] = self.ups[i](x, st["ups"][i], _valid(x, first * rate))
            rate *= self.ups[i].rate
            r = self.down_rates[i]
            src = stft[:, :, self.down_rates[0] - r :]  # from STFT frame 120 (P - 4) - r + 1
            if r == 1:  # last stage, one step per STFT frame: upstream reflect-pads one step in
                # front, so step k takes upsampled sample k - 1; steps [120 (P - 4), 120 (M - 4))
                # (finalizing: to 120 M inclusive, one more)
                x = torch.cat([st["last"], x], dim=2)
                st["last"] = x[:, :, -1:].clone()
                if not finalize:
                    x, src = x[:, :, :-1], src[:, :, :-1]
                x = _reflect_first_step(x, first * rate)
            valid = _valid(x, first * rate)
            si, st["source_resblocks"][i] = self.source_resblocks[i](
                self.source_downs[i](src), st["source_resblocks"][i], valid
            )
            x = x + si
            b = i * self.num_kernels
            xs, st["resblocks"][b] = self.resblocks[b](x, st["resblocks"][b], valid)
            for j in range(b + 1, b + self.num_kernels):
                y, st["resblocks"][j] = self.resblocks[j](x, st["resblocks"][j], valid)
                xs = xs + y
            x = xs / self.num_kernels
        x, st["post"] = self.conv_post(F.leaky_relu(x), st["post"], valid)  # (1, 18, n)

        # iSTFT: frame k of the n adds to samples [4 k - 8, 4 k + 8); the first 12 of them
        # also get the previous chunk's open sums
        spec = self._spectrum(x) * valid
        num = F.conv_transpose1d(spec, self.istft_basis, stride=hop)  # (1, 1, 4 n + 12)
        env = F.conv_transpose1d(valid, self.window_sq, stride=hop)
        tail = self.n_fft - hop
        num = torch.cat([num[:, :, :tail] + st["ola"], num[:, :, tail:]], dim=2)
        env = torch.cat([env[:, :, :tail] + st["envelope"], env[:, :, tail:]], dim=2)
        if finalize:  # centered: the samples past the end go
            num, env = num[:, :, :-half], env[:, :, :-half]
        else:
            st["ola"], st["envelope"] = num[:, :, -tail:].clone(), env[:, :, -tail:].clone()
            num, env = num[:, :, :-tail], env[:, :, :-tail]
        audio = num / env.clamp(min=ENVELOPE_MIN)  # 0 before the start (no frames there)
        audio = torch.clamp(audio[:, 0], -cfg.audio_limit, cfg.audio_limit)
        audio = torch.cat([st["audio"], audio], dim=1)  # from 480 (P - 8)
        if not finalize:
            st["audio"] = audio[:, -self.audio_hold :].clone()
            audio = audio[:, : -self.audio_hold]
        return audio, source, tuple(tree_leaves(st))

    def _spectrum(self, x: Tensor) -> Tensor:
        # conv_post output (1, n_fft + 2, F) -> (1, n_fft + 2, F): real parts, imaginary parts
        nb = self.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :nb, :]), max=1e2)
        phase = torch.sin(x[:, nb:, :])
        return torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)

    # ---- whole utterance ----

    def f0(self, mel: Tensor, finalize: bool = True) -> Tensor:
        """(1, 80, M) float32 mel -> (1, M) (finalize) or (1, M - 3) float32 f0 in Hz."""
        look = self.f0_delay
        x = F.pad(mel, (look, look if finalize else 0)).to(torch.float64)
        f0, _ = self.f0_predictor(x, self.f0_predictor.initial_state(), torch.tensor(-look))
        return f0[:, look:].to(mel.dtype)

    @torch.inference_mode()
    def inference(self, mel: Tensor, finalize: bool = True) -> tuple[Tensor, Tensor]:
        """mel (1, 80, M) float32 -> (audio (1, N), source (1, 1, L)): one step from the
        initial state.

        finalize=True: N = L = 480 M. finalize=False: the last 3 frames are f0 lookahead and the
        4 before them conv_pre lookahead; N = 480 (M - 8), L = 480 (M - 3).
        """
        min_frames = 1 if finalize else self.out_delay
        if mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels or mel.shape[2] < min_frames:
            raise ValueError(
                f"HiFT needs a (1, {self.cfg.in_channels}, >= {min_frames}) mel for "
                f"finalize={finalize}, got {tuple(mel.shape)}"
            )
        noise = self.chunk_noise(0, mel.shape[2], finalize)
        audio, source, _ = self._step(mel, noise, self.initial_state(), finalize)
        spf = self.upsample_scale
        return audio[:, self.out_delay * spf :], source[:, None, self.f0_delay * spf :]


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
