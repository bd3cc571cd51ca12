"""The split-K decode attention kernel (interpret mode) against the jnp reference: values, GQA / MQA,
ragged cache lengths, left padding, sliding windows over a wrapped cache, int8 caches, soft-capping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.decode_attention import decode_attention, decode_attention_reference, merge_splits
from llmjax.infer.kv_cache import quantize


def case(batch, heads, kv_heads, head_dim, capacity, *, seed=0, left_pad=False, wrapped=False, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, head_dim)), dtype)
    lengths = rng.integers(1, capacity + 1, batch)
    positions = np.full((batch, capacity), -1)
    for row, n in enumerate(lengths):
        if wrapped:  # a ring buffer that went round: slot s holds the latest position = s mod capacity
            total = n + capacity + 3
            for p in range(total):
                positions[row, p % capacity] = p
            lengths[row] = capacity
        elif left_pad:
            positions[row, capacity - n:] = np.arange(n)
            lengths[row] = capacity
        else:
            positions[row, :n] = np.arange(n)
    q_positions = positions.max(axis=1)
    return q, k, v, jnp.asarray(positions), jnp.asarray(q_positions), jnp.asarray(lengths)


@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,capacity,options", [
    (3, 6, 2, 8, 37, {}),                                   # GQA, awkward sizes
    (2, 4, 4, 16, 100, {"sliding_window": 7}),              # MHA, window
    (2, 8, 1, 32, 70, {"left_pad": True}),                  # MQA, left padding
    (2, 6, 3, 16, 24, {"wrapped": True, "sliding_window": 24}),  # a wrapped sliding-window cache
    (1, 4, 2, 16, 50, {"logit_softcap": 5.0}),
])
def test_kernel_matches_reference(batch, heads, kv_heads, head_dim, capacity, options):
    options = dict(options)
    layout = {k: options.pop(k) for k in ("left_pad", "wrapped") if k in options}
    q, k, v, positions, q_positions, lengths = case(batch, heads, kv_heads, head_dim, capacity, **layout)
    want = decode_attention_reference(q, k, v, positions, q_positions, **options)
    got = decode_attention(q, k, v, positions, q_positions, lengths, block_k=16, splits=3, interpret=True, **options)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_int8_cache_dequantizes_in_the_kernel():
    q, k, v, positions, q_positions, lengths = case(2, 8, 2, 16, 45, seed=3)
    kq, k_scale = quantize(k)
    vq, v_scale = quantize(v)
    want = decode_attention_reference(q, kq, vq, positions, q_positions, k_scale=k_scale, v_scale=v_scale)
    got = decode_attention(q, kq, vq, positions, q_positions, lengths, k_scale=k_scale, v_scale=v_scale,
                           block_k=16, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    exact = decode_attention_reference(q, k, v, positions, q_positions)
    assert np.abs(np.asarray(got) - np.asarray(exact)).max() < 0.05  # int8 error stays small


def test_reference_equals_dense_attention_of_the_visible_keys():
    """Independent check of the reference: per row, softmax over exactly the visible keys."""
    q, k, v, positions, q_positions, _ = case(2, 4, 2, 8, 20, seed=5)
    out = np.asarray(decode_attention_reference(q, k, v, positions, q_positions, sliding_window=6))
    for b in range(2):
        pos = np.asarray(positions[b])
        visible = (pos >= 0) & (pos <= int(q_positions[b])) & (int(q_positions[b]) - pos < 6)
        for h in range(4):
            kk, vv = np.asarray(k[b, visible, h // 2]), np.asarray(v[b, visible, h // 2])
            s = kk @ np.asarray(q[b, h]) / np.sqrt(8)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[b, h], (p / p.sum()) @ vv, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_kernel_on_gpu_at_real_size(kv_dtype):
    q, k, v, positions, q_positions, lengths = case(4, 32, 8, 64, 2048, seed=7, dtype=jnp.bfloat16)
    scales = {}
    if kv_dtype == "int8":
        k, ks = quantize(k)
        v, vs = quantize(v)
        scales = dict(k_scale=ks, v_scale=vs)
    want = decode_attention_reference(q, k, v, positions, q_positions, **scales).astype(jnp.float32)
    got = jax.jit(lambda *a: decode_attention(*a, **scales))(q, k, v, positions, q_positions, lengths)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)


# --- several queries per cache row (speculative decoding's verification) ----------------------------

def multi_query_case(batch, queries, heads, kv_heads, head_dim, capacity, *, seed=0, **layout):
    """A cache from `case` and `queries` new queries per row at its last positions, each with decode's view:
    its own position and cache length (the slot of its own token + 1; a wrapped ring: all of it).
    Returns (q [batch * n, heads, head_dim], k, v, kv_positions, q_positions [batch * n], kv_lengths [batch * n])."""
    _, k, v, positions, last, _ = case(batch, heads, kv_heads, head_dim, capacity, seed=seed, **layout)
    rng = np.random.default_rng(seed + 100)
    q = jnp.asarray(rng.standard_normal((batch * queries, heads, head_dim)), k.dtype)
    q_positions = (np.asarray(last)[:, None] - np.arange(queries)[::-1]).reshape(-1)  # the row's last n positions
    slot_of = [{int(p): s for s, p in enumerate(np.asarray(positions[row]))} for row in range(batch)]
    lengths = [capacity if layout.get("wrapped") else slot_of[r // queries][int(p)] + 1  # a ring that went round: all
               for r, p in enumerate(q_positions)]
    return q, k, v, positions, jnp.asarray(q_positions), jnp.asarray(lengths)


@pytest.mark.parametrize("batch,queries,heads,kv_heads,head_dim,capacity,options", [
    (2, 3, 6, 2, 8, 37, {}),
    (1, 5, 4, 4, 16, 40, {"sliding_window": 6}),
    (2, 2, 6, 3, 16, 24, {"wrapped": True, "sliding_window": 20, "logit_softcap": 5.0}),
])
def test_queries_per_row_match_the_reference(batch, queries, heads, kv_heads, head_dim, capacity, options):
    options = dict(options)
    layout = {k: options.pop(k) for k in ("left_pad", "wrapped") if k in options}
    q, k, v, positions, q_positions, lengths = multi_query_case(batch, queries, heads, kv_heads, head_dim, capacity,
                                                                **layout)
    want = decode_attention_reference(q, k, v, positions, q_positions, queries_per_row=queries, **options)
    got = decode_attention(q, k, v, positions, q_positions, lengths, block_k=16, queries_per_row=queries,
                           interpret=True, **options)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    # the reference itself: n queries per row = each query alone against its row
    rows = jnp.arange(batch * queries) // queries
    alone = decode_attention_reference(q, k[rows], v[rows], positions[rows], q_positions, **options)
    np.testing.assert_allclose(np.asarray(want), np.asarray(alone), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_queries_per_row_are_one_query_calls_bit_for_bit(kv_dtype):
    """Query i of a row = the one-query kernel call decode makes at that position (same splits: they follow the
    cache rows), bit for bit; and a cache with more, empty, splits changes no bit (the ordered merge)."""
    batch, n = 2, 3
    q, k, v, positions, q_positions, lengths = multi_query_case(batch, n, 8, 2, 16, 48, seed=11)
    scales = {}
    if kv_dtype == "int8":
        k, ks = quantize(k)
        v, vs = quantize(v)
        scales = dict(k_scale=ks, v_scale=vs)
    run = lambda *a, **o: np.asarray(decode_attention(*a, block_k=16, interpret=True, **scales, **o))  # noqa: E731
    together = run(q, k, v, positions, q_positions, lengths, queries_per_row=n)
    for i in range(n):
        one = run(q[i::n], k, v, positions, q_positions[i::n], lengths[i::n])
        np.testing.assert_array_equal(together[i::n], one)
    wider = {name: jnp.pad(x, [(0, 0), (0, 16)] + [(0, 0)] * (x.ndim - 2)) for name, x in
             dict(k=k, v=v, **scales).items()}  # one more block: capacity 64, 4 splits instead of 3
    wider_positions = jnp.pad(positions, ((0, 0), (0, 16)), constant_values=-1)
    more = np.asarray(decode_attention(q, wider["k"], wider["v"], wider_positions, q_positions, lengths, block_k=16,
                                       interpret=True, queries_per_row=n, **{name: wider[name] for name in scales}))
    np.testing.assert_array_equal(together, more)


def test_merge_splits_adds_in_order_whatever_the_batch():
    rng = np.random.default_rng(2)
    out = jnp.asarray(rng.standard_normal((3, 2, 5, 4, 8)), jnp.float32)
    row_max = jnp.asarray(rng.standard_normal((3, 2, 5, 4)), jnp.float32)
    row_sum = jnp.asarray(rng.uniform(0.5, 2.0, (3, 2, 5, 4)), jnp.float32)
    merged = np.asarray(merge_splits(out, row_max, row_sum))
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(merge_splits(out[b:b + 1], row_max[b:b + 1], row_sum[b:b + 1]))[0],
                                      merged[b])
    weight = np.exp(np.asarray(row_max) - np.asarray(row_max).max(2, keepdims=True))
    want = (np.asarray(out) * weight[..., None]).sum(2) / (np.asarray(row_sum) * weight).sum(2)[..., None]
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-6)


def test_queries_per_row_must_divide_the_queries():
    q, k, v, positions, q_positions, lengths = case(2, 4, 2, 8, 16)
    with pytest.raises(ValueError, match="queries_per_row"):
        decode_attention_reference(q, k, v, positions, q_positions, queries_per_row=2)
    with pytest.raises(ValueError, match="queries_per_row"):
        decode_attention(q, k, v, positions, q_positions, lengths, queries_per_row=3, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_queries_per_row_on_gpu_bit_for_bit(kv_dtype):
    """At the bench's size (llama-1b's heads, 448 slots, batch 1, 5 queries): each query = decode's one-query
    call bit for bit, also against a 384-slot cache (one split fewer; `generate`'s capacity for the same text)."""
    n = 5
    q, k, v, _, _, _ = multi_query_case(1, n, 32, 8, 64, 448, seed=13)
    q, k, v = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    slots = jnp.arange(448, dtype=jnp.int32)[None, :]
    positions = jnp.where(slots < 380, slots, -1)  # 380 tokens at slots 0..379; queries at positions 375..379
    q_positions = jnp.arange(375, 380, dtype=jnp.int32)
    lengths = q_positions + 1
    scales = {}
    if kv_dtype == "int8":
        k, ks = quantize(k)
        v, vs = quantize(v)
        scales = dict(k_scale=ks, v_scale=vs)
    attend = jax.jit(decode_attention, static_argnames=("queries_per_row",))
    together = np.asarray(attend(q, k, v, positions, q_positions, lengths, queries_per_row=n, **scales), np.float32)
    want = decode_attention_reference(q, k, v, positions, q_positions, queries_per_row=n, **scales)
    np.testing.assert_allclose(together, np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)
    short = {name: x[:, :384] for name, x in dict(k=k, v=v, **scales).items()}
    for i in range(n):
        one = np.asarray(attend(q[i:i + 1], k, v, positions, q_positions[i:i + 1], lengths[i:i + 1], **scales),
                         np.float32)
        np.testing.assert_array_equal(together[i:i + 1], one)
        shorter = attend(q[i:i + 1], short["k"], short["v"], positions[:, :384], q_positions[i:i + 1], lengths[i:i + 1],
                         **{name: short[name] for name in scales})
        np.testing.assert_array_equal(together[i:i + 1], np.asarray(shorter, np.float32))
