"""HNSWIndex against faiss.IndexHNSWFlat and hnswlib on one synthetic set: build time and queries/s at a recall.

    python tools/hnsw_vs_faiss.py --n 100000 --dim 128 --threads 2
    python tools/hnsw_vs_faiss.py --n 100000 --dim 128 --threads 2 --selectivity 0.01   # filtered search

Filtered (--selectivity s): each vector gets one of 1/s labels, each query one of them; FilteredVamanaIndex
against HNSWIndex's two baselines (post-filtering with a growing beam, pre-filtering by brute force).

Gaussian-mixture vectors (l2), the same M / ef_construction for all three, the same thread count; search is swept
over ef and the queries/s at `--recall` is interpolated between the two ef values around it. A developer check of
where we stand (CPU timings are noisy on a shared machine), not a test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def mixture(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(12345).normal(size=(clusters, dim)) * 2
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def ground_truth(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact l2 top k rows [q, k] (float32 matmul in blocks of queries)."""
    norms = np.sum(data ** 2, 1)
    rows = []
    for start in range(0, len(queries), 256):
        scores = 2 * queries[start:start + 256] @ data.T - norms[None, :]  # [b, n] larger is nearer
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        rows.append(np.take_along_axis(top, order, 1))
    return np.concatenate(rows)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def sweep(search, queries, truth, k, efs):
    """[(ef, recall, queries/s)] for each ef (best of two timed runs)."""
    points = []
    for ef in efs:
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            found = search(queries, k, ef)
            seconds.append(time.perf_counter() - start)
        points.append((ef, recall(found, truth), len(queries) / min(seconds)))
    return points


def qps_at(points, target):
    """Queries/s at the target recall, interpolated (None if no ef reaches it)."""
    for (ef0, r0, q0), (ef1, r1, q1) in zip(points, points[1:]):
        if r0 < target <= r1:
            return q0 + (q1 - q0) * (target - r0) / (r1 - r0)
    return points[0][2] if points and points[0][1] >= target else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--M", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--peers", default="faiss,hnswlib,llmjax")
    parser.add_argument("--selectivity", type=float, default=None)
    args = parser.parse_args()
    data, queries = mixture(args.n, args.dim, args.clusters, 0), mixture(args.queries, args.dim, args.clusters, 1)
    if args.selectivity:
        return filtered(args, data, queries)
    truth = ground_truth(data, queries, args.k)
    efs = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    results = {}
    for peer in args.peers.split(","):
        if peer == "faiss":
            import faiss
            faiss.omp_set_num_threads(args.threads)
            index = faiss.IndexHNSWFlat(args.dim, args.M)
            index.hnsw.efConstruction = args.ef_construction
            start = time.perf_counter()
            index.add(data)
            build = time.perf_counter() - start

            def search(q, k, ef, index=index):
                index.hnsw.efSearch = ef
                return index.search(q, k)[1]
        elif peer == "hnswlib":
            import hnswlib
            index = hnswlib.Index(space="l2", dim=args.dim)
            index.init_index(args.n, M=args.M, ef_construction=args.ef_construction, random_seed=0)
            index.set_num_threads(args.threads)
            start = time.perf_counter()
            index.add_items(data, np.arange(args.n))
            build = time.perf_counter() - start

            def search(q, k, ef, index=index):
                index.set_ef(max(ef, k))
                return index.knn_query(q, k)[0]
        else:
            from llmjax.retrieval.hnsw import HNSWIndex
            warm = HNSWIndex(args.dim, "l2", M=args.M, threads=args.threads)  # load the numba cache first
            warm.add(np.arange(100), data[:100])
            warm.search(queries[:4], args.k)
            index = HNSWIndex(args.dim, "l2", M=args.M, ef_construction=args.ef_construction, threads=args.threads)
            start = time.perf_counter()
            index.add(np.arange(args.n), data)
            build = time.perf_counter() - start

            def search(q, k, ef, index=index):
                return index.search(q, k, ef=max(ef, k))[1]
        points = sweep(search, queries, truth, args.k, efs)
        results[peer] = (build, points)
        print(f"{peer}: build {build:.1f} s; " + ", ".join(f"ef {ef}: R@{args.k} {r:.3f} {q:.0f} q/s"
                                                           for ef, r, q in points), flush=True)
    print(f"\n{args.n} x {args.dim} mixture ({args.clusters} clusters), l2, M={args.M}, "
          f"ef_construction={args.ef_construction}, {args.threads} threads, {args.queries} queries, k={args.k}")
    print(f"{'peer':10s} {'build s':>8s} {'q/s at R@' + str(args.k) + '=' + str(args.recall):>18s}")
    for peer, (build, points) in results.items():
        qps = qps_at(points, args.recall)
        print(f"{peer:10s} {build:8.1f} {('-' if qps is None else f'{qps:.0f}'):>18s}")


def filtered(args, data, queries):
    """FilteredVamanaIndex against HNSW post- and pre-filtering at one selectivity."""
    from llmjax.retrieval.filtered_vamana import FilteredVamanaIndex
    from llmjax.retrieval.hnsw import HNSWIndex

    rng = np.random.default_rng(7)
    num_labels = round(1 / args.selectivity)
    labels, wanted = rng.integers(0, num_labels, len(data)), rng.integers(0, num_labels, len(queries))
    truth = np.full((len(queries), args.k), -1)
    for label in np.unique(wanted):
        rows, members = np.flatnonzero(labels == label), np.flatnonzero(wanted == label)
        truth[members] = rows[ground_truth(data[rows], queries[members], args.k)]
    print(f"{len(data)} x {args.dim}, {num_labels} labels (selectivity {args.selectivity}), {args.threads} threads")
    for name in ("vamana", "hnsw"):
        start = time.perf_counter()
        if name == "vamana":
            index = FilteredVamanaIndex(args.dim, "l2", R=32, L=100, threads=args.threads)
        else:
            index = HNSWIndex(args.dim, "l2", M=args.M, ef_construction=args.ef_construction, threads=args.threads)
        index.add(np.arange(len(data)), data, labels=labels)
        print(f"{name}: build {time.perf_counter() - start:.1f} s", flush=True)
        modes = {"vamana": [("filtered", lambda q, k, w: index.search(q, k, filter=wanted, L=max(w, k)))],
                 "hnsw": [("post", lambda q, k, w: index.search(q, k, filter=wanted, ef=max(w, k))),
                          ("pre", lambda q, k, w: index.search(q, k, filter=wanted, filter_mode="pre"))]}[name]
        for mode, search in modes:
            points = sweep(lambda q, k, w: search(q, k, w)[1], queries, truth, args.k,
                           [10, 16, 32, 64, 128] if mode != "pre" else [10])
            print(f"  {name} {mode}: " + ", ".join(f"beam {w}: R@{args.k} {r:.3f} {q:.0f} q/s" for w, r, q in points),
                  flush=True)


if __name__ == "__main__":
    main()
