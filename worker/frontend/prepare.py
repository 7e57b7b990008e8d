"""Text + voice in, model inputs out: the three CosyVoice3 modes (reference §1.1, §1.2).

* ``zero_shot``: prompt audio + its transcript. LLM input ``[sos, prompt_text ++ text, task_id,
  prompt speech tokens]``; the transcript must carry ``<|endofprompt|>`` (e.g. ``"You are a
  helpful assistant.<|endofprompt|>" + transcript``), as upstream requires.
* ``cross_lingual``: prompt audio only; the LLM prompt (text and speech) is dropped, so the
  *text* must carry ``<|endofprompt|>``.
* ``instruct2``: an instruction ending in ``<|endofprompt|>`` takes the prompt-text place; no
  LLM prompt speech. The flow prompt (tokens, mel, speaker embedding) is kept in every mode.

Any mode may name a saved speaker instead of giving audio (``Voice(speaker=...)``; giving both
is an error). Prompt audio is a path or a complete audio file's bytes (what the service
receives); audio that is not audio, truncated or silent is refused with a
:class:`RequestError` saying why. Prompt features come from the prompt cache when present (a hit
never runs the ONNX encoders) and are computed and stored otherwise. Long text is normalized and
split into segments (one :class:`TTSRequest` each, in order).

This file owns :class:`Voice`, :class:`Frontend` (requests; saved speakers:
:meth:`Frontend.add_speaker` / :meth:`~Frontend.list_speakers` / :meth:`~Frontend.delete_speaker`,
the code ``python -m cache add`` runs too) and the prompt-feature fingerprint. Settings
(ONNX threads) come from a :class:`worker.settings.Knobs` passed in.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cache import (
    CacheError,
    MissingEntry,
    PromptCache,
    PromptEntry,
    SpeakerExists,
    cache_key,
    validate_speaker_name,
)
from worker.config import QWEN_DIR, read_model_config
from worker.frontend.audio import (
    campplus_fbank,
    check_not_silent,
    load_audio,
    prompt_mel_24k,
    resample,
    whisper_logmel_128,
)
from worker.frontend.text import normalize_and_split
from worker.frontend.tokenizer import ENDOFPROMPT, CosyVoice3Tokenizer
from worker.hyperyaml import ConfigError
from worker.request import RequestError, TTSRequest

if TYPE_CHECKING:
    from worker.settings import Knobs

FRONTEND_VERSION = "cv3-frontend-1"
MODES = ("zero_shot", "cross_lingual", "instruct2")
MAX_PROMPT_S = 30.0  # upstream asserts the 16 kHz prompt is at most 30 s
SPEECH_TOKENIZER = "speech_tokenizer_v3.onnx"
SPEAKER_ENCODER = "campplus.onnx"


def _file_digest(h, path: Path, edge: int = 1 << 20) -> None:
    """Size + first and last MiB: a cheap fingerprint of a (possibly 1 GB) model file."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            h.update(f.read(edge))


def model_fingerprint(model_dir: str | Path) -> str:
    """What prompt features depend on: the two ONNX encoders and the tokenizer files."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for rel in (
        SPEECH_TOKENIZER,
        SPEAKER_ENCODER,
        f"{QWEN_DIR}/vocab.json",
        f"{QWEN_DIR}/merges.txt",
    ):
        p = d / rel
        if p.is_file():
            _file_digest(h, p)
    return h.hexdigest()[:32]


def _is_audio_bytes(x: object) -> bool:
    return isinstance(x, (bytes, bytearray, memoryview))


@dataclass(repr=False)
class Voice:
    """Where the prompt comes from: prompt audio (+ its transcript) or a saved speaker name.

    ``prompt_wav`` is a file path or a complete audio file's bytes (any format soundfile reads;
    what the service receives). Exactly one of ``prompt_wav`` and ``speaker`` must be given; a
    saved speaker carries its own transcript, so ``prompt_text`` goes with audio only.
    Violations raise :class:`RequestError` on construction (and again on use, if the fields
    were changed since).
    """

    prompt_wav: str | Path | bytes | None = None
    prompt_text: str = ""
    speaker: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompt_wav, (bytearray, memoryview)):
            self.prompt_wav = bytes(self.prompt_wav)
        self.check()

    def check(self) -> None:
        """Raise :class:`RequestError` unless the fields name exactly one prompt source."""
        wav, spk = self.prompt_wav, self.speaker
        if wav is not None and not isinstance(wav, (str, os.PathLike, bytes)):
            raise RequestError(
                f"Voice.prompt_wav must be a path or the audio file's bytes, "
                f"got {type(wav).__name__}"
            )
        if spk is not None and not isinstance(spk, str):
            raise RequestError(f"Voice.speaker must be a str, got {type(spk).__name__}")
        if not isinstance(self.prompt_text, str):
            raise RequestError(
                f"Voice.prompt_text must be a str, got {type(self.prompt_text).__name__}"
            )
        if wav is not None and spk is not None:
            raise RequestError(
                f"Voice: give either prompt_wav (prompt audio) or speaker={spk!r} (a saved "
                "speaker), not both"
            )
        if wav is None and spk is None:
            raise RequestError("Voice: needs prompt_wav (prompt audio) or speaker (a saved name)")
        if spk is not None and self.prompt_text:
            raise RequestError(
                f"Voice: prompt_text goes with prompt_wav only; saved speaker {spk!r} carries "
                "its own transcript"
            )

    def __repr__(self) -> str:
        if _is_audio_bytes(self.prompt_wav):
            wav = f"<{len(self.prompt_wav)} bytes>"
        else:
            wav = repr(None if self.prompt_wav is None else str(self.prompt_wav))
        return (
            f"Voice(prompt_wav={wav}, prompt_text={self.prompt_text!r}, speaker={self.speaker!r})"
        )


class Frontend:
    """Tokenizer, encoders and cache for one model dir; build requests with :meth:`requests`,
    manage saved speakers with :meth:`add_speaker`, :meth:`list_speakers`,
    :meth:`delete_speaker`."""

    def __init__(
        self,
        model_dir: str | Path,
        cache: PromptCache | None = None,
        threads: int | None = None,
        knobs: Knobs | None = None,
    ):
        """``threads``: ONNX Runtime intra-op threads; default ``knobs.frontend_threads``
        (``COSY_FRONTEND_THREADS``). With neither given, ``Knobs.from_env()`` is read."""
        if threads is None:
            if knobs is None:
                from worker.settings import Knobs

                knobs = Knobs.from_env()
            threads = knobs.frontend_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ConfigError(f"model dir not found: {self.model_dir}")
        self.config = read_model_config(self.model_dir)
        self.tokenizer = CosyVoice3Tokenizer(self.model_dir / QWEN_DIR)
        self.cache = cache
        self.threads = threads
        self.fingerprint = model_fingerprint(self.model_dir)
        self.encoder_calls = 0  # how many times the ONNX encoders ran (tests, stats)

    # -- prompt features ---------------------------------------------------------------------
    def encode_prompt(self, samples: np.ndarray, sr: int, prompt_text: str) -> PromptEntry:
        """Run the frontend on decoded prompt audio (mono float32 at ``sr``).

        Raises :class:`RequestError` for a rate below 16 kHz, more than 30 s, or silence.
        """
        from worker.frontend.encoders import SpeakerEncoderONNX, SpeechTokenizerONNX

        _check_rate(sr)
        _check_audible(samples)
        x16 = samples if sr == 16000 else resample(samples, sr, 16000)
        if x16.shape[0] / 16000 > MAX_PROMPT_S:
            raise RequestError(
                f"prompt audio is {x16.shape[0] / 16000:.1f} s; at most {MAX_PROMPT_S:.0f} s "
                "is supported (upstream's limit)"
            )
        x24 = samples if sr == 24000 else resample(samples, sr, 24000)
        feats, flen = whisper_logmel_128(x16)
        tok_model = SpeechTokenizerONNX(self.model_dir / SPEECH_TOKENIZER, self.threads)
        spk_model = SpeakerEncoderONNX(self.model_dir / SPEAKER_ENCODER, self.threads)
        tokens = tok_model(feats, flen)
        emb = np.asarray(spk_model(campplus_fbank(x16))).reshape(-1)
        self.encoder_calls += 1
        mel = prompt_mel_24k(x24)[0].numpy()  # (T, 80)
        n = min(mel.shape[0] // 2, tokens.shape[0])  # token:mel = 1:2 alignment
        return PromptEntry(
            speech_tokens=tokens[:n].astype(np.int32),
            prompt_mel=mel[: 2 * n],
            speaker_embedding=emb.astype(np.float32),
            prompt_text_ids=np.asarray(self._prompt_text_ids(prompt_text), dtype=np.int32),
            prompt_text=prompt_text,
            meta={"frontend": FRONTEND_VERSION, "fingerprint": self.fingerprint},
        )

    def _prompt_text_ids(self, prompt_text: str) -> list[int]:
        if not prompt_text:
            return []
        text = normalize_and_split(prompt_text, self.tokenizer, split=False)
        return self.tokenizer.encode(text[0] if text else "")

    def load_prompt(self, audio: str | Path | bytes) -> tuple[np.ndarray, int]:
        """Decoded prompt audio ``(samples, rate)``; :class:`RequestError` says what is wrong
        (not audio, truncated, empty, too short, rate below 16 kHz, silent)."""
        try:
            samples, sr = load_audio(audio)
        except ValueError as e:
            raise RequestError(f"prompt audio: {e}") from e
        _check_rate(sr)
        _check_audible(samples)
        return samples, sr

    def _key(self, samples: np.ndarray, sr: int, prompt_text: str) -> str:
        return cache_key(samples, sr, prompt_text, self.fingerprint, FRONTEND_VERSION)

    def prompt(
        self, wav: str | Path | bytes, prompt_text: str = ""
    ) -> tuple[str, PromptEntry, bool]:
        """(cache key, features, cache hit) for a prompt (a path or an audio file's bytes)."""
        samples, sr = self.load_prompt(wav)
        key = self._key(samples, sr, prompt_text)
        if self.cache is None:
            return key, self.encode_prompt(samples, sr, prompt_text), False
        entry, hit = self.cache.get_or_compute(
            key, lambda: self.encode_prompt(samples, sr, prompt_text)
        )
        return key, entry, hit

    def voice_entry(self, voice: Voice) -> PromptEntry:
        voice.check()
        if voice.speaker is not None:
            if self.cache is None:
                raise RequestError(f"speaker {voice.speaker!r}: no prompt cache configured")
            return self.cache.speaker(voice.speaker)
        return self.prompt(voice.prompt_wav, voice.prompt_text)[1]

    # -- saved speakers ----------------------------------------------------------------------
    def _need_cache(self, what: str) -> PromptCache:
        if self.cache is None:
            raise CacheError(f"cannot {what}: this Frontend has no prompt cache")
        return self.cache

    def add_speaker(
        self,
        name: str,
        audio: str | Path | bytes,
        prompt_text: str = "",
        overwrite: bool = False,
    ) -> dict:
        """Encode a prompt (through the cache) and save it as speaker ``name``.

        ``audio`` is a path or a complete audio file's bytes; ``prompt_text`` its transcript
        (``""``: the speaker serves cross_lingual and instruct2 but not zero_shot). Checks the
        name, that it is free (unless ``overwrite``) and that the cache is writable before
        encoding anything. Returns ``{"name", "key", "has_transcript"}``.

        Raises :class:`~cache.InvalidSpeakerName`, :class:`~cache.SpeakerExists`,
        :class:`~cache.ReadOnlyCache`, :class:`RequestError` (bad audio).
        """
        cache = self._need_cache(f"add speaker {name!r}")
        validate_speaker_name(name)
        if not isinstance(prompt_text, str):
            raise RequestError(f"prompt_text must be a str, got {type(prompt_text).__name__}")
        if not overwrite and name in cache.speakers():
            raise SpeakerExists(
                f"speaker {name!r} already exists; pass overwrite=True to replace it", name
            )
        cache.check_writable(f"add speaker {name!r}")
        samples, sr = self.load_prompt(audio)
        key = self._key(samples, sr, prompt_text)
        entry = cache.get(key)
        if entry is None:  # stored and named under one lock: no eviction in between
            entry = self.encode_prompt(samples, sr, prompt_text)
            cache.add_speaker(name, key, overwrite=overwrite, entry=entry)
        else:
            try:
                cache.add_speaker(name, key, overwrite=overwrite)
            except MissingEntry:  # evicted since the hit: store the entry we hold
                cache.add_speaker(name, key, overwrite=overwrite, entry=entry)
        return {"name": name, "key": key, "has_transcript": _has_transcript(entry)}

    def list_speakers(self) -> list[dict]:
        """Saved speakers, sorted by name: ``{"name", "key", "has_transcript", "prompt_text",
        "duration_s", "available"}`` (``available`` False: the entry is gone; re-add it)."""
        cache = self._need_cache("list speakers")
        out = []
        for name, key in sorted(cache.speakers().items()):
            entry = cache.get(key, touch=False)
            out.append(
                {
                    "name": name,
                    "key": key,
                    "has_transcript": entry is not None and _has_transcript(entry),
                    "prompt_text": entry.prompt_text if entry is not None else None,
                    "duration_s": entry.speech_tokens.shape[0] / 25 if entry is not None else None,
                    "available": entry is not None,
                }
            )
        return out

    def delete_speaker(self, name: str) -> str:
        """Forget speaker ``name`` (its entry stays until evicted); returns the entry's key.
        Unknown name: :class:`~cache.UnknownSpeaker` (a KeyError) naming the known ones."""
        return self._need_cache(f"delete speaker {name!r}").delete_speaker(name)

    # -- requests ----------------------------------------------------------------------------
    def segments(self, text: str, normalize: bool = True) -> list[str]:
        if not text or not text.strip():
            raise RequestError("text is empty")
        if not normalize:
            return [text]
        pieces = normalize_and_split(text, self.tokenizer, split=True)
        if not pieces or not any(p.strip() for p in pieces):
            raise RequestError(f"text {text[:40]!r} has nothing to speak after normalization")
        return pieces

    def requests(
        self,
        mode: str,
        text: str,
        voice: Voice,
        instruct_text: str = "",
        normalize: bool = True,
        **settings,
    ) -> list[TTSRequest]:
        """One request per text segment; ``settings`` go to every :class:`TTSRequest`.

        Cheap checks (mode, voice, instruction, transcript, text) run before the prompt is
        encoded. A saved speaker without a transcript is refused for ``zero_shot``.
        """
        if mode not in MODES:
            raise RequestError(f"mode {mode!r}: choose from {', '.join(MODES)}")
        voice.check()
        if mode == "instruct2" and ENDOFPROMPT not in instruct_text:
            raise RequestError(f"instruct2: the instruction must end with {ENDOFPROMPT}")
        if mode == "zero_shot" and voice.speaker is None:
            _check_zero_shot_text(voice.prompt_text)
        segments = self.segments(text, normalize)
        entry = self.voice_entry(voice)
        eop = self.tokenizer.endofprompt_id
        tok = torch.from_numpy(entry.speech_tokens.astype(np.int64))[None]
        feat = torch.from_numpy(entry.prompt_mel)[None]
        emb = torch.from_numpy(entry.speaker_embedding.reshape(1, -1))
        prompt_ids = llm_speech = None
        if mode == "zero_shot":
            if voice.speaker is not None and not _has_transcript(entry):
                raise RequestError(
                    f"zero_shot: saved speaker {voice.speaker!r} has no transcript, and "
                    "zero_shot needs the prompt's transcript; use cross_lingual or instruct2 "
                    "with this speaker, or re-add it with its transcript (python -m cache add "
                    f"{voice.speaker} ... --prompt-text T --overwrite)"
                )
            prompt_ids = torch.from_numpy(entry.prompt_text_ids.astype(np.int64))[None]
            llm_speech = tok
            if eop not in entry.prompt_text_ids.tolist():
                raise RequestError(
                    f"zero_shot: the prompt text must contain {ENDOFPROMPT} (e.g. 'You are a "
                    f"helpful assistant.{ENDOFPROMPT}' + transcript); got {entry.prompt_text!r:.60}"
                )
        elif mode == "instruct2":
            prompt_ids = torch.tensor([self.tokenizer.encode(instruct_text)])
        out = []
        for seg in segments:
            ids = self.tokenizer.encode(seg)
            if mode == "cross_lingual" and eop not in ids:
                raise RequestError(
                    f"cross_lingual: the text must contain {ENDOFPROMPT} (e.g. 'You are a "
                    f"helpful assistant.{ENDOFPROMPT}' + text)"
                )
            if not ids:
                continue
            out.append(
                TTSRequest(
                    text_ids=torch.tensor([ids]),
                    embedding=emb,
                    prompt_text_ids=prompt_ids,
                    llm_prompt_speech=llm_speech,
                    flow_prompt_speech=tok,
                    prompt_feat=feat,
                    **settings,
                )
            )
        if not out:
            raise RequestError("text has no tokens to speak")
        return out


def transcript_of(prompt_text: str) -> str:
    """The transcript part of a prompt text: what follows the last ``<|endofprompt|>`` (the
    system prompt before it is not a transcript), stripped."""
    return prompt_text.rpartition(ENDOFPROMPT)[2].strip()


def _has_transcript(entry: PromptEntry) -> bool:
    return bool(transcript_of(entry.prompt_text)) and entry.prompt_text_ids.size > 0


def _check_rate(sr: int) -> None:
    if sr < 16000:
        raise RequestError(f"prompt sample rate {sr} Hz is too low (need at least 16000 Hz)")


def _check_audible(samples: np.ndarray) -> None:
    try:
        check_not_silent(samples, "prompt audio")
    except ValueError as e:
        raise RequestError(str(e)) from e


def _check_zero_shot_text(prompt_text: str) -> None:
    """zero_shot with prompt audio: the transcript must be there (checked before encoding)."""
    if not transcript_of(prompt_text):
        raise RequestError(
            "zero_shot needs the prompt's transcript (Voice.prompt_text, e.g. 'You are a "
            f"helpful assistant.{ENDOFPROMPT}' + transcript); without one, use cross_lingual"
        )
    if ENDOFPROMPT not in prompt_text:
        raise RequestError(
            f"zero_shot: the prompt text must contain {ENDOFPROMPT} (e.g. 'You are a "
            f"helpful assistant.{ENDOFPROMPT}' + transcript); got {prompt_text!r:.60}"
        )


__all__ = ["FRONTEND_VERSION", "MODES", "Frontend", "Voice", "transcript_of"]
