"""The soak tool (``python -m tuning.soak``): its bookkeeping's verdicts on synthetic replies
(mixed, duplicated, lost, seq gaps, bad payloads, seeded pairs), its fuzz messages, and real
runs against the service (a small one here, a big one marked slow). Every run's processes
(the tool, its server and stages) are ended by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tuning.soak import (
    Ledger,
    Spec,
    _failures,
    _refused,
    fuzz_cases,
    make_specs,
    tally,
)
from worker import protocol as proto
from worker.launch import pid_alive

AUDIO = np.linspace(-0.5, 0.5, 480, dtype=np.float32)


def _spec(index=0, stream=True, fmt="f32le", pair=None, seed=None) -> Spec:
    return Spec(index, "Hello.", "speaker", stream, fmt, seed, pair)


def _audio(rid, seq, final, fmt="f32le", audio=AUDIO):
    return proto.audio_reply(rid, seq, final, fmt, audio)


# -- the bookkeeping ----------------------------------------------------------------------------


def test_a_clean_stream_is_ok_and_counts_nothing():
    led = Ledger()
    led.sent("a", _spec())
    assert led.receive(_audio("a", 0, False)) is None
    done = led.receive(_audio("a", 1, True))
    assert done is not None and done.outcome == "ok" and done.samples == 2 * AUDIO.size
    r = tally([led])
    assert (r["requests"], r["ok"], r["lost"], r["mixed"], r["duplicated"]) == (1, 1, 0, 0, 0)
    assert r["seq_gaps"] == r["bad_replies"] == 0 and r["errors"] == {}


def test_a_reply_for_an_id_the_client_never_sent_is_mixed():
    led = Ledger(3)
    led.sent("mine", _spec())
    led.receive(_audio("someone-elses", 0, True))
    led.receive(proto.info_reply("mine", "cancel", cancelled=False))  # a cancel it never sent
    led.receive(_audio("mine", 0, True))
    r = tally([led])
    assert r["mixed"] == 2 and r["ok"] == 1
    assert "someone-elses" in r["notes"][0] and r["notes"][0].startswith("client 3")


def test_a_second_final_or_a_repeated_seq_is_duplicated():
    led = Ledger()
    led.sent("a", _spec(0))
    led.sent("b", _spec(1))
    led.receive(_audio("a", 0, True))
    led.receive(_audio("a", 0, True))  # a second final
    led.receive(proto.error_reply("a", "internal", "late"))  # anything after the final
    led.receive(_audio("b", 0, False))
    led.receive(_audio("b", 0, False))  # seq 0 again
    led.receive(_audio("b", 1, True))
    r = tally([led])
    assert r["duplicated"] == 3 and r["ok"] == 2 and r["mixed"] == 0


def test_no_final_reply_is_lost_and_late_replies_do_not_revive_it():
    led = Ledger()
    led.sent("a", _spec(0))
    led.sent("b", _spec(1))
    led.receive(_audio("a", 0, False))
    assert [t.rid for t in led.open()] == ["a", "b"]
    led.give_up("a")
    led.receive(_audio("a", 1, True))  # too late: still lost
    led.receive(proto.info_reply("a", "cancel", cancelled=True))  # the ack of our cancel
    led.receive(proto.error_reply("b", "internal", "the flow stage died"))
    r = tally([led], unsent=2)  # and two never sent (the budget ran out)
    assert r["lost"] == 3 and r["late_replies"] == 1 and r["mixed"] == 0
    assert r["errors"] == {"internal": 1} and r["requests"] == 4
    assert r["ok"] + sum(r["errors"].values()) + r["lost"] == r["requests"]


def test_seq_gaps_and_bad_payloads_are_counted():
    led = Ledger()
    led.sent("a", _spec(0))
    led.sent("b", _spec(1, fmt="pcm_s16le"))
    led.sent("c", _spec(2, stream=False))
    led.receive(_audio("a", 0, False))
    led.receive(_audio("a", 2, True))  # seq 1 missing
    head, payload = _audio("b", 0, True, "pcm_s16le")
    led.receive([head, payload[:-2]])  # one sample short of the header's count
    led.receive(_audio("c", 0, False))  # stream:false must be one final reply: both count
    led.receive(_audio("c", 1, True))
    led.receive([b"not json"])
    r = tally([led])
    assert r["seq_gaps"] == 1 and r["bad_replies"] == 4 and r["ok"] == 3


def test_seeded_pairs_must_match_unless_one_failed():
    a, b = Ledger(0), Ledger(1)
    for led, rid, audio in ((a, "p0a", AUDIO), (b, "p0b", AUDIO), (a, "p1a", AUDIO),
                            (b, "p1b", AUDIO * 0.5)):  # fmt: skip
        led.sent(rid, _spec(pair=int(rid[1]), seed=7))
        led.receive(_audio(rid, 0, True, audio=audio))
    a.sent("p2a", _spec(pair=2, seed=7))
    b.sent("p2b", _spec(pair=2, seed=7))
    a.receive(_audio("p2a", 0, True))
    b.receive(proto.error_reply("p2b", "internal", "killed"))  # not compared
    r = tally([a, b])
    assert r["pairs_compared"] == 2 and r["mixed"] == 1
    assert r["pairs_mismatched"][0]["ids"] == ["p1a", "p1b"]


def test_the_verdict_fails_on_loss_mix_duplicates_fuzz_and_a_dead_stage():
    led = Ledger()
    led.sent("a", _spec())
    led.receive(_audio("a", 0, True))
    base = dict(tally([led]), fuzz={"sent": 3, "bad_request": 3, "other": 0, "missing": 0},
                kill={"stage": "flow", "restarted": True}, thread_errors=[])  # fmt: skip
    assert _failures(base) == []
    for change in ({"lost": 1, "requests": 2}, {"mixed": 1}, {"duplicated": 2},
                   {"fuzz": {"sent": 3, "bad_request": 2, "other": 1, "missing": 0}},
                   {"fuzz": {"sent": 2, "bad_request": 2, "other": 0, "missing": 1}},
                   {"fuzz": {"sent": 2, "bad_request": 2, "other": 0, "missing": 0,
                             "unsent": 1}},
                   {"kill": {"stage": "flow", "restarted": False}}):  # fmt: skip
        assert _failures(dict(base, **change)), change


def test_specs_pair_seeded_twins_and_fuzz_is_all_refused():
    specs = make_specs(40, np.random.default_rng(0))
    assert sorted(s.index for s in specs) == list(range(40))
    pairs: dict[int, list[Spec]] = {}
    for s in specs:
        if s.pair is not None:
            pairs.setdefault(s.pair, []).append(s)
    assert len(pairs) == 10
    for twins in pairs.values():
        assert len(twins) == 2 and twins[0].seed is not None
        assert len({(t.text, t.voice, t.seed, t.format) for t in twins}) == 1
    assert {s.voice for s in specs} == {"prompt", "speaker"} and {s.stream for s in specs} == {
        True, False}  # fmt: skip
    limit = 1 << 20
    cases = list(fuzz_cases(200, np.random.default_rng(0), limit, (b"RIFF....", "t")))
    assert len(cases) == 200
    refused = [c for c in cases if _refused(c, limit)]
    assert len(refused) >= 170  # the rest: a valid header with unusable audio (frontend)
    assert any(c[0] == b"" for c in cases)  # REQ-style
    assert any(max(len(f) for f in c) > limit for c in cases)  # just over COSY_MAX_FRAME_MB


# -- real runs ------------------------------------------------------------------------------------


def _soak(tmp_path, *args: str, timeout_s: float) -> tuple[int, dict, str]:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "tuning.soak", *args, "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSY_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the tool stops its service on SIGTERM
        try:
            stdout, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the tool and its children
            stdout, _ = proc.communicate()
        pytest.fail(f"the soak ran over {timeout_s} s:\n{stdout[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert out.is_file(), stdout[-3000:]
    return proc.returncode, json.loads(out.read_text()), stdout


def _check(code: int, r: dict, stdout: str, requests: int, fuzz: int) -> None:
    assert code == 0, stdout[-3000:]
    assert r["passed"] and r["failures"] == []
    assert r["requests"] == requests
    assert r["lost"] == r["mixed"] == r["duplicated"] == 0
    assert r["seq_gaps"] == r["bad_replies"] == 0
    assert r["ok"] + sum(r["errors"].values()) == requests
    assert set(r["errors"]) <= {"internal", "overloaded"}, r["errors"]
    assert r["fuzz"]["sent"] == r["fuzz"]["bad_request"] == fuzz
    assert r["fuzz"]["other"] == r["fuzz"]["missing"] == r["fuzz"]["unsent"] == 0
    k = r["kill"]
    assert k["stage"] == "flow" and k["restarted"] is True and k["new_pid"] != k["pid"]
    assert all(r["max_rss_mb"][p] > 0 for p in ("server", "llm", "flow", "hift"))
    assert r["health_ok_at_end"] and r["server_idle_at_end"]
    assert "PASS" in stdout
    pids = [r["pids"]["server"], *r["pids"]["stages"]]
    assert not [p for p in pids if pid_alive(p)], "the soak left processes running"


def test_small_soak_with_a_killed_flow_stage_passes(tmp_path):
    code, r, stdout = _soak(tmp_path, "--clients", "4", "--requests", "12", "--fuzz", "40",
                            "--kill-stage", "flow", "--budget-s", "150", timeout_s=240)  # fmt: skip
    _check(code, r, stdout, 12, 40)
    assert r["wall_s"] < 150


@pytest.mark.slow
def test_big_soak_with_a_killed_flow_stage_passes(tmp_path):
    code, r, stdout = _soak(tmp_path, "--clients", "50", "--requests", "200", "--fuzz", "1000",
                            "--kill-stage", "flow", timeout_s=900)  # fmt: skip
    _check(code, r, stdout, 200, 1000)
    assert r["pairs_compared"] > 0
