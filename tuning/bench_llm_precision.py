"""LLM decode per precision, eager vs compiled: ``python -m tuning.bench_llm_precision``.

At official dims (random weights: speed does not depend on their values), one process, every
variant interleaved round by round so host noise hits all alike: fp32, bf16 (bf16 weights),
bf16-autocast (fp32 weights under ``torch.autocast``), fp16 and int8 (``worker.precision``),
each eager and, with ``--compile``, through ``worker.compile.compile_llm``. Per variant and
batch: the median decode step (forward + log-probs, batch rows 0..B-1 at a ~150-position
context) and its CPU time (which a busy shared host inflates less), tokens/s, the
weight-streaming rate (bytes of weights a step reads / step time), and one prefill. Prints a
table and writes JSON (default ``.cache/results/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from tuning.baseline import default_model_dir
from tuning.results import default_out
from worker.compile import compile_llm
from worker.config import read_model_config
from worker.llm import CosyVoice3LM, LLMCache, load_llm
from worker.precision import apply_precision, weight_bytes

VARIANTS = ("fp32", "bf16", "bf16-autocast", "fp16", "int8")


class Variant:
    def __init__(self, name: str, model: CosyVoice3LM, compiled: bool, max_batch: int):
        self.name, self.model, self.compiled = name, model, compiled
        self.autocast = name.endswith("-autocast")
        self.cache: LLMCache = model.new_cache(max_batch, 1024)
        self.bytes = weight_bytes(model)  # autocast: the fp32 weights it reads (and casts)

    def mode(self):
        if self.autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prefill(self, lm_input: torch.Tensor, row: int) -> float:
        """Prefill ``lm_input`` (1, L, D) into cache row ``row``. -> seconds."""
        L = lm_input.shape[1]
        t0 = time.perf_counter()
        with self.mode():
            self.model(lm_input.to(self.model.dtype), torch.arange(L)[None], torch.tensor([row]),
                       L, self.cache)  # fmt: skip
        return time.perf_counter() - t0

    def decode(self, batch: int, pos: int, steps: int) -> tuple[float, float]:
        """``steps`` decode steps of rows 0..batch-1 from ``pos``. -> median (wall, CPU)
        seconds per step."""
        m = self.model
        toks = torch.randint(0, m.cfg.speech_token_size, (steps, batch))
        wall, cpu = [], []
        with self.mode():
            for i in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                emb = m.speech_embedding(toks[i])[:, None]  # (B, 1, D)
                h = m(emb, torch.full((batch, 1), pos + i), None, pos + i + 1, self.cache)
                m.logp(h[:, -1])  # (B, V)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        return statistics.median(wall), statistics.median(cpu)


def load_variant(model_dir: Path, name: str, compiled: bool, max_batch: int) -> Variant:
    cfg = read_model_config(model_dir)
    model = load_llm(model_dir / "llm.pt", cfg.llm)
    apply_precision(model, "llm", "fp32" if name == "bf16-autocast" else name)
    v = Variant(name, model, compiled, max_batch)
    if compiled:
        t0 = time.perf_counter()
        with v.mode():
            v.compiled = compile_llm(model, v.cache)
        print(f"  {name}: compile + warm-up {time.perf_counter() - t0:.0f} s"
              f"{'' if v.compiled else ' (FAILED: eager)'}", flush=True)  # fmt: skip
    return v


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuning.bench_llm_precision", description=__doc__)
    ap.add_argument("--model-dir")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--compile", action="store_true", help="also each variant compiled")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=150, help="prefill positions")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per measurement")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--json", help="report path (default: .cache/results/...-<time>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # every variant's layers share TransformerBlock.forward's dynamo cache (a stage has one)
    torch._dynamo.config.recompile_limit = 8 * 2 * len(VARIANTS)
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    batches = [int(b) for b in args.batches.split(",")]
    names = args.variants.split(",")
    print(f"loading {len(names)} variants{' (+ compiled)' if args.compile else ''} ...", flush=True)
    variants = [load_variant(model_dir, n, c, max(batches))
                for c in ((False, True) if args.compile else (False,)) for n in names]  # fmt: skip
    d = variants[0].model.cfg.qwen.hidden_size
    lm_input = torch.randn(1, args.prompt, d, generator=torch.Generator().manual_seed(0))
    for v in variants:  # every row gets a context; pages the weights in
        for row in range(max(batches)):
            v.prefill(lm_input, row)
    step: dict[tuple[int, int], list[float]] = {}
    prefill: dict[int, list[float]] = {}
    for r in range(args.repeat):
        for b in batches:
            for v in variants:  # interleaved: every variant once per round
                step.setdefault((id(v), b), []).append(v.decode(b, args.prompt, args.steps))
        for v in variants:
            prefill.setdefault(id(v), []).append(v.prefill(lm_input, 0))
        print(f"  round {r + 1}/{args.repeat}", flush=True)

    rows = []
    for v in variants:
        for b in batches:
            s = statistics.median(w for w, _ in step[(id(v), b)])
            c = statistics.median(c for _, c in step[(id(v), b)])
            rows.append({
                "precision": v.name, "compiled": v.compiled, "batch": b, "step_ms": s * 1e3,
                "cpu_ms": c * 1e3, "tokens_per_s": b / s, "weight_gb_per_s": v.bytes / s / 1e9,
                "weight_mb": v.bytes / 1e6, "prefill_ms": statistics.median(prefill[id(v)]) * 1e3,
            })  # fmt: skip
    print(f"\nLLM decode, official dims, {args.threads} thread(s), context {args.prompt}, "
          f"median of {args.repeat} rounds x {args.steps} steps")  # fmt: skip
    hdr = f"{'precision':14s} {'mode':8s} {'B':>2s} {'ms/step':>8s} {'cpu ms':>7s} {'tok/s':>7s}"
    print(hdr + f" {'GB/s':>6s} {'weights MB':>10s} {'prefill ms':>10s}")
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        print(f"{r['precision']:14s} {mode:8s} {r['batch']:2d} {r['step_ms']:8.1f} "
              f"{r['cpu_ms']:7.1f} "
              f"{r['tokens_per_s']:7.2f} {r['weight_gb_per_s']:6.1f} {r['weight_mb']:10.0f} "
              f"{r['prefill_ms']:10.0f}")  # fmt: skip
    out = Path(args.json) if args.json else default_out("bench_llm_precision", "json")
    report = {"threads": args.threads, "prompt": args.prompt, "steps": args.steps,
              "repeat": args.repeat, "torch": torch.__version__, "rows": rows}  # fmt: skip
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
