"""Prompt audio: loading, resampling and the three feature extractors of the CosyVoice3 frontend.

This module owns everything between a prompt file and the arrays the models eat:

* :func:`load_audio` reads any format libsndfile reads, from a path or from a complete file's
  bytes (float32, channels averaged, PCM16 as x/32768 -- what torchaudio 2.3.1's soundfile
  backend returns) and rejects broken input (not audio, truncated WAV, empty, NaN) with
  :class:`AudioError` instead of letting it reach the models. :func:`check_not_silent` refuses
  a silent prompt (peak below -60 dBFS).
* :func:`resample` is torchaudio's ``transforms.Resample`` at its defaults (``sinc_interp_hann``,
  ``lowpass_filter_width=6``, ``rolloff=0.99``) rewritten in torch: same kernel (built in float64,
  stored as float32), same padding, same strided ``conv1d``, same output length. It reproduces
  the golden ``speech_16k`` bit for bit, so it is the default; ``soxr`` is not used.
* :func:`load_wav` is upstream's ``load_wav`` (resample straight from the file rate, refuse rates
  below 16 kHz with a clear error instead of an assert).
* :func:`prompt_mel_24k` (``matcha.utils.audio.mel_spectrogram`` with CV3's settings),
  :func:`whisper_logmel_128` (``whisper.log_mel_spectrogram(x, n_mels=128)``) and
  :func:`campplus_fbank` (torchaudio ``kaldi.fbank(x, num_mel_bins=80, dither=0)`` minus its
  per-utterance mean, rewritten in torch; ``kaldi-native-fbank`` was measured 6.2e-4 away from
  the golden, this port is exact).

The slaney mel filterbank (librosa's ``filters.mel`` with ``htk=False, norm='slaney'``) is built
here in numpy, including librosa's float32 rounding order, so librosa is not a dependency.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

__all__ = [
    "AudioError",
    "MIN_DURATION_S",
    "MIN_SOURCE_RATE",
    "SILENCE_PEAK_DBFS",
    "SILENCE_RMS_DBFS",
    "check_not_silent",
    "level_dbfs",
    "campplus_fbank",
    "kaldi_fbank",
    "load_audio",
    "load_wav",
    "prompt_mel_24k",
    "resample",
    "slaney_mel_filterbank",
    "whisper_logmel_128",
]

MIN_DURATION_S = 0.1
"""Shortest accepted audio; shorter clips give no usable features (and break reflect padding)."""

MIN_SOURCE_RATE = 16000
"""Upstream ``load_wav`` asserts the file rate is at least this whenever it resamples."""


SILENCE_PEAK_DBFS = -60.0
"""A prompt whose peak (DC removed) is below this is refused as silent."""
SILENCE_RMS_DBFS = -75.0
"""... and so is one whose RMS is below this (a lone click in silence)."""


class AudioError(ValueError):
    """The audio cannot be used as a prompt; the message says why."""


# ---------------------------------------------------------------------------------------------
# Loading


def _source_name(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<audio data, {len(source)} bytes>"
    return str(source)


_WAV_SIZE_PLACEHOLDERS = (0xFFFFFFFF, 0x7FFFFFFF)  # streamed WAVs: size unknown when written


def _wav_truncation(f, total: int) -> str | None:
    """For a RIFF/WAVE file: why it is truncated (its ``data`` chunk declares more bytes than
    the file holds), else None. libsndfile silently reads what is there."""
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= total:
        f.seek(pos)
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        size = int.from_bytes(chunk[4:8], "little")
        if chunk[:4] == b"data":
            available = total - (pos + 8)
            if size not in _WAV_SIZE_PLACEHOLDERS and size > available:
                return (
                    f"its WAV header declares {size} bytes of samples but only {available} "
                    "are there"
                )
            return None
        pos += 8 + size + (size & 1)
    return None


def load_audio(
    source: str | Path | bytes, min_duration: float = MIN_DURATION_S
) -> tuple[np.ndarray, int]:
    """Read audio as float32 mono ``(N,)`` samples and its sample rate.

    ``source`` is a file path or a complete audio file's bytes (any format libsndfile reads).
    Integer PCM is scaled by libsndfile (PCM16 -> x/32768), float files are read as stored, and
    several channels are averaged. Raises :class:`AudioError` for a missing or empty file,
    bytes that are not audio, a truncated WAV, zero samples, NaN/inf samples, or a clip shorter
    than ``min_duration``.
    """
    name = _source_name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data_bytes = bytes(source)
        if not data_bytes:
            raise AudioError("audio data is empty (0 bytes)")
        f = io.BytesIO(data_bytes)
        total = len(data_bytes)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"audio file not found: {path}")
        total = path.stat().st_size
        if total == 0:
            raise AudioError(f"audio file is empty (0 bytes): {path}")
        f = open(path, "rb")  # noqa: SIM115 -- closed below
    try:
        truncated = _wav_truncation(f, total)
        if truncated:
            raise AudioError(f"audio file is truncated ({truncated}): {name}")
        f.seek(0)
        try:
            data, sr = sf.read(f, dtype="float32", always_2d=True)
        except Exception as e:  # libsndfile's errors (LibsndfileError, RuntimeError, ...)
            why = str(e).split(": ", 1)[-1] if ": " in str(e) else str(e)
            raise AudioError(f"not a readable audio file: {name} ({why})") from e
    finally:
        f.close()
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(f"audio file has zero samples: {name}")
    if sr <= 0:
        raise AudioError(f"audio file has an invalid sample rate {sr}: {name}")
    if not np.isfinite(data).all():
        raise AudioError(f"audio contains NaN or infinite samples: {name}")
    # torch mean over channels, as upstream (speech.mean(dim=0)); identical for one channel.
    x = torch.from_numpy(np.ascontiguousarray(data.T)).mean(dim=0).numpy()
    duration = x.shape[0] / sr
    if duration < min_duration:
        raise AudioError(
            f"audio is too short: {duration:.3f} s ({x.shape[0]} samples at {sr} Hz), "
            f"need at least {min_duration} s: {name}"
        )
    return x.astype(np.float32, copy=False), int(sr)


def level_dbfs(x: np.ndarray) -> tuple[float, float]:
    """``(peak, rms)`` of ``x`` in dBFS (full scale 1.0) after removing its mean (DC offset);
    ``-inf`` for digital silence."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        return -math.inf, -math.inf
    a = a - a.mean()
    peak = float(np.abs(a).max())
    rms = float(np.sqrt(np.mean(a * a)))

    def db(v: float) -> float:
        return 20.0 * math.log10(v) if v > 0 else -math.inf

    return db(peak), db(rms)


def check_not_silent(x: np.ndarray, what: str = "prompt audio") -> None:
    """Raise :class:`AudioError` if ``x`` is silent or nearly so: peak below
    :data:`SILENCE_PEAK_DBFS` or RMS below :data:`SILENCE_RMS_DBFS` (DC offset removed).

    A silent prompt gives no speaker or speech information (CAM++ returns a near-zero
    embedding), so it is refused rather than encoded.
    """
    peak, rms = level_dbfs(x)
    if peak < SILENCE_PEAK_DBFS or rms < SILENCE_RMS_DBFS:

        def fmt(v: float) -> str:
            return "-inf" if v == -math.inf else f"{v:.1f}"

        raise AudioError(
            f"{what} is silent (peak {fmt(peak)} dBFS, RMS {fmt(rms)} dBFS; need a peak of at "
            f"least {SILENCE_PEAK_DBFS:.0f} dBFS and an RMS of at least "
            f"{SILENCE_RMS_DBFS:.0f} dBFS): record the speaker speaking"
        )


def load_wav(path: str | Path, target_sr: int, min_sr: int = MIN_SOURCE_RATE) -> np.ndarray:
    """Upstream ``load_wav``: mono float32 at ``target_sr``, resampled straight from the file.

    Raises :class:`AudioError` when the file rate differs from ``target_sr`` and is below
    ``min_sr`` (upstream asserts there), besides the errors of :func:`load_audio`.
    """
    x, sr = load_audio(path)
    if sr != target_sr:
        if sr < min_sr:
            raise AudioError(
                f"sample rate {sr} Hz is too low: prompt audio must be at least {min_sr} Hz "
                f"(got {path})"
            )
        x = resample(x, sr, target_sr)
    return x


# ---------------------------------------------------------------------------------------------
# Resampling (torchaudio.transforms.Resample, defaults)


@lru_cache(maxsize=16)
def _sinc_kernel(
    orig: int, new: int, lowpass_filter_width: int, rolloff: float
) -> tuple[torch.Tensor, int]:
    """Kernel ``(new, 1, 2*width+orig)`` float32 and ``width`` for gcd-reduced rates."""
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # torchaudio builds this term from an int64 arange divided in the default dtype (float32).
    t = torch.arange(0, -new, -1)[:, None, None] / new + idx
    t *= base_freq
    t = t.clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    scale = base_freq / orig
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels *= window * scale
    return kernels.to(torch.float32), width


def resample(
    x: np.ndarray | torch.Tensor,
    sr_in: int,
    sr_out: int,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
) -> np.ndarray:
    """Band-limited sinc resampling, equal to ``torchaudio.transforms.Resample(sr_in, sr_out)``.

    ``x`` is ``(N,)`` or ``(..., N)``; returns float32 numpy of length ``ceil(N*sr_out/sr_in)``.
    """
    if sr_in <= 0 or sr_out <= 0 or int(sr_in) != sr_in or int(sr_out) != sr_out:
        raise ValueError(f"sample rates must be positive integers, got {sr_in} -> {sr_out}")
    wav = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if sr_in == sr_out:
        return wav.numpy().copy()
    gcd = math.gcd(int(sr_in), int(sr_out))
    orig, new = int(sr_in) // gcd, int(sr_out) // gcd
    kernel, width = _sinc_kernel(orig, new, lowpass_filter_width, float(rolloff))
    shape = wav.shape
    wav = wav.reshape(-1, shape[-1])
    num_wavs, length = wav.shape
    with torch.no_grad():
        padded = torch.nn.functional.pad(wav, (width, width + orig))
        out = torch.nn.functional.conv1d(padded[:, None], kernel, stride=orig)
    out = out.transpose(1, 2).reshape(num_wavs, -1)
    target_length = math.ceil(new * length / orig)
    out = out[..., :target_length]
    return out.reshape(shape[:-1] + out.shape[-1:]).numpy()


# ---------------------------------------------------------------------------------------------
# Mel filterbank (librosa.filters.mel, htk=False, norm="slaney", dtype float32)


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = f >= min_log_hz
    mels = np.where(log_t, min_log_mel + np.log(np.maximum(f, 1e-30) / min_log_hz) / logstep, mels)
    return mels


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = m >= min_log_mel
    return np.where(log_t, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


@lru_cache(maxsize=8)
def slaney_mel_filterbank(
    sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)``.

    Shape ``(n_mels, n_fft//2+1)`` float32. Reproduces librosa's arithmetic order: triangle
    weights stored to float32, then multiplied in float64 by the slaney area norm.
    """
    if fmax is None:
        fmax = float(sr) / 2
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mels = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    mel_f = _mel_to_hz_slaney(mels)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]
    weights.flags.writeable = False
    return weights


# ---------------------------------------------------------------------------------------------
# Features


def _as_1d_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"expected mono samples (N,) or (1, N), got shape {tuple(t.shape)}")
    return t


def prompt_mel_24k(x24: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Flow prompt mel of 24 kHz audio, ``(1, T, 80)`` float32 with ``T = N // 480``.

    ``matcha.utils.audio.mel_spectrogram(x, n_fft=1920, num_mels=80, sampling_rate=24000,
    hop_size=480, win_size=1920, fmin=0, fmax=None, center=False)``, transposed as
    ``frontend._extract_speech_feat`` returns it.
    """
    n_fft, hop, win = 1920, 480, 1920
    y = _as_1d_tensor(x24)[None]
    pad = (n_fft - hop) // 2
    if y.shape[-1] <= pad:
        raise AudioError(f"audio too short for the prompt mel: {y.shape[-1]} samples at 24 kHz")
    mel_basis = torch.from_numpy(np.array(slaney_mel_filterbank(24000, n_fft, 80, 0.0, None)))
    with torch.no_grad():
        y = torch.nn.functional.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            y,
            n_fft,
            hop_length=hop,
            win_length=win,
            window=torch.hann_window(win),
            center=False,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        spec = torch.view_as_real(spec)
        spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
        spec = torch.matmul(mel_basis, spec)
        spec = torch.log(torch.clamp(spec, min=1e-5))
    return spec.transpose(1, 2).contiguous()


def whisper_logmel_128(x16: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speech-tokenizer input: ``whisper.log_mel_spectrogram(x16, n_mels=128)``.

    Returns feats ``(1, 128, T)`` float32 and lengths ``[T]`` int32 (the two ONNX inputs).
    """
    n_fft, hop = 400, 160
    audio = _as_1d_tensor(x16)[None]
    if audio.shape[-1] <= n_fft // 2:
        raise AudioError(f"audio too short for the speech tokenizer: {audio.shape[-1]} samples")
    filters = torch.from_numpy(np.array(slaney_mel_filterbank(16000, n_fft, 128)))
    with torch.no_grad():
        stft = torch.stft(audio, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
        magnitudes = stft[..., :-1].abs() ** 2
        mel_spec = filters @ magnitudes
        log_spec = torch.clamp(mel_spec, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        log_spec = (log_spec + 4.0) / 4.0
    return log_spec, torch.tensor([log_spec.shape[2]], dtype=torch.int32)


@lru_cache(maxsize=4)
def _kaldi_mel_banks(
    num_bins: int, padded: int, sample_freq: float, low_freq: float
) -> torch.Tensor:
    """Kaldi triangular mel banks ``(num_bins, padded//2 + 1)`` float32 (last column zero).

    Same arithmetic as ``torchaudio.compliance.kaldi.get_mel_banks`` without VTLN warping
    (warp factor 1): mel = 1127 ln(1 + f/700), high_freq = Nyquist, float32 tensors.
    """
    num_fft_bins = padded / 2
    high_freq = 0.5 * sample_freq
    fft_bin_width = sample_freq / padded
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    mel_freq_delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left_mel = mel_low + b * mel_freq_delta
    center_mel = mel_low + (b + 1.0) * mel_freq_delta
    right_mel = mel_low + (b + 2.0) * mel_freq_delta
    mel = 1127.0 * (1.0 + fft_bin_width * torch.arange(num_fft_bins) / 700.0).log()
    mel = mel.unsqueeze(0)
    up_slope = (mel - left_mel) / (center_mel - left_mel)
    down_slope = (right_mel - mel) / (right_mel - center_mel)
    bins = torch.max(torch.zeros(1), torch.min(up_slope, down_slope))
    return torch.nn.functional.pad(bins.to(torch.float32), (0, 1), mode="constant", value=0.0)


def kaldi_fbank(
    x16: np.ndarray | torch.Tensor, num_mel_bins: int = 80, sample_frequency: float = 16000.0
) -> torch.Tensor:
    """``torchaudio.compliance.kaldi.fbank(x, num_mel_bins=80, dither=0)`` as ``(T, 80)``.

    torchaudio's defaults: 25 ms frames every 10 ms with ``snip_edges``, per-frame DC removal,
    pre-emphasis 0.97 (first sample replicated), povey window (``hann(periodic=False)**0.85``),
    zero-padding to 512, power spectrum, kaldi mel banks from 20 Hz to Nyquist, log with a
    float32-epsilon floor; no energy column. Computed in float32 like torchaudio; the waveform
    is used as is (no 32768 scaling).
    """
    wav = _as_1d_tensor(x16)
    window_shift = int(sample_frequency * 10.0 * 0.001)
    window_size = int(sample_frequency * 25.0 * 0.001)
    padded = 1 if window_size == 0 else 2 ** (window_size - 1).bit_length()
    n = wav.shape[0]
    if n < window_size:
        raise AudioError(f"audio too short for the kaldi fbank: {n} samples < {window_size}")
    eps = torch.tensor(torch.finfo(torch.float32).eps)
    with torch.no_grad():
        m = 1 + (n - window_size) // window_shift
        frames = wav.as_strided((m, window_size), (window_shift, 1))
        frames = frames - torch.mean(frames, dim=1).unsqueeze(1)
        prev = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
        frames = frames - 0.97 * prev[:, :-1]
        window = torch.hann_window(window_size, periodic=False).pow(0.85).unsqueeze(0)
        frames = frames * window
        frames = torch.nn.functional.pad(
            frames.unsqueeze(0), (0, padded - window_size), mode="constant", value=0
        ).squeeze(0)
        spectrum = torch.fft.rfft(frames).abs().pow(2.0)
        banks = _kaldi_mel_banks(num_mel_bins, padded, float(sample_frequency), 20.0)
        mel_energies = torch.mm(spectrum, banks.T)
        return torch.max(mel_energies, eps).log()


def campplus_fbank(x16: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Speaker-embedding input: :func:`kaldi_fbank` of 16 kHz audio minus its mean over time.

    ``(1, T, 80)`` float32 with ``T = 1 + (N - 400) // 160`` -- the array upstream feeds to
    ``campplus.onnx``.
    """
    feat = kaldi_fbank(x16)
    feat = feat - feat.mean(dim=0, keepdim=True)
    return feat.unsqueeze(0)
