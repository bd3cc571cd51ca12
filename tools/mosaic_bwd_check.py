"""Device check of the Hopper (Mosaic GPU) flash-attention backward: gradients at real sizes against the float32
reference, then forward+backward TFLOP/s of backward variants beside cuDNN and our Triton backward, then a sweep
of the Mosaic forward's schedules per bench shape (for its per-shape defaults). A short table last.

    PYTHONPATH=. python3 tools/mosaic_bwd_check.py [grad] [time] [headline] [variants] [d64] [forward] [report]

`variants` checks and times every head_dim-128 backward schedule (backward_variants) at four shapes
(`variants=NAME,NAME` some of them); `d64` times the head_dim-64 ones. CHECK_SECONDS (environment) stops starting new rows after that many seconds.

Every row is appended to $OUT/mosaic_bwd_check.json (else /tmp) as soon as it is measured.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels.flash_attention import mosaic_gpu
from llmjax.kernels.flash_attention import mosaic_gpu_backward as backward_module
from llmjax.kernels.flash_attention.reference import attention_reference

RESULTS_PATH = os.path.join(os.environ.get("OUT") or "/tmp", "mosaic_bwd_check.json")
SECTIONS = ("gradients", "timing", "forward")


def record(section, row):
    stored = {name: [] for name in SECTIONS}
    if os.path.exists(RESULTS_PATH):
        with open(RESULTS_PATH) as f:
            stored = json.load(f)
    stored[section].append(row)
    with open(RESULTS_PATH, "w") as f:
        json.dump(stored, f, indent=1)


def random_inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    return q, k, v, d_out


def relative_error(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def grads_of(attention, q, k, v, d_out):
    return jax.vjp(attention, q, k, v)[1](d_out)


def reference_gradients(inputs, masking):
    """dq, dk, dv of the float32 reference attention at HIGHEST precision (jitted: one compile per case)."""
    with jax.default_matmul_precision("highest"):
        return jax.jit(lambda q, k, v, d: grads_of(lambda q, k, v: attention_reference(q, k, v, **masking), q, k, v,
                                                   d))(*(x.astype(jnp.float32) for x in inputs))


def check_gradients(row, make_fn, inputs, ref):
    """Run the jitted backward `make_fn()` twice on inputs, note its errors against ref and whether it repeats
    (dK / dV are summed in registers: deterministic; dQ by float32 atomics: rounding order varies), record."""
    try:
        fn = make_fn()
        got = jax.block_until_ready(fn(*inputs))
        got2 = jax.block_until_ready(fn(*inputs))
        for n, g, r in zip(("dq", "dk", "dv"), got, ref):
            row[n] = relative_error(g, r)
            row[n + "_finite"] = bool(np.isfinite(np.asarray(g, np.float32)).all())
        row["dkv_repeat_identical"] = all(bool((np.asarray(a, np.float32) == np.asarray(b, np.float32)).all())
                                          for a, b in zip(got[1:], got2[1:]))
        row["dq_repeat_err"] = relative_error(got2[0], got[0])
        row["ok"] = (all(row[n] < 2e-2 and row[n + "_finite"] for n in ("dq", "dk", "dv"))
                     and row["dkv_repeat_identical"] and row["dq_repeat_err"] < 1e-2)
    except Exception as error:  # noqa: BLE001
        row["ok"] = False
        row["error"] = f"{type(error).__name__}: {str(error)[:1500]}"
        traceback.print_exc(limit=3)
    record("gradients", row)
    print("GRAD", row, flush=True)


GRAD_CASES = [
    # (name, causal, window, softcap, batch, q_len, kv_len, heads, kv_heads, head_dim)
    ("headline", True, None, None, 2, 4096, 4096, 16, 16, 128),
    ("full", False, None, None, 2, 4096, 4096, 16, 16, 128),
    ("gqa", True, None, None, 2, 2048, 2048, 16, 4, 128),
    ("d64_mqa", True, None, None, 2, 2048, 2048, 8, 1, 64),
    ("d64_full", False, None, None, 2, 1024, 3072, 8, 8, 64),
    ("q<kv", True, None, None, 2, 512, 2048, 8, 2, 128),
    ("window", True, 1000, None, 2, 2048, 2048, 8, 8, 128),
    ("window_full_d64", False, 300, None, 1, 2048, 2048, 8, 8, 64),
    ("softcap", False, None, 30.0, 2, 1024, 1024, 8, 8, 128),
    ("short", True, None, None, 1, 128, 128, 4, 4, 128),
]


def run_gradients():
    for name, causal, window, softcap, batch, q_len, kv_len, heads, kv_heads, head_dim in GRAD_CASES:
        inputs = random_inputs(q_len + head_dim + heads, batch, q_len, kv_len, heads, kv_heads, head_dim)
        masking = dict(causal=causal, sliding_window=window, logit_softcap=softcap)
        ref = reference_gradients(inputs, masking)
        splits = ("columns", "rows") if head_dim == 128 else ("rows",)
        for split in splits:
            row = dict(name=name, split=split, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads,
                       kv_heads=kv_heads, head_dim=head_dim, **masking)
            config = backward_module.BackwardConfig(dq_split=split)

            def ours(q, k, v, d_out, config=config):
                out, lse = mosaic_gpu.flash_attention_forward_mosaic(q, k, v, **masking)
                return backward_module.flash_attention_backward_mosaic(q, k, v, out, lse, d_out, config=config,
                                                                       **masking)

            check_gradients(row, lambda: jax.jit(ours), inputs, ref)
        # The public path: custom_vjp through flash_attention_mosaic (backward "auto").
        row = dict(name=name + "_custom_vjp", split="auto", head_dim=head_dim, **masking)
        try:
            got = jax.jit(lambda q, k, v, d: grads_of(lambda q, k, v: mosaic_gpu.flash_attention_mosaic(
                q, k, v, **masking), q, k, v, d))(*inputs)
            for label, g, r in zip(("dq", "dk", "dv"), got, ref):
                row[label] = relative_error(g, r)
            row["ok"] = all(row[n] < 2e-2 for n in ("dq", "dk", "dv"))
        except Exception as error:  # noqa: BLE001
            row["ok"] = False
            row["error"] = f"{type(error).__name__}: {str(error)[:800]}"
        record("gradients", row)
        print("GRAD", row, flush=True)


def median_ms(fn, *args, repeats=15, inner=5):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    times = np.asarray(times) * 1e3
    return float(np.median(times)), float(times.min()), float(times.max())


def forward_backward(attention):
    """(q, k, v, d_out) -> (dq, dk, dv), the forward included."""
    return jax.jit(lambda q, k, v, d: grads_of(attention, q, k, v, d))


def ours_with(config=None, backward="mosaic", forward_config=None):
    def attention(q, k, v, causal):
        @jax.custom_vjp
        def f(q, k, v):
            return mosaic_gpu.flash_attention_forward_mosaic(q, k, v, causal=causal, config=forward_config)[0]

        def f_fwd(q, k, v):
            out, lse = mosaic_gpu.flash_attention_forward_mosaic(q, k, v, causal=causal, config=forward_config)
            return out, (q, k, v, out, lse)

        def f_bwd(res, d_out):
            q, k, v, out, lse = res
            if backward == "mosaic":
                return backward_module.flash_attention_backward_mosaic(q, k, v, out, lse, d_out, causal=causal,
                                                                       config=config)
            from llmjax.kernels.flash_attention.triton import flash_attention_backward_triton

            return flash_attention_backward_triton(q, k, v, out, lse, d_out, causal=causal)

        f.defvjp(f_fwd, f_bwd)
        return f(q, k, v)

    return attention


TIME_SHAPES = [  # (batch, seq, heads, kv_heads, head_dim, causal); every variant on the first, the default after
    (4, 4096, 16, 16, 128, True),
    (4, 4096, 16, 16, 128, False),
    (4, 4096, 16, 4, 128, True),
    (16, 1024, 16, 16, 128, True),
    (16, 1024, 16, 16, 128, False),
    (1, 16384, 16, 16, 128, True),
    (1, 16384, 16, 16, 128, False),
    (8, 4096, 32, 32, 64, True),
]


def backward_variants(head_dim):
    """name -> BackwardConfig; the default first (the only one timed on the non-headline shapes by `time`).
    Two more schedules were measured on an H200 and removed, slower or no faster everywhere (docs/perf.md;
    commit faccb9f has both): dK / dV products left running across the next block's issue ("deferred"), and
    dQ one step late from a ring of dS^T buffers so the consumers never meet ("decoupled")."""
    config = backward_module.BackwardConfig
    if head_dim == 64:
        return {"bwd_rows_s2": config(dq_split="rows"), "bwd_rows_s3": config(dq_split="rows", num_stages=3)}
    return {
        "bwd_columns_s2": config(dq_split="columns"),  # the default
        "bwd_columns_s3": config(dq_split="columns", num_stages=3),
        "bwd_rows_s2": config(dq_split="rows"),
    }


DEADLINE = time.perf_counter() + float(os.environ.get("CHECK_SECONDS", "1e9"))


def out_of_time(section, row):
    """Past CHECK_SECONDS: record the row as skipped (so one section cannot eat the next one's time)."""
    if time.perf_counter() < DEADLINE:
        return False
    record(section, {**row, "error": "skipped: CHECK_SECONDS"})
    return True


VARIANT_GRAD_CASES = [  # (name, causal, window, softcap, batch, q_len, kv_len, heads, kv_heads, head_dim)
    ("gqa", True, None, None, 2, 2048, 2048, 16, 4, 128),
    ("q<kv_window", True, 1000, None, 1, 1024, 2048, 8, 2, 128),
    ("full_softcap", False, None, 30.0, 2, 1024, 1024, 8, 8, 128),
]
VARIANT_TIME_SHAPES = [(4, 4096, 16, 16, 128, True), (4, 4096, 16, 4, 128, True), (4, 4096, 16, 16, 128, False),
                       (16, 1024, 16, 16, 128, True)]


def run_variants(names=None):
    """Every head_dim-128 backward variant: gradients on VARIANT_GRAD_CASES (correctness first), then
    forward+backward time on VARIANT_TIME_SHAPES next to cuDNN's, a variant at a time."""
    variants = {n: c for n, c in backward_variants(128).items() if names is None or n in names}
    references = {}
    for case in VARIANT_GRAD_CASES:
        name, causal, window, softcap, batch, q_len, kv_len, heads, kv_heads, head_dim = case
        inputs = random_inputs(q_len + 3 * heads, batch, q_len, kv_len, heads, kv_heads, head_dim)
        masking = dict(causal=causal, sliding_window=window, logit_softcap=softcap)
        references[name] = (inputs, masking, reference_gradients(inputs, masking))
    for label, config in variants.items():
        for name, (inputs, masking, ref) in references.items():
            row = dict(name=name, split=label, **masking)
            if out_of_time("gradients", row):
                continue
            check_gradients(row, lambda m=masking, c=config: jax.jit(
                lambda q, k, v, d: backward_module.flash_attention_backward_mosaic(
                    q, k, v, *mosaic_gpu.flash_attention_forward_mosaic(q, k, v, **m), d, config=c, **m)), inputs, ref)
    for batch, seq, heads, kv_heads, head_dim, causal in VARIANT_TIME_SHAPES:
        flops = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
        q, k, v, d_out = random_inputs(seq + heads, batch, seq, seq, heads, kv_heads, head_dim)
        rows = {"cudnn": lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                                                implementation="cudnn")}
        for label, config in variants.items():
            rows["ours_" + label] = lambda q, k, v, c=causal, cfg=config: ours_with(cfg)(q, k, v, c)
        for label, attention in rows.items():
            row = dict(label=label, shape=[batch, seq, heads, kv_heads, head_dim], causal=causal)
            if out_of_time("timing", row):
                continue
            try:
                fwd_ms = median_ms(jax.jit(attention), q, k, v)[0]
                med, lo, hi = median_ms(forward_backward(attention), q, k, v, d_out)
                row.update(fwd_ms=fwd_ms, ms=med, ms_min=lo, ms_max=hi, bwd_ms=med - fwd_ms,
                           fwd_tflops=flops / fwd_ms / 1e9, tflops=3.5 * flops / med / 1e9,
                           bwd_tflops=2.5 * flops / (med - fwd_ms) / 1e9)
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {str(error)[:600]}"
                traceback.print_exc(limit=3)
            record("timing", row)
            print("TIME", row, flush=True)


def run_timing(shapes=TIME_SHAPES):
    for index, (batch, seq, heads, kv_heads, head_dim, causal) in enumerate(shapes):
        flops = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
        q, k, v, d_out = random_inputs(seq + heads, batch, seq, seq, heads, kv_heads, head_dim)
        shape = [batch, seq, heads, kv_heads, head_dim]
        rows = {
            "cudnn": lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                                            implementation="cudnn"),
            "ours_triton_bwd": lambda q, k, v, c=causal: ours_with(backward="triton")(q, k, v, c),
        }
        variants = backward_variants(head_dim)
        for name, config in list(variants.items())[:None if index == 0 or head_dim == 64 else 1]:
            rows["ours_" + name] = lambda q, k, v, c=causal, cfg=config: ours_with(cfg)(q, k, v, c)
        for label, attention in rows.items():
            row = dict(label=label, shape=shape, causal=causal)
            try:
                fwd = jax.jit(attention)
                fwd_ms = median_ms(fwd, q, k, v)[0]
                med, lo, hi = median_ms(forward_backward(attention), q, k, v, d_out)
                row.update(fwd_ms=fwd_ms, ms=med, ms_min=lo, ms_max=hi, bwd_ms=med - fwd_ms,
                           fwd_tflops=flops / fwd_ms / 1e9, tflops=3.5 * flops / med / 1e9,
                           bwd_tflops=2.5 * flops / (med - fwd_ms) / 1e9)
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {str(error)[:600]}"
                traceback.print_exc(limit=3)
            record("timing", row)
            print("TIME", row, flush=True)


FORWARD_SCHEDULES = {
    "kv128_s2_pipe_turn": mosaic_gpu.KernelConfig(block_kv=128, num_stages=2, pipelined=True, pingpong="turn"),
    "kv128_s2_simple_rdv": mosaic_gpu.KernelConfig(block_kv=128, num_stages=2, pipelined=False, pingpong="rendezvous"),
    "kv128_s3_simple_rdv": mosaic_gpu.KernelConfig(block_kv=128, num_stages=3, pipelined=False, pingpong="rendezvous"),
}
FORWARD_SHAPES = [(4, 4096, 16, 16, 128), (16, 1024, 16, 16, 128), (1, 16384, 16, 16, 128)]


def run_forward():
    for batch, seq, heads, kv_heads, head_dim in FORWARD_SHAPES:
        q, k, v, _ = random_inputs(seq + 1, batch, seq, seq, heads, kv_heads, head_dim)
        for causal in (True, False):
            flops = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
            for name, config in FORWARD_SCHEDULES.items():  # the defaults are among them
                row = dict(label=name, shape=[batch, seq, heads, kv_heads, head_dim], causal=causal)
                if out_of_time("forward", row):
                    continue
                try:
                    fn = jax.jit(lambda q, k, v, c=causal, cfg=config: mosaic_gpu.flash_attention_forward_mosaic(
                        q, k, v, causal=c, config=cfg)[0])
                    med, lo, hi = median_ms(fn, q, k, v, repeats=10, inner=10)
                    row.update(ms=med, tflops=flops / med / 1e9)
                except Exception as error:  # noqa: BLE001
                    row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                record("forward", row)
                print("FWD", row, flush=True)


def report():
    with open(RESULTS_PATH) as f:
        results = json.load(f)
    print(f"\n== gradients vs float32 reference (||g - ref|| / ||ref||), {jax.devices()[0].device_kind} ==")
    for row in results["gradients"]:
        errors = " ".join(f"{n} {row[n]:.1e}" for n in ("dq", "dk", "dv") if n in row)
        print(f"{'ok' if row.get('ok') else 'FAIL':4} {row['name']:22} {row['split']:24} {errors} "
              f"{row.get('dq_repeat_err', '')} {row.get('error', '')[:300]}")
    print("\n== forward+backward TFLOP/s (3.5 x forward FLOPs; bwd = fwd+bwd - fwd, 2.5 x) ==")
    for row in results["timing"]:
        shape = "b{} s{} h{}/{} d{}".format(*row["shape"])
        if "tflops" in row:
            print(f"{shape:22} {'causal' if row['causal'] else 'full':6} {row['label']:22} fwd+bwd {row['tflops']:5.0f} "
                  f"({row['ms']:.3f} ms) fwd {row['fwd_tflops']:5.0f} bwd {row['bwd_tflops']:5.0f} ({row['bwd_ms']:.3f} ms)")
        else:
            print(f"{shape:22} {'causal' if row['causal'] else 'full':6} {row['label']:22} ERROR {row['error'][:300]}")
    print("\n== Mosaic forward schedules, TFLOP/s ==")
    for row in results["forward"]:
        shape = "b{} s{} h{}/{} d{}".format(*row["shape"])
        value = f"{row['tflops']:5.0f}" if "tflops" in row else "ERROR " + row["error"][:200]
        print(f"{shape:22} {'causal' if row['causal'] else 'full':6} {row['label']:22} {value}")


def main():
    sections = sys.argv[1:] or ["grad", "time", "forward", "report"]
    device = jax.devices()[0]
    print("device", device.device_kind, "jax", jax.__version__, "sections", sections, flush=True)
    if "grad" in sections:
        run_gradients()
    if "time" in sections:
        run_timing()
    if "headline" in sections:
        run_timing(TIME_SHAPES[:1])
    for section in sections:  # "variants" (all) or "variants=NAME,NAME"
        if section.split("=")[0] == "variants":
            run_variants(section.split("=")[1].split(",") if "=" in section else None)
    if "d64" in sections:
        run_timing([shape for shape in TIME_SHAPES if shape[4] == 64]
                   + [(8, 4096, 32, 32, 64, False), (16, 1024, 32, 32, 64, True)])
    if "forward" in sections:
        run_forward()
    if "report" in sections:
        report()


if __name__ == "__main__":
    main()
