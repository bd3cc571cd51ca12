"""Recall@10 against queries/s: llmjax IVFPQIndex (anisotropic and plain PQ, the same code size) beside faiss
IndexIVFPQ + IndexRefineFlat (the same nlist, m, bits, re-rank depth) and faiss IndexHNSWFlat.

    python tools/ivfpq_vs_faiss.py --n 100000 --threads 2                       # CPU, ~ minutes
    python tools/ivfpq_vs_faiss.py --n 1000000 --queries 10000 --threads 16 --skip-faiss-ivf   # the GPU run

Data: a Gaussian mixture (--clusters centers) whose points have varied norms (a log-normal scale per point, so
inner-product search favours the large ones, as in MIPS); queries are drawn from the same mixture. Ground truth:
float32 brute force on the JAX device (ExactIndex). Queries/s: all queries in one search call, after a warm-up
(compilation excluded), the median of --repeats. Not a test: on a shared CPU the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from llmjax.retrieval import ExactIndex, recall_at_k
from llmjax.retrieval.ivfpq import IVFPQIndex


def mixture(n: int, dim: int, clusters: int, seed: int, centers_seed: int = 1234) -> np.ndarray:
    """[n, dim] float32: mixture points with a log-normal norm scale each."""
    centers = np.random.default_rng(centers_seed).normal(size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    points = centers[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    return (points * np.exp(0.3 * rng.normal(size=(n, 1)))).astype(np.float32)


def timed(search, repeats: int):
    """(result of the last call, median seconds) after one warm-up call."""
    search()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = search()
        seconds.append(time.perf_counter() - start)
    return result, float(np.median(seconds))


def run_ours(args, base, queries, truth, rows):
    for loss in args.losses:
        index = IVFPQIndex(args.dim, args.metric, nlist=args.nlist, m=args.m, bits=8, loss=loss,
                           anisotropic_threshold=args.threshold, query_block=args.query_block,
                           vector_dtype=args.vector_dtype, max_codes=args.max_codes)
        start = time.perf_counter()
        index.add(np.arange(len(base)), base)
        build = time.perf_counter() - start
        for nprobe in args.nprobe:
            for reorder in args.reorder:
                (_, found), seconds = timed(lambda: index.search(queries, 10, nprobe=nprobe, reorder=reorder),
                                            args.repeats)
                rows.append(dict(system=f"llmjax ivfpq {loss}", nprobe=nprobe, reorder=reorder,
                                 recall=recall_at_k(found, truth), qps=len(queries) / seconds, build_s=build))
                print(rows[-1], flush=True)


def run_faiss(args, base, queries, truth, rows):
    import faiss

    faiss.omp_set_num_threads(args.threads)
    metric = faiss.METRIC_L2 if args.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if args.metric == "cosine":
        base, queries = base / np.linalg.norm(base, axis=1, keepdims=True), \
            queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if not args.skip_faiss_ivf:
        coarse = faiss.IndexFlatL2(args.dim) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(args.dim)
        ivf = faiss.IndexIVFPQ(coarse, args.dim, args.nlist, args.m, 8, metric)
        start = time.perf_counter()
        ivf.train(base[: max(65536, 64 * args.nlist)])
        refine = faiss.IndexRefineFlat(ivf)  # keeps the float vectors for the re-rank
        refine.add(base)
        build = time.perf_counter() - start
        for nprobe in args.nprobe:
            for reorder in args.reorder:
                params = faiss.IndexRefineSearchParameters(k_factor=reorder / 10,
                                                           base_index_params=faiss.SearchParametersIVF(
                    nprobe=nprobe, max_codes=args.max_codes or 0))
                (_, found), seconds = timed(lambda: refine.search(queries, 10, params=params), args.repeats)
                rows.append(dict(system="faiss IVFPQ+RefineFlat", nprobe=nprobe, reorder=reorder,
                                 recall=recall_at_k(found, truth), qps=len(queries) / seconds, build_s=build))
                print(rows[-1], flush=True)
    hnsw = faiss.IndexHNSWFlat(args.dim, args.hnsw_m, metric)
    hnsw.hnsw.efConstruction = args.ef_construction
    start = time.perf_counter()
    hnsw.add(base)
    build = time.perf_counter() - start
    for ef in args.ef_search:
        hnsw.hnsw.efSearch = ef
        (_, found), seconds = timed(lambda: hnsw.search(queries, 10), args.repeats)
        rows.append(dict(system=f"faiss HNSWFlat M={args.hnsw_m}", ef=ef, recall=recall_at_k(found, truth),
                         qps=len(queries) / seconds, build_s=build))
        print(rows[-1], flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=256)
    parser.add_argument("--metric", default="l2", choices=("ip", "cosine", "l2"))
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--losses", nargs="+", default=["anisotropic", "reconstruction"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--reorder", type=int, nargs="+", default=[100])
    parser.add_argument("--query-block", type=int, default=256)
    parser.add_argument("--max-codes", type=int, default=None, help="codes scored per query at most (both IVFs)")
    parser.add_argument("--vector-dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--skip-faiss-ivf", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()

    import jax

    print(f"device: {jax.devices()[0].device_kind}; n={args.n} dim={args.dim} queries={args.queries} "
          f"metric={args.metric} nlist={args.nlist} m={args.m} (8 bits) threads={args.threads}", flush=True)
    base, queries = mixture(args.n, args.dim, args.clusters, 0), mixture(args.queries, args.dim, args.clusters, 1)
    exact = ExactIndex(args.dim, args.metric)
    exact.add(np.arange(args.n), base)
    truth = exact.search(queries, 10)[1]
    rows = []
    if not args.skip_ours:
        run_ours(args, base, queries, truth, rows)
    if not args.skip_faiss:
        run_faiss(args, base, queries, truth, rows)
    print(f"\n{'system':34} {'nprobe/ef':>9} {'reorder':>7} {'recall@10':>9} {'queries/s':>10} {'build s':>8}")
    for row in rows:
        knob = row.get("nprobe", row.get("ef"))
        print(f"{row['system']:34} {knob:>9} {row.get('reorder', ''):>7} {row['recall']:>9.3f} {row['qps']:>10.0f} "
              f"{row['build_s']:>8.1f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "device": jax.devices()[0].device_kind, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
