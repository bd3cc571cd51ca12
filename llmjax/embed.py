"""Text embeddings from any llmjax model: an encoder (all-MiniLM-L6-v2: mean pooling, normalized) or a decoder
(mean or last-token pooling of its hidden states).

    model = load_model(hf="all-minilm-l6-v2")                      # llmjax.io.models; or any params, cfg, tokenizer
    vectors = embed_texts(model.params, model.cfg, model.tokenizer, texts)   # [n, d_model] float32, unit length

Fast on many texts: tokenized once, sorted by length and cut into batches of batch_size, each padded to the next of
a few bucket lengths (16, 24, 32, 48, 64, ... up to max_len: each at most 1.5 times the one before), so a whole corpus
compiles at most one program per bucket (9 up to 256) and pads at most a third. `embed_tokens` is the jitted step on
one padded batch, `embed_ids` the batching over sequences already tokenized.

Embeddings on disk (`python -m experiments embed` writes them, `load_embeddings` reads them back): one folder with

    meta.json              model, dimension, pooling, normalize, max_len, count, dtype, source, shard_size, ...
    ids.jsonl              one JSON string per embedded document, in row order (a line number, a path, a window)
    embeddings-00000.npy   rows [0, shard_size) as float32 or float16 [rows, dimension]; embeddings-00001.npy ...

each file written under a temporary name and renamed into place, so a shard that exists is complete.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from llmjax.config import ModelConfig
from llmjax.model.pooling import POOLINGS, check_pooling, pool
from llmjax.model.transformer import hidden_states

ON_LONG = ("truncate", "error")
SMALLEST_BUCKET = 16
DEFAULT_MAX_LEN = 256  # tokens per text unless told otherwise: all-MiniLM-L6-v2's max_seq_length


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


def default_pooling(cfg: ModelConfig) -> str:
    """The pooling a model is read with unless told otherwise: "mean" for an encoder (sentence-transformers'
    all-MiniLM-L6-v2), "last" for a decoder (the only token that has seen the whole text under the causal mask)."""
    return "last" if cfg.causal else "mean"


# --- embeddings on disk ----------------------------------------------------------------------------

META_FILE, IDS_FILE = "meta.json", "ids.jsonl"
SHARD_DTYPES = ("float32", "float16")


class EmbeddingsError(ValueError):
    """A folder of embeddings that cannot be read: missing, unfinished, or not what its meta.json says (one line)."""


def shard_path(folder: str | os.PathLike, index: int) -> Path:
    """The file of shard `index`: rows [index * shard_size, (index + 1) * shard_size)."""
    return Path(folder) / f"embeddings-{index:05d}.npy"


def shard_count(count: int, shard_size: int) -> int:
    return -(-count // shard_size)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """write(temporary path) next to `path`, then rename it into place: `path` is never seen half written."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_shard(folder: str | os.PathLike, index: int, vectors: np.ndarray) -> Path:
    """Shard `index` ([rows, dimension]) written atomically."""
    path = shard_path(folder, index)

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            np.save(file, vectors)

    write_atomically(path, write)
    return path


def shard_is_complete(folder: str | os.PathLike, index: int, rows: int, dimension: int, dtype: str) -> bool:
    """Shard `index` exists with the rows, dimension and dtype it should have (a file renamed into place is whole;
    the header check catches a shard left by a run with other sizes)."""
    path = shard_path(folder, index)
    if not path.is_file():
        return False
    try:
        shard = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return shard.shape == (rows, dimension) and shard.dtype == np.dtype(dtype)


def load_embeddings(folder: str | os.PathLike, *, mmap: bool = False) -> tuple[list[str], np.ndarray, dict]:
    """(ids, vectors [count, dimension] in the stored dtype, meta) of a folder written by `python -m experiments
    embed`. mmap: one shard is returned memory-mapped (several are concatenated in memory). Raises
    EmbeddingsError for a folder that is missing, unfinished or inconsistent."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise EmbeddingsError(f"{folder}: no embeddings here ({META_FILE} missing): write them with "
                              f"`python -m experiments embed --out {folder} ...`")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        count, dimension, dtype = int(meta["count"]), int(meta["dimension"]), str(meta["dtype"])
        shard_size = int(meta["shard_size"])
    except (ValueError, KeyError, TypeError) as error:
        raise EmbeddingsError(f"{folder / META_FILE}: not an embeddings meta.json ({type(error).__name__}: "
                              f"{error})") from None
    if not meta.get("complete"):
        raise EmbeddingsError(f"{folder}: unfinished (meta.json says complete: false): run the same `python -m "
                              f"experiments embed` command again to finish it")
    with open(folder / IDS_FILE, encoding="utf-8") as file:
        ids = [json.loads(line) for line in file]
    if len(ids) != count:
        raise EmbeddingsError(f"{folder / IDS_FILE}: {len(ids)} ids, but meta.json says count={count}")
    shards = []
    for index in range(shard_count(count, shard_size)):
        rows = min(shard_size, count - index * shard_size)
        if not shard_is_complete(folder, index, rows, dimension, dtype):
            raise EmbeddingsError(f"{shard_path(folder, index)}: missing or not [{rows}, {dimension}] {dtype}: run "
                                  f"`python -m experiments embed` again to finish it")
        shards.append(np.load(shard_path(folder, index), mmap_mode="r" if mmap else None))
    if not shards:
        return ids, np.zeros((0, dimension), dtype), meta
    vectors = shards[0] if len(shards) == 1 else np.concatenate(shards)
    return ids, vectors, meta


__all__ = ["EmbeddingsError", "POOLINGS", "bucket_lengths", "default_pooling", "embed_ids", "embed_texts",
           "embed_tokens", "load_embeddings", "save_shard", "shard_is_complete", "shard_path",
           "tokenize_for_embedding"]
