"""A contiguous key/value cache for decoding, as a pytree of arrays.

    cache = init_cache(cfg, batch=4, capacity=512)                 # bf16 (the compute dtype)
    cache = init_cache(cfg, batch=4, capacity=512, dtype="int8")   # int8 + per-token, per-head scales

Layout (one entry per layer, so each layer's buffer is updated in place):
    layers[i]["k"], ["v"]    [batch, capacity, num_kv_heads, head_dim]   GQA: stored at kv-head size
    layers[i]["k_scale"], ["v_scale"]  [batch, capacity, num_kv_heads] float32   (int8 caches only)
    positions                [batch, capacity] int32: the position of the token held in each slot, -1 if none
    next_slot                [batch] int32: where the next token is written (modulo capacity)
    next_position            [batch] int32: the position the next token gets

Slots and positions are separate so that one mask serves every case: a key is visible to a query at
position p iff 0 <= its position <= p and (sliding window w) p - its position < w. Left padding leaves
slots with position -1 at the start of a row; right padding leaves them at the end, and the next token
goes to the row's own next slot. A sliding-window model needs only `window` slots: the cache wraps
around (slot = index mod capacity) and overwrites exactly the key that just left the window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig

CACHE_DTYPES = ("bfloat16", "float32", "float16", "int8")
INT8_MAX = 127.0


class CacheError(ValueError):
    """A cache that cannot hold the requested generation."""


def cache_capacity(cfg: ModelConfig, total_length: int, multiple: int = 1) -> int:
    """Slots for `total_length` tokens (prompt + generated): all of them, or only the window, rounded up
    to `multiple` (the decode kernel reads whole blocks; a ring larger than the window is still exact)."""
    needed = total_length if cfg.sliding_window is None else min(total_length, cfg.sliding_window)
    return -(-needed // multiple) * multiple


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype: str | None = None) -> dict:
    """An empty cache. dtype: "bfloat16" / "float32" / "float16" or "int8" (default: the compute dtype)."""
    dtype = dtype or cfg.compute_dtype
    if dtype not in CACHE_DTYPES:
        raise CacheError(f"cache dtype {dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")
    if capacity < 1 or batch < 1:
        raise CacheError(f"a cache needs batch >= 1 and capacity >= 1, got batch={batch}, capacity={capacity}")
    shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)

    def layer():
        entry = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        if dtype == "int8":
            entry["k_scale"] = jnp.zeros(shape[:-1], jnp.float32)
            entry["v_scale"] = jnp.zeros(shape[:-1], jnp.float32)
        return entry

    return {
        "layers": tuple(layer() for _ in range(cfg.num_layers)),
        "positions": jnp.full((batch, capacity), -1, jnp.int32),
        "next_slot": jnp.zeros((batch,), jnp.int32),
        "next_position": jnp.zeros((batch,), jnp.int32),
    }


def is_quantized(cache: dict) -> bool:
    return "k_scale" in cache["layers"][0]


def cache_bytes(cache: dict) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


# --- int8 ----------------------------------------------------------------------------------

def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., head_dim] -> (int8 values, float32 scale [...]): symmetric, one scale per vector."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    values = jnp.clip(jnp.round(x32 / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return values, scale


def dequantize(values: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (values.astype(jnp.float32) * scale[..., None]).astype(dtype)


def _encode(layer: dict, name: str, x: jax.Array) -> dict:
    """{name: stored values (and name_scale)} for new entries x [..., head_dim] in the layer's format."""
    if f"{name}_scale" in layer:
        values, scale = quantize(x)
        return {name: values, f"{name}_scale": scale}
    return {name: x.astype(layer[name].dtype)}


def layer_kv(layer: dict, dtype) -> tuple[jax.Array, jax.Array]:
    """The layer's keys and values [batch, capacity, kv_heads, head_dim] in `dtype` (dequantized)."""
    if "k_scale" in layer:
        return dequantize(layer["k"], layer["k_scale"], dtype), dequantize(layer["v"], layer["v_scale"], dtype)
    return layer["k"].astype(dtype), layer["v"].astype(dtype)


# --- writing -------------------------------------------------------------------------------

def prompt_layout(valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """valid [batch, seq] (True on prompt tokens, False on padding, either side) ->
    (positions [batch, seq] with -1 on padding, next_slot [batch], next_position [batch])."""
    valid = valid.astype(bool)
    positions = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, -1).astype(jnp.int32)
    index = jnp.arange(valid.shape[1], dtype=jnp.int32)
    next_slot = jnp.max(jnp.where(valid, index + 1, 0), axis=1).astype(jnp.int32)
    next_position = valid.sum(axis=1).astype(jnp.int32)
    return positions, next_slot, next_position


def prefill_slots(next_slot: jax.Array, capacity: int) -> jax.Array:
    """For each row and cache slot, the prompt index it holds after a prefill (-1: none).

    Index i goes to slot i mod capacity; when the prompt is longer than the cache (a sliding window),
    a slot keeps the latest index up to the row's end (next_slot), so the window's keys survive."""
    slot = jnp.arange(capacity, dtype=jnp.int32)[None, :]  # [1, capacity]
    last = next_slot[:, None] - 1  # [batch, 1]: the row's last written index
    index = slot + capacity * jnp.maximum((last - slot) // capacity, 0)
    return jnp.where(slot <= last, index, -1)  # [batch, capacity]


def write_prefill(cache: dict, layer_index: int, k: jax.Array, v: jax.Array) -> dict:
    """Store a prompt's keys/values k, v [batch, seq, kv_heads, head_dim] into an empty cache's layer
    (the row's `next_slot` must already be set by `set_prefill_layout`)."""
    layer = cache["layers"][layer_index]
    capacity, seq = layer["k"].shape[1], k.shape[1]
    new = {**_encode(layer, "k", k), **_encode(layer, "v", v)}
    if seq <= capacity:  # the common case: a plain copy into the first seq slots
        updated = {name: jax.lax.dynamic_update_slice_in_dim(layer[name], value, 0, axis=1)
                   for name, value in new.items()}
    else:
        index = jnp.maximum(prefill_slots(cache["next_slot"], capacity), 0)  # [batch, capacity]
        updated = {name: jnp.take_along_axis(value, index.reshape(index.shape + (1,) * (value.ndim - 2)), axis=1)
                   for name, value in new.items()}
    return _replace_layer(cache, layer_index, {**layer, **updated})


def set_prefill_layout(cache: dict, valid: jax.Array) -> dict:
    """Record the positions of a prompt with padding mask valid [batch, seq] in an empty cache."""
    positions, next_slot, next_position = prompt_layout(valid)
    capacity, seq = cache["positions"].shape[1], valid.shape[1]
    if seq <= capacity:
        slot_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, 0, axis=1)
    else:
        index = prefill_slots(next_slot, capacity)
        slot_positions = jnp.where(index >= 0, jnp.take_along_axis(positions, jnp.maximum(index, 0), axis=1), -1)
    return {**cache, "positions": slot_positions, "next_slot": next_slot, "next_position": next_position}


def write_token(cache: dict, layer_index: int, k: jax.Array, v: jax.Array) -> dict:
    """Store one new token's k, v [batch, kv_heads, head_dim] at each row's next slot (mod capacity)."""
    layer = cache["layers"][layer_index]
    batch, capacity = layer["k"].shape[:2]
    slot = cache["next_slot"] % capacity
    rows = jnp.arange(batch)
    new = {**_encode(layer, "k", k), **_encode(layer, "v", v)}
    updated = {name: layer[name].at[rows, slot].set(value, mode="promise_in_bounds") for name, value in new.items()}
    return _replace_layer(cache, layer_index, {**layer, **updated})


def write_tokens(cache: dict, layer_index: int, k: jax.Array, v: jax.Array) -> dict:
    """Store n new tokens' k, v [batch, n, kv_heads, head_dim] at each row's next n slots (mod capacity)."""
    layer = cache["layers"][layer_index]
    batch, capacity = layer["k"].shape[:2]
    slots = (cache["next_slot"][:, None] + jnp.arange(k.shape[1])) % capacity  # [batch, n]
    rows = jnp.arange(batch)[:, None]
    new = {**_encode(layer, "k", k), **_encode(layer, "v", v)}
    updated = {name: layer[name].at[rows, slots].set(value, mode="promise_in_bounds") for name, value in new.items()}
    return _replace_layer(cache, layer_index, {**layer, **updated})


def advance(cache: dict, count: int = 1) -> dict:
    """After every layer wrote the `count` new tokens: record their positions and move past their slots."""
    batch, capacity = cache["positions"].shape
    offsets = jnp.arange(count, dtype=jnp.int32)
    slots = (cache["next_slot"][:, None] + offsets) % capacity  # [batch, count]
    positions = cache["positions"].at[jnp.arange(batch)[:, None], slots].set(
        cache["next_position"][:, None] + offsets, mode="promise_in_bounds")
    return {**cache, "positions": positions, "next_slot": cache["next_slot"] + count,
            "next_position": cache["next_position"] + count}


def rewind(cache: dict, count: jax.Array) -> dict:
    """Forget each row's last count [batch] tokens (speculative decoding drops rejected drafts): only the
    bookkeeping moves back and their slots' positions are cleared; their K/V stay, invisible, until overwritten.

    A ring (sliding-window cache) loses the keys the forgotten tokens overwrote: give it window + count slots."""
    capacity = cache["positions"].shape[1]
    count = jnp.asarray(count, jnp.int32)
    back = (cache["next_slot"][:, None] - 1 - jnp.arange(capacity)) % capacity  # [batch, capacity]: slots back from the last
    positions = jnp.where(back < count[:, None], -1, cache["positions"])
    return {**cache, "positions": positions, "next_slot": cache["next_slot"] - count,
            "next_position": cache["next_position"] - count}


def visible(kv_positions: jax.Array, q_positions: jax.Array, sliding_window: int | None) -> jax.Array:
    """[batch, capacity] mask: slots a query at q_positions [batch] may attend to."""
    q = q_positions[:, None]
    mask = (kv_positions >= 0) & (kv_positions <= q)
    if sliding_window is not None:
        mask &= q - kv_positions < sliding_window
    return mask


def reorder(cache: dict, rows: jax.Array) -> dict:
    """The cache with its rows gathered by rows [batch] (beam search picks its parents)."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)


def _replace_layer(cache: dict, layer_index: int, layer: dict) -> dict:
    layers = list(cache["layers"])
    layers[layer_index] = layer
    return {**cache, "layers": tuple(layers)}
