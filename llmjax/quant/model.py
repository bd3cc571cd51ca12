"""A model whose linear weights are quantized, and a forward that dequantizes them one block at a time.

`quantize_params(params, cfg, "int4", group_size=128)` replaces every block kernel (attention
q / k / v / o and the MLP's up / gate / down, chosen by the parameter specs) with a
`QuantizedMatrix`; embeddings, norms and biases stay as they are. `quantized_forward` runs the
same pure layer functions as `llmjax.model.transformer` (`block`, `norm`, `logits_from_hidden`)
inside the same `lax.scan` over stacked blocks: each step dequantizes its own layer's weights only
(the XLA reference of a dequantize-on-the-fly matmul), so at most one layer is ever in float.

`layerwise_hidden_states` is the shared skeleton: it also carries LoRA adapters (llmjax.peft.lora),
whose merged per-layer weights are built the same way inside the scan, and takes the remat policy
per call, including offload to host memory (llmjax.model.transformer.remat_policy).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.model.params import flatten_with_names
from llmjax.model.transformer import (
    ACTIVATION_AXES,
    block,
    check_inputs,
    logits_from_hidden,
    model_spec,
    norm,
    remat_policy,
)
from llmjax.parallel.logical import constrain
from llmjax.quant.formats import (
    QuantizationError,
    QuantizedMatrix,
    dequantize,
    quantize,
)

DEFAULT_TARGETS = (r"attn/(q|k|v|o)/kernel$", r"mlp/(up|gate|down)/kernel$")


def linear_weights(cfg: ModelConfig) -> dict[str, int]:
    """{'blocks/attn/q/kernel': in_dims, ...}: the block kernels (stacked on a leading layers axis) and
    how many of their per-layer axes are contracted with the input, read from the specs' logical axes
    (q / k / v / up / gate take 'embed' first: one; o [heads, head_dim, embed] and down: all but the last)."""
    if cfg.is_moe:
        raise QuantizationError("quantized / LoRA forwards support dense models; this config has experts")
    found = {}
    for name, spec in flatten_with_names(model_spec(cfg)).items():
        if not (name.startswith("blocks/") and name.endswith("/kernel")):
            continue
        axes = spec.axes[1:]  # drop "layers"
        found[name] = 1 if axes[0] == "embed" else len(axes) - 1
    return found


def match_targets(cfg: ModelConfig, patterns) -> dict[str, int]:
    """The linear weights whose names match any of the regular expressions (re.search); a pattern that
    matches none is an error listing the names there are."""
    available = linear_weights(cfg)
    chosen = {}
    for pattern in patterns:
        hits = [name for name in available if re.search(pattern, name)]
        if not hits:
            raise ValueError(
                f"pattern {pattern!r} matches no linear weight of this model; available: {', '.join(available)}"
            )
        chosen.update({name: available[name] for name in hits})
    return {name: chosen[name] for name in available if name in chosen}  # model order


def _get(tree: dict, name: str):
    for key in name.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, name: str, value) -> dict:
    """A copy of the nested dict with the leaf at `name` replaced (shared subtrees otherwise)."""
    head, _, rest = name.partition("/")
    return {**tree, head: _set(tree[head], rest, value) if rest else value}


def quantize_params(params: dict, cfg: ModelConfig, fmt: str, group_size: int | None = None, *,
                    targets=DEFAULT_TARGETS, symmetric: bool | None = None) -> dict:
    """Params with the targeted block kernels replaced by QuantizedMatrix (round to nearest)."""
    for name, in_dims in match_targets(cfg, targets).items():
        params = _set(params, name, quantize(_get(params, name), fmt, group_size, in_dims=in_dims, lead_dims=1,
                                             symmetric=symmetric))
    return params


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedMatrix)


def materialize(tree, dtype):
    """Every quantized leaf dequantized and every float leaf cast to `dtype`."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x.astype(dtype), tree,
                        is_leaf=is_quantized)


def param_bytes(tree) -> int:
    """Bytes the parameters occupy as stored (quantized codes and scales included)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def layerwise_hidden_states(params: dict, tokens: jax.Array, cfg: ModelConfig, *, prepare_layer=None,
                            layer_extras=None, remat: str | None = None, positions=None, segment_ids=None
                            ) -> jax.Array:
    """tokens [batch, seq] -> final-normed hidden states [batch, seq, d_model] in the compute dtype.

    Inside the scan over blocks, `prepare_layer(layer_params, layer_extra, dtype)` turns one layer's
    stored parameters (quantized or float) plus its slice of `layer_extras` (adapters, dropout keys;
    leading [num_layers] axis) into the float parameters `block` takes. Default: `materialize`.
    remat: a ModelConfig.remat policy name (default cfg.remat; "names" reads cfg.remat_save / remat_offload).
    """
    check_inputs(tokens, cfg, positions)
    dtype = jnp.dtype(cfg.compute_dtype)
    prepare_layer = prepare_layer or (lambda layer, extra, dtype: materialize(layer, dtype))
    batch, seq_len = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    top = materialize({k: v for k, v in params.items() if k != "blocks"}, dtype)
    x = jnp.take(top["embed"]["token"], tokens, axis=0)  # [batch, seq, d_model]
    if cfg.positions == "learned":
        x = x + jnp.take(top["embed"]["position"], positions, axis=0)
    x = constrain(x, ACTIVATION_AXES)

    def scan_step(x, layer):
        layer_params, extra = layer
        weights = prepare_layer(layer_params, extra, dtype)
        x, _, _ = block(weights, x, positions, cfg, segment_ids=segment_ids)
        return constrain(x, ACTIVATION_AXES), None

    remat_cfg = cfg if remat is None else cfg.replace(remat=remat)  # a ConfigError names a bad policy
    if remat_cfg.remat != "none":
        scan_step = jax.checkpoint(scan_step, policy=remat_policy(remat_cfg), prevent_cse=False)
    x, _ = jax.lax.scan(scan_step, x, (params["blocks"], layer_extras))
    return norm(top["final_norm"], x, cfg)


def top_level_params(params: dict, cfg: ModelConfig) -> dict:
    """The non-block parameters in the compute dtype (for logits_from_hidden / output_embedding)."""
    return materialize({k: v for k, v in params.items() if k != "blocks"}, jnp.dtype(cfg.compute_dtype))


def quantized_forward(qparams: dict, tokens: jax.Array, cfg: ModelConfig, *, positions=None, segment_ids=None
                      ) -> jax.Array:
    """tokens [batch, seq] -> logits [batch, seq, padded_vocab] (float32) of a quantized model."""
    x = layerwise_hidden_states(qparams, tokens, cfg, positions=positions, segment_ids=segment_ids)
    return logits_from_hidden(top_level_params(qparams, cfg), x, cfg)


HEADS = ("float", "int8", "auto")


def quantized_decode_params(qparams: dict, cfg: ModelConfig, matmul: str = "xla", head: str = "float") -> dict:
    """`llmjax.infer.decode_model.prepare_params`'s layout with quantized matrices in place of the
    fused qkv / gate_up / o / down kernels: `x @ kernel` in the decode path dequantizes on the fly
    (QuantizedMatrix.__rmatmul__), so `llmjax.infer.generate(..., prepared=...)` decodes from it.
    matmul: "xla" (dequantize, then dot), "pallas" (the fused kernel, kernels.matmul_quant), "matvec" or "auto"
    (on CPUs the few-row form for decoding, `kernels.matmul_quant.quantized_matvec`; on GPUs the fused kernel);
    "auto" and "cpu" on a CPU also pack the symmetric int8 matrices for the int8 custom call (`pack_for_cpu`).
    head: the output head (the tied embedding or lm_head) as prepared ("float"), or quantized to int8 in groups of
    32 inputs ("int8": a quarter of its bytes, read every step; exact for an embedding imported from a GGUF Q8_0
    tensor, whose blocks it re-quantizes to the same codes and scales), kept apart from the embedding's lookup table;
    "auto": int8 where that is exact (its dequantized values equal the prepared head's), else float."""
    if head not in HEADS:
        raise ValueError(f"head={head!r}: expected one of {', '.join(map(repr, HEADS))}")
    from llmjax.infer.decode_model import prepare_params
    from llmjax.quant.formats import concatenate_outputs

    def layer_matrix(name: str, layer: int):
        w = _get(qparams, name)
        if is_quantized(w):
            return jax.tree.map(lambda a: a[layer], w)  # one layer's QuantizedMatrix
        return None

    def flat(qm: QuantizedMatrix) -> QuantizedMatrix:  # the same arrays seen as one [in, out] matrix
        return dataclasses.replace(qm, shape=(qm.in_features, qm.out_features), in_dims=1, matmul=matmul)

    def swap(entry: dict, i: int) -> None:
        """Entry of layer i with its float kernels replaced by the quantized matrices."""
        get = lambda part: layer_matrix(f"blocks/{part}/kernel", i)  # noqa: E731
        qkv = [get(f"attn/{n}") for n in "qkv"]
        if all(m is not None for m in qkv):
            entry["attn"]["qkv"]["kernel"] = concatenate_outputs([flat(m) for m in qkv]).with_matmul(matmul)
        if (o := get("attn/o")) is not None:
            entry["attn"]["o"]["kernel"] = flat(o)
        if (down := get("mlp/down")) is not None:
            entry["mlp"]["down"]["kernel"] = flat(down)
        if cfg.activation == "swiglu":
            gate, up = get("mlp/gate"), get("mlp/up")
            if gate is not None and up is not None:
                entry["mlp"]["gate_up"]["kernel"] = concatenate_outputs([flat(gate), flat(up)]).with_matmul(matmul)
        elif (up := get("mlp/up")) is not None:
            entry["mlp"]["up"]["kernel"] = flat(up)

    # prepare_params one layer at a time (a one-layer config) and swap in the quantized matrices at once, so
    # at most one layer's weights exist in float here (not the whole model).
    one_layer = cfg.replace(num_layers=1)
    top = {k: v for k, v in qparams.items() if k != "blocks"}
    dummy_embed = {"token": jnp.zeros((1, cfg.d_model), jnp.float32)}  # the real embedding is prepared once
    prepared = None
    for i in range(cfg.num_layers):
        layer = materialize(jax.tree.map(lambda a: a[i:i + 1], qparams["blocks"]), jnp.float32)  # [1, ...] leaves
        if prepared is None:
            prepared = prepare_params({**top, "blocks": layer}, one_layer)
        else:
            prepared["layers"].append(prepare_params({**top, "embed": dummy_embed, "blocks": layer},
                                                     one_layer)["layers"][0])
        swap(prepared["layers"][i], i)
    weight = prepared["lm_head"]["kernel"] if "lm_head" in prepared else prepared["embed"]["token"].T  # [d, vocab]
    if head != "float" and not is_quantized(weight):  # (an lm_head quantize_params quantized stays as it is)
        group = 32 if cfg.d_model % 32 == 0 else None  # else one group per output (per-channel)
        quantized = jax.jit(quantize, static_argnums=(1, 2))(weight, "int8", group)
        if head == "int8" or bool(jnp.array_equal(quantized.dequantize(weight.dtype), weight)):
            prepared["lm_head"] = {"kernel": quantized.with_matmul(matmul)}
    return pack_for_cpu(prepared, matmul)


def pack_for_cpu(tree, matmul: str):
    """matmul "auto" or "cpu" on a CPU where the int8 custom call works (kernels.cpu_qmatvec.available()): every
    symmetric int8 matrix it takes packed once into its layout (codes [out, in]), so decode steps never re-pack;
    anything else (other formats, GPUs, no compiler) as it is."""
    from llmjax.kernels import cpu_qmatvec
    from llmjax.kernels.matmul_quant import can_pack, pack_int8_rows
    from llmjax.kernels.platform import compute_platform

    if matmul not in ("auto", "cpu") or compute_platform() != "cpu" or not cpu_qmatvec.available():
        return tree
    return jax.tree.map(lambda x: pack_int8_rows(x) if can_pack(x) else x, tree,
                        is_leaf=is_quantized)
