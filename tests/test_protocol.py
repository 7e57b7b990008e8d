"""Protocol v1 (worker/protocol.py): request parsing and validation, envelopes, reply encoding."""

from __future__ import annotations

import io
import json
import random
import struct

import msgspec
import numpy as np
import pytest
import soundfile as sf

from worker.protocol import (
    ERROR_CODES,
    FORMATS,
    MODES,
    OPS,
    CancelOp,
    HealthOp,
    ProtocolError,
    SpeakerAddOp,
    SpeakerDeleteOp,
    SpeakerListOp,
    StatsOp,
    TTSOp,
    audio_reply,
    decode_audio,
    error_reply,
    info_reply,
    parse_request,
    split_envelope,
)

LIMIT = 1 << 20
WAV = b"RIFF....WAVEfake audio file"  # decodability is the frontend's business


def enc(header) -> bytes:
    return json.dumps(header).encode()


def tts(**fields) -> dict:
    return {"v": 1, "op": "tts", "id": "r1", "text": "hello", "speaker": "bob", **fields}


def without(header: dict, *keys: str) -> dict:
    return {k: v for k, v in header.items() if k not in keys}


def zs_audio(**fields) -> dict:
    """zero_shot with a prompt audio frame (no speaker)."""
    return without(tts(**{"prompt_text": "prompt words", **fields}), "speaker")


# ---------------------------------------------------------------------------------------------
# valid requests


def test_tts_defaults():
    req = parse_request([enc(tts())], LIMIT)
    assert req == TTSOp(id="r1", text="hello", speaker="bob")
    assert (req.mode, req.stream, req.format, req.speed, req.seed) == (
        "zero_shot",
        True,
        "pcm_s16le",
        1.0,
        None,
    )
    assert req.prompt_text is None and req.instruct is None and req.audio is None
    assert req.op == "tts"


def test_tts_all_fields_with_audio():
    header = zs_audio(stream=False, format="wav", speed=2, seed=2**63 - 1)
    req = parse_request([enc(header), WAV], LIMIT)
    assert isinstance(req, TTSOp)
    assert req.audio == WAV and req.prompt_text == "prompt words" and req.speaker is None
    assert req.stream is False and req.format == "wav" and req.seed == 2**63 - 1
    assert req.speed == 2.0 and isinstance(req.speed, float)  # int is fine for a float
    assert "audio=<" in repr(req) and "fake audio" not in repr(req)


@pytest.mark.parametrize("mode", MODES)
def test_tts_modes(mode):
    extra = {"instruct": "Speak slowly.<|endofprompt|>"} if mode == "instruct" else {}
    req = parse_request([enc(tts(mode=mode, **extra))], LIMIT)
    assert req.mode == mode
    # cross_lingual / instruct with a prompt audio frame need no prompt_text
    if mode != "zero_shot":
        header = without(tts(mode=mode, **extra), "speaker")
        assert parse_request([enc(header), WAV], LIMIT).audio == WAV


@pytest.mark.parametrize("fmt", FORMATS)
def test_tts_formats(fmt):
    assert parse_request([enc(tts(format=fmt))], LIMIT).format == fmt


def test_tts_from_req_peer_defaults_to_one_reply():
    assert parse_request([enc(tts())], LIMIT, is_req=True).stream is False
    assert parse_request([enc(tts(stream=False))], LIMIT, is_req=True).stream is False


def test_null_optional_fields_are_absent():
    req = parse_request([enc(tts(seed=None, instruct=None, prompt_text=None))], LIMIT)
    assert req.seed is None and req.instruct is None and req.prompt_text is None


@pytest.mark.parametrize(
    "frames, expected",
    [
        ([{"v": 1, "op": "cancel", "id": "r1"}], CancelOp(id="r1")),
        (
            [{"v": 1, "op": "speaker.add", "name": "alice"}, WAV],
            SpeakerAddOp(name="alice", audio=WAV),
        ),
        (
            [
                {
                    "v": 1,
                    "op": "speaker.add",
                    "id": "a",
                    "name": "alice",
                    "prompt_text": "hi",
                    "overwrite": True,
                },
                WAV,
            ],
            SpeakerAddOp(id="a", name="alice", prompt_text="hi", overwrite=True, audio=WAV),
        ),
        ([{"v": 1, "op": "speaker.list"}], SpeakerListOp(id="")),
        ([{"v": 1, "op": "speaker.list", "id": "x"}], SpeakerListOp(id="x")),
        ([{"v": 1, "op": "speaker.delete", "name": "alice"}], SpeakerDeleteOp(name="alice")),
        ([{"v": 1, "op": "health"}], HealthOp()),
        ([{"v": 1, "op": "stats", "id": "s"}], StatsOp(id="s")),
    ],
)
def test_other_ops(frames, expected):
    frames = [enc(f) if isinstance(f, dict) else f for f in frames]
    req = parse_request(frames, LIMIT)
    assert req == expected and type(req) is type(expected)
    assert req.op == json.loads(frames[0])["op"]


def test_every_op_has_a_struct():
    parsed = {
        "tts": [enc(tts())],
        "cancel": [enc({"v": 1, "op": "cancel", "id": "x"})],
        "speaker.add": [enc({"v": 1, "op": "speaker.add", "name": "n"}), WAV],
        "speaker.list": [enc({"v": 1, "op": "speaker.list"})],
        "speaker.delete": [enc({"v": 1, "op": "speaker.delete", "name": "n"})],
        "health": [enc({"v": 1, "op": "health"})],
        "stats": [enc({"v": 1, "op": "stats"})],
    }
    assert set(parsed) == set(OPS)
    for op, frames in parsed.items():
        assert parse_request(frames, LIMIT).op == op


# ---------------------------------------------------------------------------------------------
# malformed requests: each names its problem

BAD = [
    # (case id, frames, words the message must contain)
    ("no-frames", [], ["empty message"]),
    ("empty-header", [b""], ["not valid JSON"]),
    ("not-json", [b"{not json"], ["not valid JSON"]),
    ("truncated-json", [enc(tts())[:-3]], ["not valid JSON"]),
    ("not-utf8", [b'{"v":1,"op":"\xff\xfe"}'], ["not UTF-8"]),
    ("array-header", [b"[1, 2]"], ["JSON object", "array"]),
    ("string-header", [b'"tts"'], ["JSON object", "string"]),
    ("missing-v", [enc(without(tts(), "v"))], ["'v'", "missing"]),
    ("v-string", [enc(tts(v="1"))], ["'v'", "int"]),
    ("v-bool", [enc(tts(v=True))], ["'v'", "bool"]),
    ("v-2", [enc(tts(v=2))], ["'v'", "version"]),
    ("missing-op", [enc(without(tts(), "op"))], ["'op'", "missing"]),
    ("op-int", [enc(tts(op=3))], ["'op'", "string"]),
    ("unknown-op", [enc(tts(op="synth"))], ["'op'", "synth"]),
    ("tts-missing-id", [enc(without(tts(), "id"))], ["'id'", "missing"]),
    ("tts-missing-text", [enc(without(tts(), "text"))], ["'text'", "missing"]),
    ("tts-blank-text", [enc(tts(text="  \n"))], ["'text'", "empty"]),
    ("text-int", [enc(tts(text=5))], ["'text'", "int"]),
    ("id-int", [enc(tts(id=5))], ["'id'", "int"]),
    ("id-empty", [enc(tts(id=""))], ["'id'", "empty"]),
    ("id-long", [enc(tts(id="x" * 257))], ["'id'", "257"]),
    ("mode-unknown", [enc(tts(mode="robot"))], ["'mode'", "robot"]),
    ("mode-int", [enc(tts(mode=1))], ["'mode'"]),
    ("format-unknown", [enc(tts(format="mp3"))], ["'format'", "mp3"]),
    ("extra-field", [enc(tts(sped=1.0))], ["'sped'", "speed"]),
    ("audio-in-header", [enc(tts(audio="AAAA"))], ["'audio'"]),
    ("two-extra-fields", [enc(tts(foo=1, bar=2))], ["'foo'", "'bar'"]),
    ("stream-int", [enc(tts(stream=1))], ["'stream'", "bool"]),
    ("stream-true-from-req", [enc(tts(stream=True))], ["'stream'", "REQ"]),
    ("speed-bool", [enc(tts(speed=True))], ["'speed'", "bool"]),
    ("speed-string", [enc(tts(speed="fast"))], ["'speed'"]),
    ("speed-low", [enc(tts(speed=0.4))], ["'speed'", "0.4"]),
    ("speed-high", [enc(tts(speed=2.5))], ["'speed'", "2.5"]),
    ("speed-zero", [enc(tts(speed=0))], ["'speed'"]),
    ("speed-negative", [enc(tts(speed=-1.0))], ["'speed'"]),
    ("speed-inf", [enc(tts())[:-1] + b', "speed": 1e999}'], ["speed"]),
    ("seed-bool", [enc(tts(seed=True))], ["'seed'", "bool"]),
    ("seed-float", [enc(tts(seed=1.5))], ["'seed'", "float"]),
    ("seed-negative", [enc(tts(seed=-1))], ["'seed'"]),
    ("seed-2**63", [enc(tts(seed=2**63))], ["'seed'"]),
    ("no-voice", [enc(without(tts(), "speaker"))], ["voice", "'speaker'"]),
    ("no-voice-cross", [enc(without(tts(mode="cross_lingual"), "speaker"))], ["voice"]),
    ("zs-audio-no-prompt-text", [enc(without(zs_audio(), "prompt_text")), WAV], ["prompt_text"]),
    ("zs-audio-blank-prompt-text", [enc(zs_audio(prompt_text=" ")), WAV], ["prompt_text"]),
    ("zs-audio-null-prompt-text", [enc(zs_audio(prompt_text=None)), WAV], ["prompt_text"]),
    ("prompt-text-int", [enc(zs_audio(prompt_text=7)), WAV], ["'prompt_text'", "int"]),
    ("instruct-missing", [enc(tts(mode="instruct"))], ["'instruct'"]),
    ("instruct-blank", [enc(tts(mode="instruct", instruct=" "))], ["'instruct'"]),
    ("instruct-wrong-mode", [enc(tts(instruct="x"))], ["'instruct'", "zero_shot"]),
    ("speaker-and-audio", [enc(tts(prompt_text="x")), WAV], ["'speaker'", "audio"]),
    ("speaker-and-audio-cross", [enc(tts(mode="cross_lingual")), WAV], ["'speaker'", "audio"]),
    ("speaker-with-prompt-text", [enc(tts(prompt_text="x"))], ["'prompt_text'", "speaker"]),
    ("speaker-bad-name", [enc(tts(speaker="a/b"))], ["'speaker'", "separator"]),
    ("speaker-int", [enc(tts(speaker=3))], ["'speaker'", "int"]),
    ("tts-three-frames", [enc(zs_audio()), WAV, WAV], ["frame", "got 3"]),
    ("tts-empty-audio", [enc(zs_audio()), b""], ["frame 2", "empty"]),
    ("add-one-frame", [enc({"v": 1, "op": "speaker.add", "name": "a"})], ["2 frame", "got 1"]),
    ("add-no-name", [enc({"v": 1, "op": "speaker.add"}), WAV], ["'name'", "missing"]),
    ("add-bad-name", [enc({"v": 1, "op": "speaker.add", "name": " a"}), WAV], ["'name'"]),
    (
        "add-overwrite-str",
        [enc({"v": 1, "op": "speaker.add", "name": "a", "overwrite": "yes"}), WAV],
        ["'overwrite'", "bool"],
    ),
    (
        "add-prompt-text-null",
        [enc({"v": 1, "op": "speaker.add", "name": "a", "prompt_text": None}), WAV],
        ["'prompt_text'", "null"],
    ),
    ("list-two-frames", [enc({"v": 1, "op": "speaker.list"}), WAV], ["1 frame", "got 2"]),
    ("delete-no-name", [enc({"v": 1, "op": "speaker.delete"})], ["'name'", "missing"]),
    ("delete-name-int", [enc({"v": 1, "op": "speaker.delete", "name": 5})], ["'name'", "int"]),
    ("delete-extra", [enc({"v": 1, "op": "speaker.delete", "nmae": "a"})], ["'nmae'", "name"]),
    ("cancel-no-id", [enc({"v": 1, "op": "cancel"})], ["'id'", "missing"]),
    ("cancel-empty-id", [enc({"v": 1, "op": "cancel", "id": ""})], ["'id'", "empty"]),
    ("cancel-extra", [enc({"v": 1, "op": "cancel", "id": "x", "text": "t"})], ["'text'"]),
    ("health-id-int", [enc({"v": 1, "op": "health", "id": 1})], ["'id'", "int"]),
    ("stats-id-long", [enc({"v": 1, "op": "stats", "id": "s" * 300})], ["'id'", "300"]),
    ("stats-extra", [enc({"v": 1, "op": "stats", "verbose": True})], ["'verbose'"]),
    ("big-header", [b" " * (LIMIT + 1)], ["frame 1", "limit", "COSY_MAX_FRAME_MB"]),
    ("big-audio", [enc(zs_audio()), b"x" * (LIMIT + 1)], ["frame 2", "limit"]),
]


@pytest.mark.parametrize("frames, words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_malformed(frames, words):
    is_req = any("REQ" in w for w in words)
    with pytest.raises(ProtocolError) as info:
        parse_request(frames, LIMIT, is_req=is_req)
    err = info.value
    assert err.code == "bad_request"
    for word in words:
        assert word in err.message, f"{word!r} not in {err.message!r}"
    reply = json.loads(err.reply()[0])
    assert reply["final"] is True and reply["error"]["code"] == "bad_request"


def test_error_carries_id_and_op():
    with pytest.raises(ProtocolError) as info:
        parse_request([enc(tts(mode="robot"))], LIMIT)
    assert (info.value.id, info.value.op) == ("r1", "tts")
    with pytest.raises(ProtocolError) as info:
        parse_request([enc(zs_audio()), b"x" * (LIMIT + 1)], LIMIT)
    assert (info.value.id, info.value.op) == ("r1", "tts")
    with pytest.raises(ProtocolError) as info:
        parse_request([enc(tts(id="x" * 999, mode="robot"))], LIMIT)
    assert info.value.id == ""  # an id that is itself invalid is not echoed
    with pytest.raises(ProtocolError) as info:
        parse_request([b"nope"], LIMIT)
    assert (info.value.id, info.value.op) == ("", "")


# ---------------------------------------------------------------------------------------------
# fuzz: anything malformed is a ProtocolError, nothing else

VALID_HEADERS = [
    (tts(), []),
    (zs_audio(stream=False, format="wav", speed=1.5, seed=3), [WAV]),
    (tts(mode="instruct", instruct="Be calm.<|endofprompt|>"), []),
    ({"v": 1, "op": "cancel", "id": "r1"}, []),
    (
        {"v": 1, "op": "speaker.add", "id": "a", "name": "n", "prompt_text": "", "overwrite": True},
        [WAV],
    ),
    ({"v": 1, "op": "speaker.list", "id": "a"}, []),
    ({"v": 1, "op": "speaker.delete", "id": "a", "name": "n"}, []),
    ({"v": 1, "op": "health", "id": "h"}, []),
    ({"v": 1, "op": "stats", "id": "s"}, []),
]
ODD_VALUES = [
    None, True, False, 0, -1, 1, 1.5, -0.0, 2**70, -(2**70), "", " ", "x", "zero_shot", "wav",
    "a" * 300, "\u0000", [], [1, "a"], {}, {"a": {"b": []}}, 1e300,
]  # fmt: skip


def _fuzz_cases(rng: random.Random):
    small = 4096
    for _ in range(60):  # random bytes
        yield [rng.randbytes(rng.randrange(0, 200))]
    for _ in range(60):  # truncated JSON (and the audio frame sometimes)
        header, extra = rng.choice(VALID_HEADERS)
        raw = enc(header)
        yield [raw[: rng.randrange(0, len(raw))], *extra]
    for header, extra in VALID_HEADERS:  # every field swapped to every odd value
        for key in header:
            for value in rng.sample(ODD_VALUES, 6):
                yield [enc({**header, key: value}), *extra]
    for _ in range(40):  # extra fields
        header, extra = rng.choice(VALID_HEADERS)
        name = rng.choice(["txt", "Text", "speeed", "audio", "x" * 200, "", "v2", "final"])
        yield [enc({**header, name: rng.choice(ODD_VALUES)}), *extra]
    for _ in range(20):  # wrong frame counts
        header, _ = rng.choice(VALID_HEADERS)
        yield [enc(header)] + [WAV] * rng.choice([1, 2, 3, 5])
    for _ in range(10):  # huge frames
        header, extra = rng.choice(VALID_HEADERS)
        yield [enc(header), b"\0" * (small + 1)]
        yield [enc(header) + b" " * small]
    for depth in (10, 1000, 100_000):  # deep nesting
        yield [b"[" * depth]
        yield [b'{"v":1,"op":"tts","id":"a","text":' + b"[" * depth + b"]" * depth + b"}"]
    for _ in range(20):  # structurally valid JSON, random top-level shapes
        yield [enc(rng.choice(ODD_VALUES))]


def test_fuzz_only_protocol_errors():
    rng = random.Random(20261127)
    cases = list(_fuzz_cases(rng))
    assert len(cases) >= 300
    errors = 0
    for frames in cases:
        try:
            req = parse_request(frames, 4096, is_req=rng.random() < 0.2)
        except ProtocolError as e:
            errors += 1
            assert e.code == "bad_request" and e.message
            header = json.loads(e.reply()[0])  # the reply always encodes
            assert header["error"]["code"] == "bad_request"
        else:  # a swap can land on a valid value (e.g. seed 0): then it is a typed request
            assert isinstance(req, msgspec.Struct)
    assert errors >= 300


# ---------------------------------------------------------------------------------------------
# envelopes


def test_split_envelope_req():
    env, body, is_req = split_envelope([b"\x00peer", b"", b"header", b"audio"])
    assert env == [b"\x00peer", b""] and body == [b"header", b"audio"] and is_req


def test_split_envelope_dealer():
    env, body, is_req = split_envelope([b"\x00peer", b"header", b"audio"])
    assert env == [b"\x00peer"] and body == [b"header", b"audio"] and not is_req
    env, body, is_req = split_envelope([b"\x00peer", b"header"])
    assert env == [b"\x00peer"] and body == [b"header"] and not is_req


def test_split_envelope_req_without_body_and_nothing():
    env, body, is_req = split_envelope([b"p", b""])
    assert env == [b"p", b""] and body == [] and is_req
    with pytest.raises(ProtocolError, match="empty message"):
        parse_request(body, LIMIT)
    with pytest.raises(ValueError):
        split_envelope([])


# ---------------------------------------------------------------------------------------------
# replies and audio encoding


def _audio(n: int = 1000, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-1.2, 1.2, n).astype(np.float32)
    x[:4] = [1.0, -1.0, 0.0, 0.5]
    return x


def test_pcm_s16le_round_trip():
    x = _audio()
    header_b, payload = audio_reply("r", 3, False, "pcm_s16le", x)
    header = json.loads(header_b)
    assert header == {
        "v": 1,
        "id": "r",
        "op": "tts",
        "seq": 3,
        "final": False,
        "sample_rate": 24000,
        "format": "pcm_s16le",
        "samples": 1000,
    }
    assert b" " not in header_b  # compact JSON
    assert len(payload) == 2000
    assert np.frombuffer(payload, "<i2")[:4].tolist() == [32767, -32767, 0, 16384]
    y = decode_audio(header, payload)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.max(np.abs(y - np.clip(x, -1, 1))) <= 1 / 32767


def test_f32le_exact():
    x = _audio(777)
    x[5] = 3.0  # not clipped
    header_b, payload = audio_reply("r", 0, True, "f32le", x)
    header = json.loads(header_b)
    assert header["samples"] == 777 and len(payload) == 4 * 777
    y = decode_audio(header, payload)
    assert y.dtype == np.float32 and np.array_equal(y, x)


def test_wav_one_reply_is_a_complete_file():
    x = _audio(2400)
    header_b, payload = audio_reply("r", 0, True, "wav", x)
    header = json.loads(header_b)
    assert header["samples"] == 2400 and header["format"] == "wav"
    data, rate = sf.read(io.BytesIO(payload), dtype="float32")
    assert rate == 24000 and data.shape == (2400,)
    assert np.max(np.abs(data - np.clip(x, -1, 1))) <= 2 / 32767
    info = sf.info(io.BytesIO(payload))
    assert info.subtype == "PCM_16" and info.channels == 1
    y = decode_audio(header, payload)
    assert y.shape == (2400,) and np.max(np.abs(y - np.clip(x, -1, 1))) <= 1 / 32767


def test_wav_stream_header_then_pcm():
    x0, x1 = _audio(100, 1), _audio(50, 2)
    h0, p0 = audio_reply("r", 0, False, "wav", x0)
    h1, p1 = audio_reply("r", 1, True, "wav", x1)
    expected = (
        b"RIFF"
        + b"\xff\xff\xff\xff"
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16)
        + b"data"
        + b"\xff\xff\xff\xff"
    )
    assert p0[:44] == expected and len(p0) == 44 + 200
    _, pcm0 = audio_reply("r", 0, False, "pcm_s16le", x0)
    _, pcm1 = audio_reply("r", 1, True, "pcm_s16le", x1)
    assert p0[44:] == pcm0 and p1 == pcm1  # later chunks: pcm only
    assert json.loads(h0)["samples"] == 100 and json.loads(h1)["samples"] == 50
    assert decode_audio(json.loads(h0), p0).shape == (100,)
    assert decode_audio(json.loads(h1), p1).shape == (50,)


def test_wav_first_flag_overrides_seq():
    _, p = audio_reply("r", 5, False, "wav", _audio(10), first=True)
    assert p[:4] == b"RIFF"
    _, p = audio_reply("r", 0, False, "wav", _audio(10), first=False)
    assert len(p) == 20


def test_empty_audio_reply():
    header_b, payload = audio_reply("r", 0, True, "wav", np.zeros(0, np.float32))
    assert json.loads(header_b)["samples"] == 0
    data, rate = sf.read(io.BytesIO(payload))
    assert rate == 24000 and data.shape == (0,)


def test_decode_audio_refuses_mismatch():
    header_b, payload = audio_reply("r", 0, True, "f32le", _audio(10))
    header = json.loads(header_b)
    with pytest.raises(ValueError, match="samples"):
        decode_audio({**header, "samples": 11}, payload)
    with pytest.raises(ValueError, match="multiple of 4"):
        decode_audio(header, payload[:-1])
    with pytest.raises(ValueError, match="format"):
        decode_audio({**header, "format": "mp3"}, payload)


def test_audio_reply_refuses_bad_input():
    with pytest.raises(ValueError, match="mono"):
        audio_reply("r", 0, True, "f32le", np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="format"):
        audio_reply("r", 0, True, "mp3", np.zeros(10, np.float32))


@pytest.mark.parametrize("code", ERROR_CODES)
def test_error_reply(code):
    frames = error_reply("r9", code, "what happened", op="speaker.add")
    assert len(frames) == 1
    assert json.loads(frames[0]) == {
        "v": 1,
        "id": "r9",
        "op": "speaker.add",
        "final": True,
        "error": {"code": code, "message": "what happened"},
    }
    assert json.loads(error_reply("r9", code, "m")[0])["op"] == "tts"


def test_error_reply_refuses_unknown_code():
    with pytest.raises(ValueError):
        error_reply("r", "oops", "m")


def test_info_reply():
    frames = info_reply("x", "cancel", cancelled=True)
    assert json.loads(frames[0]) == {"v": 1, "id": "x", "op": "cancel", "final": True,
                                     "cancelled": True}  # fmt: skip
    health = json.loads(info_reply("", "health", ok=False, stages={"llm": {"ok": False}})[0])
    assert health["final"] is True and health["stages"] == {"llm": {"ok": False}}
    with pytest.raises(ValueError, match="final"):
        info_reply("x", "stats", final=False)
    stats = json.loads(info_reply("s", "stats", active=np.int64(2), rtf=np.float32(0.5))[0])
    assert stats["active"] == 2 and stats["rtf"] == 0.5
