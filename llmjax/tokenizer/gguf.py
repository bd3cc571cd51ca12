"""GGUF tokenizers (llama.cpp's "tokenizer.ggml.*" metadata) as llmjax tokenizers.

    tokenizer = tokenizer_from_gguf("model.gguf")       # or the metadata dict of llmjax.io.gguf.read_metadata
    ids = tokenizer.encode_prompt("Hello")              # BOS in front where the file says so

A GGUF file stores its tokenizer as metadata: tokenizer.ggml.model ("gpt2": byte-level BPE, "llama":
SentencePiece, ...), .tokens (byte-level BPE: in GPT-2's byte alphabet, "Ġthe"; SentencePiece: "▁the" and
"<0x0A>" byte pieces), .token_type (one per token, `TokenType`), .merges ("Ġ t", rank order; byte-level BPE
only), .scores (SentencePiece only: its BPE merges the pair whose result scores highest), .pre (the
pre-tokenizer, by llama.cpp's name), the BOS / EOS / unknown / padding ids and the add_bos_token /
add_eos_token flags. Here they are read the way llama.cpp (src/llama-vocab.cpp) reads them.

Byte-level BPE ("gpt2"): control, user-defined and unknown tokens are special tokens, matched in text as one id
(llama.cpp's parse_special, Hugging Face's added tokens) and never made by merges; the pre-tokenizer name picks
the regex and llama.cpp's defaults for add-BOS and ignore_merges, which the file's flags override.

SentencePiece ("llama": LLaMA 1 / 2, Mistral, TinyLlama): the tokens, scores and types become a SentencePiece
BPE model proto with LLaMA's tokenizer.model settings (identity normalization, a space put in front of the text
unless tokenizer.ggml.add_space_prefix is false, whitespace kept as is, byte fallback when the vocabulary has
byte pieces), run by `SentencePieceTokenizer`; prompts get BOS unless tokenizer.ggml.add_bos_token is false
(llama.cpp's default), EOS only where add_eos_token says so.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llmjax.tokenizer import sentencepiece as spm
from llmjax.tokenizer.base import SpecialIds, Tokenizer, TokenizerError
from llmjax.tokenizer.bpe import BPETokenizer
from llmjax.tokenizer.pretokenize import (
    DIGITS_THEN_GPT2_PATTERN,
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    LLAMA_CPP_DEFAULT_PATTERN,
    QWEN2_PATTERN,
)
from llmjax.tokenizer.sentencepiece import SentencePieceTokenizer

SUPPORTED_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}  # tokenizer.ggml.model values llmjax reads


class TokenType(enum.IntEnum):
    """tokenizer.ggml.token_type values (llama.cpp's llama_token_type)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


SPECIAL_TOKEN_TYPES = frozenset({TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED})


@dataclass(frozen=True)
class PreTokenizer:
    """What a tokenizer.ggml.pre name means in llama.cpp: the regex (one regex with the pieces of llama.cpp's list,
    see llmjax.tokenizer.pretokenize), whether prompts get BOS when the file does not say, and ignore_merges."""

    pattern: str
    add_bos: bool = False
    ignore_merges: bool = False


_GPT2 = PreTokenizer(GPT2_PATTERN)
_LLAMA3 = PreTokenizer(LLAMA3_PATTERN, add_bos=True, ignore_merges=True)
_DIGITS_THEN_GPT2 = PreTokenizer(DIGITS_THEN_GPT2_PATTERN)
_QWEN2 = PreTokenizer(QWEN2_PATTERN)

# llama.cpp's names (src/llama-vocab.cpp) for the pre-tokenizers above; names that share a regex share an entry.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer(LLAMA_CPP_DEFAULT_PATTERN),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer(LLAMA3_PATTERN)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _DIGITS_THEN_GPT2),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), _QWEN2),
}


# --- reading the metadata ---------------------------------------------------------------------


def tokenizer_from_gguf(source: str | Path | Mapping) -> Tokenizer:
    """The tokenizer of a GGUF file, from its path or its metadata (`llmjax.io.gguf.read_metadata`)."""
    if isinstance(source, (str, Path)):
        from llmjax.io.gguf import read_metadata

        source = read_metadata(source)
    model = tokenizer_model(source)
    if model == "gpt2":
        return byte_level_bpe_from_gguf(source)
    if model == "llama":
        return sentencepiece_from_gguf(source)
    supported = ", ".join(f"{name!r} ({kind})" for name, kind in SUPPORTED_MODELS.items())
    raise TokenizerError(f"the GGUF tokenizer.ggml.model {model!r} is not supported; llmjax reads {supported}")


def byte_level_bpe_from_gguf(metadata: Mapping) -> BPETokenizer:
    """The byte-level BPE tokenizer (tokenizer.ggml.model "gpt2") of a GGUF file's metadata, read as llama.cpp
    reads it: tokens in GPT-2's byte alphabet and "a b" merges; the pre-tokenizer named by tokenizer.ggml.pre
    (PRE_TOKENIZERS); control, user-defined and unknown tokens as special tokens (matched in text as one id);
    the BOS / EOS / unknown / padding ids and add-BOS / add-EOS rules as `special_ids`."""
    tokens = token_texts(metadata)
    pre = pre_tokenizer(metadata)
    specials = special_tokens(tokens, token_types(metadata, len(tokens)))
    roles = SpecialIds(**special_ids(metadata, default_add_bos=pre.add_bos))
    return BPETokenizer.from_byte_level_vocab(vocab(tokens), merges(metadata), specials, pre.pattern,
                                              pre.ignore_merges, "tokenizer.ggml.tokens", special_ids=roles)


def sentencepiece_from_gguf(metadata: Mapping) -> SentencePieceTokenizer:
    """The SentencePiece tokenizer (tokenizer.ggml.model "llama") of a GGUF file's metadata, as llama.cpp and
    transformers' GGUF loader read it: a BPE model of the tokens, their scores and types (control and
    user-defined tokens are special tokens, matched in text as one id); the BOS / EOS / unknown / padding ids
    and the add-BOS (default true) / add-EOS (default false) rule as `special_ids`."""
    tokens = token_texts(metadata)
    vocab(tokens)  # a piece spelled twice is refused by name (SentencePiece would only say "already defined")
    scores = token_scores(metadata, len(tokens))
    types = token_types(metadata, len(tokens))
    roles = SpecialIds(**special_ids(metadata, default_add_bos=True)).check(len(tokens))
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    return SentencePieceTokenizer(sentencepiece_model_proto(tokens, scores, types, roles, add_space_prefix),
                                  special_ids=roles)


def tokenizer_model(metadata: Mapping) -> str:
    """tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece), "bert", "t5", ..."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError("the GGUF file has no tokenizer (no tokenizer.ggml.model key)")
    return str(model)


def token_texts(metadata: Mapping) -> list[str]:
    """tokenizer.ggml.tokens: each token's text (byte-level BPE: in GPT-2's byte alphabet; special tokens as is)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError("the GGUF file has no tokenizer.ggml.tokens list")
    return tokens


def token_types(metadata: Mapping, count: int) -> list[int]:
    """tokenizer.ggml.token_type, one per token (all NORMAL when the file has none, as llama.cpp assumes)."""
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
        return [TokenType.NORMAL] * count
    if len(types) != count:
        raise TokenizerError(f"the GGUF file has {len(types)} tokenizer.ggml.token_type entries for {count} tokens")
    return types


def token_scores(metadata: Mapping, count: int) -> list[float]:
    """tokenizer.ggml.scores, one per token: a SentencePiece vocabulary cannot merge without them."""
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise TokenizerError("the GGUF file has no tokenizer.ggml.scores list (a SentencePiece BPE vocabulary "
                             "merges by score)")
    if len(scores) != count:
        raise TokenizerError(f"the GGUF file has {len(scores)} tokenizer.ggml.scores entries for {count} tokens")
    return [float(score) for score in scores]


def vocab(tokens: list[str]) -> dict[str, int]:
    """{token text: id}; two ids that spell the same token are an error (one of them could never be encoded)."""
    ids: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if ids.setdefault(token, i) != i:
            raise TokenizerError(f"tokenizer.ggml.tokens {ids[token]} and {i} are both {token!r}")
    return ids


def special_tokens(tokens: list[str], types: list[int]) -> dict[str, int]:
    """{text: id} of the control, user-defined and unknown tokens: the ones `encode` matches in text as one id."""
    return {tokens[i]: i for i, kind in enumerate(types) if kind in SPECIAL_TOKEN_TYPES}


def merges(metadata: Mapping) -> list[tuple[str, str, str]]:
    """("tokenizer.ggml.merges[r]", a, b) per merge, in rank order, from "a b" strings."""
    lines = metadata.get("tokenizer.ggml.merges")
    if not isinstance(lines, list):
        raise TokenizerError("the GGUF file has no tokenizer.ggml.merges list (a byte-level BPE needs its merges)")
    parsed = []
    for rank, line in enumerate(lines):
        parts = line.split(" ") if isinstance(line, str) else ()
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"tokenizer.ggml.merges[{rank}] is {line!r}, not two tokens separated by one space")
        parsed.append((f"tokenizer.ggml.merges[{rank}]", parts[0], parts[1]))
    return parsed


def pre_tokenizer(metadata: Mapping) -> PreTokenizer:
    """The pre-tokenizer tokenizer.ggml.pre names; none named: llama.cpp's "default", with its warning."""
    name = metadata.get("tokenizer.ggml.pre")
    if name is None:
        warnings.warn("the GGUF file names no pre-tokenizer (tokenizer.ggml.pre): using llama.cpp's 'default', "
                      "which may split text unlike the model's own tokenizer", stacklevel=3)
        name = "default"
    if name not in PRE_TOKENIZERS:
        raise TokenizerError(f"the GGUF pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported; "
                             f"llmjax knows {', '.join(sorted(PRE_TOKENIZERS))}")
    return PRE_TOKENIZERS[name]


def special_ids(metadata: Mapping, *, default_add_bos: bool = False) -> dict:
    """{"bos", "eos", "unk", "pad": id or None, "add_bos", "add_eos": bool}: the fields of base.SpecialIds.

    add_bos / add_eos are the file's tokenizer.ggml.add_bos_token / add_eos_token, else llama.cpp's default
    for the pre-tokenizer (`default_add_bos`) and False."""
    roles = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        roles[role] = None if i is None else int(i)
    roles["add_bos"] = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos))
    roles["add_eos"] = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    return roles


def special_token_text(metadata: Mapping, role: str) -> str:
    """The text of the token tokenizer.ggml.<role>_token_id names ("bos", "eos", ...), "" when it names none."""
    i = metadata.get(f"tokenizer.ggml.{role}_token_id")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else ""


# --- SentencePiece model protos -----------------------------------------------------------------


def sentencepiece_model_proto(tokens: list[str], scores: list[float], types: list[int], roles: SpecialIds,
                              add_space_prefix: bool = True) -> bytes:
    """A serialized SentencePiece ModelProto of a GGUF vocabulary, as transformers' GGUF converter and llama.cpp
    interpret it: BPE (no merges: the highest-scoring pair merges first), LLaMA's normalizer (identity, a dummy
    "▁" prefix when add_space_prefix, no whitespace folding, spaces written as "▁"), byte fallback when the
    vocabulary has byte pieces, and the roles' unknown / BOS / EOS / padding pieces."""
    # Needs protobuf, which orbax-checkpoint installs.
    from sentencepiece import sentencepiece_model_pb2

    if TokenType.UNKNOWN not in types:
        raise TokenizerError("the GGUF file's tokenizer.ggml.token_type marks no token as unknown (type 2); a "
                             "SentencePiece vocabulary needs one, as <unk> in LLaMA's")
    model = sentencepiece_model_pb2.ModelProto()
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        model.pieces.add(piece=token, score=score, type=sentencepiece_piece_type(kind, i))
    trainer = model.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = TokenType.BYTE in types
    for role in ("unk", "bos", "eos", "pad"):
        i = getattr(roles, role)
        setattr(trainer, f"{role}_id", -1 if i is None else i)
        if i is not None:
            setattr(trainer, f"{role}_piece", tokens[i])
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = add_space_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def sentencepiece_piece_type(kind: int, index: int) -> int:
    """ModelProto.SentencePiece.Type of a tokenizer.ggml.token_type value."""
    try:
        return SENTENCEPIECE_PIECE_TYPES[TokenType(kind)]
    except ValueError:
        known = ", ".join(f"{t.value} ({t.name.lower()})" for t in TokenType)
        raise TokenizerError(f"tokenizer.ggml.token_type[{index}] is {kind!r}, not one of llama.cpp's token types: "
                             f"{known}") from None


# tokenizer.ggml.token_type -> ModelProto.SentencePiece.Type: llama.cpp took its numbers from SentencePiece, so
# this is the identity, spelled out by name.
SENTENCEPIECE_PIECE_TYPES = {
    TokenType.NORMAL: spm.NORMAL,
    TokenType.UNKNOWN: spm.UNKNOWN,
    TokenType.CONTROL: spm.CONTROL,
    TokenType.USER_DEFINED: spm.USER_DEFINED,
    TokenType.UNUSED: spm.UNUSED,
    TokenType.BYTE: spm.BYTE,
}
