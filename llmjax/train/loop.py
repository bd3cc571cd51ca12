"""The training loop: data -> jitted step -> metrics, evaluation, samples and checkpoints.

Everything about a run lives in its folder:
    run/config.json        model, train and run settings
    run/metrics.jsonl      one JSON line per logged step and per evaluation
    run/tensorboard/       the same as TensorBoard event files
    run/checkpoints/<step> orbax checkpoints (resume continues from the newest readable one)
    run/loss.png           train and validation loss curves, drawn at the end

The step is compiled once and its state donated. The host reads a step's metrics only at
logging time, after the next step has been dispatched, so the device never waits for Python.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from llmjax.config import ModelConfig, TrainConfig, config_differences, config_to_dict
from llmjax.data.loader import BatchIterator, BatchSource, batch_at
from llmjax.kernels.platform import compute_device
from llmjax.parallel.mesh import MeshError
from llmjax.parallel.plan import BatchError, Plan
from llmjax.parallel.rules import ShardingError
from llmjax.train.checkpoint import Checkpointer, run_record
from llmjax.train.metrics import flops_per_token
from llmjax.train.step import init_train_state, make_eval_step, make_train_step, windows_to_batch

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, unusable data); the message says what to change."""


@dataclass(frozen=True)
class RunConfig:
    """Where a run reads and writes, and how often it logs, evaluates and saves."""

    run_dir: Path
    batch_size: int = 16  # sequences per step, across all processes
    seq_len: int = 256
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 3
    async_checkpoints: bool = True
    sample_prompt: str = "def"
    sample_tokens: int = 48
    sample_stop_ids: tuple[int, ...] = ()  # the sample ends at the first of these (a chat model's end of reply)
    peak_flops: float | None = None  # for MFU; default: a table by device kind
    progress: bool = True
    mesh: str | None = None  # '--mesh data=2,fsdp=2,tensor=2' (llmjax.parallel.mesh); None: data over all devices
    sharding: str = "auto"  # strategy (llmjax.parallel.rules): auto, dp, zero1, zero2, fsdp, tp, fsdp+tp, sp


# bf16 dense peaks; CPUs get no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5": 459e12}


def device_peak_flops(device: jax.Device) -> float | None:
    return next((flops for name, flops in PEAK_FLOPS.items() if name in device.device_kind), None)


class MetricsLog:
    """metrics.jsonl plus TensorBoard scalars, written by process 0 only (the values are global)."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.enabled = jax.process_index() == 0
        self.file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard")) if self.enabled else None

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(f"{kind}/{key}", value, step)
            elif key == "moe/expert_load":  # [moe_layers, E]: one expert-utilization histogram per MoE layer
                for layer, load in enumerate(value):
                    self._expert_histogram(f"{kind}/moe/expert_load/layer_{layer}", load, step)

    def _expert_histogram(self, tag: str, load: list[float], step: int) -> None:
        """Bucket e holds the fraction of tokens routed to expert e (bucket edges 1, 2, ..., E)."""
        experts = np.arange(len(load), dtype=np.float64)
        weights = np.asarray(load, np.float64)
        self.tensorboard.add_histogram_raw(
            tag, min=0.0, max=float(len(load) - 1), num=float(weights.sum()), sum=float((experts * weights).sum()),
            sum_squares=float((experts**2 * weights).sum()), bucket_limits=(experts + 1).tolist(),
            bucket_counts=weights.tolist(), global_step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


class StopRequest:
    """Turns SIGTERM (preemption) into a flag the loop checks between steps: save, then exit."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, run: RunConfig, train_data, validation_data=None, tokenizer=None,
          initial_params: dict | None = None) -> dict:
    """Train until train_cfg.total_steps (resuming from run_dir's checkpoints); returns a summary.

    train_data / validation_data: token sources (llmjax.data.shards.TokenShards or any object
    with total_tokens, document_starts and tokens(start, stop)), cut into windows of seq_len + 1, or batch
    sources (llmjax.data.loader.BatchSource: packed chats with their loss masks). tokenizer: for printed samples.
    initial_params: where a run without a checkpoint starts (fine-tuning); default: a random initialization.
    """
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(run, model_cfg, train_cfg)
    _check_batch(run, plan, train_data, validation_data)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(json.dumps(
        {"model": config_to_dict(model_cfg), "train": config_to_dict(train_cfg),
             "run": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(run).items()}},
            indent=2))

    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=run.keep_last, async_save=run.async_checkpoints)
    # The plan lays the batch over the data-parallel axes and the state over the rest (FSDP, tensor,
    # ZeRO); XLA inserts the collectives. The state is created (or restored) directly in its shards.
    batch_sharding = plan.batch_sharding()
    state, start_step = _initial_state(model_cfg, train_cfg, run, checkpointer, plan, initial_params)
    train_step = make_train_step(model_cfg, train_cfg, plan)
    eval_step = make_eval_step(model_cfg, train_cfg, plan)
    log.info("training on %d devices (%d processes): %s", jax.device_count(), jax.process_count(), plan.describe())
    metrics_log = MetricsLog(run_dir)
    stop = StopRequest()
    peak = run.peak_flops or device_peak_flops(compute_device())
    flops = flops_per_token(model_cfg, run.seq_len)
    batches = _batches(train_data, run, start_step, batch_sharding)
    progress = tqdm(total=train_cfg.total_steps, initial=start_step, desc="training", unit="step",
                    disable=not run.progress, dynamic_ncols=True)
    summary = {"start_step": start_step, "val_loss": None}
    pending = None  # (step, metrics on device) of the step before the one just dispatched
    clock = (time.perf_counter(), start_step)

    def evaluate(step: int) -> float | None:
        if validation_data is None:
            return None
        val_loss = _validation_loss(eval_step, state.params, validation_data, run, batch_sharding)
        values = {"loss": val_loss, "perplexity": math.exp(min(val_loss, 50))}
        if tokenizer is not None and run.sample_tokens > 0:
            values["sample"] = _sample(state.params, model_cfg, tokenizer, run)
        metrics_log.write(step, "validation", values)
        progress.write(f"step {step}: validation loss {val_loss:.4f}" + (f"\n{values['sample']}" if "sample" in values else ""))
        return val_loss

    def save(step: int, val_loss: float | None) -> None:
        checkpointer.save(state, record=run_record(model_cfg, train_cfg, loader_state={"step": step, "seed": run.seed},
                                                   seed=run.seed), val_loss=val_loss)

    collapsed_layers: set[int] = set()  # MoE layers whose router collapse was already warned about

    def report(step: int, metrics) -> None:
        nonlocal clock
        values = {key: float(value) if np.ndim(value) == 0 else np.asarray(value).tolist()  # MoE per-layer arrays
                  for key, value in jax.device_get(metrics).items()}
        if model_cfg.is_moe:
            _warn_router_collapse(values, model_cfg, step, collapsed_layers)
        if not math.isfinite(values["loss"]) and not train_cfg.skip_nonfinite:
            raise TrainingError(
                f"loss is {values['loss']} at step {step}: lower --lr, lengthen --warmup, keep --grad-clip on, "
                f"or pass --skip-nonfinite to skip such updates"
            )
        now = time.perf_counter()
        elapsed, steps = now - clock[0], step - clock[1]
        clock = (now, step)
        values["tokens_per_second"] = steps * run.batch_size * run.seq_len / elapsed if elapsed > 0 else 0.0
        if peak:
            values["mfu"] = values["tokens_per_second"] * flops / peak
        metrics_log.write(step, "train", values)
        progress.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_second']:,.0f}",
                             **({"mfu": f"{values['mfu']:.1%}"} if peak else {}))
        summary["train_loss"] = values["loss"]

    try:
        step = start_step
        for step in range(start_step, train_cfg.total_steps):
            state, metrics = train_step(state, next(batches))
            if pending is not None and (pending[0] % run.log_every == 0):
                report(*pending)
            pending = (step + 1, metrics)
            progress.update(1)
            done = step + 1
            val_loss = evaluate(done) if done % run.eval_every == 0 else None
            if val_loss is not None:
                summary["val_loss"] = val_loss
            if done % run.save_every == 0 or stop.requested:
                save(done, val_loss)
            if stop.requested:
                report(*pending)
                progress.write(f"SIGTERM: saved step {done} and stopped; run the same command to resume")
                summary["stopped_at"] = done
                return summary
        if pending is not None:
            report(*pending)
        final_step = train_cfg.total_steps
        if final_step > start_step:
            if final_step % run.eval_every:
                summary["val_loss"] = evaluate(final_step)
            if final_step % run.save_every:
                save(final_step, summary["val_loss"])
        summary["end_step"] = final_step
        return summary
    finally:
        stop.restore()
        progress.close()
        batches.close()
        checkpointer.close()
        metrics_log.close()
        if jax.process_index() == 0:
            plot_losses(run_dir)


def _warn_router_collapse(values: dict, model_cfg: ModelConfig, step: int, warned_layers: set[int]) -> None:
    """Log a warning (once per MoE layer and run) when one expert takes most of a layer's tokens."""
    from llmjax.model.moe import router_collapse

    collapse = router_collapse(values["moe/expert_load"], model_cfg)
    if collapse is not None and collapse[0] not in warned_layers:
        warned_layers.add(collapse[0])
        log.warning("step %d: %s", step, collapse[2])


def _plan(run: RunConfig, model_cfg: ModelConfig, train_cfg: TrainConfig) -> Plan:
    """The run's mesh and strategy, checked against the model's shapes before anything is allocated."""
    try:
        plan = Plan.create(run.mesh, run.sharding)
        plan.state_shardings(model_cfg, train_cfg)  # every sharded dimension must divide
    except (MeshError, ShardingError, ValueError) as error:
        raise TrainingError(str(error)) from None
    if run.seq_len % plan.sequence_ways():
        raise TrainingError(f"--seq {run.seq_len} does not divide over the {plan.sequence_ways()}-way sequence axis "
                            f"of {plan.describe()}")
    return plan


def _process_rows(batch: dict, run: RunConfig) -> dict:
    """This process's rows of a global batch."""
    rows = run.batch_size // jax.process_count()
    return {key: value[jax.process_index() * rows:(jax.process_index() + 1) * rows] for key, value in batch.items()}


def _source_batch(source: BatchSource, step: int, run: RunConfig, batch_sharding) -> dict:
    """Step `step`'s batch of a batch source, laid out over the devices."""
    local = _process_rows(source.batch(step, batch_size=run.batch_size, seed=run.seed), run)
    return {key: jax.make_array_from_process_local_data(batch_sharding, value) for key, value in local.items()}


class _SourceBatches:
    """A batch source's batches from a step on, as BatchIterator gives a token stream's."""

    def __init__(self, source: BatchSource, run: RunConfig, start_step: int, batch_sharding):
        self.source, self.run, self.step, self.sharding = source, run, start_step, batch_sharding

    def __next__(self) -> dict:
        self.step += 1
        return _source_batch(self.source, self.step - 1, self.run, self.sharding)

    def close(self) -> None:
        pass


class _WindowBatches:
    """A token stream cut into windows of seq_len + 1 (BatchIterator, prefetched), as {"inputs", "targets"}."""

    def __init__(self, data, run: RunConfig, start_step: int, batch_sharding):
        self.windows = BatchIterator(data, batch_size=run.batch_size // jax.process_count(), seq_len=run.seq_len,
                                     seed=run.seed, start_step=start_step, process_index=jax.process_index(),
                                     process_count=jax.process_count(), prefetch=2)
        self.sharding = batch_sharding

    def __next__(self) -> dict:
        return windows_to_batch(jax.make_array_from_process_local_data(self.sharding, next(self.windows)))

    def close(self) -> None:
        self.windows.close()


def _batches(data, run: RunConfig, start_step: int, batch_sharding):
    """The training batches from start_step on: a batch source's own, or a token stream's windows."""
    if isinstance(data, BatchSource):
        return _SourceBatches(data, run, start_step, batch_sharding)
    return _WindowBatches(data, run, start_step, batch_sharding)


def _check_batch(run: RunConfig, plan: Plan, train_data, validation_data) -> None:
    if run.batch_size % jax.process_count():
        raise TrainingError(f"--batch {run.batch_size} does not divide across {jax.process_count()} processes")
    try:
        plan.check_batch(run.batch_size)
    except BatchError as error:
        raise TrainingError(str(error)) from None
    for name, data in (("training", train_data), ("validation", validation_data)):
        if isinstance(data, BatchSource):
            width = data.batch(0, batch_size=run.batch_size, seed=run.seed)["inputs"].shape[1]
            if width != run.seq_len:
                raise TrainingError(f"the {name} batches are {width} tokens long, not --seq {run.seq_len}")
        elif data is not None and data.total_tokens < run.seq_len + 1:
            raise TrainingError(
                f"the {name} data has {data.total_tokens} tokens, fewer than one window of --seq {run.seq_len} + 1"
            )


def _initial_state(model_cfg, train_cfg, run, checkpointer, plan: Plan, initial_params: dict | None = None):
    """(state, step): the newest readable checkpoint's (read straight into this plan's shards, whatever
    mesh wrote it), or a fresh state (over initial_params when given)."""
    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, train_cfg, jax.random.key(run.seed)))
    abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                            abstract, plan.state_shardings(model_cfg, train_cfg))
    restored = checkpointer.restore_latest(abstract, model_cfg)
    if restored is None:
        return plan.init_state(model_cfg, train_cfg, jax.random.key(run.seed), params=initial_params), 0
    state, record = restored
    changed = config_differences(record.get("train_config", {}), train_cfg)
    if changed:
        log.warning("resuming with different train settings (%s): the run will not match an uninterrupted one",
                    "; ".join(changed))
    if record["loader_state"]["seed"] != run.seed:
        log.warning("resuming with --seed %d but the checkpoint was written with seed %d",
                    run.seed, record["loader_state"]["seed"])
    step = int(state.step)
    log.info("resumed from step %d in %s", step, checkpointer.directory)
    return state, step


def _validation_loss(eval_step, params, validation_data, run: RunConfig, batch_sharding) -> float:
    """Mean loss over a fixed set of validation windows (the same ones at every evaluation)."""
    nll, tokens = 0.0, 0.0
    for index in range(run.eval_batches):
        if isinstance(validation_data, BatchSource):
            batch = _source_batch(validation_data, index, run, batch_sharding)
        else:
            windows = batch_at(validation_data, index, batch_size=run.batch_size // jax.process_count(),
                               seq_len=run.seq_len, seed=run.seed, process_index=jax.process_index(),
                               process_count=jax.process_count())
            batch = windows_to_batch(jax.make_array_from_process_local_data(batch_sharding, windows))
        sums = eval_step(params, batch)
        nll, tokens = nll + sums["nll_sum"], tokens + sums["tokens"]
    return float(nll / tokens)


def _sample(params, model_cfg, tokenizer, run: RunConfig) -> str:
    from llmjax.infer.generate import greedy_continuation

    prompt = tokenizer.encode(run.sample_prompt) or [tokenizer.eot_id or 0]
    ids = greedy_continuation(params, model_cfg, prompt, run.sample_tokens)
    ends = [i for i, token in enumerate(ids) if token in run.sample_stop_ids]
    return run.sample_prompt + tokenizer.decode(ids[:ends[0] + 1] if ends else ids)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: Path, baselines: dict[str, float] | None = None) -> Path | None:
    """run/loss.png: train and validation loss against step, with optional horizontal reference
    lines ({"unigram entropy": 6.4}); None when nothing was logged."""
    records = read_metrics(run_dir)
    train_points = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and math.isfinite(r["loss"])]
    val_points = [(r["step"], r["loss"]) for r in records if r["kind"] == "validation"]
    if not train_points and not val_points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    for points, label, style in ((train_points, "train", "-"), (val_points, "validation", "o-")):
        if points:
            steps, losses = np.array(points).T
            axes.plot(steps, losses, style, label=label, markersize=3)
    for label, value in (baselines or {}).items():
        axes.axhline(value, color="gray", linestyle="--", linewidth=1, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats / token)")
    axes.set_title(Path(run_dir).name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(run_dir) / "loss.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_loss_comparison(metrics: dict[str, list[dict]], path: Path) -> Path:
    """Several runs' loss curves in one PNG ({label: metrics records}): train loss as lines, validation as dots,
    one colour per run; the lower panel is each run's train loss minus the first run's at the steps both logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, differences) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=120, sharex=True,
                                                 gridspec_kw={"height_ratios": [2, 1]})
    reference = None
    for index, (label, records) in enumerate(metrics.items()):
        colour = f"C{index}"
        train = {r["step"]: r["loss"] for r in records if r["kind"] == "train" and math.isfinite(r["loss"])}
        validation = [(r["step"], r["loss"]) for r in records if r["kind"] == "validation"]
        if train:
            losses.plot(list(train), list(train.values()), "-", color=colour, linewidth=1, label=f"{label} train")
        if validation:
            steps, values = np.array(validation).T
            losses.plot(steps, values, "o", color=colour, markersize=4, label=f"{label} validation")
        if reference is None:
            reference = train
        elif train:
            shared = sorted(set(train) & set(reference))
            differences.plot(shared, [train[s] - reference[s] for s in shared], "-", color=colour, linewidth=1,
                             label=f"{label} - {next(iter(metrics))}")
    losses.set_ylabel("loss (nats / token)")
    losses.grid(alpha=0.3)
    losses.legend(fontsize=8)
    differences.axhline(0.0, color="gray", linewidth=1)
    differences.set_xlabel("step")
    differences.set_ylabel("train loss difference")
    differences.grid(alpha=0.3)
    if len(metrics) > 1:
        differences.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path

