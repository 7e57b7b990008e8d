"""The safe hyperpyyaml reader: tags become data, nothing named in a yaml is ever executed."""

from __future__ import annotations

import pytest

from worker.hyperyaml import ConfigError, Node, load_hyperyaml


def test_official_yaml_reads_as_data(fixtures_dir):
    hp = load_hyperyaml(fixtures_dir / "cosyvoice3-official.yaml", {"qwen_pretrain_path": "Q"})
    assert isinstance(hp["llm"], Node) and hp["llm"].kind == "new"
    assert hp["llm"].target == "cosyvoice.llm.llm.CosyVoice3LM"
    assert hp["llm"]["llm_input_size"] == 896  # !ref <llm_input_size>
    assert hp["llm"]["llm"]["pretrain_path"] == "Q"  # override applied before refs
    est = hp["flow"]["decoder"]["estimator"]
    assert est["static_chunk_size"] == 50  # !ref <chunk_size> * <token_mel_ratio>
    assert hp["flow"]["decoder"]["cfm_params"]["content"]["sigma_min"] == 1e-6
    assert hp["__set_seed1"] == Node("apply", "random.seed", [1986], {})
    assert hp["hifigan"]["generator"] is hp["hift"]  # !ref to a node is the same node
    assert hp["llm"]["sampling"].kind == "name"


def test_apply_os_system_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    y = tmp_path / "evil.yaml"
    y.write_text(
        f"boom: !apply:os.system ['touch {marker}']\n"
        f"also: !new:subprocess.Popen\n    args: ['touch', '{marker}']\n"
        f"name: !name:builtins.exec\n    source: 'open(\"{marker}\", \"w\")'\n"
    )
    hp = load_hyperyaml(y)
    assert not marker.exists()
    assert hp["boom"] == Node("apply", "os.system", [f"touch {marker}"], {})
    assert hp["also"].target == "subprocess.Popen"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("x: !include:other.yaml\n", "!include:other.yaml"),
        ("x: !!python/object/apply:os.system ['true']\n", "python/object/apply:os.system"),
        ("x: !copy <y>\ny: 1\n", "!copy"),
    ],
)
def test_unknown_tag_is_an_error_naming_file_and_tag(tmp_path, text, needle):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_hyperyaml(y)
    assert str(y) in str(e.value) and needle in str(e.value)


def test_ref_errors_and_arithmetic(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("a: 3\nb: 4\nc: !ref <a> * <b> + 1\nd: !ref <a>/x.txt\n")
    hp = load_hyperyaml(y)
    assert hp["c"] == 13 and hp["d"] == "3/x.txt"
    y.write_text("a: !ref <nope>\n")
    with pytest.raises(ConfigError, match="nope"):
        load_hyperyaml(y)
    y.write_text("a: !ref <b>\nb: !ref <a>\n")
    with pytest.raises(ConfigError, match="circular"):
        load_hyperyaml(y)
