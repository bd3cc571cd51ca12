"""The one interface of every vector index: add, search, remove, save / load, stats.

    index = HNSWIndex(dim=384, metric="cosine")           # or ExactIndex, IVFPQIndex, FilteredGraphIndex
    index.add(ids, vectors, labels=[[3], [3, 7], [], ...])  # ids int64 [n], vectors [n, dim] float32 / bf16
    scores, ids = index.search(queries, k=10)             # [q, k] each: nearest first
    scores, ids = index.search(queries, k=10, filter=7)   # only vectors carrying label 7 (or one label per query)
    index.remove([12, 40])
    index.save("runs/index/stdlib.idx"); index = load_index("runs/index/stdlib.idx")

Conventions shared by every index (this module does the bookkeeping; an index implements the `_add`, `_search`,
`_remove`, `_state` / `_restore` hooks over internal rows):
- Scores: larger is nearer. Inner product ("ip"), cosine similarity ("cosine": vectors and queries are normalized
  on the way in, then it is the inner product), minus the squared Euclidean distance ("l2").
- Ids are the caller's int64 ids (unique); an index works on rows 0..n-1 in insertion order and this class maps
  them. A removed id is gone from every later result; its row stays marked (an index may repair or rebuild).
- Labels: each vector carries a set of int labels (possibly none), stored as CSR (`label_offsets`,
  `label_values`). A filter is one label for every query or one label per query; a vector matches when it carries
  the label. Fewer than k matches (or a label no vector carries) is not an error: the missing places are id -1,
  score -inf.
- Bad input (dimension mismatch, NaN / inf, k larger than the index, an empty index, unknown or repeated ids, a
  corrupt or truncated file) raises RetrievalError with one line that says what and where.
- save writes one .npz file (arrays + a JSON header) to a temporary name and renames it into place, so a file at
  `path` is always complete; zip CRCs catch a corrupt file and a truncated one fails to open: both are
  RetrievalError on load.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

METRICS = ("ip", "cosine", "l2")
FORMAT = "llmjax.vector_index"
VERSION = 1
_INDEX_CLASSES: dict[str, type[VectorIndex]] = {}
KIND_MODULES = {  # kind -> the module that defines it (imported by load_index on first need)
    "exact": "llmjax.retrieval.exact",
    "ivfpq": "llmjax.retrieval.ivfpq",
    "hnsw": "llmjax.retrieval.hnsw",
    "filtered_vamana": "llmjax.retrieval.filtered_vamana",
}


class RetrievalError(ValueError):
    """Bad input to an index (one line, for people)."""


@dataclass(frozen=True)
class IndexStats:
    kind: str                # "exact", "hnsw", ...
    metric: str
    dim: int
    size: int                # live vectors (added minus removed)
    rows: int                # rows ever added (removed ones included until a rebuild)
    bytes: int               # memory held by the index's arrays (vectors, codes, graph, labels)
    build_seconds: float     # wall time spent in add / train so far


def register(cls):
    """Class decorator: make `load_index` know an index kind by its `kind` attribute."""
    _INDEX_CLASSES[cls.kind] = cls
    return cls


def as_vectors(vectors, dim: int | None, what: str = "vectors") -> np.ndarray:
    """[n, dim] float32 (from float32 / float16 / bfloat16 / float64 arrays, JAX or NumPy), checked: 2-D, the
    index's dimension, finite."""
    array = np.asarray(vectors)
    if array.ndim == 1 and what == "queries":
        array = array[None, :]
    if array.ndim != 2:
        raise RetrievalError(f"{what}: expected a [n, dim] array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
        raise RetrievalError(f"{what}: expected floating-point values, got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise RetrievalError(f"{what}: dimension {array.shape[1]} does not match the index's dimension {dim}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise RetrievalError(f"{what}: row {int(np.flatnonzero(bad)[0])} holds NaN or infinite values "
                             f"({int(bad.sum())} such rows)")
    return array


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def as_label_csr(labels, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n + 1], values int64) from None (no labels), an int array [n] (one label each) or a sequence
    of n label collections (ints or iterables of ints). Labels are non-negative ints, sorted and unique per vector."""
    if labels is None:
        return np.zeros(n + 1, np.int64), np.zeros(0, np.int64)
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        labels = labels[:, None]
    if len(labels) != n:
        raise RetrievalError(f"labels: {len(labels)} label sets for {n} vectors")
    sets = []
    for i, entry in enumerate(labels):
        values = np.unique(np.asarray([entry] if np.isscalar(entry) else list(entry), dtype=np.int64))
        if values.size and values[0] < 0:
            raise RetrievalError(f"labels: vector {i} has a negative label {int(values[0])}")
        sets.append(values)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(s) for s in sets])
    return offsets, (np.concatenate(sets) if sets else np.zeros(0, np.int64))


class VectorIndex:
    """Bookkeeping shared by every index: ids <-> rows, labels, removals, validation, save / load, stats.

    A subclass sets `kind`, calls `super().__init__(dim, metric)` and implements:
      _add(vectors [n, dim] float32, first_row)      store / insert rows first_row .. first_row + n - 1 (vectors
                                                      already normalized for "cosine"; their ids and labels are
                                                      already in row_ids / label_offsets / label_values)
      _search(queries [q, dim] float32, k, labels, **options)
                                                   -> (scores [q, k] float32, rows [q, k] int64), nearest first,
                                                      -1 / -inf where fewer than k; never a removed row. labels:
                                                      None or the filter label of each query (int64 [q]; every
                                                      one carried by some live row); `label_rows` / `row_mask`
                                                      give the rows a label admits. options: the index's own
                                                      search-time knobs (ef, nprobe, ...), passed through `search`
      _remove(rows)                                   optional: repair after rows were marked removed
      _state() -> dict of arrays and JSON-able params; _restore(state) from it
    """

    kind: ClassVar[str] = "abstract"

    def __init__(self, dim: int, metric: str = "ip"):
        if metric not in METRICS:
            raise RetrievalError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise RetrievalError(f"dim {dim!r}: expected a positive integer")
        self.dim, self.metric = int(dim), metric
        self.row_ids = np.zeros(0, np.int64)       # [rows] the caller's id of each row
        self.removed = np.zeros(0, bool)           # [rows]
        self.label_offsets = np.zeros(1, np.int64)  # [rows + 1]
        self.label_values = np.zeros(0, np.int64)
        self.build_seconds = 0.0
        self._row_of: dict[int, int] = {}

    # ---- the public interface -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Live vectors: added and not removed."""
        return len(self._row_of)

    @property
    def rows(self) -> int:
        return len(self.row_ids)

    def add(self, ids, vectors, labels=None) -> None:
        """Add vectors [n, dim] under the caller's int ids [n] (new, unique), each with a set of labels."""
        vectors = as_vectors(vectors, self.dim)
        ids = np.asarray(ids)
        if ids.shape != (len(vectors),) or not np.issubdtype(ids.dtype, np.integer):
            raise RetrievalError(f"ids: expected {len(vectors)} integer ids (one per vector), got shape {ids.shape} "
                                 f"of {ids.dtype}")
        ids = ids.astype(np.int64)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise RetrievalError(f"ids: id {int(unique[counts > 1][0])} is given more than once")
        taken = [int(i) for i in ids if int(i) in self._row_of]
        if taken:
            raise RetrievalError(f"ids: id {taken[0]} is already in the index ({len(taken)} such ids); remove it first")
        offsets, values = as_label_csr(labels, len(ids))
        if not len(ids):
            return
        start = time.perf_counter()
        first, before = self.rows, (self.row_ids, self.removed, self.label_offsets, self.label_values)
        self.row_ids = np.concatenate([self.row_ids, ids])  # the new rows' ids and labels first: _add may read them
        self.removed = np.concatenate([self.removed, np.zeros(len(ids), bool)])
        self.label_offsets = np.concatenate([self.label_offsets, self.label_offsets[-1] + offsets[1:]])
        self.label_values = np.concatenate([self.label_values, values])
        try:
            self._add(normalize(vectors) if self.metric == "cosine" else vectors, first)
        except BaseException:
            self.row_ids, self.removed, self.label_offsets, self.label_values = before
            raise
        self._row_of.update(zip(ids.tolist(), range(first, first + len(ids))))
        self.build_seconds += time.perf_counter() - start

    def search(self, queries, k: int, filter=None, **options) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [q, k], ids int64 [q, k]) of the k nearest live vectors to each query, nearest first.
        filter: None, one label for all queries, or one label per query (int array [q]): only vectors carrying it.
        options: the index's search-time knobs (HNSW's ef, IVF's nprobe, ...)."""
        queries = as_vectors(queries, self.dim, "queries")
        if self.size == 0:
            raise RetrievalError("search: the index is empty (add vectors first)")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise RetrievalError(f"k={k!r}: expected a positive integer")
        if k > self.size:
            raise RetrievalError(f"k={k} is larger than the index ({self.size} vectors)")
        if self.metric == "cosine":
            queries = normalize(queries)
        labels = self.filter_labels(filter, len(queries))
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        served = np.ones(len(queries), bool) if labels is None else np.isin(labels, self.live_labels())
        if served.any():  # a query whose label no live vector carries has the empty answer
            part = slice(None) if served.all() else served
            scores[part], rows[part] = self._search(queries[part], int(k), None if labels is None else labels[part],
                                                    **options)
        ids = np.where(rows >= 0, self.row_ids[np.maximum(rows, 0)], -1)
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32), ids.astype(np.int64)

    def remove(self, ids) -> None:
        """Remove vectors by id (every id must be in the index)."""
        ids = np.atleast_1d(np.asarray(ids))
        if not np.issubdtype(ids.dtype, np.integer):
            raise RetrievalError(f"remove: expected integer ids, got {ids.dtype}")
        unknown = [int(i) for i in ids if int(i) not in self._row_of]
        if unknown:
            raise RetrievalError(f"remove: id {unknown[0]} is not in the index ({len(unknown)} unknown ids)")
        if len(np.unique(ids)) != len(ids):
            raise RetrievalError("remove: an id is given more than once")
        rows = np.asarray([self._row_of.pop(int(i)) for i in ids], np.int64)
        self.removed[rows] = True
        self._remove(rows)

    def stats(self) -> IndexStats:
        state = self._state()
        held = sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))
        held += self.row_ids.nbytes + self.removed.nbytes + self.label_offsets.nbytes + self.label_values.nbytes
        return IndexStats(self.kind, self.metric, self.dim, self.size, self.rows, int(held), self.build_seconds)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to one .npz file, atomically (a temporary file renamed into place). The path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self._state()
        arrays = {f"state.{name}": value for name, value in state.items() if isinstance(value, np.ndarray)}
        params = {name: value for name, value in state.items() if not isinstance(value, np.ndarray)}
        header = {"format": FORMAT, "version": VERSION, "kind": self.kind, "dim": self.dim, "metric": self.metric,
                  "build_seconds": self.build_seconds, "params": params}
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "wb") as file:
                np.savez(file, header=np.frombuffer(json.dumps(header).encode(), np.uint8), row_ids=self.row_ids,
                         removed=self.removed, label_offsets=self.label_offsets, label_values=self.label_values,
                         **arrays)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    # ---- filters --------------------------------------------------------------------------------------------

    def filter_labels(self, filter, num_queries: int) -> np.ndarray | None:
        """None, or the label of each query (int64 [q]) from a `search` filter."""
        if filter is None:
            return None
        labels = np.asarray(filter)
        if not np.issubdtype(labels.dtype, np.integer):
            raise RetrievalError(f"filter: expected an int label or one int label per query, got {labels.dtype}")
        if labels.ndim == 0:
            labels = np.full(num_queries, int(labels), np.int64)
        if labels.shape != (num_queries,):
            raise RetrievalError(f"filter: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels for "
                                 f"{num_queries} queries (give one label, or one per query)")
        return labels.astype(np.int64)

    def _label_memo(self) -> dict:
        """Per-label lookups of the current rows, labels and removals, computed once and reused by every search
        until one of them changes (a search with a filter would otherwise scan every label entry each call). The
        arrays themselves are the key (add and rebuild replace them; remove only sets flags, so the count of
        removed rows tells)."""
        key = (self.label_values, self.removed, int(np.count_nonzero(self.removed)))
        memo = getattr(self, "_memo", None)
        if memo is None or memo[0][0] is not key[0] or memo[0][1] is not key[1] or memo[0][2] != key[2]:
            memo = self._memo = (key, {})
        return memo[1]  # its arrays are shared by later calls: read-only (see _frozen)

    def _label_owners(self) -> np.ndarray:
        """int64 [number of label entries]: the row each entry of label_values belongs to."""
        memo = self._label_memo()
        if "owners" not in memo:
            memo["owners"] = _frozen(np.repeat(np.arange(self.rows), np.diff(self.label_offsets)))
        return memo["owners"]

    def live_labels(self) -> np.ndarray:
        """Labels (ascending) that at least one live vector carries."""
        memo = self._label_memo()
        if "live" not in memo:
            memo["live"] = _frozen(np.unique(self.label_values[~self.removed[self._label_owners()]]))
        return memo["live"]

    def label_rows(self, label: int) -> np.ndarray:
        """Live rows (int64, ascending) that carry `label`."""
        memo = self._label_memo()
        if ("rows", label) not in memo:
            rows = np.unique(self._label_owners()[self.label_values == label])
            memo["rows", label] = _frozen(rows[~self.removed[rows]])
        return memo["rows", label]

    def row_mask(self, label: int) -> np.ndarray:
        """bool [rows]: the live rows that carry `label`."""
        mask = np.zeros(self.rows, bool)
        mask[self.label_rows(label)] = True
        return mask

    def live_mask(self) -> np.ndarray:
        """bool [rows]: rows not removed."""
        return ~self.removed

    # ---- hooks ----------------------------------------------------------------------------------------------

    def _add(self, vectors: np.ndarray, first_row: int) -> None:
        raise NotImplementedError

    def _search(self, queries: np.ndarray, k: int, labels: np.ndarray | None,
                **options) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _remove(self, rows: np.ndarray) -> None:
        """Rows were marked removed; an index that must repair a structure does it here."""

    def _state(self) -> dict:
        raise NotImplementedError

    def _restore(self, state: dict) -> None:
        raise NotImplementedError


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Write a folder atomically: yields an empty temporary folder beside it, which replaces `folder` (an older
    one is removed) only when the block ends without an error; otherwise it is deleted and `folder` is untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.mkdir()
    try:
        yield temporary
        if folder.exists():
            shutil.rmtree(folder)
        temporary.rename(folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def load_index(path: str | os.PathLike) -> VectorIndex:
    """An index saved by `VectorIndex.save` (any kind)."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{path}: no such index file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}  # reads every member: zip CRCs checked
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
        raise RetrievalError(f"{path}: not a readable index file (corrupt or truncated: {error})") from None
    try:
        header = json.loads(arrays.pop("header").tobytes())
    except (KeyError, ValueError):
        raise RetrievalError(f"{path}: not an llmjax index file (no header)") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise RetrievalError(f"{path}: not an llmjax index file of version {VERSION} (format {header.get('format')!r}, "
                             f"version {header.get('version')!r})")
    if header.get("kind") in KIND_MODULES and header["kind"] not in _INDEX_CLASSES:
        importlib.import_module(KIND_MODULES[header["kind"]])
    cls = _INDEX_CLASSES.get(header.get("kind"))
    if cls is None:
        raise RetrievalError(f"{path}: unknown index kind {header.get('kind')!r} "
                             f"(known: {', '.join(sorted(_INDEX_CLASSES))})")
    index = cls.__new__(cls)
    VectorIndex.__init__(index, header["dim"], header["metric"])
    index.row_ids, index.removed = arrays.pop("row_ids"), arrays.pop("removed")
    index.label_offsets, index.label_values = arrays.pop("label_offsets"), arrays.pop("label_values")
    index.build_seconds = float(header["build_seconds"])
    index._row_of = {int(i): row for row, i in enumerate(index.row_ids.tolist()) if not index.removed[row]}
    state = {name.removeprefix("state."): value for name, value in arrays.items()}
    index._restore({**header["params"], **state})
    return index


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids [q, k] each; -1 places in truth do not count): recall@k
    when both hold k ids. A query whose truth is empty counts as fully recalled."""
    hits = total = 0
    for got, want in zip(np.asarray(found), np.asarray(truth)):
        want = want[want >= 0]
        hits += np.isin(want, got[got >= 0]).sum()
        total += len(want)
    return float(hits / total) if total else 1.0
