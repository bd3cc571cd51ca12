"""Generation for the Flamingo VLM (llmjax.model.flamingo) with a KV cache.

    out = vlm_generate(params, cfg, prompts=[ids, ...], images=[[image, ...], ...], max_new_tokens=24, eos_id=eot)

The images of every prompt go through the vision tower and the resampler once, and each gated cross-attention block's
keys / values of those latents are computed once (`cross_attention_cache`) and read at every step. The text's own
keys / values live in the ordinary contiguous cache (llmjax.infer.kv_cache), written by decode_model's
`prefill_layer` / `decode_layer`: the LM's own block, with the cross-attention block called before every
xattn_every-th layer. A generated token attends to the latest image of its prompt (the new tokens are never
generated: the output head covers the LM's vocabulary only). The decode loop is llmjax.infer.generate's compiled one
(sampling, EOS, the while_loop on the device), run with the VLM's prefill and decode step (`vlm_decode_model`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.infer import kv_cache
from llmjax.infer.decode_model import _logits, decode_layer, prefill_layer, prepare_params, resolve_decode_impl
from llmjax.infer.generate import (DecodeModel, GenerationError, LoopOptions, compiled_loop, generation_output,
                                   pad_prompts)
from llmjax.infer.sampling import SamplingConfig, batch_sampling
from llmjax.kernels.platform import compute_platform
from llmjax.model.attention import causal_self_attention
from llmjax.model.flamingo import (FlamingoConfig, check_image_tokens, cross_attention_kv, gated_cross_attention,
                                   image_index, image_mask, input_embeddings, media_keys, visual_latents)
from llmjax.model.layers import norm


@dataclass
class VLMOutput:
    tokens: list[list[int]]
    finish_reasons: list[str]  # "eos" or "length"
    logits: list[np.ndarray] | None = None  # keep_logits: float32 [batch, padded_vocab] per step


def prepare_vlm_params(params: dict, cfg: FlamingoConfig) -> dict:
    """Decode-ready weights: the LM's (decode_model.prepare_params: compute dtype, per-layer, fused), the
    cross-attention blocks one dict per block in the compute dtype (gates kept float32), the new token rows."""
    dtype = jnp.dtype(cfg.lm.compute_dtype)
    xattn = [jax.tree.map(lambda p: p[g] if p.ndim == 1 else p[g].astype(dtype), params["xattn"])
             for g in range(cfg.num_xattn)]
    return {"lm": prepare_params(params["lm"], cfg.lm), "xattn": xattn,
            "new_tokens": params["new_tokens"].astype(dtype)}


def cross_attention_cache(dparams: dict, latents: jax.Array | None, batch: int, cfg: FlamingoConfig) -> dict:
    """Each block's keys / values of the prompt's latents [batch, images, L, d_v]: {"k": [blocks, batch, images * L,
    heads, head_dim], "v": ...}: computed once per prompt."""
    media = media_keys(latents, batch, cfg)
    pairs = [cross_attention_kv(layer, media) for layer in dparams["xattn"]]
    return {"k": jnp.stack([k for k, _ in pairs]), "v": jnp.stack([v for _, v in pairs])}


def _images_in_cache(cross: dict, cfg: FlamingoConfig) -> int:
    return cross["k"].shape[2] // cfg.num_latents


def vlm_prefill(dparams: dict, tokens: jax.Array, valid: jax.Array, cache: dict, cross: dict, cfg: FlamingoConfig):
    """The prompts tokens [batch, seq] (valid [batch, seq]; padding on either side) into an empty cache ->
    (logits of each row's last prompt token [batch, padded_vocab], cache, each row's latest image index [batch])."""
    lm = cfg.lm
    cache = kv_cache.set_prefill_layout(cache, valid)
    positions, _, _ = kv_cache.prompt_layout(valid)
    x = input_embeddings(dparams["lm"]["embed"], dparams["new_tokens"], tokens, jnp.clip(positions, 0, None), cfg)
    index = image_index(jnp.where(valid, tokens, -1), cfg.image_token_id)  # [batch, seq]
    visible = image_mask(index, _images_in_cache(cross, cfg), cfg.num_latents)
    self_attend = causal_self_attention(lm, valid.astype(jnp.int32))
    rope_positions = jnp.maximum(positions, 0)
    for i, layer in enumerate(dparams["lm"]["layers"]):
        if i % cfg.xattn_every == 0:
            g = i // cfg.xattn_every
            x = gated_cross_attention(dparams["xattn"][g], x, cross["k"][g], cross["v"][g], visible, cfg)
        x, cache = prefill_layer(layer, x, rope_positions, self_attend, cache, i, lm)
    last = cache["next_slot"] - 1
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [batch, 1, d_model]
    x = norm(dparams["lm"]["final_norm"], x, lm)
    return _logits(dparams["lm"], x, lm)[:, 0], cache, jnp.max(index, axis=1)


def vlm_decode_step(dparams: dict, tokens: jax.Array, cache: dict, cross: dict, current_image: jax.Array,
                    cfg: FlamingoConfig, impl: str = "auto"):
    """One token per row, tokens [batch] (attending to image current_image [batch]) -> (logits [batch,
    padded_vocab], cache)."""
    lm = cfg.lm
    impl = resolve_decode_impl(impl, lm)
    batch = tokens.shape[0]
    positions = cache["next_position"]  # [batch]
    x = input_embeddings(dparams["lm"]["embed"], dparams["new_tokens"], tokens[:, None], positions[:, None], cfg)
    visible = image_mask(current_image[:, None], _images_in_cache(cross, cfg), cfg.num_latents)  # [batch, 1, keys]
    capacity = cache["positions"].shape[1]
    slot = cache["next_slot"] % capacity
    kv_positions = cache["positions"].at[jnp.arange(batch), slot].set(positions)
    kv_lengths = jnp.minimum(cache["next_slot"] + 1, capacity)
    for i, layer in enumerate(dparams["lm"]["layers"]):
        if i % cfg.xattn_every == 0:
            g = i // cfg.xattn_every
            x = gated_cross_attention(dparams["xattn"][g], x, cross["k"][g], cross["v"][g], visible, cfg)
        x, cache = decode_layer(layer, x, cache, i, lm, kv_positions=kv_positions, kv_lengths=kv_lengths, impl=impl)
    cache = kv_cache.advance(cache)
    x = norm(dparams["lm"]["final_norm"], x, lm)
    return _logits(dparams["lm"], x, lm)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_prompts(params, dparams, images, cfg: FlamingoConfig):
    latents = visual_latents(params, images, cfg) if images.shape[1] else None
    return cross_attention_cache(dparams, latents, images.shape[0], cfg)


def _loop_prefill(dparams, tokens, valid, cache, cross, lm_cfg, *, cfg: FlamingoConfig):
    return vlm_prefill(dparams, tokens, valid, cache, cross, cfg)


def _loop_decode(dparams, tokens, cache, cross, current_image, lm_cfg, impl, *, cfg: FlamingoConfig):
    return vlm_decode_step(dparams, tokens, cache, cross, current_image, cfg, impl)


@functools.lru_cache(maxsize=16)
def vlm_decode_model(cfg: FlamingoConfig) -> DecodeModel:
    """The VLM for llmjax.infer.generate's compiled loop: its context is the prompts' cross-attention cache, it
    carries each row's latest image (one object per config, so the compiled loop is reused)."""
    return DecodeModel(functools.partial(_loop_prefill, cfg=cfg), functools.partial(_loop_decode, cfg=cfg))


def stack_images(images: Sequence[Sequence[np.ndarray]], cfg: FlamingoConfig) -> np.ndarray:
    """Per-prompt lists of uint8 [H, W, C] images -> uint8 [batch, max images, H, W, C] (missing slots zero)."""
    size, channels = cfg.vision.image_size, cfg.vision.num_channels
    count = max((len(row) for row in images), default=0)
    out = np.zeros((len(images), count, size, size, channels), np.uint8)
    for b, row in enumerate(images):
        for n, image in enumerate(row):
            image = np.asarray(image)
            if image.shape != (size, size, channels):
                raise GenerationError(f"prompt {b}, image {n}: shape {image.shape}, the vision tower takes "
                                      f"{(size, size, channels)} (height, width, channels)")
            out[b, n] = image
    return out


def vlm_generate(params: dict, cfg: FlamingoConfig, prompts: Sequence[Sequence[int]],
                 images: Sequence[Sequence[np.ndarray]], *, max_new_tokens: int = 32, eos_id: int | None = None,
                 temperature: float = 0.0, seed: int = 0, prepared: dict | None = None,
                 decode_impl: str = "auto", keep_logits: bool = False) -> VLMOutput:
    """Generate after each prompt (ids with one <image> per image of that prompt, in order): greedy (temperature 0)
    or sampled. A row stops after eos_id or max_new_tokens. keep_logits: return each step's logits (tests)."""
    if len(prompts) != len(images):
        raise GenerationError(f"{len(prompts)} prompts but {len(images)} image lists: give one list per prompt")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    longest = max(map(len, prompts))
    if longest + max_new_tokens > cfg.lm.max_seq_len:
        raise GenerationError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the LM's "
                              f"max_seq_len={cfg.lm.max_seq_len}; shorten it or ask for fewer tokens")
    bad = [t for p in prompts for t in p if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the VLM's vocabulary [0, {cfg.vocab_size})")
    tokens, valid = pad_prompts([list(map(int, p)) for p in prompts], "left")
    check_image_tokens(np.where(valid, tokens, -1), [len(row) for row in images], cfg)
    dparams = prepared if prepared is not None else prepare_vlm_params(params, cfg)
    cross = _encode_prompts(params, dparams, jnp.asarray(stack_images(images, cfg)), cfg)
    batch = len(prompts)
    cache = kv_cache.init_cache(cfg.lm, batch, kv_cache.cache_capacity(cfg.lm, tokens.shape[1] + max_new_tokens))
    sampling = SamplingConfig.greedy() if temperature == 0 else SamplingConfig(temperature=temperature, seed=seed)
    arrays, features = batch_sampling([sampling] * batch, cfg.lm.vocab_size, cfg.lm.padded_vocab_size)
    options = LoopOptions(max_new_tokens=max_new_tokens, features=features, eos_id=eos_id, decode_impl=decode_impl,
                          model=vlm_decode_model(cfg), keep_logits=keep_logits)
    out, lengths, reasons, kept = compiled_loop(cfg.lm, options, compute_platform(dparams))(
        dparams, jnp.asarray(tokens), jnp.asarray(valid), cache, arrays, None, None, cross)
    result = generation_output(out, lengths, reasons)
    steps = max(map(len, result.tokens))
    logits = [np.asarray(kept[step]) for step in range(steps)] if keep_logits else None
    return VLMOutput(result.tokens, result.finish_reasons, logits)
