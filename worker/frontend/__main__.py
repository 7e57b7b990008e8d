"""Frontend debugging CLI, for pointing at your own model dir.

``python -m worker.frontend --model-dir DIR tokenize TEXT [--raw]`` prints the normalized
segments and their ids as JSON (``--raw``: no normalization or splitting, ``{"ids": [...]}``);
it needs only ``DIR/CosyVoice-BlankEN/``.
``python -m worker.frontend --model-dir DIR features --prompt-wav F [--prompt-text T]
[--threads N]`` runs the prompt frontend (the same audio checks as a request, audio features,
ONNX encoders) and prints shapes and stats as JSON; ``--threads`` defaults to
``COSY_FRONTEND_THREADS`` (read through :class:`worker.settings.Knobs`).

Every error (missing model dir, bad yaml, bad audio, bad ``COSY_*`` setting, bad flag) is one
``error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import numpy as np

from cache.cli import one_line
from worker.config import QWEN_DIR

EXIT_ERROR = 2
PROG = "python -m worker.frontend"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def _stats(a: np.ndarray) -> dict:
    a = np.asarray(a)
    out = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.size:
        f = a.astype(np.float64)
        out.update(min=float(f.min()), max=float(f.max()), mean=float(f.mean()), std=float(f.std()))
    return out


def _check_model_dir(model_dir: str) -> Path:
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"--model-dir: not a directory: {d}")
    return d


def cmd_tokenize(args) -> dict:
    from worker.frontend.text import normalize_and_split
    from worker.frontend.tokenizer import CosyVoice3Tokenizer

    tok = CosyVoice3Tokenizer(_check_model_dir(args.model_dir) / QWEN_DIR)
    if args.raw:
        return {"ids": tok.encode(args.text)}
    segs = normalize_and_split(args.text, tok, split=True)
    return {"segments": [{"text": s, "ids": tok.encode(s)} for s in segs]}


def cmd_features(args) -> dict:
    from worker.frontend.prepare import Frontend

    fe = Frontend(_check_model_dir(args.model_dir), cache=None, threads=args.threads,
                  knobs=args.knobs)  # fmt: skip
    samples, sr = fe.load_prompt(args.prompt_wav)
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
        "threads": fe.threads,
    }  # fmt: skip


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one command. ``env``: the ``COSY_*`` settings (default ``os.environ``)."""
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="normalized segments and ids of TEXT")
    t.add_argument("text")
    t.add_argument("--raw", action="store_true", help="no normalization/splitting")
    f = sub.add_parser("features", help="prompt features: shapes and stats")
    f.add_argument("--prompt-wav", required=True)
    f.add_argument("--prompt-text", default="")
    f.add_argument(
        "--threads", type=_positive_int, default=None,
        help="ONNX Runtime threads (default: COSY_FRONTEND_THREADS)",
    )  # fmt: skip
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # usage error (one line, printed) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        from worker.settings import Knobs

        args.knobs = Knobs.from_env(env)  # validated for every command, as at any start-up
        out = cmd_tokenize(args) if args.cmd == "tokenize" else cmd_features(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a library failure (e.g. ONNX Runtime): still one line
        print(f"error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
