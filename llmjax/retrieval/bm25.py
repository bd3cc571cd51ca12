"""BM25 (Lucene's variant) over code-aware tokens: the lexical baseline of the docstring -> code task.

    index = BM25Index(documents)                  # backend "auto": bm25s when installed, else NumPy
    scores, rows = index.search(queries, k=100)   # [q, k] each, best first

Tokens (`code_tokens`): runs of letters and digits, identifiers also split on snake_case and camelCase
("parseHTTPHeader_value" -> parse, http, header, value, plus the whole identifier), lowercased; one-letter tokens
and a few English stop words dropped. A query token counts once.

Scores (Lucene, as bm25s's default method): for each query term t in document d,
    idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)),   idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)).
Two backends compute the same: "numpy" (postings lists, this file, no dependency) and "bm25s" (its sparse matrices:
the `bench` extra), checked against each other in tests.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from llmjax.retrieval.base import RetrievalError

BACKENDS = ("auto", "numpy", "bm25s")
STOP_WORDS = frozenset("a an and are as at be by for from if in is it of on or that the this to with".split())
_WORD = re.compile(r"[A-Za-z0-9]+")
_PIECE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def code_tokens(text: str) -> list[str]:
    """Lowercased word pieces of text: identifiers split on snake_case / camelCase (the whole identifier kept too),
    one-letter tokens and stop words dropped."""
    out = []
    for identifier in re.findall(r"[A-Za-z0-9_]+", text):
        pieces = [p.lower() for word in _WORD.findall(identifier) for p in _PIECE.findall(word)]
        whole = identifier.strip("_").lower()
        if len(pieces) > 1 and whole:
            pieces.append(whole)
        out += [p for p in pieces if len(p) > 1 and p not in STOP_WORDS]
    return out


def bm25s_available() -> bool:
    try:
        import bm25s  # noqa: F401
    except ImportError:
        return False
    return True


class BM25Index:
    """BM25 over a fixed list of documents (see the module docstring). k1, b: Lucene's defaults."""

    def __init__(self, documents, *, k1: float = 1.5, b: float = 0.75, backend: str = "auto"):
        from llmjax.retrieval.code_task import check_texts

        documents = check_texts(documents, "documents")
        if backend not in BACKENDS:
            raise RetrievalError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
        if backend == "auto":
            backend = "bm25s" if bm25s_available() else "numpy"
        if backend == "bm25s" and not bm25s_available():
            raise RetrievalError("backend='bm25s': the bm25s package is not installed (pip install -e '.[bench]', "
                                 "or use backend='numpy')")
        if k1 < 0 or not 0 <= b <= 1:
            raise RetrievalError(f"k1={k1}, b={b}: expected k1 >= 0 and b within [0, 1]")
        self.backend, self.k1, self.b, self.size = backend, float(k1), float(b), len(documents)
        tokens = [code_tokens(d) for d in documents]
        self.vocab = {t: i for i, t in enumerate(sorted({t for doc in tokens for t in doc}))}
        if backend == "bm25s":
            import logging

            import bm25s

            logging.getLogger("bm25s").setLevel(logging.WARNING)  # no DEBUG line per index

            self._bm25s = bm25s.BM25(k1=k1, b=b, method="lucene")
            self._bm25s.index(bm25s.tokenization.Tokenized(
                ids=[[self.vocab[t] for t in doc] for doc in tokens], vocab=self.vocab), show_progress=False)
        else:
            self._build_postings(tokens)

    def _build_postings(self, tokens: list[list[str]]) -> None:
        """Per term: the documents holding it (int64) and their BM25 term weights (float64)."""
        lengths = np.asarray([len(doc) for doc in tokens], np.float64)  # [n]
        norm = self.k1 * (1 - self.b + self.b * lengths / max(lengths.mean(), 1e-9))  # [n]
        rows: dict[int, list] = {}
        for d, doc in enumerate(tokens):
            for term, tf in Counter(doc).items():
                rows.setdefault(self.vocab[term], []).append((d, tf))
        self._postings = {}
        for term, entries in rows.items():
            docs = np.asarray([d for d, _ in entries], np.int64)
            tf = np.asarray([t for _, t in entries], np.float64)
            idf = np.log(1 + (self.size - len(docs) + 0.5) / (len(docs) + 0.5))
            self._postings[term] = (docs, idf * tf / (tf + norm[docs]))

    def query_ids(self, query: str) -> list[int]:
        """The query's distinct known terms as vocabulary ids."""
        return [self.vocab[t] for t in dict.fromkeys(code_tokens(query)) if t in self.vocab]

    def scores(self, query: str) -> np.ndarray:
        """float64 [documents]: the BM25 score of every document for one query."""
        if self.backend == "bm25s":
            ids = self.query_ids(query)
            return np.asarray(self._bm25s.get_scores(ids), np.float64) if ids else np.zeros(self.size)
        total = np.zeros(self.size)
        for term in self.query_ids(query):
            docs, weights = self._postings[term]
            total[docs] += weights
        return total

    def search(self, queries, k: int, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [q, k], document rows int64 [q, k]) of the k best documents per query, best first (ties:
        the lower row first)."""
        from llmjax.retrieval.code_task import check_k, check_texts

        queries, k = check_texts(queries, "queries"), check_k(k, self.size)
        out_scores, out_rows = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        iterator = enumerate(queries)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(queries), desc="bm25", unit="query")
        for i, query in iterator:
            scores = self.scores(query)
            top = np.argpartition(-scores, k - 1)[:k] if k < self.size else np.arange(self.size)
            top = top[np.lexsort((top, -scores[top]))]
            out_scores[i], out_rows[i] = scores[top], top
        return out_scores, out_rows


def bm25_reference(documents: list[str], query: str, *, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """float64 [documents]: Lucene BM25 by the textbook formula, one loop per document (for tests)."""
    tokens = [code_tokens(d) for d in documents]
    avgdl = sum(len(t) for t in tokens) / len(tokens)
    out = np.zeros(len(documents))
    for term in dict.fromkeys(code_tokens(query)):
        df = sum(term in doc for doc in tokens)
        if not df:
            continue
        idf = np.log(1 + (len(documents) - df + 0.5) / (df + 0.5))
        for d, doc in enumerate(tokens):
            tf = doc.count(term)
            out[d] += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
    return out


__all__ = ["BACKENDS", "BM25Index", "bm25_reference", "bm25s_available", "code_tokens"]
