"""Which FP8 matmul form XLA turns into an FP8 GEMM on this GPU, and how fast each runs (issue 21 probe)."""
import re

import jax
import jax.numpy as jnp

from llmjax.experiments.bench_attention import median_seconds
from llmjax.nn.fp8 import E4M3, fp8_linear, quantize, scale_for


def direct(x, kernel):
    sx, sk = scale_for(jnp.max(jnp.abs(x)), E4M3), scale_for(jnp.max(jnp.abs(kernel)), E4M3)
    y = jax.lax.dot_general(quantize(x, sx, E4M3), quantize(kernel, sk, E4M3), (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.bfloat16)
    return y * (sx * sk).astype(jnp.bfloat16)


m, k, n = 16384, 2048, 8192
x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
w = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16) * 0.02
def grad_of(f):
    return jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32)), argnums=(0, 1))


for name, f in (("bf16", lambda a, b: a @ b), ("fp8_linear", fp8_linear), ("direct f8 dot", direct),
                ("bf16 fwd+bwd", grad_of(lambda a, b: a @ b)), ("fp8_linear fwd+bwd", grad_of(fp8_linear))):
    jf = jax.jit(f)
    hlo = jf.lower(x, w).compile().as_text()
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    f8 = sorted(set(re.findall(r"f8e\w+", hlo)))
    seconds = median_seconds(jf, x, w, repeats=20, inner=5)
    flops = 2 * m * k * n * (3 if "bwd" in name else 1)
    print(f"{name:>18}: {seconds * 1e3:7.3f} ms {flops / seconds / 1e12:6.1f} TFLOP/s calls={calls} f8={f8}")
