"""Text embeddings from any llmjax model: an encoder (all-MiniLM-L6-v2: mean pooling, normalized) or a decoder
(mean or last-token pooling of its hidden states).

    model = load_model(hf="all-minilm-l6-v2")                      # llmjax.io.models; or any params, cfg, tokenizer
    vectors = embed_texts(model.params, model.cfg, model.tokenizer, texts)   # [n, d_model] float32, unit length

Fast on many texts: tokenized once, sorted by length and cut into batches of batch_size, each padded to the next of
a few bucket lengths (16, 24, 32, 48, 64, ... up to max_len: each at most 1.5 times the one before), so a whole corpus
compiles at most one program per bucket (9 up to 256) and pads at most a third. `embed_tokens` is the jitted step on
one padded batch, `embed_ids` the batching over sequences already tokenized.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import jax
import numpy as np

from llmjax.config import ModelConfig
from llmjax.model.pooling import POOLINGS, check_pooling, pool
from llmjax.model.transformer import hidden_states

ON_LONG = ("truncate", "error")
SMALLEST_BUCKET = 16


@functools.partial(jax.jit, static_argnames=("cfg", "pooling", "normalize"))
def embed_tokens(params: dict, tokens: jax.Array, token_mask: jax.Array, cfg: ModelConfig, *,
                 token_types: jax.Array | None = None, pooling: str = "mean", normalize: bool = True) -> jax.Array:
    """tokens, token_mask (True at real tokens) [batch, seq] -> pooled float32 embeddings [batch, d_model]."""
    hidden = hidden_states(params, tokens, cfg, token_types=token_types, token_mask=token_mask)  # [b, s, d_model]
    return pool(hidden, token_mask, pooling, normalize=normalize)


def bucket_lengths(max_len: int, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """The padded lengths a batch may have: powers of two from `smallest` and 1.5 times each (16, 24, 32, 48, ...)
    below max_len, then max_len. Few lengths, few compiles; a batch is padded by at most half its longest text."""
    lengths, power = [], smallest
    while power < max_len:
        lengths += [length for length in (power, power * 3 // 2) if length < max_len]
        power *= 2
    return [*lengths, max_len]


def tokenize_for_embedding(tokenizer, text: str, max_len: int) -> tuple[list[int], int]:
    """(ids of one text as the model reads it, word pieces cut off): [CLS] text [SEP] for a WordPiece encoder,
    the tokenizer's prompt ids (BOS / EOS where its model file says) for others, truncated to max_len."""
    if hasattr(tokenizer, "encode_with_types"):  # BERT-style: [CLS] ... [SEP] stay when the text is cut
        encoding = tokenizer.encode_with_types(text, max_length=max_len)
        return encoding.ids, encoding.truncated
    ids = tokenizer.encode_prompt(text)
    return ids[:max_len], max(0, len(ids) - max_len)


def embed_texts(params: dict, cfg: ModelConfig, tokenizer, texts: Sequence[str], *, batch_size: int = 64,
                max_len: int = 256, pooling: str = "mean", normalize: bool = True, on_long: str = "truncate",
                progress: bool = False) -> np.ndarray:
    """One embedding per text: float32 [len(texts), d_model], in the order given.

    pooling: "mean" over real tokens, "cls" (the first token) or "last" (the last real token: decoders).
    normalize: unit L2 length, so a dot product is the cosine similarity. A text longer than max_len tokens is
    cut to max_len with one warning for the lot (on_long="truncate"), or refused (on_long="error").
    progress: a tqdm bar over the batches."""
    texts = _checked_texts(texts)
    check_pooling(pooling)
    if on_long not in ON_LONG:
        raise ValueError(f"on_long={on_long!r}: expected one of {', '.join(map(repr, ON_LONG))}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
    if not isinstance(max_len, int) or not 2 <= max_len <= cfg.max_seq_len:
        raise ValueError(f"max_len={max_len!r}: must be between 2 and the model's max_seq_len={cfg.max_seq_len}")

    encoded = [tokenize_for_embedding(tokenizer, text, max_len) for text in texts]
    empty = [i for i, (ids, _) in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"texts[{empty[0]}] gives no tokens ({len(empty)} such texts): nothing to embed; drop "
                         f"empty texts")
    long = [i for i, (_, cut) in enumerate(encoded) if cut]
    if long:
        message = (f"{len(long)} of {len(texts)} texts are longer than max_len={max_len} tokens (the first: text "
                   f"{long[0]}, {len(encoded[long[0]][0]) + encoded[long[0]][1]} tokens)")
        if on_long == "error":
            raise ValueError(f"{message}; shorten them, raise max_len, or pass on_long='truncate'")
        warnings.warn(f"{message}: truncated to their first {max_len} tokens", stacklevel=2)

    pad_id = tokenizer.special_ids.pad if tokenizer.special_ids.pad is not None else 0
    return embed_ids(params, cfg, [ids for ids, _ in encoded], pad_id=pad_id, batch_size=batch_size,
                     max_len=max_len, pooling=pooling, normalize=normalize, progress=progress)


def embed_ids(params: dict, cfg: ModelConfig, sequences: Sequence, *, pad_id: int = 0, batch_size: int = 64,
              max_len: int = 256, pooling: str = "mean", normalize: bool = True, progress: bool = False) -> np.ndarray:
    """One embedding per sequence of token ids (each 1..max_len ids, as the model reads them: [CLS] ... [SEP] for a
    BERT-style encoder): float32 [len(sequences), d_model], in the order given. Sorted by length, batched,
    each batch padded with pad_id to its bucket length; the batches are dispatched without waiting for each other
    (one transfer to the host at the end)."""
    buckets = bucket_lengths(max_len)
    order = np.argsort([len(ids) for ids in sequences], kind="stable")  # similar lengths share a batch
    starts = range(0, len(sequences), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="embedding", unit="batch")
    pending = []  # (rows, device embeddings [batch_size, d_model])
    for start in starts:
        rows = order[start:start + batch_size]
        length = next(b for b in buckets if b >= max(len(sequences[i]) for i in rows))
        tokens = np.full((batch_size, length), pad_id, np.int32)  # a short last batch is padded to batch_size too
        mask = np.zeros((batch_size, length), bool)
        for row, i in enumerate(rows):
            ids = sequences[i]
            tokens[row, :len(ids)] = ids
            mask[row, :len(ids)] = True
        pending.append((rows, embed_tokens(params, tokens, mask, cfg, pooling=pooling, normalize=normalize)))
    out = np.empty((len(sequences), cfg.d_model), np.float32)
    for rows, vectors in pending:
        out[rows] = np.asarray(vectors)[:len(rows)]
    return out


def _checked_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string: embed_texts(..., [text])")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one text to embed")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a string")
    return texts


__all__ = ["POOLINGS", "bucket_lengths", "embed_ids", "embed_texts", "embed_tokens", "tokenize_for_embedding"]
