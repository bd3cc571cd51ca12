"""Overlay the loss curves of several training runs (e.g. bf16 vs fp8 from one seed) and compare their final losses."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments compare_runs",
        description="Read the metrics.jsonl of each run folder, overlay their train and validation loss curves in one "
        "PNG, and print each run's last validation loss (and mean train loss over its last --tail logged steps) with "
        "its relative difference to the first run. Typical use: the same model, seed and data trained in two "
        "precisions (`train --set matmul_precision=fp8`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with a metrics.jsonl); the first is the "
                   "reference the others are compared with")
    p.add_argument("--labels", default=None, help="comma-separated names for the runs (default: the folder names)")
    p.add_argument("--tail", type=int, default=10, help="logged train steps averaged for the final train loss")
    p.add_argument("--out", type=Path, default=Path("runs/compare_runs"),
                   help="folder for loss_comparison.png and comparison.json")
    return p.parse_args(argv)


def final_losses(records: list[dict], tail: int) -> dict:
    """{"steps", "train_loss" (mean of the last `tail` logged train losses), "val_loss" (the last validation)}."""
    train = [r for r in records if r["kind"] == "train" and math.isfinite(r["loss"])]
    validation = [r for r in records if r["kind"] == "validation"]
    last = train[-tail:]
    return {"steps": max((r["step"] for r in records), default=0),
            "train_loss": sum(r["loss"] for r in last) / len(last) if last else None,
            "val_loss": validation[-1]["loss"] if validation else None}


def relative(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else (value - reference) / reference


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmjax.train.loop import plot_loss_comparison, read_metrics

    labels = args.labels.split(",") if args.labels else [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        print(f"compare_runs: {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    metrics = {}
    for label, run in zip(labels, args.runs):
        records = read_metrics(run)
        if not records:
            print(f"compare_runs: {run} has no metrics.jsonl (or an empty one): not a training run folder",
                  file=sys.stderr)
            return 2
        metrics[label] = records
    summary = {label: final_losses(records, args.tail) for label, records in metrics.items()}
    reference = summary[labels[0]]
    print(f"{'run':>24} {'steps':>7} {'train loss':>11} {'vs first':>9} {'val loss':>9} {'vs first':>9}")
    for label, row in summary.items():
        row["train_vs_first"] = relative(row["train_loss"], reference["train_loss"])
        row["val_vs_first"] = relative(row["val_loss"], reference["val_loss"])
        cells = [f"{row['train_loss']:11.4f}" if row["train_loss"] is not None else f"{'-':>11}",
                 f"{row['train_vs_first']:+9.2%}" if row["train_vs_first"] is not None else f"{'-':>9}",
                 f"{row['val_loss']:9.4f}" if row["val_loss"] is not None else f"{'-':>9}",
                 f"{row['val_vs_first']:+9.2%}" if row["val_vs_first"] is not None else f"{'-':>9}"]
        print(f"{label:>24} {row['steps']:7d} " + " ".join(cells))
    args.out.mkdir(parents=True, exist_ok=True)
    plot = plot_loss_comparison(metrics, args.out / "loss_comparison.png")
    (args.out / "comparison.json").write_text(json.dumps(
        {"runs": {label: str(run) for label, run in zip(labels, args.runs)}, "final": summary}, indent=2))
    print(f"wrote {plot} and {args.out / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
