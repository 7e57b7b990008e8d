"""Fidelity report: ``python -m tuning.fidelity --model-dir DIR [--preset P] [--json PATH]``.

Runs the same inputs through the fp32 reference and through the configuration a preset (and
any ``--knob COSY_X=V``) resolves to on this host (:func:`worker.stages.build.run_config`),
and reports, per :mod:`worker.fidelity`: mel SNR of the streamed flow output, waveform SNR and
log-mel distance of the streamed audio (flow + vocoder, end to end), LLM top-1 agreement and
KL on teacher-forced speech tokens. Prints a table; ``--json PATH`` writes
``{"preset", "config", "mel_snr_db", "wave_snr_db", "log_mel_distance_db", "top1", "kl",
"pass", "failures"}`` (an SNR is null where the output is identical to fp32). Exit status 1
when the gate fails (the failing figures are named), 2 on bad arguments.

With random weights (the default model dir is the official-dims random one) the figures bound
the numeric error of a setting, not perceived quality; on a real model dir they are measured
the same way, which is how to judge a preset for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tuning.baseline import default_model_dir
from tuning.bench import make_request
from worker.fidelity import (
    gate_failures,
    log_mel_distance_db,
    snr_db,
    teacher_forced_logp,
    top1_and_kl,
)
from worker.flow_stream import FlowStream
from worker.hift_stream import HiFTStream
from worker.hyperyaml import ConfigError
from worker.settings import KnobError, Knobs
from worker.stages import build


@torch.inference_mode()
def _streamed(flow, dit, hift, step, req) -> tuple[torch.Tensor, torch.Tensor]:
    """All tokens through one flow stream and one vocoder stream -> (mel, audio)."""
    fs = FlowStream(flow, req.flow_prompt_speech, req.prompt_feat, req.embedding, dit=dit)
    mel = fs.push(req.forced_tokens[None], finalize=True)
    audio = HiFTStream(hift, step=step).push(mel, finalize=True)
    return mel, audio


def measure(model_dir: Path, knobs: Knobs, seconds: float, log=print) -> dict:
    """The figures of ``knobs``' configuration against fp32 on one forced-token request."""
    config = build.run_config(knobs)
    ref = build.load_models(model_dir, ("llm", "flow", "hift"), {})
    # what the preset runs: auto choices that fail the gate fall back (explicit ones refused)
    test = build.load_models(model_dir, ("llm", "flow", "hift"), config, knobs)
    log(f"config: {config}")
    cfg = ref.config
    n = max(1, int(round(seconds * cfg.token_frame_rate)))
    req = make_request(cfg, n, "incremental", seed=0, with_llm=True)
    tokens = req.forced_tokens

    log(f"LLM: {n} teacher-forced tokens ...")
    with torch.inference_mode():
        lm_in = ref.llm.build_lm_input(req.text_ids, req.prompt_text_ids, req.llm_prompt_speech)
        ref_logp = teacher_forced_logp(ref.llm, lm_in, tokens)
        test_in = test.llm.build_lm_input(req.text_ids, req.prompt_text_ids,
                                          req.llm_prompt_speech)  # fmt: skip
        logp = teacher_forced_logp(test.llm, test_in, tokens)
    top1, kl = top1_and_kl(ref_logp, logp)

    log(f"flow + HiFT: {seconds:g} s streamed, fp32 and {config['flow_precision']} ...")
    ref_mel, ref_audio = _streamed(ref.flow, None, ref.hift, None, req)
    dit = build.flow_core(test, knobs, config).dit
    step = build.hift_core(test, knobs, config).step_fn
    mel, audio = _streamed(test.flow, dit, test.hift, step, req)
    figures = {
        "mel_snr_db": snr_db(ref_mel, mel),
        "wave_snr_db": snr_db(ref_audio, audio),
        "log_mel_distance_db": log_mel_distance_db(ref_audio, audio, cfg.sample_rate),
        "top1": top1,
        "kl": kl,
    }
    failures = gate_failures(figures)
    return {"preset": knobs.preset, "config": config, **figures, "pass": not failures,
            "failures": failures, "model_dir": str(model_dir), "seconds": seconds}  # fmt: skip


def table(r: dict) -> str:
    def db(v: float) -> str:
        return "identical" if v == float("inf") else f"{v:.1f} dB"

    rows = [
        ("mel SNR", db(r["mel_snr_db"]), ">= 40 dB"),
        ("waveform SNR", db(r["wave_snr_db"]), ">= 30 dB"),
        ("log-mel distance", f"{r['log_mel_distance_db']:.3f} dB", "-"),
        ("LLM top-1 agreement", f"{r['top1']:.2%}", ">= 99%"),
        ("LLM KL(fp32 || x)", f"{r['kl']:.2e} nats", "-"),
    ]
    out = [f"preset {r['preset']}: " + ", ".join(f"{k}={v}" for k, v in r["config"].items()),
           "figure | value | gate", "---|---|---"]  # fmt: skip
    out += [" | ".join(row) for row in rows]
    out.append("PASS" if r["pass"] else "FAIL: " + "; ".join(r["failures"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuning.fidelity",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--model-dir", help="default: the official-dims random-weight dir (cached)")
    ap.add_argument("--preset", default="fast", choices=("exact", "fast", "auto"))
    ap.add_argument("--knob", action="append", default=[], metavar="COSY_X=V",
                    help="a per-stage knob on top of the preset (repeatable)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=4.0, help="speech compared (default 4)")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    env = {"COSY_PRESET": args.preset}
    for kv in args.knob:
        var, sep, value = kv.partition("=")
        if not sep or not var.startswith("COSY_"):
            ap.error(f"--knob {kv!r}: expected COSY_NAME=VALUE")
        env[var] = value
    try:
        knobs = Knobs.from_env(env)
        model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
        report = measure(model_dir, knobs, args.seconds, log=lambda m: print(m, flush=True))
    except KnobError as e:  # a setting refused, e.g. one that fails the fidelity gate
        print(f"python -m tuning.fidelity: {e}", file=sys.stderr)
        return 1 if "fidelity gate" in str(e) else 2
    except (ConfigError, OSError) as e:
        print(f"python -m tuning.fidelity: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:  # strict JSON: an identical output's infinite SNR is written as null
        finite = {k: (None if v == float("inf") else v) for k, v in report.items()}
        Path(args.json).write_text(json.dumps(finite, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
