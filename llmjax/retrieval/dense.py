"""Dense retrievers: a query tower and a document tower (one model or two), documents in an ExactIndex.

    retriever = load_retriever("minilm")          # all-MiniLM-L6-v2, or a run folder of train_retriever
    index = retriever.index_documents(task.documents)          # ExactIndex (inner product), tagged with the model
    scores, rows = retriever.search(index, task.test_queries, k=100)

A run folder of `python -m experiments train_retriever` holds `retriever.json` (how to load it: towers, pooling,
lengths, the model config) beside `checkpoint/` (orbax: {"query": params, "doc": params} or {"shared": params}) and
`tokenizer.json`. An index saved with `save_document_index` carries the retriever's name and dimension in a JSON file
beside it; searching it with another retriever or dimension is one RetrievalError.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmjax.retrieval.base import RetrievalError, load_index
from llmjax.retrieval.code_task import check_k, check_texts

RETRIEVER_FILE = "retriever.json"
FORMAT = "llmjax.retriever"
VERSION = 1
MINILM = "minilm"


@dataclass(frozen=True, eq=False)
class DenseRetriever:
    name: str                  # "minilm", or the run folder
    query_params: dict
    doc_params: dict           # the same dict as query_params for a shared tower
    cfg: object                # ModelConfig
    tokenizer: object
    pooling: str = "mean"
    query_max_len: int = 64
    doc_max_len: int = 256

    @property
    def dim(self) -> int:
        return int(self.cfg.d_model)

    def embed_queries(self, queries, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float32 [q, dim], unit length."""
        return self._embed(self.query_params, check_texts(queries, "queries"), self.query_max_len, batch_size,
                           progress)

    def embed_documents(self, documents, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float32 [n, dim], unit length (documents longer than doc_max_len tokens are cut, silently: code is long)."""
        return self._embed(self.doc_params, check_texts(documents, "documents"), self.doc_max_len, batch_size,
                           progress)

    def _embed(self, params, texts, max_len, batch_size, progress) -> np.ndarray:
        import warnings

        from llmjax.embed import embed_texts

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*longer than max_len.*")
            return embed_texts(params, self.cfg, self.tokenizer, texts, batch_size=batch_size,
                               max_len=min(max_len, self.cfg.max_seq_len), pooling=self.pooling, progress=progress)

    def index_documents(self, documents, *, batch_size: int = 64, progress: bool = False):
        """An ExactIndex (inner product) of the documents' embeddings, ids 0..n-1, tagged with this retriever."""
        from llmjax.retrieval.exact import ExactIndex

        vectors = self.embed_documents(documents, batch_size=batch_size, progress=progress)
        index = ExactIndex(self.dim, "ip")
        index.add(np.arange(len(vectors)), vectors)
        index.built_by = {"retriever": self.name, "dim": self.dim}
        return index

    def search(self, index, queries, k: int, *, batch_size: int = 64,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [q, k], document ids int64 [q, k]) of the k nearest documents, best first."""
        check_index(index, self)
        k = check_k(k, index.size)
        return index.search(self.embed_queries(queries, batch_size=batch_size, progress=progress), k)


def check_index(index, retriever: DenseRetriever) -> None:
    """RetrievalError unless `index` was built by this retriever (its name and dimension)."""
    built = getattr(index, "built_by", None) or {}
    if index.dim != retriever.dim or built.get("retriever", retriever.name) != retriever.name:
        raise RetrievalError(f"the index was built with {built.get('retriever', 'another model')!r} (dimension "
                             f"{index.dim}); this retriever is {retriever.name!r} (dimension {retriever.dim}): rebuild "
                             f"the index with this retriever")


def save_document_index(path: str | os.PathLike, index) -> Path:
    """index.save(path) plus path + ".json": the retriever that built it and its dimension."""
    path = index.save(path)
    Path(f"{path}.json").write_text(json.dumps(getattr(index, "built_by", {"dim": index.dim})))
    return path


def load_document_index(path: str | os.PathLike, retriever: DenseRetriever | None = None):
    """An index saved by save_document_index, checked against `retriever` when given."""
    index = load_index(path)
    meta = Path(f"{path}.json")
    if not meta.is_file():
        raise RetrievalError(f"{meta}: missing; the index's model is unknown (save it with save_document_index)")
    index.built_by = json.loads(meta.read_text())
    if retriever is not None:
        check_index(index, retriever)
    return index


def minilm_retriever() -> DenseRetriever:
    """The off-the-shelf all-MiniLM-L6-v2 (mean pooling, normalized), one tower."""
    from llmjax.io.models import load_model

    model = load_model(hf="all-minilm-l6-v2")
    return DenseRetriever(MINILM, model.params, model.params, model.cfg, model.tokenizer, "mean", 64, 256)


def write_retriever(folder: str | os.PathLike, params: dict, cfg, tokenizer, *, pooling: str, query_max_len: int,
                    doc_max_len: int, extra: dict | None = None) -> Path:
    """A run folder `load_retriever` reads: checkpoint/ (params: {"query", "doc"} or {"shared"}), tokenizer.json,
    retriever.json."""
    from llmjax.config import config_to_dict
    from llmjax.train.checkpoint import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if sorted(params) not in (["shared"], ["doc", "query"]):
        raise ValueError(f"write_retriever: params must be {{'shared': ...}} or {{'query': ..., 'doc': ...}}, got "
                         f"keys {sorted(params)}")
    save(folder / "checkpoint", params)
    tokenizer.save(folder / "tokenizer.json")
    record = {"format": FORMAT, "version": VERSION, "towers": "shared" if "shared" in params else "separate",
              "pooling": pooling, "query_max_len": query_max_len, "doc_max_len": doc_max_len,
              "model_config": config_to_dict(cfg), **(extra or {})}
    (folder / RETRIEVER_FILE).write_text(json.dumps(record, indent=1))
    return folder


def load_retriever(spec: str | os.PathLike) -> DenseRetriever:
    """"minilm", or a run folder written by train_retriever (its retriever.json says how to load it)."""
    if str(spec).lower() in (MINILM, "all-minilm-l6-v2"):
        return minilm_retriever()
    folder = Path(spec)
    if not (folder / RETRIEVER_FILE).is_file():
        raise RetrievalError(f"--retriever {spec}: expected bm25, minilm or a run folder of train_retriever (no "
                             f"{RETRIEVER_FILE} in {folder})")
    from llmjax.config import model_config_from_dict
    from llmjax.tokenizer import load_tokenizer
    from llmjax.train.checkpoint import restore

    record = json.loads((folder / RETRIEVER_FILE).read_text())
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise RetrievalError(f"{folder / RETRIEVER_FILE}: not a retriever file of version {VERSION}")
    cfg = model_config_from_dict(record["model_config"])
    params = restore(folder / "checkpoint")
    query, doc = (params["shared"], params["shared"]) if "shared" in params else (params["query"], params["doc"])
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    return DenseRetriever(str(folder), query, doc, cfg, tokenizer, record["pooling"], record["query_max_len"],
                          record["doc_max_len"])


__all__ = ["DenseRetriever", "check_index", "load_document_index", "load_retriever", "minilm_retriever",
           "save_document_index", "write_retriever"]
