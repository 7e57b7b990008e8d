"""Start and stop a real worker service for tests (:class:`worker.launch.ServiceProcess`):
on ``ipc://`` in a temporary dir, with explicit ``COSY_*`` settings (the runner's own are
dropped); every process it started is ended by pid on :meth:`Service.stop`."""

from __future__ import annotations

from pathlib import Path

from worker.launch import ServiceProcess, pid_alive  # noqa: F401 (re-exported for the tests)


class Service(ServiceProcess):
    def __init__(self, model_dir: Path, tmp: Path, **knobs: str):
        tmp = Path(tmp)
        env = {"COSY_CACHE_DIR": str(tmp / "cache"), "COSY_LOG_LEVEL": "WARNING"}
        env.update({f"COSY_{k.upper()}": str(v) for k, v in knobs.items()})
        super().__init__(model_dir, f"ipc://{tmp / 'front.sock'}", tmp / "server.log", env)

    def wait_up(self, timeout_s: float = 120.0) -> dict:
        return super().wait_up(timeout_s)
