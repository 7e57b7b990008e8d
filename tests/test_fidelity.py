"""Fidelity figures and the gate (worker/fidelity.py), on signals with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from worker.fidelity import gate_failures, log_mel_distance_db, snr_db, top1_and_kl


def test_snr_of_known_noise_level():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(100_000, generator=g)
    noisy = ref + 0.01 * torch.randn(100_000, generator=g)  # power ratio 1e4: 40 dB
    assert snr_db(ref, noisy) == pytest.approx(40.0, abs=0.1)
    assert snr_db(ref, ref.clone()) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        snr_db(ref, ref[:-1])


def test_log_mel_distance_of_a_known_gain():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(24000, generator=g)
    assert log_mel_distance_db(ref, ref, 24000) == 0.0
    # 2x amplitude = 4x power = 6.02 dB in every bin and frame
    assert log_mel_distance_db(ref, 2 * ref, 24000) == pytest.approx(6.0206, abs=1e-3)


def test_top1_and_kl():
    ref = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), -1)
    same_top = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]), -1)
    top1, kl = top1_and_kl(ref, ref)
    assert top1 == 1.0 and kl == pytest.approx(0.0, abs=1e-12)
    top1, kl = top1_and_kl(ref, same_top)
    assert top1 == 1.0 and kl > 0
    flipped = ref[:, [1, 0, 2]]  # row 0's best token moves; row 1's too
    top1, _ = top1_and_kl(ref, flipped)
    assert top1 == 0.0
    # KL(p || q) by hand for row 0 vs same_top row 0
    p, q = ref[0].exp(), same_top[0].exp()
    expect = ((p * (p.log() - q.log())).sum().item() + top1_and_kl(ref[1:], same_top[1:])[1]) / 2
    assert top1_and_kl(ref, same_top)[1] == pytest.approx(expect, rel=1e-6)  # fp32 by hand


def test_gate_names_each_failing_figure():
    assert gate_failures({"mel_snr_db": 45.0, "wave_snr_db": 31.0, "top1": 0.995}) == []
    fails = gate_failures({"mel_snr_db": 38.2, "wave_snr_db": 31.0, "top1": 0.97})
    assert fails == ["mel_snr_db 38.2 dB (needs >= 40 dB)", "top1 97.00% (needs >= 99%)"]
    assert gate_failures({"wave_snr_db": float("nan")}) == ["wave_snr_db nan dB (needs >= 30 dB)"]
    assert gate_failures({}) == []  # nothing measured, nothing judged
