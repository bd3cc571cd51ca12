"""Fused linear cross-entropy in Pallas (Triton lowering): the LM head's logits never exist whole.

Forward: one program per (token block, vocab split) walks its vocab blocks, computing each logits
tile [block_tokens, block_vocab] = hidden @ embedding with float32 accumulation (a loop over
block_d slices of d_model), and keeps an online max / sum-of-exponentials and the target's logit.
A few floats per token per split come back; XLA combines the splits. Memory: O(tokens).

Backward: for each chunk of tokens (a `lax.scan`), a second kernel recomputes the chunk's logits
tiles and writes d_logits = softmax * (g_nll + g_log_z) - onehot(target) * g_nll, in the hidden
dtype, for that chunk only ([chunk, padded_vocab], zero in padded columns); two matrix products
(cuBLAS through XLA) turn it into dhidden = d_logits @ embedding^T and the chunk's share of
dembedding = hidden^T @ d_logits, summed over chunks in float32. Why not accumulate dhidden /
dembedding inside the kernels (as flash attention does)? Their rows are d_model wide (768 to 8192),
far past what registers hold; atomics would move d_model / block more bytes than d_logits does.

Columns >= vocab_size (padding of the embedding) get no probability and no gradient. Targets must
lie in [0, vocab_size).

The references: `cross_entropy_reference` (full float32 logits, optax) and the training loss
`llmjax.train.step.chunked_cross_entropy` (XLA, chunked).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .platform import compute_device
from .tiles import combine_masks

__all__ = ["linear_cross_entropy", "cross_entropy_reference", "cross_entropy_with_grad"]

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
BACKWARD_CHUNK_BYTES = 512 * 2**20  # default budget for one chunk's d_logits


def cross_entropy_reference(
    hidden: jax.Array, embedding: jax.Array, targets: jax.Array, vocab_size: int
) -> tuple[jax.Array, jax.Array]:
    """(nll [tokens], log_z [tokens]) float32 from the full float32 logits [tokens, padded_vocab]."""
    import optax

    logits = jnp.dot(hidden, embedding, preferred_element_type=jnp.float32)  # [tokens, padded_vocab]
    logits = jnp.where(jnp.arange(embedding.shape[1]) < vocab_size, logits, -jnp.inf)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nll, jax.nn.logsumexp(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class CrossEntropyConfig:
    """Static shape of one fused cross-entropy (hashable: a custom_vjp non-differentiable argument)."""

    tokens: int
    d: int
    padded_vocab: int
    vocab_size: int
    block_tokens: int
    block_vocab: int
    block_d: int
    vocab_splits: int  # forward: programs sharing one token block's vocabulary
    chunk_tokens: int  # backward: tokens whose d_logits exist at once
    num_warps: int
    num_stages: int
    interpret: bool

    @property
    def vocab_blocks(self) -> int:  # blocks holding at least one real vocab column
        return pl.cdiv(self.vocab_size, self.block_vocab)

    @property
    def blocks_per_split(self) -> int:
        return pl.cdiv(self.vocab_blocks, self.vocab_splits)


# --- validation and launch shape ---------------------------------------------------------

def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and n >= 1 and not n & (n - 1)


def _check_inputs(hidden, embedding, targets, vocab_size, block_sizes: dict) -> None:
    """Raise one clear error for input the kernels do not take (before any tracing)."""
    if hidden.ndim != 2 or embedding.ndim != 2:
        raise ValueError(
            f"hidden must be [tokens, d_model] and embedding [d_model, padded_vocab]; got {hidden.shape} and "
            f"{embedding.shape} (flatten batch and sequence first)"
        )
    if hidden.shape[1] != embedding.shape[0]:
        raise ValueError(f"hidden's d_model {hidden.shape[1]} does not match embedding's {embedding.shape[0]} "
                         f"(hidden {hidden.shape}, embedding {embedding.shape})")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), one per token, got {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer token ids, got {jnp.dtype(targets.dtype).name}")
    for name, array in (("hidden", hidden), ("embedding", embedding)):
        if jnp.dtype(array.dtype) not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
            raise TypeError(f"linear_cross_entropy takes float32, bfloat16 or float16; {name} is "
                            f"{jnp.dtype(array.dtype).name}")
    if hidden.dtype != embedding.dtype:
        raise TypeError(f"hidden ({jnp.dtype(hidden.dtype).name}) and embedding ({jnp.dtype(embedding.dtype).name}) "
                        f"must have one dtype: cast the embedding to the compute dtype")
    if not (isinstance(vocab_size, int) and 1 <= vocab_size <= embedding.shape[1]):
        raise ValueError(f"vocab_size must be an int in [1, padded_vocab={embedding.shape[1]}], got {vocab_size!r}")
    for name, value in block_sizes.items():
        if not (_is_power_of_two(value) and value >= 16):
            raise ValueError(f"{name} must be a power of two >= 16 (Triton's dot), got {value!r}")


def _multiprocessors() -> int:
    device = compute_device()
    if device.platform != "gpu":
        return 4
    return getattr(device, "core_count", None) or 132


def _make_config(hidden, embedding, vocab_size, block_tokens, block_vocab, block_d, vocab_splits,
                 chunk_tokens, num_warps, num_stages, interpret) -> CrossEntropyConfig:
    tokens, d = hidden.shape
    token_blocks = pl.cdiv(tokens, block_tokens)
    vocab_blocks = pl.cdiv(vocab_size, block_vocab)
    if vocab_splits is None:  # enough programs for two per multiprocessor
        vocab_splits = pl.cdiv(2 * _multiprocessors(), token_blocks)
    vocab_splits = max(1, min(vocab_splits, vocab_blocks))
    vocab_splits = pl.cdiv(vocab_blocks, pl.cdiv(vocab_blocks, vocab_splits))  # no split left empty
    if chunk_tokens is None:
        per_token = embedding.shape[1] * jnp.dtype(hidden.dtype).itemsize
        chunk_tokens = 1 << max(0, (BACKWARD_CHUNK_BYTES // per_token).bit_length() - 1)
    chunk_tokens = max(block_tokens, min(pl.cdiv(chunk_tokens, block_tokens) * block_tokens,
                                         token_blocks * block_tokens))
    return CrossEntropyConfig(tokens, d, embedding.shape[1], vocab_size, block_tokens, block_vocab, block_d,
                              vocab_splits, chunk_tokens, num_warps, num_stages, interpret)


# --- kernels -----------------------------------------------------------------------------

def _range_mask(first, size: int, limit: int, always_inside: bool) -> jax.Array | None:
    """[size] True where first + i < limit; None when every block is known to be inside."""
    return None if always_inside else first + jnp.arange(size) < limit


def _load(block, mask) -> jax.Array:
    return plgpu.load(block, mask=mask, other=None if mask is None else 0)


def _logits_tile(hidden_ref, embedding_ref, first_token, first_vocab, tokens: int, cfg: CrossEntropyConfig):
    """[block_tokens, block_vocab] float32 = hidden[tokens block] @ embedding[:, vocab block].

    Rows past `tokens` and columns past padded_vocab read as zeros; the caller masks columns past
    vocab_size."""
    bt, bv, bd = cfg.block_tokens, cfg.block_vocab, cfg.block_d
    token_mask = _range_mask(first_token, bt, tokens, tokens % bt == 0)
    vocab_mask = _range_mask(first_vocab, bv, cfg.padded_vocab, cfg.padded_vocab % bv == 0)

    def add_slice(k, acc):
        first_d = k * bd
        d_mask = _range_mask(first_d, bd, cfg.d, cfg.d % bd == 0)
        x = _load(hidden_ref.at[pl.ds(first_token, bt), pl.ds(first_d, bd)], combine_masks(token_mask, d_mask))  # [bt, bd]
        w = _load(embedding_ref.at[pl.ds(first_d, bd), pl.ds(first_vocab, bv)], combine_masks(d_mask, vocab_mask))  # [bd, bv]
        return acc + plgpu.dot(x, w)

    return lax.fori_loop(0, pl.cdiv(cfg.d, bd), add_slice, jnp.zeros((bt, bv), jnp.float32))


def _forward_kernel(hidden_ref, embedding_ref, targets_ref, max_ref, sum_exp_ref, target_logit_ref, *,
                    cfg: CrossEntropyConfig):
    """Token block x vocab split: running max, sum of exp(logit - max), target logit per token."""
    bt, bv = cfg.block_tokens, cfg.block_vocab
    first_token = pl.program_id(0) * bt
    split = pl.program_id(1)
    token_mask = _range_mask(first_token, bt, cfg.tokens, cfg.tokens % bt == 0)
    targets = plgpu.load(targets_ref.at[pl.ds(first_token, bt)], mask=token_mask,
                         other=None if token_mask is None else -1)  # [bt]

    def add_vocab_block(j, carry):
        running_max, sum_exp, target_logit = carry  # [bt] each
        columns = j * bv + jnp.arange(bv)  # [bv]
        logits = _logits_tile(hidden_ref, embedding_ref, first_token, j * bv, cfg.tokens, cfg)
        logits = jnp.where(columns[None, :] < cfg.vocab_size, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(1))
        sum_exp = sum_exp * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(1)
        target_logit += jnp.where(columns[None, :] == targets[:, None], logits, 0.0).sum(1)
        return new_max, sum_exp, target_logit

    first_block = split * cfg.blocks_per_split
    last_block = jnp.minimum(first_block + cfg.blocks_per_split, cfg.vocab_blocks)
    zeros = jnp.zeros((bt,), jnp.float32)
    carry = lax.fori_loop(first_block, last_block, add_vocab_block, (jnp.full((bt,), -jnp.inf), zeros, zeros))
    for ref, value in zip((max_ref, sum_exp_ref, target_logit_ref), carry):
        plgpu.store(ref.at[pl.ds(split, 1), pl.ds(first_token, bt)], value[None, :], mask=combine_masks(None, token_mask))


def _grad_logits_kernel(hidden_ref, embedding_ref, targets_ref, log_z_ref, g_nll_ref, g_log_z_ref, d_logits_ref, *,
                        cfg: CrossEntropyConfig):
    """One [block_tokens, block_vocab] tile of d_logits for a chunk of tokens.

    Programs run token-block-fastest, so one embedding slice serves every token block of the
    (cache-resident) chunk before the next is read."""
    bt, bv = cfg.block_tokens, cfg.block_vocab
    token_blocks = cfg.chunk_tokens // bt
    first_token = (pl.program_id(0) % token_blocks) * bt
    first_vocab = (pl.program_id(0) // token_blocks) * bv
    columns = first_vocab + jnp.arange(bv)  # [bv]
    targets = targets_ref[pl.ds(first_token, bt)]  # [bt]; the chunk is padded to whole blocks
    log_z, g_nll, g_log_z = (ref[pl.ds(first_token, bt)] for ref in (log_z_ref, g_nll_ref, g_log_z_ref))
    logits = _logits_tile(hidden_ref, embedding_ref, first_token, first_vocab, cfg.chunk_tokens, cfg)
    in_vocab = columns[None, :] < cfg.vocab_size
    probs = jnp.exp(jnp.where(in_vocab, logits, -jnp.inf) - log_z[:, None])  # [bt, bv]
    d_logits = probs * (g_nll + g_log_z)[:, None] - jnp.where(columns[None, :] == targets[:, None], g_nll[:, None], 0.0)
    d_logits = jnp.where(in_vocab, d_logits, 0.0)
    vocab_mask = _range_mask(first_vocab, bv, cfg.padded_vocab, cfg.padded_vocab % bv == 0)
    block = d_logits_ref.at[pl.ds(first_token, bt), pl.ds(first_vocab, bv)]
    plgpu.store(block, d_logits.astype(d_logits_ref.dtype), mask=combine_masks(None, vocab_mask))


# --- launches ----------------------------------------------------------------------------

def _compiler_params(cfg: CrossEntropyConfig):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _forward(hidden, embedding, targets, cfg: CrossEntropyConfig) -> tuple[jax.Array, jax.Array]:
    """-> (nll [tokens], log_z [tokens]) float32."""
    partial = jax.ShapeDtypeStruct((cfg.vocab_splits, cfg.tokens), jnp.float32)  # [splits, tokens]
    split_max, split_sum_exp, split_target = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        out_shape=[partial] * 3,
        grid=(pl.cdiv(cfg.tokens, cfg.block_tokens), cfg.vocab_splits),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="linear_cross_entropy_forward",
    )(hidden, embedding, targets.astype(jnp.int32))
    overall_max = split_max.max(0)  # [tokens]
    log_z = overall_max + jnp.log((split_sum_exp * jnp.exp(split_max - overall_max)).sum(0))
    return log_z - split_target.sum(0), log_z


def _grad_logits(hidden, embedding, targets, log_z, g_nll, g_log_z, cfg: CrossEntropyConfig) -> jax.Array:
    """One chunk ([chunk_tokens] rows of each input) -> d_logits [chunk_tokens, padded_vocab], hidden dtype."""
    tiles = (cfg.chunk_tokens // cfg.block_tokens) * pl.cdiv(cfg.padded_vocab, cfg.block_vocab)
    return pl.pallas_call(
        functools.partial(_grad_logits_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((cfg.chunk_tokens, cfg.padded_vocab), hidden.dtype),
        grid=(tiles,),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="linear_cross_entropy_grad_logits",
    )(hidden, embedding, targets, log_z, g_nll, g_log_z)


def _backward_chunks(hidden, embedding, targets, log_z, g_nll, g_log_z, cfg: CrossEntropyConfig):
    """-> (dhidden [tokens, d] hidden dtype, dembedding [d, padded_vocab] float32), chunk by chunk."""
    chunk = cfg.chunk_tokens
    chunks = pl.cdiv(cfg.tokens, chunk)
    pad = chunks * chunk - cfg.tokens  # padded tokens get zero cotangents, so zero gradients

    def split(x):  # [tokens, ...] -> [chunks, chunk, ...]
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(chunks, chunk, *x.shape[1:])

    def one_chunk(dembedding, inputs):
        hidden_c, targets_c, log_z_c, g_nll_c, g_log_z_c = inputs
        d_logits = _grad_logits(hidden_c, embedding, targets_c, log_z_c, g_nll_c, g_log_z_c, cfg)  # [chunk, V]
        dhidden = lax.dot_general(d_logits, embedding, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dembedding += lax.dot_general(hidden_c, d_logits, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return dembedding, dhidden.astype(hidden.dtype)  # [chunk, d]

    inputs = tuple(split(x) for x in (hidden, targets.astype(jnp.int32), log_z, g_nll, g_log_z))
    zeros = jnp.zeros(embedding.shape, jnp.float32)
    if chunks == 1:
        dembedding, dhidden = one_chunk(zeros, tuple(x[0] for x in inputs))
        return dhidden[: cfg.tokens], dembedding
    dembedding, dhidden = lax.scan(one_chunk, zeros, inputs)
    return dhidden.reshape(chunks * chunk, cfg.d)[: cfg.tokens], dembedding


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_cross_entropy(hidden, embedding, targets, cfg: CrossEntropyConfig):
    return _forward(hidden, embedding, targets, cfg)


def _fused_cross_entropy_forward(hidden, embedding, targets, cfg: CrossEntropyConfig):
    nll, log_z = _forward(hidden, embedding, targets, cfg)
    return (nll, log_z), (hidden, embedding, targets, log_z)


def _fused_cross_entropy_backward(cfg: CrossEntropyConfig, residuals, cotangents):
    hidden, embedding, targets, log_z = residuals
    g_nll, g_log_z = (g.astype(jnp.float32) for g in cotangents)  # [tokens] each
    dhidden, dembedding = _backward_chunks(hidden, embedding, targets, log_z, g_nll, g_log_z, cfg)
    return dhidden, dembedding.astype(embedding.dtype), None


_fused_cross_entropy.defvjp(_fused_cross_entropy_forward, _fused_cross_entropy_backward)


# --- public API --------------------------------------------------------------------------

def linear_cross_entropy(
    hidden: jax.Array,
    embedding: jax.Array,
    targets: jax.Array,
    vocab_size: int,
    *,
    block_tokens: int = 128,
    block_vocab: int = 256,
    block_d: int | None = None,
    vocab_splits: int | None = None,
    chunk_tokens: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Per-token (nll [tokens], log_z [tokens]) float32 of softmax(hidden @ embedding), fused.

    hidden [tokens, d_model] and embedding [d_model, padded_vocab], one float dtype; targets
    [tokens] integer ids in [0, vocab_size); columns >= vocab_size are padding. Same values as
    `llmjax.train.step.chunked_cross_entropy`, differentiable in hidden and embedding.

    block_tokens / block_vocab / block_d: tile sizes (powers of two >= 16; block_d defaults to 64
    for 16-bit inputs, 32 for float32, to fit the pipeline's shared memory). vocab_splits: forward
    programs per token block (default: enough for two programs per multiprocessor). chunk_tokens:
    tokens whose d_logits the backward holds at once (default: what fits 512 MiB). num_warps /
    num_stages: Triton's. interpret: run the kernels on the CPU (tests).
    """
    if block_d is None:
        block_d = 64 if jnp.dtype(hidden.dtype).itemsize <= 2 else 32
    _check_inputs(hidden, embedding, targets, vocab_size,
                  {"block_tokens": block_tokens, "block_vocab": block_vocab, "block_d": block_d})
    if hidden.shape[0] == 0:
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    cfg = _make_config(hidden, embedding, vocab_size, block_tokens, block_vocab, block_d, vocab_splits,
                       chunk_tokens, num_warps, num_stages, interpret)
    return _fused_cross_entropy(hidden, embedding, targets, cfg)


# --- cross-entropy and its logits gradient from stored logits ----------------------------

def _with_grad_kernel(logits_ref, targets_ref, weights_ref, d_logits_ref, nll_ref, log_z_ref, *, rows: int,
                      padded_vocab: int, vocab_size: int, block_rows: int, block_vocab: int, z_loss: float):
    """A block of rows: pass 1 reads the logits for the log-partition (online max / sum of exponentials)
    and the target logit, pass 2 reads them again (mostly from L2) and writes d_logits."""
    br, bv = block_rows, block_vocab
    first_row = pl.program_id(0) * br
    row_mask = _range_mask(first_row, br, rows, rows % br == 0)
    targets = plgpu.load(targets_ref.at[pl.ds(first_row, br)], mask=row_mask, other=None if row_mask is None else -1)
    weights = plgpu.load(weights_ref.at[pl.ds(first_row, br)], mask=row_mask, other=None if row_mask is None else 0)

    def tile(j):  # ([br, bv] float32 logits, -inf past vocab_size; [bv] columns; store mask)
        columns = j * bv + jnp.arange(bv)
        mask = combine_masks(row_mask, _range_mask(j * bv, bv, padded_vocab, padded_vocab % bv == 0))
        logits = _load(logits_ref.at[pl.ds(first_row, br), pl.ds(j * bv, bv)], mask).astype(jnp.float32)
        return jnp.where(columns[None, :] < vocab_size, logits, -jnp.inf), columns, mask

    def statistics(j, carry):
        running_max, sum_exp, target_logit = carry  # [br] each
        logits, columns, _ = tile(j)
        new_max = jnp.maximum(running_max, logits.max(1))
        sum_exp = sum_exp * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(1)
        target_logit += jnp.where(columns[None, :] == targets[:, None], logits, 0.0).sum(1)
        return new_max, sum_exp, target_logit

    zeros = jnp.zeros((br,), jnp.float32)
    running_max, sum_exp, target_logit = lax.fori_loop(0, pl.cdiv(vocab_size, bv), statistics,
                                                       (jnp.full((br,), -jnp.inf), zeros, zeros))
    log_z = running_max + jnp.log(sum_exp)
    probs_scale = weights * (1 + 2 * z_loss * log_z)  # d objective / d logits = probs_scale * p - weight * onehot

    def write(j, _):
        logits, columns, mask = tile(j)
        d_logits = (probs_scale[:, None] * jnp.exp(logits - log_z[:, None])
                    - jnp.where(columns[None, :] == targets[:, None], weights[:, None], 0.0))
        plgpu.store(d_logits_ref.at[pl.ds(first_row, br), pl.ds(j * bv, bv)], d_logits.astype(d_logits_ref.dtype),
                    mask=mask)
        return None

    lax.fori_loop(0, pl.cdiv(padded_vocab, bv), write, None)
    plgpu.store(nll_ref.at[pl.ds(first_row, br)], log_z - target_logit, mask=row_mask)
    plgpu.store(log_z_ref.at[pl.ds(first_row, br)], log_z, mask=row_mask)


def cross_entropy_with_grad(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    vocab_size: int,
    z_loss: float = 0.0,
    *,
    block_rows: int = 1,
    block_vocab: int = 2048,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(d_logits [rows, padded_vocab] logits.dtype, nll [rows] f32, log_z [rows] f32) of stored logits.

    logits [rows, padded_vocab] (columns >= vocab_size are padding), targets [rows] in [0, vocab_size),
    weights [rows]: d_logits is the gradient of sum(weights * (nll + z_loss * log_z^2)), zero in the
    padding columns. One kernel reads each row twice (the second time mostly from L2) and writes
    d_logits once, where XLA's reductions and elementwise pass read it three times. Not differentiable:
    it is the gradient. block_rows / block_vocab: powers of two; num_warps: Triton's; interpret: CPU.
    """
    rows, padded_vocab = logits.shape
    if targets.shape != (rows,) or weights.shape != (rows,):
        raise ValueError(f"targets {targets.shape} and weights {weights.shape} must be [rows]=({rows},)")
    if not (isinstance(vocab_size, int) and 1 <= vocab_size <= padded_vocab):
        raise ValueError(f"vocab_size must be an int in [1, padded_vocab={padded_vocab}], got {vocab_size!r}")
    for name, value in (("block_rows", block_rows), ("block_vocab", block_vocab)):
        if not _is_power_of_two(value):
            raise ValueError(f"{name} must be a power of two, got {value!r}")
    kernel = functools.partial(_with_grad_kernel, rows=rows, padded_vocab=padded_vocab, vocab_size=vocab_size,
                               block_rows=block_rows, block_vocab=block_vocab, z_loss=float(z_loss))
    per_row = jax.ShapeDtypeStruct((rows,), jnp.float32)
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(logits.shape, logits.dtype), per_row, per_row],
        grid=(pl.cdiv(rows, block_rows),),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="cross_entropy_with_grad",
    )(logits, targets.astype(jnp.int32), weights.astype(jnp.float32))
