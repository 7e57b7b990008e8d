"""Incremental HiFT for streaming: one :class:`HiFTStream` per request (carried causal state;
see the class docstring). The vocoder itself is :mod:`worker.hift`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.hift import (
    CausalConv1d,
    CausalConv1dUpsample,
    HiFTGenerator,
    ResBlock,
    _source_down_rates,
)


class HiFTStream:
    """Incremental HiFT for one utterance: ``push(mel chunk)`` -> the audio that is final so far.

    Built per request from a shared (read-only) ``HiFTGenerator``; nothing is shared between
    streams. After the last push (``finalize=True``) the concatenated output equals
    ``model.inference(whole mel, finalize=True)[0]``, and after a non-final push with M mel frames
    in total, (M - 8) * 480 samples have been emitted, as upstream's recompute-everything
    streaming emits.

    Instead of re-running the whole mel each chunk, every causal dependency is carried:

    - f0 predictor: the last 3 mel frames (lookahead of its right-padded first conv) and the
      input context of each left-causal conv (2 frames, float64);
    - source: the float64 running phase sum (one value per harmonic) and the absolute sample
      position (the fixed noise buffer is indexed by it);
    - source STFT: the last n_fft - hop (12) source samples;
    - decoder: the mel frames not decoded yet (4 of them are conv_pre's lookahead), the input
      context of every causal conv (ups, resblocks, source resblocks, conv_post), and the source
      STFT frames not consumed yet plus the 15 before them that the strided source convs
      (kernel 2r, stride r) still read;
    - iSTFT: the last n_fft / hop - 1 (3) spectral frames of the overlap-add;
    - output: computed samples not yet due (upstream holds one mel frame, 480 samples, back).

    So a push costs the same for the same number of new frames, wherever it is in the
    utterance; the only recomputation is the iSTFT of 3 context frames (12 samples).
    """

    def __init__(self, model: HiFTGenerator):
        if model.noise is None:
            raise RuntimeError("HiFTGenerator was built without its FixedNoise")
        cfg = model.cfg
        self.model = model
        self.down_rates = _source_down_rates(cfg)  # STFT frames per step of each source branch
        if self.down_rates[-1] != 1 or min(self.down_rates[:-1], default=2) < 2:
            raise ValueError(f"HiFTStream needs upsample rates > 1, got {cfg.upsample_rates}")
        if model.n_fft % model.hop_len or model.n_fft // 2 % model.hop_len:
            raise ValueError("HiFTStream needs n_fft and n_fft / 2 to be multiples of hop_len")
        self.f0_look = model.f0_predictor.lookahead  # 3 mel frames
        self.look_right = cfg.conv_pre_look_right  # 4 mel frames
        self.frames_per_mel = model.stft_frames_per_mel  # 120 STFT frames (= decoder steps)

        self.frames_in = 0  # M: mel frames pushed
        self.f0_frames = 0  # mel frames whose f0 and source are computed
        self.dec_frames = 0  # D: mel frames through the decoder
        self.stft_frames = 0  # source STFT frames computed
        self.spec_frames = 0  # decoder output (iSTFT) frames
        self.emitted = 0  # audio samples returned
        self.finalized = False

        n_src, nb = cfg.n_fft + 2, cfg.n_fft // 2 + 1
        f64 = torch.float64
        self.f0_hold = torch.zeros(1, cfg.f0_in_channels, 0, dtype=f64)  # (1, 80, <= 3)
        self.cycles = torch.zeros(1, 1, cfg.nb_harmonics + 1, dtype=f64)  # running phase sum
        self.src_tail = torch.zeros(1, 0)  # (1, <= 12) source samples from 4 stft_frames - 8
        self.src_padded = False  # the start's reflect padding is in place
        # (1, 18, r0 - 1 + ...) STFT frames from index 120 D - (r0 - 1); zeros before frame 0
        self.s_stft = torch.zeros(1, n_src, self.down_rates[0] - 1)
        self.mel_dec = torch.zeros(1, cfg.in_channels, 0)  # (1, 80, M - D) mel not yet decoded
        self.spec_tail = torch.zeros(1, nb, 0, dtype=torch.complex64)  # (1, 9, <= 3)
        self.pending = torch.zeros(1, 0)  # (1, P) final samples not yet due
        self.ctx: dict[nn.Module, torch.Tensor] = {}  # conv -> its last input frames

    # ---- carried convolutions ----

    def _conv(self, conv: CausalConv1d, x: torch.Tensor) -> torch.Tensor:
        # left-causal conv with the carried input context: (1, C_in, T) -> (1, C_out, T)
        p = conv.causal_padding
        ctx = self.ctx.get(conv)
        if ctx is None:
            ctx = x.new_zeros(1, x.shape[1], p)  # upstream's zero padding at the start
        y = conv(x, ctx)
        self.ctx[conv] = _last(ctx, x, p)
        return y

    def _upsample(self, up: CausalConv1dUpsample, x: torch.Tensor) -> torch.Tensor:
        # (1, C_in, T) -> (1, C_out, T * rate); context = last kernel - 1 upsampled samples
        p = up.causal_padding
        ctx = self.ctx.get(up)
        if ctx is None:
            ctx = x.new_zeros(1, x.shape[1], p)
        y = up(x, ctx)
        frames = -(-p // up.rate)  # input frames that cover the context
        tail = x[:, :, -frames:].repeat_interleave(up.rate, dim=2)  # = nearest upsampling
        self.ctx[up] = _last(ctx, tail, p)
        return y

    def _resblock(self, block: ResBlock, x: torch.Tensor) -> torch.Tensor:
        # ResBlock.forward with carried contexts: (1, C, T) -> (1, C, T)
        for c1, c2, a1, a2 in zip(
            block.convs1, block.convs2, block.activations1, block.activations2
        ):
            xt = self._conv(c2, a2(self._conv(c1, a1(x))))
            x = xt + x
        return x

    # ---- stages ----

    def _f0(self, mel: torch.Tensor, finalize: bool) -> torch.Tensor:
        # mel (1, 80, F) -> f0 (1, F') float32 for the frames whose lookahead is now known
        fp = self.model.f0_predictor
        x = torch.cat([self.f0_hold, mel.to(torch.float64)], dim=2)  # (1, 80, h + F)
        if finalize:
            x = fp.condnet[0](x)  # zeros as lookahead, as the full pass
            self.f0_hold = self.f0_hold[:, :, :0]
        else:
            n = x.shape[2] - self.f0_look
            if n <= 0:
                self.f0_hold = x
                return mel.new_zeros(1, 0)
            self.f0_hold = x[:, :, n:].clone()
            x = fp.condnet[0](x[:, :, :n], x[:, :, n:])  # (1, C, n)
        for layer in fp.condnet[1:]:
            x = self._conv(layer, x) if isinstance(layer, CausalConv1d) else layer(x)
        f0 = torch.abs(fp.classifier(x.transpose(1, 2)).squeeze(-1))  # (1, n)
        return f0.to(torch.float32)

    def _source(self, f0: torch.Tensor) -> torch.Tensor:
        # f0 (1, F') -> NSF source (1, 480 F') for samples from 480 * f0_frames
        m = self.model
        start = self.f0_frames * m.upsample_scale
        s = F.interpolate(f0[:, None], scale_factor=float(m.upsample_scale), mode="nearest")
        s, self.cycles = m.m_source.excitation(s.transpose(1, 2), m.noise, start, self.cycles)
        self.f0_frames += f0.shape[1]
        return s[:, :, 0]  # (1, L)

    def _source_stft(self, s: torch.Tensor, finalize: bool) -> None:
        # append the STFT frames of the source whose windows are complete to self.s_stft
        m = self.model
        half, hop = m.n_fft // 2, m.hop_len
        buf = torch.cat([self.src_tail, s], dim=1)  # (1, L') samples from 4 stft_frames - 8
        if not self.src_padded:
            if buf.shape[1] <= half:  # the reflect padding needs samples 1..8
                self.src_tail = buf
                return
            buf = F.pad(buf[None], (half, 0), mode="reflect")[0]  # as torch.stft(center=True)
            self.src_padded = True
        if finalize:
            buf = F.pad(buf[None], (0, half), mode="reflect")[0]
        n = (buf.shape[1] - m.n_fft) // hop + 1 if buf.shape[1] >= m.n_fft else 0
        if n > 0:
            real, imag = m._stft(buf[:, : hop * (n - 1) + m.n_fft], center=False)  # (1, 9, n)
            spec = torch.cat([real, imag], dim=1)  # (1, 18, n), as upstream's s_stft
            self.s_stft = torch.cat([self.s_stft, spec], dim=2)
            self.stft_frames += n
        self.src_tail = buf[:, hop * n :].clone()

    def _decode(self, n: int, finalize: bool) -> torch.Tensor:
        # mel frames [D, D + n) -> (1, S) audio samples that became final
        m, cfg = self.model, self.model.cfg
        first = self.dec_frames == 0
        r0, steps = self.down_rates[0], self.frames_per_mel * n  # steps: new STFT-rate steps
        look = None if finalize else self.mel_dec[:, :, n : n + self.look_right]  # (1, 80, 4)
        x = m.conv_pre(self.mel_dec[:, :, :n], look)  # (1, C, n)
        self.mel_dec = self.mel_dec[:, :, n:].clone()
        s = self.s_stft  # (1, 18, r0 - 1 + ...): frames from 120 D - (r0 - 1)
        for i in range(m.num_upsamples):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x = self._upsample(m.ups[i], x)  # (1, C_i, n * prod(u[:i+1]))
            r = self.down_rates[i]
            if r == 1:  # last stage: one step per STFT frame
                if first:  # upstream reflect-pads one step, aligned with STFT frame 0
                    x = F.pad(x, (1, 0), mode="reflect")
                si = m.source_downs[i](s[:, :, r0 - 1 if first else r0 : r0 + steps])
            else:  # strided conv over frames [120 D - r + 1, 120 (D + n) + 1)
                si = m.source_downs[i](s[:, :, r0 : r0 + steps], s[:, :, r0 - r : r0])
            x = x + self._resblock(m.source_resblocks[i], si)
            xs = self._resblock(m.resblocks[i * m.num_kernels], x)
            for j in range(1, m.num_kernels):
                xs += self._resblock(m.resblocks[i * m.num_kernels + j], x)
            x = xs / m.num_kernels
        self.s_stft = s[:, :, steps:].clone()
        self.dec_frames += n
        x = self._conv(m.conv_post, F.leaky_relu(x))  # (1, n_fft + 2, steps (+1 if first))
        return self._overlap_add(m._spectrum(x), finalize)

    def _overlap_add(self, spec: torch.Tensor, finalize: bool) -> torch.Tensor:
        # new spectral frames (1, 9, F) -> (1, S) samples that are complete: the iSTFT over the
        # carried 3 frames + the new ones, keeping samples whose frames are all present
        m = self.model
        half, hop = m.n_fft // 2, m.hop_len
        frames = torch.cat([self.spec_tail, spec], dim=2)  # (1, 9, 3 + F)
        first = self.spec_frames - self.spec_tail.shape[2]  # absolute index of frames[0]
        done = max(0, hop * self.spec_frames - half)  # samples already final
        self.spec_frames += spec.shape[2]
        y = m._istft(frames)  # (1, hop (3 + F - 1)): samples from hop * first
        end = y.shape[1] if finalize else hop * self.spec_frames - half - hop * first
        self.spec_tail = frames[:, :, -(m.n_fft // hop - 1) :].clone()
        return torch.clamp(y[:, done - hop * first : end], -m.cfg.audio_limit, m.cfg.audio_limit)

    # ---- entry point ----

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
        mel = mel.to(torch.float32)
        self.frames_in += mel.shape[2]
        self.finalized = finalize
        m_total = self.frames_in

        f0 = self._f0(mel, finalize)  # (1, F') frames [f0_frames, f0_frames + F')
        if f0.shape[1]:
            self._source_stft(self._source(f0), finalize)

        self.mel_dec = torch.cat([self.mel_dec, mel], dim=2)
        dec_to = m_total if finalize else m_total - self.f0_look - self.look_right
        if dec_to > self.dec_frames:
            need = self.frames_per_mel * dec_to + 1  # STFT frames the decoder reads
            assert self.stft_frames >= need, (self.stft_frames, need)
            audio = self._decode(dec_to - self.dec_frames, finalize)
            self.pending = torch.cat([self.pending, audio], dim=1)

        due = m_total if finalize else max(0, m_total - self.f0_look - self.look_right - 1)
        n = due * m.upsample_scale - self.emitted
        out, self.pending = self.pending[:, :n], self.pending[:, n:].clone()
        assert out.shape[1] == n, (out.shape, n)
        self.emitted += n
        return out


def _last(ctx: torch.Tensor, x: torch.Tensor, p: int) -> torch.Tensor:
    """The last p frames of cat([ctx, x], dim=2) (ctx has p frames), without the big cat."""
    if x.shape[2] >= p:
        return x[:, :, x.shape[2] - p :].clone()  # a copy: a view would keep all of x alive
    return torch.cat([ctx[:, :, x.shape[2] :], x], dim=2)
