"""Hugging Face vision towers: CLIP (`CLIPVisionModel`) and SigLIP (`SiglipVisionModel`) safetensors -> the
parameters of llmjax.model.vision.

    params, cfg = load_hf_vision("path/to/clip-vit-base-patch32")   # config.json + model.safetensors
    features = vision_features(params, images, cfg)                  # = transformers' last_hidden_state
    pooled = pooled_embedding(params, images, cfg)                   # = transformers' pooler_output

A folder of the whole two-tower model (CLIPModel / SiglipModel: model_type "clip" / "siglip") loads its vision tower;
the text tower and projections are skipped. Tensors are named with or without the "vision_model." prefix (older and
newer transformers save them differently). The image mean / std come from preprocessor_config.json when the folder
has one, else the family's defaults. Loading reuses llmjax.io.hf's machinery (file discovery, header checks, the
tensor table, per-layer stacking): shapes are checked from the safetensors headers before any data is read, and a
given VisionConfig must describe the same tower (a width mismatch is one error naming both widths).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError
from llmjax.io.hf import (
    CONFIG_FILE,
    FLOAT_DTYPES,
    CheckpointMismatchError,
    TensorMapping,
    _check_tensors,
    _convert_to_ours,
    _instances,
    _linear,
    _open_safetensors,
    _read_config,
    _reshaped,
    _unflatten,
    _weight_files,
)
from llmjax.model.vision import CLIP_MEAN, CLIP_STD, HALF, VisionConfig, vision_spec, vision_transformer_config

PREPROCESSOR_FILE = "preprocessor_config.json"
VISION_FAMILIES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh"}
_VISION_PREFIX = "vision_model."
# Not part of the vision tower: the position-id buffer, and a two-tower file's text tower, projections and scales.
_SKIPPED = ("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")


# --- config ------------------------------------------------------------------------------------

def vision_config_from_hf(hf_config: dict, preprocessor: dict | None = None, **model_overrides) -> VisionConfig:
    """A VisionConfig from a CLIP / SigLIP config.json dict (the vision tower's, or a two-tower model's, whose
    vision_config is read), float32; preprocessor: preprocessor_config.json's dict (image_mean / image_std)."""
    model_type = hf_config.get("model_type")
    if model_type not in VISION_FAMILIES:
        raise CheckpointMismatchError(f"{CONFIG_FILE} has model_type={model_type!r}; llmjax imports the vision "
                                      f"towers of {', '.join(map(repr, VISION_FAMILIES))}")
    family = VISION_FAMILIES[model_type]
    hf = (hf_config.get("vision_config") or {}) if model_type in ("clip", "siglip") else hf_config
    defaults = ({"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5} if family == "clip"
                else {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6})
    hf = {**_HF_DEFAULTS, **defaults, **hf}
    if hf["hidden_act"] not in _ACTIVATIONS:
        raise CheckpointMismatchError(f"{CONFIG_FILE} has hidden_act={hf['hidden_act']!r}; llmjax supports "
                                      f"{', '.join(map(repr, _ACTIVATIONS))} for {family} vision towers")
    clip = family == "clip"
    use_head = bool(hf.get("vision_use_head", True))
    mean, std = (CLIP_MEAN, CLIP_STD) if clip else (HALF, HALF)
    if preprocessor:
        mean, std = preprocessor.get("image_mean", mean), preprocessor.get("image_std", std)
    model_fields = dict(activation=_ACTIVATIONS[hf["hidden_act"]], norm_eps=hf["layer_norm_eps"],
                        embedding_norm=clip, final_norm=not clip, param_dtype="float32", compute_dtype="float32")
    try:
        model = vision_transformer_config(
            f"hf-{family}-vision", image_size=hf["image_size"], patch_size=hf["patch_size"], class_token=clip,
            d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], **model_fields | model_overrides)
        return VisionConfig(model=model, image_size=hf["image_size"], patch_size=hf["patch_size"],
                            num_channels=hf["num_channels"], class_token=clip, patch_bias=not clip,
                            pooling="cls" if clip else "map" if use_head else "mean", pooled_norm=clip,
                            image_mean=tuple(mean), image_std=tuple(std), name=f"hf-{family}-vision")
    except ConfigError as error:
        raise CheckpointMismatchError(f"{CONFIG_FILE} describes a vision tower llmjax cannot build: {error}") from error


# transformers' CLIPVisionConfig / SiglipVisionConfig defaults for keys a config.json may omit
_HF_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "num_channels": 3, "image_size": 224, "patch_size": 32}


# --- the tensor table --------------------------------------------------------------------------

def _patch_kernel(cfg: VisionConfig) -> TensorMapping:
    """The conv weight [d_model, C, p, p] -> embed/patch/kernel [p * p * C, d_model] (rows in (row, column,
    channel) order, as llmjax.model.vision.patchify flattens a patch)."""
    d, c, p = cfg.model.d_model, cfg.num_channels, cfg.patch_size
    return TensorMapping(
        "embeddings.patch_embedding.weight", (d, c, p, p), ("embed/patch/kernel",),
        to_ours=lambda w: (w.transpose(2, 3, 1, 0).reshape(p * p * c, d),),
        to_hf=lambda x: x.reshape(p, p, c, d).transpose(3, 2, 0, 1),
    )


def _in_projection(prefix: str, cfg: VisionConfig) -> list[TensorMapping]:
    """torch.nn.MultiheadAttention's fused in_proj [3 d_model, d_model] (q | k | v rows) -> head/attn/{q,k,v}."""
    d, h, hd = cfg.model.d_model, cfg.model.num_heads, cfg.model.head_dim
    names = tuple(f"head/attn/{name}/kernel" for name in "qkv")
    biases = tuple(f"head/attn/{name}/bias" for name in "qkv")
    return [
        TensorMapping(f"{prefix}.in_proj_weight", (3 * d, d), names,
                      to_ours=lambda w: tuple(part.T.reshape(d, h, hd) for part in np.split(w, 3, axis=0)),
                      to_hf=lambda *parts: np.concatenate([p.reshape(d, d).T for p in parts], axis=0)),
        TensorMapping(f"{prefix}.in_proj_bias", (3 * d,), biases,
                      to_ours=lambda b: tuple(part.reshape(h, hd) for part in np.split(b, 3)),
                      to_hf=lambda *parts: np.concatenate([p.reshape(d) for p in parts])),
    ]


def _norm(hf_prefix: str, ours: str, d: int) -> list[TensorMapping]:
    return [_reshaped(f"{hf_prefix}.weight", (d,), f"{ours}/scale"),
            _reshaped(f"{hf_prefix}.bias", (d,), f"{ours}/bias")]


def _mlp(hf_prefix: str, ours: str, d: int, f: int) -> list[TensorMapping]:
    return [_linear(f"{hf_prefix}.fc1.weight", (f, d), f"{ours}/up/kernel"),
            _reshaped(f"{hf_prefix}.fc1.bias", (f,), f"{ours}/up/bias"),
            _linear(f"{hf_prefix}.fc2.weight", (d, f), f"{ours}/down/kernel"),
            _reshaped(f"{hf_prefix}.fc2.bias", (d,), f"{ours}/down/bias")]


def vision_tensor_mappings(cfg: VisionConfig) -> list[TensorMapping]:
    """Every tensor of a CLIP / SigLIP vision tower (names without "vision_model.") and the parameter it holds."""
    model = cfg.model
    d, f, h, hd = model.d_model, model.d_ff, model.num_heads, model.head_dim
    tensors = [_patch_kernel(cfg),
               _reshaped("embeddings.position_embedding.weight", (cfg.num_tokens, d), "embed/position")]
    if cfg.patch_bias:
        tensors.append(_reshaped("embeddings.patch_embedding.bias", (d,), "embed/patch/bias"))
    if cfg.class_token:
        tensors.append(_reshaped("embeddings.class_embedding", (d,), "embed/class"))
    if model.embedding_norm:
        tensors += _norm("pre_layrnorm", "embed/norm", d)  # sic: CLIP's spelling
    block = "encoder.layers.{layer}"
    for hf_name, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
        tensors += [
            _linear(f"{block}.self_attn.{hf_name}.weight", (h * hd, d), f"blocks/attn/{ours}/kernel", (d, h, hd)),
            _reshaped(f"{block}.self_attn.{hf_name}.bias", (h * hd,), f"blocks/attn/{ours}/bias", (h, hd)),
        ]
    tensors += [
        _linear(f"{block}.self_attn.out_proj.weight", (d, h * hd), "blocks/attn/o/kernel", (h, hd, d)),
        _reshaped(f"{block}.self_attn.out_proj.bias", (d,), "blocks/attn/o/bias"),
        *_norm(f"{block}.layer_norm1", "blocks/attn_norm", d),
        *_norm(f"{block}.layer_norm2", "blocks/mlp_norm", d),
        *_mlp(f"{block}.mlp", "blocks/mlp", d, f),
    ]
    # the post-layernorm: on the pooled class token (CLIP), or on every token, the stack's final norm (SigLIP)
    tensors += _norm("post_layernorm", "pooled_norm" if cfg.pooled_norm else "final_norm", d)
    if cfg.pooling == "map":
        tensors += [
            _reshaped("head.probe", (1, 1, d), "head/probe", (d,)),
            *_in_projection("head.attention", cfg),
            _linear("head.attention.out_proj.weight", (d, d), "head/attn/o/kernel", (h, hd, d)),
            _reshaped("head.attention.out_proj.bias", (d,), "head/attn/o/bias"),
            *_norm("head.layernorm", "head/norm", d),
            *_mlp("head.mlp", "head/mlp", d, f),
        ]
    return tensors


def vision_tensor_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of every tensor of the vision tower this config describes."""
    return {name: m.hf_shape for m in vision_tensor_mappings(cfg) for name, _ in _instances(m, cfg.model)}


# --- loading -----------------------------------------------------------------------------------

# Fields that change parameter shapes or the math: a given cfg must agree with the checkpoint's.
_CHECKED_FIELDS = ("image_size", "patch_size", "num_channels", "class_token", "patch_bias", "pooling", "pooled_norm")
_CHECKED_MODEL_FIELDS = ("num_layers", "num_heads", "d_ff", "activation", "norm_eps", "embedding_norm", "final_norm")


def _resolve_vision_config(file_cfg: VisionConfig, cfg: VisionConfig | None) -> VisionConfig:
    """The checkpoint's config, or `cfg` after checking it describes the same tower (the width first)."""
    if cfg is None:
        return file_cfg
    if cfg.model.d_model != file_cfg.model.d_model:
        raise CheckpointMismatchError(
            f"the vision tower's width does not match the config: {CONFIG_FILE} has hidden_size="
            f"{file_cfg.model.d_model}, VisionConfig.model.d_model={cfg.model.d_model}; pass cfg=None to use the "
            f"checkpoint's config, or a config of d_model={file_cfg.model.d_model}")
    for owner, given_cfg, stored_cfg, fields in (("VisionConfig", cfg, file_cfg, _CHECKED_FIELDS),
                                                 ("VisionConfig.model", cfg.model, file_cfg.model,
                                                  _CHECKED_MODEL_FIELDS)):
        for field in fields:
            given, stored = getattr(given_cfg, field), getattr(stored_cfg, field)
            if given != stored:
                raise CheckpointMismatchError(f"{owner}.{field}={given!r} but the checkpoint's {CONFIG_FILE} gives "
                                              f"{stored!r}; pass cfg=None to use the checkpoint's config")
    return cfg


def _read_preprocessor(folder: Path) -> dict | None:
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointMismatchError(f"{path} is not valid JSON: {error}") from error


def _found_vision_tensors(handles: dict) -> dict[str, tuple[Path, str, tuple]]:
    """{name without "vision_model.": (file, name as stored, shape)} from the headers; other towers skipped."""
    found = {}
    for file, handle in handles.items():
        for stored_name in handle.keys():
            if stored_name.startswith(_SKIPPED) or stored_name.endswith("position_ids"):
                continue
            name = stored_name.removeprefix(_VISION_PREFIX)
            if name in found:
                raise CheckpointMismatchError(f"tensor {stored_name!r} appears twice: in {found[name][0].name} "
                                              f"and {file.name}")
            tensor = handle.get_slice(stored_name)
            if tensor.get_dtype() not in FLOAT_DTYPES:
                raise CheckpointMismatchError(f"tensor {stored_name!r} in {file.name} has dtype {tensor.get_dtype()}; "
                                              f"llmjax imports floating-point weights only")
            found[name] = (file, stored_name, tuple(tensor.get_shape()))
    return found


def load_hf_vision(path, cfg: VisionConfig | None = None) -> tuple[dict, VisionConfig]:
    """Vision-tower parameters and config from a Hugging Face CLIP / SigLIP folder (config.json plus
    model.safetensors or shards). cfg: the config to load into (it must describe the same tower; its dtypes are
    kept). Raises CheckpointMismatchError naming the first thing that differs."""
    folder = Path(path)
    file_cfg = vision_config_from_hf(_read_config(folder), _read_preprocessor(folder))
    cfg = _resolve_vision_config(file_cfg, cfg)
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_open_safetensors(file)) for file in _weight_files(folder)}
        found = _found_vision_tensors(handles)
        _check_tensors(found, vision_tensor_shapes(cfg), folder)
        cpu = jax.devices("cpu")[0]

        def read(name: str) -> np.ndarray:
            file, stored_name, _ = found[name]
            with jax.default_device(cpu):
                return np.asarray(handles[file].get_tensor(stored_name))

        flat = _convert_to_ours(vision_tensor_mappings(cfg), read, cfg.model, vision_spec(cfg))
    return _unflatten({name: jnp.asarray(value) for name, value in flat.items()}), cfg
