"""The paged cache's host bookkeeping and device helpers: refcounts, copy-on-write, prefix-cache hits
(chained hashes, kept after freeing, lost on eviction), freeing, pool exhaustion (all or nothing),
block-size edge cases, invariants under a random workload, the KV memory utilization figure, and the
pure device functions (slots, write, copy, gather)."""

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.infer.paged import BlockManager, PagedCacheError, PoolExhausted, contiguous_utilization, copy_blocks, \
    gather_kv, init_paged_cache, pad_copies, token_slots, write_kv


def started(manager, seq_id, prompt):
    """Add a sequence and commit its prompt as if the device had prefilled it."""
    hit = manager.add_sequence(seq_id, prompt)
    manager.commit(seq_id, prompt[hit:])
    return hit


def test_refcounts_fork_and_free_return_every_block():
    manager = BlockManager(num_blocks=8, block_size=4)
    started(manager, "a", list(range(10)))  # 3 blocks
    assert manager.allocator.num_used == 3
    manager.fork("a", "b")
    assert [manager.allocator.refcounts[b] for b in manager.block_table("a")] == [2, 2, 2]
    assert manager.block_table("b") == manager.block_table("a") and manager.length("b") == 10
    manager.check()
    manager.free("a")
    assert [manager.allocator.refcounts[b] for b in manager.block_table("b")] == [1, 1, 1]
    manager.free("b")
    manager.check()
    assert manager.allocator.num_free == 8 and manager.allocator.num_used == 0
    with pytest.raises(PagedCacheError, match="unknown sequence"):
        manager.free("b")


def test_copy_on_write_copies_the_shared_partial_block_once():
    manager = BlockManager(num_blocks=8, block_size=4)
    started(manager, "a", list(range(6)))  # blocks [x, y], y holds 2 tokens
    manager.fork("a", "b")
    shared = manager.block_table("a")
    assert manager.reserve("b", 0) == []  # nothing written, nothing copied
    copies = manager.reserve("b", 1)  # b writes position 6, inside the shared block y
    assert len(copies) == 1 and copies[0][0] == shared[1]
    assert manager.block_table("b") == [shared[0], copies[0][1]]
    assert manager.block_table("a") == shared  # the parent keeps its blocks
    assert manager.reserve("a", 1) == []  # y is a's alone now: written in place
    manager.commit("a", [100])
    manager.commit("b", [200])
    manager.check()


def test_fork_at_a_block_boundary_needs_no_copy():
    manager = BlockManager(num_blocks=8, block_size=4)
    started(manager, "a", list(range(8)))  # exactly two full blocks
    manager.fork("a", "b")
    assert manager.reserve("b", 1) == [] and manager.reserve("a", 1) == []
    assert manager.block_table("a")[:2] == manager.block_table("b")[:2]
    assert manager.block_table("a")[2] != manager.block_table("b")[2]
    manager.check()


def test_prefix_cache_hits_follow_the_chain_of_full_blocks():
    manager = BlockManager(num_blocks=16, block_size=4)
    prompt = [7, 1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert started(manager, "a", prompt) == 0
    assert started(manager, "same8", prompt[:8] + [50, 51]) == 8  # two full blocks reused
    assert manager.block_table("same8")[:2] == manager.block_table("a")[:2]
    assert manager.allocator.refcounts[manager.block_table("a")[0]] == 2
    assert started(manager, "same4", prompt[:4] + [60, 61, 62, 63, 64]) == 4
    assert started(manager, "other_start", [99, 1, 2, 3] + prompt[4:8] + [1]) == 0  # same 2nd block, other parent
    assert started(manager, "exactly8", prompt[:8]) == 4  # the last token is always computed
    assert started(manager, "one_token", prompt[:1]) == 0
    assert manager.prefix_hits == 16
    manager.check()


def test_prefix_cache_survives_freeing_until_the_block_is_reused():
    manager = BlockManager(num_blocks=4, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    started(manager, "a", prompt)
    blocks = manager.block_table("a")
    manager.free("a")
    assert manager.allocator.num_free == 4
    assert manager.add_sequence("b", prompt) == 4 and manager.block_table("b")[:2] == blocks[:2]
    manager.commit("b", prompt[4:])
    manager.free("b")
    # Fill the whole pool with other content: the cached blocks are handed out and forgotten.
    started(manager, "filler", [9, 9, 9, 9, 9, 9, 9, 9])
    manager.free("filler")
    assert manager.add_sequence("c", prompt) == 0
    manager.check()


def test_prefix_caching_off():
    manager = BlockManager(num_blocks=8, block_size=2, prefix_caching=False)
    started(manager, "a", [1, 2, 3, 4, 5])
    assert manager.add_sequence("b", [1, 2, 3, 4, 5]) == 0


def test_pool_exhaustion_is_all_or_nothing():
    manager = BlockManager(num_blocks=3, block_size=4)
    started(manager, "a", list(range(9)))  # all three blocks
    before = (manager.block_table("a"), list(manager.allocator.refcounts), manager.allocator.num_free)
    with pytest.raises(PoolExhausted, match="free or preempt"):
        manager.add_sequence("b", [5])
    assert "b" not in manager
    with pytest.raises(PoolExhausted, match="needs 1 more KV cache blocks, 0 of 3 are free"):
        manager.reserve("a", 4)  # position 9..12 fit in block 3? no: the third block has 3 free slots
    assert (manager.block_table("a"), list(manager.allocator.refcounts), manager.allocator.num_free) == before
    assert manager.reserve("a", 3) == []  # the slots left in the last block need nothing new
    manager.fork("a", "b")
    with pytest.raises(PoolExhausted):
        manager.reserve("b", 1)  # copy-on-write needs a free block too
    manager.check()
    manager.free("b")
    manager.free("a")
    assert manager.allocator.num_free == 3


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("prompt_length", [1, 4, 12])
def test_block_counts_at_the_edges(block_size, prompt_length):
    manager = BlockManager(num_blocks=32, block_size=block_size)
    started(manager, "a", list(range(prompt_length)))
    assert len(manager.block_table("a")) == -(-prompt_length // block_size)
    full = prompt_length % block_size == 0
    manager.reserve("a", 1)
    assert len(manager.block_table("a")) == -(-prompt_length // block_size) + full  # a new block only when full
    manager.commit("a", [0])
    assert len(manager.sequences["a"].hashes) == (prompt_length + 1) // block_size
    manager.check()
    manager.free("a")
    assert manager.allocator.num_free == 32


def test_misuse_gets_clear_errors():
    manager = BlockManager(num_blocks=4, block_size=2)
    started(manager, "a", [1, 2, 3])
    with pytest.raises(PagedCacheError, match="already exists"):
        manager.add_sequence("a", [1])
    with pytest.raises(PagedCacheError, match="empty prompt"):
        manager.add_sequence("z", [])
    with pytest.raises(PagedCacheError, match="call reserve first"):
        manager.commit("a", [4, 5])
    with pytest.raises(PagedCacheError, match="max_blocks=1"):
        manager.block_tables(["a"], max_blocks=1)


def test_invariants_hold_under_a_random_workload():
    rng = np.random.default_rng(0)
    manager = BlockManager(num_blocks=24, block_size=3)
    prefixes = [list(rng.integers(0, 5, 9)) for _ in range(3)]  # shared prompt starts make prefix hits
    live, next_id = [], 0
    for _ in range(600):
        op = rng.integers(0, 4)
        try:
            if op == 0 or not live:
                prompt = prefixes[rng.integers(0, 3)][: rng.integers(1, 10)] + list(rng.integers(0, 5, rng.integers(0, 4)))
                if prompt:
                    started(manager, next_id, prompt)
                    live.append(next_id)
                    next_id += 1
            elif op == 1:
                seq = live[rng.integers(0, len(live))]
                n = int(rng.integers(1, 5))
                manager.reserve(seq, n)
                manager.commit(seq, list(rng.integers(0, 5, n)))
            elif op == 2:
                manager.fork(live[rng.integers(0, len(live))], next_id)
                live.append(next_id)
                next_id += 1
            else:
                manager.free(live.pop(rng.integers(0, len(live))))
        except PoolExhausted:
            manager.free(live.pop(0))  # preempt the oldest
        manager.check()
        assert 0 < manager.utilization() <= 1
    assert manager.prefix_hits > 0
    for seq in live:
        manager.free(seq)
    manager.check()
    assert manager.allocator.num_free == 24


def test_utilization_counts_stored_tokens_over_slots_in_use():
    manager = BlockManager(num_blocks=16, block_size=4)
    assert manager.utilization() == 1.0
    started(manager, "a", list(range(10)))  # 3 blocks, 10 tokens
    started(manager, "b", list(range(100, 104)))  # 1 block, 4 tokens
    assert manager.tokens_stored() == 14 and manager.utilization() == pytest.approx(14 / 16)
    manager.fork("a", "c")  # shared blocks count once
    assert manager.utilization() == pytest.approx(14 / 16)
    manager.reserve("c", 1)  # copy-on-write: a third copy of 2 tokens in a new block
    manager.commit("c", [5])
    assert manager.tokens_stored() == 17 and manager.utilization() == pytest.approx(17 / 20)
    # The contiguous cache reserves the longest row's capacity for every row.
    assert contiguous_utilization([10, 4, 11], capacity=16) == pytest.approx(25 / 48)


def test_device_functions_write_copy_and_gather():
    cfg = get_config("llama-tiny")
    cache = init_paged_cache(cfg, num_blocks=5, block_size=3, dtype="float32")
    assert cache["layers"][0]["k"].shape == (5, 3, cfg.num_kv_heads, cfg.head_dim)
    tables = jnp.array([[4, 1, -1], [2, -1, -1]], jnp.int32)
    positions = jnp.array([[0, 1, 2, 3], [0, 1, 2, 3]], jnp.int32)
    valid = jnp.array([[True, True, True, True], [True, True, False, False]])
    slots = token_slots(tables, positions, valid, 3)
    assert slots.tolist() == [[12, 13, 14, 3], [6, 7, -1, -1]]
    # No block for the position (a -1 entry, or past the table): the write is dropped, not misplaced.
    assert token_slots(tables, jnp.array([[3, 9]]), jnp.array([[True, True]]), 3)[:1].tolist() == [[3, -1]]
    assert token_slots(tables[1:], jnp.array([[3]]), jnp.array([[True]]), 3).tolist() == [[-1]]
    kv_shape = (8, cfg.num_kv_heads, cfg.head_dim)
    k = jnp.arange(np.prod(kv_shape), dtype=jnp.float32).reshape(kv_shape) + 1
    cache = write_kv(cache, 1, k, -k, slots.reshape(-1))
    gathered_k, gathered_v = gather_kv(cache, 1, tables)
    np.testing.assert_array_equal(gathered_k[0, :4], k[:4])
    np.testing.assert_array_equal(gathered_v[1, :2], -k[4:6])
    assert float(jnp.abs(gathered_k[1, 2:]).sum()) == 0  # padding wrote nothing
    assert float(jnp.abs(cache["layers"][0]["k"]).sum()) == 0  # other layers untouched
    copied = copy_blocks(cache, jnp.asarray(pad_copies([(4, 3)], 3)))
    np.testing.assert_array_equal(copied["layers"][1]["k"][3], cache["layers"][1]["k"][4])
    np.testing.assert_array_equal(copied["layers"][1]["k"][:3], cache["layers"][1]["k"][:3])
