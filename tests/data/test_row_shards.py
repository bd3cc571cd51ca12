"""Fixed-length row shards (llmjax.data.shards.write_rows): training reads whole rows, never across two."""

import numpy as np
import pytest

from llmjax.data.loader import ArrayTokens, BatchIterator, batch_at, packed_batch_at
from llmjax.data.shards import TokenShards, TokenShardsError, write_rows
from llmjax.tokenizer.bytes import ByteTokenizer

tokenizer = ByteTokenizer()


def distinct_rows(count=37, length=11):
    """Rows whose first token is their number: every row is told apart by it."""
    rows = np.random.default_rng(0).integers(1, 200, (count, length))
    rows[:, 0] = np.arange(count)
    return rows


def test_written_rows_are_read_whole(tmp_path):
    rows = distinct_rows()
    folder = write_rows(rows, tokenizer, tmp_path / "rows", shard_tokens=50)  # rows cross shard boundaries
    shards = TokenShards(folder, tokenizer)
    assert shards.row_length == 11 and shards.total_tokens == rows.size and shards.num_documents == len(rows)
    seen = set()
    for step in range(20):
        batch = batch_at(shards, step, batch_size=8, seq_len=10, seed=3)  # [8, 11]
        for row in batch:
            np.testing.assert_array_equal(row, rows[row[0]])  # a whole written row, from its first token
            seen.add(int(row[0]))
    assert len(seen) > len(rows) // 2  # uniform over the rows
    np.testing.assert_array_equal(batch_at(shards, 7, batch_size=8, seq_len=10, seed=3),
                                  batch_at(shards, 7, batch_size=8, seq_len=10, seed=3))
    packed = packed_batch_at(shards, 2, batch_size=4, seq_len=10, seed=3)
    assert np.all(packed.segment_ids == packed.segment_ids[:, :1]) and np.all(packed.positions == np.arange(11))
    with BatchIterator(shards, batch_size=4, seq_len=10, seed=1) as batches:
        first = next(batches)
    assert all(np.array_equal(row, rows[row[0]]) for row in first)


def test_rows_in_memory_and_a_free_stream_differ():
    rows = distinct_rows(count=9, length=5)
    whole = ArrayTokens(rows.reshape(-1).astype(np.int32), np.arange(0, rows.size, 5), row_length=5)
    starts = {int(b[0]) for step in range(30) for b in batch_at(whole, step, batch_size=4, seq_len=4, seed=0)}
    assert starts <= set(range(9))
    free = ArrayTokens(rows.reshape(-1).astype(np.int32))
    offsets = [b for step in range(30) for b in batch_at(free, step, batch_size=4, seq_len=4, seed=0)]
    assert any(not np.array_equal(b, rows[b[0]]) for b in offsets if b[0] < 9)  # a free stream crosses rows


def test_a_wrong_sequence_length_names_the_right_one(tmp_path):
    shards = TokenShards(write_rows(distinct_rows(), tokenizer, tmp_path / "rows"))
    with pytest.raises(TokenShardsError, match=r"whole training rows of 11 tokens: train with seq_len 10 \(--seq 10\)"):
        batch_at(shards, 0, batch_size=2, seq_len=16, seed=0)


@pytest.mark.parametrize("rows, message", [
    (np.zeros((0, 4), np.int64), "rows must be"),
    (np.zeros((3,), np.int64), "rows must be"),
    (np.full((2, 4), 300), "outside the tokenizer's vocabulary"),
    (np.full((2, 4), -1), "outside the tokenizer's vocabulary"),
])
def test_bad_rows_are_one_clear_error(tmp_path, rows, message):
    with pytest.raises(TokenShardsError, match=message):
        write_rows(rows, tokenizer, tmp_path / "rows")
    assert not (tmp_path / "rows").exists() and not list(tmp_path.glob(".rows.partial-*"))


def test_an_existing_folder_is_kept_unless_overwritten(tmp_path):
    write_rows(distinct_rows(), tokenizer, tmp_path / "rows")
    with pytest.raises(TokenShardsError, match="already exists"):
        write_rows(distinct_rows(count=3), tokenizer, tmp_path / "rows")
    assert TokenShards(tmp_path / "rows").num_documents == 37
    write_rows(distinct_rows(count=3), tokenizer, tmp_path / "rows", overwrite=True)
    assert TokenShards(tmp_path / "rows").num_documents == 3
