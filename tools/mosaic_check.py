"""Device check of the Hopper (Mosaic GPU) flash-attention forward: correctness at real sizes, then forward
TFLOP/s of kernel variants beside cuDNN and jax's bundled Mosaic GPU kernel, a short table last.

    PYTHONPATH=. python3 tools/mosaic_check.py [SECTION ...] [--variants a,b] [--results PATH]
    PYTHONPATH=. python3 tools/mosaic_check.py report

Sections: check (variants on the headline shapes), features (the default config on GQA, d64, q<kv, window,
softcap), time, grad (through the custom_vjp), report (the tables). Default: all of them. Every row is added
to one JSON file ($OUT/mosaic_check.json, else /tmp), so sections can run as separate processes under their
own timeouts and `report` prints everything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llmjax.kernels.flash_attention import mosaic_gpu  # noqa: E402
from llmjax.kernels.flash_attention.reference import attention_mask, attention_reference  # noqa: E402

Config = mosaic_gpu.KernelConfig
RESULTS_PATH = os.path.join(os.environ.get("OUT") or "/tmp", "mosaic_check.json")
RESULTS: dict = {"correctness": [], "timing": [], "gradients": []}


def record(section, row):
    """Append a row and save at once: a later hang or crash loses nothing already measured."""
    RESULTS[section].append(row)
    stored = {"correctness": [], "timing": [], "gradients": []}
    if os.path.exists(RESULTS_PATH):
        with open(RESULTS_PATH) as f:
            stored = json.load(f)
    stored[section].append(row)
    with open(RESULTS_PATH, "w") as f:
        json.dump(stored, f, indent=1)


def random_qkv(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    return q, k, v


@jax.jit(static_argnames=("causal", "window", "softcap"))
def reference_out_lse(q, k, v, causal, window, softcap):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = attention_reference(q, k, v, causal=causal, sliding_window=window, logit_softcap=softcap)
    group = q.shape[2] // k.shape[2]
    scores = jnp.einsum("bshd,bthd->bhst", q, jnp.repeat(k, group, axis=2),
                        precision=jax.lax.Precision.HIGHEST) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, sliding_window=window)
    return out, jax.nn.logsumexp(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)


def check(name, config, causal, q_len, kv_len, heads, kv_heads, head_dim, window=None, softcap=None, batch=1):
    row = dict(name=name, config=dataclasses.asdict(config) if config else "default", causal=causal, q_len=q_len,
               kv_len=kv_len, heads=heads,
               kv_heads=kv_heads, head_dim=head_dim, window=window, softcap=softcap)
    try:
        q, k, v = random_qkv(q_len + head_dim + heads, batch, q_len, kv_len, heads, kv_heads, head_dim)
        fn = jax.jit(lambda q, k, v: mosaic_gpu.flash_attention_forward_mosaic(
            q, k, v, causal=causal, sliding_window=window, logit_softcap=softcap, config=config))
        out, lse = jax.block_until_ready(fn(q, k, v))
        out2, _ = jax.block_until_ready(fn(q, k, v))
        ref_out, ref_lse = reference_out_lse(q, k, v, causal, window, softcap)
        out32 = np.asarray(out, np.float64)
        ref32 = np.asarray(ref_out, np.float64)
        row["finite"] = bool(np.isfinite(out32).all())
        row["rel_err"] = float(np.linalg.norm(out32 - ref32) / np.linalg.norm(ref32))
        row["lse_max_err"] = float(np.nanmax(np.abs(np.asarray(lse) - np.asarray(ref_lse))))
        row["repeat_identical"] = bool((np.asarray(out2, np.float32) == np.asarray(out, np.float32)).all())
        row["ok"] = row["finite"] and row["rel_err"] < 1e-2 and row["lse_max_err"] < 1e-2 and row["repeat_identical"]
    except Exception as error:  # noqa: BLE001
        row["ok"] = False
        row["error"] = f"{type(error).__name__}: {str(error)[:1500]}"
        traceback.print_exc(limit=4)
    record("correctness", row)
    print("CHECK", {k: v for k, v in row.items() if k != "config"}, flush=True)
    return row


def median_ms(fn, *args, repeats=25, inner=10):
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


def timing(label, fn, shape, causal):
    batch, seq, heads, kv_heads, head_dim = shape
    flops = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    row = dict(label=label, shape=shape, causal=causal)
    try:
        q, k, v = random_qkv(seq + head_dim, batch, seq, seq, heads, kv_heads, head_dim)
        med, lo, hi = median_ms(jax.jit(fn), q, k, v)
        row.update(ms=med, ms_min=lo, ms_max=hi, tflops=flops / (med * 1e-3) / 1e12)
    except Exception as error:  # noqa: BLE001
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    record("timing", row)
    print("TIME", row, flush=True)
    return row


def ours(config, causal):
    return lambda q, k, v: mosaic_gpu.flash_attention_forward_mosaic(q, k, v, causal=causal, config=config)[0]


def cudnn(causal):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def bundled(causal, block_q):
    """jax's bundled Mosaic GPU FlashAttention-3 kernel. Its shared-memory tiles are float16 whatever the
    inputs, so it runs on float16 copies (same FLOPs); it does not scale the scores, so q is pre-scaled."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(block_q=block_q, block_kv=128, max_concurrent_steps=2, causal=causal)
    return lambda q, k, v: attention_mgpu.attention((q * q.shape[-1] ** -0.5).astype(jnp.float16),
                                                    k.astype(jnp.float16), v.astype(jnp.float16), config)


def gradients():
    try:
        from llmjax.kernels.flash_attention import triton as triton_module  # noqa: F401

        has_backward = hasattr(triton_module, "flash_attention_backward_triton")
        backward = "triton" if has_backward else "reference (no triton bwd)"
    except ImportError as error:
        backward = f"reference ({error})"
    for causal, head_dim, kv_heads in [(True, 128, 2), (False, 64, 4)]:
        row = dict(causal=causal, head_dim=head_dim, kv_heads=kv_heads, backward=backward)
        try:
            q, k, v = random_qkv(head_dim, 1, 1024, 1024, 8, kv_heads, head_dim)
            d_out = jax.random.normal(jax.random.key(9), q.shape, q.dtype)
            ours_grads = jax.vjp(lambda q, k, v: mosaic_gpu.flash_attention_mosaic(q, k, v, causal=causal),
                                 q, k, v)[1](d_out)
            ref_grads = jax.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal),
                                *(x.astype(jnp.float32) for x in (q, k, v)))[1](d_out.astype(jnp.float32))
            for name, got, want in zip(("dq", "dk", "dv"), ours_grads, ref_grads):
                got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
                row[name] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            row["ok"] = all(row[n] < 2e-2 for n in ("dq", "dk", "dv"))
        except Exception as error:  # noqa: BLE001
            row["ok"] = False
            row["error"] = f"{type(error).__name__}: {str(error)[:600]}"
            traceback.print_exc(limit=4)
        record("gradients", row)
        print("GRAD", row, flush=True)


def variants():
    """name -> (head_dim, config): the schedules and depths compared on the device."""
    base = Config()
    out = {}
    for head_dim, block_kv, stages in [(128, 128, 2), (128, 128, 3), (128, 64, 4), (64, 128, 4), (64, 256, 3)]:
        for pipelined in (True, False):
            for pingpong in ("turn", "rendezvous", "off"):
                name = f"d{head_dim}_kv{block_kv}_s{stages}_{'pipe' if pipelined else 'simple'}_{pingpong}"
                out[name] = (head_dim, dataclasses.replace(base, block_kv=block_kv, num_stages=stages,
                                                           pipelined=pipelined, pingpong=pingpong))
                out[name + "_qfast"] = (head_dim, dataclasses.replace(out[name][1], fastest_axis="q_tiles"))
    return out


HEADLINE = {128: (4, 4096, 16, 16, 128), 64: (8, 4096, 32, 32, 64)}


def run_checks(names):
    table = variants()
    for name in names:
        head_dim, config = table[name]
        for causal in (True, False):
            check(name, config, causal, 4096, 4096, 16, 16, head_dim)


def run_features():
    """The default configuration (config=None: chosen per head dim, mask and length) on every feature."""
    for causal in (True, False):
        check("default", None, causal, 4096, 4096, 16, 16, 128)
        check("default_gqa", None, causal, 4096, 4096, 16, 4, 128)
        check("default_d64", None, causal, 4096, 4096, 16, 16, 64)
    check("d64_mqa", None, False, 2048, 2048, 16, 1, 64)
    check("d64_kv_not_256", None, False, 1024, 1152, 8, 8, 64)
    check("q<kv", None, True, 1024, 4096, 16, 16, 128)
    check("q<kv", None, False, 1024, 3072, 8, 8, 128)
    check("window", None, True, 2048, 2048, 8, 8, 128, window=1000)
    check("window", None, False, 2048, 2048, 8, 8, 64, window=300)
    check("softcap", None, True, 2048, 2048, 8, 8, 128, softcap=30.0)
    check("softcap", None, False, 2048, 2048, 8, 8, 128, softcap=30.0)
    check("short", None, True, 128, 128, 8, 8, 128)


def run_timing(names):
    table = variants()
    for head_dim in (128, 64):
        shape = HEADLINE[head_dim]
        for causal in (True, False):
            timing("cudnn", cudnn(causal), shape, causal)
            timing("ours_default", ours(None, causal), shape, causal)
            for name in names:
                if table[name][0] == head_dim:
                    timing(f"ours_{name}", ours(table[name][1], causal), shape, causal)
            if head_dim == 128:
                timing("bundled_mgpu_f16", bundled(causal, 64), shape, causal)
    gqa = (4, 4096, 16, 4, 128)
    for causal in (True, False):
        timing("cudnn", cudnn(causal), gqa, causal)
        timing("ours_default", ours(None, causal), gqa, causal)


def report():
    with open(RESULTS_PATH) as f:
        results = json.load(f)
    device = jax.devices()[0].device_kind
    print("\n== correctness (rel: ||out - ref|| / ||ref|| vs float32 reference; lse: max abs error) ==")
    for row in results["correctness"]:
        status = "ok" if row["ok"] else "FAIL"
        errors = f"rel {row.get('rel_err', float('nan')):.1e} lse {row.get('lse_max_err', float('nan')):.1e}"
        detail = row.get("error", errors)
        print(f"{status:4} {row['name']:26} {'causal' if row['causal'] else 'full':6} q{row['q_len']} "
              f"kv{row['kv_len']} h{row['heads']}/{row['kv_heads']} d{row['head_dim']} w{row['window']} "
              f"cap{row['softcap']}: {detail[:200]}")
    for row in results["gradients"]:
        print("grad", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
    print(f"\n== forward TFLOP/s, {device}, bf16, [b, s, h, d]; median of 25 x 10 calls ==")
    cudnn_by_case = {(tuple(r["shape"]), r["causal"]): r.get("tflops")
                     for r in results["timing"] if r["label"] == "cudnn"}
    for row in results["timing"]:
        shape = "b{} s{} h{}/{} d{}".format(*row["shape"])
        base = cudnn_by_case.get((tuple(row["shape"]), row["causal"]))
        if "tflops" in row:
            ratio = f"{row['tflops'] / base:.2f}x cudnn" if base else ""
            print(f"{shape:21} {'causal' if row['causal'] else 'full':6} {row['label']:34} {row['tflops']:5.0f} "
                  f"({row['ms']:.3f} ms, {row['ms_min']:.3f}-{row['ms_max']:.3f}) {ratio}")
        else:
            print(f"{shape:21} {'causal' if row['causal'] else 'full':6} {row['label']:34} ERROR {row['error'][:120]}")


def main():
    args = sys.argv[1:]
    names = []
    if "--variants" in args:
        index = args.index("--variants")
        names = [n for n in args[index + 1].split(",") if n]
        del args[index:index + 2]
    sections = args or ["check", "features", "time", "grad", "report"]
    device = jax.devices()[0]
    print("device", device.device_kind, getattr(device, "compute_capability", None), "jax", jax.__version__,
          "sections", sections, "variants", names, flush=True)
    unknown = set(names) - set(variants())
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(variants())}")
    if "check" in sections:
        run_checks(names)
    if "features" in sections:
        run_features()
    if "time" in sections:
        run_timing(names)
    if "grad" in sections:
        gradients()
    if "report" in sections:
        report()


if __name__ == "__main__":
    main()
