"""Service benchmark: ``python -m tuning.bench --service --clients 1,4 [--seconds 10]``.

Drives the real service (server + stage processes, over sockets) with N concurrent clients,
then runs the same requests through the in-process :class:`worker.engine.Engine` in the same
run, and reports per request first audio and RTF (p50 / p95) and the aggregate audio seconds
per wall second, for each client count, side by side. Requests: one segment of fixed text,
the fixtures' 3.3 s English prompt (a new voice each time: the per-voice prompt K/V store is
off on both sides), ``forced_tokens`` = seconds x 25 drawn from the request's seed (random
weights stop at random points). Both sides warm up before anything is timed and measure from
the moment the request is made (frontend included) to its first / last audio.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from worker.launch import ServiceProcess

FIXTURE_PROMPT = Path(__file__).resolve().parents[2] / "shared/fixtures/prompts"
PROMPT_NAME = "en_1272_128104_000003_000001"
SYSTEM = "You are a helpful assistant.<|endofprompt|>"
TEXT = "The quick brown fox jumps over the lazy dog while the band plays on."


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(np.ceil(p * len(xs))) - 1))]


def _summary(rows: list[dict], wall: float) -> dict:
    fa = [r["first_audio_s"] for r in rows]
    rtf = [r["total_s"] / r["audio_s"] for r in rows if r["audio_s"]]
    audio = sum(r["audio_s"] for r in rows)
    return {
        "requests": len(rows),
        "first_audio_p50": _pct(fa, 0.5), "first_audio_p95": _pct(fa, 0.95),
        "rtf_p50": _pct(rtf, 0.5), "rtf_p95": _pct(rtf, 0.95),
        "audio_s": audio, "wall_s": wall, "audio_s_per_wall_s": audio / wall if wall else None,
        "rows": rows,
    }  # fmt: skip


def _prompt() -> tuple[bytes, str]:
    wav = FIXTURE_PROMPT / f"{PROMPT_NAME}.wav"
    return wav.read_bytes(), SYSTEM + (FIXTURE_PROMPT / f"{PROMPT_NAME}.txt").read_text().strip()


def service_side(model_dir: Path, env: dict, clients: list[int], n_tokens: int, repeat: int,
                 log) -> dict:  # fmt: skip
    wav, ptext = _prompt()
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        svc = ServiceProcess(model_dir, f"ipc://{tmp}/front.sock", Path(tmp) / "server.log", env)
        try:
            t0 = time.perf_counter()
            svc.wait_up(1800)
            log(f"service up in {time.perf_counter() - t0:.1f} s (stages loaded and warmed up)")
            with svc.client(timeout_s=1800) as cl:  # the frontend's first prompt, untimed
                list(cl.stream(TEXT, prompt_wav=wav, prompt_text=ptext, seed=0, forced_tokens=25))
            for c in clients:
                rows: list[dict] = []
                errors: list[BaseException] = []

                def one_client(k: int, c=c, rows=rows, errors=errors) -> None:
                    try:
                        with svc.client(timeout_s=1800) as cl:
                            for i in range(repeat):
                                seed = 1000 * c + 10 * k + i
                                t = time.perf_counter()
                                first, samples = None, 0
                                chunks = cl.stream(TEXT, prompt_wav=wav, prompt_text=ptext,
                                                   seed=seed, forced_tokens=n_tokens)
                                for ch in chunks:
                                    if first is None and ch.audio.size:
                                        first = time.perf_counter() - t
                                    samples += ch.audio.size
                                total = time.perf_counter() - t
                                rows.append({"client": k, "seed": seed, "first_audio_s": first,
                                             "total_s": total,
                                             "audio_s": samples / 24000})  # fmt: skip
                    except BaseException as e:  # noqa: BLE001 - reported below
                        errors.append(e)

                t0 = time.perf_counter()
                threads = [threading.Thread(target=one_client, args=(k,)) for k in range(c)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    raise RuntimeError(f"service bench, {c} clients: {errors[0]!r}")
                out[c] = _summary(rows, time.perf_counter() - t0)
                s = out[c]
                log(f"service {c} client(s): first audio p50 {s['first_audio_p50']:.2f} s, "
                    f"RTF p50 {s['rtf_p50']:.2f}, {s['audio_s_per_wall_s']:.3f} audio s/s")
            out["stats"] = svc.stats()
        finally:
            svc.stop()
    return out


def engine_side(model_dir: Path, knobs, clients: list[int], n_tokens: int, repeat: int,
                log) -> dict:  # fmt: skip
    from cache import PromptCache
    from worker.engine import Engine
    from worker.frontend.prepare import Frontend, Voice
    from worker.model_dir import load_model_dir
    from worker.request import force_tokens

    wav, ptext = _prompt()
    models = load_model_dir(model_dir)
    engine = Engine(models, knobs=knobs)
    engine.warm_up()
    fe = Frontend(model_dir, PromptCache.from_knobs(knobs), knobs=knobs)
    warm = fe.requests("zero_shot", TEXT, Voice(wav, ptext), seed=0)  # untimed, as the service's
    force_tokens(warm, 25, 0, models.config.llm.speech_token_size)
    list(engine.run(warm))
    vocab = models.config.llm.speech_token_size
    out = {}
    for c in clients:
        rows = []
        t_all = time.perf_counter()
        for i in range(repeat):
            starts, reqs = {}, []
            for k in range(c):
                seed = 1000 * c + 10 * k + i
                t = time.perf_counter()
                r = fe.requests("zero_shot", TEXT, Voice(wav, ptext), seed=seed)
                force_tokens(r, n_tokens, seed, vocab)
                r[0].request_id = f"c{k}"
                reqs += r
                starts[f"c{k}"] = (t, seed)
            first: dict[str, float] = {}
            samples = dict.fromkeys(starts, 0)
            for ch in engine.run(reqs):
                if ch.error:
                    raise RuntimeError(f"in-process bench: {ch.error}")
                now = time.perf_counter()
                if ch.audio.numel() and ch.request_id not in first:
                    first[ch.request_id] = now - starts[ch.request_id][0]
                samples[ch.request_id] += ch.audio.numel()
                if ch.final:
                    t, seed = starts[ch.request_id]
                    rows.append({"client": ch.request_id, "seed": seed,
                                 "first_audio_s": first.get(ch.request_id), "total_s": now - t,
                                 "audio_s": samples[ch.request_id] / 24000})  # fmt: skip
        out[c] = _summary(rows, time.perf_counter() - t_all)
        s = out[c]
        log(f"engine  {c} client(s): first audio p50 {s['first_audio_p50']:.2f} s, "
            f"RTF p50 {s['rtf_p50']:.2f}, {s['audio_s_per_wall_s']:.3f} audio s/s")
    return out


def run(model_dir: Path, clients: list[int], seconds: float, repeat: int, log=print) -> dict:
    from worker.settings import Knobs

    n_tokens = int(round(seconds * 25))
    top = max(clients)
    settings = {"COSY_PROMPT_KV_MB": "0", "COSY_MAX_ACTIVE": str(top), "COSY_MAX_QUEUE": "64",
                "COSY_MAX_KV_GB": "64", "COSY_REQUEST_TIMEOUT_S": "7200"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        settings["COSY_CACHE_DIR"] = cache
        knobs = Knobs.from_env(settings)
        service = service_side(model_dir, knobs.to_env(), clients, n_tokens, repeat, log)
        engine = engine_side(model_dir, knobs, clients, n_tokens, repeat, log)
    report = {"seconds": seconds, "tokens": n_tokens, "repeat": repeat, "clients": clients,
              "service": {str(c): service[c] for c in clients},
              "engine": {str(c): engine[c] for c in clients},
              "service_stats": service.get("stats")}  # fmt: skip
    one = clients[0]
    s1, e1 = service[one], engine[one]
    report["service_vs_engine"] = {
        "first_audio_ratio": s1["first_audio_p50"] / e1["first_audio_p50"],
        "rtf_ratio": s1["rtf_p50"] / e1["rtf_p50"],
    }
    if len(clients) > 1:
        hi = clients[-1]
        report["throughput_scaling"] = {
            "service": service[hi]["audio_s_per_wall_s"] / s1["audio_s_per_wall_s"],
            "engine": engine[hi]["audio_s_per_wall_s"] / e1["audio_s_per_wall_s"],
        }
    return report


def table(report: dict) -> str:
    lines = ["driver | clients | requests | first audio p50 / p95 s | RTF p50 / p95 | "
             "audio s per wall s"]  # fmt: skip
    for side in ("service", "engine"):
        for c, s in report[side].items():
            lines.append(f"{side} | {c} | {s['requests']} | {s['first_audio_p50']:.2f} / "
                         f"{s['first_audio_p95']:.2f} | {s['rtf_p50']:.2f} / {s['rtf_p95']:.2f} | "
                         f"{s['audio_s_per_wall_s']:.3f}")  # fmt: skip
    r = report["service_vs_engine"]
    lines.append(f"service / engine, {report['clients'][0]} client: first audio "
                 f"{r['first_audio_ratio']:.2f}x, RTF {r['rtf_ratio']:.2f}x")
    if "throughput_scaling" in report:
        t = report["throughput_scaling"]
        lines.append(f"aggregate throughput {report['clients'][-1]} vs {report['clients'][0]} "
                     f"clients: service {t['service']:.2f}x, engine {t['engine']:.2f}x")
    return "\n".join(lines)
