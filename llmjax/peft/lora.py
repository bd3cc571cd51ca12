"""LoRA: low-rank adapters on chosen linear weights, the base frozen (Hu et al. 2021).

A targeted kernel W (seen as a matrix [in, out], see llmjax.quant.formats) becomes

    W + (alpha / rank) * A @ B          A [in, rank] (random), B [rank, out] (zeros: at init the model is unchanged)

Adapters are their own pytree, shaped like the base params but holding {"lora_a", "lora_b"} under each
targeted kernel's path, stacked on the same leading [num_layers] axis:

    adapters["blocks"]["attn"]["q"]["kernel"] = {"lora_a": [layers, d_model, rank], "lora_b": [layers, rank, heads * head_dim]}

Only the adapters are differentiated and given optimizer state; the base (float, or quantized to NF4
for QLoRA: llmjax.quant) is a constant of the loss. The forward merges each layer's adapters into
its (dequantized) weights inside the scan over blocks, one layer at a time, and runs the model's own
`block`; `merge` does the same once for the whole tree. Targets are regular expressions over the
parameter names (`blocks/attn/q/kernel`, ...), checked against the model.

Dropout: with the adapters merged per layer, dropout zeroes *input features* of the adapter path
(rows of A, scaled by 1 / (1 - p)), one mask per layer and step shared by every token, rather than
PEFT's per-token mask on the adapter's input. It is a regularizer of the same kind, not the same one.

`save_adapters` / `load_adapters`: safetensors + adapter_config.json with Hugging Face PEFT's names, so
PEFT's `PeftModel.from_pretrained` loads them onto the transformers model `llmjax.io` exports.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.model.params import flatten_with_names
from llmjax.model.transformer import logits_from_hidden
from llmjax.quant.formats import QuantizedMatrix
from llmjax.quant.model import (
    DEFAULT_TARGETS,
    _get,
    _set,
    is_quantized,
    layerwise_hidden_states,
    linear_weights,
    match_targets,
    materialize,
    top_level_params,
)


class AdapterMismatchError(ValueError):
    """Adapters that do not fit the base model they are applied to."""


@dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r), dropout, and which weights (regexes)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank!r}: must be a positive integer")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout={self.dropout}: must be within [0, 1)")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoraConfig.targets={self.targets!r}: must be a non-empty tuple of patterns")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _matrix_dims(weight, in_dims: int) -> tuple[int, int, int]:
    """(layers, in, out) of a stacked kernel or QuantizedMatrix."""
    if isinstance(weight, QuantizedMatrix):
        return weight.lead_shape[0], weight.in_features, weight.out_features
    shape = weight.shape
    return shape[0], math.prod(shape[1: 1 + in_dims]), math.prod(shape[1 + in_dims:])


def init_adapters(params: dict, cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array) -> dict:
    """Fresh adapters for the targeted weights: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform),
    B = 0, so the adapted model equals the base exactly at init. float32."""
    adapters: dict = {}
    for index, (name, in_dims) in enumerate(match_targets(cfg, lora_cfg.targets).items()):
        layers, fan_in, fan_out = _matrix_dims(_get(params, name), in_dims)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, index), (layers, fan_in, lora_cfg.rank), jnp.float32,
                               -bound, bound)
        b = jnp.zeros((layers, lora_cfg.rank, fan_out), jnp.float32)
        adapters = _nested_set(adapters, name, {"lora_a": a, "lora_b": b})
    return adapters


def _nested_set(tree: dict, name: str, value) -> dict:
    head, _, rest = name.partition("/")
    return {**tree, head: _nested_set(tree.get(head, {}), rest, value) if rest else value}


def adapter_names(adapters: dict) -> list[str]:
    """'blocks/attn/q/kernel', ... for every adapted weight."""
    return sorted({name.rsplit("/", 1)[0] for name in flatten_with_names(adapters)})


def check_adapters(params: dict, adapters: dict, cfg: ModelConfig) -> None:
    """Raise AdapterMismatchError unless every adapter sits on a weight of the base with its shapes."""
    available = linear_weights(cfg)
    for name in adapter_names(adapters):
        if name not in available:
            raise AdapterMismatchError(
                f"adapter for {name!r}: the base model has no such linear weight; it has {', '.join(available)}")
        layers, fan_in, fan_out = _matrix_dims(_get(params, name), available[name])
        a, b = _get(adapters, name)["lora_a"], _get(adapters, name)["lora_b"]
        if a.shape[:2] != (layers, fan_in) or b.shape[0] != layers or b.shape[2] != fan_out or a.shape[2] != b.shape[1]:
            raise AdapterMismatchError(
                f"adapter for {name!r} has A {tuple(a.shape)} and B {tuple(b.shape)} ([layers, in, rank], "
                f"[layers, rank, out]); the base weight is {layers} layers of [{fan_in}, {fan_out}]: the adapters "
                f"were trained on a different model")


def _layer_delta(adapter: dict, scale: float, dropout: float, key) -> jax.Array:
    """scale * A @ B for one layer [in, out] (float32), A's rows dropped with probability `dropout`."""
    a = adapter["lora_a"]
    if dropout > 0 and key is not None:
        keep = jax.random.bernoulli(key, 1 - dropout, (a.shape[0], 1))
        a = jnp.where(keep, a / (1 - dropout), 0)
    return scale * (a.astype(jnp.float32) @ adapter["lora_b"].astype(jnp.float32))


def merge_layer(layer_params: dict, layer_adapters: dict, dtype, lora_cfg: LoraConfig, key=None) -> dict:
    """One block's float parameters with its adapters merged (quantized weights dequantized first)."""
    merged = materialize(layer_params, dtype)
    for index, name in enumerate(adapter_names(layer_adapters)):
        base = _get(layer_params, name)
        w = (base.dequantize(jnp.float32) if is_quantized(base) else base.astype(jnp.float32))
        drop_key = None if key is None else jax.random.fold_in(key, index)
        delta = _layer_delta(_get(layer_adapters, name), lora_cfg.scale, lora_cfg.dropout, drop_key)
        merged = _set(merged, name, (w + delta.reshape(w.shape)).astype(dtype))
    return merged


def lora_hidden_states(params: dict, adapters: dict, tokens: jax.Array, cfg: ModelConfig, lora_cfg: LoraConfig, *,
                       rng: jax.Array | None = None, remat: str | None = None, positions=None, segment_ids=None):
    """Final-normed hidden states [batch, seq, d_model] of the base + adapters. rng: dropout (None: off)."""
    if cfg.matmul_precision == "fp8" and cfg.fp8_scaling == "delayed":
        raise ValueError("LoRA keeps the base model frozen, and with it FP8 delayed scaling's amax histories (they "
                         "would never leave their first value): use fp8_scaling='current' for LoRA")
    keys = None if rng is None or lora_cfg.dropout == 0 else jax.random.split(rng, cfg.num_layers)

    def prepare(layer_params, extra, dtype):
        layer_adapters, key = extra
        return merge_layer(layer_params, layer_adapters, dtype, lora_cfg, key)

    return layerwise_hidden_states(params, tokens, cfg, prepare_layer=prepare,
                                   layer_extras=(adapters.get("blocks", {}), keys), remat=remat,
                                   positions=positions, segment_ids=segment_ids)


def lora_forward(params: dict, adapters: dict, tokens: jax.Array, cfg: ModelConfig, lora_cfg: LoraConfig, *,
                 rng: jax.Array | None = None, positions=None, segment_ids=None) -> jax.Array:
    """tokens [batch, seq] -> logits [batch, seq, padded_vocab] (float32) of the adapted model."""
    x = lora_hidden_states(params, adapters, tokens, cfg, lora_cfg, rng=rng, positions=positions,
                           segment_ids=segment_ids)
    return logits_from_hidden(top_level_params(params, cfg), x, cfg)


def merge(params: dict, adapters: dict, cfg: ModelConfig, lora_cfg: LoraConfig) -> dict:
    """Float base params with the adapters folded in: a plain model for `forward`, export and decoding.
    A quantized base comes out dequantized (float32)."""
    check_adapters(params, adapters, cfg)
    merged = materialize(params, jnp.float32) if any(is_quantized(x) for x in
                                                       jax.tree.leaves(params, is_leaf=is_quantized)) else params
    for name in adapter_names(adapters):
        adapter = _get(adapters, name)
        w = _get(merged, name)
        delta = lora_cfg.scale * jnp.einsum("lir,lro->lio", adapter["lora_a"], adapter["lora_b"])
        merged = _set(merged, name, (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype))
    return merged


def adapter_count(adapters: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))


# --- Hugging Face PEFT files ------------------------------------------------------------------

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

_LLAMA_MODULES = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj", "attn/v": "self_attn.v_proj",
                  "attn/o": "self_attn.o_proj", "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj",
                  "mlp/down": "mlp.down_proj"}
_GPT2_MODULES = {"attn/o": "attn.c_proj", "mlp/up": "mlp.c_fc", "mlp/down": "mlp.c_proj"}  # q / k / v: attn.c_attn


def _family(cfg: ModelConfig) -> str:
    from llmjax.io.hf import hf_family

    family = hf_family(cfg)
    if family not in ("gpt2", "llama", "mistral"):
        raise ValueError(f"PEFT adapter files are written for GPT-2 and LLaMA / Mistral layouts, not {family!r}")
    return family


def _part(name: str) -> str:
    return name.removeprefix("blocks/").removesuffix("/kernel")


def save_adapters(directory: str | Path, adapters: dict, cfg: ModelConfig, lora_cfg: LoraConfig,
                  base_model: str = "") -> Path:
    """Write adapter_model.safetensors + adapter_config.json in Hugging Face PEFT's format.

    torch Linear / PEFT store lora_A.weight [rank, in] and lora_B.weight [out, rank]. GPT-2 fuses q | k | v
    into one c_attn: its adapter is the exact block-diagonal combination (A stacked to rank 3r, B block
    diagonal, alpha tripled so alpha / r is unchanged), declared through PEFT's rank_pattern / alpha_pattern.
    """
    import safetensors.numpy

    family = _family(cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = adapter_names(adapters)
    parts = {_part(n): _get(adapters, n) for n in names}
    tensors, modules, rank_pattern, alpha_pattern = {}, set(), {}, {}
    prefix = "base_model.model.model.layers" if family != "gpt2" else "base_model.model.transformer.h"
    table = _GPT2_MODULES if family == "gpt2" else _LLAMA_MODULES
    for layer in range(cfg.num_layers):
        for part, module in table.items():
            if part in parts:
                a, b = np.asarray(parts[part]["lora_a"][layer]), np.asarray(parts[part]["lora_b"][layer])
                tensors[f"{prefix}.{layer}.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
                tensors[f"{prefix}.{layer}.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
                modules.add(module.rsplit(".", 1)[1])
        if family == "gpt2" and any(f"attn/{n}" in parts for n in "qkv"):
            r, d = lora_cfg.rank, cfg.d_model
            a_big, b_big = np.zeros((3 * r, d), np.float32), np.zeros((3 * d, 3 * r), np.float32)
            for i, n in enumerate("qkv"):
                if f"attn/{n}" in parts:
                    a_big[i * r:(i + 1) * r] = np.asarray(parts[f"attn/{n}"]["lora_a"][layer]).T
                    b_big[i * d:(i + 1) * d, i * r:(i + 1) * r] = np.asarray(parts[f"attn/{n}"]["lora_b"][layer]).T
            tensors[f"{prefix}.{layer}.attn.c_attn.lora_A.weight"] = a_big
            tensors[f"{prefix}.{layer}.attn.c_attn.lora_B.weight"] = b_big
            modules.add("c_attn")
            rank_pattern["c_attn"], alpha_pattern["c_attn"] = 3 * r, 3 * lora_cfg.alpha
    if family == "gpt2" and "attn/o" in parts and "mlp/down" not in parts or (
            family == "gpt2" and "mlp/down" in parts and "attn/o" not in parts):
        raise ValueError("GPT-2 names both attention and MLP output projections c_proj: adapt both or neither "
                         "to write PEFT files")
    safetensors.numpy.save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout, "bias": "none",
        "target_modules": sorted(modules), "fan_in_fan_out": family == "gpt2", "inference_mode": True,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "init_lora_weights": True,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def load_adapters(directory: str | Path, params: dict, cfg: ModelConfig) -> tuple[dict, LoraConfig]:
    """(adapters, LoraConfig) from PEFT files, checked against the base params' shapes."""
    import safetensors.numpy

    directory = Path(directory)
    for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{directory / file} does not exist: expected a folder written by save_adapters "
                                    f"or PEFT's save_pretrained")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    tensors = safetensors.numpy.load_file(str(directory / ADAPTER_WEIGHTS))
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    family = _family(cfg)
    prefix = "base_model.model.model.layers" if family != "gpt2" else "base_model.model.transformer.h"
    table = _GPT2_MODULES if family == "gpt2" else _LLAMA_MODULES
    per_part: dict[str, dict[str, list]] = {}

    def add(part, a, b):
        entry = per_part.setdefault(part, {"lora_a": [], "lora_b": []})
        entry["lora_a"].append(a)
        entry["lora_b"].append(b)

    def tensor(name):
        if name not in tensors:
            raise AdapterMismatchError(f"{directory / ADAPTER_WEIGHTS} has no tensor {name!r}: the adapters were "
                                       f"saved for a model with other layers or modules")
        return tensors[name]

    present = {k.split(".lora_")[0] for k in tensors}
    for layer in range(cfg.num_layers):
        for part, module in table.items():
            if f"{prefix}.{layer}.{module}" in present:
                add(part, tensor(f"{prefix}.{layer}.{module}.lora_A.weight").T,
                    tensor(f"{prefix}.{layer}.{module}.lora_B.weight").T)
        if family == "gpt2" and f"{prefix}.{layer}.attn.c_attn" in present:
            a_big = tensor(f"{prefix}.{layer}.attn.c_attn.lora_A.weight")
            b_big = tensor(f"{prefix}.{layer}.attn.c_attn.lora_B.weight")
            d = cfg.d_model
            if a_big.shape != (3 * rank, d) or b_big.shape != (3 * d, 3 * rank):
                raise AdapterMismatchError(
                    f"c_attn adapter of layer {layer} has A {a_big.shape}, B {b_big.shape}; this base needs "
                    f"({3 * rank}, {d}) and ({3 * d}, {3 * rank})")
            for i, n in enumerate("qkv"):
                add(f"attn/{n}", a_big[i * rank:(i + 1) * rank].T, b_big[i * d:(i + 1) * d, i * rank:(i + 1) * rank].T)
    layer_counts = {part: len(v["lora_a"]) for part, v in per_part.items()}
    if not per_part or any(count != cfg.num_layers for count in layer_counts.values()):
        raise AdapterMismatchError(
            f"{directory} holds adapters for {layer_counts or 'no module of this model'} layers; the base has "
            f"{cfg.num_layers} layers of {', '.join(table)}")
    adapters: dict = {}
    for part, entry in per_part.items():
        try:
            stacked = {k: jnp.asarray(np.stack(v), jnp.float32) for k, v in entry.items()}
        except ValueError as error:
            raise AdapterMismatchError(f"adapter {part}: layers of different shapes ({error})") from None
        adapters = _nested_set(adapters, f"blocks/{part}/kernel", stacked)
    check_adapters(params, adapters, cfg)
    targets = tuple(f"^{name}$" for name in adapter_names(adapters))
    return adapters, LoraConfig(rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)), targets=targets)
