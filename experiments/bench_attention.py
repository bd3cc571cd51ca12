"""Benchmark attention: our Pallas flash attention vs cuDNN, tokamax, XLA, jax's Pallas kernels and torch SDPA."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Score matrices larger than this (float32 bytes) are not materialized by the XLA reference.
XLA_SCORE_BYTES_LIMIT = 24 * 2**30


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool

    @property
    def label(self) -> str:
        gqa = f" kv{self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"b{self.batch} s{self.seq} h{self.heads}{gqa} d{self.head_dim} {'causal' if self.causal else 'full'}"

    def forward_flops(self) -> float:
        """4·b·h·s²·d (two matmuls of 2 FLOPs per multiply-add), halved when causal."""
        flops = 4 * self.batch * self.heads * self.seq**2 * self.head_dim
        return flops / 2 if self.causal else flops


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_attention",
        description="Time attention forward and forward+backward (TFLOP/s, median of --repeats after warm-up, "
        "random bf16 inputs, layout [batch, seq, heads, head_dim]) for every implementation in the same run: "
        "ours ('pallas'), cuDNN (jax.nn.dot_product_attention), tokamax's Mosaic GPU kernel when tokamax is "
        "installed, XLA (the jnp reference), jax's bundled Pallas kernels and torch SDPA when torch has CUDA. "
        "FLOPs: 4·b·h·s²·d forward (halved for causal), 3.5x that for forward+backward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                   help="sequence lengths; batch is chosen to keep --tokens tokens per call")
    p.add_argument("--tokens", type=int, default=16384, help="batch x seq per call for the sweep")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dims (d_model 2048 split into heads)")
    p.add_argument("--impls", nargs="+",
                   default=["pallas", "pallas_triton", "cudnn", "tokamax", "xla", "bundled", "torch"],
                   help="implementations to time: pallas (ours, best lowering: Mosaic GPU on Hopper), pallas_triton "
                   "(ours, Triton lowering), cudnn, tokamax (tokamax.dot_product_attention's Mosaic GPU kernel and "
                   "its own backward; `pip install tokamax`), xla, bundled (jax's Pallas mha), bundled_mgpu (jax's "
                   "Mosaic GPU kernel; float16 tiles only), torch (SDPA); forward only, on float8_e4m3fn copies "
                   "of the inputs (one scale per tensor, quantized before timing): pallas_fp8 (ours, bf16 out, V "
                   "transposed inside the timed call), cudnn_fp8 (cuDNN's FP8 flash attention, fp8 out)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement")
    p.add_argument("--inner", type=int, default=5,
                   help="back-to-back calls per timed repetition (1: synchronize after every call); torch SDPA "
                   "is timed with CUDA events around each call")
    p.add_argument("--quick", action="store_true", help="one small shape (for CPU smoke runs)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/attention.json"), help="JSON results; a PNG chart beside it")
    return p.parse_args(argv)


def shapes(args) -> list[Shape]:
    """The headline shape of ../shared/GPU.md first, then the sweep (causal and full, MHA and GQA)."""
    if args.quick:
        return [Shape(1, 256, 4, 4, 64, True)]
    out = [Shape(4, 4096, 16, 16, 128, True), Shape(4, 4096, 16, 4, 128, True)]
    for head_dim in args.head_dims:
        heads = 2048 // head_dim
        for seq in args.seqs:
            batch = max(1, args.tokens // seq)
            for causal in (True, False):
                shape = Shape(batch, seq, heads, heads, head_dim, causal)
                if shape not in out:
                    out.append(shape)
    return out


def median_seconds(fn, *args, repeats: int, inner: int = 1) -> float:
    """Median over `repeats` of the time of `inner` back-to-back calls, per call (dispatch overlapped as in
    training, where calls are queued without waiting)."""
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return float(np.median(times))


FP8_IMPLS = ("pallas_fp8", "cudnn_fp8")  # forward only, on float8_e4m3fn operands


def fp8_operands(*tensors):
    """Per-tensor float8_e4m3fn copies and their float32 scales, as the model quantizes (llmjax.nn.fp8)."""
    import jax.numpy as jnp

    from llmjax.nn.fp8 import E4M3, quantize, scale_for

    scales = [scale_for(jnp.max(jnp.abs(x)), E4M3) for x in tensors]
    return [quantize(x, s, E4M3) for x, s in zip(tensors, scales)], scales


def fp8_attention(impl: str, shape: Shape, scales):
    """attention(q8, k8, v8) on float8_e4m3fn operands standing for q8 * scale (q, k, v's `scales`)."""
    import jax
    import jax.numpy as jnp

    if impl == "pallas_fp8":
        from llmjax.kernels.flash_attention.mosaic_gpu import flash_attention_fp8_forward, supported_fp8

        def attention(q8, k8, v8):
            return flash_attention_fp8_forward(q8, k8, v8, *scales, causal=shape.causal)

        probe = [jax.ShapeDtypeStruct((shape.batch, shape.seq, heads, shape.head_dim), jnp.float8_e4m3fn)
                 for heads in (shape.heads, shape.kv_heads, shape.kv_heads)]
        return supported_fp8(*probe, causal=shape.causal) or attention
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # jax's FP8 entry point is not public

    params = {key: jnp.ones((1, 1, 1, 1), jnp.float32) for key in cudnn.fp8_params_keys}
    for name, value in zip(("descale_q", "descale_k", "descale_v"), scales):
        params[name] = jnp.reshape(value, (1, 1, 1, 1))
    mask = cudnn.MaskType.CAUSAL if shape.causal else cudnn.MaskType.NO_MASK
    return lambda q8, k8, v8: cudnn.dot_product_attention(q8, k8, v8, fp8_params=params, scale=shape.head_dim**-0.5,
                                                          mask_type=mask, use_fp8=True)[0]


def jax_attention(impl: str, shape: Shape):
    """attention(q, k, v) for a named JAX implementation, or a reason it cannot run this shape."""
    import jax

    from llmjax.kernels.flash_attention.reference import attention_reference

    scale = shape.head_dim**-0.5
    if impl == "xla":
        if 4 * shape.batch * shape.heads * shape.seq**2 > XLA_SCORE_BYTES_LIMIT:
            return "score matrix too large to materialize"
        return lambda q, k, v: attention_reference(q, k, v, causal=shape.causal)
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=shape.causal, implementation="cudnn")
    if impl == "tokamax":  # ImportError when it is not installed: reported as unavailable
        import tokamax

        return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=shape.causal, implementation="mosaic")
    if impl in ("pallas", "pallas_triton"):  # ours: the best lowering for the device, or the Triton one
        from llmjax.kernels.flash_attention import flash_attention

        forced = "triton" if impl == "pallas_triton" else None
        return lambda q, k, v: flash_attention(q, k, v, causal=shape.causal, implementation=forced)
    if shape.kv_heads != shape.heads:
        return "no GQA"
    if impl == "bundled":
        from jax.experimental.pallas.ops.gpu import attention as bundled

        return lambda q, k, v: bundled.mha(q, k, v, None, sm_scale=scale, causal=shape.causal)
    if impl == "bundled_mgpu":
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=128, block_kv=128, max_concurrent_steps=2, causal=shape.causal)
        return lambda q, k, v: attention_mgpu.attention(q, k, v, config)
    raise ValueError(f"unknown implementation {impl!r}")


def time_jax(impl: str, shape: Shape, args) -> dict:
    import jax
    import jax.numpy as jnp

    try:
        attention = None if impl in FP8_IMPLS else jax_attention(impl, shape)
    except ImportError as error:
        return {"error": f"unavailable: {error}"}
    if isinstance(attention, str):
        return {"skipped": attention}
    keys = jax.random.split(jax.random.key(shape.seq + shape.head_dim), 4)
    q = jax.random.normal(keys[0], (shape.batch, shape.seq, shape.heads, shape.head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (shape.batch, shape.seq, shape.kv_heads, shape.head_dim), jnp.bfloat16) for key in keys[1:3])
    d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    result = {}
    try:
        if impl in FP8_IMPLS:
            (q, k, v), scales = fp8_operands(q, k, v)
            attention = fp8_attention(impl, shape, scales)
            if isinstance(attention, str):
                return {"skipped": attention}
        forward = jax.jit(attention)
        result["forward_ms"] = 1e3 * median_seconds(forward, q, k, v, repeats=args.repeats, inner=args.inner)
        if not args.no_backward and impl not in FP8_IMPLS:
            backward = jax.jit(lambda q, k, v, g: jax.vjp(attention, q, k, v)[1](g))
            result["forward_backward_ms"] = 1e3 * median_seconds(backward, q, k, v, d_out, repeats=args.repeats,
                                                                 inner=args.inner)
    except Exception as error:  # noqa: BLE001  (a peer that cannot run a shape is reported, not fatal)
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    return result


def time_torch(shape: Shape, args) -> dict:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {"skipped": "torch not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "torch without CUDA"}
    generator = torch.Generator(device="cuda").manual_seed(0)

    def tensor(heads):  # SDPA layout [batch, heads, seq, head_dim]
        return torch.randn(shape.batch, heads, shape.seq, shape.head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=generator, requires_grad=True)

    q, k, v = tensor(shape.heads), tensor(shape.kv_heads), tensor(shape.kv_heads)
    d_out = torch.randn_like(q)
    gqa = shape.kv_heads != shape.heads

    def forward():
        return F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal, enable_gqa=gqa)

    def forward_backward():
        torch.autograd.grad(forward(), (q, k, v), d_out)

    def median_ms(fn):
        fn(); fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); fn(); end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))

    result = {}
    try:
        with torch.no_grad():
            result["forward_ms"] = median_ms(forward)
        if not args.no_backward:
            result["forward_backward_ms"] = median_ms(forward_backward)
    except Exception as error:  # noqa: BLE001
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return result


def with_tflops(result: dict, shape: Shape) -> dict:
    flops = shape.forward_flops()
    if "forward_ms" in result:
        result["forward_tflops"] = flops / (result["forward_ms"] * 1e-3) / 1e12
    if "forward_backward_ms" in result:
        result["forward_backward_tflops"] = 3.5 * flops / (result["forward_backward_ms"] * 1e-3) / 1e12
    return result


# (ours, peer): the ratio columns, where both were asked for
RATIOS = (("pallas", "cudnn"), ("pallas", "tokamax"), ("pallas_fp8", "cudnn_fp8"), ("pallas_fp8", "pallas"))


def table(rows: list[dict], impls: list[str], key: str) -> str:
    pairs = [(ours, peer) for ours, peer in RATIOS if ours in impls and peer in impls]
    header = f"| shape | {' | '.join(impls)} |" + "".join(f" {ours} / {peer} |" for ours, peer in pairs)
    lines = [header, "|" + " --- |" * (len(impls) + len(pairs) + 1)]
    for row in rows:
        cells = []
        for impl in impls:
            value = row["results"][impl].get(key)
            cells.append(f"{value:.0f}" if value is not None else "-")
        for ours, peer in pairs:
            mine, theirs = row["results"].get(ours, {}).get(key), row["results"].get(peer, {}).get(key)
            cells.append(f"{mine / theirs:.2f}x" if mine and theirs else "-")
        lines.append(f"| {row['shape']} | {' | '.join(cells)} |")
    return "\n".join(lines)


METRICS = (("forward_tflops", "forward"), ("forward_backward_tflops", "forward + backward"))


def chart_rows(rows: list[dict]) -> dict[tuple[int, bool], list[dict]]:
    """{(head_dim, causal): MHA rows, one per sequence length, sorted by it}. A sweep row is taken where there is one,
    else the headline row of that shape: the sweep skips a shape the headline already measured (at the default
    --tokens, b4 s4096 h16 d128 causal is a headline row only), and that length must not drop out of the chart."""
    chosen: dict[tuple[int, bool, int], dict] = {}
    for row in rows:
        if row["kv_heads"] != row["heads"]:
            continue  # GQA is measured at the headline shape only: no line to draw
        key = (row["head_dim"], row["causal"], row["seq"])
        if key not in chosen or (chosen[key]["kind"] != "sweep" and row["kind"] == "sweep"):
            chosen[key] = row
    panels: dict[tuple[int, bool], list[dict]] = {}
    for (head_dim, causal, _), row in sorted(chosen.items()):
        panels.setdefault((head_dim, causal), []).append(row)
    return dict(sorted(panels.items(), key=lambda item: (-item[0][0], not item[0][1])))  # d128 causal first


def seq_label(seq: int) -> str:
    """4096 -> '4k', 1536 -> '1536'."""
    return f"{seq // 1024}k" if seq % 1024 == 0 else str(seq)


def plot(rows: list[dict], impls: list[str], path: Path):
    """TFLOP/s against sequence length: one panel per (head dim, mask) and direction, one line per implementation
    with a point per measured length (x log2, ticks at the lengths). Saves the PNG; returns the Figure (None when
    there is nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    panels = chart_rows(rows)
    measured = [r["results"].get(impl, {}) for group in panels.values() for r in group for impl in impls]
    metrics = [(key, title) for key, title in METRICS if any(result.get(key) for result in measured)]
    if not panels or not metrics:
        return None
    figure, axes = plt.subplots(len(panels), len(metrics), figsize=(5.5 * len(metrics), 4.2 * len(panels)), dpi=120,
                                squeeze=False)
    for panel_axes, ((head_dim, causal), group) in zip(axes, panels.items()):
        seqs = [r["seq"] for r in group]
        tokens = {r["batch"] * r["seq"] for r in group if r["batch"] > 1}
        per_call = f" (batch = max(1, {seq_label(tokens.pop())} / seq))" if len(tokens) == 1 else ""
        for axis, (key, title) in zip(panel_axes, metrics):
            for impl in impls:
                points = [(r["seq"], r["results"].get(impl, {}).get(key)) for r in group]
                points = [(seq, value) for seq, value in points if value]
                if points:
                    axis.plot(*zip(*points), "o-", label=impl)
            axis.set_xscale("log", base=2)
            axis.set_xticks(seqs, [seq_label(seq) for seq in seqs])
            axis.xaxis.set_minor_locator(NullLocator())
            axis.set_xlabel(f"sequence length{per_call}")
            axis.set_ylabel("TFLOP/s")
            axis.set_title(f"{'causal' if causal else 'full'}, head dim {head_dim}, bf16: {title}")
            axis.grid(alpha=0.3)
    for axis in axes[0]:  # each panel of the top row: the forward one also holds the forward-only FP8 lines
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return figure


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    device = jax.devices()[0]
    impls = list(args.impls)
    if device.platform != "gpu":
        impls = ["xla"]
        print(f"no GPU ({device.platform}): timing only the XLA reference; the kernels need a CUDA GPU")
    rows = []
    for index, shape in enumerate(shapes(args)):
        results = {}
        for impl in impls:
            result = time_torch(shape, args) if impl == "torch" else time_jax(impl, shape, args)
            results[impl] = with_tflops(result, shape)
        rows.append({"shape": shape.label, "kind": "headline" if index < 2 and not args.quick else "sweep",
                     **asdict(shape), "results": results})
        print(shape.label, {impl: (round(r.get("forward_tflops", math.nan), 1),
                                   round(r.get("forward_backward_tflops", math.nan), 1))
                            for impl, r in results.items()}, flush=True)
        # Saved after every shape: a run cut short by its time limit keeps what it measured.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device.device_kind, "jax": jax.__version__, "rows": rows}, indent=2))
    plot(rows, impls, args.out.with_suffix(".png"))
    print(f"\n{device.device_kind}, bf16, TFLOP/s (forward)\n{table(rows, impls, 'forward_tflops')}")
    if not args.no_backward:
        print(f"\n{device.device_kind}, bf16, TFLOP/s (forward + backward)\n{table(rows, impls, 'forward_backward_tflops')}")
    print(f"\nresults: {args.out} and {args.out.with_suffix('.png')}")
    return 0
