"""Longest sequence (batch 1) that one training step fits on this device: vanilla, plain, blockwise, + offload.

For each configuration, the sequence length is doubled from --start until a compiled training step no longer fits
the memory budget, then bisected (to multiples of --granularity) between the last length that fit and the first
that did not. "Fits" is decided from XLA's memory analysis of the compiled step (nothing allocated, no weights:
arguments + outputs + temporaries - donated bytes, against the device's allocator limit or --budget-gib); on a GPU
the longest length is then confirmed by running one real step in a fresh process (an XLA RESOURCE_EXHAUSTED there
counts as "does not fit": real steps then halve from it until one runs and bisect between the two). Where not even
--granularity tokens fit (vanilla attention's scores grow with the square of the length), the search looks again
at an eighth of the resolution, down to 256 tokens. Host memory for
offloaded residuals is PJRT's pinned-host pool: set to 90% of this machine's memory unless
XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB says otherwise, and a length whose host temporaries exceed it does not fit.

Configurations (each over the --model preset and its --set overrides; the table gives each longest length as a
multiple of vanilla's and plain's):
    vanilla            the Blockwise Parallel Transformer paper's baseline: remat "none", the whole MLP, attention
                       as one softmax over the materialized [heads, seq, seq] scores (attention_impl "xla")
    plain              remat "none", the whole MLP at once, the default attention and loss (as trained by default)
    blockwise          Blockwise Parallel Transformer on one GPU: flash attention (Pallas) on GPUs, the MLP over
                       blocks of --block-tokens tokens (ModelConfig.mlp_block_tokens), remat "full" per layer, the
                       loss in chunks of --block-tokens tokens (TrainConfig.loss_chunk_tokens)
    blockwise+offload  the same, with the layer-boundary residuals (each block's input, the one [seq, d_model]
                       per layer that remat "full" keeps for the backward pass) in pinned host memory: remat
                       "names" with remat_offload=("block_input",): the device keeps the weights, the optimizer
                       state and one layer's recomputation at a time

    python -m experiments max_context --model llama-1b
    python -m experiments max_context --model llama-1b --configs blockwise --block-tokens 4096 --vocab 32000
    python -m experiments max_context --model llama-tiny --start 64 --max 4096 --granularity 64 --block-tokens 64 \\
        --budget-gib 0.05   # on a CPU, which has no memory limit of its own
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
CONFIGS = ("vanilla", "plain", "blockwise", "blockwise+offload")
FINEST_GRANULARITY = 256
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments max_context", description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b", help="model preset (default: %(default)s)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"configurations to measure, comma-separated, from {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--start", type=int, default=4096,
                   help="first sequence length tried; doubled while it fits (default: %(default)s)")
    p.add_argument("--max", type=int, default=1048576,
                   help="longest sequence length tried; a configuration that fits it reports it (default: %(default)s)")
    p.add_argument("--granularity", type=int, default=1024,
                   help="lengths tried are multiples of this many tokens; the bisection stops at this resolution "
                        "(default: %(default)s)")
    p.add_argument("--block-tokens", type=int, default=2048,
                   help="blockwise configurations: tokens per MLP block and per loss chunk (default: %(default)s)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="device memory budget in GiB (default: the GPU allocator's bytes_limit, which "
                        "XLA_PYTHON_CLIENT_MEM_FRACTION sets; this experiment makes it 0.95 unless already set). "
                        "Required on a CPU, which reports no limit")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field of the base model (repeatable); each configuration then sets "
                        "its own fields (remat, mlp_block_tokens, attention_impl) over it")
    p.add_argument("--blockwise-attention", default="auto",
                   help="attention_impl of the blockwise configurations: 'auto' = 'pallas' (flash attention) on a "
                        "GPU, 'xla' elsewhere; or any ModelConfig.attention_impl (default: %(default)s)")
    p.add_argument("--no-confirm", action="store_true",
                   help="on a GPU, skip running one real step at each configuration's longest length")
    p.add_argument("--run-timeout", type=float, default=1800,
                   help="seconds one confirming step (its own process: start, compile, init, one step) may take "
                        "before it counts as not fitting (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for MODEL.json and MODEL.png (default: runs/max_context)")
    p.add_argument("--child-run", default=None, help=argparse.SUPPRESS)  # CONFIG:TOKENS, run one step, JSON to:
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("start", "max", "granularity", "block_tokens", "vocab"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')}={value}: must be a positive integer")
    if args.start > args.max:
        p.error(f"--start={args.start} exceeds --max={args.max}")
    if args.max < args.granularity:
        p.error(f"--max={args.max} is below --granularity={args.granularity}: no length to try")
    if args.budget_gib is not None and not args.budget_gib > 0:
        p.error(f"--budget-gib={args.budget_gib}: must be > 0")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        p.error(f"--configs: unknown configuration {unknown[0] if unknown else args.configs!r}; choose from "
                f"{', '.join(CONFIGS)}")
    return args


# --- configurations ----------------------------------------------------------------------------------------------

def base_model_config(args):
    """The --model preset with --vocab and --set applied (a clear error for a bad field)."""
    from llmjax.config import ConfigError, get_config
    from llmjax.experiments.train import parse_overrides

    overrides = parse_overrides(args.set)
    if args.vocab is not None:
        overrides["vocab_size"] = args.vocab
    try:
        return get_config(args.model, **overrides)
    except (ConfigError, KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"--model {args.model} / --set: {error}") from None


def configuration(name: str, base, tokens: int, args, platform: str):
    """(ModelConfig, TrainConfig) of configuration `name` at a sequence of `tokens` tokens."""
    from llmjax.config import TrainConfig

    model = base.replace(max_seq_len=max(base.max_seq_len, tokens))
    if name in ("vanilla", "plain"):
        model = model.replace(remat="none", mlp_block_tokens=0)
        return (model.replace(attention_impl="xla") if name == "vanilla" else model), TrainConfig()
    attention = args.blockwise_attention
    if attention == "auto":
        attention = "pallas" if platform == "gpu" else "xla"
    remat = dict(remat="full") if name == "blockwise" else dict(remat="names", remat_offload=("block_input",))
    model = model.replace(**remat, mlp_block_tokens=args.block_tokens, attention_impl=attention)
    return model, TrainConfig(loss_chunk_tokens=args.block_tokens)


def is_out_of_memory(error: BaseException | str) -> bool:
    text = str(error)
    return any(marker in text for marker in OUT_OF_MEMORY)


# --- measuring -----------------------------------------------------------------------------------------------------

def compiled_step(model_cfg, train_cfg, tokens: int):
    """The project's training step (llmjax.train.step.train_step, state donated) compiled for a [1, tokens] batch
    from abstract shapes (as experiments/remat_memory.py compiles it): nothing allocated."""
    import functools

    import jax
    import jax.numpy as jnp

    from llmjax.train.step import init_train_state, train_step

    state = jax.eval_shape(lambda: init_train_state(model_cfg, train_cfg, jax.random.key(0)))
    batch = {k: jax.ShapeDtypeStruct((1, tokens), jnp.int32) for k in ("inputs", "targets")}
    step = functools.partial(train_step, model_cfg=model_cfg, train_cfg=train_cfg)
    return jax.jit(step, donate_argnums=0).lower(state, batch).compile()


def analyze(name: str, tokens: int, base, args, platform: str, budget: float) -> dict:
    """One compile: {"tokens", "fits", "peak_estimate", ...}; an out-of-memory compile does not fit, any other
    failure is reported in "error"."""
    model_cfg, train_cfg = configuration(name, base, tokens, args, platform)
    from llmjax.experiments.remat_memory import memory_row

    started = time.perf_counter()
    try:
        row = {"tokens": tokens, **memory_row(compiled_step(model_cfg, train_cfg, tokens).memory_analysis())}
    except Exception as error:  # noqa: BLE001  (reported per length, the search decides what follows)
        row = {"tokens": tokens, "fits": False, "peak_estimate": None,
               "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}",
               "out_of_memory": is_out_of_memory(error)}
    else:
        row["fits"] = row["peak_estimate"] <= budget and row["host_temporaries"] <= host_memory_limit()
    row["compile_s"] = round(time.perf_counter() - started, 2)
    peak = f"{row['peak_estimate'] / GIB:8.3f} GiB" if row["peak_estimate"] is not None else "       - GiB"
    verdict = "fits" if row["fits"] else ("does not compile: " + row["error"] if row.get("error") and not
                                          row.get("out_of_memory") else "does not fit")
    host = f", host {row['host_temporaries'] / GIB:.3f} GiB" if row.get("host_temporaries") else ""
    print(f"  {name:>17} {tokens:>9,} tokens: peak {peak}{host} -> {verdict} ({row['compile_s']:.1f} s)",
          flush=True)
    return row


def run_one_step(name: str, tokens: int, args) -> dict:
    """Child process: one real training step at this length; {"ok", "measured_peak", "step_s", "error"}."""
    import jax
    import jax.numpy as jnp

    from llmjax.train.step import init_train_state, make_train_step

    platform = jax.devices()[0].platform
    model_cfg, train_cfg = configuration(name, base_model_config(args), tokens, args, platform)
    try:
        state = jax.jit(lambda key: init_train_state(model_cfg, train_cfg, key))(jax.random.key(0))
        window = jax.random.randint(jax.random.key(1), (1, tokens + 1), 0, model_cfg.vocab_size, jnp.int32)
        batch = {"inputs": window[:, :-1], "targets": window[:, 1:]}
        step = make_train_step(model_cfg, train_cfg)
        started = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])
        result = {"ok": True, "loss": loss, "step_s": time.perf_counter() - started}
    except Exception as error:  # noqa: BLE001  (out of memory is the answer sought; anything else is reported)
        result = {"ok": False, "out_of_memory": is_out_of_memory(error),
                  "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
    stats = jax.devices()[0].memory_stats() or {}
    result["measured_peak"] = stats.get("peak_bytes_in_use")
    return result


def confirm(name: str, tokens: int, args, argv: list[str]) -> dict:
    """One real step at this length in a fresh process (no preallocation; a crash or timeout counts as not
    fitting)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run.json"
        command = [sys.executable, "-m", "llmjax.experiments", "max_context", *argv, "--child-run", f"{name}:{tokens}",
                   "--child-out", str(out)]
        started = time.perf_counter()
        try:
            process = subprocess.run(command, env=child_environment(), timeout=args.run_timeout,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            result = {"ok": False, "error": f"no result within --run-timeout={args.run_timeout:g} s"}
        else:
            result = (json.loads(out.read_text()) if out.is_file() else
                      {"ok": False, "out_of_memory": is_out_of_memory(process.stderr),
                       "error": f"the step's process exited with {process.returncode}: "
                                f"{(process.stderr.strip().splitlines() or [''])[-1][:300]}"})
    result["wall_s"] = round(time.perf_counter() - started, 1)
    measured = f", measured peak {result['measured_peak'] / GIB:.2f} GiB" if result.get("measured_peak") else ""
    verdict = "ran" if result["ok"] else f"failed ({result.get('error', '')})"
    print(f"  {name:>17} {tokens:>9,} tokens: one real step {verdict}{measured} ({result['wall_s']:.0f} s)",
          flush=True)
    return result


HOST_LIMIT_VARIABLE = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"  # PJRT's pinned-host pool (default 64 GB)


def host_memory_limit() -> float:
    """Bytes of pinned host memory offloaded residuals may use: XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, which main sets
    to 90% of this machine's physical memory unless given."""
    return float(os.environ.get(HOST_LIMIT_VARIABLE, 64)) * 1e9


def default_host_limit_gb() -> int:
    return int(0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9)


def child_environment() -> dict:
    return {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


# --- the search ------------------------------------------------------------------------------------------------

def longest_fitting(fits, start: int, maximum: int, granularity: int) -> int:
    """The longest multiple of granularity in [granularity, maximum] for which fits(length) holds, assuming fitting
    is monotone in the length: doubling from start, then bisection. 0 when not even `granularity` fits."""
    length = max(granularity, -(-start // granularity) * granularity)
    maximum = maximum // granularity * granularity
    length = min(length, maximum)
    fit, fail = 0, None
    while True:
        if not fits(length):
            fail = length
            break
        fit = length
        if length >= maximum:
            return fit
        length = min(2 * length, maximum)
    return bisect(fits, fit, fail, granularity)


def longest_below(fits, failed: int, granularity: int) -> int:
    """The longest multiple of granularity below `failed` (known not to fit) for which fits(length) holds: halving
    from failed until a length fits, then bisection between it and the last that did not (so a real-step search
    after an optimistic estimate costs a few steps near the top, not a climb from the bottom). 0 when none fits."""
    fail, length = failed, failed // 2 // granularity * granularity
    while length >= granularity and not fits(length):
        fail, length = length, length // 2 // granularity * granularity
    return bisect(fits, length, fail, granularity) if length >= granularity else 0


def bisect(fits, fit: int, fail: int, granularity: int) -> int:
    """The longest multiple of granularity in [fit, fail) for which fits holds, fit known to fit (or 0) and fail
    known not to."""
    while fail - fit > granularity:
        middle = (fit + fail) // 2 // granularity * granularity
        middle = middle if middle > fit else fit + granularity
        if fits(middle):
            fit = middle
        else:
            fail = middle
    return fit


def search(name: str, base, args, argv, platform: str, budget: float, confirm_runs: bool) -> dict:
    """One configuration's search: every length tried (memory analysis, and real steps where run), the longest."""
    tried: dict[int, dict] = {}

    def fits_by_analysis(tokens: int) -> bool:
        if tokens not in tried:
            tried[tokens] = analyze(name, tokens, base, args, platform, budget)
        return tried[tokens]["fits"]

    def fits_by_running(tokens: int) -> bool:
        if not fits_by_analysis(tokens):
            return False
        row = tried[tokens]
        if "run" not in row:
            row["run"] = confirm(name, tokens, args, argv)
        return row["run"]["ok"]

    granularity = args.granularity
    longest = longest_fitting(fits_by_analysis, args.start, args.max, granularity)
    while not longest and granularity > FINEST_GRANULARITY:  # nothing fit: look again, finer, below the first try
        granularity = max(FINEST_GRANULARITY, granularity // 8)
        longest = longest_fitting(fits_by_analysis, granularity, min(args.start, args.max), granularity)
    confirmed = None
    if confirm_runs and longest:
        if fits_by_running(longest):
            confirmed = True
        else:  # the analysis was optimistic: bisect below with real steps
            print(f"  {name:>17}: {longest:,} tokens did not run; searching below with real steps", flush=True)
            longest = longest_below(fits_by_running, longest, granularity)
            confirmed = bool(longest)
    # a failure other than memory (e.g. a configuration this backend cannot compile) is the answer when nothing fit
    errors = [row["error"] for row in tried.values() if row.get("error") and not row.get("out_of_memory")]
    model_cfg, train_cfg = configuration(name, base, max(longest, granularity), args, platform)
    row = tried.get(longest, {})
    return {"config": name, "longest_tokens": longest, "granularity": granularity,
            "peak_estimate": row.get("peak_estimate"),
            "measured_peak": row.get("run", {}).get("measured_peak"), "confirmed": confirmed,
            "error": errors[0] if errors and not longest else None, "errors": sorted(set(errors)),
            "fields": {"remat": model_cfg.remat, "remat_offload": list(model_cfg.remat_offload),
                       "mlp_block_tokens": model_cfg.mlp_block_tokens,
                       "attention_impl": model_cfg.attention_impl, "loss_chunk_tokens": train_cfg.loss_chunk_tokens},
            "tried": [tried[t] for t in sorted(tried)]}


# --- report --------------------------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    bases = {r["config"]: r["longest_tokens"] for r in results if r["config"] in ("vanilla", "plain")}
    lines = ["| config | longest tokens | " + "".join(f"x {b} | " for b in bases)
             + "peak GiB (analysis) | measured peak GiB | confirmed by a real step |",
             "| --- | ---: | " + "---: | " * len(bases) + "---: | ---: | --- |"]
    for r in results:
        ratios = "".join(f"{r['longest_tokens'] / n:.1f}x | " if n and not r["error"] else "- | "
                         for n in bases.values())
        gib = lambda b: f"{b / GIB:.2f}" if b else "-"  # noqa: E731
        confirmed = {True: "yes", False: "no", None: "-"}[r["confirmed"]]
        longest = f"{r['longest_tokens']:,}" if not r["error"] else f"error: {r['error'][:80]}"
        lines.append(f"| {r['config']} | {longest} | {ratios}{gib(r['peak_estimate'])} | {gib(r['measured_peak'])} | "
                     f"{confirmed} |")
    return "\n".join(lines)


def plot(results: list[dict], budget: float, path: Path, title: str) -> None:
    """Peak memory (analysis) against sequence length, every length tried, one line per configuration; the
    longest that fits circled, the budget dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, r in enumerate(results):
        points = [(row["tokens"], row["peak_estimate"] / GIB) for row in r["tried"] if row.get("peak_estimate")]
        if not points:
            continue
        axes.plot(*zip(*points), "o-", color=f"C{i}", label=f"{r['config']} (longest {r['longest_tokens']:,})")
        best = [p for p in points if p[0] == r["longest_tokens"]]
        if best:
            axes.plot(*best[0], "o", markersize=12, markerfacecolor="none", color=f"C{i}")
    axes.axhline(budget / GIB, color="k", linestyle="--", linewidth=1, label=f"budget {budget / GIB:.3g} GiB")
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes.set_xlabel("sequence length (tokens, batch 1)")
    axes.set_ylabel("peak device memory, GiB (XLA memory analysis)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    if args.child_run is not None:
        name, _, tokens = args.child_run.partition(":")
        args.child_out.write_text(json.dumps(run_one_step(name, int(tokens), args)))
        return 0
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the confirming processes need the memory
    os.environ.setdefault(HOST_LIMIT_VARIABLE, str(default_host_limit_gb()))  # (they inherit it)
    import jax

    base = base_model_config(args)
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if args.budget_gib is not None:
        budget = args.budget_gib * GIB
    elif limit:
        budget = float(limit)
    else:
        raise SystemExit(f"--budget-gib: this device ({device.platform}) reports no memory limit; give the budget "
                         "in GiB")
    confirm_runs = device.platform == "gpu" and not args.no_confirm
    print(f"{base.name}: longest sequence (batch 1) whose training step fits {budget / GIB:.3g} GiB on "
          f"{device.platform} ({device.device_kind}); lengths in multiples of {args.granularity:,}, "
          f"{args.start:,} to {args.max:,}" + ("" if confirm_runs else "; memory analysis only (no real steps"
                                               + (")" if args.no_confirm else ": they need a GPU)")), flush=True)
    results = [search(name, base, args, argv, device.platform, budget, confirm_runs) for name in args.configs]

    text = table(results)
    print(text)
    out = args.out or Path("runs/max_context")
    out.mkdir(parents=True, exist_ok=True)
    stem = base.name
    (out / f"{stem}.json").write_text(json.dumps({
        "model": base.name, "device": f"{device.platform} ({device.device_kind})", "budget_bytes": budget,
        "device_bytes_limit": limit, "start": args.start, "max": args.max, "granularity": args.granularity,
        "block_tokens": args.block_tokens, "vocab_size": base.vocab_size, "confirmed_by_running": confirm_runs,
        "results": results, "table": text,
        "command": "python -m experiments max_context " + " ".join(argv)}, indent=2))
    plot(results, budget, out / f"{stem}.png",
         f"{base.name}: one training step, batch 1, {device.platform} ({device.device_kind})")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
