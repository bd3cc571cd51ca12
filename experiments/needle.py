"""Long-context evaluation: passkey retrieval (needle in a haystack) over lengths x depths, and loss by position.

Writes needle.json, an accuracy heat-map (needle_accuracy.png) and, with --ppl-docs, the loss-by-position table and
its plot (loss_by_position.png)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "python -m experiments needle"


class NeedleError(ValueError):
    """A flag this experiment cannot honour (one line naming the flag)."""


def parse_args(argv):
    from llmjax.io.models import add_model_flags

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Passkey retrieval: for each --lengths x --depths cell, --trials prompts of exactly that many "
        "tokens of filler text with the sentence 'The pass key is NNNNN. Remember it. NNNNN is the pass key.' at that "
        "fractional depth and, at the end, 'What is the pass key? The pass key is'. Scored by greedy generation of the "
        "answer's tokens (correct when the first digits generated are the passkey: the reported accuracy) and, "
        "cheaper, teacher-forced (the argmax at every answer position is the answer token). With --ppl-docs, also "
        "the mean next-token loss by context length over held-out long documents, in log2 buckets (1, 2-3, 4-7, "
        "...): does the loss keep falling with more context? Writes needle.json, needle_accuracy.png (the "
        "heat-map) and loss_by_position.png under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flags(p, "the model to evaluate", "`experiments train`, `sft`, `finetune_lora`...")
    p.add_argument("--lengths", default="1024,2048,4096",
                   help="prompt lengths in tokens, comma-separated; each plus the answer's tokens must fit the "
                        "model's context (max_seq_len)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="where the needle sits in the filler, comma-separated fractions in [0, 1] (0: the start, "
                        "1: just before the question)")
    p.add_argument("--trials", type=int, default=5,
                   help="prompts per cell, each with its own random 5-digit passkey and filler offset")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys and filler offsets")
    p.add_argument("--scoring", choices=("generate", "teacher-forced"), default="generate",
                   help="the reported score: greedy generation (teacher-forced is computed too), or teacher-forced "
                        "only (one forward pass per cell, no decoding)")
    p.add_argument("--filler", type=Path, default=None, metavar="TEXT_FILE",
                   help="the haystack text (default: the default corpus, the Python standard library's source: its "
                        "held-out files first, then its training files)")
    p.add_argument("--ppl-docs", type=int, default=0,
                   help="documents for the loss-by-position table (0: skip it): the default corpus's held-out files "
                        "at least --ppl-length tokens long, then (there are few) its training files, as the output "
                        "says; or --ppl-tokens")
    p.add_argument("--ppl-length", type=int, default=2048,
                   help="tokens read from each --ppl-docs document (only documents at least this long are used); "
                        "positions 1 .. length - 1 are scored, so at most max_seq_len + 1")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="run a RoPE model with max_seq_len N instead of its own (the positions past what it was "
                        "trained on are simply used): how a model does beyond its trained context, before extension")
    p.add_argument("--ppl-tokens", type=Path, default=None, metavar="DIR",
                   help="documents for --ppl-docs from a token shards folder (`experiments tokenize --out DIR`: its "
                        "validation/ split when it has one) instead of the default corpus's held-out files")
    p.add_argument("--ppl-batch", type=int, default=1, help="documents per forward pass of the loss-by-position table")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for needle.json and the PNGs (default: runs/needle/<model name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# --- flags ----------------------------------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
    """--lengths "1024,2048" -> [1024, 2048] (NeedleError naming --lengths)."""
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NeedleError(f"--lengths {text!r}: expected comma-separated whole numbers, e.g. 1024,2048") from None
    if not lengths or any(n < 1 for n in lengths):
        raise NeedleError(f"--lengths {text!r}: give one or more positive token counts, e.g. 1024,2048")
    return lengths


def parse_depths(text: str) -> list[float]:
    """--depths "0,0.5,1" -> [0.0, 0.5, 1.0] (NeedleError naming --depths)."""
    try:
        depths = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NeedleError(f"--depths {text!r}: expected comma-separated fractions in [0, 1], e.g. 0,0.5,1") from None
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if not depths or bad:
        raise NeedleError(f"--depths {text!r}: every depth must be in [0, 1] (0: the start, 1: the end)"
                          + (f"; {bad[0]} is not" if bad else ""))
    return depths


def check_counts(args) -> None:
    for flag, value, least in (("--trials", args.trials, 1), ("--ppl-docs", args.ppl_docs, 0),
                               ("--ppl-batch", args.ppl_batch, 1), ("--ppl-length", args.ppl_length, 2)):
        if value < least:
            raise NeedleError(f"{flag} {value}: must be at least {least}")


def check_lengths(lengths: list[int], overhead: int, answer_tokens: int, max_seq_len: int) -> None:
    """Every length holds the needle and question, and with the answer fits the context (NeedleError naming
    --lengths)."""
    for length in lengths:
        if length < overhead:
            raise NeedleError(f"--lengths {length}: the needle and question alone take {overhead} tokens; "
                              f"give lengths of at least {overhead}")
        if length + answer_tokens > max_seq_len:
            raise NeedleError(f"--lengths {length}: the prompt and its {answer_tokens} answer tokens need "
                              f"{length + answer_tokens} positions, more than the model's context of {max_seq_len} "
                              f"(max_seq_len); give lengths of at most {max_seq_len - answer_tokens}")


# --- the passkey grid -----------------------------------------------------------------------------------------

def filler_tokens(tokenizer, filler: Path | None, longest: int):
    """(token ids of the haystack text, where it came from): --filler, or enough of the default corpus (its held-out
    files first) for the longest prompt."""
    import numpy as np

    from llmjax.long_context import default_filler_text

    if filler is not None:
        try:
            text, source = filler.read_text(encoding="utf-8", errors="replace"), str(filler)
        except OSError as error:
            raise NeedleError(f"--filler {filler}: {error.strerror or error}") from None
    else:
        text, source = default_filler_text(max(400_000, 16 * longest)), "default corpus (validation split first)"
    tokens = np.asarray(tokenizer.encode(text, allowed_special=set()), np.int64)
    if len(tokens) < longest:
        flag = f"--filler {filler}" if filler is not None else "the default corpus"
        raise NeedleError(f"{flag}: {len(tokens)} tokens of filler, fewer than the longest of --lengths ({longest}); "
                          "give a longer --filler text")
    return tokens, source


def cell_prompts(tokenizer, filler, length: int, depth: float, passkeys: list[str], rng) -> list:
    """One NeedlePrompt per passkey, each over the filler from its own random offset."""
    from llmjax.long_context import needle_overhead, needle_prompt

    prompts = []
    for passkey in passkeys:
        room = length - needle_overhead(tokenizer, passkey)
        start = int(rng.integers(0, len(filler) - room + 1))
        prompts.append(needle_prompt(tokenizer, filler[start : start + room], length, depth, passkey))
    return prompts


def run_grid(params, cfg, tokenizer, filler, lengths, depths, passkeys, args) -> list[dict]:
    """Score every (length, depth) cell: [{length, depth, accuracy, teacher_forced_accuracy, trials}]."""
    import numpy as np
    from tqdm import tqdm

    from llmjax.long_context import score_prompts

    rng = np.random.default_rng([args.seed, 1])
    cells = []
    with tqdm(total=len(lengths) * len(depths), desc="needle", unit="cell", disable=args.no_progress) as bar:
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                prompts = cell_prompts(tokenizer, filler, length, depth, passkeys[i][j], rng)
                records = score_prompts(params, cfg, tokenizer, prompts, scoring=args.scoring)
                cells.append({"length": length, "depth": depth,
                              "accuracy": float(np.mean([r["correct"] for r in records])),
                              "teacher_forced_accuracy": float(np.mean([r["teacher_forced"] for r in records])),
                              "trials": records})
                bar.set_postfix(length=length, depth=depth, accuracy=f"{cells[-1]['accuracy']:.2f}")
                bar.update()
    return cells


def accuracy_grid(cells: list[dict], lengths: list[int], depths: list[float], key: str = "accuracy") -> list[list]:
    """[len(lengths)][len(depths)] of the cells' `key`."""
    found = {(c["length"], c["depth"]): c[key] for c in cells}
    return [[found[(length, depth)] for depth in depths] for length in lengths]


def plot_heatmap(grid, lengths, depths, title: str, path: Path) -> None:
    """Accuracy heat-map: lengths down, depths across, each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(grid, float)
    figure, axis = plt.subplots(figsize=(1.3 * len(depths) + 2.5, 0.7 * len(lengths) + 2))
    image = axis.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    axis.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    axis.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    axis.set_xlabel("needle depth (0: start of the context, 1: end)")
    axis.set_ylabel("prompt length (tokens)")
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            axis.text(column, row, f"{values[row, column]:.2f}", ha="center", va="center", fontsize=9)
    figure.colorbar(image, ax=axis, label="passkey accuracy")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- loss by position -----------------------------------------------------------------------------------------

def ppl_documents(tokenizer, count: int, length: int, tokens_dir: Path | None):
    """(tokens [<= count, length]: the first `length` tokens of documents at least that long, where they came from):
    from a shards folder, else the default corpus's held-out files, then its training files (said in the source)."""
    import numpy as np

    if tokens_dir is not None:
        from llmjax.data.shards import TokenShards, TokenShardsError

        folder = tokens_dir / "validation" if (tokens_dir / "validation" / "index.json").is_file() else tokens_dir
        try:
            shards = TokenShards(folder, tokenizer)
        except (TokenShardsError, OSError) as error:
            raise NeedleError(f"--ppl-tokens {tokens_dir}: {error}") from None
        ends = np.append(shards.document_starts[1:], shards.total_tokens)
        long_enough = np.flatnonzero(ends - shards.document_starts >= length)[:count]
        documents = [shards.tokens(int(shards.document_starts[d]), int(shards.document_starts[d]) + length)
                     for d in long_enough]
        source = str(folder)
    else:
        from llmjax.data.corpus import default_corpus_split, read_text

        documents, held_out = [], 0
        for split in ("validation", "train"):  # the held-out files are few: then training files, said so
            for path in sorted(default_corpus_split(split)):
                if len(documents) == count:
                    break
                ids = tokenizer.encode(read_text(path), allowed_special=set())
                if len(ids) >= length:
                    documents.append(ids[:length])
                    held_out += split == "validation"
        source = "default corpus (validation split)"
        if len(documents) > held_out:
            source = (f"default corpus: {held_out} validation-split files, then {len(documents) - held_out} "
                      "training-split files (too few held-out files are that long)")
    if not documents:
        where = f"--ppl-tokens {tokens_dir}" if tokens_dir is not None else "the default corpus"
        raise NeedleError(f"--ppl-length {length}: no document of {where} is that long; give a shorter --ppl-length")
    return np.asarray(documents, np.int32), source


def run_loss_by_position(params, cfg, tokenizer, args) -> dict:
    """The loss-by-position record: documents, per-position mean loss, log2 buckets, whether it keeps falling."""
    import numpy as np
    from tqdm import tqdm

    from llmjax.long_context import loss_by_position, position_buckets

    documents, source = ppl_documents(tokenizer, args.ppl_docs, args.ppl_length, args.ppl_tokens)
    total = np.zeros(args.ppl_length - 1)
    for start in tqdm(range(0, len(documents), args.ppl_batch), desc="loss by position", unit="batch",
                      disable=args.no_progress):
        batch = documents[start : start + args.ppl_batch]
        total += loss_by_position(params, cfg, batch) * len(batch)
    losses = total / len(documents)
    buckets = position_buckets(losses)
    falls = len(buckets) >= 2 and buckets[-1]["mean_loss"] < buckets[-2]["mean_loss"]
    return {"documents": len(documents), "documents_asked": args.ppl_docs, "length": args.ppl_length,
            "source": source, "buckets": buckets, "keeps_falling": bool(falls),
            "per_position": [round(float(x), 5) for x in losses]}


def plot_loss_by_position(record: dict, title: str, path: Path) -> None:
    """Mean loss per log2 bucket of context length (and per position, faint), on a log2 axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(7, 4.2))
    per_position = np.asarray(record["per_position"])
    axis.plot(np.arange(1, len(per_position) + 1), per_position, color="0.8", linewidth=0.6, label="per position")
    buckets = record["buckets"]
    middles = [np.sqrt(b["first"] * b["last"]) for b in buckets]
    axis.plot(middles, [b["mean_loss"] for b in buckets], "o-", color="C0", label="log2 bucket mean")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context length (tokens before the predicted one)")
    axis.set_ylabel("mean next-token loss (nats)")
    axis.set_title(title, fontsize=9)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- the command ----------------------------------------------------------------------------------------------

def print_grid(grid, lengths, depths, scoring: str) -> None:
    print(f"passkey accuracy ({scoring}); rows: length, columns: depth")
    print("length  " + "".join(f"{d:>7g}" for d in depths))
    for length, row in zip(lengths, grid):
        print(f"{length:<8}" + "".join(f"{a:>7.2f}" for a in row))


def print_buckets(record: dict) -> None:
    print(f"loss by position ({record['documents']} documents of {record['length']} tokens, {record['source']})")
    print(f"{'context':>12}  {'positions':>9}  {'mean loss':>9}")
    for b in record["buckets"]:
        span = str(b["first"]) if b["first"] == b["last"] else f"{b['first']}-{b['last']}"
        print(f"{span:>12}  {b['positions']:>9}  {b['mean_loss']:>9.4f}")
    last = record["buckets"][-2:]
    print(f"loss keeps falling with more context: {'yes' if record['keeps_falling'] else 'no'} (the last bucket "
          f"{last[-1]['mean_loss']:.4f} against {last[0]['mean_loss']:.4f} before it)")


def evaluate(args) -> dict:
    """Load the model, run the grid (and the loss table), write JSON and PNGs; the JSON record."""
    import numpy as np

    from llmjax.io.models import load_model_from_flags, model_name_from_flags
    from llmjax.long_context import needle_overhead, random_passkey

    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    check_counts(args)
    if args.ppl_tokens is not None and args.ppl_docs == 0:
        raise NeedleError("--ppl-tokens names documents for the loss-by-position table: give --ppl-docs too")
    model = load_model_from_flags(args)
    params, cfg, tokenizer, name = model.params, model.cfg, model.tokenizer, model_name_from_flags(args)
    if args.max_seq_len is not None:
        if cfg.positions != "rope" or args.max_seq_len < 1:
            raise NeedleError(f"--max-seq-len {args.max_seq_len}: needs a RoPE model (learned positions have a "
                              f"table of max_seq_len={cfg.max_seq_len} rows) and a positive length")
        cfg = cfg.replace(max_seq_len=args.max_seq_len)
    rng = np.random.default_rng([args.seed, 0])
    passkeys = [[[random_passkey(rng) for _ in range(args.trials)] for _ in depths] for _ in lengths]
    every = [key for row in passkeys for cell in row for key in cell]
    answer_tokens = max(len(tokenizer.encode(" " + key, allowed_special=set())) for key in every)
    check_lengths(lengths, max(needle_overhead(tokenizer, key) for key in every), answer_tokens, cfg.max_seq_len)
    if args.ppl_docs and args.ppl_length - 1 > cfg.max_seq_len:
        raise NeedleError(f"--ppl-length {args.ppl_length}: scores {args.ppl_length - 1} positions, more than the "
                          f"model's context of {cfg.max_seq_len} (max_seq_len); give at most {cfg.max_seq_len + 1}")
    filler, filler_source = filler_tokens(tokenizer, args.filler, max(lengths))
    out = args.out or Path("runs") / "needle" / name
    out.mkdir(parents=True, exist_ok=True)

    cells = run_grid(params, cfg, tokenizer, filler, lengths, depths, passkeys, args)
    grid = accuracy_grid(cells, lengths, depths)
    scoring_note = ("greedy generation of the answer's tokens; correct when the first digits are the passkey"
                    if args.scoring == "generate" else
                    "teacher-forced: the argmax at every answer position is the answer token")
    result = {"model": name, "source": str(model.source) if model.source is not None else None,
              "max_seq_len": cfg.max_seq_len, "scoring": args.scoring, "scoring_note": scoring_note,
              "lengths": lengths, "depths": depths, "trials": args.trials, "seed": args.seed, "filler": filler_source,
              "accuracy": grid, "teacher_forced_accuracy": accuracy_grid(cells, lengths, depths,
                                                                          "teacher_forced_accuracy"),
              "overall_accuracy": float(np.mean(grid)), "cells": cells,
              "files": {"json": str(out / "needle.json"), "heatmap": str(out / "needle_accuracy.png")}}
    print_grid(grid, lengths, depths, args.scoring)
    plot_heatmap(grid, lengths, depths, f"passkey retrieval: {name} ({args.scoring}, {args.trials} trials a cell)",
                 out / "needle_accuracy.png")
    if args.ppl_docs:
        record = run_loss_by_position(params, cfg, tokenizer, args)
        result["loss_by_position"] = record
        result["files"]["loss_by_position"] = str(out / "loss_by_position.png")
        print_buckets(record)
        plot_loss_by_position(record, f"loss by context length: {name} ({record['documents']} documents)",
                              out / "loss_by_position.png")
    (out / "needle.json").write_text(json.dumps(result, indent=1))
    print("wrote " + ", ".join(result["files"].values()))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmjax.infer.generate import GenerationError
    from llmjax.io.models import ModelLoadError
    from llmjax.long_context import LongContextError

    try:
        evaluate(args)
    except (NeedleError, LongContextError, ModelLoadError, GenerationError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    return 0
