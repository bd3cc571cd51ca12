"""Synthetic tasks for memory models: associative recall across segments (for the Recurrent Memory Transformer).

A sequence holds key-value pairs early, random filler after, and queries at its very end:

    k1 v1 k2 v2 ... kn vn  f f f f ... f f f  Q k_i v_i  Q k_j v_j
    |-- early segments: the pairs --|  ...   |-- the last segment: queries --|

The answers v_i are scored (the loss mask). With the pairs kept out of the last segment, a model that sees one segment
at a time can only answer through memory carried across segments; without it the answer is a guess among the values
(chance = 1 / num_values).

Vocabulary layout (RecallLayout): 0 is the QUERY marker, then the keys, the values and the filler tokens, each a
contiguous range; vocab_size is their total.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RecallLayout:
    """Token ranges: QUERY marker (id 0), num_keys keys, num_values values, num_filler filler tokens."""

    num_keys: int = 64
    num_values: int = 64
    num_filler: int = 32

    def __post_init__(self):
        for field in ("num_keys", "num_values", "num_filler"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RecallLayout.{field}={value!r}: must be an integer >= 1")

    @property
    def query(self) -> int:
        return 0

    @property
    def first_key(self) -> int:
        return 1

    @property
    def first_value(self) -> int:
        return self.first_key + self.num_keys

    @property
    def first_filler(self) -> int:
        return self.first_value + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.first_filler + self.num_filler

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of a guess among the values (what a model that never saw the pairs can do at best)."""
        return 1.0 / self.num_values


def check_recall_shape(num_pairs: int, seq_len: int, segment_len: int, layout: RecallLayout, num_queries: int = 1,
                       pair_region: int | None = None) -> int:
    """One clear error for sizes that cannot hold the task; returns the pair region (tokens from the start where the
    pairs may lie)."""
    for name, value in (("num_pairs", num_pairs), ("seq_len", seq_len), ("segment_len", segment_len),
                        ("num_queries", num_queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"associative recall: {name}={value!r} must be an integer >= 1")
    if seq_len % segment_len:
        raise ValueError(f"associative recall: seq_len={seq_len} is not a multiple of segment_len={segment_len}")
    if seq_len < 2 * segment_len:
        raise ValueError(f"associative recall: seq_len={seq_len} must span at least 2 segments of {segment_len} "
                         f"(pairs in earlier segments, queries in the last)")
    if num_pairs > layout.num_keys:
        raise ValueError(f"associative recall: num_pairs={num_pairs} exceeds RecallLayout.num_keys={layout.num_keys} "
                         f"(keys within a sequence are distinct)")
    if num_queries > num_pairs:
        raise ValueError(f"associative recall: num_queries={num_queries} exceeds num_pairs={num_pairs} "
                         f"(each query asks a different pair)")
    if 3 * num_queries > segment_len:
        raise ValueError(f"associative recall: num_queries={num_queries} take {3 * num_queries} tokens, more than "
                         f"the last segment's segment_len={segment_len}")
    region = 2 * num_pairs if pair_region is None else pair_region
    if not 2 * num_pairs <= region <= seq_len - segment_len:
        raise ValueError(f"associative recall: the pairs need 2 * num_pairs = {2 * num_pairs} tokens within "
                         f"pair_region={region}, which must end before the last segment (<= {seq_len - segment_len})")
    return region


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5), static_argnames=("num_queries", "pair_region"))
def _recall_batch(key, batch, num_pairs, seq_len, segment_len, layout, *, num_queries, pair_region):
    keys_key, values_key, slots_key, query_key, filler_key = jax.random.split(key, 5)
    rows = jnp.arange(batch)[:, None]  # [batch, 1]
    # distinct keys per sequence: the first num_pairs of a random permutation of all keys
    keys = jnp.argsort(jax.random.uniform(keys_key, (batch, layout.num_keys)), axis=1)[:, :num_pairs]
    keys = (keys + layout.first_key).astype(jnp.int32)  # [batch, num_pairs]
    values = jax.random.randint(values_key, (batch, num_pairs), 0, layout.num_values, jnp.int32) + layout.first_value
    tokens = jax.random.randint(filler_key, (batch, seq_len), 0, layout.num_filler, jnp.int32) + layout.first_filler
    slots = pair_region // 2  # two-token slots the pairs may take, in order of position
    if slots == num_pairs:
        chosen = jnp.broadcast_to(jnp.arange(num_pairs), (batch, num_pairs))
    else:
        chosen = jnp.sort(jnp.argsort(jax.random.uniform(slots_key, (batch, slots)), axis=1)[:, :num_pairs], axis=1)
    tokens = tokens.at[rows, 2 * chosen].set(keys).at[rows, 2 * chosen + 1].set(values)  # [batch, seq_len]
    asked = jnp.argsort(jax.random.uniform(query_key, (batch, num_pairs)), axis=1)[:, :num_queries]  # distinct pairs
    query_block = jnp.stack([jnp.full((batch, num_queries), layout.query, jnp.int32),
                             jnp.take_along_axis(keys, asked, axis=1),
                             jnp.take_along_axis(values, asked, axis=1)], axis=-1)  # [batch, num_queries, 3]
    start = seq_len - 3 * num_queries
    tokens = tokens.at[:, start:].set(query_block.reshape(batch, 3 * num_queries))
    answers = start + 2 + 3 * jnp.arange(num_queries)  # the value of each query
    loss_mask = jnp.zeros((batch, seq_len), bool).at[:, answers].set(True)
    return tokens, loss_mask


def associative_recall_batch(key: jax.Array, batch: int, num_pairs: int, seq_len: int, segment_len: int,
                             layout: RecallLayout = RecallLayout(), *, num_queries: int = 1,
                             pair_region: int | None = None) -> tuple[jax.Array, jax.Array]:
    """A batch of associative recall: (tokens [batch, seq_len] int32, loss_mask [batch, seq_len] bool).

    Each sequence: num_pairs pairs (distinct keys, random values) in random two-token slots among the first
    pair_region tokens (default 2 * num_pairs: packed at the start, in order), random filler elsewhere, and at the
    end num_queries queries `QUERY k v` about distinct pairs, all inside the last segment. loss_mask is True at the
    answer (value) tokens of the queries: score them with llmjax.model.rmt.next_token_loss / recall_accuracy.
    Deterministic in `key`.
    """
    region = check_recall_shape(num_pairs, seq_len, segment_len, layout, num_queries, pair_region)
    return _recall_batch(key, batch, num_pairs, seq_len, segment_len, layout, num_queries=num_queries,
                         pair_region=region)


def recall_accuracy_by_pair(predicted, tokens, loss_mask, layout: RecallLayout, num_pairs: int,
                           num_queries: int) -> np.ndarray:
    """Recall accuracy per pair, pairs in the order they stand in the sequence (which of them a memory keeps):
    predicted [batch, seq - 1] (the guess for tokens[:, 1:], e.g. argmax of the logits), tokens / loss_mask
    [batch, seq] as associative_recall_batch makes them. float64 [num_pairs], NaN for a pair never asked."""
    predicted, tokens, loss_mask = np.asarray(predicted), np.asarray(tokens), np.asarray(loss_mask)
    start = tokens.shape[1] - 3 * num_queries  # the query block
    is_key = (tokens[:, :start] >= layout.first_key) & (tokens[:, :start] < layout.first_value)
    hits, asked = np.zeros(num_pairs), np.zeros(num_pairs)
    for row, answer in zip(*np.nonzero(loss_mask)):
        pair_keys = tokens[row, :start][is_key[row]]  # [num_pairs] in sequence order
        pair = int(np.flatnonzero(pair_keys == tokens[row, answer - 1])[0])
        asked[pair] += 1
        hits[pair] += predicted[row, answer - 1] == tokens[row, answer]
    with np.errstate(invalid="ignore"):
        return hits / asked


def recall_accuracy_by_query(predicted, tokens, loss_mask, num_queries: int) -> np.ndarray:
    """Recall accuracy of the 1st, 2nd, ... query of the final block (arguments as recall_accuracy_by_pair): a
    model that stored the values but not which key each belongs to, and eliminates the values already answered
    (they are in its context), scores 1/n, 1/(n-1), ..., 1 with n pairs asked. float64 [num_queries]."""
    predicted, tokens, loss_mask = np.asarray(predicted), np.asarray(tokens), np.asarray(loss_mask)
    answers = tokens.shape[1] - 3 * num_queries + 2 + 3 * np.arange(num_queries)  # each query's value
    hits = (predicted[:, answers - 1] == tokens[:, answers]) & loss_mask[:, answers]  # [batch, num_queries]
    with np.errstate(invalid="ignore"):
        return hits.sum(0) / loss_mask[:, answers].sum(0)


def recall_accuracy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Fraction of masked tokens predicted exactly: argmax of logits [batch, seq, vocab] at position t - 1 equals
    tokens [batch, seq] at t, over the positions where loss_mask [batch, seq] is True. A float32 scalar."""
    if tuple(loss_mask.shape) != tuple(tokens.shape) or tuple(logits.shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"recall_accuracy: logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must share [batch, seq]")
    predicted = jnp.argmax(logits[:, :-1], axis=-1)  # [batch, seq - 1]: the guess for tokens[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    return ((predicted == tokens[:, 1:]) * weights).sum() / jnp.maximum(weights.sum(), 1.0)
