"""(device diagnostic) Training-step variants A/B'd in one process, timed in interleaved rounds.

    PYTHONPATH=. python3 -m tools.step_ab MODEL BATCH SEQ VOCAB VARIANT...

A VARIANT is NAME or NAME:field=value,... with ModelConfig / TrainConfig fields (e.g.
`pallas_norm:norm_impl=pallas,scan_unroll=12`) and two patches of llmjax.model.layers for
experiments: `gelu=plain` (autodiff GELU instead of the bias_gelu custom VJP) and `gelu=barrier`
(an optimization barrier after it, so XLA cannot fuse it into the next matmul). Prints the minimum
and median ms per step of each variant over the rounds.
"""
import dataclasses
import statistics
import sys
import time

import jax

from llmjax.experiments.bench_train import batches
from llmjax.experiments.train import parse_overrides
from llmjax.config import TrainConfig, get_config
from llmjax.model import layers
from llmjax.train.step import init_train_state, make_train_step, windows_to_batch

ORIGINAL_GELU = layers.bias_gelu
GELU_PATCHES = {
    "plain": lambda h, b: jax.nn.gelu(h + b, approximate=True),
    "barrier": lambda h, b: jax.lax.optimization_barrier(ORIGINAL_GELU(h, b)),
}


def build(model, batch, seq, vocab, spec):
    name, _, fields = spec.partition(":")
    overrides = parse_overrides([f for f in fields.split(",") if f])
    gelu = overrides.pop("gelu", None)
    train_fields = {k: overrides.pop(k) for k in list(overrides) if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    cfg = get_config(model, vocab_size=vocab, max_seq_len=max(seq, get_config(model).max_seq_len), **overrides)
    train_cfg = TrainConfig(warmup_steps=0, total_steps=1000, **train_fields)
    layers.bias_gelu = GELU_PATCHES[gelu] if gelu else ORIGINAL_GELU
    state = init_train_state(cfg, train_cfg, jax.random.key(0))
    step = make_train_step(cfg, train_cfg)
    data = [jax.device_put(windows_to_batch(w)) for w in batches(vocab, batch, seq, 2)]
    for i in range(3):  # compile (with this variant's patch) and warm up
        state, metrics = step(state, data[i % 2])
    float(metrics["loss"])
    layers.bias_gelu = ORIGINAL_GELU
    return name, [state, step, data]


def main(model, batch, seq, vocab, *specs, rounds=4, steps=10):
    variants = dict(build(model, int(batch), int(seq), int(vocab), spec) for spec in specs)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, held in variants.items():
            state, step, data = held
            start = time.perf_counter()
            for i in range(steps):
                state, metrics = step(state, data[i % 2])
            float(metrics["loss"])
            times[name].append((time.perf_counter() - start) / steps)
            held[0] = state
    tokens = int(batch) * int(seq)
    print(f"{model} batch {batch} x {seq}, vocab {vocab}: ms/step over {rounds} rounds of {steps} steps")
    for name, values in times.items():
        best = min(values)
        print(f"  {name:<28} min {best * 1e3:7.2f}  median {statistics.median(values) * 1e3:7.2f}  "
              f"{tokens / best:10,.0f} tok/s")


if __name__ == "__main__":
    main(*sys.argv[1:])
