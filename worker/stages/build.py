"""Building the stage cores from a model dir and the knobs: the one place where the resolved
configuration (precision per stage, flow / HiFT backend, LLM compile) becomes what runs, for
the stage processes (:mod:`worker.stages.process`) and the in-process :class:`worker.engine.
Engine` alike.

``run_config(knobs, facts)`` resolves every ``auto`` (:meth:`worker.settings.Knobs.resolved`)
and checks the combination; :func:`load_models` loads the weights in that precision; the
``*_core`` functions wrap them with their backend. ``worker.verify --json`` reports the same
dict under ``"config"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.model_dir import STAGES, CosyVoice3Models, load_model_dir
from worker.settings import BACKEND_STAGES, KnobError, Knobs

log = logging.getLogger(__name__)


def run_config(
    knobs: Knobs, facts: Mapping[str, Any] | None = None, stages: tuple[str, ...] = STAGES
) -> dict[str, Any]:
    """The configuration that runs on this host for ``stages``: precision per stage (only
    those: ``auto`` may measure), backends, compile, preset. An ORT flow runs the fp32 graph:
    ``auto`` gives fp32 there, an explicit non-fp32 flow precision with it is refused."""
    from worker.host import cpu_facts

    facts = cpu_facts() if facts is None else facts
    config: dict[str, Any] = {}
    for stage in stages:
        if stage in BACKEND_STAGES and knobs.resolve_backend(stage) == "ort":
            if getattr(knobs, f"{stage}_precision") not in ("auto", "fp32"):
                var = f"COSY_{stage.upper()}"
                raise KnobError([f"{var}_PRECISION={getattr(knobs, f'{stage}_precision')} "
                                 f"with {var}_BACKEND=ort: the ORT graph runs fp32"])  # fmt: skip
            config[f"{stage}_precision"] = "fp32"
        else:
            config[f"{stage}_precision"] = knobs.resolve_precision(stage, facts)
    config.update({f"{s}_backend": knobs.resolve_backend(s) for s in BACKEND_STAGES})
    config["llm_compile"] = knobs.resolve_compile()
    config["preset"] = knobs.preset
    return config


def load_models(
    model_dir: str | Path, stages: tuple[str, ...], config: Mapping[str, Any]
) -> CosyVoice3Models:
    """``stages`` of ``model_dir`` in the precisions of ``config``."""
    precision = {s: config.get(f"{s}_precision", "fp32") for s in stages}
    return load_model_dir(model_dir, stages=stages, precision=precision)


def llm_core(models: CosyVoice3Models, knobs: Knobs, config: Mapping[str, Any]):
    from worker.stages.llm import LLMCore

    core = LLMCore(models.llm, knobs.max_batch, knobs.max_seq, knobs.hop_tokens,
                   models.config.flow.pre_lookahead_len)  # fmt: skip
    if config.get("llm_compile"):
        from worker.compile import compile_llm

        compiled = compile_llm(models.llm, core.batcher.cache)  # falls back to eager itself
        log.info("llm: torch.compile %s", "on" if compiled else "failed: running eager")
    return core


def flow_core(
    models: CosyVoice3Models, knobs: Knobs, config: Mapping[str, Any], prefix_ahead: bool = True
):
    from worker.stages.flow import FlowCore

    dit = None
    if config.get("flow_backend") == "ort":
        from worker.ort import export_dir
        from worker.ort_flow import load_ort_dit

        dit = load_ort_dit(models.model_dir, export_dir(knobs.cache_dir), knobs.threads("flow"),
                           dit=models.flow.decoder.estimator, progress=log.info)  # fmt: skip
    return FlowCore(models.flow, knobs.hop_tokens, knobs.flow_steps, knobs.prompt_kv_mb,
                    knobs.flow_batch, prefix_ahead=prefix_ahead, dit=dit)  # fmt: skip


def hift_core(models: CosyVoice3Models, knobs: Knobs, config: Mapping[str, Any]):
    from worker.stages.hift import HiFTCore

    step = None
    if config.get("hift_backend") == "ort":
        from worker.ort import export_dir
        from worker.ort_hift import load_ort_hift

        step = load_ort_hift(models.model_dir, export_dir(knobs.cache_dir), knobs.threads("hift"),
                             hift=models.hift, progress=log.info)  # fmt: skip
    return HiFTCore(models.hift, step=step)
