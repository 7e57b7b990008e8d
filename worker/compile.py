"""``torch.compile`` for the LLM (``COSY_LLM_COMPILE=1``): compile, warm up, or fall back.

:func:`compile_llm` compiles the decoder block (``TransformerBlock.forward``) once with dynamic
shapes and installs it on every layer of the model, in place: all 24 layers share its graphs
(their weights are graph inputs), so compiling costs one layer's trace, not 24. The model's
``forward`` (RoPE gather, mask, final norm) stays eager and is unchanged for its callers; pass
``kv_len`` (a host int) so no step reads a tensor back.

Graphs, all made by the warm-up at stage start (never on a request), then reused for every
position, prompt length and batch size: prefill of up to 16 rows and of more (the fp32 Linear
takes its skinny path up to 16 rows), single-row decode (B = T = 1: dynamo specializes size 1),
batched decode of 2..16 rows (and of 17+ if the cache has that many slots), each decode with
the cache rows given as ``slots`` and as rows ``0..B-1`` (``slots=None``: cache views, no
gather). ``kv_len`` is symbolic: attention covers ``cache[:kv_len]`` only, not gpt-fast's
whole-cache mask, which at 4096 positions would stream 100 MB of fp32 K/V per row per step
against 1.46 GB of weights (360 MB in int8).

Those are 6 graphs (8 with more than 16 slots), within dynamo's default of 8 per code object;
one process compiles one LLM (another precision's modules would need graphs of their own). If
compiling or the warm-up fails, or its graphs do not fit, the layers go back to eager and a
warning says why.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

import torch

from worker.llm import SKINNY_ROWS, CosyVoice3LM, LLMCache, TransformerBlock

log = logging.getLogger(__name__)


def compile_llm(model: CosyVoice3LM, cache: LLMCache, backend: str | Callable = "inductor") -> bool:
    """Compile ``model``'s decoder layers in place and warm up every graph on ``cache`` (its
    first rows, positions 0..17: scratch that prefill overwrites). -> True if compiled, False
    if it fell back to eager (with a warning). Run it, and the decoding, under
    ``torch.inference_mode()`` with inputs made there (as the LLM stage does): grad mode and
    inference tensors are part of what a graph is guarded on."""
    block = torch.compile(TransformerBlock.forward, dynamic=True, backend=backend)
    for layer in model.layers:
        layer.forward = functools.partial(block, layer)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            warm_up(model, cache)  # graphs that do not fit dynamo's cache would run eager
    except Exception as e:  # noqa: BLE001 - any compiler failure means: run eager
        uncompile_llm(model)
        warnings.warn(f"torch.compile of the LLM failed, running eager: {e!r}", stacklevel=2)
        log.warning("torch.compile of the LLM failed, running eager: %r", e)
        return False
    return True


def uncompile_llm(model: CosyVoice3LM) -> None:
    """Put the eager layers back."""
    for layer in model.layers:
        layer.__dict__.pop("forward", None)


def warm_up(model: CosyVoice3LM, cache: LLMCache) -> None:
    """Run each shape class once (see the module docstring) on ``cache``."""
    d = model.cfg.qwen.hidden_size
    for t in (8, SKINNY_ROWS + 1):  # prefill: skinny rows and GEMM rows
        if t < cache.max_seq:
            model(torch.zeros(1, t, d, dtype=model.dtype), torch.arange(t)[None],
                  torch.tensor([0]), t, cache)  # fmt: skip
    for b in (1, 2, SKINNY_ROWS + 1):  # decode: one row, skinny rows, GEMM rows
        if b <= cache.max_batch:
            x = torch.zeros(b, 1, d, dtype=model.dtype)  # (B, 1, D)
            pos = torch.full((b, 1), 7)  # (B, 1)
            model(x, pos, torch.arange(b), 8, cache)
            model(x, pos, None, 8, cache)
