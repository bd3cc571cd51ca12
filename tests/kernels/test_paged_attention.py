"""The paged-attention decode kernel (interpret mode) against the gathering jnp reference: awkward sizes,
GQA / MQA / MHA, ragged lengths (an empty row, one token, a full table), shuffled block tables, a sliding
window, soft-capping; and the reference against dense attention over each row's tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.paged_attention import chunk_attention_flash, chunk_attention_reference, gather_blocks, paged_attention, \
    paged_attention_reference


def case(batch, heads, kv_heads, head_dim, block_size, max_blocks, *, seed=0, dtype=jnp.float32, lengths=None):
    """Random q and pools; each row owns distinct random blocks of a pool larger than needed."""
    rng = np.random.default_rng(seed)
    num_blocks = batch * max_blocks + 3
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
    k_pool = jnp.asarray(rng.standard_normal((num_blocks, block_size, kv_heads, head_dim)), dtype)
    v_pool = jnp.asarray(rng.standard_normal((num_blocks, block_size, kv_heads, head_dim)), dtype)
    tables = rng.permutation(num_blocks)[: batch * max_blocks].reshape(batch, max_blocks)
    if lengths is None:
        lengths = rng.integers(1, max_blocks * block_size + 1, batch)
    lengths = np.asarray(lengths)
    for row, n in enumerate(lengths):  # entries past the row's blocks are junk the kernel must not read
        tables[row, -(-n // block_size):] = rng.integers(0, num_blocks) if row % 2 else -1
    return q, k_pool, v_pool, jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,block_size,max_blocks,options", [
    (3, 6, 2, 8, 5, 7, {}),                                    # GQA, awkward sizes
    (3, 6, 2, 8, 5, 7, {"blocks_per_step": 1}),                # one block per step
    (4, 4, 4, 16, 4, 6, {"lengths": [0, 1, 24, 13]}),          # MHA, an empty row, one token, a full table
    (2, 8, 1, 12, 3, 9, {"sliding_window": 7}),                # MQA, window
    (2, 8, 1, 12, 3, 11, {"sliding_window": 4, "blocks_per_step": 3}),  # steps of 3 blocks straddle splits' ends
    (2, 6, 3, 16, 8, 5, {"logit_softcap": 5.0, "splits": 1}),  # one split
])
def test_kernel_matches_reference(batch, heads, kv_heads, head_dim, block_size, max_blocks, options):
    options = dict(options)
    lengths = options.pop("lengths", None)
    splits = options.pop("splits", 3)
    kernel_options = {"blocks_per_step": options.pop("blocks_per_step")} if "blocks_per_step" in options else {}
    q, k_pool, v_pool, tables, lengths = case(batch, heads, kv_heads, head_dim, block_size, max_blocks,
                                              lengths=lengths)
    want = paged_attention_reference(q, k_pool, v_pool, tables, lengths, **options)
    got = paged_attention(q, k_pool, v_pool, tables, lengths, splits=splits, interpret=True, **options,
                          **kernel_options)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_reference_equals_dense_attention_of_each_rows_tokens():
    q, k_pool, v_pool, tables, lengths = case(3, 4, 2, 8, 4, 5, seed=2, lengths=[1, 9, 20])
    out = np.asarray(paged_attention_reference(q, k_pool, v_pool, tables, lengths, sliding_window=6))
    for b, n in enumerate(np.asarray(lengths)):
        keys = np.concatenate([np.asarray(k_pool[blk]) for blk in np.asarray(tables[b])])[:n]
        values = np.concatenate([np.asarray(v_pool[blk]) for blk in np.asarray(tables[b])])[:n]
        keys, values = keys[max(0, n - 6):], values[max(0, n - 6):]
        for h in range(4):
            s = keys[:, h // 2] @ np.asarray(q[b, h]) / np.sqrt(8)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[b, h], (p / p.sum()) @ values[:, h // 2], atol=1e-5)


def test_chunk_reference_rows_equal_the_decode_reference():
    """Each query of a chunk sees what a decode step at its position sees."""
    q, k_pool, v_pool, tables, _ = case(2, 6, 2, 8, 4, 6, seed=4)
    rng = np.random.default_rng(4)
    chunk = 5
    qc = jnp.asarray(rng.standard_normal((2, chunk, 6, 8)), jnp.float32)
    start = np.array([3, 11])
    q_positions = jnp.asarray(start[:, None] + np.arange(chunk), jnp.int32)
    kv_lengths = jnp.asarray(start + chunk, jnp.int32)
    k, v = gather_blocks(k_pool, tables), gather_blocks(v_pool, tables)
    got = chunk_attention_reference(qc, k, v, q_positions, kv_lengths, sliding_window=6)
    for c in range(chunk):
        want = paged_attention_reference(qc[:, c], k_pool, v_pool, tables, q_positions[:, c] + 1, sliding_window=6)
        np.testing.assert_allclose(np.asarray(got[:, c]), np.asarray(want), atol=1e-5)


def chunk_case(context, chunk_lengths, chunk, heads=4, kv_heads=2, head_dim=16, block_size=4, max_blocks=6, seed=5,
               dtype=jnp.float32):
    """Random chunk queries at positions context + i and pools holding each row's context + chunk tokens."""
    batch = len(context)
    q_pool = case(batch, heads, kv_heads, head_dim, block_size, max_blocks, seed=seed, dtype=dtype,
                  lengths=np.asarray(context) + np.asarray(chunk_lengths))
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, chunk, heads, head_dim)), dtype)
    return (q, *q_pool[1:4], jnp.asarray(context, jnp.int32), jnp.asarray(chunk_lengths, jnp.int32))


def chunk_reference(q, k_pool, v_pool, tables, context, lengths, **options):
    positions = context[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)[None]
    k, v = gather_blocks(k_pool, tables), gather_blocks(v_pool, tables)
    return chunk_attention_reference(q, k, v, positions, context + lengths, **options)


@pytest.mark.parametrize("context,lengths,chunk,options", [
    ([0, 7, 16], [8, 3, 8], 8, {}),                        # a first chunk, a short one, a table filled up
    ([5, 0], [6, 0], 8, {"sliding_window": 5}),           # an empty row (no visible key: finite, unused)
    ([2, 11], [4, 9], 12, {"logit_softcap": 3.0}),        # the chunk longer than the stored context
])
def test_chunk_flash_matches_reference(context, lengths, chunk, options):
    """Flash chunk attention over the end-aligned gathered cache (interpret mode) equals the gathering
    reference for every real query; padded queries are finite."""
    q, k_pool, v_pool, tables, context, lengths = chunk_case(context, lengths, chunk)
    want = np.asarray(chunk_reference(q, k_pool, v_pool, tables, context, lengths, **options))
    got = np.asarray(chunk_attention_flash(q, k_pool, v_pool, tables, context, lengths, interpret=True, **options))
    assert np.isfinite(got).all()
    for b, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
def test_chunk_flash_on_gpu_at_real_size():
    q, k_pool, v_pool, tables, context, lengths = chunk_case([0, 192, 1500, 40], [512, 300, 512, 1], 512, heads=32,
                                                              kv_heads=8, head_dim=64, block_size=16, max_blocks=128,
                                                              seed=8, dtype=jnp.bfloat16)
    want = np.asarray(chunk_reference(q, k_pool, v_pool, tables, context, lengths), np.float32)
    got = np.asarray(chunk_attention_flash(q, k_pool, v_pool, tables, context, lengths), np.float32)
    for b, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size,options", [(16, {}), (16, {"blocks_per_step": 1}), (32, {"sliding_window": 300})])
def test_kernel_on_gpu_at_real_size(block_size, options):
    q, k_pool, v_pool, tables, lengths = case(8, 32, 8, 128, block_size, 2048 // block_size, seed=7,
                                              dtype=jnp.bfloat16)
    window = {"sliding_window": options["sliding_window"]} if "sliding_window" in options else {}
    want = paged_attention_reference(q, k_pool, v_pool, tables, lengths, **window).astype(jnp.float32)
    got = paged_attention(q, k_pool, v_pool, tables, lengths, **options)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)
