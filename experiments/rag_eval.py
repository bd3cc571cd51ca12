"""RAG evaluations (held-out loss with / without neighbours, docstring QA) and a retrieval-augmented LM's rows.

`loss`: held-out LM loss with and without retrieved neighbours; `qa`: docstring QA exact match; `rows`: the training
rows of a retrieval-augmented LM, built the way `loss` builds its rows.

    python -m experiments rag_eval loss --index runs/rag/stdlib --ckpt runs/llama-125m-stdlib --out runs/rag_eval/loss
    python -m experiments rag_eval loss --index runs/rag/stdlib --gguf smollm2-135m-instruct --validation-fraction 0.1
    python -m experiments rag_eval qa --index runs/rag/stdlib --gguf smollm2-135m-instruct --out runs/rag_eval/qa
    python -m experiments rag_eval rows --index runs/rag/stdlib --tokenizer TOKENIZER.json --out runs/tokens/rag

The measures are `llmjax.retrieval.rag_eval` (its docstring says exactly what is scored).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from llmjax.experiments.rag import add_generator_flags, add_store_flags, generator_name, load_generator, load_store, \
    run_command

PROG = "python -m experiments rag_eval"


# --- loss ----------------------------------------------------------------------------------------------------------

def check_positive(**flags) -> None:
    from llmjax.retrieval.rag import RagError

    for name, value in flags.items():
        if value is not None and value < 1:
            raise RagError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def loss_command(args) -> dict:
    from llmjax.retrieval.rag_eval import heldout_documents, loss_targets, rag_loss_eval

    check_positive(k=args.k, context=args.context, target=args.target, neighbour_tokens=args.neighbour_tokens,
                   query_tokens=args.query_tokens, per_file=args.per_file, max_targets=args.max_targets,
                   batch_size=args.batch_size)
    documents = heldout_documents(None if args.data == "stdlib" else args.data, args.validation_fraction)
    store, encoder = load_store(args)
    model = load_generator(args)
    targets = loss_targets(documents, model.tokenizer, context=args.context, target=args.target,
                           per_file=args.per_file, total=args.max_targets)
    neighbour_tokens = args.neighbour_tokens if args.neighbour_tokens is not None else args.context // 2
    record = rag_loss_eval(store, encoder, model.params, model.cfg, model.tokenizer, targets, k=args.k,
                           context=args.context, neighbour_tokens=neighbour_tokens, query_tokens=args.query_tokens,
                           batch_size=args.batch_size, neighbour_text=args.neighbours,
                           progress=not args.no_progress)
    name = generator_name(args)
    out = args.out or Path("runs") / "rag_eval" / f"loss-{name}"
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": name, "index": str(args.index), "encoder": encoder.name, "data": args.data, "k": args.k,
              "context": args.context, "target": args.target, "neighbour_tokens": neighbour_tokens,
              "query_tokens": args.query_tokens, "neighbours": args.neighbours,
              "validation_fraction": args.validation_fraction, "held_out_documents": len(documents), **record,
              "figure_reached": record["delta"] >= 0.15,
              "files_written": {"json": str(out / "rag_loss.json"), "png": str(out / "rag_loss.png")}}
    print_loss_table(record)
    plot_loss(record, out / "rag_loss.png")
    (out / "rag_loss.json").write_text(json.dumps(record, indent=1))
    print("wrote " + ", ".join(record["files_written"].values()))
    return record


def print_loss_table(record: dict) -> None:
    print(f"held-out target loss (nats/token), {record['targets']} targets of {record['target']} tokens in "
          f"{record['files']} files (of {record['held_out_documents']} held-out files: validation fraction "
          f"{record['validation_fraction']}), context {record['context']} tokens (RAG: <= "
          f"{record['neighbour_tokens']} of {record['k']} neighbours + preceding text)")
    print(f"{'position':>10}  {'baseline':>9}  {'RAG':>9}  {'delta':>7}")
    for b in record["buckets"]:
        span = str(b["first"]) if b["first"] == b["last"] else f"{b['first']}-{b['last']}"
        print(f"{span:>10}  {b['baseline']:>9.4f}  {b['rag']:>9.4f}  {b['delta']:>+7.4f}")
    print(f"{'all':>10}  {record['baseline']:>9.4f}  {record['rag']:>9.4f}  {record['delta']:>+7.4f}   "
          f"(the figure: RAG lower by >= 0.15: {'yes' if record['figure_reached'] else 'no'})")


def plot_loss(record: dict, path: Path) -> None:
    """Mean loss per position bucket of the target chunk, with and without neighbours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(7, 4.2))
    middles = [np.sqrt(b["first"] * b["last"]) for b in record["buckets"]]
    axis.plot(middles, [b["baseline"] for b in record["buckets"]], "o-",
              label=f"no retrieval ({record['baseline']:.3f})")
    axis.plot(middles, [b["rag"] for b in record["buckets"]], "s-", label=f"RAG, k={record['k']} ({record['rag']:.3f})")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("position in the target chunk (log2 buckets)")
    axis.set_ylabel("mean next-token loss (nats)")
    axis.set_title(f"held-out loss at equal context ({record['context']} tokens): {record['model']}", fontsize=9)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- rows ----------------------------------------------------------------------------------------------------------

def rows_command(args) -> dict:
    from llmjax.data.shards import TokenShardsError, write_rows
    from llmjax.retrieval.rag import RagError
    from llmjax.retrieval.rag_eval import heldout_documents, loss_targets, rag_training_rows
    from llmjax.tokenizer import TokenizerError, load_tokenizer

    check_positive(k=args.k, context=args.context, target=args.target, neighbour_tokens=args.neighbour_tokens,
                   query_tokens=args.query_tokens, per_file=args.per_file, max_targets=args.max_targets,
                   batch_size=args.batch_size)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except TokenizerError as error:
        raise RagError(f"--tokenizer {args.tokenizer}: {error}") from None
    if (args.out / "train").exists() and any((args.out / "train").iterdir()) and not args.overwrite:
        raise RagError(f"{args.out / 'train'} already exists and is not empty; pass --overwrite to replace it")
    documents = heldout_documents(None if args.data == "stdlib" else args.data, args.validation_fraction,
                                  split="train")
    store, encoder = load_store(args)
    targets = loss_targets(documents, tokenizer, context=args.context, target=args.target, per_file=args.per_file,
                           total=args.max_targets)
    neighbour_tokens = args.neighbour_tokens if args.neighbour_tokens is not None else args.context // 2
    rows = rag_training_rows(store, encoder, tokenizer, targets, k=args.k, context=args.context,
                             neighbour_tokens=neighbour_tokens, query_tokens=args.query_tokens,
                             batch_size=args.batch_size, neighbour_text=args.neighbours, progress=not args.no_progress)
    try:
        folder = write_rows(rows, tokenizer, args.out / "train", overwrite=args.overwrite,
                            tokenizer_source=str(args.tokenizer))
    except TokenShardsError as error:
        raise RagError(str(error)) from None
    if Path(args.tokenizer).is_file():  # beside the shards, where `experiments train --data OUT` looks first
        shutil.copyfile(args.tokenizer, args.out / "tokenizer.json")
    record = {"index": str(args.index), "encoder": encoder.name, "tokenizer": str(args.tokenizer), "data": args.data,
              "training_documents": len(documents), "targets": len(targets),
              "files": len({t.file for t in targets}), "rows": len(rows), "row_length": int(rows.shape[1]),
              "k": args.k, "context": args.context, "target": args.target, "neighbour_tokens": neighbour_tokens,
              "neighbours": args.neighbours, "out": str(folder)}
    (args.out / "rows.json").write_text(json.dumps(record, indent=1))
    print(f"{len(rows):,} rows of {rows.shape[1]} tokens (each of {len(targets):,} targets from "
          f"{record['files']:,} training files: without and with {args.k} neighbours) in {folder}; train on them "
          f"with `python -m experiments train --data {args.out} --seq {rows.shape[1] - 1}`")
    return record


# --- qa ------------------------------------------------------------------------------------------------------------

def qa_command(args) -> dict:
    from llmjax.retrieval.rag_eval import qa_eval, qa_history, read_questions, stdlib_questions, write_questions

    check_positive(k=args.k, count=args.count, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    qa_history(args.shots)  # a bad --shots fails here, before any model loads
    store, encoder = load_store(args)
    model = load_generator(args)
    questions = read_questions(args.questions) if args.questions is not None else stdlib_questions(args.count)
    name = generator_name(args)
    out = args.out or Path("runs") / "rag_eval" / f"qa-{name}"
    out.mkdir(parents=True, exist_ok=True)
    write_questions(out / "questions.jsonl", questions)
    result = qa_eval(store, encoder, model, questions, k=args.k, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, shots=args.shots, prefill=args.prefill,
                     progress=not args.no_progress)
    summary = result["summary"]
    record = {"model": name, "index": str(args.index), "encoder": encoder.name, "k": args.k,
              "questions_file": str(out / "questions.jsonl"), **summary, "prompts": result["prompts"],
              "records": result["records"],
              "files_written": {"json": str(out / "rag_qa.json"), "png": str(out / "rag_qa.png"),
                                "questions": str(out / "questions.jsonl")}}
    print(f"{summary['questions']} questions ({name}, greedy, k={args.k}, {args.shots} demonstrations, reply "
          f"prefilled with {args.prefill!r}; exact match: the reply's first dotted name):")
    print(f"{'':>18}  {'exact match':>11}  {'name mentioned':>14}  {'function named':>14}")
    for mode in ("without", "with"):
        exact, mentioned, function = (summary[f"{mode}_{key}"] for key in ("exact_match", "mentioned", "function"))
        print(f"{mode + ' retrieval':>18}  {exact:>11.3f}  {mentioned:>14.3f}  {function:>14.3f}")
    if "answer_file_retrieved" in summary:
        print(f"the answer's file among the retrieved chunks: {summary['answer_file_retrieved']:.3f}")
    plot_qa(record, out / "rag_qa.png")
    (out / "rag_qa.json").write_text(json.dumps(record, indent=1))
    print("wrote " + ", ".join(record["files_written"].values()))
    return record


def plot_qa(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(6, 4))
    places = np.arange(3)
    for shift, (mode, label) in zip((-0.2, 0.2), (("without", "no retrieval"), ("with", f"RAG, k={record['k']}"))):
        values = [record[f"{mode}_exact_match"], record[f"{mode}_mentioned"], record[f"{mode}_function"]]
        axis.bar(places + shift, values, 0.4, label=label)
    axis.set_xticks(places, ["exact match", "module.function\nmentioned", "function name\nmentioned"])
    axis.set_ylim(0, 1)
    axis.set_ylabel("rate")
    axis.set_title(f"stdlib docstring QA ({record['questions']} questions): {record['model']}", fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- the command ---------------------------------------------------------------------------------------------------

def add_window_flags(parser, context: int) -> None:
    """How a target's two rows are made (the same for `loss` and `rows`)."""
    parser.add_argument("--context", type=int, default=context, help="tokens before every target, in both rows")
    parser.add_argument("--target", type=int, default=64, help="tokens of each target chunk (the only ones scored)")
    parser.add_argument("--neighbour-tokens", type=int, default=None,
                        help="the most tokens of neighbours in the RAG row (default: half of --context)")
    parser.add_argument("--query-tokens", type=int, default=128,
                        help="the preceding text's last tokens (decoded) that retrieve the neighbours")
    parser.add_argument("--neighbours", choices=("chunk", "continuation"), default="continuation",
                        help="what a neighbour is: the retrieved chunk, or the chunk followed by the next chunk of its "
                             "file (RETRO's neighbour + continuation), each cut to the room left")


def parse_args(argv):
    from llmjax.data.corpus import VALIDATION_FRACTION
    from llmjax.retrieval.rag_eval import QA_PREFILL

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate retrieval-augmented generation. `loss`: for target chunks of the corpus's held-out "
        "files (its validation split, by a hash of the path), the language model's mean loss on the target's "
        "tokens after --context tokens of preceding text (baseline), and after the same number of tokens made of "
        "the k chunks retrieved by the preceding text (the held-out file's own chunks excluded) followed by the "
        "rest of the preceding text (RAG); per position bucket, as a table, rag_loss.json and rag_loss.png. `qa`: "
        "'Which standard-library function has this docstring?' questions (answer: module.function), answered "
        "greedily with and without retrieval after the same few-shot demonstrations (functions outside the question "
        "set) with the reply prefilled, the retrieved chunks labelled with their module; exact-match rates of the "
        "reply's first dotted name (and, more lenient, whether module.function or just the function's name appears "
        "in the answer) in rag_qa.json and rag_qa.png, the questions in questions.jsonl. `rows`: the same two rows "
        "(without and with neighbours) for target chunks of the corpus's training files, written as token shards of "
        "whole rows (OUT/train) that `experiments train --seq ROW_LENGTH-1` reads one row per example: a "
        "retrieval-augmented LM's training data.")
    commands = p.add_subparsers(dest="command", required=True)

    loss = commands.add_parser("loss", help="held-out LM loss with and without neighbours",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_store_flags(loss)
    add_generator_flags(loss)
    loss.add_argument("--data", default="stdlib", help="the corpus whose held-out files are scored: stdlib or a path")
    loss.add_argument("--validation-fraction", type=float, default=VALIDATION_FRACTION,
                      help="the fraction of the corpus's files held out (chosen by a hash of each path) whose targets "
                           "are scored; the default is the split training uses: keep it for a checkpoint trained on "
                           "the training split, raise it (e.g. 0.1) for a model that never saw the split (SmolLM2)")
    add_window_flags(loss, context=512)
    loss.add_argument("--per-file", type=int, default=8, help="target chunks per held-out file (evenly spread)")
    loss.add_argument("--max-targets", type=int, default=256, help="target chunks in all")
    loss.add_argument("--batch-size", type=int, default=8, help="targets per forward pass (two rows each)")
    loss.add_argument("--out", type=Path, default=None, help="folder for rag_loss.json and rag_loss.png "
                                                             "(default: runs/rag_eval/loss-<model>)")
    loss.add_argument("--no-progress", action="store_true", help="no progress bar")

    rows = commands.add_parser("rows", help="training rows without and with neighbours, as whole-row token shards",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_store_flags(rows)
    rows.add_argument("--tokenizer", required=True, help="the language model's tokenizer (a tokenizer file, or "
                      "a name `experiments tokenize --tokenizer` takes)")
    rows.add_argument("--data", default="stdlib", help="the corpus whose training files give the rows: stdlib or "
                      "a path")
    rows.add_argument("--validation-fraction", type=float, default=VALIDATION_FRACTION,
                      help="the fraction of files held out (as `loss` holds them out): the rows come from the rest")
    add_window_flags(rows, context=448)
    rows.add_argument("--per-file", type=int, default=64, help="target chunks per training file (evenly spread)")
    rows.add_argument("--max-targets", type=int, default=50_000, help="target chunks in all (two rows each)")
    rows.add_argument("--batch-size", type=int, default=64, help="targets retrieved for at once")
    rows.add_argument("--out", type=Path, required=True, help="folder for train/ (the shards), rows.json and a copy of "
                      "the tokenizer file")
    rows.add_argument("--overwrite", action="store_true", help="replace OUT/train")
    rows.add_argument("--no-progress", action="store_true", help="no progress bar")

    qa = commands.add_parser("qa", help="docstring -> function-name questions, with and without retrieval",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_store_flags(qa)
    add_generator_flags(qa)
    qa.add_argument("--questions", type=Path, default=None,
                    help="a JSONL question set (question, answer; docstring: what retrieves) instead of the standard "
                         "library's (made afresh, deterministically: --count of them)")
    qa.add_argument("--count", type=int, default=100, help="questions made from the standard library")
    qa.add_argument("--shots", type=int, default=2,
                    help="solved demonstrations (fixed functions never in the question set) before every question, "
                         "in both conditions (0: none)")
    qa.add_argument("--prefill", default=QA_PREFILL,
                    help="the text the assistant's reply starts with (in both conditions; '' for none)")
    qa.add_argument("--max-new-tokens", type=int, default=24, help="the most tokens of an answer")
    qa.add_argument("--batch-size", type=int, default=32,
                    help="questions decoded together by the serving engine (continuous batching)")
    qa.add_argument("--out", type=Path, default=None, help="folder for rag_qa.json, rag_qa.png and questions.jsonl "
                                                           "(default: runs/rag_eval/qa-<model>)")
    qa.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.prog = f"{PROG} {args.command}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command({"loss": loss_command, "qa": qa_command, "rows": rows_command}[args.command], args)
