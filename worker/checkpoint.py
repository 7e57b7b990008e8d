"""Reading released ``.pt`` checkpoints safely and checking them against what a model expects.

``torch.load(weights_only=True, mmap=True)``: nothing is unpickled beyond tensors and plain
containers, and the weights stay file-backed (no second in-memory copy). Keys are validated
against the model's expected checkpoint layout (``checkpoint_shapes(cfg)`` of each model file)
before anything is assigned; every problem is reported with the file, key and shapes.
Weight norm is folded from both key styles (``weight_g``/``weight_v`` and
``parametrizations.weight.original0``/``original1``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the model its config describes."""


def load_state_dict_file(path: str | Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """A plain state dict of tensors from ``path``; never executes pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad magic, refused (non-weights-only) pickle, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated?): {msg}") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is not a tensor")
    return sd


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def canonical_weight_norm_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old-style ``X.weight_g``/``X.weight_v`` to ``X.parametrizations.weight.original0/1``
    (what torch does when it loads such a checkpoint into a parametrized module)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight_g"):
            k = k[: -len("weight_g")] + "parametrizations.weight.original0"
        elif k.endswith(".weight_v"):
            k = k[: -len("weight_v")] + "parametrizations.weight.original1"
        out[k] = v
    return out


def fold_weight_norm(
    sd: dict[str, torch.Tensor], float64_prefixes: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Replace each ``X.parametrizations.weight.original0/1`` pair by ``X.weight = g*v/||v||``
    (norm over all dims but 0), computed exactly as torch's parametrization does. Modules under
    ``float64_prefixes`` are folded in float64 (upstream casts the f0 predictor first)."""
    f64 = tuple(float64_prefixes)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(".parametrizations.weight.original1"):
            continue
        if k.endswith(".parametrizations.weight.original0"):
            base = k[: -len("parametrizations.weight.original0")]
            g, w = v, sd[base + "parametrizations.weight.original1"]
            if base.startswith(f64):
                g, w = g.double(), w.double()
            out[base + "weight"] = torch._weight_norm(w, g, 0)
        else:
            out[k] = v.double() if k.startswith(f64) else v
    return out


def check_state_dict(
    sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: str | Path
) -> None:
    """Raise one error listing every missing, unexpected or mis-shaped key."""
    problems = []
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    for k in missing:
        problems.append(f"missing key {k} (expected shape {tuple(expected[k])})")
    for k in unexpected:
        problems.append(f"unexpected key {k} (shape {tuple(sd[k].shape)})")
    for k, shape in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(shape):
            problems.append(f"key {k}: shape {tuple(sd[k].shape)}, expected {tuple(shape)}")
    for k, v in sd.items():
        if k in expected and not v.is_floating_point():
            problems.append(f"key {k}: dtype {v.dtype}, expected a floating tensor")
    if problems:
        shown = problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise CheckpointError(
            f"{path}: checkpoint does not match the model in cosyvoice3.yaml/config.json:\n  "
            + "\n  ".join(shown)
        )


def assign_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``sd`` into ``module`` (built on the meta device) by assignment: no copy is made,
    so mmap-backed tensors stay file-backed. Float tensors keep their checkpoint dtype."""
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {e}") from e


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Meta tensors of the given shapes (for layout checks with no memory)."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
