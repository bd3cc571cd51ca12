"""ExactIndex and the bookkeeping every index shares (llmjax.retrieval.base): against float64 NumPy brute force,
filters, removal, save / load, and one clear error per bad input."""

import numpy as np
import pytest

from llmjax.retrieval import ExactIndex, RetrievalError, exact_search_reference, load_index, recall_at_k


def clustered(n, dim, clusters=7, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)) * 3
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_exact_equals_float64_brute_force_across_blocks(metric):
    data, queries = clustered(1003, 19), clustered(37, 19, seed=1)
    index = ExactIndex(19, metric, block_rows=128, query_block=16)  # 8 blocks (the last padded), 3 query chunks
    ids = np.arange(1003) * 10 + 5
    index.add(ids, data)
    scores, found = index.search(queries, 11)
    want_scores, want_rows = exact_search_reference(data, queries, 11, metric)
    assert recall_at_k(found, ids[want_rows]) == 1.0
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-3)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # nearest first


def test_bfloat16_storage_keeps_recall():
    data, queries = clustered(2000, 64), clustered(50, 64, seed=2)
    index = ExactIndex(64, "ip", dtype="bfloat16", block_rows=512)
    index.add(np.arange(2000), data)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, exact_search_reference(data, queries, 10)[1]) >= 0.97


def test_a_broken_distance_fails_the_recall_check(monkeypatch):
    """The recall check used on every index catches a wrong score (here: the sign of the l2 norm term)."""
    import llmjax.retrieval.exact as exact

    data, queries = clustered(500, 16), clustered(20, 16, seed=3)
    index = ExactIndex(16, "l2")
    index.add(np.arange(500), data)
    monkeypatch.setattr(exact.jnp, "square", lambda x: -x * x)  # the database norms enter with the wrong sign
    exact.blocked_top_k.clear_cache()  # trace again under the broken square
    _, found = index.search(queries, 10)
    assert recall_at_k(found, exact_search_reference(data, queries, 10, "l2")[1]) < 0.5


def test_filters_one_label_and_one_per_query():
    data, queries = clustered(400, 8), clustered(6, 8, seed=4)
    rng = np.random.default_rng(5)
    labels = [sorted(set(rng.integers(0, 5, rng.integers(0, 3)).tolist())) for _ in range(400)]
    index = ExactIndex(8, "ip", block_rows=64)
    index.add(np.arange(400), data, labels=labels)
    carries = np.array([[label in row for row in labels] for label in range(5)])  # [label, n]
    for label in range(5):
        scores, found = index.search(queries, 5, filter=label)
        want = exact_search_reference(data, queries, 5, admitted=carries[label])[1]
        assert (found == want).all()
        assert all(label in labels[i] for i in found.ravel() if i >= 0)
    per_query = np.array([0, 1, 2, 3, 4, 0])
    _, found = index.search(queries, 5, filter=per_query)
    for q, label in enumerate(per_query):
        assert (found[q] == exact_search_reference(data, queries[q:q + 1], 5, admitted=carries[label])[1][0]).all()


def test_fewer_matches_than_k_and_an_unknown_label_give_empty_places():
    index = ExactIndex(4)
    index.add([1, 2, 3, 4], np.eye(4, dtype=np.float32), labels=[[7], [], [7], []])
    scores, found = index.search(np.ones((2, 4)), 3, filter=7)
    assert sorted(found[0, :2].tolist()) == [1, 3] and found[0, 2] == -1 and scores[0, 2] == -np.inf
    scores, found = index.search(np.ones((2, 4)), 3, filter=99)  # no vector carries 99: the empty answer
    assert (found == -1).all() and np.isneginf(scores).all()
    index.remove([1])  # the label lookups a search reuses follow removals and additions
    assert index.search(np.ones((1, 4)), 3, filter=7)[1].tolist() == [[3, -1, -1]]
    index.add([5], np.ones((1, 4), np.float32), labels=[[99]])
    assert index.search(np.ones((1, 4)), 3, filter=99)[1].tolist() == [[5, -1, -1]]


def test_removed_ids_never_come_back_and_ids_can_be_reused():
    data = clustered(300, 12)
    index = ExactIndex(12, "l2", block_rows=64)
    index.add(np.arange(300), data)
    gone = np.arange(0, 300, 3)
    index.remove(gone)
    _, found = index.search(data[:40], 20)
    assert not np.isin(found, gone).any() and index.size == 200
    index.add([0], data[0:1])  # a removed id may be added again
    _, found = index.search(data[0:1], 1)
    assert found[0, 0] == 0


def test_save_load_round_trip_and_atomic_file(tmp_path):
    data, queries = clustered(256, 10), clustered(9, 10, seed=6)
    index = ExactIndex(10, "cosine", dtype="bfloat16", block_rows=100)
    index.add(np.arange(256) + 1000, data, labels=np.arange(256) % 3)
    index.remove([1000, 1001])
    path = index.save(tmp_path / "sub" / "exact.idx")
    assert [p.name for p in path.parent.iterdir()] == ["exact.idx"]  # no temporary left behind
    loaded = load_index(path)
    for f in (None, 2):
        a, b = index.search(queries, 7, filter=f), loaded.search(queries, 7, filter=f)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    assert loaded.stats() == index.stats()


def test_corrupt_and_truncated_files_are_one_clear_error(tmp_path):
    index = ExactIndex(4)
    index.add(np.arange(50), clustered(50, 4))
    path = index.save(tmp_path / "a.idx")
    raw = path.read_bytes()
    (tmp_path / "truncated.idx").write_bytes(raw[: len(raw) // 2])
    corrupt = bytearray(raw)
    corrupt[len(raw) // 3] ^= 0xFF  # inside the vectors: the zip CRC no longer matches
    (tmp_path / "corrupt.idx").write_bytes(bytes(corrupt))
    (tmp_path / "other.idx").write_bytes(b"not an index at all")
    for name in ("truncated.idx", "corrupt.idx", "other.idx"):
        with pytest.raises(RetrievalError, match="not a readable index file"):
            load_index(tmp_path / name)
    with pytest.raises(RetrievalError, match="no such index file"):
        load_index(tmp_path / "missing.idx")


@pytest.mark.parametrize("call, message", [
    (lambda ix: ix.add([9], np.ones((1, 5))), "dimension 5 does not match the index's dimension 4"),
    (lambda ix: ix.add([9], np.array([[1, np.nan, 0, 0]])), "row 0 holds NaN or infinite values"),
    (lambda ix: ix.add([9, 10], np.array([[1, 0, 0, 0], [np.inf, 0, 0, 0]])), "row 1 holds NaN or infinite"),
    (lambda ix: ix.add([0], np.ones((1, 4))), "id 0 is already in the index"),
    (lambda ix: ix.add([7, 7], np.ones((2, 4))), "id 7 is given more than once"),
    (lambda ix: ix.add([7], np.ones((2, 4))), "expected 2 integer ids"),
    (lambda ix: ix.search(np.ones((1, 3)), 1), "queries: dimension 3 does not match"),
    (lambda ix: ix.search(np.ones((1, 4)), 4), "k=4 is larger than the index \\(3 vectors\\)"),
    (lambda ix: ix.search(np.ones((1, 4)), 0), "k=0: expected a positive integer"),
    (lambda ix: ix.search(np.ones((2, 4)), 1, filter=[1, 2, 3]), "filter: 3 labels for 2 queries"),
    (lambda ix: ix.remove([0, 42]), "remove: id 42 is not in the index"),
])
def test_bad_input_is_one_clear_error(call, message):
    index = ExactIndex(4)
    index.add([0, 1, 2], np.eye(3, 4, dtype=np.float32))
    with pytest.raises(RetrievalError, match=message):
        call(index)
    assert index.size == 3  # nothing half-done


def test_empty_index_and_bad_construction():
    with pytest.raises(RetrievalError, match="the index is empty"):
        ExactIndex(4).search(np.ones((1, 4)), 1)
    with pytest.raises(RetrievalError, match="metric 'dot'"):
        ExactIndex(4, "dot")
    with pytest.raises(RetrievalError, match="dim 0"):
        ExactIndex(0)


def test_recall_at_k_counts_overlap():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [7, 8, 9]])) == pytest.approx(2 / 6)
