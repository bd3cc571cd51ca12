"""Curate a corpus: exact and MinHash-LSH dedup, quality rules, PII masking; JSONL or token shards out.

Stages run in order, each resumable (OUT/work/ holds one JSONL file and one state file per
stage: rerun the same command after an interruption and it continues where it stopped, writing
the same output). Writes OUT/curated.jsonl (or OUT/shards/ with --format shards), OUT/report.json
(documents in / removed / out per stage, and why) and OUT/removals.png.

    python -m experiments curate --out runs/curated                       # the standard library's .py files
    python -m experiments curate --data 'data/*.jsonl' --out runs/c --format shards --tokenizer bytes --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from llmjax.data.corpus import CorpusError
from llmjax.data.curate import minhash
from llmjax.data.curate import classifier
from llmjax.data.curate.pipeline import (DEFAULT_STAGES, STAGES, CurateConfig, CurationError, StoppedEarly, curate,
                                         curated_texts, removal_counts)

PROG = "python -m experiments curate"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="stdlib",
                        help="'stdlib' (the standard library's .py files), a folder of text files, files, a quoted "
                        "glob, or JSONL files (one document per line in --text-field) (default: stdlib)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (its work/ subfolder makes runs resumable)")
    parser.add_argument("--format", choices=("jsonl", "shards"), default="jsonl",
                        help="jsonl: OUT/curated.jsonl; shards: token shards in OUT/shards via --tokenizer "
                        "(default: jsonl)")
    parser.add_argument("--tokenizer", default="bytes",
                        help="tokenizer for --format shards, as in `experiments tokenize` (default: bytes)")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help=f"comma-separated stages to run, in the fixed order {','.join(STAGES)} (default: "
                        f"{','.join(DEFAULT_STAGES)}: the classifier, trained on English docstrings, drops code)")
    parser.add_argument("--classifier", default=None, metavar="PATH",
                        help="the quality classifier (.npz) for the classifier stage; a PATH that does not exist is "
                        "trained (standard-library docstrings vs degraded copies) and saved there")
    parser.add_argument("--classifier-threshold", type=float, default=None,
                        help="keep documents whose P(good) >= this (default: the threshold saved with the "
                        "classifier, 0.5)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes for MinHash signatures and the per-document stages (default: 1)")
    parser.add_argument("--line-dedup", choices=("none", "line", "paragraph"), default="none",
                        help="in the exact stage, also drop lines / paragraphs seen before in any document (for "
                        "web text, as CCNet does; default: none, since on code it cuts repeated blocks out of files)")
    parser.add_argument("--ngram", type=int, default=5, help="MinHash shingle length (default: 5)")
    parser.add_argument("--shingle-unit", choices=("word", "char"), default="word",
                        help="MinHash shingles of words or characters (default: word)")
    parser.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default: 128)")
    parser.add_argument("--bands", type=int, default=None,
                        help="LSH bands (must divide --num-perm; default: chosen for --threshold)")
    parser.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold (default: 0.8)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--batch-documents", type=int, default=64,
                        help="documents per batch in the per-document stages; progress is saved after each "
                        "(default: 64)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop once a per-document stage has processed N documents (for testing resumes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def print_table(reports: list[dict]) -> None:
    print(f"{'stage':<8} {'in':>8} {'removed':>8} {'out':>8}  why")
    for r in reports:
        why = ", ".join(f"{k} {v}" for k, v in r["removed_by_reason"].items() if v)
        extra = r.get("masked") or r.get("skipped_lines") or {}
        if extra:
            why += ("; " if why else "") + ", ".join(f"{k} {v}" for k, v in extra.items())
        print(f"{r['stage']:<8} {r['documents_in']:>8,} {r['removed']:>8,} {r['documents_out']:>8,}  {why}")


def plot_removals(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = removal_counts(reports)
    figure, axis = plt.subplots(figsize=(8, 0.4 * max(len(counts), 3) + 1))
    axis.barh(list(counts) or ["nothing removed"], list(counts.values()) or [0], color="tab:red")
    axis.invert_yaxis()
    axis.set_xlabel("documents removed")
    axis.set_title("curation: removals by stage and reason")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_output(args, result: dict) -> str:
    if args.format == "jsonl":
        target = args.out / "curated.jsonl"
        shutil.copyfile(result["output"], target.with_name(target.name + ".partial"))
        os.replace(target.with_name(target.name + ".partial"), target)
        return str(target)
    from llmjax.data.shards import write_shards
    from llmjax.tokenizer import load_tokenizer

    report = write_shards(curated_texts(result["output"]), load_tokenizer(args.tokenizer), args.out / "shards",
                          overwrite=True, progress=not args.no_progress, description="shards",
                          tokenizer_source=args.tokenizer)
    return f"{report.directory} ({report.total_tokens:,} tokens)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = CurateConfig(
            stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), workers=args.workers,
            line_dedup=None if args.line_dedup == "none" else args.line_dedup,
            minhash=minhash.MinHashConfig(ngram=args.ngram, unit=args.shingle_unit, num_perm=args.num_perm,
                                          bands=args.bands, threshold=args.threshold),
            classifier_path=args.classifier, classifier_threshold=args.classifier_threshold,
            text_field=args.text_field, batch_documents=args.batch_documents, progress=not args.no_progress)
    except (CurationError, minhash.MinHashError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    try:
        if "classifier" in config.stages and not Path(args.classifier).exists():
            print(f"training the quality classifier -> {args.classifier}", flush=True)
            positives, negatives = classifier.default_training_texts()
            Path(args.classifier).parent.mkdir(parents=True, exist_ok=True)
            classifier.train_classifier(positives, negatives).save(args.classifier)
        result = curate(args.data, args.out, config, stop_after=args.stop_after)
    except StoppedEarly as stopped:
        print(f"{stopped}; rerun the same command to resume")
        return 3
    except (CorpusError, CurationError, classifier.ClassifierError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    written = write_output(args, result)
    report = {"command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]), "data": args.data,
              "stages": result["stages"], "output": written}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    plot_removals(result["stages"], args.out / "removals.png")
    print_table(result["stages"])
    print(f"-> {written}; {args.out / 'report.json'}, {args.out / 'removals.png'}")
    return 0
