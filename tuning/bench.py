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
from tuning.results import default_out
from worker.config import ModelConfig
from worker.engine import Engine
from worker.noise import max_audio_seconds
from worker.request import TTSRequest
from worker.settings import KnobError, Knobs
from worker.stages.build import flow_core, hift_core, load_models, run_config
from worker.stages.flow import FlowCore
from worker.stages.hift import HiFTCore
from worker.stages.llm import LLMBatcher
from worker.stages.messages import Audio, Start, Tokens

PROMPT_TOKENS = 75  # a 3 s voice prompt (tokens at 25 Hz; mel at 50 Hz)
BENCH_MAX_SEQ = 4096  # LLM KV positions per sequence


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
    """Bytes streamed per decode step (every layer + final norm + speech head), in the
    precision the LLM was loaded in."""
    from worker.precision import weight_bytes

    return weight_bytes(models.llm)


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
) -> TTSRequest:
    """Forced-token request; the voice (prompt tokens, mel, embedding) comes from
    ``voice_seed`` (default ``seed``): the same voice_seed means the same speaker."""
    gv = torch.Generator().manual_seed(seed if voice_seed is None else voice_seed)
    prompt = torch.randint(0, cfg.flow.vocab_size, (1, PROMPT_TOKENS), generator=gv)
    prompt_feat = torch.randn(1, 2 * PROMPT_TOKENS, cfg.flow.output_size, generator=gv)
    embedding = torch.randn(1, cfg.flow.spk_embed_dim, generator=gv)
    g = torch.Generator().manual_seed(seed)
    vocab = min(5000, cfg.llm.qwen.vocab_size)  # any model dir: ids below its text vocab
    return TTSRequest(
        text_ids=torch.randint(0, vocab, (1, max(1, n_tokens // 10)), generator=g),
        prompt_text_ids=torch.randint(0, vocab, (1, 20), generator=g),
        llm_prompt_speech=prompt,
        flow_prompt_speech=prompt,
        prompt_feat=prompt_feat,
        embedding=embedding,
        forced_tokens=torch.randint(0, cfg.llm.speech_token_size, (n_tokens,), generator=g),
        strategy=mode,
        request_id=f"bench-{mode}-{n_tokens}-{seed}",
    )


def token2wav(flow: FlowCore, hift: HiFTCore, req: TTSRequest):
    """Flow + HiFT only, every token known: the two cores driven in turn, as the engine does.
    Yields each audio chunk (S,)."""
    rid = req.request_id
    for m in flow.handle(Start(rid, req)):
        hift.handle(m)
    flow.handle(Tokens(rid, req.forced_tokens.reshape(-1), final=True))
    done = False
    while not done:
        for m in flow.step():
            hift.handle(m)
        for m in hift.step():
            if not isinstance(m, Audio):
                raise RuntimeError(f"bench request failed: {m}")
            done = m.final
            yield m.audio


def run_stream(models, engine, cores, n_tokens: int, mode: str, stages: set[str], seed: int,
               voice_seed=None) -> dict:  # fmt: skip
    """One streamed utterance; returns timings and the (audio_s, compute_s) curve."""
    cfg = models.config
    req = make_request(cfg, n_tokens, mode, seed, "llm" in stages, voice_seed)
    sr = cfg.sample_rate
    curve, audio_samples, first = [(0.0, 0.0)], 0, None
    flow, hift = (engine.flow, engine.hift) if engine else cores
    busy0 = (flow.busy_s, hift.busy_s)
    flow.call_log.clear()
    _reset_peak_rss()
    t0 = time.perf_counter()
    if "llm" in stages:
        b = engine.llm.batcher
        llm0 = b.prefill_s + b.decode_s
        chunks = (c.audio for c in engine.run([req]))
    else:  # tokens given up front: flow + HiFT only
        llm0 = None
        chunks = token2wav(flow, hift, req)
    for audio in chunks:
        audio_samples += audio.numel()
        now = time.perf_counter() - t0
        if first is None and audio.numel():
            first = now
        curve.append((audio_samples / sr, now))
    total = time.perf_counter() - t0
    llm_s = 0.0 if llm0 is None else b.prefill_s + b.decode_s - llm0
    flow_s, hift_s = flow.busy_s - busy0[0], hift.busy_s - busy0[1]
    audio_s = audio_samples / sr
    frames = 2 * n_tokens
    if mode == "incremental":
        flops = dit_flops(cfg, frames + 2 * PROMPT_TOKENS, frames // 2 + PROMPT_TOKENS)
    else:  # recompute: each chunk recomputes everything so far; estimate from the schedule
        flops = float("nan")
    # per-chunk flow solve times (incremental; the first chunk carries the prompt): the
    # steadiness of a live stream is the worst later chunk against the median one
    chunk_s = [s for _, _, s in flow.call_log]
    later = chunk_s[1:]
    return {
        "mode": mode,
        "tokens": n_tokens,
        "flow_chunk_s": chunk_s,
        "flow_chunk_median_s": statistics.median(later) if later else None,
        "flow_chunk_max_over_median": max(later) / statistics.median(later) if later else None,
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


@torch.inference_mode()
def whole_dit_gflops(models, n_tokens: int, seed: int = 0) -> float:
    """GFLOP/s of one whole-utterance flow call (every frame at once, block-causal, as
    upstream's last chunk): the efficiency a per-chunk DiT is measured against."""
    cfg = models.config
    req = make_request(cfg, n_tokens, "incremental", seed, False)
    t0 = time.perf_counter()
    models.flow.inference(req.forced_tokens[None], req.flow_prompt_speech, req.prompt_feat,
                          req.embedding, streaming=True, finalize=True)  # fmt: skip
    dt = time.perf_counter() - t0
    frames = 2 * (n_tokens + PROMPT_TOKENS)
    return dit_flops(cfg, frames, frames // 2) / dt / 1e9


def llm_batch(models, batcher: LLMBatcher, batch: int, tokens: int, seed: int) -> float:
    """Aggregate decode tokens/s with ``batch`` concurrent sequences (forced tokens)."""
    cfg = models.config
    reqs = [make_request(cfg, tokens, "incremental", seed + i, True) for i in range(batch)]
    with torch.inference_mode():
        for i, r in enumerate(reqs):
            lm_input = models.llm.build_lm_input(r.text_ids, r.prompt_text_ids,
                                                 r.llm_prompt_speech)  # fmt: skip
            batcher.admit(f"batch{batch}-{i}", lm_input, tokens, tokens,
                          forced=r.forced_tokens.tolist())  # fmt: skip
        t0 = time.perf_counter()
        steps = 0
        while any(not s.done for s in batcher.seqs.values()):
            batcher.step()
            steps += 1
        dt = time.perf_counter() - t0
    for i in range(batch):
        batcher.release(f"batch{batch}-{i}")
    return batch * steps / dt


def _median_run(runs: list[dict]) -> dict:
    med = statistics.median
    out = dict(runs[len(runs) // 2])
    for k in ("first_audio_s", "total_s", "rtf", "peak_rss_mb"):
        out[k] = med(r[k] for r in runs)
    out["stage_s"] = {s: med(r["stage_s"][s] for r in runs) for s in ("llm", "flow", "hift")}
    for k in ("llm_tokens_per_s", "dit_gflops", "hift_samples_per_s", "flow_chunk_median_s",
              "flow_chunk_max_over_median"):
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


def check_seconds(models, seconds: list[float], stages: set[str], ap) -> None:
    """Refuse lengths the model cannot make: <= 0, or past the fixed noise's frames."""
    cfg = models.config
    noise = max_audio_seconds(cfg, PROMPT_TOKENS)
    kv = (BENCH_MAX_SEQ - PROMPT_TOKENS - 22) / 1.1 / cfg.token_frame_rate  # LLM positions
    limit = min(noise, kv) if "llm" in stages else noise
    for s in seconds:
        if not 0 < s <= limit:
            why = "the fixed noise (300 s with the prompt)" if limit == noise else (
                f"the LLM KV cache ({BENCH_MAX_SEQ} positions)")
            ap.error(f"--seconds {s:g}: must be > 0 and at most {limit:.0f} s ({why})")


def service_main(args, ap, model_dir: Path) -> int:
    from tuning import bench_service
    from worker.config import read_model_config

    try:
        clients = [int(c) for c in args.clients.split(",") if c]
    except ValueError:
        clients = []
    if not clients or min(clients) < 1:
        ap.error(f"--clients: comma-separated client counts >= 1 (got {args.clients})")
    if len(seconds_list := [float(s) for s in args.seconds.split(",") if s]) != 1:
        ap.error("--service takes one --seconds value")
    secs = seconds_list[0]
    cfg = read_model_config(model_dir)
    limit = max_audio_seconds(cfg, PROMPT_TOKENS)
    if not 0 < secs <= limit:
        ap.error(f"--seconds {secs:g}: must be > 0 and at most {limit:.0f} s (the fixed noise)")
    cpu = cpu_facts()
    isa = ",".join(k for k, v in (cpu.get("isa") or {}).items() if v)
    print(f"host: {cpu.get('model_name')} | ISA {isa} | model dir {model_dir}", flush=True)
    report = bench_service.run(model_dir, clients, secs, args.repeat,
                               log=lambda m: print(m, flush=True))  # fmt: skip
    report["host"] = {"cpu": cpu, "model_dir": str(model_dir)}
    print("\n" + bench_service.table(report))
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


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
    ap.add_argument("--preset", default="exact", choices=("exact", "fast", "auto"),
                    help="the configuration to time (default exact: fp32 torch eager)")
    ap.add_argument("--knob", action="append", default=[], metavar="COSY_X=V",
                    help="a knob on top of the preset, e.g. COSY_FLOW_PRECISION=bf16")
    ap.add_argument("--no-whole", dest="whole", action="store_false",
                    help="skip the whole-utterance DiT call (the per-chunk efficiency reference)")
    ap.add_argument("--service", action="store_true",
                    help="drive the real service over sockets with --clients, next to the "
                         "in-process engine on the same requests")  # fmt: skip
    ap.add_argument("--clients", default="1,4", help="--service: concurrent clients to compare")
    ap.add_argument("--json", help="report (default: .cache/results/bench-<time>.json)")
    ap.add_argument("--plot", help="PNG of cost vs audio (default: next to the JSON)")
    args = ap.parse_args(argv)
    bad = [kv for kv in args.knob if not kv.startswith("COSY_") or "=" not in kv]
    if bad:
        ap.error(f"--knob {bad[0]!r}: expected COSY_NAME=VALUE")
    stages = set(args.stages.split(","))
    if not stages <= {"llm", "flow", "hift"} or not stages:
        ap.error(f"--stages: choose from llm,flow,hift (got {args.stages})")
    if stages & {"flow", "hift"} and not {"flow", "hift"} <= stages:
        ap.error("--stages: flow and hift run together (the vocoder needs the flow's mel)")
    modes = args.modes.split(",")
    if not modes or not set(modes) <= {"incremental", "recompute"}:
        ap.error(f"--modes: choose from incremental,recompute (got {args.modes})")
    try:
        seconds = [float(s) for s in args.seconds.split(",") if s]
    except ValueError:
        ap.error(f"--seconds: comma-separated numbers of seconds (got {args.seconds})")
    if args.repeat < 1:
        ap.error("--repeat: at least 1")
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    if args.json is None:
        args.json = str(default_out("bench", "json"))
    if args.plot is None:
        args.plot = str(Path(args.json).with_suffix(".png"))
    if args.service:
        return service_main(args, ap, model_dir)

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

    # bench settings are explicit (a stray COSY_* in the environment changes nothing here);
    # the prompt K/V store is on only with --same-voice, so every other run is a new voice
    env = {"COSY_PROMPT_KV_MB": "2048" if args.same_voice else "0", "COSY_PRESET": args.preset}
    env.update(kv.split("=", 1) for kv in args.knob)
    try:
        knobs = Knobs.from_env(env)
        config = run_config(knobs, host["cpu"], stages=tuple(sorted(stages)))
    except KnobError as e:
        ap.error(str(e))
    t0 = time.perf_counter()
    models = load_models(model_dir, tuple(sorted(stages)), config, knobs, host["cpu"])
    host["load_s"] = time.perf_counter() - t0
    host["config"] = config  # after the fidelity gate
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()), flush=True)
    check_seconds(models, seconds, stages, ap)
    engine = cores = None
    if stages == {"llm", "flow", "hift"}:
        engine = Engine(models, max_batch=8, max_seq=BENCH_MAX_SEQ, knobs=knobs)
        engine.warm_up()
    elif {"flow", "hift"} <= stages:
        cores = (flow_core(models, knobs, config), hift_core(models, knobs, config))
        for core in cores:
            core.warm_up()
    results: list[dict] = []
    if {"flow", "hift"} <= stages:
        for secs in seconds:
            n = int(round(secs * models.config.token_frame_rate))
            for mode in modes:
                vs = 0 if args.same_voice else None
                runs = [
                    run_stream(models, engine, cores, n, mode, stages, seed=i, voice_seed=vs)
                    for i in range(args.repeat)
                ]  # fmt: skip
                r = _median_run(runs)
                r["first_audio_runs"] = [x["first_audio_s"] for x in runs]
                results.append(r)
                msg = f"first audio {_fmt(r['first_audio_s'])} s, total {_fmt(r['total_s'])} s"
                print(f"{mode:>11} {r['audio_s']:5.1f}s audio: {msg}, RTF {_fmt(r['rtf'])}")
    whole = {}
    if {"flow", "hift"} <= stages and "incremental" in modes and args.whole:
        n = int(round(min(seconds) * models.config.token_frame_rate))
        gfs = statistics.median(whole_dit_gflops(models, n, i) for i in range(args.repeat))
        inc = next(r for r in results if r["mode"] == "incremental" and r["tokens"] == n)
        whole = {"tokens": n, "gflops": gfs, "chunked_vs_whole": inc["dit_gflops"] / gfs}
        print(f"whole-utterance DiT ({min(seconds):g} s): {gfs:.1f} GFLOP/s; per-chunk "
              f"{inc['dit_gflops']:.1f} = {whole['chunked_vs_whole']:.0%} of it", flush=True)
    batch = {}
    if "llm" in stages and args.batch:
        batcher = engine.llm.batcher if engine else LLMBatcher(models.llm, 8, BENCH_MAX_SEQ)
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
        "whole_dit": whole,
    }
    if results and "llm" in stages:
        gb = llm_weight_bytes(models) / 1e9
        for r in report["runs"]:
            r["llm_weight_gbs"] = (r["llm_tokens_per_s"] or 0) * gb
    # table
    hdr = ("mode", "audio s", "first s", "total s", "RTF", "llm s", "flow s", "hift s",
           "LLM tok/s", "DiT GF/s", "chunk max/med", "HiFT kS/s", "RSS MB")  # fmt: skip
    print("\n" + " | ".join(hdr))
    for r in report["runs"]:
        st, hs = r["stage_s"], r["hift_samples_per_s"]
        cells = [r["mode"], _fmt(r["audio_s"], 1), _fmt(r["first_audio_s"]), _fmt(r["total_s"])]
        cells += [_fmt(r["rtf"]), _fmt(st["llm"]), _fmt(st["flow"]), _fmt(st["hift"])]
        cells += [_fmt(r["llm_tokens_per_s"]), _fmt(r["dit_gflops"], 1)]
        cells += [_fmt(r["flow_chunk_max_over_median"]) if r["mode"] == "incremental" else "-"]
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
