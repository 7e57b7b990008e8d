"""Model-core baseline: ``python -m tuning.baseline [--model-dir DIR] [--json PATH]``.

Non-streaming, fp32, plain PyTorch eager — the numbers later optimizations must beat:
model-dir load wall time and peak RSS, LLM decode tokens/s over forced tokens (EOS ignored,
static KV cache, batch 1), flow (10 Euler steps, CFG batch 2) and HiFT seconds for a fixed
number of seconds of audio from fixed speech tokens. Prints a table and writes JSON.
Default model dir: an official-dims random-weight dir, written once under ``.cache/``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from worker.model_dir import load_model_dir

REPO = Path(__file__).resolve().parents[1]


def default_model_dir(dims: str = "official") -> Path:
    import shutil
    import tempfile

    from tuning.random_model import write_model_dir

    d = REPO / ".cache" / f"random-{dims}"
    if not (d / "hift.pt").is_file():
        print(f"writing random-weight {dims} model dir to {d} ...", flush=True)
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".random-{dims}-", dir=d.parent))
        try:  # written aside and renamed: a reader never sees a half-written dir
            write_model_dir(tmp, dims, seed=0)
            if d.exists():
                shutil.rmtree(d)
            tmp.rename(d)
        except FileExistsError:  # another process finished first
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return d


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuning.baseline", description=__doc__)
    ap.add_argument("--model-dir")
    ap.add_argument("--tokens", type=int, default=250, help="forced LLM tokens / flow tokens")
    ap.add_argument("--prefill", type=int, default=100, help="text tokens in the LLM prompt")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="report path (default: .cache/results/baseline-<time>.json)")
    args = ap.parse_args(argv)
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()

    t0 = time.perf_counter()
    m = load_model_dir(model_dir)
    load_s = time.perf_counter() - t0
    rss_load = peak_rss_mb()
    cfg = m.config
    gen = torch.Generator().manual_seed(0)
    n = args.tokens

    # LLM: prefill of `prefill` text tokens, then `n` forced decode steps.
    llm = m.llm
    llm.setup_caches(1, args.prefill + n + 8)
    text = torch.randint(0, min(cfg.llm.qwen.vocab_size, 150000), (1, args.prefill), generator=gen)
    lm_input = llm.build_lm_input(text)
    forced = torch.randint(0, cfg.llm.speech_token_size, (n,), generator=gen)
    prefill_s, decode_tps = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        h = llm(lm_input, torch.arange(lm_input.shape[1])[None])
        llm.logp(h[:, -1])
        prefill_s.append(time.perf_counter() - t0)
        pos = lm_input.shape[1]
        t0 = time.perf_counter()
        for i in range(n):
            h = llm(
                llm.speech_embedding.weight[forced[i]].reshape(1, 1, -1), torch.tensor([[pos + i]])
            )
            llm.logp(h[:, -1])
        decode_tps.append(n / (time.perf_counter() - t0))

    # Flow + HiFT: n tokens -> 2n mel frames -> n/25 s of audio, no prompt, finalize=True.
    tokens = torch.randint(0, cfg.flow.vocab_size, (1, n), generator=gen)
    spk = torch.randn(1, cfg.flow.spk_embed_dim, generator=gen)
    no_tok = torch.zeros(1, 0, dtype=torch.long)
    no_feat = torch.zeros(1, 0, cfg.flow.output_size)
    flow_s, hift_s = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        mel = m.flow.inference(tokens, no_tok, no_feat, spk, streaming=False, finalize=True)
        flow_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        audio, _ = m.hift.inference(mel, finalize=True)
        hift_s.append(time.perf_counter() - t0)
    audio_s = audio.shape[-1] / cfg.sample_rate

    med = statistics.median
    res = {
        "model_dir": str(model_dir),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_s": load_s,
        "peak_rss_after_load_mb": rss_load,
        "llm_prefill_tokens": int(lm_input.shape[1]),
        "llm_prefill_s": med(prefill_s),
        "llm_decode_tokens_per_s": med(decode_tps),
        "audio_s": audio_s,
        "flow_s": med(flow_s),
        "hift_s": med(hift_s),
        "peak_rss_mb": peak_rss_mb(),
        "repeat": args.repeat,
    }
    for k, v in res.items():
        print(f"{k:<28} {v:.3f}" if isinstance(v, float) else f"{k:<28} {v}")
    if args.json is None:
        from tuning.results import default_out

        args.json = str(default_out("baseline", "json"))
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
