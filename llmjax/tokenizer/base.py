"""The one interface every tokenizer implements (our byte-level BPE, SentencePiece).

Token ids are plain Python ints on the way in and out; the data pipeline turns them into
uint16 / uint32 arrays. A tokenizer's `fingerprint()` names its exact vocabulary and rules, so
token shards can refuse to be read with a different tokenizer than the one that wrote them.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import regex

ENDOFTEXT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file, vocabulary or request that cannot be used."""


@dataclass(frozen=True)
class SpecialIds:
    """The ids a model file names for its roles (None: it names none), and whether a prompt gets BOS put in
    front / EOS put after it (llama.cpp's add_bos_token / add_eos_token; Hugging Face's post-processor)."""

    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    pad: int | None = None
    add_bos: bool = False
    add_eos: bool = False

    def check(self, vocab_size: int) -> SpecialIds:
        """Itself, after checking that every id is in the vocabulary and that an added BOS / EOS has an id."""
        for role in ("bos", "eos", "unk", "pad"):
            i = getattr(self, role)
            if i is not None and not (isinstance(i, int) and 0 <= i < vocab_size):
                raise TokenizerError(f"the {role} token id {i!r} is not in this vocabulary of {vocab_size} ids")
        for role in ("bos", "eos"):
            if getattr(self, f"add_{role}") and getattr(self, role) is None:
                raise TokenizerError(f"prompts should get a {role.upper()} token added, "
                                     f"but no {role} token id is given")
        return self

    def around(self, ids: list[int]) -> list[int]:
        """A prompt's ids with BOS put in front (unless they already start with it) and EOS after, as the rule says
        (llama.cpp's and Hugging Face's add-special-tokens)."""
        ids = list(ids)
        if self.add_bos and ids[:1] != [self.bos]:
            ids.insert(0, self.bos)
        if self.add_eos:
            ids.append(self.eos)
        return ids


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses implement `encode_ordinary`, `decode_bytes`, the special
    tokens, `to_json` and `from_json`; everything else is shared."""

    kind: str  # the "type" field of the saved JSON

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0 .. vocab_size - 1)."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """{"<|endoftext|>": id, ...}; matched in text only when allowed (see `encode`)."""

    @abc.abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with no special-token handling: "<|endoftext|>" is just characters."""

    @abc.abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes the ids stand for (may be invalid UTF-8 when cut mid-character)."""

    @abc.abstractmethod
    def to_json(self) -> dict:
        """Everything needed to rebuild this tokenizer (saved by `save`, hashed by `fingerprint`)."""

    @classmethod
    @abc.abstractmethod
    def from_json(cls, data: dict) -> Tokenizer: ...

    # --- shared behaviour -----------------------------------------------------------------

    @property
    def eot_id(self) -> int | None:
        """Id of the end-of-text token that separates documents, if the vocabulary has one."""
        return self.special_tokens.get(ENDOFTEXT)

    def encode(self, text: str, *, allowed_special: str | set[str] = "all") -> list[int]:
        """Encode text; special tokens in `allowed_special` ("all", "none" or a set of strings)
        become their ids, longest match first where they overlap."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for piece, is_special in split_on_special_tokens(text, allowed):
            if is_special:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(self.encode_ordinary(piece))
        return ids

    @property
    def special_ids(self) -> SpecialIds:
        """The model file's BOS / EOS / unknown / padding ids and its add-BOS / add-EOS rule (none here; tokenizers
        read from model files override it)."""
        return SpecialIds()

    def encode_prompt(self, text: str, *, allowed_special: str | set[str] = "all") -> list[int]:
        """A prompt's ids: `encode`, with the BOS / EOS that `special_ids` puts around prompts (a model file's
        rule; tokenizers trained here add none), a BOS the text already starts with (a chat template that writes
        it) not doubled."""
        return self.special_ids.around(self.encode(text, allowed_special=allowed_special))

    def encode_batch(self, texts: Iterable[str], *, allowed_special: str | set[str] = "all") -> list[list[int]]:
        return [self.encode(text, allowed_special=allowed_special) for text in texts]

    def encode_iterable(self, lines: Iterable[str], *, allowed_special: str | set[str] = "all") -> Iterator[int]:
        """Ids for a stream of text chunks (e.g. a file's lines), holding one chunk at a time.

        Here chunks are encoded independently, which can differ from encoding their concatenation
        where a pre-token spans a boundary ("\n" then indentation); BPETokenizer overrides this
        to carry text over to the next chunk and give exactly the ids of the whole text.
        """
        for line in lines:
            yield from self.encode(line, allowed_special=allowed_special)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for the ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one JSON file (atomically: a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(self.to_json(), ensure_ascii=False))
        temporary.replace(path)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: equal fingerprints encode every text identically."""
        canonical = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _allowed(self, allowed_special: str | set[str]) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none":
            return set()
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"allowed_special names tokens this tokenizer lacks: {sorted(unknown)}")
        return set(allowed_special)


@functools.lru_cache(maxsize=16)
def special_token_splitter(special_tokens: tuple[str, ...]) -> regex.Pattern | None:
    """A regex matching any special token, longest first where they overlap (None if none)."""
    ordered = sorted(set(special_tokens), key=len, reverse=True)
    if not ordered:
        return None
    if "" in ordered:
        raise TokenizerError("a special token cannot be the empty string")
    return regex.compile("|".join(regex.escape(token) for token in ordered))


def split_on_special_tokens(text: str, specials: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Split text into (piece, is_special) runs; overlapping specials match longest first.

    >>> list(split_on_special_tokens("a<|x|>b", ["<|x|>"]))
    [('a', False), ('<|x|>', True), ('b', False)]
    """
    pattern = special_token_splitter(tuple(sorted(set(specials))))
    if pattern is None:
        if text:
            yield text, False
        return
    position = 0
    for match in pattern.finditer(text):
        if match.start() > position:
            yield text[position : match.start()], False
        yield match.group(), True
        position = match.end()
    if position < len(text):
        yield text[position:], False

