"""Text normalisation and splitting (upstream text_normalize, wetext path).

Expected strings are derived by hand from upstream's rules (frontend.py / frontend_utils.py).
"""

from __future__ import annotations

from pathlib import Path

import inflect
import pytest

from worker.frontend.text import (
    TN_ENGINE,
    contains_chinese,
    is_only_punctuation,
    normalize_and_split,
    remove_bracket,
    reorder_tokens,
    replace_blank,
    spell_out_number,
    split_paragraph,
)
from worker.frontend.tokenizer import CosyVoice3Tokenizer


class WordTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated word (lengths by hand)."""

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


@pytest.fixture(scope="module")
def tok(fixtures_dir: Path) -> CosyVoice3Tokenizer:
    return CosyVoice3Tokenizer(fixtures_dir / "CosyVoice-BlankEN")


# 20 characters: 这是一个测试句子(8) ，(1) 它的长度刚好二十个字(10) 。(1)
ZH20 = "这是一个测试句子，它的长度刚好二十个字。"
# 10 words, the last one carries the period.
EN10 = "one two three four five six seven eight nine ten."


def test_engine_is_wetext():
    assert TN_ENGINE == "wetext"


# ----------------------------------------------------------------------------- skip / edge


def test_markup_text_is_not_normalised_or_split(tok):
    text = "You are a helpful assistant.<|endofprompt|>I have 3 apples"
    assert normalize_and_split(text, tok) == [text]
    assert normalize_and_split(text, tok, split=False) == [text]
    # The skip is decided before strip(): surrounding spaces stay too.
    assert normalize_and_split("  a <|b|> 2  ", tok) == ["  a <|b|> 2  "]


def test_markup_needs_both_markers(tok):
    # Only "<|": the normal en path runs (no digit, so TN leaves it; a period is appended).
    assert normalize_and_split("a <| b", tok) == ["a <| b."]
    assert normalize_and_split("a |> b", tok) == ["a |> b."]


def test_empty_and_blank(tok):
    assert normalize_and_split("", tok) == [""]
    assert normalize_and_split("   \n ", tok) == []


# ----------------------------------------------------------------------------- English


def test_en_number_spelled_and_period_appended(tok):
    assert normalize_and_split("I have 3 apples", tok) == ["I have three apples."]
    assert normalize_and_split("  I have 3 apples  ", tok, split=False) == ["I have three apples"]


def test_en_no_period_added_when_ending_in_split_mark(tok):
    assert normalize_and_split("Is it done?", tok) == ["Is it done?"]
    assert normalize_and_split("Done: yes;", tok) == ["Done: yes;"]


def test_spell_out_number_uses_inflect():
    eng = inflect.engine()
    assert spell_out_number("room 101 and 7", eng) == "room one hundred and one and seven"
    assert spell_out_number("12abc3", eng) == "twelveabcthree"


def test_en_split_counts_tokens_not_characters():
    # 16 sentences of 10 "tokens": 8 fit in a piece (80 is not > 80); the 9th would make 90 > 80
    # while the piece (80) is > 60, so it flushes. The last 8 make a second piece of 80 >= 20.
    text = " ".join([EN10] * 16)
    pieces = normalize_and_split(text, WordTokenizer())
    assert pieces == [" ".join([EN10] * 8), " " + " ".join([EN10] * 8)]


def test_en_short_tail_is_merged():
    # 9 sentences: flush after 8, the 10-token tail is < 20 and is glued back on.
    text = " ".join([EN10] * 9)
    assert normalize_and_split(text, WordTokenizer()) == [text]


def test_en_real_tokenizer_pieces_within_bounds(tok):
    sentence = "The quick brown fox jumps over the lazy dog near the quiet river bank."
    text = " ".join([sentence] * 12)
    pieces = normalize_and_split(text, tok)
    assert "".join(pieces) == text
    assert len(pieces) > 1
    for p in pieces[:-1]:
        assert 60 < len(tok.encode(p)) <= 80


def test_punctuation_only_pieces_are_dropped():
    assert normalize_and_split("...", WordTokenizer()) == []
    # en path ("。" is not an en split mark): "“”。" + "." is one piece of punctuation only.
    assert normalize_and_split("“”。", WordTokenizer()) == []


# ----------------------------------------------------------------------------- Chinese


def test_zh_number_and_period(tok):
    assert normalize_and_split("  我有3个苹果  ", tok) == ["我有三个苹果。"]


def test_zh_trailing_commas_become_period(tok):
    assert normalize_and_split("你好，世界，、", tok) == ["你好，世界。"]


def test_zh_replacement_rules(tok):
    # No digit, so TN leaves it alone. ² ³ -> 平方 立方, brackets and backticks dropped,
    # —— -> space (replace_blank ran before, so that space stays), 。 appended.
    text = "面积很大²，效果³。注意（这里）【重点】——`代码`结束"
    assert normalize_and_split(text, tok) == ["面积很大平方，效果立方。注意这里重点 代码结束。"]


def test_zh_dash_and_dot(tok):
    # replace_blank keeps the spaces of "A - B" (ASCII on both sides), then " - " -> "，";
    # "." -> "。" makes a split point; the two short sentences merge into one piece.
    assert normalize_and_split("中文A - B测试.好", tok) == ["中文A，B测试。好。"]


def test_zh_split_counts_characters(tok):
    assert len(ZH20) == 20
    # 7 x 20 chars: 4 sentences = 80 (not > 80), the 5th flushes; the 60-char rest stays apart.
    assert normalize_and_split(ZH20 * 7, tok) == [ZH20 * 4, ZH20 * 3]
    # A 3-char tail (< merge_len 20) is glued to the previous piece.
    assert normalize_and_split(ZH20 * 4 + "好的。", tok) == [ZH20 * 4 + "好的。"]
    assert normalize_and_split(ZH20 * 5, tok) == [ZH20 * 4, ZH20]


def test_zh_quote_stays_with_sentence():
    text = "他说：“你好。”然后走了"
    pieces = split_paragraph(text, len, "zh", token_max_n=5, token_min_n=2, merge_len=0)
    assert pieces == ["他说：", "“你好。”", "然后走了。"]


def test_zh_quotes_are_not_escaped_by_tn(tok):
    # wetext 0.1.8's own Normalizer would give 他说\"你好\"三次; 0.0.4's pipeline does not.
    assert normalize_and_split('他说"你好"3次', tok) == ['他说"你好"三次。']


def test_japanese_branching(tok):
    # Kanji are in U+4E00..U+9FFF: zh path (。); kana only: en path (.).
    assert contains_chinese("日本語です")
    assert normalize_and_split("日本語です", tok) == ["日本語です。"]
    assert not contains_chinese("こんにちは")
    assert normalize_and_split("こんにちは", tok) == ["こんにちは."]


# ----------------------------------------------------------------------------- helpers


def test_replace_blank():
    assert replace_blank("你好 世界 hello world") == "你好世界hello world"
    assert replace_blank("a  b") == "ab"


def test_remove_bracket():
    assert remove_bracket("（a）【b】`c`——d") == "abc d"


def test_is_only_punctuation():
    assert is_only_punctuation("")
    assert is_only_punctuation("。！?$%")
    assert not is_only_punctuation(" .")
    assert not is_only_punctuation("a.")


def test_reorder_tokens():
    assert (
        reorder_tokens('money { currency: "$" value: "12" }', "zh")
        == 'money { value: "12" currency: "$" }'
    )
    keep = 'date { preserve_order: "true" day: "5" text: "x" }'
    assert reorder_tokens(keep, "en") == keep
    escaped = 'w { v: "a" } p { v: " \\"" }'
    assert reorder_tokens(escaped, "en") == escaped
