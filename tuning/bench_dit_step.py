"""One incremental DiT step, A/B: ``python -m tuning.bench_dit_step [--model-dir DIR]``.

Times ``DiT.forward_chunk`` (a 50-frame block, CFG batch 2, attending to ``--past`` cached
frames) with the AdaLN modulations memoized (what streams run) and recomputed, interleaved in
one process so host noise hits both alike. Prints a table, writes JSON, and checks that both
give bit-identical output.
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
from worker.model_dir import load_model_dir


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuning.bench_dit_step", description=__doc__)
    ap.add_argument("--model-dir")
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--past", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--json", default="bench_dit_step.json")
    args = ap.parse_args(argv)
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    m = load_model_dir(model_dir, stages=("flow",))
    est, d = m.flow.decoder.estimator, m.config.flow.dit
    g = torch.Generator().manual_seed(0)
    T, past = args.frames, args.past
    x, mu, cond = (torch.randn(2, d.mel_dim, T, generator=g) for _ in range(3))
    spks = torch.randn(2, d.spk_dim, generator=g)
    t = torch.tensor([0.3, 0.3])
    kc = torch.randn(d.depth, 2, d.heads, past, d.dim_head, generator=g)
    vc = torch.randn_like(kc)
    ctx = torch.zeros(2, 2, d.dim, 30)

    def step():
        return est.forward_chunk(x, mu, cond, spks, t, past, kc, vc, ctx)[0]

    ref = step()
    times: dict[str, list[float]] = {"memoized": [], "recomputed": []}
    same = True
    for _ in range(args.repeat):
        for mode in times:
            if mode == "recomputed":
                est._mod_memo.clear()
            t0 = time.perf_counter()
            out = step()
            times[mode].append(time.perf_counter() - t0)
            same &= torch.equal(out, ref)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"DiT forward_chunk: {T} new frames, {past} cached, {torch.get_num_threads()} threads")
    print("variant     | median ms | min ms")
    for k, v in times.items():
        print(f"{k:<11} | {med[k] * 1e3:9.1f} | {min(v) * 1e3:6.1f}")
    ratio = med["recomputed"] / med["memoized"]
    print(f"speed-up {ratio:.2f}x, bit-identical: {same}")
    report = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "frames": T,
        "past": past,
        "median_s": med,
        "speedup": ratio,
        "bit_identical": same,
    }
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
