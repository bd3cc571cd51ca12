"""A tokenizer with special tokens added after its vocabulary (a VLM's `<image>` and `<|endofchunk|>`).

    tokenizer = with_special_tokens(load_tokenizer("bytes"), ["<image>", "<|endofchunk|>"], first_id=301)
    tokenizer.encode("<image>Caption: a red circle")   # [301, 67, 97, ...]

The base tokenizer's ids are unchanged; the added tokens take ids first_id, first_id + 1, ... (default: right after
the base vocabulary; a model whose embedding is larger than its tokenizer puts them after the embedding). Saved and
loaded like any llmjax tokenizer (type "extended": the base tokenizer's JSON and the added tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from llmjax.tokenizer.base import SpecialIds, Tokenizer, TokenizerError


class ExtendedTokenizer(Tokenizer):
    """`base` plus special tokens at ids first_id, first_id + 1, ... (ids between the two are unused)."""

    kind = "extended"

    def __init__(self, base: Tokenizer, added: Sequence[str], first_id: int | None = None):
        first_id = base.vocab_size if first_id is None else int(first_id)
        if first_id < base.vocab_size:
            raise TokenizerError(f"first_id={first_id} would reuse ids of the base vocabulary "
                                 f"(0..{base.vocab_size - 1})")
        clashes = [token for token in added if token in base.special_tokens]
        if clashes or len(set(added)) != len(added) or not added:
            raise TokenizerError(f"added tokens {list(added)}: give new, distinct tokens the base tokenizer lacks "
                                 f"({clashes[0]!r} is already one of its special tokens)" if clashes else
                                 f"added tokens {list(added)}: give at least one, each once")
        self.base, self.added, self.first_id = base, tuple(added), first_id
        self._added_ids = {token: first_id + n for n, token in enumerate(self.added)}
        self._by_id = {i: token for token, i in self._added_ids.items()}

    @property
    def vocab_size(self) -> int:
        return self.first_id + len(self.added)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {**self.base.special_tokens, **self._added_ids}

    @property
    def special_ids(self) -> SpecialIds:
        return self.base.special_ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self.base.encode_ordinary(text)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out, run = bytearray(), []
        for token_id in ids:
            if token_id in self._by_id:
                out += self.base.decode_bytes(run) + self._by_id[token_id].encode()
                run = []
            elif self.base.vocab_size <= token_id:
                raise TokenizerError(f"token id {token_id} is outside this vocabulary (base ids 0..."
                                     f"{self.base.vocab_size - 1}, added {self.first_id}...{self.vocab_size - 1})")
            else:
                run.append(token_id)
        return bytes(out + self.base.decode_bytes(run))

    def to_json(self) -> dict:
        return {"type": self.kind, "version": 1, "base": self.base.to_json(), "added": list(self.added),
                "first_id": self.first_id}

    @classmethod
    def from_json(cls, data: dict, base: Tokenizer | None = None) -> ExtendedTokenizer:
        """The tokenizer `to_json` wrote, around `base` (the tokenizer of data["base"], which
        llmjax.tokenizer.tokenizer_from_json builds: this module cannot import that one, which imports it)."""
        if data.get("type") != cls.kind or not isinstance(data.get("base"), dict):
            raise TokenizerError(f"not an extended tokenizer: its JSON has type {data.get('type')!r}")
        if base is None:
            raise TokenizerError("an extended tokenizer's JSON is read by llmjax.tokenizer.tokenizer_from_json "
                                 "(or load_tokenizer), which builds its base tokenizer first")
        return cls(base, data["added"], data.get("first_id"))

    def __repr__(self) -> str:
        return f"ExtendedTokenizer({self.base!r}, added={list(self.added)}, first_id={self.first_id})"


def with_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str], first_id: int | None = None) -> Tokenizer:
    """`tokenizer` with `tokens` added as special tokens at ids first_id, ... (default: after its vocabulary)."""
    return ExtendedTokenizer(tokenizer, tokens, first_id)
