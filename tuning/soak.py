"""Soak test of the worker service: ``python -m tuning.soak --clients N --requests M --fuzz K
[--kill-stage llm|flow|hift] --json PATH [--model-dir DIR] [--seed S] [--timeout-s T]``.

It starts the real service (:class:`worker.launch.ServiceProcess`: server + three stage
processes, bound to ``ipc://`` in a private temp dir; a random tiny model dir is written there
unless ``--model-dir`` is given), then:

* ``N`` client threads, each with its own raw DEALER socket (up to ``--depth`` requests in
  flight each), send ``M`` tts requests together: streamed and ``stream: false``, texts of
  several lengths, all three formats, the fixture's audio prompt or a saved speaker (added
  once at start with ``speaker.add``), some seeded. Seeded requests come in pairs (same text,
  voice, seed, format) sent by different clients at different times: both answered ok must
  carry identical audio.
* One fuzz thread sends ``K`` malformed messages from its own raw DEALER socket, spread over
  the load (random bytes, truncated / non-object / too-deep JSON, wrong types, unknown ops,
  fields and values, frames just over ``COSY_MAX_FRAME_MB``, REQ-style messages with an empty
  delimiter, undecodable prompt audio). Every one must be answered with ``bad_request``
  (except that a fuzzed tts whose only fault is its audio meets admission first: with a full
  queue it is ``overloaded``, counted apart).
* A monitor thread asks ``stats`` every ``--stats-interval-s`` and keeps the peak RSS of every
  process; with ``--kill-stage`` it sends SIGKILL to that stage once ``M/3`` requests have
  finished and then waits for the service to report the stage up again under a new pid.

Every reply is checked on the raw socket (:class:`Ledger`): exactly one final reply per
request, nothing after it (``duplicated``: a second final, a repeated ``seq`` or any reply
after the final), ``seq`` consecutive from 0 (``seq_gaps``), payloads that decode to the header's
``samples`` (``bad_replies``), only ids this client sent (``mixed``: a reply meant for another
client or request; a seeded pair with different audio counts there too). A request with no
reply for ``--timeout-s`` seconds, or unfinished when the wall-clock ``--budget-s`` runs out,
is ``lost`` (the service is then stopped, which may take up to 30 s more). Errors are
counted by code: ``internal`` is expected for requests held by a killed stage, ``overloaded``
when the queue is full; neither fails the run.

Output: a summary table on stdout and ``--json PATH`` with ``requests``, ``ok``, ``errors``
(by code), ``lost``, ``mixed``, ``duplicated``, ``max_rss_mb`` (per process) plus ``fuzz``,
``kill``, ``wall_s``, ``config`` and details. Exit status: 0 pass; 1 on any lost, mixed,
duplicated, seq gap or bad reply, a fuzz reply that is not ``bad_request`` or a missing one, a
killed stage that did not come back, or a service that did not start; 2 usage; 130 interrupted.
Every process the tool starts is stopped (by pid) before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from worker.client import Client, WorkerError
from worker.launch import REPO, ServiceError, ServiceProcess, pid_alive
from worker.protocol import FORMATS, ProtocolError, decode_audio, parse_request

PROG = "tuning.soak"
STAGES = ("llm", "flow", "hift")
PROCESSES = ("server", *STAGES)
SYSTEM = "You are a helpful assistant.<|endofprompt|>"
PROMPT = REPO.parent / "shared" / "fixtures" / "prompts" / "en_1272_128104_000003_000001"
SPEAKER = "soak-speaker"
TEXTS = (
    "Hello there.",
    "This is a medium length sentence, with a comma in the middle of it.",
    "The first sentence is short. The second one is a little longer than the first one!",
    " ".join(f"Sentence number {i} makes this request a long one to synthesize." for i in range(5)),
)
LINGER_S = 0.3  # a client listens this long after its last request for late replies
FRONTEND_TTS = "fe-"  # id prefix of fuzzed tts requests that only the frontend can refuse
RESTART_WAIT_S = 120.0  # after the load, the longest wait for a killed stage to be back


# ---------------------------------------------------------------------------------------------
# the request mix


@dataclass(frozen=True)
class Spec:
    """One tts request of the mix. ``pair``: seeded twins share it (and must match)."""

    index: int
    text: str
    voice: str  # "prompt" (audio frame + transcript) or "speaker" (saved speaker)
    stream: bool
    format: str
    seed: int | None = None
    pair: int | None = None

    def header(self, rid: str, prompt_text: str) -> dict[str, Any]:
        h: dict[str, Any] = {"v": 1, "op": "tts", "id": rid, "text": self.text,
                             "stream": self.stream, "format": self.format}  # fmt: skip
        if self.voice == "speaker":
            h["speaker"] = SPEAKER
        else:
            h["prompt_text"] = prompt_text
        if self.seed is not None:
            h["seed"] = self.seed
        return h


def make_specs(m: int, rng: np.random.Generator) -> list[Spec]:
    """``m`` requests: a quarter of them in seeded pairs, the rest half seeded, all shuffled."""
    raw: list[dict[str, Any]] = []
    n_pairs = m // 4
    for p in range(n_pairs):
        base = {"text": str(rng.choice(TEXTS)), "voice": str(rng.choice(["prompt", "speaker"])),
                "format": str(rng.choice(FORMATS)), "seed": int(rng.integers(0, 2**31)),
                "pair": p}  # fmt: skip
        for _ in range(2):
            raw.append(dict(base, stream=bool(rng.random() < 0.6)))
    while len(raw) < m:
        seed = int(rng.integers(0, 2**31)) if rng.random() < 0.5 else None
        raw.append({"text": str(rng.choice(TEXTS)), "voice": str(rng.choice(["prompt", "speaker"])),
                    "format": str(rng.choice(FORMATS)), "stream": bool(rng.random() < 0.6),
                    "seed": seed})  # fmt: skip
    order = rng.permutation(len(raw))
    return [Spec(index=i, **raw[j]) for i, j in enumerate(order)]


# ---------------------------------------------------------------------------------------------
# bookkeeping: the verdicts


@dataclass
class Track:
    """One sent request as seen by its client."""

    rid: str
    spec: Spec
    t_sent: float
    last: float  # the last time anything arrived for it (or it was sent)
    next_seq: int = 0
    outcome: str | None = None  # "ok", an error code, or "lost"
    message: str = ""
    parts: list[np.ndarray] = field(default_factory=list, repr=False)
    samples: int = 0
    digest: str | None = None


class Ledger:
    """The replies one client (one DEALER socket) got, judged request by request.

    :meth:`sent` registers a request id; :meth:`receive` takes every reply the socket delivers
    and returns the request it completed (first final reply) or None; :meth:`give_up` marks a
    request lost. Counters: ``mixed`` (a reply for an id this client never sent, or a cancel
    ack it never asked for), ``duplicated`` (a reply after the final, or a repeated ``seq``),
    ``seq_gaps``, ``bad_replies`` (unreadable header, payload not matching ``samples``, error
    not final, ``stream: false`` answered in several replies), ``late`` (replies for a request
    already given up as lost). ``notes`` keeps the first few problems in words.
    """

    MAX_NOTES = 20

    def __init__(self, client: int = 0):
        self.client = client
        self.tracks: dict[str, Track] = {}
        self.cancelled: set[str] = set()
        self.replies = 0
        self.mixed = 0
        self.duplicated = 0
        self.seq_gaps = 0
        self.bad_replies = 0
        self.late = 0
        self.notes: list[str] = []

    def _note(self, text: str) -> None:
        if len(self.notes) < self.MAX_NOTES:
            self.notes.append(f"client {self.client}: {text}")

    def sent(self, rid: str, spec: Spec, now: float | None = None) -> Track:
        if rid in self.tracks:
            raise ValueError(f"request id {rid!r} used twice")
        now = time.monotonic() if now is None else now
        self.tracks[rid] = t = Track(rid, spec, now, now)
        return t

    def open(self) -> list[Track]:
        return [t for t in self.tracks.values() if t.outcome is None]

    def give_up(self, rid: str, why: str = "no final reply") -> None:
        t = self.tracks[rid]
        if t.outcome is None:
            t.outcome, t.message = "lost", why
            t.parts.clear()
            self.cancelled.add(rid)

    def receive(self, frames: list[bytes], now: float | None = None) -> Track | None:
        now = time.monotonic() if now is None else now
        self.replies += 1
        try:
            header = json.loads(frames[0])
        except (ValueError, IndexError):
            self.bad_replies += 1
            self._note(f"reply header is not JSON: {frames[:1]!r:.120}")
            return None
        if not isinstance(header, dict) or not isinstance(header.get("id"), str):
            self.bad_replies += 1
            self._note(f"reply header without a string id: {header!r:.120}")
            return None
        rid, op = header["id"], header.get("op")
        if op == "cancel":
            if rid not in self.cancelled:
                self.mixed += 1
                self._note(f"cancel ack for {rid!r}, which this client never cancelled")
            return None
        t = self.tracks.get(rid)
        if t is None or op not in ("tts", ""):
            self.mixed += 1
            self._note(f"reply op={op!r} id={rid!r}: not a request of this client")
            return None
        t.last = now
        final = header.get("final")
        if t.outcome == "lost":
            self.late += 1
            return None
        if t.outcome is not None:
            self.duplicated += 1
            what = "a second final reply" if final is True else "a reply after the final"
            self._note(f"{rid}: {what} (seq {header.get('seq')!r}, ended {t.outcome})")
            return None
        if "error" in header:
            err = header["error"]
            code = err.get("code") if isinstance(err, dict) else None
            if final is not True:
                self.bad_replies += 1
                self._note(f"{rid}: error reply without final:true: {header!r:.160}")
            t.outcome = code if isinstance(code, str) else "malformed_error"
            t.message = str(err.get("message", "")) if isinstance(err, dict) else repr(err)
            t.parts.clear()
            return t
        seq = header.get("seq")
        if type(seq) is not int:
            self.bad_replies += 1
            self._note(f"{rid}: audio reply without an int seq: {header!r:.160}")
            return None
        if seq < t.next_seq:
            self.duplicated += 1
            self._note(f"{rid}: seq {seq} repeated (expected {t.next_seq})")
            return None
        if seq > t.next_seq:
            self.seq_gaps += 1
            self._note(f"{rid}: seq {seq} where {t.next_seq} was expected")
        t.next_seq = seq + 1
        if not isinstance(final, bool):
            self.bad_replies += 1
            self._note(f"{rid}: seq {seq} without a bool final")
        if not t.spec.stream and (seq != 0 or final is not True):
            self.bad_replies += 1
            self._note(f"{rid}: stream:false answered with seq {seq} final {final!r}")
        if len(frames) < 2:
            self.bad_replies += 1
            self._note(f"{rid}: seq {seq} has no audio frame")
        else:
            try:
                audio = decode_audio(header, frames[1])
            except ValueError as e:
                self.bad_replies += 1
                self._note(f"{rid}: seq {seq}: {e}")
            else:
                t.parts.append(audio)
                t.samples += audio.size
        if final is True:
            t.outcome = "ok"
            audio = np.concatenate(t.parts) if t.parts else np.zeros(0, np.float32)
            t.digest = hashlib.sha256(audio.astype("<f4").tobytes()).hexdigest()[:16]
            t.parts.clear()
            return t
        return None


def tally(ledgers: list[Ledger], unsent: int = 0) -> dict[str, Any]:
    """The verdicts of all clients together. ``unsent``: requests never sent (the budget ran
    out first): lost. Seeded pairs both ok with different audio count as ``mixed``."""
    errors: Counter[str] = Counter()
    ok = lost = 0
    pairs: dict[int, list[Track]] = {}
    for led in ledgers:
        for t in led.tracks.values():
            if t.outcome == "ok":
                ok += 1
                if t.spec.pair is not None:
                    pairs.setdefault(t.spec.pair, []).append(t)
            elif t.outcome in (None, "lost"):
                lost += 1
            else:
                errors[t.outcome] += 1
    lost += unsent
    mismatched = []
    for p, ts in sorted(pairs.items()):
        if len({t.digest for t in ts}) > 1:
            mismatched.append({"pair": p, "ids": [t.rid for t in ts],
                               "samples": [t.samples for t in ts],
                               "stream": [t.spec.stream for t in ts]})  # fmt: skip
    sent = sum(len(led.tracks) for led in ledgers)
    return {
        "requests": sent + unsent,
        "ok": ok,
        "errors": dict(sorted(errors.items())),
        "lost": lost,
        "mixed": sum(led.mixed for led in ledgers) + len(mismatched),
        "duplicated": sum(led.duplicated for led in ledgers),
        "seq_gaps": sum(led.seq_gaps for led in ledgers),
        "bad_replies": sum(led.bad_replies for led in ledgers),
        "late_replies": sum(led.late for led in ledgers),
        "pairs_compared": sum(1 for ts in pairs.values() if len(ts) == 2),
        "pairs_mismatched": mismatched,
        "notes": [n for led in ledgers for n in led.notes][:50],
    }


# ---------------------------------------------------------------------------------------------
# fuzz


def fuzz_cases(k: int, rng: np.random.Generator, max_frame_bytes: int,
               prompt: tuple[bytes, str]) -> Iterator[list[bytes]]:  # fmt: skip
    """``k`` malformed messages (made on demand: some are over a MiB), each one refused by the
    protocol (checked here with :func:`worker.protocol.parse_request`) or by the frontend
    (valid header, undecodable prompt audio)."""
    wav, ptext = prompt
    made = n = 0
    while made < k:
        n += 1
        frames, frontend = _fuzz_one(n, rng, max_frame_bytes, wav, ptext)
        if frontend or _refused(frames, max_frame_bytes):
            made += 1
            yield frames


def _refused(frames: list[bytes], max_frame_bytes: int) -> bool:
    is_req = len(frames) >= 1 and frames[0] == b""
    body = frames[1:] if is_req else frames
    try:
        parse_request(body, max_frame_bytes, is_req=is_req)
    except ProtocolError:
        return True
    return False


def _fuzz_one(n: int, rng: np.random.Generator, limit: int, wav: bytes,
              ptext: str) -> tuple[list[bytes], bool]:  # fmt: skip
    """One fuzz message; True if only the frontend refuses it (valid protocol, bad audio)."""
    enc = json.dumps
    fid = f"fuzz-{n}-{uuid.uuid4().hex[:8]}"
    good = {"v": 1, "op": "tts", "id": fid, "text": "Fuzz.", "prompt_text": ptext}
    kind = n % 10
    choice = int(rng.integers(0, 1 << 30))
    if kind == 0:  # random bytes, one or several frames
        return [rng.bytes(int(rng.integers(1, 256))) for _ in range(1 + choice % 3)], False
    if kind == 1:  # truncated JSON
        full = enc(dict(good, speaker=SPEAKER)).encode()
        return [full[: int(rng.integers(1, len(full)))]], False
    if kind == 2:  # not an object, not UTF-8, too deep, not JSON at all
        bodies = [b"[1, \"tts\"]", b"\"tts\"", b"42", b"null", b"true", b"\xff\xfe{}",
                  b"[" * 5000, b"{\"a\":" * 5000, b"{\"v\":1,\"op\":\"tts\",\"speed\":NaN}",
                  b"", b"{}"]  # fmt: skip
        return [bodies[choice % len(bodies)]], False
    if kind == 3:  # wrong types
        bad = [("v", "1"), ("v", True), ("v", 1.0), ("op", 7), ("id", 123), ("text", 5),
               ("stream", "yes"), ("seed", 1.5), ("seed", True), ("speed", "fast"),
               ("format", ["f32le"]), ("mode", {}), ("prompt_text", 3),
               ("speaker", False)]  # fmt: skip
        key, value = bad[choice % len(bad)]
        return [enc(dict(good, **{key: value})).encode(), wav], False
    if kind == 4:  # unknown op / field
        variants = [dict(good, op=f"op{n}"), dict(good, op="TTS"), dict(good, extra=n),
                    dict(good, Text="hi"), {"v": 1, "op": "health", "verbose": True},
                    {"v": 1, "op": "stats", "id": fid, "reset": 1},
                    {"v": 1, "op": "speaker.list", "name": "x"}]  # fmt: skip
        return [enc(variants[choice % len(variants)]).encode()], False
    if kind == 5:  # unknown or out-of-range values
        variants = [
            dict(good, v=2),
            dict(good, mode="whisper"),
            dict(good, format="mp3"),
            dict(good, speed=9.0),
            dict(good, speed=0.1),
            dict(good, seed=-1),
            dict(good, seed=2**64),
            dict(good, id=""),
            dict(good, id="x" * 300),
            dict(good, text="   "),
            dict(good, mode="instruct"),
            {"v": 1, "op": "cancel", "id": ""},
            {"v": 1, "op": "speaker.delete", "name": "a/b"},
            {"v": 1, "op": "speaker.add", "name": " pad ", "prompt_text": ptext},
        ]
        h = variants[choice % len(variants)]
        frames = [enc(h).encode()]
        if h.get("op") in ("tts", "speaker.add") and h.get("mode") != "instruct":
            frames.append(wav)
        return frames, False
    if kind == 6:  # wrong frame counts
        variants = [[enc(dict(good)).encode(), wav, wav],
                    [enc({"v": 1, "op": "speaker.add", "name": "fz", "prompt_text": ptext})
                     .encode()],
                    [enc({"v": 1, "op": "health"}).encode(), b"extra"],
                    [enc(dict(good, speaker=SPEAKER, prompt_text=None)).encode(), wav],
                    [enc(dict(good)).encode(), b""]]  # fmt: skip
        return variants[choice % len(variants)], False
    if kind == 7:  # a frame just over COSY_MAX_FRAME_MB
        over = limit + 1 + int(rng.integers(0, 4096))
        if choice % 2:
            return [enc(dict(good)).encode(), b"\0" * over], False
        pad = enc(dict(good, text="x" * over)).encode()
        return [pad], False
    if kind == 8:  # REQ-style: empty delimiter first
        variants = [[b""], [b"", b""], [b"", rng.bytes(32)],
                    [b"", enc(dict(good, stream=True)).encode(), wav],
                    [b"", enc(dict(good, op="nope")).encode()]]  # fmt: skip
        return variants[choice % len(variants)], False
    # kind 9: a valid header whose prompt audio the frontend cannot use. A tts one passes
    # admission first, so with a full queue it is (rightly) refused as overloaded instead:
    # its id says so (FRONTEND_TTS), and _judge_fuzz counts that apart.
    audio = [rng.bytes(int(rng.integers(1, 400))), wav[:44], b"RIFF" + rng.bytes(200)]
    if choice % 4 == 3:
        h = {"v": 1, "op": "speaker.add", "id": fid, "name": f"fz{n}", "prompt_text": ptext}
        return [enc(h).encode(), audio[choice % 3]], True
    return [enc(dict(good, id=FRONTEND_TTS + fid)).encode(), audio[choice % 3]], True


# ---------------------------------------------------------------------------------------------
# the run


class Progress:
    """Finished-request count shared by the threads; waiters wake on every change."""

    def __init__(self, total: int):
        self.total = total
        self.finished = 0
        self.cond = threading.Condition()

    def add(self, n: int = 1) -> None:
        with self.cond:
            self.finished += n
            self.cond.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.finished != seen, timeout=max(0.0, timeout))
            return self.finished


class Soak:
    def __init__(self, args: argparse.Namespace, endpoint: str, prompt: tuple[bytes, str],
                 deadline: float):  # fmt: skip
        self.args = args
        self.endpoint = endpoint
        self.prompt = prompt
        self.deadline = deadline
        self.ctx = zmq.Context()
        self.stop = threading.Event()
        rng = np.random.default_rng(args.seed)
        self.specs = make_specs(args.requests, rng)
        self.next_spec = 0
        self.lock = threading.Lock()
        self.progress = Progress(args.requests)
        self.ledgers = [Ledger(i) for i in range(args.clients)]
        self.max_frame_bytes = int(args.max_frame_mb * (1 << 20))
        self.fuzz = fuzz_cases(args.fuzz, np.random.default_rng([args.seed, 1]),
                               self.max_frame_bytes, prompt)  # fmt: skip
        self.fuzz_result: dict[str, Any] = {"sent": 0, "bad_request": 0, "other": 0,
                                            "overloaded": 0, "missing": 0, "unsent": args.fuzz,
                                            "other_samples": []}  # fmt: skip
        self.rss: dict[str, float] = {}
        self.peak_rss: dict[str, float] = {}
        self.pids: set[int] = set()
        self.kill: dict[str, Any] | None = None
        self.stats_polls = 0
        self.stats_failures = 0
        self.thread_errors: list[str] = []
        self.load_done = threading.Event()

    # -- load clients --------------------------------------------------------------------------

    def _take(self) -> Spec | None:
        with self.lock:
            if self.next_spec >= len(self.specs) or self.stop.is_set():
                return None
            spec = self.specs[self.next_spec]
            self.next_spec += 1
            return spec

    def run_client(self, i: int) -> None:
        led = self.ledgers[i]
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        wav, ptext = self.prompt
        timeout = self.args.timeout_s
        more = True
        try:
            while not self.stop.is_set():
                while more and len(led.open()) < self.args.depth:
                    spec = self._take()
                    if spec is None:
                        more = False
                        break
                    rid = f"c{i}-{spec.index}-{uuid.uuid4().hex}"
                    frames = [json.dumps(spec.header(rid, ptext)).encode()]
                    if spec.voice == "prompt":
                        frames.append(wav)
                    led.sent(rid, spec)
                    if not sock.poll(timeout * 1000, zmq.POLLOUT):
                        led.give_up(rid, "could not send")
                        self.progress.add()
                        continue
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                opened = led.open()
                if not opened and not more:
                    break
                now = time.monotonic()
                if now >= self.deadline:
                    for t in opened:
                        self._give_up(sock, led, t.rid, "the budget ran out")
                    break
                wake = min([t.last + timeout for t in opened] + [self.deadline])
                if sock.poll(max(1, min(500, (wake - now) * 1000)), zmq.POLLIN):
                    self._drain(sock, led)
                now = time.monotonic()
                for t in led.open():
                    if now - t.last >= timeout:
                        self._give_up(sock, led, t.rid, f"no reply for {timeout:g} s")
            end = time.monotonic() + LINGER_S  # late replies: duplicates after the final
            while (left := end - time.monotonic()) > 0:
                if sock.poll(left * 1000, zmq.POLLIN):
                    self._drain(sock, led)
        except Exception as e:  # noqa: BLE001 - reported, and counted as lost below
            self.thread_errors.append(f"client {i}: {type(e).__name__}: {e}")
            for t in led.open():
                led.give_up(t.rid, f"client thread failed: {e}")
                self.progress.add()
        finally:
            sock.close(linger=0)

    def _drain(self, sock: zmq.Socket, led: Ledger) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if led.receive(frames) is not None:
                self.progress.add()

    def _give_up(self, sock: zmq.Socket, led: Ledger, rid: str, why: str) -> None:
        led.give_up(rid, why)
        self.progress.add()
        with contextlib.suppress(zmq.ZMQError):  # free it at the worker
            sock.send(json.dumps({"v": 1, "op": "cancel", "id": rid}).encode(), zmq.NOBLOCK)

    # -- fuzz ----------------------------------------------------------------------------------

    def run_fuzz(self) -> None:
        res = self.fuzz_result
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        k, m = self.args.fuzz, max(1, self.args.requests)
        replies = 0
        try:
            grace_end = None
            while not self.stop.is_set():
                done = self.progress.finished
                target = k if self.load_done.is_set() else min(k, math.ceil(k * (done + 1) / m))
                while res["sent"] < target:
                    if not sock.poll(5000, zmq.POLLOUT):
                        break
                    sock.send_multipart(next(self.fuzz), flags=zmq.NOBLOCK)
                    res["sent"] += 1
                if replies >= k:
                    break
                if replies >= res["sent"] and res["sent"] < k:
                    self.progress.wait(done, 0.5)  # everything answered: wait for load
                    continue
                if sock.poll(200, zmq.POLLIN):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        replies += 1
                        self._judge_fuzz(frames)
                now = time.monotonic()
                if res["sent"] >= k and grace_end is None:
                    grace_end = now + self.args.timeout_s
                if (grace_end is not None and now > grace_end) or now > self.deadline:
                    break
        except Exception as e:  # noqa: BLE001
            self.thread_errors.append(f"fuzz: {type(e).__name__}: {e}")
        finally:
            res["missing"] = max(0, res["sent"] - replies)
            res["unsent"] = k - res["sent"]
            sock.close(linger=0)

    def _judge_fuzz(self, frames: list[bytes]) -> None:
        res = self.fuzz_result
        if frames and frames[0] == b"" and len(frames) > 1:
            frames = frames[1:]  # the reply to a REQ-style message keeps its delimiter
        try:
            h = json.loads(frames[0])
            code = h["error"]["code"] if h.get("final") is True and len(frames) == 1 else None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            code = None
        if code == "bad_request":
            res["bad_request"] += 1
        elif code == "overloaded" and str(h.get("id", "")).startswith(FRONTEND_TTS):
            res["overloaded"] += 1  # a well-formed tts header: admission comes first
        else:
            res["other"] += 1
            if len(res["other_samples"]) < 10:
                res["other_samples"].append(repr(frames[0][:300]))

    # -- monitor: stats, memory, the kill ------------------------------------------------------

    def run_monitor(self, svc: ServiceProcess) -> None:
        stage = self.args.kill_stage
        threshold = max(1, math.ceil(self.args.requests / 3))
        seen = -1
        next_poll = 0.0
        wait_end = None  # after the load: how long to wait for the killed stage
        try:
            with Client(self.endpoint, timeout_s=10.0) as c:
                while not self.stop.is_set():
                    now = time.monotonic()
                    if now >= next_poll:
                        next_poll = now + self.args.stats_interval_s
                        self._poll_stats(c, svc)
                    done = self.load_done.is_set()
                    if stage and self.kill is None and (
                            done or self.progress.finished >= threshold):  # fmt: skip
                        self._kill(c, svc, stage)
                    k = self.kill
                    if k is not None and not k["restarted"]:
                        self._check_restart(c, svc)
                    if done:
                        if wait_end is None:
                            wait_end = min(now + RESTART_WAIT_S, self.deadline)
                        if k is None or k["restarted"] or not k["sent"] or now > wait_end:
                            self._poll_stats(c, svc)
                            return
                    seen = self.progress.wait(seen, next_poll - time.monotonic())
        except Exception as e:  # noqa: BLE001
            self.thread_errors.append(f"monitor: {type(e).__name__}: {e}")

    def _poll_stats(self, c: Client, svc: ServiceProcess) -> None:
        try:
            st = c.stats()
        except (TimeoutError, WorkerError) as e:
            self.stats_failures += 1
            if self.stats_failures <= 3:
                self.thread_errors.append(f"stats: {e}")
            return
        self.stats_polls += 1
        self.last_stats = st
        for s in (st.get("stages") or {}).values():
            if s.get("pid"):
                self.pids.add(s["pid"])
                svc.stage_pids.add(s["pid"])  # so that ServiceProcess.stop ends it too
        for name, mem in (st.get("memory_mb") or {}).items():
            for key, store in (("rss", self.rss), ("max_rss", self.peak_rss)):
                v = mem.get(key) if isinstance(mem, dict) else None
                if isinstance(v, (int, float)):
                    store[name] = max(store.get(name, 0.0), float(v))

    def _kill(self, c: Client, svc: ServiceProcess, stage: str) -> None:
        try:
            h = c.health()
        except (TimeoutError, WorkerError):
            return  # busy: the next turn tries again
        pid = h["stages"][stage]["pid"]
        self.kill = {"stage": stage, "pid": pid, "restarted": False, "new_pid": None,
                     "after_finished": self.progress.finished, "t_kill": time.monotonic(),
                     "restart_s": None, "sent": False}  # fmt: skip
        if not pid or _parent(pid) != svc.pid:
            self.kill["error"] = f"pid {pid!r} is not a live child of the server {svc.pid}"
            return
        self.pids.add(pid)
        svc.stage_pids.add(pid)
        os.kill(pid, signal.SIGKILL)
        self.kill["sent"] = True

    def _check_restart(self, c: Client, svc: ServiceProcess) -> None:
        k = self.kill
        if not k["sent"]:
            return
        try:
            h = c.health()
        except (TimeoutError, WorkerError):
            return
        st = h["stages"][k["stage"]]
        if st.get("pid") and st["pid"] != k["pid"]:
            self.pids.add(st["pid"])
            svc.stage_pids.add(st["pid"])
        if h.get("ok") and st.get("pid") and st["pid"] != k["pid"]:
            k.update(restarted=True, new_pid=st["pid"], restarts=st.get("restarts"),
                     restart_s=round(time.monotonic() - k["t_kill"], 2))  # fmt: skip

    # -- all of it -----------------------------------------------------------------------------

    def run(self, svc: ServiceProcess) -> None:
        threads = [threading.Thread(target=self.run_client, args=(i,), name=f"client{i}",
                                    daemon=True) for i in range(self.args.clients)]  # fmt: skip
        fuzz = threading.Thread(target=self.run_fuzz, name="fuzz", daemon=True)
        monitor = threading.Thread(target=self.run_monitor, args=(svc,), name="monitor",
                                   daemon=True)  # fmt: skip
        for t in (*threads, fuzz, monitor):
            t.start()
        try:
            for t in threads:
                _join(t, self.deadline + self.args.timeout_s + 5)
            self.load_done.set()
            self.progress.add(0)
            for t in (fuzz, monitor):
                _join(t, self.deadline + 5)
        finally:
            self.stop.set()
            self.load_done.set()
            self.progress.add(0)
            for t in (*threads, fuzz, monitor):
                t.join(5)
            self.ctx.destroy(linger=0)

    def unsent(self) -> int:
        with self.lock:
            return len(self.specs) - self.next_spec


def _join(t: threading.Thread, deadline: float) -> None:
    """Join in short steps (Ctrl-C stays responsive), at most until ``deadline``."""
    while t.is_alive() and time.monotonic() < deadline:
        t.join(0.5)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 pass, 1 fail, 2 usage, 130 interrupted.",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        help="model dir (default: a random tiny one written into the temp dir)",
    )
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (%(default)s)")
    p.add_argument("--requests", type=int, default=12, help="tts requests in all (%(default)s)")
    p.add_argument("--fuzz", type=int, default=40, help="malformed messages (%(default)s)")
    p.add_argument(
        "--kill-stage",
        choices=STAGES,
        help="SIGKILL this stage once, after a third of the requests finished",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix and fuzz")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=120.0,
        help="a request silent this long is lost (%(default)s)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="wall-clock budget of the whole run, start-up included; unfinished "
        "requests then count as lost (%(default)s)",
    )
    p.add_argument(
        "--depth", type=int, default=2, help="requests in flight per client (%(default)s)"
    )
    p.add_argument("--max-active", type=int, default=4, help="COSY_MAX_ACTIVE (%(default)s)")
    p.add_argument(
        "--max-queue", type=int, help="COSY_MAX_QUEUE (default: clients x depth, at least 16)"
    )
    p.add_argument(
        "--max-frame-mb", type=float, default=1.0, help="COSY_MAX_FRAME_MB (%(default)s)"
    )
    p.add_argument(
        "--stats-interval-s",
        type=float,
        default=1.0,
        help="stats poll period for memory (%(default)s)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server log, cache)")
    return p  # fmt: skip


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("clients", "requests", "depth", "max_active"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.fuzz < 0:
        p.error("--fuzz must be >= 0")
    for name in ("timeout_s", "budget_s", "max_frame_mb", "stats_interval_s"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if a.max_queue is None:
        a.max_queue = max(16, a.clients * a.depth)
    if a.max_queue < 0:
        p.error("--max-queue must be >= 0")


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    try:
        args = p.parse_args(argv)
        _check_args(p, args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    tmp = Path(tempfile.mkdtemp(prefix="cosy-soak-"))
    os.chmod(tmp, 0o700)
    svc: ServiceProcess | None = None
    soak: Soak | None = None
    result: dict[str, Any] = {}
    failures: list[str] = []
    log_tail = ""
    code = 1
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        prompt = (
            PROMPT.with_suffix(".wav").read_bytes(),
            SYSTEM + PROMPT.with_suffix(".txt").read_text(encoding="utf-8").strip(),
        )
        model_dir = args.model_dir
        if model_dir is None:
            from tuning.random_model import write_model_dir

            model_dir = write_model_dir(tmp / "model", "tiny", seed=0)
        env = {"COSY_CACHE_DIR": str(tmp / "cache"), "COSY_LOG_LEVEL": "WARNING",
               "COSY_MAX_ACTIVE": str(args.max_active), "COSY_MAX_QUEUE": str(args.max_queue),
               "COSY_MAX_FRAME_MB": f"{args.max_frame_mb:g}"}  # fmt: skip
        endpoint = f"ipc://{tmp / 'front.sock'}"
        svc = ServiceProcess(model_dir, endpoint, tmp / "server.log", env)
        t_up = time.monotonic()
        svc.wait_up(max(1.0, deadline - time.monotonic()))
        startup_s = time.monotonic() - t_up
        with Client(endpoint, timeout_s=60.0) as c:
            c.speaker_add(SPEAKER, prompt[0], prompt[1], overwrite=True)
        soak = Soak(args, endpoint, prompt, deadline)
        t_load = time.monotonic()
        soak.run(svc)
        load_s = time.monotonic() - t_load
        result = _result(args, soak, svc, env, startup_s, load_s, t0)
        failures = _failures(result)
        code = 1 if failures else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
        if soak is not None:
            soak.stop.set()
    except (ServiceError, WorkerError, TimeoutError, OSError) as e:
        failures = [f"{type(e).__name__}: {e}"]
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = 1
    finally:
        try:
            if svc is not None:
                svc.stop(30.0)
                log_tail = svc.log_tail()
                left = sorted(p for p in {svc.pid, *svc.stage_pids} if pid_alive(p))
                if left:
                    failures.append(f"processes still alive after stop: {left}")
                    code = code or 1
        finally:
            signal.signal(signal.SIGTERM, old_term)
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
    if result:
        result["wall_s"] = round(time.monotonic() - t0, 1)
        result["failures"] = failures
        result["passed"] = code == 0
        if svc is not None:
            result["server_exit_code"] = svc.proc.returncode
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        _print_summary(result)
    elif failures:
        print(log_tail, file=sys.stderr)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"failures": failures, "passed": False}) + "\n")
    if args.keep:
        print(f"{PROG}: kept {tmp}", file=sys.stderr)
    return code


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def _result(args, soak: Soak, svc: ServiceProcess, env: dict, startup_s: float, load_s: float,
            t0: float) -> dict[str, Any]:  # fmt: skip
    r = tally(soak.ledgers, soak.unsent())
    peak = {n: round(max(soak.rss.get(n, 0.0), soak.peak_rss.get(n, 0.0)), 1) for n in PROCESSES}
    fuzz = dict(soak.fuzz_result)
    kill = soak.kill
    if kill is not None:
        kill = {k: v for k, v in kill.items() if k not in ("t_kill", "sent")}
    elif args.kill_stage:
        kill = {"stage": args.kill_stage, "pid": None, "restarted": False, "new_pid": None,
                "error": "the kill never happened"}  # fmt: skip
    health = None
    try:
        with Client(soak.endpoint, timeout_s=10.0) as c:
            health = c.health()
            final_stats = c.stats()
    except (TimeoutError, WorkerError):
        final_stats = getattr(soak, "last_stats", {})
    ordered = {
        "requests": r.pop("requests"), "ok": r.pop("ok"), "errors": r.pop("errors"),
        "lost": r.pop("lost"), "mixed": r.pop("mixed"), "duplicated": r.pop("duplicated"),
        "max_rss_mb": peak,
        "rss_polled_max_mb": {n: round(v, 1) for n, v in sorted(soak.rss.items())},
        "fuzz": fuzz,
        "kill": kill,
        **r,
        "health_ok_at_end": bool(health and health.get("ok")),
        "server_idle_at_end": bool(final_stats) and not final_stats.get("active")
        and not final_stats.get("queued"),
        "server_counters": final_stats.get("counters") if final_stats else None,
        "stats_polls": soak.stats_polls,
        "stats_failures": soak.stats_failures,
        "thread_errors": soak.thread_errors,
        "pids": {"server": svc.pid, "stages": sorted(soak.pids | svc.stage_pids)},
        "budget_exceeded": time.monotonic() > soak.deadline,
        "startup_s": round(startup_s, 1),
        "load_s": round(load_s, 1),
        "wall_s": round(time.monotonic() - t0, 1),
        "config": {"clients": args.clients, "requests": args.requests, "fuzz": args.fuzz,
                   "kill_stage": args.kill_stage, "seed": args.seed, "timeout_s": args.timeout_s,
                   "budget_s": args.budget_s, "depth": args.depth,
                   "model_dir": str(args.model_dir) if args.model_dir else "random tiny (seed 0)",
                   "env": env},
    }  # fmt: skip
    return ordered


def _failures(r: dict[str, Any]) -> list[str]:
    out = []
    for key in ("lost", "mixed", "duplicated", "seq_gaps", "bad_replies"):
        if r[key]:
            out.append(f"{key}: {r[key]}")
    f = r["fuzz"]
    if f["other"]:
        out.append(f"fuzz: {f['other']} replies that are not bad_request")
    if f["missing"]:
        out.append(f"fuzz: {f['missing']} messages without a reply")
    if f.get("unsent"):
        out.append(f"fuzz: {f['unsent']} messages never sent (the budget ran out)")
    if r["ok"] + sum(r["errors"].values()) + r["lost"] != r["requests"]:
        out.append("requests do not add up")
    k = r["kill"]
    if k is not None and not k.get("restarted"):
        out.append(f"the killed {k['stage']} stage did not come back: {k.get('error', '')}")
    if r["thread_errors"] and any(not e.startswith("stats:") for e in r["thread_errors"]):
        out.append(f"thread errors: {r['thread_errors']}")
    return out


def _print_summary(r: dict[str, Any]) -> None:
    c = r["config"]
    f = r["fuzz"]
    errs = ", ".join(f"{k}={v}" for k, v in r["errors"].items()) or "none"
    rows = [
        ("requests", f"{r['requests']} from {c['clients']} clients (depth {c['depth']})"),
        ("ok / errors", f"{r['ok']} / {errs}"),
        ("lost / mixed / dup", f"{r['lost']} / {r['mixed']} / {r['duplicated']}"),
        ("seq gaps / bad", f"{r['seq_gaps']} / {r['bad_replies']}"),
        ("seeded pairs", f"{r['pairs_compared']} compared, {len(r['pairs_mismatched'])} differ"),
        ("fuzz", f"sent {f['sent']}, bad_request {f['bad_request']}, other {f['other']}, "
                 f"overloaded {f['overloaded']}, missing {f['missing']}, "
                 f"unsent {f['unsent']}"),
    ]  # fmt: skip
    k = r["kill"]
    if k is not None:
        rows.append(
            (
                "kill",
                f"{k['stage']} pid {k['pid']} -> {k.get('new_pid')} "
                f"(restarted {k.get('restarted')}, {k.get('restart_s')} s)",
            )
        )
    rows.append(("max RSS MB", "  ".join(f"{n} {v:g}" for n, v in r["max_rss_mb"].items())))
    rows.append(
        ("time", f"start-up {r['startup_s']} s, load {r['load_s']} s, wall {r['wall_s']} s")
    )
    rows.append(("verdict", "PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"])))
    width = max(len(a) for a, _ in rows)
    print(f"{PROG}:")
    for a, b in rows:
        print(f"  {a:<{width}}  {b}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
