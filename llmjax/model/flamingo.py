"""A Flamingo-style visual language model (Alayrac et al. 2022): a vision tower, a perceiver resampler and gated
cross-attention blocks interleaved into a frozen llmjax decoder.

    cfg = FlamingoConfig(lm=lm_cfg, vision=get_vision_config("vit-tiny"), num_latents=8, xattn_every=1)
    params = init_flamingo_params(cfg, jax.random.key(0), lm_params=lm_params)
    latents = visual_latents(params, images, cfg)          # images [batch, images, H, W, 3] -> [b, images, L, d_v]
    logits = flamingo_logits(params, tokens, latents, cfg)  # tokens [batch, seq] -> [batch, seq, padded_vocab]

The pieces:
- the vision tower (llmjax.model.vision): token features [batch * images, tokens, d_v] for every image;
- the perceiver resampler (`resample`): num_latents learned latents [L, d_v] cross-attend, in `resampler_layers`
  layers of attention + feed-forward, to the image's features plus a learned time embedding per frame, concatenated
  with the latents themselves (the paper's keys): a fixed [L, d_v] per image whatever the number of visual tokens;
- gated cross-attention dense blocks (`gated_cross_attention`): before LM layers 0, N, 2N, ... (N = xattn_every),
  x + tanh(alpha_attn) * cross_attention(norm(x) -> latents), then x + tanh(alpha_mlp) * mlp(norm(x)); both alphas
  start at 0, so at initialization the model's logits are the frozen LM's bit for bit. Unlike the paper (whose dense
  feed-forward also changes text that sees no image), a token that sees no image skips the whole block: text before
  the first image, and text-only inputs, keep the frozen LM's logits exactly after training too;
- the image mask (`image_index`, `image_mask`): text token t attends only to the latents of the latest image whose
  `<image>` token is at or before t (the `<image>` token itself sees its image, as OpenFlamingo); tokens before the
  first image see no latents, and their cross-attention output is exactly 0;
- `<image>` and `<|endofchunk|>`: ids lm.vocab_size and lm.vocab_size + 1 (FlamingoConfig.image_token_id,
  end_of_chunk_id), embedded by two new trained rows (params["new_tokens"]); the LM's own rows are unchanged. They
  are input tokens only: the output head is the LM's, over its own vocabulary, so text-only logits are the LM's.

Parameters: {"lm": the decoder's (frozen), "vision": the ViT's, "resampler": {latents [L, d_v], time [frames, d_v],
layers/... stacked [resampler_layers, ...], norm}, "xattn": stacked [num_layers / N, ...] {attn_norm, attn {q
[d_model, heads, head_dim], k, v [d_v, heads, head_dim], o}, alpha_attn [], mlp_norm, mlp, alpha_mlp []},
"new_tokens" [2, d_model]}. `trainable_names(cfg, train_vision)` says which top-level entries a VLM trains.
Generation with a KV cache (visual latents and their cross-attention keys / values computed once): llmjax.infer.vlm.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError, ModelConfig
from llmjax.kernels.platform import compute_platform
from llmjax.model.attention import attention_spec, project_out
from llmjax.model.layers import dense, mlp, mlp_spec, norm, norm_spec
from llmjax.model.params import ParamSpec, init_from_specs, normal, stack_layers, zeros
from llmjax.model.transformer import (ACTIVATION_AXES, block, final_norm, init_params, logits_from_hidden,
                                      remat_policy, scan_unroll)
from llmjax.model.vision import VisionConfig, init_vision_params, vision_features, vision_spec
from llmjax.nn import embedding, scaled_dot_product_attention
from llmjax.nn.losses import token_cross_entropy
from llmjax.parallel.logical import constrain

NEW_TOKENS = 2  # <image>, <|endofchunk|>


class FlamingoInputError(ValueError):
    """Images and tokens that do not fit together (or a tower that does not fit the config); one clear line."""


@dataclass(frozen=True)
class FlamingoConfig:
    """The frozen LM, the vision tower, and the new parts' sizes."""

    lm: ModelConfig
    vision: VisionConfig
    num_latents: int = 16  # visual tokens per image after the resampler
    resampler_layers: int = 2
    resampler_heads: int = 4
    resampler_ff_mult: int = 4
    xattn_every: int = 1  # a gated cross-attention block before every N-th LM layer (0, N, 2N, ...)
    xattn_heads: int | None = None  # None: the LM's num_heads
    xattn_ff_mult: int = 4
    max_images: int = 16  # images per sequence the data may hold (a check, not a parameter shape)
    max_frames: int = 1  # frames per image / video: rows of the resampler's time embedding

    def __post_init__(self):
        for field in ("num_latents", "resampler_layers", "resampler_heads", "resampler_ff_mult", "xattn_every",
                      "xattn_ff_mult", "max_images", "max_frames"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"FlamingoConfig.{field}={value!r}: must be a positive integer")
        lm = self.lm
        if not lm.causal:
            raise ConfigError("FlamingoConfig.lm is an encoder (causal=False): Flamingo extends a decoder")
        if lm.is_moe or lm.type_vocab_size or lm.embedding_norm:
            raise ConfigError("FlamingoConfig.lm: Mixture-of-Experts, token-type and embedding-norm models are not "
                              "supported; use a dense GPT-2 / LLaMA-style decoder")
        if lm.num_layers % self.xattn_every:
            raise ConfigError(f"FlamingoConfig.xattn_every={self.xattn_every} does not divide the LM's num_layers="
                              f"{lm.num_layers}: cross-attention goes before every N-th layer, in equal groups")
        if self.vision.model.d_model % self.resampler_heads:
            raise ConfigError(f"FlamingoConfig.resampler_heads={self.resampler_heads} does not divide the vision "
                              f"width {self.vision.model.d_model}")
        if lm.d_model % self.cross_heads:
            raise ConfigError(f"FlamingoConfig.xattn_heads={self.cross_heads} does not divide the LM's d_model="
                              f"{lm.d_model}")

    @property
    def cross_heads(self) -> int:
        return self.xattn_heads or self.lm.num_heads

    @property
    def num_xattn(self) -> int:
        return self.lm.num_layers // self.xattn_every

    @property
    def image_token_id(self) -> int:
        return self.lm.vocab_size

    @property
    def end_of_chunk_id(self) -> int:
        return self.lm.vocab_size + 1

    @property
    def vocab_size(self) -> int:
        """Input ids: the LM's, then <image> and <|endofchunk|>."""
        return self.lm.vocab_size + NEW_TOKENS

    @property
    def vision_width(self) -> int:
        return self.vision.model.d_model

    def replace(self, **changes) -> FlamingoConfig:
        return dataclasses.replace(self, **changes)


def resampler_model_config(cfg: FlamingoConfig) -> ModelConfig:
    """The resampler's layer sizes as a ModelConfig (bidirectional, LayerNorm, GELU, no biases): what the shared
    attention / MLP / norm specs and layers read."""
    d = cfg.vision_width
    return ModelConfig(name="resampler", vocab_size=1, vocab_multiple=1, d_model=d, num_layers=cfg.resampler_layers,
                       num_heads=cfg.resampler_heads, d_ff=cfg.resampler_ff_mult * d, causal=False, norm="layernorm",
                       activation="gelu", attention_bias=False, mlp_bias=False, positions="learned", max_seq_len=1,
                       param_dtype=cfg.lm.param_dtype, compute_dtype=cfg.lm.compute_dtype, norm_impl="xla",
                       attention_impl="xla")


def xattn_model_config(cfg: FlamingoConfig) -> ModelConfig:
    """The gated cross-attention blocks' sizes as a ModelConfig (the LM's width and norm, GELU feed-forward)."""
    lm = cfg.lm
    return ModelConfig(name="xattn", vocab_size=1, vocab_multiple=1, d_model=lm.d_model, num_layers=cfg.num_xattn,
                       num_heads=cfg.cross_heads, d_ff=cfg.xattn_ff_mult * lm.d_model, norm=lm.norm,
                       norm_eps=lm.norm_eps, activation="gelu", attention_bias=False, mlp_bias=False,
                       positions="learned", max_seq_len=1, param_dtype=lm.param_dtype,
                       compute_dtype=lm.compute_dtype, norm_impl="xla", attention_impl="xla")


# --- parameters --------------------------------------------------------------------------------

def resampler_spec(cfg: FlamingoConfig) -> dict:
    rc = resampler_model_config(cfg)
    layer = {"media_norm": norm_spec(rc), "latent_norm": norm_spec(rc), "attn": attention_spec(rc),
             "mlp_norm": norm_spec(rc), "mlp": mlp_spec(rc)}
    return {"latents": ParamSpec((cfg.num_latents, rc.d_model), ("latents", "embed"), normal(1.0), rc.param_dtype),
            "time": ParamSpec((cfg.max_frames, rc.d_model), ("frames", "embed"), normal(0.02), rc.param_dtype),
            "layers": stack_layers(layer, cfg.resampler_layers), "norm": norm_spec(rc)}


def xattn_spec(cfg: FlamingoConfig) -> dict:
    """One gated cross-attention block, stacked on a leading [num_xattn] axis."""
    xc = xattn_model_config(cfg)
    d, dv, h, hd, dtype = xc.d_model, cfg.vision_width, xc.num_heads, xc.head_dim, xc.param_dtype
    std = xc.init_std
    attn = {"q": {"kernel": ParamSpec((d, h, hd), ("embed", "heads", "head_dim"), normal(std), dtype)},
            "k": {"kernel": ParamSpec((dv, h, hd), ("embed", "heads", "head_dim"), normal(std), dtype)},
            "v": {"kernel": ParamSpec((dv, h, hd), ("embed", "heads", "head_dim"), normal(std), dtype)},
            "o": {"kernel": ParamSpec((h, hd, d), ("heads", "head_dim", "embed"), normal(std), dtype)}}
    layer = {"attn_norm": norm_spec(xc), "attn": attn, "alpha_attn": ParamSpec((), (), zeros, "float32"),
             "mlp_norm": norm_spec(xc), "mlp": mlp_spec(xc), "alpha_mlp": ParamSpec((), (), zeros, "float32")}
    return stack_layers(layer, cfg.num_xattn)


def new_parts_spec(cfg: FlamingoConfig) -> dict:
    """The parameters Flamingo adds to the LM and the vision tower."""
    lm = cfg.lm
    return {"resampler": resampler_spec(cfg), "xattn": xattn_spec(cfg),
            "new_tokens": ParamSpec((NEW_TOKENS, lm.d_model), ("new_tokens", "embed"), normal(lm.init_std),
                                    lm.param_dtype)}


def _first_shape_difference(given, spec, what: str) -> str | None:
    wanted = {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(
        spec, is_leaf=lambda x: isinstance(x, ParamSpec))[0]}
    found = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(given)[0]}
    for name, shape in wanted.items():
        if name not in found:
            return f"{what} lacks {name}"
        if found[name] != shape:
            return f"{what}{name} has shape {found[name]}, the config wants {shape}"
    extra = sorted(set(found) - set(wanted))
    return f"{what} has {extra[0]}, which the config lacks" if extra else None


def check_vision_params(vision_params: dict, cfg: FlamingoConfig) -> None:
    """One clear error for a vision tower whose parameters do not fit cfg.vision (the width first)."""
    kernel = vision_params.get("embed", {}).get("patch", {}).get("kernel")
    if kernel is not None and np.shape(kernel)[-1] != cfg.vision_width:
        raise FlamingoInputError(f"the vision tower's width {np.shape(kernel)[-1]} does not match the config's "
                                 f"FlamingoConfig.vision.model.d_model={cfg.vision_width} (the resampler and the "
                                 f"cross-attention keys are built for that width); build the config from the tower's")
    problem = _first_shape_difference(vision_params, vision_spec(cfg.vision), "the vision tower")
    if problem:
        raise FlamingoInputError(f"{problem}: the tower does not match FlamingoConfig.vision")


def check_lm_params(lm_params: dict, cfg: FlamingoConfig) -> None:
    from llmjax.model.transformer import model_spec

    problem = _first_shape_difference(lm_params, model_spec(cfg.lm), "the language model")
    if problem:
        raise FlamingoInputError(f"{problem}: the LM does not match FlamingoConfig.lm")


def init_new_parts(cfg: FlamingoConfig, key: jax.Array) -> dict:
    """The resampler, cross-attention blocks (gates at 0) and the two new token rows, freshly initialized (op by op:
    a few small parameters, where compiling one program of every leaf's random draw takes longer on a CPU)."""
    return init_from_specs(new_parts_spec(cfg), key)


def init_flamingo_params(cfg: FlamingoConfig, key: jax.Array, *, lm_params: dict | None = None,
                         vision_params: dict | None = None) -> dict:
    """Every parameter: the given (else random) LM and vision tower, and the new parts."""
    lm_key, vision_key, new_key = jax.random.split(key, 3)
    if lm_params is None:
        lm_params = init_params(cfg.lm, lm_key)
    check_lm_params(lm_params, cfg)
    if vision_params is None:
        vision_params = init_vision_params(cfg.vision, vision_key)
    check_vision_params(vision_params, cfg)
    return {"lm": lm_params, "vision": vision_params, **init_new_parts(cfg, new_key)}


def trainable_names(train_vision: bool = False) -> tuple[str, ...]:
    """The top-level parameter entries a VLM trains: the new parts (and the tower if asked); never the LM."""
    return ("resampler", "xattn", "new_tokens") + (("vision",) if train_vision else ())


def split_trainable(params: dict, train_vision: bool = False) -> tuple[dict, dict]:
    """(trainable, frozen) halves of the parameters; `{**trainable, **frozen}` puts them back."""
    names = trainable_names(train_vision)
    return ({k: v for k, v in params.items() if k in names}, {k: v for k, v in params.items() if k not in names})


# --- vision side -------------------------------------------------------------------------------

def image_features(vision_params: dict, images: jax.Array, cfg: FlamingoConfig) -> jax.Array:
    """images [batch, images, H, W, C] (uint8, or float in [0, 1]) -> the tower's token features [batch, images,
    tokens, d_v]."""
    if images.ndim != 5:
        raise FlamingoInputError(f"images must be [batch, images, height, width, channels], got shape "
                                 f"{tuple(images.shape)}")
    batch, count = images.shape[:2]
    flat = images.reshape(batch * count, *images.shape[2:])
    features = vision_features(vision_params, flat, cfg.vision)  # [batch * images, tokens, d_v]
    return features.reshape(batch, count, *features.shape[1:])


def resample(params: dict, features: jax.Array, cfg: FlamingoConfig) -> jax.Array:
    """The perceiver resampler: features [batch, images, tokens, d_v] (or [batch, images, frames, tokens, d_v]) ->
    latents [batch, images, num_latents, d_v], whatever the number of tokens (and frames)."""
    rc = resampler_model_config(cfg)
    if features.ndim == 4:
        features = features[:, :, None]  # one frame
    if features.ndim != 5 or features.shape[-1] != rc.d_model:
        raise FlamingoInputError(f"resampler: features of shape {tuple(features.shape)}; expected [batch, images, "
                                 f"(frames,) tokens, {rc.d_model}] (FlamingoConfig.vision.model.d_model)")
    batch, count, frames, tokens, d = features.shape
    if frames > cfg.max_frames:
        raise FlamingoInputError(f"{frames} frames per image, FlamingoConfig.max_frames={cfg.max_frames}")
    p = jax.tree.map(lambda a: a.astype(rc.compute_dtype), params)
    media = features.astype(rc.compute_dtype) + p["time"][:frames][None, None, :, None, :]
    media = media.reshape(batch * count, frames * tokens, d)  # [b * n, frames * tokens, d_v]
    latents = jnp.broadcast_to(p["latents"], (batch * count, cfg.num_latents, d))

    def layer_step(latents, layer):
        m, x = norm(layer["media_norm"], media, rc), norm(layer["latent_norm"], latents, rc)
        keys = jnp.concatenate([m, x], axis=1)  # [b * n, frames * tokens + L, d_v]: the paper's media + latents
        q = dense(layer["attn"]["q"], x)  # [b * n, L, heads, head_dim]
        k, v = dense(layer["attn"]["k"], keys), dense(layer["attn"]["v"], keys)
        latents = latents + project_out(layer["attn"], scaled_dot_product_attention(q, k, v), rc)
        latents = latents + mlp(layer["mlp"], norm(layer["mlp_norm"], latents, rc), rc)
        return latents, None

    latents, _ = jax.lax.scan(layer_step, latents, p["layers"])
    return norm(p["norm"], latents, rc).reshape(batch, count, cfg.num_latents, d)


def visual_latents(params: dict, images: jax.Array, cfg: FlamingoConfig) -> jax.Array:
    """images [batch, images, H, W, C] -> resampled latents [batch, images, num_latents, d_v]."""
    return resample(params["resampler"], image_features(params["vision"], images, cfg), cfg)


# --- the image mask ----------------------------------------------------------------------------

def image_index(tokens: jax.Array, image_token_id: int) -> jax.Array:
    """tokens [batch, seq] -> int32 [batch, seq]: the index (0, 1, ...) within its row of the latest image whose
    <image> token is at or before each token; -1 before the row's first image."""
    return jnp.cumsum(tokens == image_token_id, axis=1, dtype=jnp.int32) - 1


def image_mask(index: jax.Array, num_images: int, num_latents: int) -> jax.Array:
    """index [batch, seq] (image_index) -> bool [batch, seq, num_images * num_latents]: token t sees the latents of
    image index[t] only (none for -1)."""
    key_image = jnp.arange(num_images * num_latents, dtype=jnp.int32) // num_latents  # [images * L]
    return index[..., None] == key_image


def check_image_tokens(tokens, image_counts, cfg: FlamingoConfig) -> None:
    """One clear error unless row b of tokens [batch, seq] holds exactly image_counts[b] <image> tokens (concrete
    values, on the host)."""
    tokens = np.asarray(tokens)
    found = (tokens == cfg.image_token_id).sum(axis=1)
    for row, (have, given) in enumerate(zip(found.tolist(), list(image_counts))):
        if have != given:
            more = "more <image> tokens than images" if have > given else "more images than <image> tokens"
            raise FlamingoInputError(f"row {row}: {have} <image> token(s) but {given} image(s) ({more}); give one "
                                     f"image per <image> token, in order")
        if given > cfg.max_images:
            raise FlamingoInputError(f"row {row}: {given} images, FlamingoConfig.max_images={cfg.max_images}")


# --- gated cross-attention ---------------------------------------------------------------------

def cross_attention_kv(layer: dict, media: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A block's keys and values of media [batch, images * L, d_v]: [batch, images * L, heads, head_dim] each (what
    generation computes once per prompt)."""
    return dense(layer["attn"]["k"], media), dense(layer["attn"]["v"], media)


def gated_cross_attention(layer: dict, x: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                          cfg: FlamingoConfig) -> jax.Array:
    """x [batch, seq, d_model] + tanh(alpha_attn) * attention(norm(x) -> k, v where visible [batch, seq, keys]),
    then + tanh(alpha_mlp) * mlp(norm(x)). A token that sees no key gets exactly 0 from both (it stays x)."""
    xc = xattn_model_config(cfg)
    with jax.named_scope("xattn"):
        q = dense(layer["attn"]["q"], norm(layer["attn_norm"], x, xc))  # [batch, seq, heads, head_dim]
        out = scaled_dot_product_attention(q, k, v, mask=visible[:, None])  # fully masked rows: zeros
        y = project_out(layer["attn"], out, xc)
        x = x + jnp.tanh(layer["alpha_attn"]).astype(x.dtype) * y
        y = mlp(layer["mlp"], norm(layer["mlp_norm"], x, xc), xc)
        sees_an_image = jnp.any(visible, axis=-1)[..., None]  # [batch, seq, 1]
        return x + jnp.where(sees_an_image, jnp.tanh(layer["alpha_mlp"]).astype(x.dtype) * y, 0)


# --- the forward -------------------------------------------------------------------------------

def input_embeddings(lm_embed: dict, new_tokens: jax.Array, tokens: jax.Array, positions: jax.Array,
                     cfg: FlamingoConfig) -> jax.Array:
    """tokens [batch, seq] (LM ids, <image>, <|endofchunk|>) -> [batch, seq, d_model] in the compute dtype: the
    LM's rows or the two new ones, plus the LM's learned positions (as the LM embeds)."""
    lm = cfg.lm
    dtype = lm.compute_dtype
    old = embedding(lm_embed["token"].astype(dtype), jnp.clip(tokens, 0, lm.vocab_size - 1))
    new = embedding(new_tokens.astype(dtype), jnp.clip(tokens - lm.vocab_size, 0, NEW_TOKENS - 1))
    x = jnp.where((tokens >= lm.vocab_size)[..., None], new, old)
    if lm.positions == "learned":
        x = x + embedding(lm_embed["position"].astype(dtype), positions)
    return x


def media_keys(latents: jax.Array | None, batch: int, cfg: FlamingoConfig) -> jax.Array:
    """latents [batch, images, L, d_v] -> [batch, images * L, d_v] in the compute dtype; no images (None or 0 of
    them): one all-zero image that no token sees, so shapes stay non-empty."""
    if latents is None or latents.shape[1] == 0:
        latents = jnp.zeros((batch, 1, cfg.num_latents, cfg.vision_width), cfg.lm.compute_dtype)
    return latents.reshape(batch, -1, latents.shape[-1]).astype(cfg.lm.compute_dtype)


def flamingo_hidden_states(params: dict, tokens: jax.Array, latents: jax.Array | None, cfg: FlamingoConfig, *,
                           positions: jax.Array | None = None) -> jax.Array:
    """tokens [batch, seq], latents [batch, images, L, d_v] (visual_latents; None: text only) -> final hidden
    states [batch, seq, d_model]: num_layers / N groups of (one gated cross-attention block, then N LM blocks, the
    LM's own `block` on its stacked parameters), scanned over groups."""
    lm = cfg.lm
    batch, seq = tokens.shape
    if seq > lm.max_seq_len:
        raise FlamingoInputError(f"sequence length {seq} exceeds the LM's max_seq_len={lm.max_seq_len}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    lm_params = jax.tree.map(lambda p: p.astype(lm.compute_dtype), params["lm"])
    x = input_embeddings(lm_params["embed"], params["new_tokens"], tokens, positions, cfg)
    media = media_keys(latents, batch, cfg)
    visible = image_mask(image_index(tokens, cfg.image_token_id), media.shape[1] // cfg.num_latents, cfg.num_latents)
    xattn = jax.tree.map(lambda p: p if p.ndim == 1 else p.astype(lm.compute_dtype), params["xattn"])
    groups, every = cfg.num_xattn, cfg.xattn_every
    grouped = jax.tree.map(lambda p: p.reshape(groups, every, *p.shape[1:]), lm_params["blocks"])  # [G, N, ...]
    unroll = scan_unroll(lm, compute_platform(x))

    def block_step(x, layer):
        x, _, _ = block(layer, x, positions, lm)
        return constrain(x, ACTIVATION_AXES), None

    if lm.remat != "none":
        block_step = jax.checkpoint(block_step, policy=remat_policy(lm), prevent_cse=False)

    def group_step(x, group):
        layer, blocks = group
        k, v = cross_attention_kv(layer, media)
        x = gated_cross_attention(layer, x, k, v, visible, cfg)
        x, _ = jax.lax.scan(block_step, x, blocks, unroll=min(unroll, every))
        return x, None

    x, _ = jax.lax.scan(group_step, constrain(x, ACTIVATION_AXES), (xattn, grouped))
    return final_norm(lm_params, x, lm)


def flamingo_logits(params: dict, tokens: jax.Array, latents: jax.Array | None, cfg: FlamingoConfig, *,
                    positions: jax.Array | None = None) -> jax.Array:
    """tokens [batch, seq] and latents (or None) -> float32 logits [batch, seq, LM padded_vocab] over the LM's
    vocabulary (the new tokens are inputs only)."""
    x = flamingo_hidden_states(params, tokens, latents, cfg, positions=positions)
    return logits_from_hidden(params["lm"], x, cfg.lm)


@functools.partial(jax.jit, static_argnames=("cfg",))
def flamingo_forward(params: dict, tokens: jax.Array, images: jax.Array, cfg: FlamingoConfig) -> jax.Array:
    """tokens [batch, seq] and images [batch, images, H, W, C] -> logits: the vision tower, the resampler and the
    LM with its cross-attention blocks, in one compiled call."""
    latents = visual_latents(params, images, cfg) if images.shape[1] else None
    return flamingo_logits(params, tokens, latents, cfg)


def token_losses(params: dict, tokens: jax.Array, latents: jax.Array | None, loss_mask: jax.Array,
                 cfg: FlamingoConfig) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropies where loss_mask [batch, seq - 1], count of those tokens): targets are
    tokens[:, 1:]; a target that is a new token (<image>, <|endofchunk|>) is never scored."""
    logits = flamingo_logits(params, tokens[:, :-1], latents, cfg)  # [batch, seq - 1, padded_vocab]
    return cross_entropy_sums(logits, tokens[:, 1:], loss_mask, cfg.lm.vocab_size)


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array, vocab_size: int
                       ) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target) where mask, count): logits [batch, seq, padded_vocab] float32, targets / mask [batch,
    seq]. A target >= vocab_size (a new token) is never scored. Shared by the VLM and its frozen LM's own loss."""
    mask = mask & (targets < vocab_size)
    nll, _ = token_cross_entropy(logits, jnp.clip(targets, 0, vocab_size - 1))  # [batch, seq]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)


# --- saving the config ---------------------------------------------------------------------------------------------

def flamingo_config_to_dict(cfg: FlamingoConfig) -> dict:
    return dataclasses.asdict(cfg)


def flamingo_config_from_dict(data: dict) -> FlamingoConfig:
    from llmjax.config import model_config_from_dict

    data = dict(data)
    lm = model_config_from_dict(data.pop("lm"))
    vision = dict(data.pop("vision"))
    vision["model"] = model_config_from_dict(vision["model"])
    return FlamingoConfig(lm=lm, vision=VisionConfig(**vision), **data)
