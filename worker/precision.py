"""Per-stage precision transforms: the one place that turns a loaded fp32 model into the
precision its stage runs in (``apply_precision(model, stage, precision)``, in place).

LLM decode reads every weight once per step (memory bound: ~1.46 GB of fp32 weights per token
at official dims), so its speed is set by the bytes per weight and how well the kernel streams
them (``tuning/bench_llm_precision.py`` measures both, per host):

``fp32``  unchanged: the reference, bit for bit.
``bf16``  every parameter cast to bf16; activations and the KV cache follow (the model's
          ``dtype``); log-probs stay float32. Halves the bytes; the speed depends on the host's
          bf16 GEMV (native AVX512_BF16 / AMX).
``fp16``  the decoder's Linear weights packed as fp16 for FBGEMM's fp16 GEMM
          (``quantized::linear_dynamic_fp16``): fp32 activations, fp32 accumulation, half the
          bytes. Near fp32 accuracy (10-bit mantissa). x86 only (FBGEMM).
``int8``  the decoder's Linear weights as int8 with one float scale per output channel
          (symmetric, weight only, as gpt-fast): ``aten::_weight_int8pack_mm`` with bf16
          activations. A quarter of the bytes; activations are never quantized, so batched rows
          stay independent and activation outliers cost nothing.

Under fp16/int8 the speech head (``llm_decoder``, 6761 x 896: 24 MB in fp32, the logits that
sampling reads), the norms and the embeddings (a row gathered per token) stay fp32.

The flow (the DiT is compute bound: GEMMs of 100 rows per chunk and CFG pair):

``bf16``  the DiT blocks' Linear weights stored in bf16 and both forward paths under CPU
          autocast (GEMMs and attention in bf16); the residual stream, the norms, the Euler
          state and the output stay fp32, and a stream's K/V cache is bf16 (half the memory).
          Only faster where the host's bf16 GEMM beats fp32 at those shapes (AMX; AVX512_BF16
          at enough rows): :mod:`worker.autotune` measures it.

HiFT has only ``fp32`` (the most quantization-sensitive part).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from worker.llm import CosyVoice3LM, Linear

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
STAGE_PRECISIONS = {"llm": PRECISIONS, "flow": ("fp32", "bf16"), "hift": ("fp32",)}


class Int8Linear(nn.Module):
    """Weight-only int8 Linear: ``y = (x @ W_int8.T) * scale (+ bias)``, per-output-channel
    symmetric scales. Any number of rows (prefill, batched decode) in one weight read."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scale", scale.to(torch.bfloat16))  # (out,), the kernel's dtype
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (rows, in)
        y = torch._weight_int8pack_mm(x2, self.weight, self.scale).to(x.dtype)  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


class Fp16Linear(nn.Module):
    """Linear with fp16 weights packed for FBGEMM's fp16 GEMM; fp32 in, fp32 out."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.out_features = lin.out_features
        bias = None if lin.bias is None else lin.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(lin.weight.detach().float(), bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def unpacked(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) as fp32, weight rounded through fp16: for checks."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)


def _swap_decoder_linears(model: CosyVoice3LM, make: type[nn.Module]) -> None:
    """Replace every Linear of the decoder layers (attention + MLP) with ``make(linear)``."""
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    setattr(parent, name, make(child))


def _llm(model: CosyVoice3LM, precision: str) -> CosyVoice3LM:
    if model.dtype != torch.float32:
        raise ValueError(f"precision transforms start from an fp32 model, got {model.dtype}")
    if precision == "bf16":
        model.to(torch.bfloat16)
    elif precision == "fp16":
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise ValueError("fp16 LLM weights need FBGEMM (x86 builds of torch)")
        _swap_decoder_linears(model, Fp16Linear)
    elif precision == "int8":
        _swap_decoder_linears(model, Int8Linear)
    model.cache = None  # a default cache made before the change has the old dtype
    return model


@torch.no_grad()
def apply_precision(model: nn.Module, stage: str = "llm", precision: str = "fp32") -> nn.Module:
    """Transform a loaded fp32 model of ``stage`` to ``precision`` in place; returns it.
    ``fp32`` leaves every stage untouched. For the LLM, make caches after this (``new_cache``
    takes the model's activation dtype)."""
    choices = STAGE_PRECISIONS.get(stage)
    if choices is None:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGE_PRECISIONS)}")
    if precision not in choices:
        raise ValueError(f"{stage} precision {precision!r} not supported; choose from {choices}")
    if precision == "fp32":
        return model
    if stage == "flow":
        return _flow(model, precision)
    return _llm(model, precision)


def _flow(flow: nn.Module, precision: str) -> nn.Module:
    dit = flow.decoder.estimator
    if dit.autocast_dtype is not None:
        raise ValueError("precision transforms start from an fp32 flow")
    for block in dit.transformer_blocks:
        for mod in block.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.data = mod.weight.data.to(torch.bfloat16)
                mod.bias.data = mod.bias.data.to(torch.bfloat16)
    dit.autocast_dtype = torch.bfloat16
    dit._mod_memo.clear()
    return flow


def weight_bytes(model: CosyVoice3LM) -> int:
    """Bytes of weights one decode step reads: decoder layers, final norm and speech head
    (the embedding rows it gathers are negligible). fp16-packed weights count 2 bytes each."""
    n = 0
    for m in [*model.layers, model.norm, model.llm_decoder]:
        for mod in m.modules():
            if isinstance(mod, Fp16Linear):
                w, b = mod.unpacked()
                n += w.numel() * 2 + (0 if b is None else b.nbytes)
            for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
                n += t.nbytes
    return n
