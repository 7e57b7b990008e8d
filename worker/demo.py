"""``./run.sh demo``: synthesize a sentence through the worker service into ``demo.wav``.

``python -m worker.demo [--model-dir DIR | --dims tiny|official] [--text T] [--seconds S]
[--out PATH]`` starts the service (:class:`worker.launch.ServiceProcess`: server + stage
processes, on an ``ipc://`` socket in a temporary dir, with the caller's ``COSY_*`` knobs),
streams one request through :class:`worker.client.Client`, writes a 24 kHz 16-bit WAV
(default ``demo.wav`` in the current directory), prints its path, the time to first audio and
the real-time factor, and stops the service.

Without ``--model-dir`` it uses a random-weight model dir at ``--dims`` (default ``official``),
written once under ``.cache/random-<dims>/`` of the source checkout by ``python -m
tuning.random_model`` (run as a subprocess: nothing in ``worker/`` imports ``tuning/``). Random
weights synthesize noise, and very quiet noise (tiny dims peak around -100 dBFS, official
around -55 dBFS): audio from a random-weight dir is peak-normalized to -1 dBFS before it is
written, and the demo says by how many dB. Audio from real weights is written as it is.

Voice: the fixtures' English prompt ``../shared/fixtures/prompts/en_1272_128104_000003_000001``
(wav + transcript, ``zero_shot``) when it is there, else a generated 3 s tone
(``cross_lingual``: no transcript needed). ``--seconds S`` stops after S seconds of audio (the
stream is cancelled); the default is the whole sentence.

Bad input (knobs, model dir, ``--seconds``) is one line on stderr and exit status 2; the
service not starting is one line plus the path of its log, exit 1. The helpers here
(:func:`check_model_dir`, :func:`check_knobs`, :func:`random_model_dir`, :func:`start_service`,
:func:`default_voice`) are shared with ``run.sh`` and ``tuning.profile``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPT = REPO.parent / "shared" / "fixtures" / "prompts" / "en_1272_128104_000003_000001"
DEFAULT_TEXT = "Hello! This is a short demo of the CosyVoice3 worker, streaming on a CPU."
SAMPLE_RATE = 24000
TARGET_DBFS = -1.0  # peak after normalization
SEED = 0
# what the service needs besides cosyvoice3.yaml + CosyVoice-BlankEN/ (read by the config)
SERVICE_FILES = ("llm.pt", "flow.pt", "hift.pt", "speech_tokenizer_v3.onnx", "campplus.onnx")
RANDOM_MARKER = "Random-weight CosyVoice3 model dir"  # first line of tuning.random_model's yaml
PROG = "run.sh demo"


class InputError(Exception):
    """Bad input: the message is one line naming the problem."""


class ServiceFailed(Exception):
    """The service did not come up (or died): one line, with the path of its log."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(text: str) -> str:
    """A possibly multi-line message (a YAML error, a KnobError) as one line."""
    parts = [p.strip() for p in str(text).splitlines()]
    return "; ".join(p for p in parts if p and set(p) != {"^"})


# ---------------------------------------------------------------------------------------------
# checks


def check_knobs(env=None):
    """``Knobs.from_env()``, its :class:`KnobError` turned into a one-line InputError. With
    ``COSY_CPUS`` the knobs are read again inside that CPU set, as the worker will see them
    (a stage's ``COSY_<STAGE>_CPUS`` must lie within it)."""
    from worker.settings import KnobError, Knobs

    try:
        knobs = Knobs.from_env(env)
        if knobs.cpus and hasattr(os, "sched_setaffinity"):
            saved = os.sched_getaffinity(0)
            if set(knobs.cpus) != saved:
                os.sched_setaffinity(0, knobs.cpus)
                try:
                    Knobs.from_env(env)
                finally:
                    os.sched_setaffinity(0, saved)
        return knobs
    except KnobError as e:
        head = "bad COSY_* setting" if len(e.problems) == 1 else "bad COSY_* settings"
        raise InputError(f"{head}: " + "; ".join(one_line(p) for p in e.problems)) from None


def check_model_dir(path: str | Path | None, need: tuple[str, ...] = SERVICE_FILES):
    """Resolve ``path`` (relative to the current directory) and check it is a readable model
    dir holding ``need``. Returns ``(absolute path, ModelConfig)``; raises InputError."""
    from worker.config import read_model_config

    if path is None:
        raise InputError("no model dir: pass --model-dir DIR")
    if not str(path).strip():
        raise InputError("the model dir is an empty string: pass --model-dir DIR")
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise InputError(f"model dir {p} does not exist")
    if not p.is_dir():
        raise InputError(f"model dir {p} is not a directory")
    try:
        empty = not any(p.iterdir())
    except OSError as e:
        raise InputError(f"model dir {p} cannot be read: {e.strerror}") from None
    if empty:
        raise InputError(f"model dir {p} is empty (expected cosyvoice3.yaml, llm.pt, ...)")
    try:
        cfg = read_model_config(p)
    except Exception as e:  # noqa: BLE001 - ConfigError, OSError, JSON errors: one line each
        msg = one_line(str(e)) or type(e).__name__
        raise InputError(msg if str(p) in msg else f"model dir {p}: {msg}") from None
    missing = [n for n in need if not (p / n).is_file()]
    if missing:
        raise InputError(f"model dir {p} lacks {', '.join(missing)}")
    return p, cfg


def check_seconds(seconds: float, cfg, prompt_s: float) -> float:
    """``--seconds``: > 0 and within the fixed noise after the prompt
    (:func:`worker.noise.max_audio_seconds`)."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"--seconds {seconds:g}: must be a number > 0")
    from worker.noise import max_audio_seconds  # imports torch: only when --seconds is given

    prompt_tokens = round(prompt_s * cfg.token_frame_rate)
    limit = max_audio_seconds(cfg, prompt_tokens)
    if seconds > limit:
        raise InputError(
            f"--seconds {seconds:g}: at most {limit:.1f} s with this {prompt_s:.1f} s prompt "
            "(the fixed noise limit, worker.noise.max_audio_seconds: 300 s per request, "
            "prompt included)"
        )
    return seconds


def is_random(model_dir: Path) -> bool:
    """Whether ``model_dir`` was written by ``tuning.random_model`` (random weights)."""
    try:
        with open(model_dir / "cosyvoice3.yaml", encoding="utf-8", errors="replace") as f:
            return RANDOM_MARKER in f.readline()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# the random-weight model dir


def _complete(d: Path) -> bool:
    names = ("cosyvoice3.yaml", "CosyVoice-BlankEN/config.json", *SERVICE_FILES)
    return all((d / n).is_file() for n in names)


def random_model_dir(dims: str) -> Path:
    """``.cache/random-<dims>/`` of the checkout, written once (atomically: into a temporary
    sibling, then renamed) by ``python -m tuning.random_model`` in a subprocess."""
    out = REPO / ".cache" / f"random-{dims}"
    if _complete(out):
        return out
    if not (REPO / "tuning" / "random_model.py").is_file():
        raise InputError(
            "no --model-dir, and random model dirs are written by tuning/random_model.py of "
            "the source checkout, which is not here: pass --model-dir DIR"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing a random-weight {dims}-dims model dir to {out} (once) ...", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"random-{dims}.tmp-", dir=out.parent))
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "tuning.random_model", "--dims", dims, "--out", str(tmp)]
        r = subprocess.run(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
            raise InputError(f"could not write the random model dir {out}: {last}")
        if out.exists() and not _complete(out):
            shutil.rmtree(out)  # an interrupted earlier attempt
        try:
            tmp.rename(out)
        except OSError:
            if not _complete(out):  # somebody else finished it meanwhile: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_dir(model_dir: str | None, dims: str | None):
    """``--model-dir`` / ``--dims`` -> ``(path, ModelConfig, random weights?)``."""
    if model_dir is not None:
        if dims is not None:
            raise InputError("--dims chooses the random-weight model dir: it does not go "
                             "with --model-dir")  # fmt: skip
        path, cfg = check_model_dir(model_dir)
    else:
        path, cfg = check_model_dir(random_model_dir(dims or "official"))
    return path, cfg, is_random(path)


# ---------------------------------------------------------------------------------------------
# the voice


@dataclass(frozen=True)
class DemoVoice:
    label: str
    wav: bytes
    mode: str  # zero_shot (with transcript) or cross_lingual
    prompt_text: str | None
    seconds: float


def tone_wav(seconds: float = 3.0, rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV of a soft 220 Hz tone with a few harmonics (the fallback voice)."""
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in (1, 2, 3, 4))
    x = 0.3 * x / np.max(np.abs(x)) * np.minimum(1.0, np.minimum(t, seconds - t) / 0.05)
    return wav_bytes(x.astype(np.float32), rate)


def default_voice() -> DemoVoice:
    """The fixtures' English prompt (zero_shot) if present, else a generated 3 s tone."""
    wav, txt = PROMPT.with_suffix(".wav"), PROMPT.with_suffix(".txt")
    if wav.is_file() and txt.is_file():
        data = wav.read_bytes()
        with wave.open(io.BytesIO(data)) as w:
            secs = w.getnframes() / w.getframerate()
        text = txt.read_text(encoding="utf-8").strip()
        return DemoVoice(str(wav), data, "zero_shot", text, secs)
    return DemoVoice("a generated 3 s tone (no prompt fixture found at "
                     f"{PROMPT.parent})", tone_wav(3.0), "cross_lingual", None, 3.0)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# audio out


def wav_bytes(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Mono 16-bit PCM WAV of float samples (clipped to [-1, 1])."""
    pcm = np.round(np.clip(np.asarray(audio, np.float32).reshape(-1), -1, 1) * 32767)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def normalize(audio: np.ndarray, enabled: bool) -> tuple[np.ndarray, str, bool]:
    """Peak-normalize to :data:`TARGET_DBFS` if ``enabled``. Returns (audio, note, ok);
    ``ok`` is False for empty or all-zero audio."""
    audio = np.asarray(audio, np.float32).reshape(-1)
    if audio.size == 0:
        return audio, "the model produced no audio (0 samples)", False
    bad = ~np.isfinite(audio)
    note = ""
    if bad.any():
        audio = np.where(bad, 0, audio).astype(np.float32)
        note = f" ({int(bad.sum())} non-finite samples set to 0)"
    peak = float(np.max(np.abs(audio)))
    if peak == 0.0:
        return audio, f"the model produced silence: every sample is 0{note}", False
    peak_db = 20 * math.log10(peak)
    if not enabled:
        return audio, f"peak {peak_db:.1f} dBFS (not normalized: real weights){note}", True
    gain_db = TARGET_DBFS - peak_db
    out = (audio * np.float32(10 ** (gain_db / 20))).astype(np.float32)
    note = (f"normalized: peak {peak_db:.1f} dBFS, gain {gain_db:+.1f} dB to {TARGET_DBFS:.1f} "
            f"dBFS (random weights make near-silent audio){note}")  # fmt: skip
    return out, note, True


# ---------------------------------------------------------------------------------------------
# the service


def start_service(model_dir: Path, knobs, endpoint: str, log_path: Path,
                  timeout_s: float = 900.0):  # fmt: skip
    """Start the service with the caller's ``COSY_*`` (``COSY_CPUS``: the whole worker is
    started on those CPUs) and wait until it is up. Raises :class:`ServiceFailed` (one line,
    the log's path) after stopping whatever it started. Returns ``(ServiceProcess, health)``."""
    from worker.launch import ServiceError, ServiceProcess

    saved = None
    if knobs.cpus and hasattr(os, "sched_setaffinity"):  # inherited by the server and stages
        saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, knobs.cpus)
    try:
        svc = ServiceProcess(model_dir, endpoint, log_path, inherit_cosy=True)
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)
    try:
        health = svc.wait_up(timeout_s)
    except ServiceError:
        svc.stop()
        raise ServiceFailed(f"the worker did not start: {_log_reason(svc.log_tail())}; "
                            f"log: {log_path}") from None  # fmt: skip
    except BaseException:
        svc.stop()
        raise
    return svc, health


def _log_reason(tail: str) -> str:
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("worker.server:", "worker.stages.process:")):
            return ln
    return lines[-1] if lines else "no output"


def stage_pids(health: dict) -> dict[str, int]:
    return {n: s["pid"] for n, s in health.get("stages", {}).items() if s.get("pid")}


# ---------------------------------------------------------------------------------------------
# main


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="a CosyVoice3 model dir (default: random weights)")
    ap.add_argument("--dims", choices=["tiny", "official"],
                    help="dims of the random-weight model dir (default: official)")  # fmt: skip
    ap.add_argument("--text", default=DEFAULT_TEXT, help="what to say (default: %(default)r)")
    ap.add_argument("--seconds", type=float, help="stop after this much audio (default: all)")
    ap.add_argument("--out", default="demo.wav", help="output WAV (default: ./demo.wav)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tmp: Path | None = None
    try:
        if not args.text.strip():
            raise InputError("--text is empty")
        knobs = check_knobs()
        out = Path(args.out).expanduser().resolve()
        if not out.parent.is_dir():
            raise InputError(f"--out {args.out}: directory {out.parent} does not exist")
        model_dir, cfg, random = resolve_model_dir(args.model_dir, args.dims)
        voice = default_voice()
        if args.seconds is not None:
            check_seconds(args.seconds, cfg, voice.seconds)
        if random:
            print(f"NOTE: {model_dir} holds RANDOM weights: the audio is noise, not speech.")
        tmp = Path(tempfile.mkdtemp(prefix="cosyvoice-demo-"))
        endpoint = f"ipc://{tmp / 'front.sock'}"
        print(f"starting the worker on {endpoint} (model dir {model_dir}) ...", flush=True)
        t0 = time.perf_counter()
        svc, health = start_service(model_dir, knobs, endpoint, tmp / "server.log")
        try:
            pids = ", ".join(f"{n} {p}" for n, p in stage_pids(health).items())
            print(f"worker up in {time.perf_counter() - t0:.1f} s (server {svc.pid}, {pids})")
            print(f"voice: {voice.label} ({voice.mode})")
            print(f"text: {args.text}", flush=True)
            audio, first, total, chunks = _synthesize(svc, voice, args.text, args.seconds)
        finally:
            code = svc.stop()
        if code not in (0, None):
            raise ServiceFailed(f"the worker exited with code {code}; log: {tmp / 'server.log'}")
    except InputError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except ServiceFailed as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - WorkerError, TimeoutError, OSError: one line
        log = f"; log: {tmp / 'server.log'}" if tmp is not None else ""
        print(f"{PROG}: {one_line(str(e)) or type(e).__name__}{log}", file=sys.stderr)
        return 1
    shutil.rmtree(tmp, ignore_errors=True)

    audio_s = audio.size / SAMPLE_RATE
    rtf = f"{total / audio_s:.2f}" if audio_s else "n/a"
    first_s = "n/a (no audio)" if first is None else f"{first:.2f} s"
    print(f"first audio {first_s}, total {total:.2f} s for {audio_s:.2f} s of audio "
          f"in {chunks} chunks: RTF {rtf}")  # fmt: skip
    audio, note, ok = normalize(audio, random)
    print(note)
    out.write_bytes(wav_bytes(audio))
    print(f"wrote {out} ({audio_s:.2f} s, {SAMPLE_RATE} Hz, 16-bit mono)")
    if not ok:
        print(f"{PROG}: {note}", file=sys.stderr)
        return 1
    return 0


def _synthesize(svc, voice: DemoVoice, text: str, seconds: float | None):
    """Stream one request; returns (audio, first-audio s, total s, chunks)."""
    limit = None if seconds is None else int(round(seconds * SAMPLE_RATE))
    parts: list[np.ndarray] = []
    n = chunks = 0
    first = None
    with svc.client(timeout_s=300.0) as client:
        t0 = time.perf_counter()
        stream = client.stream(
            text, mode=voice.mode, prompt_wav=voice.wav, prompt_text=voice.prompt_text,
            seed=SEED, format="f32le",
        )  # fmt: skip
        with contextlib.closing(stream):
            for chunk in stream:
                chunks += 1
                if first is None and chunk.audio.size:
                    first = time.perf_counter() - t0
                parts.append(chunk.audio)
                n += chunk.audio.size
                if limit is not None and n >= limit:
                    break  # leaving the stream cancels the rest at the worker
        total = time.perf_counter() - t0
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return (audio[:limit] if limit is not None else audio), first, total, chunks


if __name__ == "__main__":
    sys.exit(main())
