"""Tokenizers behind one interface: our byte-level BPE, SentencePiece, BERT's WordPiece, and raw bytes.

    tokenizer = load_tokenizer("runs/tokenizer/bpe-10000.json")   # ours, saved by Tokenizer.save
    tokenizer = load_tokenizer("path/to/gpt2")                      # GPT-2 vocab.json + merges.txt
    tokenizer = load_tokenizer("path/to/tokenizer.json")            # Hugging Face byte-level BPE or WordPiece
    tokenizer = load_tokenizer("path/to/vocab.txt")                 # BERT's WordPiece vocabulary
    tokenizer = load_tokenizer("path/to/spm.model")                 # SentencePiece
    tokenizer = load_tokenizer("path/to/model.gguf")                # the tokenizer inside a GGUF file (llama.cpp)
    tokenizer = load_tokenizer("bytes")                             # 256 byte ids + <|endoftext|>
"""

from __future__ import annotations

import json
from pathlib import Path

from llmjax.tokenizer.base import ENDOFTEXT, Tokenizer, TokenizerError

__all__ = ["ENDOFTEXT", "Tokenizer", "TokenizerError", "load_tokenizer", "tokenizer_class", "tokenizer_from_json"]


def tokenizer_class(kind: str) -> type[Tokenizer]:
    """The class that reads our saved JSON of a given "type"."""
    if kind == "byte_bpe":
        from llmjax.tokenizer.bpe import BPETokenizer

        return BPETokenizer
    if kind == "sentencepiece":
        from llmjax.tokenizer.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer
    if kind == "bytes":
        from llmjax.tokenizer.bytes import ByteTokenizer

        return ByteTokenizer
    if kind == "wordpiece":
        from llmjax.tokenizer.wordpiece import WordPieceTokenizer

        return WordPieceTokenizer
    if kind == "extended":
        from llmjax.tokenizer.extended import ExtendedTokenizer

        return ExtendedTokenizer
    raise TokenizerError(f"unknown tokenizer type {kind!r}; llmjax reads 'byte_bpe', 'sentencepiece', 'wordpiece', "
                         f"'bytes' and 'extended'")


def tokenizer_from_json(data: dict) -> Tokenizer:
    """A tokenizer from our saved JSON (a dict with "type"); an extended tokenizer's base is built first."""
    cls = tokenizer_class(data["type"])
    if data["type"] == "extended":
        if not isinstance(data.get("base"), dict):
            raise TokenizerError("an extended tokenizer's JSON has no 'base' tokenizer")
        return cls.from_json(data, tokenizer_from_json(data["base"]))
    return cls.from_json(data)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A tokenizer from "bytes", our JSON, a SentencePiece .model, GPT-2 files, a HF tokenizer.json (byte-level BPE or
    WordPiece; or a folder holding one), BERT's vocab.txt (or a folder holding only that) or a GGUF file (known by
    its magic bytes)."""
    if str(spec) == "bytes":
        return tokenizer_class("bytes")()
    path = Path(spec)
    if not path.exists():
        raise TokenizerError(
            f"tokenizer {path} does not exist "
            "(give our .json, a .model, a .gguf, a GPT-2 / Hugging Face folder, or 'bytes')"
        )
    from llmjax.tokenizer.bpe import BPETokenizer

    if path.is_dir():
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return BPETokenizer.from_gpt2_files(path / "vocab.json", path / "merges.txt")
        if (path / "tokenizer.json").is_file():
            return _from_hf_tokenizer_json(path / "tokenizer.json")
        if (path / "vocab.txt").is_file():
            return tokenizer_class("wordpiece").from_vocab_file(path / "vocab.txt")
        raise TokenizerError(f"{path} holds neither GPT-2's vocab.json + merges.txt, a tokenizer.json nor BERT's "
                             f"vocab.txt")
    if path.name == "vocab.txt":
        return tokenizer_class("wordpiece").from_vocab_file(path)
    if path.suffix == ".model":
        return tokenizer_class("sentencepiece").load(path)
    if _is_gguf(path):
        from llmjax.tokenizer.gguf import tokenizer_from_gguf

        return tokenizer_from_gguf(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path} is not a tokenizer file: not valid JSON ({error})") from error
    if isinstance(data, dict) and "type" in data:
        return tokenizer_from_json(data)
    if isinstance(data, dict) and "model" in data:  # Hugging Face tokenizer.json
        return _from_hf_tokenizer_json(path, data)
    raise TokenizerError(f"{path} is JSON but neither an llmjax tokenizer (no 'type') nor a Hugging Face "
                         "tokenizer.json")


def _from_hf_tokenizer_json(path: Path, data: dict | None = None) -> Tokenizer:
    """A Hugging Face tokenizer.json: WordPiece (BERT) by its model type, else byte-level BPE."""
    if data is None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{path} is not a tokenizer file: not valid JSON ({error})") from error
    if isinstance(data, dict) and (data.get("model") or {}).get("type") == "WordPiece":
        return tokenizer_class("wordpiece").from_hf_json_data(data, source=str(path))
    from llmjax.tokenizer.bpe import BPETokenizer

    return BPETokenizer.from_hf_tokenizer_json(path)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"GGUF"
