"""Small random stand-ins for ``speech_tokenizer_v3.onnx`` and ``campplus.onnx``.

The real files cannot be downloaded on our build hosts, so random model dirs get these instead:
same inputs and outputs as the released files (by position, dtype and rank, with dynamic batch
and time axes), random weights, a few tens of KB each. They exercise the real loading and
running code (:mod:`worker.frontend.encoders`); their tokens and embeddings mean nothing.

* Speech tokenizer: inputs feats ``(B, 128, T)`` float32 and lengths ``(B,)`` int32 (frames
  past ``lengths`` are zeroed); two ``Conv1d(k=3, stride=2, pad=1)`` (the real tokenizer's
  downsampling) give ``ceil(T/4)`` steps of 8 dims, quantized as an FSQ 3^8 code:
  ``round(0.999*tanh(h)) + 1`` per dim, token = ``sum q_i * 3^i`` in ``[0, 6561)``. Outputs
  tokens ``(B, ceil(T/4))`` int32 (int64 on request) and token lengths ``ceil(lengths/4)``.
* Speaker encoder: input ``(B, T, 80)`` float32; ``Linear(80, 64)`` + ReLU per frame, mean over
  time, ``Linear(64, 192)``; output ``(B, 192)`` float32.

``write_onnx_standins(model_dir, seed)`` writes both; ``tuning.random_model`` calls it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CAMPPLUS_NAME",
    "SPEECH_TOKENIZER_NAME",
    "SpeakerEncoderStandin",
    "SpeechTokenizerStandin",
    "export_speaker_encoder",
    "export_speech_tokenizer",
    "write_onnx_standins",
]

SPEECH_TOKENIZER_NAME = "speech_tokenizer_v3.onnx"
CAMPPLUS_NAME = "campplus.onnx"
OPSET = 17


def _init_(module: nn.Module, gen: torch.Generator, gain: float = 1.0) -> None:
    """N(0, gain^2 / fan_in) weights, zero biases, from ``gen`` (the global RNG is untouched)."""
    for p_name, p in module.named_parameters():
        with torch.no_grad():
            if p_name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / fan_in**0.5))


class SpeechTokenizerStandin(nn.Module):
    """feats ``(B, 128, T)``, lengths ``(B,)`` -> tokens ``(B, ceil(T/4))``, token lengths."""

    def __init__(
        self, seed: int = 0, hidden: int = 32, token_dtype: torch.dtype = torch.int32
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(128, hidden, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(hidden, 8, 3, stride=2, padding=1)
        self.register_buffer("powers", 3 ** torch.arange(8, dtype=torch.float32))
        self.token_dtype = token_dtype
        gen = torch.Generator().manual_seed(seed)
        _init_(self.conv1, gen, gain=2.0)
        _init_(self.conv2, gen, gain=1.5)

    def pre_quant(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The continuous code ``0.999*tanh(h)`` ``(B, 8, N)`` before rounding."""
        t = torch.arange(feats.shape[2], device=feats.device)
        mask = (t[None, :] < lengths[:, None]).to(feats.dtype)
        h = torch.nn.functional.gelu(self.conv1(feats * mask[:, None, :]))
        return torch.tanh(self.conv2(h)) * 0.999

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor):
        q = torch.round(self.pre_quant(feats, lengths)) + 1.0  # {0, 1, 2}
        tokens = (q * self.powers[None, :, None]).sum(1)
        token_lens = torch.div(lengths + 3, 4, rounding_mode="floor")
        return tokens.to(self.token_dtype), token_lens


class SpeakerEncoderStandin(nn.Module):
    """fbank ``(B, T, 80)`` -> embedding ``(B, 192)``."""

    def __init__(self, seed: int = 0, hidden: int = 64) -> None:
        super().__init__()
        self.frame = nn.Linear(80, hidden)
        self.out = nn.Linear(hidden, 192)
        _init_(self, torch.Generator().manual_seed(seed))

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.frame(fbank)).mean(dim=1))


def _export(module: nn.Module, args: tuple, path: Path, inputs, outputs, axes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation / tracer warnings
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=OPSET,
            input_names=list(inputs), output_names=list(outputs), dynamic_axes=axes,
        )  # fmt: skip
    return path


def export_speech_tokenizer(
    module: SpeechTokenizerStandin,
    path: str | Path,
    input_names: tuple[str, str] = ("feats", "feats_length"),
    output_names: tuple[str, str] = ("indices", "indices_lens"),
) -> Path:
    f, n = input_names
    o, ol = output_names
    args = (torch.zeros(1, 128, 40), torch.tensor([40], dtype=torch.int32))
    axes = {f: {0: "B", 2: "T"}, n: {0: "B"}, o: {0: "B", 1: "N"}, ol: {0: "B"}}
    return _export(module, args, Path(path), input_names, output_names, axes)


def export_speaker_encoder(
    module: SpeakerEncoderStandin,
    path: str | Path,
    input_name: str = "input",
    output_name: str = "output",
) -> Path:
    axes = {input_name: {0: "B", 1: "T"}, output_name: {0: "B"}}
    args = (torch.zeros(1, 40, 80),)
    return _export(module, args, Path(path), [input_name], [output_name], axes)


def write_onnx_standins(model_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write random ``speech_tokenizer_v3.onnx`` and ``campplus.onnx`` into ``model_dir``."""
    model_dir = Path(model_dir)
    tok = export_speech_tokenizer(SpeechTokenizerStandin(seed), model_dir / SPEECH_TOKENIZER_NAME)
    spk = export_speaker_encoder(SpeakerEncoderStandin(seed + 1), model_dir / CAMPPLUS_NAME)
    return tok, spk
