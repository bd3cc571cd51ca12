"""Benchmark MinHash-LSH near-duplicate detection against datasketch: documents/s, precision, recall.

The corpus (default: the standard library's .py files) gets planted near-duplicates: copies of
randomly chosen documents with word substitutions / deletions / insertions at a known rate.
Both implementations see the same word n-gram shingles, num_perm, (bands, rows) and threshold:
- ours: `llmjax.data.curate.minhash` (vectorized signatures, LSH banding, candidates verified);
- datasketch: MinHash.update_batch per document, MinHashLSH insert + query, candidates verified
  the same way (--verify exact: Jaccard of the shingle sets; estimate: of the signatures).
Timed: shingling + signatures + index + query + check (documents/s). Scored against exact
Jaccard of the shingle sets: a reported pair is correct when its exact Jaccard >= threshold
(precision); the positives are the planted pairs and any reported pair with exact Jaccard >=
threshold (recall = positives reported / positives).

    python -m experiments bench_dedup                       # writes runs/bench_dedup/{report.json,bench_dedup.png}
    python -m experiments bench_dedup --limit 300 --skip-datasketch
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from llmjax.data.corpus import corpus_documents
from llmjax.data.curate import minhash

PROG = "python -m experiments bench_dedup"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                        help="files / folders / globs (default: the standard library's .py files)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N corpus documents (default: all)")
    parser.add_argument("--planted", type=float, default=0.25,
                        help="near-duplicate copies to plant, as a fraction of the corpus documents (default: 0.25)")
    parser.add_argument("--edit-rate", type=float, default=0.01,
                        help="per-word probability of an edit (substitution, deletion or insertion, equally likely) "
                        "in a planted copy (default: 0.01)")
    parser.add_argument("--ngram", type=int, default=5, help="word n-gram shingle length (default: 5)")
    parser.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default: 128)")
    parser.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold (default: 0.8)")
    parser.add_argument("--verify", choices=("exact", "estimate"), default="exact",
                        help="how both check LSH candidates: exact Jaccard of the shingle sets, or the MinHash "
                        "estimate (default: exact)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the planted copies (default: 0)")
    parser.add_argument("--workers", type=int, default=2,
                        help="also time ours with signatures in this many processes (process start included; 1: "
                        "single process only). datasketch runs in one process (default: 2)")
    parser.add_argument("--skip-datasketch", action="store_true", help="measure ours only (datasketch not installed)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dedup"),
                        help="output folder (default: runs/bench_dedup)")
    return parser.parse_args(argv)


def edited_copy(text: str, edit_rate: float, rng: np.random.Generator) -> str:
    """The text's words (whitespace-split) with substitutions / deletions / insertions at edit_rate."""
    words = text.split()
    out = []
    for word in words:
        roll = rng.random()
        if roll < edit_rate / 3:  # substitution
            out.append(f"edit{rng.integers(1 << 30)}")
        elif roll < 2 * edit_rate / 3:  # deletion
            continue
        elif roll < edit_rate:  # insertion
            out.extend([word, f"insert{rng.integers(1 << 30)}"])
        else:
            out.append(word)
    return " ".join(out)


def planted_corpus(texts: list[str], fraction: float, edit_rate: float,
                   seed: int) -> tuple[list[str], list[tuple[int, int]]]:
    """(texts + planted copies, [(original index, copy index)])."""
    rng = np.random.default_rng(seed)
    candidates = [i for i, t in enumerate(texts) if len(t.split()) >= 50]
    chosen = sorted(rng.choice(candidates, size=min(len(candidates), int(round(fraction * len(texts)))), replace=False))
    copies = [edited_copy(texts[i], edit_rate, rng) for i in chosen]
    pairs = [(int(i), len(texts) + k) for k, i in enumerate(chosen)]
    return texts + copies, pairs


def run_ours(texts: list[str], config: minhash.MinHashConfig, workers: int) -> tuple[set, float]:
    start = time.perf_counter()
    if workers == 1:  # keep the shingles for the exact check
        shingles = minhash.text_shingles(texts, config)
        signature_array = minhash.signatures(shingles, config.num_perm, config.seed)
        pairs = minhash.near_duplicate_pairs(signature_array, config, shingles=shingles)
    else:  # the workers send back signatures only; the candidates' shingles are rebuilt here
        signature_array = minhash.parallel_signatures(texts, config, workers)
        pairs = minhash.near_duplicate_pairs(signature_array, config, texts)
    return {tuple(p) for p in pairs.tolist()}, time.perf_counter() - start


def word_shingles(text: str, ngram: int) -> list[bytes]:
    """The same lowercased word n-grams as ours, as byte strings for datasketch's hash function."""
    import re

    words = re.findall(r"\w+", text.lower())
    if not words:
        return []
    width = min(ngram, len(words))
    return list({" ".join(words[i: i + width]).encode() for i in range(len(words) - width + 1)})


def run_datasketch(texts: list[str], config: minhash.MinHashConfig) -> tuple[set, float]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    bands, rows = config.band_layout
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, params=(bands, rows))
    sketches, shingle_sets = [], []
    for index, text in enumerate(texts):
        shingles = word_shingles(text, config.ngram)
        sketch = MinHash(num_perm=config.num_perm, seed=config.seed)
        sketch.update_batch(shingles)
        lsh.insert(index, sketch)
        sketches.append(sketch)
        shingle_sets.append(shingles)
    pairs, checked = set(), set()
    for index, sketch in enumerate(sketches):
        for other in lsh.query(sketch):
            pair = (min(index, other), max(index, other))
            if other == index or pair in checked:
                continue
            checked.add(pair)
            if config.verify == "exact":
                similarity = minhash.exact_jaccard(set(shingle_sets[pair[0]]), set(shingle_sets[pair[1]]))
            else:
                similarity = sketches[pair[0]].jaccard(sketches[pair[1]])
            if similarity >= config.threshold:
                pairs.add(pair)
    return pairs, time.perf_counter() - start


def score(reported: set, positives: set, exact, threshold: float) -> dict:
    correct = sum(exact(p) >= threshold for p in reported)
    return {"reported_pairs": len(reported), "correct_pairs": int(correct),
            "precision": correct / len(reported) if reported else 1.0,
            "recall": len(reported & positives) / len(positives) if positives else 1.0}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    colors = ["tab:gray" if n == "datasketch" else "tab:blue" for n in names]
    axes[0].bar(names, [report["results"][n]["documents_per_second"] for n in names], color=colors)
    axes[0].set_ylabel("documents / s")
    axes[0].set_title("throughput (signatures + index + query)")
    width = 0.35
    x = np.arange(len(names))
    axes[1].bar(x - width / 2, [report["results"][n]["precision"] for n in names], width, label="precision")
    axes[1].bar(x + width / 2, [report["results"][n]["recall"] for n in names], width, label="recall")
    axes[1].set_xticks(x, names)
    axes[1].set_ylim(0.8, 1.0)
    axes[1].axhline(0.95, color="k", linestyle=":", linewidth=1)
    axes[1].legend(loc="lower right")
    axes[1].set_title(f"near-duplicate pairs at Jaccard {report['threshold']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers < 1:
        print(f"{PROG}: error: --workers must be at least 1", file=sys.stderr)
        return 2
    if not 0 < args.planted <= 1 or not 0 <= args.edit_rate < 1:
        print(f"{PROG}: error: --planted must be in (0, 1] and --edit-rate in [0, 1)", file=sys.stderr)
        return 2
    try:
        config = minhash.MinHashConfig(ngram=args.ngram, num_perm=args.num_perm, threshold=args.threshold,
                                       verify=args.verify)
    except minhash.MinHashError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    texts = [d.text for d in corpus_documents(args.corpus) if d.text]
    texts = texts[: args.limit] if args.limit else texts
    texts, planted = planted_corpus(texts, args.planted, args.edit_rate, args.seed)
    print(f"{len(texts):,} documents ({len(planted):,} planted copies, edit rate {args.edit_rate}), "
          f"{sum(map(len, texts)) / 1e6:.1f} MB; num_perm {config.num_perm}, (bands, rows) {config.band_layout}, "
          f"word {config.ngram}-grams, threshold {config.threshold}", flush=True)
    sets: dict[int, set] = {}

    def exact(pair):
        for i in pair:
            if i not in sets:
                sets[i] = minhash.shingle_set(texts[i], config.ngram, config.unit)
        return minhash.exact_jaccard(sets[pair[0]], sets[pair[1]])

    runs = {"llmjax": run_ours(texts, config, 1)}
    if args.workers > 1:
        runs[f"llmjax-{args.workers}proc"] = run_ours(texts, config, args.workers)
    if not args.skip_datasketch:
        runs["datasketch"] = run_datasketch(texts, config)
    reported_all = set().union(*(pairs for pairs, _ in runs.values()))
    planted_similarity = [exact(p) for p in planted]
    positives = {p for p in set(planted) | reported_all if exact(p) >= config.threshold}
    results = {}
    for name, (pairs, seconds) in runs.items():
        results[name] = {"seconds": seconds, "documents_per_second": len(texts) / seconds,
                         **score(pairs, positives, exact, config.threshold)}
    report = {"command": " ".join(["python -m experiments bench_dedup", *(argv if argv is not None else sys.argv[1:])]),
              "documents": len(texts), "planted": len(planted), "edit_rate": args.edit_rate,
              "threshold": config.threshold,
              "num_perm": config.num_perm, "bands_rows": list(config.band_layout), "ngram": config.ngram,
              "verify": config.verify,
              "positives": len(positives),
              "planted_exact_jaccard": {"min": float(np.min(planted_similarity)),
                                        "median": float(np.median(planted_similarity)),
                                        "below_threshold": int(sum(s < config.threshold for s in planted_similarity))},
              "results": results}
    if "datasketch" in results:
        report["speedup"] = {name: r["documents_per_second"] / results["datasketch"]["documents_per_second"]
                             for name, r in results.items() if name != "datasketch"}
    print(f"{'implementation':<16} {'seconds':>8} {'docs/s':>9} {'pairs':>7} {'precision':>9} {'recall':>7}")
    for name, r in results.items():
        print(f"{name:<16} {r['seconds']:8.2f} {r['documents_per_second']:9.0f} {r['reported_pairs']:7d} "
              f"{r['precision']:9.4f} {r['recall']:7.4f}")
    for name, speedup in report.get("speedup", {}).items():
        print(f"speedup of {name}: {speedup:.1f}x datasketch's documents/s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "bench_dedup.png")
    print(f"-> {args.out / 'report.json'}, {args.out / 'bench_dedup.png'}")
    return 0
