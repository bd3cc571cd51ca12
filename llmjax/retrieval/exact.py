"""Exact (brute-force) search: blocked matmul + top-k in JAX, on whatever device JAX runs on.

The database lives on the device in blocks of `block_rows` rows ([blocks, block_rows, dim], padded); a query chunk
([query_block, dim]) is scored against one block at a time (one matmul), masked (removed rows, padding, a filter),
reduced to its top k, and merged with the running top k of the blocks before (a `lax.scan` over blocks). Memory
stays at query_block x block_rows scores however large the database. `approx_recall` swaps the per-block exact top
k for `jax.lax.approx_max_k` with that recall target (fast where XLA has an approximate kernel, TPU; elsewhere the
same sort).

Every other index is tested against this one, and the benchmark's ground truth is this one in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.retrieval.base import RetrievalError, VectorIndex, register

DTYPES = ("float32", "bfloat16")


@functools.partial(jax.jit, static_argnames=("k", "metric", "approx_recall"))
def blocked_top_k(queries, blocks, valid, *, k: int, metric: str, approx_recall: float | None = None):
    """Top k rows of the database for each query.

    queries [q, dim] float32; blocks [nb, B, dim] (float32 or bfloat16); valid [nb, B] bool (live, admitted,
    not padding). Returns (scores [q, k] float32, rows [q, k] int32; -inf / -1 where fewer than k are valid).
    Scores: the inner product, or for "l2" minus the squared distance."""
    num_blocks, block_rows, _ = blocks.shape
    queries_c = queries.astype(blocks.dtype)
    query_norms = jnp.sum(queries * queries, axis=-1, keepdims=True)  # [q, 1]

    def step(carry, block):
        best_scores, best_rows = carry  # [q, k] each
        vectors, admitted, first = block  # [B, dim], [B], ()
        scores = jnp.dot(queries_c, vectors.T, preferred_element_type=jnp.float32)  # [q, B]
        if metric == "l2":
            norms = jnp.sum(jnp.square(vectors.astype(jnp.float32)), axis=-1)  # [B]
            scores = 2.0 * scores - norms[None, :] - query_norms
        scores = jnp.where(admitted[None, :], scores, -jnp.inf)
        if approx_recall is None:
            top_scores, top_cols = jax.lax.top_k(scores, min(k, block_rows))
        else:
            top_scores, top_cols = jax.lax.approx_max_k(scores, min(k, block_rows), recall_target=approx_recall)
        merged_scores = jnp.concatenate([best_scores, top_scores], axis=1)
        merged_rows = jnp.concatenate([best_rows, first + top_cols.astype(jnp.int32)], axis=1)
        keep_scores, keep = jax.lax.top_k(merged_scores, k)
        return (keep_scores, jnp.take_along_axis(merged_rows, keep, axis=1)), None

    start = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32), jnp.full((queries.shape[0], k), -1, jnp.int32))
    firsts = jnp.arange(num_blocks, dtype=jnp.int32) * block_rows
    (scores, rows), _ = jax.lax.scan(step, start, (blocks, valid, firsts))
    return scores, jnp.where(jnp.isfinite(scores), rows, -1)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k of queries [q, dim] among a few vectors [n, dim] (float32; the rows a rare filter label admits):
    (scores [q, k] float32, positions in `vectors` [q, k] int64; -inf / -1 beyond n). One block padded to a power of
    two, so a few shapes compile."""
    bucket = max(k, 1 << int(np.ceil(np.log2(max(len(vectors), 1)))))
    block = np.zeros((1, bucket, vectors.shape[1]), np.float32)
    block[0, : len(vectors)] = vectors
    valid = np.zeros((1, bucket), bool)
    valid[0, : len(vectors)] = True
    scores, found = blocked_top_k(jnp.asarray(queries, jnp.float32), jnp.asarray(block), jnp.asarray(valid), k=k,
                                  metric=metric)
    return np.asarray(scores), np.asarray(found).astype(np.int64)


@register
class ExactIndex(VectorIndex):
    """Brute-force search on the JAX device.

    dtype: how the vectors are held on the device ("bfloat16" halves memory and doubles matmul speed; scores are
    accumulated in float32). block_rows / query_block: the tile of scores computed at once. approx_recall: per-block
    `approx_max_k` with this recall target instead of the exact top k (None: exact)."""

    kind = "exact"

    def __init__(self, dim: int, metric: str = "ip", *, dtype: str = "float32", block_rows: int = 16384,
                 query_block: int = 1024, approx_recall: float | None = None):
        super().__init__(dim, metric)
        if dtype not in DTYPES:
            raise RetrievalError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        if block_rows < 1 or query_block < 1:
            raise RetrievalError(f"block_rows={block_rows}, query_block={query_block}: must be positive")
        if approx_recall is not None and not 0 < approx_recall < 1:
            raise RetrievalError(f"approx_recall={approx_recall}: expected a recall target in (0, 1), or None")
        self.dtype, self.block_rows, self.query_block = dtype, block_rows, query_block
        self.approx_recall = approx_recall
        self.vectors = np.zeros((0, dim), np.float32)  # [rows, dim] on the host: the source of truth
        self._device_blocks = None

    def _add(self, vectors, first_row):
        self.vectors = np.concatenate([self.vectors, vectors])
        self._device_blocks = None

    def _blocks(self):
        """The database on the device: [nb, B, dim] in self.dtype (B: block_rows, or fewer rows when that is all)."""
        if self._device_blocks is None:
            block = min(self.block_rows, max(self.rows, 1))
            padded = -(-self.rows // block) * block
            array = np.zeros((padded, self.dim), np.float32)
            array[: self.rows] = self.vectors
            self._device_blocks = jnp.asarray(array.reshape(-1, block, self.dim), dtype=self.dtype)
        return self._device_blocks

    def _valid(self, mask: np.ndarray, blocks) -> jax.Array:
        num_blocks, block, _ = blocks.shape
        padded = np.zeros(num_blocks * block, bool)
        padded[: self.rows] = mask
        return jnp.asarray(padded.reshape(num_blocks, block))

    def _search(self, queries, k, labels, approx_recall: float | None = None):
        approx_recall = self.approx_recall if approx_recall is None else approx_recall
        blocks = self._blocks()
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        groups = [(None, np.arange(len(queries)))] if labels is None else [
            (label, np.flatnonzero(labels == label)) for label in np.unique(labels)]
        for label, members in groups:  # one mask per filter label, shared by its queries
            valid = self._valid(self.live_mask() if label is None else self.row_mask(label), blocks)
            for start in range(0, len(members), self.query_block):
                part = members[start: start + self.query_block]
                chunk = np.zeros((self.query_block if len(members) > self.query_block else len(part), self.dim),
                                 np.float32)  # a fixed chunk shape (one compile) once queries come in chunks
                chunk[: len(part)] = queries[part]
                top_scores, top_rows = blocked_top_k(jnp.asarray(chunk), blocks, valid, k=k, metric=self.metric,
                                                     approx_recall=approx_recall)
                scores[part], rows[part] = np.asarray(top_scores)[: len(part)], np.asarray(top_rows)[: len(part)]
        return scores, rows

    def _state(self):
        return {"vectors": self.vectors, "dtype": self.dtype, "block_rows": self.block_rows,
                "query_block": self.query_block, "approx_recall": self.approx_recall}

    def _restore(self, state):
        self.vectors = state["vectors"]
        self.dtype, self.block_rows, self.query_block = state["dtype"], state["block_rows"], state["query_block"]
        self.approx_recall, self._device_blocks = state["approx_recall"], None


def exact_search_reference(database: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip",
                           admitted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float64 NumPy brute force: (scores [q, k], rows [q, k]) for tests and ground truth of small sets. admitted:
    bool [q, n] or [n] (default: every row); -inf / -1 beyond the admitted rows."""
    database, queries = database.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        database = database / np.maximum(np.linalg.norm(database, axis=1, keepdims=True), 1e-300)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-300)
    scores = queries @ database.T
    if metric == "l2":
        scores = -(np.sum(queries**2, 1)[:, None] - 2 * scores + np.sum(database**2, 1)[None, :])
    if admitted is not None:
        scores = np.where(admitted, scores, -np.inf)
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, rows, axis=1)
    return top, np.where(np.isfinite(top), rows, -1)
