"""Diagnose extend_step vs decode_step bit equality on the GPU: per query max |logit diff|, cache leaves equal."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import get_config
from llmjax.infer import decode_model, kv_cache
from llmjax.infer.decode_model import decode_step, extend_step, prefill
from llmjax.model import init_params


def case(batch, count, cache_dtype):
    cfg = get_config("llama-1b", vocab_size=257, num_layers=2)
    dparams = decode_model.prepare_params(init_params(cfg, jax.random.key(7)), cfg)
    rng = np.random.default_rng(batch * 10 + count)
    prompt = jnp.asarray(rng.integers(0, 256, (batch, 128)), jnp.int32)
    _, cache = prefill(dparams, prompt, jnp.ones(prompt.shape, bool), kv_cache.init_cache(cfg, batch, 448, cache_dtype), cfg)
    new = jnp.asarray(rng.integers(0, 256, (batch, count)), jnp.int32)
    stepped, logits = cache, []
    for j in range(count):
        step_logits, stepped = decode_step(dparams, new[:, j], stepped, cfg)
        logits.append(step_logits)
    ext_logits, extended = extend_step(dparams, new, cache, cfg)
    diff = np.abs(np.asarray(ext_logits) - np.asarray(jnp.stack(logits, axis=1))).max(axis=-1)
    leaves = [bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in
              zip(jax.tree.leaves(extended), jax.tree.leaves(stepped))]
    print(f"case {batch}x{count} {cache_dtype}: per-query max|diff| {diff.tolist()} cache leaves equal {leaves}", flush=True)


if __name__ == "__main__":
    for batch, count, dtype in [(1, 7, "int8"), (1, 5, None), (1, 7, None), (1, 5, "int8")]:
        case(batch, count, dtype)
