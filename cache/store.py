"""The prompt cache: prompt features stored content-addressed on disk, plus named speakers.

A zero-shot request carries a prompt recording and its transcript. Turning them into model
inputs runs two ONNX encoders (CAM++ speaker embedding, speech tokenizer v3) and two feature
extractors -- seconds of CPU per prompt. This module stores their result, a
:class:`PromptEntry`, under a key that names everything the result depends on
(:func:`cache_key`), so the same prompt is never encoded twice and a hit never touches the
encoders.

On-disk layout under the cache root (``Knobs.cache_dir``, i.e. ``COSY_CACHE_DIR``)::

    entries/<sha256 hex>.safetensors   one entry: four arrays + string metadata (never pickle)
    entries/.<key>.<random>.tmp        a write in progress (or left by a crashed writer)
    speakers.json                      named speakers: {"version": 1, "speakers": {name: key}}
    .lock                              fcntl.flock lock for the index and for eviction
    speakers.json.corrupt-<time>       a damaged index set aside by :meth:`PromptCache.repair_index`

Rules this module keeps:

* Entries are written to a temp file in the same directory, fsynced, then ``os.replace``d, so
  a reader sees the old file, the new file or none, never half a file. Two processes writing
  the same key each replace the file with a complete one: one valid entry remains.
* Each entry carries a sha256 checksum over its arrays (dtype, shape, bytes), its prompt text,
  its meta and its key. A truncated, bit-flipped or otherwise unreadable entry is logged,
  deleted and reported as a miss, so :meth:`PromptCache.get_or_compute` recomputes it.
* Recency is the file's mtime (set explicitly, in ns, on every write and hit). :meth:`evict`
  drops the least recently used entries until the total size fits ``max_mb``; entries that a
  named speaker points to are pinned and never evicted.
* The speaker index is read without a lock (it is only ever replaced atomically) and changed
  under an exclusive ``flock`` with read-modify-replace, so concurrent changes never lose one
  another or leave a half-written index.
* A damaged index raises :class:`CorruptIndex` from every operation that needs the names
  (listing, naming, renaming, deleting, stats, clear-unnamed), with one message naming the file
  and the recovery: :meth:`PromptCache.repair_index` (``python -m cache repair-index``) keeps
  every name it can still read and sets the bad file aside; entries are never touched.
* A cache directory this process cannot write (read-only mount, no permission) still serves
  reads: construction creates nothing that exists already, reads take no lock, and the LRU touch
  of a hit, the deletion of a corrupt entry and eviction are skipped. A change (``put``,
  naming, renaming, deleting, ``clear_unnamed``, ``repair_index``) raises :class:`ReadOnlyCache`
  naming the directory; :meth:`PromptCache.get_or_compute` logs it and returns the entry.

Settings come from :class:`worker.settings.Knobs` (:meth:`PromptCache.from_knobs`); this
module reads no environment variable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from worker.settings import Knobs

logger = logging.getLogger(__name__)

ENTRY_FORMAT = "cosyvoice-prompt-cache/1"
INDEX_VERSION = 1
KEY_DOMAIN = b"cosyvoice-prompt-cache-key/1"
DEFAULT_MAX_MB = 2048.0
MAX_SPEAKER_NAME_LEN = 64
STALE_TEMP_SECONDS = 3600.0
MB = 1 << 20  # COSY_CACHE_MAX_MB counts MiB

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_SUFFIX = ".safetensors"
_ARRAYS = ("speech_tokens", "prompt_mel", "speaker_embedding", "prompt_text_ids")


class CacheError(Exception):
    """Base class of the prompt cache's errors."""


REPAIR_COMMAND = "python -m cache --dir {root} repair-index"


class CorruptIndex(CacheError):
    """``speakers.json`` exists but cannot be read as a speaker index.

    The message names the file, what is wrong and how to recover (:meth:`PromptCache.repair_index`,
    i.e. ``python -m cache repair-index``).
    """

    def __init__(self, path: str | os.PathLike[str], detail: str):
        self.path = Path(path)
        self.detail = detail
        command = REPAIR_COMMAND.format(root=self.path.parent)
        super().__init__(
            f"speaker index {self.path} is corrupt ({detail}); recover with `{command}` "
            f"(keeps every name it can still read and sets the bad file aside as "
            f"{self.path.name}.corrupt-<time>; cached entries are not touched)"
        )


class ReadOnlyCache(CacheError):
    """A change was asked of a cache directory this process cannot write.

    Reads keep working on such a cache; the message names the directory and the change.
    """

    def __init__(self, root: str | os.PathLike[str], what: str, exc: OSError | None = None):
        self.root = Path(root)
        self.what = what
        why = ""
        if exc is not None:
            reason = exc.strerror or str(exc)
            where = exc.filename
            if where is not None:
                name = os.path.basename(os.fsdecode(where))
                if name.startswith(".") and name.endswith(".tmp"):  # our temp file: its dir
                    where = os.path.dirname(os.fsdecode(where))
            why = f" ({reason}: {where})" if where else f" ({reason})"
        super().__init__(f"cannot {what}: the prompt cache {self.root} is read-only{why}")


class InvalidSpeakerName(CacheError, ValueError):
    """A speaker name breaks the naming rules (see :func:`validate_speaker_name`)."""


class SpeakerExists(CacheError):
    """The name is taken (pass ``overwrite=True`` to replace it). ``name``: the taken name."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name


class UnknownSpeaker(CacheError, KeyError):
    """No speaker of that name. The message names it and lists the known ones."""

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(repr(n) for n in self.known) if self.known else "(none)"
        super().__init__(f"unknown speaker {name!r}; known speakers: {listed}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class MissingEntry(CacheError, KeyError):
    """A key has no (valid) entry: it was never stored, was evicted or was corrupt."""

    def __str__(self) -> str:
        return str(self.args[0])


# --------------------------------------------------------------------------------------------
# The value


def _as_array(name: str, value: object, dtype: type, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    kind = np.dtype(dtype).kind
    if kind == "i" and arr.dtype.kind not in "iu":
        raise TypeError(f"PromptEntry.{name} must hold integers, got dtype {arr.dtype}")
    if kind == "f" and arr.dtype.kind not in "fiu":
        raise TypeError(f"PromptEntry.{name} must hold numbers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"PromptEntry.{name} must be {ndim}-D, got shape {arr.shape}")
    out = np.ascontiguousarray(arr, dtype=dtype)
    if kind == "i" and out.size and not np.array_equal(out, arr):
        raise ValueError(f"PromptEntry.{name} has values outside the int32 range")
    return out


@dataclass(eq=False)
class PromptEntry:
    """The frontend's result for one prompt: everything the LLM and flow need from it.

    Arrays are converted to the stored dtypes on construction (int32 / float32, C order).
    Only the rank is checked; sizes (mel bins, embedding width) come from the data.
    """

    speech_tokens: np.ndarray  # (N,) int32, speech tokenizer v3 ids of the prompt audio
    prompt_mel: np.ndarray  # (T, n_mels) float32, 24 kHz mel of the prompt (T = 2N upstream)
    speaker_embedding: np.ndarray  # (D,) float32, CAM++ embedding (D = 192)
    prompt_text_ids: np.ndarray  # (M,) int32, tokenized prompt text
    prompt_text: str
    meta: dict[str, str] = field(default_factory=dict)  # free-form: source file, rate, created

    def __post_init__(self) -> None:
        self.speech_tokens = _as_array("speech_tokens", self.speech_tokens, np.int32, 1)
        self.prompt_mel = _as_array("prompt_mel", self.prompt_mel, np.float32, 2)
        self.speaker_embedding = _as_array(
            "speaker_embedding", self.speaker_embedding, np.float32, 1
        )
        self.prompt_text_ids = _as_array("prompt_text_ids", self.prompt_text_ids, np.int32, 1)
        if not isinstance(self.prompt_text, str):
            raise TypeError(f"PromptEntry.prompt_text must be str, got {type(self.prompt_text)}")
        if not isinstance(self.meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.meta.items()
        ):
            raise TypeError("PromptEntry.meta must be a dict[str, str]")
        self.meta = dict(self.meta)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _ARRAYS}

    def same_as(self, other: PromptEntry) -> bool:
        """Equal arrays (dtype, shape, values), prompt text and meta."""
        return (
            self.prompt_text == other.prompt_text
            and self.meta == other.meta
            and all(
                a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
                for a, b in zip(self.arrays().values(), other.arrays().values())
            )
        )


# --------------------------------------------------------------------------------------------
# The key


def _field(h: hashlib._Hash, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def cache_key(
    samples: np.ndarray,
    sample_rate: int,
    prompt_text: str,
    model_fingerprint: str,
    frontend_version: str,
) -> str:
    """sha256 hex naming a prompt's features.

    Covers the decoded samples (dtype, shape and bytes, little-endian), their rate, the prompt
    text (utf-8), the model fingerprint (whatever identifies the encoder/tokenizer files) and the
    frontend version (bump it when feature extraction changes). Every field is length-prefixed,
    so no two different field tuples encode to the same bytes.
    """
    arr = np.asarray(samples)
    if arr.dtype.hasobject:
        raise TypeError("samples must be a numeric array")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise TypeError(f"sample_rate must be an int, got {type(sample_rate).__name__}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    for name, value in (
        ("prompt_text", prompt_text),
        ("model_fingerprint", model_fingerprint),
        ("frontend_version", frontend_version),
    ):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be str, got {type(value).__name__}")
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    h = hashlib.sha256()
    _field(h, KEY_DOMAIN)
    _field(h, arr.dtype.str.encode())
    _field(h, json.dumps(list(arr.shape)).encode())
    _field(h, arr.tobytes())
    _field(h, str(int(sample_rate)).encode())
    _field(h, prompt_text.encode("utf-8"))
    _field(h, model_fingerprint.encode("utf-8"))
    _field(h, frontend_version.encode("utf-8"))
    return h.hexdigest()


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"not a cache key (64 lowercase hex chars): {key!r}")
    return key


# --------------------------------------------------------------------------------------------
# Entry files


def _checksum(key: str, arrays: dict[str, np.ndarray], prompt_text: str, meta_json: str) -> str:
    h = hashlib.sha256()
    _field(h, ENTRY_FORMAT.encode())
    _field(h, key.encode())
    for name in _ARRAYS:
        arr = arrays[name]
        _field(h, name.encode())
        _field(h, arr.dtype.str.encode())
        _field(h, json.dumps(list(arr.shape)).encode())
        _field(h, arr.tobytes())
    _field(h, prompt_text.encode("utf-8"))
    _field(h, meta_json.encode("utf-8"))
    return h.hexdigest()


def _encode_entry(key: str, entry: PromptEntry) -> bytes:
    arrays = entry.arrays()
    meta_json = json.dumps(entry.meta, sort_keys=True, ensure_ascii=False)
    metadata = {
        "format": ENTRY_FORMAT,
        "key": key,
        "prompt_text": entry.prompt_text,
        "meta": meta_json,
        "checksum": _checksum(key, arrays, entry.prompt_text, meta_json),
    }
    import safetensors.numpy  # here, not at import: the client reuses the name rules only

    return safetensors.numpy.save(arrays, metadata=metadata)


_EXPECTED = {
    "speech_tokens": (np.int32, 1),
    "prompt_mel": (np.float32, 2),
    "speaker_embedding": (np.float32, 1),
    "prompt_text_ids": (np.int32, 1),
}


def _decode_entry(key: str, data: bytes) -> PromptEntry:
    """Parse and verify an entry file's bytes; any defect raises ``ValueError``."""
    if len(data) < 8:
        raise ValueError(f"file too short ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"header length {header_len} exceeds file size {len(data)}")
    try:
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        import safetensors.numpy

        arrays = safetensors.numpy.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(f"unreadable safetensors data: {exc}") from exc
    if metadata.get("format") != ENTRY_FORMAT:
        raise ValueError(f"unknown entry format {metadata.get('format')!r}")
    if metadata.get("key") != key:
        raise ValueError(f"entry was stored under key {metadata.get('key')!r}")
    if set(arrays) != set(_ARRAYS):
        raise ValueError(f"entry holds arrays {sorted(arrays)}, expected {sorted(_ARRAYS)}")
    for name, (dtype, ndim) in _EXPECTED.items():
        if arrays[name].dtype != dtype or arrays[name].ndim != ndim:
            raise ValueError(f"{name}: dtype {arrays[name].dtype} shape {arrays[name].shape}")
    prompt_text = metadata.get("prompt_text")
    meta_json = metadata.get("meta")
    if not isinstance(prompt_text, str) or not isinstance(meta_json, str):
        raise ValueError("entry metadata lacks prompt_text or meta")
    expected = _checksum(key, arrays, prompt_text, meta_json)
    if metadata.get("checksum") != expected:
        raise ValueError("checksum mismatch")
    meta = json.loads(meta_json)
    # Copies: safetensors returns read-only views of ``data``.
    return PromptEntry(
        **{name: np.array(arrays[name]) for name in _ARRAYS},
        prompt_text=prompt_text,
        meta=meta,
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def _is_read_only(exc: BaseException) -> bool:
    """True for the errors a directory we may not write gives (read-only mount, permissions)."""
    return isinstance(exc, OSError) and exc.errno in _READ_ONLY_ERRNOS


def _atomic_write(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    """Write ``data`` to ``path`` via a same-directory temp file, fsync and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------
# Speaker names


def validate_speaker_name(name: str) -> str:
    """Return ``name`` if it is a valid speaker name, else raise :class:`InvalidSpeakerName`.

    Rules: a non-empty str of at most 64 characters, no leading/trailing whitespace, no path
    separators (``/``, ``\\``) and no control characters.
    """
    if not isinstance(name, str):
        raise InvalidSpeakerName(f"speaker name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidSpeakerName("speaker name must not be empty")
    if len(name) > MAX_SPEAKER_NAME_LEN:
        raise InvalidSpeakerName(
            f"speaker name is {len(name)} characters long, at most {MAX_SPEAKER_NAME_LEN} allowed"
        )
    if name != name.strip():
        raise InvalidSpeakerName(f"speaker name {name!r} has leading or trailing whitespace")
    if "/" in name or "\\" in name:
        raise InvalidSpeakerName(f"speaker name {name!r} contains a path separator")
    if any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in name):
        raise InvalidSpeakerName(f"speaker name {name!r} contains a control character")
    return name


# --------------------------------------------------------------------------------------------
# The cache


@dataclass
class CacheStats:
    root: str
    entries: int
    bytes: int
    max_bytes: float  # math.inf when uncapped
    speakers: int
    pinned_entries: int
    pinned_bytes: int
    temp_files: int
    # counters of this PromptCache object (this process) since it was made
    hits: int
    misses: int
    corrupt_dropped: int
    evicted: int

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class _EntryFile:
    key: str
    path: Path
    size: int
    mtime_ns: int


@dataclass
class IndexRepair:
    """What :meth:`PromptCache.repair_index` did."""

    path: Path  # the index file
    was_corrupt: bool  # False: the index was readable (or absent) and was left alone
    kept: dict[str, str]  # the names now in the index, {name: key}
    backup: Path | None  # where the damaged file was set aside (None if nothing was wrong)


# ``"name": "<64 hex>"`` pairs, for salvaging names out of a damaged index
_PAIR_RE = re.compile(r'"((?:[^"\\\n]|\\.){1,400})"\s*:\s*"([0-9a-f]{64})"')


def _salvage_pairs(raw: bytes) -> dict[str, str]:
    """Every ``name -> key`` pair still readable in a damaged index's bytes."""
    found: dict[str, str] = {}
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("speakers"), dict):
        candidates = list(doc["speakers"].items())
    else:
        text = raw.decode("utf-8", errors="replace")
        candidates = []
        for m in _PAIR_RE.finditer(text):
            try:
                candidates.append((json.loads(f'"{m.group(1)}"'), m.group(2)))
            except ValueError:
                continue
    for name, key in candidates:
        try:
            validate_speaker_name(name)
            _check_key(key)
        except (CacheError, ValueError):
            continue
        found[name] = key
    return found


class PromptCache:
    """Prompt features on disk under ``root``, capped at ``max_mb`` MiB, with named speakers.

    Safe to share between threads and processes: every file is replaced atomically and every
    index change or eviction runs under an exclusive ``flock`` on ``root/.lock``. A ``root``
    this process cannot write still serves reads (see the module docstring); changes then raise
    :class:`ReadOnlyCache`.
    """

    def __init__(self, root: str | os.PathLike[str], max_mb: float = DEFAULT_MAX_MB):
        max_mb = float(max_mb)
        if not max_mb > 0:
            raise ValueError(f"max_mb must be > 0 (math.inf for no cap), got {max_mb}")
        self.root = Path(root).expanduser()
        self.max_bytes = max_mb * MB
        self.entries_dir = self.root / "entries"
        self.index_path = self.root / "speakers.json"
        self.lock_path = self.root / ".lock"
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"prompt cache directory {self.root} exists and is not a directory")
        if not self.entries_dir.is_dir():  # an existing cache needs no write to be read
            try:
                self.entries_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if not (_is_read_only(exc) and self.root.is_dir()):
                    reason = exc.strerror or str(exc)
                    raise CacheError(
                        f"cannot create the prompt cache directory {self.entries_dir}: {reason}"
                    ) from exc
                # an existing, read-only root without entries: an empty cache that can be read
        self.hits = self.misses = self.corrupt_dropped = self.evicted = 0

    @classmethod
    def from_knobs(cls, knobs: Knobs) -> PromptCache:
        """A cache at ``knobs.cache_dir`` capped at ``knobs.cache_max_mb`` (``COSY_CACHE_DIR``,
        ``COSY_CACHE_MAX_MB``, validated by :meth:`worker.settings.Knobs.from_env`)."""
        return cls(knobs.cache_dir, knobs.cache_max_mb)

    def __repr__(self) -> str:
        return f"PromptCache({str(self.root)!r}, max_mb={self.max_bytes / MB:g})"

    # -- changes and read-only directories ---------------------------------------------------

    @contextlib.contextmanager
    def _change(self, what: str, lock: bool = True) -> Iterator[None]:
        """Run a change (under the lock unless ``lock=False``); a write refused by the file
        system (read-only mount, permissions) becomes :class:`ReadOnlyCache`."""
        try:
            if lock:
                with self._locked():
                    yield
            else:
                yield
        except OSError as exc:
            if _is_read_only(exc):
                raise ReadOnlyCache(self.root, what, exc) from exc
            raise

    def check_writable(self, what: str = "change the prompt cache") -> None:
        """Raise :class:`ReadOnlyCache` unless a file can be created in the cache directory.

        Cheap (one temp file); call it before expensive work whose result must be stored.
        """
        with self._change(what, lock=False):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".probe.", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)

    # -- entries ----------------------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        return self.entries_dir / f"{_check_key(key)}{_ENTRY_SUFFIX}"

    def __contains__(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def get(self, key: str, *, touch: bool = True) -> PromptEntry | None:
        """The entry for ``key``, or None. A hit makes it the most recently used (unless
        ``touch=False``, e.g. for listing).

        A corrupt, truncated or unreadable entry is logged, deleted and reported as a miss.
        """
        path = self.path_for(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as exc:
            self._drop_corrupt(path, None, f"cannot read: {exc}")
            self.misses += 1
            return None
        try:
            entry = _decode_entry(key, data)
        except Exception as exc:  # any defect in the bytes: drop and recompute
            self._drop_corrupt(path, st, str(exc))
            self.misses += 1
            return None
        if touch:
            self._touch(path)
        self.hits += 1
        return entry

    def put(self, key: str, entry: PromptEntry) -> None:
        """Store ``entry`` under ``key`` (atomically, replacing any old one), then evict.

        Raises :class:`ReadOnlyCache` if the cache directory cannot be written.
        """
        if not isinstance(entry, PromptEntry):
            raise TypeError(f"expected a PromptEntry, got {type(entry).__name__}")
        path = self.path_for(key)
        with self._change(f"store entry {key[:12]}…", lock=False):
            self._write_entry(path, key, entry)
        self.evict()

    def _write_entry(self, path: Path, key: str, entry: PromptEntry) -> None:
        if not self.entries_dir.is_dir():  # a read-only root could not create it at start
            self.entries_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, _encode_entry(key, entry), mtime_ns=time.time_ns())

    def get_or_compute(
        self, key: str, compute: Callable[[], PromptEntry]
    ) -> tuple[PromptEntry, bool]:
        """``(entry, hit)``: the stored entry, or ``compute()``'s result stored under ``key``.

        ``compute`` runs only on a miss (never on a hit). Two processes missing the same key at
        once both compute; both writes are complete, so one valid entry remains. A failed
        store (disk full, read-only) is logged; the computed entry is still returned.
        """
        entry = self.get(key)
        if entry is not None:
            return entry, True
        entry = compute()
        if not isinstance(entry, PromptEntry):
            raise TypeError(f"compute() returned {type(entry).__name__}, not a PromptEntry")
        try:
            self.put(key, entry)
        except (OSError, ReadOnlyCache) as exc:  # the request still gets its features
            logger.warning("prompt cache: could not store entry %s: %s", key[:12], exc)
        return entry, False

    def _touch(self, path: Path) -> None:
        now = time.time_ns()
        try:
            os.utime(path, ns=(now, now))
        except FileNotFoundError:  # evicted or replaced meanwhile: fine
            pass
        except OSError as exc:
            if not _is_read_only(exc):
                raise
            # read-only cache: recency is not recorded, the entry is served all the same

    def _drop_corrupt(self, path: Path, st: os.stat_result | None, why: str) -> None:
        self.corrupt_dropped += 1
        try:
            now = os.stat(path)
        except FileNotFoundError:
            logger.warning("prompt cache: dropping corrupt entry %s (%s)", path.name, why)
            return
        # Do not delete a fresh, complete file another process put there after we read.
        if st is not None and (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
            logger.warning("prompt cache: corrupt read of entry %s (%s); replaced meanwhile",
                           path.name, why)  # fmt: skip
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning(
                "prompt cache: corrupt entry %s (%s); cannot delete it: %s", path.name, why, exc
            )
            return
        logger.warning("prompt cache: dropping corrupt entry %s (%s)", path.name, why)

    def _entry_files(self) -> tuple[list[_EntryFile], list[Path]]:
        files: list[_EntryFile] = []
        temps: list[Path] = []
        try:
            it = os.scandir(self.entries_dir)
        except FileNotFoundError:  # a read-only root that never held an entry
            return files, temps
        with it:
            for de in it:
                name = de.name
                if name.startswith(".") and name.endswith(".tmp"):
                    temps.append(Path(de.path))
                    continue
                if not name.endswith(_ENTRY_SUFFIX):
                    continue
                key = name[: -len(_ENTRY_SUFFIX)]
                if not _KEY_RE.match(key):
                    continue
                try:
                    st = de.stat()
                except FileNotFoundError:
                    continue
                files.append(_EntryFile(key, Path(de.path), st.st_size, st.st_mtime_ns))
        return files, temps

    def evict(self) -> list[str]:
        """Delete least recently used, unnamed entries until the total fits the cap.

        Entries of named speakers are never deleted (if they alone exceed the cap, a warning
        is logged). Temp files older than an hour (crashed writers) are removed too. Returns
        the evicted keys. On a read-only cache nothing can be deleted: returns ``[]``.
        """
        try:
            with self._locked():
                return self._evict_locked()
        except OSError as exc:
            if not _is_read_only(exc):
                raise
            logger.debug("prompt cache: not evicting, %s is read-only (%s)", self.root, exc)
            return []

    def _evict_locked(self) -> list[str]:
        files, temps = self._entry_files()
        self._remove_stale_temps(temps)
        total = sum(f.size for f in files)
        if total <= self.max_bytes:
            return []
        try:
            pinned = set(self._read_index().values())
        except CacheError as exc:
            logger.error("prompt cache: not evicting, %s", exc)
            return []
        evicted: list[str] = []
        for f in sorted(files, key=lambda f: (f.mtime_ns, f.key)):
            if total <= self.max_bytes:
                break
            if f.key in pinned:
                continue
            try:
                os.unlink(f.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if not _is_read_only(exc):
                    raise
                logger.debug("prompt cache: not evicting, %s is read-only (%s)", self.root, exc)
                break
            total -= f.size
            evicted.append(f.key)
        self.evicted += len(evicted)
        if total > self.max_bytes:
            logger.warning(
                "prompt cache: %.1f MiB of named speakers exceed the %.1f MiB cap",
                total / MB,
                self.max_bytes / MB,
            )
        return evicted

    def _remove_stale_temps(self, temps: list[Path]) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in temps:
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if not _is_read_only(exc):
                    raise

    def clear_unnamed(self) -> tuple[int, int]:
        """Delete every entry no named speaker points to. Returns ``(entries, bytes)`` freed."""
        with self._change("clear unnamed entries"):
            pinned = set(self._read_index().values())
            files, _ = self._entry_files()
            count = freed = 0
            for f in files:
                if f.key in pinned:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f.path)
                    count += 1
                    freed += f.size
            return count, freed

    def stats(self) -> CacheStats:
        """Sizes, counts and this object's counters. Raises :class:`CorruptIndex` for a
        damaged index (the speaker counts would be wrong)."""
        index = self._read_index()
        files, temps = self._entry_files()
        pinned = set(index.values())
        pinned_files = [f for f in files if f.key in pinned]
        return CacheStats(
            root=str(self.root),
            entries=len(files),
            bytes=sum(f.size for f in files),
            max_bytes=self.max_bytes,
            speakers=len(index),
            pinned_entries=len(pinned_files),
            pinned_bytes=sum(f.size for f in pinned_files),
            temp_files=len(temps),
            hits=self.hits,
            misses=self.misses,
            corrupt_dropped=self.corrupt_dropped,
            evicted=self.evicted,
        )

    # -- named speakers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A fresh open file description per acquisition: flock then excludes other threads of
        # this process as well as other processes. Never nest (it would deadlock).
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if not _is_read_only(exc):
                raise
            try:  # flock works on a read-only descriptor too
                fd = os.open(self.lock_path, os.O_RDONLY)
            except OSError:
                raise exc from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read_index(self) -> dict[str, str]:
        path = self.index_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        except IsADirectoryError:
            raise CorruptIndex(path, "it is a directory, not a file") from None
        except OSError as exc:
            raise CacheError(f"cannot read speaker index {path}: {exc.strerror or exc}") from exc
        return _parse_index(path, raw)

    def _write_index(self, speakers: dict[str, str]) -> None:
        doc = {"version": INDEX_VERSION, "speakers": dict(sorted(speakers.items()))}
        data = json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
        _atomic_write(self.index_path, data)

    def speakers(self) -> dict[str, str]:
        """Named speakers: ``{name: key}``."""
        return self._read_index()

    def speaker_key(self, name: str) -> str:
        index = self._read_index()
        if name not in index:
            raise UnknownSpeaker(name, list(index))
        return index[name]

    def speaker(self, name: str) -> PromptEntry:
        """The entry of a named speaker.

        Raises :class:`UnknownSpeaker` for an unknown name, :class:`MissingEntry` if the
        entry it points to is gone (e.g. was dropped as corrupt: add the speaker again).
        """
        key = self.speaker_key(name)
        entry = self.get(key)
        if entry is None:
            raise MissingEntry(
                f"speaker {name!r} points to entry {key[:12]}… which is missing or was corrupt; "
                "add the speaker again from its prompt audio"
            )
        return entry

    def add_speaker(
        self,
        name: str,
        key: str,
        *,
        overwrite: bool = False,
        entry: PromptEntry | None = None,
    ) -> None:
        """Name the entry ``key``. An existing name is an error (:class:`SpeakerExists`)
        unless ``overwrite``. Named entries are never evicted.

        Without ``entry`` the entry must be stored already (else :class:`MissingEntry`); with
        it, the entry is written and named under one lock, so no eviction can come between.
        """
        validate_speaker_name(name)
        if entry is not None and not isinstance(entry, PromptEntry):
            raise TypeError(f"expected a PromptEntry, got {type(entry).__name__}")
        path = self.path_for(key)
        with self._change(f"add speaker {name!r}"):
            index = self._read_index()
            if name in index and not overwrite:
                raise SpeakerExists(
                    f"speaker {name!r} already exists (entry {index[name][:12]}…); "
                    "pass overwrite=True to replace it",
                    name,
                )
            if entry is not None:
                self._write_entry(path, key, entry)
            elif not path.is_file():
                raise MissingEntry(f"no cache entry {key}; put it before naming it")
            index[name] = key
            self._write_index(index)
        if entry is not None:
            self.evict()

    def delete_speaker(self, name: str) -> str:
        """Forget a name (its entry stays, unpinned). Returns the key it pointed to."""
        with self._change(f"delete speaker {name!r}"):
            index = self._read_index()
            if name not in index:
                raise UnknownSpeaker(name, list(index))
            key = index.pop(name)
            self._write_index(index)
            return key

    def rename_speaker(self, old: str, new: str) -> None:
        """Rename a speaker; ``new`` must be a valid name that is not taken."""
        validate_speaker_name(new)
        with self._change(f"rename speaker {old!r}"):
            index = self._read_index()
            if old not in index:
                raise UnknownSpeaker(old, list(index))
            if new == old:
                return
            if new in index:
                raise SpeakerExists(
                    f"cannot rename {old!r}: speaker {new!r} already exists; "
                    "delete or rename that one first",
                    new,
                )
            index[new] = index.pop(old)
            self._write_index(index)

    def repair_index(self) -> IndexRepair:
        """Recover from a damaged ``speakers.json`` (the fix :class:`CorruptIndex` names).

        A readable (or absent) index is left alone. Otherwise the bad file is copied to
        ``speakers.json.corrupt-<time>``, every ``name -> key`` pair that can still be read from
        it is kept, and a valid index holding those is written in its place. Entries are never
        touched; the entries of lost names become unpinned (evictable) until named again.
        """
        with self._change("repair the speaker index"):
            try:
                raw = self.index_path.read_bytes()
            except FileNotFoundError:
                return IndexRepair(self.index_path, False, {}, None)
            except IsADirectoryError:
                raw = None
            if raw is not None:
                try:
                    return IndexRepair(self.index_path, False, _parse_index(self.index_path, raw),
                                       None)  # fmt: skip
                except CorruptIndex:
                    pass
            kept = _salvage_pairs(raw) if raw is not None else {}
            stamp = time.strftime("%Y%m%d-%H%M%S")
            backup = self.index_path.with_name(f"{self.index_path.name}.corrupt-{stamp}")
            n = 1
            while backup.exists():
                n += 1
                backup = self.index_path.with_name(f"{self.index_path.name}.corrupt-{stamp}-{n}")
            if raw is None:  # a directory where the file belongs: move it aside
                os.replace(self.index_path, backup)
            else:
                _atomic_write(backup, raw)
            self._write_index(kept)
            logger.info(
                "prompt cache: rebuilt speaker index %s with %d name(s); damaged file kept as %s",
                self.index_path, len(kept), backup,
            )  # fmt: skip
            return IndexRepair(self.index_path, True, kept, backup)


def _parse_index(path: Path, raw: bytes) -> dict[str, str]:
    """``{name: key}`` from an index file's bytes; any defect raises :class:`CorruptIndex`."""
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError:
        raise CorruptIndex(path, "not UTF-8 text") from None
    except ValueError as exc:
        raise CorruptIndex(path, f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CorruptIndex(
            path, f'expected a JSON object with "version" and "speakers", got {type(doc).__name__}'
        )
    if doc.get("version") != INDEX_VERSION:
        raise CorruptIndex(path, f"version is {doc.get('version')!r}, expected {INDEX_VERSION}")
    speakers = doc.get("speakers")
    if not isinstance(speakers, dict):
        raise CorruptIndex(path, f'"speakers" is {type(speakers).__name__}, expected an object')
    for name, key in speakers.items():
        try:
            validate_speaker_name(name)
            _check_key(key)
        except (CacheError, ValueError) as exc:
            raise CorruptIndex(path, f"speaker {name!r}: {exc}") from None
    return dict(speakers)


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
