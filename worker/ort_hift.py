"""The HiFT vocoder's step in ONNX Runtime: its export, its cached graphs, and the adapter.

This file owns:

- :func:`export_hift_step`: ``HiFTGenerator.forward_chunk(., finalize)`` (worker/hift.py: the
  step depends on no Python state, its sine noise is an input) written as an ONNX graph, one
  per ``finalize`` value (TorchScript exporter, opset 17):

    mel (1, 80, frames)   noise (1, samples, H)   state.<name> (fixed shapes)
    -> audio (1, out), next.<name>

  with ``<name>`` from ``HiFTGenerator.state_names()``. The f0 predictor runs in float64, for
  which ORT's CPU provider has no ``Elu``: the exporter's symbolic is replaced by one written
  with ``Where`` / ``Exp`` (:func:`_elu_any_dtype`).
- :func:`hift_onnx_paths`: both graphs cached per model fingerprint (``hift.pt``, the yaml, the
  source of worker/hift.py and this file, the opset; the torch / onnx versions) as
  ``hift-step-<fp>.onnx`` / ``hift-final-<fp>.onnx``, exported on first use through
  :func:`worker.ort.cached_export` (:class:`worker.ort.ExportError` naming the directory when
  it cannot be written).
- :class:`OrtHiFTStep`: ``forward_chunk``'s signature on the two sessions, a drop-in ``step``
  for :class:`worker.hift_stream.HiFTStream`; :func:`load_ort_hift` builds one for a model dir
  (sessions from :func:`worker.ort.load_session`: the optimized graphs cached beside the
  exports).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worker import hift as hift_module
from worker.config import YAML_NAME
from worker.hift import HiFTGenerator
from worker.ort import cached_export, load_session, model_fingerprint, session

log = logging.getLogger(__name__)

OPSET = 17


class _StepGraph(nn.Module):
    """``forward_chunk`` with flat arguments, for the exporter."""

    def __init__(self, model: HiFTGenerator, finalize: bool):
        super().__init__()
        self.model, self.finalize = model, finalize

    def forward(self, mel: Tensor, noise: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        audio, state = self.model.forward_chunk(mel, noise, state, self.finalize)
        return (audio, *state)


def _elu_any_dtype(g, x, alpha, scale, input_scale):
    # ONNX Elu has no float64 kernel in ORT's CPU provider (the f0 predictor is float64):
    # x > 0 ? x : exp(x) - 1
    if (alpha, scale, input_scale) != (1.0, 1.0, 1.0):
        raise ValueError("only ELU(alpha=1) is exported")
    zero, one = (g.op("CastLike", g.op("Constant", value_t=torch.tensor(v)), x) for v in (0.0, 1.0))
    return g.op("Where", g.op("Greater", x, zero), x, g.op("Sub", g.op("Exp", x), one))


def export_hift_step(
    model: HiFTGenerator,
    path: str | Path,
    example_chunk_frames: int = 50,
    finalize: bool = False,
    opset: int = OPSET,
) -> Path:
    """Write ``model.forward_chunk(., finalize)`` to ``path`` as an ONNX graph (TorchScript
    exporter): inputs ``mel`` (1, 80, frames), ``noise`` (1, samples, H) and ``state.<name>``;
    outputs ``audio`` and ``next.<name>`` (``model.state_names()``). The frame count is a dynamic
    axis; ``example_chunk_frames`` only sizes the tracing inputs. Export both ``finalize`` values
    for an :class:`OrtHiFTStep`."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    path = Path(path)
    mel = torch.zeros(1, model.cfg.in_channels, example_chunk_frames)
    noise = model.chunk_noise(0, example_chunk_frames, finalize)
    names = model.state_names()
    register_custom_op_symbolic("aten::elu", parse_args("v", "f", "f", "f")(_elu_any_dtype), opset)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # legacy exporter
            # reflect padding builds its pads with a reversing Slice, left unfolded: harmless
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1")
            torch.onnx.export(
                _StepGraph(model, finalize),
                (mel, noise, *model.initial_state()),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["mel", "noise", *(f"state.{n}" for n in names)],
                output_names=["audio", *(f"next.{n}" for n in names)],
                dynamic_axes={"mel": {2: "frames"}, "noise": {1: "samples"}, "audio": {1: "out"}},
            )
    finally:
        unregister_custom_op_symbolic("aten::elu", opset)
    return path


# ---- the cached graphs ---------------------------------------------------------------------------


def _export_code() -> bytes:
    """The code the exported graphs come from (worker/hift.py and this file)."""
    return Path(hift_module.__file__).read_bytes() + Path(__file__).read_bytes()


def _onnx_names(model_dir: Path) -> tuple[str, str]:
    """The cache file names of ``model_dir``'s step and final graphs."""
    yaml = (model_dir / YAML_NAME).read_bytes()
    fp = model_fingerprint(model_dir / "hift.pt", yaml, _export_code(), f"opset {OPSET}")[:24]
    return f"hift-step-{fp}.onnx", f"hift-final-{fp}.onnx"


def hift_onnx_paths(
    model_dir: str | Path,
    cache_dir: str | Path,
    hift: HiFTGenerator | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """The step and final graphs (``finalize`` False / True) of ``model_dir``'s HiFT as ONNX in
    ``cache_dir``, each exported on first use (from ``hift`` if given, else the hift stage is
    loaded from ``model_dir``, once, and only when an export is needed). Raises
    :class:`worker.ort.ExportError`, or ``ConfigError`` for a path that is not a model dir."""
    from worker.model_dir import check_layout

    model_dir = Path(model_dir)
    check_layout(model_dir)
    loaded = [hift]

    def model() -> HiFTGenerator:
        if loaded[0] is None:
            from worker.model_dir import load_model_dir

            (progress or log.info)(f"loading the hift of {model_dir} ...")
            loaded[0] = load_model_dir(model_dir, stages=("hift",)).hift
        return loaded[0]

    step_name, final_name = _onnx_names(model_dir)
    step = cached_export(
        cache_dir, step_name, lambda p: export_hift_step(model(), p, finalize=False), progress
    )
    final = cached_export(
        cache_dir, final_name, lambda p: export_hift_step(model(), p, finalize=True), progress
    )
    return step, final


# ---- the adapter ---------------------------------------------------------------------------------


class OrtHiFTStep:
    """``HiFTGenerator.forward_chunk`` run by ONNX Runtime, same signature (a drop-in ``step``
    for :class:`worker.hift_stream.HiFTStream`): ``step_path`` / ``final_path`` are the graphs
    :func:`export_hift_step` wrote with ``finalize`` False / True (sessions from
    :func:`worker.ort.session`; :meth:`from_sessions` takes sessions built elsewhere)."""

    def __init__(
        self, step_path: str | Path, final_path: str | Path, threads: int = 1, spin: bool = False
    ):
        self._attach(session(step_path, threads, spin), session(final_path, threads, spin))

    @classmethod
    def from_sessions(cls, step_session: Any, final_session: Any) -> OrtHiFTStep:
        """An adapter on two ORT sessions of the graphs (``finalize`` False / True)."""
        self = cls.__new__(cls)
        self._attach(step_session, final_session)
        return self

    def _attach(self, step_session: Any, final_session: Any) -> None:
        self.sessions = {False: step_session, True: final_session}
        self._inputs = {f: [i.name for i in s.get_inputs()] for f, s in self.sessions.items()}

    def __call__(
        self, mel: Tensor, noise: Tensor, state: tuple[Tensor, ...], finalize: bool = False
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        args = (mel, noise, *state)
        feeds = {n: a.contiguous().numpy() for n, a in zip(self._inputs[finalize], args)}
        audio, *state = self.sessions[finalize].run(None, feeds)
        return torch.from_numpy(audio), tuple(torch.from_numpy(s) for s in state)


def load_ort_hift(
    model_dir: str | Path,
    cache_dir: str | Path,
    threads: int,
    spin: bool = False,
    hift: HiFTGenerator | None = None,
    progress: Callable[[str], None] | None = None,
) -> OrtHiFTStep:
    """An :class:`OrtHiFTStep` for ``model_dir``: its cached graphs (exported first if missing,
    from ``hift`` if given) in :func:`worker.ort.load_session` sessions with ``threads``
    intra-op threads (the optimized graphs cached beside the exports when the cache dir
    allows)."""
    step, final = hift_onnx_paths(model_dir, cache_dir, hift, progress)
    return OrtHiFTStep.from_sessions(
        load_session(step, threads, spin), load_session(final, threads, spin)
    )
