"""The worker service over real sockets: a server and three stage processes on ``ipc://``,
tiny random-weight dims. Streams equal the in-process engine's audio; clients never get
each other's audio; cancel frees every stage; malformed messages get ``bad_request``; a
killed stage is restarted; overload is refused at once; SIGTERM answers and exits 0."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
import zmq

from tests.conftest import FIXTURES
from tests.service_util import Service, pid_alive
from tuning.random_model import write_model_dir
from worker.client import WorkerError

PROMPT = FIXTURES / "prompts" / "en_1272_128104_000003_000001"
SYSTEM = "You are a helpful assistant.<|endofprompt|>"
LONG = " ".join(f"Sentence number {i} is here to make this utterance long." for i in range(24))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("svc") / "tiny", "tiny", seed=1)


@pytest.fixture(scope="module")
def prompt():
    return PROMPT.with_suffix(".wav").read_bytes(), SYSTEM + PROMPT.with_suffix(".txt").read_text()


def _running(svc: Service):
    """Yield ``svc`` once it is up; stop it and check every process it started is gone."""
    try:
        svc.wait_up()
        yield svc
    finally:
        svc.stop()
        assert not any(pid_alive(p) for p in svc.stage_pids)


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    yield from _running(Service(model_dir, tmp_path_factory.mktemp("run")))


def _tts(client, prompt, text="Hello there. How are you today?", **kw):
    wav, ptext = prompt
    return client.stream(text, prompt_wav=wav, prompt_text=ptext, **kw)


def test_stream_is_ordered_and_equals_the_in_process_engine(service, model_dir, prompt, tmp_path):
    from cache import PromptCache
    from worker.engine import Engine
    from worker.frontend.prepare import Frontend, Voice
    from worker.model_dir import load_model_dir
    from worker.settings import Knobs

    text = "Hello there. This is the first sentence! And a second one, a little longer."
    with service.client() as c:
        chunks = list(_tts(c, prompt, text, seed=5))
    assert [ch.seq for ch in chunks] == list(range(len(chunks)))
    assert [ch.final for ch in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(ch.audio.size for ch in chunks[:-1])  # no empty chunk but possibly the last
    got = np.concatenate([ch.audio for ch in chunks])

    knobs = Knobs.from_env({"COSY_CACHE_DIR": str(tmp_path / "cache")})
    fe = Frontend(model_dir, PromptCache.from_knobs(knobs), knobs=knobs)
    reqs = fe.requests("zero_shot", text, Voice(prompt[0], prompt[1]), seed=5)
    eng = Engine(load_model_dir(model_dir), knobs=knobs)
    want = list(eng.stream(reqs))
    assert [w.audio.numel() for w in want] == [ch.audio.size for ch in chunks]
    ref = torch.cat([w.audio for w in want]).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-6


def test_req_socket_gets_one_reply(service, prompt):
    wav, ptext = prompt
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 30_000)
    try:
        s.connect(service.endpoint)
        header = {"v": 1, "op": "tts", "id": "req-1", "text": "Hello from a REQ socket.",
                  "prompt_text": ptext, "format": "f32le", "seed": 2}  # fmt: skip
        s.send_multipart([json.dumps(header).encode(), wav])
        head, payload = s.recv_multipart()
        h = json.loads(head)
        assert h["final"] is True and h["id"] == "req-1" and h["seq"] == 0
        assert h["samples"] == len(payload) // 4 > 0
        with service.client() as c:  # the same request streamed: the same samples
            streamed = np.concatenate([ch.audio for ch in _tts(c, prompt, header["text"], seed=2)])
        assert np.array_equal(np.frombuffer(payload, "<f4"), streamed)
    finally:
        s.close()


def test_concurrent_clients_get_only_their_own_audio(service, prompt):
    texts = [f"Client {i} says hello number {i}." * (i + 1) for i in range(4)]
    alone = []
    with service.client() as c:
        for i, t in enumerate(texts):
            alone.append(np.concatenate([ch.audio for ch in _tts(c, prompt, t, seed=i, id="x")]))
    results: dict[int, object] = {}

    def run(i):
        try:
            with service.client() as c:  # every client uses the same id: routing is by socket
                results[i] = np.concatenate([ch.audio for ch in _tts(c, prompt, texts[i],
                                                                      seed=i, id="x")])  # fmt: skip
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(4):
        assert isinstance(results[i], np.ndarray), results[i]
        assert np.array_equal(results[i], alone[i])


def test_a_client_that_goes_away_frees_its_request(service, prompt):
    """The worker notices an undeliverable reply and ends the request in every stage."""
    wav, ptext = prompt
    before = service.stats()["counters"]["error.cancelled"]
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 60_000)
    s.connect(service.endpoint)
    header = {"v": 1, "op": "tts", "id": "gone", "text": LONG, "prompt_text": ptext, "seed": 1}
    s.send_multipart([json.dumps(header).encode(), wav])
    assert json.loads(s.recv_multipart()[0])["final"] is False  # streaming has begun
    s.close()
    deadline = time.monotonic() + 60
    while True:
        st = service.stats()
        if not st["active"] and not any(x["active_ids"] for x in st["stages"].values()):
            break
        assert time.monotonic() < deadline, st["active"]
        time.sleep(0.2)
    assert st["counters"]["error.cancelled"] == before + 1


def test_fuzzed_messages_get_bad_request_and_the_worker_keeps_serving(service, prompt):
    rng = np.random.default_rng(0)
    good = {"v": 1, "op": "tts", "id": "f", "text": "hi", "prompt_text": "t"}
    cases: list[list[bytes]] = []
    for i in range(200):
        kind = i % 8
        if kind == 0:
            cases.append([rng.bytes(int(rng.integers(1, 64)))])
        elif kind == 1:
            cases.append([json.dumps(good).encode()[: int(rng.integers(1, 20))]])
        elif kind == 2:
            h = dict(good, **{str(rng.choice(list(good))): [1, 2]})
            cases.append([json.dumps(h).encode()])
        elif kind == 3:
            cases.append([json.dumps(dict(good, op=f"op{i}")).encode()])
        elif kind == 4:
            cases.append([json.dumps(dict(good, mode="whisper")).encode(), b"RIFF"])
        elif kind == 5:
            cases.append([json.dumps(dict(good, extra=i)).encode()])
        elif kind == 6:
            cases.append([json.dumps([1, "tts"]).encode()])
        else:  # not audio at all in the prompt frame
            cases.append([json.dumps(dict(good, id=f"na{i}")).encode(), rng.bytes(300)])
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 30_000)
    try:
        s.connect(service.endpoint)
        for frames in cases:
            s.send_multipart(frames)
            reply = json.loads(s.recv_multipart()[0])
            assert reply["final"] is True and reply["error"]["code"] == "bad_request", reply
            assert reply["error"]["message"]
    finally:
        s.close()
    with service.client() as c:
        assert c.health()["ok"]
        assert list(_tts(c, prompt, "Still serving.", seed=1))[-1].final


# -- a slow service: long requests, one at a time, short shutdown grace ------------------------


@pytest.fixture(scope="module")
def slow(model_dir, tmp_path_factory):
    yield from _running(Service(model_dir, tmp_path_factory.mktemp("slow"), flow_steps=100,
                                max_active=1, max_queue=0, shutdown_grace_s=1))  # fmt: skip


def test_overload_is_refused_at_once(slow, prompt):
    with slow.client() as a, slow.client(timeout_s=5) as b:
        first = _tts(a, prompt, LONG, seed=1, id="long")
        next(first)  # running now: the only slot is taken, the queue holds 0
        with pytest.raises(WorkerError) as info:
            list(_tts(b, prompt, "Me too.", id="second"))
        assert info.value.code == "overloaded" and "COSY_MAX_ACTIVE=1" in info.value.message
        assert a.cancel("long")


def test_cancel_mid_stream_frees_every_stage(slow, prompt):
    with slow.client() as c:
        stream = _tts(c, prompt, LONG, seed=2, id="c1")
        first = next(stream)
        assert not first.final
        assert c.cancel("c1") is True
        with pytest.raises(WorkerError) as info:
            list(stream)
        assert info.value.code == "cancelled"
    deadline = time.monotonic() + 10
    while True:  # stage status arrives every second
        st = slow.stats()
        held = {name: s["active_ids"] for name, s in st["stages"].items()}
        if not any(held.values()) and not st["active"]:
            break
        assert time.monotonic() < deadline, held
        time.sleep(0.2)
    assert st["counters"]["error.cancelled"] >= 1


def test_cancel_never_stops_another_sockets_request_by_mistake(slow, prompt):
    """A's own "x" is over; B's "x" runs: A's cancel of "x" must not stop B's."""
    with slow.client() as a, slow.client() as b:
        assert list(_tts(a, prompt, "Short.", seed=1, id="x"))[-1].final
        sb = _tts(b, prompt, LONG, seed=2, id="x")
        next(sb)
        assert a.cancel("x") is False
        assert b.cancel("x") is True  # its owner can
        with pytest.raises(WorkerError) as info:
            list(sb)
        assert info.value.code == "cancelled"


def test_killed_stage_fails_its_requests_and_is_restarted(slow, prompt):
    flow_pid = slow.stats()["stages"]["flow"]["pid"]
    with slow.client() as c:
        stream = _tts(c, prompt, LONG, seed=3, id="k1")
        next(stream)
        c.timeout_s = 5  # the error reply must come within 5 s of the kill
        os.kill(flow_pid, signal.SIGKILL)
        with pytest.raises(WorkerError) as info:
            list(stream)
        assert info.value.code == "internal" and "flow stage died" in info.value.message
    h = slow.wait_up(60)
    assert h["stages"]["flow"]["restarts"] == 1 and h["stages"]["flow"]["pid"] != flow_pid
    with slow.client() as c:
        assert list(_tts(c, prompt, "After the restart.", seed=4))[-1].final


def test_sigterm_answers_in_flight_requests_and_exits_zero(slow, prompt):
    with slow.client() as c:
        stream = _tts(c, prompt, LONG, seed=5, id="t1")
        next(stream)
        slow.proc.send_signal(signal.SIGTERM)
        with pytest.raises(WorkerError) as info:  # grace 1 s: not enough for LONG
            list(stream)
        assert info.value.code == "cancelled"
    assert slow.proc.wait(60) == 0
    deadline = time.monotonic() + 15
    while any(pid_alive(p) for p in slow.stage_pids):
        assert time.monotonic() < deadline, "stage processes outlived the server"
        time.sleep(0.1)
