"""MinHash + LSH near-duplicate detection, vectorized in NumPy.

Each document becomes a set of shingles (word or character n-grams), each hashed once to a
32-bit integer x. A MinHash signature holds, for each of `num_perm` random hash functions
h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 (multiply-add-shift, Dietzfelbinger's strongly
universal family for 32-bit keys: random odd 64-bit a_i, random 64-bit b_i; the mod is the
uint64 wrap-around, so it costs three vector operations and no division), the minimum over the
document's shingles: P[sig_a[i] == sig_b[i]] ~= Jaccard(A, B).
All permutations of all shingles of a batch of documents are computed as one
[shingles, num_perm] array and reduced per document with `np.minimum.reduceat`.

LSH: the signature is cut into `bands` bands of `rows` rows; two documents whose band matches in
at least one band become candidates, with probability 1 - (1 - s^rows)^bands at Jaccard s.
Candidates are kept when their exact Jaccard (shingle sets, built for candidates only) or their
estimated Jaccard (matching signature positions) is >= threshold, then joined into clusters by
union-find; the first document of each cluster is kept. Bands and rows are chosen as datasketch
does (minimizing weighted false-positive + false-negative areas), weighting misses 0.9 by
default because every candidate is verified anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

MAX_HASH = np.uint64((1 << 32) - 1)
SHINGLE_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: combines word hashes into n-gram hashes
CHUNK_ELEMENTS = 1 << 19  # shingles x permutations per signature chunk (4 MB of uint64: stays in cache)


class MinHashError(ValueError):
    """Bad MinHash / LSH parameters."""


@dataclass(frozen=True)
class MinHashConfig:
    """ngram: shingle length (words, or characters when unit="char"); num_perm: hash functions;
    bands x rows = num_perm (bands=None: chosen by `optimal_bands` for the threshold);
    threshold: the Jaccard similarity above which two documents are near-duplicates."""

    ngram: int = 5
    unit: str = "word"
    num_perm: int = 128
    bands: int | None = None
    threshold: float = 0.8
    seed: int = 1
    false_negative_weight: float = 0.9  # for choosing bands: candidates are verified, so a miss costs more
    verify: str = "exact"  # "exact": Jaccard of the candidates' shingle sets; "estimate": from the signatures

    def __post_init__(self):
        if self.ngram < 1:
            raise MinHashError(f"ngram must be at least 1, got {self.ngram}")
        if self.unit not in ("word", "char"):
            raise MinHashError(f"unit must be 'word' or 'char', not {self.unit!r}")
        if self.num_perm < 2:
            raise MinHashError(f"num_perm must be at least 2, got {self.num_perm}")
        if not 0.0 < self.threshold < 1.0:
            raise MinHashError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 < self.false_negative_weight < 1.0:
            raise MinHashError(f"false_negative_weight must be in (0, 1), got {self.false_negative_weight}")
        if self.verify not in ("exact", "estimate"):
            raise MinHashError(f"verify must be 'exact' or 'estimate', not {self.verify!r}")
        if self.bands is not None and (self.bands < 1 or self.num_perm % self.bands):
            raise MinHashError(f"bands ({self.bands}) must divide num_perm ({self.num_perm})")

    @property
    def band_layout(self) -> tuple[int, int]:
        """(bands, rows)."""
        if self.bands is None:
            return optimal_bands(self.threshold, self.num_perm, 1.0 - self.false_negative_weight,
                                 self.false_negative_weight)
        return self.bands, self.num_perm // self.bands


# --- shingles ---------------------------------------------------------------------------------


def word_character_table() -> np.ndarray:
    """[0x110000] bool: which code points are word characters (str.isalnum or "_"; surrogates are not)."""
    bmp = np.array([chr(c).isalnum() or c == 95 for c in range(65536)], dtype=bool)
    return np.concatenate([bmp, np.ones(0x110000 - 65536, dtype=bool)])  # beyond the BMP: letters, mostly


WORD_CHARACTER = word_character_table()
HASH_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64
HASH_BASE_INVERSE = np.uint64(pow(0x100000001B3, -1, 1 << 64))


def word_hashes(text: str) -> np.ndarray:
    """[words] uint64 polynomial hashes of the text's words (runs of word characters), lowercased.

    Vectorized over characters: with prefix[k] = sum_{i<k} c_i * B^-i (mod 2^64), the word
    [s, e) hashes to (prefix[e] - prefix[s]) * B^s = sum c_i * B^(i-s): no Python loop per word.
    """
    codes = np.frombuffer(text.lower().encode("utf-32-le"), dtype=np.uint32)  # [characters]
    if codes.size == 0:
        return np.zeros(0, np.uint64)
    is_word = np.zeros(codes.size + 2, dtype=np.int8)
    is_word[1:-1] = WORD_CHARACTER[codes]
    edges = np.flatnonzero(is_word[1:] != is_word[:-1])  # alternating word starts and ends
    starts, ends = edges[0::2], edges[1::2]
    powers_inverse = power_table(HASH_BASE_INVERSE, codes.size)
    prefix = np.concatenate([[np.uint64(0)], np.cumsum((codes.astype(np.uint64) + np.uint64(1)) * powers_inverse,
                                                         dtype=np.uint64)])
    powers = power_table(HASH_BASE, codes.size)
    return (prefix[ends] - prefix[starts]) * powers[starts]


_POWER_CACHE: dict[int, np.ndarray] = {}


def power_table(base: np.uint64, length: int) -> np.ndarray:
    """[length] uint64: base^0 .. base^(length-1) modulo 2^64 (cached, grown by doubling)."""
    key = int(base)
    table = _POWER_CACHE.get(key)
    if table is None or len(table) < length:
        size = max(1024, 1 << max(length - 1, 1).bit_length())
        table = np.empty(size, dtype=np.uint64)
        table[0] = 1
        filled = 1
        with np.errstate(over="ignore"):
            while filled < size:  # doubling: log2(size) vector steps
                step = min(filled, size - filled)
                table[filled: filled + step] = table[:step] * (table[filled - 1] * base)
                filled += step
        _POWER_CACHE[key] = table
    return table[:length]


def ngram_hashes(unit_hashes: np.ndarray, ngram: int) -> np.ndarray:
    """[max(units - ngram + 1, 1)] uint64 (< 2^32) hashes of consecutive n-grams (fewer units: one shingle of all)."""
    count = len(unit_hashes)
    if count == 0:
        return np.zeros(0, np.uint64)
    width = min(ngram, count)
    combined = unit_hashes[: count - width + 1].copy()
    for offset in range(1, width):  # a loop over n-gram positions, not over shingles
        combined = combined * SHINGLE_MIX + unit_hashes[offset: count - width + 1 + offset]
    combined ^= combined >> np.uint64(29)
    return (combined * SHINGLE_MIX >> np.uint64(32)) & MAX_HASH


def shingle_hashes(text: str, ngram: int = 5, unit: str = "word", unique: bool = True) -> np.ndarray:
    """[shingles] uint64 (< 2^32): the document's word or character n-grams, hashed (words lowercased).
    unique=False keeps repeats (the MinHash is the same; skipping the sort is faster)."""
    if unit == "word":
        units = word_hashes(text)
    else:
        units = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    hashes = ngram_hashes(units, ngram)
    return np.unique(hashes) if unique else hashes


def shingle_set(text: str, ngram: int = 5, unit: str = "word") -> set[int]:
    """The shingle hashes as a Python set (for exact Jaccard)."""
    return set(shingle_hashes(text, ngram, unit).tolist())


def exact_jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# --- signatures -------------------------------------------------------------------------------


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """([num_perm], [num_perm]) uint64 coefficients: a odd, b any 64-bit value."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    b = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
    return a, b


def signatures(shingles: Sequence[np.ndarray], num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """[documents, num_perm] uint32 MinHash signatures; a document without shingles gets all 2^32-1.

    The shingles of many documents are concatenated and hashed by all permutations at once
    ([num_perm, chunk_shingles], in two reused buffers), then reduced per document with
    np.minimum.reduceat: no Python loop per shingle.
    """
    a, b = permutations(num_perm, seed)
    out = np.full((num_perm, len(shingles)), MAX_HASH, dtype=np.uint64)  # [num_perm, documents]
    columns_per_chunk = max(1, CHUNK_ELEMENTS // num_perm)
    lengths = np.fromiter((len(s) for s in shingles), dtype=np.int64, count=len(shingles))
    buffers = np.empty((num_perm, max(columns_per_chunk, int(lengths.max(initial=0)))), dtype=np.uint64)
    start = 0
    while start < len(shingles):
        stop, total = start, 0
        while stop < len(shingles) and (stop == start or total + lengths[stop] <= columns_per_chunk):
            total += lengths[stop]
            stop += 1
        chunk_signatures(shingles[start:stop], lengths[start:stop], a, b, out[:, start:stop], buffers)
        start = stop
    return np.ascontiguousarray(out.T).astype(np.uint32)


def chunk_signatures(shingles: Sequence[np.ndarray], lengths: np.ndarray, a: np.ndarray, b: np.ndarray,
                     out: np.ndarray, buffers: np.ndarray) -> None:
    """Fill out [num_perm, documents] for one chunk of documents: h(x) = ((a * x + b) mod 2^64) >> 32, the shift
    applied after the minimum (x -> x >> 32 is monotone, so min(x >> 32) = min(x) >> 32: one pass fewer)."""
    total = int(lengths.sum())
    if total == 0:
        return
    values = np.concatenate(shingles).astype(np.uint64, copy=False)  # [shingles]
    hashed = buffers[:, :total]  # [num_perm, shingles]
    np.multiply(a[:, None], values[None, :], out=hashed)
    np.add(hashed, b[:, None], out=hashed)
    nonempty = lengths > 0
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])[nonempty]
    out[:, nonempty] = np.minimum.reduceat(hashed, offsets, axis=1) >> np.uint64(32)


def estimated_jaccard(signature_a: np.ndarray, signature_b: np.ndarray) -> np.ndarray:
    """Share of equal positions (last axis): an unbiased estimate of Jaccard, std sqrt(J(1-J)/num_perm)."""
    return np.mean(signature_a == signature_b, axis=-1)


# --- LSH ----------------------------------------------------------------------------------------


def collision_probability(similarity: float | np.ndarray, bands: int, rows: int):
    """P[two documents of Jaccard s share at least one band] = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


def optimal_bands(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
                  false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the weighted false-positive area
    (collision probability integrated below the threshold) plus false-negative area (its
    complement integrated above), as datasketch's MinHashLSH chooses them (here bands * rows
    must equal num_perm exactly is not required; rows = num_perm // bands)."""
    grid_low = np.linspace(0.0, threshold, 201)
    grid_high = np.linspace(threshold, 1.0, 201)
    best, best_error = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = np.trapezoid(collision_probability(grid_low, bands, rows), grid_low)
            false_negative = np.trapezoid(1.0 - collision_probability(grid_high, bands, rows), grid_high)
            error = false_positive_weight * false_positive + false_negative_weight * false_negative
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_keys(signatures_: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[documents, bands] uint64: one hash per band of rows signature values."""
    documents = signatures_.shape[0]
    cut = signatures_[:, : bands * rows].astype(np.uint64).reshape(documents, bands, rows)
    keys = np.zeros((documents, bands), dtype=np.uint64)
    for row in range(rows):  # a loop over rows per band (<= num_perm), vectorized over documents and bands
        keys = keys * SHINGLE_MIX + cut[:, :, row] + np.uint64(row + 1)
    return keys


def candidate_pairs(signatures_: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[pairs, 2] int64 (i < j), unique: documents sharing at least one band bucket."""
    keys = band_keys(signatures_, bands, rows)  # [documents, bands]
    documents = keys.shape[0]
    found = []
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        boundaries = np.flatnonzero(np.diff(sorted_keys)) + 1
        starts = np.concatenate([[0], boundaries])
        sizes = np.diff(np.concatenate([starts, [documents]]))
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = np.sort(order[start: start + size])
            i, j = np.triu_indices(size, k=1)
            found.append(np.stack([members[i], members[j]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0).astype(np.int64)


def verified_pairs(signatures_: np.ndarray, pairs: np.ndarray, threshold: float) -> np.ndarray:
    """The candidate pairs whose estimated Jaccard is >= threshold."""
    if len(pairs) == 0:
        return pairs
    similarity = estimated_jaccard(signatures_[pairs[:, 0]], signatures_[pairs[:, 1]])
    return pairs[similarity >= threshold]


def exactly_verified_pairs(texts: Sequence[str] | None, pairs: np.ndarray, config: MinHashConfig,
                           shingles: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The candidate pairs whose exact Jaccard of shingle sets is >= threshold (sets built for
    candidates only, from `shingles` when the signature pass kept them, else from the texts)."""
    if len(pairs) == 0:
        return pairs
    sets: dict[int, np.ndarray] = {}
    for index in np.unique(pairs).tolist():
        sets[index] = (np.unique(shingles[index]) if shingles is not None
                       else shingle_hashes(texts[index], config.ngram, config.unit))  # sorted, unique
    keep = np.zeros(len(pairs), dtype=bool)
    for k, (i, j) in enumerate(pairs.tolist()):
        a, b = sets[i], sets[j]
        shared = len(np.intersect1d(a, b, assume_unique=True))
        union = len(a) + len(b) - shared
        keep[k] = (shared / union if union else 1.0) >= config.threshold
    return pairs[keep]


def near_duplicate_pairs(signatures_: np.ndarray, config: MinHashConfig, texts: Sequence[str] | None = None,
                         shingles: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """[pairs, 2] near-duplicate document index pairs (i < j): LSH candidates, then verified by
    exact Jaccard (config.verify == "exact" and texts or shingles given) or by the signatures' estimate."""
    bands, rows = config.band_layout
    candidates = candidate_pairs(signatures_, bands, rows)
    if config.verify == "exact" and (texts is not None or shingles is not None):
        return exactly_verified_pairs(texts, candidates, config, shingles)
    return verified_pairs(signatures_, candidates, config.threshold)


# --- clusters -------------------------------------------------------------------------------------


def cluster_roots(num_documents: int, pairs: np.ndarray) -> np.ndarray:
    """[documents] the smallest document index of each one's cluster (union-find over pairs)."""
    parent = np.arange(num_documents)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)
    return np.array([find(x) for x in range(num_documents)], dtype=np.int64)


def keep_mask(num_documents: int, pairs: np.ndarray) -> np.ndarray:
    """[documents] bool: True for the first (lowest-index) document of each near-duplicate cluster."""
    return cluster_roots(num_documents, pairs) == np.arange(num_documents)


def dedup_texts(texts: Iterable[str], config: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """[documents] bool keep mask for a list of texts (in one process)."""
    shingles = text_shingles(list(texts), config)
    signature_array = signatures(shingles, config.num_perm, config.seed)
    return keep_mask(len(shingles), near_duplicate_pairs(signature_array, config, shingles=shingles))


def text_shingles(texts: Sequence[str], config: MinHashConfig) -> list[np.ndarray]:
    """Each text's shingle hashes (repeats kept)."""
    return [shingle_hashes(t, config.ngram, config.unit, unique=False) for t in texts]


def text_signatures(texts: Sequence[str], config: MinHashConfig) -> np.ndarray:
    """[documents, num_perm] uint32 signatures of texts, in this process."""
    return signatures(text_shingles(texts, config), config.num_perm, config.seed)


def parallel_signatures(texts: Sequence[str], config: MinHashConfig, workers: int = 1,
                        batch_characters: int = 1 << 20) -> np.ndarray:
    """[documents, num_perm] uint32 signatures computed in `workers` processes (batches of about
    batch_characters of text each, results in input order); workers=1 runs in this process."""
    if workers <= 1 or len(texts) < 2:
        return text_signatures(texts, config)
    import multiprocessing

    batches, current, size = [], [], 0
    for text in texts:
        current.append(text)
        size += len(text)
        if size >= batch_characters:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    context = multiprocessing.get_context("forkserver")
    with context.Pool(workers) as pool:
        parts = pool.starmap(text_signatures, [(batch, config) for batch in batches])
    return np.concatenate(parts) if parts else np.zeros((0, config.num_perm), np.uint32)
