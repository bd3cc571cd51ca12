"""Rotary position embeddings (Su et al. 2021), in the Hugging Face LLaMA layout.

Dimension i of a head is paired with dimension i + head_dim/2 ("rotate half"), which is how
Hugging Face stores LLaMA q/k weights, so imported checkpoints need no permutation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig, RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] (float64 NumPy: a constant folded into the program)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: keep short wavelengths, divide long ones by `factor`, interpolate in between.
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


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate x [batch, seq, heads, head_dim] by angle position * frequency, per pair of dims.

    positions: [batch, seq] integers. Angles are computed in float32.
    """
    inv_freq = jnp.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [batch, seq, 1, head_dim/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
