"""FlexGen-style offloaded generation: a model larger than the device's memory budget, layer by layer.

    choice = choose_placement(cfg, batch=32, prompt_len=512, gen_len=32, budget_bytes=8 << 30,
                              bandwidths=measure_bandwidths(), flops=400e12)
    model = place_model(params, cfg, choice.placement, disk_dir="offload/")
    out = offloaded_generate(model, prompts, max_new_tokens=32)          # greedy; out.tokens, out.logits

Placement, per layer: its weights on the "device", in pinned host memory ("host": a JAX memory kind, moved with
`device_put`) or on "disk" (one memory-mapped safetensors file per layer, written atomically); its KV cache on the
device or the host; optionally the host / disk weights as int8 (llmjax.quant, dequantized on the device after the
copy, half the bytes of bf16). The embeddings, final norm and output head always stay on the device.

The schedule ("zig-zag", FlexGen's column order): for each layer, its weights are fetched once (the NEXT layer's
copy is issued before the current layer computes: JAX dispatch is asynchronous, so the copy overlaps the compute),
every micro-batch of the batch runs through it (the one Transformer block, llmjax.model.transformer.block, on that
micro-batch's hidden states and its slice of the cache, the next micro-batch's cache slice moving meanwhile), then
the layer is evicted; prefill, then decode steps. `schedule="layer_by_layer"` is the accelerate-style baseline:
load a layer, wait, compute, wait, evict, with no overlap and one micro-batch.

`choose_placement` is FlexGen's search reduced to a few candidate policies: how many layers' weights stay on the
device, how many layers' caches, the micro-batch count and int8 host weights; it predicts time per layer as
max(compute, transfer) (they overlap) and picks the fastest policy that fits the budget.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.infer import kv_cache
from llmjax.infer.decode_model import _embed, _logits, decode_layer, prefill_layer, prepare_params
from llmjax.infer.generate import check_prompts, pad_prompts
from llmjax.model.attention import causal_self_attention
from llmjax.model.layers import norm
from llmjax.model.params import count_from_specs
from llmjax.model.transformer import block_spec, moe_block_spec

DEVICE, HOST, DISK = "device", "host", "disk"
WEIGHT_PLACES = (DEVICE, HOST, DISK)
CACHE_PLACES = (DEVICE, HOST)
SCHEDULES = ("zigzag", "layer_by_layer")
GIB = 1 << 30


class OffloadError(ValueError):
    """A placement, budget or disk folder that cannot serve the generation asked for."""


# --- placement ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where each layer's weights and KV cache live, and how many micro-batches the batch is cut into."""

    weights: tuple[str, ...]  # per layer: "device" | "host" | "disk"
    cache: tuple[str, ...]    # per layer: "device" | "host"
    micro_batches: int = 1
    host_int8: bool = False   # host / disk weights stored as int8 (dequantized on the device)

    def __post_init__(self):
        if len(self.weights) != len(self.cache):
            raise OffloadError(f"placement: {len(self.weights)} weight places for {len(self.cache)} cache places")
        for where in self.weights:
            if where not in WEIGHT_PLACES:
                raise OffloadError(f"placement weights {where!r}: expected one of {', '.join(WEIGHT_PLACES)}")
        for where in self.cache:
            if where not in CACHE_PLACES:
                raise OffloadError(f"placement cache {where!r}: expected one of {', '.join(CACHE_PLACES)}")
        if self.micro_batches < 1:
            raise OffloadError(f"micro_batches={self.micro_batches}: must be >= 1")

    @classmethod
    def uniform(cls, num_layers: int, weights: str = DEVICE, cache: str = DEVICE, micro_batches: int = 1,
                host_int8: bool = False) -> Placement:
        return cls((weights,) * num_layers, (cache,) * num_layers, micro_batches, host_int8)

    def describe(self) -> str:
        counts = lambda places, names: ", ".join(f"{places.count(n)} {n}" for n in names if n in places)  # noqa: E731
        int8 = " (int8)" if self.host_int8 and any(w != DEVICE for w in self.weights) else ""
        return (f"weights: {counts(self.weights, WEIGHT_PLACES)}{int8}; cache: {counts(self.cache, CACHE_PLACES)}; "
                f"{self.micro_batches} micro-batch(es)")


def host_memory_kind(device=None) -> str | None:
    """"pinned_host" where the device offers it (GPUs, recent CPU backends), else None (host == device)."""
    device = device or jax.devices()[0]
    kinds = {memory.kind for memory in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


def place_on(tree, where: str, device=None):
    """The pytree's arrays copied to the device's default memory ("device") or its pinned host memory ("host")."""
    device = device or jax.devices()[0]
    kind = host_memory_kind(device) if where == HOST else None
    sharding = jax.sharding.SingleDeviceSharding(device, memory_kind=kind or device.default_memory().kind)
    return jax.device_put(tree, sharding)


# --- disk: one safetensors file per layer, memory-mapped ------------------------------------------

def write_layer_file(path: str | os.PathLike, arrays: Sequence[np.ndarray]) -> Path:
    """Write arrays as a safetensors file atomically (a temporary file beside it, renamed into place): a failed
    write leaves no half file. Dtypes numpy's safetensors lacks (bfloat16) are stored as raw bits, named in metadata."""
    import safetensors.numpy

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    except OSError as error:
        raise OffloadError(f"--disk {path.parent}: cannot write there ({error.strerror}); give a writable folder")
    os.close(handle)
    try:
        tensors, dtypes = {}, []
        for index, array in enumerate(arrays):
            array = np.ascontiguousarray(array)
            dtypes.append(array.dtype.name)
            raw = array.view(np.uint16) if array.dtype.name == "bfloat16" else array
            tensors[f"{index:05d}"] = raw
        safetensors.numpy.save_file(tensors, temporary, metadata={"dtypes": json.dumps(dtypes)})
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OffloadError(f"--disk {path.parent}: writing {path.name} failed ({error.strerror}); free space or "
                               f"give another folder") from error
        raise
    return path


def read_layer_file(path: str | os.PathLike) -> list[np.ndarray]:
    """The arrays of a `write_layer_file` file, memory-mapped (read from disk only when copied)."""
    import ml_dtypes

    path = Path(path)
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    dtypes = json.loads(header.pop("__metadata__")["dtypes"])
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    arrays = []
    for index, dtype_name in enumerate(dtypes):
        entry = header[f"{index:05d}"]
        begin, end = entry["data_offsets"]
        dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
        arrays.append(data[begin:end].view(dtype).reshape(entry["shape"]))
    return arrays


@dataclass(frozen=True)
class DiskLayer:
    """A layer's weights in a file: the path and the tree structure its flat arrays rebuild."""

    path: Path
    treedef: object


# --- int8 host weights --------------------------------------------------------------------------

def quantize_layer(layer: dict) -> dict:
    """The layer's 2-D kernels as int8 QuantizedMatrix (llmjax.quant), everything else as is."""
    from llmjax.quant.formats import quantize

    def convert(path, x):
        name = getattr(path[-1], "key", None)
        return quantize(x, "int8") if name == "kernel" and x.ndim == 2 else x

    return jax.tree_util.tree_map_with_path(convert, layer)


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize_layer(layer, dtype):
    from llmjax.quant.model import materialize

    return materialize(layer, dtype)


# --- the placed model ---------------------------------------------------------------------------

@dataclass
class OffloadedModel:
    """The weights as placed: `head` (embeddings, final norm, output head) on the device; `layers[i]` a device
    tree, a host tree, or a DiskLayer."""

    cfg: ModelConfig
    placement: Placement
    head: dict
    layers: list
    device: object = None
    disk_dir: Path | None = None


def place_model(params: dict, cfg: ModelConfig, placement: Placement, *, device=None,
                disk_dir: str | os.PathLike | None = None, prepared: dict | None = None) -> OffloadedModel:
    """Cast / fuse the weights for decoding (decode_model.prepare_params) and put each layer where `placement` says.
    disk_dir: the folder for "disk" layers (one file each)."""
    if len(placement.weights) != cfg.num_layers:
        raise OffloadError(f"placement has {len(placement.weights)} layers; the model has {cfg.num_layers}")
    if DISK in placement.weights and disk_dir is None:
        raise OffloadError("the placement puts weights on disk: give a folder with --disk DIR")
    device = device or jax.devices()[0]
    dparams = prepared if prepared is not None else prepare_params(params, cfg)
    head = place_on({k: v for k, v in dparams.items() if k != "layers"}, DEVICE, device)
    layers = []
    for index, (layer, where) in enumerate(zip(dparams["layers"], placement.weights)):
        if where != DEVICE and placement.host_int8:
            layer = quantize_layer(layer)
        if where == DISK:
            leaves, treedef = jax.tree.flatten(layer)
            path = write_layer_file(Path(disk_dir) / f"layer_{index:04d}.safetensors", [np.asarray(x) for x in leaves])
            layers.append(DiskLayer(path, treedef))
        else:
            layers.append(place_on(layer, where, device))
    return OffloadedModel(cfg, placement, head, layers, device, Path(disk_dir) if disk_dir else None)


def fetch_layer(model: OffloadedModel, index: int):
    """Layer `index`'s weights on the device, in the compute dtype (asynchronous: returns once the copy is issued)."""
    stored = model.layers[index]
    where = model.placement.weights[index]
    if where == DEVICE:
        return stored
    if isinstance(stored, DiskLayer):
        stored = jax.tree.unflatten(stored.treedef, read_layer_file(stored.path))
    layer = place_on(stored, DEVICE, model.device)
    if model.placement.host_int8:
        layer = _dequantize_layer(layer, jnp.dtype(model.cfg.compute_dtype))
    return layer


# --- one layer on one micro-batch: the model's block with the cache's attend ---------------------

@functools.partial(jax.jit, static_argnames="cfg")
def _prefill_layer(layer: dict, x: jax.Array, valid: jax.Array, layer_cache: dict, book: dict, cfg: ModelConfig):
    """x [rows, seq, d_model] through one block, its keys / values written into layer_cache (as
    decode_model.prefill); valid [rows, seq] marks the prompt tokens."""
    positions, _, _ = kv_cache.prompt_layout(valid)
    self_attend = causal_self_attention(cfg, valid.astype(jnp.int32))
    x, cache = prefill_layer(layer, x, jnp.maximum(positions, 0), self_attend, {"layers": (layer_cache,), **book}, 0,
                             cfg)
    return x, cache["layers"][0]


@functools.partial(jax.jit, static_argnames="cfg")
def _decode_layer(layer: dict, x: jax.Array, layer_cache: dict, book: dict, cfg: ModelConfig):
    """x [rows, 1, d_model] (one token per row) through one block, reading and extending its cache (as
    decode_model.decode_step with the jnp attention reference)."""
    batch = x.shape[0]
    slot = book["next_slot"] % book["positions"].shape[1]
    kv_positions = book["positions"].at[jnp.arange(batch), slot].set(book["next_position"])
    x, cache = decode_layer(layer, x, {"layers": (layer_cache,), **book}, 0, cfg, kv_positions=kv_positions,
                            kv_lengths=jnp.minimum(book["next_slot"] + 1, book["positions"].shape[1]), impl="xla")
    return x, cache["layers"][0]


@functools.partial(jax.jit, static_argnames="cfg")
def _embed_prompt(head: dict, tokens: jax.Array, valid: jax.Array, cfg: ModelConfig):
    positions, _, _ = kv_cache.prompt_layout(valid)
    return _embed(head, tokens, positions, cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _embed_token(head: dict, tokens: jax.Array, book: dict, cfg: ModelConfig):
    return _embed(head, tokens[:, None], book["next_position"][:, None], cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _last_logits(head: dict, x: jax.Array, book: dict, cfg: ModelConfig):
    """Logits [rows, padded_vocab] of each row's last token (the prompt's last one after a prefill)."""
    if x.shape[1] > 1:
        x = jnp.take_along_axis(x, (book["next_slot"] - 1)[:, None, None], axis=1)
    return _logits(head, norm(head["final_norm"], x, cfg), cfg)[:, 0]


# --- the schedule --------------------------------------------------------------------------------

@dataclass
class OffloadOutput:
    tokens: list[list[int]]           # the generated ids per prompt (greedy)
    logits: list[np.ndarray] = field(default_factory=list)  # per step [batch, padded_vocab] float32 (keep_logits)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def _run_layers(model: OffloadedModel, step, xs: list, caches: list, books: list, schedule: str) -> list:
    """Every micro-batch's hidden states through every layer, in column order; caches[m][i] updated in place."""
    placement = model.placement
    overlap = schedule == "zigzag"
    upcoming = fetch_layer(model, 0)
    for i in range(model.cfg.num_layers):
        weights = upcoming
        if not overlap:
            jax.block_until_ready(weights)  # load ...
        elif i > 0:
            # Double buffering: wait for layer i-1's compute (layer i's copy runs meanwhile) before issuing layer
            # i+1's copy, so at most two layers' weights are on the device whatever the dispatch runs ahead by.
            jax.block_until_ready(xs)
        last = i + 1 == model.cfg.num_layers
        # The next layer's copy is issued before this layer computes (dispatch is asynchronous: the copy overlaps
        # the compute); a disk layer's read blocks the Python thread, so it waits until the first micro-batch's
        # compute is dispatched.
        from_disk = not last and placement.weights[i + 1] == DISK
        if overlap and not last and not from_disk:
            upcoming = fetch_layer(model, i + 1)
        on_device = place_on(caches[0][i], DEVICE, model.device) if placement.cache[i] == HOST else caches[0][i]
        for m in range(len(xs)):
            current = on_device
            if m + 1 < len(xs):  # the next micro-batch's cache slice moves while this one computes
                following = caches[m + 1][i]
                on_device = place_on(following, DEVICE, model.device) if placement.cache[i] == HOST else following
            xs[m], new_cache = step(weights, xs[m], current, books[m])
            if overlap and from_disk and m == 0:
                upcoming = fetch_layer(model, i + 1)
            caches[m][i] = place_on(new_cache, HOST, model.device) if placement.cache[i] == HOST else new_cache
        if not overlap:
            jax.block_until_ready(xs)  # ... compute, evict
            if not last:
                upcoming = fetch_layer(model, i + 1)
        del weights
    return xs


def offloaded_generate(model: OffloadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                       schedule: str = "zigzag", cache_dtype: str | None = None, keep_logits: bool = False,
                       capacity: int | None = None) -> OffloadOutput:
    """Greedy generation of exactly `max_new_tokens` after each prompt with the placed model (see the module
    docstring). The tokens equal llmjax.infer.generate's greedy ones: the same block, cache and padding.
    capacity: cache slots (default: generate's, for prompt + max_new_tokens); a short warm-up run given a longer
    run's capacity compiles every program the longer run uses."""
    if schedule not in SCHEDULES:
        raise OffloadError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    cfg, placement = model.cfg, model.placement
    prompts = check_prompts(prompts, cfg, max_new_tokens)
    batch = len(prompts)
    micro = 1 if schedule == "layer_by_layer" else placement.micro_batches
    if batch % micro:
        raise OffloadError(f"batch {batch} is not a multiple of --micro-batches {micro}")
    tokens, valid = pad_prompts(prompts)
    needed = kv_cache.cache_capacity(cfg, tokens.shape[1] + max_new_tokens, multiple=64)
    if capacity is not None and capacity < needed:
        raise OffloadError(f"capacity {capacity} is below the {needed} slots prompt + max_new_tokens need")
    capacity = capacity or needed
    rows = batch // micro
    parts = [slice(m * rows, (m + 1) * rows) for m in range(micro)]
    books, caches, xs = [], [], []
    for part in parts:
        empty = kv_cache.init_cache(cfg, rows, capacity, cache_dtype)
        empty = kv_cache.set_prefill_layout(empty, jnp.asarray(valid[part]))
        books.append(place_on({k: v for k, v in empty.items() if k != "layers"}, DEVICE, model.device))
        caches.append([place_on(layer, where, model.device) for layer, where in zip(empty["layers"], placement.cache)])
        xs.append(_embed_prompt(model.head, place_on(jnp.asarray(tokens[part]), DEVICE, model.device),
                                place_on(jnp.asarray(valid[part]), DEVICE, model.device), cfg))
    start = time.perf_counter()
    prompt_books = [{**book, "valid": place_on(jnp.asarray(valid[part]), DEVICE, model.device)}
                    for book, part in zip(books, parts)]

    def prefill(weights, x, layer_cache, book):  # each micro-batch's own padding mask rides in its book
        bookkeeping = {k: v for k, v in book.items() if k != "valid"}
        return _prefill_layer(weights, x, book["valid"], layer_cache, bookkeeping, cfg)

    xs = _run_layers(model, prefill, xs, caches, prompt_books, schedule)
    logits = jax.block_until_ready(jnp.concatenate([_last_logits(model.head, x, b, cfg) for x, b in zip(xs, books)]))
    prefill_seconds = time.perf_counter() - start
    kept, out = [], []
    for step in range(max_new_tokens):
        if keep_logits:
            kept.append(logits)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [batch]
        out.append(token)
        if step + 1 == max_new_tokens:
            break
        xs = [_embed_token(model.head, token[part], b, cfg) for part, b in zip(parts, books)]
        xs = _run_layers(model, functools.partial(_decode_layer, cfg=cfg), xs, caches, books, schedule)
        logits = jnp.concatenate([_last_logits(model.head, x, b, cfg) for x, b in zip(xs, books)])
        books = [_advance(b) for b in books]
    generated = np.asarray(jnp.stack(out, axis=1))
    decode_seconds = time.perf_counter() - start - prefill_seconds
    return OffloadOutput(tokens=generated.tolist(), logits=[np.asarray(x) for x in kept],
                         prefill_seconds=prefill_seconds, decode_seconds=decode_seconds)


@jax.jit
def _advance(book: dict) -> dict:
    return {k: v for k, v in kv_cache.advance({**book, "layers": ()}).items() if k != "layers"}


# --- the cost model -----------------------------------------------------------------------------

DEFAULT_BANDWIDTHS = {"h2d": 25e9, "d2h": 25e9, "disk": 2e9, "device": 3e12}  # bytes / s
LAUNCH_SECONDS = 20e-6  # per layer per micro-batch: the dispatch cost that makes more micro-batches not free


@dataclass(frozen=True)
class PlacementChoice:
    placement: Placement
    predicted_tokens_per_s: float  # generated tokens / s over prefill + decode
    predicted_seconds: float       # the whole generation
    device_bytes: int              # predicted peak device memory
    budget_bytes: int

    def describe(self) -> str:
        return (f"{self.placement.describe()}; predicted {self.predicted_tokens_per_s:.1f} tokens/s, device memory "
                f"{format_bytes(self.device_bytes)} of {format_bytes(self.budget_bytes)}")


def format_bytes(count: float) -> str:
    if count >= GIB / 10:
        return f"{count / GIB:.2f} GiB"
    return f"{count / (1 << 20):.2f} MiB" if count >= (1 << 20) / 10 else f"{count / 1024:.1f} KiB"


def parse_bytes(text: str) -> int:
    """"20GiB", "512MiB", "8GB", "1e9" -> bytes (one clear error naming --gpu-memory otherwise)."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 1e3, "mb": 1e6, "gb": 1e9,
             "tb": 1e12, "b": 1}
    lowered = text.strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            number, multiplier = lowered[: -len(unit)], scale
            break
    else:
        number, multiplier = lowered, 1
    try:
        value = float(number) * multiplier
    except ValueError:
        raise OffloadError(f"--gpu-memory {text!r}: expected a size such as 20GiB, 512MiB or 8e9") from None
    if value <= 0:
        raise OffloadError(f"--gpu-memory {text!r}: must be positive")
    return int(value)


def model_sizes(cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, cache_dtype: str | None = None) -> dict:
    """Bytes of one layer's weights (float / int8), the head, one layer's cache for the whole batch, and the
    activations of one row; and FLOPs per token per layer."""
    itemsize = jnp.dtype(cfg.compute_dtype).itemsize
    layer_params = max(count_from_specs(block_spec(cfg)), count_from_specs(moe_block_spec(cfg)) if cfg.is_moe else 0)
    head_params = cfg.padded_vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) + cfg.d_model
    if cfg.positions == "learned":
        head_params += cfg.max_seq_len * cfg.d_model
    seq = -(-prompt_len // 8) * 8
    capacity = kv_cache.cache_capacity(cfg, seq + gen_len, multiple=64)
    cache_itemsize = jnp.dtype(cache_dtype or cfg.compute_dtype).itemsize + (4 / cfg.head_dim if cache_dtype == "int8"
                                                                              else 0)  # + its float32 scales
    cache_row = int(2 * capacity * cfg.num_kv_heads * cfg.head_dim * cache_itemsize)  # one row, one layer
    hidden = cfg.d_ff if not cfg.is_moe else max(cfg.d_ff, cfg.expert_d_ff * cfg.experts_per_token)
    activation_row = (seq * (6 * cfg.d_model + 3 * hidden + cfg.q_size + 2 * cfg.kv_size) * itemsize
                      + cfg.num_heads * seq * seq * 4 + 2 * cfg.padded_vocab_size * 4)
    return {"layer": layer_params * itemsize, "layer_int8": int(layer_params * 1.05),
            "head": head_params * itemsize, "cache_layer": cache_row * batch, "cache_row": cache_row,
            "activation_row": activation_row, "seq": seq, "capacity": capacity,
            "layer_flops_per_token": 2 * layer_params,
            "attention_flops_per_token": 4 * capacity * cfg.q_size}


def _micro_batch_counts(batch: int) -> list[int]:
    return [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= batch and batch % m == 0]


def minimum_device_bytes(cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int,
                         cache_dtype: str | None = None) -> int:
    """The least any placement needs: the head, two layers' weights (one computing, one arriving), two cache
    slices of one row and the activations of one row."""
    sizes = model_sizes(cfg, batch, prompt_len, gen_len, cache_dtype)
    return sizes["head"] + 2 * sizes["layer"] + 2 * sizes["cache_row"] + sizes["activation_row"]


def _predict(sizes: dict, cfg: ModelConfig, batch: int, gen_len: int, weights_on_device: int, caches_on_device: int,
             micro: int, int8: bool, weights_place: str, bandwidths: dict, flops: float) -> float:
    """Seconds for the whole generation: per layer max(compute, transfer), summed over layers, prefill + decode."""
    moved = sizes["layer_int8"] if int8 else sizes["layer"]
    source = bandwidths["disk"] if weights_place == DISK else bandwidths["h2d"]
    total = 0.0
    for tokens_per_row, steps in ((sizes["seq"], 1), (1, gen_len - 1)):
        per_step = 0.0
        for i in range(cfg.num_layers):
            math_seconds = batch * tokens_per_row * (sizes["layer_flops_per_token"]
                                                     + sizes["attention_flops_per_token"]) / flops
            read_seconds = (sizes["layer"] + sizes["cache_layer"]) / bandwidths["device"]
            compute = max(math_seconds, read_seconds) + micro * LAUNCH_SECONDS
            transfer = 0.0 if i < weights_on_device else moved / source
            if i >= caches_on_device:
                transfer += sizes["cache_layer"] / bandwidths["h2d"] + sizes["cache_layer"] / bandwidths["d2h"]
            per_step += max(compute, transfer)
        total += steps * per_step
    return total


def _device_bytes(sizes: dict, layers: int, weights_on_device: int, caches_on_device: int, rows: int,
                  int8: bool) -> int:
    """Predicted peak device memory: the head, resident weights and caches, the two layers / cache slices in
    flight when some are elsewhere (and their int8 copies), one micro-batch's activations."""
    used = sizes["head"] + weights_on_device * sizes["layer"] + caches_on_device * sizes["cache_layer"]
    used += rows * sizes["activation_row"]
    if weights_on_device < layers:
        used += 2 * sizes["layer"] + (2 * sizes["layer_int8"] if int8 else 0)
    if caches_on_device < layers:
        used += 2 * rows * sizes["cache_row"]
    return int(used)


def _resident_prefix(places: tuple[str, ...]) -> int:
    """How many layers, from the first, are on the device (the cost model's layouts keep a prefix there)."""
    return next((i for i, where in enumerate(places) if where != DEVICE), len(places))


def predict(cfg: ModelConfig, placement: Placement, batch: int, prompt_len: int, gen_len: int,
            bandwidths: dict | None = None, flops: float = 400e12, cache_dtype: str | None = None) -> PlacementChoice:
    """The cost model's prediction (tokens / s, device bytes) for a given placement."""
    bandwidths = {**DEFAULT_BANDWIDTHS, **(bandwidths or {})}
    sizes = model_sizes(cfg, batch, prompt_len, gen_len, cache_dtype)
    k, c = _resident_prefix(placement.weights), _resident_prefix(placement.cache)
    place = DISK if DISK in placement.weights else HOST
    rows = max(1, batch // placement.micro_batches)
    seconds = _predict(sizes, cfg, batch, gen_len, k, c, placement.micro_batches, placement.host_int8, place,
                       bandwidths, flops)
    used = _device_bytes(sizes, cfg.num_layers, k, c, rows, placement.host_int8)
    return PlacementChoice(placement, batch * gen_len / seconds, seconds, used, 0)


def choose_placement(cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, budget_bytes: int,
                     bandwidths: dict | None = None, flops: float = 400e12, *, host_bytes: int | None = None,
                     allow_int8: bool = False, cache_dtype: str | None = None) -> PlacementChoice:
    """FlexGen's search over a few policies: the first k layers' weights and the first c layers' caches on the
    device (the rest on the host, or on disk when they exceed host_bytes), the micro-batch count, int8 host weights
    (allow_int8). The fastest predicted policy whose device memory fits budget_bytes. bandwidths: bytes / s for
    "h2d", "d2h", "disk", "device" (default DEFAULT_BANDWIDTHS); flops: the device's FLOP/s; cache_dtype: "int8" for
    the quantized KV cache (kv_cache.init_cache; default the compute dtype)."""
    bandwidths = {**DEFAULT_BANDWIDTHS, **(bandwidths or {})}
    minimum = minimum_device_bytes(cfg, batch, prompt_len, gen_len, cache_dtype)
    if budget_bytes < minimum:
        raise OffloadError(f"--gpu-memory {format_bytes(budget_bytes)} is below the minimum of {format_bytes(minimum)} "
                           f"(the embeddings and head, two layers' weights, one row's cache and activations): "
                           f"raise --gpu-memory to at least {math.ceil(minimum / 1024)}KiB")
    sizes = model_sizes(cfg, batch, prompt_len, gen_len, cache_dtype)
    layers = cfg.num_layers
    best = None
    for int8 in (False, True) if allow_int8 else (False,):
        offloaded_bytes = (sizes["layer_int8"] if int8 else sizes["layer"])
        for micro in _micro_batch_counts(batch):
            rows = batch // micro
            for k in range(layers, -1, -1):
                weights_place = HOST
                if host_bytes is not None and (layers - k) * offloaded_bytes > host_bytes:
                    weights_place = DISK
                # as many layers' caches on the device as fit; the others move through two slices in flight
                if _device_bytes(sizes, layers, k, layers, rows, int8) <= budget_bytes:
                    c = layers
                else:
                    spare = budget_bytes - _device_bytes(sizes, layers, k, 0, rows, int8)
                    if spare < 0:
                        continue
                    c = min(layers - 1, int(spare // sizes["cache_layer"]))
                used = _device_bytes(sizes, layers, k, c, rows, int8)
                seconds = _predict(sizes, cfg, batch, gen_len, k, c, micro, int8, weights_place, bandwidths, flops)
                if best is None or seconds < best[0] - 1e-12:
                    placement = Placement(tuple(DEVICE if i < k else weights_place for i in range(layers)),
                                          tuple(DEVICE if i < c else HOST for i in range(layers)), micro,
                                          int8 and k < layers)
                    best = (seconds, placement, used)
    if best is None:
        raise OffloadError(f"--gpu-memory {format_bytes(budget_bytes)} fits no placement of batch {batch}: raise "
                           f"--gpu-memory or lower --batch")
    seconds, placement, used = best
    return PlacementChoice(placement, batch * gen_len / seconds, seconds, int(used), int(budget_bytes))


def best(action, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` runs of action() (its result waited for), after one untimed run."""
    jax.block_until_ready(action())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(action())
        times.append(time.perf_counter() - start)
    return min(times)


def measure_bandwidths(mib: int = 256, device=None) -> dict:
    """Measured bytes / s: host->device ("h2d", from pinned host memory), device->host ("d2h"), a copy within
    the device ("device"); best of three."""
    device = device or jax.devices()[0]
    count = mib * (1 << 20) // 4
    on_host = place_on(jnp.zeros((count,), jnp.float32), HOST, device)
    on_device = place_on(jnp.ones((count,), jnp.float32), DEVICE, device)
    jax.block_until_ready((on_host, on_device))
    copy = jax.jit(lambda x: x + 1)
    nbytes = count * 4
    return {"h2d": nbytes / best(lambda: place_on(on_host, DEVICE, device)),
            "d2h": nbytes / best(lambda: place_on(on_device, HOST, device)),
            "device": 2 * nbytes / best(lambda: copy(on_device)),
            "disk": DEFAULT_BANDWIDTHS["disk"]}


def measure_flops(size: int = 2048, dtype: str = "bfloat16", device=None) -> float:
    """Measured FLOP/s of a square matmul in `dtype` (best of three)."""
    device = device or jax.devices()[0]
    a = place_on(jnp.ones((size, size), dtype), DEVICE, device)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * size**3 / best(lambda: matmul(a))
