"""Recurrent Memory Transformer on associative recall across segments, against the same backbone without memory."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

QUICK = {  # --quick: a CPU smoke run of seconds (it learns nothing; it checks the whole path runs)
    "d_model": 32, "layers": 1, "heads": 2, "memory_tokens": 2, "segment_len": 8, "segments": 3, "bptt": 0,
    "pairs": 2, "queries": 1, "steps": 4, "batch": 4, "eval_batches": 1, "eval_every": 2, "log_every": 2,
    "curriculum": "none", "warmup": 1,
}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments rmt_recall",
        description="Train a small decoder with Recurrent Memory Transformer memory (llmjax.model.rmt: M memory "
        "vectors read before and written after each segment, carried to the next) on associative recall "
        "(llmjax.data.synthetic: key-value pairs in the first segment, filler, queries in the last), and the same "
        "backbone without memory (each segment alone, so it never sees the pairs: chance is 1 / --values). Reports "
        "the accuracy of both on held-out batches at the full length (--segments x --segment-len tokens), a "
        "loss / accuracy curve (PNG) and a JSON summary. Defaults are sized for one GPU (target: >= 90% accuracy "
        "at 8x the segment length); --quick is a seconds-long CPU smoke run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("backbone")
    model.add_argument("--model", default="llama-tiny", help="model preset the backbone starts from (gpt2 or llama)")
    model.add_argument("--d-model", type=int, default=128, help="width (0: the preset's)")
    model.add_argument("--layers", type=int, default=4, help="blocks (0: the preset's)")
    model.add_argument("--heads", type=int, default=4,
                       help="attention heads, as many key/value heads (0: the preset's); d_ff becomes 3 x width")
    model.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override any other ModelConfig field, applied last (repeatable)")
    rmt = p.add_argument_group("memory")
    rmt.add_argument("--memory-tokens", type=int, default=8, help="memory vectors read and written per segment (M)")
    rmt.add_argument("--segment-len", type=int, default=32, help="tokens per segment (L)")
    rmt.add_argument("--segments", type=int, default=8, help="segments per sequence: length = segments x segment-len")
    rmt.add_argument("--write-scale", choices=("none", "embedding"), default="none",
                     help="the written memory as the final-normed hidden state (none) or that times the token "
                          "embeddings' RMS (embedding: read memory at the tokens' scale; llmjax.model.rmt.RmtConfig)")
    rmt.add_argument("--bptt", type=int, default=0,
                     help="backpropagate through at most this many segments of memory (K); 0: all of them")
    rmt.add_argument("--curriculum", default="auto",
                     help="segment counts to train through in order, comma-separated (e.g. 2,4,8), each moving on "
                          "when the training accuracy of the last 20 steps reaches --advance-at or after its share "
                          "of half the steps; 'auto': doubling from 2 up to --segments; 'none': --segments throughout")
    rmt.add_argument("--advance-at", type=float, default=0.9, help="curriculum: training accuracy to move on at")
    task = p.add_argument_group("task")
    task.add_argument("--pairs", type=int, default=4, help="key-value pairs per sequence, at its start")
    task.add_argument("--queries", type=int, default=4, help="queries at the end (distinct pairs), each scored")
    task.add_argument("--pair-segments", type=int, default=0,
                      help="spread the pairs over random slots of the first this many segments (0: packed first)")
    task.add_argument("--keys", type=int, default=64, help="distinct key tokens")
    task.add_argument("--values", type=int, default=64, help="distinct value tokens (chance = 1 / values)")
    task.add_argument("--filler", type=int, default=32, help="distinct filler tokens")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=4000, help="optimizer steps, for each of the two models")
    train.add_argument("--batch", type=int, default=64, help="sequences per step")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine decay)")
    train.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    train.add_argument("--seed", type=int, default=0, help="seed for initialization and data")
    train.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    train.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    train.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--out", type=Path, default=Path("runs/rmt_recall"), help="folder for rmt_recall.json / .png")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: a CPU smoke run (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def check_args(args) -> None:
    """One clear error per bad flag."""
    positive = ("memory_tokens", "segment_len", "segments", "pairs", "queries", "keys", "values", "filler", "steps",
                "batch", "eval_every", "eval_batches", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    for name in ("d_model", "layers", "heads", "bptt", "pair_segments", "warmup"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    if args.segments < 2:
        raise SystemExit(f"--segments {args.segments}: must be >= 2 (pairs in earlier segments, queries in the last)")
    if not args.lr > 0:
        raise SystemExit(f"--lr {args.lr}: must be > 0")
    if not 0 < args.advance_at <= 1:
        raise SystemExit(f"--advance-at {args.advance_at}: must be within (0, 1]")


def curriculum_stages(spec: str, segments: int) -> list[int]:
    """The segment counts to train through: 'auto' doubles from 2 to `segments`, 'none' is [segments]."""
    if spec == "none":
        return [segments]
    if spec == "auto":
        stages, n = [], 2
        while n < segments:
            stages.append(n)
            n *= 2
        return stages + [segments]
    try:
        stages = [int(s) for s in spec.split(",")]
    except ValueError:
        raise SystemExit(f"--curriculum {spec!r}: expected 'auto', 'none' or comma-separated segment counts") from None
    if any(b <= a for a, b in zip(stages, stages[1:])) or stages[0] < 2 or stages[-1] != segments:
        raise SystemExit(f"--curriculum {spec!r}: counts must increase from >= 2 and end at --segments {segments}")
    return stages


def model_config(args, vocab_size: int, positions_per_segment: int):
    from llmjax.config import ConfigError, get_config
    from llmjax.experiments.train import parse_overrides

    overrides = {"vocab_size": vocab_size, "max_seq_len": positions_per_segment}
    if args.d_model:
        overrides["d_model"] = args.d_model
    if args.layers:
        overrides["num_layers"] = args.layers
    if args.heads:
        overrides.update(num_heads=args.heads, num_kv_heads=args.heads)
    if args.d_model or args.heads:
        overrides.update(head_dim=None, d_ff=3 * (args.d_model or get_config(args.model).d_model))
    try:
        return get_config(args.model, **{**overrides, **parse_overrides(args.set)})
    except ConfigError as error:
        raise SystemExit(f"--model / --set: {error}") from None


def plot(history: dict, chance: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in (("rmt", "tab:blue"), ("no_memory", "tab:orange")):
        label = "RMT (memory)" if name == "rmt" else "same backbone, no memory"
        loss_ax.plot(history["step"], history[f"{name}_loss"], color=color, lw=0.8, label=label)
        acc_ax.plot(history["eval_step"], history[f"{name}_eval_accuracy"], "o-", color=color, ms=3, label=label)
    for start, segments in history["stages"]:
        loss_ax.axvline(start, color="gray", lw=0.5, ls=":")
        loss_ax.annotate(f"{segments} seg", (start, 1), xycoords=("data", "axes fraction"), fontsize=7,
                         va="top", color="gray")
    acc_ax.axhline(chance, color="gray", ls="--", lw=0.8, label=f"chance (1/{round(1 / chance)})")
    loss_ax.set(xlabel="step", ylabel="training loss on the answers", yscale="log", title="loss")
    acc_ax.set(xlabel="step", ylabel="held-out accuracy, full length", ylim=(0, 1.02), title="recall accuracy")
    acc_ax.legend(fontsize=8)
    loss_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    stages = curriculum_stages(args.curriculum, args.segments)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from llmjax.config import ConfigError, TrainConfig
    from llmjax.data.synthetic import (
        RecallLayout,
        associative_recall_batch,
        check_recall_shape,
        recall_accuracy,
        recall_accuracy_by_pair,
        recall_accuracy_by_query,
    )
    from llmjax.model.rmt import RmtConfig, init_rmt_params, next_token_loss, no_memory_forward, rmt_forward
    from llmjax.train.optim import make_optimizer, weight_decay_mask

    try:
        layout = RecallLayout(num_keys=args.keys, num_values=args.values, num_filler=args.filler)
        bptt = args.bptt or args.segments
        rmt_cfg = RmtConfig(memory_tokens=args.memory_tokens, segment_len=args.segment_len, bptt_segments=bptt,
                            write_scale=args.write_scale)
    except (ValueError, ConfigError) as error:
        raise SystemExit(str(error)) from None
    cfg = model_config(args, layout.vocab_size, rmt_cfg.positions_per_segment)
    seg_len = args.segment_len

    def pair_region(segments: int):
        return None if not args.pair_segments else min(args.pair_segments, segments - 1) * seg_len

    for segments in stages:
        try:
            check_recall_shape(args.pairs, segments * seg_len, seg_len, layout, args.queries, pair_region(segments))
        except ValueError as error:
            raise SystemExit(f"--pairs / --queries / --segment-len / --pair-segments: {error}") from None

    def batch_at(key, segments: int):
        return associative_recall_batch(key, args.batch, args.pairs, segments * seg_len, seg_len, layout,
                                        num_queries=args.queries, pair_region=pair_region(segments))

    train_cfg = TrainConfig(lr=args.lr, warmup_steps=min(args.warmup, args.steps), total_steps=args.steps)
    init_key, data_key, eval_key = jax.random.split(jax.random.key(args.seed), 3)
    rmt_params = init_rmt_params(cfg, rmt_cfg, init_key)
    models = {  # name: (logits function, params, optimizer)
        "rmt": (lambda params, tokens: rmt_forward(params, tokens, cfg, rmt_cfg), rmt_params,
                make_optimizer(train_cfg, weight_decay_mask={**weight_decay_mask(cfg, train_cfg), "memory": False})),
        "no_memory": (lambda params, tokens: no_memory_forward(params, tokens, cfg, seg_len),
                      {k: v for k, v in rmt_params.items() if k != "memory"},  # the same initial backbone
                      make_optimizer(train_cfg, model_cfg=cfg)),
    }

    def make_step(logits_fn, optimizer):
        def loss_and_accuracy(params, tokens, mask):
            logits = logits_fn(params, tokens)  # [batch, seq, padded_vocab]
            return next_token_loss(logits, tokens, mask), recall_accuracy(logits, tokens, mask)

        @jax.jit
        def step(params, opt_state, tokens, mask):
            (loss, accuracy), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(params, tokens, mask)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, accuracy

        return step, jax.jit(loss_and_accuracy)

    steps, evals, predictors, state = {}, {}, {}, {}
    for name, (logits_fn, params, optimizer) in models.items():
        steps[name], evals[name] = make_step(logits_fn, optimizer)
        predictors[name] = jax.jit(lambda params, tokens, f=logits_fn: jnp.argmax(f(params, tokens)[:, :-1], -1))
        state[name] = (params, optimizer.init(params))
    eval_data = [batch_at(jax.random.fold_in(eval_key, i), args.segments) for i in range(args.eval_batches)]

    def evaluate(name):
        results = [evals[name](state[name][0], tokens, mask) for tokens, mask in eval_data]
        return float(jnp.mean(jnp.array([r[0] for r in results]))), float(jnp.mean(jnp.array([r[1] for r in results])))

    def accuracy_breakdown(name):  # by pair (which pairs the memory keeps) and by query (values without keys?)
        predicted = np.concatenate([predictors[name](state[name][0], tokens) for tokens, _ in eval_data])
        tokens, mask = (np.concatenate([np.asarray(batch[i]) for batch in eval_data]) for i in (0, 1))
        rounded = lambda values: [None if np.isnan(a) else round(float(a), 4) for a in values]  # noqa: E731
        return (rounded(recall_accuracy_by_pair(predicted, tokens, mask, layout, args.pairs, args.queries)),
                rounded(recall_accuracy_by_query(predicted, tokens, mask, args.queries)))

    device = jax.devices()[0]
    print(f"rmt_recall: {cfg.name} backbone d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads "
          f"on {device.platform} ({device.device_kind}); memory {args.memory_tokens} tokens, segments of "
          f"{seg_len} tokens, {args.segments} segments ({args.segments * seg_len} tokens), BPTT {bptt} segments; "
          f"{args.pairs} pairs, {args.queries} queries, chance {layout.chance_accuracy:.3f}; curriculum {stages}",
          flush=True)
    history = {"step": [], "segments": [], "rmt_loss": [], "rmt_accuracy": [], "no_memory_loss": [],
               "no_memory_accuracy": [], "eval_step": [], "rmt_eval_loss": [], "rmt_eval_accuracy": [],
               "no_memory_eval_loss": [], "no_memory_eval_accuracy": [], "stages": [[0, stages[0]]]}
    stage, stage_start = 0, 0
    stage_cap = args.steps // (2 * (len(stages) - 1)) if len(stages) > 1 else args.steps
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        key = jax.random.fold_in(data_key, step)
        segments = stages[stage]
        row = {}
        for name in models:
            # RMT follows the curriculum; without memory, length changes nothing (each segment is alone): full length
            tokens, mask = batch_at(key, segments if name == "rmt" else args.segments)
            params, opt_state, loss, accuracy = steps[name](*state[name], tokens, mask)
            state[name] = (params, opt_state)
            row[name] = (float(loss), float(accuracy))
        history["step"].append(step)
        history["segments"].append(segments)
        for name, (loss, accuracy) in row.items():
            history[f"{name}_loss"].append(loss)
            history[f"{name}_accuracy"].append(accuracy)
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:>6}/{args.steps}  {segments} segments  RMT loss {row['rmt'][0]:.3f} acc "
                  f"{row['rmt'][1]:.3f} | no memory loss {row['no_memory'][0]:.3f} acc {row['no_memory'][1]:.3f}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            history["eval_step"].append(step)
            for name in models:
                loss, accuracy = evaluate(name)
                history[f"{name}_eval_loss"].append(loss)
                history[f"{name}_eval_accuracy"].append(accuracy)
            print(f"  held-out at {args.segments} segments: RMT accuracy {history['rmt_eval_accuracy'][-1]:.3f}, "
                  f"no memory {history['no_memory_eval_accuracy'][-1]:.3f}", flush=True)
        recent = history["rmt_accuracy"][max(stage_start, len(history["rmt_accuracy"]) - 20):]
        learned = len(recent) >= 20 and sum(recent) / len(recent) >= args.advance_at
        if stage + 1 < len(stages) and (learned or step - stage_start >= stage_cap):
            stage, stage_start = stage + 1, step
            history["stages"].append([step, stages[stage]])
            print(f"  curriculum: {stages[stage]} segments from step {step}", flush=True)

    summary = {
        "rmt_accuracy": history["rmt_eval_accuracy"][-1], "no_memory_accuracy": history["no_memory_eval_accuracy"][-1],
        "chance_accuracy": layout.chance_accuracy, "rmt_eval_loss": history["rmt_eval_loss"][-1],
        "no_memory_eval_loss": history["no_memory_eval_loss"][-1],
        **{f"{name}_accuracy_by_{part}": values for name in models
           for part, values in zip(("pair", "query"), accuracy_breakdown(name))},
        "sequence_len": args.segments * seg_len, "segment_len": seg_len,
        "length_in_segments": args.segments, "eval_sequences": args.batch * args.eval_batches,
        "train_seconds": time.perf_counter() - started, "device": f"{device.platform} ({device.device_kind})",
        "command": "python -m experiments rmt_recall " + " ".join(sys.argv[2:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"preset": args.model, "d_model": cfg.d_model, "num_layers": cfg.num_layers,
                  "num_heads": cfg.num_heads, "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size},
        "rmt": {"memory_tokens": rmt_cfg.memory_tokens, "segment_len": rmt_cfg.segment_len,
                "bptt_segments": rmt_cfg.bptt_segments, "write_scale": rmt_cfg.write_scale, "curriculum": stages},
        "history": history,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "rmt_recall.json", args.out / "rmt_recall.png"
    json_path.write_text(json.dumps(summary, indent=1))
    plot(history, layout.chance_accuracy, png_path,
         f"associative recall at {args.segments} x {seg_len} tokens: {args.pairs} pairs, memory {args.memory_tokens}, "
         f"{cfg.d_model}-wide {cfg.num_layers}-layer {cfg.name} backbone, {device.platform}")
    print(f"held-out accuracy at {args.segments * seg_len} tokens ({args.segments} segments): RMT "
          f"{summary['rmt_accuracy']:.3f}, same backbone without memory {summary['no_memory_accuracy']:.3f} "
          f"(chance {layout.chance_accuracy:.3f})")
    for part, order in (("pair", "in sequence order"), ("query", "1st, 2nd, ...")):
        print(f"held-out accuracy by {part} ({order}): RMT {summary[f'rmt_accuracy_by_{part}']}, without memory "
              f"{summary[f'no_memory_accuracy_by_{part}']}")
    print(f"wrote {json_path} and {png_path}")
    return 0
