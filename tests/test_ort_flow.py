"""The flow's DiT step in ONNX Runtime (worker/ort_flow.py): the exported graph run through
``OrtDiT`` gives the torch stream's mel (and upstream's golden) chunk by chunk, each run sees
only its new frames, and exports are cached per model fingerprint.

Tolerances: ORT's kernels (MLAS GEMMs, its own softmax / layer norm) round differently from
torch's, ~1e-7 relative per op; through 10 Euler steps the mel moves by <= 1.7e-6 on the tiny
model (measured values at each assert). ``MEL_TOL`` 1e-4 is the repo's fp32 tolerance against the
goldens (made by upstream on another CPU), used for both comparisons."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from tests.conftest import max_abs
from tests.test_cache_readonly import read_only  # noqa: F401 -- fixture
from tests.test_flow_stream import BLOCK_TOKENS, MEL_TOL, run_stream
from worker import ort
from worker.dit import Segment
from worker.flow_stream import FlowStream, run_chunks
from worker.ort import ExportError, export_dir, model_fingerprint, optimized_path
from worker.ort_flow import OrtDiT, dit_onnx_name, dit_onnx_path, load_ort_dit


@pytest.fixture(scope="module")
def export(flow, tiny_dir, tmp_path_factory):
    """The tiny model's DiT step exported once for the module: (the worker's cache dir, the
    graph in its export dir)."""
    root = tmp_path_factory.mktemp("cache")
    return root, dit_onnx_path(tiny_dir, export_dir(root), flow.decoder.estimator)


@pytest.fixture(scope="module")
def ort_dit(flow, tiny_dir, export):
    """The step in a 1-thread session (its optimized graph cached beside the export)."""
    return load_ort_dit(tiny_dir, export[1].parent, threads=1, dit=flow.decoder.estimator)


@pytest.fixture(scope="module")
def prompts(golden):
    """P -> (token (1, 200), prompt_token, prompt_feat, embedding): the golden request
    (P = 37: the first chunk carries the prompt-only block and two more) and one without a
    prompt (P = 0: every chunk one block)."""
    f = golden["flow"]
    return {
        37: (f["token"], f["prompt_token"], f["prompt_feat"], f["embedding"]),
        0: (f["token"], f["prompt_token"][:, :0], f["prompt_feat"][:, :0], f["embedding"]),
    }


class RecordingSession:
    """An ORT session that records, per run, (new frames, past frames) of its inputs."""

    def __init__(self, session):
        self.session = session
        self.runs: list[tuple[int, int]] = []

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        assert feeds["k_cache"].shape == feeds["v_cache"].shape
        self.runs.append((feeds["x"].shape[2], feeds["k_cache"].shape[3]))
        return self.session.run(names, feeds)


# --- the step alone ---------------------------------------------------------------------------


def test_functional_step_equals_the_golden_block_causal_dit(flow, golden, ort_dit):
    """Not-in-place segments (the functional form: the caller keeps the K/V from ``kv_out``)
    over the golden DiT input in two chunks: a block, then a partial one."""
    d = golden["dit"]  # (2, 80, 70) CFG batch: blocks [0, 50) and [50, 70)
    c = flow.decoder.estimator.cfg
    k = v = torch.zeros(c.depth, 2, c.heads, 0, c.dim_head)
    ctx = torch.zeros(2, 2, c.dim, 30)
    outs = []
    for a, b in ((0, 50), (50, 70)):
        seg = Segment(a, b - a, d["spks"], k, v, ctx, in_place=False)
        kv: list = []
        x, mu, cond = (d[n][:, :, a:b] for n in ("x", "mu", "cond"))
        outs.append(ort_dit.forward_segments(x, mu, cond, d["t"], [seg], kv_out=kv))
        assert len(kv) == c.depth and kv[0][0].shape == (2, c.heads, b - a, c.dim_head)
        k = torch.cat((k, torch.stack([kk for kk, _ in kv])), dim=3)
        v = torch.cat((v, torch.stack([vv for _, vv in kv])), dim=3)
        ctx = seg.conv_ctx_out
    err = max_abs(torch.cat(outs, dim=2), d["out_streaming_true"])
    assert err < MEL_TOL, f"max |diff| {err:.3g}"  # measured 8.3e-7


def test_frames_in_another_dtype_are_refused(golden, ort_dit):
    d = golden["dit"]
    x = d["x"][:, :, :50].bfloat16()
    with pytest.raises(TypeError, match="float32"):
        ort_dit.forward_segments(x, x, x, d["t"], [])


# --- (a) ORT stream == torch stream == golden ---------------------------------------------


@pytest.mark.parametrize(("P", "hop"), [(37, 25), (0, 50)])
def test_ort_stream_equals_the_torch_stream_and_the_golden(flow, golden, prompts, ort_dit, P, hop):
    token, *prompt = prompts[P]
    ours = run_stream(FlowStream(flow, *prompt, hop_tokens=hop, dit=ort_dit), token)
    ref = run_stream(FlowStream(flow, *prompt, hop_tokens=hop), token)
    assert [m.shape for m in ours] == [m.shape for m in ref]
    err = max_abs(torch.cat(ours, dim=2), torch.cat(ref, dim=2))
    assert err < MEL_TOL, f"ORT vs torch: max |diff| {err:.3g}"  # measured <= 1.7e-6
    if P == 37:
        err = max_abs(torch.cat(ours, dim=2), golden["flow"]["mel_streaming_finalize"])
        assert err < MEL_TOL, f"vs golden: {err:.3g}"  # measured 1.4e-6 (torch 9.5e-7)


def test_packed_streams_equal_their_torch_streams(flow, prompts, ort_dit):
    """run_chunks packs two streams' chunks into one call per Euler step: OrtDiT runs their
    segments one by one, each over its own cache."""
    streams = {
        impl: [FlowStream(flow, *prompts[P][1:], dit=dit) for P in (37, 0)]
        for impl, dit in (("ort", ort_dit), ("torch", None))
    }
    mels = {impl: [[], []] for impl in streams}
    for impl, pair in streams.items():
        for s in pair:
            s.feed(prompts[37][0])
        while not all(s.finished for s in pair):
            jobs = [s.plan_chunk(finalize=True) for s in pair if not s.finished]
            with torch.inference_mode():
                for job, x in zip(jobs, run_chunks(jobs)):
                    mels[impl][pair.index(job.stream)].append(job.stream.finish_chunk(job, x)[0])
    for i in range(2):
        err = max_abs(torch.cat(mels["ort"][i], dim=2), torch.cat(mels["torch"][i], dim=2))
        assert err < MEL_TOL, f"stream {i}: max |diff| {err:.3g}"  # measured <= 1.7e-6


# --- (b) linear: each run gets only the new frames -----------------------------------------


@pytest.mark.parametrize("hop", [25, 50])
def test_each_run_gets_only_its_new_frames_and_the_past(flow, prompts, ort_dit, hop):
    rec = RecordingSession(ort_dit.session)
    token, prompt_token, *rest = prompts[37]
    P, N = prompt_token.shape[1], token.shape[1]
    dit = OrtDiT(rec, flow.decoder.estimator.cfg)
    run_stream(FlowStream(flow, prompt_token, *rest, hop_tokens=hop, dit=dit), token)

    # expected segments per chunk, in frames (as tests/test_flow_stream.py derives them):
    # the prompt-only block, the rest of the first hop, one hop each, the final remainder
    first = math.ceil(P / BLOCK_TOKENS) * BLOCK_TOKENS + hop
    prefix = (P - 3) // BLOCK_TOKENS * BLOCK_TOKENS  # blocks ending >= 3 tokens before P
    chunks = [[2 * prefix, 2 * (first - prefix)]]
    chunks += [[2 * hop]] * ((P + N - 3 - first) // hop)
    chunks.append([2 * (P + N) - sum(map(sum, chunks))])
    expect, done = [], 0
    for segs in chunks:  # every Euler step of a chunk: the same runs
        runs = []
        for frames in segs:
            runs.append((frames, done))  # new frames on top of every frame before
            done += frames
        expect += runs * flow.cfg.n_timesteps
    assert rec.runs == expect
    assert chunks[0][1] > 50 and chunks[-1][0] % 50  # a multi-block run, a partial one


# --- (c) the export cache ----------------------------------------------------------------------


def test_the_cached_export_is_reused(tiny_dir, export, monkeypatch):
    path = export[1]
    stamp = path.stat().st_mtime_ns

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr("worker.ort_flow.export_dit_step", no_export)
    lines: list[str] = []
    assert dit_onnx_path(tiny_dir, path.parent, progress=lines.append) == path
    assert path.stat().st_mtime_ns == stamp
    assert lines == [f"using {path}"]


def first_block(dit, golden) -> torch.Tensor:
    """The step's velocity over the golden DiT input's first block (no past)."""
    d, c = golden["dit"], dit.cfg
    k, v = (torch.zeros(c.depth, 2, c.heads, 0, c.dim_head) for _ in range(2))
    seg = Segment(0, 50, d["spks"], k, v, torch.zeros(2, 2, c.dim, 30), in_place=False)
    x, mu, cond = (d[n][:, :, :50] for n in ("x", "mu", "cond"))
    return dit.forward_segments(x, mu, cond, d["t"], [seg])


def test_the_optimized_graph_is_cached_and_reused(golden, tiny_dir, export, ort_dit):
    optimized = optimized_path(export[1])
    assert optimized.is_file() and optimized.parent == export[1].parent
    stamp = optimized.stat().st_mtime_ns
    ort.clear_cache()  # a new session, from the cached optimized graph
    again = load_ort_dit(tiny_dir, export[1].parent, threads=1)
    assert again.session is not ort_dit.session
    assert optimized.stat().st_mtime_ns == stamp
    assert torch.equal(first_block(again, golden), first_block(ort_dit, golden))


def test_a_read_only_cache_serves_its_exports_and_refuses_new_ones(
    flow,
    golden,
    tiny_dir,
    export,
    ort_dit,
    tmp_path,
    read_only,  # noqa: F811
):
    filled, empty = tmp_path / "filled", tmp_path / "empty"
    filled.mkdir()
    empty.mkdir()
    shutil.copy(export[1], filled)
    read_only(filled)
    read_only(empty)
    with pytest.raises(ExportError, match=f"export cache {empty} is not writable"):
        dit_onnx_path(tiny_dir, empty, flow.decoder.estimator)
    served = load_ort_dit(tiny_dir, filled, threads=1)  # optimized in memory, nothing written
    assert [p.name for p in filled.iterdir()] == [export[1].name]
    assert torch.equal(first_block(served, golden), first_block(ort_dit, golden))


def test_first_use_exports_with_progress_and_leaves_no_temp_file(flow, tiny_dir, export, tmp_path):
    lines: list[str] = []
    path = dit_onnx_path(tiny_dir, tmp_path / "fresh", flow.decoder.estimator, lines.append)
    assert path.name == export[1].name  # same model, same code: same fingerprint
    assert lines[0].startswith("exporting") and lines[-1].startswith(f"exported {path.name}")
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{path.name}.lock", path.name]


def test_the_fingerprint_follows_the_weights_and_the_code(tmp_path):
    w = tmp_path / "flow.pt"
    w.write_bytes(b"x" * 3_000_000)
    base = model_fingerprint(w, "code")
    assert model_fingerprint(w, "code") == base
    assert model_fingerprint(w, "other code") != base
    mtime = w.stat().st_mtime_ns
    w.write_bytes(b"x" * 1_500_000 + b"y" + b"x" * 1_499_999)  # the middle: seen by the mtime
    os.utime(w, ns=(mtime, mtime + 10**9))  # (a write may keep the coarse timestamp)
    assert model_fingerprint(w, "code") != base


def test_the_name_follows_the_opset(tiny_dir, export, monkeypatch):
    assert dit_onnx_name(tiny_dir) == export[1].name
    monkeypatch.setattr("worker.ort_flow.OPSET", 18)
    assert dit_onnx_name(tiny_dir) != export[1].name


def test_the_cli_finds_the_cached_graph(tiny_dir, export, monkeypatch, capsys):
    from tuning.export import main

    root, path = export
    monkeypatch.setattr("worker.ort_flow.export_dit_step", None)  # not called: cached
    assert main(["--model-dir", str(tiny_dir), "--cache-dir", str(root), "--only", "flow"]) == 0
    out = capsys.readouterr()
    assert out.out == f"flow: {path}\n"
    assert f"flow: using {path}" in out.err


def test_the_cli_fails_with_the_reason(tiny_dir, tmp_path, capsys):
    from tuning.export import main

    (tmp_path / "file").write_text("")
    assert main(["--model-dir", str(tmp_path), "--cache-dir", str(tmp_path)]) == 1
    assert "not a CosyVoice3 model dir" in capsys.readouterr().err
    assert main(["--model-dir", str(tiny_dir), "--cache-dir", str(tmp_path / "file")]) == 1
    assert "is not writable" in capsys.readouterr().err
