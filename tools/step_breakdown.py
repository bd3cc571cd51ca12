"""(device diagnostic) Where the gpt2-124m train step's time goes: jitted pieces timed separately.

    PYTHONPATH=. python3 tools/step_breakdown.py

Rows: forward loss and forward+backward for the step as trained (XLA attention, scanned layers), then with
cuDNN attention swapped in, with layers unrolled instead of scanned, with remat "dots", and with the loss in
one chunk. Batch 16 x 1024, vocab 32768, bf16 compute; median of 10 after warm-up.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import TrainConfig, get_config
from llmjax.model import attention as attention_module
from llmjax.train import step as step_module


def median_ms(fn, *args, repeats=10):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def cudnn_attention(q, k, v, **masking):
    return jax.nn.dot_product_attention(q, k, v, is_causal=masking["causal"], implementation="cudnn")


def main():
    cfg = get_config("gpt2-124m", vocab_size=32768, attention_impl="xla")
    train_cfg = TrainConfig(warmup_steps=10, total_steps=100)
    windows = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (16, 1025)), jnp.int32)
    batch = step_module.windows_to_batch(windows)
    state = step_module.init_train_state(cfg, train_cfg, jax.random.key(0))
    scan = jax.lax.scan

    def unrolled_scan(f, init, xs=None, **kw):  # unroll only the scan over the stacked layers
        return scan(f, init, xs, unroll=True, **kw) if isinstance(xs, dict) else scan(f, init, xs, **kw)

    variants = [  # (name, attention, unroll layers, model cfg, train cfg)
        ("as trained (XLA attention, scan)", attention_module.attention_reference, False, cfg, train_cfg),
        ("cuDNN attention, scan", cudnn_attention, False, cfg, train_cfg),
        ("cuDNN attention, layers unrolled", cudnn_attention, True, cfg, train_cfg),
        ("cuDNN attention, scan, remat dots", cudnn_attention, False, cfg.replace(remat="dots"), train_cfg),
        ("cuDNN attention, unrolled, loss in one chunk", cudnn_attention, True, cfg,
         train_cfg.replace(loss_chunk_tokens=16384)),
    ]
    for name, attention, unroll, model_cfg, tc in variants:
        attention_module.ATTENTION_IMPLS["xla"] = attention
        jax.lax.scan = unrolled_scan if unroll else scan
        loss = functools.partial(lambda p, b, mc, t: step_module.loss_sums(p, b, mc, t)[0], mc=model_cfg, t=tc)
        forward_ms = median_ms(jax.jit(loss), state.params, batch)
        backward_ms = median_ms(jax.jit(jax.grad(loss)), state.params, batch)
        print(f"| {name} | {forward_ms:.1f} ms | {backward_ms:.1f} ms |", flush=True)
    jax.lax.scan = scan


if __name__ == "__main__":
    main()
