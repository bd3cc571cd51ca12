"""FLOP accounting for MFU: the one function that metrics and benchmarks both use."""

from __future__ import annotations

from llmjax.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every projection and the output layer
    (embedding lookups and norms are not matmuls). The output layer counts the real vocabulary."""
    attention = 2 * cfg.d_model * cfg.q_size + 2 * cfg.d_model * cfg.kv_size  # q, o and k, v
    matrices = 3 if cfg.activation == "swiglu" else 2
    mlp = matrices * cfg.d_model * cfg.d_ff
    total = cfg.num_layers * (attention + mlp) + cfg.d_model * cfg.vocab_size
    if cfg.is_moe:  # an MoE block: the router, the top-k experts a token goes through, the shared experts
        experts = cfg.experts_per_token + cfg.num_shared_experts
        moe_mlp = cfg.d_model * cfg.num_experts + experts * matrices * cfg.d_model * cfg.expert_width
        total += cfg.num_moe_layers * (moe_mlp - mlp)
    return total


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Scores (q.k) and mixing (p.v): 2 * 2 * keys * heads * head_dim per layer; a causal mask
    halves the keys a token sees on average, and a sliding window caps them."""
    keys = seq_len / 2 if causal else seq_len
    if cfg.sliding_window is not None:
        keys = min(keys, cfg.sliding_window)
    return cfg.num_layers * 4 * keys * cfg.q_size


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True, causal: bool = True) -> float:
    """Model FLOPs per token: 2 per multiply-add in the forward, three times that for training
    (the backward costs twice the forward). Recomputation by remat is not counted (MFU, not HFU)."""
    forward = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal=causal)
    return 3 * forward if training else forward


def mfu(cfg: ModelConfig, seq_len: int, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware's peak."""
    return flops_per_token(cfg, seq_len) * tokens_per_second / peak_flops
