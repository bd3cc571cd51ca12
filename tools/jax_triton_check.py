"""(device check) RMSNorm forward through jax_triton.triton_call vs XLA and our Pallas kernel.

    python3 -m pip install --no-deps --target /tmp/site .whl/jax_triton-0.4.1-py3-none-any.whl
    PYTHONPATH=/tmp/site:. python3 tools/jax_triton_check.py

bf16; median of 50 calls after warm-up; GB/s counts x read and y written once.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels.norms import rms_norm as pallas_rms_norm
from tools.triton_rms_norm import import_jax_triton, rms_norm_triton
from llmjax.nn import rms_norm


def median_seconds(fn, *args, repeats=50):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    import_jax_triton()
    for shape in [(16384, 4096), (16384, 768), (65536, 2048)]:
        x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
        scale = jnp.ones(shape[-1], jnp.bfloat16)
        implementations = {
            "xla": jax.jit(lambda x, s: rms_norm(x, s, 1e-6)),
            "jax_triton": jax.jit(lambda x, s: rms_norm_triton(x, s, 1e-6)),
            "pallas": jax.jit(lambda x, s: pallas_rms_norm(x, s, 1e-6)),
        }
        reference = implementations["xla"](x, scale).astype(jnp.float32)
        error = float(jnp.abs(implementations["jax_triton"](x, scale).astype(jnp.float32) - reference).max())
        times = {name: median_seconds(fn, x, scale) for name, fn in implementations.items()}
        cells = ", ".join(f"{name} {t * 1e6:.0f} us ({2 * x.nbytes / t / 1e9:.0f} GB/s)" for name, t in times.items())
        print(f"{shape}: max |jax_triton - xla| {error:.3g}; {cells}", flush=True)


if __name__ == "__main__":
    main()
