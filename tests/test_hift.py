"""HiFT vocoder: parity with the upstream goldens, checkpoint layout and conversion."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import FIXTURES, REPO
from worker.checkpoint import CheckpointError, load_state_dict_file, meta_state_dict
from worker.hift import (
    HiFTGenerator,
    checkpoint_shapes,
    convert_checkpoint,
    hann_window,
    load_hift,
    stft_bases,
)
from worker.noise import fixed_noise_for

# Tolerances (max abs). On the golden host type (AVX2) f0 and the source are bit-exact and the
# audio is within DFT_TOL (below); other ISAs move results by ~1e-7 here, and by up to 3.4e-5
# (f0) / 1.9e-4 (long streamed audio) on an AMX Xeon according to the fixture README.
F0_TOL = 1e-4  # Hz
SOURCE_TOL = 1e-4
AUDIO_TOL = 1e-4  # 64-frame golden mel
AUDIO_LONG_TOL = 1e-3  # 400-frame end-to-end audio (README: ~1e-3 for audio across CPUs)
# The STFT / iSTFT are convolutions with a DFT basis (exportable to ONNX) where upstream runs
# torch's FFT: the rounding differs, ~1.3e-7 measured on the audio.
DFT_TOL = 1e-6


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def noise(tiny_config):
    return fixed_noise_for(tiny_config)


@pytest.fixture(scope="module")
def hift(tiny_dir, tiny_config, noise):
    return load_hift(tiny_dir / "hift.pt", tiny_config.hift, noise)


@pytest.fixture(scope="module")
def official_cfg(tiny_config):
    return dataclasses.replace(tiny_config.hift, base_channels=512, f0_cond_channels=512)


# ---- numerics vs. golden ----


def test_hann_window_is_scipy_periodic_hann():
    # scipy get_window('hann', 16, fftbins=True) = 0.5 - 0.5 cos(2 pi n / 16), in float64
    ref = torch.hann_window(16, periodic=True, dtype=torch.float64).float()
    assert torch.equal(hann_window(16), ref)


def test_stft_bases_are_torch_stft_and_istft():
    # the DFT-basis convolutions compute what upstream's torch.stft / torch.istft compute
    window, hop = hann_window(16), 4
    forward, inverse = stft_bases(16)
    x = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    spec = torch.stft(x, 16, hop, 16, window=window, return_complex=True)  # centered
    padded = torch.nn.functional.pad(x[:, None], (8, 8), mode="reflect")
    ours = torch.nn.functional.conv1d(padded, forward, stride=hop)  # (1, 18, 1001)
    assert maxdiff(ours, torch.cat([spec.real, spec.imag], dim=1)) <= 1e-5

    ola = torch.nn.functional.conv_transpose1d(ours, inverse, stride=hop)
    envelope = torch.nn.functional.conv_transpose1d(
        torch.ones(1, 1, ours.shape[2]), (window**2).view(1, 1, -1), stride=hop
    )
    y = (ola / envelope)[:, 0, 8:-8]  # centered: n_fft / 2 samples go at both ends
    ref = torch.istft(spec, 16, hop, 16, window=window)
    assert maxdiff(y, ref) <= 1e-5 and maxdiff(ref, x) <= 1e-5


def test_f0_finalize_golden(hift, golden):
    g = golden["hift"]
    f0 = hift.f0(g["mel"], finalize=True)
    assert f0.dtype == torch.float32 and f0.shape == (1, g["mel"].shape[2])
    assert maxdiff(f0, g["f0_finalize"]) <= F0_TOL
    # the voiced/unvoiced split the fixture was built for (91% of frames > 10 Hz)
    voiced = (f0 > 10).float().mean().item()
    assert voiced == pytest.approx(g["voiced_fraction"])


def test_f0_nonfinal_is_prefix(hift, golden):
    mel = golden["hift"]["mel"]
    full = hift.f0(mel, finalize=True)
    part = hift.f0(mel, finalize=False)
    assert part.shape == (1, mel.shape[2] - 3)
    assert maxdiff(part, full[:, : part.shape[1]]) <= 1e-5


def test_audio_and_source_finalize_golden(hift, golden):
    g = golden["hift"]
    audio, source = hift.inference(g["mel"], finalize=True)
    assert audio.shape == (1, g["mel"].shape[2] * 480)
    assert maxdiff(source, g["source_finalize"]) <= SOURCE_TOL
    assert maxdiff(audio, g["audio_finalize"]) <= AUDIO_TOL


def test_audio_nonfinal_golden(hift, golden):
    g = golden["hift"]
    m = g["mel"].shape[2]
    audio, source = hift.inference(g["mel"], finalize=False)
    assert audio.shape == (1, (m - 8) * 480) and source.shape == (1, 1, (m - 3) * 480)
    assert maxdiff(audio, g["audio_nonfinal"]) <= AUDIO_TOL
    final, _ = hift.inference(g["mel"], finalize=True)
    assert maxdiff(audio, final[:, : audio.shape[1]]) <= 1e-6


def test_audio_nonstream_golden(hift, golden):
    # non-streaming token2wav = HiFT(finalize=True) on the non-streaming flow mel
    mel = golden["flow"]["mel_nonstreaming_finalize"]
    audio, _ = hift.inference(mel, finalize=True)
    assert maxdiff(audio, golden["stream"]["audio_nonstream"]) <= AUDIO_LONG_TOL


def _has_avx2() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


_AVX2_SCRIPT = """
import torch
from worker.config import read_model_config
from worker.hift import load_hift
from worker.noise import fixed_noise_for
d = {d!r}
cfg = read_model_config(d)
g = torch.load(d + "/golden.pt", weights_only=True)
m = load_hift(d + "/hift.pt", cfg.hift, fixed_noise_for(cfg))
torch.set_num_threads(2)
h = g["hift"]
a, s = m.inference(h["mel"], finalize=True)
b, _ = m.inference(h["mel"], finalize=False)
print(torch.equal(m.f0(h["mel"]), h["f0_finalize"]), torch.equal(s, h["source_finalize"]),
      (a - h["audio_finalize"]).abs().max().item(), (b - h["audio_nonfinal"]).abs().max().item())
"""


@pytest.mark.skipif(not _has_avx2(), reason="needs an x86 CPU with AVX2")
def test_bit_exact_with_avx2_kernels(tiny_dir):
    # The goldens come from an AVX2-only CPU, 2 threads. Forcing the same kernels (ATen, oneDNN,
    # MKL) must reproduce f0 and the source bit for bit (the op order and layouts are
    # upstream's), and the audio up to the DFT's rounding (upstream: FFT).
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY="avx2",
        ONEDNN_MAX_CPU_ISA="AVX2",
        MKL_ENABLE_INSTRUCTIONS="AVX2",
        PYTHONPATH=str(REPO),
    )
    out = subprocess.run(
        [sys.executable, "-c", _AVX2_SCRIPT.format(d=str(tiny_dir))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    f0_exact, source_exact, audio, nonfinal = out.stdout.split()
    assert (f0_exact, source_exact) == ("True", "True"), out.stdout + out.stderr
    assert float(audio) <= DFT_TOL and float(nonfinal) <= DFT_TOL, out.stdout


def test_too_short_mel_is_refused(hift):
    with pytest.raises(ValueError, match="finalize=False"):
        hift.inference(torch.zeros(1, 80, 7), finalize=False)
    with pytest.raises(ValueError):
        hift.inference(torch.zeros(1, 64, 20), finalize=True)


# ---- module / checkpoint layout ----


def test_module_state_dict(hift, tiny_config):
    sd = hift.state_dict()
    assert not any("parametrizations" in k or "weight_g" in k for k in sd)
    for k, v in sd.items():
        want = torch.float64 if k.startswith("f0_predictor.") else torch.float32
        assert v.dtype == want, k
        assert v.device.type == "cpu", k
    assert not list(hift.buffers())  # the fixed noise is a plain attribute
    # the tiny checkpoint has exactly the layout checkpoint_shapes describes
    ck = load_state_dict_file(FIXTURES / "cosyvoice3-tiny" / "hift.pt")
    assert {k: tuple(v.shape) for k, v in ck.items()} == checkpoint_shapes(tiny_config.hift)


def test_official_layout_on_meta(official_cfg):
    manifest = json.loads((FIXTURES / "cosyvoice3-shapes.json").read_text())["hift"]
    manifest = {k: tuple(v) for k, v in manifest.items()}
    shapes = checkpoint_shapes(official_cfg)
    assert shapes == manifest
    assert list(shapes) == list(manifest)  # same order as upstream's state_dict

    with torch.device("meta"):
        model = HiFTGenerator(official_cfg)
    msd = model.state_dict()
    converted = convert_checkpoint(meta_state_dict(manifest), official_cfg, "official/hift.pt")
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in msd.items()
    }
    assert {k: v.dtype for k, v in converted.items()} == {k: v.dtype for k, v in msd.items()}
    assert sum(math.prod(s) for s in shapes.values()) == 20_779_887  # reference doc, 2.1


def test_old_style_keys_and_prefix_load_the_same(tmp_path, tiny_dir, tiny_config, noise, hift):
    sd = load_state_dict_file(tiny_dir / "hift.pt", mmap=False)
    old = {}
    for k, v in sd.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        old["generator." + k] = v
    assert any(k.endswith(".weight_g") for k in old)
    path = tmp_path / "hift_old.pt"
    torch.save(old, path)
    other = load_hift(path, tiny_config.hift, noise)
    for k, v in hift.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    mel = torch.randn(1, 80, 12, generator=torch.Generator().manual_seed(3))
    a, s = hift.inference(mel, finalize=True)
    b, t = other.inference(mel, finalize=True)
    assert torch.equal(a, b) and torch.equal(s, t)


def test_misshaped_key_is_refused(tiny_dir, tiny_config):
    sd = load_state_dict_file(tiny_dir / "hift.pt", mmap=False)
    key = "ups.1.parametrizations.weight.original1"
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1], sd[key].shape[2] + 1)
    with pytest.raises(CheckpointError, match=re.escape(key)) as e:
        convert_checkpoint(sd, tiny_config.hift, "some/hift.pt")
    assert "some/hift.pt" in str(e.value)


def test_missing_and_unexpected_keys_are_refused(tiny_dir, tiny_config):
    sd = load_state_dict_file(tiny_dir / "hift.pt", mmap=False)
    del sd["conv_post.bias"]
    sd["m_source.l_sin_gen.sine_waves"] = torch.zeros(1, 4, 9)
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(sd, tiny_config.hift, "hift.pt")
    assert "conv_post.bias" in str(e.value)
    assert "m_source.l_sin_gen.sine_waves" in str(e.value)
