"""torch.compile of the LLM (worker.compile) on the tiny fixture: same outputs as eager, no
recompiles after the warm-up, eager fallback with a warning when compiling fails."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from worker.compile import compile_llm
from worker.llm import load_llm
from worker.precision import apply_precision

# Compiled kernels reorder float sums (fused RMSNorm, attention, residual adds): fp32 rounding,
# a few ulp of log-probs of magnitude ~10 (measured ~5e-7). A wrong mask, position or cache row
# moves them by >= 1e-2.
TOL = 1e-5


def _load(tiny_dir, tiny_config):
    return load_llm(tiny_dir / "llm.pt", tiny_config.llm)


@pytest.fixture(scope="module")
def compiled(tiny_dir, tiny_config):
    torch._dynamo.reset()
    m = _load(tiny_dir, tiny_config)
    cache = m.new_cache(4, 512)
    with torch.inference_mode():
        assert compile_llm(m, cache)
    graphs = counters["stats"]["unique_graphs"]
    yield m, cache, graphs
    torch._dynamo.reset()


def _decode_steps(m, cache, golden, slots_a, slots_b):
    """Prefill the two golden prompts into rows ``slots_a`` / ``slots_b`` (1-row tensors),
    then 3 steps of each alone and 3 steps of both batched. -> log-probs of every step."""
    a = golden["llm"]["lm_input"].clone()  # (1, 138, D); an inference tensor, as the stage's
    b = golden["llm_no_prompt"]["lm_input"].clone()  # (1, 42, D)
    la, lb = a.shape[1], b.shape[1]
    out = []
    for x, s in ((a, slots_a), (b, slots_b)):
        h = m(x, torch.arange(x.shape[1])[None], s, x.shape[1], cache)
        out.append(m.logp(h[:, -1]))
    toks = torch.tensor([17, 4000, 25, 6000, 3, 99])
    for i in range(3):  # one row each
        for j, (s, L) in enumerate(((slots_a, la), (slots_b, lb))):
            emb = m.speech_embedding(toks[2 * i + j : 2 * i + j + 1])[:, None]  # (1, 1, D)
            out.append(m.logp(m(emb, torch.tensor([[L + i]]), s, L + i + 1, cache)[:, -1]))
    slots = torch.cat([slots_a, slots_b])
    for i in range(3, 6):  # both in one step
        emb = m.speech_embedding(toks[[i, 5 - i]])[:, None]  # (2, 1, D)
        pos = torch.tensor([[la + i], [lb + i]])
        out.append(m.logp(m(emb, pos, slots, la + i + 1, cache)[:, -1]))
    return out


@torch.inference_mode()
def test_compiled_matches_eager(compiled, tiny_dir, tiny_config, golden):
    m, cache, _ = compiled
    ref = _load(tiny_dir, tiny_config)
    ref_cache = ref.new_cache(4, 512)
    for sa, sb in ((torch.tensor([0]), torch.tensor([1])), (torch.tensor([3]), torch.tensor([1]))):
        got = _decode_steps(m, cache, golden, sa, sb)
        want = _decode_steps(ref, ref_cache, golden, sa, sb)
        for g, w in zip(got, want, strict=True):
            assert (g - w).abs().max() <= TOL
    # and the compiled prefill still reproduces upstream's golden log-probs
    g = golden["llm"]
    assert (got[0][0] - g["logp_prefill"]).abs().max() <= 1e-4


@torch.inference_mode()
def test_no_recompiles_after_warm_up(compiled):
    m, cache, graphs = compiled
    d = m.cfg.qwen.hidden_size
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in (2, 5, 16, 17, 40, 130):  # prefill lengths on both sides of the skinny path
            m(torch.randn(1, t, d), torch.arange(t)[None], torch.tensor([2]), t, cache)
        for b in (1, 2, 3, 4):
            for p in (40, 41, 200, 511):  # positions far from the warm-up's
                x = torch.randn(b, 1, d)
                pos = torch.full((b, 1), p)
                m(x, pos, torch.arange(b).flip(0), p + 1, cache)
                m(x, pos, None, p + 1, cache)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_failure_falls_back_to_eager(tiny_dir, tiny_config, golden):
    def broken(gm, example_inputs):
        raise RuntimeError("injected compiler failure")

    torch._dynamo.reset()
    m = _load(tiny_dir, tiny_config)
    cache = m.new_cache(2, 256)
    with torch.inference_mode():
        with pytest.warns(UserWarning, match="injected compiler failure"):
            assert not compile_llm(m, cache, backend=broken)
        assert all("forward" not in layer.__dict__ for layer in m.layers)
        g = golden["llm"]
        L = g["lm_input"].shape[1]
        h = m(g["lm_input"], torch.arange(L)[None], torch.tensor([0]), L, cache)
        ref = _load(tiny_dir, tiny_config)
        want = ref(g["lm_input"], torch.arange(L)[None], cache=ref.new_cache(1, 256))
    assert torch.equal(h, want)  # eager again, bit for bit
    torch._dynamo.reset()


def test_graphs_beyond_dynamos_cache_fall_back_to_eager(tiny_dir, tiny_config):
    """A warm-up whose graphs do not all fit dynamo's per-function cache would leave some shapes
    eager (silently): it counts as a failure."""
    torch._dynamo.reset()
    m = _load(tiny_dir, tiny_config)
    with torch._dynamo.config.patch(recompile_limit=2), torch.inference_mode():
        with pytest.warns(UserWarning, match="running eager"):
            assert not compile_llm(m, m.new_cache(2, 64))
    assert all("forward" not in layer.__dict__ for layer in m.layers)
    torch._dynamo.reset()


@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8"])
def test_precisions_compile_without_recompiles(precision, tiny_dir, tiny_config):
    """Each precision's layers compile (fp16: around FBGEMM's op, a graph break), match their
    own eager outputs and make no graph after the warm-up."""
    torch._dynamo.reset()
    m = apply_precision(_load(tiny_dir, tiny_config), "llm", precision)
    ref = apply_precision(_load(tiny_dir, tiny_config), "llm", precision)
    cache, ref_cache = m.new_cache(3, 256), ref.new_cache(3, 256)
    d = m.cfg.qwen.hidden_size
    g = torch.Generator().manual_seed(0)
    # bf16: fused kernels keep fp32 between ops where eager rounds each op to bf16; a couple of
    # bf16 ulps of hidden states of magnitude <= 4 (one ulp at 2..4 is 0.016)
    tol = 4e-2 if precision == "bf16" else TOL
    with torch.inference_mode():
        assert compile_llm(m, cache)
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for t in (3, 30):
                x = torch.randn(1, t, d, generator=g).to(m.dtype)
                for r in range(3):
                    args = (x, torch.arange(t)[None], torch.tensor([r]), t)
                    assert (m(*args, cache) - ref(*args, ref_cache)).abs().max() <= tol
            for b in (1, 2, 3):
                x = torch.randn(b, 1, d, generator=g).to(m.dtype)
                args = (x, torch.full((b, 1), 30), None, 31)
                assert (m(*args, cache) - ref(*args, ref_cache)).abs().max() <= tol
                args = (x, torch.full((b, 1), 31), torch.arange(b).flip(0), 32)
                assert (m(*args, cache) - ref(*args, ref_cache)).abs().max() <= tol
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
