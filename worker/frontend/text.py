"""Text normalisation and sentence splitting of the CosyVoice3 frontend (upstream's wetext path).

This module owns turning a request's text into the list of pieces that are each synthesised by
one ``tts()`` call. It follows upstream ``CosyVoiceFrontEnd.text_normalize`` (``cli/frontend.py``)
and the helpers in ``utils/frontend_utils.py`` on the path upstream takes when ``ttsfrd`` is not
installed and ``wetext`` is:

1. text containing both ``<|`` and ``|>`` (every CV3 prompt/instruct string, which carry
   ``<|endofprompt|>``) is returned untouched as one piece; so is ``""``;
2. ``strip()``; the branch is chosen by :func:`contains_chinese` (any U+4E00..U+9FFF);
3. zh: wetext zh TN, drop ``\\n``, :func:`replace_blank`, ``²/³ -> 平方/立方``, ``. -> 。``,
   `` - `` -> ``，``, :func:`remove_bracket`, trailing ``[，,、]+`` -> ``。``; split counting chars;
4. other: wetext en TN, :func:`spell_out_number` (inflect); split counting tokenizer tokens;
5. :func:`split_paragraph` (80 / 60 / merge 20), then punctuation-only pieces are dropped.

wetext: upstream pins ``wetext==0.0.4``, which downloads its FST grammars from ModelScope at run
time and so cannot work offline. Its grammars ship inside the ``wetext==0.1.8`` wheel; this module
loads those FST files with ``kaldifst`` and runs 0.0.4's pipeline around them itself
(:class:`WetextTN`): tagger -> 0.0.4's token reordering -> verbalizer, only when the text contains
a digit, with the language forced to the branch chosen above. That avoids three behaviour changes
of 0.1.8's own ``Normalizer``: it rewrites digit-free English too (``Dr.`` -> ``doctor``), its
``auto`` language sends an all-digit string to the zh grammar, and its token reordering escapes
quotes twice (``"`` comes out as ``\\"``). The grammars of the two releases may still differ in
details (not checkable offline). If the FST files or kaldifst are missing, the rules-only path
runs (upstream's third engine, ``text_frontend=''``) and :data:`TN_ENGINE` is ``""``.
"""

from __future__ import annotations

import importlib.util
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "TN_ENGINE",
    "WetextTN",
    "contains_chinese",
    "is_only_punctuation",
    "normalize_and_split",
    "remove_bracket",
    "replace_blank",
    "reorder_tokens",
    "replace_corner_mark",
    "spell_out_number",
    "split_paragraph",
]


def _wetext_fst_dir() -> Path | None:
    """``wetext/fsts`` of the installed wheel, found without importing wetext (whose import
    eagerly loads every grammar it has)."""
    spec = importlib.util.find_spec("wetext")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "fsts"
    return d if (d / "zh" / "tn" / "tagger.fst").is_file() else None


_FST_DIR = _wetext_fst_dir()
try:
    import kaldifst as _kaldifst
except ImportError:  # pragma: no cover - exercised only where kaldifst is missing
    _kaldifst = None

TN_ENGINE = "wetext" if (_FST_DIR is not None and _kaldifst is not None) else ""
"""``"wetext"`` when the wetext grammars are used, ``""`` for the rules-only path."""

TOKEN_MAX_N = 80
TOKEN_MIN_N = 60
MERGE_LEN = 20

_CHINESE_RE = re.compile(r"[\u4e00-\u9fff]+")
_DIGIT_RE = re.compile(r"\d")
_TRAILING_COMMAS_RE = re.compile(r"[，,、]+$")

ZH_PUNCT = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
EN_PUNCT = (".", "?", "!", ";", ":")
_CLOSING_QUOTES = ('"', "”")


def contains_chinese(text: str) -> bool:
    """True when any character is in U+4E00..U+9FFF (so kanji-bearing Japanese counts too)."""
    return bool(_CHINESE_RE.search(text))


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    """Drop ``（）【】`` and backticks; ``——`` becomes a space."""
    for old in ("（", "）", "【", "】", "`"):
        text = text.replace(old, "")
    return text.replace("——", " ")


def replace_blank(text: str) -> str:
    """Keep a space only when both neighbours are ASCII non-spaces (e.g. between English words).

    As upstream, the left neighbour of position 0 is the last character (Python's ``text[-1]``);
    a trailing space, where upstream would raise IndexError, is dropped.
    """
    out = []
    for i, c in enumerate(text):
        if c == " ":
            if i + 1 >= len(text):
                continue
            nxt, prev = text[i + 1], text[i - 1]
            if nxt.isascii() and nxt != " " and prev.isascii() and prev != " ":
                out.append(c)
        else:
            out.append(c)
    return "".join(out)


def spell_out_number(text: str, inflect_parser: Any) -> str:
    """Replace each run of ``str.isdigit()`` characters by ``inflect.number_to_words``."""
    out: list[str] = []
    st: int | None = None
    for i, c in enumerate(text):
        if not c.isdigit():
            if st is not None:
                out.append(_number_to_words(text[st:i], inflect_parser))
                st = None
            out.append(c)
        elif st is None:
            st = i
    if st is not None:
        out.append(_number_to_words(text[st:], inflect_parser))
    return "".join(out)


def _number_to_words(digits: str, inflect_parser: Any) -> str:
    try:
        return inflect_parser.number_to_words(digits)
    except Exception:  # upstream would fail the request; keep the digits instead
        return digits


def is_only_punctuation(text: str) -> bool:
    """``regex.fullmatch(r'^[\\p{P}\\p{S}]*$', text)``: empty, or only punctuation/symbols."""
    return all(unicodedata.category(c)[0] in ("P", "S") for c in text)


def split_paragraph(
    text: str,
    tokenize: Callable[[str], Sequence[int]],
    lang: str = "zh",
    token_max_n: int = TOKEN_MAX_N,
    token_min_n: int = TOKEN_MIN_N,
    merge_len: int = MERGE_LEN,
    comma_split: bool = False,
) -> list[str]:
    """Upstream ``split_paragraph``: sentence split then greedy merge into pieces.

    Length is ``len(piece)`` for ``lang == "zh"``, else ``len(tokenize(piece))``. A text that does
    not end in a split mark gets ``。`` (zh) or ``.`` appended first. A closing ``"``/``”`` right
    after a split mark stays with its sentence. The running piece is flushed when adding the
    next sentence would exceed ``token_max_n`` and it already exceeds ``token_min_n``; a final
    piece shorter than ``merge_len`` is glued to the previous one.
    """
    if not text:
        return []

    def length(t: str) -> int:
        return len(t) if lang == "zh" else len(tokenize(t))

    punct = list(ZH_PUNCT if lang == "zh" else EN_PUNCT)
    if comma_split:
        punct.extend(["，", ","])
    if text[-1] not in punct:
        text += "。" if lang == "zh" else "."

    utts: list[str] = []
    st = 0
    for i, c in enumerate(text):
        if c in punct:
            if len(text[st:i]) > 0:
                utts.append(text[st:i] + c)
            if i + 1 < len(text) and text[i + 1] in _CLOSING_QUOTES:
                if utts:  # upstream pops unconditionally (IndexError on a leading mark)
                    utts.append(utts.pop(-1) + text[i + 1])
                st = i + 2
            else:
                st = i + 1

    final: list[str] = []
    cur = ""
    for utt in utts:
        if length(cur + utt) > token_max_n and length(cur) > token_min_n:
            final.append(cur)
            cur = ""
        cur = cur + utt
    if len(cur) > 0:
        if length(cur) < merge_len and len(final) != 0:
            final[-1] = final[-1] + cur
        else:
            final.append(cur)
    return final


@lru_cache(maxsize=1)
def _inflect_engine():
    import inflect

    return inflect.engine()


# Field order the verbalizers expect, per token type (wetext 0.0.4's TN tables).
_TN_ORDERS = {
    "zh": {
        "date": ["year", "month", "day"],
        "fraction": ["denominator", "numerator"],
        "measure": ["denominator", "numerator", "value"],
        "money": ["value", "currency"],
        "time": ["noon", "hour", "minute", "second"],
    },
    "en": {
        "date": ["preserve_order", "text", "day", "month", "year"],
        "money": ["integer_part", "fractional_part", "quantity", "currency_maj"],
    },
}
_KEY_CHARS = frozenset(string.ascii_letters + "_")


def reorder_tokens(tagged: str, lang: str) -> str:
    """wetext 0.0.4's ``TokenParser.reorder``: parse ``name { key: "value" ... }`` tokens and
    re-emit them with the fields of known token types in the verbalizer's order.

    Values are copied as tagged (escapes kept, not re-escaped). For a reordered type, fields not
    in its table are dropped, and ``preserve_order: "true"`` keeps the tagged order.
    """
    orders = _TN_ORDERS[lang]
    n = len(tagged)
    i = 0
    out: list[str] = []

    def skip_spaces() -> None:
        nonlocal i
        while i < n and tagged[i] == " ":
            i += 1

    def read_key() -> str:
        nonlocal i
        j = i
        while i < n and tagged[i] in _KEY_CHARS:
            i += 1
        return tagged[j:i]

    def skip_chars(chars: str) -> None:  # each char consumed only if it is next, in turn
        nonlocal i
        for c in chars:
            if i < n and tagged[i] == c:
                i += 1

    skip_spaces()
    while i < n:
        name = read_key()
        skip_chars(" { ")
        keys: list[str] = []
        members: dict[str, str] = {}
        skip_spaces()
        while i < n:
            if tagged[i] == "}":
                i += 1
                break
            key = read_key()
            skip_chars(': "')
            j = i
            while i < n and tagged[i] != '"':
                i += 2 if tagged[i] == "\\" else 1
            members[key] = tagged[j:i]
            keys.append(key)
            skip_chars('"')
            skip_spaces()
        if name in orders and members.get("preserve_order") != "true":
            keys = orders[name]
        fields = "".join(f' {k}: "{members[k]}"' for k in keys if k in members)
        out.append(f"{name} {{{fields} }}")
        skip_spaces()
    return " ".join(out).strip()


class WetextTN:
    """wetext 0.0.4's ``Normalizer(operator="tn").normalize`` for one language, over the FST
    grammars shipped in the wetext wheel (zh: ``remove_erhua=False``)."""

    def __init__(self, lang: str):
        if _FST_DIR is None or _kaldifst is None:
            raise RuntimeError("wetext grammars or kaldifst are not installed")
        self.lang = lang
        self._tagger = _kaldifst.TextNormalizer(str(_FST_DIR / lang / "tn" / "tagger.fst"))
        self._verbalizer = _kaldifst.TextNormalizer(str(_FST_DIR / lang / "tn" / "verbalizer.fst"))

    def normalize(self, text: str) -> str:
        if not _DIGIT_RE.search(text):  # 0.0.4 leaves digit-free text alone in TN
            return text
        tagged = self._tagger(text)
        if not tagged:
            return text
        return self._verbalizer(reorder_tokens(tagged, self.lang))


@lru_cache(maxsize=2)
def _wetext(lang: str) -> WetextTN | None:
    return WetextTN(lang) if TN_ENGINE == "wetext" else None


def _tn(text: str, lang: str) -> str:
    norm = _wetext(lang)
    return text if norm is None else norm.normalize(text)


def normalize_and_split(text: str, tokenizer: Any, split: bool = True) -> list[str]:
    """Upstream ``text_normalize(text, split)`` on the wetext path, as a list of pieces.

    ``tokenizer`` needs ``encode(str) -> list[int]`` (the CosyVoice3 tokenizer); it measures
    English pieces. With ``split=False`` the single normalised (not split, no period appended)
    text is returned in a one-element list. Text with both ``<|`` and ``|>`` and the empty
    string come back unchanged as ``[text]``; text that is only whitespace gives ``[]``
    (upstream would crash on it).
    """
    if ("<|" in text and "|>" in text) or text == "":
        return [text]
    text = text.strip()
    if not text:
        return []
    if contains_chinese(text):
        text = _tn(text, "zh")
        text = text.replace("\n", "")
        text = replace_blank(text)
        text = replace_corner_mark(text)
        text = text.replace(".", "。")
        text = text.replace(" - ", "，")
        text = remove_bracket(text)
        text = _TRAILING_COMMAS_RE.sub("。", text)
        lang = "zh"
    else:
        text = _tn(text, "en")
        text = spell_out_number(text, _inflect_engine())
        lang = "en"
    if not split:
        return [text]
    pieces = split_paragraph(
        text,
        tokenizer.encode,
        lang,
        token_max_n=TOKEN_MAX_N,
        token_min_n=TOKEN_MIN_N,
        merge_len=MERGE_LEN,
        comma_split=False,
    )
    return [p for p in pieces if not is_only_punctuation(p)]
