"""(device diagnostic) Where a batch-1 decode step's time goes: wall time per step against the GPU's busy time and
the number of kernels it launches, then the top kernels (tools/trace_top.py).

    PYTHONPATH=. python3 tools/decode_profile.py GGUF_OR_PRESET [TRACE_DIR] [STEPS] [CONTEXT]

GGUF_OR_PRESET: a .gguf file or packaged model name (weights in bf16), or a model preset (random init).
"""
import functools
import glob
import gzip
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from llmjax.config import get_config
from llmjax.infer import kv_cache
from llmjax.infer.decode_model import decode_step, prepare_params
from llmjax.model import init_params
from tools import trace_top


def load(name: str):
    if name.endswith(".gguf") or name.lower() in ("smollm2-135m-instruct",):
        from llmjax.io.models import load_model

        model = load_model(gguf=name, dtype="bfloat16")
        cfg = model.cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
        return jax.device_put(model.params), cfg
    cfg = get_config(name, param_dtype="bfloat16", compute_dtype="bfloat16")
    return init_params(cfg, jax.random.key(0)), cfg


def main(name: str, folder: str = "/tmp/decode_trace", steps: int = 64, context: int = 128) -> None:
    params, cfg = load(name)
    dparams = jax.jit(prepare_params, static_argnames="cfg")(params, cfg)

    @functools.partial(jax.jit, donate_argnums=1)
    def run(dparams, cache, tokens):
        def body(_, carry):
            cache, tokens = carry
            logits, cache = decode_step(dparams, tokens, cache, cfg)
            return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, tokens))

    cache = kv_cache.init_cache(cfg, 1, context + 8 * steps)
    slots = jnp.arange(cache["positions"].shape[1])[None]
    cache = {**cache, "positions": jnp.where(slots < context, slots, -1).astype(jnp.int32),
             "next_slot": jnp.full((1,), context, jnp.int32), "next_position": jnp.full((1,), context, jnp.int32)}
    tokens = jnp.zeros((1,), jnp.int32)
    cache, tokens = run(dparams, cache, tokens)
    jax.block_until_ready(tokens)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        cache, tokens = run(dparams, cache, tokens)
        jax.block_until_ready(tokens)
        times.append(time.perf_counter() - start)
    wall = statistics.median(times) / steps * 1e3
    with jax.profiler.trace(folder):
        cache, tokens = run(dparams, cache, tokens)
        jax.block_until_ready(tokens)
    with gzip.open(max(glob.glob(f"{folder}/plugins/profile/*/*.trace.json.gz"))) as file:
        events = json.load(file)["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    kernels = [e for e in events if e.get("ph") == "X" and processes.get(e["pid"], "").startswith("/device:GPU:0")]
    busy = sum(e["dur"] for e in kernels) / 1e3 / steps
    weights = sum(x.nbytes for x in jax.tree.leaves(dparams))
    print(f"{name}: {cfg.num_layers} layers, {weights / 1e6:.0f} MB of weights; batch 1, context {context}, "
          f"{jax.devices()[0].device_kind}")
    print(f"wall {wall:.3f} ms per step; GPU busy {busy:.3f} ms per step; {len(kernels) / steps:.0f} kernels per step, "
          f"{busy / max(len(kernels) / steps, 1) * 1e3:.2f} us per kernel on average")
    trace_top.main(folder, steps, 20)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:3], *(int(a) for a in sys.argv[3:5]))
