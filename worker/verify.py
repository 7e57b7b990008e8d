"""Golden checker: ``python -m worker.verify MODEL_DIR GOLDEN_PT [--json] [--strict] [--tol T]``.

Runs every input recorded in a golden file (the layout of
``../shared/fixtures/cosyvoice3-tiny/golden.pt``) through this project's code with the weights
of MODEL_DIR and prints, per output, the max-abs and mean-abs difference and PASS/FAIL against
its tolerance (default 1e-4 for float outputs; integer outputs — token ids, schedules — must be
equal). Groups the project does not cover yet are listed as SKIP (``--strict`` fails on them).
Exit status: 0 when everything passes, 1 on any FAIL (or SKIP with ``--strict``), 2 when the
model dir or golden file cannot be read.

It runs the configuration the ``COSY_*`` knobs give (:func:`worker.stages.build.run_config`),
with the ``exact`` preset unless ``COSY_PRESET`` says otherwise: per-stage precision knobs
apply, and with ``COSY_FLOW_BACKEND=ort`` / ``COSY_HIFT_BACKEND=ort`` the streamed outputs are
also computed by the ORT steps (``[ort]`` rows: the block-causal mel and DiT output, the
vocoder's audio), against the same goldens and tolerances. ``--json`` names the configuration
under ``"config"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from worker.checkpoint import CheckpointError
from worker.config import QWEN_DIR
from worker.hyperyaml import ConfigError
from worker.model_dir import CosyVoice3Models
from worker.reference import reference_stream
from worker.settings import Knobs
from worker.stages import build
from worker.stages.llm import decode_tokens, length_bounds

DEFAULT_TOL = 1e-4


@dataclass
class Result:
    name: str
    max_abs: float | None
    mean_abs: float | None
    tol: float | None
    status: str  # PASS | FAIL | SKIP


class Checker:
    def __init__(self, tol: float):
        self.tol = tol
        self.results: list[Result] = []

    def close(self, name: str, got: Tensor, ref: Tensor, tol: float | None = None) -> None:
        """Float output: max/mean abs difference against ``tol``."""
        tol = self.tol if tol is None else tol
        got = torch.as_tensor(got, dtype=torch.float64)
        ref = torch.as_tensor(ref, dtype=torch.float64)
        if got.shape != ref.shape:
            self.results.append(
                Result(f"{name} (shape {tuple(got.shape)})", None, None, tol, "FAIL")
            )
            return
        d = (got - ref).abs()
        mx, mean = (float(d.max()), float(d.mean())) if d.numel() else (0.0, 0.0)
        self.results.append(Result(name, mx, mean, tol, "PASS" if mx <= tol else "FAIL"))

    def equal(self, name: str, got, ref) -> None:
        """Integer output (ids, lengths, schedules): must be identical."""
        got = torch.as_tensor(got, dtype=torch.float64).flatten()
        ref = torch.as_tensor(ref, dtype=torch.float64).flatten()
        if got.shape != ref.shape:
            self.results.append(
                Result(f"{name} (len {got.numel()} vs {ref.numel()})", None, None, 0.0, "FAIL")
            )
            return
        d = (got - ref).abs()
        mx, mean = (float(d.max()), float(d.mean())) if d.numel() else (0.0, 0.0)
        self.results.append(Result(name, mx, mean, 0.0, "PASS" if mx == 0 else "FAIL"))

    def skip(self, name: str) -> None:
        self.results.append(Result(name, None, None, None, "SKIP"))


def check_noise(m: CosyVoice3Models, g: dict, c: Checker) -> None:
    n = m.noise
    c.close("noise.flow_rand_noise_first200", n.flow(200), g["flow_rand_noise_first200"])
    c.close(
        "noise.flow_rand_noise_last_frame", n.flow_noise[:, :, -1], g["flow_rand_noise_last_frame"]
    )
    c.close(
        "noise.flow_rand_noise_sum_f64", n.flow_noise.double().sum(), g["flow_rand_noise_sum_f64"]
    )
    rows = g["hift_sine_waves_first96000"].shape[1]
    c.close("noise.hift_sine_waves_first96000", n.sine(rows), g["hift_sine_waves_first96000"])
    idx = torch.tensor(g["hift_sine_waves_check_rows"])
    c.close(
        "noise.hift_sine_waves_check_values", n.sine_rows(idx), g["hift_sine_waves_check_values"]
    )
    c.close("noise.hift_rand_ini", n.rand_ini, g["hift_rand_ini"])


def _llm_common(m: CosyVoice3Models, g: dict, c: Checker, group: str, lm_input: Tensor) -> None:
    llm = m.llm
    c.close(f"{group}.lm_input", lm_input, g["lm_input"])
    L = lm_input.shape[1]
    hidden = llm(g["lm_input"], torch.arange(L)[None])
    c.close(f"{group}.logp_prefill", llm.logp(hidden[:, -1])[0], g["logp_prefill"])
    min_len, max_len = length_bounds(g["text"].shape[1])
    c.equal(f"{group}.min_len", min_len, g["min_len"])
    c.equal(f"{group}.max_len", max_len, g["max_len"])


def check_llm(m: CosyVoice3Models, g: dict, c: Checker) -> None:
    from worker.sampling import sampling_ids

    llm = m.llm
    llm.setup_caches(1, g["lm_input"].shape[1] + g["max_len"] + 1)
    lm_input = llm.build_lm_input(g["text"], g["prompt_text"], g["prompt_speech_token"])
    _llm_common(m, g, c, "llm", lm_input)
    pos, rows = g["lm_input"].shape[1], []
    for tok in g["forced_tokens"].tolist():
        h = llm(llm.speech_embedding.weight[tok].reshape(1, 1, -1), torch.tensor([[pos]]))
        rows.append(llm.logp(h[:, -1])[0])
        pos += 1
    c.close("llm.logp_forced", torch.stack(rows), g["logp_forced"])
    for run in g.get("sampled_runs", []):
        gen = torch.Generator().manual_seed(run["seed"])
        want = run["tokens"]
        got = []
        for tok in decode_tokens(llm, g["lm_input"], g["min_len"], g["max_len"], generator=gen):
            got.append(tok)
            if len(got) == len(want) and not run["stopped_by_stop_token"]:
                break
        c.equal(f"llm.sampled_tokens[seed={run['seed']}]", got, want)
    for case in g.get("sampler_cases", []):
        gen = torch.Generator().manual_seed(case["seed"])
        draws = [
            sampling_ids(
                case["weighted_scores"].clone(),
                list(case["decoded_tokens"]),
                m.config.llm,
                case["ignore_eos"],
                generator=gen,
            )
            for _ in range(len(case["draws"]))
        ]
        c.equal(f"llm.sampler[{case['name']}]", draws, case["draws"])


def check_llm_no_prompt(m: CosyVoice3Models, g: dict, c: Checker) -> None:
    m.llm.setup_caches(1, g["lm_input"].shape[1] + 1)
    _llm_common(m, g, c, "llm_no_prompt", m.llm.build_lm_input(g["text"]))


def check_flow(m: CosyVoice3Models, g: dict, c: Checker) -> None:
    f = m.flow
    c.close("flow.spk_projected", f.spk_projection(g["embedding"]), g["spk_projected"])
    tok = torch.cat([g["prompt_token"], g["token"]], dim=1)
    emb = f.input_embedding(tok.clamp(min=0).long())
    c.close("flow.pre_lookahead_out", f.pre_lookahead(emb), g["pre_lookahead_out"])
    for streaming in (False, True):
        mel = f.inference(
            g["token"], g["prompt_token"], g["prompt_feat"], g["embedding"], streaming, True
        )
        key = "mel_streaming_finalize" if streaming else "mel_nonstreaming_finalize"
        c.close(f"flow.{key}", mel, g[key])


def check_dit(m: CosyVoice3Models, g: dict, c: Checker) -> None:
    est = m.flow.decoder.estimator
    for streaming in (False, True):
        out = est(g["x"], g["mask"], g["mu"], g["t"], g["spks"], g["cond"], streaming=streaming)
        key = "out_streaming_true" if streaming else "out_streaming_false"
        c.close(f"dit.{key}", out, g[key])


def check_hift(m: CosyVoice3Models, g: dict, c: Checker) -> None:
    h = m.hift
    c.close("hift.f0_finalize", h.f0(g["mel"], finalize=True), g["f0_finalize"])
    audio, source = h.inference(g["mel"], finalize=True)
    c.close("hift.source_finalize", source, g["source_finalize"])
    c.close("hift.audio_finalize", audio, g["audio_finalize"])
    audio, _ = h.inference(g["mel"], finalize=False)
    c.close("hift.audio_nonfinal", audio, g["audio_nonfinal"])


def check_stream(m: CosyVoice3Models, g: dict, c: Checker, golden: dict) -> None:
    """Upstream's streaming (all tokens known, fresh hop state) through the engine's
    ``recompute`` token2wav: schedule, kept mel and audio per chunk."""
    f = golden["flow"]
    chunks = reference_stream(
        m.flow, m.hift, f["token"], f["prompt_token"].long(), f["prompt_feat"], f["embedding"],
        g["token_hop_len_initial"],
    )  # fmt: skip
    infos = [info for info, _ in chunks]
    audios = [audio for _, audio in chunks]
    c.equal(
        "stream.schedule",
        [[k.token_len, k.token_offset, k.hop or 0, k.finalize] for k in infos],
        [[k["token_len"], k["token_offset"], k["hop"] or 0, k["finalize"]] for k in g["chunks"]],
    )
    for i, (info, audio, ref) in enumerate(zip(infos, audios, g["chunks"], strict=False)):
        c.close(f"stream.chunks[{i}].mel_kept", info.mel, ref["mel_kept"])
        c.close(f"stream.chunks[{i}].audio", audio, ref["audio"])
    c.close("stream.mel_concat", torch.cat([k.mel for k in infos], 2), g["mel_concat"])
    c.close("stream.audio_concat", torch.cat(audios, 1), g["audio_concat"])
    mel = m.flow.inference(
        f["token"], f["prompt_token"], f["prompt_feat"], f["embedding"], False, True
    )
    c.close("stream.audio_nonstream", m.hift.inference(mel, finalize=True)[0], g["audio_nonstream"])


def check_tokenizer(m: CosyVoice3Models, g: dict, c: Checker, model_dir: Path) -> None:
    from worker.frontend.tokenizer import CosyVoice3Tokenizer

    tok = CosyVoice3Tokenizer(model_dir / QWEN_DIR)
    for name, want in g.get("special_token_ids", {}).items():
        c.equal(f"tokenizer.special[{name}]", tok.token_id(name), want)
    if "cosyvoice3_tokenizer_len" in g:
        c.equal("tokenizer.len", len(tok), g["cosyvoice3_tokenizer_len"])
    for i, case in enumerate(g.get("cases", [])):
        ids = tok.encode(case["text"])
        c.equal(f"tokenizer.cases[{i}].ids", ids, case["cosyvoice3_tokenizer_ids"])
        if "cosyvoice3_decode_skip_special" in case:
            same = (
                tok.decode(ids, skip_special_tokens=True) == case["cosyvoice3_decode_skip_special"]
            )
            c.equal(f"tokenizer.cases[{i}].decode", int(not same), 0)


def check_frontend(m: CosyVoice3Models, g: dict, c: Checker, model_dir: Path) -> None:
    from worker.frontend.audio import (
        campplus_fbank,
        load_audio,
        prompt_mel_24k,
        resample,
        whisper_logmel_128,
    )

    wav = model_dir / g["wav_file"]
    if wav.is_file():
        x, sr = load_audio(wav)
        c.equal("frontend.wav_sample_rate", sr, g["wav_sample_rate"])
        x24 = x if sr == 24000 else resample(x, sr, 24000)
        x16 = x if sr == 16000 else resample(x, sr, 16000)
        c.close("frontend.speech_24k", torch.as_tensor(x24)[None], g["speech_24k"])
        c.close("frontend.speech_16k", torch.as_tensor(x16)[None], g["speech_16k"])
    else:
        c.skip(f"frontend.speech_16k ({g['wav_file']} not in model dir)")
    c.close("frontend.prompt_mel_24k", prompt_mel_24k(g["speech_24k"][0]), g["prompt_mel_24k"])
    feats, flen = whisper_logmel_128(g["speech_16k"][0])
    c.close("frontend.whisper_logmel_128", feats, g["whisper_logmel_128"])
    c.equal("frontend.whisper_logmel_128_len", flen, g["whisper_logmel_128_len"])
    fb = campplus_fbank(g["speech_16k"][0])
    c.close("frontend.campplus_fbank_mean_sub", fb, g["campplus_fbank_mean_sub"])


GROUPS: dict[str, Callable | None] = {
    "tokenizer": check_tokenizer,
    "frontend": check_frontend,
    "noise": check_noise,
    "llm": check_llm,
    "llm_no_prompt": check_llm_no_prompt,
    "flow": check_flow,
    "dit": check_dit,
    "hift": check_hift,
    "stream": check_stream,
}
NOT_OUTPUTS = {"meta"}


def check_flow_ort(m: CosyVoice3Models, g: dict, c: Checker, dit) -> None:
    """The block-causal mel through ``FlowStream`` on the ORT DiT step (all tokens at once)."""
    from worker.flow_stream import FlowStream

    stream = FlowStream(m.flow, g["prompt_token"].long(), g["prompt_feat"], g["embedding"], dit=dit)
    mel = stream.push(g["token"], finalize=True)
    c.close("flow.mel_streaming_finalize[ort]", mel, g["mel_streaming_finalize"])


def check_dit_ort(m: CosyVoice3Models, g: dict, c: Checker, dit) -> None:
    """The block-causal DiT output as two incremental ORT steps (a block, then the rest)."""
    from worker.dit import Segment

    d = m.flow.decoder.estimator.cfg
    k = v = torch.zeros(d.depth, 2, d.heads, 0, d.dim_head)
    ctx, outs, T = torch.zeros(2, 2, d.dim, 30), [], g["x"].shape[2]
    for a, b in ((0, min(d.static_chunk_size, T)), (min(d.static_chunk_size, T), T)):
        if b <= a:
            continue
        seg = Segment(a, b - a, g["spks"], k, v, ctx, in_place=False)
        kv: list = []
        x, mu, cond = (g[n][:, :, a:b] for n in ("x", "mu", "cond"))
        outs.append(dit.forward_segments(x, mu, cond, g["t"], [seg], kv_out=kv))
        k = torch.cat((k, torch.stack([kk for kk, _ in kv])), dim=3)
        v = torch.cat((v, torch.stack([vv for _, vv in kv])), dim=3)
        ctx = seg.conv_ctx_out
    c.close("dit.out_streaming_true[ort]", torch.cat(outs, dim=2), g["out_streaming_true"])


def check_hift_ort(m: CosyVoice3Models, g: dict, c: Checker, step) -> None:
    """The vocoder's audio through ``HiFTStream`` on the ORT step (the whole mel at once)."""
    from worker.hift_stream import HiFTStream

    for finalize, key in ((True, "audio_finalize"), (False, "audio_nonfinal")):
        audio = HiFTStream(m.hift, step=step).push(g["mel"], finalize=finalize)
        c.close(f"hift.{key}[ort]", audio, g[key])


def verify_config(knobs: Knobs | None = None) -> tuple[Knobs, dict]:
    """What verify runs: the knobs' configuration, ``exact`` unless a preset is set."""
    knobs = knobs or Knobs.from_env()
    if not {"COSY_PRESET", "COSY_PRECISION"} & set(knobs.from_environment):
        knobs = replace(knobs, preset="exact", precision="exact")
    return knobs, build.run_config(knobs)


@torch.inference_mode()
def verify(
    model_dir: str | Path,
    golden_path: str | Path,
    tol: float = DEFAULT_TOL,
    knobs: Knobs | None = None,
) -> tuple[list[Result], dict]:
    """-> (results, the configuration that ran)."""
    golden = torch.load(golden_path, map_location="cpu", weights_only=True)
    knobs, config = verify_config(knobs)
    models = build.load_models(model_dir, ("llm", "flow", "hift"), config)
    c = Checker(tol)
    for group, data in golden.items():
        if group in NOT_OUTPUTS or not isinstance(data, dict):
            continue
        fn = GROUPS.get(group)
        if fn is None:
            c.skip(group)
        elif fn is check_stream:
            fn(models, data, c, golden)
        elif fn in (check_tokenizer, check_frontend):
            fn(models, data, c, Path(model_dir))
        else:
            fn(models, data, c)
    if config["flow_backend"] == "ort":
        dit = build.flow_core(models, knobs, config).dit
        for group, fn in (("flow", check_flow_ort), ("dit", check_dit_ort)):
            if group in golden:
                fn(models, golden[group], c, dit)
    if config["hift_backend"] == "ort" and "hift" in golden:
        check_hift_ort(models, golden["hift"], c, build.hift_core(models, knobs, config).step_fn)
    return c.results, config


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m worker.verify", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("model_dir")
    ap.add_argument("golden_pt")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    ap.add_argument("--strict", action="store_true", help="a SKIP counts as a failure")
    ap.add_argument(
        "--tol", type=float, default=DEFAULT_TOL, help="max-abs tolerance (float outputs)"
    )
    args = ap.parse_args(argv)
    try:
        results, config = verify(args.model_dir, args.golden_pt, args.tol)
    except (ConfigError, CheckpointError, OSError, RuntimeError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [r for r in results if r.status == "FAIL" or (args.strict and r.status == "SKIP")]
    if args.json:
        print(json.dumps({"config": config, "results": [asdict(r) for r in results]}, indent=1))
    else:
        w = max(len(r.name) for r in results)
        print(f"{'output':<{w}}  {'max_abs':>9}  {'mean_abs':>9}  {'tol':>7}  status")
        for r in results:
            cells = f"{_fmt(r.max_abs):>9}  {_fmt(r.mean_abs):>9}  {_fmt(r.tol):>7}"
            print(f"{r.name:<{w}}  {cells}  {r.status}")
        print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
        n = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
        print(f"{n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
