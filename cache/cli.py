"""``python -m cache``: manage the prompt cache's named speakers from a shell.

    python -m cache [--dir DIR] [--max-mb MB] list
    python -m cache [--dir DIR] show NAME
    python -m cache [--dir DIR] delete NAME
    python -m cache [--dir DIR] rename OLD NEW
    python -m cache [--dir DIR] stats
    python -m cache [--dir DIR] clear-unnamed
    python -m cache [--dir DIR] repair-index
    python -m cache [--dir DIR] add NAME --model-dir DIR --prompt-wav F [--prompt-text T]
                                     [--overwrite]

Settings come from :meth:`worker.settings.Knobs.from_env` (``COSY_CACHE_DIR``,
``COSY_CACHE_MAX_MB``, and ``COSY_FRONTEND_THREADS`` for ``add``); ``--dir`` and ``--max-mb``
override the first two. Every error (bad flag, bad ``COSY_*`` setting, unknown speaker, damaged
index, read-only directory, bad prompt audio) is one ``error: ...`` line on stderr and exit
code 2, never a traceback.

``add`` runs the same code as the service: :meth:`worker.frontend.prepare.Frontend.add_speaker`
(load and check the audio, encode it through the cache, name the entry). It refuses a taken
name (without ``--overwrite``) and a read-only cache before encoding anything.

``repair-index`` recovers from a damaged ``speakers.json`` (what every other command's
"corrupt" error points to): it keeps every name it can still read, sets the bad file aside as
``speakers.json.corrupt-<time>`` and writes a valid index. Cached entries are not touched.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from cache.store import (
    CacheError,
    MissingEntry,
    PromptCache,
    SpeakerExists,
    validate_speaker_name,
)

EXIT_ERROR = 2
PROG = "python -m cache"


class CliError(Exception):
    """A user-facing failure: printed as ``error: <message>``, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: multi-line messages (a list of problems, a yaml
    parser's context) are joined with ``; `` (a space after a trailing colon), caret lines
    dropped."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__ and exc.args:
        text = str(exc.args[0])
    out = ""
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or not any(c.isalnum() for c in line):
            continue
        out = line if not out else out + (" " if out.endswith(":") else "; ") + line
    return out.rstrip(":") or type(exc).__name__


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


def _readd_hint(name: str) -> str:
    return f"{PROG} add {name} --model-dir DIR --prompt-wav FILE [--prompt-text T] --overwrite"


def cmd_list(cache: PromptCache, args: argparse.Namespace) -> None:
    speakers = cache.speakers()
    if not speakers:
        print(f"no named speakers in {cache.root}")
        return
    width = max(len(n) for n in speakers)
    for name, key in sorted(speakers.items()):
        entry = cache.get(key, touch=False)
        if entry is None:
            detail = f"(entry missing or corrupt: re-add with `{_readd_hint(name)}`)"
        else:
            seconds = entry.speech_tokens.shape[0] / 25  # 25 speech tokens per second
            text = repr(_short(entry.prompt_text)) if entry.prompt_text else "(no transcript)"
            detail = f"{seconds:5.1f} s  {text}"
        print(f"{name:<{width}}  {key[:16]}  {detail}")


def cmd_show(cache: PromptCache, args: argparse.Namespace) -> None:
    key = cache.speaker_key(args.name)
    path = cache.path_for(key)
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    try:
        entry = cache.speaker(args.name)  # drops a corrupt file
    except MissingEntry:
        raise CliError(
            f"speaker {args.name!r} points to entry {key[:12]}… which is missing or was "
            f"corrupt; re-add it with `{_readd_hint(args.name)}`"
        ) from None
    rows = [("speaker", args.name), ("key", key), ("file", str(path))]
    if st is not None:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
        rows += [("size", _human(st.st_size)), ("last used", used)]
    rows.append(("prompt text", entry.prompt_text if entry.prompt_text else "(no transcript)"))
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


def cmd_repair_index(cache: PromptCache, args: argparse.Namespace) -> None:
    r = cache.repair_index()
    if not r.was_corrupt:
        n = len(r.kept)
        print(f"speaker index {r.path} is fine ({n} speaker{'s' * (n != 1)}); nothing to repair")
        return
    names = ", ".join(repr(n) for n in sorted(r.kept)) or "none"
    n = len(r.kept)
    print(f"rebuilt speaker index {r.path}: kept {n} speaker{'s' * (n != 1)} ({names})")
    print(f"the damaged file is saved as {r.backup}; re-add any speaker that is missing")


def cmd_add(cache: PromptCache, args: argparse.Namespace) -> None:
    validate_speaker_name(args.name)
    if args.name in cache.speakers() and not args.overwrite:
        raise CliError(f"speaker {args.name!r} already exists; pass --overwrite to replace it")
    cache.check_writable(f"add speaker {args.name!r}")
    if not Path(args.prompt_wav).is_file():
        raise CliError(f"--prompt-wav: file not found: {args.prompt_wav}")
    if not Path(args.model_dir).is_dir():
        raise CliError(f"--model-dir: not a directory: {args.model_dir}")
    try:
        from worker.frontend.prepare import Frontend
    except ImportError as exc:
        raise CliError(
            "`add` needs the prompt frontend (worker.frontend.prepare.Frontend), "
            f"which is not available in this checkout: {exc}"
        ) from exc
    frontend = Frontend(args.model_dir, cache, knobs=args.knobs)
    try:
        info = frontend.add_speaker(
            args.name, Path(args.prompt_wav), args.prompt_text, overwrite=args.overwrite
        )
    except SpeakerExists as exc:  # added by someone else while the prompt was encoded
        msg = f"speaker {exc.name!r} already exists; pass --overwrite to replace it"
        raise CliError(msg) from None
    note = "" if info["has_transcript"] else " (no transcript: usable for cross_lingual/instruct2)"
    print(f"added speaker {info['name']!r} -> {info['key'][:16]}{note}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Manage the CosyVoice worker's prompt cache and named speakers.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="cache directory (default: COSY_CACHE_DIR, else ~/.cache/cosyvoice-worker)",
    )
    p.add_argument(
        "--max-mb",
        type=float,
        default=None,
        help="size cap in MiB, inf for none (default: COSY_CACHE_MAX_MB, else 2048)",
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
        "repair-index",
        help="rebuild a damaged speakers.json (keeps the names still readable)",
        description="Keep every name -> entry pair still readable in a damaged speakers.json, "
        "save the damaged file as speakers.json.corrupt-<time> and write a valid index. "
        "Cached entries are not touched.",
    )
    s.set_defaults(func=cmd_repair_index)

    s = sub.add_parser(
        "add",
        help="encode a prompt recording and name it",
        description="Run the prompt frontend (worker.frontend.prepare.Frontend.add_speaker) on "
        "a recording, store its features in the cache and name the entry.",
    )
    s.add_argument("name")
    s.add_argument("--model-dir", required=True, help="CosyVoice3 model directory")
    s.add_argument("--prompt-wav", required=True, help="prompt recording (any libsndfile format)")
    s.add_argument("--prompt-text", default="", help="transcript of the prompt recording")
    s.add_argument("--overwrite", action="store_true", help="replace an existing name")
    s.set_defaults(func=cmd_add)
    return p


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one command. ``env``: the ``COSY_*`` settings (default ``os.environ``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage error (one line, printed) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        from worker.settings import Knobs

        args.knobs = Knobs.from_env(env)
        root = args.dir if args.dir is not None else args.knobs.cache_dir
        max_mb = args.max_mb if args.max_mb is not None else args.knobs.cache_max_mb
        if math.isnan(max_mb) or max_mb <= 0:
            raise CliError(f"--max-mb must be a number > 0 (inf for no cap), got {args.max_mb}")
        cache = PromptCache(root, max_mb)
        args.func(cache, args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CliError, CacheError, ValueError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug or a library failure: still one line, no traceback
        print(f"error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


__all__ = ["build_parser", "main", "one_line"]
