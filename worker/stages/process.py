"""A stage process: one stage core behind ZeroMQ sockets (the service's second driver).

``python -m worker.stages.process --stage llm|flow|hift --model-dir DIR --runtime-dir RUN``
is what the server starts, once per stage. In order, before anything else: it applies its
stage's thread count and CPU affinity from the knobs (``COSY_<STAGE>_THREADS``,
``COSY_<STAGE>_CPUS``), loads only its own stage's weights, warms up (pages in the mmap'd
weights, runs one step), and only then reports ``up``.

Sockets, all ``ipc://`` in the server's private runtime dir (the receiver binds)::

    RUN/llm.in  ──▶ LLM ──▶ RUN/flow.in ──▶ Flow ──▶ RUN/hift.in ──▶ HiFT ──▶ RUN/out (server)
    every stage ──status (JSON: state, pid, active ids, counters, RSS)──▶ RUN/status (server)

The loop blocks on its input socket while the core has nothing to do, and polls it without
waiting while it has: every message that arrived is handed to the core before the next
``step()``, so cancels and new tokens are seen between chunks. Nothing sleeps. A status
message goes out at least every :data:`STATUS_EVERY_S` between steps. SIGTERM/SIGINT end the
loop; the process also ends when its parent (the server) is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import zmq

from worker.settings import KnobError, Knobs, configure_logging
from worker.stages.messages import receive_all, send

STAGES = ("llm", "flow", "hift")
NEXT = {"llm": "flow.in", "flow": "hift.in", "hift": "out"}
STATUS_EVERY_S = 1.0
HWM = 100_000  # messages; stage links never drop (backpressure instead)

log = logging.getLogger("worker.stage")


def endpoint(runtime_dir: str | Path, name: str) -> str:
    return f"ipc://{Path(runtime_dir) / name}"


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process, MiB."""
    cur = peak = float("nan")
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return cur, peak


def build_core(stage: str, model_dir: str | Path, knobs: Knobs):
    """Load ``stage``'s weights only, in the precision this host resolves for it, and wrap
    them in its core with its backend (:mod:`worker.stages.build`)."""
    from worker.stages import build

    config = build.run_config(knobs, stages=(stage,))
    models = build.load_models(model_dir, (stage,), config, knobs)  # the fidelity gate
    log.info("%s: running %s", stage, {k: v for k, v in config.items()
                                       if k.startswith(stage) or k == "preset"})  # fmt: skip
    return getattr(build, f"{stage}_core")(models, knobs, config)


class StageProcess:
    def __init__(self, stage: str, model_dir: str, runtime_dir: str, knobs: Knobs):
        self.stage, self.model_dir, self.runtime_dir, self.knobs = (
            stage, model_dir, runtime_dir, knobs)  # fmt: skip
        self.ctx = zmq.Context()
        self.status = self.ctx.socket(zmq.PUSH)
        self.status.setsockopt(zmq.LINGER, 2000)
        self.status.connect(endpoint(runtime_dir, "status"))
        self.stop = False
        self.parent = os.getppid()
        self.core = None
        self.last_status = 0.0

    def report(self, state: str, error: str | None = None) -> None:
        cur, peak = rss_mb()
        msg = {"stage": self.stage, "pid": os.getpid(), "state": state,
               "rss_mb": round(cur, 1), "max_rss_mb": round(peak, 1)}  # fmt: skip
        if self.core is not None:
            msg["active"] = self.core.active_ids()
            msg["stats"] = self.core.stats()
        if error:
            msg["error"] = error
        self.status.send(json.dumps(msg).encode())
        self.last_status = time.monotonic()

    def start(self) -> None:
        self.report("loading", None)
        applied = self.knobs.apply_threads(self.stage)  # before the weights are loaded
        log.info("%s: threads %s, cpus %s", self.stage, applied["threads"], applied["cpus"])
        t0 = time.perf_counter()
        self.core = build_core(self.stage, self.model_dir, self.knobs)
        t1 = time.perf_counter()
        self.core.warm_up()
        log.info("%s: loaded in %.2f s, warmed up in %.2f s", self.stage, t1 - t0,
                 time.perf_counter() - t1)  # fmt: skip
        self.inp = self.ctx.socket(zmq.PULL)
        self.inp.setsockopt(zmq.RCVHWM, HWM)
        self.inp.bind(endpoint(self.runtime_dir, f"{self.stage}.in"))
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.SNDHWM, HWM)
        self.out.setsockopt(zmq.LINGER, 2000)
        self.out.connect(endpoint(self.runtime_dir, NEXT[self.stage]))
        self.report("up")

    def send(self, msgs) -> None:
        for m in msgs:
            send(self.out, m)

    def loop(self) -> None:
        core, poller = self.core, zmq.Poller()
        poller.register(self.inp, zmq.POLLIN)
        while not self.stop:
            wait_ms = 0 if core.has_work() else int(STATUS_EVERY_S * 1000)
            if poller.poll(wait_ms):
                for msg in receive_all(self.inp, log):  # everything, before the next step
                    self.send(core.handle(msg))
            if core.has_work():
                self.send(core.step())
            if time.monotonic() - self.last_status >= STATUS_EVERY_S:
                if os.getppid() != self.parent:
                    log.warning("%s: the server is gone; exiting", self.stage)
                    return
                self.report("up")

    def close(self) -> None:
        for name in ("inp", "out"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0 if name == "inp" else 1000)
        try:
            self.report("stopped")
        except zmq.ZMQError:
            pass
        self.status.close(linger=1000)
        self.ctx.term()


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent (the server) dies, even if it was killed -9."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the status tick checks getppid()
        pass


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    ap = argparse.ArgumentParser(prog="python -m worker.stages.process")
    ap.add_argument("--stage", required=True, choices=STAGES)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--runtime-dir", required=True)
    args = ap.parse_args(argv)
    try:
        knobs = Knobs.from_env()
    except KnobError as e:
        print(f"worker.stages.process: {e}", file=sys.stderr)
        return 2
    configure_logging(knobs)
    proc = StageProcess(args.stage, args.model_dir, args.runtime_dir, knobs)

    def on_signal(signum, frame):
        proc.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    profiler = None
    try:
        try:
            proc.start()
        except Exception as e:  # noqa: BLE001 - reported to the server as one line
            log.exception("%s: start failed", args.stage)
            proc.report("error", f"{args.stage} stage could not start: {e}")
            return 1
        if knobs.torch_profile is not None:
            profiler = _start_profiler()
        proc.loop()
        return 0
    finally:
        if profiler is not None:
            _write_profile(profiler, knobs.torch_profile, args.stage)
        proc.close()


def _start_profiler():
    import torch

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  record_shapes=True)  # fmt: skip
    prof.__enter__()
    return prof


def _write_profile(prof, out_dir: Path, stage: str) -> None:
    prof.__exit__(None, None, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{stage}-{os.getpid()}"
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=60)  # fmt: skip
    base.with_suffix(".txt").write_text(table + "\n")
    prof.export_chrome_trace(str(base.with_suffix(".trace.json")))
    log.info("%s: torch profile written to %s.{txt,trace.json}", stage, base)


if __name__ == "__main__":
    sys.exit(main())
