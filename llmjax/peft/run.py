"""A LoRA run folder, for the experiments that train adapters instead of every weight (`sft --lora`, `dpo --lora`).

    run/lora-checkpoints/<step>  LoraState (step, adapters, the adapters' AdamW moments): a rerun resumes from here
    run/checkpoints/<step>       the base with the adapters merged, in llmjax.train's TrainState layout (optimizer
                                 moments zero), written at the end: `load_model(ckpt=RUN)`, `generate --ckpt RUN
                                 --chat` and `serve --ckpt RUN` read it as any run
    run/adapter/                 the adapters as Hugging Face PEFT files (`save_adapters`)
    run/metrics.jsonl, loss.png  as llmjax.train.loop writes them

`train_lora` is the loop for batch sources (packed chats: loss masks, positions and segment ids honoured as the full
path honours them); `restore_or_init_lora` and `export_lora_run` are the pieces every LoRA loop shares;
the --lora flags of the experiments are in llmjax.peft.flags.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from llmjax.config import ModelConfig, TrainConfig, config_differences, config_to_dict
from llmjax.peft.lora import LoraConfig, merge, save_adapters
from llmjax.peft.train import (
    LoraState,
    init_lora_state,
    lora_loss_sums,
    make_lora_train_step,
)
from llmjax.train.checkpoint import Checkpointer, CheckpointError, run_record
from llmjax.train.loop import (
    MetricsLog,
    RunConfig,
    StopRequest,
    TrainingError,
    _sample,  # the full path's sample reply (here on the merged weights)
    plot_losses,
)
from llmjax.train.state import train_state_from_params

LORA_CHECKPOINTS = "lora-checkpoints"
log = logging.getLogger(__name__)


def lora_record(lora_cfg: LoraConfig) -> dict:
    """The LoRA settings as JSON (in config.json and every checkpoint's record)."""
    return {**config_to_dict(lora_cfg), "targets": list(lora_cfg.targets)}


# --- resume and export ------------------------------------------------------------------------------------------


def lora_checkpointer(run_dir: str | Path, keep_last: int = 3) -> Checkpointer:
    return Checkpointer(Path(run_dir) / LORA_CHECKPOINTS, keep_last=keep_last, async_save=False)


def restore_or_init_lora(params: dict, cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig,
                         checkpointer: Checkpointer, key: jax.Array, device=None) -> tuple[LoraState, int]:
    """(state, step): the newest readable adapter checkpoint's, or fresh adapters (B = 0: exactly the base) and
    optimizer state at step 0, every leaf on `device` (default the first). CheckpointError when the checkpoints were
    written with other LoRA settings."""
    device = device or jax.devices()[0]
    fresh = jax.device_put(init_lora_state(params, cfg, lora_cfg, train_cfg, key), device)
    restored = checkpointer.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh), cfg)
    mismatch = (f"the adapter checkpoints in {checkpointer.directory} were written with other LoRA settings than "
                f"{lora_record(lora_cfg)}: resume with the same --rank / --alpha / --dropout / --target, or start a "
                f"new --run-dir")
    if restored is None:
        if checkpointer.steps():  # there are checkpoints, but none with these adapters' shapes
            raise CheckpointError(mismatch)
        return fresh, 0
    state, record = restored
    if record.get("lora") != lora_record(lora_cfg):
        raise CheckpointError(f"{mismatch} (they have {record.get('lora')})")
    changed = config_differences(record.get("train_config", {}), train_cfg)
    if changed:
        log.warning("resuming with different train settings (%s): the run will not match an uninterrupted one",
                    "; ".join(changed))
    log.info("resumed from step %d in %s", int(state.step), checkpointer.directory)
    return state, int(state.step)


def export_lora_run(run_dir: str | Path, params: dict, adapters: dict, cfg: ModelConfig, lora_cfg: LoraConfig,
                    train_cfg: TrainConfig, *, step: int, seed: int, base_model: str = "") -> str:
    """Write run/checkpoints/<step> (base + adapters merged; kept when that step is already there) and run/adapter/
    (PEFT files); returns a line saying what was written (or why no PEFT files: a family they have no layout for)."""
    run_dir = Path(run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=1, async_save=False)
    try:
        if step not in checkpointer.steps():
            merged = merge(params, adapters, cfg, lora_cfg)
            state = train_state_from_params(merged, cfg, train_cfg)._replace(step=jnp.asarray(step, jnp.int32))
            checkpointer.save(state, record=run_record(cfg, train_cfg, loader_state={"step": step, "seed": seed},
                                                       seed=seed, extra={"lora": lora_record(lora_cfg),
                                                                         "merged_from": LORA_CHECKPOINTS}))
    finally:
        checkpointer.close()
    try:
        save_adapters(run_dir / "adapter", adapters, cfg, lora_cfg, base_model=base_model)
    except ValueError as error:
        return f"checkpoints/ holds the merged model; no adapter/ PEFT files: {error}"
    return "checkpoints/ holds the merged model, adapter/ the PEFT files"


# --- the loop ---------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "train_cfg"))
def _eval_sums(adapters: dict, params: dict, batch: dict, cfg, lora_cfg, train_cfg) -> dict:
    return lora_loss_sums(adapters, params, batch, cfg, lora_cfg, train_cfg)[1]


def validation_loss(adapters: dict, params: dict, source, cfg: ModelConfig, lora_cfg: LoraConfig,
                    train_cfg: TrainConfig, run: RunConfig) -> float:
    """The token-mean loss over the validation source's first run.eval_batches batches (the same at every evaluation,
    as llmjax.train.loop takes them), no dropout."""
    nll, tokens = 0.0, 0.0
    for index in range(run.eval_batches):
        sums = _eval_sums(adapters, params, source.batch(index, batch_size=run.batch_size, seed=run.seed), cfg,
                          lora_cfg, train_cfg)
        nll, tokens = nll + float(sums["nll_sum"]), tokens + float(sums["tokens"])
    return nll / max(tokens, 1.0)


def train_lora(params: dict, cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig, run: RunConfig,
               train_data, validation_data=None, tokenizer=None, base_model: str = "") -> dict:
    """Train adapters on the frozen `params` until train_cfg.total_steps, resuming from run/lora-checkpoints, then
    export (module docstring). train_data / validation_data: batch sources (`llmjax.data.loader.BatchSource`, e.g.
    packed chats), step s's batch being `train_data.batch(s, ...)` as in llmjax.train.loop, so a resumed run sees what
    an uninterrupted one does; dropout keys come from run.seed and the step. One device. Returns llmjax.train.loop's
    summary: start_step, end_step (stopped_at on SIGTERM), train_loss, val_loss, and export (what was written)."""
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(
        {"model": config_to_dict(cfg), "train": config_to_dict(train_cfg), "lora": lora_record(lora_cfg),
         "run": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(run).items()}}, indent=2))
    device = jax.devices()[0]
    params = jax.device_put(params, device)
    key = jax.random.key(run.seed)
    checkpointer = lora_checkpointer(run_dir, run.keep_last)
    metrics_log = None
    try:
        state, start_step = restore_or_init_lora(params, cfg, lora_cfg, train_cfg, checkpointer,
                                                 jax.random.fold_in(key, 0), device)
        train_step = make_lora_train_step(cfg, lora_cfg, train_cfg)
        metrics_log, stop = MetricsLog(run_dir), StopRequest()
        progress = tqdm(total=train_cfg.total_steps, initial=start_step, desc="lora", unit="step",
                        disable=not run.progress, dynamic_ncols=True)
        summary: dict = {"start_step": start_step, "val_loss": None}

        def evaluate(step: int) -> float | None:
            if validation_data is None:
                return None
            loss = validation_loss(state.adapters, params, validation_data, cfg, lora_cfg, train_cfg, run)
            values = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
            if tokenizer is not None and run.sample_tokens > 0:
                values["sample"] = _sample(merge(params, state.adapters, cfg, lora_cfg), cfg, tokenizer, run)
            metrics_log.write(step, "validation", values)
            progress.write(f"step {step}: validation loss {loss:.4f}" + (f"\n{values['sample']}" if "sample" in values
                                                                           else ""))
            summary["val_loss"] = loss
            return loss

        def save(step: int, val_loss: float | None) -> None:
            record = run_record(cfg, train_cfg, loader_state={"step": step, "seed": run.seed}, seed=run.seed,
                                extra={"lora": lora_record(lora_cfg)})
            checkpointer.save(state, record=record, val_loss=val_loss)

        try:
            for step in range(start_step, train_cfg.total_steps):
                batch = train_data.batch(step, batch_size=run.batch_size, seed=run.seed)
                state, metrics = train_step(state, params, batch, key)
                done = step + 1
                progress.update(1)
                if done % run.log_every == 0 or done == train_cfg.total_steps or stop.requested:
                    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
                    if not np.isfinite(values["loss"]):
                        raise TrainingError(f"loss is {values['loss']} at step {done}: lower --lr (now {train_cfg.lr})")
                    metrics_log.write(done, "train", values)
                    progress.set_postfix(loss=f"{values['loss']:.3f}")
                    summary["train_loss"] = values["loss"]
                val_loss = evaluate(done) if done % run.eval_every == 0 or done == train_cfg.total_steps else None
                if done % run.save_every == 0 or done == train_cfg.total_steps or stop.requested:
                    save(done, val_loss)
                if stop.requested:
                    progress.write(f"SIGTERM: saved step {done} and stopped; run the same command to resume")
                    summary["stopped_at"] = done
                    return summary
        finally:
            stop.restore()
            progress.close()
        summary["end_step"] = max(train_cfg.total_steps, start_step)
        summary["export"] = export_lora_run(run_dir, params, state.adapters, cfg, lora_cfg, train_cfg,
                                            step=int(state.step), seed=run.seed, base_model=base_model)
        return summary
    finally:
        checkpointer.close()
        if metrics_log is not None:
            metrics_log.close()
            plot_losses(run_dir)


__all__ = ["LORA_CHECKPOINTS", "export_lora_run", "lora_checkpointer", "lora_record", "restore_or_init_lora",
           "train_lora", "validation_loss"]
