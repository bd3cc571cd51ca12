"""Normalization and feed-forward layers: spec + pure forward function side by side."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from llmjax.config import ModelConfig
from llmjax.kernels.platform import compute_platform
from llmjax.model.params import ParamSpec, normal, ones, zeros
from llmjax.nn import fp8_linear, gelu, layer_norm, linear, quick_gelu, rms_norm, swiglu
from llmjax.nn.fp8 import HISTORY
from llmjax.parallel.logical import active_rules, constrain, partition_spec


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2's scaled init for projections that write into the residual stream: keeps its
    variance from growing with depth (two residual writes per block)."""
    return cfg.init_std / (2 * cfg.num_layers) ** 0.5


# --- normalization -----------------------------------------------------------------------

def norm_spec(cfg: ModelConfig) -> dict:
    spec = {"scale": ParamSpec((cfg.d_model,), ("embed",), ones, cfg.param_dtype)}
    if cfg.norm == "layernorm":
        spec["bias"] = ParamSpec((cfg.d_model,), ("embed",), zeros, cfg.param_dtype)
    return spec


def resolve_norm_impl(impl: str, platform: str) -> str:
    """"auto" -> the fused Pallas kernels on GPUs (they shorten the training step: docs/perf.md, "Training step
    against the PyTorch peer", second round), XLA elsewhere."""
    if impl == "auto":
        return "pallas" if platform == "gpu" else "xla"
    if impl == "pallas" and platform != "gpu":
        warnings.warn(f"norm_impl='pallas' needs a CUDA GPU, this is {platform!r}: using XLA's norm", stacklevel=3)
        return "xla"
    return impl


def _pallas_norm(x: jax.Array, params: dict, cfg: ModelConfig) -> jax.Array | None:
    """kernels/norms.py on x [batch, seq, d_model], run per device on its rows when the activations are
    sharded over batch / length; None when d_model is sharded (each row must be whole on one device)."""
    from llmjax.kernels import norms

    interpret = compute_platform(x) != "gpu"  # tests run the kernels on the CPU

    def apply(x, scale, bias):
        if cfg.norm == "layernorm":
            return norms.layer_norm(x, scale, bias, cfg.norm_eps, interpret=interpret)
        return norms.rms_norm(x, scale, cfg.norm_eps, interpret=interpret)

    bias = params.get("bias")
    active = active_rules()
    if active is None:
        return apply(x, params["scale"], bias)
    mesh, rules = active
    rows = partition_spec(("batch", "length", "embed"), rules, mesh)
    if rows[2] is not None:
        return None
    return jax.shard_map(apply, mesh=mesh, in_specs=(rows, PartitionSpec(), PartitionSpec()), out_specs=rows,
                         check_vma=False)(x, params["scale"], bias)


def norm(params: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    if resolve_norm_impl(cfg.norm_impl, compute_platform(x)) == "pallas":
        y = _pallas_norm(x, params, cfg)
        if y is not None:
            return y
    if cfg.norm == "layernorm":
        return layer_norm(x, params["scale"], params["bias"], cfg.norm_eps)
    return rms_norm(x, params["scale"], cfg.norm_eps)


# --- feed-forward ------------------------------------------------------------------------

def fp8_state_spec(cfg: ModelConfig) -> dict:
    """A block projection's FP8 state: with matmul_precision="fp8" and fp8_scaling="delayed", {"fp8_history":
    [3, fp8_history] float32 zeros} (the amax histories of its input, kernel and output gradient; replicated), else
    {}. Its gradient is its next value (llmjax.nn.fp8: the training step overwrites it, the optimizer never sees it)."""
    if cfg.matmul_precision != "fp8" or cfg.fp8_scaling != "delayed":
        return {}
    return {HISTORY: ParamSpec((3, cfg.fp8_history), ("fp8_operand", "fp8_history"), zeros, "float32")}


def _dense_spec(shape, axes, std, bias: bool, cfg: ModelConfig) -> dict:
    spec = {"kernel": ParamSpec(shape, axes, normal(std), cfg.param_dtype), **fp8_state_spec(cfg)}
    if bias:
        spec["bias"] = ParamSpec(shape[-1:], axes[-1:], zeros, cfg.param_dtype)
    return spec


def mlp_spec(cfg: ModelConfig) -> dict:
    d, f, bias = cfg.d_model, cfg.d_ff, cfg.mlp_bias
    spec = {
        "up": _dense_spec((d, f), ("embed", "mlp"), cfg.init_std, bias, cfg),
        "down": _dense_spec((f, d), ("mlp", "embed"), residual_std(cfg), bias, cfg),
    }
    if cfg.activation == "swiglu":
        spec["gate"] = _dense_spec((d, f), ("embed", "mlp"), cfg.init_std, bias, cfg)
    return spec


def dense(params: dict, x: jax.Array, *, in_dims: int = 1, precision: str = "bf16") -> jax.Array:
    """llmjax.nn.linear with a {"kernel", "bias"?, "fp8_history"?} parameter dict: x [..., *in] -> [..., *out].
    precision "fp8" contracts in FP8 (llmjax.nn.fp8_linear: e4m3 operands, e5m2 gradients; delayed scaling where
    the dict holds an amax history, else current scaling); a quantized kernel (llmjax.quant) keeps its own matmul."""
    kernel = params["kernel"]
    if precision == "fp8" and isinstance(kernel, jax.Array):
        return fp8_linear(x, kernel, params.get("bias"), in_dims=in_dims, history=params.get(HISTORY))
    return linear(x, kernel, params.get("bias"), in_dims=in_dims)


def mlp(params: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """[batch, seq, d_model] -> [batch, seq, d_model]: GELU-tanh MLP (GPT-2), GELU (BERT), quick GELU (CLIP) or SwiGLU
    (LLaMA), the hidden activation tagged "mlp_hidden" for remat policies.

    params: {"up", "down"} (+ "gate" for SwiGLU), or the decoding layout with gate and up fused into one
    "gate_up" [d_model, 2 * d_ff] matrix (llmjax.infer.decode_model.prepare_params). The projections run at
    cfg.matmul_precision. With cfg.mlp_block_tokens > 0 and a longer sequence, `blockwise_mlp` (the same values,
    the [tokens, d_ff] hidden one block at a time)."""
    if 0 < cfg.mlp_block_tokens < x.shape[-2]:
        return blockwise_mlp(params, x, cfg, cfg.mlp_block_tokens)
    return _mlp(params, x, cfg)


def _mlp(params: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The MLP on all of x [..., tokens, d_model] at once."""
    precision = cfg.matmul_precision
    if "gate_up" in params:
        gate, up = jnp.split(dense(params["gate_up"], x, precision=precision), 2, axis=-1)
        hidden = swiglu(gate, up)
    elif cfg.activation == "swiglu":
        hidden = swiglu(dense(params["gate"], x, precision=precision), dense(params["up"], x, precision=precision))
    elif cfg.activation == "quick_gelu":
        hidden = quick_gelu(dense(params["up"], x, precision=precision))  # [batch, seq, d_ff]: CLIP's
    else:
        # [batch, seq, d_ff]: GPT-2's tanh approximation, or BERT's exact erf form
        hidden = gelu(dense(params["up"], x, precision=precision), approximate=cfg.activation == "gelu_tanh")
    return dense(params["down"], checkpoint_name(hidden, "mlp_hidden"), precision=precision)  # [batch, seq, d_model]


BLOCK_AXES = ("batch", "length", "embed")  # a block of tokens keeps the activations' layout (transformer.py's)


def blockwise_mlp(params: dict, x: jax.Array, cfg: ModelConfig, block_tokens: int) -> jax.Array:
    """The MLP on x [batch, seq, d_model] block_tokens tokens at a time (Blockwise Parallel Transformer, Liu &
    Abbeel 2023): a `lax.scan` over blocks, each under `jax.checkpoint` with nothing saved, so the [tokens, d_ff]
    hidden (and the up / gate outputs) exist for one block at a time, forward and backward: the backward pass
    recomputes each block's hidden from the block's input. Values and gradients equal `_mlp`'s (the MLP is
    per-token).

    Block c holds tokens c, c + count, c + 2 * count, ... (strided, not contiguous): any grouping gives the same
    result, and the strided one keeps each block's tokens spread over the devices that shard the sequence
    ("length"), so every scan step works on every device's share. A sequence that block_tokens does not divide is
    padded with copies of its last token (padding that leaves every FP8 amax as it was), dropped afterwards.

    FP8 delayed scaling: each block quantizes with the scales of the same histories, as the whole sequence would;
    the new histories (the histories' gradients) of the blocks are combined by max, not summed, so they equal the
    whole sequence's. (Current scaling takes each block's own amax: per-block scales.)

    "mlp_hidden" is still tagged inside a block, but a remat policy that keeps it keeps nothing here: not keeping
    the hidden is the point of the blocks."""
    *lead, seq, d_model = x.shape
    count = -(-seq // block_tokens)
    pad = count * block_tokens - seq
    if pad:  # edge padding: the padded rows repeat the last token (their outputs are dropped, their gradients 0)
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad), (0, 0)], mode="edge")
    # [..., block_tokens * count, d] -> [..., block_tokens, count, d] -> [count, ..., block_tokens, d]
    blocks = jnp.moveaxis(x.reshape(*lead, block_tokens, count, d_model), -2, 0)
    histories = {name: p[HISTORY] for name, p in params.items() if isinstance(p, dict) and HISTORY in p}
    copies = {name: _broadcast_history(h, count) for name, h in histories.items()}  # [count, 3, H] each

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def one_block(_, inputs):
        xb, block_histories = inputs  # [..., block_tokens, d_model], {name: [3, H]}
        block_params = {name: {**p, HISTORY: block_histories[name]} if name in block_histories else p
                        for name, p in params.items()}
        y = _mlp(block_params, constrain(xb, BLOCK_AXES), cfg)
        return None, constrain(y, BLOCK_AXES)  # [..., block_tokens, d_model]

    with jax.named_scope("mlp_blocks"):
        _, ys = jax.lax.scan(one_block, None, (blocks, copies))  # [count, ..., block_tokens, d_model]
    y = jnp.moveaxis(ys, 0, -2).reshape(*lead, block_tokens * count, d_model)
    return constrain(jax.lax.slice_in_dim(y, 0, seq, axis=-2), BLOCK_AXES)  # [..., seq, d_model]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_history(history: jax.Array, count: int) -> jax.Array:
    """history [3, H] -> [count, 3, H] copies, one per block; their gradients (each block's new history) combine by
    max rather than sum (llmjax.nn.fp8: a history's gradient is its next value, and the amax of the whole sequence
    is the largest of its blocks')."""
    return jnp.broadcast_to(history, (count, *history.shape))


def _broadcast_history_forward(history, count):
    return _broadcast_history(history, count), None


def _broadcast_history_backward(count, _, new_histories):
    return (jnp.max(new_histories, axis=0),)


_broadcast_history.defvjp(_broadcast_history_forward, _broadcast_history_backward)
