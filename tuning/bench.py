"""Streaming benchmark: ``python -m tuning.bench`` (``./run.sh bench``).

At official dims with random weights (speed does not depend on weight values) and forced token
counts (EOS ignored), for each utterance length and engine mode it streams one request through
the same :class:`worker.engine.Engine` users run and reports: time to first audio, RTF,
per-stage seconds, LLM tokens/s and GB/s of weight traffic, DiT GFLOP/s, HiFT samples/s and peak
RSS — side by side for ``incremental`` (per-block caches, linear cost) and ``recompute``
(upstream's strategy, same kernels, O(n²)); next to the host's measured limits (weight-streaming
GB/s, fp32 GEMM GFLOP/s). It also measures batched LLM decoding (aggregate tokens/s for 1 and
several concurrent sequences). Prints a table, writes JSON, draws a PNG of cumulative compute
vs audio time. All figures are medians over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tuning.baseline import default_model_dir
from tuning.cpu import cpu_facts, measure_limits
from worker.config import ModelConfig
from worker.engine import Engine, LLMBatcher, Token2Wav
from worker.flow_stream import PromptKVStore
from worker.model_dir import load_model_dir
from worker.request import TTSRequest

PROMPT_TOKENS = 75  # a 3 s voice prompt (tokens at 25 Hz; mel at 50 Hz)


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def llm_weight_bytes(models) -> int:
    """Bytes streamed per decode step: every layer + final norm + speech head."""
    llm = models.llm
    n = sum(p.numel() * p.element_size() for p in llm.layers.parameters())
    n += llm.norm.weight.numel() * llm.norm.weight.element_size()
    return n + llm.llm_decoder.weight.numel() * llm.llm_decoder.weight.element_size()


def dit_flops(cfg: ModelConfig, new_frames: int, ctx_frames: int) -> float:
    """FLOPs of one CFM call on ``new_frames`` frames attending to ``ctx_frames`` frames:
    10 steps x CFG batch 2 x depth x (q,k,v,o + feed-forward GEMMs + attention)."""
    d = cfg.flow.dit
    dim, ff = d.dim, d.dim * d.ff_mult
    per_frame = 2 * (4 * dim * dim + 2 * dim * ff)  # GEMMs
    attn = 2 * 2 * ctx_frames * d.heads * d.dim_head  # QK^T and PV
    body = d.depth * (per_frame + attn) + 2 * (dim * (3 * cfg.flow.output_size + d.spk_dim))
    return cfg.flow.n_timesteps * 2 * new_frames * body


def make_request(
    cfg: ModelConfig, n_tokens: int, mode: str, seed: int, with_llm: bool, voice_seed=None
):
    """Forced-token request; the voice (prompt tokens, mel, embedding) comes from
    ``voice_seed`` (default ``seed``): the same voice_seed means the same speaker."""
    gv = torch.Generator().manual_seed(seed if voice_seed is None else voice_seed)
    prompt = torch.randint(0, cfg.flow.vocab_size, (1, PROMPT_TOKENS), generator=gv)
    prompt_feat = torch.randn(1, 2 * PROMPT_TOKENS, cfg.flow.output_size, generator=gv)
    embedding = torch.randn(1, cfg.flow.spk_embed_dim, generator=gv)
    g = torch.Generator().manual_seed(seed)
    return TTSRequest(
        text_ids=torch.randint(0, 5000, (1, max(1, n_tokens // 10)), generator=g),
        prompt_text_ids=torch.randint(0, 5000, (1, 20), generator=g),
        llm_prompt_speech=prompt,
        flow_prompt_speech=prompt,
        prompt_feat=prompt_feat,
        embedding=embedding,
        forced_tokens=torch.randint(0, cfg.llm.speech_token_size, (n_tokens,), generator=g),
        mode=mode,
        request_id=f"bench-{mode}-{n_tokens}",
    )


def run_stream(
    models,
    engine,
    n_tokens: int,
    mode: str,
    stages: set[str],
    seed: int,
    voice_seed=None,
    prompt_store=None,
) -> dict:
    """One streamed utterance; returns timings and the (audio_s, compute_s) curve."""
    cfg = models.config
    req = make_request(cfg, n_tokens, mode, seed, "llm" in stages, voice_seed)
    sr = cfg.sample_rate
    curve, audio_samples, first = [(0.0, 0.0)], 0, None
    _reset_peak_rss()
    t0 = time.perf_counter()
    if "llm" in stages:
        stats0 = dict(engine.llm.stats)
        for chunk in engine.run([req]):
            audio_samples += chunk.audio.numel()
            now = time.perf_counter() - t0
            first = now if first is None else first
            curve.append((audio_samples / sr, now))
        fin = engine.finished.pop(req.request_id)
        llm_s = sum(engine.llm.stats[k] - stats0[k] for k in ("prefill_s", "decode_s"))
        flow_s, hift_s = fin["flow_s"], fin["hift_s"]
    else:  # tokens given up front: flow + HiFT only, through the engine's Token2Wav
        t2w = Token2Wav(models, req, mode, prompt_store=prompt_store)
        t2w.tokens = req.forced_tokens.tolist()
        llm_s, final = 0.0, False
        with torch.inference_mode():
            while not final:
                audio, _, final = t2w.chunk()
                audio_samples += audio.numel()
                now = time.perf_counter() - t0
                first = now if first is None else first
                curve.append((audio_samples / sr, now))
        flow_s, hift_s = t2w.flow_s, t2w.hift_s
    total = time.perf_counter() - t0
    audio_s = audio_samples / sr
    frames = 2 * n_tokens
    if mode == "incremental":
        flops = dit_flops(cfg, frames + 2 * PROMPT_TOKENS, frames // 2 + PROMPT_TOKENS)
    else:  # recompute: each chunk recomputes everything so far; estimate from the schedule
        flops = float("nan")
    return {
        "mode": mode,
        "tokens": n_tokens,
        "audio_s": audio_s,
        "first_audio_s": first,
        "total_s": total,
        "rtf": total / audio_s if audio_s else float("nan"),
        "stage_s": {"llm": llm_s, "flow": flow_s, "hift": hift_s},
        "llm_tokens_per_s": n_tokens / llm_s if llm_s else None,
        "dit_gflops": flops / flow_s / 1e9 if flow_s and flops == flops else None,
        "hift_samples_per_s": audio_samples / hift_s if hift_s else None,
        "peak_rss_mb": _peak_rss_mb(),
        "curve": curve,
    }


def llm_batch(models, batcher: LLMBatcher, batch: int, tokens: int, seed: int) -> float:
    """Aggregate decode tokens/s with ``batch`` concurrent sequences (forced tokens)."""
    cfg = models.config
    reqs = [make_request(cfg, tokens, "incremental", seed + i, True) for i in range(batch)]
    for i, r in enumerate(reqs):
        r.request_id = f"batch{batch}-{i}"
    for r in reqs:
        batcher.admit(r.request_id, r)
    t0 = time.perf_counter()
    steps = 0
    with torch.inference_mode():
        while any(not batcher.active[r.request_id].llm_done for r in reqs):
            batcher.step()
            steps += 1
    dt = time.perf_counter() - t0
    for r in reqs:
        batcher.release(r.request_id)
    return batch * steps / dt


def _median_run(runs: list[dict]) -> dict:
    med = statistics.median
    out = dict(runs[len(runs) // 2])
    for k in ("first_audio_s", "total_s", "rtf", "peak_rss_mb"):
        out[k] = med(r[k] for r in runs)
    out["stage_s"] = {s: med(r["stage_s"][s] for r in runs) for s in ("llm", "flow", "hift")}
    for k in ("llm_tokens_per_s", "dit_gflops", "hift_samples_per_s"):
        vals = [r[k] for r in runs if r[k] is not None]
        out[k] = med(vals) if vals else None
    out["repeats"] = len(runs)
    return out


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs, ys = zip(*r["curve"], strict=True)
        style = "-" if r["mode"] == "incremental" else "--"
        ax.plot(xs, ys, style, marker=".", label=f"{r['mode']} {r['audio_s']:.0f} s")
    ax.set_xlabel("audio produced (s)")
    ax.set_ylabel("cumulative compute (s)")
    ax.set_title("streaming cost: incremental vs recompute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tuning.bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--model-dir", help="default: an official-dims random-weight dir (cached)")
    ap.add_argument("--stages", default="llm,flow,hift")
    ap.add_argument("--seconds", default="10,30")
    ap.add_argument("--modes", default="incremental,recompute")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--batch", default="1,4", help="concurrent LLM sequences to compare ('' = skip)"
    )
    ap.add_argument("--batch-tokens", type=int, default=50)
    ap.add_argument("--limits-seconds", type=float, default=5.0, help="0 = skip host limits")
    ap.add_argument(
        "--same-voice",
        action="store_true",
        help="every run uses one voice: runs after the first reuse its prompt blocks",
    )
    ap.add_argument("--json", default="bench.json")
    ap.add_argument("--plot", default="bench.png")
    args = ap.parse_args(argv)
    stages = set(args.stages.split(","))
    if not stages <= {"llm", "flow", "hift"} or not stages:
        ap.error(f"--stages: choose from llm,flow,hift (got {args.stages})")
    if stages & {"flow", "hift"} and not {"flow", "hift"} <= stages:
        ap.error("--stages: flow and hift run together (the vocoder needs the flow's mel)")
    modes = args.modes.split(",")
    seconds = [float(s) for s in args.seconds.split(",") if s]
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()

    threads = torch.get_num_threads()
    host = {"cpu": cpu_facts(), "torch_threads": threads, "model_dir": str(model_dir)}
    if args.limits_seconds > 0:
        host["limits"] = measure_limits(threads, seconds=args.limits_seconds)
    cpu = host["cpu"]
    isa = ",".join(k for k, v in (cpu.get("isa") or {}).items() if v)
    print(f"host: {cpu.get('model_name')} | torch capability {cpu.get('torch_cpu_capability')} | "
          f"threads {threads} | ISA {isa}", flush=True)  # fmt: skip
    if "limits" in host:
        lim = host["limits"]
        print(f"limits: weight streaming {_fmt(lim.get('gemv_fp32_gbs'), 1)} GB/s, "
              f"fp32 GEMM {_fmt(lim.get('gemm_fp32_gflops'), 0)} GFLOP/s, "
              f"bf16 GEMM {_fmt(lim.get('gemm_bf16_gflops'), 0)} GFLOP/s", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    models = load_model_dir(model_dir, stages=tuple(sorted(stages)))
    host["load_s"] = time.perf_counter() - t0
    engine = (
        Engine(models, max_batch=8, max_seq=4096) if stages == {"llm", "flow", "hift"} else None
    )
    results: list[dict] = []
    if {"flow", "hift"} <= stages:
        for secs in seconds:
            n = int(round(secs * models.config.token_frame_rate))
            for mode in modes:
                store = None
                if args.same_voice:
                    store = engine.prompt_kv if engine else PromptKVStore(2048 << 20)
                vs = 0 if args.same_voice else None
                runs = [
                    run_stream(models, engine, n, mode, stages, seed=i, voice_seed=vs,
                               prompt_store=store)
                    for i in range(args.repeat)
                ]  # fmt: skip
                r = _median_run(runs)
                r["first_audio_runs"] = [x["first_audio_s"] for x in runs]
                results.append(r)
                msg = f"first audio {_fmt(r['first_audio_s'])} s, total {_fmt(r['total_s'])} s"
                print(f"{mode:>11} {r['audio_s']:5.1f}s audio: {msg}, RTF {_fmt(r['rtf'])}")
    batch = {}
    if "llm" in stages and args.batch:
        batcher = engine.llm if engine else LLMBatcher(models, max_batch=8, max_seq=4096)
        gbytes = llm_weight_bytes(models) / 1e9
        for b in [int(x) for x in args.batch.split(",")]:
            tps = statistics.median(
                llm_batch(models, batcher, b, args.batch_tokens, 100 + i)
                for i in range(args.repeat)
            )
            batch[b] = {"tokens_per_s": tps, "weight_gbs": tps / b * gbytes}
            print(f"LLM batch {b}: {tps:.2f} tokens/s aggregate", flush=True)
        host["llm_weight_gb_per_step"] = gbytes
    report = {
        "host": host,
        "runs": [{k: v for k, v in r.items()} for r in results],
        "llm_batch": batch,
    }
    if results and "llm" in stages:
        gb = llm_weight_bytes(models) / 1e9
        for r in report["runs"]:
            r["llm_weight_gbs"] = (r["llm_tokens_per_s"] or 0) * gb
    # table
    hdr = ("mode", "audio s", "first s", "total s", "RTF", "llm s", "flow s", "hift s",
           "LLM tok/s", "DiT GF/s", "HiFT kS/s", "RSS MB")  # fmt: skip
    print("\n" + " | ".join(hdr))
    for r in report["runs"]:
        st, hs = r["stage_s"], r["hift_samples_per_s"]
        cells = [r["mode"], _fmt(r["audio_s"], 1), _fmt(r["first_audio_s"]), _fmt(r["total_s"])]
        cells += [_fmt(r["rtf"]), _fmt(st["llm"]), _fmt(st["flow"]), _fmt(st["hift"])]
        cells += [_fmt(r["llm_tokens_per_s"]), _fmt(r["dit_gflops"], 1)]
        cells += [_fmt(hs / 1e3 if hs else None, 1), _fmt(r["peak_rss_mb"], 0)]
        print(" | ".join(cells))
    by = {(r["mode"], round(r["audio_s"])): r for r in report["runs"]}
    growth = {}
    for mode in modes:
        keys = sorted(k for k in by if k[0] == mode)
        if len(keys) >= 2:
            a, b = by[keys[0]], by[keys[-1]]
            fa = a["stage_s"]["flow"] + a["stage_s"]["hift"]
            fb = b["stage_s"]["flow"] + b["stage_s"]["hift"]
            growth[mode] = {
                "from_s": a["audio_s"],
                "to_s": b["audio_s"],
                "flow_hift_ratio": fb / fa,
            }
            ratio = f"{b['audio_s']:.0f}s / {a['audio_s']:.0f}s = {fb / fa:.2f}x"
            print(f"growth {mode}: flow+HiFT {ratio}")
    report["growth"] = growth
    if len(batch) >= 2:
        ks = sorted(batch)
        report["llm_batch_speedup"] = batch[ks[-1]]["tokens_per_s"] / batch[ks[0]]["tokens_per_s"]
        print(
            f"LLM aggregate tokens/s, batch {ks[-1]} vs {ks[0]}: {report['llm_batch_speedup']:.2f}x"
        )
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    if results and args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
