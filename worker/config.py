"""Model hyperparameters of a CosyVoice3 model dir, as typed data.

Everything a model needs is read here from ``cosyvoice3.yaml`` (through the safe reader in
:mod:`worker.hyperyaml`) and ``CosyVoice-BlankEN/config.json``; no dim is hard-coded elsewhere.
A yaml that describes another architecture (a CosyVoice2 file, say) is refused with an error
that names the file and the class it found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.hyperyaml import ConfigError, Node, load_hyperyaml

LLM_CLASS = "cosyvoice.llm.llm.CosyVoice3LM"
FLOW_CLASS = "cosyvoice.flow.flow.CausalMaskedDiffWithDiT"
HIFT_CLASS = "cosyvoice.hifigan.generator.CausalHiFTGenerator"
YAML_NAME = "cosyvoice3.yaml"
QWEN_DIR = "CosyVoice-BlankEN"


@dataclass(frozen=True)
class QwenConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int


@dataclass(frozen=True)
class SamplingConfig:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


@dataclass(frozen=True)
class LLMConfig:
    qwen: QwenConfig
    llm_input_size: int
    llm_output_size: int
    speech_token_size: int  # 6561; sos = +0, eos = +1, task_id = +2, fill = +3
    sampling: SamplingConfig

    @property
    def num_speech_logits(self) -> int:  # speech_embedding / llm_decoder rows
        return self.speech_token_size + 200

    @property
    def sos(self) -> int:
        return self.speech_token_size

    @property
    def eos(self) -> int:
        return self.speech_token_size + 1

    @property
    def task_id(self) -> int:
        return self.speech_token_size + 2

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 3


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    depth: int
    heads: int
    dim_head: int
    ff_mult: int
    mel_dim: int
    mu_dim: int
    spk_dim: int
    out_channels: int
    static_chunk_size: int  # DiT attention block, in mel frames (25 tokens * 2 = 50)


@dataclass(frozen=True)
class FlowConfig:
    input_size: int
    output_size: int
    spk_embed_dim: int
    vocab_size: int
    token_mel_ratio: int
    pre_lookahead_len: int
    pre_lookahead_channels: int
    inference_cfg_rate: float
    t_scheduler: str
    dit: DiTConfig
    n_timesteps: int = 10  # hard-coded upstream


@dataclass(frozen=True)
class HiFTConfig:
    in_channels: int
    base_channels: int
    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float
    nsf_sigma: float
    nsf_voiced_threshold: float
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    n_fft: int
    hop_len: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    source_resblock_kernel_sizes: tuple[int, ...]
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    lrelu_slope: float
    audio_limit: float
    conv_pre_look_right: int
    f0_in_channels: int
    f0_cond_channels: int
    f0_num_class: int

    @property
    def samples_per_frame(self) -> int:  # 480 at 24 kHz
        n = self.hop_len
        for u in self.upsample_rates:
            n *= u
        return n


@dataclass(frozen=True)
class ModelConfig:
    llm: LLMConfig
    flow: FlowConfig
    hift: HiFTConfig
    sample_rate: int
    token_frame_rate: int
    chunk_size: int  # streaming hop in tokens (25)


def _need(node: Any, key: str, where: str, path: Path) -> Any:
    kw = node.kwargs if isinstance(node, Node) else node
    if not isinstance(kw, dict) or key not in kw:
        raise ConfigError(f"{path}: missing '{key}' in {where or 'the top level'}")
    return kw[key]


def _node(parent: Any, key: str, cls: str | None, where: str, path: Path) -> Node:
    node = _need(parent, key, where, path)
    if not isinstance(node, Node):
        raise ConfigError(f"{path}: '{where}.{key}' must be a !new: tag, got {node!r:.80}")
    if cls is not None and node.target != cls:
        raise ConfigError(
            f"{path}: '{where}.{key}' is {node.target}; this worker supports {cls} (CosyVoice3)"
        )
    return node


def _int(v: Any, what: str, path: Path) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{path}: {what} must be a positive integer, got {v!r}")
    return v


def read_qwen_config(path: Path) -> QwenConfig:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read Qwen2 config: {e}") from e
    if cfg.get("model_type", "qwen2") != "qwen2":
        raise ConfigError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'qwen2'")
    try:
        hidden = _int(cfg["hidden_size"], "hidden_size", path)
        heads = _int(cfg["num_attention_heads"], "num_attention_heads", path)
        q = QwenConfig(
            hidden_size=hidden,
            num_layers=_int(cfg["num_hidden_layers"], "num_hidden_layers", path),
            num_heads=heads,
            num_kv_heads=_int(cfg.get("num_key_value_heads", heads), "num_key_value_heads", path),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=_int(cfg["intermediate_size"], "intermediate_size", path),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            vocab_size=_int(cfg["vocab_size"], "vocab_size", path),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        )
    except KeyError as e:
        raise ConfigError(f"{path}: missing key {e.args[0]!r}") from e
    if q.num_heads % q.num_kv_heads:
        raise ConfigError(f"{path}: num_attention_heads {heads} not a multiple of kv heads")
    return q


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Read ``cosyvoice3.yaml`` + ``CosyVoice-BlankEN/config.json`` of a model dir."""
    model_dir = Path(model_dir)
    path = model_dir / YAML_NAME
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no {YAML_NAME} (not a CosyVoice3 model dir?)")
    hp = load_hyperyaml(path, {"qwen_pretrain_path": str(model_dir / QWEN_DIR)})
    qwen = read_qwen_config(model_dir / QWEN_DIR / "config.json")

    llm = _node(hp, "llm", LLM_CLASS, "", path)
    samp = _need(llm, "sampling", "llm", path)
    skw = samp.kwargs if isinstance(samp, Node) else {}
    llm_cfg = LLMConfig(
        qwen=qwen,
        llm_input_size=_int(_need(llm, "llm_input_size", "llm", path), "llm_input_size", path),
        llm_output_size=_int(_need(llm, "llm_output_size", "llm", path), "llm_output_size", path),
        speech_token_size=_int(
            _need(llm, "speech_token_size", "llm", path), "speech_token_size", path
        ),
        sampling=SamplingConfig(
            top_p=float(skw.get("top_p", 0.8)),
            top_k=int(skw.get("top_k", 25)),
            win_size=int(skw.get("win_size", 10)),
            tau_r=float(skw.get("tau_r", 0.1)),
        ),
    )
    if llm_cfg.llm_input_size != qwen.hidden_size or llm_cfg.llm_output_size != qwen.hidden_size:
        raise ConfigError(
            f"{path}: llm_input_size/llm_output_size ({llm_cfg.llm_input_size}/"
            f"{llm_cfg.llm_output_size}) differ from hidden_size {qwen.hidden_size} in config.json"
        )

    flow = _node(hp, "flow", FLOW_CLASS, "", path)
    pre = _node(flow, "pre_lookahead_layer", None, "flow", path)
    dec = _node(flow, "decoder", None, "flow", path)
    est = _node(dec, "estimator", None, "flow.decoder", path)
    cfm = _need(dec, "cfm_params", "flow.decoder", path)
    cfm = cfm.kwargs.get("content", cfm.kwargs) if isinstance(cfm, Node) else cfm

    def e(k: str) -> int:
        return _int(_need(est, k, "flow.decoder.estimator", path), f"estimator.{k}", path)

    dit = DiTConfig(
        dim=e("dim"),
        depth=e("depth"),
        heads=e("heads"),
        dim_head=e("dim_head"),
        ff_mult=e("ff_mult"),
        mel_dim=e("mel_dim"),
        mu_dim=e("mu_dim"),
        spk_dim=e("spk_dim"),
        out_channels=e("out_channels"),
        static_chunk_size=e("static_chunk_size"),
    )
    flow_cfg = FlowConfig(
        input_size=_int(_need(flow, "input_size", "flow", path), "flow.input_size", path),
        output_size=_int(_need(flow, "output_size", "flow", path), "flow.output_size", path),
        spk_embed_dim=_int(_need(flow, "spk_embed_dim", "flow", path), "spk_embed_dim", path),
        vocab_size=_int(_need(flow, "vocab_size", "flow", path), "flow.vocab_size", path),
        token_mel_ratio=_int(_need(flow, "token_mel_ratio", "flow", path), "token_mel_ratio", path),
        pre_lookahead_len=_int(
            _need(flow, "pre_lookahead_len", "flow", path), "pre_lookahead_len", path
        ),
        pre_lookahead_channels=_int(
            _need(pre, "channels", "flow.pre_lookahead_layer", path), "channels", path
        ),
        inference_cfg_rate=float(_need(cfm, "inference_cfg_rate", "cfm_params", path)),
        t_scheduler=str(cfm.get("t_scheduler", "cosine")),
        dit=dit,
    )
    if flow_cfg.t_scheduler != "cosine":
        raise ConfigError(f"{path}: t_scheduler {flow_cfg.t_scheduler!r}: only 'cosine' is used")

    hift = _node(hp, "hift", HIFT_CLASS, "", path)
    f0 = _node(hift, "f0_predictor", None, "hift", path)
    ist = _need(hift, "istft_params", "hift", path)

    def h(k: str) -> Any:
        return _need(hift, k, "hift", path)

    hift_cfg = HiFTConfig(
        in_channels=_int(h("in_channels"), "hift.in_channels", path),
        base_channels=_int(h("base_channels"), "hift.base_channels", path),
        nb_harmonics=_int(h("nb_harmonics"), "nb_harmonics", path),
        sampling_rate=_int(h("sampling_rate"), "hift.sampling_rate", path),
        nsf_alpha=float(h("nsf_alpha")),
        nsf_sigma=float(h("nsf_sigma")),
        nsf_voiced_threshold=float(h("nsf_voiced_threshold")),
        upsample_rates=tuple(h("upsample_rates")),
        upsample_kernel_sizes=tuple(h("upsample_kernel_sizes")),
        n_fft=_int(_need(ist, "n_fft", "hift.istft_params", path), "n_fft", path),
        hop_len=_int(_need(ist, "hop_len", "hift.istft_params", path), "hop_len", path),
        resblock_kernel_sizes=tuple(h("resblock_kernel_sizes")),
        resblock_dilation_sizes=tuple(tuple(d) for d in h("resblock_dilation_sizes")),
        source_resblock_kernel_sizes=tuple(h("source_resblock_kernel_sizes")),
        source_resblock_dilation_sizes=tuple(tuple(d) for d in h("source_resblock_dilation_sizes")),
        lrelu_slope=float(h("lrelu_slope")),
        audio_limit=float(h("audio_limit")),
        conv_pre_look_right=_int(h("conv_pre_look_right"), "conv_pre_look_right", path),
        f0_in_channels=_int(_need(f0, "in_channels", "hift.f0_predictor", path), "f0 in", path),
        f0_cond_channels=_int(
            _need(f0, "cond_channels", "hift.f0_predictor", path), "cond_channels", path
        ),
        f0_num_class=_int(f0.kwargs.get("num_class", 1), "num_class", path),
    )
    if hift_cfg.sampling_rate == 22050:
        raise ConfigError(f"{path}: 22.05 kHz HiFT (SineGen v1) is not CosyVoice3")
    return ModelConfig(
        llm=llm_cfg,
        flow=flow_cfg,
        hift=hift_cfg,
        sample_rate=_int(_need(hp, "sample_rate", "", path), "sample_rate", path),
        token_frame_rate=_int(_need(hp, "token_frame_rate", "", path), "token_frame_rate", path),
        chunk_size=_int(_need(hp, "chunk_size", "", path), "chunk_size", path),
    )
