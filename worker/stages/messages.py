"""Typed messages between the stage cores, and their wire form.

A request moves through the pipeline as messages carrying its id (``rid``)::

    server ──Start──▶ LLM ──Start, Tokens…──▶ Flow ──Start, Mel…──▶ HiFT ──Audio…──▶ server
    Abort (cancel, timeout) and Failed (a stage could not do a request's work) travel the
    same path, in order: every stage frees that request's state and passes the message on.
    Credit (tokens covered by audio so far) goes from the driver back to the LLM.

Messages hold tensors and scalars only. On a socket a message is a multipart ZeroMQ message:
frame 0 is a small msgpack header (kind, rid, scalar fields, and dtype + shape of each
tensor), frames 1.. are the tensors' raw bytes, sent without a copy (``copy=False``) and
viewed in place on receipt. Nothing is pickled; :func:`decode` checks the header's types,
dtypes and byte counts and raises :class:`MessageError` on anything else.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Union

import msgspec
import numpy as np
import torch
from torch import Tensor

from worker.request import TTSRequest

# zero-copy receive: tensors are views of read-only ZeroMQ frames; cores never write into them
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass
class Start:
    """A new request: what every stage needs (the LLM reads the text and prompt, the flow the
    prompt tokens, mel and speaker embedding)."""

    rid: str
    req: TTSRequest


@dataclass
class Tokens:
    """New speech tokens of a request (after the silence filter); ``final``: no more come."""

    rid: str
    tokens: Tensor  # (n,) int64
    final: bool


@dataclass
class Mel:
    """The mel frames of one flow chunk; ``tokens``: speech tokens (after the prompt) it covers."""

    rid: str
    mel: Tensor  # (1, 80, F) float32
    tokens: int
    final: bool


@dataclass
class Audio:
    """One chunk of a request's audio (24 kHz float32), in order; ``final`` ends the request."""

    rid: str
    seq: int
    audio: Tensor  # (S,) float32
    tokens: int
    final: bool


@dataclass
class Credit:
    """Flow control, back to the LLM: ``tokens`` of a request's speech tokens are covered by
    audio that came out. The LLM decodes a request only a bounded number of tokens ahead of
    that, so on shared cores it does not compete with the chunk the listener waits for."""

    rid: str
    tokens: int


@dataclass
class Abort:
    """Stop a request (``code``: cancelled, timeout, internal): stages free its state."""

    rid: str
    code: str
    message: str = ""


@dataclass
class Failed:
    """A stage could not do a request's work; later stages free its state and pass it on."""

    rid: str
    code: str  # bad_request | internal
    message: str


Message = Union[Start, Tokens, Mel, Audio, Credit, Abort, Failed]  # noqa: UP007 (runtime use)
KINDS: dict[str, type] = {
    "start": Start, "tokens": Tokens, "mel": Mel, "audio": Audio, "credit": Credit,
    "abort": Abort, "failed": Failed,
}  # fmt: skip
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}
_REQ_FIELDS = {f.name: f for f in dataclasses.fields(TTSRequest)}
DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
_NP = {"float32": np.float32, "int64": np.int64, "int32": np.int32}
MAX_TENSORS = 16


class MessageError(ValueError):
    """Bytes that are not a valid stage message."""


class TensorSpec(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: list[int]


Scalar = Union[int, float, str, bool, None]  # noqa: UP007


class Header(msgspec.Struct):
    kind: str
    rid: str
    fields: dict[str, Scalar] = {}
    tensors: list[TensorSpec] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


def _flat(msg: Message) -> dict[str, object]:
    """name -> value for every field but rid; a Start's request fields are inlined."""
    if isinstance(msg, Start):
        return {f"req.{f}": getattr(msg.req, f) for f in _REQ_FIELDS}
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "rid"}


def encode(msg: Message) -> list:
    """Message -> frames: [msgpack header, tensor buffers...] (buffers are not copied)."""
    kind = _KIND_OF.get(type(msg))
    if kind is None:
        raise TypeError(f"not a stage message: {type(msg).__name__}")
    fields: dict[str, Scalar] = {}
    specs, buffers = [], []
    for name, value in _flat(msg).items():
        if isinstance(value, Tensor):
            t = value.detach().contiguous()
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                raise TypeError(f"{kind}.{name}: dtype {t.dtype} cannot be sent")
            specs.append(TensorSpec(name, dtype, list(t.shape)))
            buffers.append(memoryview(t.numpy()).cast("B") if t.numel() else b"")
        else:
            fields[name] = value
    return [_encoder.encode(Header(kind, msg.rid, fields, specs)), *buffers]


def _tensor(spec: TensorSpec, buf) -> Tensor:
    if spec.dtype not in DTYPES:
        raise MessageError(f"tensor {spec.name!r}: unknown dtype {spec.dtype!r}")
    if len(spec.shape) > 4 or any(d < 0 for d in spec.shape):
        raise MessageError(f"tensor {spec.name!r}: bad shape {spec.shape}")
    n = math.prod(spec.shape)
    view = memoryview(buf)
    if view.nbytes != n * np.dtype(_NP[spec.dtype]).itemsize:
        raise MessageError(
            f"tensor {spec.name!r}: {view.nbytes} bytes for {spec.dtype} {spec.shape}"
        )
    if n == 0:
        return torch.empty(spec.shape, dtype=DTYPES[spec.dtype])
    arr = np.frombuffer(view, dtype=_NP[spec.dtype]).reshape(spec.shape)
    return torch.from_numpy(arr)


def receive_all(sock, log, limit: int = 100_000):
    """Every message waiting on ZeroMQ socket ``sock`` (without blocking), decoded; malformed
    ones are logged and dropped. The socket I/O edge of the stage processes and the server."""
    import zmq

    for _ in range(limit):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        try:
            yield decode(frames)
        except MessageError as e:
            log.error("dropped a malformed stage message: %s", e)


def send(sock, msg: Message, flags: int = 0) -> None:
    """Send ``msg`` on ZeroMQ socket ``sock`` (tensor buffers without copies)."""
    sock.send_multipart(encode(msg), flags, copy=False)


def decode(frames: list) -> Message:
    """Frames (bytes, or zmq Frames / buffers) -> the message. Raises :class:`MessageError`."""
    if not frames:
        raise MessageError("empty message")
    head = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
    try:
        h = _decoder.decode(head)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise MessageError(f"bad header: {e}") from None
    cls = KINDS.get(h.kind)
    if cls is None:
        raise MessageError(f"unknown message kind {h.kind!r}")
    if len(h.tensors) > MAX_TENSORS or len(frames) != 1 + len(h.tensors):
        raise MessageError(f"{h.kind}: {len(frames) - 1} buffers for {len(h.tensors)} tensors")
    values: dict[str, object] = dict(h.fields)
    for spec, frame in zip(h.tensors, frames[1:], strict=True):
        values[spec.name] = _tensor(spec, frame.buffer if hasattr(frame, "buffer") else frame)
    try:
        if cls is Start:
            req = {k[4:]: v for k, v in values.items() if k.startswith("req.")}
            unknown = set(req) - set(_REQ_FIELDS)
            if unknown or len(req) != len(values):
                raise MessageError(f"start: unknown fields {sorted(unknown)}")
            return Start(h.rid, TTSRequest(**req))
        return cls(h.rid, **values)
    except TypeError as e:
        raise MessageError(f"{h.kind}: {e}") from None
