"""A damaged speaker index: one clear answer from every command, and the documented repair.

Also: the cache's settings come from ``Knobs`` (never from ``os.environ`` directly).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cache import CorruptIndex, PromptCache
from cache.cli import main as cli_main
from cache.store import MB
from tests.test_cache import REPO, key_of, make_entry, one_error_line
from worker.settings import Knobs


@pytest.fixture
def cache(tmp_path: Path) -> PromptCache:
    """Speakers alice (entry 0) and bob (entry 1), plus unnamed entry 2."""
    cache = PromptCache(tmp_path / "cache", 64)
    for i in range(3):
        cache.put(key_of(i), make_entry(i))
    cache.add_speaker("alice", key_of(0))
    cache.add_speaker("bob", key_of(1))
    return cache


def _index_doc(**speakers: str) -> bytes:
    return json.dumps({"version": 1, "speakers": speakers}).encode()


def _cut_in_bob(raw: bytes) -> bytes:
    return raw[: raw.index(b'"bob"') + 12]  # alice's pair complete, bob's cut


DAMAGE = {
    "not json": (lambda raw: b"{this is not json", "not JSON"),
    "truncated": (_cut_in_bob, "not JSON"),
    "binary": (lambda raw: b"\xff\xfe\x00\x81garbage", "not UTF-8"),
    "a list": (lambda raw: b"[]", "expected a JSON object"),
    "speakers a list": (
        lambda raw: b'{"version": 1, "speakers": ["alice"]}',
        '"speakers" is list',
    ),
    "no speakers": (lambda raw: b'{"version": 1}', '"speakers" is NoneType'),
    "wrong version": (lambda raw: b'{"version": 9, "speakers": {}}', "version is 9"),
    "bad key": (lambda raw: _index_doc(alice="0123"), "speaker 'alice': not a cache key"),
    "bad name": (lambda raw: _index_doc(**{"a/b": key_of(0)}), "path separator"),
}

COMMANDS = {
    "list": ["list"],
    "show": ["show", "alice"],
    "stats": ["stats"],
    "add": ["add", "carol", "--model-dir", "m", "--prompt-wav", "p.wav"],
    "rename": ["rename", "alice", "carol"],
    "delete": ["delete", "alice"],
    "clear-unnamed": ["clear-unnamed"],
}


def _damage(cache: PromptCache, kind: str) -> str:
    damage, detail = DAMAGE[kind]
    cache.index_path.write_bytes(damage(cache.index_path.read_bytes()))
    return detail


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_every_command_gives_the_same_one_line_answer(cache: PromptCache, kind, capsys):
    detail = _damage(cache, kind)
    damaged = cache.index_path.read_bytes()
    lines = {}
    for name, argv in COMMANDS.items():
        assert cli_main(["--dir", str(cache.root), *argv], env={}) == 2, name
        lines[name] = one_error_line(capsys)
    assert len(set(lines.values())) == 1, lines  # the same answer from every command
    line = lines["list"]
    assert line.startswith(f"speaker index {cache.index_path} is corrupt (")
    assert detail in line
    assert f"recover with `python -m cache --dir {cache.root} repair-index`" in line
    assert cache.index_path.read_bytes() == damaged  # no command changed the file
    assert all(key_of(i) in cache for i in range(3))  # nor any entry


def test_library_calls_raise_corrupt_index(cache: PromptCache, caplog):
    _damage(cache, "not json")
    for call in (
        cache.speakers,
        cache.stats,
        cache.clear_unnamed,
        lambda: cache.speaker("alice"),
        lambda: cache.add_speaker("carol", key_of(2)),
        lambda: cache.rename_speaker("alice", "carol"),
        lambda: cache.delete_speaker("alice"),
    ):
        with pytest.raises(CorruptIndex, match="repair-index") as info:
            call()
        assert info.value.path == cache.index_path
    # serving prompts does not depend on the names: a put still works, eviction is held back
    small = PromptCache(cache.root, max_mb=1e-6)
    with caplog.at_level(logging.ERROR, logger="cache.store"):
        small.put(key_of(5), make_entry(5))
    assert key_of(5) in cache and "not evicting" in caplog.text


def test_an_index_that_is_a_directory(cache: PromptCache, capsys):
    cache.index_path.unlink()
    cache.index_path.mkdir()
    assert cli_main(["--dir", str(cache.root), "list"], env={}) == 2
    assert "is corrupt (it is a directory, not a file)" in one_error_line(capsys)
    assert cli_main(["--dir", str(cache.root), "repair-index"], env={}) == 0
    assert cache.speakers() == {}
    assert cache.index_path.is_file()


def test_repair_keeps_readable_names_and_the_bad_file(cache: PromptCache, capsys):
    _damage(cache, "truncated")
    damaged = cache.index_path.read_bytes()
    assert cli_main(["--dir", str(cache.root), "repair-index"], env={}) == 0
    out = capsys.readouterr().out
    assert f"rebuilt speaker index {cache.index_path}: kept 1 speaker ('alice')" in out
    (backup,) = cache.root.glob("speakers.json.corrupt-*")
    assert str(backup) in out
    assert backup.read_bytes() == damaged
    assert cache.speakers() == {"alice": key_of(0)}
    assert cache.speaker("alice").same_as(make_entry(0))
    assert all(key_of(i) in cache for i in range(3))  # entries untouched; bob's is unpinned now
    assert cli_main(["--dir", str(cache.root), "list"], env={}) == 0
    assert "alice" in capsys.readouterr().out

    # a second repair finds nothing wrong and changes nothing
    before = cache.index_path.read_bytes()
    r = cache.repair_index()
    assert (r.was_corrupt, r.kept, r.backup) == (False, {"alice": key_of(0)}, None)
    assert cache.index_path.read_bytes() == before


def test_repair_keeps_valid_pairs_of_a_parseable_but_invalid_index(cache: PromptCache):
    cache.index_path.write_bytes(
        json.dumps(
            {"version": 1, "speakers": {"alice": key_of(0), "a/b": key_of(1), "bob": "zz"}}
        ).encode()
    )
    r = cache.repair_index()
    assert r.was_corrupt and r.kept == {"alice": key_of(0)}
    assert cache.speakers() == {"alice": key_of(0)}
    # unicode names survive salvage from a damaged file too
    cache.add_speaker("张三 (zh)", key_of(1))
    raw = cache.index_path.read_bytes()
    cache.index_path.write_bytes(raw[: raw.rindex(b"}") - 1])  # drop the closing braces
    r = cache.repair_index()
    assert r.was_corrupt and r.kept == {"alice": key_of(0), "张三 (zh)": key_of(1)}


def test_cli_errors_have_no_traceback_in_a_real_process(cache: PromptCache):
    _damage(cache, "binary")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "cache", "--dir", str(cache.root), "stats"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: speaker index ")
    assert "Traceback" not in out.stderr


# -- settings come from Knobs ---------------------------------------------------------------


def test_from_knobs(tmp_path: Path):
    k = Knobs.from_env({"COSY_CACHE_DIR": str(tmp_path / "c"), "COSY_CACHE_MAX_MB": "12"})
    cache = PromptCache.from_knobs(k)
    assert cache.root == tmp_path / "c" and cache.max_bytes == 12 * MB
    assert (tmp_path / "c" / "entries").is_dir()
    k = Knobs.from_env({"COSY_CACHE_DIR": str(tmp_path / "d"), "COSY_CACHE_MAX_MB": "inf"})
    assert math.isinf(PromptCache.from_knobs(k).max_bytes)


def test_cli_takes_dir_and_cap_from_knobs(tmp_path: Path, capsys, monkeypatch):
    decoy = tmp_path / "decoy"
    monkeypatch.setenv("COSY_CACHE_DIR", str(decoy))  # the env given to main() wins
    root, other = tmp_path / "root", tmp_path / "other"
    env = {"COSY_CACHE_DIR": str(root), "COSY_CACHE_MAX_MB": "inf"}
    assert cli_main(["stats"], env=env) == 0
    out = capsys.readouterr().out
    assert f"root:      {root}\n" in out and "of unlimited" in out
    assert cli_main(["--dir", str(other), "--max-mb", "3", "stats"], env=env) == 0
    out = capsys.readouterr().out
    assert f"root:      {other}\n" in out and "of 3.0 MiB" in out
    assert not decoy.exists()


@pytest.mark.parametrize(
    "env, var",
    [
        ({"COSY_CACHE_MAX_MB": "-3"}, "COSY_CACHE_MAX_MB"),
        ({"COSY_CACHE_MAX_MB": "lots"}, "COSY_CACHE_MAX_MB"),
        ({"COSY_CACHE_DIRR": "/tmp/x"}, "COSY_CACHE_DIRR"),
        ({"COSY_FRONTEND_THREADS": "0"}, "COSY_FRONTEND_THREADS"),
    ],
)
def test_cli_bad_knob_is_one_line_naming_it(tmp_path: Path, capsys, env, var):
    assert cli_main(["--dir", str(tmp_path), "list"], env=env) == 2
    line = one_error_line(capsys)
    assert line.startswith("bad COSY_* setting: ") and var in line


def test_no_environment_reads_outside_knobs():
    """cache/ and worker/frontend/ take their settings from Knobs only: no code there touches
    ``os.environ`` / ``os.getenv`` (docstrings may mention them)."""
    offenders = []
    for folder in ("cache", "worker/frontend"):
        for path in sorted((REPO / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute):
                    names = {node.attr}
                elif isinstance(node, ast.Name):
                    names = {node.id}
                elif isinstance(node, ast.ImportFrom):
                    names = {a.name for a in node.names}
                else:
                    continue
                for name in sorted(names & {"environ", "environb", "getenv", "getenvb"}):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert offenders == []
