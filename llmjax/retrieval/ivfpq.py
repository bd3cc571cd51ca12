"""IVF + anisotropic product quantization (ScaNN-style) in JAX: a coarse k-means partition, residual PQ codes
scored with lookup tables, and an exact re-rank of the best candidates.

    index = IVFPQIndex(128, "ip", nlist=1024, m=32, nprobe=32, reorder=100)
    index.add(ids, vectors)                        # the first add trains (coarse k-means, then residual PQ)
    scores, ids = index.search(queries, k=10)      # or search(queries, 10, nprobe=64, reorder=200)

Search, for a chunk of queries at once (one jitted program, on whatever device JAX runs):
1. score the nlist centroids (one matmul) and keep the nprobe best lists per query;
2. lay the probed lists end to end into a fixed number of candidate slots per query (the inverted lists are one
   array of codes sorted by list, so slot -> (list, offset) is a searchsorted over the probed sizes and the codes
   are one gather; no list is padded, so lists of very different sizes, which k-means makes on real data, cost
   what they hold) and score each code with the query's lookup tables: <q, x> ~ <q, c> + sum_s table[s, code_s]
   (the residual x - c is what PQ codes). The slots cover the nprobe largest lists together, or `max_codes`;
3. keep the `reorder` best candidates and re-rank them with the exact vectors (float32, or bfloat16 to halve the
   memory), then the top k. Without kept vectors the PQ scores are the answer.
"l2" uses the same inner-product tables: -||q - x||^2 = 2 <q, x> - ||x||^2 - ||q||^2 with ||x||^2 stored exactly
per vector (4 bytes), so only the inner product is approximated, and the anisotropic loss applies to it too.

Training: coarse k-means on (a sample of) the vectors in the index's metric (for "ip" by the largest inner product,
as faiss does: a vector then lives in the list a query ranks by <q, c>; L2 assignment with inner-product probing
loses the large-norm vectors that win inner products), every vector to its best centroid, then PQ on the
residuals z = x - c. loss="anisotropic" (ScaNN) weighs the residual's error along the
datapoint x by eta (pq.py): eta from `anisotropic_threshold` T via the paper's Theorem 3.4, with T in units of the
largest training norm (so for unit-norm data, "cosine", it is the paper's T; ScaNN recommends 0.2 there), or a
fixed `eta`. loss="reconstruction" is plain PQ (eta = 1), the same code size.

Filters: each filter label's queries are searched with only the rows carrying it admitted. A label carried by
no more rows than probing would score anyway (nprobe x the mean list length) is searched by brute force over
those rows instead (same work, exact): probing would find few of them.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from llmjax.retrieval import pq
from llmjax.retrieval.base import RetrievalError, VectorIndex, as_vectors, normalize, register
from llmjax.retrieval.exact import exact_top_k
from llmjax.retrieval.kmeans import assign, kmeans

LOSSES = ("anisotropic", "reconstruction")
VECTOR_DTYPES = ("float32", "bfloat16")
ADD_BLOCK = 65536  # vectors encoded per call (padded to a power of two: a few compiled shapes)
TRAIN_SAMPLE = 65536  # vectors used to train (at least 64 per list): k-means and PQ converge long before more


@functools.partial(jax.jit, static_argnames=("k", "nprobe", "reorder", "budget", "metric"))
def ivfpq_search(queries, centroids, codebooks, list_codes, list_rows, list_starts, list_sizes, admitted,
                 squared_norms, vectors, *, k: int, nprobe: int, reorder: int, budget: int, metric: str):
    """(scores [q, k] float32, rows [q, k] int32; -inf / -1 where fewer than k admitted rows were probed).

    queries [q, dim]; centroids [nlist, dim]; codebooks [m, K, dim/m]; list_codes [rows + 1, m] uint8 and
    list_rows [rows + 1] int32: every row's code and row number, sorted by list (the last entry: padding, row
    `rows`); list_starts, list_sizes [nlist] int32; admitted [rows + 1] bool (the padding slot False);
    squared_norms [rows + 1] ("l2"; else unused); vectors [rows + 1, dim] or None (no re-rank). budget: candidate
    slots per query; the probed lists fill them best list first, and what does not fit is not scored."""
    padding = list_rows.shape[0] - 1  # the padding entry of the sorted arrays
    coarse = jnp.dot(queries, centroids.T, preferred_element_type=jnp.float32)  # [q, nlist] <q, c>
    ranking = coarse if metric != "l2" else 2.0 * coarse - jnp.sum(centroids * centroids, -1)
    _, probe = jax.lax.top_k(ranking, nprobe)  # [q, nprobe], best list first
    sizes = list_sizes[probe]  # [q, nprobe]
    ends = jnp.cumsum(sizes, 1)  # [q, nprobe] the slots each probed list fills end here
    slots = jnp.arange(budget, dtype=jnp.int32)
    which = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right"))(ends)  # [q, budget] probed list of a slot
    which_c = jnp.minimum(which, nprobe - 1)
    offset = slots - jnp.take_along_axis(ends - sizes, which_c, 1)  # [q, budget] place inside that list
    lists = jnp.take_along_axis(probe, which_c, 1)  # [q, budget]
    position = jnp.where(which < nprobe, list_starts[lists] + offset, padding)  # [q, budget] into the sorted rows
    rows = list_rows[position]  # [q, budget]
    tables = pq.distance_tables(queries, codebooks, "ip")  # [q, m, K]
    inner = jnp.take_along_axis(coarse, lists, 1) + pq.lookup_scores(tables, list_codes[position])  # [q, budget]
    scores = inner if metric != "l2" else 2.0 * inner - squared_norms[rows]  # (l2: + ||q||^2, added at the end)
    scores = jnp.where(admitted[rows], scores, -jnp.inf)
    width = max(k, reorder if vectors is not None else k)
    if budget < width:  # fewer slots than asked for: pad with empty places
        scores = jnp.pad(scores, ((0, 0), (0, width - budget)), constant_values=-jnp.inf)
        rows = jnp.pad(rows, ((0, 0), (0, width - budget)), constant_values=padding)
    top, picked = jax.lax.top_k(scores, width)  # [q, reorder]
    candidates = jnp.take_along_axis(rows, picked, 1)
    if vectors is not None:  # exact re-rank of the candidates
        exact = jnp.einsum("qd,qrd->qr", queries.astype(vectors.dtype), vectors[candidates],
                           preferred_element_type=jnp.float32)  # [q, reorder]
        if metric == "l2":
            exact = 2.0 * exact - squared_norms[candidates]
        exact = jnp.where(jnp.isfinite(top), exact, -jnp.inf)
        top, keep = jax.lax.top_k(exact, k)
        candidates = jnp.take_along_axis(candidates, keep, 1)
    if metric == "l2":
        top = top - jnp.sum(queries * queries, -1, keepdims=True)
    return top, jnp.where(jnp.isfinite(top), candidates, -1)


def sorted_lists(assignments: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverted lists as one array: (rows sorted by list int32 [rows] (stable: insertion order inside a list),
    starts int32 [nlist], sizes int32 [nlist])."""
    order = np.argsort(assignments, kind="stable").astype(np.int32)
    sizes = np.bincount(assignments, minlength=nlist).astype(np.int32)
    starts = (np.cumsum(sizes) - sizes).astype(np.int32)
    return order, starts, sizes


def slot_budget(sizes: np.ndarray, nprobe: int, max_codes: int | None, multiple: int = 256) -> int:
    """Candidate slots per query: the nprobe largest lists together (no query can need more; rounded up to
    `multiple` so a growing index reuses its compiled search), or max_codes when that is smaller."""
    need = int(np.sort(sizes)[::-1][:nprobe].sum())
    need = max(multiple, -(-need // multiple) * multiple)
    return need if max_codes is None else max(1, min(need, int(max_codes)))


@register
class IVFPQIndex(VectorIndex):
    """Inverted lists of anisotropic PQ codes with an exact re-rank (see the module docstring).

    nlist: coarse lists; m: PQ subspaces (default dim / 4 rounded down to a divisor of dim) of 2^bits centroids
    (bits <= 8); anisotropic_threshold T or a fixed eta (loss="anisotropic"), or loss="reconstruction" (plain PQ);
    nprobe lists searched per query (default 32, or nlist if fewer); reorder candidates re-ranked exactly
    (keep_vectors: the vectors are kept, in vector_dtype, for that); max_codes: at most this many codes scored per
    query (faiss's max_codes: the lowest-ranked probed lists are cut; None: every probed code); query_block:
    queries per jitted call (bounds memory: query_block x the candidate slots x m bytes of codes at once).
    nprobe, reorder and max_codes can also be given per search: search(queries, k, nprobe=64)."""

    kind = "ivfpq"

    def __init__(self, dim: int, metric: str = "ip", *, nlist: int = 1024, m: int | None = None, bits: int = 8,
                 anisotropic_threshold: float = 0.2, eta: float | None = None, loss: str = "anisotropic",
                 nprobe: int | None = None, reorder: int = 100, keep_vectors: bool = True,
                 vector_dtype: str = "float32", max_codes: int | None = None, query_block: int = 256,
                 seed: int = 0):
        super().__init__(dim, metric)
        if m is None:
            m = max(d for d in range(1, max(1, self.dim // 4) + 1) if self.dim % d == 0)
        if not isinstance(nlist, (int, np.integer)) or nlist < 1:
            raise RetrievalError(f"nlist={nlist!r}: expected a positive integer")
        if not isinstance(m, (int, np.integer)) or m < 1 or self.dim % m:
            raise RetrievalError(f"m={m!r}: the number of PQ subspaces must divide dim={self.dim}")
        if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
            raise RetrievalError(f"bits={bits!r}: expected 1..8 (codes are one byte per subspace)")
        if loss not in LOSSES:
            raise RetrievalError(f"loss={loss!r}: expected one of {', '.join(LOSSES)}")
        if eta is not None and not eta > 0:
            raise RetrievalError(f"eta={eta!r}: expected a positive weight of the parallel error (1: plain PQ)")
        if not 0 <= anisotropic_threshold < 1:
            raise RetrievalError(f"anisotropic_threshold={anisotropic_threshold!r}: expected T in [0, 1) (a fraction "
                                 "of the largest vector norm)")
        if vector_dtype not in VECTOR_DTYPES:
            raise RetrievalError(f"vector_dtype={vector_dtype!r}: expected one of {', '.join(VECTOR_DTYPES)}")
        if max_codes is not None and (not isinstance(max_codes, (int, np.integer)) or max_codes < 1):
            raise RetrievalError(f"max_codes={max_codes!r}: expected a positive number of codes to score per query")
        if not isinstance(query_block, (int, np.integer)) or query_block < 1:
            raise RetrievalError(f"query_block={query_block!r}: expected a positive integer")
        self.nlist, self.m, self.bits, self.seed = int(nlist), int(m), int(bits), int(seed)
        self.anisotropic_threshold, self.eta, self.loss = float(anisotropic_threshold), eta, loss
        self.keep_vectors, self.vector_dtype, self.query_block = bool(keep_vectors), vector_dtype, int(query_block)
        self.max_codes = None if max_codes is None else int(max_codes)
        self.nprobe, self.reorder = self._check_probe(min(32, self.nlist) if nprobe is None else nprobe, reorder, 1)
        self.centroids = self.codebooks = None  # [nlist, dim], [m, K, dim/m] once trained
        self.train_max_norm = 0.0
        self.codes = np.zeros((0, self.m), np.uint8)  # [rows, m]
        self.assignments = np.zeros(0, np.int32)  # [rows] the list of each row
        self.squared_norms = np.zeros(0, np.float32)  # [rows] ||x||^2 (for "l2")
        self.vectors = np.zeros((0, dim), np.float32 if vector_dtype == "float32" else np.uint16)  # bf16 as bits
        self._device = None

    def _check_probe(self, nprobe, reorder, k):
        if not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= self.nlist:
            raise RetrievalError(f"nprobe={nprobe!r}: expected 1..nlist ({self.nlist}) lists to search")
        if not isinstance(reorder, (int, np.integer)) or reorder < k:
            raise RetrievalError(f"reorder={reorder!r} is smaller than k={k}: re-rank at least k candidates")
        return int(nprobe), int(reorder)

    # ---- training -------------------------------------------------------------------------------------------

    @property
    def trained(self) -> bool:
        return self.centroids is not None

    def train(self, vectors) -> None:
        """Coarse k-means, then residual PQ codebooks (anisotropic or plain) from the vectors [n, dim], n >= nlist
        and n >= 2^bits. add() trains on its first vectors when this was not called."""
        vectors = as_vectors(vectors, self.dim, "train vectors")
        start = time.perf_counter()
        self._train(normalize(vectors) if self.metric == "cosine" else vectors)
        self.build_seconds += time.perf_counter() - start

    def _eta(self, squared_norms):
        """Per-vector weight of the parallel error (1 for plain PQ)."""
        if self.loss == "reconstruction":
            return jnp.ones_like(squared_norms)
        if self.eta is not None:
            return jnp.full_like(squared_norms, self.eta)
        return pq.anisotropic_eta(squared_norms, self.anisotropic_threshold * self.train_max_norm, self.dim)

    def _train(self, vectors: np.ndarray) -> None:
        n = len(vectors)
        if n < self.nlist:
            raise RetrievalError(f"nlist={self.nlist} is larger than the {n} training vectors: train (or first add) "
                                 f"with at least nlist vectors, or lower nlist")
        if n < 2 ** self.bits:
            raise RetrievalError(f"bits={self.bits} needs at least {2 ** self.bits} training vectors (got {n}): "
                                 f"train with more, or lower bits")
        key = jax.random.key(self.seed)
        sample_key, coarse_key, pq_key = jax.random.split(key, 3)
        size = min(n, max(TRAIN_SAMPLE, 64 * self.nlist))
        sample = vectors if size == n else vectors[np.sort(np.asarray(jax.random.choice(sample_key, n, (size,),
                                                                                         replace=False)))]
        sample = jnp.asarray(sample)
        centroids, _ = kmeans(sample, self.nlist, coarse_key, metric=self.metric)
        residuals = sample - centroids[assign(sample, centroids, metric=self.metric)[0]]
        squared_norms = jnp.sum(sample * sample, -1)
        self.train_max_norm = float(jnp.sqrt(jnp.max(squared_norms)))
        directions = sample / jnp.sqrt(jnp.maximum(squared_norms, 1e-30))[:, None]
        anisotropic = self.loss == "anisotropic"
        self.codebooks = np.asarray(pq.train_pq(residuals, self.m, self.bits, pq_key,
                                                directions=directions if anisotropic else None,
                                                eta=self._eta(squared_norms) if anisotropic else None))
        self.centroids = np.asarray(centroids)
        self._device = None

    # ---- add / remove ---------------------------------------------------------------------------------------

    def _add(self, vectors, first_row):
        if not self.trained:
            self._train(vectors)
        parts = [self._encode(vectors[start: start + ADD_BLOCK]) for start in range(0, len(vectors), ADD_BLOCK)]
        lists, codes, squared_norms = (np.concatenate(column) for column in zip(*parts))
        self.codes = np.concatenate([self.codes, codes])
        self.assignments = np.concatenate([self.assignments, lists])
        self.squared_norms = np.concatenate([self.squared_norms, squared_norms])
        if self.keep_vectors:
            kept = vectors if self.vector_dtype == "float32" else vectors.astype(ml_dtypes.bfloat16).view(np.uint16)
            self.vectors = np.concatenate([self.vectors, kept])
        self._device = None

    def _encode(self, vectors: np.ndarray):
        """(lists int32 [n], codes uint8 [n, m], squared norms float32 [n]) of up to ADD_BLOCK vectors, padded to a
        power of two (adds of any size reuse a few compiled programs)."""
        n = len(vectors)
        padded = np.zeros((1 << max(n - 1, 1).bit_length(), self.dim), np.float32)
        padded[:n] = vectors
        x = jnp.asarray(padded)
        centroids, codebooks = jnp.asarray(self.centroids), jnp.asarray(self.codebooks)
        lists = assign(x, centroids, metric=self.metric)[0]
        residuals = x - centroids[lists]
        squared_norms = jnp.sum(x * x, -1)
        if self.loss == "anisotropic":
            directions = x / jnp.sqrt(jnp.maximum(squared_norms, 1e-30))[:, None]
            codes = pq.encode_anisotropic(residuals, directions, self._eta(squared_norms), codebooks)
        else:
            codes = pq.encode(residuals, codebooks)
        return np.asarray(lists)[:n], np.asarray(codes)[:n], np.asarray(squared_norms)[:n]

    def _remove(self, rows):
        self._device = None  # the admitted mask changes (codes stay: a removed row is masked, never returned)

    # ---- search ---------------------------------------------------------------------------------------------

    def _host_vectors(self) -> np.ndarray:
        """[rows, dim] float32 / bfloat16 (the kept vectors as stored)."""
        return self.vectors if self.vector_dtype == "float32" else self.vectors.view(ml_dtypes.bfloat16)

    def _device_arrays(self) -> dict:
        """The index on the device (built on first search after a change): codes and row numbers sorted by list,
        and the per-row arrays, each with one padding entry at the end."""
        if self._device is None:
            order, starts, sizes = sorted_lists(self.assignments, self.nlist)
            pad = lambda a: np.concatenate([a, np.zeros((1, *a.shape[1:]), a.dtype)])  # noqa: E731
            self._device = {
                "centroids": jnp.asarray(self.centroids), "codebooks": jnp.asarray(self.codebooks),
                "list_codes": jnp.asarray(pad(self.codes[order])),
                "list_rows": jnp.asarray(np.append(order, np.int32(self.rows))),
                "list_starts": jnp.asarray(starts), "list_sizes": jnp.asarray(sizes), "sizes": sizes,
                "live": jnp.asarray(pad(self.live_mask())),
                "squared_norms": jnp.asarray(pad(self.squared_norms)),
                "vectors": jnp.asarray(pad(self._host_vectors())) if self.keep_vectors else None,
            }
        return self._device

    def _search(self, queries, k, labels, nprobe: int | None = None, reorder: int | None = None,
                max_codes: int | None = None):
        nprobe, reorder = self._check_probe(self.nprobe if nprobe is None else nprobe,
                                            self.reorder if reorder is None else reorder, k)
        max_codes = self.max_codes if max_codes is None else max_codes
        if max_codes is not None and (not isinstance(max_codes, (int, np.integer)) or max_codes < 1):
            raise RetrievalError(f"max_codes={max_codes!r}: expected a positive number of codes to score per query")
        reorder = min(reorder, self.rows)
        device = self._device_arrays()
        budget = slot_budget(device["sizes"], nprobe, max_codes)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        groups = [(None, np.arange(len(queries)))] if labels is None else [
            (label, np.flatnonzero(labels == label)) for label in np.unique(labels)]
        for label, members in groups:
            if label is None:
                admitted = device["live"]
            else:
                carriers = self.label_rows(label)
                if len(carriers) <= nprobe * self.rows / self.nlist:  # probing would score as many: go exact
                    scores[members], rows[members] = self._brute_force(queries[members], carriers, k)
                    continue
                admitted = jnp.asarray(np.append(self.row_mask(label), False))
            for start in range(0, len(members), self.query_block):
                part = members[start: start + self.query_block]
                chunk = np.zeros((self.query_block if len(members) > self.query_block else len(part), self.dim),
                                 np.float32)  # a fixed chunk shape (one compile) once queries come in chunks
                chunk[: len(part)] = queries[part]
                top_scores, top_rows = ivfpq_search(
                    jnp.asarray(chunk), device["centroids"], device["codebooks"], device["list_codes"],
                    device["list_rows"], device["list_starts"], device["list_sizes"], admitted,
                    device["squared_norms"], device["vectors"], k=k, nprobe=nprobe, reorder=reorder, budget=budget,
                    metric=self.metric)
                scores[part], rows[part] = np.asarray(top_scores)[: len(part)], np.asarray(top_rows)[: len(part)]
        return scores, rows

    def _brute_force(self, queries, rows, k):
        """Exact search over a few rows (a rare filter label): their kept vectors, or their PQ reconstructions."""
        if self.keep_vectors:
            vectors = self._host_vectors()[rows].astype(np.float32)
        else:
            vectors = self.centroids[self.assignments[rows]] + np.asarray(pq.decode(self.codes[rows], self.codebooks))
        top, found = exact_top_k(vectors, queries, k, self.metric)
        return top, np.where(found >= 0, rows[np.maximum(found, 0)], -1)

    # ---- save / load ----------------------------------------------------------------------------------------

    def _state(self):
        state = {"nlist": self.nlist, "m": self.m, "bits": self.bits, "seed": self.seed, "loss": self.loss,
                 "anisotropic_threshold": self.anisotropic_threshold, "eta": self.eta, "nprobe": self.nprobe,
                 "reorder": self.reorder, "keep_vectors": self.keep_vectors, "vector_dtype": self.vector_dtype,
                 "query_block": self.query_block, "max_codes": self.max_codes, "train_max_norm": self.train_max_norm,
                 "codes": self.codes, "assignments": self.assignments, "squared_norms": self.squared_norms,
                 "vectors": self.vectors}
        if self.trained:
            state.update(centroids=self.centroids, codebooks=self.codebooks)
        return state

    def _restore(self, state):
        for name in ("nlist", "m", "bits", "seed", "loss", "anisotropic_threshold", "eta", "nprobe", "reorder",
                     "keep_vectors", "vector_dtype", "query_block", "max_codes", "train_max_norm", "codes",
                     "assignments", "squared_norms", "vectors"):
            setattr(self, name, state[name])
        self.centroids, self.codebooks = state.get("centroids"), state.get("codebooks")
        self._device = None
