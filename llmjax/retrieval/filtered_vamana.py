"""Filtered-DiskANN (Gollapudi et al., WWW 2023): one Vamana graph that answers label-filtered queries.

Each row carries a set of labels. Every label f has a start point st(f): one of τ sampled rows carrying f, the one
that is start point for the fewest labels so far (load balance), ties to the one nearest the label's centroid.
- FilteredGreedySearch: a query with label f starts at st(f) and only scores / expands rows that carry f, so the
  beam never wastes work on rows it could not return (post-filtering does, and fails at low selectivity).
- FilteredRobustPrune: an edge p -> q may be dropped because of a nearer p' only when p' carries every label p and
  q share, so each label's subgraph stays navigable on its own.
- FilteredVamana: rows are inserted in random order: each searches from the start points of its own labels (through
  rows sharing one of them), prunes the expanded rows to R out-neighbours, and is linked back from them. A first
  build runs two passes (alpha = 1, then alpha: the second adds the long edges), as in Vamana; later `add` calls
  insert the new rows in one pass with alpha (FreshDiskANN). Rows without labels search from the global medoid.
- Unfiltered search starts from the global medoid and every start point. The paper's graph has only edges between
  rows that share a label (disjoint labels split it into parts), so by default each row is also linked through an
  unfiltered search from the medoid; the label-aware prune keeps the filtered edges first (an edge between rows
  sharing no label can be pruned by any nearer row, one between rows sharing labels only by a row that has them).
Insertion runs in parallel batches (`_graph.link_batch`), removal repairs the graph (`_graph.repair_removed`) and
replaces removed start points.
"""

from __future__ import annotations

import math

import numpy as np

from llmjax.retrieval import _graph
from llmjax.retrieval.base import RetrievalError, VectorIndex, register

START_SAMPLES = 16  # τ: rows sampled per label when choosing its start point


@register
class FilteredVamanaIndex(VectorIndex):
    """Filtered-DiskANN graph. R: out-degree bound; L: the beam while building and the default search beam
    (search(..., L=...) overrides it; at least k); alpha >= 1: the prune's slack (larger: more long edges);
    threads: numba threads (None: numba's default); seed: insertion order and start-point sampling; unfiltered:
    also link each row through an unfiltered search from the medoid, so unfiltered queries work even where labels
    split the graph (False: the paper's graph exactly, about half the build time)."""

    kind = "filtered_vamana"

    def __init__(self, dim: int, metric: str = "ip", *, R: int = 64, L: int = 100, alpha: float = 1.2,
                 threads: int | None = None, seed: int = 0, unfiltered: bool = True):
        super().__init__(dim, metric)
        self.R = _graph.check_int("R", R, 2)
        self.L = _graph.check_int("L", L, 1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 1:
            raise RetrievalError(f"alpha={alpha!r}: expected a finite number >= 1 (1.2 is usual)")
        self.alpha = float(alpha)
        self.threads = _graph.check_threads(threads)
        self.seed = _graph.check_int("seed", seed, 0)
        self.unfiltered = bool(unfiltered)
        self.vectors = np.zeros((0, dim), np.float32)     # [rows, dim]
        self.links = np.zeros((0, self.R), np.int32)      # [rows, R] out-neighbours, -1 padded
        self.start_labels = np.zeros(0, np.int64)         # [labels] ascending
        self.start_rows = np.zeros(0, np.int32)           # [labels] st(label)
        self.medoid = -1                                  # the unfiltered start

    # ---- construction ---------------------------------------------------------------------------------------

    def _add(self, vectors, first_row):
        self.vectors = np.concatenate([self.vectors, vectors])
        self.links = np.concatenate([self.links, np.full((len(vectors), self.R), -1, np.int32)])
        self._insert(np.arange(first_row, first_row + len(vectors), dtype=np.int32))  # labels are stored by now

    def _insert(self, rows: np.ndarray) -> None:
        graph_size = int(np.count_nonzero(~self.removed[: rows[0]]))
        self._choose_starts()
        order = np.random.default_rng([self.seed, int(rows[0])]).permutation(rows).astype(np.int32)
        identity = np.arange(self.rows, dtype=np.int32)
        with _graph.numba_threads(self.threads):
            for alpha in ([1.0, self.alpha] if graph_size == 0 else [self.alpha]):
                done = 0
                while done < len(order):
                    batch = order[done: done + _graph.batch_size(graph_size + done, len(order) - done)]
                    _graph.link_batch(self.vectors, self.links, identity, batch, self._build_entries(batch), self.L,
                                      self.R, alpha, _graph.metric_code(self.metric), self.removed,
                                      self.label_offsets, self.label_values, True, True, True,
                                      self.medoid if self.unfiltered else -1, _graph.chunk_size(len(batch)))
                    done += len(batch)
                graph_size += len(order)
        self._connect()

    def _connect(self) -> None:
        """Every live row reachable from the medoid (see _graph.connect_unreachable)."""
        if self.medoid >= 0:
            rows = np.arange(self.rows, dtype=np.int32)
            _graph.connect_unreachable(self.links, rows, rows, self.medoid, self.removed)

    def _build_entries(self, batch: np.ndarray) -> np.ndarray:
        """int32 [b, most labels of a row]: the start points of each row's labels (-1 padded; the medoid if none)."""
        counts = np.diff(self.label_offsets)[batch]  # [b]
        entries = np.full((len(batch), max(1, int(counts.max()))), -1, np.int32)
        entries[counts == 0, 0] = self.medoid
        owners = np.repeat(np.arange(len(batch)), counts)
        places = np.arange(len(owners)) - np.repeat(np.cumsum(counts) - counts, counts)
        labels = self.label_values[np.repeat(self.label_offsets[batch], counts) + places]
        entries[owners, places] = self.start_rows[np.searchsorted(self.start_labels, labels)]
        return entries

    def _choose_starts(self) -> None:
        """The global medoid and a live start point for every live label (kept while it stays live)."""
        live = np.flatnonzero(~self.removed)
        if not len(live):
            self.medoid, self.start_labels, self.start_rows = -1, self.start_labels[:0], self.start_rows[:0]
            return
        if self.medoid < 0 or self.removed[self.medoid]:
            centre = self.vectors[live].mean(axis=0)
            self.medoid = int(live[np.argmin(np.sum((self.vectors[live] - centre) ** 2, axis=1))])
        owners = self._label_owners()
        alive = ~self.removed[owners]
        order = np.argsort(self.label_values[alive], kind="stable")
        owners, values = owners[alive][order], self.label_values[alive][order]  # label entries of live rows, by label
        labels, first = np.unique(values, return_index=True)
        kept = np.isin(labels, self.start_labels)
        old = dict(zip(self.start_labels.tolist(), self.start_rows.tolist()))
        starts = np.array([old.get(int(label), -1) for label in labels], np.int32)
        kept &= starts >= 0
        kept[kept] = ~self.removed[starts[kept]]
        load = np.bincount(starts[kept], minlength=self.rows)
        bounds = np.append(first, len(values))
        rng = np.random.default_rng([self.seed, self.rows])
        for g in np.flatnonzero(~kept):
            carriers = owners[bounds[g]: bounds[g + 1]]
            sample = carriers if len(carriers) <= START_SAMPLES else rng.choice(carriers, START_SAMPLES, replace=False)
            centre = self.vectors[carriers].mean(axis=0)
            distance = np.sum((self.vectors[sample] - centre) ** 2, axis=1)
            best = sample[np.lexsort((distance, load[sample]))[0]]
            starts[g] = best
            load[best] += 1
        self.start_labels, self.start_rows = labels.astype(np.int64), starts

    # ---- removal --------------------------------------------------------------------------------------------

    def _remove(self, rows):
        """Repair the graph around the removed rows (label-aware prune) and replace removed start points."""
        with _graph.numba_threads(self.threads):
            _graph.repair_removed(self.vectors, self.links, np.arange(self.rows, dtype=np.int32),
                                  np.arange(self.rows, dtype=np.int32), self.removed, self.alpha,
                                  _graph.metric_code(self.metric), self.label_offsets, self.label_values, True)
        self._choose_starts()
        self._connect()

    # ---- search ---------------------------------------------------------------------------------------------

    def _search(self, queries, k, labels, **options):
        beam = _graph.search_options("filtered_vamana", options, "L", self.L, k)
        if labels is None:
            entries = np.tile(np.concatenate([[self.medoid], self.start_rows]).astype(np.int32), (len(queries), 1))
        else:
            entries = self.start_rows[np.searchsorted(self.start_labels, labels)][:, None]
        with _graph.numba_threads(self.threads):
            scores, rows = _graph.search_batch(queries, self.vectors, self.links, np.arange(self.rows, dtype=np.int32),
                                               np.ascontiguousarray(entries), beam, k,
                                               _graph.metric_code(self.metric), self.removed, self.label_offsets,
                                               self.label_values, *_graph.filter_sets(labels, len(queries)),
                                               labels is not None, True, _graph.chunk_size(len(queries)))
        return scores, rows.astype(np.int64)

    # ---- state ----------------------------------------------------------------------------------------------

    def _state(self):
        return {"vectors": self.vectors, "links": self.links, "start_labels": self.start_labels,
                "start_rows": self.start_rows, "R": self.R, "L": self.L, "alpha": self.alpha, "seed": self.seed,
                "threads": self.threads, "medoid": self.medoid, "unfiltered": self.unfiltered}

    def _restore(self, state):
        for name in ("vectors", "links", "start_labels", "start_rows"):
            setattr(self, name, np.ascontiguousarray(state[name]))
        self.R, self.L, self.seed, self.medoid = int(state["R"]), int(state["L"]), int(state["seed"]), int(
            state["medoid"])
        self.alpha, self.threads, self.unfiltered = float(state["alpha"]), state["threads"], bool(state["unfiltered"])
