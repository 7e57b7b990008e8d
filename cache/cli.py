"""``python -m cache``: manage the prompt cache's named speakers from a shell.

    python -m cache [--dir DIR] [--max-mb MB] list
    python -m cache [--dir DIR] show NAME
    python -m cache [--dir DIR] delete NAME
    python -m cache [--dir DIR] rename OLD NEW
    python -m cache [--dir DIR] stats
    python -m cache [--dir DIR] clear-unnamed
    python -m cache [--dir DIR] add NAME --model-dir DIR --prompt-wav F [--prompt-text T]
                                     [--overwrite]

``--dir`` defaults to ``$COSY_CACHE_DIR``, else ``~/.cache/cosyvoice-worker``; ``--max-mb`` to
``$COSY_CACHE_MAX_MB``, else 2048. Errors print one ``error: ...`` line and exit with 2.

``add`` runs the prompt frontend: it calls
``worker.frontend.prepare.prepare_prompt(model_dir, prompt_wav, prompt_text, cache)``, which
must compute (or find) the prompt's :class:`~cache.store.PromptEntry`, store it in ``cache``
and return its key (str); ``add`` then names that key. ``prompt_text`` is ``""`` when
``--prompt-text`` is not given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cache.store import (
    CacheError,
    PromptCache,
    default_cache_dir,
    default_max_mb,
    validate_speaker_name,
)

EXIT_ERROR = 2


class CliError(Exception):
    """A user-facing failure: printed as ``error: <message>``, exit code 2."""


def _human(n: float) -> str:
    if n == float("inf"):
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _short(text: str, width: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_list(cache: PromptCache, args: argparse.Namespace) -> None:
    speakers = cache.speakers()
    if not speakers:
        print(f"no named speakers in {cache.root}")
        return
    width = max(len(n) for n in speakers)
    for name, key in sorted(speakers.items()):
        entry = cache.get(key)
        if entry is None:
            detail = "(entry missing or corrupt: add the speaker again)"
        else:
            seconds = entry.speech_tokens.shape[0] / 25  # 25 speech tokens per second
            detail = f"{seconds:5.1f} s  {_short(entry.prompt_text)!r}"
        print(f"{name:<{width}}  {key[:16]}  {detail}")


def cmd_show(cache: PromptCache, args: argparse.Namespace) -> None:
    key = cache.speaker_key(args.name)
    path = cache.path_for(key)
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    entry = cache.speaker(args.name)  # raises MissingEntry (and drops a corrupt file)
    rows = [("speaker", args.name), ("key", key), ("file", str(path))]
    if st is not None:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
        rows += [("size", _human(st.st_size)), ("last used", used)]
    rows.append(("prompt text", entry.prompt_text))
    for name, arr in entry.arrays().items():
        rows.append((name, f"{arr.dtype} {tuple(arr.shape)}"))
    rows += [(f"meta.{k}", v) for k, v in sorted(entry.meta.items())]
    width = max(len(k) for k, _ in rows) + 1
    for k, v in rows:
        print(f"{k + ':':<{width}} {v}")


def cmd_delete(cache: PromptCache, args: argparse.Namespace) -> None:
    key = cache.delete_speaker(args.name)
    print(f"deleted speaker {args.name!r} (entry {key[:16]} kept until evicted)")


def cmd_rename(cache: PromptCache, args: argparse.Namespace) -> None:
    cache.rename_speaker(args.old, args.new)
    print(f"renamed speaker {args.old!r} to {args.new!r}")


def cmd_stats(cache: PromptCache, args: argparse.Namespace) -> None:
    s = cache.stats()
    print(f"root:      {s.root}")
    print(f"entries:   {s.entries} ({_human(s.bytes)} of {_human(s.max_bytes)})")
    print(f"speakers:  {s.speakers} ({s.pinned_entries} pinned entries, {_human(s.pinned_bytes)})")
    if s.temp_files:
        print(f"temp:      {s.temp_files} partial writes (removed after an hour)")


def cmd_clear_unnamed(cache: PromptCache, args: argparse.Namespace) -> None:
    count, freed = cache.clear_unnamed()
    print(f"removed {count} unnamed entries ({_human(freed)}); named speakers kept")


def cmd_add(cache: PromptCache, args: argparse.Namespace) -> None:
    validate_speaker_name(args.name)
    if args.name in cache.speakers() and not args.overwrite:
        raise CliError(f"speaker {args.name!r} already exists; pass --overwrite to replace it")
    if not Path(args.prompt_wav).is_file():
        raise CliError(f"prompt audio not found: {args.prompt_wav}")
    try:
        from worker.frontend.prepare import prepare_prompt
    except ImportError as exc:
        raise CliError(
            "`add` needs the prompt frontend (worker.frontend.prepare.prepare_prompt), "
            f"which is not available in this checkout: {exc}"
        ) from exc
    key = prepare_prompt(args.model_dir, args.prompt_wav, args.prompt_text, cache)
    if not isinstance(key, str):
        raise CliError(f"prepare_prompt returned {type(key).__name__}, expected the cache key")
    cache.add_speaker(args.name, key, overwrite=args.overwrite)
    print(f"added speaker {args.name!r} -> {key[:16]}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cache",
        description="Manage the CosyVoice worker's prompt cache and named speakers.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="cache directory (default: $COSY_CACHE_DIR, else ~/.cache/cosyvoice-worker)",
    )
    p.add_argument(
        "--max-mb",
        type=float,
        default=None,
        help="size cap in MiB (default: $COSY_CACHE_MAX_MB, else 2048)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="list named speakers")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="show a named speaker's entry")
    s.add_argument("name")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("delete", help="forget a speaker name (its entry becomes evictable)")
    s.add_argument("name")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("rename", help="rename a speaker")
    s.add_argument("old")
    s.add_argument("new")
    s.set_defaults(func=cmd_rename)

    s = sub.add_parser("stats", help="entries, sizes and the cap")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("clear-unnamed", help="delete every entry no speaker name points to")
    s.set_defaults(func=cmd_clear_unnamed)

    s = sub.add_parser(
        "add",
        help="encode a prompt recording and name it",
        description="Run the prompt frontend (worker.frontend.prepare.prepare_prompt) on a "
        "recording, store its features in the cache and name the entry.",
    )
    s.add_argument("name")
    s.add_argument("--model-dir", required=True, help="CosyVoice3 model directory")
    s.add_argument("--prompt-wav", required=True, help="prompt recording (any libsndfile format)")
    s.add_argument("--prompt-text", default="", help="transcript of the prompt recording")
    s.add_argument("--overwrite", action="store_true", help="replace an existing name")
    s.set_defaults(func=cmd_add)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root = args.dir if args.dir is not None else default_cache_dir()
        max_mb = args.max_mb if args.max_mb is not None else default_max_mb()
        cache = PromptCache(root, max_mb)
        args.func(cache, args)
    except (CliError, CacheError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


__all__ = ["build_parser", "main"]
