"""Speech-token sampling exactly as upstream's plain-PyTorch path (reference §1.2).

``ras_sampling`` = nucleus sampling (top-p 0.8 over a stable descending sort, at most top-k 25,
the token that crosses p included) followed by the repetition check (a draw that appears at
least ``win_size * tau_r`` times in the last ``win_size`` tokens is replaced by a draw from the
full softmax with that token at -inf). ``sampling_ids`` masks index ``speech_token_size`` (sos,
*not* eos: an upstream quirk kept as is) while ``ignore_eos``. RNG use matches upstream draw for
draw (``torch.multinomial`` on the same tensors), so seeded sequences reproduce bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from worker.config import LLMConfig, SamplingConfig


def nucleus_sampling(
    scores: Tensor, top_p: float, top_k: int, generator: torch.Generator | None = None
) -> int:
    probs, idx = scores.softmax(dim=0).sort(descending=True, stable=True)
    head = probs[:top_k].numpy()
    cum, n = np.float32(0.0), 0
    while n < len(head) and cum < np.float32(top_p):  # float32 running sum, as upstream
        cum = np.float32(cum + head[n])
        n += 1
    kept = probs[:n].clone()
    return int(idx[kept.multinomial(1, replacement=True, generator=generator)].item())


def random_sampling(scores: Tensor, generator: torch.Generator | None = None) -> int:
    return int(scores.softmax(dim=0).multinomial(1, replacement=True, generator=generator).item())


def ras_sampling(
    scores: Tensor,  # (V,) log-probs; edited in place on fallback, as upstream
    decoded: list[int],
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
) -> int:
    top = nucleus_sampling(scores, cfg.top_p, cfg.top_k, generator)
    window = decoded[-cfg.win_size :]
    if sum(1 for t in window if t == top) >= cfg.win_size * cfg.tau_r:
        scores[top] = -float("inf")
        top = random_sampling(scores, generator)
    return top


def sampling_ids(
    scores: Tensor,
    decoded: list[int],
    cfg: LLMConfig,
    ignore_eos: bool,
    generator: torch.Generator | None = None,
) -> int:
    if ignore_eos:
        scores[cfg.speech_token_size] = -float("inf")  # index 6561 = sos (upstream quirk)
    return ras_sampling(scores, decoded, cfg.sampling, generator)


SILENT_TOKENS = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})


class SilenceFilter:
    """Upstream ``llm_job``: once more than 5 silent tokens came in a row, further ones are not
    passed to the flow (they are still fed back to the LLM)."""

    def __init__(self, max_run: int = 5):
        self.max_run = max_run
        self.run = 0

    def keep(self, tok: int) -> bool:
        if tok in SILENT_TOKENS:
            self.run += 1
            return self.run <= self.max_run
        self.run = 0
        return True
