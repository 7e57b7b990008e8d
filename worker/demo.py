"""``./run.sh demo``: synthesize ``demo.wav`` from fixed speech tokens.

Without ``--model-dir`` it writes (once, cached under ``.cache/``) a random-weight model dir
with :mod:`tuning.random_model` and says so: random weights make noise-like audio, but every
stage runs at the chosen dims. With ``--model-dir`` it uses your model dir (e.g. the released
Fun-CosyVoice3-0.5B-2512). Later issues grow this into the text-to-speech service demo.
"""

from __future__ import annotations

import argparse
import sys
import time
import wave
from pathlib import Path

import numpy as np
import torch

from worker.model_dir import load_model_dir

REPO = Path(__file__).resolve().parents[1]


def write_wav(path: str | Path, audio: torch.Tensor, sample_rate: int) -> None:
    """Mono 16-bit PCM wav."""
    pcm = (audio.detach().float().clamp(-1, 1).numpy().reshape(-1) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="a CosyVoice3 model dir (default: random weights)")
    ap.add_argument("--dims", choices=["tiny", "official"], default="official")
    ap.add_argument("--seconds", type=float, default=4.0, help="audio length (25 tokens/s)")
    ap.add_argument("--out", default="demo.wav")
    args = ap.parse_args(argv)

    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from tuning.random_model import write_model_dir

        model_dir = REPO / ".cache" / f"random-{args.dims}"
        if not (model_dir / "hift.pt").is_file():
            print(f"writing a random-weight {args.dims} model dir to {model_dir} ...", flush=True)
            write_model_dir(model_dir, args.dims, seed=0)
        print(f"NOTE: {model_dir} holds RANDOM weights: the audio is noise, not speech.")
    t0 = time.perf_counter()
    models = load_model_dir(model_dir, stages=("flow", "hift"))
    t_load = time.perf_counter() - t0
    n_tok = max(4, int(args.seconds * models.config.token_frame_rate))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, models.config.flow.vocab_size, (1, n_tok), generator=gen)
    spk = torch.randn(1, models.config.flow.spk_embed_dim, generator=gen)
    empty_tok = torch.zeros(1, 0, dtype=torch.long)
    empty_feat = torch.zeros(1, 0, models.config.flow.output_size)
    t0 = time.perf_counter()
    with torch.inference_mode():
        mel = models.flow.inference(tokens, empty_tok, empty_feat, spk, False, True)
        audio, _ = models.hift.inference(mel, finalize=True)
    compute = time.perf_counter() - t0
    sr = models.config.sample_rate
    write_wav(args.out, audio, sr)
    dur = audio.shape[-1] / sr
    print(f"wrote {Path(args.out).resolve()}")
    print(f"duration {dur:.2f} s, compute {compute:.2f} s (RTF {compute / dur:.2f}), "
          f"model load {t_load:.2f} s, {n_tok} fixed speech tokens")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
