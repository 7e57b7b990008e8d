"""Where the worker's CPU time goes: ``python -m tuning.profile [--seconds S] [--out DIR]
[--model-dir DIR] [--dims tiny|official]`` (``./run.sh profile``).

Starts the service (:func:`worker.demo.start_service`: the caller's ``COSY_*`` knobs apply),
sends one warm-up request, then records the server and every stage process with py-spy, all in
parallel, for ``--seconds`` (default 30) while :data:`CLIENTS` clients stream a fixed workload
(:data:`TEXTS` in turn, seeds 0, 1, 2, ..., the fixtures' English prompt or a generated tone as
the voice). The stages are sampled with ``--native`` (their time is in torch's C++ kernels),
the server without (pure Python around ZeroMQ). Without ``--model-dir``: the random-weight
model dir of ``--dims`` (default ``official``), written once under ``.cache/``.

One folder (default ``.cache/profiles/<YYYYmmdd-HHMMSS>/`` of the checkout, never the current
directory) gets, per process (``server``, ``llm``, ``flow``, ``hift``):

- ``<process>.svg``: a flamegraph (root at the bottom; hover a frame for its samples),
- ``<process>.collapsed.txt``: py-spy's raw collapsed stacks (``frame;frame;... count``; also
  opens in https://www.speedscope.app for zooming),

and ``summary.txt`` (per process: the top 15 functions by self samples, with self and total
percentages), ``stats.json`` (the service's ``stats`` after the workload) and ``server.log``.
py-spy drops idle threads, so percentages are of the time a process was busy; torch's OpenMP
worker threads carry no Python state and are not sampled (their parent thread's native stack
shows the op that dispatched them).

py-spy attaches with ptrace: as root it just works; otherwise it needs ``CAP_SYS_PTRACE``
(Docker: ``--cap-add SYS_PTRACE``) or ``kernel.yama.ptrace_scope=0``. If it cannot attach,
the one-line reason and those fixes are printed and the exit status is 1. ``PY_SPY`` may name
another py-spy binary (default: the venv's).

With ``COSY_TORCH_PROFILE=DIR`` set, each stage also writes a ``torch.profiler`` table and
Chrome trace into DIR when the service stops (``<stage>-<pid>.txt`` / ``.trace.json``); they
are listed at the end and in ``summary.txt``.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

from worker.demo import (
    InputError,
    OneLineParser,
    ServiceFailed,
    check_knobs,
    default_voice,
    one_line,
    resolve_model_dir,
    stage_pids,
    start_service,
)

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / ".cache" / "profiles"
PROG = "run.sh profile"
TEXTS = (
    "The quick brown fox jumps over the lazy dog while the band plays on.",
    "Streaming speech synthesis on a CPU keeps every stage of the pipeline busy.",
    "Hello! How are you today? I hope the weather is pleasant where you are.",
    "Numbers like 42 and dates like March 3rd, 2021 go through text normalization first.",
)
CLIENTS = 2  # concurrent streams: the stages overlap as they do under load
RATE_HZ = 100
TOP = 15
PTRACE_FIX = (
    "run as root (sudo), or give the container CAP_SYS_PTRACE (docker run --cap-add "
    "SYS_PTRACE), or allow ptrace with `sudo sysctl kernel.yama.ptrace_scope=0`"
)


class SpyError(Exception):
    """py-spy cannot record: one line with the reason and the fix."""


# ---------------------------------------------------------------------------------------------
# py-spy


def find_py_spy() -> str:
    env = os.environ.get("PY_SPY")
    if env:
        return env
    local = Path(sys.executable).parent / "py-spy"
    if local.is_file():
        return str(local)
    found = shutil.which("py-spy")
    if found:
        return found
    raise SpyError("py-spy is not installed: `./run.sh setup` installs it (requirements.cpu.txt)")


def spy_failure(stderr: str, pid: int) -> str:
    """py-spy's error output -> one line: the reason, and the fix for a ptrace refusal."""
    text = stderr or ""
    low = text.lower()
    if any(s in low for s in ("permission denied", "operation not permitted", "ptrace", "eperm")):
        return f"py-spy may not attach to pid {pid} (ptrace not permitted): {PTRACE_FIX}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    err = next((ln for ln in lines if ln.lower().startswith("error")), lines[0] if lines else "")
    return f"py-spy failed on pid {pid}: {err or 'no output'}"


def check_py_spy(py_spy: str) -> None:
    """Fail fast, before the service starts: can py-spy attach to this very process?"""
    try:
        r = subprocess.run([py_spy, "dump", "--pid", str(os.getpid())], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    except OSError as e:
        raise SpyError(f"cannot run py-spy ({py_spy}): {e.strerror or e}") from None
    except subprocess.TimeoutExpired:
        raise SpyError("py-spy dump of this process did not finish within 60 s") from None
    if r.returncode != 0:
        raise SpyError(spy_failure(r.stderr + r.stdout, os.getpid()))


def start_recording(py_spy: str, name: str, pid: int, seconds: int, out: Path, native: bool):
    cmd = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(RATE_HZ),
           "--duration", str(seconds), "-o", str(out / f"{name}.collapsed.txt")]  # fmt: skip
    if native:
        cmd.append("--native")
    err = open(out / f".{name}.py-spy.log", "w+b")  # noqa: SIM115 - closed in finish_recording
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    return proc, err


def finish_recording(proc: subprocess.Popen, err, pid: int, timeout_s: float) -> str | None:
    """Wait for one py-spy (by pid, killed after ``timeout_s``); its failure line or None."""
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    err.seek(0)
    text = err.read().decode(errors="replace")
    err.close()
    Path(err.name).unlink(missing_ok=True)
    if code is None:
        return f"py-spy on pid {pid} did not finish within {timeout_s:.0f} s (killed)"
    return None if code == 0 else spy_failure(text, pid)


# ---------------------------------------------------------------------------------------------
# collapsed stacks -> top functions, flamegraph


_LINE = re.compile(r":\d+\)$")
_ADDR = re.compile(r"^0x[0-9a-fA-F]+ \((.*)\)$")


def frame_name(frame: str) -> str:
    """A py-spy frame without its line number: ``func (file.py:12)`` -> ``func (file.py)``;
    an unsymbolized native address ``0x7f.. (libc.so.6)`` -> ``[libc.so.6]``."""
    m = _ADDR.match(frame)
    if m:
        return f"[{m.group(1)}]"
    return _LINE.sub(")", frame)


def short_name(name: str, limit: int = 120) -> str:
    """For display: C++ template arguments folded (``f<...>``), at most ``limit`` characters."""
    out, depth = [], 0
    for i, ch in enumerate(name):
        if ch == "<" and not name[max(0, i - 8) : i].endswith("operator"):
            depth += 1
            if depth == 1:
                out.append("<...>")
            continue
        if ch == ">" and depth:
            depth -= 1
            continue
        if not depth:
            out.append(ch)
    text = "".join(out) if depth == 0 else name
    return text if len(text) <= limit else text[: limit - 3] + "..."


# blocking waits py-spy cannot always tell from work (marked in the summary)
WAITS = re.compile(r"^(poll|epoll_wait|select|pselect\w*|ppoll|recv\w*|read|nanosleep|"
                   r"clock_nanosleep|sem_\w*wait|pthread_cond_\w*wait|futex\w*|__futex\w*|"
                   r"Poller\.poll|GarbageCollectorThread\.run|zmq_msg_recv|zmq_poll|"
                   r"Thread\.wait|Condition\.wait|Event\.wait)\b")  # fmt: skip


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """``frame;frame;... count`` lines -> [(frames root first, count)]."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append(([frame_name(f) for f in stack.split(";")], int(count)))
    return stacks


def top_functions(stacks, n: int = TOP) -> tuple[int, list[tuple[str, int, int]]]:
    """(total samples, [(function, self samples, total samples)] by self, descending)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for frames, count in stacks:
        total += count
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    rows = [(f, c, incl[f]) for f, c in own.most_common(n)]
    return total, rows


def format_top(name: str, pid: int, native: bool, stacks, n: int = TOP) -> str:
    total, rows = top_functions(stacks, n)
    how = "python + native frames" if native else "python frames"
    head = f"== {name} (pid {pid}, {how}): {total} samples at {RATE_HZ} Hz while busy =="
    if not total:
        return head + "\n  (no samples: the process was idle)\n"
    lines = [head, f"  {'self%':>6} {'total%':>6} {'self':>7}  function (file)"]
    for f, c, inc in rows:
        wait = "  [waiting]" if WAITS.match(f) else ""
        if f.startswith(("[libgomp", "[libiomp", "[libomp")):
            wait = "  [OpenMP]"
        lines.append(f"  {100 * c / total:5.1f}% {100 * inc / total:5.1f}% {c:7d}  "
                     f"{short_name(f)}{wait}")  # fmt: skip
    return "\n".join(lines) + "\n"


def flamegraph_svg(stacks, title: str, subtitle: str = "", width: int = 1200) -> str:
    """A static flamegraph (root at the bottom) of collapsed stacks, with hover titles."""
    root: dict = {"n": 0, "c": {}}
    for frames, count in stacks:
        root["n"] += count
        node = root
        for f in frames:
            node = node["c"].setdefault(f, {"n": 0, "c": {}})
            node["n"] += count
    total = root["n"]
    row, pad, top = 16, 10, 44
    depth = _depth(root)
    height = top + (depth + 1) * row + pad
    scale = (width - 2 * pad) / total if total else 0.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Verdana, sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#f8f8f2"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="15">{_x(title)}</text>',
        f'<text x="{width / 2}" y="34" text-anchor="middle" fill="#555">{_x(subtitle)}</text>',
    ]
    if not total:
        out.append(f'<text x="{pad}" y="{top + row}">no samples (the process was idle)</text>')
    else:
        base = height - pad - row

        def draw(name: str, node: dict, x: float, level: int) -> None:
            w = node["n"] * scale
            if w < 0.3:
                return
            y = base - level * row
            pct = 100 * node["n"] / total
            tip = _x(f"{name}: {node['n']} samples ({pct:.2f}%)")
            out.append(f'<g><title>{tip}</title><rect x="{x:.2f}" y="{y}" width="{w:.2f}" '
                       f'height="{row - 1}" rx="2" fill="{_color(name, level)}"/>')  # fmt: skip
            chars = int((w - 6) / 6.6)
            if chars >= 3:
                label = short_name(name, 1000)
                label = label if len(label) <= chars else label[: chars - 2] + ".."
                out.append(f'<text x="{x + 3:.2f}" y="{y + row - 4}">{_x(label)}</text>')
            out.append("</g>")
            cx = x
            for child_name, child in sorted(node["c"].items()):
                draw(child_name, child, cx, level + 1)
                cx += child["n"] * scale

        draw("all", root, float(pad), 0)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _depth(node: dict) -> int:
    return 1 + max((_depth(c) for c in node["c"].values()), default=-1) if node["c"] else 0


def _x(text: str) -> str:
    return html.escape(text, quote=True)


def _color(name: str, level: int) -> str:
    h = zlib.crc32(name.encode())
    if level == 0:
        return "rgb(200,200,200)"
    where = name.rpartition(" (")[2]
    if not (name.startswith("[") or ".so" in where or where.startswith("[")):  # python: warm
        return f"rgb({205 + h % 50},{90 + (h >> 8) % 110},{40 + (h >> 16) % 40})"
    return f"rgb({70 + h % 50},{140 + (h >> 8) % 60},{200 + (h >> 16) % 55})"  # native: cool


# ---------------------------------------------------------------------------------------------
# the workload


class Workload:
    """:data:`CLIENTS` threads streaming :data:`TEXTS` (seeds 0, 1, 2, ...) until a deadline;
    a stream still running at the deadline is left (and so cancelled)."""

    def __init__(self, svc, voice, seconds: float):
        self.svc, self.voice, self.seconds = svc, voice, seconds
        self.results: list[dict] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.counter = 0

    def _next(self) -> int:
        with self.lock:
            k = self.counter
            self.counter += 1
            return k

    def run(self) -> None:
        self.deadline = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + 600)

    def _client(self) -> None:
        try:
            with self.svc.client(timeout_s=300.0) as client:
                while time.monotonic() < self.deadline:
                    k = self._next()
                    self.results.append(one_request(client, self.voice, k, self.deadline))
        except Exception as e:  # noqa: BLE001 - reported in the summary
            with contextlib.suppress(Exception), self.lock:
                self.errors.append(one_line(str(e)) or type(e).__name__)


def one_request(client, voice, k: int, deadline: float | None = None) -> dict:
    """Stream request ``k`` (text ``k mod len(TEXTS)``, seed ``k``) until it ends or
    ``deadline``; returns its timings."""
    t0 = time.monotonic()
    first, samples, done = None, 0, False
    stream = client.stream(TEXTS[k % len(TEXTS)], mode=voice.mode, prompt_wav=voice.wav,
                           prompt_text=voice.prompt_text, seed=k, format="f32le")  # fmt: skip
    with contextlib.closing(stream):
        for chunk in stream:
            if first is None and chunk.audio.size:
                first = time.monotonic() - t0
            samples += chunk.audio.size
            done = chunk.final
            if deadline is not None and time.monotonic() > deadline and not done:
                break
    return {"k": k, "first_audio_s": first, "total_s": time.monotonic() - t0,
            "audio_s": samples / 24000, "complete": done}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# main


def _parser():
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="how long to record (default: %(default)g)")  # fmt: skip
    ap.add_argument("--out", help="output folder (default: .cache/profiles/<time>/)")
    ap.add_argument("--model-dir", help="a CosyVoice3 model dir (default: random weights)")
    ap.add_argument("--dims", choices=["tiny", "official"],
                    help="dims of the random-weight model dir (default: official)")  # fmt: skip
    return ap


def _out_dir(arg: str | None) -> Path:
    if arg is not None:
        if not arg.strip():
            raise InputError("--out is empty")
        out = Path(arg).expanduser().resolve()
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
        return out
    out = PROFILES / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while out.exists():
        n += 1
        out = PROFILES / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not math.isfinite(args.seconds) or args.seconds <= 0:
            raise InputError(f"--seconds {args.seconds:g}: must be a number > 0 (how long to "
                             "record)")  # fmt: skip
        knobs = check_knobs()
        model_dir, _cfg, random = resolve_model_dir(args.model_dir, args.dims)
        py_spy = find_py_spy()
        check_py_spy(py_spy)
        out = _out_dir(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except InputError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except SpyError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    try:
        return _profile(args, knobs, model_dir, random, py_spy, out)
    except (ServiceFailed, SpyError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - WorkerError, TimeoutError, OSError: one line
        print(f"{PROG}: {one_line(str(e)) or type(e).__name__}; log: {out / 'server.log'}",
              file=sys.stderr)  # fmt: skip
        return 1


def _profile(args, knobs, model_dir: Path, random: bool, py_spy: str, out: Path) -> int:
    seconds = max(1, math.ceil(args.seconds))
    voice = default_voice()
    if random:
        print(f"NOTE: {model_dir} holds RANDOM weights (the timings are real, the audio noise)")
    print(f"starting the worker (model dir {model_dir}) ...", flush=True)
    t_start = time.time()
    svc, health = start_service(model_dir, knobs, f"ipc://{out / '.front.sock'}",
                                out / "server.log")  # fmt: skip
    failures: dict[str, str] = {}
    try:
        procs = {"server": svc.pid, **stage_pids(health)}
        print("processes: " + ", ".join(f"{n} {p}" for n, p in procs.items()), flush=True)
        with svc.client(timeout_s=300.0) as client:
            warm = one_request(client, voice, 0)
        print(f"warm-up request: {warm['total_s']:.2f} s", flush=True)
        print(f"recording {seconds} s with py-spy while {CLIENTS} clients stream fixed texts ...",
              flush=True)  # fmt: skip
        spies = {n: start_recording(py_spy, n, pid, seconds, out, native=n != "server")
                 for n, pid in procs.items()}  # fmt: skip
        work = Workload(svc, voice, seconds)
        work.run()
        for n, (proc, err) in spies.items():
            why = finish_recording(proc, err, procs[n], timeout_s=seconds + 120)
            if why:
                failures[n] = why
        try:
            stats = svc.stats()
        except Exception as e:  # noqa: BLE001
            stats = {"error": one_line(str(e))}
    finally:
        svc.stop()
    (out / ".front.sock").unlink(missing_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")

    sections = []
    for n, pid in procs.items():
        raw = out / f"{n}.collapsed.txt"
        if n in failures or not raw.is_file():
            failures.setdefault(n, f"py-spy wrote no {raw.name}")
            sections.append(f"== {n} (pid {pid}): not recorded: {failures[n]} ==\n")
            continue
        stacks = parse_collapsed(raw.read_text(errors="replace"))
        native = n != "server"
        sections.append(format_top(n, pid, native, stacks))
        total = sum(c for _, c in stacks)
        frames = "python + native" if native else "python"
        sub = f"pid {pid}, {total} samples at {RATE_HZ} Hz while busy, {frames} frames, {seconds} s"
        (out / f"{n}.svg").write_text(flamegraph_svg(stacks, f"{n} ({model_dir.name})", sub))

    torch_files = _torch_profiles(knobs, procs, t_start)
    summary = _summary(args, model_dir, random, seconds, work, warm, sections, torch_files)
    (out / "summary.txt").write_text(summary)
    print(summary, end="")
    print(f"profile folder: {out}")
    if failures:
        first = next(iter(failures.values()))
        print(f"{PROG}: {len(failures)} of {len(procs)} processes not recorded: {first}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _torch_profiles(knobs, procs: dict[str, int], since: float) -> str:
    """The COSY_TORCH_PROFILE part of the summary ("" when it is not set)."""
    d = knobs.torch_profile
    if d is None:
        return ""
    d = Path(d)
    files = sorted(d.glob("*-*.*")) if d.is_dir() else []
    lines = [f"torch.profiler output (COSY_TORCH_PROFILE={d}):"]
    for name, pid in procs.items():
        if name == "server":
            continue
        mine = [p for p in files if p.name.split(".")[0] == f"{name}-{pid}"
                and p.stat().st_mtime >= since - 1]  # fmt: skip
        if mine:
            lines += [f"  {p}" for p in mine]
        else:
            lines.append(
                f"  {name} (pid {pid}): nothing written (stopped before it finished writing? "
                "the server gives its stages 10 s at shutdown)"
            )
    return "\n".join(lines) + "\n"


def _summary(args, model_dir, random, seconds, work, warm, sections, torch_files) -> str:
    done = [r for r in work.results if r["complete"]]
    audio = sum(r["audio_s"] for r in work.results)
    firsts = sorted(r["first_audio_s"] for r in done if r["first_audio_s"] is not None)
    p50 = f"{firsts[len(firsts) // 2]:.2f} s" if firsts else "n/a"
    lines = [
        f"profile of the CosyVoice3 worker, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"model dir: {model_dir}" + (" (RANDOM weights)" if random else ""),
        f"workload: {seconds} s, {CLIENTS} clients streaming {len(TEXTS)} fixed texts in turn "
        f"(seeds 0, 1, ...) after a {warm['total_s']:.2f} s warm-up request",
        f"requests: {len(work.results)} ({len(done)} complete, the rest cut at the end), "
        f"{audio:.1f} s of audio, first audio p50 {p50}",
        "knobs: "
        + (
            ", ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("COSY_"))
            or "defaults"
        ),  # fmt: skip
    ]
    if work.errors:
        lines.append("client errors: " + "; ".join(sorted(set(work.errors))))
    lines.append("percentages: of the samples of that process (py-spy skips idle threads); "
                 "self = in the function itself, total = with what it calls")  # fmt: skip
    lines.append(
        "[waiting]: a blocking call py-spy counted as busy; [OpenMP]: self time in "
        "the OpenMP runtime (spinning / waiting at the end of a parallel region)"
    )
    lines.append("")
    text = "\n".join(lines) + "\n" + "\n".join(sections)
    if torch_files:
        text += "\n" + torch_files
    return text


if __name__ == "__main__":
    sys.exit(main())
