"""Our Pallas grouped matmul against jax.lax.ragged_dot and a per-group loop: values and gradients in
interpret mode on awkward sizes (empty groups, rows past the last group, K and N not tile multiples),
the padded layout, bad input; at real sizes on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.grouped_matmul import (
    TileConfig,
    group_layout,
    grouped_matmul,
    grouped_matmul_reference,
    num_row_tiles,
)


def operands(rows, k, n, group_sizes, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(group_sizes), k, n)) / np.sqrt(k), dtype)
    return lhs, rhs, jnp.asarray(group_sizes, jnp.int32)


def loop_reference(lhs, rhs, group_sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
    for g, size in enumerate(np.asarray(group_sizes)):
        out[start:start + size] = lhs[start:start + size] @ rhs[g]
        start += size
    return out


CASES = [
    # rows, k, n, group sizes
    (37, 24, 40, [10, 0, 17, 3, 5]),  # an empty group, 2 rows past the last group, K and N not multiples of 16
    (64, 32, 16, [16, 16, 16, 16]),  # groups that fill whole tiles
    (23, 48, 33, [0, 0, 23]),  # leading empty groups
    (5, 16, 16, [1, 1, 1, 1, 1, 0, 0]),  # more groups than tiles
]


@pytest.mark.parametrize("rows,k,n,group_sizes", CASES)
def test_values_and_gradients_match_ragged_dot(rows, k, n, group_sizes):
    lhs, rhs, sizes = operands(rows, k, n, group_sizes)
    got = grouped_matmul(lhs, rhs, sizes, interpret=True)
    np.testing.assert_allclose(got, loop_reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, grouped_matmul_reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)

    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((rows, n)), jnp.float32)

    def loss(fn):
        return lambda a, b: jnp.sum(fn(a, b) * cotangent)

    ours = jax.grad(loss(lambda a, b: grouped_matmul(a, b, sizes, interpret=True)), argnums=(0, 1))(lhs, rhs)
    reference = jax.grad(loss(lambda a, b: grouped_matmul_reference(a, b, sizes)), argnums=(0, 1))(lhs, rhs)
    for got_grad, want_grad in zip(ours, reference):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def test_larger_tiles_and_bfloat16():
    lhs, rhs, sizes = operands(150, 64, 96, [40, 0, 70, 25, 15], dtype=jnp.bfloat16)
    tiles = TileConfig(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=1, interpret=True)
    got = grouped_matmul(lhs, rhs, sizes, tiles=tiles)
    assert got.dtype == jnp.bfloat16
    want = loop_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_jit_with_traced_group_sizes():
    lhs, rhs, _ = operands(40, 16, 24, [0] * 4)
    fn = jax.jit(lambda a, b, s: grouped_matmul(a, b, s, interpret=True))
    for sizes in ([10, 10, 10, 10], [0, 40, 0, 0], [3, 7, 0, 25]):
        sizes = jnp.asarray(sizes, jnp.int32)
        np.testing.assert_allclose(fn(lhs, rhs, sizes), loop_reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)


def test_padded_layout_puts_each_group_on_whole_tiles():
    sizes = jnp.array([5, 0, 9, 1], jnp.int32)
    layout = group_layout(sizes, 17, block_m=4)  # 15 rows in groups, 2 past them
    assert layout.tile_group.shape == (num_row_tiles(17, 4, 4),)
    assert layout.tile_group.tolist()[:6] == [0, 0, 2, 2, 2, 3]
    assert set(layout.tile_group.tolist()[6:]) <= {-1}
    assert layout.group_tiles.tolist() == [2, 0, 3, 1]
    padded_to_row = np.asarray(layout.padded_to_row)
    assert padded_to_row[:8].tolist() == [0, 1, 2, 3, 4, 17, 17, 17]  # 17: padding (out of range)
    # every row in a group round-trips through the layout; rows past the groups map out of range
    row_to_padded = np.asarray(layout.row_to_padded)
    assert (padded_to_row[row_to_padded[:15]] == np.arange(15)).all()
    assert (row_to_padded[15:] >= len(padded_to_row)).all()


def test_bad_input_is_one_clear_error():
    lhs, rhs, sizes = operands(8, 16, 16, [4, 4])
    with pytest.raises(ValueError, match=r"lhs \[M, K\] and rhs \[G, K, N\]"):
        grouped_matmul(lhs, rhs[:, :8], sizes, interpret=True)
    with pytest.raises(ValueError, match=r"group_sizes must have shape \(2,\)"):
        grouped_matmul(lhs, rhs, sizes[:1], interpret=True)
    with pytest.raises(TypeError, match="same dtype"):
        grouped_matmul(lhs, rhs.astype(jnp.bfloat16), sizes, interpret=True)
    with pytest.raises(TypeError, match="int32"):
        grouped_matmul(lhs.astype(jnp.int32), rhs.astype(jnp.int32), sizes, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("group_sizes", [[4096] * 8, [9000, 0, 3000, 17, 8000, 1000, 5000, 6751]])
def test_gpu_matches_ragged_dot_at_moe_sizes(group_sizes):
    """A Mixtral-like expert projection: 32768 (token, choice) rows, d_model 1024 -> 2048, bfloat16."""
    lhs, rhs, sizes = operands(sum(group_sizes), 1024, 2048, group_sizes, dtype=jnp.bfloat16)
    got = jax.jit(grouped_matmul)(lhs, rhs, sizes)
    want = grouped_matmul_reference(lhs, rhs, sizes)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(got.shape), jnp.bfloat16)

    def grads(fn):
        return jax.jit(jax.grad(lambda a, b: jnp.sum((fn(a, b, sizes) * cotangent).astype(jnp.float32)), argnums=(0, 1)))

    for g, w in zip(grads(grouped_matmul)(lhs, rhs), grads(grouped_matmul_reference)(lhs, rhs)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.abs(g - w).max() <= 2e-2 * max(1.0, np.abs(w).max()), np.abs(g - w).max()
