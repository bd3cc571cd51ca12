"""Train our byte-level BPE on a corpus; compare training and encoding with HF tokenizers and tiktoken."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>",)


def default_corpus_split(validation_fraction: float = 0.01) -> tuple[list[Path], list[Path]]:
    """(train, validation) files of the default corpus (llmjax.data.corpus's deterministic split)."""
    from llmjax.data.corpus import default_corpus_split as split

    return split("train", validation_fraction), split("validation", validation_fraction)


def take_up_to(files: list[Path], max_bytes: int | None) -> list[Path]:
    """The first files, in order, whose sizes add up to at most `max_bytes` (at least one file)."""
    if max_bytes is None:
        return list(files)
    taken, total = [], 0
    for path in files:
        size = path.stat().st_size
        if taken and total + size > max_bytes:
            break
        taken.append(path)
        total += size
    return taken


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m experiments tokenizer",
        description="Train our byte-level BPE (llmjax.tokenizer.train_bpe) on a corpus, save it, and report corpus "
        "size, training time, peak memory, bytes per token on held-out text and single-process encode "
        "throughput; the same for Hugging Face `tokenizers` trained on the same files with the same vocabulary "
        "size and special tokens, and tiktoken's encode throughput with OUR vocabulary. Held-out text is the "
        "validation split of the default corpus (about 1% of the stdlib files, chosen by a hash of their path); "
        "it is never trained on, even when --corpus includes the stdlib.",
    )
    parser.add_argument("--corpus", nargs="+", metavar="PATH",
                        help="files, folders (searched recursively, binary files skipped) or quoted globs such as "
                        "'/data/**/*.py'; default: the train split of the default corpus (the stdlib's .py files)")
    parser.add_argument("--vocab-size", type=int, default=10_000,
                        help="vocabulary size including the 256 byte tokens and <|endoftext|> (default 10000)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="train on the first corpus files, in order, up to this many bytes (default: all of them)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help=f"processes counting pre-tokens (default: all cores, {os.cpu_count()} here)")
    parser.add_argument("--pattern", choices=("gpt2", "cl100k"), default="gpt2",
                        help="pre-tokenizer regex: GPT-2's or GPT-4's cl100k (default gpt2; the HF comparison needs gpt2)")
    parser.add_argument("--bench-bytes", type=int, default=4_000_000,
                        help="text encoded for throughput: the validation files, then training files up to this many "
                        "bytes (default 4000000)")
    parser.add_argument("--skip-hf", action="store_true", help="do not train / time Hugging Face tokenizers")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to save our tokenizer JSON (default runs/tokenizer/bpe-VOCAB.json); the results "
                        "JSON goes next to it as bpe-VOCAB.results.json")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("runs/tokenizer") / f"bpe-{args.vocab_size}.json"
    return args


def read_texts(files: list[Path]) -> list[str]:
    from llmjax.data.corpus import read_text

    return [read_text(path) for path in files]


def train_ours(files: list[Path], args) -> tuple[object, dict]:
    """Train our BPE; time counting and merging separately; peak memory of this process and workers."""
    from llmjax.tokenizer.bpe_train import train_bpe_from_counts
    from llmjax.tokenizer.pretokenize import PATTERNS, count_pretokens, peak_rss_bytes

    pattern = PATTERNS[args.pattern]
    start = time.perf_counter()
    counts, stats = count_pretokens(files, pattern, SPECIAL_TOKENS, args.workers)
    counted = time.perf_counter()
    tokenizer = train_bpe_from_counts(counts, args.vocab_size, SPECIAL_TOKENS, pattern)
    done = time.perf_counter()
    return tokenizer, {
        "corpus_bytes": stats.num_bytes,
        "corpus_files": stats.num_documents,
        "unique_pretokens": stats.num_unique_pretokens,
        "invalid_utf8_bytes": stats.invalid_utf8_bytes,
        "count_s": counted - start,
        "merge_s": done - counted,
        "train_s": done - start,
        "peak_rss_main_bytes": peak_rss_bytes(),
        "peak_rss_worker_bytes": stats.peak_worker_rss_bytes,
        "vocab_size": tokenizer.vocab_size,
    }


def train_hf_in_child(files: list[str], vocab_size: int) -> tuple[str, dict]:
    """Train HF `tokenizers` byte-level BPE (GPT-2 regex, same specials, pairs seen twice or more)
    in a fresh process, so its peak memory is its own. Returns (tokenizer.json text, record)."""
    from llmjax.data.corpus import read_text
    from llmjax.tokenizer.pretokenize import peak_rss_bytes
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    start = time.perf_counter()
    tokenizer.train_from_iterator((read_text(Path(f)) for f in files), trainer, length=len(files))
    seconds = time.perf_counter() - start
    record = {"train_s": seconds, "peak_rss_main_bytes": peak_rss_bytes(), "vocab_size": tokenizer.get_vocab_size()}
    return tokenizer.to_str(), record


def throughput(encode, texts: list[str]) -> tuple[float, list[list[int]]]:
    """(MB/s, ids per text) encoding the texts one by one in this process."""
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    start = time.perf_counter()
    ids = [encode(t) for t in texts]
    return num_bytes / 1e6 / (time.perf_counter() - start), ids


def tiktoken_from(tokenizer):
    """A tiktoken Encoding with our vocabulary (ranks = our ids), pattern and special tokens; no download."""
    import tiktoken

    special_ids = set(tokenizer.special_tokens.values())
    ranks = {token: i for i, token in tokenizer.vocab.items() if i not in special_ids}
    return tiktoken.Encoding(
        "llmjax-bpe", pat_str=tokenizer.pattern, mergeable_ranks=ranks, special_tokens=tokenizer.special_tokens
    )


def bytes_per_token(texts: list[str], ids: list[list[int]]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / max(sum(map(len, ids)), 1)


def format_table(rows: list[dict]) -> str:
    """Markdown table of the measured rows."""
    def cell(value, spec):
        return "—" if value is None else format(value, spec)

    header = ("tokenizer", "train s", "peak RSS MB (main / worker)", "vocab", "held-out bytes/token", "encode MB/s", "encode vs ours")
    lines = ["| " + " | ".join(header) + " |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ours_speed = rows[0]["encode_mb_s"]
    for row in rows:
        rss = "—" if row.get("peak_rss_main_bytes") is None else (
            f"{row['peak_rss_main_bytes'] / 1e6:.0f} / {row['peak_rss_worker_bytes'] / 1e6:.0f}"
            if row.get("peak_rss_worker_bytes") else f"{row['peak_rss_main_bytes'] / 1e6:.0f}")
        lines.append(
            f"| {row['name']} | {cell(row.get('train_s'), '.1f')} | {rss} | {cell(row.get('vocab_size'), 'd')} | "
            f"{cell(row.get('bytes_per_token'), '.3f')} | {row['encode_mb_s']:.2f} | {row['encode_mb_s'] / ours_speed:.2f}x |"
        )
    return "\n".join(lines)


def training_files(args, validation_files: list[Path], train_default: list[Path]) -> list[Path]:
    """The files to train on: --corpus (held-out files removed) or the default train split, capped by --max-bytes."""
    from llmjax.tokenizer.pretokenize import list_corpus_files

    if not args.corpus:
        return take_up_to(train_default, args.max_bytes)
    held_out = {p.resolve() for p in validation_files}
    files = [path for item in args.corpus for path in list_corpus_files(item)[0]]
    return take_up_to([p for p in dict.fromkeys(files) if p.resolve() not in held_out], args.max_bytes)


def measure_tiktoken(tokenizer, bench_texts: list[str], ours_ids: list[list[int]], bytes_per_token_ours: float) -> dict:
    """tiktoken's encode throughput with our vocabulary, and whether its ids equal ours."""
    encoding = tiktoken_from(tokenizer)
    speed, ids = throughput(encoding.encode_ordinary, bench_texts)
    return {"name": "tiktoken, our vocab", "encode_mb_s": speed, "vocab_size": tokenizer.vocab_size,
            "bytes_per_token": bytes_per_token_ours, "ids_equal_ours": ids == ours_ids}


def measure_hf(files: list[Path], args, validation_texts: list[str], bench_texts: list[str]) -> dict:
    """Train HF tokenizers on the same files (in a child process) and measure it like ours."""
    import multiprocessing

    from tokenizers import Tokenizer

    context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        hf_json, record = pool.submit(train_hf_in_child, [os.fspath(p) for p in files], args.vocab_size).result()
    (args.out.parent / f"hf-{args.out.stem}.json").write_text(hf_json)
    hf = Tokenizer.from_str(hf_json)
    speed, ids = throughput(lambda t: hf.encode(t, add_special_tokens=False).ids, bench_texts)
    return {"name": "HF tokenizers", **record, "encode_mb_s": speed,
            "bytes_per_token": bytes_per_token(validation_texts, ids[: len(validation_texts)])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    train_default, validation_files = default_corpus_split()
    files = training_files(args, validation_files, train_default)
    if not files:
        print("python -m experiments tokenizer: the corpus has no files; check --corpus", file=sys.stderr)
        return 2
    print(f"corpus: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB; "
          f"held out: {len(validation_files)} stdlib files; {args.workers} workers")

    tokenizer, ours = train_ours(files, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(args.out)
    print(f"ours: {ours['corpus_bytes'] / 1e6:.1f} MB, {ours['unique_pretokens']:,} distinct pre-tokens; counted in "
          f"{ours['count_s']:.1f} s, merged in {ours['merge_s']:.1f} s; saved {args.out}")

    validation_texts = read_texts(validation_files)
    bench_texts = validation_texts + read_texts(take_up_to(files, args.bench_bytes))
    fresh = type(tokenizer).from_json(tokenizer.to_json())  # cold cache, as a new user gets it
    ours["encode_mb_s"], ours_ids = throughput(fresh.encode_ordinary, bench_texts)
    ours["bytes_per_token"] = bytes_per_token(validation_texts, ours_ids[: len(validation_texts)])
    rows = [{"name": "llmjax BPE (ours)", **ours}]
    try:
        rows.append(measure_tiktoken(tokenizer, bench_texts, ours_ids, ours["bytes_per_token"]))
    except ImportError:
        print("tiktoken is not installed: its row is skipped")
    if not args.skip_hf and args.pattern == "gpt2":
        try:
            rows.append(measure_hf(files, args, validation_texts, bench_texts))
        except ImportError:
            print("tokenizers is not installed: the Hugging Face row is skipped")

    table = format_table(rows)
    print("\n" + table + "\n")
    for row in rows[1:]:
        if "ids_equal_ours" in row:
            print(f"tiktoken ids equal ours on the {len(bench_texts)} benchmark texts: {row['ids_equal_ours']}")
        if row["name"].startswith("HF"):
            print(f"training time, ours / HF: {ours['train_s'] / row['train_s']:.2f}x")
    results = {"command": "python -m experiments tokenizer " + " ".join(argv if argv is not None else sys.argv[1:]),
               "files": len(files), "workers": args.workers, "pattern": args.pattern, "cpu_count": os.cpu_count(),
               "rows": rows, "table": table}
    results_path = args.out.with_name(args.out.stem + ".results.json")
    results_path.write_text(json.dumps(results, indent=2))
    print(f"results: {results_path}")
    return 0
