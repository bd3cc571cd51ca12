"""Corpora -> token shards -> batches.

corpus.py   documents from text / JSONL / Parquet files, folders and globs, or the default corpus
            (the stdlib's source), split into train / validation by a stable hash
shards.py   `write_shards` tokenizes documents into memory-mappable shards; `TokenShards` reads them
loader.py   `batch_at` / `packed_batch_at`: batch of any step from (seed, step); `BatchIterator`
"""

from llmjax.data.corpus import CorpusError, CorpusStats, Document, corpus_documents, default_corpus_files, default_corpus_split
from llmjax.data.loader import ArrayTokens, BatchIterator, PackedBatch, batch_at, packed_batch_at
from llmjax.data.shards import TokenShards, TokenShardsError, write_shards

__all__ = [
    "ArrayTokens", "BatchIterator", "CorpusError", "CorpusStats", "Document", "PackedBatch", "TokenShards",
    "TokenShardsError", "batch_at", "corpus_documents", "default_corpus_files", "default_corpus_split",
    "packed_batch_at", "write_shards",
]
