"""Scaling laws: IsoFLOP sweeps, Chinchilla fits (N*(C), D*(C), L(N, D)), a 10x-budget prediction checked by training.

    python -m experiments scaling --data runs/tokens/bytes --plan-only                    # the plan and its time
    python -m experiments scaling --data runs/tokens/bytes --time-budget-s 480 --check    # sweep, fit, predict, check
    python -m experiments scaling --quick                                                 # a CPU smoke run
    python -m experiments scaling --out runs/scaling --refit          # refit a finished sweep's report, no training

For each compute budget C (--budgets, FLOPs) the --sizes-per-budget models of the --ladder (LAYERSxWIDTH shapes of
the --model preset's family, heads of --head-dim) nearest to the guess N = sqrt(C / (6 x --tokens-per-param)) are
each trained for D = C / (6 N) tokens, N the non-embedding parameters (Kaplan; total parameters are recorded too),
in whole steps of --batch x --seq tokens: AdamW, warmup over --warmup-fraction of the steps, then a cosine to 10%
matched to the run's own length (Chinchilla). The final validation loss is the mean over --eval-batches fixed
batches of the validation shards. Every finished run is one JSON under OUT/runs/ (written atomically); a rerun skips
them, so an interrupted sweep resumes. With --time-budget-s a run starts only while its estimated time fits in what
is left (per step: the finished run nearest in FLOPs per step; plus its compile), and what is left is printed.

Then (llmjax.scaling): per budget a parabola of the loss in ln N gives N* and the minimum loss (approach 2), and
power laws N*(C), D*(C) and L*(C) through the minima; the parametric L(N, D) = E + A/N^alpha + B/D^beta is fitted
with the Huber loss on log losses (approach 3); --bootstrap resamples give 95% intervals. The prediction at
--predict-factor x the largest budget: N*, D* from the power laws, the loss both from L(N*, D*) and from L*(C).
--check trains the ladder model nearest N* for that budget (also cached) and compares its final validation loss with
both: L(N, D) at its own N and D, and L*(C). Writes OUT/report.json, OUT/isoflop.png, OUT/laws.png and
OUT/predicted.png; --refit redoes the fits, the check's comparison and the plots from OUT/report.json's runs alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

PROG = "python -m experiments scaling"
MIN_LR_RATIO = 0.1  # the cosine ends at 10% of the peak rate (Chinchilla)
DEFAULT_LADDER = "2x32,1x64,2x64,3x64,2x96,3x96,4x96,3x128,4x128,4x160,5x160,5x192,6x192,6x224,7x256,8x256,8x320"
# The H100 plan of docs/scaling.md: 4 budgets x 6 sizes centred on D / N = 80, where byte-level Python at these sizes
# has its IsoFLOP minima (centred on Chinchilla's 20, the minima fell off the small end of the sizes); about 6 minutes.
DEFAULT_BUDGETS = "3e12,6e12,1.2e13,2.4e13"
DEFAULT_TOKENS_PER_PARAM = 80.0
QUICK = dict(model="llama-tiny", ladder="1x8,2x8,1x16,2x16,3x16", head_dim=8, budgets="2e6,6e6",
             sizes_per_budget=3, tokens_per_param=20.0, batch=2, seq=16, min_steps=2, eval_batches=2, chunk_steps=4,
             bootstrap=20, lr=1e-2, out=Path("runs/scaling_quick"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="a tokenize output folder (train/ and validation/ shards); default: random tokens (a smoke "
                   "test only: nothing to learn)")
    p.add_argument("--out", type=Path, default=Path("runs/scaling"),
                   help="folder for runs/KEY.json (the cache), report.json and the PNGs")
    p.add_argument("--model", default="llama-125m", help="the preset whose family (norms, activation, positions, "
                   "kv-head ratio, d_ff / d_model) the ladder scales")
    p.add_argument("--ladder", default=DEFAULT_LADDER,
                   help="comma-separated LAYERSxWIDTH model shapes (widths multiples of --head-dim)")
    p.add_argument("--head-dim", type=int, default=32, help="head dimension of every model (heads = width / it)")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated compute budgets C in FLOPs (6 N D)")
    p.add_argument("--sizes-per-budget", type=int, default=6,
                   help="models per budget: the ladder's nearest (in ln N) to the compute-optimal guess")
    p.add_argument("--tokens-per-param", type=float, default=DEFAULT_TOKENS_PER_PARAM,
                   help="D / N of the guess each budget's sizes are centred on (the fit finds the real optimum; "
                   "Chinchilla's is 20, byte-level code at these sizes is nearer 80)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (fixed for every run)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, every run)")
    p.add_argument("--warmup-fraction", type=float, default=0.05,
                   help="linear warmup over this share of each run's steps (at least one step), then cosine to 10%%")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's decoupled weight decay (matrices only)")
    p.add_argument("--min-steps", type=int, default=100, help="a model a budget gives fewer steps is left out")
    p.add_argument("--max-epochs", type=float, default=1.0,
                   help="a run may read at most this many times the training split's tokens (the sweep and the "
                   "check stay within one epoch by default: a data-constrained corpus must not repeat)")
    p.add_argument("--eval-batches", type=int, default=40,
                   help="validation batches (--batch x --seq, fixed windows) behind each final validation loss")
    p.add_argument("--chunk-steps", type=int, default=50,
                   help="optimizer steps per compiled call (a scan; the last chunk of a run is padded with steps whose "
                   "updates are dropped)")
    p.add_argument("--seed", type=int, default=0, help="initialization, batch order and validation windows")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no run whose estimated time exceeds what is left of this many seconds; print what is "
                   "left to do (rerun the same command to resume)")
    p.add_argument("--step-ms", type=float, default=8.0,
                   help="milliseconds per step assumed before any run has been measured (plan and scheduling)")
    p.add_argument("--compile-s", type=float, default=20.0,
                   help="seconds per new model shape's compilation assumed before one has been measured")
    p.add_argument("--plan-only", action="store_true", help="print the plan table and its estimated time, then exit")
    p.add_argument("--predict-factor", type=float, default=10.0,
                   help="the prediction's budget is this many times the largest budget")
    p.add_argument("--check", action="store_true",
                   help="after the sweep, train the predicted compute-optimal model at the prediction's budget and "
                   "compare its final validation loss with the prediction")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="bootstrap resamples (runs drawn with replacement within each budget) for 95%% intervals; 0: "
                   "none")
    p.add_argument("--huber-delta", type=float, default=1e-3, help="the Huber loss's delta on log-loss residuals")
    p.add_argument("--no-plots", action="store_true", help="write report.json only (no PNGs)")
    p.add_argument("--refit", action="store_true", help="no data, no training: refit the laws, the check's "
                   "comparison and the plots from the runs recorded in OUT/report.json (after a change to the fitting "
                   "or its flags, or for a sweep trained on another machine)")
    p.add_argument("--quick", action="store_true", help="a tiny CPU run (llama-tiny family, widths 8-16, 2 budgets, a "
                   "few steps; flags left at their defaults take the quick values)")
    return p


def parse_args(argv):
    from llmjax.experiments._flags import apply_quick
    from llmjax.scaling import parse_ladder

    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        apply_quick(p, args, QUICK)
    try:
        args.budget_list = sorted(float(x) for x in str(args.budgets).split(","))
    except ValueError:
        p.error(f"--budgets {args.budgets!r}: expected comma-separated numbers of FLOPs, e.g. 1e12,3e12")
    if not all(b > 0 and math.isfinite(b) for b in args.budget_list):
        p.error(f"--budgets {args.budgets!r}: budgets must be positive and finite")
    if len(set(args.budget_list)) != len(args.budget_list):
        p.error(f"--budgets {args.budgets!r}: a budget is repeated")
    try:
        args.shapes = parse_ladder(args.ladder)
    except ValueError as error:
        p.error(f"--ladder: {error}")
    for name in ("head_dim", "sizes_per_budget", "batch", "seq", "min_steps", "eval_batches", "chunk_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be a positive integer")
    bad_width = next((f"{layers}x{width}" for layers, width in args.shapes if width % args.head_dim), None)
    if bad_width:
        p.error(f"--ladder entry {bad_width}: the width must be a multiple of --head-dim {args.head_dim}")
    for name in ("lr", "tokens_per_param", "max_epochs", "predict_factor", "huber_delta", "step_ms"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
    if not 0 <= args.warmup_fraction < 1:
        p.error(f"--warmup-fraction={args.warmup_fraction}: must be within [0, 1)")
    if args.bootstrap < 0 or args.compile_s < 0 or not 0 <= args.weight_decay:
        p.error("--bootstrap, --compile-s and --weight-decay must not be negative")
    if args.time_budget_s is not None and args.time_budget_s < 0:
        p.error(f"--time-budget-s={args.time_budget_s}: must not be negative")
    return args


# --- data -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SweepData:
    train: object  # a token source (llmjax.data.loader.TokenSource)
    validation: object
    vocab_size: int
    identity: str  # what the cache key records of the data


def open_sweep_data(args, preset_vocab: int) -> SweepData:
    """The training and validation streams: the shards of --data, or random tokens (smoke runs)."""
    import numpy as np

    from llmjax.data.loader import ArrayTokens

    if args.data is None:
        rng = np.random.default_rng(args.seed)
        size = max(1 << 20, 4 * (args.seq + 1))
        train = ArrayTokens(rng.integers(0, preset_vocab, size, dtype=np.int32))
        validation = ArrayTokens(rng.integers(0, preset_vocab, size // 8 + args.seq + 1, dtype=np.int32))
        return SweepData(train, validation, preset_vocab, f"random tokens below {preset_vocab}, seed {args.seed}")
    from llmjax.experiments.train import open_data

    train, validation, tokenizer = open_data(args.data)
    if validation is None:
        raise SystemExit(f"{PROG}: no validation shards in {args.data / 'validation'}: run `python -m experiments "
                         f"tokenize --split both --out {args.data}` (the final losses are validation losses)")
    vocab = tokenizer.vocab_size if tokenizer is not None else int(train.tokens(0, train.total_tokens).max()) + 1
    return SweepData(train, validation, vocab, f"{args.data} ({train.total_tokens} train, "
                     f"{validation.total_tokens} validation tokens)")


# --- the plan -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Everything fixed before training: the ladder, the planned runs, the check's budget and the data."""

    preset: object
    models: list
    runs: list  # [PlannedRun]
    check_budget: float
    max_tokens: float
    data: SweepData


def make_sweep(args, data: SweepData) -> Sweep:
    from llmjax.config import get_config
    from llmjax.scaling import build_ladder, plan_isoflop_sweep

    preset = get_config(args.model)
    models = build_ladder(preset, args.shapes, head_dim=args.head_dim, seq_len=args.seq, vocab_size=data.vocab_size)
    max_tokens = args.max_epochs * data.train.total_tokens
    runs = plan_isoflop_sweep(args.budget_list, models, batch_tokens=args.batch * args.seq,
                              sizes_per_budget=args.sizes_per_budget, tokens_per_param=args.tokens_per_param,
                              min_steps=args.min_steps, max_tokens=max_tokens)
    return Sweep(preset, models, runs, args.predict_factor * max(args.budget_list), max_tokens, data)


def model_config(sweep: Sweep, model, args):
    from llmjax.scaling import ladder_config

    return ladder_config(sweep.preset, model.layers, model.width, head_dim=args.head_dim, seq_len=args.seq,
                         vocab_size=sweep.data.vocab_size)


def warmup_steps(steps: int, args) -> int:
    return min(steps - 1, max(1, round(args.warmup_fraction * steps))) if steps > 1 else 0


def run_identity(sweep: Sweep, run, args) -> dict:
    """Everything that decides a run's result (its cache key hashes this)."""
    cfg = model_config(sweep, run.model, args)
    return {"family": args.model, "layers": cfg.num_layers, "width": cfg.d_model, "head_dim": cfg.head_dim,
            "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "d_ff": cfg.d_ff, "vocab": cfg.vocab_size,
            "compute_dtype": cfg.compute_dtype, "steps": run.steps, "batch": args.batch, "seq": args.seq,
            "lr": args.lr, "warmup_steps": warmup_steps(run.steps, args), "min_lr_ratio": MIN_LR_RATIO,
            "weight_decay": args.weight_decay, "seed": args.seed, "eval_batches": args.eval_batches,
            "data": sweep.data.identity}


def run_key(identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"{identity['layers']}x{identity['width']}-{identity['steps']}steps-{digest}"


class Estimator:
    """Seconds a run will take: steps x the per-step time of the finished run nearest in FLOPs per step (the
    --step-ms prior before any), plus a compilation when its shape is new to this process, plus its evaluation."""

    def __init__(self, args):
        self.args = args
        self.measured: list[tuple[int, float, float]] = []  # (N, seconds per step, eval seconds)
        self.compile_seconds: list[float] = []
        self.compiled: set[str] = set()  # model shapes this process has compiled

    def add(self, record: dict) -> None:
        self.measured.append((record["non_embedding_params"], record["train_seconds"] / record["steps"],
                              record["eval_seconds"]))
        if record.get("compile_seconds"):
            self.compile_seconds.append(record["compile_seconds"])

    def seconds(self, run, compiled: set[str] | None = None) -> float:
        n = run.model.non_embedding_params
        if self.measured:
            _, per_step, evaluation = min(self.measured, key=lambda m: abs(math.log(m[0] / n)))
        else:
            per_step = self.args.step_ms / 1000
            evaluation = self.args.eval_batches * per_step / 3  # a forward pass is about a third of a step
        compiled = self.compiled if compiled is None else compiled
        compile_s = 0.0 if run.model.name in compiled else (
            sum(self.compile_seconds) / len(self.compile_seconds) if self.compile_seconds else self.args.compile_s)
        return run.steps * per_step + evaluation + compile_s


def guessed_check_run(sweep: Sweep, args):
    """The check run as planned before any fit: the ladder model nearest the tokens-per-param guess."""
    from llmjax.scaling import PlannedRun, compute_optimal_guess, nearest_model, steps_for

    model = nearest_model(sweep.models, compute_optimal_guess(sweep.check_budget, args.tokens_per_param))
    batch_tokens = args.batch * args.seq
    return PlannedRun(sweep.check_budget, model, steps_for(sweep.check_budget, model.non_embedding_params,
                                                           batch_tokens), batch_tokens)


def plan_rows(sweep: Sweep, args, estimator: Estimator, cached_keys: set[str] = frozenset()) -> list[dict]:
    """The plan table's rows: every sweep run (those in the cache take no time), then the check as guessed, each with
    its estimated seconds (a shape's compilation counted at its first run)."""
    rows, compiled = [], set(estimator.compiled)
    for run in sweep.runs:
        if run_key(run_identity(sweep, run, args)) in cached_keys:
            rows.append({"role": "sweep (cached)", "run": run, "seconds": 0.0})
            continue
        rows.append({"role": "sweep", "run": run, "seconds": estimator.seconds(run, compiled)})
        compiled.add(run.model.name)
    check = guessed_check_run(sweep, args)
    rows.append({"role": "check (guess)", "run": check, "seconds": estimator.seconds(check, compiled)})
    return rows


def print_plan(rows: list[dict], sweep: Sweep, args) -> None:
    print(f"data: {sweep.data.identity}; at most {sweep.max_tokens:,.0f} tokens a run (--max-epochs "
          f"{args.max_epochs}); {args.batch} x {args.seq} tokens a step")
    print(f"{'role':<16}{'budget':>10}{'model':>8}{'N (non-emb)':>13}{'N (total)':>11}{'D (tokens)':>12}"
          f"{'steps':>7}{'D/N':>7}{'est. s':>8}")
    for row in rows:
        run = row["run"]
        over = "  > --max-epochs!" if run.tokens > sweep.max_tokens else ""
        print(f"{row['role']:<16}{run.budget:>10.3g}{run.model.name:>8}{run.model.non_embedding_params:>13,}"
              f"{run.model.total_params:>11,}{run.tokens:>12,}{run.steps:>7}"
              f"{run.tokens / run.model.non_embedding_params:>7.1f}{row['seconds']:>8.1f}{over}")
    sweep_seconds = sum(r["seconds"] for r in rows if r["role"] == "sweep")
    print(f"estimated: sweep {sweep_seconds:.0f} s, with the check {sweep_seconds + rows[-1]['seconds']:.0f} s "
          f"(priors --step-ms {args.step_ms}, --compile-s {args.compile_s} until runs are measured)")
    by_budget: dict[float, int] = {}
    for run in sweep.runs:
        by_budget[run.budget] = by_budget.get(run.budget, 0) + 1
    thin = [f"{b:.3g}" for b, count in by_budget.items() if count < 3]
    if thin:
        print(f"warning: budget(s) {', '.join(thin)} allow fewer than 3 models: no parabola can be fitted there "
              f"(add ladder shapes or lower --min-steps)")


# --- training -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapeFunctions:
    """The compiled programs of one model shape (and batch, sequence, chunk): shared by every run of that shape."""

    start: object  # key -> (params, opt_state)
    chunk: object  # (params, opt_state, windows [chunk, batch, seq + 1], first step, schedule [4]) -> (.., losses)
    evaluate: object  # (params, batch) -> {"nll_sum", "tokens"}


_COMPILED: dict = {}  # (model config, chunk, batch, seq, weight decay) -> ShapeFunctions, for the whole process


def shape_functions(cfg, args, example_windows) -> tuple[ShapeFunctions, float]:
    """(this shape's compiled programs, the seconds spent compiling them now: 0 when this process already has)."""
    import jax
    import jax.numpy as jnp
    import optax

    from llmjax.config import TrainConfig
    from llmjax.model import init_params
    from llmjax.train.optim import make_optimizer
    from llmjax.train.schedules import cosine_schedule
    from llmjax.train.step import accumulated_gradients, eval_step, windows_to_batch

    key = (cfg, args.chunk_steps, args.batch, args.seq, args.weight_decay)
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    begin = time.perf_counter()
    unit = TrainConfig(lr=1.0, schedule="constant", warmup_steps=0, total_steps=1, weight_decay=args.weight_decay)
    optimizer = make_optimizer(unit, model_cfg=cfg)  # AdamW at rate 1: each step's rate multiplies its update

    def start(rng):
        params = init_params(cfg, rng)
        return params, optimizer.init(params)

    def one_step(carry, inputs):
        params, opt_state = carry
        windows, rate, active = inputs
        grads, sums = accumulated_gradients(params, windows_to_batch(windows), cfg, unit)
        tokens = jnp.maximum(sums["tokens"], 1.0)
        updates, new_opt_state = optimizer.update(jax.tree.map(lambda g: g / tokens, grads), opt_state, params)
        updates = jax.tree.map(lambda u: u * rate.astype(u.dtype), updates)  # AdamW at rate 1, times the rate
        new = (optax.apply_updates(params, updates), new_opt_state)
        # a step past the run's end (the padding of its last chunk) is computed but dropped: a select, where a
        # lax.cond would make the GPU wait for its predicate every step
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, carry), sums["nll_sum"] / tokens

    def chunk(params, opt_state, windows, first_step, schedule):
        """schedule = [peak rate, final rate, warmup steps, total steps]: the run's cosine, computed here so that
        every run of the shape shares this program."""
        steps = first_step + jnp.arange(windows.shape[0])  # [chunk]
        rates = cosine_schedule(steps, schedule[0], schedule[1], schedule[2], schedule[3])
        (params, opt_state), losses = jax.lax.scan(one_step, (params, opt_state), (windows, rates, steps < schedule[3]))
        return params, opt_state, losses

    rng = jax.random.key(0)
    params, opt_state = jax.eval_shape(start, rng)
    functions = ShapeFunctions(
        start=jax.jit(start).lower(rng).compile(),
        chunk=jax.jit(chunk, donate_argnums=(0, 1)).lower(
            params, opt_state, example_windows, np.int32(0), np.zeros(4, np.float32)).compile(),
        evaluate=jax.jit(lambda p, b: eval_step(p, b, model_cfg=cfg, train_cfg=unit)).lower(
            params, windows_to_batch(example_windows[0])).compile())
    _COMPILED[key] = functions
    return functions, time.perf_counter() - begin


class Trainer:
    """Trains ladder models with their shape's compiled programs (llmjax's AdamW, gradients and loss: the chunk of
    steps is tested equal to llmjax.train.step.train_step), then evaluates them on fixed validation windows."""

    def __init__(self, sweep: Sweep, args):
        from llmjax.data.loader import batch_at

        self.sweep, self.args = sweep, args
        self.validation = [batch_at(sweep.data.validation, index, batch_size=args.batch, seq_len=args.seq,
                                    seed=args.seed) for index in range(args.eval_batches)]

    def windows(self, first: int, steps: int) -> np.ndarray:
        """Training windows [chunk, batch, seq + 1] of steps first .. first + chunk - 1 (zeros past the run's end)."""
        from llmjax.data.loader import batch_at

        args = self.args
        windows = np.zeros((args.chunk_steps, args.batch, args.seq + 1), np.int32)
        for i in range(min(args.chunk_steps, steps - first)):
            windows[i] = batch_at(self.sweep.data.train, first + i, batch_size=args.batch, seq_len=args.seq,
                                  seed=args.seed)
        return windows

    def train(self, run, identity: dict, role: str) -> dict:
        import jax

        from llmjax.train.step import windows_to_batch

        args = self.args
        started = time.perf_counter()
        cfg = model_config(self.sweep, run.model, args)
        functions, compile_seconds = shape_functions(cfg, args, self.windows(0, run.steps))
        begin = time.perf_counter()
        params, opt_state = functions.start(jax.random.key(args.seed))
        schedule = np.array([args.lr, args.lr * MIN_LR_RATIO, identity["warmup_steps"], run.steps], np.float32)
        losses = []
        for first in range(0, run.steps, args.chunk_steps):
            params, opt_state, chunk_losses = functions.chunk(params, opt_state, self.windows(first, run.steps),
                                                              np.int32(first), schedule)
            losses.append(chunk_losses)  # left on the device: the next chunk's batches load while this one runs
        losses = np.concatenate([np.asarray(x) for x in losses])[:run.steps]  # [steps]
        train_seconds = time.perf_counter() - begin
        begin = time.perf_counter()
        nll, tokens = 0.0, 0.0
        for windows in self.validation:
            sums = functions.evaluate(params, windows_to_batch(windows))
            nll, tokens = nll + float(sums["nll_sum"]), tokens + float(sums["tokens"])
        eval_seconds = time.perf_counter() - begin
        tail = max(1, run.steps // 10)
        every = max(1, run.steps // 100)
        return {"key": run_key(identity), "role": role, "budget": run.budget, "model": run.model.name,
                "layers": run.model.layers, "width": run.model.width,
                "non_embedding_params": run.model.non_embedding_params, "total_params": run.model.total_params,
                "steps": run.steps, "tokens": run.tokens, "flops": run.flops,
                "final_train_loss": float(np.mean(losses[-tail:])), "val_loss": nll / tokens,
                "tokens_per_second": run.tokens / train_seconds, "train_seconds": train_seconds,
                "compile_seconds": compile_seconds, "eval_seconds": eval_seconds,
                "wall_seconds": time.perf_counter() - started, "device": jax.devices()[0].device_kind,
                "train_loss_every": every, "train_losses": [float(x) for x in losses[::every]],
                "config": identity}


def read_cached(path: Path) -> dict | None:
    """A cached run's record, or None when missing or unreadable (a leftover of a crash: trained again)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        print(f"{PROG}: ignoring the unreadable cache file {path} ({error}); the run is trained again",
              file=sys.stderr)
        return None
    return record if isinstance(record, dict) and "val_loss" in record else None


def execute(pending: list, cached_records: dict, sweep: Sweep, args, estimator: Estimator, trainer_box: list,
            started: float, role: str) -> tuple[list, list]:
    """Trains the pending (run, identity) pairs in order while the time budget allows; (trained records, left)."""
    from tqdm import tqdm

    from llmjax.data.shards import write_json_atomically

    trained, left = [], []
    bar = tqdm(total=len(pending), desc=f"{role} runs", unit="run", disable=not pending)
    for index, (run, identity) in enumerate(pending):
        estimate = estimator.seconds(run)
        if args.time_budget_s is not None and time.perf_counter() - started + estimate > args.time_budget_s:
            left = pending[index:]
            break
        bar.set_postfix_str(f"{run.model.name} at {run.budget:.3g} FLOPs, {run.steps} steps (est. {estimate:.0f} s)")
        if not trainer_box:
            trainer_box.append(Trainer(sweep, args))
        record = trainer_box[0].train(run, identity, role)
        write_json_atomically(args.out / "runs" / f"{record['key']}.json", record)
        estimator.add(record)
        estimator.compiled.add(run.model.name)
        cached_records[record["key"]] = record
        trained.append(record)
        bar.update(1)
        tqdm.write(f"{role} {run.model.name:>7} at {run.budget:.3g}: val loss {record['val_loss']:.4f}, "
                   f"{record['tokens_per_second']:,.0f} tokens/s, {record['wall_seconds']:.1f} s "
                   f"(compile {record['compile_seconds']:.1f})")
    bar.close()
    return trained, left


# --- fits and the report ------------------------------------------------------------------------------------------


def observations_of(records: list[dict]):
    from llmjax.scaling import Observation

    return [Observation(r["budget"], r["non_embedding_params"], r["tokens"], r["val_loss"]) for r in records]


def fit_sweep(sweep_records: list[dict], sweep: Sweep, args) -> tuple[dict, object]:
    """({isoflop, compute_optimal, loss_law, prediction} or the errors that stopped a fit, the ScalingFit or None)."""
    from llmjax.scaling import ScalingError, ScalingFit, fit_compute_optimal, fit_loss_law, prediction

    observations = observations_of(sweep_records)
    report: dict = {}
    optimal = law = None
    try:
        optimal = fit_compute_optimal(observations)
        report["isoflop"] = [{"budget": c, "n_star": p.n_star, "d_star": c / (6 * p.n_star), "min_loss": p.min_loss,
                              "curvature": p.curvature, "extrapolated": p.extrapolated}
                             for c, p in optimal.parabolas.items()]
        report["compute_optimal"] = {"n_law": dataclasses.asdict(optimal.n_law),
                                     "d_law": dataclasses.asdict(optimal.d_law),
                                     "min_loss_law": dataclasses.asdict(optimal.loss_law)}
    except ScalingError as error:
        report["compute_optimal_error"] = str(error)
    try:
        law = fit_loss_law(observations, delta=args.huber_delta)
        report["loss_law"] = dataclasses.asdict(law)
    except ScalingError as error:
        report["loss_law_error"] = str(error)
    if optimal is None or law is None:
        return report, None
    fit = ScalingFit(optimal, law)
    report["prediction"] = prediction(fit, sweep.check_budget)
    return report, fit


def bootstrap_report(sweep_records: list[dict], fit, sweep: Sweep, args, check_point=None) -> dict:
    """{intervals: {name: [low, high]}, bootstrap: {samples, failures, first_failure}}: every number of the fits, the
    prediction and (check_point = (N, D)) the law's loss at the check run, refitted on --bootstrap resamples."""
    from llmjax.scaling import bootstrap, fit_numbers, fit_scaling

    theta = fit.loss_law.as_theta()
    result = bootstrap(observations_of(sweep_records), lambda resample: fit_numbers(
        fit_scaling(resample, delta=args.huber_delta, starts=2, initial=[theta]), sweep.check_budget, check_point),
        samples=args.bootstrap, seed=args.seed, progress=True)
    return {"intervals": {name: list(bounds) for name, bounds in result.intervals.items()},
            "bootstrap": {"samples": result.samples, "failures": result.failures,
                          "first_failure": result.first_failure}}


def check_run(fit, sweep: Sweep, args):
    """The ladder model nearest the predicted N* at the check budget, trained for C / (6 N) tokens."""
    from llmjax.scaling import PlannedRun, nearest_model, steps_for

    model = nearest_model(sweep.models, fit.compute_optimal.n_star(sweep.check_budget))
    batch_tokens = args.batch * args.seq
    return PlannedRun(sweep.check_budget, model, steps_for(sweep.check_budget, model.non_embedding_params,
                                                           batch_tokens), batch_tokens)


def check_summary(run, fit, fits: dict, record: dict | None) -> dict:
    """The check run against the two predictions of its loss: the parametric law's at the run's own N and D
    (predicted_loss, approach 3) and the IsoFLOP minima's L*(C) at its budget (predicted_loss_isoflop, approach 2,
    for a run at the predicted N*), each with its bootstrap interval, vs the actual loss."""
    check = {"budget": run.budget, "model": run.model.name, "n_params": run.model.non_embedding_params,
             "total_params": run.model.total_params, "tokens": run.tokens, "steps": run.steps,
             "predicted_n_star": fit.compute_optimal.n_star(run.budget),
             "predicted_d_star": fit.compute_optimal.d_star(run.budget),
             "predicted_loss": float(fit.loss_law(run.model.non_embedding_params, run.tokens)),
             "predicted_loss_isoflop": fit.compute_optimal.min_loss(run.budget)}
    intervals = fits.get("intervals", {})
    for suffix, name in (("", "check.loss"), ("_isoflop", "prediction.isoflop_loss")):
        if name in intervals:
            check[f"predicted_loss{suffix}_interval"] = intervals[name]
    if record is not None:
        check["actual_loss"] = record["val_loss"]
        for suffix in ("", "_isoflop"):
            error = (check[f"predicted_loss{suffix}"] - record["val_loss"]) / record["val_loss"]
            check[f"relative_error{suffix}"] = error
            check[f"within_2_percent{suffix}"] = abs(error) <= 0.02
    return check


def print_fits(report: dict) -> None:
    for name in ("compute_optimal_error", "loss_law_error"):
        if name in report:
            print(f"fit: {report[name]}")
    if "compute_optimal" in report:
        laws = report["compute_optimal"]
        print("; ".join(f"{name}(C) = {laws[key]['coefficient']:.4g} C^{laws[key]['exponent']:.3f}"
                        for name, key in (("N*", "n_law"), ("D*", "d_law"), ("L*", "min_loss_law"))))
    if "loss_law" in report:
        law = report["loss_law"]
        print(f"L(N, D) = {law['E']:.4f} + {law['A']:.4g} / N^{law['alpha']:.3f} + "
              f"{law['B']:.4g} / D^{law['beta']:.3f}")
    if "prediction" in report:
        pred, intervals = report["prediction"], report.get("intervals", {})

        def shown(name):
            interval = intervals.get(name)
            return f" (95% {interval[0]:.4f} .. {interval[1]:.4f})" if interval else ""

        print(f"prediction at {pred['budget']:.3g} FLOPs: N* = {pred['n_params']:,.0f}, D* = {pred['tokens']:,.0f}, "
              f"loss {pred['loss']:.4f} by L(N*, D*){shown('prediction.loss')}, {pred['isoflop_loss']:.4f} by "
              f"L*(C){shown('prediction.isoflop_loss')}")


def print_check(check: dict) -> None:
    print(f"check {check['model']} (N {check['n_params']:,}, D {check['tokens']:,}): actual "
          f"{check['actual_loss']:.4f}; predicted {check['predicted_loss']:.4f} by L(N, D) "
          f"({100 * check['relative_error']:+.2f}%), "
          f"{check['predicted_loss_isoflop']:.4f} by L*(C) ({100 * check['relative_error_isoflop']:+.2f}%)")


def plot_isoflop(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted({r["budget"] for r in report["runs"] if r["role"] == "sweep"})
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(budgets))))
    minima = {m["budget"]: m for m in report["fits"].get("isoflop", [])}
    for budget, colour in zip(budgets, colours):
        runs = sorted((r for r in report["runs"] if r["role"] == "sweep" and r["budget"] == budget),
                      key=lambda r: r["non_embedding_params"])
        n = np.array([r["non_embedding_params"] for r in runs], np.float64)
        ax.plot(n, [r["val_loss"] for r in runs], "o", color=colour, label=f"C = {budget:.2g}")
        if budget in minima:
            m = minima[budget]
            grid = np.geomspace(n.min() / 1.2, n.max() * 1.2, 100)
            ax.plot(grid, m["min_loss"] + m["curvature"] * np.log(grid / m["n_star"]) ** 2, "-", color=colour)
            ax.plot(m["n_star"], m["min_loss"], "*", color=colour, markersize=14, markeredgecolor="black")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss (nats / token)")
    ax.set_title("IsoFLOP curves (stars: parabola minima)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_laws(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fits = report["fits"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    minima = fits.get("isoflop", [])
    check = report.get("check") or {}
    panels = ((axes[0], "n_star", "n_law", "N*", "n_params", "n_params"), (axes[1], "d_star", "d_law", "D*", "tokens",
              "tokens"), (axes[2], "min_loss", "min_loss_law", "L*", "isoflop_loss", "actual_loss"))
    for ax, quantity, law_name, label, predicted_key, check_key in panels:
        if minima:
            ax.plot([m["budget"] for m in minima], [m[quantity] for m in minima], "o", label="IsoFLOP minima")
        if "compute_optimal" in fits:
            law = fits["compute_optimal"][law_name]
            top = fits.get("prediction", {}).get("budget", max(m["budget"] for m in minima))
            grid = np.geomspace(min(m["budget"] for m in minima) / 1.5, top * 1.5, 100)
            ax.plot(grid, law["coefficient"] * grid ** law["exponent"], "-",
                    label=f"{label} = {law['coefficient']:.3g} C^{law['exponent']:.3f}")
        if "prediction" in fits and predicted_key in fits["prediction"]:
            pred = fits["prediction"]
            ax.plot(pred["budget"], pred[predicted_key], "s", color="red", markersize=9, label=f"prediction ({label})")
        if check.get(check_key):
            ax.plot(check["budget"], check[check_key], "x", color="black", markersize=10, label="check run")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C = 6 N D (FLOPs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, fits.get("compute_optimal_error", "no fit yet"), ha="center", va="center", wrap=True,
                    fontsize=8, transform=ax.transAxes)
    fig.suptitle("Compute-optimal allocation and loss (Chinchilla approach 2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_predicted(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = report["fits"].get("loss_law")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if law:
        def predicted(r):
            n, d = r["non_embedding_params"], r["tokens"]
            return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]

        for role, marker, colour in (("sweep", "o", "tab:blue"), ("check", "*", "red")):
            runs = [r for r in report["runs"] if r["role"] == role]
            if runs:
                ax.plot([r["val_loss"] for r in runs], [predicted(r) for r in runs], marker, color=colour,
                        markersize=12 if role == "check" else 6, linestyle="none", label=f"{role} runs")
        values = [r["val_loss"] for r in report["runs"]]
        low, high = min(values) * 0.97, max(values) * 1.03
        ax.plot([low, high], [low, high], "k-", linewidth=0.8, label="predicted = actual")
        ax.fill_between([low, high], [low * 0.98, high * 0.98], [low * 1.02, high * 1.02], color="grey", alpha=0.2,
                        label="within 2%")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, report["fits"].get("loss_law_error", "no fit"), ha="center", va="center", wrap=True)
    ax.set_xlabel("actual final validation loss")
    ax.set_ylabel("L(N, D) fitted (approach 3)")
    ax.set_title("Parametric law vs the runs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out: Path, plots: bool = True) -> None:
    from llmjax.data.shards import write_json_atomically

    write_json_atomically(out / "report.json", report)
    plots = plots and any(r["role"] == "sweep" for r in report["runs"])
    if plots:
        plot_isoflop(report, out / "isoflop.png")
        plot_laws(report, out / "laws.png")
        plot_predicted(report, out / "predicted.png")
    print(f"wrote {out / 'report.json'}" + (" and its PNGs" if plots else ""))


# --- main -----------------------------------------------------------------------------------------------------------


def refit(args, argv) -> int:
    """--refit: the fits, the bootstrap, the check's comparison and the plots again, from OUT/report.json's runs."""
    import types

    from llmjax.scaling import LadderModel, PlannedRun

    path = args.out / "report.json"
    try:
        old = json.loads(path.read_text())
        runs = old["runs"]
    except (OSError, ValueError, KeyError) as error:
        print(f"{PROG}: --refit: no readable report in {path} ({error}); run the sweep first", file=sys.stderr)
        return 2
    sweep_records = [r for r in runs if r["role"] == "sweep"]
    check_records = [r for r in runs if r["role"] == "check"]
    if not sweep_records:
        print(f"{PROG}: --refit: {path} records no sweep run yet; run the sweep first", file=sys.stderr)
        return 2
    budget = check_records[0]["budget"] if check_records else args.predict_factor * max(
        r["budget"] for r in sweep_records)
    sweep = types.SimpleNamespace(check_budget=budget)  # all the fits read of a Sweep
    fits, fit = fit_sweep(sweep_records, sweep, args)
    check = None
    if fit is not None:
        run = None
        if check_records:
            r = check_records[0]
            shape = next(m for m in old["ladder"] if m["name"] == r["model"])
            model = LadderModel(shape["layers"], shape["width"], shape["non_embedding_params"], shape["total_params"])
            run = PlannedRun(r["budget"], model, r["steps"], r["tokens"] // r["steps"])
        if args.bootstrap:
            point = (run.model.non_embedding_params, run.tokens) if run is not None else None
            fits.update(bootstrap_report(sweep_records, fit, sweep, args, check_point=point))
        if run is not None:
            check = check_summary(run, fit, fits, check_records[0])
    command = " ".join(["python -m experiments scaling", *(argv if argv is not None else sys.argv[1:])])
    report = dict(old, fits=fits, check=check, refit_command=command)
    print_fits(fits)
    if check and "actual_loss" in check:
        print_check(check)
    write_outputs(report, args.out, plots=not args.no_plots)
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.refit:
        return refit(args, argv)
    from llmjax.config import ConfigError, get_config
    from llmjax.scaling import ScalingError

    try:
        preset_vocab = get_config(args.model).vocab_size
    except ConfigError as error:
        print(f"{PROG}: --model: {error}", file=sys.stderr)
        return 2
    data = open_sweep_data(args, preset_vocab)
    try:
        sweep = make_sweep(args, data)
    except ScalingError as error:
        print(f"{PROG}: {error} (see --budgets, --ladder, --min-steps, --batch, --max-epochs)", file=sys.stderr)
        return 2
    estimator = Estimator(args)
    identities = [(run, run_identity(sweep, run, args)) for run in sweep.runs]
    records: dict[str, dict] = {}
    for _, identity in identities:
        record = read_cached(args.out / "runs" / f"{run_key(identity)}.json")
        if record is not None:
            records[run_key(identity)] = record
            estimator.add(record)
    print_plan(plan_rows(sweep, args, estimator, set(records)), sweep, args)
    if args.plan_only:
        return 0

    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    cached = len(records)
    pending = [(run, identity) for run, identity in identities if run_key(identity) not in records]
    print(f"{len(identities)} sweep runs: {cached} cached in {args.out / 'runs'}, {len(pending)} to train")
    trainer_box: list = []
    trained, left = execute(pending, records, sweep, args, estimator, trainer_box, started, "sweep")

    sweep_records = [dict(records[run_key(identity)], role="sweep", budget=run.budget)
                     for run, identity in identities if run_key(identity) in records]
    fits, fit = fit_sweep(sweep_records, sweep, args) if not left else ({"error": "the sweep is not finished"}, None)
    check: dict | None = None
    check_records = []
    status = 0
    if fit is not None:
        run = check_run(fit, sweep, args) if args.check else None
        if run is not None and run.tokens > sweep.max_tokens:
            status = 2
            check = {"error": f"the check run ({run.model.name}, {run.tokens:,} tokens) would read more than "
                     f"--max-epochs {args.max_epochs} x the training split ({sweep.max_tokens:,.0f} tokens): give "
                     f"more data or lower --budgets / --predict-factor"}
            print(f"{PROG}: {check['error']}", file=sys.stderr)
            run = None
        record = None
        if run is not None:  # trained before the bootstrap, which needs only its N and D: training gets the time
            identity = run_identity(sweep, run, args)
            record = read_cached(args.out / "runs" / f"{run_key(identity)}.json")
            if record is not None:
                cached += 1
            else:
                done, check_left = execute([(run, identity)], records, sweep, args, estimator, trainer_box, started,
                                           "check")
                trained, left = trained + done, left + check_left
                record = done[0] if done else None
        if args.bootstrap:
            point = (run.model.non_embedding_params, run.tokens) if run is not None else None
            fits.update(bootstrap_report(sweep_records, fit, sweep, args, check_point=point))
        if run is not None:
            check = check_summary(run, fit, fits, record)
            if record is not None:
                check_records.append(dict(record, role="check", budget=run.budget))
    elif args.check:
        print(f"{PROG}: no check run yet: the sweep's fits are not made ({fits.get('error') or 'see above'})")

    import jax

    report = {"command": " ".join(["python -m experiments scaling", *(argv if argv is not None else sys.argv[1:])]),
              "device": jax.devices()[0].device_kind, "data": data.identity, "flags": {
                  k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("shapes", "budget_list")},
              "budgets": args.budget_list, "n_definition": "non-embedding parameters (Kaplan): all but the token "
              "embedding, the untied output head and learned positions; C = 6 N D",
              "ladder": [dataclasses.asdict(m) | {"name": m.name} for m in sweep.models],
              "counts": {"planned": len(identities) + (1 if args.check else 0), "cached": cached,
                         "trained": len(trained), "left": len(left)},
              "complete": not left and (not args.check or (check is not None and "actual_loss" in check)),
              "left": [{"model": run.model.name, "budget": run.budget, "steps": run.steps} for run, _ in left],
              "runs": sweep_records + check_records, "fits": fits, "check": check}
    print_fits(fits)
    if check and "actual_loss" in check:
        print_check(check)
    if left:
        remaining = sum(estimator.seconds(run) for run, _ in left)
        print(f"left to do: {len(left)} run(s), about {remaining:.0f} s: " + ", ".join(
            f"{run.model.name}@{run.budget:.3g}" for run, _ in left) + "; rerun the same command to resume")
    write_outputs(report, args.out, plots=not args.no_plots)
    print(f"runs: {report['counts']['trained']} trained, {report['counts']['cached']} cached, "
          f"{report['counts']['left']} left; {time.perf_counter() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
