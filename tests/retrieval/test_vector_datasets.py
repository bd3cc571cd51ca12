"""Benchmark data for vector search (llmjax.retrieval.datasets): label skew, windows, ground truth, the cache."""

import numpy as np
import pytest

from llmjax.retrieval import RetrievalError, exact_search_reference
from llmjax.retrieval.datasets import (COMMON, RARE, VectorSet, gaussian_mixture, ground_truth, label_sets,
                                       load_vector_set, save_vector_set, skewed_labels, text_windows, truth_key)


def test_skewed_labels_hit_their_selectivities():
    offsets, values = skewed_labels(200_000, seed=3)
    sets = label_sets(offsets, values)
    assert len(sets) == 200_000
    rare = np.mean([RARE in s for s in sets[:50_000]])
    common = np.mean([COMMON in s for s in sets[:50_000]])
    assert 0.008 < rare < 0.012 and 0.28 < common < 0.32
    assert all(len(s) >= 1 and s[-1] >= 2 and (np.diff(s) > 0).all() for s in sets[:5000])  # one category each


def test_text_windows_cover_every_token():
    docs = [np.arange(1000), np.arange(7), np.arange(300)]
    windows = text_windows(docs, 256, 100)
    for d, tokens in enumerate(docs):
        starts = [s for doc, s in windows if doc == d]
        covered = np.zeros(len(tokens), bool)
        for s in starts:
            covered[s: s + 256] = True
        assert covered.all() and starts[-1] + min(256, len(tokens)) == len(tokens)
    with pytest.raises(RetrievalError, match="stride=0"):
        text_windows(docs, 256, 0)


def test_ground_truth_and_cache_round_trip(tmp_path):
    base, queries = gaussian_mixture(3000, 24, centers=40, seed=1), gaussian_mixture(20, 24, centers=40, seed=2)
    offsets, values = skewed_labels(3000, rare=0.05, seed=1)
    truth = ground_truth(base, queries, 10, "l2", label_offsets=offsets, label_values=values, filters=(None, RARE))
    assert (truth[None] == exact_search_reference(base, queries, 10, "l2")[1]).all()
    carries = np.array([RARE in s for s in label_sets(offsets, values)])
    assert (truth[RARE] == exact_search_reference(base, queries, 10, "l2", admitted=carries)[1]).all()
    data = VectorSet(base, queries, offsets, values, {truth_key(f): ids for f, ids in truth.items()}, {"name": "t"})
    save_vector_set(tmp_path / "set", data)
    loaded = load_vector_set(tmp_path / "set")
    assert (np.asarray(loaded.base) == base).all() and loaded.meta == {"name": "t"}
    assert (loaded.truth["label-0"] == truth[RARE]).all()
    with pytest.raises(RetrievalError, match="no vector set here"):
        load_vector_set(tmp_path / "missing")
