"""Text + voice in, model inputs out: the three CosyVoice3 modes (reference §1.1, §1.2).

* ``zero_shot``: prompt audio + its transcript. LLM input ``[sos, prompt_text ++ text, task_id,
  prompt speech tokens]``; the transcript must carry ``<|endofprompt|>`` (e.g. ``"You are a
  helpful assistant.<|endofprompt|>" + transcript``), as upstream requires.
* ``cross_lingual``: prompt audio only; the LLM prompt (text and speech) is dropped, so the
  *text* must carry ``<|endofprompt|>``.
* ``instruct2``: an instruction ending in ``<|endofprompt|>`` takes the prompt-text place; no
  LLM prompt speech. The flow prompt (tokens, mel, speaker embedding) is kept in every mode.

Any mode may name a saved speaker instead of giving audio. Prompt features come from the prompt
cache when present (a hit never runs the ONNX encoders) and are computed and stored otherwise.
Long text is normalized and split into segments (one :class:`TTSRequest` each, in order).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache import PromptCache, PromptEntry, cache_key
from worker.config import QWEN_DIR, read_model_config
from worker.frontend.audio import (
    campplus_fbank,
    load_audio,
    prompt_mel_24k,
    resample,
    whisper_logmel_128,
)
from worker.frontend.text import normalize_and_split
from worker.frontend.tokenizer import ENDOFPROMPT, CosyVoice3Tokenizer
from worker.request import RequestError, TTSRequest

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


@dataclass
class Voice:
    """Where the prompt comes from: audio (+ transcript) or a saved speaker name."""

    prompt_wav: str | Path | None = None
    prompt_text: str = ""
    speaker: str | None = None


class Frontend:
    """Tokenizer, encoders and cache for one model dir; build requests with :meth:`requests`."""

    def __init__(
        self, model_dir: str | Path, cache: PromptCache | None = None, threads: int | None = None
    ):
        """``threads``: ONNX Runtime intra-op threads (default ``COSY_FRONTEND_THREADS``)."""
        if threads is None:
            from worker.settings import Knobs

            threads = Knobs.from_env().frontend_threads
        self.model_dir = Path(model_dir)
        self.config = read_model_config(self.model_dir)
        self.tokenizer = CosyVoice3Tokenizer(self.model_dir / QWEN_DIR)
        self.cache = cache
        self.threads = threads
        self.fingerprint = model_fingerprint(self.model_dir)
        self.encoder_calls = 0  # how many times the ONNX encoders ran (tests, stats)

    # -- prompt features ---------------------------------------------------------------------
    def encode_prompt(self, samples: np.ndarray, sr: int, prompt_text: str) -> PromptEntry:
        """Run the frontend on decoded prompt audio (mono float32 at ``sr``)."""
        from worker.frontend.encoders import SpeakerEncoderONNX, SpeechTokenizerONNX

        if sr < 16000:
            raise RequestError(f"prompt sample rate {sr} Hz is too low (need at least 16000 Hz)")
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

    def prompt(self, wav: str | Path, prompt_text: str = "") -> tuple[str, PromptEntry, bool]:
        """(cache key, features, cache hit) for a prompt file."""
        try:
            samples, sr = load_audio(wav)
        except ValueError as e:
            raise RequestError(str(e)) from e
        key = cache_key(samples, sr, prompt_text, self.fingerprint, FRONTEND_VERSION)
        if self.cache is None:
            return key, self.encode_prompt(samples, sr, prompt_text), False
        entry, hit = self.cache.get_or_compute(
            key, lambda: self.encode_prompt(samples, sr, prompt_text)
        )
        return key, entry, hit

    def voice_entry(self, voice: Voice) -> PromptEntry:
        if voice.speaker is not None:
            if self.cache is None:
                raise RequestError(f"speaker {voice.speaker!r}: no prompt cache configured")
            return self.cache.speaker(voice.speaker)
        if voice.prompt_wav is None:
            raise RequestError("a voice needs prompt audio or a saved speaker name")
        return self.prompt(voice.prompt_wav, voice.prompt_text)[1]

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
        """One request per text segment; ``settings`` go to every :class:`TTSRequest`."""
        if mode not in MODES:
            raise RequestError(f"mode {mode!r}: choose from {', '.join(MODES)}")
        entry = self.voice_entry(voice)
        eop = self.tokenizer.endofprompt_id
        tok = torch.from_numpy(entry.speech_tokens.astype(np.int64))[None]
        feat = torch.from_numpy(entry.prompt_mel)[None]
        emb = torch.from_numpy(entry.speaker_embedding.reshape(1, -1))
        prompt_ids = llm_speech = None
        if mode == "zero_shot":
            prompt_ids = torch.from_numpy(entry.prompt_text_ids.astype(np.int64))[None]
            llm_speech = tok
            if eop not in entry.prompt_text_ids.tolist():
                raise RequestError(
                    f"zero_shot: the prompt text must contain {ENDOFPROMPT} (e.g. 'You are a "
                    f"helpful assistant.{ENDOFPROMPT}' + transcript); got {entry.prompt_text!r:.60}"
                )
        elif mode == "instruct2":
            if ENDOFPROMPT not in instruct_text:
                raise RequestError(f"instruct2: the instruction must end with {ENDOFPROMPT}")
            prompt_ids = torch.tensor([self.tokenizer.encode(instruct_text)])
        out = []
        for seg in self.segments(text, normalize):
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


def prepare_prompt(model_dir, prompt_wav, prompt_text: str, cache: PromptCache) -> str:
    """Compute (or find) a prompt's features in ``cache`` and return its key (``python -m cache
    add``)."""
    key, _, _ = Frontend(model_dir, cache).prompt(prompt_wav, prompt_text)
    return key


__all__ = ["FRONTEND_VERSION", "MODES", "Frontend", "Voice", "prepare_prompt"]
