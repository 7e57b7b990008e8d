"""CosyVoice3Tokenizer against upstream's ids (real Qwen2 files and the tiny fixture)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from worker.frontend.tokenizer import (
    COSYVOICE3_SPECIAL_TOKENS,
    CosyVoice3Tokenizer,
    TokenizerError,
)


@pytest.fixture(scope="module")
def real_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "CosyVoice-BlankEN"


@pytest.fixture(scope="module")
def real_golden(real_dir: Path) -> dict:
    return json.loads((real_dir / "golden_ids.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def real_tok(real_dir: Path) -> CosyVoice3Tokenizer:
    return CosyVoice3Tokenizer(real_dir)


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir: Path) -> CosyVoice3Tokenizer:
    return CosyVoice3Tokenizer(tiny_dir / "CosyVoice-BlankEN")


def test_special_token_list_is_upstream_order(golden):
    assert list(COSYVOICE3_SPECIAL_TOKENS) == golden["tokenizer"]["added_special_tokens_in_order"]
    assert len(COSYVOICE3_SPECIAL_TOKENS) == 280


def test_real_ids_match_golden(real_tok, real_golden):
    for case in real_golden["cases"]:
        assert real_tok.encode(case["text"]) == case["ids"], case["text"]


def test_real_special_ids_and_len(real_tok, real_golden):
    for tok, tid in real_golden["special_ids"].items():
        assert real_tok.token_id(tok) == tid, tok
    assert real_tok.endofprompt_id == 151646
    assert real_tok.token_id("<|endofprompt|>") == 151646
    assert len(real_tok) == real_golden["vocab_size_with_specials"] == 151924
    assert real_tok.num_regular_tokens == 151643


def test_real_decode(real_tok):
    text = "You are a helpful assistant.<|endofprompt|>希望你以后能够做的比我还好呦。"
    ids = real_tok.encode(text)
    assert real_tok.decode(ids) == "You are a helpful assistant.希望你以后能够做的比我还好呦。"
    assert real_tok.decode(ids, skip_special_tokens=False) == text
    emoji = "Emoji 🙂 and accents: café, naïve, Zürich."
    assert real_tok.decode(real_tok.encode(emoji)) == emoji


def test_tiny_cases(tiny_tok, golden):
    g = golden["tokenizer"]
    assert len(tiny_tok) == g["cosyvoice3_tokenizer_len"] == 921
    assert tiny_tok.num_regular_tokens == g["num_regular_bpe_tokens"]
    for case in g["cases"]:
        ids = tiny_tok.encode(case["text"])
        assert ids == case["cosyvoice3_tokenizer_ids"], case["text"]
        assert tiny_tok.decode(ids) == case["cosyvoice3_decode_skip_special"]


def test_tiny_special_ids(tiny_tok, golden):
    g = golden["tokenizer"]
    for tok, tid in g["special_token_ids"].items():
        assert tiny_tok.token_id(tok) == tid, tok
    for tok, tid in zip(
        g["added_special_tokens_in_order"], g["added_special_token_ids_in_order"], strict=True
    ):
        assert tiny_tok.token_id(tok) == tid, tok
    assert tiny_tok.endofprompt_id == 643


def test_unknown_token_id_raises(tiny_tok):
    with pytest.raises(KeyError):
        tiny_tok.token_id("<|not-a-token|>")


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_works_without_tokenizer_config(which, real_dir, tiny_dir, tmp_path, real_golden, golden):
    src = real_dir if which == "real" else tiny_dir / "CosyVoice-BlankEN"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, tmp_path / name)
    tok = CosyVoice3Tokenizer(tmp_path)
    if which == "real":
        for case in real_golden["cases"]:
            assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.endofprompt_id == 151646
        assert len(tok) == 151924
    else:
        for case in golden["tokenizer"]["cases"]:
            assert tok.encode(case["text"]) == case["cosyvoice3_tokenizer_ids"]
        assert tok.endofprompt_id == 643
        assert len(tok) == 921


def test_missing_files_raise(tmp_path):
    with pytest.raises(TokenizerError, match="vocab.json"):
        CosyVoice3Tokenizer(tmp_path)
