"""HNSWIndex (llmjax.retrieval.hnsw, kernels in _graph): recall against float64 brute force, graph invariants,
the level distribution, incremental add, removal with repair and rebuild, save / load, the filter baselines and
one clear error per bad parameter."""

from collections import deque

import numpy as np
import pytest

from llmjax.retrieval import RetrievalError, exact_search_reference, load_index, recall_at_k
from llmjax.retrieval import _graph
from llmjax.retrieval.hnsw import HNSWIndex


def gaussian(n, dim, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def clustered(n, dim, clusters=7, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(clusters, dim)) * 3  # the same centres for data and queries
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def built(data, metric="l2", **options):
    index = HNSWIndex(data.shape[1], metric, **{"M": 12, "ef_construction": 100, **options})
    index.add(np.arange(len(data)) + 100, data)
    return index


def recall(index, data, queries, k=10, ef=64, admitted=None, **options):
    _, found = index.search(queries, k, ef=ef, **options)
    rows = exact_search_reference(data, queries, k, index.metric, admitted=admitted)[1]
    return recall_at_k(found, np.where(rows >= 0, rows + 100, -1))


def reachable(links, entry):
    """bool [rows]: rows reached from `entry` following the lists of one layer (breadth first)."""
    seen = np.zeros(len(links), bool)
    seen[entry], queue = True, deque([entry])
    while queue:
        for neighbour in links[queue.popleft()]:
            if neighbour >= 0 and not seen[neighbour]:
                seen[neighbour] = True
                queue.append(neighbour)
    return seen


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("make", [gaussian, clustered])
def test_recall_against_brute_force(metric, make):
    data, queries = make(2000, 24), make(100, 24, seed=1)
    index = built(data, metric)
    # inner product on clusters of different norms: a few long vectors win most queries and the graph (like
    # hnswlib's: 0.5 on a similar set) plateaus lower
    ef, floor = (256, 0.8) if metric == "ip" and make is clustered else (64, 0.95)
    assert recall(index, data, queries, ef=ef) >= floor
    scores, _ = index.search(queries, 10)
    assert (np.diff(scores, axis=1) <= 0).all()  # nearest first


def test_a_broken_distance_fails_the_recall_check(monkeypatch):
    """The same check catches a wrong score: the graph built and searched with the inner product for "l2"."""
    data, queries = gaussian(1500, 24), gaussian(50, 24, seed=1)
    monkeypatch.setattr(_graph, "metric_code", lambda metric: _graph.IP)
    assert recall(built(data, "l2"), data, queries) < 0.5


def test_graph_invariants_degrees_layers_and_reachability():
    data = clustered(3000, 16)
    index = built(data, "l2", M=8)
    M, rows = index.M, np.arange(index.rows)
    for layer in range(index.top_level + 1):
        links, slot_of = index._layer(layer)
        on_layer = rows[index.levels >= layer]
        lists = links[slot_of[on_layer]]  # [rows on the layer, width]
        assert links.shape[1] == (2 * M if layer == 0 else M)
        assert ((lists >= -1) & (lists < index.rows)).all()
        for row, neighbours in zip(on_layer, lists):
            neighbours = neighbours[neighbours >= 0]
            assert row not in neighbours and len(np.unique(neighbours)) == len(neighbours)
            assert (index.levels[neighbours] >= layer).all()  # a layer links only rows that live on it
        filled = lists >= 0
        assert (filled[:, 1:] <= filled[:, :-1]).all()  # -1 only as trailing padding
    assert index.levels[index.entry] == index.top_level == index.levels.max()
    assert index.top_level >= 2  # 3000 rows at M=8: the upper layers were exercised
    for layer in range(index.top_level + 1):  # every row of a layer is reachable from the entry point on it
        links, slot_of = index._layer(layer)
        on_layer = rows[index.levels >= layer]
        layer_links = np.full((index.rows, links.shape[1]), -1, np.int32)
        layer_links[on_layer] = links[slot_of[on_layer]]
        assert reachable(layer_links, index.entry)[on_layer].all()


def test_levels_are_geometric():
    """P(level >= l) = M^-l: counts within 4 standard deviations of the binomial for l = 1, 2 (fixed seed)."""
    index = HNSWIndex(4, M=8, seed=3)
    n = 200_000
    levels = index._draw_levels(n, 0)
    for layer in (1, 2):
        p = 8.0 ** -layer
        assert abs((levels >= layer).sum() - n * p) < 4 * np.sqrt(n * p * (1 - p))
    assert (levels >= 0).all() and levels.max() <= 8


def test_incremental_adds_keep_recall_and_threads_do_not_change_the_graph():
    data, queries = clustered(2400, 20), clustered(80, 20, seed=1)
    index = HNSWIndex(20, "cosine", M=12, ef_construction=100, threads=1)
    for start in range(0, 2400, 600):  # four calls
        index.add(np.arange(start, start + 600) + 100, data[start:start + 600])
    assert recall(index, data, queries) >= 0.93
    again = HNSWIndex(20, "cosine", M=12, ef_construction=100, threads=2)
    for start in range(0, 2400, 600):
        again.add(np.arange(start, start + 600) + 100, data[start:start + 600])
    np.testing.assert_array_equal(index.links0, again.links0)  # batch insertion is thread-count independent


@pytest.mark.parametrize("then", ["repair", "rebuild"])
def test_removed_ids_never_come_back_and_recall_stays(then):
    data, queries = clustered(2500, 20), clustered(80, 20, seed=1)
    index = built(data, "l2")
    gone = np.random.default_rng(0).choice(2500, 800, replace=False)
    gone = np.append(gone[gone != index.entry], index.entry)  # the entry point goes too
    index.remove(gone + 100)
    if then == "rebuild":
        index.rebuild()
        assert index.rows == index.size == 2500 - len(gone)
    live = np.ones(2500, bool)
    live[gone] = False
    _, found = index.search(queries, 10)
    assert not np.isin(found, gone + 100).any()
    assert recall(index, data, queries, admitted=live) >= 0.93
    assert not index.removed[index.entry]
    reached = reachable(index.links0, index.entry)
    assert reached[~index.removed].all() and not reached[index.removed].any()


def test_remove_everything_then_add_again():
    data = gaussian(300, 8)
    index = built(data, "ip")
    index.remove(np.arange(300) + 100)
    index.add([7, 8, 9], data[:3])
    _, found = index.search(data[:1], 3)
    assert sorted(found[0].tolist()) == [7, 8, 9]


def test_save_load_round_trip(tmp_path):
    data, queries = clustered(1500, 16), clustered(40, 16, seed=2)
    index = built(data, "cosine", ef=40)
    index.remove([100, 101, 150])
    loaded = load_index(index.save(tmp_path / "hnsw.idx"))
    assert isinstance(loaded, HNSWIndex) and loaded.stats() == index.stats()
    for options in ({}, {"ef": 100}):
        a, b = index.search(queries, 10, **options), loaded.search(queries, 10, **options)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    loaded.add([5000], -data[:1])  # still insertable after a load
    assert loaded.search(-data[:1], 1)[1][0, 0] == 5000


def test_post_and_pre_filter_baselines():
    """Labels 0..99 (1% selectivity each): both modes return only rows carrying the label; pre is exact, post
    reaches high recall because its beam grows until k rows carry the label."""
    data, queries = clustered(3000, 16), clustered(60, 16, seed=3)
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 100, 3000)
    index = HNSWIndex(16, "l2", M=12, ef_construction=100)
    index.add(np.arange(3000) + 100, data, labels=labels)
    wanted = rng.integers(0, 100, 60)
    admitted = labels[None, :] == wanted[:, None]  # [q, n]
    truth = exact_search_reference(data, queries, 10, "l2", admitted=admitted)[1]
    for mode, floor in (("post", 0.9), ("pre", 1.0)):
        _, found = index.search(queries, 10, filter=wanted, filter_mode=mode)
        assert all((labels[row[row >= 0] - 100] == label).all() for row, label in zip(found, wanted))
        assert recall_at_k(found, np.where(truth >= 0, truth + 100, -1)) >= floor


@pytest.mark.parametrize("make, message", [
    (lambda: HNSWIndex(8, M=1), "M=1: expected an integer >= 2"),
    (lambda: HNSWIndex(8, ef_construction=0), "ef_construction=0"),
    (lambda: HNSWIndex(8, ef=0), "ef=0"),
    (lambda: HNSWIndex(8, threads=0), "threads=0"),
    (lambda: HNSWIndex(8, M=2.5), "M=2.5"),
])
def test_bad_parameters_are_one_clear_error(make, message):
    with pytest.raises(RetrievalError, match=message):
        make()


@pytest.mark.parametrize("options, message", [
    ({"ef": 5}, "ef=5 is smaller than k=10"),
    ({"filter_mode": "sideways"}, "filter_mode 'sideways'"),
    ({"nprobe": 3}, "unknown option 'nprobe'"),
])
def test_bad_search_options_are_one_clear_error(options, message):
    index = built(gaussian(200, 8))
    with pytest.raises(RetrievalError, match=message):
        index.search(gaussian(2, 8), 10, **options)


@pytest.mark.parametrize("dtype, shape", [(np.float32, (7, 33)), (np.int32, (5, 3)), (np.float64, (3, 40))])
def test_prefetch_row_reads_nothing_wrong_at_any_row_width(dtype, shape):
    """_graph.prefetch_row (LLVM's prefetch hint, emitted by hand) on every row of awkward widths, the last row's
    last line included: it compiles for each dtype and leaves the values the kernel computes beside it unchanged."""
    from numba import njit

    @njit
    def prefetch_then_sum(matrix):
        total = 0.0
        for row in range(matrix.shape[0] - 1, -1, -1):
            _graph.prefetch_row(matrix, row)
            total += matrix[row].sum()
        return total

    matrix = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    assert prefetch_then_sum(matrix) == pytest.approx(float(matrix.sum()))
