"""Client library and CLI for the worker's ZeroMQ service (protocol v1, ``docs/protocol.md``).

:class:`Client` owns one DEALER socket connected to the worker's ROUTER. It streams
(:meth:`Client.stream` yields :class:`Chunk` in ``seq`` order), synthesizes in one reply
(:meth:`Client.synthesize`), cancels, manages saved speakers and asks for health / stats.
Requests are checked locally with :func:`worker.protocol.parse_request` before they are sent,
so a malformed request fails at once with the same ``bad_request`` the worker would send.

The library asks for ``f32le`` audio by default: exact float32 samples, no quantization (twice
the bytes of ``pcm_s16le``, still small next to the synthesis time).

Waiting: every wait is a ``zmq`` poll with a timeout (``timeout_s``: the longest time without
any reply for the request waited on; for :meth:`Client.synthesize` that is the whole
synthesis). Replies for other requests that arrive meanwhile are kept and handed to whoever
asks for them. A stream left before its final reply (``break``, an exception, a timeout) is
cancelled at the worker and its late replies are dropped. One :class:`Client` is for one
thread at a time.

CLI: ``python -m worker.client --text ... --out out.wav`` (see ``--help``); it never reads
``COSY_*`` variables: the endpoint is ``--endpoint`` (default ``tcp://127.0.0.1:5555``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np
import zmq

from worker.protocol import (
    FORMATS,
    MODES,
    PROTOCOL_VERSION,
    SAMPLE_RATE,
    ProtocolError,
    decode_audio,
    parse_request,
)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_HWM = 1000  # messages queued per direction
_LOCAL_FRAME_LIMIT = 1 << 62  # the worker applies its own COSY_MAX_FRAME_MB
_CANCEL_LINGER_MS = 200  # on close: time to deliver a cancel for an abandoned stream
_INFO_KEYS = ("v", "id", "op", "final")
PROG = "worker.client"


class WorkerError(Exception):
    """An error reply (``code`` from :data:`worker.protocol.ERROR_CODES`), or a request the
    client refused before sending (``bad_request``)."""

    def __init__(self, code: str, message: str, id: str = ""):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id


class ReplyError(WorkerError):
    """The worker's reply breaks the protocol (seq gap or duplicate, bad header or payload);
    ``code`` is ``bad_reply``."""

    def __init__(self, message: str, id: str = ""):
        super().__init__("bad_reply", message, id)


@dataclass(frozen=True)
class Chunk:
    """One tts reply: ``audio`` is mono float32 at ``header["sample_rate"]`` (24 kHz)."""

    id: str
    seq: int
    audio: np.ndarray
    final: bool
    header: dict[str, Any] = field(repr=False)

    @property
    def sample_rate(self) -> int:
        return int(self.header.get("sample_rate", SAMPLE_RATE))


class _Reply(NamedTuple):
    header: dict[str, Any]
    payload: bytes | None


class Client:
    """A connection to one worker. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        hwm: int = DEFAULT_HWM,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as e:
            self._sock.close(0)
            self._ctx.term()
            raise ValueError(f"bad endpoint {endpoint!r}: {e}") from None
        self._buffer: dict[tuple[str, str], deque[_Reply]] = {}
        self._dropped: set[tuple[str, str]] = set()  # abandoned (id, op): replies discarded
        self._heard = False  # any reply ever arrived on this socket
        self._cancel_pending = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(linger=_CANCEL_LINGER_MS if self._cancel_pending else 0)
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tts ---------------------------------------------------------------------------------
    def stream(
        self,
        text: str,
        *,
        mode: str = "zero_shot",
        prompt_wav: str | Path | bytes | None = None,
        prompt_text: str | None = None,
        instruct: str | None = None,
        speaker: str | None = None,
        format: str = "f32le",
        speed: float = 1.0,
        seed: int | None = None,
        id: str | None = None,
        forced_tokens: int | None = None,
    ) -> Iterator[Chunk]:
        """Send a streaming tts request now; iterate for its chunks (``seq`` 0, 1, ...; the
        last has ``final``). Error replies raise :class:`WorkerError`."""
        rid = self._send_tts(
            text, mode=mode, prompt_wav=prompt_wav, prompt_text=prompt_text, instruct=instruct,
            speaker=speaker, format=format, speed=speed, seed=seed, id=id, stream=True,
            forced_tokens=forced_tokens,
        )  # fmt: skip
        return self._chunks(rid)

    def synthesize(
        self,
        text: str,
        *,
        mode: str = "zero_shot",
        prompt_wav: str | Path | bytes | None = None,
        prompt_text: str | None = None,
        instruct: str | None = None,
        speaker: str | None = None,
        format: str = "f32le",
        speed: float = 1.0,
        seed: int | None = None,
        id: str | None = None,
    ) -> np.ndarray:
        """One ``stream: false`` request: all the audio (mono float32, 24 kHz) in one reply.
        ``timeout_s`` bounds the whole synthesis here."""
        rid = self._send_tts(
            text, mode=mode, prompt_wav=prompt_wav, prompt_text=prompt_text, instruct=instruct,
            speaker=speaker, format=format, speed=speed, seed=seed, id=id, stream=False,
        )  # fmt: skip
        with contextlib.closing(self._chunks(rid)) as chunks:
            parts = [c.audio for c in chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def cancel(self, id: str) -> bool:
        """Cancel tts request ``id``; True if it was still running (its stream then ends with
        a ``cancelled`` error), False if the worker did not know it (finished or never seen)."""
        header = self._call("cancel", {"id": id})
        cancelled = header.get("cancelled")
        if not isinstance(cancelled, bool):
            raise ReplyError(f"cancel reply without a bool 'cancelled': {header}", id)
        return cancelled

    # -- other ops ---------------------------------------------------------------------------
    def speaker_add(
        self,
        name: str,
        prompt_wav: str | Path | bytes,
        prompt_text: str = "",
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Save a voice under ``name``; returns the reply's fields."""
        fields = {"name": name, "prompt_text": prompt_text, "overwrite": overwrite}
        return _info(self._call("speaker.add", fields, audio=_read_audio(prompt_wav)))

    def speaker_list(self) -> list:
        header = self._call("speaker.list", {})
        speakers = header.get("speakers")
        if not isinstance(speakers, list):
            raise ReplyError(f"speaker.list reply without a 'speakers' list: {header}")
        return speakers

    def speaker_delete(self, name: str) -> dict[str, Any]:
        """Forget the saved speaker ``name`` (``not_found`` if there is none)."""
        return _info(self._call("speaker.delete", {"name": name}))

    def health(self) -> dict[str, Any]:
        """The worker's health: ``ok`` (every stage up) and per-stage status."""
        return _info(self._call("health", {}))

    def stats(self) -> dict[str, Any]:
        return _info(self._call("stats", {}))

    # -- internals ---------------------------------------------------------------------------
    def _send_tts(self, text: str, *, prompt_wav, stream: bool, id: str | None, **opts) -> str:
        rid = uuid.uuid4().hex if id is None else id
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": "tts", "id": rid, "text": text}
        header.update({k: v for k, v in opts.items() if v is not None})
        header["stream"] = stream
        audio = None if prompt_wav is None else _read_audio(prompt_wav)
        self._send(header, audio)
        return rid

    def _call(self, op: str, fields: dict[str, Any], audio: bytes | None = None) -> dict:
        """Send a non-tts op and wait for its one reply (an error reply raises)."""
        rid = fields["id"] if "id" in fields else uuid.uuid4().hex
        header = {"v": PROTOCOL_VERSION, "op": op, **fields, "id": rid}
        self._send(header, audio)
        reply = self._wait((rid, op))
        _raise_error(reply.header, rid)
        return reply.header

    def _send(self, header: dict[str, Any], audio: bytes | None) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        frames = [msgspec.json.encode(header)]
        if audio is not None:
            frames.append(audio)
        try:  # the same checks the worker makes (except its frame size limit)
            parse_request(frames, _LOCAL_FRAME_LIMIT)
        except ProtocolError as e:
            raise WorkerError(e.code, e.message, str(header.get("id", ""))) from None
        if not self._sock.poll(self.timeout_s * 1000, zmq.POLLOUT):
            raise TimeoutError(
                f"could not send to {self.endpoint} within {self.timeout_s:g} s "
                "(queue full; is `./run.sh serve` running?)"
            )
        self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(frames) == 1)

    def _chunks(self, rid: str) -> Iterator[Chunk]:
        expected = 0
        done = False
        try:
            while True:
                header, payload = self._wait((rid, "tts"))
                if "error" in header:
                    done = True
                    _raise_error(header, rid)
                seq = header.get("seq")
                if type(seq) is not int or seq != expected:
                    what = "duplicate" if type(seq) is int and seq < expected else "gap"
                    raise ReplyError(f"seq {seq!r} where {expected} was expected ({what})", rid)
                final = header.get("final")
                if not isinstance(final, bool):
                    raise ReplyError(f"reply seq {seq} has no bool 'final'", rid)
                done = final
                if payload is None:
                    raise ReplyError(f"reply seq {seq} has no audio frame", rid)
                try:
                    audio = decode_audio(header, payload)
                except ValueError as e:
                    raise ReplyError(f"reply seq {seq}: {e}", rid) from None
                yield Chunk(rid, seq, audio, final, header)
                if final:
                    return
                expected += 1
        finally:
            if not done:
                self._abandon(rid)

    def _abandon(self, rid: str) -> None:
        """Stop caring about stream ``rid``: drop its replies, ask the worker to cancel it."""
        key = (rid, "tts")
        buffered = self._buffer.pop(key, ())
        if any(r.header.get("final") is True for r in buffered) or self._closed:
            return  # already over (or nothing can be sent any more)
        self._dropped.add(key)
        self._dropped.add((rid, "cancel"))
        frame = msgspec.json.encode({"v": PROTOCOL_VERSION, "op": "cancel", "id": rid})
        with contextlib.suppress(zmq.Again):
            self._sock.send(frame, flags=zmq.NOBLOCK)
            self._cancel_pending = True

    def _wait(self, key: tuple[str, str]) -> _Reply:
        """The next reply for ``key`` = (id, op), receiving (and keeping) others meanwhile."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            for k in (key, (key[0], "")):  # "": the worker could not read the op
                queue = self._buffer.get(k)
                if queue:
                    reply = queue.popleft()
                    if not queue:
                        del self._buffer[k]
                    return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(remaining * 1000, zmq.POLLIN):
                self._buffer.pop(key, None)
                self._dropped.add(key)
                rid, op = key
                if not self._heard:
                    raise TimeoutError(
                        f"nobody answered at {self.endpoint} within {self.timeout_s:g} s "
                        "(is `./run.sh serve` running?)"
                    )
                raise TimeoutError(
                    f"no reply to {op} request {rid!r} from {self.endpoint} within "
                    f"{self.timeout_s:g} s"
                )
            self._file(self._sock.recv_multipart(flags=zmq.NOBLOCK))

    def _file(self, frames: list[bytes]) -> None:
        """Put one received reply in its (id, op) queue (or drop it if abandoned)."""
        self._heard = True
        try:
            header = msgspec.json.decode(frames[0])
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
            raise ReplyError(f"reply header is not JSON: {e}") from None
        if not isinstance(header, dict) or not isinstance(header.get("id"), str):
            raise ReplyError(f"reply header is not an object with a string 'id': {header!r:.200}")
        if header.get("v") != PROTOCOL_VERSION:
            raise ReplyError(f"reply has protocol version {header.get('v')!r}", header["id"])
        op = header.get("op", "tts")
        key = (header["id"], op if isinstance(op, str) else "tts")
        if key in self._dropped:
            if header.get("final") is True:
                self._dropped.discard(key)
            return
        payload = frames[1] if len(frames) > 1 else None
        self._buffer.setdefault(key, deque()).append(_Reply(header, payload))


def _raise_error(header: dict[str, Any], rid: str) -> None:
    if "error" not in header:
        return
    err = header["error"]
    if not isinstance(err, dict):
        raise ReplyError(f"error reply with a malformed 'error': {err!r:.200}", rid)
    raise WorkerError(str(err.get("code", "internal")), str(err.get("message", "")), rid)


def _info(header: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in header.items() if k not in _INFO_KEYS}


def _read_audio(prompt_wav: str | Path | bytes) -> bytes:
    if isinstance(prompt_wav, (bytes, bytearray, memoryview)):
        return bytes(prompt_wav)
    return Path(prompt_wav).read_bytes()


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Talk to a running CosyVoice3 worker (`./run.sh serve`): synthesize text "
        "to a 24 kHz WAV while streaming, or query it.",
        epilog="Exit status: 0 ok, 1 error (or --health not ok), 2 usage.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="text to synthesize (needs --out)")
    what.add_argument("--health", action="store_true", help="print the worker's health (JSON)")
    what.add_argument("--stats", action="store_true", help="print the worker's stats (JSON)")
    what.add_argument(
        "--list-speakers", action="store_true", help="print the saved speakers (JSON)"
    )
    p.add_argument("--mode", choices=MODES, default="zero_shot")
    p.add_argument("--speaker", help="a saved speaker name (instead of --prompt-wav)")
    p.add_argument("--prompt-wav", type=Path, help="prompt audio file (the voice)")
    p.add_argument("--prompt-text", help="transcript of --prompt-wav (zero_shot)")
    p.add_argument("--instruct", help="the instruction (mode instruct)")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--format", choices=FORMATS, default="f32le", help="transfer format")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="default: %(default)s")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S,
        help="seconds without a reply before giving up (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="output WAV (24 kHz, 16-bit PCM)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.text is not None and args.out is None:
            parser.error("--text needs --out")
        if args.speaker is not None and args.prompt_wav is not None:
            parser.error("--speaker and --prompt-wav are two voices: give one")
        if not args.timeout > 0:
            parser.error("--timeout must be > 0")
    except SystemExit as e:  # argparse: usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        with Client(args.endpoint, timeout_s=args.timeout) as client:
            if args.text is None:
                return _query(client, args)
            return _synthesize(client, args)
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except (WorkerError, TimeoutError, OSError, ValueError, RuntimeError) as e:
        message = str(e).replace("\n", " ")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


def _query(client: Client, args: argparse.Namespace) -> int:
    if args.health:
        result: Any = client.health()
    elif args.stats:
        result = client.stats()
    else:
        result = client.speaker_list()
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.health and result.get("ok") is not True:
        return 1
    return 0


def _synthesize(client: Client, args: argparse.Namespace) -> int:

    start = time.perf_counter()
    first_audio = None
    parts: list[np.ndarray] = []
    rate = SAMPLE_RATE
    chunks = client.stream(
        args.text, mode=args.mode, prompt_wav=args.prompt_wav, prompt_text=args.prompt_text,
        instruct=args.instruct, speaker=args.speaker, format=args.format, speed=args.speed,
        seed=args.seed,
    )  # fmt: skip
    with contextlib.closing(chunks):
        for chunk in chunks:
            elapsed = time.perf_counter() - start
            if first_audio is None and chunk.audio.size:
                first_audio = elapsed
            rate = chunk.sample_rate
            parts.append(chunk.audio)
            print(
                f"{PROG}: chunk seq={chunk.seq} samples={chunk.audio.size} "
                f"elapsed={elapsed:.3f}s{' final' if chunk.final else ''}",
                file=sys.stderr,
            )
    total = time.perf_counter() - start
    audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    audio_s = audio.size / rate
    _write_wav(args.out, audio, rate)
    first = "n/a" if first_audio is None else f"{first_audio:.3f} s"
    rtf = f"{total / audio_s:.3f}" if audio_s > 0 else "n/a"
    print(
        f"{PROG}: first audio {first}, total {total:.3f} s, audio {audio_s:.3f} s, RTF {rtf}; "
        f"wrote {args.out}",
        file=sys.stderr,
    )
    if audio.size == 0:
        print(f"{PROG}: warning: the worker produced no audio for this text (the model ended "
              "it at once); the file is empty", file=sys.stderr)  # fmt: skip
    elif not np.any(audio):
        print(f"{PROG}: warning: the audio is all zeros (silence)", file=sys.stderr)
    return 0


def _write_wav(path, audio: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV with the standard library (the client needs no audio package)."""
    import wave

    pcm = np.rint(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


if __name__ == "__main__":
    sys.exit(main())
