"""Benchmark vector search: recall@k vs queries/s of our indexes and faiss / hnswlib / usearch, plain and filtered."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

PROG = "python -m experiments bench_vector_search"
OURS = ("exact", "exact-approx", "hnsw", "ivfpq", "filtered_vamana")
PEERS = ("faiss-flat", "faiss-hnsw", "faiss-ivfpq", "hnswlib", "usearch")
PEER_MODULES = {"faiss-flat": "faiss", "faiss-hnsw": "faiss", "faiss-ivfpq": "faiss", "hnswlib": "hnswlib",
                "usearch": "usearch.index"}
FILTERS = ("none", "rare", "common")
NOT_INSTALLED = "not installed (pip install '.[bench]')"
STDLIB_WINDOW = 256  # tokens a window, [CLS] and [SEP] included
CPU_TEXTS_PER_S = 7.0  # MiniLM on 2 CPU cores, 256 tokens a text: the refusal estimate before anything is timed


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parse_args(argv):
    p = Parser(
        prog=PROG,
        description="Recall@k against queries/s for llmjax's vector indexes (exact, exact with approx_max_k, HNSW, "
        "IVF + anisotropic / plain PQ, Filtered-Vamana) and the peers faiss (IndexFlat, IndexHNSWFlat, IndexIVFPQ "
        "with and without IndexRefineFlat), hnswlib and usearch, measured in the same run with the same thread "
        "count. Each index is built once (build seconds and memory reported) and swept over its search knob; "
        "filtered search (the RARE ~1%% and COMMON ~30%% labels of datasets.skewed_labels) compares Filtered-Vamana "
        "with HNSW post- and pre-filtering and faiss HNSW (post-filtering, and its IDSelector). Writes a table, JSON "
        "(--out) and a PNG beside it. Peers that are not installed are listed as such; the rest runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="gmm",
                   help="gmm (Gaussian mixture, l2), stdlib (the default corpus in ~256-token windows embedded by "
                   "all-MiniLM-L6-v2, cosine) or the folder of a saved vector set")
    p.add_argument("--stdlib", type=Path, default=None,
                   help="stdlib: a copy of a standard library folder to read instead of this Python's (e.g. the "
                   "development machine's, carried to the GPU machine, whose distribution ships fewer files)")
    p.add_argument("--data-dir", type=Path, default=Path("runs/vector_data"), help="where made data sets are cached")
    p.add_argument("--n", type=int, default=None, help="base vectors (default: gmm 1,000,000; stdlib 200,000)")
    p.add_argument("--dim", type=int, default=128, help="gmm: dimension")
    p.add_argument("--norm-spread", type=float, default=0.0,
                   help="gmm: scale each point by exp(s * N(0, 1)): varied norms, so inner-product search favours the "
                   "large ones (the case anisotropic PQ is for; e.g. --metric ip --norm-spread 0.3)")
    p.add_argument("--queries", type=int, default=None, help="query vectors (default: gmm 10,000; stdlib 1,000)")
    p.add_argument("--metric", choices=("l2", "ip", "cosine"), default=None,
                   help="default: l2 for gmm, cosine for stdlib, the set's own for a PATH")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    p.add_argument("--build-only", action="store_true", help="make (or check) the data set and stop")
    p.add_argument("--force", action="store_true", help="stdlib: embed on the CPU even when it takes hours")
    p.add_argument("--indexes", default=",".join(OURS + PEERS),
                   help=f"comma-separated, from: {', '.join(OURS + PEERS)}")
    p.add_argument("--hide-peers", action="store_true",
                   help="treat faiss / hnswlib / usearch as not installed (the path CI takes without the bench extra)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every index (faiss OpenMP, hnswlib, usearch, numba, XLA's CPU); 0: all cores; "
                   "default 2 on the CPU, all cores with --device gpu")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="where our JAX indexes (exact, ivfpq) run; default: where JAX runs")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per search setting (median; one warm-up first)")
    p.add_argument("--target", type=float, default=0.95, help="the recall the summary compares queries/s at")
    p.add_argument("--M", type=int, nargs="+", default=[16, 32], help="HNSW neighbours per node (ours and peers)")
    p.add_argument("--ef-construction", type=int, default=200, help="HNSW build beam (ours and peers)")
    p.add_argument("--ef", type=int, nargs="+", default=[10, 16, 24, 32, 48, 64, 96, 128, 192, 256],
                   help="HNSW search beams swept (ours, faiss efSearch, hnswlib ef, usearch expansion)")
    p.add_argument("--filter-ef", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024],
                   help="HNSW beams swept under a filter (post-filtering needs larger ones)")
    p.add_argument("--R", type=int, default=64, help="Filtered-Vamana out-degree")
    p.add_argument("--L-build", type=int, default=100, help="Filtered-Vamana build beam")
    p.add_argument("--L", type=int, nargs="+", default=[10, 16, 24, 32, 48, 64, 96, 128, 192, 256],
                   help="Filtered-Vamana search beams swept")
    p.add_argument("--nlist", type=int, default=None,
                   help="IVF lists (ours and faiss); default: ~sqrt(n), a power of 2")
    p.add_argument("--pq-m", type=int, default=None, help="PQ subspaces of 8 bits (ours and faiss); default dim / 4")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128],
                   help="IVF lists probed, swept (values above nlist dropped)")
    p.add_argument("--reorder", type=int, default=100, help="IVF candidates re-ranked exactly (faiss: k_factor)")
    p.add_argument("--max-codes", type=int, default=None,
                   help="IVF: at most this many codes scored per query (ours and faiss's max_codes; default: every "
                   "probed code)")
    p.add_argument("--vector-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="our ivfpq: the dtype of the vectors kept for the exact re-rank")
    p.add_argument("--threshold", type=float, default=0.2, help="anisotropic threshold T of our ivfpq")
    p.add_argument("--approx-recall", type=float, nargs="+", default=[0.8, 0.9, 0.95],
                   help="exact-approx: approx_max_k recall targets swept")
    p.add_argument("--query-block", type=int, default=None,
                   help="queries per JAX call of exact search (default 1024 on the CPU, 10,000 on a GPU)")
    p.add_argument("--ivf-query-block", type=int, default=None,
                   help="queries per JAX call of ivfpq search (default 256 on the CPU, 1024 on a GPU)")
    p.add_argument("--quick", action="store_true",
                   help="tiny CPU smoke run: gmm 5,000 x 32, 100 queries, M 16, short sweeps, 1 repeat")
    p.add_argument("--out", type=Path, default=Path("runs/bench/vector_search.json"),
                   help="JSON results; a PNG beside it (same name, .png)")
    args = p.parse_args(argv)
    if args.quick:
        args.n = 5000 if args.n is None else args.n
        args.queries = 100 if args.queries is None else args.queries
        args.dim = 32 if args.data == "gmm" else args.dim
        args.M, args.ef_construction, args.repeats = [16], 64, 1
        args.ef, args.filter_ef, args.L = [10, 20, 40, 80], [20, 80, 320], [10, 20, 40, 80]
        args.nprobe, args.approx_recall, args.R, args.L_build = [1, 4, 16], [0.9], 32, 48
    names = [name.strip() for name in args.indexes.split(",") if name.strip()]
    unknown = [name for name in names if name not in OURS + PEERS]
    if unknown:
        p.error(f"--indexes: unknown index {unknown[0]!r}; choose from {', '.join(OURS + PEERS)}")
    args.indexes = names
    if args.data not in ("gmm", "stdlib") and not Path(args.data).is_dir():
        p.error(f"--data {args.data!r}: expected gmm, stdlib or the folder of a saved vector set")
    for name in ("n", "queries"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be >= 1")
    for name in ("dim", "k", "repeats", "ef_construction", "R", "L_build", "reorder"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.threads is not None and args.threads < 0:
        p.error(f"--threads={args.threads}: must be >= 0 (0: all cores)")
    if not 0 < args.target <= 1:
        p.error(f"--target={args.target}: expected a recall in (0, 1]")
    if args.n is not None and args.k > args.n:
        p.error(f"--k={args.k} is larger than --n={args.n}")
    return args


# ---- the machine ------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def set_thread_env(threads: int, device: str | None) -> None:
    """Before jax is imported: XLA's CPU thread count, and the CPU platform when --device cpu."""
    if "jax" in sys.modules:
        return
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                                   f"intra_op_parallelism_threads={threads}").strip()


def peer_module(name: str, hidden: bool):
    """The peer's module, or None when it is not installed (or --hide-peers)."""
    if hidden:
        return None
    try:
        return importlib.import_module(PEER_MODULES[name])
    except ImportError:
        return None


# ---- data -------------------------------------------------------------------------------------------------------


def pow2_near(x: float) -> int:
    return int(2 ** round(math.log2(max(x, 1))))


def data_name(args) -> str:
    if args.data == "gmm":
        spread = f"-norms{args.norm_spread:g}" if args.norm_spread else ""
        return f"gmm-{args.n}x{args.dim}{spread}-q{args.queries}-{args.metric}-k{args.k}"
    return f"stdlib-{args.n}-q{args.queries}-k{args.k}"


def vector_set(args):
    """The data set (made and cached under --data-dir unless it is there already, or loaded from --data PATH)."""
    from llmjax.retrieval.base import RetrievalError
    from llmjax.retrieval.datasets import load_vector_set, save_vector_set

    if args.data not in ("gmm", "stdlib"):
        try:
            data = load_vector_set(args.data)
        except (RetrievalError, OSError, KeyError, ValueError) as error:
            fail(str(error).splitlines()[0])
        return data, Path(args.data)
    folder = args.data_dir / data_name(args)
    if (folder / "meta.json").is_file():
        data = load_vector_set(folder)
        print(f"data: {folder} (cached)", flush=True)
        return data, folder
    data = make_gmm(args) if args.data == "gmm" else make_stdlib(args)
    save_vector_set(folder, data)
    print(f"data: made {folder}", flush=True)
    return data, folder


def with_truth(base, queries, offsets, values, k, metric, meta):
    from llmjax.retrieval.datasets import COMMON, RARE, VectorSet, ground_truth, truth_key

    start = time.perf_counter()
    truth = ground_truth(base, queries, k, metric, label_offsets=offsets, label_values=values,
                         filters=(None, RARE, COMMON))
    meta = {**meta, "truth_seconds": time.perf_counter() - start, "k": k, "metric": metric, "n": len(base),
            "queries": len(queries), "dim": base.shape[1], "labels": {"rare": RARE, "common": COMMON},
            "label_share": {"rare": float(np.mean(np.isin(np.arange(len(base)), owners(offsets, values, RARE)))),
                            "common": float(np.mean(np.isin(np.arange(len(base)), owners(offsets, values, COMMON))))}}
    return VectorSet(base, queries, offsets, values, {truth_key(f): ids for f, ids in truth.items()}, meta)


def owners(offsets, values, label):
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[values == label]


def make_gmm(args):
    from llmjax.retrieval.datasets import gaussian_mixture, skewed_labels

    print(f"data: gaussian mixture {args.n} x {args.dim} + {args.queries} queries ...", flush=True)
    points = gaussian_mixture(args.n + args.queries, args.dim, seed=0)
    if args.norm_spread:  # varied norms (the MIPS case): a log-normal scale per point
        points *= np.exp(args.norm_spread * np.random.default_rng(2).standard_normal((len(points), 1))).astype(
            np.float32)
    base, queries = points[: args.n], np.ascontiguousarray(points[args.n:])
    offsets, values = skewed_labels(args.n, seed=0)
    meta = {"source": "gmm", "note": "queries: the last --queries points of one gaussian_mixture(n + queries, seed=0) "
            "draw (the same mixture; not in the base)",
            "norm_spread": args.norm_spread}
    return with_truth(base, queries, offsets, values, args.k, args.metric, meta)


def choose_stride(lengths: list[int], window: int, n: int) -> int:
    """The largest stride (<= window) that gives at least n windows over documents of these lengths (1 if none)."""
    def count(stride):
        return sum(1 + -(-max(length - window, 0) // stride) for length in lengths)
    for stride in range(window, 0, -1):
        if count(stride) >= n:
            return stride
    return 1


def make_stdlib(args):
    """The default corpus tokenized by MiniLM's WordPiece, cut into windows of STDLIB_WINDOW - 2 word pieces
    ([CLS] window [SEP]), embedded from the ids (mean pooling, normalized). Queries: windows of held-out files."""
    import jax

    from llmjax.data.corpus import default_corpus, read_text, split_of
    from llmjax.embed import embed_ids
    from llmjax.io.models import load_model
    from llmjax.retrieval.datasets import skewed_labels, text_windows

    total = args.n + args.queries
    on_cpu = jax.default_backend() == "cpu"
    estimate = total / CPU_TEXTS_PER_S
    print(f"data: stdlib windows: {args.n} + {args.queries} texts of {STDLIB_WINDOW} tokens to embed on "
          f"{jax.devices()[0].device_kind}" + (f" (~{estimate / 3600:.1f} h on the CPU at ~{CPU_TEXTS_PER_S:.0f} "
                                               f"texts/s)" if on_cpu else ""), flush=True)
    if on_cpu and estimate > 600 and not args.force:
        fail(f"embedding {total} windows on the CPU takes ~{estimate / 3600:.1f} h: make the set on a GPU, lower "
             f"--n / --queries, or pass --force")
    model = load_model(hf="all-minilm-l6-v2")
    tokenizer, window = model.tokenizer, STDLIB_WINDOW - 2
    held_out_fraction = 0.05
    base_docs, query_docs = [], []
    need_tokens = (args.n + 8) * window  # non-overlapping windows suffice for a small --n: stop reading early
    read = 0
    files = default_corpus(args.stdlib)
    order = np.random.default_rng(0).permutation(len(files))
    for i in order:
        f = files[i]
        held_out = split_of(f.key, held_out_fraction) == "validation"
        if not held_out and read >= need_tokens:
            continue
        if held_out and sum(map(len, query_docs)) >= (args.queries + 8) * window and read >= need_tokens:
            continue
        ids = np.asarray(tokenizer.encode_ordinary(read_text(f.path)), np.int32)
        if len(ids) == 0:
            continue
        (query_docs if held_out else base_docs).append(ids)
        read += 0 if held_out else len(ids)
    stride = choose_stride([len(d) for d in base_docs], window, args.n)
    base_windows = text_windows(base_docs, window, stride)
    query_windows = text_windows(query_docs, window, window)
    if len(base_windows) < args.n or len(query_windows) < args.queries:
        fail(f"the default corpus gives {len(base_windows)} base and {len(query_windows)} query windows: fewer than "
             f"--n={args.n} / --queries={args.queries}")
    rng = np.random.default_rng(1)
    base_windows = [base_windows[i] for i in np.sort(rng.choice(len(base_windows), args.n, replace=False))]
    query_windows = [query_windows[i] for i in np.sort(rng.choice(len(query_windows), args.queries, replace=False))]

    started = time.perf_counter()

    def embed(docs, windows):  # [CLS] window [SEP], embedded from the ids (no second tokenization)
        sequences = [[tokenizer.cls_id, *docs[d][s: s + window].tolist(), tokenizer.sep_id] for d, s in windows]
        return embed_ids(model.params, model.cfg, sequences, pad_id=tokenizer.special_ids.pad or 0,
                         batch_size=256 if not on_cpu else 16, max_len=STDLIB_WINDOW, progress=True)

    base = embed(base_docs, base_windows)
    queries = embed(query_docs, query_windows)
    offsets, values = skewed_labels(args.n, seed=0)
    meta = {"source": "stdlib", "model": "all-MiniLM-L6-v2 (mean pooling, normalized)",
            "window_tokens": STDLIB_WINDOW, "word_pieces_per_window": window, "stride": stride,
            "windows_overlap": stride < window, "overlap_tokens": window - stride,
            "note": f"base windows {stride} word pieces apart ({'overlapping' if stride < window else 'disjoint'}), "
                    f"{args.n} sampled; queries: disjoint windows of held-out files (split_of(path, "
                    f"{held_out_fraction}) == 'validation'), never in the base",
            "base_files": len(base_docs), "held_out_files": len(query_docs), "corpus_files": len(files),
            "stdlib": str(args.stdlib) if args.stdlib else "this Python's",
            "embed_seconds": time.perf_counter() - started}
    return with_truth(base, queries, offsets, values, args.k, "cosine", meta)


# ---- measuring --------------------------------------------------------------------------------------------------


def timed(search, repeats: int):
    """(result of the last call, median seconds) after one warm-up call."""
    result = search()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = search()
        seconds.append(time.perf_counter() - start)
    return result, float(np.median(seconds))


def sweep(search, values, queries, truth, repeats, knob):
    """[{knob, value, recall, qps}] for each knob value; search(value) -> ids [q, k]."""
    from llmjax.retrieval import recall_at_k

    points = []
    for value in values:
        found, seconds = timed(lambda: search(value), repeats)
        points.append({"knob": knob, "value": value, "recall": recall_at_k(found, truth),
                       "qps": len(queries) / max(seconds, 1e-9)})
    return points


def qps_at(points, target):
    """Queries/s at recall `target` (the best of the points reaching it, interpolated in log qps between the sweep
    points around it); None when no point reaches it."""
    best = None
    ordered = sorted(points, key=lambda p: p["recall"])
    for a, b in zip(ordered, ordered[1:]):
        if a["recall"] < target <= b["recall"] and b["recall"] > a["recall"]:
            t = (target - a["recall"]) / (b["recall"] - a["recall"])
            q = math.exp(math.log(a["qps"]) + t * (math.log(b["qps"]) - math.log(a["qps"])))
            best = q if best is None else max(best, q)
    for p in points:
        if p["recall"] >= target:
            best = p["qps"] if best is None else max(best, p["qps"])
    return best


def recall_at_qps(points, qps):
    """Recall at `qps` interpolated (log qps) along the sweep's pareto front; None outside its range."""
    ordered = sorted(points, key=lambda p: p["qps"])
    for a, b in zip(ordered, ordered[1:]):
        if a["qps"] <= qps <= b["qps"]:
            if b["qps"] == a["qps"]:
                return max(a["recall"], b["recall"])
            t = (math.log(qps) - math.log(a["qps"])) / (math.log(b["qps"]) - math.log(a["qps"]))
            return a["recall"] + t * (b["recall"] - a["recall"])
    if len(ordered) == 1 and math.isclose(ordered[0]["qps"], qps):
        return ordered[0]["recall"]
    return None


class Runner:
    """Builds each index once and sweeps it, plain and under the RARE / COMMON filters."""

    def __init__(self, args, data, threads):
        from llmjax.retrieval.datasets import COMMON, RARE, label_sets, truth_key

        self.args, self.threads = args, threads
        self.metric = data.meta["metric"]
        self.base = np.ascontiguousarray(data.base, dtype=np.float32)
        self.queries = np.ascontiguousarray(data.queries, dtype=np.float32)
        self.n, self.dim = self.base.shape
        self.k = args.k
        self.truth = {f: data.truth[truth_key(label)][:, : self.k]
                      for f, label in (("none", None), ("rare", RARE), ("common", COMMON))}
        self.label = {"rare": RARE, "common": COMMON}
        self.labels = label_sets(data.label_offsets, data.label_values)
        self.masks = {f: np.isin(np.arange(self.n), owners(data.label_offsets, data.label_values, lab))
                      for f, lab in self.label.items()}
        self.results: list[dict] = []
        peers_unit = self.base
        if self.metric == "cosine":  # the peers get unit vectors and inner products
            from llmjax.retrieval.base import normalize
            peers_unit = normalize(self.base)
            self.peer_queries = normalize(self.queries)
        else:
            self.peer_queries = self.queries
        self.peer_base = np.ascontiguousarray(peers_unit, dtype=np.float32)

    # ---- bookkeeping ------------------------------------------------------------------------------------------

    def entry(self, name, system, params, peer):
        entry = {"name": name, "system": system, "params": params, "peer": peer, "status": "ok", "build_s": None,
                 "bytes": None, "series": []}
        self.results.append(entry)
        return entry

    def series(self, entry, filter, mode, knob, values, search, truth=None):
        values = list(values)
        if not values:
            return
        points = sweep(search, values, self.queries, self.truth[filter] if truth is None else truth,
                       self.args.repeats, knob)
        entry["series"].append({"filter": filter, "mode": mode, "points": points})
        label = entry["name"] + (f" [{mode}]" if mode else "")
        print(f"  {label:34} {filter:6} " + "  ".join(f"{knob}={p['value']}: {p['recall']:.3f} @ {p['qps']:.0f}/s"
                                                      for p in points), flush=True)

    def build(self, entry, make):
        start = time.perf_counter()
        index = make()
        entry["build_s"] = time.perf_counter() - start
        print(f"{entry['name']}: built in {entry['build_s']:.1f} s", flush=True)
        return index

    def ids(self):
        return np.arange(self.n, dtype=np.int64)

    # ---- ours -------------------------------------------------------------------------------------------------

    def ours(self, name):
        args, k = self.args, self.k
        if name in ("exact", "exact-approx"):
            from llmjax.retrieval import ExactIndex

            approx = name == "exact-approx"
            entry = self.entry(f"llmjax {name}", "llmjax", {"dtype": "float32", "query_block": args.query_block,
                                                            "device": args.device}, False)

            def make():
                index = ExactIndex(self.dim, self.metric, query_block=args.query_block)
                index.add(self.ids(), self.base, labels=self.labels)
                return index
            index = self.build(entry, make)
            entry["bytes"] = index.stats().bytes
            values, knob = (args.approx_recall, "approx_recall") if approx else ([None], "exact")
            for f in FILTERS:
                label = None if f == "none" else self.label[f]
                self.series(entry, f, "", knob, values, lambda v: index.search(self.queries, k, filter=label,
                                                                               approx_recall=v)[1])
        elif name == "hnsw":
            from llmjax.retrieval.hnsw import HNSWIndex

            self.warm_numba(HNSWIndex(self.dim, self.metric, M=8, threads=self.threads))
            for M in args.M:
                entry = self.entry(f"llmjax hnsw M={M}", "llmjax", {"M": M, "ef_construction": args.ef_construction,
                                                                    "threads": self.threads}, False)

                def make(M=M):
                    index = HNSWIndex(self.dim, self.metric, M=M, ef_construction=args.ef_construction,
                                      threads=self.threads)
                    index.add(self.ids(), self.base, labels=self.labels)
                    return index
                index = self.build(entry, make)
                entry["bytes"] = index.stats().bytes
                self.series(entry, "none", "", "ef", [e for e in args.ef if e >= k],
                            lambda e: index.search(self.queries, k, ef=e)[1])
                if M == args.M[0]:  # the filtering baselines on the first graph
                    for f in ("rare", "common"):
                        self.series(entry, f, "post-filter", "ef", [e for e in args.filter_ef if e >= k],
                                    lambda e: index.search(self.queries, k, filter=self.label[f], ef=e)[1])
                        self.series(entry, f, "pre-filter", "brute force", [None],
                                    lambda _: index.search(self.queries, k, filter=self.label[f],
                                                           filter_mode="pre")[1])
        elif name == "ivfpq":
            from llmjax.retrieval.ivfpq import IVFPQIndex

            for loss in ("anisotropic", "reconstruction"):
                params = {"nlist": args.nlist, "m": args.pq_m, "bits": 8, "loss": loss, "reorder": args.reorder,
                          "anisotropic_threshold": args.threshold if loss == "anisotropic" else None,
                          "max_codes": args.max_codes, "vector_dtype": args.vector_dtype,
                          "query_block": args.ivf_query_block, "device": args.device}
                entry = self.entry(f"llmjax ivfpq {loss}", "llmjax", params, False)

                def make(loss=loss):
                    index = IVFPQIndex(self.dim, self.metric, nlist=args.nlist, m=args.pq_m, bits=8, loss=loss,
                                       anisotropic_threshold=args.threshold, reorder=args.reorder,
                                       query_block=args.ivf_query_block, max_codes=args.max_codes,
                                       vector_dtype=args.vector_dtype)
                    index.add(self.ids(), self.base, labels=self.labels)
                    return index
                index = self.build(entry, make)
                entry["bytes"] = index.stats().bytes
                probes = [p for p in args.nprobe if p <= args.nlist]
                for f in FILTERS if loss == "anisotropic" else ("none",):
                    label = None if f == "none" else self.label[f]
                    self.series(entry, f, "", "nprobe", probes,
                                lambda p: index.search(self.queries, k, filter=label, nprobe=p,
                                                       reorder=max(args.reorder, k))[1])
        elif name == "filtered_vamana":
            from llmjax.retrieval.filtered_vamana import FilteredVamanaIndex

            self.warm_numba(FilteredVamanaIndex(self.dim, self.metric, R=8, L=16, threads=self.threads))
            entry = self.entry("llmjax filtered_vamana", "llmjax", {"R": args.R, "L": args.L_build, "alpha": 1.2,
                                                                    "threads": self.threads}, False)

            def make():
                index = FilteredVamanaIndex(self.dim, self.metric, R=args.R, L=args.L_build, threads=self.threads)
                index.add(self.ids(), self.base, labels=self.labels)
                return index
            index = self.build(entry, make)
            entry["bytes"] = index.stats().bytes
            for f in FILTERS:
                label = None if f == "none" else self.label[f]
                self.series(entry, f, "", "L", [v for v in args.L if v >= k],
                            lambda v: index.search(self.queries, k, filter=label, L=v)[1])

    def warm_numba(self, index):
        """Load (or compile) the numba kernels before anything is timed."""
        rows = min(self.n, 200)
        index.add(np.arange(rows), self.base[:rows], labels=self.labels[:rows])
        index.search(self.queries[:4], min(self.k, rows))
        for label in self.label.values():
            if any(label in set(s.tolist()) for s in self.labels[:rows]):
                index.search(self.queries[:4], 1, filter=label)

    # ---- peers ------------------------------------------------------------------------------------------------

    def peer(self, name):
        module = peer_module(name, self.args.hide_peers)
        if module is None:
            entry = self.entry(name, PEER_MODULES[name].split(".")[0], {}, True)
            entry["status"] = NOT_INSTALLED
            print(f"{name}: {NOT_INSTALLED}", flush=True)
            return
        getattr(self, "peer_" + name.replace("-", "_"))(module)

    def faiss_metric(self, faiss):
        return faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT

    def peer_faiss_flat(self, faiss):
        faiss.omp_set_num_threads(self.threads)
        flat = "IndexFlatL2" if self.metric == "l2" else "IndexFlatIP"
        entry = self.entry(f"faiss {flat}", "faiss", {"threads": self.threads}, True)

        def make():
            index = getattr(faiss, flat)(self.dim)
            index.add(self.peer_base)
            return index
        index = self.build(entry, make)
        entry["bytes"] = int(index.ntotal * self.dim * 4)
        self.series(entry, "none", "", "exact", [None], lambda _: index.search(self.peer_queries, self.k)[1])

    def peer_faiss_hnsw(self, faiss):
        args, k = self.args, self.k
        faiss.omp_set_num_threads(self.threads)
        for M in args.M:
            entry = self.entry(f"faiss HNSWFlat M={M}", "faiss", {"M": M, "efConstruction": args.ef_construction,
                                                                  "threads": self.threads}, True)

            def make(M=M):
                index = faiss.IndexHNSWFlat(self.dim, M, self.faiss_metric(faiss))
                index.hnsw.efConstruction = args.ef_construction
                index.add(self.peer_base)
                return index
            index = self.build(entry, make)
            entry["bytes"] = len(faiss.serialize_index(index))

            def plain(ef):
                index.hnsw.efSearch = ef
                return index.search(self.peer_queries, k)[1]
            self.series(entry, "none", "", "efSearch", [e for e in args.ef if e >= k], plain)
            if M != args.M[0]:
                continue
            for f in ("rare", "common"):
                mask = self.masks[f]

                def post(ef, mask=mask):  # the beam's ef results, the first k that carry the label
                    index.hnsw.efSearch = ef
                    found = index.search(self.peer_queries, min(ef, self.n))[1]
                    keep = np.where(found >= 0, mask[np.maximum(found, 0)], False)
                    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
                    return np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(found, order, 1), -1)
                self.series(entry, f, "post-filter", "efSearch", [e for e in args.filter_ef if e >= k], post)
                try:
                    selector = faiss.IDSelectorBatch(np.flatnonzero(mask).astype(np.int64))
                    params = faiss.SearchParametersHNSW()
                    params.sel = selector

                    def selected(ef, params=params, selector=selector):
                        params.efSearch = ef
                        return index.search(self.peer_queries, k, params=params)[1]
                    self.series(entry, f, "IDSelector", "efSearch", [e for e in args.filter_ef if e >= k], selected)
                except (AttributeError, TypeError, RuntimeError) as error:
                    entry.setdefault("notes", []).append(f"IDSelector search failed: {error}")

    def peer_faiss_ivfpq(self, faiss):
        args, k = self.args, self.k
        faiss.omp_set_num_threads(self.threads)
        for refine in (False, True):
            name = "faiss IVFPQ" + ("+RefineFlat" if refine else "")
            entry = self.entry(name, "faiss", {"nlist": args.nlist, "m": args.pq_m, "bits": 8,
                                               "k_factor": args.reorder / k if refine else None,
                                               "max_codes": args.max_codes,
                                               "threads": self.threads}, True)

            def make(refine=refine):
                metric = self.faiss_metric(faiss)
                coarse = faiss.IndexFlatL2(self.dim) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(self.dim)
                ivf = faiss.IndexIVFPQ(coarse, self.dim, args.nlist, args.pq_m, 8, metric)
                ivf.train(self.peer_base[: max(65536, 64 * args.nlist)])
                index = faiss.IndexRefineFlat(ivf) if refine else ivf
                index.add(self.peer_base)
                return index, ivf, coarse
            index, ivf, coarse = self.build(entry, make)
            entry["bytes"] = len(faiss.serialize_index(index))
            probes = [p for p in args.nprobe if p <= args.nlist]

            def search(p, index=index, refine=refine):
                if refine:
                    params = faiss.IndexRefineSearchParameters(k_factor=max(args.reorder, k) / k,
                                                               base_index_params=faiss.SearchParametersIVF(
                        nprobe=p, max_codes=args.max_codes or 0))
                else:
                    params = faiss.SearchParametersIVF(nprobe=p, max_codes=args.max_codes or 0)
                return index.search(self.peer_queries, k, params=params)[1]
            self.series(entry, "none", "", "nprobe", probes, search)

    def peer_hnswlib(self, hnswlib):
        args, k = self.args, self.k
        space = {"l2": "l2", "ip": "ip", "cosine": "ip"}[self.metric]
        for M in args.M:
            entry = self.entry(f"hnswlib M={M}", "hnswlib", {"M": M, "ef_construction": args.ef_construction,
                                                             "threads": self.threads}, True)

            def make(M=M):
                index = hnswlib.Index(space=space, dim=self.dim)
                index.init_index(self.n, M=M, ef_construction=args.ef_construction, random_seed=0)
                index.set_num_threads(self.threads)
                index.add_items(self.peer_base, np.arange(self.n))
                return index
            index = self.build(entry, make)
            entry["bytes"] = int(index.index_file_size())

            def search(ef, index=index):
                index.set_ef(ef)
                return index.knn_query(self.peer_queries, k, num_threads=self.threads)[0].astype(np.int64)
            self.series(entry, "none", "", "ef", [e for e in args.ef if e >= k], search)

    def peer_usearch(self, usearch_index):
        args, k = self.args, self.k
        metric = {"l2": "l2sq", "ip": "ip", "cosine": "ip"}[self.metric]
        for M in args.M:
            entry = self.entry(f"usearch M={M}", "usearch", {"connectivity": M, "expansion_add": args.ef_construction,
                                                             "threads": self.threads}, True)

            def make(M=M):
                index = usearch_index.Index(ndim=self.dim, metric=metric, dtype="f32", connectivity=M,
                                            expansion_add=args.ef_construction)
                index.add(np.arange(self.n), self.peer_base, threads=self.threads)
                return index
            index = self.build(entry, make)
            size = getattr(index, "serialized_length", None) or getattr(index, "memory_usage", None)
            entry["bytes"] = int(size) if size is not None else None

            def search(ef, index=index):
                index.expansion_search = ef
                matches = index.search(self.peer_queries, k, threads=self.threads)
                keys = np.asarray(matches.keys, np.int64).reshape(len(self.peer_queries), -1)
                counts = np.asarray(matches.counts).reshape(-1)
                keys = np.where(np.arange(keys.shape[1])[None, :] < counts[:, None], keys, -1)
                return keys
            self.series(entry, "none", "", "expansion_search", [e for e in args.ef if e >= k], search)


# ---- the summary ------------------------------------------------------------------------------------------------


def find_series(results, name, filter, mode=""):
    for entry in results:
        if entry["name"] == name:
            for s in entry["series"]:
                if s["filter"] == filter and s["mode"] == mode:
                    return entry, s["points"]
    return None, None


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarize(results, args, platform_name) -> dict:
    target = args.target
    summary = {"target_recall": target}
    # ours vs faiss HNSW, the same M
    rows = []
    for M in args.M:
        ours, ours_points = find_series(results, f"llmjax hnsw M={M}", "none")
        peer, peer_points = find_series(results, f"faiss HNSWFlat M={M}", "none")
        if ours_points and peer_points:
            a, b = qps_at(ours_points, target), qps_at(peer_points, target)
            rows.append({"M": M, "ours_qps": a, "faiss_qps": b, "qps_ratio": ratio(a, b),
                         "ours_build_s": ours["build_s"], "faiss_build_s": peer["build_s"],
                         "build_ratio": ratio(ours["build_s"], peer["build_s"])})
    summary["hnsw_vs_faiss_hnsw"] = rows or "needs hnsw and faiss-hnsw"
    # anisotropic vs plain PQ: same nlist / nprobe / reorder / code size
    _, aniso = find_series(results, "llmjax ivfpq anisotropic", "none")
    _, plain = find_series(results, "llmjax ivfpq reconstruction", "none")
    if aniso and plain:
        matched = [{"nprobe": a["value"], "anisotropic_recall": a["recall"], "plain_recall": p["recall"],
                    "anisotropic_qps": a["qps"], "plain_qps": p["qps"]} for a, p in zip(aniso, plain)]
        at_qps = [{"qps": p["qps"], "plain_recall": p["recall"], "anisotropic_recall": recall_at_qps(aniso, p["qps"])}
                  for p in plain]
        diffs = [r["anisotropic_recall"] - r["plain_recall"] for r in at_qps if r["anisotropic_recall"] is not None]
        summary["anisotropic_vs_plain"] = {"at_equal_nprobe": matched, "recall_at_plain_qps": at_qps,
                                           "mean_recall_gain_at_equal_qps": float(np.mean(diffs)) if diffs else None}
    else:
        summary["anisotropic_vs_plain"] = "needs ivfpq"
    # filtered vs post-filtering on RARE (and COMMON)
    filtered = {}
    for f in ("rare", "common"):
        _, vamana = find_series(results, "llmjax filtered_vamana", f)
        row = {"filtered_vamana_qps": qps_at(vamana, target) if vamana else None}
        for key, name, mode in (("hnsw_post", f"llmjax hnsw M={args.M[0]}", "post-filter"),
                                ("hnsw_pre", f"llmjax hnsw M={args.M[0]}", "pre-filter"),
                                ("faiss_post", f"faiss HNSWFlat M={args.M[0]}", "post-filter"),
                                ("faiss_idselector", f"faiss HNSWFlat M={args.M[0]}", "IDSelector")):
            _, points = find_series(results, name, f, mode)
            row[key + "_qps"] = qps_at(points, target) if points else None
            row[f"ratio_vs_{key}"] = ratio(row["filtered_vamana_qps"], row[key + "_qps"])
        filtered[f] = row
    summary["filtered_vs_post_filter"] = filtered
    # our JAX indexes (on the device) vs faiss HNSW on the CPU cores
    best, best_name = None, None
    for entry in results:
        if entry["system"] == "llmjax" and entry["name"].split()[1] in ("exact", "exact-approx", "ivfpq"):
            for s in entry["series"]:
                if s["filter"] == "none":
                    q = qps_at(s["points"], target)
                    if q is not None and (best is None or q > best):
                        best, best_name = q, entry["name"]
    faiss_best = max((q for M in args.M for q in [qps_at(find_series(results, f"faiss HNSWFlat M={M}", "none")[1]
                                                          or [], target)] if q is not None), default=None)
    summary["jax_vs_faiss_hnsw"] = {"device": platform_name, "best_jax_index": best_name, "jax_qps": best,
                                    "faiss_hnsw_qps": faiss_best, "qps_ratio": ratio(best, faiss_best),
                                    "goal": "GPU: >= 20x" if platform_name == "gpu" else "(the goal is for a GPU)"}
    return summary


# ---- output -----------------------------------------------------------------------------------------------------


def table(results, k) -> str:
    lines = [f"{'index':30} {'params':38} {'build s':>8} {'MiB':>8}  filter mode: knob=value recall@{k} / q/s"]
    for entry in results:
        params = " ".join(f"{key}={value}" for key, value in entry["params"].items()
                          if value is not None and key not in ("threads", "device"))
        build = "-" if entry["build_s"] is None else f"{entry['build_s']:.1f}"
        memory = "-" if entry["bytes"] is None else f"{entry['bytes'] / 2**20:.1f}"
        head = f"{entry['name']:30} {params[:38]:38} {build:>8} {memory:>8}"
        if entry["status"] != "ok":
            lines.append(f"{head}  {entry['status']}")
            continue
        for i, s in enumerate(entry["series"]):
            cells = " ".join(f"{p['value']}:{p['recall']:.3f}/{p['qps']:.0f}" for p in s["points"])
            lines.append(f"{head if i == 0 else ' ' * len(head)}  {s['filter']} {s['mode'] or '-'}: {cells}")
    return "\n".join(lines)


def plot(results, path: Path, title: str, k: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(FILTERS), figsize=(6 * len(FILTERS), 4.8))
    names = [entry["name"] + (f" [{s['mode']}]" if s["mode"] else "") for entry in results for s in entry["series"]]
    names = list(dict.fromkeys(names))  # one color per line, the same in every panel
    colors = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for entry in results:
        for s in entry["series"]:
            name = entry["name"] + (f" [{s['mode']}]" if s["mode"] else "")
            points = s["points"]  # in sweep order
            axes[FILTERS.index(s["filter"])].plot(
                [p["recall"] for p in points], [p["qps"] for p in points], marker="s" if entry["peer"] else "o",
                markersize=3, linestyle="--" if entry["peer"] else "-", color=colors(names.index(name) % colors.N),
                label=name)
    for axis, f in zip(axes, FILTERS):
        axis.set(yscale="log", xlabel=f"recall@{k}", ylabel="queries/s", title=f"filter: {f}")
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads if args.threads is not None else (0 if args.device == "gpu" else 2)
    threads = threads or os.cpu_count() or 1
    set_thread_env(threads, args.device)
    import jax

    platform_name = jax.default_backend()
    if args.device == "gpu" and platform_name != "gpu":
        fail(f"--device gpu: JAX runs on {platform_name} here (no CUDA GPU); leave --device out or use cpu")
    args.device = platform_name
    if args.data == "gmm":
        args.n = args.n or 1_000_000
        args.queries = args.queries or 10_000
        args.metric = args.metric or "l2"
    elif args.data == "stdlib":
        args.n, args.queries, args.metric = args.n or 200_000, args.queries or 1000, "cosine"
    if args.data in ("gmm", "stdlib") and args.k > args.n:
        fail(f"--k={args.k} is larger than --n={args.n}")
    data, folder = vector_set(args)
    n = len(data.base)
    if args.k > n:
        fail(f"--k={args.k} is larger than the data set ({n} vectors in {folder})")
    if data.truth["none"].shape[1] < args.k:
        fail(f"{folder}: ground truth holds {data.truth['none'].shape[1]} neighbours per query, fewer than "
             f"--k={args.k}; rebuild the set with --k {args.k}")
    if args.metric and args.data not in ("gmm", "stdlib") and args.metric != data.meta["metric"]:
        fail(f"--metric {args.metric}: the set's ground truth is for {data.meta['metric']}")
    if args.build_only:
        print(f"data: {n} x {data.base.shape[1]}, {len(data.queries)} queries, {data.meta['metric']}: {folder}")
        return 0
    gpu = platform_name == "gpu"
    args.query_block = args.query_block or (min(10_000, len(data.queries)) if gpu else 1024)
    args.ivf_query_block = args.ivf_query_block or (1024 if gpu else 256)
    args.nlist = args.nlist or max(1, min(pow2_near(math.sqrt(n)), n // 39 or 1))
    dim = data.base.shape[1]
    args.pq_m = args.pq_m or max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
    if dim % args.pq_m:
        fail(f"--pq-m={args.pq_m} does not divide the dimension {dim}")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "jax_platform": platform_name,
               "device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version()}
    print(f"{n} x {dim} {data.meta['metric']} ({data.meta.get('source', folder)}), {len(data.queries)} queries, "
          f"k={args.k}, {threads} threads; JAX on {machine['device']}; CPU {machine['cpu']}", flush=True)

    runner = Runner(args, data, threads)
    for name in args.indexes:
        if name in OURS:
            runner.ours(name)
        else:
            runner.peer(name)
    results = runner.results
    summary = summarize(results, args, platform_name)
    print()
    print(table(results, args.k))
    print("\nsummary:", json.dumps(summary, indent=1, default=str))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine, "data": {"folder": str(folder), **data.meta},
              "args": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
              "indexes": results, "summary": summary}
    args.out.write_text(json.dumps(record, indent=1, default=str))
    png = args.out.with_suffix(".png")
    plot(results, png, f"{n} x {dim} {data.meta['metric']} ({data.meta.get('source')}), k={args.k}, {threads} threads, "
         f"JAX on {machine['device']}, CPU {machine['cpu']}", args.k)
    print(f"\nresults: {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
