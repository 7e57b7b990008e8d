"""CosyVoice3 text tokenizer: the Qwen2 byte-level BPE of ``CosyVoice-BlankEN`` plus the
CosyVoice3 special tokens, built with the ``tokenizers`` library (no ``transformers``).

This module owns text -> token ids and back. Upstream (``cosyvoice/tokenizer/tokenizer.py``,
``CosyVoice3Tokenizer``) is ``AutoTokenizer.from_pretrained(CosyVoice-BlankEN)`` followed by
``add_special_tokens`` with eos/pad ``<|endoftext|>`` and a fixed list of additional specials; its
``encode`` is ``tokenizer([text])["input_ids"][0]`` (no BOS/EOS, ``allowed_special`` ignored).
Here the same pipeline is assembled by hand so that ids match upstream exactly:

* the model is the byte-level BPE from ``vocab.json`` + ``merges.txt``;
* normalizer NFC, pre-tokenizer = Qwen2 split regex (isolated) then ByteLevel without its own
  regex and without a prefix space, decoder ByteLevel (what transformers' Qwen2 converter builds);
* the Qwen2 specials come from ``tokenizer_config.json`` (``added_tokens_decoder``) when the file
  exists, else the three Qwen2 defaults ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` right
  after the regular vocabulary;
* then every CosyVoice3 special that does not exist yet gets the next id, in upstream's order
  (so ``<|endofprompt|>`` = 151646 for the released vocabulary).

All specials are matched in raw text before normalisation and are dropped by
``decode(skip_special_tokens=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

__all__ = [
    "COSYVOICE3_SPECIAL_TOKENS",
    "ENDOFPROMPT",
    "QWEN2_PRETOKENIZE_REGEX",
    "CosyVoice3Tokenizer",
]

# Qwen2's pre-tokenisation regex (transformers ``Qwen2Tokenizer`` / its fast converter).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2 specials a BlankEN folder declares (used when tokenizer_config.json is absent).
_QWEN2_DEFAULT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_EOS_PAD = "<|endoftext|>"

ENDOFPROMPT = "<|endofprompt|>"

_CV3_EVENT_TOKENS = (
    "<|im_start|> <|im_end|> <|endofprompt|> [breath] <strong> </strong> [noise] [laughter] "
    "[cough] [clucking] [accent] [quick_breath] <laughter> </laughter> [hissing] [sigh] "
    "[vocalized-noise] [lipsmack] [mn] <|endofsystem|>"
)
# CMU (ARPAbet) phones, with stress variants for vowels.
_CV3_CMU_PHONES = (
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 "
    "B CH D DH EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 "
    "JH K L M N NG OW OW0 OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 "
    "V W Y Z ZH"
)
# Pinyin initials and finals (finals with tone marks), in upstream's (sorted) order.
_CV3_PINYIN = (
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo "
    "iè ié iòng ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o "
    "ong ou p q r s sh t u uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā "
    "uāi uān uāng uē uě uī uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng "
    "áo è èi èn èng èr é éi én éng ér ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān "
    "āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng "
    "ǒu ǔ ǔn ǘ ǚ ǜ"
)

# ``additional_special_tokens`` of upstream CosyVoice3Tokenizer, in order (280 entries).
COSYVOICE3_SPECIAL_TOKENS: tuple[str, ...] = (
    tuple(_CV3_EVENT_TOKENS.split())
    + tuple(f"[{p}]" for p in _CV3_CMU_PHONES.split())
    + tuple(f"[{p}]" for p in _CV3_PINYIN.split())
)


class TokenizerError(ValueError):
    """The tokenizer folder is missing files or is inconsistent."""


def _read_base_specials(folder: Path, n_regular: int) -> list[tuple[int, str]]:
    """Qwen2 specials with their ids: from tokenizer_config.json if present, else defaults."""
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        decoder = cfg.get("added_tokens_decoder") or {}
        specials = sorted((int(k), v["content"]) for k, v in decoder.items())
        if specials:
            return specials
    return [(n_regular + i, tok) for i, tok in enumerate(_QWEN2_DEFAULT_SPECIALS)]


class CosyVoice3Tokenizer:
    """Upstream-compatible CosyVoice3 tokenizer over a ``CosyVoice-BlankEN`` folder."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise TokenizerError(f"tokenizer file not found: {p}")
        vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
        merges = _read_merges(merges_path)
        n_regular = len(vocab)
        if set(vocab.values()) != set(range(n_regular)):
            raise TokenizerError(f"{vocab_path}: ids are not 0..{n_regular - 1}")

        # Every id is decided here (the tokenizers library then reuses it): the base
        # specials at their declared ids, then the new CosyVoice3 specials in order.
        full_vocab = dict(vocab)
        specials: list[str] = []
        next_id = n_regular
        for tid, tok in _read_base_specials(folder, n_regular):
            if tok in full_vocab and full_vocab[tok] != tid:
                raise TokenizerError(f"special {tok!r} declared as {tid}, vocab has it elsewhere")
            full_vocab[tok] = tid
            specials.append(tok)
            next_id = max(next_id, tid + 1)
        if _EOS_PAD not in full_vocab:  # add_special_tokens(eos/pad) comes first upstream
            full_vocab[_EOS_PAD] = next_id
            next_id += 1
            specials.append(_EOS_PAD)
        for tok in COSYVOICE3_SPECIAL_TOKENS:
            if tok not in full_vocab:
                full_vocab[tok] = next_id
                next_id += 1
            if tok not in specials:
                specials.append(tok)
        if len(set(full_vocab.values())) != len(full_vocab) or next_id != len(full_vocab):
            raise TokenizerError(f"{folder}: special token ids leave gaps in the vocabulary")

        tok = Tokenizer(
            BPE(
                vocab=full_vocab,
                merges=merges,
                dropout=None,
                unk_token=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                byte_fallback=False,
            )
        )
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(
                    Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False
                ),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [
                AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False)
                for s in specials
            ]
        )
        for s in specials:  # the library must have kept our ids
            if tok.token_to_id(s) != full_vocab[s]:
                raise TokenizerError(f"special {s!r} got id {tok.token_to_id(s)}")

        self._tok = tok
        self._vocab = full_vocab
        self.folder = folder
        self.num_regular_tokens = n_regular
        self.special_tokens: tuple[str, ...] = tuple(specials)
        self.eos_token = self.pad_token = _EOS_PAD

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS; specials in the text map to their ids)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped when ``skip_special_tokens``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """Id of a token (typically a special such as ``<|endofprompt|>``); KeyError if absent."""
        tid = self._vocab.get(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return tid

    @property
    def endofprompt_id(self) -> int:
        return self._vocab[ENDOFPROMPT]

    def __len__(self) -> int:
        return len(self._vocab)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            line = line.rstrip("\r\n")
            if not line or (n == 0 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{n + 1}: bad merge line {line!r}")
            merges.append((parts[0], parts[1]))
    return merges
