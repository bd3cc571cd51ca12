"""Speculative decoding: tokens/s of the target alone vs target + a draft a tenth its size, acceptance and speed-up over k."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# llama-1b's width cut to 2 layers with a narrower MLP: 91M parameters, 1/10.7 of llama-1b (byte vocabulary). At batch 1
# a draft step costs about a fixed time per layer (launches, small kernels), so few wide layers beat many narrow ones.
DEFAULT_DRAFT, DEFAULT_DRAFT_SET = "llama-1b", ["num_layers=2", "d_ff=5632"]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_speculative",
        description="Train a target and a draft model on the same bytes of the default corpus (the Python standard "
        "library, byte tokenizer: 257 ids, so both presets get vocab_size=257), then decode held-out prompts at batch "
        "1 with the target alone (`generate`) and with speculative decoding (`speculative_generate`) for each k, in "
        "one run: tokens/s, speed-up, acceptance rate, tokens per target pass, and whether the outputs are identical "
        "(greedy). Writes a table, JSON and a PNG of speed-up and acceptance vs k.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="llama-1b", help="target model preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a target ModelConfig field (repeatable)")
    p.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model preset")
    p.add_argument("--draft-set", action="append", default=None, metavar="FIELD=VALUE",
                   help=f"override a draft ModelConfig field (repeatable; default {' '.join(DEFAULT_DRAFT_SET)}, "
                        "which makes llama-1b's width 2 layers deep, a tenth of llama-1b)")
    p.add_argument("--compare-draft", action="append", default=[], metavar="PRESET[:FIELD=VALUE,...]",
                   help="another draft, trained the same way and measured at the first k (and alone) in the same run, "
                        "e.g. llama-350m:num_layers=8 (repeatable)")
    p.add_argument("--train-steps", type=int, default=300,
                   help="optimizer steps for each model before measuring (0: random weights, low acceptance)")
    p.add_argument("--train-batch", type=int, default=16, help="sequences per training step")
    p.add_argument("--train-seq", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=6e-4, help="target's peak learning rate (AdamW, warmup, cosine)")
    p.add_argument("--draft-lr", type=float, default=1e-3, help="draft's peak learning rate")
    p.add_argument("--warmup", type=int, default=30, help="warmup steps of both models")
    p.add_argument("--corpus-mb", type=float, default=32.0, help="MB of the standard library's training files read")
    p.add_argument("--ks", default="2,4,6", help="draft tokens per round to measure, comma-separated")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts (one per validation file), decoded one by one")
    p.add_argument("--prompt-len", type=int, default=128, help="bytes per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per prompt (no EOS stop)")
    p.add_argument("--sampled-temperature", type=float, default=0.0,
                   help="> 0: after the greedy sweep, also time the target alone and the best k at this temperature "
                        "(plain sampling; outputs differ from the target's by design, the distribution does not)")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="skip the remaining stages (further k, draft alone, sampled) once this many seconds have "
                        "passed since the models were trained (0: no limit)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the prompts (the median is reported)")
    p.add_argument("--decode-impl", default="auto", choices=["auto", "xla", "pallas"], help="decode attention core")
    p.add_argument("--seed", type=int, default=0, help="seed of the initializations and the batch order")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")) / "bench_speculative.json")
    return p.parse_args(argv)


def parse_draft(spec: str, vocab: int):
    """"PRESET[:FIELD=VALUE,...]" -> (label, overrides, ModelConfig at the byte vocabulary)."""
    from llmjax.experiments.train import parse_overrides
    from llmjax.config import get_config

    preset, _, fields = spec.partition(":")
    overrides = [field for field in fields.split(",") if field]
    label = f"{preset} ({' '.join(overrides)})" if overrides else preset
    return label, overrides, get_config(preset, **{"vocab_size": vocab, **parse_overrides(overrides)})


# --- data ---------------------------------------------------------------------------------------

def corpus_tokens(split: str, max_bytes: int, separator: int):
    """The default corpus's `split` files as byte ids (the byte tokenizer's encoding) joined by `separator`,
    about max_bytes of them: (tokens [n] int32, file spans [(start, stop)])."""
    import numpy as np

    from llmjax.data.corpus import default_corpus_split, read_bytes

    pieces, spans, size = [], [], 0
    for path in default_corpus_split(split):
        data = np.frombuffer(read_bytes(path), np.uint8).astype(np.int32)  # = ByteTokenizer.encode of the text
        spans.append((size, size + len(data)))
        pieces += [data, np.array([separator], np.int32)]
        size += len(data) + 1
        if size >= max_bytes:
            break
    return np.concatenate(pieces), spans


def spread_prompts(stream, count: int, length: int) -> list[list[int]] | None:
    """`count` prompts of `length` ids spread evenly over a token stream, each from a line start (None when the
    stream is too short for them)."""
    if len(stream) < 4 * count * length:
        return None
    prompts, stride = [], len(stream) // count
    for index in range(count):
        begin = index * stride + stride // 3
        while begin < (index + 1) * stride - 2 * length and stream[begin - 1] != ord("\n"):
            begin += 1
        prompts.append(stream[begin: begin + length].tolist())
    return prompts


# --- training -----------------------------------------------------------------------------------

def train_model(cfg, source, steps: int, batch: int, seq: int, lr: float, warmup: int, seed: int, label: str):
    """`steps` AdamW steps of llmjax.train.step on batches of `source` -> (params, summary)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llmjax.config import TrainConfig
    from llmjax.data.loader import batch_at
    from llmjax.train.step import init_train_state, make_train_step, windows_to_batch

    train_cfg = TrainConfig(lr=lr, warmup_steps=min(warmup, steps), total_steps=steps)
    state = init_train_state(cfg, train_cfg, jax.random.key(seed))
    if steps == 0:
        return state.params, {"steps": 0}
    step_fn = make_train_step(cfg, train_cfg)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        windows = batch_at(source, step, batch_size=batch, seq_len=seq, seed=seed)
        state, metrics = step_fn(state, windows_to_batch(jnp.asarray(windows)))
        losses.append(metrics["loss"])
        if step == 0:
            jax.block_until_ready(state)
            compiled = time.perf_counter()
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            print(f"  {label} step {step + 1:>4}: loss {float(losses[-1]):.3f} nats/byte", flush=True)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - compiled
    losses = [float(x) for x in losses]
    summary = {"steps": steps, "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])),
               "ms_per_step": 1e3 * seconds / max(1, steps - 1), "compile_s": compiled - started}
    return state.params, summary


# --- timing -------------------------------------------------------------------------------------

def timed_passes(run, prompts, repeats: int):
    """Warm-up (compiles), then `repeats` timed passes of run(prompt) over the prompts, one prompt at a time.
    Returns (outputs of the last pass, median seconds per pass, compile + first pass seconds)."""
    import jax

    started = time.perf_counter()
    outputs = [run(prompt) for prompt in prompts]
    warm_up = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = [run(prompt) for prompt in prompts]
        jax.effects_barrier()
        times.append(time.perf_counter() - started)
    return outputs, statistics.median(times), warm_up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from llmjax.experiments.train import parse_overrides
    from llmjax.config import ConfigError, count_params, get_config
    from llmjax.data.loader import ArrayTokens
    from llmjax.infer.generate import generate
    from llmjax.infer.sampling import SamplingConfig
    from llmjax.infer.speculative import _prepare_jit, speculative_generate
    from llmjax.tokenizer.bytes import BYTE_VOCAB

    vocab, separator = BYTE_VOCAB + 1, BYTE_VOCAB  # the byte tokenizer: 256 bytes + <|endoftext|>
    try:
        ks = [int(k) for k in args.ks.split(",") if k]
        target_cfg = get_config(args.model, **{"vocab_size": vocab, **parse_overrides(args.set)})
        draft_cfg = get_config(args.draft, **{"vocab_size": vocab,
                                              **parse_overrides(args.draft_set or DEFAULT_DRAFT_SET)})
        compared = [parse_draft(spec, vocab) for spec in args.compare_draft]  # [(label, overrides, cfg)]
    except (ConfigError, ValueError) as error:
        raise SystemExit(f"bench_speculative: {error}") from None
    if not ks or min(ks) < 1:
        raise SystemExit(f"bench_speculative: --ks {args.ks!r}: give draft lengths >= 1, e.g. 2,4,6")
    device = jax.devices()[0]
    results = {
        "device": device.device_kind, "target": target_cfg.name, "draft": draft_cfg.name,
        "target_params": count_params(target_cfg), "draft_params": count_params(draft_cfg),
        "draft_overrides": args.draft_set or DEFAULT_DRAFT_SET, "target_overrides": args.set,
        "vocab": vocab, "prompts": args.prompts, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "rows": [],
    }
    print(f"device {device.device_kind}; target {target_cfg.name} {results['target_params'] / 1e6:.0f}M params, draft "
          f"{draft_cfg.name} ({' '.join(results['draft_overrides'])}) {results['draft_params'] / 1e6:.0f}M params "
          f"({results['target_params'] / results['draft_params']:.1f}x smaller), byte vocabulary", flush=True)

    # Prompts: the validation split's files (never trained on); when the machine's standard library has too few,
    # the tail of the training files read, which the training windows never reach.
    reserve = 4 * args.prompts * args.prompt_len
    tokens, spans = corpus_tokens("train", int(args.corpus_mb * 2**20) + reserve, separator)
    prompts = spread_prompts(corpus_tokens("validation", 1 << 62, separator)[0], args.prompts, args.prompt_len)
    results["prompt_source"] = "validation split"
    if prompts is None:
        prompts = spread_prompts(tokens[-reserve:], args.prompts, args.prompt_len)
        tokens, results["prompt_source"] = tokens[:-reserve], "held-out tail of the training files"
    if prompts is None or len(tokens) < 2 * args.train_seq:
        raise SystemExit(f"bench_speculative: the standard library here has only {len(tokens):,} bytes of .py files; "
                         f"ask for fewer --prompts, a shorter --prompt-len or --train-seq")
    source = ArrayTokens(tokens)
    results["corpus_bytes"], results["corpus_files"] = len(tokens), len(spans)
    print(f"training on {len(tokens) / 2**20:.1f}M bytes ({len(spans)} files) of the standard library, "
          f"{args.train_steps} steps of {args.train_batch} x {args.train_seq}; prompts from the "
          f"{results['prompt_source']}", flush=True)
    target_params, results["target_training"] = train_model(
        target_cfg, source, args.train_steps, args.train_batch, args.train_seq, args.lr, args.warmup, args.seed, "target")
    draft_params, results["draft_training"] = train_model(
        draft_cfg, source, args.train_steps, args.train_batch, args.train_seq, args.draft_lr, args.warmup, args.seed,
        "draft")
    target_prepared, draft_prepared = _prepare_jit(target_params, target_cfg), _prepare_jit(draft_params, draft_cfg)
    del target_params, draft_params
    others = []  # (label, cfg, prepared) of the compared drafts
    results["compared_drafts"] = []
    for label, overrides, cfg in compared:
        params, training = train_model(cfg, source, args.train_steps, args.train_batch, args.train_seq, args.draft_lr,
                                       args.warmup, args.seed, label)
        others.append((label, cfg, _prepare_jit(params, cfg)))
        results["compared_drafts"].append({"label": label, "draft": cfg.name, "draft_overrides": overrides,
                                           "draft_params": count_params(cfg), "draft_training": training})
        del params

    new = args.max_new_tokens
    started = time.perf_counter()

    def in_time(stage: str) -> bool:
        if args.deadline_s and time.perf_counter() - started > args.deadline_s:
            print(f"skipped {stage}: past --deadline-s {args.deadline_s:.0f}", flush=True)
            results.setdefault("skipped", []).append(stage)
            return False
        return True

    def plain(cfg, prepared, sampling):
        return lambda prompt: generate(None, cfg, [prompt], max_new_tokens=new, sampling=sampling,
                                       decode_impl=args.decode_impl, prepared=prepared).tokens[0]

    def write():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    def alone(label, cfg, prepared, sampling, baseline_s=None):
        outputs, seconds, warm_up = timed_passes(plain(cfg, prepared, sampling), prompts, args.repeats)
        tokens_per_s = sum(map(len, outputs)) / seconds
        row = {"config": label, "k": 0, "temperature": sampling.temperature, "tokens_per_s": tokens_per_s,
               "speedup": 1.0 if baseline_s is None else baseline_s / seconds, "seconds": seconds, "warm_up_s": warm_up}
        results["rows"].append(row)
        print(f"{label} (temperature {sampling.temperature}): {tokens_per_s:8.1f} tokens/s "
              f"({1e3 / tokens_per_s:.3f} ms/token)", flush=True)
        write()
        return outputs, row

    def speculative(k, sampling, reference, baseline, draft=("draft", draft_cfg, draft_prepared)):
        stats = []
        label, cfg, prepared = draft
        config = "target + draft" if label == "draft" else f"target + {label}"

        def run(prompt):
            out = speculative_generate(None, target_cfg, None, cfg, [prompt], k=k, max_new_tokens=new,
                                       sampling=sampling, decode_impl=args.decode_impl,
                                       target_prepared=target_prepared, draft_prepared=prepared)
            stats.append(out.stats)
            return out.tokens[0]

        try:
            outputs, seconds, warm_up = timed_passes(run, prompts, args.repeats)
        except Exception as error:  # noqa: BLE001  (record the failure, go on with the other points)
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            print(f"k={k}: failed ({message})", flush=True)
            results["rows"].append({"config": config, "k": k, "temperature": sampling.temperature, "error": message})
            write()
            return None
        last = stats[-len(prompts):]
        tokens_per_s = sum(map(len, outputs)) / seconds
        greedy = sampling.temperature == 0
        row = {"config": config, "k": k, "temperature": sampling.temperature, "tokens_per_s": tokens_per_s,
               "speedup": tokens_per_s / baseline["tokens_per_s"], "seconds": seconds, "warm_up_s": warm_up,
               "acceptance_rate": sum(s.accepted for s in last) / sum(s.drafted for s in last),
               "tokens_per_target_call": sum(s.generated for s in last) / sum(s.target_calls for s in last),
               "identical": outputs == reference if greedy else None,
               "identical_prompts": sum(a == b for a, b in zip(outputs, reference)) if greedy else None,
               "first_difference": [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                    for a, b in zip(outputs, reference)] if greedy else None}
        results["rows"].append(row)
        print(f"{config} k={k} (temperature {sampling.temperature}): {tokens_per_s:8.1f} tokens/s, "
              f"{row['speedup']:.2f}x, "
              f"acceptance {row['acceptance_rate']:.3f}, {row['tokens_per_target_call']:.2f} tokens per target pass"
              + (f", identical outputs: {row['identical_prompts']}/{len(prompts)}" if greedy else ""), flush=True)
        write()
        return row

    greedy = SamplingConfig.greedy()
    reference, baseline = alone("target alone", target_cfg, target_prepared, greedy)
    swept = []
    for index, k in enumerate(ks):
        if index == 0 or in_time(f"k={k}"):
            swept.append(speculative(k, greedy, reference, baseline))
    if in_time("draft alone"):  # what a draft pass costs against a target pass
        alone("draft alone", draft_cfg, draft_prepared, greedy, baseline["seconds"])
    for other in others:  # the compared drafts at the first k, then alone
        if in_time(f"{other[0]} k={ks[0]}"):
            speculative(ks[0], greedy, reference, baseline, draft=other)
        if in_time(f"{other[0]} alone"):
            alone(f"{other[0]} alone", other[1], other[2], greedy, baseline["seconds"])
    measured = [row for row in swept if row is not None]  # the main draft's points
    if args.sampled_temperature > 0 and measured and in_time("sampled"):
        best = max(measured, key=lambda row: row["speedup"])["k"]
        sampled = SamplingConfig(temperature=args.sampled_temperature, seed=args.seed)
        reference, baseline = alone("target alone", target_cfg, target_prepared, sampled)
        speculative(best, sampled, reference, baseline)
    print_table(results)
    png = plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0


def print_table(results: dict) -> None:
    print(f"\n{results['target']} ({results['target_params'] / 1e6:.0f}M) + draft {results['draft']} "
          f"({results['draft_params'] / 1e6:.0f}M) on {results['device']}, batch 1, {results['prompts']} prompts x "
          f"{results['max_new_tokens']} new tokens")
    trainings = [("target", results.get("target_training", {})), ("draft", results.get("draft_training", {}))]
    for other in results.get("compared_drafts", []):
        trainings.append((f"{other['label']} ({other['draft_params'] / 1e6:.0f}M)", other["draft_training"]))
    for role, t in trainings:
        if t.get("steps"):
            print(f"{role}: {t['steps']} training steps, loss {t['first_loss']:.3f} -> {t['final_loss']:.3f} nats/byte")
    print("| decoding | temperature | k | tokens/s | speed-up | acceptance | tokens / target pass | identical outputs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results["rows"]:
        head = f"| {r['config']} | {r['temperature']:g} | {r['k'] or '-'} |"
        if "error" in r:
            print(f"{head} failed: {r['error']} | | | | |")
        elif r["k"] == 0:
            print(f"{head} {r['tokens_per_s']:,.1f} | {r['speedup']:.2f}x | - | - | - |")
        else:
            same = "-" if r["identical"] is None else f"{r['identical_prompts']}/{results['prompts']}"
            print(f"{head} {r['tokens_per_s']:,.1f} | {r['speedup']:.2f}x | {r['acceptance_rate']:.3f} "
                  f"| {r['tokens_per_target_call']:.2f} | {same} |")


def plot(results: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in results["rows"]
                   if r["config"] == "target + draft" and r["temperature"] == 0 and "error" not in r),
                  key=lambda r: r["k"])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["speedup"] for r in rows], "o-", label="speed-up (tokens/s vs target alone)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("draft tokens per round (k)")
    ax.set_ylabel("speed-up")
    twin = ax.twinx()
    twin.plot(ks, [r["acceptance_rate"] for r in rows], "s--", color="tab:orange", label="acceptance rate")
    twin.set_ylabel("acceptance rate")
    twin.set_ylim(0, 1)
    ax.set_xticks(ks)
    draft = f"{results['draft']} ({' '.join(results['draft_overrides'])})" if results["draft_overrides"] else results["draft"]
    ax.set_title(f"{results['target']} + draft {draft}, {results['device']}", fontsize=10)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
