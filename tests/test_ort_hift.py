"""HiFT on ONNX Runtime (worker/ort_hift.py): the exported step (``export_hift_step``) run by
``OrtHiFTStep`` matches the torch step chunk by chunk, state included, and streams the
whole-utterance audio; the graphs are cached per model fingerprint (``hift_onnx_paths``,
``load_ort_hift``); and ``worker.ort.session`` (options, per-process cache, optimized-graph
cache)."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from tests.test_cache_readonly import read_only  # noqa: F401 -- fixture
from worker import ort
from worker.hift import HiFTGenerator, load_hift
from worker.hift_stream import HiFTStream
from worker.noise import fixed_noise_for
from worker.ort import ExportError, export_dir, optimized_path
from worker.ort_hift import OrtHiFTStep, _onnx_names, hift_onnx_paths, load_ort_hift

# ORT runs the same graph with its own kernels: MLAS convolutions and GEMMs sum in another
# order, and its sin / exp / tanh round differently. That is float32 rounding (~1e-7) per op
# through ~80 conv layers and a phase of up to 1e5 rad (measured: <= 3e-7 on the audio here);
# 1e-4 is the bound the torch port itself meets against the upstream goldens across CPUs.
ORT_TOL = 1e-4
STATE_TOL = 1e-4  # carried activations, |x| up to ~10 (measured: ~1.3e-6)
STREAM_TOL = 1e-5  # torch stream vs. torch one-shot (see tests/test_hift_stream.py)
SIZES = [7, 50, 13, 1, 100, 50, 179]  # 400 frames; 7 < the 8-frame start-up; the last is final


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def hift(tiny_dir, tiny_config):
    return load_hift(tiny_dir / "hift.pt", tiny_config.hift, fixed_noise_for(tiny_config))


@pytest.fixture(scope="module")
def exported(hift, tiny_dir, tmp_path_factory):
    """The tiny model's step and final graphs exported once for the module through the cache:
    root (the worker's cache dir), step, final, the progress lines, the export dir's files."""
    root = tmp_path_factory.mktemp("cache")
    lines: list[str] = []
    step, final = hift_onnx_paths(tiny_dir, export_dir(root), hift, lines.append)
    files = sorted(p.name for p in step.parent.iterdir())
    return SimpleNamespace(root=root, step=step, final=final, lines=lines, files=files)


@pytest.fixture(scope="module")
def graphs(exported):
    return exported.step, exported.final


@pytest.fixture(scope="module")
def ort_step(graphs):
    return OrtHiFTStep(*graphs, threads=1)


@pytest.fixture(scope="module")
def mel(golden) -> torch.Tensor:
    return golden["stream"]["mel_concat"]  # (1, 80, 400)


def test_ort_step_matches_torch_step(hift, ort_step, mel):
    torch_state, ort_state = hift.initial_state(), hift.initial_state()
    torch_out, ort_out, start = [], [], 0
    for i, n in enumerate([*SIZES, 0]):  # a final push without new frames flushes
        final = i == len(SIZES)
        chunk = mel[:, :, start : start + n]
        noise = hift.chunk_noise(start, n, final)
        with torch.inference_mode():
            a, torch_state = hift.forward_chunk(chunk, noise, torch_state, final)
        b, ort_state = ort_step(chunk, noise, ort_state, final)
        assert maxdiff(b, a) <= ORT_TOL, (i, n)
        assert [s.dtype for s in ort_state] == [s.dtype for s in torch_state]
        for name, s, t in zip(hift.state_names(), ort_state, torch_state):
            assert maxdiff(s, t) <= STATE_TOL, name
        torch_out.append(a)
        ort_out.append(b)
        start += n
    # both streams, less the 8 frames before the start, are the whole-utterance audio
    full = hift.inference(mel, finalize=True)[0]  # (1, 192000)
    skip = hift.out_delay * hift.upsample_scale
    assert maxdiff(torch.cat(torch_out, dim=1)[:, skip:], full) <= STREAM_TOL
    assert maxdiff(torch.cat(ort_out, dim=1)[:, skip:], full) <= ORT_TOL


def test_ort_stream_reproduces_golden_stream(hift, ort_step, golden):
    # upstream's streamed chunks (recompute-everything) through a HiFTStream on ORT
    g = golden["stream"]
    stream, outs = HiFTStream(hift, step=ort_step), []
    for i, chunk in enumerate(g["chunks"]):
        outs.append(stream.push(chunk["mel_kept"], finalize=i == len(g["chunks"]) - 1))
        assert outs[-1].shape[1] == chunk["audio_samples"]
        assert maxdiff(outs[-1], chunk["audio"]) <= ORT_TOL
    assert maxdiff(torch.cat(outs, dim=1), g["audio_concat"]) <= ORT_TOL


def test_graph_interface(hift, ort_step):
    names = hift.state_names()
    for sess in ort_step.sessions.values():
        ins, outs = sess.get_inputs(), sess.get_outputs()
        assert [i.name for i in ins] == ["mel", "noise", *(f"state.{n}" for n in names)]
        assert [o.name for o in outs] == ["audio", *(f"next.{n}" for n in names)]
        assert isinstance(ins[0].shape[2], str) and isinstance(ins[1].shape[1], str)  # dynamic
        for arg, s in zip(ins[2:], hift.initial_state()):
            assert arg.shape == list(s.shape), arg.name  # the state has fixed shapes


# ---- worker.ort.session ----


def test_sessions_are_cached_per_path_threads_spin(graphs):
    step, _ = graphs
    a = ort.session(step, threads=1)
    assert ort.session(str(step), threads=1) is a
    b = ort.session(step, threads=2)
    c = ort.session(step, threads=1, spin=True)
    assert b is not a and c is not a and c is not b
    ort.clear_cache()
    assert ort.session(step, threads=1) is not a


def test_session_options(graphs):
    step, _ = graphs
    for spin in (False, True):
        opts = ort.session(step, threads=2, spin=spin).get_session_options()
        assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spin))
    with pytest.raises(ValueError, match="threads"):
        ort.session(step, threads=0)


def test_changed_file_gets_a_new_session(graphs, tmp_path):
    path = tmp_path / "step.onnx"
    path.write_bytes(graphs[0].read_bytes())
    a = ort.session(path, threads=1)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ort.session(path, threads=1) is not a


def test_optimized_graph_cache(graphs, hift, mel, tmp_path):
    step, _ = graphs
    cache = tmp_path / "opt" / "hift_step.ort.onnx"
    ort.clear_cache()
    built = ort.session(step, threads=1, optimized_cache=cache)
    assert cache.is_file() and built.get_session_options().graph_optimization_level.name == (
        "ORT_ENABLE_ALL"
    )
    ort.clear_cache()
    loaded = ort.session(step, threads=1, optimized_cache=cache)  # from the cache, as is
    assert loaded.get_session_options().graph_optimization_level.name == "ORT_DISABLE_ALL"
    feeds = {
        i.name: a.numpy()
        for i, a in zip(
            built.get_inputs(),
            (mel[:, :, :20], hift.chunk_noise(0, 20, False), *hift.initial_state()),
        )
    }
    assert (built.run(None, feeds)[0] == loaded.run(None, feeds)[0]).all()
    ort.clear_cache()


# ---- the export cache (hift_onnx_paths, load_ort_hift) ----


def run_chunks(step, hift, mel, sizes):
    """``step`` over ``mel`` in chunks of ``sizes`` frames (the last one final) -> per chunk
    (audio, state)."""
    state, start, outs = hift.initial_state(), 0, []
    for i, n in enumerate(sizes):
        final = i == len(sizes) - 1
        chunk, noise = mel[:, :, start : start + n], hift.chunk_noise(start, n, final)
        with torch.inference_mode():
            audio, state = step(chunk, noise, state, final)
        outs.append((audio, state))
        start += n
    return outs


def test_first_use_exports_both_graphs_with_progress(tiny_dir, exported):
    step_name, final_name = _onnx_names(tiny_dir)
    assert (exported.step.name, exported.final.name) == (step_name, final_name)
    fp = step_name.removeprefix("hift-step-").removesuffix(".onnx")
    assert len(fp) == 24 and final_name == f"hift-final-{fp}.onnx"
    assert exported.step.parent == export_dir(exported.root)
    lines = exported.lines  # the model was given: nothing loaded
    assert [line.split(" ", 2)[:2] for line in lines] == [
        ["exporting", step_name], ["exported", f"{step_name}:"],
        ["exporting", final_name], ["exported", f"{final_name}:"],
    ]  # fmt: skip
    locks = [f".{step_name}.lock", f".{final_name}.lock"]
    assert exported.files == sorted([*locks, step_name, final_name])  # no temp file left


def test_the_cached_export_is_reused(tiny_dir, exported, monkeypatch):
    stamps = [p.stat().st_mtime_ns for p in (exported.step, exported.final)]

    def fail(*args, **kwargs):
        raise AssertionError("exported or loaded again")

    monkeypatch.setattr("worker.ort_hift.export_hift_step", fail)
    monkeypatch.setattr("worker.model_dir.load_model_dir", fail)  # hift=None: nothing loaded
    lines: list[str] = []
    paths = hift_onnx_paths(tiny_dir, exported.step.parent, progress=lines.append)
    assert paths == (exported.step, exported.final)
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert lines == [f"using {exported.step}", f"using {exported.final}"]


def test_an_export_without_the_model_loads_it_once(tiny_dir, tmp_path, monkeypatch):
    calls: list[tuple[object, bool]] = []

    def fake_export(model, path, finalize=False):
        calls.append((model, finalize))
        path.write_bytes(b"graph")

    monkeypatch.setattr("worker.ort_hift.export_hift_step", fake_export)
    lines: list[str] = []
    step, final = hift_onnx_paths(tiny_dir, tmp_path, progress=lines.append)
    assert [f for _, f in calls] == [False, True]
    assert isinstance(calls[0][0], HiFTGenerator) and calls[1][0] is calls[0][0]
    assert [line for line in lines if line.startswith("loading")] == [
        f"loading the hift of {tiny_dir} ..."
    ]
    final.unlink()  # only the missing graph is exported again
    calls.clear()
    assert hift_onnx_paths(tiny_dir, tmp_path) == (step, final)
    assert [f for _, f in calls] == [True] and final.read_bytes() == b"graph"


def test_the_names_follow_the_code_and_the_opset(tiny_dir, exported, monkeypatch):
    names = _onnx_names(tiny_dir)
    monkeypatch.setattr("worker.ort_hift.OPSET", 18)
    assert _onnx_names(tiny_dir)[0] != names[0]
    monkeypatch.undo()
    monkeypatch.setattr("worker.ort_hift._export_code", lambda: b"other code")
    assert _onnx_names(tiny_dir)[0] != names[0]


def test_load_ort_hift_equals_the_torch_step(hift, tiny_dir, exported, mel):
    step = load_ort_hift(tiny_dir, exported.step.parent, threads=1, hift=hift)
    for p in (exported.step, exported.final):  # optimized graphs cached beside the exports
        assert optimized_path(p).is_file()
    sizes = [50, 13, 30]  # a block, a partial one, the final chunk
    ours, ref = run_chunks(step, hift, mel, sizes), run_chunks(hift.forward_chunk, hift, mel, sizes)
    for i, ((a, sa), (b, sb)) in enumerate(zip(ours, ref)):
        assert maxdiff(a, b) <= ORT_TOL, i
        for name, s, t in zip(hift.state_names(), sa, sb):
            assert maxdiff(s, t) <= STATE_TOL, (i, name)


def test_a_read_only_cache_serves_its_exports_and_refuses_new_ones(
    hift,
    tiny_dir,
    exported,
    ort_step,
    mel,
    tmp_path,
    read_only,  # noqa: F811
):
    filled, empty = tmp_path / "filled", tmp_path / "empty"
    filled.mkdir()
    empty.mkdir()
    for p in (exported.step, exported.final):
        shutil.copy(p, filled)
    read_only(filled)
    read_only(empty)
    with pytest.raises(ExportError, match=f"export cache {empty} is not writable"):
        hift_onnx_paths(tiny_dir, empty, hift)
    served = load_ort_hift(tiny_dir, filled, threads=1)  # optimized in memory, nothing written
    assert sorted(p.name for p in filled.iterdir()) == sorted(
        [exported.step.name, exported.final.name]
    )
    ours, ref = (run_chunks(s, hift, mel, [50, 20]) for s in (served, ort_step))
    for (a, _), (b, _) in zip(ours, ref):
        assert torch.equal(a, b)  # the same graph, optimized the same way


def test_the_cli_exports_hift(tiny_dir, exported, monkeypatch, capsys):
    from tuning.export import main

    monkeypatch.setattr("worker.ort_hift.export_hift_step", None)  # not called: cached
    argv = ["--model-dir", str(tiny_dir), "--cache-dir", str(exported.root), "--only", "hift"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out == f"hift: {exported.step}\nhift: {exported.final}\n"
    assert f"hift: using {exported.step}" in out.err and "hift: ready in" in out.err
