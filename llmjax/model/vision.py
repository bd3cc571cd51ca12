"""A Vision Transformer (ViT) built from llmjax's own Transformer: images [batch, height, width, channels] -> patch
tokens [batch, tokens, d_model] and one pooled vector per image.

    cfg = get_vision_config("vit-tiny")
    params = init_vision_params(cfg, jax.random.key(0))
    tokens = vision_features(params, images, cfg)          # images [B, H, W, 3] uint8 (or float in [0, 1])
    pooled = pooled_embedding(params, images, cfg)        # [B, d_model] float32

The pieces (Dosovitskiy et al. 2021; CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023):
- image normalization: uint8 / 255 (floats taken as already in [0, 1]), then (x - mean) / std per channel;
- the patch embedding: a convolution with stride = kernel = patch, written as a reshape into non-overlapping
  patches [batch, patches, patch * patch * channels] and one matmul (llmjax.model.layers.dense);
- a learned class token in front (CLIP) or none (SigLIP), learned position embeddings (one per token), optionally
  resized to another image size by torch's bicubic interpolation (as transformers' `interpolate_pos_encoding`);
- the bidirectional stack: `llmjax.model.transformer.hidden_states_from_embeddings` with cfg.model (causal=False,
  positions="learned"), which adds the position embeddings and applies CLIP's pre-layernorm (embedding_norm); the
  same block as every llmjax model. SigLIP's post-layernorm on all tokens is the stack's final norm; CLIP has none
  there (ModelConfig.final_norm=False) and norms the pooled token instead (VisionConfig.pooled_norm);
- pooling: the class token ("cls"), the mean of the patch tokens ("mean"), or SigLIP's multihead attention-pooling
  head ("map": a learned probe attends to the tokens, then a residual MLP), built from the model's attention
  projections, MLP and norm.

Parameters: the Transformer's (llmjax.model.transformer.model_spec, less the token embedding and output head), plus
    embed/patch/kernel   [patch * patch * channels, d_model]   (rows in (row, column, channel) order)
    embed/patch/bias     [d_model]                             (patch_bias: SigLIP)
    embed/class          [d_model]                             (class_token: CLIP)
    pooled_norm/...                                            (pooled_norm: CLIP's post_layernorm)
    head/probe [d_model], head/attn/{q,k,v,o}, head/norm, head/mlp   (pooling="map": SigLIP)
Hugging Face CLIP / SigLIP vision towers import into these (llmjax.io.hf_vision).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError, ModelConfig
from llmjax.model.attention import attention_spec, dot_product_attention, project_out
from llmjax.model.layers import dense, mlp, mlp_spec, norm, norm_spec
from llmjax.model.params import ParamSpec, init_from_specs, normal, zeros
from llmjax.model.pooling import cls_pool, mean_pool
from llmjax.model.transformer import hidden_states_from_embeddings, model_spec

VISION_POOLINGS = ("cls", "mean", "map")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel image statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP's: pixels to [-1, 1]


@dataclass(frozen=True)
class VisionConfig:
    """A ViT: image geometry, tokens, pooling and normalization around a Transformer (model: causal=False,
    positions="learned", max_seq_len = the number of tokens, patches plus the class token)."""

    model: ModelConfig
    image_size: int
    patch_size: int
    num_channels: int = 3
    class_token: bool = True  # a learned token in front of the patches (CLIP, ViT); SigLIP has none
    patch_bias: bool = False  # the patch convolution's bias (SigLIP has one, CLIP not)
    pooling: str = "cls"  # "cls", "mean" (over the patch tokens) or "map" (SigLIP's attention-pooling head)
    pooled_norm: bool = False  # a norm on the pooled vector (CLIP's post_layernorm)
    image_mean: tuple[float, ...] = HALF
    image_std: tuple[float, ...] = HALF
    name: str = dataclasses.field(default="custom", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        for field in ("image_size", "patch_size", "num_channels"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"VisionConfig.{field}={value!r}: must be a positive integer")
        if self.image_size % self.patch_size:
            raise ConfigError(f"VisionConfig.patch_size={self.patch_size} does not divide image_size="
                              f"{self.image_size}: the patches must tile the image")
        if self.model.causal:
            raise ConfigError("VisionConfig.model.causal=True: a ViT attends bidirectionally; set causal=False")
        if self.model.positions != "learned":
            raise ConfigError(f"VisionConfig.model.positions={self.model.positions!r}: a ViT uses learned position "
                              "embeddings (positions='learned')")
        if self.model.max_seq_len != self.num_tokens:
            raise ConfigError(f"VisionConfig.model.max_seq_len={self.model.max_seq_len} must equal the number of "
                              f"tokens, {self.num_tokens} ((image_size / patch_size)^2 patches"
                              f"{' + the class token' if self.class_token else ''})")
        if self.model.type_vocab_size:
            raise ConfigError("VisionConfig.model.type_vocab_size must be 0: images have no token types")
        if self.pooling not in VISION_POOLINGS:
            raise ConfigError(f"VisionConfig.pooling={self.pooling!r}: expected one of "
                              f"{', '.join(map(repr, VISION_POOLINGS))}")
        if self.pooling == "cls" and not self.class_token:
            raise ConfigError("VisionConfig.pooling='cls' needs class_token=True; use 'mean' or 'map' without one")
        for field in ("image_mean", "image_std"):
            if len(getattr(self, field)) != self.num_channels:
                raise ConfigError(f"VisionConfig.{field} has {len(getattr(self, field))} values for num_channels="
                                  f"{self.num_channels}: give one per channel")
        if not all(s > 0 for s in self.image_std):
            raise ConfigError(f"VisionConfig.image_std={self.image_std}: every value must be > 0")

    @property
    def grid(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens through the Transformer: the patches, plus the class token."""
        return self.num_patches + int(self.class_token)

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: patch * patch * channels."""
        return self.patch_size ** 2 * self.num_channels

    def replace(self, **changes) -> VisionConfig:
        return dataclasses.replace(self, **changes)


def vision_transformer_config(name: str, *, image_size: int, patch_size: int, class_token: bool, d_model: int,
                              num_layers: int, num_heads: int, d_ff: int, **model_fields) -> ModelConfig:
    """The Transformer of a ViT: bidirectional, pre-norm, learned positions, one per token; no vocabulary."""
    tokens = (image_size // patch_size) ** 2 + int(class_token)
    fields = dict(vocab_size=1, vocab_multiple=1, causal=False, positions="learned", norm="layernorm",
                  norm_position="pre", tie_embeddings=True, max_seq_len=tokens) | model_fields
    return ModelConfig(name=name, d_model=d_model, num_layers=num_layers, num_heads=num_heads, d_ff=d_ff, **fields)


def _vit(name: str, *, image_size: int, patch_size: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
         class_token: bool = True, model_fields: dict | None = None, **vision_fields) -> VisionConfig:
    model = vision_transformer_config(name, image_size=image_size, patch_size=patch_size, class_token=class_token,
                                      d_model=d_model, num_layers=num_layers, num_heads=num_heads, d_ff=d_ff,
                                      **(model_fields or {}))
    return VisionConfig(model=model, image_size=image_size, patch_size=patch_size, class_token=class_token,
                        name=name, **vision_fields)


_CLIP_MODEL = dict(activation="quick_gelu", norm_eps=1e-5, embedding_norm=True, final_norm=False)
_SIGLIP_MODEL = dict(activation="gelu_tanh", norm_eps=1e-6)

VISION_PRESETS: dict[str, VisionConfig] = {
    c.name: c
    for c in [
        # Tests and from-scratch toys: 32x32 images of 4x4 = 16 patches plus a class token, awkward widths.
        _vit("vit-tiny", image_size=32, patch_size=8, d_model=48, num_layers=2, num_heads=4, d_ff=96,
             model_fields=dict(activation="gelu", compute_dtype="float32")),
        # openai/clip-vit-base-patch32's vision tower (load its weights with llmjax.io.load_hf_vision).
        _vit("clip-vit-b-32", image_size=224, patch_size=32, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
             model_fields=_CLIP_MODEL, pooled_norm=True, image_mean=CLIP_MEAN, image_std=CLIP_STD),
        # google/siglip-base-patch16-224's vision tower.
        _vit("siglip-base-16", image_size=224, patch_size=16, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
             class_token=False, model_fields=_SIGLIP_MODEL, patch_bias=True, pooling="map"),
    ]
}


def get_vision_config(name: str, **overrides) -> VisionConfig:
    """A named ViT preset, optionally with some VisionConfig fields changed."""
    if name not in VISION_PRESETS:
        raise ConfigError(f"unknown vision preset {name!r}; available: {', '.join(VISION_PRESETS)}")
    return VISION_PRESETS[name].replace(**overrides) if overrides else VISION_PRESETS[name]


# --- parameters --------------------------------------------------------------------------------

def vision_spec(cfg: VisionConfig) -> dict:
    """The parameter spec tree of a ViT (see the module docstring)."""
    model = cfg.model
    spec = model_spec(model)
    spec.pop("lm_head", None)
    embed = {name: value for name, value in spec["embed"].items() if name != "token"}  # no vocabulary
    embed["patch"] = {"kernel": ParamSpec((cfg.patch_dim, model.d_model), ("patch", "embed"), normal(model.init_std),
                                          model.param_dtype)}
    if cfg.patch_bias:
        embed["patch"]["bias"] = ParamSpec((model.d_model,), ("embed",), zeros, model.param_dtype)
    if cfg.class_token:
        embed["class"] = ParamSpec((model.d_model,), ("embed",), normal(model.init_std), model.param_dtype)
    spec["embed"] = embed
    if cfg.pooled_norm:
        spec["pooled_norm"] = norm_spec(model)
    if cfg.pooling == "map":
        spec["head"] = {"probe": ParamSpec((model.d_model,), ("embed",), normal(model.init_std), model.param_dtype),
                        "attn": attention_spec(model), "norm": norm_spec(model), "mlp": mlp_spec(model)}
    return spec


@functools.partial(jax.jit, static_argnums=0)
def init_vision_params(cfg: VisionConfig, key: jax.Array) -> dict:
    """Freshly initialized ViT parameters (the Transformer's init; patch / class / probe: normal(init_std))."""
    return init_from_specs(vision_spec(cfg), key)


# --- images ------------------------------------------------------------------------------------

def check_images(images, cfg: VisionConfig, *, interpolate_positions: bool = False) -> None:
    """One clear error for images that are not [batch, height, width, num_channels] uint8 / float arrays of the
    configured size (with interpolate_positions: of any size the patch tiles)."""
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got shape {shape}")
    if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
        raise TypeError(f"images must be uint8 (0..255) or float (0..1), got dtype {images.dtype}")
    _, height, width, channels = shape
    if channels != cfg.num_channels:
        raise ValueError(f"images have {channels} channels, the vision tower takes num_channels={cfg.num_channels} "
                         f"(images are [batch, height, width, channels]; convert grey / RGBA images to RGB first)")
    if interpolate_positions:
        if height % cfg.patch_size or width % cfg.patch_size or not height or not width:
            raise ValueError(f"images of {height}x{width} pixels are not tiled by patch_size={cfg.patch_size}: "
                             f"resize them to multiples of {cfg.patch_size}")
    elif (height, width) != (cfg.image_size, cfg.image_size):
        raise ValueError(f"images are {height}x{width} pixels, the vision tower takes image_size={cfg.image_size} "
                         f"({cfg.image_size}x{cfg.image_size}); resize them, or pass interpolate_positions=True to "
                         f"resize the position embeddings instead")


def normalize_images(images: jax.Array, cfg: VisionConfig) -> jax.Array:
    """images [batch, H, W, C] uint8 (0..255) or float (0..1) -> float32 pixel values (x - mean) / std per channel
    (what transformers' image processors hand the model, channels last)."""
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    return (x - jnp.asarray(cfg.image_mean, jnp.float32)) / jnp.asarray(cfg.image_std, jnp.float32)


def patchify(pixels: jax.Array, patch_size: int) -> jax.Array:
    """[batch, H, W, C] -> [batch, (H / p) * (W / p), p * p * C]: non-overlapping patches in row-major order, each
    flattened in (row, column, channel) order."""
    batch, height, width, channels = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    x = pixels.reshape(batch, rows, patch_size, cols, patch_size, channels)  # [B, rows, p, cols, p, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, rows, cols, p, p, C]
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def patch_embeddings(params: dict, pixels: jax.Array, cfg: VisionConfig) -> jax.Array:
    """Normalized pixels [batch, H, W, C] -> patch vectors [batch, patches, d_model]: the stride-p convolution as a
    matmul on the flattened patches."""
    dtype = cfg.model.compute_dtype
    patch = jax.tree.map(lambda p: p.astype(dtype), params["embed"]["patch"])
    return dense(patch, patchify(pixels.astype(dtype), cfg.patch_size))


# --- positions ---------------------------------------------------------------------------------

def _cubic_weights(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
    """torch's bicubic convolution weights (a = -0.75) of the 4 taps around a point t in [0, 1) past its floor."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32: 1-D resampling of torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False, size=out_size), borders clamped; apply it along each image axis."""
    matrix = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for out in range(out_size):
        source = scale * (out + 0.5) - 0.5  # not clamped at 0 for cubic, as torch
        floor = int(np.floor(source))
        for tap, weight in enumerate(_cubic_weights(source - floor)):
            matrix[out, min(max(floor - 1 + tap, 0), in_size - 1)] += weight
    return matrix.astype(np.float32)


def position_table(params: dict, cfg: VisionConfig, rows: int, cols: int) -> jax.Array:
    """The learned position embeddings for a grid of rows x cols patches: [tokens, d_model], the class token's row
    first. The configured grid gives the table as it is; another is resized bicubically (as transformers'
    interpolate_pos_encoding, whose same-size square shortcut this shares)."""
    table = params["embed"]["position"]  # [num_tokens, d_model]
    if (rows, cols) == (cfg.grid, cfg.grid):
        return table
    start = int(cfg.class_token)
    grid = table[start:].reshape(cfg.grid, cfg.grid, -1).astype(jnp.float32)  # [grid, grid, d_model]
    resized = jnp.einsum("rg,gcd,kc->rkd", bicubic_matrix(cfg.grid, rows), grid, bicubic_matrix(cfg.grid, cols))
    return jnp.concatenate([table[:start], resized.reshape(rows * cols, -1).astype(table.dtype)])


# --- forward -----------------------------------------------------------------------------------

def hidden_from_pixels(params: dict, pixels: jax.Array, cfg: VisionConfig, *, interpolate_positions: bool = False
                       ) -> jax.Array:
    """Normalized pixel values [batch, H, W, C] (channels last) -> the Transformer's final hidden states [batch,
    tokens, d_model] in the compute dtype (CLIP: the last block's output; SigLIP: after its post-layernorm)."""
    check_images(pixels, cfg, interpolate_positions=interpolate_positions)
    batch, height, width, _ = pixels.shape
    rows, cols = height // cfg.patch_size, width // cfg.patch_size
    x = patch_embeddings(params, pixels, cfg)  # [batch, patches, d_model]
    if cfg.class_token:
        cls = jnp.broadcast_to(params["embed"]["class"].astype(x.dtype), (batch, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)  # [batch, tokens, d_model]
    tokens = x.shape[1]
    stack = {**params, "embed": {**params["embed"], "position": position_table(params, cfg, rows, cols)}}
    positions = jnp.broadcast_to(jnp.arange(tokens), (batch, tokens))  # [batch, tokens]
    hidden, _ = hidden_states_from_embeddings(stack, x, cfg.model, positions=positions)
    return hidden


@functools.partial(jax.jit, static_argnames=("cfg", "interpolate_positions"))
def vision_features(params: dict, images: jax.Array, cfg: VisionConfig, *, interpolate_positions: bool = False
                    ) -> jax.Array:
    """images [batch, H, W, C] uint8 (0..255) or float (0..1) -> token features [batch, tokens, d_model] (the class
    token first when the tower has one). interpolate_positions: accept any size the patch tiles, resizing the
    position embeddings; otherwise another size is an error."""
    check_images(images, cfg, interpolate_positions=interpolate_positions)
    return hidden_from_pixels(params, normalize_images(images, cfg), cfg, interpolate_positions=interpolate_positions)


def attention_pool(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """SigLIP's multihead attention-pooling (MAP) head: a learned probe [d_model] attends to hidden [batch, tokens,
    d_model] through the model's attention projections, then probe + mlp(norm(probe)) -> [batch, d_model]."""
    params = jax.tree.map(lambda p: p.astype(hidden.dtype), params)
    batch = hidden.shape[0]
    probe = jnp.broadcast_to(params["probe"], (batch, 1, hidden.shape[-1]))  # [batch, 1, d_model]
    attn = params["attn"]
    q = dense(attn["q"], probe)  # [batch, 1, heads, head_dim]
    k, v = dense(attn["k"], hidden), dense(attn["v"], hidden)  # [batch, tokens, kv_heads, head_dim]
    out = dot_product_attention(q, k, v, causal=False, impl="xla")  # one query: the reference core
    y = project_out(attn, out, cfg)  # [batch, 1, d_model]
    y = y + mlp(params["mlp"], norm(params["norm"], y, cfg), cfg)
    return y[:, 0]


def pool_hidden(params: dict, hidden: jax.Array, cfg: VisionConfig) -> jax.Array:
    """Token features [batch, tokens, d_model] -> one float32 vector per image [batch, d_model] by cfg.pooling,
    then cfg.pooled_norm (CLIP's post_layernorm)."""
    if cfg.pooling == "cls":
        pooled = cls_pool(hidden)
    elif cfg.pooling == "mean":
        patches = hidden[:, int(cfg.class_token):]
        pooled = mean_pool(patches, jnp.ones(patches.shape[:2], bool))
    else:
        pooled = attention_pool(params["head"], hidden, cfg.model).astype(jnp.float32)
    if cfg.pooled_norm:
        scale_bias = jax.tree.map(lambda p: p.astype(jnp.float32), params["pooled_norm"])
        pooled = norm(scale_bias, pooled[:, None], cfg.model)[:, 0]  # as [batch, 1, d_model]: the norm's layout
    return pooled


def pooled_embedding(params: dict, images: jax.Array, cfg: VisionConfig, *, interpolate_positions: bool = False
                     ) -> jax.Array:
    """images -> one float32 vector per image [batch, d_model] (CLIP / SigLIP's pooler_output)."""
    return encode_images(params, images, cfg, interpolate_positions=interpolate_positions)[1]


@functools.partial(jax.jit, static_argnames=("cfg", "interpolate_positions"))
def encode_images(params: dict, images: jax.Array, cfg: VisionConfig, *, interpolate_positions: bool = False
                  ) -> tuple[jax.Array, jax.Array]:
    """images -> (token features [batch, tokens, d_model], pooled float32 [batch, d_model]) in one compiled call:
    transformers' (last_hidden_state, pooler_output)."""
    check_images(images, cfg, interpolate_positions=interpolate_positions)
    hidden = hidden_from_pixels(params, normalize_images(images, cfg), cfg, interpolate_positions=interpolate_positions)
    return hidden, pool_hidden(params, hidden, cfg)
