"""FlexGen-style offloaded generation: a model larger than the device's memory budget, layer by layer.

    choice = choose_placement(cfg, batch=32, prompt_len=512, gen_len=32, budget_bytes=8 << 30,
                              bandwidths=measure_bandwidths(), flops=400e12)
    model = place_model(params, cfg, choice.placement, disk_dir="offload/")
    out = offloaded_generate(model, prompts, max_new_tokens=32)          # greedy; out.tokens, out.logits

Placement, per layer: its weights on the "device", in pinned host memory ("host": a JAX memory kind, moved with
`device_put`) or on "disk" (one memory-mapped safetensors file per layer, written atomically); its KV cache on the
device or the host; optionally the host / disk weights as int8 or int4 (llmjax.quant, dequantized on the device
after the copy: half or a quarter of bf16's bytes to move). The embeddings, final norm and output head always stay
on the device.

The schedule ("zig-zag", FlexGen's column order): for each layer, its weights are fetched once (the NEXT layer's
copy is issued before the current layer computes: JAX dispatch is asynchronous, so the copy overlaps the compute),
every micro-batch of the batch runs through it (the one Transformer block, llmjax.model.transformer.block, on that
micro-batch's hidden states and its slice of the cache, the next micro-batch's cache slice moving meanwhile), then
the layer is evicted; prefill, then decode steps. Micro-batches exist for the prefill's activations and for caches
that move: when every layer's cache stays on the device, decoding runs the whole batch as one micro-batch (the
prefill's slices concatenated once), so a decode step costs one call per layer, not one per layer and slice.
`schedule="layer_by_layer"` is the accelerate-style baseline: load a layer, wait, compute, wait, evict, with no
overlap and one micro-batch.

`choose_placement` is FlexGen's search reduced to a few candidate policies: how many layers' weights stay on the
device, how many layers' caches, the micro-batch count and quantized host weights (and, with `choose_batch`, the
batch); it predicts time per layer as max(compute, transfer) (they overlap) and picks the fastest policy that fits
the budget.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
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
HOST_FORMATS = ("int8", "int4")  # quantized host / disk weights (int4 in groups of 128 rows where they divide)
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
    host_format: str | None = None  # host / disk weights stored as "int8" / "int4" (dequantized on the device)

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
        if self.host_format not in (None, *HOST_FORMATS):
            raise OffloadError(f"host format {self.host_format!r}: expected one of {', '.join(HOST_FORMATS)} or none")

    @classmethod
    def uniform(cls, num_layers: int, weights: str = DEVICE, cache: str = DEVICE, micro_batches: int = 1,
                host_format: str | None = None) -> Placement:
        return cls((weights,) * num_layers, (cache,) * num_layers, micro_batches, host_format)

    def describe(self) -> str:
        counts = lambda places, names: ", ".join(f"{places.count(n)} {n}" for n in names if n in places)  # noqa: E731
        quant = f" ({self.host_format})" if self.host_format and any(w != DEVICE for w in self.weights) else ""
        return (f"weights: {counts(self.weights, WEIGHT_PLACES)}{quant}; cache: {counts(self.cache, CACHE_PLACES)}; "
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
        raise unwritable(path.parent, error)
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


def unwritable(folder: Path, error: OSError) -> OffloadError:
    return OffloadError(f"--disk {folder}: cannot write there ({error.strerror}); give a writable folder")


def check_disk_space(folder: str | os.PathLike, needed: int) -> None:
    """One clear error, before any layer is written, when `folder` cannot be written or its file system has fewer
    than `needed` bytes free (the disk layers' files)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as error:
        raise unwritable(folder, error)
    if free < needed:
        raise OffloadError(f"--disk {folder}: the disk layers need {needed / 2 ** 30:.2f} GiB and "
                           f"{free / 2 ** 30:.2f} GiB are free there; free space, give another folder, or keep fewer "
                           f"layers on disk (a larger --gpu-memory, or --host-quant)")


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


# --- quantized host weights ---------------------------------------------------------------------

INT4_GROUP = 128


def quantize_layer(layer: dict, fmt: str = "int8") -> dict:
    """The layer's 2-D kernels as `fmt` QuantizedMatrix (llmjax.quant: int8 per output channel; int4 in groups of
    INT4_GROUP input rows, per channel where that does not divide), everything else as is."""
    from llmjax.quant.formats import quantize

    def convert(path, x):
        if getattr(path[-1], "key", None) != "kernel" or x.ndim != 2:
            return x
        group = INT4_GROUP if fmt == "int4" and x.shape[0] % INT4_GROUP == 0 else None
        return quantize(x, fmt, group)

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
    stored = functools.partial(quantize_layer, fmt=placement.host_format) if placement.host_format else (lambda x: x)
    if DISK in placement.weights:  # every disk file's size from shapes alone, before any is written (MoE layers differ)
        disk_layers = [layer for layer, where in zip(dparams["layers"], placement.weights) if where == DISK]
        check_disk_space(disk_dir, sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(
            jax.eval_shape(lambda layers: [stored(layer) for layer in layers], disk_layers))))
    layers = []
    for index, (layer, where) in enumerate(zip(dparams["layers"], placement.weights)):
        if where != DEVICE:
            layer = stored(layer)
        if where == DISK:
            leaves, treedef = jax.tree.flatten(layer)
            path = write_layer_file(Path(disk_dir) / f"layer_{index:04d}.safetensors", [np.asarray(x) for x in leaves])
            layers.append(DiskLayer(path, treedef))
        else:
            layers.append(place_on(layer, where, device))
    return OffloadedModel(cfg, placement, head, layers, device, Path(disk_dir) if disk_dir else None)


def copy_layer(model: OffloadedModel, index: int):
    """Layer `index`'s weights on the device as stored (quantized or not; asynchronous: returns once the copy is
    issued)."""
    stored = model.layers[index]
    if model.placement.weights[index] == DEVICE:
        return stored
    if isinstance(stored, DiskLayer):
        stored = jax.tree.unflatten(stored.treedef, read_layer_file(stored.path))
    return place_on(stored, DEVICE, model.device)


def computable(model: OffloadedModel, index: int, copied):
    """copy_layer's result in the compute dtype: quantized host weights dequantized on the device. Dispatched
    only once the previous layer's compute is: the dequantization waits for its copy, and kernels queued behind
    it would wait too."""
    if model.placement.host_format and model.placement.weights[index] != DEVICE:
        return _dequantize_layer(copied, jnp.dtype(model.cfg.compute_dtype))
    return copied


def fetch_layer(model: OffloadedModel, index: int):
    """Layer `index`'s weights on the device, in the compute dtype (asynchronous)."""
    return computable(model, index, copy_layer(model, index))


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


@functools.partial(jax.jit, static_argnames=("cfg", "capacity", "dtype", "parts", "on_device"))
def _micro_batch_inputs(head: dict, tokens: jax.Array, valid: jax.Array, cfg: ModelConfig, capacity: int,
                        dtype: str | None, parts: int, on_device: tuple[bool, ...]) -> tuple:
    """tokens, valid [batch, seq] -> per micro-batch of batch // parts rows: (embedded prompt [rows, seq, d_model],
    an empty cache laid out for its prompts, holding only the layers on_device marks). One program: 64
    micro-batches' caches of 32 layers are thousands of arrays, slow to make one by one."""
    positions, _, _ = kv_cache.prompt_layout(valid)
    x = _embed(head, tokens, positions, cfg)  # [batch, seq, d_model]
    cache = kv_cache.set_prefill_layout(kv_cache.init_cache(cfg, valid.shape[0], capacity, dtype), valid)
    cache["layers"] = tuple(layer for layer, kept in zip(cache["layers"], on_device) if kept)
    rows = valid.shape[0] // parts
    return tuple(jax.tree.map(lambda a: a[m * rows:(m + 1) * rows], (x, cache)) for m in range(parts))


def _empty_host_layer(cfg: ModelConfig, rows: int, capacity: int, dtype: str | None, device) -> dict:
    """One layer's empty cache slice of `rows` rows made in pinned host memory (zeros from NumPy, never on the
    device: host caches are there because the device cannot hold them); arrays are immutable, so every host layer
    and micro-batch starts from this one."""
    shapes = jax.eval_shape(lambda: kv_cache.init_cache(cfg, rows, capacity, dtype)["layers"][0])
    return place_on(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), HOST, device)


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
    upcoming = copy_layer(model, 0)
    for i in range(model.cfg.num_layers):
        last = i + 1 == model.cfg.num_layers
        from_disk = not last and placement.weights[i + 1] == DISK
        if not overlap:
            weights, upcoming = jax.block_until_ready(computable(model, i, upcoming)), None  # load ...
        else:
            if i > 0:
                # Double buffering: wait for layer i-1's compute (layer i's copy runs meanwhile) before issuing layer
                # i+1's copy, so at most two layers' weights are on the device whatever the dispatch runs ahead by.
                jax.block_until_ready(xs)
            copied, upcoming = upcoming, None
            # The next layer's copy is issued before this layer's dequantization and compute (dispatch is
            # asynchronous: the copy overlaps them). Before them, not after: a host -> device copy waits for the
            # work queued on the compute stream when it is issued, and the dequantization waits for this layer's
            # copy, so issued after it, the next copy would start only once this one and its dequantization end. A
            # disk layer's read blocks the Python thread, so it waits until the first micro-batch's compute is
            # dispatched.
            if not last and not from_disk:
                upcoming = copy_layer(model, i + 1)
            weights = computable(model, i, copied)
            del copied  # the layer's stored copy is dropped once its compute-dtype weights exist
        on_device = place_on(caches[0][i], DEVICE, model.device) if placement.cache[i] == HOST else caches[0][i]
        for m in range(len(xs)):
            current = on_device
            if m + 1 < len(xs):  # the next micro-batch's cache slice moves while this one computes
                following = caches[m + 1][i]
                on_device = place_on(following, DEVICE, model.device) if placement.cache[i] == HOST else following
            xs[m], new_cache = step(weights, xs[m], current, books[m])
            if overlap and from_disk and m == 0:
                upcoming = copy_layer(model, i + 1)
            caches[m][i] = place_on(new_cache, HOST, model.device) if placement.cache[i] == HOST else new_cache
        if not overlap:
            jax.block_until_ready(xs)  # ... compute, evict
            if not last:
                upcoming = copy_layer(model, i + 1)
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
    on_device = tuple(where == DEVICE for where in placement.cache)
    inputs = _micro_batch_inputs(model.head, place_on(jnp.asarray(tokens), DEVICE, model.device),
                                 place_on(jnp.asarray(valid), DEVICE, model.device), cfg, capacity, cache_dtype, micro,
                                 on_device)
    host_empty = None if all(on_device) else _empty_host_layer(cfg, rows, capacity, cache_dtype, model.device)
    for x, empty in inputs:
        xs.append(x)
        books.append({k: v for k, v in empty.items() if k != "layers"})
        device_layers = iter(empty["layers"])
        caches.append([next(device_layers) if kept else host_empty for kept in on_device])
    start = time.perf_counter()
    prompt_books = [{**book, "valid": place_on(jnp.asarray(valid[part]), DEVICE, model.device)}
                    for book, part in zip(books, parts)]

    def prefill(weights, x, layer_cache, book):  # each micro-batch's own padding mask rides in its book
        bookkeeping = {k: v for k, v in book.items() if k != "valid"}
        return _prefill_layer(weights, x, book["valid"], layer_cache, bookkeeping, cfg)

    xs = _run_layers(model, prefill, xs, caches, prompt_books, schedule)
    logits = jnp.concatenate([_last_logits(model.head, x, b, cfg) for x, b in zip(xs, books)])
    if _decodes_merged(micro, _resident_prefix(placement.cache), cfg.num_layers):  # decode as one micro-batch
        caches, books, parts = [_merge_micro_batches(caches)], [_concatenate_rows(tuple(books))], [slice(0, batch)]
    logits = jax.block_until_ready(logits)
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
def _concatenate_rows(parts: tuple):
    """Pytrees of micro-batch slices -> one pytree of the whole batch (row order kept)."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def _merge_micro_batches(caches: list[list]) -> list:
    """[micro-batch][layer] cache slices -> [layer] caches of the whole batch; each layer's slices are dropped as
    soon as it is merged, so at most one layer's cache exists twice."""
    merged = []
    for i in range(len(caches[0])):
        merged.append(_concatenate_rows(tuple(slices[i] for slices in caches)))
        for slices in caches:
            slices[i] = None
    return merged


@jax.jit
def _advance(book: dict) -> dict:
    return {k: v for k, v in kv_cache.advance({**book, "layers": ()}).items() if k != "layers"}


# --- the cost model -----------------------------------------------------------------------------

DEFAULT_BANDWIDTHS = {"h2d": 25e9, "d2h": 25e9, "disk": 2e9, "device": 3e12}  # bytes / s
# GPU memory the runtime takes beyond the arrays the cost model counts (cuBLAS / cuDNN workspaces, XLA's fusion
# temporaries): measured on an H100, llama-8b under 8 GiB, peaks 0.44-0.53 GB above the counted bytes. 0 on CPUs.
RUNTIME_RESERVE = 640 << 20


def runtime_reserve() -> int:
    """RUNTIME_RESERVE where the default backend is a GPU, else 0."""
    return RUNTIME_RESERVE if jax.default_backend() == "gpu" else 0


LAUNCH_SECONDS = 100e-6  # per layer per micro-batch when not measured (measure_launch_seconds): a block's kernels


@dataclass(frozen=True)
class PlacementChoice:
    placement: Placement
    predicted_tokens_per_s: float  # generated tokens / s over prefill + decode
    predicted_seconds: float       # the whole generation
    device_bytes: int              # predicted peak device memory
    budget_bytes: int
    batch: int = 0

    def describe(self) -> str:
        return (f"batch {self.batch}; {self.placement.describe()}; predicted {self.predicted_tokens_per_s:.1f} "
                f"tokens/s, device memory {format_bytes(self.device_bytes)} of {format_bytes(self.budget_bytes)}")


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
    """Bytes of one layer's weights (float / int8 / int4), the head, one layer's cache for the whole batch, and the
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
    token_activations = (6 * cfg.d_model + 3 * hidden + cfg.q_size + 2 * cfg.kv_size) * itemsize
    activation_row = seq * token_activations + cfg.num_heads * seq * seq * 4 + 2 * cfg.padded_vocab_size * 4
    return {"layer": layer_params * itemsize, "layer_int8": int(layer_params * 1.02),  # + fp16 scales per column
            "layer_int4": int(layer_params * (0.5 + 3 / INT4_GROUP) * 1.02),  # + fp16 scale, uint8 zero per group
            "head": head_params * itemsize, "cache_layer": cache_row * batch, "cache_row": cache_row,
            "activation_row": activation_row, "hidden_row": seq * cfg.d_model * itemsize,
            "decode_row": token_activations + 2 * cfg.padded_vocab_size * 4,
            "batch": batch, "seq": seq, "capacity": capacity, "reserve": runtime_reserve(),
            "layer_flops_per_token": 2 * layer_params,
            "attention_flops_per_token": 4 * capacity * cfg.q_size}


def _micro_batch_counts(batch: int) -> list[int]:
    return [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= batch and batch % m == 0]


def minimum_device_bytes(cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int,
                         cache_dtype: str | None = None) -> int:
    """The least any placement needs: the runtime's reserve, the head, two layers' weights (one computing, one
    arriving), two cache slices of one row, the activations of one row and the other rows' hidden states."""
    sizes = model_sizes(cfg, batch, prompt_len, gen_len, cache_dtype)
    return (sizes["reserve"] + sizes["head"] + 2 * sizes["layer"] + 2 * sizes["cache_row"] + sizes["activation_row"]
            + (batch - 1) * sizes["hidden_row"])


def _decodes_merged(micro: int, caches_on_device: int, layers: int) -> bool:
    """Whether decoding runs the batch as one micro-batch (offloaded_generate merges the slices when every cache
    stays on the device)."""
    return micro > 1 and caches_on_device == layers


def _predict(sizes: dict, cfg: ModelConfig, batch: int, gen_len: int, weights_on_device: int, caches_on_device: int,
             micro: int, host_format: str | None, weights_place: str, bandwidths: dict, flops: float,
             launch_seconds: float) -> float:
    """Seconds for the whole generation: per layer max(compute, transfer), summed over layers, prefill + decode;
    compute reads the layer's weights and pays launch_seconds once per micro-batch (one micro-batch when decoding
    merged): 64 one-row calls of an 8B layer read its 0.44 GB 64 times."""
    moved = sizes[f"layer_{host_format}"] if host_format else sizes["layer"]
    source = bandwidths["disk"] if weights_place == DISK else bandwidths["h2d"]
    decode_micro = 1 if _decodes_merged(micro, caches_on_device, cfg.num_layers) else micro
    total = 0.0
    for tokens_per_row, steps, calls in ((sizes["seq"], 1, micro), (1, gen_len - 1, decode_micro)):
        per_step = 0.0
        for i in range(cfg.num_layers):
            math_seconds = batch * tokens_per_row * (sizes["layer_flops_per_token"]
                                                     + sizes["attention_flops_per_token"]) / flops
            read_seconds = (calls * sizes["layer"] + sizes["cache_layer"]) / bandwidths["device"]
            compute = max(math_seconds, read_seconds) + calls * launch_seconds
            transfer = 0.0 if i < weights_on_device else moved / source
            if i >= caches_on_device:
                transfer += sizes["cache_layer"] / bandwidths["h2d"] + sizes["cache_layer"] / bandwidths["d2h"]
            per_step += max(compute, transfer)
        total += steps * per_step
    return total


def _device_bytes(sizes: dict, layers: int, weights_on_device: int, caches_on_device: int, micro: int,
                  host_format: str | None) -> int:
    """Predicted peak device memory: the runtime's reserve, the head, resident weights and caches, the two layers /
    cache slices in flight when some are elsewhere (and their quantized copies), and the larger of the prefill's
    activations (one micro-batch's, beside the other micro-batches' hidden states waiting for the layer: at batch
    128 and prompt 512, llama-8b's 0.5 GiB) and (decoding merged) the whole batch's decode activations plus one
    layer's cache being merged."""
    rows = sizes["batch"] // micro
    used = sizes["reserve"] + sizes["head"]
    used += weights_on_device * sizes["layer"] + caches_on_device * sizes["cache_layer"]
    activations = rows * sizes["activation_row"] + (sizes["batch"] - rows) * sizes["hidden_row"]
    if _decodes_merged(micro, caches_on_device, layers):
        activations = max(activations, sizes["batch"] * sizes["decode_row"] + sizes["cache_layer"])
    used += activations
    if weights_on_device < layers:
        used += 2 * sizes["layer"] + (2 * sizes[f"layer_{host_format}"] if host_format else 0)
    if caches_on_device < layers:
        used += 2 * rows * sizes["cache_row"]
    return int(used)


def _resident_prefix(places: tuple[str, ...]) -> int:
    """How many layers, from the first, are on the device (the cost model's layouts keep a prefix there)."""
    return next((i for i, where in enumerate(places) if where != DEVICE), len(places))


def predict(cfg: ModelConfig, placement: Placement, batch: int, prompt_len: int, gen_len: int,
            bandwidths: dict | None = None, flops: float = 400e12, cache_dtype: str | None = None,
            launch_seconds: float = LAUNCH_SECONDS) -> PlacementChoice:
    """The cost model's prediction (tokens / s, device bytes) for a given placement."""
    bandwidths = {**DEFAULT_BANDWIDTHS, **(bandwidths or {})}
    sizes = model_sizes(cfg, batch, prompt_len, gen_len, cache_dtype)
    k, c = _resident_prefix(placement.weights), _resident_prefix(placement.cache)
    place = DISK if DISK in placement.weights else HOST
    micro = min(placement.micro_batches, batch)
    seconds = _predict(sizes, cfg, batch, gen_len, k, c, micro, placement.host_format, place, bandwidths, flops,
                       launch_seconds)
    used = _device_bytes(sizes, cfg.num_layers, k, c, micro, placement.host_format)
    return PlacementChoice(placement, batch * gen_len / seconds, seconds, used, 0, batch)


def choose_placement(cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, budget_bytes: int,
                     bandwidths: dict | None = None, flops: float = 400e12, *, host_bytes: int | None = None,
                     host_formats: Sequence[str | None] = (None,), cache_dtype: str | None = None,
                     launch_seconds: float = LAUNCH_SECONDS) -> PlacementChoice:
    """FlexGen's search over a few policies: the first k layers' weights and the first c layers' caches on the
    device (the rest on the host, or on disk when they exceed host_bytes), the micro-batch count, the host weights'
    format (host_formats: None for the compute dtype, "int8", "int4"). The fastest predicted policy whose device
    memory fits budget_bytes. bandwidths: bytes / s for "h2d", "d2h", "disk", "device" (default DEFAULT_BANDWIDTHS);
    flops: the device's FLOP/s; cache_dtype: "int8" for the quantized KV cache (kv_cache.init_cache; default the
    compute dtype); launch_seconds: the fixed cost of one layer on one micro-batch (measure_launch_seconds)."""
    bandwidths = {**DEFAULT_BANDWIDTHS, **(bandwidths or {})}
    minimum = minimum_device_bytes(cfg, batch, prompt_len, gen_len, cache_dtype)
    if budget_bytes < minimum:
        raise OffloadError(f"--gpu-memory {format_bytes(budget_bytes)} is below the minimum of {format_bytes(minimum)} "
                           f"(the embeddings and head, two layers' weights, one row's cache and activations): "
                           f"raise --gpu-memory to at least {math.ceil(minimum / 1024)}KiB")
    sizes = model_sizes(cfg, batch, prompt_len, gen_len, cache_dtype)
    layers = cfg.num_layers
    best = None
    for host_format in host_formats:
        offloaded_bytes = sizes[f"layer_{host_format}"] if host_format else sizes["layer"]
        for micro in _micro_batch_counts(batch):
            for k in range(layers, -1, -1):
                weights_place = HOST
                if host_bytes is not None and (layers - k) * offloaded_bytes > host_bytes:
                    weights_place = DISK
                # as many layers' caches on the device as fit; the others move through two slices in flight
                if _device_bytes(sizes, layers, k, layers, micro, host_format) <= budget_bytes:
                    c = layers
                else:
                    spare = budget_bytes - _device_bytes(sizes, layers, k, 0, micro, host_format)
                    if spare < 0:
                        continue
                    c = min(layers - 1, int(spare // sizes["cache_layer"]))
                used = _device_bytes(sizes, layers, k, c, micro, host_format)
                seconds = _predict(sizes, cfg, batch, gen_len, k, c, micro, host_format, weights_place, bandwidths,
                                   flops, launch_seconds)
                if best is None or seconds < best[0] - 1e-12:
                    placement = Placement(tuple(DEVICE if i < k else weights_place for i in range(layers)),
                                          tuple(DEVICE if i < c else HOST for i in range(layers)), micro,
                                          host_format if k < layers else None)
                    best = (seconds, placement, used)
    if best is None:
        raise OffloadError(f"--gpu-memory {format_bytes(budget_bytes)} fits no placement of batch {batch}: raise "
                           f"--gpu-memory or lower --batch")
    seconds, placement, used = best
    return PlacementChoice(placement, batch * gen_len / seconds, seconds, int(used), int(budget_bytes), batch)


BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def choose_batch(cfg: ModelConfig, prompt_len: int, gen_len: int, budget_bytes: int, bandwidths: dict | None = None,
                 flops: float = 400e12, *, batches: Sequence[int] = BATCHES, **options) -> PlacementChoice:
    """FlexGen's outer search: the batch (from `batches`) whose best placement (choose_placement, same options)
    predicts the most generated tokens / s within budget_bytes. A larger batch shares each loaded layer among more
    rows; its caches and activations take the device memory resident weights would use."""
    choices = []
    for batch in batches:
        try:
            choices.append(choose_placement(cfg, batch, prompt_len, gen_len, budget_bytes, bandwidths, flops,
                                            **options))
        except OffloadError:
            continue
    if not choices:
        choose_placement(cfg, min(batches), prompt_len, gen_len, budget_bytes, bandwidths, flops, **options)  # raises
    return max(choices, key=lambda choice: choice.predicted_tokens_per_s)


def largest_batch(cfg: ModelConfig, placement_for, prompt_len: int, gen_len: int, budget_bytes: int,
                  cache_dtype: str | None = None, limit: int = 4096) -> int:
    """The largest batch whose placement_for(batch) (a Placement) fits budget_bytes by the cost model's memory
    estimate: where a schedule that cannot use more device memory (layer by layer) runs fastest. 0 if none fits."""
    fits = lambda batch: predict(cfg, placement_for(batch), batch, prompt_len, gen_len,  # noqa: E731
                                 cache_dtype=cache_dtype).device_bytes <= budget_bytes
    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


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


def measure_launch_seconds(layer: dict, cfg: ModelConfig, bandwidths: dict, device=None, calls: int = 16) -> float:
    """The fixed cost of one layer on one micro-batch beyond reading its weights (the cost model's
    launch_seconds): a chain of `calls` one-row decode calls of `layer` (one layer's decode-ready weights) on a
    short cache, best of three, per call, less the weights' bytes over bandwidths["device"]."""
    device = device or jax.devices()[0]
    layer = place_on(layer, DEVICE, device)
    cache = place_on(kv_cache.init_cache(cfg, 1, 64), DEVICE, device)
    book = {k: v for k, v in cache.items() if k != "layers"}
    x = place_on(jnp.zeros((1, 1, cfg.d_model), cfg.compute_dtype), DEVICE, device)

    def chain():
        y = x
        for _ in range(calls):
            y, _ = _decode_layer(layer, y, cache["layers"][0], book, cfg)
        return y

    read = sum(leaf.nbytes for leaf in jax.tree.leaves(layer)) / bandwidths["device"]
    return max(best(chain) / calls - read, 0.0)
