"""The Flow stage core: Start and speech tokens in, mel chunks out.

One stream per request: :class:`worker.flow_stream.FlowStream` (``incremental``: per-block
K/V caches, every chunk costs the same; with ``prefix_ahead`` (the stage process) a new
voice's prompt-only blocks run as soon as the request starts, while the LLM is still decoding
its first hop; without (in one process) they run in the first chunk's DiT call) or
:class:`worker.reference.RecomputeFlow` (``recompute``: upstream's strategy). Each
:meth:`FlowCore.step` runs the ready chunks (a full hop plus lookahead, or the rest once the
tokens are final) of up to ``max_batch`` incremental requests as one packed DiT call per
Euler step (:func:`worker.flow_stream.run_chunks`: the GEMMs see k chunks' rows at once),
most urgent first: new requests' first chunks, then round robin, so no request waits for
another's whole utterance. A batch that fails is retried request by request, so a failure
stays with the request that caused it. The per-voice state of prompt-only DiT blocks is
shared across requests (:class:`PromptKVStore`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from worker.flow import Flow
from worker.flow_stream import FlowStream, PromptKVStore, run_chunks
from worker.reference import RecomputeFlow
from worker.request import STRATEGIES
from worker.stages.messages import Abort, Failed, Mel, Message, Start, Tokens

log = logging.getLogger(__name__)


@dataclass
class _FlowRequest:
    stream: FlowStream | RecomputeFlow
    final: bool = False  # every token has arrived
    t_start: float = field(default_factory=time.monotonic)
    frames_out: int = 0  # mel frames emitted
    last_run: float = 0.0  # monotonic time of its last chunk

    def has_work(self, prefix_ahead: bool = True) -> bool:
        chunk = self.final or self.stream.ready()
        return chunk or (prefix_ahead and self.stream.prefix_pending())


class FlowCore:
    name = "flow"

    def __init__(
        self,
        flow: Flow,
        hop_tokens: int = 25,
        n_steps: int | None = None,
        prompt_kv_mb: int = 0,
        max_batch: int = 4,
        prefix_ahead: bool = True,
        dit=None,  # the DiT step (worker.ort_flow.OrtDiT for the ORT backend); None: torch
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.flow = flow
        self.dit = dit or flow.decoder.estimator
        self.max_batch = max_batch
        # run a new voice's prompt-only blocks before its first hop's tokens are there: a
        # gain where the LLM decodes meanwhile on other cycles (its own process); in one
        # process (Engine) they run as part of the first chunk's call (more rows, one call)
        self.prefix_ahead = prefix_ahead
        self.hop_tokens = hop_tokens
        self.n_steps = n_steps or flow.cfg.n_timesteps
        self.block = flow.cfg.dit.static_chunk_size // flow.cfg.token_mel_ratio  # 25 tokens
        self.prompt_kv = PromptKVStore(prompt_kv_mb << 20)
        self.reqs: dict[str, _FlowRequest] = {}
        self.busy_s = 0.0
        self.chunks = 0
        self.calls = 0  # solver runs (a batch of chunks counts once)
        self.call_log: deque[tuple[int, int, float]] = deque(maxlen=4096)  # (chunks, frames, s)

    def _open(self, msg: Start) -> _FlowRequest:
        req, cfg = msg.req, self.flow.cfg
        hop = req.hop_tokens or self.hop_tokens
        if hop <= 0 or hop % self.block:
            raise ValueError(f"hop_tokens {hop}: must be a positive multiple of {self.block}")
        if req.strategy not in STRATEGIES:
            raise ValueError(f"strategy {req.strategy!r}: choose from {', '.join(STRATEGIES)}")
        prompt = req.flow_prompt_speech
        if prompt is None:
            prompt = torch.zeros(1, 0, dtype=torch.long)
        feat = req.prompt_feat
        if feat is None:
            feat = torch.zeros(1, 0, cfg.output_size)
        prompt = prompt.long()
        if req.strategy == "recompute":
            stream = RecomputeFlow(self.flow, prompt, feat, req.embedding, hop, self.n_steps)
        else:
            stream = FlowStream(self.flow, prompt, feat, req.embedding, hop,
                                prompt_store=self.prompt_kv, n_steps=self.n_steps,
                                dit=self.dit)  # fmt: skip
        return _FlowRequest(stream)

    def handle(self, msg: Message) -> list[Message]:
        if isinstance(msg, Start):
            try:
                self.reqs[msg.rid] = self._open(msg)
            except ValueError as e:
                return [Failed(msg.rid, "bad_request", str(e))]
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                log.exception("flow: start of %s failed", msg.rid)
                return [Failed(msg.rid, "internal", f"flow start failed: {e}")]
            return [msg]
        if isinstance(msg, Tokens):
            r = self.reqs.get(msg.rid)
            if r is not None:  # else: the request failed here already
                r.stream.feed(msg.tokens.reshape(1, -1))
                r.final = msg.final
            return []
        if isinstance(msg, (Abort, Failed)):
            self.reqs.pop(msg.rid, None)
            return [msg]
        return [Failed(msg.rid, "internal", f"flow stage got a {type(msg).__name__} message")]

    def has_work(self) -> bool:
        return any(r.has_work(self.prefix_ahead) for r in self.reqs.values())

    @staticmethod
    def _priority(r: _FlowRequest) -> tuple[int, float]:
        """Requests without audio yet first, in arrival order (a listener waiting for its
        first chunk); then the one served least recently (round robin). Deadlines in audio
        time would starve late arrivals whenever the host is slower than real time."""
        if r.frames_out == 0:
            return (0, r.t_start)
        return (1, r.last_run)

    def active_ids(self) -> list[str]:
        return list(self.reqs)

    @torch.inference_mode()
    def step(self) -> list[Message]:
        """The ready chunks of the most urgent requests (:meth:`_priority`), up to
        ``max_batch`` incremental ones solved together; or, when no chunk is ready, a new
        voice's prompt-only blocks. -> [] / [Mel | Failed, ...]."""
        ready = sorted(
            ((rid, r) for rid, r in self.reqs.items() if r.has_work(self.prefix_ahead)),
            key=lambda x: self._priority(x[1]),
        )
        if not ready:
            return []
        t0 = time.perf_counter()
        chunks = [(rid, r) for rid, r in ready if r.final or r.stream.ready()]
        out: list[Message] = []
        if not chunks:  # the prompt-only blocks, ahead of time
            rid, r = ready[0]
            try:
                r.stream.run_prefix()
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                out = self._fail(rid, e)
        elif not isinstance(chunks[0][1].stream, FlowStream):  # recompute: one at a time
            rid, r = chunks[0]
            try:
                chunk = r.stream.next_chunk(finalize=r.final)
            except Exception as e:  # noqa: BLE001
                out = self._fail(rid, e)
            else:
                out = self._emit(rid, r, chunk)
        else:
            batch = [(rid, r) for rid, r in chunks if isinstance(r.stream, FlowStream)]
            out = self._run_batch(batch[: self.max_batch])
        self.busy_s += time.perf_counter() - t0
        return out

    def _run_batch(self, batch: list[tuple[str, _FlowRequest]]) -> list[Message]:
        """Solve the batch's next chunks together; if that fails, each request alone (a
        failed solve leaves every stream as it was), so only the culprit fails."""
        t0 = time.perf_counter()
        try:
            jobs = [(rid, r, j) for rid, r in batch if (j := r.stream.plan_chunk(r.final))]
            xs = run_chunks([j for _, _, j in jobs]) if jobs else []
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                return self._fail(batch[0][0], e)
            log.warning("flow: a batch of %d chunks failed (%s); one by one", len(batch), e)
            return [m for item in batch for m in self._run_batch([item])]
        if jobs:
            self.calls += 1
            frames = sum(j.frames for _, _, j in jobs)
            self.call_log.append((len(jobs), frames, time.perf_counter() - t0))
        out = []
        for (rid, r, job), x in zip(jobs, xs, strict=True):
            out += self._emit(rid, r, r.stream.finish_chunk(job, x))
        return out

    def _fail(self, rid: str, e: Exception) -> list[Message]:
        log.error("flow: chunk of %s failed", rid, exc_info=e)
        self.reqs.pop(rid, None)
        return [Failed(rid, "internal", f"flow failed: {e}")]

    def _emit(self, rid: str, r: _FlowRequest, chunk) -> list[Message]:
        """(mel, covered tokens) or None -> [Mel] / []."""
        if chunk is None:
            return []
        self.chunks += 1
        mel, covered = chunk
        r.frames_out += mel.shape[2]
        r.last_run = time.monotonic()
        if r.stream.finished:
            del self.reqs[rid]
        return [Mel(rid, mel.contiguous(), covered, r.stream.finished)]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Page in the weights and run one chunk of a scratch stream (no prompt)."""
        cfg = self.flow.cfg
        stream = FlowStream(self.flow, torch.zeros(1, 0, dtype=torch.long),
                            torch.zeros(1, 0, cfg.output_size), torch.zeros(1, cfg.spk_embed_dim),
                            self.block, n_steps=self.n_steps, dit=self.dit)  # fmt: skip
        stream.feed(torch.zeros(1, self.block + cfg.pre_lookahead_len, dtype=torch.long))
        stream.next_chunk()

    def stats(self) -> dict[str, float | int]:
        return {
            "active": len(self.reqs), "chunks": self.chunks, "calls": self.calls,
            "busy_s": round(self.busy_s, 3),
            "prompt_kv_entries": len(self.prompt_kv.entries),
            "prompt_kv_hits": self.prompt_kv.hits, "prompt_kv_misses": self.prompt_kv.misses,
        }  # fmt: skip
