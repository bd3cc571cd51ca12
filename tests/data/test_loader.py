"""Batches: deterministic by (seed, step), resumable, sliced across processes, packed documents."""

import itertools

import jax
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.data.loader import ArrayTokens, BatchIterator, batch_at, packed_batch_at
from llmjax.data.shards import TokenShards, TokenShardsError, write_shards
from llmjax.model import forward, init_params
from llmjax.tokenizer.bytes import ByteTokenizer

tokenizer = ByteTokenizer()
DOCUMENTS = [f"doc {n}: " + "abcdefghij"[: n % 10] * (n % 5 + 1) for n in range(120)]
OPTIONS = dict(batch_size=4, seq_len=24, seed=7)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("loader") / "shards"
    write_shards(DOCUMENTS, tokenizer, directory, shard_tokens=100, progress=False)
    return TokenShards(directory, tokenizer)


def test_rows_are_windows_of_the_stream():
    stream = ArrayTokens(np.arange(10_000, dtype=np.int64))
    batch = batch_at(stream, 0, **OPTIONS)
    assert batch.shape == (4, 25) and batch.dtype == np.int32
    assert (np.diff(batch, axis=1) == 1).all()


def test_same_seed_and_step_same_batch_other_steps_differ(shards):
    first = batch_at(shards, 3, **OPTIONS)
    assert np.array_equal(first, batch_at(TokenShards(shards.directory), 3, **OPTIONS))
    assert not np.array_equal(first, batch_at(shards, 4, **OPTIONS))
    assert not np.array_equal(first, batch_at(shards, 3, **{**OPTIONS, "seed": 8}))


def test_windows_are_pinned():
    """Windows are integer math on Philox's fixed bit stream: the same on every machine and numpy
    release. A change here silently changes every run's data order, so it must be deliberate."""
    stream = ArrayTokens(np.arange(1_000_000, dtype=np.int64))
    assert batch_at(stream, 5, batch_size=3, seq_len=1, seed=0)[:, 0].tolist() == [512724, 735182, 132192]
    assert batch_at(stream, 123456789, batch_size=2, seq_len=9, seed=2**64 - 1)[:, 0].tolist() == [772517, 725423]


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_resume_from_state_gives_the_uninterrupted_batches(shards, prefetch, packed):
    with BatchIterator(shards, **OPTIONS, packed=packed, prefetch=prefetch) as iterator:
        uninterrupted = list(itertools.islice(iterator, 10))
    with BatchIterator(shards, **OPTIONS, packed=packed, prefetch=prefetch) as iterator:
        first_half = list(itertools.islice(iterator, 5))
        state = iterator.state()
    assert state == {"step": 5, "seed": 7}
    with BatchIterator.from_state(shards, state, batch_size=4, seq_len=24, packed=packed, prefetch=prefetch) as resumed:
        second_half = list(itertools.islice(resumed, 5))
    assert len(uninterrupted) == len(first_half + second_half) == 10
    for expected, got in zip(uninterrupted, first_half + second_half):
        assert all(np.array_equal(a, b) for a, b in zip(as_arrays(expected), as_arrays(got), strict=True))
    assert np.array_equal(as_arrays(uninterrupted[7])[0], batch_at(shards, 7, **OPTIONS))


def as_arrays(batch):
    return (batch,) if isinstance(batch, np.ndarray) else tuple(batch)


def test_processes_take_disjoint_slices_of_the_global_batch(shards):
    global_batch = batch_at(shards, 2, batch_size=8, seq_len=24, seed=7)
    slices = [batch_at(shards, 2, batch_size=4, seq_len=24, seed=7, process_index=p, process_count=2) for p in range(2)]
    assert np.array_equal(np.concatenate(slices), global_batch)
    packed = [packed_batch_at(shards, 2, batch_size=4, seq_len=24, seed=7, process_index=p, process_count=2) for p in range(2)]
    assert np.array_equal(np.concatenate([p.tokens for p in packed]), global_batch)


def test_packed_segments_and_positions(shards):
    eot = tokenizer.eot_id
    for step in range(20):
        packed = packed_batch_at(shards, step, **OPTIONS)
        assert np.array_equal(packed.tokens, batch_at(shards, step, **OPTIONS))
        for tokens, segments, positions in zip(*packed, strict=True):
            assert segments[0] == 1 and positions[0] == 0
            new_segment = np.diff(segments) != 0
            assert set(np.diff(segments)) <= {0, 1}  # each document its own id, in order
            assert np.array_equal(new_segment, tokens[:-1] == eot)  # a new document starts right after each EOT
            assert np.array_equal(positions[1:], np.where(new_segment, 0, positions[:-1] + 1))  # restart at 0


def test_packed_documents_do_not_see_each_other(shards):
    """In gpt2-tiny, each document's logits in a packed row equal its logits alone (padded after it:
    causal attention never looks ahead)."""
    cfg = get_config("gpt2-tiny", vocab_size=tokenizer.vocab_size)
    params = init_params(cfg, jax.random.key(0))
    inputs, segments, positions = (a[0, :-1] for a in packed_batch_at(shards, 0, batch_size=1, seq_len=48, seed=1))
    documents = [np.flatnonzero(segments == s) for s in np.unique(segments)]
    assert len(documents) >= 3
    # Row 0: the packed row. Rows 1..: each document alone from position 0, zeros after it.
    tokens = np.zeros((1 + len(documents), len(inputs)), np.int32)  # [1 + documents, 48]
    tokens[0] = inputs
    for row, where in enumerate(documents, start=1):
        tokens[row, : len(where)] = inputs[where]
    all_positions = np.tile(np.arange(len(inputs), dtype=np.int32), (len(tokens), 1))
    all_positions[0] = positions
    all_segments = np.ones_like(tokens)
    all_segments[0] = segments
    run = jax.jit(forward, static_argnums=2)
    logits = run(params, tokens, cfg, positions=all_positions, segment_ids=all_segments)  # [1 + documents, 48, vocab]
    for row, where in enumerate(documents, start=1):
        np.testing.assert_allclose(logits[0, where], logits[row, : len(where)], atol=1e-4, rtol=1e-4)


def test_window_longer_than_the_data(shards):
    with pytest.raises(TokenShardsError, match=rf"seq_len 5,000 needs windows of 5,001 tokens, but .*shards holds only "
                                               rf"{shards.total_tokens:,} tokens"):
        batch_at(shards, 0, batch_size=1, seq_len=5_000, seed=0)
    with pytest.raises(TokenShardsError, match="holds only"):
        BatchIterator(shards, batch_size=1, seq_len=shards.total_tokens, seed=0)
    assert batch_at(shards, 0, batch_size=2, seq_len=shards.total_tokens - 1, seed=0).shape == (2, shards.total_tokens)


def test_bad_requests(shards):
    with pytest.raises(ValueError, match="process_index must be in"):
        batch_at(shards, 0, **OPTIONS, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed must be an integer"):
        batch_at(shards, 0, batch_size=1, seq_len=4, seed=-1)
    with pytest.raises(ValueError, match="at least 1"):
        batch_at(shards, 0, batch_size=0, seq_len=4, seed=0)
