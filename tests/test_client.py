"""worker/client.py against a fake worker: a real ROUTER on ipc:// served by a thread."""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq

from worker.client import Client, ReplyError, WorkerError, main
from worker.protocol import (
    CancelOp,
    HealthOp,
    ProtocolError,
    Request,
    SpeakerListOp,
    TTSOp,
    audio_reply,
    error_reply,
    info_reply,
    parse_request,
    split_envelope,
)

Replies = list[list[bytes]]
Handler = Callable[[Request], Replies]


def pieces(n: int, size: int = 240, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, size).astype(np.float32) for _ in range(n)]


def tts_replies(req: TTSOp, audio: list[np.ndarray]) -> Replies:
    """What the worker sends for a tts request: one reply per chunk, or one in all."""
    if not req.stream:
        return [audio_reply(req.id, 0, True, req.format, np.concatenate(audio))]
    last = len(audio) - 1
    return [audio_reply(req.id, i, i == last, req.format, a) for i, a in enumerate(audio)]


class FakeWorker:
    """ROUTER at ``endpoint``; each request goes through the real protocol parser, then
    ``handler(request)`` returns the replies to send (envelope added here)."""

    def __init__(self, directory: Path, handler: Handler):
        self.handler = handler
        self.endpoint = f"ipc://{directory}/worker.sock"
        self.requests: list[Request] = []
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        self.ctl = self.ctx.socket(zmq.PAIR)
        self.ctl.bind("inproc://stop")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stop = self.ctx.socket(zmq.PAIR)
        stop.connect("inproc://stop")
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if stop in ready:
                    return
                env, body, is_req = split_envelope(self.router.recv_multipart())
                try:
                    req = parse_request(body, 1 << 24, is_req=is_req)
                except ProtocolError as e:
                    self.router.send_multipart(env + e.reply())
                    continue
                self.requests.append(req)
                for reply in self.handler(req):
                    self.router.send_multipart(env + reply)
        finally:
            stop.close(0)

    def close(self) -> None:
        self.ctl.send(b"stop")
        self.thread.join(timeout=10)
        self.ctl.close(0)
        self.router.close(0)
        self.ctx.term()
        assert not self.thread.is_alive()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # ipc:// paths must be short (~100 bytes); pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="cvz", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def serve(short_dir):
    """``serve(handler)`` -> a running FakeWorker, stopped at the end of the test."""
    workers: list[FakeWorker] = []

    def start(handler: Handler) -> FakeWorker:
        workers.append(FakeWorker(short_dir, handler))
        return workers[-1]

    try:
        yield start
    finally:
        for w in workers:
            w.close()


@pytest.fixture
def client_for():
    """``client_for(endpoint, timeout_s)`` -> a Client closed at the end of the test."""
    clients: list[Client] = []

    def make(endpoint: str, timeout_s: float = 5.0) -> Client:
        clients.append(Client(endpoint, timeout_s=timeout_s))
        return clients[-1]

    try:
        yield make
    finally:
        for c in clients:
            c.close()


AUDIO = pieces(3)


def normal(req: Request) -> Replies:
    if isinstance(req, TTSOp):
        return tts_replies(req, AUDIO)
    if isinstance(req, HealthOp):
        return [info_reply(req.id, "health", ok=True, stages={"llm": {"ok": True}})]
    if isinstance(req, SpeakerListOp):
        return [info_reply(req.id, "speaker.list", speakers=["alice", "bob"])]
    if isinstance(req, CancelOp):
        return [info_reply(req.id, "cancel", cancelled=False)]
    return [info_reply(req.id, req.op)]


# ---------------------------------------------------------------------------------------------


def test_stream_yields_chunks_in_order(serve, client_for):
    worker = serve(normal)
    client = client_for(worker.endpoint)
    chunks = list(client.stream("hello", speaker="bob", id="req-1", seed=7))
    assert [c.seq for c in chunks] == [0, 1, 2]
    assert [c.final for c in chunks] == [False, False, True]
    assert all(c.id == "req-1" and c.sample_rate == 24000 for c in chunks)
    for c, a in zip(chunks, AUDIO):
        assert c.audio.dtype == np.float32 and np.array_equal(c.audio, a)  # f32le: exact
        assert c.header["format"] == "f32le" and c.header["samples"] == a.size
    req = worker.requests[0]
    assert isinstance(req, TTSOp) and req.stream and req.format == "f32le" and req.seed == 7


@pytest.mark.parametrize("fmt", ["pcm_s16le", "wav"])
def test_stream_other_formats(serve, client_for, fmt):
    client = client_for(serve(normal).endpoint)
    chunks = list(client.stream("hello", speaker="bob", format=fmt))
    for c, a in zip(chunks, AUDIO):
        assert c.audio.shape == a.shape and np.max(np.abs(c.audio - a)) <= 1 / 32767


def test_synthesize_one_reply(serve, client_for):
    worker = serve(normal)
    client = client_for(worker.endpoint)
    audio = client.synthesize("hello", prompt_wav=b"RIFFfake", prompt_text="words")
    assert np.array_equal(audio, np.concatenate(AUDIO))
    req = worker.requests[0]
    assert req.stream is False and req.audio == b"RIFFfake" and req.prompt_text == "words"


def test_prompt_wav_from_a_path(serve, client_for, short_dir):
    worker = serve(normal)
    client = client_for(worker.endpoint)
    path = short_dir / "p.wav"
    path.write_bytes(b"RIFF-from-file")
    client.synthesize("hello", mode="cross_lingual", prompt_wav=path)
    assert worker.requests[0].audio == b"RIFF-from-file"


def test_worker_error_raises(serve, client_for):
    def handler(req):
        return [error_reply(req.id, "not_found", "no speaker 'zed'")]

    client = client_for(serve(handler).endpoint)
    with pytest.raises(WorkerError) as info:
        list(client.stream("hello", speaker="zed", id="e1"))
    assert (info.value.code, info.value.message, info.value.id) == (
        "not_found",
        "no speaker 'zed'",
        "e1",
    )
    with pytest.raises(WorkerError, match="not_found"):
        client.synthesize("hello", speaker="zed")


def test_error_after_some_chunks(serve, client_for):
    def handler(req):
        return tts_replies(req, AUDIO)[:1] + [error_reply(req.id, "timeout", "too slow")]

    client = client_for(serve(handler).endpoint)
    it = client.stream("hello", speaker="bob")
    assert next(it).seq == 0
    with pytest.raises(WorkerError) as info:
        next(it)
    assert info.value.code == "timeout"


def test_bad_request_is_caught_before_sending(serve, client_for):
    worker = serve(normal)
    client = client_for(worker.endpoint)
    with pytest.raises(WorkerError) as info:
        client.stream("hello")  # no voice
    assert info.value.code == "bad_request" and "voice" in info.value.message
    with pytest.raises(WorkerError, match="'speed'"):
        client.synthesize("hello", speaker="bob", speed=9.0)
    assert client.health()["ok"] is True
    assert [type(r) for r in worker.requests] == [HealthOp]


@pytest.mark.parametrize("seqs, word", [([0, 2], "gap"), ([0, 0], "duplicate"), ([1], "gap")])
def test_seq_gap_or_duplicate_raises(serve, client_for, seqs, word):
    def handler(req):
        if isinstance(req, CancelOp):
            return [info_reply(req.id, "cancel", cancelled=True)]
        if isinstance(req, TTSOp):
            return [audio_reply(req.id, s, False, req.format, AUDIO[0]) for s in seqs]
        return normal(req)

    worker = serve(handler)
    client = client_for(worker.endpoint)
    with pytest.raises(ReplyError, match=word) as info:
        list(client.stream("hello", speaker="bob", id="g1"))
    assert info.value.code == "bad_reply"
    # the broken stream was abandoned: the worker is asked to cancel it, the ack is dropped
    assert client.health()["ok"] is True
    assert [type(r) for r in worker.requests] == [TTSOp, CancelOp, HealthOp]
    assert worker.requests[1].id == "g1"


def test_other_ids_are_buffered(serve, client_for):
    worker = serve(normal)
    client = client_for(worker.endpoint)
    a = client.stream("first", speaker="bob", id="A")  # sent now; its replies come first
    b = client.stream("second", speaker="bob", id="B")
    assert client.health()["ok"] is True  # A's and B's chunks arrive while waiting: kept
    assert [c.seq for c in b] == [0, 1, 2]
    assert [c.id for c in a] == ["A", "A", "A"]
    assert client.speaker_list() == ["alice", "bob"]


def test_cancel_ack_and_cancelled_stream(serve, client_for):
    """The cancel ack (op cancel) and the stream's own cancelled error (op tts) share the id."""

    def handler(req):
        if isinstance(req, TTSOp):
            return tts_replies(req, AUDIO)[:1]
        if isinstance(req, CancelOp):  # the chunk in flight, the stream's end, then the ack
            return [
                audio_reply(req.id, 1, False, "f32le", AUDIO[1]),
                error_reply(req.id, "cancelled", "cancelled by request"),
                info_reply(req.id, "cancel", cancelled=True),
            ]
        return []

    client = client_for(serve(handler).endpoint)
    it = client.stream("hello", speaker="bob", id="X")
    assert next(it).seq == 0
    assert client.cancel("X") is True
    assert next(it).seq == 1  # buffered while cancel() waited for its ack
    with pytest.raises(WorkerError) as info:
        next(it)
    assert info.value.code == "cancelled" and info.value.id == "X"


def test_info_ops(serve, client_for):
    worker = serve(normal)
    client = client_for(worker.endpoint)
    assert client.health() == {"ok": True, "stages": {"llm": {"ok": True}}}
    assert client.stats() == {}
    assert client.cancel("nope") is False
    assert client.speaker_add("carol", b"RIFFx", prompt_text="hi", overwrite=True) == {}
    assert client.speaker_delete("carol") == {}
    add = worker.requests[3]
    assert (add.name, add.prompt_text, add.overwrite, add.audio) == ("carol", "hi", True, b"RIFFx")
    assert all(r.id for r in worker.requests)  # the client always sends an id


def test_timeout_when_nobody_answers(short_dir, client_for):
    client = client_for(f"ipc://{short_dir}/nobody.sock", timeout_s=0.3)
    with pytest.raises(TimeoutError, match="nobody answered") as info:
        client.health()
    assert str(short_dir) in str(info.value) and "run.sh serve" in str(info.value)


def test_timeout_when_the_stream_stalls(serve, client_for):
    def handler(req):
        return tts_replies(req, AUDIO)[:1] if isinstance(req, TTSOp) else []

    client = client_for(serve(handler).endpoint, timeout_s=0.3)
    it = client.stream("hello", speaker="bob", id="S")
    assert next(it).seq == 0
    with pytest.raises(TimeoutError, match="'S'"):
        next(it)


def test_leaving_a_stream_early_cancels_it(serve, client_for):
    def handler(req):
        if isinstance(req, TTSOp):
            return tts_replies(req, AUDIO)[:2]
        if isinstance(req, CancelOp):
            return [
                error_reply(req.id, "cancelled", "cancelled by request"),
                info_reply(req.id, "cancel", cancelled=True),
            ]
        return normal(req)

    worker = serve(handler)
    client = client_for(worker.endpoint)
    with closing(client.stream("hello", speaker="bob", id="L")) as it:
        assert next(it).seq == 0
    assert client.health()["ok"] is True  # L's remaining replies are dropped, not returned
    assert [type(r) for r in worker.requests] == [TTSOp, CancelOp, HealthOp]


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_wav_and_reports_progress(serve, short_dir, capsys):
    worker = serve(normal)
    out = short_dir / "out.wav"
    argv = ["--text", "hello", "--speaker", "bob", "--endpoint", worker.endpoint, "--seed", "3"]
    assert main([*argv, "--out", str(out), "--timeout", "5"]) == 0
    data, rate = sf.read(out, dtype="float32")
    assert rate == 24000 and data.shape == (sum(a.size for a in AUDIO),)
    assert sf.info(out).subtype == "PCM_16"
    assert np.max(np.abs(data - np.concatenate(AUDIO))) <= 1 / 32767
    err = capsys.readouterr().err.splitlines()
    chunk_lines = [line for line in err if "seq=" in line]
    assert len(chunk_lines) == 3
    assert "seq=0" in chunk_lines[0] and "samples=240" in chunk_lines[0]
    assert "elapsed=" in chunk_lines[0]
    summary = err[-1]
    for word in ("first audio", "total", "audio 0.030 s", "RTF"):
        assert word in summary
    assert worker.requests[0].seed == 3 and worker.requests[0].speaker == "bob"


def test_cli_worker_error_is_one_line(serve, short_dir, capsys):
    def handler(req):
        return [error_reply(req.id, "overloaded", "queue full, try later")]

    worker = serve(handler)
    out = short_dir / "out.wav"
    code = main(["--text", "hi", "--speaker", "bob", "--endpoint", worker.endpoint,
                 "--out", str(out)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["worker.client: error: overloaded: queue full, try later"]
    assert not out.exists()


def test_cli_bad_input_and_usage(serve, short_dir, capsys):
    worker = serve(normal)
    out = str(short_dir / "o.wav")
    # semantic problem: one line, exit 1, nothing sent
    assert main(["--text", "hi", "--endpoint", worker.endpoint, "--out", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("worker.client: error: bad_request:")
    missing = str(short_dir / "missing.wav")
    assert main(["--text", "hi", "--prompt-wav", missing, "--prompt-text", "t",
                 "--endpoint", worker.endpoint, "--out", out]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.wav" in err[0]
    assert worker.requests == []
    # usage problems: exit 2
    assert main(["--text", "hi"]) == 2  # no --out
    assert main(["--health", "--stats"]) == 2
    assert main(["--text", "hi", "--mode", "robot", "--out", out]) == 2


def test_cli_queries_print_json(serve, capsys):
    worker = serve(normal)
    assert main(["--health", "--endpoint", worker.endpoint]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["--list-speakers", "--endpoint", worker.endpoint]) == 0
    assert json.loads(capsys.readouterr().out) == ["alice", "bob"]
    assert main(["--stats", "--endpoint", worker.endpoint]) == 0
    assert json.loads(capsys.readouterr().out) == {}


def test_cli_timeout_is_one_line(short_dir, capsys):
    code = main(["--health", "--endpoint", f"ipc://{short_dir}/none.sock", "--timeout", "0.3"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nobody answered" in err[0]
