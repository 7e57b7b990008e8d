"""Loading model dirs: the released layout, official shapes, and every bad-model-dir case
giving an error that names the file, key and shapes (and never executing anything)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import FIXTURES
from tuning.random_model import DIMS, qwen_config, write_model_dir
from worker.checkpoint import CheckpointError, meta_state_dict
from worker.config import read_model_config
from worker.hyperyaml import ConfigError
from worker.llm import CosyVoice3LM, checkpoint_shapes, convert_checkpoint
from worker.model_dir import load_model_dir


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("m") / "tiny", "tiny", seed=5)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def test_official_llm_layout_on_meta_matches_manifest(tiny_config):
    manifest = json.loads((FIXTURES / "cosyvoice3-shapes.json").read_text())["llm"]
    d = DIMS["official"]
    q = replace(
        tiny_config.llm.qwen,
        hidden_size=d.hidden,
        num_layers=d.layers,
        num_heads=d.heads,
        num_kv_heads=d.kv_heads,
        head_dim=d.hidden // d.heads,
        intermediate_size=d.mlp,
        vocab_size=d.vocab,
    )
    cfg = replace(tiny_config.llm, qwen=q, llm_input_size=d.hidden, llm_output_size=d.hidden)
    shapes = checkpoint_shapes(cfg)
    assert {k: list(v) for k, v in shapes.items()} == manifest
    with torch.device("meta"):
        model = CosyVoice3LM(cfg)
    converted = convert_checkpoint(meta_state_dict(shapes), cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == own
    assert "lm_head.weight" not in own  # the text head is never loaded


def test_random_official_config_matches_manifest(tmp_path):
    """tuning.random_model's official yaml/config give the released shapes for all three files
    (checked without writing 3.4 GB of weights)."""
    from tuning.random_model import YAML_TEMPLATE
    from worker.flow import checkpoint_shapes as flow_shapes
    from worker.hift import checkpoint_shapes as hift_shapes

    d = DIMS["official"]
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "cosyvoice3.yaml").write_text(YAML_TEMPLATE.format(d=d, name="official", seed=0))
    (tmp_path / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(qwen_config(d)))
    cfg = read_model_config(tmp_path)
    manifest = json.loads((FIXTURES / "cosyvoice3-shapes.json").read_text())
    for name, fn, sub in (
        ("llm", checkpoint_shapes, cfg.llm),
        ("flow", flow_shapes, cfg.flow),
        ("hift", hift_shapes, cfg.hift),
    ):
        assert {k: list(v) for k, v in fn(sub).items()} == manifest[name], name


def test_random_dir_loads_and_differs_from_fixture(random_dir, tiny_dir):
    m = load_model_dir(random_dir)
    t = load_model_dir(tiny_dir, stages=("llm",))
    assert m.config.llm == t.config.llm
    assert not torch.equal(m.llm.llm_decoder.weight, t.llm.llm_decoder.weight)


def test_loading_assigns_mmap_tensors_without_copies(tiny_dir, monkeypatch):
    """mmap + assign: the module's parameters are the checkpoint's (file-backed) tensors."""
    import worker.llm as llm_mod

    seen = {}
    real = llm_mod.load_state_dict_file

    def spy(path, mmap=True):
        seen["mmap"] = mmap
        seen["sd"] = real(path, mmap=mmap)
        return seen["sd"]

    monkeypatch.setattr(llm_mod, "load_state_dict_file", spy)
    m = load_model_dir(tiny_dir, stages=("llm",))
    assert seen["mmap"] is True
    w = m.llm.layers[0].mlp.up_proj.weight
    assert w.data_ptr() == seen["sd"]["llm.model.model.layers.0.mlp.up_proj.weight"].data_ptr()


def test_missing_file_names_it(random_dir, tmp_path):
    d = _copy(random_dir, tmp_path)
    (d / "flow.pt").unlink()
    with pytest.raises(ConfigError, match="flow.pt"):
        load_model_dir(d)


def test_truncated_checkpoint_names_file(random_dir, tmp_path):
    d = _copy(random_dir, tmp_path)
    data = (d / "hift.pt").read_bytes()
    (d / "hift.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model_dir(d)
    assert "hift.pt" in str(e.value)


def test_non_checkpoint_bytes(random_dir, tmp_path):
    d = _copy(random_dir, tmp_path)
    (d / "llm.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="llm.pt"):
        load_model_dir(d)


def test_misshaped_missing_and_unexpected_keys_are_all_named(random_dir, tmp_path):
    d = _copy(random_dir, tmp_path)
    sd = torch.load(d / "llm.pt", weights_only=True)
    sd["llm_decoder.weight"] = torch.zeros(10, 64)
    del sd["llm.model.model.norm.weight"]
    sd["llm.extra.weight"] = torch.zeros(3)
    torch.save(sd, d / "llm.pt")
    with pytest.raises(CheckpointError) as e:
        load_model_dir(d)
    msg = str(e.value)
    assert "llm.pt" in msg
    assert "llm_decoder.weight: shape (10, 64), expected (6761, 64)" in msg
    assert "missing key llm.model.model.norm.weight" in msg
    assert "unexpected key llm.extra.weight" in msg


def test_config_json_with_wrong_dims_names_the_conflict(random_dir, tmp_path):
    d = _copy(random_dir, tmp_path)
    cfg = json.loads((d / "CosyVoice-BlankEN" / "config.json").read_text())
    cfg["hidden_size"] = 128
    (d / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size 128"):
        load_model_dir(d)
    cfg["hidden_size"] = 64
    cfg["intermediate_size"] = 96  # consistent config, wrong for the checkpoint
    (d / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight: shape \(128, 64\)"):
        load_model_dir(d)


def test_yaml_with_apply_os_system_does_not_run(random_dir, tmp_path):
    d = _copy(random_dir, tmp_path)
    marker = tmp_path / "executed"
    y = d / "cosyvoice3.yaml"
    y.write_text(f"pwn: !apply:os.system ['touch {marker}']\n" + y.read_text())
    m = load_model_dir(d, stages=("hift",))  # loads fine: the tag is inert data
    assert m.hift is not None
    assert not marker.exists()


def test_yaml_unknown_tag_and_other_architecture(random_dir, tmp_path):
    d = _copy(random_dir, tmp_path)
    y = d / "cosyvoice3.yaml"
    text = y.read_text()
    y.write_text(text + "\nx: !include:other.yaml\n")
    with pytest.raises(ConfigError, match=r"cosyvoice3.yaml.*!include:other.yaml"):
        load_model_dir(d)
    y.write_text(
        text.replace(
            "cosyvoice.flow.flow.CausalMaskedDiffWithDiT",
            "cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
        )
    )
    with pytest.raises(ConfigError, match="CausalMaskedDiffWithXvec"):
        load_model_dir(d)


def test_hift_old_weight_norm_keys_and_generator_prefix(random_dir, tmp_path):
    d = _copy(random_dir, tmp_path)
    sd = torch.load(d / "hift.pt", weights_only=True)
    old = {}
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        old["generator." + k] = v
    torch.save(old, d / "hift.pt")
    a = load_model_dir(random_dir, stages=("hift",)).hift
    b = load_model_dir(d, stages=("hift",)).hift
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


class _Evil:
    """Pickles to a call of os.system: a weights_only load must refuse it, not run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_not_run(random_dir, tmp_path):
    d = _copy(random_dir, tmp_path)
    marker = tmp_path / "ran"
    sd = torch.load(d / "flow.pt", weights_only=True)
    sd["evil"] = _Evil(marker)
    torch.save(sd, d / "flow.pt")
    with pytest.raises(CheckpointError, match="flow.pt"):
        load_model_dir(d)
    assert not marker.exists()
