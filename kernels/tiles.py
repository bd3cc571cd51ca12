"""Small helpers shared by the Pallas kernels."""

from __future__ import annotations

import jax


def combine_masks(row_mask: jax.Array | None, col_mask: jax.Array | None) -> jax.Array | None:
    """[rows, cols] mask from optional [rows] / [cols] masks (None: nothing to mask)."""
    if row_mask is None and col_mask is None:
        return None
    if row_mask is None:
        return col_mask[None, :]
    if col_mask is None:
        return row_mask[:, None]
    return row_mask[:, None] & col_mask[None, :]
