"""The in-process driver: the three stage cores called in turn, requests in, audio chunks out.

:class:`Engine` owns one :class:`LLMCore`, :class:`FlowCore` and :class:`HiFTCore`
(:mod:`worker.stages`) and moves their messages by hand: each :meth:`Engine.step` admits
and decodes (one batched LLM step), runs one flow chunk for every request that has one ready,
and vocodes every mel chunk that came out. The service runs the same cores, each in its own
process (:mod:`worker.server`); tests, ``verify``, the benchmark and notebooks use this.
Nothing here sleeps or polls: :meth:`step` does work or returns nothing.

Two iterators: :meth:`run` yields every request's chunks as they are made (interleaved);
:meth:`stream` yields one utterance's chunks in text order (its segments still computed
concurrently), without empty chunks but the last.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from worker.model_dir import STAGES, CosyVoice3Models
from worker.ordering import SegmentOrder
from worker.request import STRATEGIES, RequestError, TTSRequest
from worker.settings import BACKEND_STAGES, Knobs
from worker.stages import build
from worker.stages.messages import Abort, Audio, Credit, Failed, Message, Start

RECENT = 1000  # finished requests kept in EngineStats.recent


@dataclass(frozen=True)
class RequestStats:
    """How one request went, on its final chunk."""

    tokens: int  # speech tokens its audio covers
    audio_s: float
    first_audio_s: float  # from add_request to the first chunk with audio
    total_s: float


@dataclass
class AudioChunk:
    request_id: str
    seq: int
    audio: Tensor  # (S,) float32 at the model's sample rate
    final: bool
    tokens: int = 0  # speech tokens this chunk covers
    error: tuple[str, str] | None = None  # (code, message): the request failed; final chunk
    stats: RequestStats | None = None  # on a final chunk without error


@dataclass
class EngineStats:
    """Counters and the most recent finished requests (bounded)."""

    added: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    recent: deque[RequestStats] = field(default_factory=lambda: deque(maxlen=RECENT))


@dataclass
class _Track:
    t_start: float
    t_first: float | None = None
    samples: int = 0
    tokens: int = 0


def _threads(knobs: Knobs, stage: str) -> None:
    """In-process, stages take turns on the same cores: switch intra-op threads per stage."""
    n = knobs.threads(stage)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class Engine:
    """Runs many requests at once; see the module docstring."""

    def __init__(
        self,
        models: CosyVoice3Models,
        max_batch: int | None = None,
        max_seq: int | None = None,
        knobs: Knobs | None = None,
    ):
        """``knobs`` (default: ``Knobs.from_env()``) give the defaults: KV-cache slots and
        length, hop size, flow steps, prompt K/V store size and threads per stage."""
        if models.llm is None or models.flow is None or models.hift is None:
            raise ValueError("Engine needs all three stages loaded")
        self.knobs = knobs or Knobs.from_env()
        k = self.knobs
        self.models = models
        self.sample_rate = models.config.sample_rate
        # the models come loaded in their precision; backends and compile from the knobs
        self.config = {f"{s}_precision": models.precision.get(s, "fp32") for s in STAGES}
        self.config.update({f"{s}_backend": k.resolve_backend(s) for s in BACKEND_STAGES})
        self.config.update(llm_compile=k.resolve_compile(), preset=k.preset)
        sized = replace(k, max_batch=max_batch or k.max_batch, max_seq=max_seq or k.max_seq)
        self.llm = build.llm_core(models, sized, self.config)
        # one process: a new voice's prompt blocks run in its first chunk's call
        self.flow = build.flow_core(models, k, self.config, prefix_ahead=False)
        self.hift = build.hift_core(models, k, self.config)
        self.tracks: dict[str, _Track] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._out: list[Message] = []  # messages out of the HiFT core, this step

    def warm_up(self) -> None:
        """Page in every stage's weights and run one step of each (what the service's stage
        processes do before they report up); the benchmark calls it before timing."""
        for stage, core in (("llm", self.llm), ("flow", self.flow), ("hift", self.hift)):
            _threads(self.knobs, stage)
            core.warm_up()

    # -- requests ----------------------------------------------------------------------------

    def check(self, req: TTSRequest) -> None:
        """Raise :class:`RequestError` if ``req`` cannot run as given."""
        if req.strategy not in STRATEGIES:
            raise RequestError(f"strategy {req.strategy!r}: choose from {', '.join(STRATEGIES)}")
        block = self.flow.block
        hop = req.hop_tokens if req.hop_tokens is not None else self.knobs.hop_tokens
        if hop <= 0 or hop % block:
            raise RequestError(f"hop_tokens {hop}: must be a positive multiple of {block}")
        if req.text_ids.ndim != 2 or req.text_ids.shape[0] != 1 or req.text_ids.shape[1] == 0:
            raise RequestError("text_ids must have shape (1, N) with N > 0")
        try:
            self.llm.check(req)
        except ValueError as e:
            raise RequestError(str(e)) from None

    def add_request(self, req: TTSRequest) -> str:
        """Queue ``req``; returns its id (``req.request_id`` or a new one)."""
        self.check(req)
        rid = req.request_id or f"req-{next(self._ids)}"
        if rid in self.tracks:
            raise RequestError(f"request id {rid!r} is already active")
        if req.hop_tokens is None:
            req = replace(req, hop_tokens=self.knobs.hop_tokens)
        self.tracks[rid] = _Track(time.perf_counter())
        self.stats.added += 1
        self._route(self.llm.handle(Start(rid, replace(req, request_id=rid))), "flow")
        return rid

    def has_work(self) -> bool:
        return bool(self.tracks)

    def active(self) -> list[str]:
        return list(self.tracks)

    def cancel(self, rid: str) -> None:
        """Stop ``rid`` and free its state in every stage (no more chunks come for it)."""
        if self.tracks.pop(rid, None) is None:
            return
        self.stats.cancelled += 1
        out, self._out = self._out, []
        self._route(self.llm.handle(Abort(rid, "cancelled")), "flow")
        self._out = [m for m in out if m.rid != rid]  # its Abort came back: nothing to say

    # -- the loop ----------------------------------------------------------------------------

    def _route(self, msgs: list[Message], to: str) -> None:
        """Hand messages down the pipeline: llm -> flow -> hift -> self._out."""
        for m in msgs:
            if to == "flow":
                self._route(self.flow.handle(m), "hift")
            elif to == "hift":
                self._out += self.hift.handle(m)

    @torch.inference_mode()
    def step(self) -> list[AudioChunk]:
        self._out = []
        _threads(self.knobs, "llm")
        self._route(self.llm.step(), "flow")
        _threads(self.knobs, "flow")
        self._route(self.flow.step(), "hift")
        _threads(self.knobs, "hift")
        self._out += self.hift.step()
        return [c for m in self._out if (c := self._chunk(m)) is not None]

    def _chunk(self, m: Message) -> AudioChunk | None:
        tr = self.tracks.get(m.rid)
        if tr is None:  # cancelled meanwhile
            return None
        now = time.perf_counter()
        if isinstance(m, Audio):
            tr.samples += m.audio.numel()
            tr.tokens += m.tokens
            if not m.final:
                self.llm.handle(Credit(m.rid, tr.tokens))
            if tr.t_first is None and m.audio.numel():
                tr.t_first = now
            stats = None
            if m.final:
                del self.tracks[m.rid]
                first = (tr.t_first or now) - tr.t_start
                stats = RequestStats(tr.tokens, tr.samples / self.sample_rate, first,
                                     now - tr.t_start)  # fmt: skip
                self.stats.finished += 1
                self.stats.recent.append(stats)
            return AudioChunk(m.rid, m.seq, m.audio, m.final, m.tokens, stats=stats)
        if isinstance(m, (Failed, Abort)):
            del self.tracks[m.rid]
            self.stats.failed += 1
            return AudioChunk(m.rid, -1, torch.zeros(0), True, error=(m.code, m.message))
        raise AssertionError(f"unexpected message out of the pipeline: {m!r}")

    # -- iterators ---------------------------------------------------------------------------

    def run(self, requests: Iterable[TTSRequest]) -> Iterator[AudioChunk]:
        """Add ``requests`` and yield their chunks as they are made, until all are done."""
        for r in requests:
            self.add_request(r)
        while self.has_work():
            yield from self.step()

    def stream(self, requests: Iterable[TTSRequest]) -> Iterator[AudioChunk]:
        """One utterance (its segment requests, in text order): yield its audio in text order
        while the segments are computed concurrently. Chunks are renumbered 0.. with the
        utterance's first id; empty chunks are skipped except the last (``final``). A failed
        segment ends the utterance with its error chunk and cancels the rest."""
        rids = [self.add_request(r) for r in requests]
        order: SegmentOrder[AudioChunk] = SegmentOrder(rids)
        seq = 0
        while not order.done:
            for c in self.step():
                if c.request_id not in order.index:
                    continue
                if c.error is not None:
                    for rid in order.pending():
                        self.cancel(rid)
                    yield replace(c, request_id=rids[0], seq=seq)
                    return
                for d in order.push(c.request_id, c, c.final):
                    last = d.final and d.request_id == rids[-1]
                    if d.audio.numel() or last:  # never an empty chunk, but the final one may be
                        yield replace(d, request_id=rids[0], seq=seq, final=last)
                        seq += 1

    def synthesize(self, req: TTSRequest) -> Tensor:
        """The whole utterance at once, (S,) float32."""
        chunks = list(self.run([req]))
        for c in chunks:
            if c.error is not None:
                raise RequestError(f"{c.error[0]}: {c.error[1]}")
        return torch.cat([c.audio for c in chunks])
