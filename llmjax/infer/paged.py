"""A paged KV cache (vLLM's PagedAttention): fixed-size blocks in one preallocated pool per layer.

    manager = BlockManager(num_blocks=256, block_size=16)           # host: allocator + block tables
    cache = init_paged_cache(cfg, num_blocks=256, block_size=16)    # device: the pools
    cached = manager.add_sequence("a", prompt)                      # prefix-cache hit: tokens already stored
    tables = manager.block_tables(["a"], max_blocks=32)             # [batch, max_blocks] int32
    logits, cache = prefill_paged_jit(dparams, chunk, cache, tables, [cached], [len(prompt) - cached], cfg)
    manager.commit("a", prompt[cached:])                            # the device wrote them
    copies = manager.reserve("a", 1)                                # a slot for the next token (maybe COW)
    cache = copy_blocks_jit(cache, pad_copies(copies, n))           # apply copy-on-write first
    logits, cache = decode_step_paged_jit(dparams, last_tokens, cache, tables, lengths, cfg)
    manager.commit("a", [token])

Two halves, kept apart:

- Host (Python, no arrays on the device): `BlockAllocator` owns block ids, reference counts, the free
  queue and the prefix cache (content hash -> block); `BlockManager` owns each sequence's block table and
  stored tokens: add a sequence (reusing cached full blocks of its prompt), reserve slots for the next
  tokens (allocating blocks, and copying a block shared with another sequence before writing into it:
  copy-on-write), commit written tokens (a block that fills up is hashed into the prefix cache), fork,
  free. Running out of blocks raises `PoolExhausted` and changes nothing (the engine preempts, then retries).
- Device (pure, jitted): the pools `{"layers": ({"k", "v"} [num_blocks, block_size, kv_heads, head_dim])}`,
  `write_kv` (a step's K/V into flat slots block * block_size + offset), `copy_blocks` (copy-on-write),
  `gather_kv` (a row's blocks laid out contiguously, for reference attention), and the model's paged
  prefill (`prefill_paged`, any chunk of a prompt after its cached prefix) and decode (`decode_step_paged`,
  the Pallas kernel kernels.paged_attention on GPUs).

A sequence's token at position p lives in block block_table[p // block_size], offset p % block_size; so a
row's cache is position-indexed (no ring: a sliding window is a mask, the blocks stay).

Prefix caching: a full block's hash chains its parent's hash and its own token ids (sha256), so equal hashes
mean equal prefixes, hence equal K/V. A block whose last user frees it keeps its hash and stays in the free
queue (least recently freed first out); a later prompt that starts with the same tokens takes it back
(refcount 0 -> 1) instead of recomputing it, until the allocator hands the block out for something else.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.infer.decode_model import _embed, _logits, resolve_decode_impl
from llmjax.kernels.paged_attention import (
    chunk_attention_flash,
    chunk_attention_reference,
    gather_blocks,
    paged_attention,
    paged_attention_reference,
)
from llmjax.kernels.platform import compute_platform
from llmjax.model.layers import norm
from llmjax.model.transformer import block as transformer_block

PAGED_DTYPES = ("bfloat16", "float32", "float16")
PREFILL_IMPLS = ("auto", "xla", "flash")


class PoolExhausted(RuntimeError):
    """The pool has too few free blocks for a request; nothing was changed (preempt a sequence, retry)."""


class PagedCacheError(ValueError):
    """A misuse of the paged cache (unknown sequence, duplicate id, bad sizes)."""


# --- host: the block allocator ---------------------------------------------------------------

def block_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: sha256 over the parent block's hash and this block's token ids."""
    digest = hashlib.sha256(parent or b"")
    digest.update(np.asarray(token_ids, np.int64).tobytes())
    return digest.digest()


class BlockAllocator:
    """Block ids 0 .. num_blocks - 1 with reference counts, a free queue, and the prefix cache.

    A block is in use while its refcount > 0. Free blocks wait in `free_queue` (least recently freed first);
    a free block that still holds a cached full block keeps its hash until `allocate` reuses it."""

    def __init__(self, num_blocks: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise PagedCacheError(f"a pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.refcounts = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.hash_of: dict[int, bytes] = {}  # block -> hash (only blocks registered in `cached`)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self) -> int:
        """A fresh block (refcount 1), evicting its cached contents if it had any."""
        if not self.free_queue:
            raise PoolExhausted(f"all {self.num_blocks} KV cache blocks are in use; free or preempt a sequence "
                                f"(or start with a larger pool: more num_blocks)")
        block, _ = self.free_queue.popitem(last=False)
        stale = self.hash_of.pop(block, None)
        if stale is not None:
            del self.cached[stale]
        self.refcounts[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more user of a block (a fork, or a prefix-cache hit taking a free cached block back)."""
        if self.refcounts[block] == 0:
            del self.free_queue[block]
        self.refcounts[block] += 1

    def free(self, block: int) -> None:
        """One user fewer; at zero the block joins the end of the free queue (its cached hash kept)."""
        if self.refcounts[block] <= 0:
            raise PagedCacheError(f"block {block} freed more often than it was allocated")
        self.refcounts[block] -= 1
        if self.refcounts[block] == 0:
            self.free_queue[block] = None

    def lookup(self, digest: bytes) -> int | None:
        return self.cached.get(digest) if self.prefix_caching else None

    def register(self, block: int, digest: bytes) -> None:
        """Offer a block that just filled up to the prefix cache (first block with a given content wins)."""
        if self.prefix_caching and digest not in self.cached and block not in self.hash_of:
            self.cached[digest] = block
            self.hash_of[block] = digest


# --- host: sequences and their block tables ---------------------------------------------------

@dataclass
class SequenceBlocks:
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V are written in the pool
    block_table: list[int] = field(default_factory=list)  # covers tokens and any reserved slots after them
    hashes: list[bytes] = field(default_factory=list)  # hashes of the full blocks so far


class BlockManager:
    """Block tables of the sequences sharing one pool; all bookkeeping, no device arrays."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if block_size < 1:
            raise PagedCacheError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, prefix_caching)
        self.sequences: dict[Hashable, SequenceBlocks] = {}
        self.prefix_hits = 0  # tokens served from the prefix cache, for metrics
        self.prefix_queries = 0  # prompt tokens looked up

    # queries
    def __contains__(self, seq_id) -> bool:
        return seq_id in self.sequences

    def _get(self, seq_id) -> SequenceBlocks:
        if seq_id not in self.sequences:
            raise PagedCacheError(f"unknown sequence {seq_id!r}")
        return self.sequences[seq_id]

    def length(self, seq_id) -> int:
        return len(self._get(seq_id).tokens)

    def block_table(self, seq_id) -> list[int]:
        return list(self._get(seq_id).block_table)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_tables(self, seq_ids: Sequence, max_blocks: int, pad: int = -1) -> np.ndarray:
        """[len(seq_ids), max_blocks] int32; a seq_id of None is an empty row. Unused entries are `pad`:
        never read (the lengths mask them), and a write that lands on a -1 entry (a slot nobody reserved)
        is dropped instead of landing in another sequence's block."""
        table = np.full((len(seq_ids), max_blocks), pad, np.int32)
        for row, seq_id in enumerate(seq_ids):
            if seq_id is None:
                continue
            blocks = self._get(seq_id).block_table
            if len(blocks) > max_blocks:
                raise PagedCacheError(f"sequence {seq_id!r} has {len(blocks)} blocks; max_blocks={max_blocks} "
                                      f"is too small for its table")
            table[row, : len(blocks)] = blocks
        return table

    # lifecycle
    def add_sequence(self, seq_id, prompt: Sequence[int]) -> int:
        """Start a sequence with its prompt: reuse the cached full blocks its prompt starts with and reserve
        slots for the rest. Returns the number of prompt tokens already stored (prefill starts there).

        At least the prompt's last token is always left to compute (its logits start the generation)."""
        if seq_id in self.sequences:
            raise PagedCacheError(f"sequence {seq_id!r} already exists")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise PagedCacheError(f"sequence {seq_id!r}: an empty prompt")
        seq = SequenceBlocks()
        parent = None
        for start in range(0, len(prompt) - 1 - self.block_size + 1, self.block_size):  # full blocks, last token left
            chunk = prompt[start: start + self.block_size]
            digest = block_hash(parent, chunk)
            block = self.allocator.lookup(digest)
            if block is None:
                break
            self.allocator.share(block)
            seq.block_table.append(block)
            seq.hashes.append(digest)
            seq.tokens.extend(chunk)
            parent = digest
        self.sequences[seq_id] = seq
        try:
            self.reserve(seq_id, len(prompt) - len(seq.tokens))
        except PoolExhausted:
            self.free(seq_id)
            raise
        self.prefix_queries += len(prompt)
        self.prefix_hits += len(seq.tokens)
        return len(seq.tokens)

    def reserve(self, seq_id, num_tokens: int) -> list[tuple[int, int]]:
        """Make slots for the sequence's next `num_tokens` tokens. Returns copy-on-write copies (src, dst)
        to apply on the device (`copy_blocks`) before writing: a block shared with another sequence is
        copied to a fresh one first. All or nothing: PoolExhausted leaves everything as it was."""
        seq = self._get(seq_id)
        if num_tokens <= 0:
            return []
        start, stop = len(seq.tokens), len(seq.tokens) + num_tokens
        touched = range(start // self.block_size, self.blocks_needed(stop))  # block indices written to
        shared = [i for i in touched if i < len(seq.block_table) and self.allocator.refcounts[seq.block_table[i]] > 1]
        new = max(0, self.blocks_needed(stop) - len(seq.block_table))
        if new + len(shared) > self.allocator.num_free:
            raise PoolExhausted(
                f"sequence {seq_id!r} needs {new + len(shared)} more KV cache blocks, {self.allocator.num_free} of "
                f"{self.allocator.num_blocks} are free; free or preempt a sequence (or give the pool more blocks)")
        copies = []
        for i in shared:
            src = seq.block_table[i]
            dst = self.allocator.allocate()
            self.allocator.free(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
        for _ in range(new):
            seq.block_table.append(self.allocator.allocate())
        return copies

    def commit(self, seq_id, token_ids: Sequence[int]) -> None:
        """Record tokens whose K/V the device just wrote (into slots made by `reserve`); blocks that fill
        up are hashed into the prefix cache."""
        seq = self._get(seq_id)
        token_ids = [int(t) for t in token_ids]
        if len(seq.tokens) + len(token_ids) > len(seq.block_table) * self.block_size:
            raise PagedCacheError(f"sequence {seq_id!r}: committing {len(token_ids)} tokens past its reserved slots; "
                                  f"call reserve first")
        seq.tokens.extend(token_ids)
        while (len(seq.hashes) + 1) * self.block_size <= len(seq.tokens):
            i = len(seq.hashes)
            digest = block_hash(seq.hashes[-1] if seq.hashes else None,
                                seq.tokens[i * self.block_size: (i + 1) * self.block_size])
            seq.hashes.append(digest)
            self.allocator.register(seq.block_table[i], digest)

    def fork(self, parent_id, child_id) -> None:
        """A child sharing every block of the parent (refcount + 1 each); the first write into a shared
        block copies it (see `reserve`)."""
        if child_id in self.sequences:
            raise PagedCacheError(f"sequence {child_id!r} already exists")
        parent = self._get(parent_id)
        for block in parent.block_table:
            self.allocator.share(block)
        self.sequences[child_id] = SequenceBlocks(list(parent.tokens), list(parent.block_table), list(parent.hashes))

    def free(self, seq_id) -> None:
        """Release the sequence's blocks (last block first, so a prompt's first blocks stay cached longest)."""
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            raise PagedCacheError(f"unknown sequence {seq_id!r}")
        for block in reversed(seq.block_table):
            self.allocator.free(block)

    # invariants and figures
    def check(self) -> None:
        """Assert the bookkeeping is consistent: refcounts = block-table references, free = refcount 0."""
        counts = [0] * self.allocator.num_blocks
        for seq in self.sequences.values():
            assert len(seq.block_table) >= self.blocks_needed(len(seq.tokens))
            assert len(seq.hashes) == len(seq.tokens) // self.block_size
            for block in seq.block_table:
                counts[block] += 1
        assert counts == self.allocator.refcounts, "refcounts differ from the block tables"
        assert set(self.allocator.free_queue) == {b for b, c in enumerate(counts) if c == 0}
        assert all(self.allocator.cached[h] == b for b, h in self.allocator.hash_of.items())

    def tokens_stored(self) -> int:
        """Slots of the pool holding a token (a block shared by several sequences counts once)."""
        filled: dict[int, int] = {}
        for seq in self.sequences.values():
            for i, block in enumerate(seq.block_table):
                fill = min(self.block_size, max(0, len(seq.tokens) - i * self.block_size))
                filled[block] = max(filled.get(block, 0), fill)
        return sum(filled.values())

    def utilization(self) -> float:
        """KV memory utilization: tokens stored / slots of the blocks in use (1.0 when nothing is in use).
        The waste is only each sequence's partly filled last block (and blocks reserved ahead)."""
        slots = self.allocator.num_used * self.block_size
        return self.tokens_stored() / slots if slots else 1.0


def contiguous_utilization(lengths: Sequence[int], capacity: int) -> float:
    """The same figure for a contiguous cache: every row reserves `capacity` slots up front."""
    return float(sum(lengths)) / (len(lengths) * capacity) if len(lengths) else 1.0


# --- device: the pools and pure functions on them ---------------------------------------------

def init_paged_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: str | None = None) -> dict:
    """Empty pools, one per layer: {"layers": ({"k", "v"} [num_blocks, block_size, kv_heads, head_dim])}."""
    dtype = dtype or cfg.compute_dtype
    if dtype not in PAGED_DTYPES:
        raise PagedCacheError(f"paged cache dtype {dtype!r}: expected one of {', '.join(PAGED_DTYPES)}")
    if num_blocks < 1 or block_size < 1:
        raise PagedCacheError(f"a paged cache needs num_blocks >= 1 and block_size >= 1, "
                              f"got {num_blocks}, {block_size}")
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return {"layers": tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                            for _ in range(cfg.num_layers))}


def paged_cache_bytes(cache: dict) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def token_slots(block_tables: jax.Array, positions: jax.Array, valid: jax.Array, block_size: int) -> jax.Array:
    """Flat pool slots (block * block_size + offset) of tokens at positions [batch, n]; -1 where not valid
    or where the block table has no block for the position (past its end, or a negative entry)."""
    block_index = positions // block_size
    block = jnp.take_along_axis(block_tables, jnp.clip(block_index, 0, block_tables.shape[1] - 1), axis=1)
    valid = valid & (block_index < block_tables.shape[1]) & (block >= 0)
    return jnp.where(valid, block * block_size + positions % block_size, -1)


def write_kv(cache: dict, layer_index: int, k: jax.Array, v: jax.Array, slots: jax.Array) -> dict:
    """Store k, v [tokens, kv_heads, head_dim] at flat slots [tokens] of a layer's pool (slot -1: skipped)."""
    layer = cache["layers"][layer_index]
    num_blocks, block_size = layer["k"].shape[:2]
    size = num_blocks * block_size
    target = jnp.where(slots >= 0, slots, size)  # out of bounds: dropped

    def put(pool, new):
        flat = pool.reshape(size, *pool.shape[2:])
        return flat.at[target].set(new.astype(pool.dtype), mode="drop").reshape(pool.shape)

    layers = list(cache["layers"])
    layers[layer_index] = {"k": put(layer["k"], k), "v": put(layer["v"], v)}
    return {**cache, "layers": tuple(layers)}


def copy_blocks(cache: dict, copies: jax.Array) -> dict:
    """Copy-on-write on the device: copies [n, 2] int32 rows (src, dst); rows with dst < 0 are padding."""
    src, dst = copies[:, 0], copies[:, 1]

    def copy(pool):
        target = jnp.where(dst >= 0, dst, pool.shape[0])
        return pool.at[target].set(jnp.take(pool, jnp.maximum(src, 0), axis=0), mode="drop")

    return {"layers": tuple({name: copy(pool) for name, pool in layer.items()} for layer in cache["layers"])}


def pad_copies(copies: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """Host helper: copy pairs as a [size, 2] int32 array padded with (-1, -1) (one compiled shape)."""
    if len(copies) > size:
        raise PagedCacheError(f"{len(copies)} block copies do not fit a copy batch of {size}")
    out = np.full((size, 2), -1, np.int32)
    if copies:
        out[: len(copies)] = np.asarray(copies, np.int32)
    return out


def gather_kv(cache: dict, layer_index: int, block_tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A layer's K/V of each row laid out contiguously [batch, max_blocks * block_size, kv_heads, head_dim]."""
    layer = cache["layers"][layer_index]
    return gather_blocks(layer["k"], block_tables), gather_blocks(layer["v"], block_tables)


# --- device: the model over a paged cache -------------------------------------------------------

def _paged_forward(dparams, tokens, cache, block_tables, context_lengths, chunk_lengths, cfg: ModelConfig,
                   attend):
    """tokens [batch, chunk] (row b: its tokens at positions context_lengths[b] + i, i < chunk_lengths[b];
    the rest padding) -> (float32 logits of each row's last chunk token [batch, padded_vocab], cache)."""
    batch, chunk = tokens.shape
    block_size = cache["layers"][0]["k"].shape[1]
    offsets = jnp.arange(chunk, dtype=jnp.int32)[None, :]
    positions = context_lengths[:, None] + offsets  # [batch, chunk]
    valid = offsets < chunk_lengths[:, None]
    slots = token_slots(block_tables, positions, valid, block_size).reshape(-1)
    kv_lengths = context_lengths + chunk_lengths  # tokens in each row's cache after the write
    positions = jnp.maximum(positions, 0)
    x = _embed(dparams, tokens, positions, cfg)
    for i, layer in enumerate(dparams["layers"]):

        def write_and_attend(q, k, v):  # the chunk's K/V into its slots, then its queries over the row's blocks
            new_cache = write_kv(cache, i, k.reshape(batch * chunk, *k.shape[2:]),
                                 v.reshape(batch * chunk, *v.shape[2:]), slots)
            return attend(q, new_cache["layers"][i], positions, kv_lengths), new_cache  # [batch, chunk, heads, hd]

        with jax.named_scope(f"layer {i}"):
            x, cache, _ = transformer_block(layer, x, positions, cfg, write_and_attend)
    last = jnp.maximum(chunk_lengths - 1, 0)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [batch, 1, d_model]
    x = norm(dparams["final_norm"], x, cfg)
    return _logits(dparams, x, cfg)[:, 0], cache


def resolve_prefill_impl(impl: str, cfg: ModelConfig) -> str:
    """"xla" (the gathering reference) or "flash" (kernels.paged_attention.chunk_attention_flash; "auto": flash
    on GPUs where the kernel takes the head size)."""
    if impl not in PREFILL_IMPLS:
        raise PagedCacheError(f"prefill attention impl {impl!r}: expected one of {', '.join(PREFILL_IMPLS)}")
    fits = cfg.head_dim % 16 == 0 and cfg.head_dim <= 256
    if impl == "flash" and not fits:
        raise PagedCacheError(f"prefill_impl='flash' needs head_dim a multiple of 16 up to 256, got {cfg.head_dim}; "
                              f"use 'xla'")
    if impl == "auto":
        return "flash" if fits and compute_platform() == "gpu" else "xla"
    return impl


def prefill_paged(dparams: dict, tokens: jax.Array, paged_cache: dict, block_tables: jax.Array,
                  context_lengths: jax.Array, chunk_lengths: jax.Array, cfg: ModelConfig, impl: str = "xla"):
    """A chunk of each row's prompt through the model into the paged cache.

    tokens [batch, chunk] right-padded; row b's tokens take positions context_lengths[b] .. + chunk_lengths[b]
    (context_lengths: tokens already stored, e.g. a prefix-cache hit or earlier chunks; a row with
    chunk_length 0 writes nothing). Attention: every chunk query against the row's blocks, gathered ("xla")
    or through the flash kernel ("flash", interpret mode off a GPU; see `resolve_prefill_impl`).
    Returns (logits of each row's last chunk token [batch, padded_vocab] float32, cache)."""
    context_lengths = jnp.asarray(context_lengths, jnp.int32)
    chunk_lengths = jnp.asarray(chunk_lengths, jnp.int32)
    impl = resolve_prefill_impl(impl, cfg)

    def attend(q, layer, positions, kv_lengths):
        if impl == "flash":
            return chunk_attention_flash(q, layer["k"], layer["v"], block_tables, context_lengths, chunk_lengths,
                                         sliding_window=cfg.sliding_window, logit_softcap=cfg.attn_logit_softcap,
                                         interpret=compute_platform(q) != "gpu")
        k, v = gather_blocks(layer["k"], block_tables), gather_blocks(layer["v"], block_tables)
        return chunk_attention_reference(q, k, v, positions, kv_lengths, sliding_window=cfg.sliding_window,
                                         logit_softcap=cfg.attn_logit_softcap)

    return _paged_forward(dparams, tokens, paged_cache, block_tables, context_lengths, chunk_lengths, cfg, attend)


def decode_step_paged(dparams: dict, last_tokens: jax.Array, paged_cache: dict, block_tables: jax.Array,
                      lengths: jax.Array, cfg: ModelConfig, impl: str = "auto"):
    """One token per row over the paged cache: last_tokens [batch] at positions lengths [batch] (the tokens
    each row has stored; its slot must be reserved in the block table). A row with length < 0 is an empty
    batch slot: it writes nothing. Returns (logits [batch, padded_vocab] float32, cache).

    dparams: `decode_model.prepare_params(params, cfg)`. impl: "pallas" (kernels.paged_attention; interpret
    mode off a GPU), "xla" (the gathering reference) or "auto" (pallas on GPUs)."""
    impl = resolve_decode_impl(impl, cfg)
    lengths = jnp.asarray(lengths, jnp.int32)
    active = lengths >= 0
    interpret = compute_platform(last_tokens) != "gpu"

    def attend(q, layer, positions, kv_lengths):
        kv_lengths = jnp.where(active, kv_lengths, 0)
        options = dict(sliding_window=cfg.sliding_window, logit_softcap=cfg.attn_logit_softcap)
        if impl == "pallas":
            out = paged_attention(q[:, 0], layer["k"], layer["v"], block_tables, kv_lengths, interpret=interpret,
                                  **options)
        else:
            out = paged_attention_reference(q[:, 0], layer["k"], layer["v"], block_tables, kv_lengths, **options)
        return out[:, None]

    return _paged_forward(dparams, last_tokens[:, None], paged_cache, block_tables, jnp.maximum(lengths, 0),
                          active.astype(jnp.int32), cfg, attend)


prefill_paged_jit = jax.jit(prefill_paged, static_argnames=("cfg", "impl"), donate_argnames=("paged_cache",))
decode_step_paged_jit = jax.jit(decode_step_paged, static_argnames=("cfg", "impl"), donate_argnames=("paged_cache",))
copy_blocks_jit = jax.jit(copy_blocks, donate_argnames=("cache",))
