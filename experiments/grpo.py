"""GRPO on a verifiable task: rollouts from the serving engine, rewards from checkable answers, clipped updates."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

from llmjax.io.models import add_model_flags


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments grpo",
        description="Reinforcement learning with verifiable rewards (GRPO, as in DeepSeekMath): each iteration takes "
        "--prompts problems of the task's training split, samples --group-size completions of each with the "
        "continuous-batching engine (the policy's current weights, handed over on the device), scores them with "
        "the task's reward (a checkable 'Answer: <value>' line), normalizes the rewards within each problem's group, "
        "and takes --updates clipped policy-gradient steps on that batch. Every --eval-every iterations the greedy "
        "answers to --eval-problems held-out problems give the accuracy. Writes RUN/metrics.jsonl, grpo.png "
        "(reward, held-out accuracy, completion length, clipped fraction) and checkpoints/; running the same command "
        "again resumes. Teach the answer format first (`experiments sft --task ...`): a model that never writes an "
        "'Answer:' line gets no reward to learn from.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flags(p, "policy to start from", "`experiments sft`, `train`")
    p.add_argument("--task", default="arithmetic", help="verifiable task (llmjax.posttrain.tasks.TASKS)")
    p.add_argument("--reward", choices=("correctness", "combined"), default="correctness",
                   help="correctness: 1 for a right answer; combined: plus 0.1 for an 'Answer:' line")
    p.add_argument("--iterations", type=int, default=50, help="rollout batches (each followed by --updates steps)")
    p.add_argument("--prompts", type=int, default=16, help="problems per iteration")
    p.add_argument("--group-size", type=int, default=8, help="completions sampled per problem (at least 2)")
    p.add_argument("--updates", type=int, default=2, help="optimizer steps on each rollout batch")
    p.add_argument("--max-tokens", type=int, default=64, help="longest completion")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--lr", type=float, default=2e-6, help="learning rate (constant after --warmup)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup, in optimizer steps")
    p.add_argument("--clip-eps", type=float, default=0.2, help="the ratio's clip range [1 - eps, 1 + eps]")
    p.add_argument("--normalize", choices=("token", "sequence"), default="token",
                   help="average the objective over all completion tokens, or per completion then over completions")
    p.add_argument("--no-std", action="store_true", help="do not divide the group-centred rewards by their std")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="weight of the KL penalty (k3 estimator, per completion token) to the starting policy, kept "
                        "frozen as the reference (DeepSeekMath used 0.04); 0: no penalty and no reference copy")
    p.add_argument("--eval-every", type=int, default=10, help="iterations between held-out evaluations")
    p.add_argument("--eval-problems", type=int, default=200, help="held-out problems answered greedily per evaluation")
    p.add_argument("--eval-only", action="store_true",
                   help="answer the --eval-problems held-out problems with the starting policy, print the accuracy "
                        "as JSON and stop (no training, nothing written)")
    p.add_argument("--save-every", type=int, default=10, help="iterations between checkpoints (and one at the end)")
    p.add_argument("--num-blocks", type=int, default=2048, help="the engine's KV-cache blocks (16 tokens each)")
    p.add_argument("--max-running", type=int, default=128, help="completions the engine decodes together")
    p.add_argument("--time-budget", type=float, default=float("inf"), metavar="SECONDS",
                   help="stop after the iteration that passes this much wall time (evaluated and saved; the same "
                        "command resumes)")
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default: runs/grpo-BASE-TASK)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problems and the rollouts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    return p.parse_args(argv)


def plot_curves(run_dir: Path) -> Path | None:
    """run/grpo.png: rollout reward, held-out accuracy, completion length and clipped fraction against iteration."""
    from llmjax.train.loop import read_metrics

    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "validation"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reward_mean", "rollout reward", train), ("accuracy", "held-out accuracy", evals),
              ("completion_length", "completion tokens", train), ("clip_fraction", "clipped fraction", train))
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for axis, (key, title, rows) in zip(axes, panels):
        axis.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], marker=".")
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(run_dir) / "grpo.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def held_out_accuracy(engine, prompts: list, problems: list, task, reply, sampling) -> dict:
    """The engine's greedy answers to the problems: {"accuracy", "format" (fraction with an answer line),
    "problems", "tokens_per_s" (answer tokens over the time of generating them)}."""
    import time

    import numpy as np

    from llmjax.posttrain import tasks
    from llmjax.posttrain.rollouts import complete

    started = time.perf_counter()
    answers = complete(engine, prompts, sampling)
    seconds = time.perf_counter() - started
    texts = [reply(answer) for answer in answers]
    return {"accuracy": float(np.mean([tasks.correctness_reward(text, problem, task)
                                       for text, problem in zip(texts, problems)])),
            "format": float(np.mean([tasks.format_reward(text) for text in texts])), "problems": len(problems),
            "tokens_per_s": sum(len(answer.completion_ids) for answer in answers) / max(seconds, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    prog = "python -m experiments grpo"
    try:
        return run(args, prog)
    except (ValueError, RuntimeError) as error:  # ModelLoadError, RewardError, EngineError, TrainingError ...
        print(f"{prog}: {error}", file=sys.stderr)
        return 2


def run(args, prog: str) -> int:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from llmjax.config import TrainConfig
    from llmjax.infer.engine import Engine, SamplingParams
    from llmjax.io.models import (
        load_model_from_flags,
        model_name_from_flags,
        write_model_files,
    )
    from llmjax.posttrain import tasks
    from llmjax.posttrain.grpo import GRPOConfig, grpo_iteration
    from llmjax.posttrain.preference import restore_or_start
    from llmjax.posttrain.rollouts import (
        reply_text,
        rollout_engine_config,
        task_prompt_ids,
    )
    from llmjax.train.checkpoint import Checkpointer, run_record
    from llmjax.train.loop import MetricsLog, StopRequest, TrainingError

    if args.task not in tasks.TASKS:
        raise ValueError(f"--task {args.task!r}: expected one of {', '.join(tasks.TASKS)}")
    if args.group_size < 2:
        raise ValueError(f"--group-size {args.group_size}: GRPO compares the samples of a problem, so at least 2")
    for flag, value in (("--iterations", args.iterations), ("--prompts", args.prompts), ("--updates", args.updates),
                        ("--max-tokens", args.max_tokens), ("--eval-every", args.eval_every),
                        ("--save-every", args.save_every)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    task = tasks.TASKS[args.task]
    reward_fn = tasks.correctness_reward if args.reward == "correctness" else tasks.combined_reward
    train_problems = tasks.problems(task, "train", args.prompts * args.iterations, seed=args.seed)
    test_problems = tasks.problems(task, "test", args.eval_problems, seed=args.seed) if args.eval_problems else []
    if args.eval_only and not test_problems:
        raise ValueError("--eval-only needs --eval-problems of at least 1")
    if not math.isfinite(args.kl_coef) or args.kl_coef < 0:
        raise ValueError(f"--kl-coef {args.kl_coef}: must be a number >= 0")
    model = load_model_from_flags(args)
    cfg, tokenizer = model.cfg, model.tokenizer

    def reply(rollout) -> str:
        return reply_text(rollout, tokenizer, model.end_ids)

    train_prompts, test_prompts = ([task_prompt_ids(problem, task, tokenizer, model.chat_format) for problem in split]
                                   for split in (train_problems, test_problems))
    longest = max(len(prompt) for prompt in train_prompts + test_prompts)
    seq_len = longest + args.max_tokens
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"prompts of up to {longest} tokens + --max-tokens {args.max_tokens} exceed the model's "
                         f"context of {cfg.max_seq_len}")
    config = GRPOConfig(group_size=args.group_size, updates_per_batch=args.updates, clip_eps=args.clip_eps,
                        normalize=args.normalize, normalize_std=not args.no_std, kl_coef=args.kl_coef)
    steps = args.iterations * args.updates
    train_cfg = TrainConfig(lr=args.lr, warmup_steps=min(args.warmup, steps), total_steps=steps, schedule="constant",
                            weight_decay=0.0)
    engine_config = rollout_engine_config(train_prompts + test_prompts, args.max_tokens, cfg.max_seq_len,
                                          max_running=args.max_running, num_blocks=args.num_blocks)
    engine = Engine(model.params, cfg, engine_config,
                    eos_token_id=model.end_ids[0] if model.end_ids else None)
    greedy = SamplingParams(max_tokens=args.max_tokens, stop_token_ids=tuple(model.end_ids[1:]))
    if args.eval_only:
        print(json.dumps(held_out_accuracy(engine, test_prompts, test_problems, task, reply, greedy)))
        return 0
    run_dir = args.run_dir or Path("runs") / (
        f"grpo-{model_name_from_flags(args)}-{args.task}")
    write_model_files(run_dir, model)
    # The KL penalty's reference: the starting policy, frozen (a copy, as the trainer's params are donated).
    ref_params = jax.tree.map(jnp.copy, model.params) if args.kl_coef > 0 else None
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              stop_token_ids=tuple(model.end_ids[1:]))
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=2, async_save=False)
    state, start_step = restore_or_start(model.params, cfg, train_cfg, checkpointer, jax.devices()[0])
    start = start_step // args.updates
    metrics_log, stop = MetricsLog(run_dir), StopRequest()
    progress = tqdm(total=args.iterations, initial=start, desc="grpo", unit="iteration", disable=args.no_progress)
    summary: dict = {"start_iteration": start}

    def evaluate(iteration: int) -> None:
        if not test_problems:
            return
        engine.update_weights(state.params)
        values = held_out_accuracy(engine, test_prompts, test_problems, task, reply, greedy)
        metrics_log.write(iteration, "validation", values)
        summary.setdefault("initial_accuracy", values["accuracy"])
        summary["accuracy"] = values["accuracy"]
        progress.write(f"iteration {iteration}: held-out accuracy {values['accuracy']:.3f} "
                       f"({values['problems']} problems), answer lines {values['format']:.2f}")

    def save(iteration: int) -> None:
        record = run_record(cfg, train_cfg, loader_state={"step": int(state.step), "seed": args.seed}, seed=args.seed,
                            extra={"grpo": dataclasses.asdict(config)})
        checkpointer.save(state, record=record)

    started = time.perf_counter()
    try:
        if start == 0:
            evaluate(0)
        for iteration in range(start, args.iterations):
            window = slice(iteration * args.prompts, (iteration + 1) * args.prompts)
            batch = train_problems[window]

            def reward_of(rollout, batch=batch):
                problem = batch[rollout.prompt_index]
                return tasks.score(reward_fn, reply(rollout), problem, task)

            state, metrics = grpo_iteration(state, engine, train_prompts[window], reward_of,
                                            cfg=cfg, train_cfg=train_cfg, config=config, sampling=sampling,
                                            seq_len=seq_len, seed=args.seed * args.iterations + iteration,
                                            ref_params=ref_params)
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(f"loss is {metrics['loss']} at iteration {iteration + 1}: lower --lr")
            done = iteration + 1
            metrics_log.write(done, "train", metrics)
            summary["reward_mean"] = metrics["reward_mean"]
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", length=f"{metrics['completion_length']:.0f}",
                                 rollout_tok_s=f"{metrics['rollout_tokens_per_s']:.0f}")
            out_of_time = time.perf_counter() - started > args.time_budget
            if done % args.eval_every == 0 or done == args.iterations or out_of_time:
                evaluate(done)
            if done % args.save_every == 0 or done == args.iterations or stop.requested or out_of_time:
                save(done)
            if stop.requested or out_of_time:
                why = "SIGTERM" if stop.requested else f"--time-budget {args.time_budget:g} s"
                progress.write(f"{why}: saved iteration {done} and stopped; run the same command to resume")
                break
        summary["end_iteration"] = int(state.step) // args.updates
        summary["seconds"] = time.perf_counter() - started
    finally:
        stop.restore()
        progress.close()
        checkpointer.close()
        metrics_log.close()
        plot_curves(run_dir)
    print(json.dumps(summary))
    print(f"run folder: {run_dir} (metrics.jsonl, grpo.png, checkpoints/)")
    return 0
