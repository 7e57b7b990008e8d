"""The HiFT stage core: Start and mel chunks in, audio chunks out.

One vocoder stream per request: :class:`worker.hift_stream.HiFTStream` (``incremental``:
carried causal state; its step is the torch generator's ``forward_chunk`` or, with the ORT
backend, :class:`worker.ort_hift.OrtHiFTStep`) or :class:`worker.reference.RecomputeHiFT`
(``recompute``). Each mel
chunk becomes exactly one audio chunk, in order (chunks are never merged, so the output does
not depend on how the stages were scheduled).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from worker.hift import HiFTGenerator
from worker.hift_stream import HiFTStream
from worker.reference import RecomputeHiFT
from worker.stages.messages import Abort, Audio, Failed, Mel, Message, Start

log = logging.getLogger(__name__)


@dataclass
class _HiFTRequest:
    stream: HiFTStream | RecomputeHiFT
    queue: deque[Mel] = field(default_factory=deque)
    seq: int = 0


class HiFTCore:
    name = "hift"

    def __init__(self, hift: HiFTGenerator, step=None):
        self.hift = hift
        self.step_fn = step  # None: the generator's own forward_chunk
        self.reqs: dict[str, _HiFTRequest] = {}
        self.busy_s = 0.0
        self.chunks = 0

    def handle(self, msg: Message) -> list[Message]:
        if isinstance(msg, Start):
            try:
                if msg.req.strategy == "recompute":
                    stream = RecomputeHiFT(self.hift)
                else:
                    stream = HiFTStream(self.hift, step=self.step_fn)
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                log.exception("hift: start of %s failed", msg.rid)
                return [Failed(msg.rid, "internal", f"hift start failed: {e}")]
            self.reqs[msg.rid] = _HiFTRequest(stream)
            return []
        if isinstance(msg, Mel):
            r = self.reqs.get(msg.rid)
            if r is not None:
                r.queue.append(msg)
            return []
        if isinstance(msg, (Abort, Failed)):
            self.reqs.pop(msg.rid, None)
            return [msg]
        return [Failed(msg.rid, "internal", f"hift stage got a {type(msg).__name__} message")]

    def has_work(self) -> bool:
        return any(r.queue for r in self.reqs.values())

    def active_ids(self) -> list[str]:
        return list(self.reqs)

    @torch.inference_mode()
    def step(self) -> list[Message]:
        """One queued mel chunk per request. -> Audio / Failed."""
        out: list[Message] = []
        for rid, r in list(self.reqs.items()):
            if not r.queue:
                continue
            m = r.queue.popleft()
            t0 = time.perf_counter()
            try:
                if m.final and r.stream.frames_in + m.mel.shape[2] == 0:
                    audio = m.mel.new_zeros(1, 0)  # nothing was generated at all
                else:
                    audio = r.stream.push(m.mel, finalize=m.final)
            except Exception as e:  # noqa: BLE001
                log.exception("hift: chunk of %s failed", rid)
                del self.reqs[rid]
                out.append(Failed(rid, "internal", f"hift failed: {e}"))
                continue
            self.busy_s += time.perf_counter() - t0
            self.chunks += 1
            out.append(Audio(rid, r.seq, audio.reshape(-1).contiguous(), m.tokens, m.final))
            r.seq += 1
            if m.final:
                del self.reqs[rid]
        return out

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Page in the weights and vocode a few frames of a scratch stream."""
        HiFTStream(self.hift).push(torch.zeros(1, self.hift.cfg.in_channels, 20), finalize=True)

    def stats(self) -> dict[str, float | int]:
        return {"active": len(self.reqs), "chunks": self.chunks, "busy_s": round(self.busy_s, 3)}
