"""MFU accounting against a hand count."""

import pytest

from llmjax.config import get_config
from llmjax.train.metrics import flops_per_token, matmul_params, mfu


def test_gpt2_124m_flops_by_hand():
    cfg = get_config("gpt2-124m")
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072  # q, k, v, o and the two MLP matrices
    assert matmul_params(cfg) == 12 * per_layer + 768 * 50257  # plus the output layer
    attention = 12 * 4 * (1024 / 2) * 768  # q.k and p.v over half the keys on average (causal)
    forward = 2 * (12 * per_layer + 768 * 50257) + attention
    assert flops_per_token(cfg, 1024, training=False) == forward
    assert flops_per_token(cfg, 1024) == 3 * forward
    assert flops_per_token(cfg, 1024, causal=False) == 3 * (forward + attention)


def test_gqa_swiglu_and_sliding_window_counts():
    cfg = get_config("llama-8b")
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert matmul_params(cfg) == 32 * per_layer + 4096 * 128256
    windowed = cfg.replace(sliding_window=512)
    assert flops_per_token(windowed, 8192, training=False) == 2 * matmul_params(cfg) + 32 * 4 * 512 * 4096


def test_mfu_is_achieved_over_peak():
    cfg = get_config("gpt2-124m")
    assert mfu(cfg, 1024, tokens_per_second=1e6, peak_flops=flops_per_token(cfg, 1024) * 2e6) == pytest.approx(0.5)
