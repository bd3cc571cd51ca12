"""HNSW: hierarchical navigable small-world graphs (Malkov & Yashunin, 2018), built in parallel on the CPU (numba).

Every row gets a level L = floor(-ln(U) * mL), mL = 1 / ln(M) (so P(L >= l) = M^-l): layer l holds the rows of
level >= l, each with at most M neighbours (2M on layer 0, where every row lives). A search walks greedily down the
sparse upper layers from the entry point (the top row) and then runs a beam of `ef` on layer 0.

Construction inserts rows in prefix-doubling batches (`_graph.batch_size`): the rows of a batch search the graph as
it stood before the batch, in parallel, layer by layer from the top; each keeps M neighbours chosen by the heuristic
(Alg. 4: a candidate is skipped when an already chosen neighbour is nearer to it than the new row is), and the
reverse links are merged per target, pruned by the same heuristic on overflow. A row whose level is above the
current top is inserted alone and becomes the entry point.

Removal marks rows (base); `_remove` repairs every layer (in-neighbours of removed rows re-pruned over the removed
rows' neighbours, FreshDiskANN-style), and `rebuild()` rebuilds the graph over the live rows only.
Filtered search: post-filtering by default (the beam grows until k rows carry the label or the whole reachable
graph was seen) or `filter_mode="pre"` (brute force over the rows carrying it): the two baselines that
Filtered-DiskANN (filtered_vamana.py) is compared with.
"""

from __future__ import annotations

import math
import time

import numpy as np

from llmjax.retrieval import _graph
from llmjax.retrieval.base import RetrievalError, VectorIndex, register
from llmjax.retrieval.exact import exact_top_k

FILTER_MODES = ("post", "pre")


@register
class HNSWIndex(VectorIndex):
    """HNSW graph index. M: neighbours per row on the upper layers (2M on layer 0); ef_construction: the beam
    while inserting; ef: the default search beam (search(..., ef=...) overrides it; at least k); seed: the level
    draws; threads: numba threads for build and search (None: numba's default)."""

    kind = "hnsw"

    def __init__(self, dim: int, metric: str = "ip", *, M: int = 16, ef_construction: int = 200, ef: int = 64,
                 seed: int = 0, threads: int | None = None):
        super().__init__(dim, metric)
        self.M = _graph.check_int("M", M, 2)
        self.ef_construction = _graph.check_int("ef_construction", ef_construction, 1)
        self.ef = _graph.check_int("ef", ef, 1)
        self.seed = _graph.check_int("seed", seed, 0)
        self.threads = _graph.check_threads(threads)
        self.vectors = np.zeros((0, dim), np.float32)      # [rows, dim]
        self.levels = np.zeros(0, np.int32)                # [rows]
        self.links0 = np.zeros((0, 2 * self.M), np.int32)  # [rows, 2M] layer 0, -1 padded
        self.upper = np.zeros((0, 0, self.M), np.int32)    # [layers above 0, slots, M]
        self.upper_slot = np.zeros(0, np.int32)            # [rows] slot on the upper layers (-1: level 0)
        self.entry, self.top_level = -1, -1

    # ---- construction ---------------------------------------------------------------------------------------

    def _draw_levels(self, n: int, first_row: int) -> np.ndarray:
        """Levels floor(-ln(U) * mL), U in (0, 1]: geometric with P(level >= l) = M^-l; deterministic per seed."""
        uniform = 1.0 - np.random.default_rng([self.seed, first_row]).random(n)
        return np.floor(-np.log(uniform) / math.log(self.M)).astype(np.int32)

    def _add(self, vectors, first_row):
        n = len(vectors)
        levels = self._draw_levels(n, first_row)
        self.vectors = np.concatenate([self.vectors, vectors])
        self.levels = np.concatenate([self.levels, levels])
        self.links0 = np.concatenate([self.links0, np.full((n, 2 * self.M), -1, np.int32)])
        first_slot, high = self.upper.shape[1], levels > 0
        slots = np.where(high, first_slot + np.cumsum(high) - 1, -1).astype(np.int32)
        self.upper_slot = np.concatenate([self.upper_slot, slots])
        layers = max(self.upper.shape[0], int(levels.max()))
        upper = np.full((layers, first_slot + int(high.sum()), self.M), -1, np.int32)
        upper[: self.upper.shape[0], :first_slot] = self.upper
        self.upper = upper
        self._insert(np.arange(first_row, first_row + n, dtype=np.int32))

    def _layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(links [slots, width], slot_of [rows]) of one layer."""
        if layer == 0:
            return self.links0, np.arange(len(self.links0), dtype=np.int32)
        return self.upper[layer - 1], self.upper_slot

    def _removed_rows(self) -> np.ndarray:
        """bool [rows of the graph]: removed (the rows being added are not in base's `removed` yet)."""
        removed = np.zeros(len(self.vectors), bool)
        removed[: len(self.removed)] = self.removed
        return removed

    def _insert(self, rows: np.ndarray) -> None:
        graph_size = int(np.count_nonzero(~self.removed)) if self.entry >= 0 else 0
        if self.entry < 0:  # an empty graph: the first row is the entry point
            self.entry, self.top_level, rows = int(rows[0]), int(self.levels[rows[0]]), rows[1:]
            graph_size = 1
        removed = self._removed_rows()
        with _graph.numba_threads(self.threads):
            while len(rows):
                batch = rows[: _graph.batch_size(graph_size, len(rows))]
                above = np.flatnonzero(self.levels[batch] > self.top_level)
                if len(above):  # a new top row goes alone: it links below, then becomes the entry point
                    batch = batch[: max(int(above[0]), 1)]
                self._insert_batch(batch, removed)
                if self.levels[batch[0]] > self.top_level:
                    self.entry, self.top_level = int(batch[0]), int(self.levels[batch[0]])
                rows, graph_size = rows[len(batch):], graph_size + len(batch)
        self._connect()

    def _connect(self) -> None:
        """Every live row reachable from the entry point on every layer (see _graph.connect_unreachable)."""
        if self.entry < 0:
            return
        removed = self._removed_rows()
        for layer in range(self.top_level + 1):
            on_layer = np.flatnonzero(self.levels >= layer).astype(np.int32)
            _graph.connect_unreachable(*self._layer(layer), on_layer, self.entry, removed)

    def _insert_batch(self, batch: np.ndarray, removed: np.ndarray) -> None:
        """Link the rows of `batch` on every layer up to their level, top layer first (see the module doc)."""
        entries = np.full((len(batch), 1), self.entry, np.int32)  # [b, 1] each row's way into the next layer
        levels = self.levels[batch]
        chunk = _graph.chunk_size(len(batch))
        for layer in range(self.top_level, -1, -1):
            links, slot_of = self._layer(layer)
            linking = levels >= layer
            if not linking.all():  # rows above their level only walk down
                entries[~linking] = self._greedy(self.vectors[batch[~linking]], entries[~linking], layer, chunk)
            if linking.any():
                nearest = _graph.link_batch(self.vectors, links, slot_of, batch[linking], entries[linking],
                                            self.ef_construction, self.M, 1.0, _graph.metric_code(self.metric),
                                            removed, *_graph.NO_LABELS, False, False, False, -1, chunk)
                entries[linking, 0] = np.where(nearest >= 0, nearest, entries[linking, 0])

    def rebuild(self) -> None:
        """Build the graph again over the live rows only (removed rows are dropped: rows are renumbered)."""
        start = time.perf_counter()
        keep = ~self.removed
        vectors = self.vectors[keep]
        self.label_offsets, self.label_values = _graph.compact_labels(self.label_offsets, self.label_values, keep)
        self.row_ids, self.removed = self.row_ids[keep], np.zeros(int(keep.sum()), bool)
        self._row_of = {int(i): row for row, i in enumerate(self.row_ids.tolist())}
        fresh = HNSWIndex(self.dim, self.metric, M=self.M, ef_construction=self.ef_construction, ef=self.ef,
                          seed=self.seed, threads=self.threads)
        if len(vectors):
            fresh._add(vectors, 0)
        self._restore(fresh._state())
        self.build_seconds += time.perf_counter() - start

    # ---- removal --------------------------------------------------------------------------------------------

    def _remove(self, rows):
        """Repair every layer around the removed rows; a removed entry point is replaced by the live top row."""
        with _graph.numba_threads(self.threads):
            for layer in range(self.top_level, -1, -1):
                links, slot_of = self._layer(layer)
                on_layer = np.flatnonzero(self.levels >= layer).astype(np.int32)
                _graph.repair_removed(self.vectors, links, slot_of, on_layer, self.removed, 1.0,
                                      _graph.metric_code(self.metric), *_graph.NO_LABELS, False)
        if self.entry >= 0 and self.removed[self.entry]:
            live = np.flatnonzero(~self.removed)
            if len(live):
                self.entry = int(live[np.argmax(self.levels[live])])
                self.top_level = int(self.levels[self.entry])
            else:
                self.entry, self.top_level = -1, -1
        self._connect()

    # ---- search ---------------------------------------------------------------------------------------------

    def _search(self, queries, k, labels, **options):
        ef = _graph.search_options("hnsw", options, "ef", self.ef, k, others=("filter_mode",))
        filter_mode = options.get("filter_mode", "post")
        if filter_mode not in FILTER_MODES:
            raise RetrievalError(f"filter_mode {filter_mode!r}: expected one of {', '.join(FILTER_MODES)}")
        if labels is not None and filter_mode == "pre":
            return self._search_prefiltered(queries, k, labels)
        with _graph.numba_threads(self.threads):
            chunk = _graph.chunk_size(len(queries))
            entries = self._descend(queries, chunk)
            scores, rows = _graph.search_batch(queries, self.vectors, *self._layer(0), entries, ef, k,
                                               _graph.metric_code(self.metric), self.removed, self.label_offsets,
                                               self.label_values, *_graph.filter_sets(labels, len(queries)), False,
                                               True, chunk)
        return scores, rows.astype(np.int64)

    def _descend(self, queries, chunk) -> np.ndarray:
        """int32 [q, 1]: each query's entry into layer 0, by a greedy walk down from the entry point."""
        entries = np.full((len(queries), 1), self.entry, np.int32)
        for layer in range(self.top_level, 0, -1):
            entries = self._greedy(queries, entries, layer, chunk)
        return entries

    def _greedy(self, queries, entries, layer, chunk) -> np.ndarray:
        """int32 [q, 1]: the nearest row to each query on `layer` by a greedy walk (a beam of 1) from `entries`.
        Removed rows may be walked through (repair leaves them unreachable anyway)."""
        passable = np.zeros(len(self.vectors), bool)
        _, found = _graph.search_batch(queries, self.vectors, *self._layer(layer), entries, 1, 1,
                                       _graph.metric_code(self.metric), passable, *_graph.NO_LABELS,
                                       *_graph.filter_sets(None, len(queries)), False, False, chunk)
        return found

    def _search_prefiltered(self, queries, k, labels):
        """The pre-filtering baseline: exact scores over the rows that carry each query's label."""
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            carriers = self.label_rows(int(label))
            scores[members], found = exact_top_k(self.vectors[carriers], queries[members], k, self.metric)
            rows[members] = np.where(found >= 0, carriers[np.maximum(found, 0)], -1)
        return scores, rows

    # ---- state ----------------------------------------------------------------------------------------------

    def _state(self):
        return {"vectors": self.vectors, "levels": self.levels, "links0": self.links0, "upper": self.upper,
                "upper_slot": self.upper_slot, "M": self.M, "ef_construction": self.ef_construction, "ef": self.ef,
                "seed": self.seed, "threads": self.threads, "entry": self.entry, "top_level": self.top_level}

    def _restore(self, state):
        for name in ("vectors", "levels", "links0", "upper", "upper_slot"):
            setattr(self, name, np.ascontiguousarray(state[name]))
        for name in ("M", "ef_construction", "ef", "seed", "entry", "top_level"):
            setattr(self, name, int(state[name]))
        self.threads = state["threads"]
