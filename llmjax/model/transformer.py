"""The Transformer as pure functions: `init_params(cfg, key)` and `forward(params, tokens, cfg)`.

Parameters (nested dict, f32 masters by default):
    embed/token        [padded_vocab, d_model]
    embed/position     [max_seq_len, d_model]             (learned positions only)
    embed/token_type   [type_vocab_size, d_model]         (BERT's segment A / B embedding only)
    embed/norm/...                                        (a norm on the summed embeddings: BERT)
    blocks/...         every block parameter stacked on a leading [num_layers] axis
    final_norm/...                                        (pre-norm blocks only, unless cfg.final_norm=False)
    lm_head/kernel     [d_model, padded_vocab]             (untied embeddings only)

Blocks are pre-norm (x + attn(norm(x)), x + mlp(norm(x)); GPT-2, LLaMA) or post-norm (norm(x + attn(x)),
norm(x + mlp(x)); BERT) and run under `jax.lax.scan` with the configured remat policy, so compile time does not
grow with depth. Attention is causal for decoders and bidirectional for encoders (cfg.causal); `token_mask`
keeps padding out of a batch of unequal lengths either way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llmjax.config import ModelConfig
from llmjax.kernels.platform import compute_platform
from llmjax.model.attention import attention_layer, attention_spec
from llmjax.model.layers import mlp, mlp_spec, norm, norm_spec
from llmjax.model.moe import moe_layer, moe_spec
from llmjax.model.params import ParamSpec, init_from_specs, normal, stack_layers
from llmjax.nn import embedding
from llmjax.parallel.logical import constrain


def block_spec(cfg: ModelConfig) -> dict:
    return {
        "attn_norm": norm_spec(cfg),
        "attn": attention_spec(cfg),
        "mlp_norm": norm_spec(cfg),
        "mlp": mlp_spec(cfg),
    }


def moe_block_spec(cfg: ModelConfig) -> dict:
    """A block whose MLP is a Mixture-of-Experts (llmjax.model.moe)."""
    return {
        "attn_norm": norm_spec(cfg),
        "attn": attention_spec(cfg),
        "mlp_norm": norm_spec(cfg),
        "moe": moe_spec(cfg),
    }


def model_spec(cfg: ModelConfig) -> dict:
    """The full parameter spec tree of a model."""
    embed = {"token": ParamSpec((cfg.padded_vocab_size, cfg.d_model), ("vocab", "embed"), normal(cfg.init_std), cfg.param_dtype)}
    if cfg.positions == "learned":
        # GPT-2 initializes position embeddings with std 0.01.
        embed["position"] = ParamSpec((cfg.max_seq_len, cfg.d_model), ("length", "embed"), normal(0.01), cfg.param_dtype)
    if cfg.type_vocab_size:
        embed["token_type"] = ParamSpec((cfg.type_vocab_size, cfg.d_model), ("token_types", "embed"),
                                        normal(cfg.init_std), cfg.param_dtype)
    if cfg.embedding_norm:
        embed["norm"] = norm_spec(cfg)
    spec = {"embed": embed}
    if not cfg.is_moe:
        spec["blocks"] = stack_layers(block_spec(cfg), cfg.num_layers)
    else:
        # Scanned in num_layers / moe_every groups: moe_every - 1 dense blocks, then one MoE block.
        # Layer i is MoE when (i + 1) % moe_every == 0: dense block j of group g is layer g * moe_every + j.
        groups = cfg.num_layers // cfg.moe_every
        if cfg.moe_every > 1:
            spec["blocks"] = stack_layers(stack_layers(block_spec(cfg), cfg.moe_every - 1), groups)
        spec["moe_blocks"] = stack_layers(moe_block_spec(cfg), groups)
    if cfg.norm_position == "pre" and cfg.final_norm:  # post-norm blocks end normed already
        spec["final_norm"] = norm_spec(cfg)
    if not cfg.tie_embeddings:
        spec["lm_head"] = {
            "kernel": ParamSpec((cfg.d_model, cfg.padded_vocab_size), ("embed", "vocab"), normal(cfg.init_std), cfg.param_dtype)
        }
    return spec


def layer_block_params(params: dict, cfg: ModelConfig, layer: int) -> dict:
    """Block `layer`'s parameters taken out of the stacks: a dense block's, or an MoE block's (with
    "moe" where a dense block has "mlp"). For code that walks the layers one by one (decoding)."""
    if not cfg.is_moe:
        return jax.tree.map(lambda x: x[layer], params["blocks"])
    group, index = divmod(layer, cfg.moe_every)
    if index == cfg.moe_every - 1:
        return jax.tree.map(lambda x: x[group], params["moe_blocks"])
    return jax.tree.map(lambda x: x[group, index], params["blocks"])


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Freshly initialized parameters (GPT-2 init: std 0.02, residual projections / sqrt(2 * layers); under µP,
    hidden and output weights scaled down with the width: llmjax.model.mup)."""
    params = init_from_specs(model_spec(cfg), key)
    if cfg.mup_base_width:
        params = jax.tree.map(lambda p, k: (p * k).astype(p.dtype), params, mup_multipliers(cfg, "init"))
    return params


def mup_multipliers(cfg: ModelConfig, of: str) -> dict:
    """µP's per-parameter factors on the standard init (of="init") or the Adam learning rate (of="lr"):
    llmjax.model.mup.multipliers over this model's spec and its base model's."""
    from llmjax.model import mup

    return mup.multipliers(cfg, model_spec(cfg), model_spec(mup.mup_base_config(cfg)) if cfg.mup_base_width else None,
                           of)


# --- input checks ------------------------------------------------------------------------

def check_inputs(tokens, cfg: ModelConfig, positions=None, *, token_types=None, token_mask=None) -> None:
    """Raise a clear error for a sequence longer than the model allows, a token outside the vocab,
    a position outside the learned position table, a token type outside the type table, or token types /
    a token mask not shaped like the tokens.

    The length is a shape and is always checked. Values are checked when they are concrete
    (eager call, NumPy input); inside `jit` they are traced and cannot be inspected.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq] integers, got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
    seq_len = tokens.shape[1]
    if seq_len > cfg.max_seq_len:
        raise ValueError(
            f"sequence length {seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}; "
            f"truncate the input or use a config with a longer max_seq_len"
        )
    for name, value in (("positions", positions), ("token_types", token_types), ("token_mask", token_mask)):
        if value is not None and tuple(value.shape) != tuple(tokens.shape):
            raise ValueError(f"{name} have shape {tuple(value.shape)}, expected the tokens' {tuple(tokens.shape)}")
    if token_types is not None:
        if not cfg.type_vocab_size:
            raise ValueError("token_types given, but this model has no token-type embedding (type_vocab_size=0)")
        bad = _outside(token_types, 0, cfg.type_vocab_size)
        if bad is not None:
            raise ValueError(f"token type {bad} is outside the model's [0, {cfg.type_vocab_size}) (type_vocab_size)")
    bad = _outside(tokens, 0, cfg.vocab_size)
    if bad is not None:
        raise ValueError(
            f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); "
            f"the tokenizer and ModelConfig.vocab_size disagree"
        )
    if positions is not None and cfg.positions == "learned":
        bad = _outside(positions, 0, cfg.max_seq_len)
        if bad is not None:
            raise ValueError(
                f"position {bad} is outside the learned position table [0, {cfg.max_seq_len}) (max_seq_len)"
            )


def _outside(values, low: int, high: int) -> int | None:
    """The first offending extreme of concrete `values` outside [low, high), else None (also for tracers)."""
    if isinstance(values, jax.core.Tracer) or values.size == 0:
        return None
    values = np.asarray(values)
    smallest, largest = int(values.min()), int(values.max())
    if smallest < low:
        return smallest
    return largest if largest >= high else None


# --- forward -----------------------------------------------------------------------------

ACTIVATION_AXES = ("batch", "length", "embed")  # block inputs and outputs, laid out by the active sharding rules

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # the same matmul outputs as dots_no_batch, kept in pinned host memory instead of on the device
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host"),
}


def remat_policy(cfg: ModelConfig):
    """The jax.checkpoint policy of cfg.remat (None for "none"): a named table entry, or for "names" the
    intermediates of `block` listed in cfg.remat_save (kept) and cfg.remat_offload (moved to pinned host memory)."""
    if cfg.remat == "none":
        return None
    if cfg.remat == "names":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=list(cfg.remat_save), names_which_can_be_offloaded=list(cfg.remat_offload),
            offload_src="device", offload_dst="pinned_host")
    return REMAT_POLICIES[cfg.remat]


def block(params: dict, x: jax.Array, positions: jax.Array, cfg: ModelConfig, attend=None, *,
          segment_ids: jax.Array | None = None, rng: jax.Array | None = None) -> tuple[jax.Array, object, dict]:
    """One Transformer block, x [batch, seq, d_model] -> (x, cache, MoE metrics).

    Pre-norm: x + attention(norm(x)), then + feed_forward(norm(x)); post-norm (cfg.norm_position="post", BERT):
    norm(x + attention(x)), then norm(x + feed_forward(x)), the same two norms. The one block of training, scoring,
    prefill, decode, speculative verification, paged serving and encoding: they differ only in
    - `attend`, how attention reads and writes its cache (llmjax.model.attention.attention_layer; default: causal
      self-attention within segment_ids, no cache), whose cache comes back as the second result;
    - the weight layout: separate q / k / v kernels (training) or fused ones (decoding), read by the layers;
    - the feed-forward: params["mlp"] (dense) or params["moe"] (Mixture-of-Experts, with this layer's metrics as
      the third result; {} for a dense block). rng: router jitter / noise while training.
    Profiles read "attention/qkv", "attention/rope", "attention/core", "attention/out_proj", "mlp"; remat policies
    can keep or offload the checkpoint names "block_input", "query", "key", "value", "attention_output", "mlp_hidden",
    "attention_residual" and "block_output" (REMAT_NAMES). "block_input" is what a scan over remat'd blocks keeps
    between the forward and the backward pass (one [batch, seq, d_model] per layer): offloading it alone moves the
    whole stack of layer-boundary residuals to the host."""
    x = checkpoint_name(x, "block_input")
    pre = cfg.norm_position == "pre"  # else post-norm (BERT): norm(x + attention(x)), then norm(x + mlp(x))
    with jax.named_scope("attention"):
        h = norm(params["attn_norm"], x, cfg) if pre else x
        y, cache = attention_layer(params["attn"], h, positions, cfg, attend, segment_ids=segment_ids)
    x = checkpoint_name(x + y, "attention_residual")
    if not pre:
        x = norm(params["attn_norm"], x, cfg)
    with jax.named_scope("mlp"):
        h = norm(params["mlp_norm"], x, cfg) if pre else x
        if "moe" in params:
            y, metrics = moe_layer(params["moe"], h, cfg, rng)
        else:
            y, metrics = mlp(params["mlp"], h, cfg), {}
    x = x + y if pre else norm(params["mlp_norm"], x + y, cfg)
    return checkpoint_name(x, "block_output"), cache, metrics


def hidden_states(
    params: dict,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    token_types: jax.Array | None = None,
    token_mask: jax.Array | None = None,
) -> jax.Array:
    """tokens [batch, seq] -> final hidden states [batch, seq, d_model] in the compute dtype: what an encoder
    outputs, and what pooling (llmjax.model.pooling) turns into one vector per sequence for any model.

    token_types: [batch, seq] segment A / B ids of a BERT-style model (default all 0). token_mask: [batch, seq],
    True (1) at real tokens and False (0) at padding (Hugging Face's attention_mask): no real token attends to
    padding, so a padded batch gives each sequence's own hidden states (padding rows are garbage: ignore them)."""
    return hidden_states_and_moe_metrics(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                                         token_types=token_types, token_mask=token_mask)[0]


def _cast_for_compute(params: dict, cfg: ModelConfig) -> dict:
    """Every parameter in the compute dtype, except MoE routers, which stay in cfg.router_dtype."""
    dtype, router_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.router_dtype)
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.astype(router_dtype if any(getattr(k, "key", None) == "router" for k in path) else dtype),
        params,
    )


def hidden_states_and_moe_metrics(
    params: dict,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    rng: jax.Array | None = None,
    token_types: jax.Array | None = None,
    token_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """(final hidden states [batch, seq, d_model], MoE metrics); token_types, token_mask as in `hidden_states`.

    MoE metrics (empty for dense models): llmjax.model.moe's per-layer metrics, each stacked on a
    leading [num_moe_layers] axis. rng: for router jitter / noise while training (None: none).
    """
    check_inputs(tokens, cfg, positions, token_types=token_types, token_mask=token_mask)
    batch, seq_len = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    x = embedding(params["embed"]["token"].astype(cfg.compute_dtype), tokens)  # [batch, seq, d_model]
    return hidden_states_from_embeddings(params, x, cfg, positions=positions, segment_ids=segment_ids, rng=rng,
                                         token_types=token_types, token_mask=token_mask)


def hidden_states_from_embeddings(
    params: dict,
    x: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    rng: jax.Array | None = None,
    token_types: jax.Array | None = None,
    token_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """The stack on input embeddings x [batch, seq, d_model] (token embeddings, or any vectors: memory tokens,
    image patches) at positions [batch, seq] -> (final hidden states, MoE metrics), as
    `hidden_states_and_moe_metrics` (which embeds tokens and calls this). Learned position and token-type
    embeddings are added, and the embedding norm applied, here."""
    params = _cast_for_compute(params, cfg) if cfg.is_moe else jax.tree.map(lambda p: p.astype(cfg.compute_dtype), params)
    x = x.astype(cfg.compute_dtype)
    if cfg.positions == "learned":
        x = x + embedding(params["embed"]["position"], positions)
    if cfg.type_vocab_size:
        types = jnp.zeros(x.shape[:2], jnp.int32) if token_types is None else token_types  # [batch, seq]
        x = x + embedding(params["embed"]["token_type"], types)
    if cfg.embedding_norm:
        x = norm(params["embed"]["norm"], x, cfg)
    segment_ids = masked_segment_ids(segment_ids, token_mask)

    x = constrain(x, ACTIVATION_AXES)

    def scan_step(x, layer_params):
        x, _, _ = block(layer_params, x, positions, cfg, segment_ids=segment_ids)
        return constrain(x, ACTIVATION_AXES), None

    if cfg.is_moe:
        x, moe_metrics = _moe_stack(params, x, positions, segment_ids, cfg, rng)
        return final_norm(params, x, cfg), moe_metrics
    unroll = scan_unroll(cfg, compute_platform(x))
    if cfg.remat != "none":
        # A scan unrolled whole runs once, so XLA inlines it and, without the barrier, would merge the backward
        # pass's recomputation with the forward pass (common-subexpression elimination): no memory saved.
        scan_step = jax.checkpoint(scan_step, policy=remat_policy(cfg), prevent_cse=unroll >= cfg.num_layers)
    x, _ = jax.lax.scan(scan_step, x, params["blocks"], unroll=unroll)
    return final_norm(params, x, cfg), {}


def final_norm(params: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The norm after the last pre-norm block; post-norm blocks end normed (and cfg.final_norm=False encoders end
    unnormed), so x as it is."""
    return norm(params["final_norm"], x, cfg) if cfg.norm_position == "pre" and cfg.final_norm else x


PADDING_SEGMENT = -1  # the segment id padding gets: it attends only to itself, and no real token to it


def masked_segment_ids(segment_ids: jax.Array | None, token_mask: jax.Array | None) -> jax.Array | None:
    """Segment ids [batch, seq] with padding (token_mask False) moved to a segment of its own, so the attention
    masks that segments already drive (every attention_impl supports them) keep real tokens off padding: the key
    padding mask of an encoder, and of a decoder on a left- or right-padded batch. No mask: segment_ids as given."""
    if token_mask is None:
        return segment_ids
    segment_ids = jnp.zeros(token_mask.shape, jnp.int32) if segment_ids is None else segment_ids
    return jnp.where(jnp.asarray(token_mask, bool), segment_ids, PADDING_SEGMENT)


def scan_unroll(cfg: ModelConfig, platform: str) -> int:
    """Blocks per scan iteration: cfg.scan_unroll, or for 0 (auto) all of them on GPUs (faster steps: no per-layer
    copies into stacked residuals; docs/perf.md, training speed) and one elsewhere (CPU compile time stays flat
    in depth)."""
    if cfg.scan_unroll == 0:
        return cfg.num_layers if platform == "gpu" else 1
    return min(cfg.scan_unroll, cfg.num_layers)


def _moe_stack(params, x, positions, segment_ids, cfg: ModelConfig, rng):
    """The blocks of an MoE model: a scan over groups of moe_every blocks (an inner scan over the
    group's dense blocks, then its MoE block), so compile time stays flat in depth; remat per block."""

    def dense_step(x, layer_params):
        x, _, _ = block(layer_params, x, positions, cfg, segment_ids=segment_ids)
        return constrain(x, ACTIVATION_AXES), None

    def moe_step(x, layer_params, layer_rng):
        x, _, metrics = block(layer_params, x, positions, cfg, segment_ids=segment_ids, rng=layer_rng)
        return constrain(x, ACTIVATION_AXES), metrics

    if cfg.remat != "none":
        dense_step = jax.checkpoint(dense_step, policy=remat_policy(cfg), prevent_cse=False)
        moe_step = jax.checkpoint(moe_step, policy=remat_policy(cfg), prevent_cse=False)

    def group_step(x, group):
        dense_params, moe_params, index = group
        if dense_params is not None:
            x, _ = jax.lax.scan(dense_step, x, dense_params)
        return moe_step(x, moe_params, None if rng is None else jax.random.fold_in(rng, index))

    groups = cfg.num_layers // cfg.moe_every
    return jax.lax.scan(group_step, x, (params.get("blocks"), params["moe_blocks"], jnp.arange(groups)))


def output_embedding(params: dict, cfg: ModelConfig) -> jax.Array:
    """The [d_model, padded_vocab] matrix that maps hidden states to logits."""
    return params["embed"]["token"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]


def logits_from_hidden(params: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """[batch, seq, d_model] -> float32 logits [batch, seq, padded_vocab], padding columns at the
    lowest float so they never win a softmax or a sample."""
    w = output_embedding(params, cfg).astype(x.dtype)
    logits = jnp.einsum("bsd,dv->bsv", x, w, preferred_element_type=jnp.float32)
    in_vocab = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
    return jnp.where(in_vocab, logits, jnp.finfo(jnp.float32).min)


def forward(
    params: dict,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """tokens [batch, seq] -> logits [batch, seq, padded_vocab] (float32).

    positions: [batch, seq] position of each token (default 0..seq-1); restart them per document
        when packing. segment_ids: [batch, seq] document id of each token; tokens attend only
        within their own segment.
    """
    x = hidden_states(params, tokens, cfg, positions=positions, segment_ids=segment_ids)
    return logits_from_hidden(params, x, cfg)
