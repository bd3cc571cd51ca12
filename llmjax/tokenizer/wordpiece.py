"""BERT's WordPiece tokenizer (BERT, MiniLM, all-MiniLM-L6-v2), giving the ids of Hugging Face `tokenizers`.

Three steps, as in Hugging Face's BertNormalizer -> BertPreTokenizer -> WordPiece:

1. normalize: drop NUL, U+FFFD and control / format / unassigned characters, turn every whitespace into " "
   (clean_text); put spaces around CJK ideographs, so each is a word of its own (handle_chinese_chars); remove
   accents (NFD, then drop the combining marks: strip_accents, which defaults to `lowercase`); lowercase.
2. pre-tokenize: split on whitespace, and make every punctuation character (Unicode P*, plus ASCII symbols such
   as $ + < = > ^ ` | ~) a word of its own.
3. WordPiece: each word greedily becomes its longest prefix in the vocabulary, then the longest "##"-prefixed
   continuation, and so on; a word with a part that matches nothing, or longer than max_input_chars_per_word
   characters, becomes one [UNK].

`encode_with_types` adds [CLS] text [SEP] (text [SEP] for a pair, with token types 0 / 1) and truncates to a
maximum length the way Hugging Face does ("longest first"); `encode` / `encode_ordinary` give the word pieces alone,
special tokens written in the text ("[SEP]") matched as tokens by `encode`, as Hugging Face's added tokens are.
Words are cached, so repeated words (most words, in code) cost one dictionary look-up.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import regex

from llmjax.tokenizer.base import SpecialIds, Tokenizer, TokenizerError

# Control, format, private-use and surrogate characters, NUL and U+FFFD: removed by clean_text (tab, newline and
# carriage return are whitespace instead; unassigned code points are kept, as Hugging Face keeps them). Character
# classes come from the `regex` module's Unicode tables, Hugging Face's from an older Unicode: a character assigned
# since (a new emoji, a new format character) may be classed differently, so its ids may differ; nothing older does.
_REMOVED = regex.compile(r"[[\x00\ufffd\p{Cc}\p{Cf}\p{Co}\p{Cs}]--[\t\n\r]]+", regex.V1)
_SPACES = regex.compile(r"[\t\n\r\p{Zs}\p{Zl}\p{Zp}]")  # -> " " by clean_text
# CJK ideographs (the blocks BERT's tokenizer lists): each becomes a word of its own
_CJK = regex.compile("([\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f\U0002b740-\U0002b81f"
                     "\U0002b920-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f])")
_MARKS = regex.compile(r"\p{Mn}+")  # combining marks, dropped after NFD by strip_accents
# Rust's char::is_whitespace (the White_Space property), which splits words
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_PUNCTUATION = r"\p{P}!-/:-@\[-`{-~"  # Unicode punctuation, and every ASCII punctuation or symbol character
_WORDS = regex.compile(f"[{_PUNCTUATION}]|[^{_WHITESPACE}{_PUNCTUATION}]+")

DEFAULT_SPECIALS = {"unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}
_CACHE_LIMIT = 1 << 18  # words kept in the per-tokenizer cache before it is cleared


class Encoding(NamedTuple):
    """A model input: ids with [CLS] / [SEP], their token types (0: first text, 1: the pair), and how many word
    pieces truncation removed (0: none)."""

    ids: list[int]
    token_types: list[int]
    truncated: int


class WordPieceTokenizer(Tokenizer):
    """BERT's tokenizer; ids equal Hugging Face `tokenizers` (and transformers' BertTokenizerFast) on the same
    tokenizer.json or vocab.txt. Load with `from_hf_tokenizer_json`, `from_vocab_file` or llmjax's
    `load_tokenizer`."""

    kind = "wordpiece"

    def __init__(self, vocab: list[str], *, lowercase: bool = True, strip_accents: bool | None = None,
                 clean_text: bool = True, handle_chinese_chars: bool = True, unk_token: str = "[UNK]",
                 continuing_subword_prefix: str = "##", max_input_chars_per_word: int = 100,
                 special_tokens: Iterable[str] | None = None, cls_token: str = "[CLS]", sep_token: str = "[SEP]",
                 pad_token: str | None = "[PAD]", mask_token: str | None = "[MASK]"):
        self.vocab = list(vocab)
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        if len(self.ids) != len(self.vocab):
            raise TokenizerError("the WordPiece vocabulary lists a token twice")
        self.lowercase, self.clean_text, self.handle_chinese_chars = lowercase, clean_text, handle_chinese_chars
        self.strip_accents = lowercase if strip_accents is None else strip_accents  # Hugging Face's default
        self.prefix, self.max_input_chars_per_word = continuing_subword_prefix, max_input_chars_per_word
        self.tokens = {"unk": unk_token, "cls": cls_token, "sep": sep_token, "pad": pad_token, "mask": mask_token}
        for role, token in self.tokens.items():
            if token is not None and token not in self.ids:
                raise TokenizerError(f"the {role} token {token!r} is not in the WordPiece vocabulary")
        specials = [t for t in self.tokens.values() if t is not None] if special_tokens is None else special_tokens
        self._special_tokens = {token: self.ids[token] for token in specials if token in self.ids}
        self.unk_id, self.cls_id, self.sep_id = self.ids[unk_token], self.ids[cls_token], self.ids[sep_token]
        self._cache: dict[str, tuple[int, ...]] = {}

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def from_hf_tokenizer_json(cls, path: str | Path) -> WordPieceTokenizer:
        """A Hugging Face tokenizer.json whose model is WordPiece, with BERT's normalizer and pre-tokenizer."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({error})") from None
        return cls.from_hf_json_data(data, source=str(path))

    @classmethod
    def from_hf_json_data(cls, data: dict, *, source: str = "tokenizer.json") -> WordPieceTokenizer:
        model = data.get("model") or {}
        if model.get("type") != "WordPiece":
            raise TokenizerError(f"{source}: model type {model.get('type')!r}, not 'WordPiece'")
        normalizer = data.get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer":
            raise TokenizerError(f"{source}: normalizer {normalizer.get('type')!r}; llmjax's WordPiece reads "
                                 "BERT's ('BertNormalizer')")
        pre_tokenizer = (data.get("pre_tokenizer") or {}).get("type")
        if pre_tokenizer != "BertPreTokenizer":
            raise TokenizerError(f"{source}: pre-tokenizer {pre_tokenizer!r}; llmjax's WordPiece reads BERT's "
                                 "('BertPreTokenizer')")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
            raise TokenizerError(f"{source}: the WordPiece vocab must map tokens to the ids 0 .. n - 1")
        cls_token, sep_token = _post_processor_tokens(data.get("post_processor"), source)
        added = [token["content"] for token in data.get("added_tokens") or []]
        missing = [token for token in added if token not in vocab]
        if missing:
            raise TokenizerError(f"{source}: added tokens {missing[:5]} are not in the vocab")
        pad = (data.get("padding") or {}).get("pad_token", "[PAD]")
        return cls(
            sorted(vocab, key=vocab.get),
            lowercase=normalizer.get("lowercase", True),
            strip_accents=normalizer.get("strip_accents"),
            clean_text=normalizer.get("clean_text", True),
            handle_chinese_chars=normalizer.get("handle_chinese_chars", True),
            unk_token=model.get("unk_token", "[UNK]"),
            continuing_subword_prefix=model.get("continuing_subword_prefix", "##"),
            max_input_chars_per_word=model.get("max_input_chars_per_word", 100),
            special_tokens=added,
            cls_token=cls_token,
            sep_token=sep_token,
            pad_token=pad if pad in vocab else None,
            mask_token="[MASK]" if "[MASK]" in vocab else None,
        )

    @classmethod
    def from_vocab_file(cls, path: str | Path, *, lowercase: bool | None = None) -> WordPieceTokenizer:
        """BERT's vocab.txt (one token a line, the line number its id); lowercase: None reads do_lower_case from a
        tokenizer_config.json beside it (default True, as for the uncased models)."""
        path = Path(path)
        try:
            vocab = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{path}: not a readable vocab.txt ({error})") from None
        options = {}
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            options = json.loads(config.read_text(encoding="utf-8"))
        if lowercase is None:
            lowercase = options.get("do_lower_case", True)
        roles = {role: options.get(f"{role}_token", token) for role, token in DEFAULT_SPECIALS.items()}
        roles = {role: token if isinstance(token, str) else DEFAULT_SPECIALS[role] for role, token in roles.items()}
        return cls(vocab, lowercase=lowercase, strip_accents=options.get("strip_accents"),
                   handle_chinese_chars=options.get("tokenize_chinese_chars", True), unk_token=roles["unk"],
                   cls_token=roles["cls"], sep_token=roles["sep"],
                   pad_token=roles["pad"] if roles["pad"] in vocab else None,
                   mask_token=roles["mask"] if roles["mask"] in vocab else None)

    # --- the Tokenizer interface -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def eot_id(self) -> int | None:
        return self.sep_id  # [SEP] ends a text

    @property
    def special_ids(self) -> SpecialIds:
        """[CLS] in front and [SEP] after a text, as BERT's models expect (`encode_prompt`)."""
        pad = self.tokens["pad"]
        return SpecialIds(bos=self.cls_id, eos=self.sep_id, unk=self.unk_id,
                          pad=None if pad is None else self.ids[pad], add_bos=True, add_eos=True)

    def normalize(self, text: str) -> str:
        """BertNormalizer: clean, space out CJK ideographs, strip accents, lowercase (each as configured)."""
        if self.clean_text:
            text = _SPACES.sub(" ", _REMOVED.sub("", text))
        if self.handle_chinese_chars and not text.isascii():
            text = _CJK.sub(r" \1 ", text)
        if self.strip_accents and not text.isascii():
            text = _MARKS.sub("", unicodedata.normalize("NFD", text))
        if self.lowercase:
            # Hugging Face lowercases character by character: no final-sigma rule ("ΟΔΟΣ" -> "οδοσ")
            text = text.lower() if "\u03a3" not in text else "".join(c.lower() for c in text)
        return text

    def pre_tokenize(self, text: str) -> list[str]:
        """Normalized text -> words: whitespace removed, each punctuation character a word of its own."""
        return _WORDS.findall(text)

    def word_ids(self, word: str) -> tuple[int, ...]:
        """WordPiece on one word: greedy longest match first, continuations prefixed "##"; [UNK] for the whole word
        when a part matches nothing or the word is too long."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids = self._word_ids(word)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _word_ids(self, word: str) -> tuple[int, ...]:
        if len(word) > self.max_input_chars_per_word:
            return (self.unk_id,)
        vocab, ids, start = self.ids, [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = vocab.get(piece)
                if found is not None:
                    ids.append(found)
                    start = end
                    break
            else:
                return (self.unk_id,)
        return tuple(ids)

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self.pre_tokenize(self.normalize(text)):
            ids.extend(self.word_ids(word))
        return ids

    def encode_with_types(self, text: str, pair: str | None = None, *, max_length: int | None = None) -> Encoding:
        """[CLS] text [SEP] (and pair [SEP]) with token types 0 (first) / 1 (pair), at most max_length ids in all:
        the word pieces are cut at their end, the longer text first (Hugging Face's "longest_first")."""
        first = self.encode(text)
        second = None if pair is None else self.encode(pair)
        kept = [len(first)] if second is None else [len(first), len(second)]
        if max_length is not None:
            budget = max_length - (2 if second is None else 3)
            if budget < 0:
                raise TokenizerError(f"max_length={max_length} leaves no room for the text between [CLS] and [SEP]")
            kept = _longest_first(kept, budget)
        truncated = len(first) - kept[0]
        ids = [self.cls_id, *first[:kept[0]], self.sep_id]
        types = [0] * len(ids)
        if second is not None:
            truncated += len(second) - kept[1]
            ids += [*second[:kept[1]], self.sep_id]
            types += [1] * (kept[1] + 1)
        return Encoding(ids, types, truncated)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The pieces joined, "##" continuations glued to the piece before (Hugging Face's WordPiece decoder
        without its English clean-up); lowercasing and removed accents do not come back."""
        words: list[str] = []
        for i in ids:
            if not 0 <= i < len(self.vocab):
                raise TokenizerError(f"token id {i} is outside this vocabulary of {len(self.vocab)} ids")
            token = self.vocab[i]
            if words and token.startswith(self.prefix):
                words[-1] += token[len(self.prefix):]
            else:
                words.append(token)
        return " ".join(words).encode("utf-8")

    def to_json(self) -> dict:
        return {
            "type": self.kind,
            "vocab": self.vocab,
            "lowercase": self.lowercase,
            "strip_accents": self.strip_accents,
            "clean_text": self.clean_text,
            "handle_chinese_chars": self.handle_chinese_chars,
            "continuing_subword_prefix": self.prefix,
            "max_input_chars_per_word": self.max_input_chars_per_word,
            "special_tokens": list(self._special_tokens),
            **{f"{role}_token": token for role, token in self.tokens.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> WordPieceTokenizer:
        data = {key: value for key, value in data.items() if key != "type"}
        return cls(data.pop("vocab"), **data)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


def _post_processor_tokens(post: dict | None, source: str) -> tuple[str, str]:
    """([CLS], [SEP]) from a BertProcessing or TemplateProcessing post-processor (default [CLS], [SEP])."""
    if not post:
        return "[CLS]", "[SEP]"
    if post.get("type") == "BertProcessing":
        return post["cls"][0], post["sep"][0]
    if post.get("type") == "TemplateProcessing":
        single = [item["SpecialToken"]["id"] for item in post.get("single", []) if "SpecialToken" in item]
        if len(single) == 2:
            return single[0], single[1]
    raise TokenizerError(f"{source}: post-processor {post.get('type')!r} is not BERT's [CLS] text [SEP]")


def _longest_first(lengths: list[int], budget: int) -> list[int]:
    """How many word pieces of each text to keep within `budget` (Hugging Face tokenizers' LongestFirst): one text
    is cut to the budget; of two, the shorter is kept whole when it fits in half, else both get half (the second
    text the odd one)."""
    if len(lengths) == 1:
        return [min(lengths[0], budget)]
    if sum(lengths) <= budget:
        return list(lengths)
    short, long = sorted(lengths)
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short = budget // 2
        long = short + budget % 2
    return [short, long] if lengths[0] <= lengths[1] else [long, short]
