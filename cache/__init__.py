"""Prompt cache: prompt features (speech tokens, prompt mel, speaker embedding, text ids) stored
content-addressed on disk, with named speakers, atomic writes and an LRU size cap.

A hit skips the ONNX encoders entirely. Typical use by the frontend::

    knobs = Knobs.from_env()                   # worker.settings: COSY_CACHE_DIR, COSY_CACHE_MAX_MB
    cache = PromptCache.from_knobs(knobs)
    key = cache_key(samples, rate, prompt_text, model_fingerprint, FRONTEND_VERSION)
    entry, hit = cache.get_or_compute(key, lambda: encode_prompt(...))

A read-only cache directory serves reads; changes raise :class:`ReadOnlyCache`. A damaged
speaker index raises :class:`CorruptIndex`, whose message names the fix
(:meth:`PromptCache.repair_index`, ``python -m cache repair-index``).

Storage rules live in :mod:`cache.store`; the shell commands in :mod:`cache.cli`. This package
reads no environment variable: settings come from :class:`worker.settings.Knobs`.
"""

from cache.store import (
    CacheError,
    CacheStats,
    CorruptIndex,
    IndexRepair,
    InvalidSpeakerName,
    MissingEntry,
    PromptCache,
    PromptEntry,
    ReadOnlyCache,
    SpeakerExists,
    UnknownSpeaker,
    cache_key,
    validate_speaker_name,
)

__all__ = [
    "CacheError",
    "CacheStats",
    "CorruptIndex",
    "IndexRepair",
    "InvalidSpeakerName",
    "MissingEntry",
    "PromptCache",
    "PromptEntry",
    "ReadOnlyCache",
    "SpeakerExists",
    "UnknownSpeaker",
    "cache_key",
    "validate_speaker_name",
]
