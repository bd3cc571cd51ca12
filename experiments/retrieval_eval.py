"""Docstring -> code retrieval on held-out stdlib modules: recall@1/10/100 and MRR of BM25, MiniLM or a trained model.

    python -m experiments retrieval_eval --retriever bm25 minilm runs/train_retriever/minilm
    python -m experiments retrieval_eval --retriever bm25 --max-examples 2000

The task is llmjax.retrieval.code_task's (queries: docstrings; documents: code without docstrings, plus distractor
passages): every held-out query searches the whole document pool. Prints a table and writes metrics.json and a bar
chart (recall.png) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROG = "python -m experiments retrieval_eval"
METRICS = ("recall@1", "recall@10", "recall@100", "mrr")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_task_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose the task (shared with train_retriever)."""
    p.add_argument("--root", type=Path, default=None,
                   help="a folder of .py files to make the task from (default: this Python's standard library)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="a deterministic subset of this many examples (and as many distractors), for quick runs")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of modules held out for evaluation")
    p.add_argument("--seed", type=int, default=0, help="which modules are held out")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/retrieval_task"), help="where the task is cached")
    p.add_argument("--task", type=Path, default=None,
                   help="a task file made earlier (runs/retrieval_task/code_task-*.json), used as is: the same "
                        "queries and documents on a machine whose Python differs (the flags above are then ignored)")


def parse_args(argv):
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--retriever", nargs="+", default=["bm25"],
                   help="one or more of: bm25 (code-aware tokens; bm25s when installed, else NumPy), minilm "
                        "(all-MiniLM-L6-v2 off the shelf), or a run folder of `python -m experiments train_retriever`")
    add_task_flags(p)
    p.add_argument("--max-test-queries", type=int, default=None,
                   help="evaluate only the first N held-out queries (the pool stays whole)")
    p.add_argument("--batch-size", type=int, default=64, help="dense retrievers: texts embedded per batch")
    p.add_argument("--out", type=Path, default=Path("runs/retrieval_eval"), help="folder for metrics.json and "
                                                                                 "recall.png")
    args = p.parse_args(argv)
    for flag in ("max_examples", "max_test_queries", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')}={value}: must be a positive integer")
    return args


def load_task(args, progress: bool = True):
    from llmjax.retrieval.code_task import load_code_task, read_task

    if getattr(args, "task", None) is not None:
        return read_task(args.task)
    return load_code_task(args.root, heldout_fraction=args.heldout_fraction, seed=args.seed,
                          max_examples=args.max_examples, cache_dir=args.cache_dir, progress=progress)


def bm25_ranking(task, k: int):
    """(ranked document rows [q, k], seconds) of BM25 for the task's test queries."""
    from llmjax.retrieval.bm25 import BM25Index

    start = time.perf_counter()
    index = BM25Index(task.documents)
    _, rows = index.search(task.test_queries, k, progress=True)
    return rows, time.perf_counter() - start


def dense_ranking(retriever, task, k: int, batch_size: int = 64):
    """(ranked document rows [q, k], seconds) of a DenseRetriever for the task's test queries."""
    start = time.perf_counter()
    index = retriever.index_documents(task.documents, batch_size=batch_size, progress=True)
    _, rows = retriever.search(index, task.test_queries, k, batch_size=batch_size)
    return rows, time.perf_counter() - start


def evaluate(spec: str, task, batch_size: int = 64) -> dict:
    """{"retriever", metrics..., "seconds"} of one retriever (bm25, minilm or a run folder) on the task."""
    from llmjax.retrieval.code_task import rank_metrics
    from llmjax.retrieval.dense import load_retriever

    k = min(100, len(task.documents))
    if spec == "bm25":
        rows, seconds = bm25_ranking(task, k)
    else:
        rows, seconds = dense_ranking(load_retriever(spec), task, k, batch_size)
    return {"retriever": spec, **rank_metrics(rows, task.test_positives), "seconds": round(seconds, 2)}


def table(results: list[dict]) -> str:
    width = max(len("retriever"), *(len(r["retriever"]) for r in results))
    lines = [f"{'retriever':<{width}}  " + "  ".join(f"{m:>10}" for m in METRICS) + "  seconds"]
    for r in results:
        lines.append(f"{r['retriever']:<{width}}  " + "  ".join(f"{r[m]:>10.3f}" for m in METRICS)
                     + f"  {r['seconds']:>7.1f}")
    return "\n".join(lines)


def recall_bars(ax, results: list[dict], title: str) -> None:
    """Grouped bars on `ax`: recall@1 / @10 / @100 and MRR, one colour per retriever."""
    import numpy as np

    width = 0.8 / len(results)
    for i, r in enumerate(results):
        bars = ax.bar(np.arange(len(METRICS)) + i * width, [r[m] for m in METRICS], width,
                      label=Path(r["retriever"]).name or r["retriever"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(METRICS)) + width * (len(results) - 1) / 2, METRICS)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def plot_recall(results: list[dict], path: Path, title: str) -> Path:
    """Grouped bars: recall@1 / @10 / @100 and MRR per retriever."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    recall_bars(ax, results, title)
    ax.set_ylabel("held-out queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmjax.io.models import ModelLoadError
    from llmjax.retrieval.base import RetrievalError

    try:
        task = load_task(args).subset(args.max_test_queries)
        print(task.summary())
        results = []
        for spec in args.retriever:
            results.append(evaluate(spec, task, args.batch_size))
            print(table(results[-1:]))
    except (RetrievalError, ModelLoadError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    import jax

    record = {"task": task.summary(), "test_queries": len(task.test_queries), "documents": len(task.documents),
              "options": vars(task.options), "device": jax.devices()[0].device_kind, "results": results,
              "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])}
    (args.out / "metrics.json").write_text(json.dumps(record, indent=1, default=str))
    plot_recall(results, args.out / "recall.png", f"docstring -> code, {len(task.test_queries)} held-out queries, "
                                                   f"{len(task.documents):,} documents")
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'recall.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
