"""Prompt cache: prompt features (speech tokens, prompt mel, speaker embedding, text ids) stored
content-addressed on disk, with named speakers, atomic writes and an LRU size cap.

A hit skips the ONNX encoders entirely. Typical use by the frontend::

    cache = PromptCache.from_env()  # $COSY_CACHE_DIR, $COSY_CACHE_MAX_MB
    key = cache_key(samples, rate, prompt_text, model_fingerprint, FRONTEND_VERSION)
    entry, hit = cache.get_or_compute(key, lambda: encode_prompt(...))

Storage rules live in :mod:`cache.store`; the shell commands in :mod:`cache.cli`.
"""

from cache.store import (
    CacheError,
    CacheStats,
    CorruptIndex,
    InvalidSpeakerName,
    MissingEntry,
    PromptCache,
    PromptEntry,
    SpeakerExists,
    UnknownSpeaker,
    cache_key,
    default_cache_dir,
    default_max_mb,
    validate_speaker_name,
)

__all__ = [
    "CacheError",
    "CacheStats",
    "CorruptIndex",
    "InvalidSpeakerName",
    "MissingEntry",
    "PromptCache",
    "PromptEntry",
    "SpeakerExists",
    "UnknownSpeaker",
    "cache_key",
    "default_cache_dir",
    "default_max_mb",
    "validate_speaker_name",
]
