"""Tokenize a corpus (default: the stdlib's source) into token shards for training, per split.

Reads the corpus, encodes every document with the given tokenizer in worker processes, and
writes memory-mappable shards plus index.json to OUT/train and OUT/validation, and the tokenizer
to OUT/tokenizer.json (so the folder is self-contained: `experiments train --data OUT` reads it and
copies it into its run folder); training reads them with `llmjax.data.TokenShards` and `llmjax.data.loader.BatchIterator`.

    python -m experiments tokenize --tokenizer bytes
    python -m experiments tokenize --tokenizer runs/tokenizers/spm8k.model --corpus 'data/*.jsonl'
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from llmjax.data.corpus import VALIDATION_FRACTION, CorpusError, corpus_documents
from llmjax.data.shards import DEFAULT_SHARD_TOKENS, ShardWriteReport, TokenShardsError, write_shards
from llmjax.tokenizer import Tokenizer, TokenizerError, load_tokenizer

PROG = "python -m experiments tokenize"

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize a corpus into token shards (flat uint16/uint32 files + index.json) for training. "
        "Documents are split into train / validation by a stable hash of their path (~1% validation), "
        "each encoded and followed by the end-of-text token; invalid UTF-8 is replaced and reported.",
    )
    parser.add_argument("--tokenizer", default="bytes",
                        help="'bytes' for the byte tokenizer (257 ids), our tokenizer JSON (its 'type' picks the class), "
                        "a SentencePiece .model file, or a folder with GPT-2 vocab.json + merges.txt or a Hugging Face "
                        "tokenizer.json (default: bytes)")
    parser.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                        help="files, folders (searched recursively) or quoted glob patterns; text files are one document "
                        "each, .jsonl one per line, .parquet one per row (.gz is decompressed). Default: the .py files "
                        "of this Python's standard library")
    parser.add_argument("--text-field", default="text",
                        help="the JSONL field / Parquet column holding each document's text (default: text)")
    parser.add_argument("--split", choices=("train", "validation", "both"), default="both",
                        help="which split(s) to write (default: both)")
    parser.add_argument("--validation-fraction", type=float, default=VALIDATION_FRACTION,
                        help="share of documents (by stable hash) in the validation split; with two or more text files "
                        "each split gets at least one (default: 0.01)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder; each split goes to OUT/SPLIT (default: runs/tokens/<tokenizer name>)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes encoding documents in parallel; 1 encodes in this process (default: 1 for "
                        "'bytes', whose encoding costs less than sending text to a worker; else the number of CPUs, "
                        "at most 16)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing shards in OUT/SPLIT (the old ones stay until the new ones are complete)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    return parser.parse_args(argv)


def tokenizer_name(spec: str) -> str:
    """A folder name for the default output: 'bytes', or the tokenizer file's (or folder's) name."""
    path = Path(spec)
    if spec == "bytes":
        return "bytes"
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.stem in ("tokenizer", "vocab", "model") else path.stem


def default_workers(tokenizer_spec: str) -> int:
    """Encoding processes. Measured on the lent H200 host (16 cores, its stdlib = 10.6 MB):
    `--tokenizer spm8k.model --split train --workers N` ran 2.2 MB/s with 1 worker, 6.2 with 4,
    8.8 with 15 (fork-server start included); `--tokenizer bytes` 24.8 MB/s with 1, 14.5 with 4:
    sending text to a worker costs more than encoding it to bytes."""
    return 1 if tokenizer_spec == "bytes" else min(16, os.cpu_count() or 1)


def write_split(args, tokenizer: Tokenizer, split: str | None, out_dir: Path) -> ShardWriteReport:
    documents = corpus_documents(args.corpus, split=split, text_field=args.text_field,
                                 validation_fraction=args.validation_fraction)
    try:
        return write_shards(documents, tokenizer, out_dir, shard_tokens=args.shard_tokens, workers=args.workers,
                            overwrite=args.overwrite, progress=not args.no_progress, description=f"{split or 'corpus'}",
                            tokenizer_source=args.tokenizer if args.tokenizer == "bytes" else str(Path(args.tokenizer).resolve()))
    except CorpusError as error:
        if split == "validation" and "is empty" in str(error):
            raise CorpusError(f"{error}. The validation split got no documents: use --split train, "
                              "a larger --validation-fraction, or a larger corpus") from None
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers is None:
        args.workers = default_workers(args.tokenizer)
    if args.workers < 1 or args.shard_tokens < 1:
        print(f"{PROG}: error: --workers and --shard-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        out = args.out or Path("runs/tokens") / tokenizer_name(args.tokenizer)
        splits = ("train", "validation") if args.split == "both" else (args.split,)
        corpus = "the standard library's .py files" if args.corpus is None else " ".join(args.corpus)
        print(f"tokenizer: {tokenizer!r}, {tokenizer.vocab_size:,} ids, fingerprint {tokenizer.fingerprint()[:16]}")
        print(f"corpus: {corpus}")
        start = time.perf_counter()
        reports = []
        for split in splits:
            report = write_split(args, tokenizer, split, out / split)
            print(f"{split}: {report.summary()}", flush=True)
            print(f"  -> {report.directory}", flush=True)
            reports.append(report)
        tokenizer.save(out / "tokenizer.json")  # beside the shards: the folder is self-contained, and can move
    except (CorpusError, TokenShardsError, TokenizerError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    tokens = sum(r.total_tokens for r in reports)
    megabytes = sum(r.corpus.utf8_bytes for r in reports) / 1e6
    print(f"total: {tokens:,} tokens from {megabytes:.1f} MB of text in {seconds:.1f} s "
          f"({tokens / seconds / 1e6:.2f}M tokens/s, {megabytes / seconds:.1f} MB/s, {args.workers} worker{'s' * (args.workers != 1)}) "
          f"in {out}")
    return 0
