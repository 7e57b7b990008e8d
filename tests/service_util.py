"""Start and stop a real worker service for tests: ``python -m worker.server`` on ``ipc://`` in
a temporary dir, with explicit ``COSY_*`` settings (the runner's own are dropped). Every
process it started (server and stages, by pid) is ended on :meth:`Service.stop`, also when
a test failed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from worker.client import Client, WorkerError


class Service:
    def __init__(self, model_dir: Path, tmp: Path, **knobs: str):
        self.tmp = Path(tmp)
        self.endpoint = f"ipc://{self.tmp / 'front.sock'}"
        self.log = self.tmp / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("COSY_")}
        env.update({"COSY_CACHE_DIR": str(self.tmp / "cache"), "COSY_LOG_LEVEL": "WARNING"})
        env.update({f"COSY_{k.upper()}": str(v) for k, v in knobs.items()})
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.server", "--model-dir", str(model_dir),
                 "--bind", self.endpoint],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.stage_pids: set[int] = set()

    def client(self, timeout_s: float = 30.0) -> Client:
        return Client(self.endpoint, timeout_s=timeout_s)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_up(self, timeout_s: float = 120.0) -> dict:
        """Until ``health`` says ok (fails with the server's log if it exits)."""
        deadline = time.monotonic() + timeout_s
        with self.client(timeout_s=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise AssertionError(f"server exited {code}:\n{self.log_text()}")
                try:
                    h = c.health()
                except (TimeoutError, WorkerError):
                    continue
                self.stage_pids |= {s["pid"] for s in h["stages"].values() if s["pid"]}
                if h.get("ok"):
                    return h
                time.sleep(0.1)  # a test helper: the worker itself never sleeps
        raise AssertionError(f"service not up after {timeout_s} s:\n{self.log_text()}")

    def stats(self) -> dict:
        with self.client(timeout_s=10.0) as c:
            s = c.stats()
        self.stage_pids |= {st["pid"] for st in s["stages"].values() if st["pid"]}
        return s

    def stop(self) -> int | None:
        """SIGTERM the server, wait; then SIGKILL whatever it started that is still alive."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.stage_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False
