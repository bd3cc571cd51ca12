"""(device diagnostic) cross_entropy_with_grad against XLA's reductions + elementwise pass, per tile setting.

    PYTHONPATH=. python3 tools/ce_grad_check.py
"""
import functools
import time

import jax
import jax.numpy as jnp

from llmjax.kernels.cross_entropy import cross_entropy_with_grad


def xla_version(logits, targets, weights, vocab_size):
    x = jnp.where(jnp.arange(logits.shape[1]) < vocab_size, logits.astype(jnp.float32), -jnp.inf)
    log_z = jax.nn.logsumexp(x, axis=-1)
    nll = log_z - jnp.take_along_axis(x, targets[:, None], axis=-1)[:, 0]
    g = weights[:, None] * jnp.exp(x - log_z[:, None]) - jnp.where(
        jnp.arange(x.shape[1]) == targets[:, None], weights[:, None], 0)
    return g.astype(logits.dtype), nll, log_z


def timed(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def main():
    for rows, vocab in ((8192, 50304), (8192, 128256)):
        logits = jax.random.normal(jax.random.key(0), (rows, vocab), jnp.bfloat16) * 4
        targets = jax.random.randint(jax.random.key(1), (rows,), 0, vocab - 47)
        weights = jnp.ones((rows,))
        moved = 2 * logits.size * 2  # read once, written once (bytes)
        base = timed(jax.jit(functools.partial(xla_version, vocab_size=vocab - 47)), logits, targets, weights)
        print(f"{rows} x {vocab}: XLA {base * 1e3:.3f} ms ({moved / base / 1e9:.0f} GB/s as read+write once)")
        for block_rows, block_vocab, warps in ((1, 2048, 4), (1, 4096, 8), (2, 2048, 8), (1, 1024, 4), (4, 1024, 8)):
            fn = jax.jit(functools.partial(cross_entropy_with_grad, vocab_size=vocab - 47, block_rows=block_rows,
                                           block_vocab=block_vocab, num_warps=warps))
            try:
                seconds = timed(fn, logits, targets, weights)
                print(f"  rows {block_rows} vocab {block_vocab} warps {warps}: {seconds * 1e3:.3f} ms "
                      f"({moved / seconds / 1e9:.0f} GB/s), {base / seconds:.2f}x XLA")
            except Exception as error:  # noqa: BLE001
                print(f"  rows {block_rows} vocab {block_vocab} warps {warps}: failed {str(error)[:200]}")


if __name__ == "__main__":
    main()
