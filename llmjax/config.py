"""Model configuration: one frozen dataclass for the GPT-2 and LLaMA families, and named presets.

A `ModelConfig` is hashable, so it is passed to jitted functions as a static argument.
Derived sizes (`num_kv_heads`, `head_dim` when not given) are filled in on construction,
and every inconsistency is rejected there with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Norm = Literal["layernorm", "rmsnorm"]
NormPosition = Literal["pre", "post"]
Positions = Literal["learned", "rope"]
Activation = Literal["gelu_tanh", "gelu", "swiglu", "quick_gelu"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "offload", "names"]
AttentionImpl = Literal["auto", "xla", "cudnn", "pallas", "pallas_fp8", "performer"]
MoeImpl = Literal["capacity", "ragged_dot", "pallas"]

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("learned", "rope")
ACTIVATIONS = ("gelu_tanh", "gelu", "swiglu", "quick_gelu")  # gelu: the exact erf form (BERT); gelu_tanh: GPT-2's
# approximation; quick_gelu: x * sigmoid(1.702 x) (CLIP)
# offload: dots_no_batch saved to host memory; names: the named intermediates in remat_save kept on the device,
# those in remat_offload kept in host memory, everything else recomputed
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload", "names")
# The intermediates a block tags with jax.ad_checkpoint.checkpoint_name (llmjax.model.transformer.block).
REMAT_NAMES = ("block_input", "query", "key", "value", "attention_output", "mlp_hidden", "attention_residual",
               "block_output")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas", "pallas_fp8", "performer")
NORM_IMPLS = ("auto", "xla", "pallas")
ROPE_SCALINGS = ("linear", "llama3", "ntk", "yarn")
ROPE_LAYOUTS = ("half", "interleaved")
MOE_IMPLS = ("capacity", "ragged_dot", "pallas")
MATMUL_PRECISIONS = ("bf16", "fp8")
FP8_SCALINGS = ("current", "delayed")
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: numerical references (needs jax x64)


class ConfigError(ValueError):
    """A configuration whose fields do not fit together."""


@dataclass(frozen=True)
class RopeScaling:
    """Context extension for RoPE.

    `linear`: positions divided by `factor` (position interpolation).
    `llama3`: the frequency-dependent rescaling of Llama 3.1: long wavelengths divided by
    `factor`, short ones kept, the band between interpolated smoothly.
    `ntk`: NTK-aware scaling: theta raised to theta * factor ** (head_dim / (head_dim - 2)), every
    frequency kept in shape, the lowest divided by about `factor`.
    `yarn` (YaRN): per-dimension ramp between interpolation (dimensions with fewer than `beta_slow`
    rotations over original_max_seq_len) and none (more than `beta_fast`), plus the attention temperature:
    cos / sin multiplied by `attention_factor` (None: 0.1 * ln(factor) + 1).
    """

    kind: Literal["linear", "llama3", "ntk", "yarn"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn

    def __post_init__(self):
        if self.kind not in ROPE_SCALINGS:
            raise ConfigError(f"RopeScaling.kind={self.kind!r}: expected one of {ROPE_SCALINGS}")
        if not self.factor > 0:
            raise ConfigError(f"RopeScaling.factor={self.factor}: must be > 0")
        if self.kind in ("ntk", "yarn") and not self.factor > 1:
            raise ConfigError(f"RopeScaling.factor={self.factor}: {self.kind} extends the context, must be > 1")
        if self.kind == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise ConfigError(f"RopeScaling.beta_fast={self.beta_fast}, beta_slow={self.beta_slow}: "
                              "need beta_fast > beta_slow > 0")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ConfigError(f"RopeScaling.attention_factor={self.attention_factor}: must be > 0")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(
                f"RopeScaling.high_freq_factor={self.high_freq_factor} must be greater than "
                f"low_freq_factor={self.low_freq_factor}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Every size and switch of a Transformer: decoder-only, or a bidirectional encoder.

    GPT-2 family: LayerNorm, learned positions, GELU-tanh MLP, biases, tied embeddings.
    LLaMA family: RMSNorm, RoPE, SwiGLU MLP, no biases, grouped-query attention.
    BERT family (encoders: all-MiniLM-L6-v2): GPT-2's parts with causal=False (every token sees every other),
    post-norm blocks, exact GELU, token-type embeddings and a LayerNorm on the embeddings; hidden states out.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    num_kv_heads: int | None = None  # None: num_heads (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // num_heads
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    # "pre": x + f(norm(x)), a final norm after the last block (GPT-2, LLaMA); "post": norm(x + f(x)), no final
    # norm (the original Transformer, BERT)
    norm_position: NormPosition = "pre"
    # pre-norm only: the norm after the last block; False for an encoder whose outputs are the last block's as they
    # are (CLIP's vision tower: its post-layernorm is on the pooled token only, llmjax.model.vision)
    final_norm: bool = True
    causal: bool = True  # False: bidirectional attention (encoders); padding is masked by the caller's token_mask
    type_vocab_size: int = 0  # > 0: a learned token-type (segment A / B) embedding of this many rows (BERT: 2)
    embedding_norm: bool = False  # a norm on the summed embeddings before the first block (BERT)
    positions: Positions = "learned"
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    # which dimensions RoPE pairs: "half" (i, i + head_dim/2; Hugging Face LLaMA) or "interleaved" (2i, 2i + 1;
    # Meta's original weights, GPT-J, GGUF); see llmjax.nn.rope
    rope_layout: Literal["half", "interleaved"] = "half"
    activation: Activation = "gelu_tanh"
    attention_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    sliding_window: int | None = None  # a query sees at most this many keys, itself included
    max_seq_len: int = 1024
    vocab_multiple: int = 128  # the embedding is padded to a multiple of this for speed
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    # "fp8": the blocks' projections (q / k / v, attention output, MLP) contract in FP8 (llmjax.nn.fp8: e4m3
    # operands, e5m2 gradients, per-tensor scales); the embedding, the output head and the loss stay in the
    # compute dtype. "bf16": every matmul in the compute dtype.
    matmul_precision: str = "bf16"
    # FP8 scales: "delayed" (the largest amax of the last fp8_history steps, kept as a [3, fp8_history] parameter
    # beside each projection's kernel) or "current" (each tensor's own amax, no state; LoRA needs it). Delayed is
    # the default by measurement (docs/perf.md, "FP8 training"): 1,000 steps of llama-125m ended 0.84% above bf16's
    # validation loss against current scaling's 2.02%, and llama-1b's step ran 1% faster.
    fp8_scaling: str = "delayed"
    fp8_history: int = 16
    init_std: float = 0.02
    # µP (llmjax.model.mup): 0 = the standard parametrization; B > 0 = the maximal update parametrization relative to
    # a base model of width B (hidden weights' init std / sqrt(d_model / B) and Adam lr / (d_model / B), the output
    # head's init and lr / (d_model / B), attention logits q.k / head_dim), so a learning rate tuned at width B transfers
    mup_base_width: int = 0
    remat: RematPolicy = "none"
    remat_save: tuple[str, ...] = ()  # remat="names": intermediates (REMAT_NAMES) kept on the device
    remat_offload: tuple[str, ...] = ()  # remat="names": intermediates kept in pinned host memory
    # blocks per scan iteration: num_layers unrolls the stack (faster steps: no per-layer copies into stacked
    # residuals; compile time grows with depth); 0 = auto: every block on GPUs, one at a time elsewhere
    scan_unroll: int = 0
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2); None disables
    attention_impl: AttentionImpl = "auto"  # "auto": the fastest available here; see llmjax.model.attention
    performer_features: int = 256  # attention_impl="performer": FAVOR+ random features per head (llmjax.nn.performer)
    # the MLP applied to blocks of this many tokens of the sequence at a time (a scan; 0: all at once), so its
    # [tokens, d_ff] hidden never exists for the whole sequence (blockwise parallel Transformer)
    mlp_block_tokens: int = 0
    norm_impl: str = "auto"  # "xla", "pallas" (kernels/norms.py) or "auto": the fastest here; see llmjax.model.layers
    # Mixture-of-Experts (llmjax.model.moe); num_experts=0 keeps the dense MLP in every block.
    num_experts: int = 0
    experts_per_token: int = 2  # top-k: 1 is Switch, 2 is GShard / Mixtral
    renormalize_top_k: bool | None = None  # top-k weights divided by their sum; None: when top-k > 1 (Switch keeps p)
    num_shared_experts: int = 0  # experts every token goes through besides its top-k (one MLP of this many widths)
    moe_every: int = 1  # every moe_every-th block (the last of each group of moe_every) is MoE
    expert_d_ff: int | None = None  # hidden width of one expert; None: d_ff
    moe_impl: MoeImpl = "ragged_dot"  # "capacity": GShard dispatch einsum, drops over capacity; else dropless
    capacity_factor: float = 1.25  # capacity = ceil(capacity_factor * top-k * tokens / experts) per sequence
    router_jitter: float = 0.0  # training only: router input times uniform(1 - jitter, 1 + jitter) (Switch)
    router_noise: float = 0.0  # training only: std of Gaussian noise added to the router logits (noisy top-k)
    router_dtype: str = "float32"  # router logits and softmax in this dtype whatever the compute dtype
    moe_aux_loss_weight: float = 0.01  # Switch / GShard load-balancing loss (1.0 when perfectly balanced)
    moe_router_z_loss_weight: float = 0.001  # ST-MoE router z-loss: mean logsumexp(router logits)^2
    name: str = dataclasses.field(default="custom", compare=False)  # a label: not part of equality or the jit cache key

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len", "vocab_multiple"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ModelConfig.{field}={value!r}: must be a positive integer")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ConfigError(
                    f"ModelConfig.num_heads={self.num_heads} does not divide d_model={self.d_model}; "
                    f"choose num_heads dividing d_model or set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if self.num_kv_heads < 1 or self.head_dim < 1:
            raise ConfigError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} and head_dim={self.head_dim} must be positive"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}; "
                f"each key/value head must serve a whole group of query heads"
            )
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        for field in ("causal", "embedding_norm", "final_norm"):
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}: must be True or False")
        if not isinstance(self.type_vocab_size, (int, np.integer)) or isinstance(self.type_vocab_size, bool) \
                or self.type_vocab_size < 0:
            raise ConfigError(f"ModelConfig.type_vocab_size={self.type_vocab_size!r}: must be an integer >= 0 "
                              f"(0: no token-type embedding)")
        if not self.final_norm and (self.causal or self.norm_position != "pre"):
            raise ConfigError("ModelConfig.final_norm=False is for pre-norm encoders (causal=False, norm_position="
                              "'pre'): decoders end in a final norm, post-norm blocks have none to drop")
        if not isinstance(self.mup_base_width, (int, np.integer)) or isinstance(self.mup_base_width, bool) \
                or self.mup_base_width < 0:
            raise ConfigError(f"ModelConfig.mup_base_width={self.mup_base_width!r}: must be an integer >= 0 (0: the "
                              f"standard parametrization)")
        if self.mup_base_width and self.tie_embeddings:
            raise ConfigError("ModelConfig.mup_base_width is set but tie_embeddings=True: under µP the input embedding "
                              "and the output head scale differently; set tie_embeddings=False")
        if not self.causal and self.sliding_window is not None:
            raise ConfigError("ModelConfig.sliding_window is set but causal=False: a window looks back only; "
                              "unset one of them")
        if not self.causal and self.is_moe:
            raise ConfigError("ModelConfig: causal=False (an encoder) with num_experts > 0 is not supported; "
                              "use a dense MLP")
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        self._check_remat_names()
        if not isinstance(self.scan_unroll, int) or isinstance(self.scan_unroll, bool) or self.scan_unroll < 0:
            raise ConfigError(f"scan_unroll must be a non-negative integer (0: auto), got {self.scan_unroll!r}")
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        if self.performer_features < 2 or self.performer_features % 2:
            raise ConfigError(f"ModelConfig.performer_features={self.performer_features}: must be a positive even "
                              "number")
        if self.mlp_block_tokens < 0:
            raise ConfigError(f"ModelConfig.mlp_block_tokens={self.mlp_block_tokens}: must be >= 0 (0: off)")
        _check_choice("norm_impl", self.norm_impl, NORM_IMPLS)
        _check_choice("param_dtype", self.param_dtype, FLOAT_DTYPES)
        _check_choice("compute_dtype", self.compute_dtype, FLOAT_DTYPES)
        _check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        _check_choice("fp8_scaling", self.fp8_scaling, FP8_SCALINGS)
        if self.fp8_history < 1:
            raise ConfigError(f"ModelConfig.fp8_history={self.fp8_history}: delayed scaling keeps at least one amax")
        _check_choice("rope_layout", self.rope_layout, ROPE_LAYOUTS)
        if self.rope_scaling is not None and self.positions != "rope":
            raise ConfigError("ModelConfig.rope_scaling is set but positions is not 'rope'")
        if not self.rope_theta > 0:
            raise ConfigError(f"ModelConfig.rope_theta={self.rope_theta}: must be > 0")
        if not self.norm_eps > 0:
            raise ConfigError(f"ModelConfig.norm_eps={self.norm_eps}: must be > 0")
        if self.attn_logit_softcap is not None and not self.attn_logit_softcap > 0:
            raise ConfigError(f"ModelConfig.attn_logit_softcap={self.attn_logit_softcap}: must be > 0 or None")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"ModelConfig.sliding_window={self.sliding_window}: must be >= 1 or None")
        self._check_moe()

    def _check_remat_names(self) -> None:
        for field in ("remat_save", "remat_offload"):
            names = getattr(self, field)
            if isinstance(names, str):  # "query,key" from a command line
                names = [name.strip() for name in names.split(",") if name.strip()]
            names = tuple(names)
            unknown = [name for name in names if name not in REMAT_NAMES]
            if unknown:
                raise ConfigError(f"ModelConfig.{field}: unknown intermediate(s) {', '.join(map(repr, unknown))}; "
                                  f"the named ones are {', '.join(REMAT_NAMES)}")
            object.__setattr__(self, field, names)
        both = set(self.remat_save) & set(self.remat_offload)
        if both:
            raise ConfigError(f"ModelConfig: {', '.join(sorted(both))} in both remat_save and remat_offload")
        if (self.remat_save or self.remat_offload) and self.remat != "names":
            raise ConfigError(f"ModelConfig.remat_save / remat_offload are set but remat={self.remat!r}; "
                              f"use remat='names' to choose the saved intermediates by name")

    def _check_moe(self) -> None:
        for field in ("num_experts", "num_shared_experts"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"ModelConfig.{field}={value!r}: must be an integer >= 0")
        if self.num_experts == 0:
            return
        if self.experts_per_token < 1 or self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"ModelConfig.experts_per_token={self.experts_per_token}: top-k must be between 1 and "
                f"num_experts={self.num_experts}"
            )
        if self.moe_every < 1 or self.num_layers % self.moe_every:
            raise ConfigError(
                f"ModelConfig.moe_every={self.moe_every} must be >= 1 and divide num_layers={self.num_layers} "
                f"(the blocks are scanned in groups of moe_every whose last block is MoE)"
            )
        if self.expert_d_ff is not None and self.expert_d_ff < 1:
            raise ConfigError(f"ModelConfig.expert_d_ff={self.expert_d_ff}: must be a positive integer or None")
        _check_choice("moe_impl", self.moe_impl, MOE_IMPLS)
        _check_choice("router_dtype", self.router_dtype, FLOAT_DTYPES)
        if not self.capacity_factor > 0:
            raise ConfigError(
                f"ModelConfig.capacity_factor={self.capacity_factor}: must be > 0 (1.0 gives each expert its "
                f"even share of tokens; for no drops at all use moe_impl='ragged_dot' or 'pallas')"
            )
        if not 0 <= self.router_jitter < 1:
            raise ConfigError(f"ModelConfig.router_jitter={self.router_jitter}: must be within [0, 1)")
        if not self.router_noise >= 0:
            raise ConfigError(f"ModelConfig.router_noise={self.router_noise}: must be >= 0")
        for field in ("moe_aux_loss_weight", "moe_router_z_loss_weight"):
            if not getattr(self, field) >= 0:
                raise ConfigError(f"ModelConfig.{field}={getattr(self, field)}: must be >= 0")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding: vocab_size rounded up to vocab_multiple (extra logits are masked)."""
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_width(self) -> int:
        """Hidden width of one expert (expert_d_ff, else d_ff)."""
        return self.expert_d_ff or self.d_ff

    @property
    def top_k_renormalized(self) -> bool:
        """Whether the router's top-k weights are divided by their sum (renormalize_top_k, default k > 1)."""
        return self.experts_per_token > 1 if self.renormalize_top_k is None else self.renormalize_top_k

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers // self.moe_every if self.is_moe else 0

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"ModelConfig.{field}={value!r}: expected one of {', '.join(map(repr, choices))}")


def check_expert_parallel(cfg: ModelConfig, expert_parallel: int) -> None:
    """Raise a ConfigError unless the experts split evenly over `expert_parallel` devices."""
    if cfg.is_moe and cfg.num_experts % expert_parallel:
        raise ConfigError(
            f"ModelConfig.num_experts={cfg.num_experts} does not divide over an expert-parallel size of "
            f"{expert_parallel} (the mesh's 'expert' axis); choose a multiple of {expert_parallel} experts "
            f"or an 'expert' axis size that divides {cfg.num_experts}"
        )


def count_params(cfg: ModelConfig, *, padded_vocab: bool = False, active: bool = False) -> int:
    """Parameter count from the closed-form formula (the specs in llmjax.model must agree).

    With padded_vocab=False the embedding counts vocab_size rows, as Hugging Face reports it.
    active=True: the parameters one token goes through (an MoE block counts its router, shared
    experts and top-k of its experts), the basis of its FLOPs.
    """
    d, f, layers = cfg.d_model, cfg.d_ff, cfg.num_layers
    vocab = cfg.padded_vocab_size if padded_vocab else cfg.vocab_size
    norm = d * (2 if cfg.norm == "layernorm" else 1)

    attention = d * cfg.q_size + 2 * d * cfg.kv_size + cfg.q_size * d
    if cfg.attention_bias:
        attention += cfg.q_size + 2 * cfg.kv_size + d
    mlp_matrices = 3 if cfg.activation == "swiglu" else 2
    mlp = mlp_matrices * d * f
    if cfg.mlp_bias:
        mlp += (mlp_matrices - 1) * f + d
    block = attention + mlp + 2 * norm
    blocks = layers * block
    if cfg.is_moe:
        def mlp_of_width(width: int) -> int:
            return mlp_matrices * d * width + ((mlp_matrices - 1) * width + d if cfg.mlp_bias else 0)

        experts = cfg.experts_per_token if active else cfg.num_experts
        moe_mlp = d * cfg.num_experts + experts * mlp_of_width(cfg.expert_width)  # router + experts
        if cfg.num_shared_experts:
            moe_mlp += mlp_of_width(cfg.num_shared_experts * cfg.expert_width)
        blocks += cfg.num_moe_layers * (moe_mlp - mlp)

    embeddings = vocab * d + (cfg.max_seq_len * d if cfg.positions == "learned" else 0)
    embeddings += cfg.type_vocab_size * d + (norm if cfg.embedding_norm else 0)
    final_norm = norm if cfg.norm_position == "pre" and cfg.final_norm else 0  # post-norm blocks end normed
    lm_head = 0 if cfg.tie_embeddings else d * vocab
    return embeddings + blocks + final_norm + lm_head


def _gpt2(name: str, d_model: int, num_layers: int, num_heads: int, **kw) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=50257,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        d_ff=4 * d_model,
        max_seq_len=1024,
        **kw,
    )


def _bert(name: str, d_model: int, num_layers: int, num_heads: int, d_ff: int, **kw) -> ModelConfig:
    """A BERT-style encoder: bidirectional, post-norm, exact GELU, token types, embedding LayerNorm."""
    defaults = dict(vocab_size=30522, max_seq_len=512, norm_eps=1e-12, norm_position="post", causal=False,
                    activation="gelu", type_vocab_size=2, embedding_norm=True)
    return ModelConfig(name=name, d_model=d_model, num_layers=num_layers, num_heads=num_heads, d_ff=d_ff,
                       **defaults | kw)


def _llama(name: str, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int, d_ff: int, **kw) -> ModelConfig:
    defaults = dict(
        vocab_size=32000,
        norm="rmsnorm",
        norm_eps=1e-5,
        positions="rope",
        activation="swiglu",
        attention_bias=False,
        mlp_bias=False,
        tie_embeddings=False,
        max_seq_len=2048,
    )
    defaults.update(kw)
    return ModelConfig(
        name=name,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        d_ff=d_ff,
        **defaults,
    )


_LLAMA3_ROPE = RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # GPT-2 (Radford et al. 2019) sizes.
        _gpt2("gpt2-124m", 768, 12, 12),
        _gpt2("gpt2-355m", 1024, 24, 16),
        _gpt2("gpt2-774m", 1280, 36, 20),
        _gpt2("gpt2-1.5b", 1600, 48, 25),
        # LLaMA-style, grouped-query attention throughout.
        _llama("llama-125m", 768, 12, 12, 4, 2048),
        _llama("llama-350m", 1024, 24, 16, 4, 2816),
        # Llama 3.2 1B / 3B shapes (tied embeddings, 128k vocab, Llama 3.1 RoPE scaling).
        _llama("llama-1b", 2048, 16, 32, 8, 8192, vocab_size=128256, tie_embeddings=True,
               rope_theta=500_000.0, rope_scaling=_LLAMA3_ROPE, max_seq_len=8192),
        _llama("llama-3b", 3072, 28, 24, 8, 8192, vocab_size=128256, tie_embeddings=True,
               rope_theta=500_000.0, rope_scaling=_LLAMA3_ROPE, max_seq_len=8192),
        # Mistral 7B shape (GQA with 8 kv heads, 32k vocab).
        _llama("llama-7b", 4096, 32, 32, 8, 14336, max_seq_len=4096),
        # Llama 3 8B shape.
        _llama("llama-8b", 4096, 32, 32, 8, 14336, vocab_size=128256, rope_theta=500_000.0, max_seq_len=8192),
        # A CPU-sized GPT-2 for quickstarts (about 3M parameters without the embedding).
        ModelConfig(name="gpt2-mini", vocab_size=50257, d_model=256, num_layers=4, num_heads=4, d_ff=1024,
                    max_seq_len=256, compute_dtype="float32"),
        # Tiny models for tests: awkward sizes on purpose.
        ModelConfig(name="gpt2-tiny", vocab_size=301, d_model=48, num_layers=2, num_heads=4, d_ff=144,
                    max_seq_len=64, vocab_multiple=64, compute_dtype="float32"),
        _llama("llama-tiny", 48, 2, 6, 2, 112, vocab_size=301, max_seq_len=64, vocab_multiple=64,
               compute_dtype="float32"),
        # Mixture-of-Experts (LLaMA blocks, Mixtral-style experts). llama-moe-125m: 8 experts top-2 of
        # half llama-125m's width each, so its active parameters and FLOPs per token equal llama-125m's.
        _llama("llama-moe-125m", 768, 12, 12, 4, 2048, num_experts=8, experts_per_token=2, expert_d_ff=1024),
        # Switch-style: one expert per token, MoE in every other block, capacity-based dispatch.
        _llama("switch-moe-125m", 768, 12, 12, 4, 2048, num_experts=8, experts_per_token=1, moe_every=2,
               moe_impl="capacity", capacity_factor=1.25),
        # A CPU / quick-GPU sized MoE for experiments (about 4M parameters without the embedding).
        _llama("llama-moe-mini", 256, 4, 4, 4, 1024, num_experts=8, experts_per_token=2, expert_d_ff=512,
               max_seq_len=256, compute_dtype="float32"),
        _llama("llama-moe-tiny", 48, 2, 6, 2, 112, vocab_size=301, max_seq_len=64, vocab_multiple=64,
               compute_dtype="float32", num_experts=4, experts_per_token=2, expert_d_ff=40),
        # BERT-style sentence encoders: all-MiniLM-L6-v2's shape (load its weights with `--hf all-minilm-l6-v2`),
        # and a tiny one for tests.
        _bert("minilm-l6", 384, 6, 12, 1536, compute_dtype="float32"),
        _bert("bert-tiny", 48, 2, 4, 88, vocab_size=301, max_seq_len=64, vocab_multiple=64, compute_dtype="float32"),
    ]
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with some fields changed: get_config("gpt2-124m", max_seq_len=2048)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


Schedule = Literal["cosine", "linear", "wsd", "constant"]
SCHEDULES = ("cosine", "linear", "wsd", "constant")
LOSS_IMPLS = ("auto", "forward_grad", "pallas", "xla")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings (AdamW through optax) and the shape of a training step.

    The learning rate warms up linearly from 0 over `warmup_steps`, then decays to
    `lr * min_lr_ratio` at `total_steps`: cosine, linear, constant, or WSD (constant, then a
    linear decay over the last `decay_fraction` of the steps).
    """

    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    total_steps: int = 1000
    schedule: Schedule = "cosine"
    decay_fraction: float = 0.2  # WSD only
    weight_decay: float = 0.1  # decoupled; matrices only (no norms, biases or embeddings)
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global-norm clipping; None disables
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many, scanned
    z_loss: float = 0.0  # weight of log(Z)^2 on the logits (PaLM), 0 disables
    loss_chunk_tokens: int = 8192  # cross-entropy over this many tokens at a time: no [tokens, vocab] float32 slab
    # "forward_grad" (chunks whose gradient is computed in the forward pass: three matmuls, bf16 logits),
    # "pallas" (the fused Pallas kernel: least memory), "xla" (float32 chunks recomputed in the backward pass;
    # any sharding) or "auto": forward_grad on GPUs where the layout allows, else xla
    loss_impl: str = "auto"
    skip_nonfinite: bool = False  # skip an update whose loss or gradients are not finite instead of stopping

    def __post_init__(self):
        for field in ("warmup_steps",):
            if getattr(self, field) < 0:
                raise ConfigError(f"TrainConfig.{field}={getattr(self, field)}: must be >= 0")
        for field in ("total_steps", "micro_batches", "loss_chunk_tokens"):
            if getattr(self, field) < 1:
                raise ConfigError(f"TrainConfig.{field}={getattr(self, field)}: must be >= 1")
        if self.warmup_steps > self.total_steps:
            raise ConfigError(
                f"TrainConfig.warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}"
            )
        if self.loss_impl not in LOSS_IMPLS:
            raise ConfigError(f"TrainConfig.loss_impl={self.loss_impl!r}: expected one of {', '.join(LOSS_IMPLS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"TrainConfig.schedule={self.schedule!r}: expected one of {', '.join(map(repr, SCHEDULES))}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"TrainConfig.min_lr_ratio={self.min_lr_ratio}: must be within [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"TrainConfig.decay_fraction={self.decay_fraction}: must be within (0, 1]")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr={self.lr}: must be > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"TrainConfig.grad_clip={self.grad_clip}: must be > 0 or None")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def config_to_dict(cfg: ModelConfig | TrainConfig) -> dict:
    """A JSON-ready dict of a config (RoPE scaling nested)."""
    return dataclasses.asdict(cfg)


def model_config_from_dict(data: dict) -> ModelConfig:
    data = dict(data)
    if data.get("rope_scaling") is not None:
        data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
    return ModelConfig(**data)


# How a step computes, not what: a run may resume with other choices (the same parameters and optimizer state).
EXECUTION_FIELDS = {"remat", "remat_save", "remat_offload", "scan_unroll", "attention_impl", "norm_impl", "loss_impl",
                    "loss_chunk_tokens", "mlp_block_tokens"}


def config_differences(saved: dict, current: ModelConfig | TrainConfig) -> list[str]:
    """['d_model: 768 in the checkpoint, 1024 now', ...] for fields that differ (the name and the
    EXECUTION_FIELDS ignored)."""
    now = config_to_dict(current)
    # A field the checkpoint predates (e.g. the MoE fields) counts as its default.
    defaults = {f.name: f.default for f in dataclasses.fields(current) if f.default is not dataclasses.MISSING}
    saved = {**{f: defaults[f] for f in defaults.keys() - saved.keys()}, **saved}
    fields = sorted((saved.keys() | now.keys()) - {"name"} - EXECUTION_FIELDS)
    return [f"{f}: {saved.get(f)!r} in the checkpoint, {now.get(f)!r} now" for f in fields if saved.get(f) != now.get(f)]
