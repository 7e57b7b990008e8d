"""The two ONNX frontend encoders of CosyVoice3: speech tokens and the speaker embedding.

Upstream (``cosyvoice/cli/frontend.py``) runs two ONNX Runtime sessions on CPU:

* ``speech_tokenizer_v3.onnx`` (``_extract_speech_token``): inputs, **by position**, the
  whisper log-mel feats ``(1, 128, T)`` float32 and lengths ``[T]`` int32; output 0 flattened to
  the speech tokens, about 25 Hz (``T/4`` tokens for ``T`` 100 Hz frames), each in
  ``[0, 6561)``. Upstream asserts the audio is at most 30 s (``T <= 3000``).
* ``campplus.onnx`` (``_extract_spk_embedding``): input ``(1, T, 80)`` float32, the kaldi
  fbank minus its per-utterance mean; output ``(1, 192)`` float32.

Both use ``intra_op_num_threads=1`` and ``ORT_ENABLE_ALL`` upstream. Here the thread count is a
parameter (default 1) and the sessions come from :func:`worker.ort.session`: one inter-op
thread, the CPU execution provider only, each built once per process and reused (rebuilt when
the file changes; a forked child starts with an empty cache, as ORT sessions are not fork-safe).

At load, each model's declared inputs and outputs are checked (count, rank, element type, and
the static feature dim where the file declares one), so a wrong file -- e.g. ``campplus.onnx``
given as the speech tokenizer -- fails with :class:`EncoderError` naming the file and the
mismatch instead of failing inside ORT on the first request. A missing, empty, truncated or
non-ONNX file raises :class:`EncoderError` naming it as well.

Return types: :class:`SpeechTokenizerONNX` gives ``(N,)`` int64 (the model may emit int32 or
int64); :class:`SpeakerEncoderONNX` gives ``(1, 192)`` float32, the shape upstream passes on
and the flow's ``spk_projection`` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker import ort

__all__ = [
    "EMBEDDING_DIM",
    "FBANK_BINS",
    "MAX_TOKENIZER_FRAMES",
    "SPEECH_TOKEN_SIZE",
    "WHISPER_MELS",
    "EncoderError",
    "SpeakerEncoderONNX",
    "SpeechTokenizerONNX",
    "clear_session_cache",
]

SPEECH_TOKEN_SIZE = 6561
"""Speech tokens are in ``[0, 6561)`` (FSQ 3^8)."""
WHISPER_MELS = 128
FBANK_BINS = 80
EMBEDDING_DIM = 192
MAX_TOKENIZER_FRAMES = 3000
"""30 s of 16 kHz audio at 100 frames/s: upstream asserts the tokenizer input is at most 30 s."""

_FLOAT = "tensor(float)"
_INTS = ("tensor(int32)", "tensor(int64)")
_NP_INT = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}


class EncoderError(ValueError):
    """An ONNX encoder file or its input cannot be used; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Sessions


def clear_session_cache() -> None:
    """Drop every cached session (they are freed once no encoder object holds them)."""
    ort.clear_cache()


def _get_session(kind: str, path: str | Path, threads: int, validate) -> tuple[Any, Path]:
    """The cached session for ``path`` (validated) and the resolved path."""
    p = Path(path)
    if not p.is_file():
        raise EncoderError(f"{kind} ONNX file not found: {p}")
    p = p.resolve()
    if p.stat().st_size == 0:
        raise EncoderError(f"{kind} ONNX file is empty (0 bytes): {p}")
    try:
        # spin: ORT's default, which these sessions always had (moot at the default 1 thread)
        sess = ort.session(p, threads, spin=True)
    except ValueError:  # ``threads``
        raise
    except Exception as e:  # InvalidProtobuf, Fail, InvalidGraph, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EncoderError(
            f"cannot load {kind} ONNX file {p}: not a valid ONNX model ({msg})"
        ) from e
    validate(sess, p)
    return sess, p


def _describe(args) -> str:
    return ", ".join(f"{a.name!r} {a.type} {list(a.shape)}" for a in args)


def _check_dim(arg, axis: int, want: int, what: str, kind: str, p: Path) -> None:
    dim = arg.shape[axis]
    if isinstance(dim, int) and dim > 0 and dim != want:
        raise EncoderError(
            f"{p} is not a {kind} model: {what} {arg.name!r} has {dim} at axis {axis}, "
            f"expected {want} (declared {arg.type} {list(arg.shape)})"
        )


def _check_io(
    sess, p: Path, kind: str, inputs: list[tuple[int, tuple[str, ...]]], out_types: tuple
) -> None:
    """Check the declared inputs (count, rank, element type) and output 0's element type."""
    ins, outs = sess.get_inputs(), sess.get_outputs()
    want = ", ".join(f"rank-{r} {'/'.join(t)}" for r, t in inputs)
    if len(ins) != len(inputs):
        raise EncoderError(
            f"{p} is not a {kind} model: it declares {len(ins)} input(s) [{_describe(ins)}], "
            f"expected {len(inputs)} [{want}]"
        )
    for i, (arg, (rank, types)) in enumerate(zip(ins, inputs)):
        if len(arg.shape) != rank or arg.type not in types:
            raise EncoderError(
                f"{p} is not a {kind} model: input {i} {arg.name!r} is {arg.type} "
                f"{list(arg.shape)} (rank {len(arg.shape)}), expected rank {rank} "
                f"{' or '.join(types)}"
            )
        _check_dim(arg, 0, 1, f"input {i}", kind, p)  # batch: 1 or dynamic
    if not outs or outs[0].type not in out_types:
        got = f"{outs[0].name!r} {outs[0].type}" if outs else "no outputs"
        raise EncoderError(
            f"{p} is not a {kind} model: output 0 is {got}, expected {' or '.join(out_types)}"
        )


def _as_float_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Encoders


class SpeechTokenizerONNX:
    """``speech_tokenizer_v3.onnx``: whisper log-mel ``(1, 128, T)`` -> speech tokens ``(N,)``.

    ``threads`` sets ORT's intra-op threads (upstream: 1). Calling it returns int64 tokens in
    ``[0, 6561)``, about ``T/4`` of them (the model decides the exact count).
    """

    kind = "speech tokenizer"

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.session, self.path = _get_session(self.kind, path, threads, self._validate)
        self.threads = threads
        ins = self.session.get_inputs()
        self._feats_name, self._len_name = ins[0].name, ins[1].name
        self._len_dtype = _NP_INT[ins[1].type]

    @classmethod
    def _validate(cls, sess, p: Path) -> None:
        _check_io(sess, p, cls.kind, [(3, (_FLOAT,)), (1, _INTS)], _INTS)
        _check_dim(sess.get_inputs()[0], 1, WHISPER_MELS, "input 0 (feats)", cls.kind, p)

    def __call__(
        self,
        feats: np.ndarray | torch.Tensor,
        length: int | np.ndarray | torch.Tensor | None = None,
    ) -> np.ndarray:
        """Tokens of ``feats`` ``(1, 128, T)``; ``length`` is ``T`` (default), an int or a
        one-element array such as the lengths :func:`~worker.frontend.audio.whisper_logmel_128`
        returns."""
        x = _as_float_array(feats)
        if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] != WHISPER_MELS or x.shape[2] < 1:
            raise EncoderError(
                f"speech tokenizer input must be (1, {WHISPER_MELS}, T) float32 feats, "
                f"got shape {x.shape} ({self.path})"
            )
        T = x.shape[2]
        if T > MAX_TOKENIZER_FRAMES:
            raise EncoderError(
                f"speech tokenizer input is {T} frames ({T / 100:.2f} s); at most "
                f"{MAX_TOKENIZER_FRAMES} frames (30 s) are supported ({self.path})"
            )
        if length is None:
            n = T
        else:
            la = np.asarray(length.detach().cpu() if isinstance(length, torch.Tensor) else length)
            if la.size != 1 or not np.issubdtype(la.dtype, np.integer):
                raise EncoderError(f"length must be one integer, got {length!r} ({self.path})")
            n = int(la.reshape(()))
        if not 1 <= n <= T:
            raise EncoderError(f"length {n} is outside [1, {T}] for feats {x.shape}")
        out = self.session.run(
            None, {self._feats_name: x, self._len_name: np.array([n], dtype=self._len_dtype)}
        )[0]
        tokens = np.asarray(out).reshape(-1).astype(np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= SPEECH_TOKEN_SIZE):
            raise EncoderError(
                f"speech tokenizer {self.path} produced tokens outside [0, {SPEECH_TOKEN_SIZE}): "
                f"min {tokens.min()}, max {tokens.max()}"
            )
        return tokens


class SpeakerEncoderONNX:
    """``campplus.onnx``: fbank minus its mean ``(1, T, 80)`` -> embedding ``(1, 192)`` float32.

    ``threads`` sets ORT's intra-op threads (upstream: 1).
    """

    kind = "speaker encoder (campplus)"

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.session, self.path = _get_session(self.kind, path, threads, self._validate)
        self.threads = threads
        self._input_name = self.session.get_inputs()[0].name

    @classmethod
    def _validate(cls, sess, p: Path) -> None:
        _check_io(sess, p, cls.kind, [(3, (_FLOAT,))], (_FLOAT,))
        _check_dim(sess.get_inputs()[0], 2, FBANK_BINS, "input 0 (fbank)", cls.kind, p)
        out = sess.get_outputs()[0]
        _check_dim(out, len(out.shape) - 1, EMBEDDING_DIM, "output 0", cls.kind, p)

    def __call__(self, fbank: np.ndarray | torch.Tensor) -> np.ndarray:
        x = _as_float_array(fbank)
        if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != FBANK_BINS or x.shape[1] < 1:
            raise EncoderError(
                f"speaker encoder input must be (1, T, {FBANK_BINS}) float32 fbank, "
                f"got shape {x.shape} ({self.path})"
            )
        out = np.asarray(self.session.run(None, {self._input_name: x})[0], dtype=np.float32)
        if out.size != EMBEDDING_DIM:
            raise EncoderError(
                f"speaker encoder {self.path} returned shape {out.shape}, expected "
                f"(1, {EMBEDDING_DIM})"
            )
        return out.reshape(1, EMBEDDING_DIM)
