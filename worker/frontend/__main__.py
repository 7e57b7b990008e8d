"""Frontend debugging CLI, for pointing at your own model dir.

``python -m worker.frontend --model-dir DIR tokenize TEXT [--raw]`` prints the normalized
segments and their ids as JSON (``--raw``: no normalization or splitting, ``{"ids": [...]}``);
it needs only ``DIR/CosyVoice-BlankEN/``.
``python -m worker.frontend --model-dir DIR features --prompt-wav F [--prompt-text T]`` runs the
prompt frontend (audio features, ONNX encoders) and prints shapes and stats as JSON.
Errors print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from worker.config import QWEN_DIR


def _stats(a: np.ndarray) -> dict:
    a = np.asarray(a)
    out = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.size:
        f = a.astype(np.float64)
        out.update(min=float(f.min()), max=float(f.max()), mean=float(f.mean()), std=float(f.std()))
    return out


def cmd_tokenize(args) -> dict:
    from worker.frontend.text import normalize_and_split
    from worker.frontend.tokenizer import CosyVoice3Tokenizer

    tok = CosyVoice3Tokenizer(Path(args.model_dir) / QWEN_DIR)
    if args.raw:
        return {"ids": tok.encode(args.text)}
    segs = normalize_and_split(args.text, tok, split=True)
    return {"segments": [{"text": s, "ids": tok.encode(s)} for s in segs]}


def cmd_features(args) -> dict:
    from worker.frontend.audio import load_audio
    from worker.frontend.prepare import Frontend

    fe = Frontend(args.model_dir, cache=None, threads=args.threads)
    samples, sr = load_audio(args.prompt_wav)
    e = fe.encode_prompt(samples, sr, args.prompt_text)
    return {
        "prompt_wav": str(args.prompt_wav),
        "sample_rate": sr,
        "duration_s": samples.shape[0] / sr,
        "speech_tokens": {**_stats(e.speech_tokens), "head": e.speech_tokens[:10].tolist()},
        "prompt_mel": _stats(e.prompt_mel),
        "speaker_embedding": {**_stats(e.speaker_embedding),
                              "l2": float(np.linalg.norm(e.speaker_embedding))},
        "prompt_text_ids": e.prompt_text_ids.tolist(),
        "fingerprint": fe.fingerprint,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.frontend", description=__doc__)
    ap.add_argument("--model-dir", required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="normalized segments and ids of TEXT")
    t.add_argument("text")
    t.add_argument("--raw", action="store_true", help="no normalization/splitting")
    f = sub.add_parser("features", help="prompt features: shapes and stats")
    f.add_argument("--prompt-wav", required=True)
    f.add_argument("--prompt-text", default="")
    f.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        out = cmd_tokenize(args) if args.cmd == "tokenize" else cmd_features(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
