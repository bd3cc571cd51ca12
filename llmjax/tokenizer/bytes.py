"""The byte tokenizer: ids 0..255 are the UTF-8 bytes of the text, 256 is "<|endoftext|>".

No training, no files: the smallest real tokenizer, used by the quickstart and by tests, and the
baseline every learned vocabulary is compared against (tokens per byte = 1).
"""

from __future__ import annotations

from collections.abc import Iterable

from llmjax.tokenizer.base import ENDOFTEXT, Tokenizer, TokenizerError

BYTE_VOCAB = 256


class ByteTokenizer(Tokenizer):
    """Text <-> UTF-8 bytes, plus one special token (id 256) that separates documents."""

    kind = "bytes"

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB + 1

    @property
    def special_tokens(self) -> dict[str, int]:
        return {ENDOFTEXT: BYTE_VOCAB}

    def encode_ordinary(self, text: str) -> list[int]:
        return list(encode_utf8(text))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes for the ids; the end-of-text id decodes to its text, as other tokenizers do."""
        out = bytearray()
        for token_id in ids:
            if 0 <= token_id < BYTE_VOCAB:
                out.append(token_id)
            elif token_id == BYTE_VOCAB:
                out += ENDOFTEXT.encode()
            else:
                raise TokenizerError(f"token id {token_id} is outside the byte vocabulary (ids 0..{BYTE_VOCAB})")
        return bytes(out)

    def to_json(self) -> dict:
        return {"type": self.kind, "version": 1}

    @classmethod
    def from_json(cls, data: dict) -> ByteTokenizer:
        if data.get("type") != cls.kind:
            raise TokenizerError(f"not a byte tokenizer: its JSON has type {data.get('type')!r}, expected {cls.kind!r}")
        return cls()

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def encode_utf8(text: str) -> bytes:
    """UTF-8 bytes of text. Lone surrogates (which no valid text holds, but Python strings can)
    raise a TokenizerError naming their position rather than a bare UnicodeEncodeError."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TokenizerError(
            f"text holds a lone surrogate {text[error.start]!r} at character {error.start}, which is not "
            "Unicode text and has no UTF-8 bytes; decode its source with errors='replace'"
        ) from None
