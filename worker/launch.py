"""Start the worker service as a child process and stop it again, by pid.

:class:`ServiceProcess` runs ``python -m worker.server`` with explicit ``COSY_*`` settings (the
caller's own ``COSY_*`` are dropped unless passed), waits until ``health`` says ok, and on
:meth:`ServiceProcess.stop` sends SIGTERM, waits, and then SIGKILLs whatever it started that
is still alive (server and stage pids). ``run.sh demo`` / ``profile``, the service benchmark,
the soak and the tests all start the service through it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from worker.client import Client, WorkerError

REPO = Path(__file__).resolve().parents[1]


class ServiceError(RuntimeError):
    """The service did not come up (its log's tail is in the message)."""


class ServiceProcess:
    def __init__(
        self,
        model_dir: str | Path,
        endpoint: str,
        log_path: str | Path,
        env: dict[str, str] | None = None,
        inherit_cosy: bool = False,
    ):
        """``env``: ``COSY_*`` (and other) variables for the service; with ``inherit_cosy``
        the caller's ``COSY_*`` are kept too (``run.sh``), else dropped (tests, tools)."""
        self.endpoint = endpoint
        self.log = Path(log_path)
        base = {k: v for k, v in os.environ.items() if inherit_cosy or not k.startswith("COSY_")}
        base.update(env or {})
        base["PYTHONPATH"] = str(REPO) + os.pathsep + base.get("PYTHONPATH", "")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.server", "--model-dir", str(model_dir),
                 "--bind", endpoint],
                env=base, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.stage_pids: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout_s: float = 30.0) -> Client:
        return Client(self.endpoint, timeout_s=timeout_s)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_up(self, timeout_s: float = 600.0) -> dict:
        """Block until ``health`` reports ok; raises :class:`ServiceError` if the server
        exits first or ``timeout_s`` passes. Returns the health reply."""
        deadline = time.monotonic() + timeout_s
        with self.client(timeout_s=1.0) as c:
            while True:
                if self.proc.poll() is not None:
                    raise ServiceError(f"the worker exited with code {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")  # fmt: skip
                if time.monotonic() > deadline:
                    raise ServiceError(f"the worker was not up after {timeout_s:.0f} s:\n"
                                       f"{self.log_tail()}")  # fmt: skip
                try:
                    h = c.health()  # answered at once while loading: waits only when busy
                except (TimeoutError, WorkerError):
                    continue
                self.stage_pids |= {s["pid"] for s in h["stages"].values() if s.get("pid")}
                if h.get("ok"):
                    return h
                try:
                    self.proc.wait(0.2)  # wakes at once if the server exits
                except subprocess.TimeoutExpired:
                    pass

    def stats(self) -> dict:
        with self.client(timeout_s=10.0) as c:
            s = c.stats()
        self.stage_pids |= {st["pid"] for st in s["stages"].values() if st.get("pid")}
        return s

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM the server and wait; then SIGKILL whatever it started that is alive."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.stage_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False
