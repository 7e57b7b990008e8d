"""Protocol v1 of the worker's ZeroMQ service: message parsing, validation and reply encoding.

This module owns the wire format (``docs/protocol.md`` is its prose version) as pure functions:
no sockets, no model, no ``COSY_*`` reads (limits are parameters). The server uses
:func:`split_envelope` + :func:`parse_request` on every ROUTER message and the ``*_reply``
builders for every answer; the client (:mod:`worker.client`) uses the same request structs to
check a request before sending it, and :func:`decode_audio` to read replies.

Requests: frame 1 is a compact UTF-8 JSON header, an optional frame 2 a complete audio file
(the voice prompt). :func:`parse_request` turns the frames into one of the typed, frozen
request structs (:class:`TTSOp`, :class:`CancelOp`, :class:`SpeakerAddOp`,
:class:`SpeakerListOp`, :class:`SpeakerDeleteOp`, :class:`HealthOp`, :class:`StatsOp`) or
raises :class:`ProtocolError` naming the problem; unknown fields are refused (a typo must not
pass silently). JSON is only ever decoded as JSON; nothing is unpickled.

Replies: a header frame (``v``, ``id``, ``op``, ``final`` + per-op fields) and, for audio, a
second frame with the samples in the requested format:

* ``pcm_s16le``: ``round(clip(x, -1, 1) * 32767)`` as little-endian int16;
  :func:`decode_audio` divides by 32767 (round trip within 0.5/32767).
* ``f32le``: the float32 samples, little-endian, bit-exact.
* ``wav``: a reply that is both the first and the final one (every ``stream: false`` answer)
  is a complete standard 44-byte-header WAV file (16-bit PCM mono). In a stream, the first
  chunk starts with the same 44-byte header whose RIFF and data sizes are ``0xFFFFFFFF``
  ("length unknown", streaming WAV) followed by pcm_s16le data; later chunks are pcm_s16le
  only, so the concatenated payloads form one streaming WAV file.
"""

from __future__ import annotations

import difflib
import math
import struct
from typing import Any, ClassVar

import msgspec
import numpy as np

from cache.store import InvalidSpeakerName, validate_speaker_name

PROTOCOL_VERSION = 1
SAMPLE_RATE = 24000
ERROR_CODES = ("bad_request", "not_found", "overloaded", "timeout", "cancelled", "internal")
FORMATS = ("pcm_s16le", "f32le", "wav")
MODES = ("zero_shot", "cross_lingual", "instruct")
OPS = ("tts", "cancel", "speaker.add", "speaker.list", "speaker.delete", "health", "stats")
MAX_ID_LEN = 256
SPEED_MIN = 0.5  # inclusive
SPEED_MAX = 2.0  # inclusive
SEED_MAX = 2**63 - 1
MAX_FORCED_TOKENS = 7500  # 300 s of speech tokens (the fixed noise's limit)
PCM_SCALE = 32767.0
WAV_HEADER_BYTES = 44
STREAM_WAV_SIZE = 0xFFFFFFFF
_ENVELOPE_FIELDS = ("v", "op")  # read by the dispatcher, not part of the op structs
_RESERVED_REPLY_FIELDS = frozenset({"v", "id", "op", "final", "error"})
_SHOW = 64  # longest user-supplied name/value echoed into an error message


class ProtocolError(Exception):
    """A request that cannot be accepted: ``code`` (one of :data:`ERROR_CODES`, usually
    ``bad_request``), ``message`` naming the problem, and the request's ``id`` / ``op`` as far
    as they could be read (``""`` when not), so the error reply can carry them."""

    def __init__(self, code: str, message: str, id: str = "", op: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.op = op

    def reply(self) -> list[bytes]:
        """The error reply for this problem (header frame only)."""
        return error_reply(self.id, self.code, self.message, op=self.op)

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, id={self.id!r}, op={self.op!r})"


# ---------------------------------------------------------------------------------------------
# Request structs. Header fields are the struct fields except ``audio`` (which comes from the
# audio frame); ``v`` and ``op`` are checked by the dispatcher.


class _Op(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    OP: ClassVar[str] = ""
    FRAMES: ClassVar[tuple[int, ...]] = (1,)  # allowed frame counts (header + audio)

    @property
    def op(self) -> str:
        return self.OP

    def __repr__(self) -> str:  # the audio frame as its size: requests get logged
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "audio" and value is not None:
                parts.append(f"audio=<{len(value)} bytes>")
            else:
                parts.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class TTSOp(_Op, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Synthesize ``text``; ``audio`` is the prompt audio file (frame 2), if one was sent."""

    OP: ClassVar[str] = "tts"
    FRAMES: ClassVar[tuple[int, ...]] = (1, 2)
    id: str
    text: str
    mode: str = "zero_shot"
    prompt_text: str | None = None
    instruct: str | None = None
    speaker: str | None = None
    stream: bool = True
    format: str = "pcm_s16le"
    speed: float = 1.0
    seed: int | None = None
    forced_tokens: int | None = None  # benchmarks: decode exactly this many speech tokens
    audio: bytes | None = None


class CancelOp(_Op, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Cancel the tts request ``id``."""

    OP: ClassVar[str] = "cancel"
    id: str


class SpeakerAddOp(_Op, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Save the voice in ``audio`` (frame 2) under ``name``."""

    OP: ClassVar[str] = "speaker.add"
    FRAMES: ClassVar[tuple[int, ...]] = (2,)
    id: str = ""
    name: str
    prompt_text: str = ""
    overwrite: bool = False
    audio: bytes


class SpeakerListOp(_Op, frozen=True, kw_only=True, forbid_unknown_fields=True):
    OP: ClassVar[str] = "speaker.list"
    id: str = ""


class SpeakerDeleteOp(_Op, frozen=True, kw_only=True, forbid_unknown_fields=True):
    OP: ClassVar[str] = "speaker.delete"
    id: str = ""
    name: str


class HealthOp(_Op, frozen=True, kw_only=True, forbid_unknown_fields=True):
    OP: ClassVar[str] = "health"
    id: str = ""


class StatsOp(_Op, frozen=True, kw_only=True, forbid_unknown_fields=True):
    OP: ClassVar[str] = "stats"
    id: str = ""


Request = TTSOp | CancelOp | SpeakerAddOp | SpeakerListOp | SpeakerDeleteOp | HealthOp | StatsOp
OP_TYPES: dict[str, type[_Op]] = {
    cls.OP: cls
    for cls in (TTSOp, CancelOp, SpeakerAddOp, SpeakerListOp, SpeakerDeleteOp, HealthOp, StatsOp)
}


def _header_fields(cls: type[_Op]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all header fields, required header fields) of an op struct."""
    names, required = [], []
    for f in msgspec.structs.fields(cls):
        if f.name == "audio":
            continue
        names.append(f.name)
        if f.required:
            required.append(f.name)
    return tuple(names), tuple(required)


_FIELDS = {op: _header_fields(cls) for op, cls in OP_TYPES.items()}


# ---------------------------------------------------------------------------------------------
# Parsing


def _show(value: Any) -> str:
    """A short repr of a user-supplied value for an error message."""
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "bool",
        int: "int",
        float: "float",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes], bool]:
    """Split a ROUTER message into ``(envelope, body, is_req)``.

    Frame 0 is the peer identity. A REQ peer's message then has an empty delimiter frame; the
    envelope (identity, plus the delimiter for REQ) must be prepended to every reply. A DEALER
    peer must therefore not start its message with an empty frame (a header is never empty).
    """
    if not frames:
        raise ValueError("a ROUTER message has at least the peer identity frame")
    if len(frames) >= 2 and len(frames[1]) == 0:
        return [frames[0], b""], list(frames[2:]), True
    return [frames[0]], list(frames[1:]), False


def parse_request(frames: list[bytes], max_frame_bytes: int, *, is_req: bool = False) -> Request:
    """Parse the body of one request (frames after the envelope) into its typed op.

    ``max_frame_bytes`` bounds every frame (``COSY_MAX_FRAME_MB`` in bytes). ``is_req``: the
    peer is a REQ socket, which can take exactly one reply, so a tts request without
    ``stream`` is read as ``stream: false`` and an explicit ``stream: true`` is refused.
    Raises :class:`ProtocolError` (``bad_request``) naming the problem; nothing else.
    """
    if not frames:
        raise ProtocolError("bad_request", "empty message: expected a JSON header frame")

    def too_big(i: int) -> str:
        return (
            f"frame {i + 1} is {len(frames[i])} bytes, larger than the limit of "
            f"{max_frame_bytes} bytes (COSY_MAX_FRAME_MB)"
        )

    if len(frames[0]) > max_frame_bytes:
        raise ProtocolError("bad_request", too_big(0))
    header = _decode_header(frames[0])
    rid = header.get("id")
    rid = rid if isinstance(rid, str) and len(rid) <= MAX_ID_LEN else ""
    op = header.get("op")
    op_ctx = op if isinstance(op, str) and len(op) <= _SHOW else ""

    def fail(message: str) -> ProtocolError:
        return ProtocolError("bad_request", message, rid, op_ctx)

    for i in range(1, len(frames)):
        if len(frames[i]) > max_frame_bytes:
            raise fail(too_big(i))

    # version and op
    if "v" not in header:
        raise fail(f"missing required field 'v' (protocol version, {PROTOCOL_VERSION})")
    v = header["v"]
    if type(v) is not int:
        raise fail(f"field 'v': expected int, got {_type_name(v)}")
    if v != PROTOCOL_VERSION:
        raise fail(f"field 'v': unknown protocol version {_show(v)}, expected {PROTOCOL_VERSION}")
    if "op" not in header:
        raise fail(f"missing required field 'op' (one of {', '.join(OPS)})")
    if not isinstance(op, str):
        raise fail(f"field 'op': expected string, got {_type_name(op)}")
    cls = OP_TYPES.get(op)
    if cls is None:
        raise fail(f"field 'op': unknown op {_show(op)}, expected one of {', '.join(OPS)}")

    # fields: unknown, missing, then types
    names, required = _FIELDS[op]
    unknown = [k for k in header if k not in names and k not in _ENVELOPE_FIELDS]
    if unknown:
        parts = []
        for k in unknown[:5]:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parts.append(f"{_show(k)}{hint}")
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        noun = "field" if len(unknown) == 1 else "fields"
        raise fail(
            f"unknown {noun} {', '.join(parts)}{more} for op {op!r}; allowed: {', '.join(names)}"
        )
    missing = [k for k in required if k not in header]
    if missing:
        noun = "field" if len(missing) == 1 else "fields"
        raise fail(f"missing required {noun} {', '.join(repr(k) for k in missing)} for op {op!r}")
    if len(frames) not in cls.FRAMES:
        want = " or ".join(str(n) for n in cls.FRAMES)
        what = {
            "tts": "the JSON header, optionally followed by one prompt audio frame",
            "speaker.add": "the JSON header and one audio frame",
        }.get(op, "the JSON header only")
        raise fail(f"op {op!r} takes {want} frame(s) ({what}), got {len(frames)}")
    values = {k: val for k, val in header.items() if k not in _ENVELOPE_FIELDS}
    if len(frames) == 2:
        if len(frames[1]) == 0:
            raise fail("frame 2 (the audio file) is empty")
        values["audio"] = bytes(frames[1])
    try:
        req = msgspec.convert(values, type=cls, strict=True)
    except msgspec.ValidationError as e:
        raise fail(_explain(str(e))) from None
    return _check(req, header, fail, is_req)


# float_hook: an out-of-range literal (1e999) becomes inf, refused by the field's own check
_DECODER = msgspec.json.Decoder(float_hook=float)


def _decode_header(frame: bytes) -> dict[str, Any]:
    try:
        str(frame, "utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(
            "bad_request", f"header frame is not UTF-8 (byte {e.start}): expected a JSON object"
        ) from None
    try:
        header = _DECODER.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError("bad_request", f"header frame is not valid JSON: {e}") from None
    except RecursionError:
        raise ProtocolError(
            "bad_request", "header frame is not valid JSON: nested too deeply"
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError(
            "bad_request", f"header must be a JSON object, got {_type_name(header)}"
        )
    return header


def _explain(msgspec_message: str) -> str:
    """msgspec's ``Expected `int`, got `bool` - at `$.seed``` -> ``field 'seed': expected int,
    got bool``."""
    text, _, where = msgspec_message.partition(" - at `$.")
    if where:
        field = where.rstrip("`").split(".")[0].split("[")[0]
        text = text.replace("Expected", "expected", 1).replace("`", "")
        return f"field {field!r}: {text}"
    return msgspec_message


def _check_id(value: str, name: str, fail, *, required: bool) -> None:
    if len(value) > MAX_ID_LEN:
        raise fail(f"field {name!r} is {len(value)} characters long, at most {MAX_ID_LEN}")
    if required and not value:
        raise fail(f"field {name!r} must not be empty")


def _check_name(value: str, name: str, fail) -> None:
    try:
        validate_speaker_name(value)
    except InvalidSpeakerName as e:
        raise fail(f"field {name!r}: {e}") from None


def _check(req: Request, header: dict[str, Any], fail, is_req: bool) -> Request:
    """Semantic checks after the types are right."""
    if isinstance(req, TTSOp):
        _check_id(req.id, "id", fail, required=True)
        if not req.text.strip():
            raise fail("field 'text' is empty (nothing to speak)")
        if req.mode not in MODES:
            raise fail(
                f"field 'mode': unknown mode {_show(req.mode)}, expected one of {', '.join(MODES)}"
            )
        if req.format not in FORMATS:
            raise fail(
                f"field 'format': unknown format {_show(req.format)}, expected one of "
                f"{', '.join(FORMATS)}"
            )
        if not math.isfinite(req.speed) or not SPEED_MIN <= req.speed <= SPEED_MAX:
            raise fail(f"field 'speed': {_show(req.speed)} is outside {SPEED_MIN}..{SPEED_MAX}")
        if req.seed is not None and not 0 <= req.seed <= SEED_MAX:
            raise fail(f"field 'seed': {_show(req.seed)} is outside 0..2**63-1")
        if req.forced_tokens is not None and not 1 <= req.forced_tokens <= MAX_FORCED_TOKENS:
            raise fail(
                f"field 'forced_tokens': {_show(req.forced_tokens)} is outside "
                f"1..{MAX_FORCED_TOKENS}"
            )
        if req.speaker is not None:
            _check_name(req.speaker, "speaker", fail)
            if req.audio is not None:
                raise fail("both field 'speaker' and a prompt audio frame given: send one voice")
            if req.prompt_text is not None:
                raise fail(
                    "field 'prompt_text' goes with a prompt audio frame; a saved "
                    "'speaker' brings its own prompt text"
                )
        elif req.audio is None:
            raise fail(
                f"mode {req.mode!r} needs a voice: field 'speaker' or a prompt audio "
                "frame (frame 2)"
            )
        if req.mode == "zero_shot" and req.audio is not None:
            if req.prompt_text is None or not req.prompt_text.strip():
                raise fail(
                    "zero_shot with a prompt audio frame needs field 'prompt_text' "
                    "(the transcript of the prompt audio)"
                )
        if req.mode == "instruct":
            if req.instruct is None or not req.instruct.strip():
                raise fail("mode 'instruct' needs field 'instruct' (the instruction)")
        elif req.instruct is not None:
            raise fail(f"field 'instruct' is only used in mode 'instruct', not {req.mode!r}")
        if is_req:
            if "stream" not in header:
                req = msgspec.structs.replace(req, stream=False)
            elif req.stream:
                raise fail(
                    "field 'stream': a REQ socket takes exactly one reply; send "
                    "stream:false (or use a DEALER socket to stream)"
                )
        return req
    if isinstance(req, CancelOp):
        _check_id(req.id, "id", fail, required=True)
        return req
    _check_id(req.id, "id", fail, required=False)
    if isinstance(req, (SpeakerAddOp, SpeakerDeleteOp)):
        _check_name(req.name, "name", fail)
    return req


# ---------------------------------------------------------------------------------------------
# Replies


class ErrorInfo(msgspec.Struct, frozen=True):
    code: str
    message: str


class ErrorHeader(msgspec.Struct, frozen=True):
    v: int
    id: str
    op: str
    final: bool
    error: ErrorInfo


class AudioHeader(msgspec.Struct, frozen=True):
    v: int
    id: str
    op: str
    seq: int
    final: bool
    sample_rate: int
    format: str
    samples: int


def _enc_hook(obj: Any) -> Any:
    """numpy scalars / arrays in info fields (stats) encode as plain JSON numbers / lists."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__} in a reply header")


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)


def error_reply(id: str, code: str, message: str, op: str = "tts") -> list[bytes]:
    """The error reply (header frame only); always ``final: true``."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}, expected one of {', '.join(ERROR_CODES)}")
    header = ErrorHeader(PROTOCOL_VERSION, id, op, True, ErrorInfo(code, message))
    return [_ENCODER.encode(header)]


def info_reply(id: str, op: str, **fields: Any) -> list[bytes]:
    """A one-message reply to a non-tts op: ``{"v", "id", "op", "final": true, **fields}``.
    ``fields`` must be JSON-encodable (str, numbers, bools, None, lists, dicts, structs)."""
    clash = _RESERVED_REPLY_FIELDS.intersection(fields)
    if clash:
        raise ValueError(f"info_reply: field(s) {sorted(clash)} are set by the protocol")
    header = {"v": PROTOCOL_VERSION, "id": id, "op": op, "final": True, **fields}
    return [_ENCODER.encode(header)]


def audio_reply(
    id: str,
    seq: int,
    final: bool,
    fmt: str,
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    first: bool | None = None,
) -> list[bytes]:
    """``[header, payload]`` for one tts reply. ``audio``: mono float32 samples of this reply;
    ``samples`` in the header counts them. ``first`` (default: ``seq == 0``) decides whether a
    ``wav`` payload starts with a WAV header: complete if ``first and final`` (one-reply
    answer), streaming (sizes ``0xFFFFFFFF``) if only ``first``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}, expected one of {', '.join(FORMATS)}")
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"audio must be mono (1-D), got shape {x.shape}")
    if first is None:
        first = seq == 0
    if fmt == "f32le":
        payload = x.astype("<f4", copy=False).tobytes()
    else:
        payload = encode_pcm_s16le(x)
        if fmt == "wav" and first:
            size = len(payload) if final else None
            payload = wav_header(sample_rate, size) + payload
    header = AudioHeader(PROTOCOL_VERSION, id, "tts", seq, final, sample_rate, fmt, x.shape[0])
    return [_ENCODER.encode(header), payload]


def encode_pcm_s16le(audio: np.ndarray) -> bytes:
    """``round(clip(x, -1, 1) * 32767)`` as little-endian int16 (NaN -> 0)."""
    x = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0)
    return np.rint(np.clip(x, -1.0, 1.0) * PCM_SCALE).astype("<i2").tobytes()


def wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """The 44-byte header of a 16-bit PCM mono WAV file holding ``data_bytes`` of samples;
    ``None``: a streaming WAV (RIFF and data sizes ``0xFFFFFFFF``)."""
    if data_bytes is None:
        riff = data = STREAM_WAV_SIZE
    else:
        if data_bytes > STREAM_WAV_SIZE - 36 - 1:
            raise ValueError(f"{data_bytes} bytes of audio do not fit a WAV file")
        riff, data = 36 + data_bytes, data_bytes
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", riff, b"WAVE",
        b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16,
        b"data", data,
    )  # fmt: skip


def decode_audio(header: dict[str, Any], payload: bytes) -> np.ndarray:
    """A reply's payload as mono float32 samples (for clients). ``wav``: a payload that starts
    a stream or is a complete file (``seq`` 0 starting with ``RIFF``) has its header skipped.
    Raises ``ValueError`` if the payload does not match ``format`` / ``samples``."""
    fmt = header.get("format")
    data = memoryview(payload)
    if fmt == "f32le":
        if len(data) % 4:
            raise ValueError(f"f32le payload of {len(data)} bytes is not a multiple of 4")
        out = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif fmt in ("pcm_s16le", "wav"):
        if fmt == "wav" and header.get("seq", 0) == 0 and bytes(data[:4]) == b"RIFF":
            data = _wav_data(data)
        if len(data) % 2:
            raise ValueError(f"{fmt} payload of {len(data)} bytes is not a multiple of 2")
        out = np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(PCM_SCALE)
    else:
        raise ValueError(f"unknown audio format {fmt!r}, expected one of {', '.join(FORMATS)}")
    samples = header.get("samples")
    if samples is not None and samples != out.shape[0]:
        raise ValueError(f"header says {samples} samples, payload holds {out.shape[0]}")
    return out


def _wav_data(data: memoryview) -> memoryview:
    """The sample bytes of a 16-bit PCM mono WAV (complete or streaming)."""
    if len(data) < 12 or bytes(data[8:12]) != b"WAVE":
        raise ValueError("wav payload starts with RIFF but is not a WAVE file")
    pos = 12
    while pos + 8 <= len(data):
        tag = bytes(data[pos : pos + 4])
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if tag == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise ValueError("wav payload has a short fmt chunk")
            tag_fmt, channels, _, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag_fmt != 1 or channels != 1 or bits != 16:
                raise ValueError(
                    f"wav payload is not 16-bit PCM mono (format {tag_fmt}, "
                    f"{channels} channels, {bits} bits)"
                )
        elif tag == b"data":
            end = len(data) if size == STREAM_WAV_SIZE else min(len(data), body + size)
            return data[body:end]
        pos = body + size + (size & 1)
    raise ValueError("wav payload has no data chunk")
