"""Incremental HiFT (``HiFTStream`` over ``HiFTGenerator.forward_chunk``): chunked pushes
reproduce the one-shot vocoder, follow upstream's emission schedule, cost the same per chunk
wherever they are, carry a fixed-shape tensor state, and share no state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from worker.hift import load_hift
from worker.hift_stream import HiFTStream
from worker.noise import fixed_noise_for

STREAM_TOL = 1e-5  # stream vs. one-shot on the same CPU: only conv blocking differs (~1e-7)
GOLDEN_TOL = 1e-4  # vs. the upstream goldens made on another CPU (AVX2)
CHUNKINGS = {
    "blocks_50": [50] * 8,
    "upstream": [76, 100, 200, 24],
    "uneven": [7, 13, 61, 1, 2, 3, 99, 17, 197],
    "one_shot": [400],
}


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def hift(tiny_dir, tiny_config):
    return load_hift(tiny_dir / "hift.pt", tiny_config.hift, fixed_noise_for(tiny_config))


@pytest.fixture(scope="module")
def mel(golden) -> torch.Tensor:
    return golden["stream"]["mel_concat"]  # (1, 80, 400)


@pytest.fixture(scope="module")
def full_audio(hift, mel) -> torch.Tensor:
    return hift.inference(mel, finalize=True)[0]  # (1, 192000)


@pytest.fixture(scope="module")
def long_mel(mel) -> torch.Tensor:
    """(1, 80, 1500) smooth random mel (30 s) with the golden mel's per-channel mean and std."""
    frames = 1500
    z = torch.randn(1, 80, frames // 10 + 2, generator=torch.Generator().manual_seed(0))
    z = F.interpolate(z, size=frames, mode="linear", align_corners=True)
    z = z / z.std(dim=2, keepdim=True)
    return mel.mean(dim=2, keepdim=True) + mel.std(dim=2, keepdim=True) * z


def run_stream(stream: HiFTStream, mel: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == mel.shape[2]
    outs, start = [], 0
    for i, n in enumerate(sizes):
        outs.append(stream.push(mel[:, :, start : start + n], finalize=i == len(sizes) - 1))
        start += n
    return outs


def random_sizes(total: int, seed: int, lo: int = 1, hi: int = 30) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(int(torch.randint(lo, hi + 1, (1,), generator=gen)), total - sum(sizes)))
    return sizes


class ConvWork(TorchFunctionMode):
    """Counts multiply-adds of every conv1d run inside the block (the vocoder's whole cost)."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv1d:
            x, w = args[0], args[1]
            stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
            dilation = args[5] if len(args) > 5 else kwargs.get("dilation", 1)
            stride = stride[0] if isinstance(stride, tuple) else stride
            dilation = dilation[0] if isinstance(dilation, tuple) else dilation
            width = (x.shape[-1] - dilation * (w.shape[-1] - 1) - 1) // stride + 1
            self.macs += width * w.numel()
        return func(*args, **kwargs)


# ---- (a) chunked == one-shot ----


@pytest.mark.parametrize("name", [*CHUNKINGS, "random_1_30"])
def test_chunked_equals_one_shot(hift, mel, full_audio, name):
    sizes = CHUNKINGS.get(name) or random_sizes(mel.shape[2], seed=1)
    audio = torch.cat(run_stream(HiFTStream(hift), mel, sizes), dim=1)
    assert audio.shape == full_audio.shape  # same total sample count: 480 per mel frame
    assert maxdiff(audio, full_audio) <= STREAM_TOL


@pytest.mark.parametrize("sizes", [[1], [2, 3], [5, 0, 3], [8], [4, 5], [9, 0], [3, 3, 3, 3]])
def test_short_utterances(hift, mel, sizes):
    m = mel[:, :, : sum(sizes)]
    audio = torch.cat(run_stream(HiFTStream(hift), m, sizes), dim=1)
    assert maxdiff(audio, hift.inference(m, finalize=True)[0]) <= STREAM_TOL


def test_emits_what_upstream_nonfinal_emits(hift, mel):
    # after a non-final push with M frames in total: (M - 8) * 480 samples, a prefix of the
    # one-shot non-final pass on those M frames
    stream, emitted = HiFTStream(hift), []
    for start, n in [(0, 7), (7, 1), (8, 1), (9, 14), (23, 40)]:
        emitted.append(stream.push(mel[:, :, start : start + n]))
        m = start + n
        total = sum(a.shape[1] for a in emitted)
        assert total == max(0, m - 8) * 480
        if m > 8:
            ref = hift.inference(mel[:, :, :m], finalize=False)[0]
            assert maxdiff(torch.cat(emitted, dim=1), ref) <= STREAM_TOL


# ---- (b) upstream's streamed goldens ----


def test_upstream_chunks_reproduce_golden_stream(hift, golden):
    g = golden["stream"]
    stream, outs = HiFTStream(hift), []
    for i, chunk in enumerate(g["chunks"]):
        outs.append(stream.push(chunk["mel_kept"], finalize=i == len(g["chunks"]) - 1))
        assert outs[-1].shape[1] == chunk["audio_samples"]
        assert maxdiff(outs[-1], chunk["audio"]) <= GOLDEN_TOL
    assert maxdiff(torch.cat(outs, dim=1), g["audio_concat"]) <= GOLDEN_TOL


# ---- (c) long utterance: phase carry and linear cost ----


def test_phase_sum_continues_bit_exactly():
    # The NSF phase is upstream's float32 torch.cumsum; on CPU it accumulates in float64 and
    # rounds each output. The stream relies on this: continuing the float64 sum is bit-exact,
    # while restarting from the float32 output (the naive carry) is not.
    x = torch.rand(1, 20000, 9, generator=torch.Generator().manual_seed(0)) * 0.05
    ref = torch.cumsum(x, dim=1)
    acc64, acc32, parts64, parts32 = torch.zeros(1, 1, 9, dtype=torch.float64), 0, [], []
    for c in x.split(777, dim=1):
        y = torch.cumsum(torch.cat([acc64, c.double()], dim=1), dim=1)[:, 1:]
        acc64 = y[:, -1:]
        parts64.append(y.float())
        parts32.append(torch.cumsum(c, dim=1) + acc32)
        acc32 = parts32[-1][:, -1:]
    assert torch.equal(torch.cat(parts64, dim=1), ref)
    assert not torch.equal(torch.cat(parts32, dim=1), ref)


def test_long_source_is_bit_exact(hift, long_mel):
    f0 = hift.f0(long_mel)  # (1, 1500)
    # voiced enough that the 9th harmonic's phase reaches well past 1e4 rad
    assert (f0 > 10).float().mean() > 0.5
    assert ((f0 * 9 / 24000) % 1).sum() * 480 * 2 * math.pi > 1e4
    noise = hift.noise.sine(f0.shape[1] * 480)  # (1, 720000, 9)
    full, _ = hift.m_source(f0, noise, hift.m_source.initial_state())  # (1, 720000)
    cycles, parts = hift.m_source.initial_state(), []
    for start in range(0, f0.shape[1], 50):
        rows = noise[:, start * 480 : (start + 50) * 480]
        s, cycles = hift.m_source(f0[:, start : start + 50], rows, cycles)
        parts.append(s)
    assert torch.equal(torch.cat(parts, dim=1), full)
    # and the vocoder's step (pre-start frames masked) computes the same source
    assert torch.equal(hift.inference(long_mel, finalize=True)[1][:, 0], full)


def test_long_stream_equals_one_shot_at_constant_cost(hift, long_mel):
    with ConvWork() as one_shot:
        full = hift.inference(long_mel, finalize=True)[0]  # (1, 720000)
    stream, outs, work = HiFTStream(hift), [], []
    for i, chunk in enumerate(long_mel.split(50, dim=2)):
        with ConvWork() as w:
            outs.append(stream.push(chunk, finalize=i == 1500 // 50 - 1))
        work.append(w.macs)
    audio = torch.cat(outs, dim=1)
    assert audio.shape == full.shape
    assert maxdiff(audio, full) <= STREAM_TOL
    # each push costs the same wherever it is (the first one included: its first frames are
    # the masked ones before the start), and all pushes together do exactly the one-shot
    # pass's work: nothing is recomputed (upstream's recompute makes chunk k cost about k times
    # chunk 1)
    assert len(set(work[:-1])) == 1
    assert sum(work) == one_shot.macs


def test_state_is_fixed_shape_tensors(hift, mel):
    # what makes the step exportable: the same tensor shapes and dtypes in and out, whatever
    # the chunk sizes
    stream = HiFTStream(hift)
    layout = [(s.shape, s.dtype) for s in stream.state]
    for start, n in [(0, 1), (1, 7), (8, 50), (58, 3)]:
        stream.push(mel[:, :, start : start + n])
        assert [(s.shape, s.dtype) for s in stream.state] == layout
    assert len(layout) == len(hift.state_names())
    assert int(stream.state[hift.state_names().index("frames")]) == 61


def test_step_is_pluggable(hift, mel, full_audio):
    calls = []

    def step(mel, noise, state, finalize):
        calls.append((mel.shape[2], noise.shape[1], finalize))
        return hift.forward_chunk(mel, noise, state, finalize)

    audio = torch.cat(run_stream(HiFTStream(hift, step=step), mel, [100, 0, 300]), dim=1)
    assert torch.equal(audio, torch.cat(run_stream(HiFTStream(hift), mel, [100, 300]), dim=1))
    assert maxdiff(audio, full_audio) <= STREAM_TOL
    # one step per push with frames (or the last), each with the noise of its source samples
    assert calls == [(100, 100 * 480, False), (300, 303 * 480, True)]


# ---- (d) streams are independent ----


def test_interleaved_streams_equal_each_alone(hift, mel, long_mel):
    jobs = [(mel, [50] * 8), (long_mel[:, :, :300], random_sizes(300, seed=2))]
    alone = [run_stream(HiFTStream(hift), m, sizes) for m, sizes in jobs]
    streams = [HiFTStream(hift) for _ in jobs]
    starts, together = [0, 0], [[], []]
    for step in range(max(len(sizes) for _, sizes in jobs)):
        for j in (1, 0):
            m, sizes = jobs[j]
            if step < len(sizes):
                n = sizes[step]
                chunk = m[:, :, starts[j] : starts[j] + n]
                together[j].append(streams[j].push(chunk, finalize=step == len(sizes) - 1))
                starts[j] += n
    for a, b in zip(alone, together):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---- API ----


def test_misuse_is_refused(hift, mel):
    stream = HiFTStream(hift)
    with pytest.raises(ValueError):
        stream.push(torch.zeros(1, 64, 10))
    with pytest.raises(ValueError, match="finalize"):
        stream.push(mel[:, :, :0], finalize=True)
    stream.push(mel[:, :, :10], finalize=True)
    with pytest.raises(RuntimeError, match="after finalize"):
        stream.push(mel[:, :, 10:20])
