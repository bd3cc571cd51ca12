"""Benchmark data for vector search, made here with no download, cached under runs/.

- `gaussian_mixture`: the stress set (1M x 128 by default in the benchmark): points around many centers of varied
  spread and weight, so neighbourhoods are uneven the way real embeddings are.
- `skewed_labels`: labels for filtered search. Every vector carries one "category" drawn from a Zipf law over
  `categories` values, and independently the two probe labels: RARE (about 1% of vectors) and COMMON (about 30%).
  A query filtered on RARE must find its neighbours among 1 in 100 vectors: post-filtering a plain graph search
  needs ~100x the candidates there.
- `text_windows`: token windows of about `window` tokens over tokenized documents (the stdlib's source: the
  default corpus), `stride` apart, for the embedded set.
- `ground_truth`: exact top-k (ExactIndex, float32) for plain and filtered queries.

A data set on disk (`save_vector_set` / `load_vector_set`): one folder with base.npy [n, d], queries.npy [q, d],
labels.npz (CSR: offsets, values), truth.npz (per filter: ids [q, k]) and meta.json (how it was made).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmjax.retrieval.base import RetrievalError, atomic_folder

RARE, COMMON = 0, 1  # the two probe labels of skewed_labels; categories are 2, 3, ...


def gaussian_mixture(n: int, dim: int, *, centers: int = 1000, seed: int = 0) -> np.ndarray:
    """float32 [n, dim]: points around `centers` random centers; each center has its own weight (Zipf-like) and
    spread, so some neighbourhoods are dense and some sparse."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centers, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, centers + 1) ** 0.5
    spreads = rng.uniform(0.2, 0.6, centers).astype(np.float32)
    which = rng.choice(centers, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 1 << 16):  # in slices: bounded temporary memory
        part = which[start: start + (1 << 16)]
        out[start: start + len(part)] = means[part] + spreads[part, None] * rng.standard_normal(
            (len(part), dim), dtype=np.float32)
    return out


def skewed_labels(n: int, *, rare: float = 0.01, common: float = 0.3, categories: int = 50,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label CSR (offsets int64 [n + 1], values int64) for n vectors: a Zipf category (2 .. categories + 1) each,
    plus RARE with probability `rare` and COMMON with probability `common`, independently."""
    rng = np.random.default_rng([seed, 1])
    zipf = 1.0 / np.arange(1, categories + 1)
    category = 2 + rng.choice(categories, size=n, p=zipf / zipf.sum())
    has_rare, has_common = rng.random(n) < rare, rng.random(n) < common
    counts = 1 + has_rare + has_common
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    values = np.empty(offsets[-1], np.int64)  # per vector, ascending: [RARE] [COMMON] category
    values[offsets[1:] - 1] = category
    values[offsets[:-1][has_rare]] = RARE
    values[(offsets[:-1] + has_rare)[has_common]] = COMMON
    return offsets, values


def label_sets(offsets: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """The CSR as one int64 array per vector (what `VectorIndex.add(labels=...)` takes)."""
    return np.split(values, offsets[1:-1])


def text_windows(documents: list[np.ndarray], window: int, stride: int) -> list[tuple[int, int]]:
    """(document, start) of every window of `window` tokens, `stride` apart, within each document; a document
    shorter than a window gives one window of all of it; the last window of a document ends at its end."""
    if window < 1 or stride < 1:
        raise RetrievalError(f"window={window}, stride={stride}: expected positive integers")
    out = []
    for d, tokens in enumerate(documents):
        last = max(len(tokens) - window, 0)
        starts = list(range(0, last + 1, stride))
        if starts[-1] != last:
            starts.append(last)
        out.extend((d, s) for s in starts)
    return out


def ground_truth(base: np.ndarray, queries: np.ndarray, k: int, metric: str, *, label_offsets=None,
                 label_values=None, filters=(None,)) -> dict:
    """{filter: ids [q, k]} of the exact top k (ExactIndex in float32 on the JAX device), for each filter (None:
    unfiltered; an int: that label for every query). Ids are row numbers of `base`."""
    from llmjax.retrieval.exact import ExactIndex

    index = ExactIndex(base.shape[1], metric)
    labels = None if label_offsets is None else label_sets(label_offsets, label_values)
    index.add(np.arange(len(base)), base, labels=labels)
    return {f: index.search(queries, k, filter=f)[1] for f in filters}


@dataclass(frozen=True)
class VectorSet:
    base: np.ndarray            # [n, d] float32
    queries: np.ndarray         # [q, d] float32
    label_offsets: np.ndarray   # [n + 1] int64
    label_values: np.ndarray    # int64
    truth: dict                 # "none" / "label-0" / ... -> ids [q, k]
    meta: dict                  # how it was made (JSON)


def truth_key(label: int | None) -> str:
    return "none" if label is None else f"label-{label}"


def save_vector_set(folder: str | os.PathLike, data: VectorSet) -> Path:
    """Write the set to `folder` atomically (a temporary folder renamed into place)."""
    with atomic_folder(folder) as temporary:
        np.save(temporary / "base.npy", data.base)
        np.save(temporary / "queries.npy", data.queries)
        np.savez(temporary / "labels.npz", offsets=data.label_offsets, values=data.label_values)
        np.savez(temporary / "truth.npz", **data.truth)
        (temporary / "meta.json").write_text(json.dumps(data.meta, indent=1))
    return Path(folder)


def load_vector_set(folder: str | os.PathLike, mmap: bool = True) -> VectorSet:
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise RetrievalError(f"{folder}: no vector set here (meta.json missing): build it with "
                             "`python -m experiments bench_vector_search --build-only`")
    mode = "r" if mmap else None
    with np.load(folder / "labels.npz") as labels, np.load(folder / "truth.npz") as truth:
        return VectorSet(np.load(folder / "base.npy", mmap_mode=mode), np.load(folder / "queries.npy", mmap_mode=mode),
                         labels["offsets"], labels["values"], {key: truth[key] for key in truth.files},
                         json.loads((folder / "meta.json").read_text()))
