"""A prompt cache on a directory this process cannot write: reads work, changes say why.

The directory is made read-only with ``chmod a-w``. Root ignores file modes, so when a probe
write still succeeds (running as root, CAP_DAC_OVERRIDE) the write system calls under that
directory are additionally made to fail with EROFS, as on a read-only mount. Either way the
fixture first proves that a write under the directory really fails, so every test here checks
the read-only behaviour whoever runs it (nothing is skipped).
"""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from cache import CacheError, PromptCache, ReadOnlyCache
from cache.cli import main as cli_main
from cache.store import MB
from tests.test_cache import key_of, make_entry, one_error_line

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _simulate_read_only_mount(monkeypatch, roots: list[str]) -> None:
    """Every write system call on a path under ``roots`` fails with EROFS."""

    def under(path) -> bool:
        if isinstance(path, int):
            return False
        try:
            p = os.path.abspath(os.fsdecode(os.fspath(path)))
        except TypeError:
            return False
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open = os.open

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):
        # as the kernel: a missing parent directory is ENOENT before it is EROFS
        if flags & _WRITE_FLAGS and under(path) and os.path.isdir(os.path.dirname(path)):
            refuse(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake_open)

    def one_path(name: str) -> None:
        real = getattr(os, name)

        def fake(path, *args, **kwargs):
            if under(path):
                refuse(path)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, fake)

    for name in ("utime", "unlink", "remove", "mkdir", "rmdir", "truncate", "chmod"):
        one_path(name)

    def two_paths(name: str) -> None:
        real = getattr(os, name)

        def fake(src, dst, *args, **kwargs):
            if under(src) or under(dst):
                refuse(dst)
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, fake)

    for name in ("replace", "rename", "link", "symlink"):
        two_paths(name)

    real_io_open = io.open

    def fake_io_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", fake_io_open)
    monkeypatch.setattr(builtins, "open", fake_io_open)


def _chmod_tree(root: Path, writable: bool) -> None:
    paths = [root, *root.rglob("*")]
    if not writable:
        paths.reverse()  # files first, the directory itself last
    for p in paths:
        mode = p.stat().st_mode
        if writable:
            os.chmod(p, mode | stat.S_IWUSR)
        else:
            os.chmod(p, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _write_is_refused(root: Path) -> bool:
    try:
        fd = os.open(root / ".probe", os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        return True
    os.close(fd)
    os.unlink(root / ".probe")
    return False


@pytest.fixture
def read_only(monkeypatch) -> Callable[[Path], str]:
    """``read_only(root)``: from now on nothing under ``root`` can be written. Returns how
    (``"chmod"`` or ``"chmod+EROFS"``)."""
    chmodded: list[Path] = []
    roots: list[str] = []

    def make(root: Path) -> str:
        root = Path(root).resolve()
        _chmod_tree(root, writable=False)
        chmodded.append(root)
        how = "chmod"
        if not _write_is_refused(root):  # root ignores modes: refuse the writes ourselves
            if not roots:
                _simulate_read_only_mount(monkeypatch, roots)
            roots.append(str(root))
            how = "chmod+EROFS"
        assert _write_is_refused(root), "the cache directory is still writable"
        return how

    yield make
    monkeypatch.undo()
    for root in chmodded:
        _chmod_tree(root, writable=True)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A cache with speaker 'alice' (entry 0) and an unnamed entry 1, made read-only later."""
    root = tmp_path / "cache"
    cache = PromptCache(root, 64)
    cache.put(key_of(0), make_entry(0))
    cache.put(key_of(1), make_entry(1))
    cache.add_speaker("alice", key_of(0))
    return root


def test_read_only_cache_constructs_and_serves_reads(filled: Path, read_only, caplog):
    before = _snapshot(filled)
    read_only(filled)
    cache = PromptCache(filled, 64)
    assert cache.speakers() == {"alice": key_of(0)}
    assert cache.speaker_key("alice") == key_of(0)
    assert cache.speaker("alice").same_as(make_entry(0))  # the LRU touch is skipped silently
    got = cache.get(key_of(1))
    assert got is not None and got.same_as(make_entry(1))
    s = cache.stats()
    assert (s.entries, s.speakers, s.pinned_entries, s.hits) == (2, 1, 1, 2)

    # a miss still gets its features; the failed store is logged, naming the directory
    calls = []
    with caplog.at_level(logging.WARNING, logger="cache.store"):
        entry, hit = cache.get_or_compute(key_of(2), lambda: calls.append(1) or make_entry(2))
    assert not hit and calls == [1] and entry.same_as(make_entry(2))
    assert "read-only" in caplog.text and str(filled) in caplog.text

    # eviction on a read-only cache deletes nothing and raises nothing
    assert PromptCache(filled, max_mb=1e-6).evict() == []
    assert _snapshot(filled) == before


def test_read_only_cache_refuses_changes_naming_the_directory(filled: Path, read_only):
    before = _snapshot(filled)
    read_only(filled)
    cache = PromptCache(filled, 64)
    changes = {
        "store entry": lambda: cache.put(key_of(3), make_entry(3)),
        "add speaker 'bob'": lambda: cache.add_speaker("bob", key_of(1)),
        "add speaker 'carol'": lambda: cache.add_speaker("carol", key_of(4), entry=make_entry(4)),
        "delete speaker 'alice'": lambda: cache.delete_speaker("alice"),
        "rename speaker 'alice'": lambda: cache.rename_speaker("alice", "alicia"),
        "clear unnamed entries": cache.clear_unnamed,
        "change the prompt cache": cache.check_writable,
    }
    for what, change in changes.items():
        with pytest.raises(ReadOnlyCache) as info:
            change()
        msg = str(info.value)
        assert msg.startswith(f"cannot {what}"), msg
        assert f"the prompt cache {filled} is read-only" in msg
        assert isinstance(info.value, CacheError)
    assert cache.speakers() == {"alice": key_of(0)}
    assert _snapshot(filled) == before


def test_read_only_corrupt_entry_is_a_miss_and_stays(filled: Path, read_only, caplog):
    path = PromptCache(filled, 64).path_for(key_of(1))
    path.write_bytes(path.read_bytes()[:100])
    read_only(filled)
    cache = PromptCache(filled, 64)
    with caplog.at_level(logging.WARNING, logger="cache.store"):
        assert cache.get(key_of(1)) is None
    assert "corrupt entry" in caplog.text and "cannot delete" in caplog.text
    assert len([r for r in caplog.records if key_of(1) in r.getMessage()]) == 1  # one line
    assert path.exists()


def test_read_only_empty_root_is_an_empty_cache(tmp_path: Path, read_only):
    root = tmp_path / "empty"
    root.mkdir()
    read_only(root)
    cache = PromptCache(root, 64)  # entries/ cannot be created: reads see an empty cache
    assert cache.speakers() == {} and cache.get(key_of(0)) is None
    assert cache.stats().entries == 0
    with pytest.raises(ReadOnlyCache, match=f"cannot store entry .* {root} is read-only"):
        cache.put(key_of(0), make_entry(0))
    with pytest.raises(CacheError, match=f"cannot create the prompt cache directory {root}/new"):
        PromptCache(root / "new", 64)


def test_cli_on_a_read_only_cache(filled: Path, read_only, capsys, monkeypatch, tmp_path):
    before = _snapshot(filled)
    read_only(filled)
    d = ["--dir", str(filled)]
    assert cli_main([*d, "list"], env={}) == 0
    out = capsys.readouterr()
    assert "alice" in out.out and key_of(0)[:16] in out.out and out.err == ""
    assert cli_main([*d, "show", "alice"], env={}) == 0
    out = capsys.readouterr()
    assert key_of(0) in out.out and "float32 (40, 80)" in out.out and out.err == ""
    assert cli_main([*d, "stats"], env={}) == 0
    assert "entries:   2" in capsys.readouterr().out

    # `add` refuses before the frontend would spend seconds encoding
    monkeypatch.setitem(__import__("sys").modules, "worker.frontend.prepare", None)
    wav = tmp_path / "p.wav"
    wav.write_bytes(b"RIFF")
    refused = {
        "delete speaker 'alice'": ["delete", "alice"],
        "rename speaker 'alice'": ["rename", "alice", "bob"],
        "clear unnamed entries": ["clear-unnamed"],
        "add speaker 'bob'": ["add", "bob", "--model-dir", str(tmp_path), "--prompt-wav",
                              str(wav)],
    }  # fmt: skip
    for what, argv in refused.items():
        assert cli_main([*d, *argv], env={}) == 2, argv
        line = one_error_line(capsys)
        assert line.startswith(f"cannot {what}: the prompt cache {filled} is read-only ("), line
        assert ".tmp" not in line  # names the directory or file, not our temp file
    # a healthy index needs no write to be checked
    assert cli_main([*d, "repair-index"], env={}) == 0
    assert "is fine (1 speaker); nothing to repair" in capsys.readouterr().out
    assert _snapshot(filled) == before


def test_read_only_corrupt_index_cannot_be_repaired_in_place(filled: Path, read_only, capsys):
    (filled / "speakers.json").write_bytes(b"{oops")
    read_only(filled)
    d = ["--dir", str(filled)]
    assert cli_main([*d, "list"], env={}) == 2
    assert "is corrupt" in one_error_line(capsys)
    assert cli_main([*d, "repair-index"], env={}) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"cannot repair the speaker index: the prompt cache {filled} is read-")
    assert (filled / "speakers.json").read_bytes() == b"{oops"


def test_simulation_is_undone(tmp_path: Path, read_only):
    """The fixture's patches stay inside the test (sanity check for the tests above)."""
    root = tmp_path / "ro"
    root.mkdir()
    read_only(root)
    other = tmp_path / "rw"
    other.mkdir()
    (other / "f").write_bytes(b"ok")  # only the read-only tree is affected
    assert (other / "f").read_bytes() == b"ok"
    assert PromptCache(other, 64).max_bytes == 64 * MB
