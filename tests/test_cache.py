"""Prompt cache: keys, on-disk entries, corruption, LRU cap, named speakers, processes, CLI."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cache import (
    InvalidSpeakerName,
    MissingEntry,
    PromptCache,
    PromptEntry,
    SpeakerExists,
    UnknownSpeaker,
    cache_key,
)
from cache.cli import main as cli_main
from cache.store import MB

REPO = Path(__file__).resolve().parents[1]


def make_entry(
    seed: int = 0, n_tokens: int = 20, text: str = "希望你以后能够做的比我还好呦。"
) -> PromptEntry:
    rng = np.random.default_rng(seed)
    return PromptEntry(
        speech_tokens=rng.integers(0, 6561, n_tokens, dtype=np.int32),
        prompt_mel=rng.standard_normal((2 * n_tokens, 80), dtype=np.float32),
        speaker_embedding=rng.standard_normal(192, dtype=np.float32),
        prompt_text_ids=rng.integers(0, 151_000, 12, dtype=np.int32),
        prompt_text=text,
        meta={"source": f"prompt{seed}.wav", "sample_rate": "16000"},
    )


def key_of(seed: int) -> str:
    samples = np.random.default_rng(seed).standard_normal(1600, dtype=np.float32)
    return cache_key(samples, 16000, "prompt", "model-fp", "frontend-1")


class CountingCompute:
    def __init__(self, entry: PromptEntry):
        self.entry = entry
        self.calls = 0

    def __call__(self) -> PromptEntry:
        self.calls += 1
        return self.entry


@pytest.fixture
def cache(tmp_path: Path) -> PromptCache:
    return PromptCache(tmp_path / "cache", max_mb=64)


# -- keys ---------------------------------------------------------------------------------------


def test_key_is_sha256_hex_and_deterministic():
    samples = np.linspace(-1, 1, 480, dtype=np.float32)
    key = cache_key(samples, 16000, "hello", "fp", "v1")
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    assert cache_key(samples.copy(), 16000, "hello", "fp", "v1") == key
    # byte order of the decoded samples does not matter, only their values and dtype
    assert cache_key(samples.astype(">f4"), 16000, "hello", "fp", "v1") == key


def test_key_changes_with_every_field():
    samples = np.linspace(-1, 1, 480, dtype=np.float32)
    base = cache_key(samples, 16000, "hello", "fp", "v1")
    changed = samples.copy()
    changed[100] += 1e-3
    variants = [
        cache_key(changed, 16000, "hello", "fp", "v1"),
        cache_key(samples.astype(np.float64), 16000, "hello", "fp", "v1"),
        cache_key(samples.reshape(2, 240), 16000, "hello", "fp", "v1"),
        cache_key(samples, 24000, "hello", "fp", "v1"),
        cache_key(samples, 16000, "hello!", "fp", "v1"),
        cache_key(samples, 16000, "hello", "fp2", "v1"),
        cache_key(samples, 16000, "hello", "fp", "v2"),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_key_fields_cannot_run_together():
    samples = np.zeros(16, dtype=np.float32)
    assert cache_key(samples, 16000, "ab", "c", "v") != cache_key(samples, 16000, "a", "bc", "v")
    assert cache_key(samples, 16000, "", "fp", "v") != cache_key(samples, 16000, "fp", "", "v")


def test_key_rejects_bad_fields():
    samples = np.zeros(16, dtype=np.float32)
    with pytest.raises(ValueError):
        cache_key(samples, 0, "t", "fp", "v")
    with pytest.raises(TypeError):
        cache_key(samples, 16000.0, "t", "fp", "v")
    with pytest.raises(TypeError):
        cache_key(samples, 16000, b"t", "fp", "v")


# -- entries ------------------------------------------------------------------------------------


def test_put_get_roundtrip_keeps_arrays_and_dtypes(cache: PromptCache):
    entry = make_entry(1)
    key = key_of(1)
    assert cache.get(key) is None
    cache.put(key, entry)
    got = cache.get(key)
    assert got is not None and got.same_as(entry)
    assert got.speech_tokens.dtype == np.int32 and got.prompt_text_ids.dtype == np.int32
    assert got.prompt_mel.dtype == np.float32 and got.prompt_mel.shape == (40, 80)
    assert got.speaker_embedding.dtype == np.float32 and got.speaker_embedding.shape == (192,)
    assert got.prompt_text == entry.prompt_text and got.meta == entry.meta
    got.prompt_mel[0, 0] = 123.0  # returned arrays are the caller's own
    assert cache.get(key).same_as(entry)


def test_entry_converts_and_validates_arrays():
    e = make_entry(2)
    converted = PromptEntry(
        speech_tokens=e.speech_tokens.astype(np.int64),
        prompt_mel=e.prompt_mel.astype(np.float64),
        speaker_embedding=e.speaker_embedding,
        prompt_text_ids=list(e.prompt_text_ids),
        prompt_text=e.prompt_text,
    )
    assert converted.speech_tokens.dtype == np.int32 and converted.prompt_mel.dtype == np.float32
    with pytest.raises(TypeError):
        PromptEntry(
            e.speech_tokens.astype(np.float32),
            e.prompt_mel,
            e.speaker_embedding,
            e.prompt_text_ids,
            "t",
        )
    with pytest.raises(ValueError):
        PromptEntry(e.speech_tokens, e.prompt_mel[0], e.speaker_embedding, e.prompt_text_ids, "t")
    with pytest.raises(ValueError):
        PromptEntry(
            e.speech_tokens.astype(np.int64) + 2**40,
            e.prompt_mel,
            e.speaker_embedding,
            e.prompt_text_ids,
            "t",
        )
    with pytest.raises(TypeError):
        PromptEntry(
            e.speech_tokens,
            e.prompt_mel,
            e.speaker_embedding,
            e.prompt_text_ids,
            "t",
            meta={"rate": 16000},
        )


def test_keys_that_are_not_hashes_are_refused(cache: PromptCache):
    with pytest.raises(ValueError):
        cache.put("../../etc/passwd", make_entry())
    with pytest.raises(ValueError):
        cache.get("ABC")


def test_get_or_compute_computes_once(cache: PromptCache):
    key = key_of(3)
    compute = CountingCompute(make_entry(3))
    entry, hit = cache.get_or_compute(key, compute)
    assert (hit, compute.calls) == (False, 1)
    for _ in range(3):
        again, hit = cache.get_or_compute(key, compute)
        assert hit and again.same_as(entry)
    assert compute.calls == 1
    # a fresh object on the same root (another process, a restart) hits too
    _, hit = PromptCache(cache.root, 64).get_or_compute(key, compute)
    assert hit and compute.calls == 1


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_data_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the last array's bytes
    path.write_bytes(bytes(data))


def _flip_text_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = data.index(b"prompt0.wav")  # meta in the JSON header: stays valid JSON
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(300))


@pytest.mark.parametrize("damage", [_truncate, _flip_data_bit, _flip_text_bit, _empty, _garbage])
def test_damaged_entry_is_dropped_and_recomputed(cache: PromptCache, damage, caplog):
    key = key_of(0)
    entry = make_entry(0)
    cache.put(key, entry)
    damage(cache.path_for(key))

    compute = CountingCompute(entry)
    with caplog.at_level(logging.WARNING, logger="cache.store"):
        got, hit = cache.get_or_compute(key, compute)
    assert (hit, compute.calls) == (False, 1)
    assert "corrupt entry" in caplog.text and key in caplog.text
    assert cache.stats().corrupt_dropped == 1
    # the recomputed entry replaced the damaged file
    again = cache.get(key)
    assert again is not None and again.same_as(entry)


# -- size cap -----------------------------------------------------------------------------------


def test_cap_evicts_least_recently_used_but_never_named(tmp_path: Path):
    root = tmp_path / "cache"
    keys = {name: key_of(i) for i, name in enumerate("abcdef")}
    probe = PromptCache(root, 64)
    probe.put(keys["a"], make_entry(0))
    size = probe.path_for(keys["a"]).stat().st_size
    cache = PromptCache(root, max_mb=3.5 * size / MB)  # room for three entries

    def present() -> set[str]:
        return {n for n, k in keys.items() if k in cache}

    cache.put(keys["b"], make_entry(1))
    cache.put(keys["c"], make_entry(2))
    assert cache.get(keys["a"]) is not None  # a is now more recent than b and c
    cache.put(keys["d"], make_entry(3))
    assert present() == {"a", "c", "d"}  # b was the least recently used

    cache.add_speaker("carol", keys["c"])  # c is the oldest now, but pinned
    cache.put(keys["e"], make_entry(4))
    assert present() == {"c", "d", "e"}

    cache.delete_speaker("carol")  # unpinned: c is evictable again
    cache.put(keys["f"], make_entry(5))
    assert present() == {"d", "e", "f"}
    assert cache.stats().evicted == 3
    assert cache.stats().bytes <= cache.max_bytes


def test_named_entries_over_the_cap_stay(tmp_path: Path, caplog):
    cache = PromptCache(tmp_path / "cache", max_mb=1e-3)  # smaller than one entry
    cache.put(key_of(0), make_entry(0))
    assert key_of(0) not in cache
    big = PromptCache(tmp_path / "cache", max_mb=64)
    big.put(key_of(1), make_entry(1))
    big.add_speaker("kept", key_of(1))
    with caplog.at_level(logging.WARNING, logger="cache.store"):
        assert cache.evict() == []
    assert key_of(1) in cache and "exceed" in caplog.text


def test_clear_unnamed(cache: PromptCache):
    for i in range(3):
        cache.put(key_of(i), make_entry(i))
    cache.add_speaker("one", key_of(1))
    count, freed = cache.clear_unnamed()
    assert count == 2 and freed > 0
    assert [key_of(i) in cache for i in range(3)] == [False, True, False]


# -- named speakers -----------------------------------------------------------------------------


def test_speakers_survive_a_new_instance(cache: PromptCache):
    cache.put(key_of(0), make_entry(0))
    cache.put(key_of(1), make_entry(1))
    cache.add_speaker("alice", key_of(0))
    cache.add_speaker("张三 (zh)", key_of(1))

    reopened = PromptCache(cache.root, 64)
    assert reopened.speakers() == {"alice": key_of(0), "张三 (zh)": key_of(1)}
    assert reopened.speaker("alice").same_as(make_entry(0))
    assert reopened.speaker("张三 (zh)").same_as(make_entry(1))
    index = json.loads((cache.root / "speakers.json").read_text())
    assert index["version"] == 1 and index["speakers"]["alice"] == key_of(0)


def test_add_speaker_rules(cache: PromptCache):
    cache.put(key_of(0), make_entry(0))
    cache.put(key_of(1), make_entry(1))
    with pytest.raises(MissingEntry):
        cache.add_speaker("ghost", key_of(9))
    cache.add_speaker("alice", key_of(0))
    with pytest.raises(SpeakerExists, match="'alice' already exists.*overwrite=True"):
        cache.add_speaker("alice", key_of(1))
    cache.add_speaker("alice", key_of(1), overwrite=True)
    assert cache.speakers() == {"alice": key_of(1)}


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "a/b", "a\\b", "line\nbreak", "nul\x00", "tab\t", " padded"]
)
def test_invalid_speaker_names(cache: PromptCache, name: str):
    cache.put(key_of(0), make_entry(0))
    with pytest.raises(InvalidSpeakerName):
        cache.add_speaker(name, key_of(0))
    assert cache.speakers() == {}


def test_rename_and_delete(cache: PromptCache):
    cache.put(key_of(0), make_entry(0))
    cache.put(key_of(1), make_entry(1))
    cache.add_speaker("alice", key_of(0))
    cache.add_speaker("bob", key_of(1))

    cache.rename_speaker("alice", "carol")
    assert cache.speakers() == {"bob": key_of(1), "carol": key_of(0)}
    with pytest.raises(SpeakerExists):
        cache.rename_speaker("carol", "bob")
    with pytest.raises(UnknownSpeaker):
        cache.rename_speaker("alice", "dave")
    with pytest.raises(InvalidSpeakerName):
        cache.rename_speaker("carol", "a/b")

    assert cache.delete_speaker("bob") == key_of(1)
    assert cache.speakers() == {"carol": key_of(0)}
    assert key_of(1) in cache  # the entry stays until evicted
    with pytest.raises(UnknownSpeaker):
        cache.delete_speaker("bob")


def test_unknown_speaker_names_it_and_lists_known(cache: PromptCache):
    cache.put(key_of(0), make_entry(0))
    cache.add_speaker("alice", key_of(0))
    with pytest.raises(UnknownSpeaker) as info:
        cache.speaker("bob")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "unknown speaker 'bob'; known speakers: 'alice'"


def test_speaker_with_corrupt_entry_is_a_clear_error(cache: PromptCache):
    cache.put(key_of(0), make_entry(0))
    cache.add_speaker("alice", key_of(0))
    _truncate(cache.path_for(key_of(0)))
    with pytest.raises(MissingEntry, match="add the speaker again"):
        cache.speaker("alice")


# -- several processes --------------------------------------------------------------------------

ADDED, EXISTS = 0, 3


def _race_worker(root: str, key: str, idx: int, barrier) -> None:
    cache = PromptCache(root, 64)
    entry = make_entry(7)
    barrier.wait()
    for _ in range(10):
        cache.put(key, entry)
    cache.add_speaker(f"own-{idx}", key)  # distinct names: no update may be lost
    try:
        cache.add_speaker("shared", key)
    except SpeakerExists:
        sys.exit(EXISTS)
    sys.exit(ADDED)


def test_processes_racing_on_one_key_and_name(tmp_path: Path):
    root = tmp_path / "cache"
    key = key_of(7)
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_race_worker, args=(str(root), key, i, barrier)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    codes = sorted(p.exitcode for p in procs)
    assert codes == [ADDED] + [EXISTS] * (n - 1)

    entries = sorted(p.name for p in (root / "entries").iterdir())
    assert entries == [f"{key}.safetensors"]  # one entry, no temp files left
    cache = PromptCache(root, 64)
    assert cache.get(key).same_as(make_entry(7))
    index = json.loads((root / "speakers.json").read_text())
    assert index["speakers"] == {"shared": key, **{f"own-{i}": key for i in range(n)}}


# -- CLI ----------------------------------------------------------------------------------------


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSY_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "cache", "--dir", str(root), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_list_show_rename_delete(cache: PromptCache):
    root = cache.root
    cache.put(key_of(0), make_entry(0))
    cache.put(key_of(1), make_entry(1, text="Hello there."))
    cache.add_speaker("alice", key_of(0))
    cache.add_speaker("bob", key_of(1))

    out = run_cli(root, "list")
    assert out.returncode == 0, out.stderr
    assert "alice" in out.stdout and "bob" in out.stdout and key_of(0)[:16] in out.stdout

    out = run_cli(root, "show", "bob")
    assert out.returncode == 0, out.stderr
    assert key_of(1) in out.stdout and "Hello there." in out.stdout
    assert "int32 (20,)" in out.stdout and "float32 (40, 80)" in out.stdout
    assert "prompt1.wav" in out.stdout

    out = run_cli(root, "rename", "alice", "carol")
    assert out.returncode == 0, out.stderr

    out = run_cli(root, "delete", "bob")
    assert out.returncode == 0, out.stderr
    out = run_cli(root, "list")
    assert "carol" in out.stdout and "alice" not in out.stdout and "bob" not in out.stdout

    out = run_cli(root, "show", "nobody")
    assert out.returncode == 2
    assert out.stderr == "error: unknown speaker 'nobody'; known speakers: 'carol'\n"


def one_error_line(capsys) -> str:
    """The CLI's stderr, checked to be exactly one ``error: ...`` line."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err[len("error: ") : -1]


def test_cli_errors_stats_and_clear(cache: PromptCache, capsys):
    cache.put(key_of(0), make_entry(0))
    cache.put(key_of(1), make_entry(1))
    cache.add_speaker("alice", key_of(0))
    cache.add_speaker("bob", key_of(1))
    d = ["--dir", str(cache.root)]

    assert cli_main([*d, "rename", "alice", "bob"], env={}) == 2
    assert "speaker 'bob' already exists; delete or rename" in one_error_line(capsys)
    assert cli_main([*d, "rename", "alice", "a/b"], env={}) == 2
    assert "path separator" in one_error_line(capsys)
    assert cli_main([*d, "delete", "nobody"], env={}) == 2
    assert one_error_line(capsys) == "unknown speaker 'nobody'; known speakers: 'alice', 'bob'"

    assert cli_main([*d, "delete", "bob"], env={}) == 0
    assert cli_main([*d, "clear-unnamed"], env={}) == 0
    assert "removed 1 unnamed" in capsys.readouterr().out
    assert cli_main([*d, "stats"], env={}) == 0
    assert "entries:   1" in capsys.readouterr().out
    for bad in ("0", "-1", "nan"):
        assert cli_main([*d, "--max-mb", bad, "stats"], env={}) == 2
        assert one_error_line(capsys).startswith("--max-mb must be a number > 0")
    assert cli_main([*d, "--max-mb", "lots", "stats"], env={}) == 2  # argparse: one line too
    assert "--max-mb" in one_error_line(capsys)
    assert cli_main([*d, "frobnicate"], env={}) == 2
    assert "frobnicate" in one_error_line(capsys)


def _fake_frontend(monkeypatch, calls: list, key: str, entry: PromptEntry) -> None:
    """Stand-in for worker.frontend.prepare: records how `add` drives Frontend.add_speaker."""

    class Frontend:
        def __init__(self, model_dir, cache, knobs=None):
            calls.append(("init", str(model_dir), knobs.frontend_threads))
            self.cache = cache

        def add_speaker(self, name, audio, prompt_text="", overwrite=False):
            calls.append(("add_speaker", name, str(audio), prompt_text, overwrite))
            self.cache.add_speaker(name, key, overwrite=overwrite, entry=entry)
            return {"name": name, "key": key, "has_transcript": bool(prompt_text)}

    fake = types.ModuleType("worker.frontend.prepare")
    fake.Frontend = Frontend
    monkeypatch.setitem(sys.modules, "worker.frontend.prepare", fake)


def test_cli_add_calls_frontend_add_speaker(
    cache: PromptCache, tmp_path: Path, monkeypatch, capsys
):
    wav = tmp_path / "prompt.wav"
    wav.write_bytes(b"RIFF")  # only its existence is checked before the frontend runs
    model = tmp_path / "model"
    model.mkdir()
    calls: list = []
    _fake_frontend(monkeypatch, calls, key_of(5), make_entry(5))
    env = {"COSY_FRONTEND_THREADS": "3"}
    args = ["--dir", str(cache.root), "add", "dora", "--model-dir", str(model)]
    args += ["--prompt-wav", str(wav)]
    assert cli_main([*args, "--prompt-text", "hi"], env=env) == 0
    assert calls == [("init", str(model), 3), ("add_speaker", "dora", str(wav), "hi", False)]
    assert "added speaker 'dora'" in capsys.readouterr().out
    assert cache.speakers() == {"dora": key_of(5)}
    assert cli_main(args, env=env) == 2
    assert one_error_line(capsys) == "speaker 'dora' already exists; pass --overwrite to replace it"
    assert len(calls) == 2  # refused before running the frontend
    assert cli_main([*args, "--overwrite"], env=env) == 0
    assert calls[-1] == ("add_speaker", "dora", str(wav), "", True)
    assert "no transcript" in capsys.readouterr().out

    # what the user typed is checked, naming the flag
    eve = ["--dir", str(cache.root), "add", "eve", "--model-dir", str(model)]
    assert cli_main([*eve, "--prompt-wav", str(tmp_path / "nope.wav")], env=env) == 2
    assert one_error_line(capsys).startswith("--prompt-wav: file not found")
    bad_model = ["--dir", str(cache.root), "add", "eve", "--model-dir", str(tmp_path / "nope")]
    assert cli_main([*bad_model, "--prompt-wav", str(wav)], env=env) == 2
    assert one_error_line(capsys).startswith("--model-dir: not a directory")
    assert len(calls) == 4


def test_cli_add_without_frontend_is_a_clear_error(
    cache: PromptCache, tmp_path, monkeypatch, capsys
):
    wav = tmp_path / "prompt.wav"
    wav.write_bytes(b"RIFF")
    monkeypatch.setitem(sys.modules, "worker.frontend.prepare", None)
    code = cli_main(
        ["--dir", str(cache.root), "add", "x", "--model-dir", str(tmp_path), "--prompt-wav",
         str(wav)],
        env={},
    )  # fmt: skip
    assert code == 2
    assert "worker.frontend.prepare" in one_error_line(capsys)
