"""Random-weight model dirs in the released layout: ``python -m tuning.random_model --dims
tiny|official --out DIR [--seed N]``.

No trained CosyVoice3 weights can be downloaded on our build hosts, so benchmarks, the demo and
tests run on model dirs written here: ``cosyvoice3.yaml`` (the released file's structure and
hyperpyyaml tags, with the chosen dims), ``CosyVoice-BlankEN/`` (a Qwen2 ``config.json`` and a
small byte-level BPE tokenizer), and ``llm.pt``/``flow.pt``/``hift.pt`` whose keys and shapes are
exactly those of the released checkpoints for these dims (at ``official`` dims they equal
``cosyvoice3-shapes.json``), plus small random stand-ins for ``speech_tokenizer_v3.onnx`` and
``campplus.onnx`` (:mod:`tuning.onnx_standins`). Speed does not depend on weight values; the
speech is noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tuning.onnx_standins import write_onnx_standins
from worker.config import QWEN_DIR, YAML_NAME, read_model_config
from worker.flow import checkpoint_shapes as flow_shapes
from worker.hift import checkpoint_shapes as hift_shapes
from worker.llm import checkpoint_shapes as llm_shapes


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    pre_lookahead: int
    dit_dim: int
    dit_depth: int
    dit_heads: int
    dit_dim_head: int
    hift_base: int
    f0_channels: int


DIMS = {
    "tiny": Dims(64, 2, 4, 2, 128, 1024, 64, 64, 2, 4, 16, 32, 32),
    "official": Dims(896, 24, 14, 2, 4864, 151936, 1024, 1024, 22, 16, 64, 512, 512),
}

YAML_TEMPLATE = """\
# Random-weight CosyVoice3 model dir written by tuning.random_model (dims: {name}, seed: {seed}).
# THE WEIGHTS ARE RANDOM: it synthesizes noise. Same structure and tags as the released yaml.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

sample_rate: 24000
llm_input_size: {d.hidden}
llm_output_size: {d.hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.CosyVoice3LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {d.pre_lookahead}
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {d.dit_dim}
            depth: {d.dit_depth}
            heads: {d.dit_heads}
            dim_head: {d.dit_dim_head}
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: {d.hift_base}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {d.f0_channels}

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: null
    center: False
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
    version: cosyvoice3
allowed_special: 'all'
"""


def qwen_config(d: Dims) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643 if d.vocab > 151643 else 256,
        "eos_token_id": 151643 if d.vocab > 151643 else 256,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.mlp,
        "max_position_embeddings": 32768,
        "max_window_layers": d.layers,
        "model_type": "qwen2",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": d.vocab,
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen2 byte-to-symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tokenizer(out: Path) -> None:
    """A minimal byte-level BPE in Qwen2's file format: 256 byte symbols, no merges, and the
    three Qwen specials right after them (as the real BlankEN files have after 151,643)."""
    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols[b] for b in range(256))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = {
        str(256 + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": True}
        for i, s in enumerate(specials)
    }  # fmt: skip
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def random_state_dict(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict:
    """Random tensors for a checkpoint layout: N(0, 0.02) matrices, zero biases, unit norms and
    Snake alphas, weight-norm gains equal to the direction's norm (so w = v)."""
    sd: dict[str, torch.Tensor] = {}
    for k, shape in shapes.items():
        if k.endswith(".original0"):
            continue  # filled from its original1 below
        if k.endswith("inv_freq"):
            d = shape[0] * 2
            sd[k] = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        elif k.endswith(".bias"):
            sd[k] = torch.zeros(shape)
        elif len(shape) == 1:  # RMSNorm weights, Snake alphas
            sd[k] = torch.ones(shape)
        else:
            std = 0.01 if len(shape) == 3 else 0.02
            sd[k] = torch.randn(shape, generator=gen) * std
        if k.endswith(".original1"):
            g = k[: -len("original1")] + "original0"
            sd[g] = sd[k].flatten(1).norm(dim=1).reshape(shapes[g])
    return {k: sd[k] for k in shapes}


def write_model_dir(out: str | Path, dims: str = "tiny", seed: int = 0) -> Path:
    if dims not in DIMS:
        raise ValueError(f"unknown --dims {dims!r}; choose from {sorted(DIMS)}")
    d = DIMS[dims]
    out = Path(out)
    (out / QWEN_DIR).mkdir(parents=True, exist_ok=True)
    (out / YAML_NAME).write_text(YAML_TEMPLATE.format(d=d, name=dims, seed=seed), encoding="utf-8")
    (out / QWEN_DIR / "config.json").write_text(json.dumps(qwen_config(d), indent=2) + "\n")
    write_tokenizer(out / QWEN_DIR)
    (out / "README.md").write_text(
        f"Random-weight CosyVoice3 model dir (dims {dims}, seed {seed}) written by "
        "`python -m tuning.random_model`. The weights are random: output audio is noise.\n"
    )
    cfg = read_model_config(out)
    gen = torch.Generator().manual_seed(seed)
    for name, shapes in (
        ("llm.pt", llm_shapes(cfg.llm)),
        ("flow.pt", flow_shapes(cfg.flow)),
        ("hift.pt", hift_shapes(cfg.hift)),
    ):
        sd = random_state_dict(shapes, gen)
        if name == "llm.pt":  # tied embeddings, saved as one storage as upstream does
            sd["llm.model.lm_head.weight"] = sd["llm.model.model.embed_tokens.weight"]
        torch.save(sd, out / name)
        del sd
    write_onnx_standins(out, seed)  # speech_tokenizer_v3.onnx, campplus.onnx
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuning.random_model", description=__doc__)
    ap.add_argument("--dims", choices=sorted(DIMS), default="tiny")
    ap.add_argument("--out", required=True, help="directory to write (created if missing)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = write_model_dir(args.out, args.dims, args.seed)
    print(f"wrote random-weight ({args.dims}) CosyVoice3 model dir: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
