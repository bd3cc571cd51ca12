"""IVFPQIndex (IVF + anisotropic PQ + exact re-rank): recall@10 against float64 brute force for every metric, a
broken score that the check catches, filters, removal, save / load, and one clear error per bad flag."""

import numpy as np
import pytest

from llmjax.retrieval import RetrievalError, exact_search_reference, load_index, recall_at_k
from llmjax.retrieval.ivfpq import IVFPQIndex, slot_budget, sorted_lists

DIM = 32


def clustered(n, seed=0, dim=DIM, clusters=24):
    """A Gaussian mixture at varied norms (fixed centers: base and queries share them)."""
    centers = np.random.default_rng(99).normal(size=(clusters, dim)) * 2
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim)) * rng.uniform(0.5, 2, (n, 1))
            ).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return clustered(3000, 1), clustered(100, 2)


def small_index(metric="ip", **options):
    settings = dict(nlist=16, m=8, bits=6, nprobe=4, reorder=40)
    return IVFPQIndex(DIM, metric, **{**settings, **options})


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_recall_at_10_against_brute_force(data, metric):
    base, queries = data
    index = small_index(metric)
    ids = np.arange(3000) * 7 + 1
    index.add(ids, base)
    scores, found = index.search(queries, 10)
    want_scores, want_rows = exact_search_reference(base, queries, 10, metric)
    assert recall_at_k(found, ids[want_rows]) >= 0.9
    assert (np.diff(scores, axis=1) <= 1e-5).all()  # nearest first
    hits = found == ids[want_rows]  # the re-ranked scores are exact where the id is right
    np.testing.assert_allclose(scores[hits], want_scores[hits], rtol=1e-4, atol=1e-3)
    _, coarse = index.search(queries, 10, nprobe=16, reorder=200)  # every list, more re-ranked: more recall
    assert recall_at_k(coarse, ids[want_rows]) >= recall_at_k(found, ids[want_rows])


def test_without_kept_vectors_the_pq_scores_answer(data):
    base, queries = data
    index = small_index("l2", keep_vectors=False)
    index.add(np.arange(3000), base)
    scores, found = index.search(queries, 10)
    want_scores, want_rows = exact_search_reference(base, queries, 10, "l2")
    assert recall_at_k(found, want_rows) >= 0.5 and index.vectors.size == 0
    exact = -np.sum((queries[:, None, :] - base[found]) ** 2, -1)  # [q, 10] the true scores of what was found
    assert np.median(np.abs(scores - exact)) < 0.2 * np.median(np.abs(exact))  # approximate, the same scale


def test_anisotropic_beats_plain_pq_on_inner_products_at_equal_code_size(data):
    """Before the re-rank (reorder = k): the PQ scores alone decide."""
    base, queries = data
    truth = exact_search_reference(base, queries, 10, "ip")[1]
    recalls = {}
    for loss in ("anisotropic", "reconstruction"):
        index = small_index("ip", loss=loss)
        index.add(np.arange(3000), base)
        recalls[loss] = recall_at_k(index.search(queries, 10, reorder=10)[1], truth)
    assert recalls["anisotropic"] > recalls["reconstruction"] + 0.03  # 0.68 against 0.60 on this data


def test_a_broken_distance_fails_the_recall_check(data, monkeypatch):
    """The recall check catches a wrong lookup score (here: the residual term's sign)."""
    import llmjax.retrieval.ivfpq as ivfpq

    base, queries = data
    index = small_index("ip", keep_vectors=False, nprobe=16)
    index.add(np.arange(3000), base)
    truth = exact_search_reference(base, queries, 10, "ip")[1]
    assert recall_at_k(index.search(queries, 10)[1], truth) >= 0.5
    real = ivfpq.pq.lookup_scores
    monkeypatch.setattr(ivfpq.pq, "lookup_scores", lambda tables, codes: -real(tables, codes))
    ivfpq.ivfpq_search.clear_cache()  # trace again with the broken lookup
    assert recall_at_k(index.search(queries, 10)[1], truth) < 0.3
    ivfpq.ivfpq_search.clear_cache()


def test_filters_never_leave_the_label_and_rare_labels_are_exact(data):
    base, queries = data
    rng = np.random.default_rng(4)
    labels = [[int(rng.integers(0, 3))] + ([7] if i % 100 == 0 else []) for i in range(3000)]  # 7 is rare: 30 rows
    index = small_index("ip")
    index.add(np.arange(3000), base, labels=labels)
    carries = np.array([[label in row for row in labels] for label in (0, 1, 2, 7)])  # [4, n]
    for which, label in enumerate((0, 1, 2, 7)):
        _, found = index.search(queries, 10, filter=label)
        assert all(label in labels[i] for i in found.ravel() if i >= 0)
        want = exact_search_reference(base, queries, 10, admitted=carries[which])[1]
        assert recall_at_k(found, want) >= (1.0 if label == 7 else 0.8)  # 7: brute force over its rows
    per_query = np.arange(100) % 3
    _, found = index.search(queries, 10, filter=per_query)
    assert all(per_query[q] in labels[i] for q in range(100) for i in found[q] if i >= 0)


def test_removed_ids_never_come_back(data):
    base, queries = data
    index = small_index("l2")
    index.add(np.arange(3000), base)
    gone = exact_search_reference(base, queries, 5, "l2")[1].ravel()  # the true neighbours themselves
    index.remove(np.unique(gone))
    _, found = index.search(queries, 10)
    assert not np.isin(found, gone).any() and (found >= 0).all()
    index.add([int(gone[0])], base[gone[0]: gone[0] + 1])  # the id again, into the trained index
    assert index.search(base[gone[0]: gone[0] + 1], 1)[1][0, 0] == gone[0]


@pytest.mark.parametrize("options", [dict(metric="cosine", vector_dtype="bfloat16"),
                                     dict(metric="ip", keep_vectors=False, loss="reconstruction")])
def test_save_load_round_trip(data, tmp_path, options):
    base, queries = data
    index = small_index(**options)
    index.add(np.arange(3000) + 10, base, labels=np.arange(3000) % 4)
    index.remove([10, 11, 12])
    loaded = load_index(index.save(tmp_path / "ivfpq.idx"))
    for f in (None, 2):
        a, b = index.search(queries, 7, filter=f), loaded.search(queries, 7, filter=f)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    assert loaded.stats() == index.stats()
    more = clustered(50, 5)  # a loaded index keeps adding with the same model
    index.add(np.arange(50) + 90000, more)
    loaded.add(np.arange(50) + 90000, more)
    np.testing.assert_array_equal(index.search(queries, 7)[1], loaded.search(queries, 7)[1])


def test_train_then_add_in_parts_and_build_time(data):
    base, _ = data
    index = small_index("l2")
    index.train(base)
    trained_seconds = index.build_seconds
    assert trained_seconds > 0 and index.size == 0
    index.add(np.arange(1500), base[:1500])
    index.add(np.arange(1500, 3000), base[1500:])
    assert index.build_seconds > trained_seconds and index.size == 3000
    _, found = index.search(base[:20], 1, nprobe=16, reorder=50)
    assert (found[:, 0] == np.arange(20)).all()  # each vector finds itself


def test_sorted_list_layout_and_slot_budget():
    order, starts, sizes = sorted_lists(np.array([2, 0, 2, 2, 1], np.int32), 4)
    np.testing.assert_array_equal(order, [1, 4, 0, 2, 3])
    np.testing.assert_array_equal(starts, [0, 1, 2, 5])
    np.testing.assert_array_equal(sizes, [1, 1, 3, 0])
    assert slot_budget(np.array([300, 5, 700, 20]), 2, None) == 1024  # the two largest lists, rounded up
    assert slot_budget(np.array([300, 5, 700, 20]), 2, 500) == 500


def test_every_list_and_every_candidate_is_exact(data):
    """nprobe = nlist and a re-rank of every row: the slots must hold every row exactly once."""
    base, queries = data
    index = small_index("l2", nprobe=16, reorder=3000)
    index.add(np.arange(3000), base)
    scores, found = index.search(queries, 10)
    want_scores, want_rows = exact_search_reference(base, queries, 10, "l2")
    np.testing.assert_array_equal(found, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-3)


def test_max_codes_cuts_the_lowest_ranked_lists(data):
    base, queries = data
    index = small_index("ip")
    index.add(np.arange(3000), base)
    truth = exact_search_reference(base, queries, 10, "ip")[1]
    full = recall_at_k(index.search(queries, 10)[1], truth)
    cut = recall_at_k(index.search(queries, 10, max_codes=200)[1], truth)  # ~ one list of 190 of the 4 probed
    assert cut < full and cut > 0.3


@pytest.mark.parametrize("make, message", [
    (lambda: IVFPQIndex(DIM, bits=9), "bits=9"),
    (lambda: IVFPQIndex(DIM, m=5), "m=5: the number of PQ subspaces must divide dim=32"),
    (lambda: IVFPQIndex(DIM, nlist=8, nprobe=9), "nprobe=9: expected 1..nlist \\(8\\)"),
    (lambda: IVFPQIndex(DIM, loss="cosine"), "loss='cosine'"),
    (lambda: IVFPQIndex(DIM, vector_dtype="int8"), "vector_dtype='int8'"),
    (lambda: IVFPQIndex(DIM, max_codes=0), "max_codes=0"),
])
def test_bad_construction_is_one_clear_error(make, message):
    with pytest.raises(RetrievalError, match=message):
        make()


def test_bad_training_and_search_flags_are_one_clear_error(data):
    base, queries = data
    with pytest.raises(RetrievalError, match="nlist=1024 is larger than the 100 training vectors"):
        IVFPQIndex(DIM).add(np.arange(100), base[:100])
    with pytest.raises(RetrievalError, match="bits=8 needs at least 256 training vectors"):
        IVFPQIndex(DIM, nlist=4, nprobe=2).add(np.arange(100), base[:100])
    index = small_index("ip")
    index.add(np.arange(3000), base)
    with pytest.raises(RetrievalError, match="nprobe=17: expected 1..nlist"):
        index.search(queries, 10, nprobe=17)
    with pytest.raises(RetrievalError, match="reorder=5 is smaller than k=10"):
        index.search(queries, 10, reorder=5)
    assert index.size == 3000
