"""The static descriptions the flash-attention kernels take: tile configs and masking.

Plain frozen dataclasses (hashable: jit static arguments), below both the Triton kernels (triton.py) and their
autotuner (autotune.py), so neither imports the other for them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel."""

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Configs of the three kernels; a None backward config is chosen (autotuned) when the backward runs."""

    forward: KernelConfig
    dkv: KernelConfig | None = None
    dq: KernelConfig | None = None

    @classmethod
    def fixed(cls, block_q: int, block_k: int, num_warps: int = 4, num_stages: int = 2) -> BlockSizes:
        """The same tiles for all three kernels (tests, interpret mode)."""
        config = KernelConfig(block_q, block_k, num_warps, num_stages)
        return cls(config, config, config)


@dataclasses.dataclass(frozen=True)
class Masking:
    """The static description of which keys a query sees and how scores are transformed.

    q_len / kv_len are the real (unpadded) lengths: positions and the key bound are computed from them.
    """

    causal: bool
    sliding_window: int | None
    logit_softcap: float | None
    q_len: int
    kv_len: int
    scale: float

    @property
    def offset(self) -> int:
        """Key position of query 0 (queries are aligned to the end of the keys)."""
        return self.kv_len - self.q_len
