"""Hugging Face interop: configs and safetensors checkpoints of GPT-2, LLaMA, Mistral, Mixtral and BERT models.

    params, cfg = load_hf_checkpoint("path/to/Llama-3.2-1B")     # folder with config.json + safetensors
    save_hf_checkpoint(params, cfg, "out/my-model")               # loads in transformers' from_pretrained

One table per family (`_gpt2_tensors`, `_llama_tensors`, `_bert_tensors`) lists every Hugging Face tensor, its
shape, and the llmjax parameter(s) it holds with the conversion both ways; loading, saving and
checking all read that table. Shapes are checked from the safetensors headers before any data is
read, so a checkpoint that does not fit the config fails in seconds with one message naming the
tensor. Padded vocabulary rows are zero on import and sliced off on export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from llmjax.config import ConfigError, ModelConfig, RopeScaling
from llmjax.model.params import flatten_with_names
from llmjax.model.rope import convert_rope_layout
from llmjax.model.transformer import model_spec
from llmjax.nn.rope import base_theta

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors dtype names we can import

# Where each family's blocks live; hub files of base models (and the original GPT-2) omit it.
_BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "mistral": "model.", "mixtral": "model.", "bert": ""}
# A base model saved inside a task model (BertForMaskedLM: "bert.encoder..."): the prefix is dropped on import.
_TASK_PREFIX = {"bert": "bert."}
# Buffers that old checkpoints saved alongside the weights: not parameters, skipped on import.
_IGNORED_TENSORS = {
    "gpt2": re.compile(r"\.attn\.(masked_)?bias$"),  # the causal-mask buffer, not c_attn.bias
    "llama": re.compile(r"\.rotary_emb\.inv_freq$"),
    "mistral": re.compile(r"\.rotary_emb\.inv_freq$"),
    "mixtral": re.compile(r"\.rotary_emb\.inv_freq$"),
    # the position-id buffer, and the pooler and task heads, which the hidden states do not use
    "bert": re.compile(r"(^|\.)position_ids$|^(bert\.)?pooler\.|^cls\."),
}
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "mixtral": "MixtralForCausalLM", "bert": "BertModel"}


class CheckpointMismatchError(ValueError):
    """A checkpoint folder that does not hold the model its config (or the given cfg) describes."""


# --- configs -----------------------------------------------------------------------------

def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (model_type gpt2, llama, mistral, mixtral or bert).

    Parameters and compute are float32 unless overridden: config_from_hf(d, compute_dtype="bfloat16").
    """
    model_type = hf_config.get("model_type")
    readers = {"gpt2": _gpt2_config_fields, "llama": _llama_config_fields, "mistral": _llama_config_fields,
               "mixtral": _mixtral_config_fields, "bert": _bert_config_fields}
    if model_type not in readers:
        raise CheckpointMismatchError(
            f"config.json has model_type={model_type!r}; llmjax imports {', '.join(map(repr, readers))}"
        )
    fields = readers[model_type](hf_config)
    fields.update(name=f"hf-{model_type}", param_dtype="float32", compute_dtype="float32")
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ConfigError as error:
        raise CheckpointMismatchError(f"config.json describes a model llmjax cannot build: {error}") from error


def _required(hf_config: dict, key: str):
    if hf_config.get(key) is None:
        raise CheckpointMismatchError(
            f"config.json has no {key!r}, which a {hf_config.get('model_type')} config must give"
        )
    return hf_config[key]


def _check_setting(hf_config: dict, key: str, default, supported: tuple) -> None:
    value = hf_config.get(key, default)
    if value not in supported:
        raise CheckpointMismatchError(
            f"config.json has {key}={value!r}; llmjax supports {' or '.join(map(repr, supported))} "
            f"for model_type {hf_config.get('model_type')!r}"
        )


def _gpt2_config_fields(hf: dict) -> dict:
    _check_setting(hf, "activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"))
    _check_setting(hf, "scale_attn_weights", True, (True,))
    _check_setting(hf, "scale_attn_by_inverse_layer_idx", False, (False,))
    _check_setting(hf, "add_cross_attention", False, (False,))
    d_model = _required(hf, "n_embd")
    max_seq_len = hf.get("n_positions") or _required(hf, "n_ctx")
    return dict(
        vocab_size=_required(hf, "vocab_size"),
        d_model=d_model,
        num_layers=_required(hf, "n_layer"),
        num_heads=_required(hf, "n_head"),
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_seq_len=max_seq_len,
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        positions="learned",
        activation="gelu_tanh",
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _llama_config_fields(hf: dict) -> dict:
    """LLaMA and Mistral (the same weights; Mistral adds a sliding window and has no biases)."""
    _check_setting(hf, "hidden_act", "silu", ("silu",))
    num_heads = _required(hf, "num_attention_heads")
    rope_theta, rope_scaling = _rope_from_hf(hf)
    return dict(
        vocab_size=_required(hf, "vocab_size"),
        d_model=_required(hf, "hidden_size"),
        num_layers=_required(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim"),
        d_ff=_required(hf, "intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        # q/k stored with RoPE pairing neighbouring dimensions (Meta's original layout): taken as they are
        rope_layout="interleaved" if hf.get("rope_interleave") else "half",
        activation="swiglu",
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=hf.get("sliding_window") if hf["model_type"] == "mistral" else None,
    )


# BERT's hidden_act names -> ours: exact GELU, or the tanh approximation
_BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _bert_config_fields(hf: dict) -> dict:
    """BERT (and MiniLM, which is BERT-shaped): a bidirectional post-norm encoder with token types and an
    embedding LayerNorm; hidden states out (no pooler, no masked-LM head)."""
    _check_setting(hf, "hidden_act", "gelu", tuple(_BERT_ACTIVATIONS))
    _check_setting(hf, "position_embedding_type", "absolute", ("absolute",))
    _check_setting(hf, "is_decoder", False, (False,))
    _check_setting(hf, "add_cross_attention", False, (False,))
    return dict(
        vocab_size=_required(hf, "vocab_size"),
        d_model=_required(hf, "hidden_size"),
        num_layers=_required(hf, "num_hidden_layers"),
        num_heads=_required(hf, "num_attention_heads"),
        d_ff=_required(hf, "intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 512),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        norm_position="post",
        causal=False,
        positions="learned",
        type_vocab_size=hf.get("type_vocab_size", 2),
        embedding_norm=True,
        activation=_BERT_ACTIVATIONS[hf.get("hidden_act", "gelu")],
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=True,  # no output head: the encoder's product is its hidden states
    )


def _mixtral_config_fields(hf: dict) -> dict:
    """Mixtral: Mistral attention, every block's MLP a Mixture-of-Experts (softmax top-k, renormalized).

    Hugging Face's load-balancing loss is experts_per_token times ours (it counts each choice), so
    router_aux_loss_coef maps to moe_aux_loss_weight = coef * experts_per_token.
    """
    fields = _llama_config_fields(hf)
    experts_per_token = _required(hf, "num_experts_per_tok")
    return fields | dict(
        sliding_window=hf.get("sliding_window"),
        num_experts=_required(hf, "num_local_experts"),
        experts_per_token=experts_per_token,
        renormalize_top_k=True,  # also for top-1: Mixtral's weight is then 1
        expert_d_ff=fields["d_ff"],
        moe_aux_loss_weight=hf.get("router_aux_loss_coef", 0.001) * experts_per_token,
        moe_router_z_loss_weight=0.0,
    )


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from `rope_parameters` (transformers >= 5) or the older top-level
    `rope_theta` + `rope_scaling`; like transformers, a non-null `rope_scaling` wins."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None

    def value(key: str):
        if key not in rope:
            raise CheckpointMismatchError(f"config.json's RoPE settings of type {rope_type!r} lack {key!r}")
        return rope[key]

    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=value("factor"))
    if rope_type == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=value("factor"),
            low_freq_factor=value("low_freq_factor"),
            high_freq_factor=value("high_freq_factor"),
            original_max_seq_len=rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192)),
        )
    if rope_type == "yarn":
        return theta, RopeScaling(
            "yarn",
            factor=value("factor"),
            original_max_seq_len=rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192)),
            beta_fast=rope.get("beta_fast", 32.0),
            beta_slow=rope.get("beta_slow", 1.0),
            attention_factor=rope.get("attention_factor"),
        )
    raise CheckpointMismatchError(
        f"config.json asks for RoPE type {rope_type!r}; llmjax supports 'default', 'linear', 'llama3' and 'yarn'"
    )


def hf_family(cfg: ModelConfig) -> str:
    """'gpt2', 'llama', 'mistral', 'mixtral' or 'bert': the Hugging Face layout that holds this config exactly."""
    if not cfg.causal:
        return _bert_family(cfg)
    if cfg.is_moe:
        problems = []
        if (cfg.norm, cfg.positions, cfg.activation) != ("rmsnorm", "rope", "swiglu"):
            problems.append("norm='rmsnorm', positions='rope' and activation='swiglu'")
        if cfg.attention_bias or cfg.mlp_bias:
            problems.append("no biases")
        if cfg.moe_every != 1 or cfg.num_shared_experts:
            problems.append("moe_every=1 and no shared experts")
        if not cfg.top_k_renormalized:
            problems.append("renormalize_top_k=True for top-1 routing (Mixtral renormalizes the top-k weights)")
        if cfg.expert_width != cfg.d_ff:
            problems.append("expert_d_ff equal to d_ff (Mixtral's intermediate_size is both)")
        if not problems:
            return "mixtral"
        raise ValueError(f"no Hugging Face layout matches this MoE ModelConfig: the Mixtral layout needs "
                         f"{' and '.join(problems)}")
    if (cfg.norm, cfg.positions, cfg.activation) == ("layernorm", "learned", "gelu_tanh"):
        problems = []
        if not (cfg.attention_bias and cfg.mlp_bias):
            problems.append("attention_bias=True and mlp_bias=True")
        if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.d_model:
            problems.append("num_kv_heads == num_heads and head_dim == d_model // num_heads")
        if cfg.sliding_window is not None:
            problems.append("sliding_window=None")
        if not problems:
            return "gpt2"
        reason = f"the GPT-2 layout needs {' and '.join(problems)}"
    elif (cfg.norm, cfg.positions, cfg.activation) == ("rmsnorm", "rope", "swiglu"):
        if cfg.sliding_window is None:
            return "llama"
        if not (cfg.attention_bias or cfg.mlp_bias):
            return "mistral"
        reason = "a sliding window needs the Mistral layout, which has no biases"
    else:
        reason = "GPT-2 is layernorm + learned + gelu_tanh; LLaMA is rmsnorm + rope + swiglu"
    raise ValueError(
        f"no Hugging Face layout matches this ModelConfig (norm={cfg.norm!r}, positions={cfg.positions!r}, "
        f"activation={cfg.activation!r}): {reason}"
    )


def _bert_family(cfg: ModelConfig) -> str:
    """'bert' for an encoder in BERT's layout, else a ValueError naming what differs."""
    wanted = dict(norm="layernorm", positions="learned", norm_position="post", embedding_norm=True,
                  attention_bias=True, mlp_bias=True, tie_embeddings=True)
    problems = [f"{field}={value!r}" for field, value in wanted.items() if getattr(cfg, field) != value]
    if cfg.activation not in ("gelu", "gelu_tanh"):
        problems.append("activation='gelu' or 'gelu_tanh'")
    if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.d_model:
        problems.append("num_kv_heads == num_heads and head_dim == d_model // num_heads")
    if cfg.type_vocab_size < 1:
        problems.append("type_vocab_size >= 1")
    if problems:
        raise ValueError(f"no Hugging Face layout matches this encoder (causal=False): the BERT layout needs "
                         f"{', '.join(problems)}")
    return "bert"


def hf_config_from(cfg: ModelConfig) -> dict:
    """The Hugging Face config.json dict for a ModelConfig (GPT-2, LLaMA or Mistral layout)."""
    family = hf_family(cfg)
    common = dict(
        model_type=family,
        architectures=[_ARCHITECTURES[family]],
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        dtype=cfg.param_dtype,
    )
    if family == "bert":
        return common | dict(
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.d_ff,
            max_position_embeddings=cfg.max_seq_len,
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps,
            hidden_act="gelu" if cfg.activation == "gelu" else "gelu_pytorch_tanh",
            position_embedding_type="absolute",
        )
    if family == "gpt2":
        return common | dict(
            n_embd=cfg.d_model,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len,
            n_ctx=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new",
        )
    hf = common | dict(
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        **_rope_to_hf(cfg),
    )
    if cfg.rope_layout == "interleaved":  # weights kept as they are; save_hf_checkpoint converts to "half" instead
        hf["rope_interleave"] = True
    if family == "mixtral":
        return hf | dict(
            sliding_window=cfg.sliding_window,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            router_aux_loss_coef=cfg.moe_aux_loss_weight / cfg.experts_per_token,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    if family == "mistral":
        return hf | dict(sliding_window=cfg.sliding_window)
    return hf | dict(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """`rope_parameters` for transformers >= 5, and the same as `rope_theta` / `rope_scaling` so that
    older transformers do not silently fall back to theta 10000."""
    scaling, theta = cfg.rope_scaling, cfg.rope_theta
    if scaling is None or scaling.kind == "ntk":  # NTK-aware scaling is plain RoPE with a larger base
        theta, scaling = base_theta(theta, cfg.head_dim, scaling), None
        rope = {"rope_type": "default"}
    elif scaling.kind == "linear":
        rope = {"rope_type": "linear", "factor": scaling.factor}
    elif scaling.kind == "yarn":
        rope = {
            "rope_type": "yarn",
            "factor": scaling.factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
            "beta_fast": scaling.beta_fast,
            "beta_slow": scaling.beta_slow,
        } | ({} if scaling.attention_factor is None else {"attention_factor": scaling.attention_factor})
    else:
        rope = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
        }
    return dict(
        rope_parameters=rope | {"rope_theta": theta},
        rope_theta=theta,
        rope_scaling=None if scaling is None else rope,
    )


# --- the tensor tables -------------------------------------------------------------------

@dataclass(frozen=True)
class TensorMapping:
    """One Hugging Face tensor and the llmjax parameter(s) it holds.

    A `hf_name` containing "{layer}" is one tensor per block; its llmjax parameters are stacked on
    a leading layers axis, and `hf_shape`, `to_ours`, `to_hf` describe one layer.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    ours: tuple[str, ...]  # parameter paths, "blocks/attn/q/kernel"
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # Hugging Face array -> one per `ours`
    to_hf: Callable[..., np.ndarray]  # one array per `ours` -> Hugging Face array
    expert: int | None = None  # per-expert tensors (Mixtral): the slice [layer, expert] of our stacked parameter

    def ours_slice(self, layer: int) -> tuple:
        return (layer,) if self.expert is None else (layer, self.expert)

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name


def _reshaped(hf_name: str, hf_shape: tuple, ours: str, our_shape: tuple | None = None, *, transpose=False):
    """Same values, new shape; `transpose` for torch Linear weights, stored [out, in]."""
    our_shape = hf_shape if our_shape is None else our_shape
    if transpose:  # hf [out, in] -> [in, out] -> our_shape
        return TensorMapping(
            hf_name, hf_shape, (ours,),
            to_ours=lambda w: (w.T.reshape(our_shape),),
            to_hf=lambda x: x.reshape(hf_shape[::-1]).T,
        )
    return TensorMapping(
        hf_name, hf_shape, (ours,),
        to_ours=lambda w: (w.reshape(our_shape),),
        to_hf=lambda x: x.reshape(hf_shape),
    )


def _linear(hf_name: str, hf_shape: tuple, ours: str, our_shape: tuple | None = None):
    return _reshaped(hf_name, hf_shape, ours, our_shape or hf_shape[::-1], transpose=True)


def _split_last(hf_name: str, hf_shape: tuple, ours: tuple[str, ...], our_shape: tuple):
    """One fused tensor whose last axis holds equal parts side by side (GPT-2's c_attn: q | k | v)."""
    return TensorMapping(
        hf_name, hf_shape, ours,
        to_ours=lambda w: tuple(part.reshape(our_shape) for part in np.split(w, len(ours), axis=-1)),
        to_hf=lambda *parts: np.concatenate([p.reshape(*hf_shape[:-1], -1) for p in parts], axis=-1),
    )


def _pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    padding = [(0, 0)] * x.ndim
    padding[axis] = (0, size - x.shape[axis])
    return np.pad(x, padding)


def _token_embedding(hf_name: str, cfg: ModelConfig) -> TensorMapping:
    """[vocab, d_model] -> embed/token [padded_vocab, d_model], zero rows appended."""
    return TensorMapping(
        hf_name, (cfg.vocab_size, cfg.d_model), ("embed/token",),
        to_ours=lambda w: (_pad_axis(w, 0, cfg.padded_vocab_size),),
        to_hf=lambda x: x[: cfg.vocab_size],
    )


def _lm_head(cfg: ModelConfig) -> TensorMapping:
    """torch Linear [vocab, d_model] -> lm_head/kernel [d_model, padded_vocab], zero columns appended."""
    return TensorMapping(
        "lm_head.weight", (cfg.vocab_size, cfg.d_model), ("lm_head/kernel",),
        to_ours=lambda w: (_pad_axis(w.T, 1, cfg.padded_vocab_size),),
        to_hf=lambda x: x[:, : cfg.vocab_size].T,
    )


def _gpt2_tensors(cfg: ModelConfig) -> list[TensorMapping]:
    """GPT-2 uses Conv1D, whose weights are stored [in, out]: no transposes, only reshapes."""
    d, f, h, head_dim = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.head_dim
    block = "transformer.h.{layer}"
    tensors = [
        _token_embedding("transformer.wte.weight", cfg),
        _reshaped("transformer.wpe.weight", (cfg.max_seq_len, d), "embed/position"),
        _reshaped(f"{block}.ln_1.weight", (d,), "blocks/attn_norm/scale"),
        _reshaped(f"{block}.ln_1.bias", (d,), "blocks/attn_norm/bias"),
        _split_last(f"{block}.attn.c_attn.weight", (d, 3 * d),
                    ("blocks/attn/q/kernel", "blocks/attn/k/kernel", "blocks/attn/v/kernel"), (d, h, head_dim)),
        _split_last(f"{block}.attn.c_attn.bias", (3 * d,),
                    ("blocks/attn/q/bias", "blocks/attn/k/bias", "blocks/attn/v/bias"), (h, head_dim)),
        _reshaped(f"{block}.attn.c_proj.weight", (d, d), "blocks/attn/o/kernel", (h, head_dim, d)),
        _reshaped(f"{block}.attn.c_proj.bias", (d,), "blocks/attn/o/bias"),
        _reshaped(f"{block}.ln_2.weight", (d,), "blocks/mlp_norm/scale"),
        _reshaped(f"{block}.ln_2.bias", (d,), "blocks/mlp_norm/bias"),
        _reshaped(f"{block}.mlp.c_fc.weight", (d, f), "blocks/mlp/up/kernel"),
        _reshaped(f"{block}.mlp.c_fc.bias", (f,), "blocks/mlp/up/bias"),
        _reshaped(f"{block}.mlp.c_proj.weight", (f, d), "blocks/mlp/down/kernel"),
        _reshaped(f"{block}.mlp.c_proj.bias", (d,), "blocks/mlp/down/bias"),
        _reshaped("transformer.ln_f.weight", (d,), "final_norm/scale"),
        _reshaped("transformer.ln_f.bias", (d,), "final_norm/bias"),
    ]
    return tensors if cfg.tie_embeddings else [*tensors, _lm_head(cfg)]


def _llama_tensors(cfg: ModelConfig) -> list[TensorMapping]:
    """LLaMA / Mistral use torch Linear, stored [out, in]. RoPE is "rotate half" on both sides,
    so q and k need no permutation."""
    d, f, h, kv, head_dim = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    block = "model.layers.{layer}"
    attn, mlp = f"{block}.self_attn", f"{block}.mlp"
    tensors = [
        _token_embedding("model.embed_tokens.weight", cfg),
        _reshaped(f"{block}.input_layernorm.weight", (d,), "blocks/attn_norm/scale"),
        _linear(f"{attn}.q_proj.weight", (h * head_dim, d), "blocks/attn/q/kernel", (d, h, head_dim)),
        _linear(f"{attn}.k_proj.weight", (kv * head_dim, d), "blocks/attn/k/kernel", (d, kv, head_dim)),
        _linear(f"{attn}.v_proj.weight", (kv * head_dim, d), "blocks/attn/v/kernel", (d, kv, head_dim)),
        _linear(f"{attn}.o_proj.weight", (d, h * head_dim), "blocks/attn/o/kernel", (h, head_dim, d)),
        _reshaped(f"{block}.post_attention_layernorm.weight", (d,), "blocks/mlp_norm/scale"),
        _linear(f"{mlp}.gate_proj.weight", (f, d), "blocks/mlp/gate/kernel"),
        _linear(f"{mlp}.up_proj.weight", (f, d), "blocks/mlp/up/kernel"),
        _linear(f"{mlp}.down_proj.weight", (d, f), "blocks/mlp/down/kernel"),
        _reshaped("model.norm.weight", (d,), "final_norm/scale"),
    ]
    if cfg.attention_bias:
        tensors += [
            _reshaped(f"{attn}.q_proj.bias", (h * head_dim,), "blocks/attn/q/bias", (h, head_dim)),
            _reshaped(f"{attn}.k_proj.bias", (kv * head_dim,), "blocks/attn/k/bias", (kv, head_dim)),
            _reshaped(f"{attn}.v_proj.bias", (kv * head_dim,), "blocks/attn/v/bias", (kv, head_dim)),
            _reshaped(f"{attn}.o_proj.bias", (d,), "blocks/attn/o/bias"),
        ]
    if cfg.mlp_bias:
        tensors += [
            _reshaped(f"{mlp}.gate_proj.bias", (f,), "blocks/mlp/gate/bias"),
            _reshaped(f"{mlp}.up_proj.bias", (f,), "blocks/mlp/up/bias"),
            _reshaped(f"{mlp}.down_proj.bias", (d,), "blocks/mlp/down/bias"),
        ]
    return tensors if cfg.tie_embeddings else [*tensors, _lm_head(cfg)]


def _bert_tensors(cfg: ModelConfig) -> list[TensorMapping]:
    """BERT's BertModel: torch Linear [out, in]; post-norm blocks, so attention.output.LayerNorm is our attn_norm
    (applied after the attention residual) and output.LayerNorm our mlp_norm. No pooler: it is not a hidden state."""
    d, f, h, head_dim = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.head_dim
    block = "encoder.layer.{layer}"
    attn = f"{block}.attention"
    tensors = [
        _token_embedding("embeddings.word_embeddings.weight", cfg),
        _reshaped("embeddings.position_embeddings.weight", (cfg.max_seq_len, d), "embed/position"),
        _reshaped("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, d), "embed/token_type"),
        _reshaped("embeddings.LayerNorm.weight", (d,), "embed/norm/scale"),
        _reshaped("embeddings.LayerNorm.bias", (d,), "embed/norm/bias"),
    ]
    for hf_name, ours in (("query", "q"), ("key", "k"), ("value", "v")):
        tensors += [
            _linear(f"{attn}.self.{hf_name}.weight", (h * head_dim, d), f"blocks/attn/{ours}/kernel", (d, h, head_dim)),
            _reshaped(f"{attn}.self.{hf_name}.bias", (h * head_dim,), f"blocks/attn/{ours}/bias", (h, head_dim)),
        ]
    return tensors + [
        _linear(f"{attn}.output.dense.weight", (d, h * head_dim), "blocks/attn/o/kernel", (h, head_dim, d)),
        _reshaped(f"{attn}.output.dense.bias", (d,), "blocks/attn/o/bias"),
        _reshaped(f"{attn}.output.LayerNorm.weight", (d,), "blocks/attn_norm/scale"),
        _reshaped(f"{attn}.output.LayerNorm.bias", (d,), "blocks/attn_norm/bias"),
        _linear(f"{block}.intermediate.dense.weight", (f, d), "blocks/mlp/up/kernel"),
        _reshaped(f"{block}.intermediate.dense.bias", (f,), "blocks/mlp/up/bias"),
        _linear(f"{block}.output.dense.weight", (d, f), "blocks/mlp/down/kernel"),
        _reshaped(f"{block}.output.dense.bias", (d,), "blocks/mlp/down/bias"),
        _reshaped(f"{block}.output.LayerNorm.weight", (d,), "blocks/mlp_norm/scale"),
        _reshaped(f"{block}.output.LayerNorm.bias", (d,), "blocks/mlp_norm/bias"),
    ]


def _mixtral_tensors(cfg: ModelConfig) -> list[TensorMapping]:
    """Mixtral: LLaMA attention and norms in our `moe_blocks`; per block a router (`gate`) and, per
    expert, w1 (gate), w3 (up), w2 (down), torch Linear [out, in]: one row of the table per expert,
    each holding the slice [layer, expert] of our stacked expert kernels."""
    d, f = cfg.d_model, cfg.expert_width
    tensors = []
    for mapping in _llama_tensors(cfg):
        if ".mlp." in mapping.hf_name:
            continue
        ours = tuple(name.replace("blocks/", "moe_blocks/", 1) if name.startswith("blocks/") else name
                     for name in mapping.ours)
        tensors.append(dataclasses.replace(mapping, ours=ours))
    moe = "model.layers.{layer}.block_sparse_moe"
    tensors.append(_linear(f"{moe}.gate.weight", (cfg.num_experts, d), "moe_blocks/moe/router/kernel"))
    for expert in range(cfg.num_experts):
        for hf_weight, ours, shape in (("w1", "gate", (f, d)), ("w3", "up", (f, d)), ("w2", "down", (d, f))):
            mapping = _linear(f"{moe}.experts.{expert}.{hf_weight}.weight", shape, f"moe_blocks/moe/experts/{ours}/kernel")
            tensors.append(dataclasses.replace(mapping, expert=expert))
    return tensors


def tensor_mappings(cfg: ModelConfig, family: str | None = None) -> list[TensorMapping]:
    """The table of Hugging Face tensors for a config (family: from config.json, else from cfg)."""
    family = family or hf_family(cfg)
    if family == "mixtral":
        return _mixtral_tensors(cfg)
    if family == "bert":
        return _bert_tensors(cfg)
    return _gpt2_tensors(cfg) if family == "gpt2" else _llama_tensors(cfg)


def hf_tensor_shapes(cfg: ModelConfig, family: str | None = None) -> dict[str, tuple[int, ...]]:
    """{Hugging Face tensor name: shape} of every tensor a checkpoint of this config holds."""
    return {name: m.hf_shape for m in tensor_mappings(cfg, family) for name, _ in _instances(m, cfg)}


def _instances(mapping: TensorMapping, cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """[(tensor name, layer or None)]: one per block for a per-layer mapping, else one."""
    if not mapping.per_layer:
        return [(mapping.hf_name, None)]
    return [(mapping.hf_name.format(layer=layer), layer) for layer in range(cfg.num_layers)]


# --- loading -----------------------------------------------------------------------------

def load_hf_checkpoint(path, cfg: ModelConfig | None = None, *, dtype: str | None = None) -> tuple[dict, ModelConfig]:
    """Parameters and config from a Hugging Face folder: config.json plus model.safetensors, or
    shards listed in model.safetensors.index.json.

    cfg: the config to load into (its sizes must agree with config.json; its dtypes, vocab padding
    and remat are kept). Default: the config.json's own, float32. dtype: parameter dtype to cast
    to (sets cfg.param_dtype). Raises CheckpointMismatchError naming the first thing that differs.
    """
    folder = Path(path)
    hf_config = _read_config(folder)
    cfg = _resolve_config(hf_config, cfg)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
    family = hf_config["model_type"]
    files = _weight_files(folder)
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_open_safetensors(file)) for file in files}
        found = _found_tensors(handles, family, tie_embeddings=cfg.tie_embeddings)
        _check_tensors(found, hf_tensor_shapes(cfg, family), folder)

        cpu = jax.devices("cpu")[0]

        def read(name: str) -> np.ndarray:
            file, stored_name, _ = found[name]
            with jax.default_device(cpu):  # read on the host; np.asarray is then free
                return np.asarray(handles[file].get_tensor(stored_name))

        flat = _convert_to_ours(tensor_mappings(cfg, family), read, cfg)
    return _unflatten({name: jnp.asarray(value) for name, value in flat.items()}), cfg


def _read_config(folder: Path) -> dict:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointMismatchError(
            f"no {CONFIG_FILE} in {folder}: a Hugging Face checkpoint folder needs its config next to the weights"
        )
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointMismatchError(f"{config_path} is not valid JSON: {error}") from error


# Fields that change parameter shapes or the math: a given cfg must agree with config.json.
_CHECKED_FIELDS = (
    "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
    "norm", "norm_eps", "norm_position", "causal", "type_vocab_size", "embedding_norm",
    "positions", "rope_theta", "rope_scaling", "rope_layout", "activation",
    "attention_bias", "mlp_bias", "tie_embeddings", "sliding_window",
    "num_experts", "experts_per_token", "expert_width", "moe_every", "num_shared_experts", "top_k_renormalized",
)


def _resolve_config(hf_config: dict, cfg: ModelConfig | None) -> ModelConfig:
    """The checkpoint's config, or `cfg` after checking that it describes the same model."""
    file_cfg = config_from_hf(hf_config)
    if cfg is None:
        return file_cfg
    fields = _CHECKED_FIELDS + (("max_seq_len",) if cfg.positions == "learned" else ())
    for field in fields:
        given, stored = getattr(cfg, field), getattr(file_cfg, field)
        if given != stored:
            raise CheckpointMismatchError(
                f"cfg.{field}={given!r} but the checkpoint's {CONFIG_FILE} gives {stored!r}; "
                f"pass cfg=None to use the checkpoint's config, or cfg.replace({field}={stored!r})"
            )
    return cfg


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of the index, or the single file."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointMismatchError(f"{index_path} has no readable 'weight_map': {error}") from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointMismatchError(f"{index_path} lists shard {file.name}, which is not in {folder}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointMismatchError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {folder} (found: {', '.join(present) or 'nothing'}); "
        f"llmjax reads safetensors only: convert .bin checkpoints with transformers' save_pretrained"
    )


def _open_safetensors(file: Path):
    try:
        return safetensors.safe_open(file, framework="flax")
    except safetensors.SafetensorError as error:
        raise CheckpointMismatchError(
            f"{file} is not a readable safetensors file ({error}); re-download or re-export it"
        ) from error


def _found_tensors(handles: dict, family: str, *, tie_embeddings: bool) -> dict[str, tuple[Path, str, tuple]]:
    """{canonical name: (file, name as stored, shape)} from the file headers (no data is read).

    Names lacking the family's base prefix ("h.0.ln_1.weight" in the original GPT-2 files) get it;
    causal-mask buffers, and an lm_head of a tied model (transformers ignores it too), are skipped.
    """
    prefix, ignored, task_prefix = _BASE_PREFIX[family], _IGNORED_TENSORS[family], _TASK_PREFIX.get(family)
    found = {}
    for file, handle in handles.items():
        for stored_name in handle.keys():
            if ignored.search(stored_name) or (tie_embeddings and stored_name == "lm_head.weight"):
                continue
            name = stored_name if stored_name.startswith((prefix, "lm_head.")) else prefix + stored_name
            if task_prefix:
                name = name.removeprefix(task_prefix)
            if name in found:
                raise CheckpointMismatchError(
                    f"tensor {stored_name!r} appears twice: in {found[name][0].name} and {file.name}"
                )
            tensor = handle.get_slice(stored_name)
            if tensor.get_dtype() not in FLOAT_DTYPES:
                raise CheckpointMismatchError(
                    f"tensor {stored_name!r} in {file.name} has dtype {tensor.get_dtype()}; "
                    f"llmjax imports floating-point weights only ({', '.join(sorted(FLOAT_DTYPES))})"
                )
            found[name] = (file, stored_name, tuple(tensor.get_shape()))
    return found


def _check_tensors(found: dict, expected: dict[str, tuple], folder: Path) -> None:
    """One error for the first kind of difference between the stored and the expected tensors."""
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointMismatchError(
            f"checkpoint {folder} is missing {len(missing)} tensor(s) its {CONFIG_FILE} calls for: "
            f"{_some(missing)}"
        )
    extra = [stored for name, (_, stored, _) in found.items() if name not in expected]
    if extra:
        raise CheckpointMismatchError(
            f"checkpoint {folder} has {len(extra)} tensor(s) that its {CONFIG_FILE} does not call for: "
            f"{_some(extra)}; is config.json from another model?"
        )
    for name, shape in expected.items():
        file, stored_name, found_shape = found[name]
        if found_shape != shape:
            raise CheckpointMismatchError(
                f"tensor {stored_name!r} in {file.name} has shape {list(found_shape)}, "
                f"expected {list(shape)} from {CONFIG_FILE}"
            )


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _convert_to_ours(mappings: list[TensorMapping], read: Callable[[str], np.ndarray], cfg: ModelConfig,
                     spec: dict | None = None) -> dict:
    """{param path: array in cfg.param_dtype}; per-layer tensors are written into preallocated
    stacks, so host memory peaks at the model plus one tensor. spec: the parameter spec tree the table fills
    (default model_spec(cfg); a ViT's is llmjax.model.vision.vision_spec)."""
    dtype = jnp.dtype(cfg.param_dtype)
    spec = model_spec(cfg) if spec is None else spec
    spec_shapes = {name: leaf.shape for name, leaf in flatten_with_names(spec).items()}
    flat = {}
    for mapping in mappings:
        if not mapping.per_layer:
            values = mapping.to_ours(read(mapping.hf_name))
            flat.update({name: value.astype(dtype) for name, value in zip(mapping.ours, values)})
            continue
        for name in mapping.ours:
            if name not in flat:  # per-expert mappings share one stacked parameter
                flat[name] = np.empty(spec_shapes[name], dtype)  # [num_layers, ...]
        for layer in range(cfg.num_layers):
            values = mapping.to_ours(read(mapping.hf_name.format(layer=layer)))
            for name, value in zip(mapping.ours, values):
                flat[name][mapping.ours_slice(layer)] = value
    assert {name: v.shape for name, v in flat.items()} == spec_shapes, "tensor table and model_spec disagree"
    return flat


def _unflatten(flat: dict[str, object]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


# --- saving ------------------------------------------------------------------------------

def save_hf_checkpoint(
    params: dict,
    cfg: ModelConfig,
    path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write config.json + safetensors that transformers' `from_pretrained` loads.

    A model whose RoPE pairs neighbouring dimensions (rope_layout="interleaved") is written in the
    Hugging Face "half" layout, its q / k projections permuted, so transformers computes the same logits.

    Files larger than max_shard_bytes are split into model-0000i-of-0000n.safetensors with an
    index. dtype: tensor dtype on disk (default cfg.param_dtype). The folder is written under a
    temporary name and renamed into place, so `path` never holds a half-written checkpoint; an
    existing non-empty `path` is replaced only with overwrite=True.
    """
    path = Path(path)
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    if cfg.rope_layout != "half":  # transformers' LLaMA rotates halves: permute q / k so it computes the same
        _checked_params(params, cfg)
        params, cfg = convert_rope_layout(params, cfg, "half")
    hf_config = hf_config_from(cfg) | {"dtype": dtype.name}
    flat = _checked_params(params, cfg)
    if path.exists() and not overwrite and not _is_empty_dir(path):
        raise FileExistsError(f"{path} already exists and is not empty; pass overwrite=True to replace it")

    def write(folder: Path) -> None:
        (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        _write_weights(flat, cfg, folder, max_shard_bytes, dtype)

    _write_folder_atomically(path, write)


def _checked_params(params: dict, cfg: ModelConfig) -> dict:
    """{param path: array}, after checking the tree against model_spec(cfg)."""
    flat = flatten_with_names(params)
    spec = flatten_with_names(model_spec(cfg))
    missing, extra = sorted(spec.keys() - flat.keys()), sorted(flat.keys() - spec.keys())
    if missing:
        raise CheckpointMismatchError(f"params lack {_some(missing)}, which cfg calls for")
    if extra:
        raise CheckpointMismatchError(f"params have {_some(extra)}, which cfg does not call for")
    for name, value in flat.items():
        if tuple(value.shape) != spec[name].shape:
            raise CheckpointMismatchError(
                f"param {name!r} has shape {list(value.shape)}, expected {list(spec[name].shape)} for cfg"
            )
    return flat


def _write_weights(flat: dict, cfg: ModelConfig, folder: Path, max_shard_bytes: int, dtype: np.dtype) -> None:
    """Tensors converted shard by shard, so host memory holds one shard at a time."""
    entries = [(name, layer, mapping) for mapping in tensor_mappings(cfg) for name, layer in _instances(mapping, cfg)]
    sizes = [int(np.prod(mapping.hf_shape)) * dtype.itemsize for _, _, mapping in entries]
    shards = _plan_shards(sizes, max_shard_bytes)
    file_names = (
        [SINGLE_FILE] if len(shards) == 1
        else [SHARD_FILE.format(index=i + 1, count=len(shards)) for i in range(len(shards))]
    )
    weight_map = {}
    for file_name, shard in zip(file_names, shards):
        tensors = {}
        for name, layer, mapping in (entries[i] for i in shard):
            ours = [np.asarray(flat[p] if layer is None else flat[p][mapping.ours_slice(layer)]) for p in mapping.ours]
            tensors[name] = np.ascontiguousarray(mapping.to_hf(*ours), dtype=dtype)
            weight_map[name] = file_name
        safetensors.numpy.save_file(tensors, folder / file_name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _plan_shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each at most max_shard_bytes (a larger tensor alone)."""
    shards, current, current_bytes = [], [], 0
    for i, size in enumerate(sizes):
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(i)
        current_bytes += size
    return [*shards, current]


def _write_folder_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write` on a fresh sibling folder, then rename it to `path` (replacing what is there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        write(staging)
        if path.exists() and not _is_empty_dir(path):
            retired = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            path.rename(retired)
            staging.rename(path)
            if retired.is_dir():
                shutil.rmtree(retired)
            else:
                retired.unlink()
        else:
            staging.replace(path)  # atomic; also onto an empty directory
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())
