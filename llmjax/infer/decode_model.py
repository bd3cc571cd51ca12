"""The Transformer's cache-aware path: `prefill` a prompt into a KV cache, then `decode_step` one token.

The model's own block (llmjax.model.transformer.block) on every path: each passes the block an `attend` that
writes the layer's keys / values into the cache and reads it back with the decoding kernels:

- `prepare_params` casts the weights to the compute dtype once (the training forward casts its f32
  masters inside every call, which a decode step cannot afford: it would re-read them in f32), splits the
  stacked blocks into a per-layer list (each layer's cache is its own buffer, updated in place), and
  fuses q/k/v into one [d_model, (heads + 2 kv_heads) * head_dim] matrix and SwiGLU's gate/up into one,
  so a step launches fewer, larger matmuls.
- `prefill(dparams, tokens, valid, cache, cfg)`: tokens [batch, seq] with padding on either side
  (valid [batch, seq] marks the prompt tokens); positions restart at 0 at each row's first prompt token;
  attention is the model's own `dot_product_attention` with the padding as a segment. Returns the
  logits of each row's last prompt token [batch, padded_vocab] (float32) and the filled cache.
- `decode_step(dparams, tokens, cache, cfg)`: tokens [batch] -> (logits [batch, padded_vocab], cache).
  The attention core is `kernels.decode_attention` (Pallas split-K) on GPU, the jnp reference elsewhere.
- `extend_step(dparams, tokens, cache, cfg)`: tokens [batch, n] -> (logits [batch, n, padded_vocab], cache),
  n positions in one pass (speculative decoding's verification), each computed as decode_step would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.infer import kv_cache
from llmjax.kernels.decode_attention import decode_attention, decode_attention_reference
from llmjax.kernels.matmul_quant import QuantizedMatrix
from llmjax.kernels.platform import compute_platform
from llmjax.model.attention import causal_self_attention
from llmjax.model.layers import norm
from llmjax.model.transformer import block, layer_block_params
from llmjax.nn import embedding

DECODE_ATTENTION_IMPLS = ("auto", "xla", "pallas")


def prepare_params(params: dict, cfg: ModelConfig, fuse: bool = True) -> dict:
    """Decode-ready weights: compute dtype, one block dict per layer (the layout `block` reads), q/k/v fused
    into attn/qkv and SwiGLU's gate/up into mlp/gate_up (fuse=False keeps them separate, as trained:
    `bench_decode --layout` compares the two; docs/perf.md has the figures)."""
    dtype = jnp.dtype(cfg.compute_dtype)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731

    def layout(parts: list[dict], kernel_shape: tuple, names: tuple[str, ...], fused_name: str) -> dict:
        """Projections side by side along their outputs (one matmul where there were len(parts)), or as they are."""
        if not fuse:
            return {name: jax.tree.map(cast, part) for name, part in zip(names, parts)}
        entry = {"kernel": jnp.concatenate([cast(p["kernel"]).reshape(kernel_shape) for p in parts], axis=1)}
        if "bias" in parts[0]:
            entry["bias"] = jnp.concatenate([cast(p["bias"]).reshape(-1) for p in parts])
        return {fused_name: entry}

    layers = []
    for i in range(cfg.num_layers):
        layer = layer_block_params(params, cfg, i)
        attn, d = layer["attn"], cfg.d_model
        entry = {
            "attn_norm": jax.tree.map(cast, layer["attn_norm"]),
            "mlp_norm": jax.tree.map(cast, layer["mlp_norm"]),
            "attn": {**layout([attn["q"], attn["k"], attn["v"]], (d, -1), ("q", "k", "v"), "qkv"),
                     "o": {"kernel": cast(attn["o"]["kernel"]).reshape(cfg.q_size, d)}},
        }
        if "bias" in attn["o"]:
            entry["attn"]["o"]["bias"] = cast(attn["o"]["bias"])
        if "moe" in layer:  # an MoE block (llmjax.model.moe): experts in the compute dtype, router as is
            entry["moe"] = {name: value if name == "router" else jax.tree.map(cast, value)
                            for name, value in layer["moe"].items()}
        else:
            mlp_params = layer["mlp"]
            entry["mlp"] = {"down": jax.tree.map(cast, mlp_params["down"])}
            if cfg.activation == "swiglu":
                entry["mlp"].update(layout([mlp_params["gate"], mlp_params["up"]], (d, -1), ("gate", "up"), "gate_up"))
            else:
                entry["mlp"]["up"] = jax.tree.map(cast, mlp_params["up"])
        layers.append(entry)
    prepared = {"embed": jax.tree.map(cast, params["embed"]), "layers": layers,
                "final_norm": jax.tree.map(cast, params["final_norm"])}
    if "lm_head" in params:
        prepared["lm_head"] = jax.tree.map(cast, params["lm_head"])
    return prepared


def _embed(dparams: dict, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    x = embedding(dparams["embed"]["token"], tokens)
    if cfg.positions == "learned":
        x = x + embedding(dparams["embed"]["position"], jnp.clip(positions, 0, cfg.max_seq_len - 1))
    return x


def _logits(dparams: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """[batch, seq, d_model] -> float32 logits [batch, seq, padded_vocab], padding ids at the lowest float.
    Tied embeddings are contracted as stored ([vocab, d_model]): no transposed copy per step; an output head held
    as a QuantizedMatrix [d_model, padded_vocab] (llmjax.quant.model.quantized_decode_params' head="int8", tied or
    not) runs as `x @ head` in float32."""
    head = dparams.get("lm_head", {}).get("kernel")
    if isinstance(head, QuantizedMatrix):
        logits = x.astype(jnp.float32) @ head
    elif cfg.tie_embeddings:
        logits = jnp.einsum("bsd,vd->bsv", x, dparams["embed"]["token"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("bsd,dv->bsv", x, dparams["lm_head"]["kernel"], preferred_element_type=jnp.float32)
    in_vocab = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
    return jnp.where(in_vocab, logits, jnp.finfo(jnp.float32).min)


def resolve_decode_impl(impl: str, cfg: ModelConfig) -> str:
    """"auto": the Pallas kernel on GPUs (head_dim >= 16), the jnp reference elsewhere."""
    if impl not in DECODE_ATTENTION_IMPLS:
        raise ValueError(f"decode attention {impl!r}: expected one of {', '.join(DECODE_ATTENTION_IMPLS)}")
    if impl == "auto":
        on_gpu = compute_platform() == "gpu"
        return "pallas" if on_gpu and cfg.head_dim >= 16 else "xla"
    return impl


def prefill_layer(layer: dict, x: jax.Array, rope_positions: jax.Array, self_attend, cache: dict, i: int,
                  cfg: ModelConfig):
    """One block over the whole prompt x [batch, seq, d_model], attending to itself (self_attend: the prompt's
    causal_self_attention) and writing its keys / values into layer i of the cache: (x, cache)."""

    def attend(q, k, v):
        return self_attend(q, k, v)[0], kv_cache.write_prefill(cache, i, k, v)

    x, cache, _ = block(layer, x, rope_positions, cfg, attend)
    return x, cache


def decode_layer(layer: dict, x: jax.Array, cache: dict, i: int, cfg: ModelConfig, *, kv_positions: jax.Array,
                 kv_lengths: jax.Array, impl: str, pad=lambda a: a):
    """One block for one token per row, x [rows, 1, d_model] (rows >= the cache's batch: `pad` adds the extra
    zero rows): each row writes its token into layer i of the cache, then reads the whole cache: (x, cache).
    kv_positions [batch, capacity]: the cache's positions with this token's written in; impl "pallas" or "xla"."""
    batch = cache["next_position"].shape[0]
    positions = cache["next_position"]  # [batch]

    def attend(q, k, v):  # [rows, 1, ...]
        q, k, v = q[:batch, 0], k[:batch, 0], v[:batch, 0]
        new_cache = kv_cache.write_token(cache, i, k, v)
        entry = new_cache["layers"][i]
        options = dict(sliding_window=cfg.sliding_window, logit_softcap=cfg.attn_logit_softcap,
                       k_scale=entry.get("k_scale"), v_scale=entry.get("v_scale"))
        if impl == "pallas":
            out = decode_attention(q, entry["k"], entry["v"], kv_positions, positions, kv_lengths, **options)
        else:
            out = decode_attention_reference(q, entry["k"], entry["v"], kv_positions, positions, **options)
        return pad(out[:, None]), new_cache  # [rows, 1, heads, head_dim]

    x, cache, _ = block(layer, x, pad(positions)[:, None], cfg, attend)
    return x, cache


def prefill(dparams: dict, tokens: jax.Array, valid: jax.Array, cache: dict, cfg: ModelConfig):
    """Run the prompt tokens [batch, seq] (valid [batch, seq]) through the model into an empty cache.

    Returns (logits of each row's last prompt token [batch, padded_vocab] float32, cache)."""
    cache = kv_cache.set_prefill_layout(cache, valid)
    positions, _, _ = kv_cache.prompt_layout(valid)
    segment = valid.astype(jnp.int32)  # padding attends only to padding, prompt only to prompt
    x = _embed(dparams, tokens, positions, cfg)
    rope_positions = jnp.maximum(positions, 0)
    # Within a row, index differences equal position differences (padding sits at one end only), so the
    # model's causal + window masks by index are exact.
    self_attend = causal_self_attention(cfg, segment)
    for i, layer in enumerate(dparams["layers"]):
        with jax.named_scope(f"layer {i}"):
            x, cache = prefill_layer(layer, x, rope_positions, self_attend, cache, i, cfg)
    last = cache["next_slot"] - 1  # index of each row's last prompt token
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [batch, 1, d_model]
    x = norm(dparams["final_norm"], x, cfg)
    return _logits(dparams, x, cfg)[:, 0], cache


def decode_step(dparams: dict, tokens: jax.Array, cache: dict, cfg: ModelConfig, impl: str = "auto",
                min_rows: int | None = None):
    """One token per row, tokens [batch] -> (logits [batch, padded_vocab] float32, cache).

    min_rows: the projections run on at least this many rows (zero rows added; default 8 on GPUs, where
    XLA's single-row matrix-vector products read the weights markedly slower than its 8-row GEMMs do;
    the weights are read once either way)."""
    impl = resolve_decode_impl(impl, cfg)
    if min_rows is None:
        min_rows = 8 if compute_platform(tokens) == "gpu" else 1
    batch = tokens.shape[0]
    extra = max(0, min_rows - batch)
    pad = (lambda a: jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))) if extra else (lambda a: a)  # noqa: E731
    positions = cache["next_position"]  # [batch]
    x = pad(_embed(dparams, tokens[:, None], positions[:, None], cfg))  # [rows, 1, d_model]
    capacity = cache["positions"].shape[1]
    slot = cache["next_slot"] % capacity
    kv_positions = cache["positions"].at[jnp.arange(batch), slot].set(positions)
    kv_lengths = jnp.minimum(cache["next_slot"] + 1, capacity)
    for i, layer in enumerate(dparams["layers"]):
        with jax.named_scope(f"layer {i}"):
            x, cache = decode_layer(layer, x, cache, i, cfg, kv_positions=kv_positions, kv_lengths=kv_lengths,
                                    impl=impl, pad=pad)
    cache = kv_cache.advance(cache)
    x = norm(dparams["final_norm"], x, cfg)
    return _logits(dparams, x, cfg)[:batch, 0], cache


def extend_step(dparams: dict, tokens: jax.Array, cache: dict, cfg: ModelConfig, impl: str = "auto",
                min_rows: int | None = None):
    """n tokens per row at its next n positions, tokens [batch, n] -> (logits [batch, n, padded_vocab] float32,
    cache): token i attends to the cache and to tokens 0..i, so one pass scores n positions (speculative
    decoding verifies k drafts with it).

    Every position is computed as `decode_step` computes it, op for op: the batch * n tokens are the rows of
    decode's matrices (zero rows up to min_rows, as in decode_step: at batch * n <= 8 on a GPU the projections
    run on decode's own 8-row shapes), and the attention core is the same kernel with the same split layout
    (`decode_attention` with queries_per_row=n: each query at its own position and cache length). So on one
    device the logits equal n successive decode_steps' bit for bit wherever the GEMMs see the same shapes."""
    impl = resolve_decode_impl(impl, cfg)
    if min_rows is None:
        min_rows = 8 if compute_platform(tokens) == "gpu" else 1
    batch, count = tokens.shape
    rows = batch * count
    extra = max(0, min_rows - rows)
    pad = (lambda a: jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))) if extra else (lambda a: a)  # noqa: E731
    positions = cache["next_position"][:, None] + jnp.arange(count, dtype=jnp.int32)  # [batch, n]
    flat_positions = positions.reshape(rows)  # row r = batch r // n, token r % n
    x = pad(_embed(dparams, tokens.reshape(rows, 1), flat_positions[:, None], cfg))  # [rows, 1, d_model]
    capacity = cache["positions"].shape[1]
    offsets = jnp.arange(count, dtype=jnp.int32)
    slots = (cache["next_slot"][:, None] + offsets) % capacity
    kv_positions = cache["positions"].at[jnp.arange(batch)[:, None], slots].set(positions)
    kv_lengths = jnp.minimum(cache["next_slot"][:, None] + offsets + 1, capacity).reshape(rows)  # decode's, per token
    unflat = lambda a: a.reshape(batch, count, *a.shape[1:])  # noqa: E731
    for i, layer in enumerate(dparams["layers"]):

        def attend(q, k, v):  # [rows, 1, ...]: each row is one token, at its own position and cache length
            q, k, v = q[:rows, 0], k[:rows, 0], v[:rows, 0]
            new_cache = kv_cache.write_tokens(cache, i, unflat(k), unflat(v))
            entry = new_cache["layers"][i]
            options = dict(sliding_window=cfg.sliding_window, logit_softcap=cfg.attn_logit_softcap,
                           k_scale=entry.get("k_scale"), v_scale=entry.get("v_scale"), queries_per_row=count)
            if impl == "pallas":
                out = decode_attention(q, entry["k"], entry["v"], kv_positions, flat_positions, kv_lengths, **options)
            else:
                out = decode_attention_reference(q, entry["k"], entry["v"], kv_positions, flat_positions, **options)
            return pad(out[:, None]), new_cache  # [rows (padded), 1, heads, head_dim]

        with jax.named_scope(f"layer {i}"):
            x, cache, _ = block(layer, x, pad(flat_positions)[:, None], cfg, attend)
    cache = kv_cache.advance(cache, count)
    x = norm(dparams["final_norm"], x, cfg)
    return _logits(dparams, x, cfg)[:rows, 0].reshape(batch, count, -1), cache


prefill_jit = jax.jit(prefill, static_argnames=("cfg",), donate_argnames=("cache",))
decode_step_jit = jax.jit(decode_step, static_argnames=("cfg", "impl", "min_rows"), donate_argnames=("cache",))
