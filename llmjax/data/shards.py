"""Token shards: a corpus tokenized once into flat binary files that training memory-maps.

On disk, a shards folder holds
  shard_00000.bin ...     the token stream, cut every `shard_tokens` tokens: raw little-endian
                          uint16 (uint32 when the vocabulary has more than 65,536 ids), so
                          `np.memmap(path, dtype)` reads it with no parsing
  document_starts.npy     int64 [num_documents]: where each document starts in the stream
  index.json              per shard: file, tokens, bytes, sha256, first token, documents;
                          totals; the dtype; the tokenizer's kind, vocab size and fingerprint;
                          what the corpus pass saw (documents, invalid UTF-8)
Documents follow each other in corpus order, each ended by the end-of-text token, so a window
of the stream that crosses a document boundary sees the separator the model learns from.
A folder of fixed-length rows (`write_rows`: training examples made whole, e.g. retrieval-augmented
windows) records `row_length` in its index; training then reads it row by row, never across rows.

`write_shards` tokenizes in worker processes (documents in order, so the output is the same for
any number of workers) and writes into a temporary folder renamed into place at the end: a
folder with an index.json is always complete. `TokenShards` reads one back and refuses shards
that do not match their index or the tokenizer they are read with.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import multiprocessing
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llmjax.data.corpus import CorpusError, CorpusStats, Document
from llmjax.tokenizer.base import Tokenizer

FORMAT = "llmjax.token_shards"
VERSION = 1
INDEX_FILE = "index.json"
DOCUMENT_STARTS_FILE = "document_starts.npy"
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
TASK_CHARACTERS = 1 << 16  # text per worker task: small enough to balance load, large enough to amortize the round trip
TASKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory; enough that one huge document does not idle the other workers


class TokenShardsError(ValueError):
    """Shards that cannot be used as asked: missing or corrupt files, another tokenizer's shards,
    windows longer than the data."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids 0 .. vocab_size - 1."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.bin"


# --- writing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardWriteReport:
    """What `write_shards` wrote, and how fast."""

    directory: Path
    total_tokens: int
    num_documents: int
    num_shards: int
    dtype: str
    corpus: CorpusStats
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.total_tokens / max(self.seconds, 1e-9)

    @property
    def megabytes_per_second(self) -> float:
        """Text read per second (UTF-8 MB of the documents)."""
        return self.corpus.utf8_bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"{self.total_tokens:,} tokens ({self.dtype}) in {self.num_shards} shard{'s' * (self.num_shards != 1)} from "
            f"{self.corpus.summary()}; {self.seconds:.1f} s, {self.tokens_per_second / 1e6:.2f}M tokens/s, "
            f"{self.megabytes_per_second:.1f} MB/s"
        )


@contextlib.contextmanager
def shards_folder(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder to write into, renamed to out_dir when the block ends (removed if it raises): a
    folder with an index.json is always complete. An existing non-empty out_dir needs overwrite."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise TokenShardsError(f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) to "
                               "replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        yield partial
        move_into_place(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_shards(
    documents: Iterable[str | Document],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    description: str = "tokenizing",
    tokenizer_source: str | None = None,
) -> ShardWriteReport:
    """Tokenize documents into a shards folder (see the module docstring); returns what it wrote.

    Each document is encoded with `encode_ordinary` (text that spells a special token stays
    text, so it cannot fake a document boundary) and followed by the end-of-text token.
    Empty documents are skipped (and counted). workers > 1 encodes in that many processes.
    tokenizer_source: how to find the tokenizer again (a path), recorded for error messages.
    """
    out_dir = Path(out_dir)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be at least 1, got {shard_tokens}")
    separator = tokenizer.eot_id
    if separator is None:
        raise TokenShardsError(
            f"{tokenizer!r} has no end-of-text token to separate documents; use a tokenizer with '<|endoftext|>'"
        )
    dtype = token_dtype(tokenizer.vocab_size)
    stats = CorpusStats()
    start_time = time.perf_counter()
    with shards_folder(out_dir, overwrite) as partial:
        bar = tqdm(desc=description, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
        with bar, ShardWriter(partial, dtype, shard_tokens) as writer:
            texts = counted_texts(documents, stats)
            for tokens, lengths in encoded_batches(texts, tokenizer, dtype, separator, workers):
                writer.write(tokens, lengths)
                bar.update(len(tokens))
                elapsed = max(time.perf_counter() - start_time, 1e-9)
                bar.set_postfix_str(f"{stats.utf8_bytes / 1e6 / elapsed:.1f} MB/s, {stats.documents:,} docs", refresh=False)
        if writer.total_tokens == 0:
            raise CorpusError(f"the corpus for {out_dir} is empty: it yielded {stats.documents} documents and no text")
        np.save(partial / DOCUMENT_STARTS_FILE, writer.document_starts())
        write_json_atomically(partial / INDEX_FILE, shard_index(writer, tokenizer_record(tokenizer, tokenizer_source), stats))
    return ShardWriteReport(out_dir, writer.total_tokens, writer.num_documents, len(writer.entries), dtype.name, stats,
                            time.perf_counter() - start_time)


def write_rows(rows: np.ndarray, tokenizer: Tokenizer, out_dir: str | Path, *, overwrite: bool = False,
               shard_tokens: int = DEFAULT_SHARD_TOKENS, tokenizer_source: str | None = None) -> Path:
    """rows int [n, row_length] of token ids -> a shards folder whose index records `row_length`: training reads
    it one whole row per example (llmjax.data.loader), with seq_len = row_length - 1. Written atomically."""
    out_dir = Path(out_dir)
    rows = np.asarray(rows)
    if rows.ndim != 2 or not len(rows) or rows.shape[1] < 2:
        raise TokenShardsError(f"rows must be [n >= 1, row_length >= 2] token ids, got shape {rows.shape}")
    if rows.min() < 0 or rows.max() >= tokenizer.vocab_size:
        raise TokenShardsError(f"rows hold ids outside the tokenizer's vocabulary [0, {tokenizer.vocab_size})")
    with shards_folder(out_dir, overwrite) as partial:
        with ShardWriter(partial, token_dtype(tokenizer.vocab_size), shard_tokens) as writer:
            writer.write(rows.reshape(-1), np.full(len(rows), rows.shape[1], np.int64))
        np.save(partial / DOCUMENT_STARTS_FILE, writer.document_starts())
        stats = CorpusStats(documents=len(rows))
        index = shard_index(writer, tokenizer_record(tokenizer, tokenizer_source), stats)
        write_json_atomically(partial / INDEX_FILE, {**index, "row_length": int(rows.shape[1])})
    return out_dir


def shard_index(writer: ShardWriter, tokenizer: dict, stats: CorpusStats) -> dict:
    """The contents of index.json for what the writer wrote."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": writer.dtype.name,
        "total_tokens": writer.total_tokens,
        "num_documents": writer.num_documents,
        "shard_tokens": writer.shard_tokens,
        "separator_id": tokenizer["eot_id"],
        "tokenizer": tokenizer,
        "corpus": stats.to_json(),
        "document_starts": {"file": DOCUMENT_STARTS_FILE, "count": writer.num_documents},
        "shards": writer.entries,
    }


def tokenizer_record(tokenizer: Tokenizer, source: str | None = None) -> dict:
    """What the index remembers of the tokenizer: enough to refuse another one and name this one."""
    record = {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
              "eot_id": tokenizer.eot_id}
    if source is not None:
        record["source"] = source
    return record


def counted_texts(documents: Iterable[str | Document], stats: CorpusStats) -> Iterator[str]:
    """The non-empty texts, tallying every document (sizes, empties, invalid UTF-8) into stats."""
    for number, document in enumerate(documents):
        if isinstance(document, str):
            document = Document(document, f"document {number}", str(number))
        stats.add(document, len(document.text.encode("utf-8", errors="surrogatepass")))
        if document.text:
            yield document.text


def text_batches(texts: Iterable[str], max_characters: int = TASK_CHARACTERS) -> Iterator[list[str]]:
    """Group texts into lists of about max_characters (a worker's task)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_characters:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype, separator: int) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (tokens [total], lengths [len(texts)]): each text's ids then the separator."""
    pieces = []
    for text in texts:
        ids = np.asarray(tokenizer.encode_ordinary(text), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise TokenShardsError(f"{tokenizer!r} produced id {int(ids.max())} outside its vocabulary of {tokenizer.vocab_size}")
        pieces.append(ids.astype(dtype))
        pieces.append(np.array([separator], dtype=dtype))
    lengths = np.array([len(p) + 1 for p in pieces[::2]], dtype=np.int64)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype), lengths


def encoded_batches(
    texts: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype, separator: int, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, lengths) per batch of texts, in corpus order, encoded here or in worker processes.

    At most TASKS_IN_FLIGHT_PER_WORKER tasks per worker are ahead of the writer, so memory stays
    bounded however large the corpus (multiprocessing.Pool.imap would read the whole corpus ahead).
    """
    batches = text_batches(texts, TASK_CHARACTERS)
    if workers <= 1:
        for batch in batches:
            yield encode_documents(tokenizer, batch, dtype, separator)
        return
    context = worker_context([__name__, type(tokenizer).__module__])
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                initargs=(tokenizer,)) as pool:
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch, dtype, separator))
            if len(pending) >= TASKS_IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def worker_context(modules: list[str]) -> multiprocessing.context.BaseContext:
    """How to start encoding workers: a fork server that has imported `modules` once and forks
    each worker from that clean state (fast, like fork, and safe once JAX has started threads,
    unlike fork); spawn where there is no fork server (Windows).

    On a 16-core machine, 15 spawned workers spend ~2 s importing numpy and the tokenizer
    before the first task; forked from the server they start in milliseconds.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(modules)  # takes effect when this process first starts its fork server
    return context


# Each worker process holds the tokenizer it was started with (sent once, not with every task).
_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str], dtype: np.dtype, separator: int) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_worker_tokenizer, texts, dtype, separator)


class ShardWriter:
    """Appends a token stream to fixed-size shard files, hashing each as it goes."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.entries: list[dict] = []
        self.total_tokens = 0
        self.num_documents = 0
        self._document_lengths: list[np.ndarray] = []
        self._file = None
        self._hash = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray, document_lengths: np.ndarray) -> None:
        """Append tokens [n] holding whole documents of the given lengths."""
        self._document_lengths.append(document_lengths)
        self.num_documents += len(document_lengths)
        position = 0
        while position < len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._open_next_shard()
            take = min(len(tokens) - position, self.shard_tokens - self._in_shard)
            chunk = tokens[position : position + take].astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            position += take
            self.total_tokens += take

    def document_starts(self) -> np.ndarray:
        """int64 [num_documents]: the stream offset where each document starts."""
        lengths = np.concatenate(self._document_lengths) if self._document_lengths else np.zeros(0, np.int64)
        return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths

    def _open_next_shard(self) -> None:
        self._close_shard()
        self._file = open(self.directory / shard_name(len(self.entries)), "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.entries.append({"file": shard_name(len(self.entries)), "first_token": self.total_tokens})

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        entry = self.entries[-1]
        entry.update(tokens=self._in_shard, bytes=self._in_shard * self.dtype.itemsize, sha256=self._hash.hexdigest())
        self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self._close_shard()
        if exc_info[0] is None:
            self._add_document_ranges()

    def _add_document_ranges(self) -> None:
        """Per shard: the first document that starts in it and how many do."""
        starts = self.document_starts()
        for entry in self.entries:
            first = int(np.searchsorted(starts, entry["first_token"], side="left"))
            end = int(np.searchsorted(starts, entry["first_token"] + entry["tokens"], side="left"))
            entry.update(first_document=first, documents=end - first)


def write_json_atomically(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    temporary.replace(path)


def move_into_place(partial: Path, out_dir: Path) -> None:
    """Rename the finished folder over out_dir; an old out_dir is removed only once the new one is in place."""
    if not out_dir.exists():
        partial.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# --- reading --------------------------------------------------------------------------------


class TokenShards:
    """A shards folder, memory-mapped: `tokens(start, stop)` reads any range of the stream.

    Opening checks that index.json is ours, that every shard file exists with exactly the size
    the index gives it (a truncated or overwritten shard fails here, never as garbage tokens
    mid-training), optionally their sha256, and, when a tokenizer is passed, that it is the one
    that made the shards.
    """

    def __init__(self, directory: str | Path, tokenizer: Tokenizer | None = None, *, verify_checksums: bool = False):
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.shards: list[dict] = self.index["shards"]
        check_shard_files(self.directory, self.shards, self.dtype, verify_checksums)
        if sum(s["tokens"] for s in self.shards) != self.index["total_tokens"]:
            raise TokenShardsError(
                f"{self.directory / INDEX_FILE}: total_tokens {self.index['total_tokens']:,} is not the sum of its shards' "
                f"{sum(s['tokens'] for s in self.shards):,}; the index is corrupt: re-tokenize"
            )
        if tokenizer is not None:
            check_tokenizer(self.directory, self.index["tokenizer"], tokenizer)
        self.document_starts = read_document_starts(self.directory, self.index)  # int64 [num_documents]
        self.shard_starts = np.cumsum([0] + [s["tokens"] for s in self.shards])  # [num_shards + 1]
        self._memmaps: dict[int, np.memmap] = {}
        self._lock = threading.Lock()

    @property
    def total_tokens(self) -> int:
        return int(self.index["total_tokens"])

    @property
    def num_documents(self) -> int:
        return len(self.document_starts)

    @property
    def row_length(self) -> int | None:
        """Tokens of each fixed-length row (a `write_rows` folder), else None: a stream read at any offset."""
        return self.index.get("row_length")

    @property
    def tokenizer_info(self) -> dict:
        """kind, fingerprint, vocab_size, eot_id (and source, when known) of the tokenizer that made these."""
        return dict(self.index["tokenizer"])

    def __len__(self) -> int:
        return self.total_tokens

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [stop - start] of the stream (a copy, in the shards' dtype), across shards as needed."""
        if not 0 <= start <= stop <= self.total_tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside the {self.total_tokens:,} tokens of {self.directory}")
        out = np.empty(stop - start, self.dtype)
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        written = 0
        while written < len(out):
            offset = start + written - int(self.shard_starts[shard])
            take = min(len(out) - written, self.shards[shard]["tokens"] - offset)
            out[written : written + take] = self._memmap(shard)[offset : offset + take]
            written += take
            shard += 1
        return out

    def document(self, number: int) -> np.ndarray:
        """Tokens of one document, its end-of-text token included."""
        stop = self.document_starts[number + 1] if number + 1 < self.num_documents else self.total_tokens
        return self.tokens(int(self.document_starts[number]), int(stop))

    def _memmap(self, shard: int) -> np.memmap:
        """Shards are mapped on first use (a folder of thousands costs no file handles until read)."""
        with self._lock:
            if shard not in self._memmaps:
                self._memmaps[shard] = np.memmap(self.directory / self.shards[shard]["file"], self.dtype, mode="r")
            return self._memmaps[shard]

    def __repr__(self) -> str:
        info = self.index["tokenizer"]
        return (f"TokenShards({str(self.directory)!r}: {self.total_tokens:,} tokens, {self.num_documents:,} documents, "
                f"{len(self.shards)} shards, {self.index['dtype']}, tokenizer {info['kind']} {info['fingerprint'][:12]})")


def read_index(directory: Path) -> dict:
    path = directory / INDEX_FILE
    if not path.is_file():
        hint = " (an unfinished write leaves only a hidden .partial folder)" if directory.exists() else ""
        raise TokenShardsError(f"{directory} is not a token shards folder: it has no {INDEX_FILE}{hint}; "
                               "write one with `python -m experiments tokenize`")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenShardsError(f"{path} is not valid JSON ({error}); re-tokenize the corpus") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise TokenShardsError(f"{path} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise TokenShardsError(
            f"{path} has format version {index.get('version')}; this code reads version {VERSION}: re-tokenize"
        )
    missing = [key for key in ("dtype", "total_tokens", "tokenizer", "shards", "document_starts") if key not in index]
    if missing:
        raise TokenShardsError(f"{path} lacks {missing}: the index is corrupt; re-tokenize the corpus")
    if index["dtype"] not in ("uint16", "uint32"):
        raise TokenShardsError(f"{path}: token dtype {index['dtype']!r} is neither uint16 nor uint32; the index is corrupt")
    return index


def check_shard_files(directory: Path, shards: list[dict], dtype: np.dtype, verify_checksums: bool) -> None:
    """Every shard exists with size = tokens * itemsize (and, if asked, its recorded sha256)."""
    for shard in shards:
        path = directory / shard["file"]
        if not path.is_file():
            raise TokenShardsError(f"shard {path} is missing; the folder is incomplete: re-tokenize")
        expected = shard["tokens"] * dtype.itemsize
        actual = path.stat().st_size
        if actual != expected:
            what = "truncated" if actual < expected else "longer than its index says"
            raise TokenShardsError(
                f"shard {path} is {what}: {actual:,} bytes on disk, but index.json gives it {shard['tokens']:,} "
                f"{dtype.name} tokens = {expected:,} bytes; re-tokenize the corpus"
            )
        if verify_checksums and file_sha256(path) != shard["sha256"]:
            raise TokenShardsError(f"shard {path} does not match the sha256 recorded in index.json: it is corrupt; re-tokenize")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_tokenizer(directory: Path, recorded: dict, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer other than the one that made the shards, naming both."""
    fingerprint = tokenizer.fingerprint()
    if fingerprint == recorded["fingerprint"]:
        return
    made_with = f"{recorded['kind']} tokenizer (vocab {recorded['vocab_size']:,}, fingerprint {recorded['fingerprint'][:16]}"
    made_with += f", from {recorded['source']})" if recorded.get("source") else ")"
    raise TokenShardsError(
        f"the shards in {directory} were made with a {made_with}, not with the given {tokenizer.kind} tokenizer "
        f"(vocab {tokenizer.vocab_size:,}, fingerprint {fingerprint[:16]}): their ids would mean other text. "
        "Read them with the tokenizer that made them, or re-tokenize the corpus with this one"
    )


def read_document_starts(directory: Path, index: dict) -> np.ndarray:
    record = index["document_starts"]
    path = directory / record["file"]
    if not path.is_file():
        raise TokenShardsError(f"{path} is missing; the folder is incomplete: re-tokenize")
    try:
        starts = np.load(path, mmap_mode="r")
    except ValueError as error:
        raise TokenShardsError(f"{path} is not a readable .npy file ({error}); re-tokenize") from None
    if starts.shape != (record["count"],) or (len(starts) and (starts[0] != 0 or starts[-1] >= index["total_tokens"])):
        raise TokenShardsError(
            f"{path} holds {starts.shape} document starts, but index.json records {record['count']:,} documents "
            f"in {index['total_tokens']:,} tokens; re-tokenize"
        )
    return np.asarray(starts, dtype=np.int64)
