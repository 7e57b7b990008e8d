"""``run.sh`` as operators run it: real subprocesses (``bash run.sh ...`` with the repo's .venv),
an environment without the runner's ``COSY_*``. Bad input is one line naming the problem and a
non-zero exit (never a traceback); relative paths are the caller's; ``serve`` comes up under
``COSY_CPUS`` and exits 0 on SIGTERM. Every process a test starts is ended by its process
group id (the session the test started), even on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

RUN_SH = REPO / "run.sh"
COMMANDS = ("serve", "demo", "profile", "test", "verify", "bench", "python", "setup")


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The runner's environment without COSY_*, the prompt cache in ``tmp``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSY_")}
    env["COSY_CACHE_DIR"] = str(tmp / "prompt-cache")
    env.update(extra)
    return env


def kill_group(pgid: int) -> None:
    """End every process of the session a test started (the session id is our child's pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_sh(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120.0):
    """``bash run.sh ARGS`` in its own session; returns the CompletedProcess (text)."""
    proc = subprocess.Popen(
        ["bash", str(RUN_SH), *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc.pid)
        if proc.returncode is None:
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line_error(r, *fragments: str) -> str:
    """Exit != 0, exactly one non-empty output line, no traceback, naming ``fragments``."""
    text = r.stdout + r.stderr
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert r.returncode != 0, text
    assert "Traceback" not in text, text
    assert len(lines) == 1, text
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tuning.random_model import write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("runsh") / "tiny", "tiny", seed=1)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A caller's working directory outside the repo."""
    d = tmp_path / "caller"
    d.mkdir()
    return d


def test_usage_lists_every_subcommand(elsewhere, tmp_path):
    r = run_sh("help", cwd=elsewhere, env=clean_env(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    for c in COMMANDS:
        assert f"\n  {c}" in r.stdout, c
    r = run_sh("frobnicate", cwd=elsewhere, env=clean_env(tmp_path), timeout=60)
    assert_one_line_error(r, "unknown command 'frobnicate'", "serve", "profile")


def _bad_dirs(tmp: Path) -> dict[str, tuple[str, str]]:
    empty = tmp / "empty"
    empty.mkdir()
    bad = tmp / "badyaml"
    bad.mkdir()
    (bad / "cosyvoice3.yaml").write_text("llm: !new:foo [\n  bad: : :\n")
    return {
        "empty-string": ("", "empty string"),
        "nonexistent": (str(tmp / "nope"), "does not exist"),
        "empty-dir": (str(empty), "is empty"),
        "bad-yaml": (str(bad), "cosyvoice3.yaml"),
    }


def _args(cmd: str, model_dir: str, tmp: Path) -> list[str]:
    if cmd == "verify":
        return ["verify", model_dir, str(tmp / "golden.pt")]
    if cmd == "profile":
        return ["profile", "--seconds", "1", "--model-dir", model_dir, "--out", str(tmp / "p")]
    return [cmd, "--model-dir", model_dir]


@pytest.mark.parametrize("cmd", ["serve", "demo", "profile", "verify", "bench"])
def test_bad_model_dir_is_one_line(cmd, tmp_path, elsewhere):
    for _name, (model_dir, why) in _bad_dirs(tmp_path).items():
        r = run_sh(*_args(cmd, model_dir, tmp_path), cwd=elsewhere, env=clean_env(tmp_path),
                   timeout=60)  # fmt: skip
        line = assert_one_line_error(r, why)
        assert line.startswith(f"run.sh {cmd}:"), line


def test_serve_without_model_dir(tmp_path, elsewhere):
    r = run_sh("serve", cwd=elsewhere, env=clean_env(tmp_path), timeout=60)
    assert_one_line_error(r, "no model dir", "COSY_MODEL_DIR")


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [("COSY_TYPO", "1", "COSY_TYPO is not a known variable"),
     ("COSY_FLOW_STEPS", "zero", "COSY_FLOW_STEPS='zero'")],
)  # fmt: skip
@pytest.mark.parametrize("cmd", ["serve", "demo", "profile"])
def test_bad_knob_is_one_line(cmd, var, value, fragment, tiny_dir, tmp_path, elsewhere):
    r = run_sh(*_args(cmd, str(tiny_dir), tmp_path), cwd=elsewhere,
               env=clean_env(tmp_path, **{var: value}), timeout=60)  # fmt: skip
    assert_one_line_error(r, f"run.sh {cmd}: bad COSY_* setting", fragment)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")
@pytest.mark.parametrize("cmd", ["serve", "demo"])
def test_stage_cpus_outside_cosy_cpus(cmd, tiny_dir, tmp_path, elsewhere):
    first, second = sorted(os.sched_getaffinity(0))[:2]
    env = clean_env(tmp_path, COSY_CPUS=str(first), COSY_LLM_CPUS=str(second))
    r = run_sh(cmd, "--model-dir", str(tiny_dir), cwd=elsewhere, env=env, timeout=60)
    assert_one_line_error(r, f"run.sh {cmd}: bad COSY_* setting", f"COSY_LLM_CPUS='{second}'")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["demo", "--seconds", "0"], "--seconds 0: must be a number > 0"),
     (["demo", "--seconds", "-2"], "--seconds -2: must be a number > 0"),
     (["demo", "--seconds", "1e9"], "worker.noise.max_audio_seconds"),
     (["profile", "--seconds", "0"], "--seconds 0: must be a number > 0"),
     (["profile", "--seconds", "-3"], "--seconds -3: must be a number > 0"),
     (["bench", "--seconds", "10,0"], "--seconds 0: must be a number > 0")],
)  # fmt: skip
def test_bad_seconds_is_one_line(args, fragment, tiny_dir, tmp_path, elsewhere):
    rel = os.path.relpath(tiny_dir, elsewhere)
    extra = [] if args[0] == "bench" else ["--model-dir", rel]
    r = run_sh(*args, *extra, cwd=elsewhere, env=clean_env(tmp_path), timeout=60)
    assert_one_line_error(r, fragment)


def test_relative_model_dir_is_the_callers(tmp_path, elsewhere):
    (elsewhere / "models" / "mine").mkdir(parents=True)
    (elsewhere / "models" / "mine" / "cosyvoice3.yaml").write_text("a: 1\n")
    for cmd in ("serve", "demo", "verify"):
        r = run_sh(*_args(cmd, "models/mine", tmp_path), cwd=elsewhere, env=clean_env(tmp_path),
                   timeout=60)  # fmt: skip
        assert_one_line_error(r, str(elsewhere / "models" / "mine"))


def test_serve_comes_up_pinned_and_exits_0_on_sigterm(tiny_dir, tmp_path, elsewhere):
    from worker.client import Client, WorkerError
    from worker.launch import pid_alive

    cpu = min(os.sched_getaffinity(0))
    endpoint = f"ipc://{tmp_path / 'front.sock'}"
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        ["bash", str(RUN_SH), "serve", "--model-dir", os.path.relpath(tiny_dir, elsewhere),
         "--bind", endpoint],
        cwd=elsewhere, env=clean_env(tmp_path, COSY_CPUS=str(cpu), COSY_LOG_LEVEL="WARNING"),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        health = None
        with Client(endpoint, timeout_s=1.0) as c:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    health = c.health()
                except (TimeoutError, WorkerError):
                    continue
                if health.get("ok"):
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.2)
        log.seek(0)
        assert health is not None and health.get("ok"), log.read()
        assert os.sched_getaffinity(proc.pid) == {cpu}  # the server: run.sh's taskset
        stages = [s["pid"] for s in health["stages"].values()]
        assert all(os.sched_getaffinity(p) <= {cpu} for p in stages)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not any(pid_alive(p) for p in stages)
    finally:
        kill_group(proc.pid)
        proc.wait()
        log.close()
