"""How far a non-fp32 setting moves the output: the figures, the gate, the stage checks.

Figures (each against fp32 on the same inputs):
- ``mel_snr_db``: the flow's streamed mel, 10 log10(sum ref^2 / sum (ref - x)^2);
- ``wave_snr_db``: the same on the vocoder's waveform;
- ``log_mel_distance_db``: RMS over mel bins of the dB difference of the two waveforms' power
  mel spectrograms, averaged over frames (log-spectral distance; 0 = identical);
- ``top1``: fraction of teacher-forced LLM positions whose most likely speech token agrees;
- ``kl``: mean KL(p_fp32 || p_x) over those positions, in nats.

The gate a preset must pass (:data:`GATE`): mel SNR >= 40 dB, waveform SNR >= 30 dB,
top-1 >= 99 %. With random weights these figures bound the numeric error of a setting, not
perceived quality; on a real model dir they are measured the same way
(``python -m tuning.fidelity --model-dir DIR``).

This module is runtime code (a stage checks its own figure before it serves, see
:func:`llm_figures` etc.); ``tuning/fidelity.py`` is the end-to-end report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

GATE: dict[str, tuple[str, float]] = {  # figure -> (">=", threshold)
    "mel_snr_db": (">=", 40.0),
    "wave_snr_db": (">=", 30.0),
    "top1": (">=", 0.99),
}


def snr_db(ref: Tensor, x: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - x|^2); +inf when identical."""
    if ref.shape != x.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(x.shape)}")
    ref, x = ref.double(), x.double()
    noise = (ref - x).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def log_mel_distance_db(ref: Tensor, x: Tensor, sample_rate: int, n_mels: int = 80) -> float:
    """Mean over frames of the RMS over mel bins of 10 log10(P_ref / P_x): power mel
    spectrograms (1024-point STFT, hop 256, slaney mel bank, floor 1e-10)."""
    from worker.frontend.audio import slaney_mel_filterbank

    n_fft, hop = 1024, 256
    bank = torch.from_numpy(slaney_mel_filterbank(sample_rate, n_fft, n_mels).copy())

    def power_mel_db(y: Tensor) -> Tensor:  # (S,) -> (n_mels, frames)
        spec = torch.stft(y.float().reshape(-1), n_fft, hop, window=torch.hann_window(n_fft),
                          return_complex=True).abs().pow(2)  # fmt: skip
        return 10 * torch.log10((bank @ spec).clamp(min=1e-10))

    a, b = power_mel_db(ref), power_mel_db(x)
    return (a - b).pow(2).mean(dim=0).sqrt().mean().item()


def top1_and_kl(ref_logp: Tensor, logp: Tensor) -> tuple[float, float]:
    """ref_logp, logp (N, V) log-probabilities -> (top-1 agreement, mean KL(ref || x))."""
    ref_logp, logp = ref_logp.double(), logp.double()
    top1 = (ref_logp.argmax(-1) == logp.argmax(-1)).double().mean().item()
    kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1).mean().item()
    return top1, max(kl, 0.0)  # >= 0; rounding can leave -1e-8 for near-equal inputs


def gate_failures(figures: Mapping[str, float]) -> list[str]:
    """The gated figures that fail, as readable lines (empty: the gate passes). A figure
    not measured is not judged."""
    out = []
    for name, (op, limit) in GATE.items():
        value = figures.get(name)
        if value is not None and not value >= limit:
            shown = f"{value:.2%}" if name == "top1" else f"{value:.1f} dB"
            want = f"{limit:.0%}" if name == "top1" else f"{limit:.0f} dB"
            out.append(f"{name} {shown} (needs {op} {want})")
    return out


@torch.inference_mode()
def teacher_forced_logp(llm, lm_input: Tensor, tokens: Tensor) -> Tensor:
    """lm_input (1, L, D), tokens (N,) speech tokens -> (N, V) log-probabilities of each
    token's position given everything before it (one prefill pass)."""
    emb = torch.cat((lm_input.to(llm.dtype), llm.embed_speech(tokens.reshape(1, -1))), dim=1)
    T = emb.shape[1]
    cache = llm.new_cache(1, T)
    hidden = llm(emb, torch.arange(T)[None], kv_len=T, cache=cache)  # (1, T, D)
    L = lm_input.shape[1]
    return llm.logp(hidden[0, L - 1 : T - 1]).float()  # (N, V)
