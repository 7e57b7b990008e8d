"""The flow's DiT step in ONNX Runtime: its export, its cached graph, and the adapter.

This file owns:

- :func:`export_dit_step`: ``DiT.forward_chunk`` (one stream's incremental step, the CFG pair as
  batch 2) written as an ONNX graph with dynamic new-frame (``Tn``) and past (``past``) axes:

    x, mu, cond (2, 80, Tn)   spks (2, 80)   t (2,)
    k_cache, v_cache (depth, 2, H, past, Dh)   conv_ctx (2, 2, D, 30)
    -> velocity (2, 80, Tn), k_new, v_new (depth, 2, H, Tn, Dh), conv_ctx_out (2, 2, D, 30)

  The chunk's first absolute frame is the past length (``start = k_cache.shape[3]``, computed in
  the graph), and the block-causal mask is always computed in the graph (one graph serves the
  multi-block first chunk, one-block chunks and the final partial one; for a block-aligned
  one-block chunk it lets every key through). TorchScript exporter, opset 17.
- :func:`dit_onnx_name` / :func:`dit_onnx_path`: the graph cached per model fingerprint
  (``flow.pt``, the yaml, the source of worker/dit.py and this file, the opset; the torch /
  onnx versions), exported on first use through :func:`worker.ort.cached_export`
  (:class:`worker.ort.ExportError` naming the directory when it cannot be written).
- :class:`OrtDiT`: ``DiT.forward_segments``'s contract on an ORT session, so
  ``FlowStream(flow, ..., dit=OrtDiT(...))`` and :func:`worker.flow_stream.run_chunks` run it
  unchanged (one session run per segment); :func:`load_ort_dit` builds one for a model dir.

Sessions come from :func:`worker.ort.load_session` (threads, spinning, the optimized graph
cached beside the export).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from worker import dit as dit_module
from worker.config import YAML_NAME, DiTConfig
from worker.dit import POS_CONV_KERNEL, DiT, Segment
from worker.ort import cached_export, load_session, model_fingerprint

log = logging.getLogger(__name__)

OPSET = 17
INPUTS = ("x", "mu", "cond", "spks", "t", "k_cache", "v_cache", "conv_ctx")
OUTPUTS = ("velocity", "k_new", "v_new", "conv_ctx_out")
DYNAMIC_AXES = {
    "x": {2: "Tn"}, "mu": {2: "Tn"}, "cond": {2: "Tn"}, "velocity": {2: "Tn"},
    "k_cache": {3: "past"}, "v_cache": {3: "past"}, "k_new": {3: "Tn"}, "v_new": {3: "Tn"},
}  # fmt: skip


class DiTStep(nn.Module):
    """``DiT.forward_chunk`` with ``start`` taken from the past length, for the exporter."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, x, mu, cond, spks, t, k_cache, v_cache, conv_ctx):
        # traced, k_cache.shape[3] is a 0-d tensor of the graph: the mask and RoPE positions
        # follow the past length (an int start would freeze them, or drop the mask)
        start = k_cache.shape[3]
        return self.dit.forward_chunk(x, mu, cond, spks, t, start, k_cache, v_cache, conv_ctx)


def _layer_norm(g, x, normalized_shape, weight, bias, eps, cudnn_enable):
    """aten::layer_norm whose ``normalized_shape`` was traced from ``x.shape`` (``modulate``):
    the exporter's own symbolic wants it constant; the sizes are static in x's type."""
    from torch.onnx import symbolic_helper as sh

    n = len(sh._unpack_list(normalized_shape))
    shape = sh._get_tensor_sizes(x)[-n:]
    if any(not isinstance(s, int) for s in shape):
        raise ValueError(f"layer_norm over a dynamic axis: {shape}")
    if sh._is_none(weight):
        weight = g.op("Constant", value_t=torch.ones(shape))
    if sh._is_none(bias):
        bias = g.op("Constant", value_t=torch.zeros(shape))
    eps = sh._get_const(eps, "f", "eps")
    return g.op("LayerNormalization", x, weight, bias, epsilon_f=eps, axis_i=-n)


def _attention(dim_head: int):
    """A symbolic for aten::scaled_dot_product_attention: ``softmax(q Dh^-0.5 @ k^T + mask) @ v``.

    The exporter's own form also scales k (a pass over every past key per layer) and zeroes NaN
    rows of the softmax (another pass over the scores) for fully masked rows, which this graph
    never has: every query sees its own block."""
    from torch.onnx import symbolic_helper as sh

    @sh.parse_args("v", "v", "v", "v", "f", "b", "v", "b")
    def symbolic(g, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
        if dropout_p or is_causal or enable_gqa or not sh._is_none(scale):
            raise ValueError("only scaled_dot_product_attention(q, k, v, mask) is exported")
        q = g.op("Mul", q, g.op("Constant", value_t=torch.tensor(dim_head**-0.5)))
        scores = g.op("MatMul", q, g.op("Transpose", k, perm_i=[0, 1, 3, 2]))  # (B, H, Tq, Tk)
        if not sh._is_none(mask):  # bool (Tq, Tk): False -> -inf
            zero, ninf = (g.op("Constant", value_t=torch.tensor(f)) for f in (0.0, -math.inf))
            scores = g.op("Add", scores, g.op("Where", mask, zero, ninf))
        return g.op("MatMul", g.op("Softmax", scores, axis_i=-1), v)

    return symbolic


def export_dit_step(dit: DiT, path: str | Path) -> Path:
    """Write ``dit``'s incremental step to ``path`` (see the module docstring for the graph).

    Traced with a two-block chunk over 50 past frames, so the mask and the RoPE positions are
    recorded as functions of the inputs' shapes; the AdaLN modulations are recomputed from
    ``t`` (the memo is off outside inference mode)."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    c = dit.cfg
    path = Path(path)
    g = torch.Generator().manual_seed(0)
    Tn, past = 2 * c.static_chunk_size, c.static_chunk_size
    x, mu, cond = (torch.randn(2, c.mel_dim, Tn, generator=g) for _ in range(3))
    kv = (torch.randn(c.depth, 2, c.heads, past, c.dim_head, generator=g) for _ in range(2))
    args = (
        x, mu, cond, torch.randn(2, c.spk_dim, generator=g), torch.full((2,), 0.5), *kv,
        torch.randn(2, 2, c.dim, POS_CONV_KERNEL - 1, generator=g),
    )  # fmt: skip
    symbolics = {
        "aten::layer_norm": _layer_norm,
        "aten::scaled_dot_product_attention": _attention(c.dim_head),
    }
    for name, fn in symbolics.items():
        register_custom_op_symbolic(name, fn, OPSET)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation / tracer warnings
            torch.onnx.export(
                DiTStep(dit).eval(), args, str(path), dynamo=False, opset_version=OPSET,
                input_names=list(INPUTS), output_names=list(OUTPUTS), dynamic_axes=DYNAMIC_AXES,
            )  # fmt: skip
    finally:
        for name in symbolics:
            unregister_custom_op_symbolic(name, OPSET)
    return path


# ---- the cached graph ------------------------------------------------------------------------


def _export_code() -> bytes:
    """The code the exported graph comes from (worker/dit.py and this file)."""
    return Path(dit_module.__file__).read_bytes() + Path(__file__).read_bytes()


def dit_onnx_name(model_dir: str | Path) -> str:
    """The cache file name of ``model_dir``'s DiT step: ``dit-<fingerprint>.onnx``."""
    model_dir = Path(model_dir)
    yaml = (model_dir / YAML_NAME).read_bytes()
    fp = model_fingerprint(model_dir / "flow.pt", yaml, _export_code(), f"opset {OPSET}")
    return f"dit-{fp[:24]}.onnx"


def dit_onnx_path(
    model_dir: str | Path,
    cache_dir: str | Path,
    dit: DiT | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The DiT step of ``model_dir`` as ONNX in ``cache_dir``, exported on first use (from
    ``dit`` if given, else loaded from ``model_dir``). Raises :class:`worker.ort.ExportError`, or
    ``ConfigError`` for a path that is not a model dir."""
    from worker.model_dir import check_layout

    check_layout(Path(model_dir))

    def export(path: Path) -> None:
        model = dit
        if model is None:
            from worker.model_dir import load_model_dir

            (progress or log.info)(f"loading the flow of {model_dir} ...")
            model = load_model_dir(model_dir, stages=("flow",)).flow.decoder.estimator
        export_dit_step(model, path)

    return cached_export(cache_dir, dit_onnx_name(model_dir), export, progress)


# ---- the adapter -----------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy()


class OrtDiT:
    """``DiT.forward_segments`` on an ORT session of :func:`export_dit_step`'s graph: a drop-in
    ``dit`` for :class:`worker.flow_stream.FlowStream` / ``run_chunks``.

    Each segment is one session run over its new frames and its past K/V (the graph is one
    stream's step: the packed GEMMs of several streams that torch gets are not shared here).
    The past is a view of the segment's (depth, 2, H, capacity, Dh) buffer; ORT takes dense
    inputs only, so it is copied per run into one reused block (K then V): a fresh allocation
    would fault its pages in on every run, ~5x the copy itself. The block keeps the largest
    past seen (2 x depth x 2 x H x past x Dh floats)."""

    def __init__(self, session, cfg: DiTConfig):
        names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        if names != (list(INPUTS), list(OUTPUTS)):
            raise ValueError(f"not a DiT step graph: inputs/outputs {names}")
        shape = session.get_inputs()[INPUTS.index("k_cache")].shape
        if shape[:3] + shape[4:] != [cfg.depth, 2, cfg.heads, cfg.dim_head]:
            raise ValueError(f"DiT step graph K/V {shape} does not match the config {cfg}")
        self.session = session
        self.cfg = cfg
        self._scratch = np.empty(0, np.float32)

    def _dense(self, k: torch.Tensor, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """k, v (depth, 2, H, past, Dh) views -> dense copies in the reused block."""
        n = k.numel()
        if self._scratch.size < 2 * n:
            self._scratch = np.empty(max(2 * n, int(1.5 * self._scratch.size)), np.float32)
        kd, vd = self._scratch[:n].reshape(k.shape), self._scratch[n : 2 * n].reshape(v.shape)
        torch.from_numpy(kd).copy_(k)
        torch.from_numpy(vd).copy_(v)
        return kd, vd

    def forward_segments(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor,
        segs: list[Segment],
        kv_out: list | None = None,
    ) -> torch.Tensor:
        """As :meth:`worker.dit.DiT.forward_segments`: x, mu, cond (2, 80, sum Tn) the segments'
        frames in order, t (2,) or () -> velocity (2, 80, sum Tn); each in-place segment's new
        K/V are written into its buffers at ``start``, its ``conv_ctx_out`` set; with
        ``kv_out`` the new K/V of every layer are appended as (2, H, sum Tn, Dh) pairs."""
        if x.dtype != torch.float32:
            raise TypeError(f"the ONNX DiT step is float32: got {x.dtype} frames")
        if t.ndim == 0:
            t = t.repeat(x.shape[0])
        t_np = _np(t)
        outs, new, o, ctx = [], [], 0, None
        for s in segs:
            n = s.frames
            ctx = s.conv_ctx if s.conv_ctx is not None else ctx
            if s.in_place:  # the past: (depth, 2, H, start, Dh) views of the buffers
                k_past, v_past = self._dense(s.k[:, :, :, : s.start], s.v[:, :, :, : s.start])
            elif s.k.shape[3] == s.start:
                k_past, v_past = _np(s.k), _np(s.v)
            else:
                raise ValueError(f"segment at {s.start} with a {s.k.shape[3]}-frame cache")
            feeds = {
                "x": _np(x[:, :, o : o + n]), "mu": _np(mu[:, :, o : o + n]),
                "cond": _np(cond[:, :, o : o + n]), "spks": _np(s.spks), "t": t_np,
                "k_cache": k_past, "v_cache": v_past, "conv_ctx": _np(ctx),
            }  # fmt: skip
            vel, k_new, v_new, ctx_out = map(torch.from_numpy, self.session.run(None, feeds))
            if s.in_place:
                s.k[:, :, :, s.start : s.start + n] = k_new
                s.v[:, :, :, s.start : s.start + n] = v_new
            ctx = s.conv_ctx_out = ctx_out
            outs.append(vel)  # (2, 80, n)
            new.append((k_new, v_new))  # (depth, 2, H, n, Dh) each
            o += n
        if kv_out is not None:
            k_all = torch.cat([k for k, _ in new], dim=3)
            v_all = torch.cat([v for _, v in new], dim=3)
            kv_out.extend(zip(k_all.unbind(0), v_all.unbind(0), strict=True))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def load_ort_dit(
    model_dir: str | Path,
    cache_dir: str | Path,
    threads: int,
    spin: bool = False,
    dit: DiT | None = None,
    progress: Callable[[str], None] | None = None,
) -> OrtDiT:
    """An :class:`OrtDiT` for ``model_dir``: its cached export (made first if missing, from
    ``dit`` if given) in a :func:`worker.ort.load_session` with ``threads`` intra-op threads
    (the optimized graph cached beside the export when the cache dir allows)."""
    from worker.config import read_model_config

    path = dit_onnx_path(model_dir, cache_dir, dit, progress)
    cfg = dit.cfg if dit is not None else read_model_config(model_dir).flow.dit
    return OrtDiT(load_session(path, threads, spin), cfg)
