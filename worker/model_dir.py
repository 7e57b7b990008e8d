"""Loading a model dir in the released Fun-CosyVoice3-0.5B-2512 layout.

``cosyvoice3.yaml`` + ``CosyVoice-BlankEN/config.json`` give every dim (:mod:`worker.config`);
``llm.pt``, ``flow.pt``, ``hift.pt`` are read with ``torch.load(weights_only=True, mmap=True)``,
validated key by key, and assigned to modules built on the meta device, so loading never holds
two copies of the weights. The fixed noises are replayed for the config's dims.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.config import QWEN_DIR, YAML_NAME, ModelConfig, read_model_config
from worker.flow import Flow, load_flow
from worker.hift import HiFTGenerator, load_hift
from worker.hyperyaml import ConfigError
from worker.llm import CosyVoice3LM, load_llm
from worker.noise import FixedNoise, fixed_noise_for

REQUIRED_FILES = (YAML_NAME, "llm.pt", "flow.pt", "hift.pt", f"{QWEN_DIR}/config.json")
STAGES = ("llm", "flow", "hift")


@dataclass
class CosyVoice3Models:
    config: ModelConfig
    noise: FixedNoise
    llm: CosyVoice3LM | None
    flow: Flow | None
    hift: HiFTGenerator | None
    model_dir: Path | None = None
    precision: dict[str, str] = field(default_factory=dict)  # stage -> what it was loaded in


def check_layout(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: model dir does not exist")
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ConfigError(
            f"{model_dir}: not a CosyVoice3 model dir, missing {', '.join(missing)} "
            "(expected the Fun-CosyVoice3-0.5B-2512 layout)"
        )


def load_model_dir(
    model_dir: str | Path,
    stages: tuple[str, ...] = STAGES,
    precision: Mapping[str, str] | None = None,
) -> CosyVoice3Models:
    """Load the requested stages of a model dir (all three by default), each in the
    precision ``precision[stage]`` (default fp32: the weights as released) via
    :func:`worker.precision.apply_precision`."""
    model_dir = Path(model_dir)
    check_layout(model_dir)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    cfg = read_model_config(model_dir)
    noise = fixed_noise_for(cfg)
    models = CosyVoice3Models(
        config=cfg,
        noise=noise,
        llm=load_llm(model_dir / "llm.pt", cfg.llm) if "llm" in stages else None,
        flow=load_flow(model_dir / "flow.pt", cfg.flow, noise) if "flow" in stages else None,
        hift=load_hift(model_dir / "hift.pt", cfg.hift, noise) if "hift" in stages else None,
        model_dir=model_dir,
        precision={stage: "fp32" for stage in stages},
    )
    if precision:
        from worker.precision import apply_precision

        for stage in stages:
            p = precision.get(stage, "fp32")
            apply_precision(getattr(models, stage), stage, p)
            models.precision[stage] = p
    return models
