"""The worker service: ``python -m worker.server [--model-dir DIR] [--bind ADDR]``.

The server process owns the front end and the bookkeeping; the model work runs in three stage
processes (:mod:`worker.stages.process`) it starts, watches and restarts::

    clients ──REQ/DEALER──▶ ROUTER (COSY_BIND) ── this process: protocol v1, frontend + prompt
                                                  cache, admission, per-request bookkeeping
        Start/Abort ──▶ RUN/llm.in ─▶ LLM ─▶ Flow ─▶ HiFT ─▶ RUN/out ──▶ replies (in order)
        stage status (state, pid, active ids, RSS) ──▶ RUN/status

``RUN`` is a private runtime dir (mode 0700) removed on exit. One loop blocks on the three
sockets with a timeout (the next deadline or the supervision tick); nothing sleeps.

Requests: a ``tts`` request's text is split into segments (the frontend); every segment is a
stage request (``rid``) and their chunks are released in text order (:class:`SegmentOrder`).
Admission: at most ``COSY_MAX_ACTIVE`` requests in the stages, ``COSY_MAX_QUEUE`` waiting,
and the flow K/V the running ones can reach (estimated) under ``COSY_MAX_KV_GB``; beyond,
``overloaded`` at once. A request older than ``COSY_REQUEST_TIMEOUT_S`` ends with ``timeout``.
A stage that dies is restarted; every request sent to the stages meanwhile ends with an
``internal`` error. SIGTERM/SIGINT: stop accepting, give running requests
``COSY_SHUTDOWN_GRACE_S`` to finish (the rest get ``cancelled``), stop the stages, exit 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from worker import protocol as proto
from worker.ordering import SegmentOrder
from worker.request import RequestError, force_tokens
from worker.settings import KnobError, Knobs, configure_logging
from worker.stages.messages import Abort, Audio, Credit, Failed, Start, receive_all, send
from worker.stages.process import STAGES, endpoint, rss_mb

log = logging.getLogger("worker.server")

TICK_S = 0.2  # supervision: stage liveness is checked at least this often
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0)  # delay before the n-th quick restart in a row
RECENT = 1000  # finished requests kept for latency percentiles
STAGE_STOP_S = 10  # a stage gets this long to exit after SIGTERM
ENDED_KEPT = 10_000  # (peer, id) of ended requests remembered for cancel
SEGMENTS_AHEAD = 2  # segments of one request in the stages at once
SPEECH_TOKENS_PER_TEXT_TOKEN = 8  # K/V estimate (upstream allows up to 20; speech runs ~3-8)
SYSTEM_PROMPT = "You are a helpful assistant."
ENDOFPROMPT = "<|endofprompt|>"


class StartupError(RuntimeError):
    """The service cannot start (bad model dir, a stage that cannot load): one line."""


# ---------------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class Stage:
    name: str
    proc: subprocess.Popen | None = None
    state: str = "starting"  # starting | loading | up | error | dead | stopped
    restarts: int = 0
    quick_deaths: int = 0
    restart_at: float | None = None  # monotonic time of a scheduled restart
    error: str | None = None
    status: dict = field(default_factory=dict)  # its last status message


@dataclass
class Utterance:
    """One ``tts`` request: its segments in the stages, its replies."""

    key: tuple[bytes, str]  # (peer identity, id)
    id: str
    envelope: list[bytes]
    op: proto.TTSOp
    rids: list[str]
    starts: list[Start]
    kv_bytes: int
    t_arrival: float
    deadline: float
    order: SegmentOrder | None = None
    running: bool = False
    sent: int = 0  # segments handed to the stages
    covered: dict[str, int] = field(default_factory=dict)  # rid -> tokens covered by audio
    seq: int = 0
    collected: list[np.ndarray] = field(default_factory=list)  # stream: false
    samples: int = 0
    t_first: float | None = None


class Server:
    def __init__(self, model_dir: str | Path, knobs: Knobs, bind: str | None = None):
        self.model_dir = Path(model_dir).resolve()
        self.knobs = knobs
        self.bind = bind or knobs.bind
        self.stages = {name: Stage(name) for name in STAGES}
        self.utts: dict[tuple[bytes, str], Utterance] = {}
        self.by_rid: dict[str, Utterance] = {}
        self.queue: deque[Utterance] = deque()
        self.ended: OrderedDict[tuple[bytes, str], None] = OrderedDict()  # recent (peer, id)
        self.rid_counter = itertools.count()
        self.counters = {"received": 0, "ok": 0, **{f"error.{c}": 0 for c in proto.ERROR_CODES}}
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=RECENT)
        self.stopping: float | None = None  # monotonic time the shutdown began
        self.stop_requested = False
        self.ever_up = False
        self.runtime_dir: Path | None = None
        self.ctx: zmq.Context | None = None
        self.t_start = time.monotonic()

    # -- start-up ----------------------------------------------------------------------------

    def start(self) -> None:
        """Check the model dir, load the frontend, bind, start the stages (not waiting)."""
        from cache import PromptCache
        from worker.config import read_model_config
        from worker.frontend.prepare import Frontend

        if not self.model_dir.is_dir():
            raise StartupError(f"model dir {self.model_dir} does not exist or is not a directory")
        try:
            self.config = read_model_config(self.model_dir)
        except Exception as e:  # noqa: BLE001 - the reader's own message names the problem
            raise StartupError(f"model dir {self.model_dir}: {e}") from None
        from worker.frontend.prepare import SPEAKER_ENCODER, SPEECH_TOKENIZER

        encoders = (SPEECH_TOKENIZER, SPEAKER_ENCODER)
        missing = [n for n in encoders if not (self.model_dir / n).is_file()]
        if missing:
            raise StartupError(f"model dir {self.model_dir} lacks {', '.join(missing)} (the "
                               "frontend's encoders for voice prompts)")
        try:
            cache = PromptCache.from_knobs(self.knobs)
            self.frontend = Frontend(self.model_dir, cache, knobs=self.knobs)
        except Exception as e:  # noqa: BLE001
            raise StartupError(f"frontend for {self.model_dir}: {e}") from None
        self.kv_bytes_per_frame = _kv_bytes_per_frame(self.config, self.knobs.flow_steps)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="cosyvoice-worker-"))
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable peer is an error
        self.front.setsockopt(zmq.SNDHWM, 10_000)
        # a hard guard far above the protocol's limit (that one gets a bad_request reply)
        self.front.setsockopt(zmq.MAXMSGSIZE, 4 * self._max_frame_bytes() + (1 << 20))
        try:
            self.front.bind(self.bind)
        except zmq.ZMQError as e:
            self.close()
            raise StartupError(f"cannot bind {self.bind}: {e}") from None
        self.to_llm = self.ctx.socket(zmq.PUSH)
        self.to_llm.setsockopt(zmq.SNDHWM, 100_000)
        self.to_llm.setsockopt(zmq.LINGER, 0)
        self.to_llm.connect(endpoint(self.runtime_dir, "llm.in"))
        self.from_hift = self.ctx.socket(zmq.PULL)
        self.from_hift.setsockopt(zmq.RCVHWM, 100_000)
        self.from_hift.bind(endpoint(self.runtime_dir, "out"))
        self.status = self.ctx.socket(zmq.PULL)
        self.status.bind(endpoint(self.runtime_dir, "status"))
        for st in self.stages.values():
            self._spawn(st)
        log.info("runtime dir %s; front socket %s", self.runtime_dir, self.bind)
        t0 = time.perf_counter()
        self.frontend.segments("Warm up. 预热。")  # loads the text normalizers (seconds)
        log.info("frontend ready in %.2f s", time.perf_counter() - t0)

    def _max_frame_bytes(self) -> int:
        return int(self.knobs.max_frame_mb * (1 << 20))

    def _spawn(self, st: Stage) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COSY_")}
        env.update(self.knobs.to_env())
        # stages share the cores: an OpenMP pool that spins after each parallel region steals
        # them from the other stages (measured: a tiny flow chunk 35 s instead of 0.7 s)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        repo = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "worker.stages.process", "--stage", st.name, "--model-dir",
               str(self.model_dir), "--runtime-dir", str(self.runtime_dir)]  # fmt: skip
        st.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        st.state, st.error, st.status, st.restart_at = "starting", None, {}, None
        log.info("started the %s stage (pid %d)", st.name, st.proc.pid)

    def healthy(self) -> bool:
        return all(st.state == "up" for st in self.stages.values())

    # -- the loop ----------------------------------------------------------------------------

    def serve(self, startup_timeout_s: float = 600.0) -> int:
        """The loop; returns the exit code after a shutdown. Raises StartupError if a stage
        cannot start before the service was up once (or not within ``startup_timeout_s``)."""
        startup_deadline = time.monotonic() + startup_timeout_s
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.from_hift, zmq.POLLIN)
        poller.register(self.status, zmq.POLLIN)
        while True:
            now = time.monotonic()
            if self.stop_requested and self.stopping is None:
                self._begin_shutdown()
            if self.stopping is not None and self._shutdown_step(now):
                return 0
            wait = TICK_S
            if self.utts:
                wait = max(0.0, min(wait, min(u.deadline for u in self.utts.values()) - now))
            events = dict(poller.poll(int(wait * 1000)))
            if self.status in events:
                self._drain_status()
            if self.from_hift in events:
                self._drain_out()
            if self.front in events:
                self._drain_front()
            if not self.ever_up:
                self._check_startup(startup_deadline)
            self._supervise()
            self._expire()
            self._admit()

    def _check_startup(self, deadline: float) -> None:
        for st in self.stages.values():
            code = st.proc.poll() if st.proc else None
            if st.state == "error" or code is not None:
                why = st.error or f"exited with code {code}"
                raise StartupError(f"the {st.name} stage failed to start: {why}")
        if self.healthy():
            self.ever_up = True
            pids = {n: st.proc.pid for n, st in self.stages.items()}
            log.info("ready on %s (server pid %d, stages %s)", self.bind, os.getpid(), pids)
            print(f"worker.server: ready on {self.bind} (pid {os.getpid()}, stages {pids})",
                  file=sys.stderr, flush=True)  # fmt: skip
        elif time.monotonic() > deadline:
            raise StartupError("the stages were not up within the start-up timeout")

    # -- front socket ------------------------------------------------------------------------

    def _send(self, envelope: list[bytes], frames: list[bytes]) -> bool:
        """Reply without blocking; False if the peer is gone or not reading (its queue of
        replies is full): the caller ends that peer's request."""
        try:
            self.front.send_multipart(envelope + frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            log.info("reply to a peer dropped: %s", e)
            return False

    def _drain_front(self) -> None:
        for _ in range(1000):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                envelope, body, is_req = proto.split_envelope(frames)
            except ValueError:
                continue
            self.counters["received"] += 1
            try:
                req = proto.parse_request(body, self._max_frame_bytes(), is_req=is_req)
                self._dispatch(envelope, req)
            except proto.ProtocolError as e:
                self._count_error(e.code)
                self._send(envelope, e.reply())
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                log.exception("request failed")
                self._count_error("internal")
                self._send(envelope, proto.error_reply("", "internal", f"server error: {e}"))

    def _count_error(self, code: str) -> None:
        self.counters[f"error.{code}"] = self.counters.get(f"error.{code}", 0) + 1

    def _reply_error(self, envelope, id: str, code: str, message: str, op: str) -> None:
        self._count_error(code)
        self._send(envelope, proto.error_reply(id, code, message, op=op))

    def _dispatch(self, envelope: list[bytes], req) -> None:
        op = req.op
        if op == "tts":
            return self._tts(envelope, req)
        if op == "cancel":
            found = self._cancel(envelope[0], req.id)
            return self._send(envelope, proto.info_reply(req.id, "cancel", cancelled=found))
        if op == "health":
            return self._send(envelope, proto.info_reply(req.id, "health", **self.health()))
        if op == "stats":
            return self._send(envelope, proto.info_reply(req.id, "stats", **self.stats()))
        try:
            if op == "speaker.list":
                details = self.frontend.list_speakers()
                names = sorted(d["name"] for d in details)
                return self._send(envelope, proto.info_reply(req.id, op, speakers=names,
                                                             details=details))  # fmt: skip
            if op == "speaker.delete":
                self.frontend.delete_speaker(req.name)
                return self._send(envelope, proto.info_reply(req.id, op, name=req.name))
            if op == "speaker.add":
                text = req.prompt_text
                if text and ENDOFPROMPT not in text:
                    text = f"{SYSTEM_PROMPT}{ENDOFPROMPT}{text}"
                info = self.frontend.add_speaker(req.name, req.audio, text,
                                                 overwrite=req.overwrite)  # fmt: skip
                fields = {k: v for k, v in info.items() if k != "name"}
                return self._send(envelope, proto.info_reply(req.id, op, name=req.name, **fields))
        except Exception as e:  # noqa: BLE001 - one request's failure stays its own
            return self._reply_error(envelope, req.id, *_classify(e), op)
        raise proto.ProtocolError("bad_request", f"unknown op {op!r}", req.id, op)

    # -- tts ---------------------------------------------------------------------------------

    def _tts(self, envelope: list[bytes], op: proto.TTSOp) -> None:
        t_arrival = time.monotonic()
        key = (envelope[0], op.id)
        if self.stopping is not None:
            return self._reply_error(envelope, op.id, "cancelled", "the worker is shutting down",
                                     "tts")  # fmt: skip
        if key in self.utts:
            return self._reply_error(envelope, op.id, "bad_request",
                                     f"id {op.id!r} is already in flight", "tts")  # fmt: skip
        if op.speed != 1.0:
            return self._reply_error(envelope, op.id, "bad_request",
                                     "speed: only 1.0 is supported (the audio is streamed)",
                                     "tts")  # fmt: skip
        if len(self.queue) >= self.knobs.max_queue and not self._has_room(0):
            return self._reply_error(
                envelope, op.id, "overloaded",
                f"{len(self.queue)} requests are queued (COSY_MAX_QUEUE={self.knobs.max_queue})"
                f" behind {self._running()} running (COSY_MAX_ACTIVE={self.knobs.max_active})",
                "tts")  # fmt: skip
        try:
            reqs = self._prepare(op)
        except Exception as e:  # noqa: BLE001 - one request's failure stays its own
            return self._reply_error(envelope, op.id, *_classify(e), "tts")
        est = [self._kv_estimate(r) for r in reqs]  # at most SEGMENTS_AHEAD run at once
        kv = max(sum(est[i : i + SEGMENTS_AHEAD]) for i in range(len(est)))
        limit = int(self.knobs.max_kv_gb * (1 << 30))
        if kv > limit:
            return self._reply_error(
                envelope, op.id, "bad_request",
                f"this text needs up to {kv / (1 << 30):.1f} GB of flow K/V (estimated), more "
                f"than COSY_MAX_KV_GB={self.knobs.max_kv_gb:g}: split the text or raise it",
                "tts")  # fmt: skip
        n = next(self.rid_counter)
        rids = [f"u{n}.{i}" for i in range(len(reqs))]
        starts = [Start(rid, _with_id(r, rid)) for rid, r in zip(rids, reqs, strict=True)]
        u = Utterance(key, op.id, envelope, op, rids, starts, kv, t_arrival,
                      t_arrival + self.knobs.request_timeout_s)  # fmt: skip
        self.utts[key] = u
        if len(self.queue) >= self.knobs.max_queue and not self._has_room(kv):
            del self.utts[key]
            return self._reply_error(envelope, op.id, "overloaded",
                                     self._overload_reason(kv), "tts")  # fmt: skip
        self.queue.append(u)
        self._admit()

    def _prepare(self, op: proto.TTSOp):
        from worker.frontend.prepare import Voice

        if op.speaker is not None:
            voice = Voice(speaker=op.speaker)
        else:
            text = op.prompt_text or ""
            if op.mode == "zero_shot" and ENDOFPROMPT not in text:
                text = f"{SYSTEM_PROMPT}{ENDOFPROMPT}{text}"
            voice = Voice(op.audio, text if op.mode == "zero_shot" else "")
        text, instruct, mode = op.text, "", op.mode
        if mode == "cross_lingual" and ENDOFPROMPT not in text:
            text = f"{SYSTEM_PROMPT}{ENDOFPROMPT}{text}"
        if mode == "instruct":
            mode, instruct = "instruct2", op.instruct or ""
            if ENDOFPROMPT not in instruct:
                instruct = f"{SYSTEM_PROMPT} {instruct}{ENDOFPROMPT}"
        reqs = self.frontend.requests(mode, text, voice, instruct_text=instruct, seed=op.seed)
        if op.forced_tokens:  # benchmarks: fixed-length speech
            force_tokens(reqs, op.forced_tokens, op.seed, self.config.llm.speech_token_size)
        return reqs

    def _kv_estimate(self, req) -> int:
        """Flow K/V bytes a segment can reach: (prompt + expected speech) frames."""
        from worker.stages.llm import length_bounds

        n_text = req.text_ids.shape[1]
        tokens = min(length_bounds(n_text)[1], SPEECH_TOKENS_PER_TEXT_TOKEN * n_text)
        prompt = 0 if req.flow_prompt_speech is None else req.flow_prompt_speech.shape[1]
        frames = self.config.flow.token_mel_ratio * (prompt + tokens + 25)
        return frames * self.kv_bytes_per_frame

    def _running(self) -> int:
        return sum(1 for u in self.utts.values() if u.running)

    def _running_kv(self) -> int:
        return sum(u.kv_bytes for u in self.utts.values() if u.running)

    def _has_room(self, kv: int) -> bool:
        return (self._running() < self.knobs.max_active
                and self._running_kv() + kv <= self.knobs.max_kv_gb * (1 << 30))  # fmt: skip

    def _overload_reason(self, kv: int) -> str:
        gb = self.knobs.max_kv_gb
        return (f"busy: {self._running()} running (COSY_MAX_ACTIVE={self.knobs.max_active}), "
                f"{len(self.queue)} queued (COSY_MAX_QUEUE={self.knobs.max_queue}), flow K/V "
                f"{self._running_kv() / (1 << 30):.2f} + {kv / (1 << 30):.2f} GB of "
                f"COSY_MAX_KV_GB={gb:g}")  # fmt: skip

    def _admit(self) -> None:
        """Send queued requests to the stages while there is room (and the stages are up)."""
        while self.queue and self.healthy() and self.stopping is None:
            u = self.queue[0]
            if not self._has_room(u.kv_bytes):
                return
            self.queue.popleft()
            u.running = True
            u.order = SegmentOrder(u.rids)
            for _ in range(SEGMENTS_AHEAD):
                self._send_next_segment(u)

    def _send_next_segment(self, u: Utterance) -> None:
        """Segments go to the stages at most SEGMENTS_AHEAD at a time, in text order: the
        next one is computed while the current one plays, and a long text does not crowd
        its own first audio (or other requests) out of the flow stage."""
        if u.sent < len(u.starts):
            s = u.starts[u.sent]
            u.starts[u.sent] = None  # the tensors are in the socket now
            u.sent += 1
            self.by_rid[s.rid] = u
            send(self.to_llm, s)

    # -- stage output --------------------------------------------------------------------------

    def _drain_out(self) -> None:
        for msg in receive_all(self.from_hift, log, limit=10_000):
            u = self.by_rid.get(msg.rid)
            if u is None:
                continue  # a request that ended already (cancel, timeout, stage restart)
            if isinstance(msg, Audio):
                self._on_audio(u, msg)
            elif isinstance(msg, Failed):
                self._finish(u, msg.code if msg.code in proto.ERROR_CODES else "internal",
                             msg.message)  # fmt: skip
            elif isinstance(msg, Abort):
                pass  # our own abort coming back: the request was answered already

    def _on_audio(self, u: Utterance, msg: Audio) -> None:
        if msg.final:
            self._send_next_segment(u)
        else:  # flow control: the LLM may decode this segment a bounded distance further
            u.covered[msg.rid] = u.covered.get(msg.rid, 0) + msg.tokens
            self._to_llm(Credit(msg.rid, u.covered[msg.rid]))
        for chunk in u.order.push(msg.rid, msg, msg.final):
            if chunk.final:
                self.by_rid.pop(chunk.rid, None)
            last = chunk.final and chunk.rid == u.rids[-1]
            if chunk.audio.numel() == 0 and not last:
                continue  # never an empty chunk, but the final one may be
            if not self._emit(u, chunk, final=last):
                self._finish(u, "cancelled", "the client is gone (its reply was undeliverable)")
                return
        if u.order.done:
            self._finish(u, None, "")

    def _emit(self, u: Utterance, chunk: Audio, final: bool) -> bool:
        """Reply with ``chunk`` at once (stream) or keep it for the one reply; False if the
        client cannot be reached."""
        audio = chunk.audio.numpy()
        if u.t_first is None and audio.size:
            u.t_first = time.monotonic()
        u.samples += audio.size
        if u.op.stream:
            u.seq += 1
            return self._send(u.envelope, proto.audio_reply(u.id, u.seq - 1, final, u.op.format,
                                                            audio))  # fmt: skip
        u.collected.append(audio)
        if final:
            allaudio = np.concatenate(u.collected)
            return self._send(u.envelope, proto.audio_reply(u.id, 0, True, u.op.format, allaudio))
        return True

    def _finish(self, u: Utterance, code: str | None, message: str) -> None:
        """End ``u``: reply the error (if ``code``), abort what the stages still hold."""
        self.utts.pop(u.key, None)
        self.ended[u.key] = None
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        if u in self.queue:
            self.queue.remove(u)
        pending = u.order.pending() if u.order is not None else []
        for rid in u.rids:
            self.by_rid.pop(rid, None)
        if u.running and code is not None:
            for rid in u.rids[: u.sent]:
                if rid in pending:  # in the stages and not ended: free it there
                    self._to_llm(Abort(rid, code, message))
        now = time.monotonic()
        if code is None:
            self.counters["ok"] += 1
            self.recent.append(((u.t_first or now) - u.t_arrival, now - u.t_arrival,
                                u.samples / proto.SAMPLE_RATE))  # fmt: skip
        else:
            self._reply_error(u.envelope, u.id, code, message, "tts")

    def _to_llm(self, msg) -> None:
        try:
            send(self.to_llm, msg, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("llm input full: could not send %s for %s", type(msg).__name__, msg.rid)

    def _cancel(self, identity: bytes, id: str) -> bool:
        """Cancel the sender's own request ``id``; failing that, the one live request with
        that id from another socket (a REQ client cancels from a second socket) -- unless the
        sender had a request ``id`` itself that ended already, or the id is ambiguous."""
        u = self.utts.get((identity, id))
        if u is None:
            if (identity, id) in self.ended:
                return False  # its own request is over: never someone else's by mistake
            others = [x for x in self.utts.values() if x.id == id]
            u = others[0] if len(others) == 1 else None
        if u is None:
            return False
        self._finish(u, "cancelled", f"request {id!r} was cancelled")
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        for u in [u for u in self.utts.values() if u.deadline <= now]:
            self._finish(u, "timeout", f"no result within COSY_REQUEST_TIMEOUT_S="
                                      f"{self.knobs.request_timeout_s:g} s")  # fmt: skip

    # -- supervision ---------------------------------------------------------------------------

    def _drain_status(self) -> None:
        for _ in range(1000):
            try:
                raw = self.status.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = json.loads(raw)
                st = self.stages[msg["stage"]]
            except (ValueError, KeyError, TypeError):
                continue
            if st.proc is None or msg.get("pid") != st.proc.pid:
                continue  # from a process that was replaced
            st.status = msg
            if st.state not in ("dead", "stopped"):
                st.state = msg.get("state", st.state)
            if msg.get("error"):
                st.error = msg["error"]
            if st.state == "up":
                st.quick_deaths = 0

    def _supervise(self) -> None:
        now = time.monotonic()
        for st in self.stages.values():
            if st.restart_at is not None:
                if now >= st.restart_at and self.stopping is None:
                    st.restarts += 1
                    self._spawn(st)
                continue
            code = st.proc.poll() if st.proc is not None else None
            if code is None:
                continue
            st.state = "dead"
            why = st.error or f"exit code {code}"
            log.error("the %s stage (pid %d) died: %s; restarting", st.name, st.proc.pid, why)
            self._fail_running(f"the {st.name} stage died ({why}); it is being restarted")
            delay = RESTART_BACKOFF_S[min(st.quick_deaths, len(RESTART_BACKOFF_S) - 1)]
            st.quick_deaths += 1
            st.restart_at = now + delay

    def _fail_running(self, message: str) -> None:
        for u in [u for u in self.utts.values() if u.running]:
            self._finish(u, "internal", message)

    # -- shutdown ----------------------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        self.stop_requested = True

    def _begin_shutdown(self) -> None:
        self.stopping = time.monotonic()
        log.info("shutting down: %d running, %d queued", self._running(), len(self.queue))
        for u in list(self.queue):
            self._finish(u, "cancelled", "the worker is shutting down")

    def _shutdown_step(self, now: float) -> bool:
        """True once every request is answered (or the grace time is over)."""
        if self.utts and now - self.stopping < self.knobs.shutdown_grace_s:
            return False
        for u in list(self.utts.values()):
            self._finish(u, "cancelled", "the worker is shutting down")
        return True

    def close(self) -> None:
        """Stop the stages (SIGTERM, then SIGKILL after STAGE_STOP_S, or 120 s when they write
        torch profiles), close sockets, remove RUN."""
        procs = [st.proc for st in self.stages.values() if st.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + (120 if self.knobs.torch_profile else STAGE_STOP_S)
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for st in self.stages.values():
            st.state = "stopped"
        if self.ctx is not None:
            self.ctx.destroy(linger=200)
            self.ctx = None
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = None

    # -- health and stats --------------------------------------------------------------------

    def health(self) -> dict:
        return {
            "ok": self.healthy() and self.stopping is None,
            "stopping": self.stopping is not None,
            "stages": {
                st.name: {"state": st.state, "pid": st.proc.pid if st.proc else None,
                          "restarts": st.restarts, "error": st.error}
                for st in self.stages.values()
            },  # fmt: skip
        }

    def stats(self) -> dict:
        cur, peak = rss_mb()
        first = sorted(r[0] for r in self.recent)
        total = sorted(r[1] for r in self.recent)
        rtf = sorted(r[1] / r[2] for r in self.recent if r[2] > 0)
        return {
            "uptime_s": round(time.monotonic() - self.t_start, 1),
            "counters": dict(self.counters),
            "latency_s": {"first_audio": _percentiles(first), "total": _percentiles(total),
                          "rtf": _percentiles(rtf), "n": len(self.recent)},  # fmt: skip
            "active": [u.id for u in self.utts.values() if u.running],
            "queued": [u.id for u in self.queue],
            "kv_gb": {"running_estimate": round(self._running_kv() / (1 << 30), 3),
                      "limit": self.knobs.max_kv_gb},  # fmt: skip
            "stages": {
                st.name: {"state": st.state, "pid": st.proc.pid if st.proc else None,
                          "restarts": st.restarts, "active": len(st.status.get("active", [])),
                          "active_ids": st.status.get("active", []),
                          "stats": st.status.get("stats", {})}
                for st in self.stages.values()
            },  # fmt: skip
            "memory_mb": {
                "server": {"pid": os.getpid(), "rss": round(cur, 1), "max_rss": round(peak, 1)},
                **{st.name: {"pid": st.proc.pid if st.proc else None,
                             "rss": st.status.get("rss_mb"), "max_rss": st.status.get("max_rss_mb")}
                   for st in self.stages.values()},
            },  # fmt: skip
        }


# ---------------------------------------------------------------------------------------------
# helpers


def _kv_bytes_per_frame(cfg, n_steps: int) -> int:
    """Flow K/V per mel frame: steps x layers x CFG 2 x (K + V) x heads x dim_head x fp32."""
    d = cfg.flow.dit
    return n_steps * d.depth * 2 * 2 * d.heads * d.dim_head * 4


def _with_id(req, rid: str):
    from dataclasses import replace

    return replace(req, request_id=rid)


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p95": None, "max": None}

    def pct(p: float) -> float:
        return round(xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))], 4)

    return {"p50": pct(0.5), "p95": pct(0.95), "max": round(xs[-1], 4)}


def _classify(e: BaseException) -> tuple[str, str]:
    """(error code, message) for an exception of the frontend or the prompt cache."""
    from cache import CacheError, CorruptIndex, ReadOnlyCache, UnknownSpeaker

    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, UnknownSpeaker):
        return "not_found", msg
    if isinstance(e, (CorruptIndex, ReadOnlyCache)):  # the worker's problem, named
        return "internal", msg
    if isinstance(e, (RequestError, ValueError, CacheError)):
        return "bad_request", msg
    log.exception("request failed")
    return "internal", f"{type(e).__name__}: {msg}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.server", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", help="the model dir (default: COSY_MODEL_DIR)")
    ap.add_argument("--bind", help="front socket address (default: COSY_BIND)")
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    args = ap.parse_args(argv)
    try:
        knobs = Knobs.from_env()
    except KnobError as e:
        print(f"worker.server: {'; '.join(e.problems)}", file=sys.stderr)
        return 2
    configure_logging(knobs)
    model_dir = args.model_dir or knobs.model_dir
    if model_dir is None:
        print("worker.server: no model dir: pass --model-dir DIR or set COSY_MODEL_DIR",
              file=sys.stderr)  # fmt: skip
        return 2
    server = Server(model_dir, knobs, args.bind)
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    try:
        server.start()
        return server.serve(args.startup_timeout)
    except StartupError as e:
        print(f"worker.server: {e}", file=sys.stderr)
        return 1
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
