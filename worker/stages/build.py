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
    model_dir: str | Path,
    stages: tuple[str, ...],
    config: dict[str, Any],
    knobs: Knobs | None = None,
    facts: Mapping[str, Any] | None = None,
) -> CosyVoice3Models:
    """``stages`` of ``model_dir`` in the precisions of ``config``.

    With ``knobs`` (and a preset other than ``exact``) each non-fp32 stage must first pass
    the fidelity gate against fp32 on a short fixed input (:func:`gate_figures`; the verdict
    is cached per host and model in ``<COSY_CACHE_DIR>/fidelity.json``): an ``auto`` choice
    that fails falls back to the next fastest candidate, down to fp32; an explicit setting
    that fails is refused naming the figures. ``config`` is updated to what was loaded."""
    if knobs is None or knobs.preset == "exact":
        precision = {s: config.get(f"{s}_precision", "fp32") for s in stages}
        return load_model_dir(model_dir, stages=stages, precision=precision)
    from worker.host import cpu_facts

    facts = cpu_facts() if facts is None else facts
    models = load_model_dir(model_dir, stages=stages)
    for stage in stages:
        chosen = config.get(f"{stage}_precision", "fp32")
        if chosen == "fp32" or stage == "hift":
            continue
        explicit = getattr(knobs, f"{stage}_precision") != "auto"
        ranking = [chosen] if explicit else knobs.precision_ranking(stage, facts)
        for p in ranking[ranking.index(chosen) if chosen in ranking else 0 :]:
            if p == "fp32":
                break
            failures = _gate(models, stage, p, knobs)
            if not failures:
                break
            if explicit:
                raise KnobError([f"COSY_{stage.upper()}_PRECISION={p} fails the fidelity gate "
                                 f"against fp32: {'; '.join(failures)}"])  # fmt: skip
            log.warning("%s: %s fails the fidelity gate (%s); trying the next", stage, p,
                        "; ".join(failures))  # fmt: skip
            setattr(models, stage, getattr(load_model_dir(model_dir, (stage,)), stage))
        else:
            p = "fp32"
        config[f"{stage}_precision"] = p
        models.precision[stage] = p
    return models


def _gate(models: CosyVoice3Models, stage: str, precision: str, knobs: Knobs) -> list[str]:
    """Transform ``stage`` of ``models`` (fp32) to ``precision`` in place and return the
    gate's failures against fp32 (cached verdicts skip the measuring, not the transform)."""
    import json

    from worker.autotune import host_key
    from worker.fidelity import gate_failures
    from worker.host import cpu_facts
    from worker.ort import model_fingerprint
    from worker.precision import apply_precision

    path = knobs.cache_dir / "fidelity.json"
    weights = models.model_dir / f"{stage}.pt"
    key = f"{host_key(cpu_facts(), 0)}:{model_fingerprint(weights)[:24]}:{stage}:{precision}"
    try:
        cached = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        cached = None
    model = getattr(models, stage)
    if cached is not None:
        apply_precision(model, stage, precision)
        return gate_failures(cached)
    figures = gate_figures(models, stage, precision)
    log.info("%s: fidelity of %s against fp32: %s", stage, precision, figures)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[key] = figures
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
    except (OSError, ValueError) as e:
        log.warning("cannot cache the fidelity verdict in %s: %s", path, e)
    return gate_failures(figures)


def gate_figures(models: CosyVoice3Models, stage: str, precision: str) -> dict[str, float]:
    """The stage's gated figure on a fixed seeded input, fp32 first, then transformed to
    ``precision`` in place: LLM top-1 (and KL) over 100 teacher-forced tokens, flow mel SNR
    over a 2 s stream with a 2 s prompt."""
    import torch

    from worker.fidelity import snr_db, teacher_forced_logp, top1_and_kl
    from worker.precision import apply_precision

    cfg, g = models.config, torch.Generator().manual_seed(1234)
    model = getattr(models, stage)
    with torch.inference_mode():
        if stage == "llm":
            vocab = min(5000, cfg.llm.qwen.vocab_size)
            text = torch.randint(0, vocab, (1, 20), generator=g)
            prompt = torch.randint(0, cfg.llm.speech_token_size, (1, 50), generator=g)
            tokens = torch.randint(0, cfg.llm.speech_token_size, (100,), generator=g)

            def run():
                return teacher_forced_logp(model, model.build_lm_input(text, None, prompt), tokens)

            ref = run()
            apply_precision(model, stage, precision)
            top1, kl = top1_and_kl(ref, run())
            return {"top1": top1, "kl": kl}
        from worker.flow_stream import FlowStream

        prompt = torch.randint(0, cfg.flow.vocab_size, (1, 50), generator=g)
        feat = torch.randn(1, 100, cfg.flow.output_size, generator=g)
        emb = torch.randn(1, cfg.flow.spk_embed_dim, generator=g)
        tokens = torch.randint(0, cfg.flow.vocab_size, (1, 50), generator=g)

        def run():
            return FlowStream(model, prompt, feat, emb).push(tokens, finalize=True)

        ref = run()
        apply_precision(model, stage, precision)
        return {"mel_snr_db": snr_db(ref, run())}


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
