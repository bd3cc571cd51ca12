"""Rotary position embeddings (Su et al. 2021) in both of the layouts checkpoints use.

RoPE rotates pairs of dimensions of each query / key head by angle position * frequency. Which
dimensions form a pair is a convention of the checkpoint:
- layout="half": dimension i pairs with i + head_dim/2 ("rotate half": Hugging Face LLaMA / Mistral / Qwen,
  GPT-NeoX);
- layout="interleaved": dimension 2i pairs with 2i + 1 (the RoPE paper, Meta's original LLaMA weights,
  GPT-J, GGUF files).
The two compute the same attention scores once q/k weights are permuted to match, so a model keeps the
layout its checkpoint was trained in and no weight surgery is needed on import.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import RopeScaling
from llmjax.nn._checks import check_float, check_integer, check_ndim, shape_of

ROPE_LAYOUTS = ("half", "interleaved")


def base_theta(theta: float, head_dim: int, scaling: RopeScaling | None) -> float:
    """The base RoPE rotates with: theta, raised to theta * factor ** (head_dim / (head_dim - 2)) by "ntk" scaling
    (which is therefore plain RoPE with another base: exporters write it as such)."""
    if scaling is None or scaling.kind != "ntk":
        return theta
    if head_dim == 2:
        raise ValueError("rope: scaling 'ntk' needs head_dim > 2 (theta is raised to factor ** (d / (d - 2)))")
    return theta * scaling.factor ** (head_dim / (head_dim - 2))


def rope_frequencies(head_dim: int, theta: float = 10_000.0, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], theta ** (-2i / head_dim), optionally rescaled for context
    extension (float64 NumPy: a constant folded into the program).

    scaling "linear": all divided by factor (position interpolation). "llama3" (Llama 3.1): long
    wavelengths divided by factor, short ones kept, the band between interpolated smoothly. "ntk"
    (NTK-aware): theta raised to theta * factor ** (head_dim / (head_dim - 2)), so the highest frequency
    is kept and the lowest divided by factor. "yarn" (Peng et al. 2023): dimensions turning fewer than
    beta_slow times over original_max_seq_len divided by factor, more than beta_fast kept, a linear ramp
    between (rope also multiplies cos / sin by rope_attention_factor).
    """
    if head_dim % 2 or head_dim < 2:
        raise ValueError(f"rope: head_dim={head_dim}: RoPE rotates pairs of dimensions, so it must be even")
    if not theta > 0:
        raise ValueError(f"rope: theta={theta} must be > 0")
    theta = base_theta(theta, head_dim, scaling)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None or scaling.kind == "ntk":
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "yarn":
        return _yarn_frequencies(inv_freq, head_dim, theta, scaling)
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelength = scaling.original_max_seq_len / scaling.high_freq_factor
    smooth = (scaling.original_max_seq_len / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(in_band, interpolated, scaled)


def _yarn_frequencies(inv_freq: np.ndarray, head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """YaRN's "NTK-by-parts" frequencies [head_dim / 2], as Hugging Face's _compute_yarn_parameters: the
    dimension index at which a pair turns `rotations` times over original_max_seq_len (floored for beta_fast,
    ceiled for beta_slow, clipped to [0, head_dim - 1]) bounds a ramp over the pair index i; ramp 0 keeps
    the frequency (extrapolation), 1 divides it by factor (interpolation)."""
    def correction_dim(rotations: float) -> float:  # d such that theta ** (-d / head_dim) * L = 2 pi rotations
        return head_dim * math.log(scaling.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # as Hugging Face: no division by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """What rope multiplies cos and sin by, so attention logits scale by its square: YaRN's temperature
    sqrt(1/t) = 0.1 * ln(factor) + 1 (or scaling.attention_factor when set); 1.0 for every other scaling."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    return 0.1 * math.log(scaling.factor) + 1.0


def rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    theta: float = 10_000.0,
    scaling: RopeScaling | None = None,
    layout: Literal["half", "interleaved"] = "half",
) -> jax.Array:
    """x [batch, seq, heads, head_dim] rotated by angle position * frequency per pair of dimensions.

    positions: [batch, seq] or [seq] integers (restart them per document when packing). The angles and
    the rotation are computed in float32; the result has x's dtype. scaling "yarn" also multiplies cos and
    sin by rope_attention_factor(scaling), so q.k (both rotated) grows by its square.
    """
    check_float("rope", "x", x)
    check_ndim("rope", "x", x, (4,), "[batch, seq, heads, head_dim]")
    check_integer("rope", "positions", positions)
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope: layout={layout!r}: expected 'half' or 'interleaved'")
    if positions.ndim == 1:
        positions = positions[None]
    if positions.ndim != 2 or positions.shape[1] != x.shape[1] or positions.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"rope: positions {shape_of(positions)} must be [seq] or [batch, seq] for x {shape_of(x)}")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rope: x {shape_of(x)} has an odd head_dim {head_dim}; RoPE rotates pairs of dimensions")
    inv_freq = jnp.asarray(rope_frequencies(head_dim, theta, scaling), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    magnitude = rope_attention_factor(scaling)  # 1.0 but for yarn
    cos = magnitude * jnp.cos(angles)[:, :, None, :]  # [batch, seq, 1, head_dim/2]
    sin = magnitude * jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if layout == "half":
        x1, x2 = jnp.split(x32, 2, axis=-1)  # pairs (i, i + head_dim/2)
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        pairs = x32.reshape(*x.shape[:-1], head_dim // 2, 2)  # pairs (2i, 2i + 1)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    return rotated.astype(x.dtype)


def rope_layout_permutation(head_dim: int, source: str, target: str) -> np.ndarray:
    """Indices p [head_dim] such that w[..., p] holds, in `target`'s pairing, the q/k projection columns
    that w holds in `source`'s: converting a checkpoint between layouts without changing the scores."""
    for layout in (source, target):
        if layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope layout {layout!r}: expected 'half' or 'interleaved'")
    half_to_interleaved = np.stack([np.arange(head_dim // 2), np.arange(head_dim // 2) + head_dim // 2], -1).reshape(-1)
    if source == target:
        return np.arange(head_dim)
    return half_to_interleaved if (source, target) == ("half", "interleaved") else np.argsort(half_to_interleaved)
