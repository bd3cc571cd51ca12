"""Multi-head attention with grouped-query heads, causal / sliding-window / segment masking.

`attention_layer` projects, rotates, attends through a cache-aware `attend` and projects back
(llmjax.model.transformer.block); `dot_product_attention` is the one entry point for the attention
core, with the implementation chosen by name: "xla" (llmjax.nn's scaled_dot_product_attention),
"cudnn" (jax.nn.dot_product_attention), "pallas" (our flash attention), "pallas_fp8" (its FP8 forward, for
inference on Hopper), "performer" (FAVOR+ linear attention, llmjax.nn.performer: an approximation) or "auto".
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llmjax.config import ModelConfig
from llmjax.kernels.flash_attention.reference import attention_mask
from llmjax.kernels.platform import compute_platform
from llmjax.model.layers import dense, fp8_state_spec, residual_std
from llmjax.model.params import ParamSpec, normal, zeros
from llmjax.model.rope import apply_rope
from llmjax.nn import scaled_dot_product_attention
from llmjax.parallel.logical import active_rules, mesh_axis_for


def attention_spec(cfg: ModelConfig) -> dict:
    d, h, kv, hd, dtype = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype

    def projection(shape, axes, std):
        spec = {"kernel": ParamSpec(shape, axes, normal(std), dtype), **fp8_state_spec(cfg)}
        if cfg.attention_bias:
            out_shape, out_axes = (shape[1:], axes[1:]) if axes[0] == "embed" else (shape[-1:], axes[-1:])
            spec["bias"] = ParamSpec(out_shape, out_axes, zeros, dtype)
        return spec

    return {
        "q": projection((d, h, hd), ("embed", "heads", "head_dim"), cfg.init_std),
        "k": projection((d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std),
        "v": projection((d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std),
        "o": projection((h, hd, d), ("heads", "head_dim", "embed"), residual_std(cfg)),
    }


def _xla_attention(q, k, v, *, causal, sliding_window, q_segment_ids, kv_segment_ids, logit_softcap):
    """llmjax.nn.scaled_dot_product_attention with the model's masks as one boolean mask."""
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, sliding_window=sliding_window,
                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)  # [batch or 1, q_len, kv_len]
    return scaled_dot_product_attention(q, k, v, mask=mask[:, None], logit_softcap=logit_softcap)


def _cudnn_attention(q, k, v, *, causal, sliding_window, q_segment_ids, kv_segment_ids, logit_softcap):
    """jax.nn.dot_product_attention's cuDNN flash attention (segments become a boolean mask)."""
    mask = None
    if q_segment_ids is not None:
        mask = attention_mask(q.shape[1], k.shape[1], causal=False, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids)[:, None]  # [batch, 1, q_len, kv_len]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, local_window_size=window,
                                        implementation="cudnn")


def _pallas_attention(q, k, v, **masking):
    from llmjax.kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, **masking)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_forward(q, k, v, masking: tuple):
    """The Hopper FP8 forward on per-tensor e4m3 copies of q, k, v (current scaling, llmjax.nn.fp8's scales)."""
    from llmjax.kernels.flash_attention.mosaic_gpu import flash_attention_fp8_forward
    from llmjax.nn.fp8 import E4M3, quantize, scale_for

    scales = [scale_for(jnp.max(jnp.abs(x)), E4M3) for x in (q, k, v)]
    q8, k8, v8 = (quantize(x, scale, E4M3) for x, scale in zip((q, k, v), scales))
    return flash_attention_fp8_forward(q8, k8, v8, *scales, out_dtype=q.dtype, **dict(masking))


def _fp8_forward_fwd(q, k, v, masking):
    return _fp8_forward(q, k, v, masking), None


def _fp8_forward_bwd(masking, residuals, d_out):
    raise ValueError("attention_impl='pallas_fp8' is a forward for inference and has no gradient: train with "
                     "'pallas', 'cudnn' or 'auto'")


_fp8_forward.defvjp(_fp8_forward_fwd, _fp8_forward_bwd)


def _pallas_fp8_attention(q, k, v, **masking):
    """Our FP8 forward where it takes the call (head_dim 128, no segment ids, the kernel's lengths), else our bf16
    flash attention with a warning."""
    from llmjax.kernels.flash_attention.mosaic_gpu import supported_fp8

    probe = [jax.ShapeDtypeStruct(x.shape, jnp.float8_e4m3fn) for x in (q, k, v)]
    reason = "segment ids" if masking["q_segment_ids"] is not None else supported_fp8(
        *probe, causal=masking["causal"], sliding_window=masking["sliding_window"],
        logit_softcap=masking["logit_softcap"])
    if reason:
        warnings.warn(f"attention_impl='pallas_fp8' cannot run this call ({reason}): using 'pallas'", stacklevel=3)
        return _pallas_attention(q, k, v, **masking)
    kept = ("causal", "sliding_window", "logit_softcap")
    return _fp8_forward(q, k, v, tuple((name, masking[name]) for name in kept))


PERFORMER_SEED = 0  # attention_impl="performer" draws its projection from jax.random.key(PERFORMER_SEED)


def _performer_attention(q, k, v, *, causal, sliding_window, q_segment_ids, kv_segment_ids, logit_softcap,
                         num_features: int = 256):
    """FAVOR+ linear attention (llmjax.nn.performer) with `num_features` random features (cfg.performer_features,
    bound by dot_product_attention) drawn once from a fixed key: the same features at every step and layer."""
    from llmjax.nn.performer import fixed_projection, performer_attention

    unsupported = [name for name, value in (("segment ids", q_segment_ids if q_segment_ids is not None
                                                            else kv_segment_ids),
                                            ("sliding_window", sliding_window), ("logit_softcap", logit_softcap))
                   if value is not None]
    if unsupported:
        raise ValueError(f"attention_impl='performer' (FAVOR+ linear attention) supports no {', '.join(unsupported)}:"
                         f" use another attention_impl (e.g. 'xla'), or unset them")
    projection = fixed_projection(num_features, q.shape[-1], PERFORMER_SEED)  # [M, head_dim] float32 constant
    return performer_attention(q, k, v, jnp.asarray(projection), causal=causal)


ATTENTION_IMPLS = {"xla": _xla_attention, "cudnn": _cudnn_attention, "pallas": _pallas_attention,
                   "pallas_fp8": _pallas_fp8_attention, "performer": _performer_attention}


CUDNN_DTYPES = ("bfloat16", "float16")


def _unavailable_reason(impl: str, platform: str, logit_softcap, head_dim: int | None,
                        dtype: str | None = None) -> str | None:
    """Why `impl` cannot run here (None when it can)."""
    if impl in ("cudnn", "pallas", "pallas_fp8") and platform != "gpu":
        return f"{impl!r} attention needs a CUDA GPU, this is {platform!r}"
    if impl == "cudnn" and logit_softcap is not None:
        return "cuDNN attention has no logit soft-capping"
    if impl == "cudnn" and dtype is not None and dtype not in CUDNN_DTYPES:
        return f"cuDNN attention needs bfloat16 or float16 inputs, got {dtype}"
    if impl == "cudnn" and head_dim is not None and (head_dim % 8 or head_dim > 256):
        return f"cuDNN attention needs head_dim a multiple of 8 up to 256, got {head_dim}"
    if impl in ("pallas", "pallas_fp8"):
        try:
            from llmjax.kernels.flash_attention import flash_attention  # noqa: F401
        except ImportError:
            return "the Pallas flash-attention kernel is not available in this build"
    return None


@functools.lru_cache(maxsize=None)
def resolve_attention_impl(impl: str, platform: str, logit_softcap: float | None = None,
                           head_dim: int | None = None, dtype: str | None = None) -> str:
    """The implementation that runs: "auto" picks the fastest for the platform and dtype (cuDNN for half
    precision on a GPU, else XLA); one named that cannot run here falls back to "xla" with a warning (never
    silently)."""
    if impl == "auto":
        impl = "cudnn" if platform == "gpu" and logit_softcap is None and dtype in (None, *CUDNN_DTYPES) else "xla"
    reason = _unavailable_reason(impl, platform, logit_softcap, head_dim, dtype)
    if reason is not None:
        warnings.warn(f"{reason}; using the 'xla' reference attention instead", stacklevel=3)
        return "xla"
    return impl


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    logit_softcap: float | None = None,
    impl: str = "xla",
    performer_features: int = 256,
) -> jax.Array:
    """Attention by the named implementation; q [batch, q_len, heads, head_dim], k, v
    [batch, kv_len, kv_heads, head_dim] -> [batch, q_len, heads, head_dim]. See
    kernels.flash_attention.reference for the masking arguments. performer_features: the random features of
    impl="performer" (cfg.performer_features), ignored by the others.

    When the active sharding rules cut the sequence over a mesh axis (llmjax.parallel, strategy
    "sp"), this is ring attention over that axis whatever `impl` says.
    """
    if mesh_axis_for("length") is not None:
        if impl == "performer":
            raise ValueError("attention_impl='performer' has no sequence-parallel form: the ring attention of "
                             "strategy 'sp' is exact attention; use another strategy or attention_impl")
        from llmjax.parallel.ring_attention import sharded_ring_attention

        mesh, rules = active_rules()
        return sharded_ring_attention(q, k, v, mesh=mesh, rules=rules, causal=causal, sliding_window=sliding_window,
                                      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                      logit_softcap=logit_softcap)
    impl = resolve_attention_impl(impl, compute_platform(q), logit_softcap, q.shape[-1], q.dtype.name)
    attend = ATTENTION_IMPLS[impl]
    if impl == "performer":
        attend = functools.partial(attend, num_features=performer_features)
    return attend(q, k, v, causal=causal, sliding_window=sliding_window, q_segment_ids=q_segment_ids,
                  kv_segment_ids=kv_segment_ids, logit_softcap=logit_softcap)


def project_qkv(params: dict, x: jax.Array, positions: jax.Array, cfg: ModelConfig):
    """x [batch, seq, d_model] -> q [batch, seq, heads, head_dim], k, v [batch, seq, kv_heads, head_dim], q and k
    rotated at positions [batch, seq] and each tagged with its checkpoint name ("query", "key", "value").

    params: the training layout {"q", "k", "v", "o"} (kernels [d_model, heads, head_dim]), or the decoding layout
    {"qkv", "o"} with q / k / v fused into one [d_model, (heads + 2 kv_heads) * head_dim] matrix
    (llmjax.infer.decode_model.prepare_params): one matmul per step instead of three."""
    with jax.named_scope("qkv"):
        if "qkv" in params:
            q, k, v = jnp.split(dense(params["qkv"], x, precision=cfg.matmul_precision),
                                [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
            q = q.reshape(*x.shape[:-1], cfg.num_heads, cfg.head_dim)
            k = k.reshape(*x.shape[:-1], cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(*x.shape[:-1], cfg.num_kv_heads, cfg.head_dim)
        else:
            q, k, v = (dense(params[name], x, precision=cfg.matmul_precision) for name in ("q", "k", "v"))
    if cfg.positions == "rope":
        with jax.named_scope("rope"):
            q, k = apply_rope(q, positions, cfg), apply_rope(k, positions, cfg)
    if cfg.mup_base_width:  # µP (llmjax.model.mup): logits q.k / head_dim (the attention cores divide by sqrt(head_dim))
        q = q * jnp.asarray(cfg.head_dim ** -0.5, q.dtype)
    return checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")


def project_out(params: dict, out: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The attention core's output [batch, seq, heads, head_dim] -> [batch, seq, d_model], through the output
    kernel [heads, head_dim, d_model] (training layout) or [heads * head_dim, d_model] (decoding layout)."""
    with jax.named_scope("out_proj"):
        if len(params["o"]["kernel"].shape) == 3:
            return dense(params["o"], out, in_dims=2, precision=cfg.matmul_precision)
        return dense(params["o"], out.reshape(*out.shape[:-2], cfg.q_size), precision=cfg.matmul_precision)


def attention_layer(params: dict, x: jax.Array, positions: jax.Array, cfg: ModelConfig, attend=None, *,
                    segment_ids: jax.Array | None = None):
    """Self-attention x [batch, seq, d_model] -> ([batch, seq, d_model], cache): project, rotate, attend, project.

    attend: (q [batch, seq, heads, head_dim], k, v [batch, seq, kv_heads, head_dim]) -> (out [batch, seq, heads,
    head_dim], cache): how the core reads and writes a KV cache (llmjax.infer passes closures over a contiguous or
    paged cache); default `causal_self_attention(cfg, segment_ids)`, no cache (None)."""
    attend = attend or causal_self_attention(cfg, segment_ids)
    q, k, v = project_qkv(params, x, positions, cfg)
    with jax.named_scope("core"):
        out, cache = attend(q, k, v)
    return project_out(params, checkpoint_name(out, "attention_output"), cfg), cache


def causal_self_attention(cfg: ModelConfig, segment_ids: jax.Array | None = None):
    """The `attend` of a whole sequence with no cache (training, scoring, encoding): (q, k, v) -> (out, None), causal
    (bidirectional for an encoder: cfg.causal=False), within cfg.sliding_window and within each segment (segment_ids
    [batch, seq] or None; padding is a segment of its own), by cfg.attention_impl."""

    def attend(q, k, v):
        return dot_product_attention(q, k, v, causal=cfg.causal, sliding_window=cfg.sliding_window,
                                     q_segment_ids=segment_ids, logit_softcap=cfg.attn_logit_softcap,
                                     impl=cfg.attention_impl, performer_features=cfg.performer_features), None

    return attend
