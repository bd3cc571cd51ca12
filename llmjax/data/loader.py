"""Deterministic, resumable batches from a token stream.

A batch is `batch_size` windows of `seq_len + 1` tokens (inputs = window[:, :-1], targets =
window[:, 1:]) at positions drawn from a counter-based PRNG (numpy's Philox) keyed by
(seed, step). A batch is therefore a pure function of (data, seed, step):
- any step is produced directly, with no replay of earlier steps;
- resuming at step N gives exactly the batches an uninterrupted run would have seen;
- with several processes the global batch is batch_size * process_count windows, and process p
  reads only its rows p * batch_size : (p + 1) * batch_size of it.

Packed mode adds, per token, the document it belongs to (`segment_ids`, distinct per document
within a row) and its position in that document within the window (`positions`, restarting at
every document), for `forward(..., positions=, segment_ids=)` so tokens never attend across a
document boundary.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from llmjax.data.shards import TokenShardsError

MAX_UINT64 = 2**64 - 1


class TokenSource(Protocol):
    """What the loader reads: `TokenShards`, or `ArrayTokens` for a stream already in memory."""

    @property
    def total_tokens(self) -> int: ...

    document_starts: np.ndarray  # int64 [num_documents], first one 0

    def tokens(self, start: int, stop: int) -> np.ndarray: ...


@runtime_checkable
class BatchSource(Protocol):
    """Data that makes whole training batches itself (packed chats, `llmjax.posttrain.chat_data.PackedChats`), where a
    token stream would be cut into windows: the batch dict of any step ({"inputs", "targets"} and any of
    "positions", "segment_ids", "loss_mask"; numpy, [batch_size, seq_len]), the same for the same arguments."""

    def batch(self, step: int, *, batch_size: int, seed: int) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class ArrayTokens:
    """A token stream in memory (tests, small experiments): tokens [n], document_starts [docs]."""

    array: np.ndarray
    document_starts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # one document
    row_length: int | None = None  # fixed-length rows read whole (llmjax.data.shards.write_rows), or a free stream

    @property
    def total_tokens(self) -> int:
        return len(self.array)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


class PackedBatch(NamedTuple):
    """Windows of packed documents; every array is [batch, seq_len + 1] int32.

    Feed tokens[:, :-1] with segment_ids[:, :-1] and positions[:, :-1]; targets are tokens[:, 1:].
    """

    tokens: np.ndarray
    segment_ids: np.ndarray  # 1, 2, ... per document within a row
    positions: np.ndarray  # 0, 1, ... restarting at each document (and at the window's start)


def window_starts(total_tokens: int, window: int, step: int, *, seed: int, rows: slice | range, global_rows: int) -> np.ndarray:
    """Start offsets [len(rows)] of the given rows of step's global batch, uniform over every
    window of `window` tokens that fits in the stream.

    Philox's raw output is a fixed function of its key (numpy keeps BitGenerator streams stable
    across versions, unlike Generator methods), and `raw % count` is reproducible integer math,
    so the same (seed, step) gives the same windows on every machine and numpy release.
    (Modulo bias is at most count / 2**64: nothing.)
    """
    count = total_tokens - window + 1  # possible start offsets
    bit_generator = np.random.Philox(key=np.array([seed, step], dtype=np.uint64))
    raw = bit_generator.random_raw(global_rows)  # uint64 [global_rows]
    return (raw[rows] % np.uint64(count)).astype(np.int64)


def check_request(source: TokenSource, step: int, *, batch_size: int, seq_len: int, seed: int,
                  process_index: int, process_count: int) -> None:
    """One clear error for each way a batch request cannot be met."""
    for name, value in (("step", step), ("seed", seed)):
        if not 0 <= value <= MAX_UINT64:
            raise ValueError(f"{name} must be an integer in [0, 2**64), got {value}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be at least 1, got batch_size={batch_size}, seq_len={seq_len}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index}")
    if seq_len + 1 > source.total_tokens:
        where = getattr(source, "directory", "the token stream")
        raise TokenShardsError(
            f"seq_len {seq_len:,} needs windows of {seq_len + 1:,} tokens, but {where} holds only "
            f"{source.total_tokens:,} tokens; use a shorter seq_len or a larger corpus"
        )


def process_window_starts(source: TokenSource, step: int, *, batch_size: int, seq_len: int, seed: int,
                          process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Start offsets [batch_size] of this process's rows of step's global batch."""
    check_request(source, step, batch_size=batch_size, seq_len=seq_len, seed=seed,
                  process_index=process_index, process_count=process_count)
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    row_length = getattr(source, "row_length", None)
    if row_length:  # whole rows only: a row index, uniform like a window's start, times the row length
        if seq_len + 1 != row_length:
            where = getattr(source, "directory", "the token stream")
            raise TokenShardsError(f"{where} holds whole training rows of {row_length} tokens: train with seq_len "
                                   f"{row_length - 1} (--seq {row_length - 1}), not {seq_len}")
        count = source.total_tokens // row_length
        return window_starts(count, 1, step, seed=seed, rows=rows, global_rows=batch_size * process_count) * row_length
    return window_starts(source.total_tokens, seq_len + 1, step, seed=seed, rows=rows, global_rows=batch_size * process_count)


def read_windows(source: TokenSource, starts: np.ndarray, window: int) -> np.ndarray:
    """Tokens [len(starts), window] int32 at the given offsets."""
    return np.stack([source.tokens(int(s), int(s) + window) for s in starts]).astype(np.int32)


def batch_at(source: TokenSource, step: int, *, batch_size: int, seq_len: int, seed: int,
             process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This process's rows of step's global batch: tokens [batch_size, seq_len + 1] int32."""
    starts = process_window_starts(source, step, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                   process_index=process_index, process_count=process_count)
    return read_windows(source, starts, seq_len + 1)  # [batch_size, seq_len + 1]


def packed_batch_at(source: TokenSource, step: int, *, batch_size: int, seq_len: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> PackedBatch:
    """`batch_at`'s windows (the same tokens) with their segment ids and positions."""
    starts = process_window_starts(source, step, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                   process_index=process_index, process_count=process_count)
    tokens = read_windows(source, starts, seq_len + 1)  # [batch_size, seq_len + 1]
    segment_ids, positions = packed_layout(np.asarray(source.document_starts), starts, seq_len + 1)
    return PackedBatch(tokens, segment_ids, positions)


def packed_layout(document_starts: np.ndarray, starts: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions), each [len(starts), window] int32, for windows at `starts` of a
    stream whose documents begin at `document_starts` (each document's end-of-text token is its
    last token, so it shares the document's segment)."""
    offsets = starts[:, None] + np.arange(window)  # [rows, window] stream offsets
    document = np.searchsorted(document_starts, offsets, side="right") - 1  # [rows, window]
    segment_ids = document - document[:, :1] + 1
    segment_start = np.maximum(document_starts[document], starts[:, None])  # a cut-off first document starts at the window
    return segment_ids.astype(np.int32), (offsets - segment_start).astype(np.int32)


class BatchIterator:
    """Batches for steps start_step, start_step + 1, ...; `state()` is all a checkpoint needs.

    Each batch is `batch_at(source, step, ...)` (or `packed_batch_at` with packed=True), so an
    iterator rebuilt with `from_state(source, iterator.state(), ...)` continues exactly where the
    saved one stood. prefetch > 0 prepares that many next batches in a background thread while
    the caller trains (reading a window is mostly page faults and memcpy, which leave the GIL free).
    """

    def __init__(self, source: TokenSource, *, batch_size: int, seq_len: int, seed: int = 0, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1, packed: bool = False, prefetch: int = 0):
        check_request(source, start_step, batch_size=batch_size, seq_len=seq_len, seed=seed,
                      process_index=process_index, process_count=process_count)
        self.source = source
        self.seed = seed
        self.step = start_step  # the step of the next batch returned
        self._make = packed_batch_at if packed else batch_at
        self._arguments = dict(batch_size=batch_size, seq_len=seq_len, seed=seed,
                               process_index=process_index, process_count=process_count)
        self.prefetch = prefetch
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") if prefetch > 0 else None
        self._pending: collections.deque[tuple[int, concurrent.futures.Future]] = collections.deque()

    def batch(self, step: int) -> np.ndarray | PackedBatch:
        """The batch of any step, without moving the iterator."""
        return self._make(self.source, step, **self._arguments)

    def __iter__(self) -> Iterator[np.ndarray | PackedBatch]:
        return self

    def __next__(self) -> np.ndarray | PackedBatch:
        if self._executor is None:
            result = self.batch(self.step)
        else:
            self._fill_prefetch()
            _, future = self._pending.popleft()
            result = future.result()
        self.step += 1
        return result

    def _fill_prefetch(self) -> None:
        """Keep futures for steps step .. step + prefetch in flight."""
        next_step = self._pending[-1][0] + 1 if self._pending else self.step
        while len(self._pending) < self.prefetch + 1:
            self._pending.append((next_step, self._executor.submit(self.batch, next_step)))
            next_step += 1

    def state(self) -> dict:
        """{"step": the next batch's step, "seed": seed}: save it with the model checkpoint."""
        return {"step": self.step, "seed": self.seed}

    @classmethod
    def from_state(cls, source: TokenSource, state: dict, **options) -> BatchIterator:
        """Resume: the iterator continues at state's step with state's seed (options: batch_size,
        seq_len... as the saved run used them)."""
        return cls(source, seed=int(state["seed"]), start_step=int(state["step"]), **options)

    def close(self) -> None:
        """Stop the prefetch thread (pending batches are dropped)."""
        if self._executor is not None:
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
