"""POST /v1/embeddings for the OpenAI-compatible server: request checking, the batcher, the response body.

    embedder = Embedder(params, cfg, tokenizer, EmbedderConfig(max_batch=256))
    app = create_app(None, tokenizer, model_name="all-minilm-l6-v2", max_model_len=cfg.max_seq_len, embedder=embedder)

Request (OpenAI's): `model`, `input` (a string, a list of strings, a list of token ids, or a list of lists of token
ids), `encoding_format` ("float", the default, or "base64": the little-endian float32 bytes, base64-encoded, as
OpenAI sends them and its Python client asks for by default), `dimensions` (1 .. the model's: the first `dimensions`
values, renormalized to unit length when the model's vectors are normalized: text-embedding-3's shortening), `user`
(ignored). A text is tokenized as `llmjax.embed.tokenize_for_embedding` does ([CLS] text [SEP] for a BERT-style
encoder); token ids are read as given, framing included. An input over `max_tokens` tokens is refused (400,
context_length_exceeded) unless the request carries vLLM's `truncate_prompt_tokens` (k, or -1 for the limit): then
it is cut to its first k tokens (a text keeps its [CLS] / [SEP]), as sentence-transformers truncates.

Batching: every request's inputs go to one worker thread through a queue. The worker takes what is waiting (up to
`max_batch` sequences, from any number of requests; waiting `batch_wait_s` for more only when the device is idle),
pads it to a bucket (rows: a power of two from 8; length: `llmjax.embed.bucket_lengths`), dispatches the jitted
`embed_tokens` and, while the device runs it, collects and dispatches the next batch; then it copies the first
batch's vectors to the host and hands each request its rows (one event-loop wake-up per batch).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmjax.embed import DEFAULT_MAX_LEN, bucket_lengths, default_pooling, embed_tokens, tokenize_for_embedding
from llmjax.infer.openai_api import Fields, check_model, invalid, json_type
from llmjax.model.pooling import check_pooling
from llmjax.tokenizer import TokenizerError

logger = logging.getLogger("llmjax.server")

EMBEDDING_FIELDS = ("model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens")
ENCODING_FORMATS = ("float", "base64")
SMALLEST_BATCH = 8
TOKENIZE_IN_THREAD_CHARS = 20_000  # a request with more text than this is tokenized off the event loop


@dataclass(frozen=True)
class EmbedderConfig:
    """How the server embeds. max_batch: sequences in one forward pass (several requests' together). max_inputs:
    inputs one request may send (OpenAI's limit: 2048). max_tokens: tokens per input, special tokens included
    (default: 256, or the model's context if shorter). batch_wait_s: how long an idle worker waits for more
    requests before running a batch that is not full. pooling: None for the model's default (mean for an encoder,
    last token for a decoder)."""

    max_batch: int = 256
    max_inputs: int = 2048
    max_tokens: int | None = None
    batch_wait_s: float = 0.002
    pooling: str | None = None
    normalize: bool = True

    def __post_init__(self):
        for name in ("max_batch", "max_inputs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EmbedderConfig.{name}={getattr(self, name)!r}: must be a positive integer")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 2):
            raise ValueError(f"EmbedderConfig.max_tokens={self.max_tokens!r}: must be an integer >= 2")
        if self.batch_wait_s < 0:
            raise ValueError(f"EmbedderConfig.batch_wait_s={self.batch_wait_s}: must be >= 0")
        if self.pooling is not None:
            check_pooling(self.pooling)


def batch_buckets(max_batch: int, smallest: int = SMALLEST_BATCH) -> list[int]:
    """The row counts a batch is padded to: powers of two from `smallest` below max_batch, then max_batch."""
    sizes, size = [], smallest
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


@dataclass(frozen=True)
class EmbeddingRequest:
    """A checked /v1/embeddings request (its texts not tokenized yet: `tokenize_inputs`)."""

    inputs: list                     # texts and lists of token ids, as sent
    encoding_format: str = "float"
    dimensions: int | None = None    # None: the model's
    truncate: int | None = None      # truncate_prompt_tokens: None refuses long inputs; -1 cuts at the limit


@dataclass(eq=False)
class _Job:
    """One request's sequences on their way through the worker (its fields are the worker thread's)."""

    sequences: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    vectors: np.ndarray  # [len(sequences), d_model] float32, filled batch by batch
    remaining: int       # rows not embedded yet; -1 once failed


class EmbedFailure(RuntimeError):
    """The model failed on a batch: its requests get a 500."""


class Embedder:
    """The model's embeddings for the server, with concurrent requests batched together on one worker thread."""

    def __init__(self, params: dict, cfg, tokenizer, config: EmbedderConfig = EmbedderConfig()):
        self.params, self.cfg, self.tokenizer, self.config = params, cfg, tokenizer, config
        self.pooling = config.pooling or default_pooling(cfg)
        self.max_tokens = config.max_tokens or min(DEFAULT_MAX_LEN, cfg.max_seq_len)
        if self.max_tokens > cfg.max_seq_len:
            raise ValueError(f"EmbedderConfig.max_tokens={self.max_tokens}: the model reads at most "
                             f"{cfg.max_seq_len} tokens")
        self.dimension = cfg.d_model
        self.pad_id = tokenizer.special_ids.pad if tokenizer.special_ids.pad is not None else 0
        self.length_buckets = bucket_lengths(self.max_tokens)
        self.row_buckets = batch_buckets(config.max_batch)
        self.batches_run = 0           # forward passes (a test's hook: concurrent requests share them)
        self.sequences_run = 0
        self.failures = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._carry: collections.deque = collections.deque()  # (job, row) collected but not yet batched
        self._thread: threading.Thread | None = None

    # --- the event loop's side ---------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmjax-embedder", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def waiting(self) -> int:
        """Requests queued and not yet taken by the worker."""
        return self._queue.qsize()

    async def embed(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [len(sequences), d_model]: the vectors of these token sequences (each 1 .. max_tokens ids)."""
        loop = asyncio.get_running_loop()
        job = _Job(list(sequences), loop, loop.create_future(),
                   np.empty((len(sequences), self.dimension), np.float32), len(sequences))
        if not self.alive:
            raise EmbedFailure("the embedding worker is not running")
        self._queue.put(job)
        return await job.future

    def warmup(self, lengths: Sequence[int] | None = None) -> int:
        """Compile the forward pass of every (rows, length) bucket (lengths: those buckets only); returns how many."""
        compiled = 0
        for length in lengths or self.length_buckets:
            for rows in self.row_buckets:
                tokens = np.full((rows, length), self.pad_id, np.int32)
                mask = np.ones((rows, length), bool)
                np.asarray(embed_tokens(self.params, tokens, mask, self.cfg, pooling=self.pooling,
                                        normalize=self.config.normalize))
                compiled += 1
        return compiled

    # --- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        in_flight: collections.deque = collections.deque()  # (rows [(job, row)], device vectors) dispatched
        running = True
        while running or in_flight:
            rows, running = self._next_batch(block=not in_flight, running=running)
            if rows:
                dispatched = self._dispatch(rows)
                if dispatched is not None:
                    in_flight.append((rows, dispatched))
            if in_flight and (not rows or len(in_flight) > 1):
                self._finish(*in_flight.popleft())
        self._fail_waiting(EmbedFailure("the server is shutting down"))

    def _next_batch(self, block: bool, running: bool) -> tuple[list, bool]:
        """([(job, row)] of up to max_batch sequences, whether to keep running). block: wait for the first request
        (the device is idle), then up to batch_wait_s for more; otherwise take only what is already waiting."""
        limit, rows = self.config.max_batch, []
        deadline = None

        def take(job) -> None:
            self._carry.extend((job, row) for row in range(len(job.sequences)))

        while running and len(self._carry) < limit:
            try:
                if not self._carry and block:
                    job = self._queue.get()
                elif block and self.config.batch_wait_s > 0:
                    deadline = deadline or time.monotonic() + self.config.batch_wait_s
                    job = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                running = False
                break
            take(job)
        while self._carry and len(rows) < limit:
            rows.append(self._carry.popleft())
        return rows, running

    def _dispatch(self, rows: list):
        """Pad the batch to its bucket and start the forward pass (returns without waiting for the device)."""
        try:
            longest = max(len(job.sequences[row]) for job, row in rows)
            length = next(b for b in self.length_buckets if b >= longest)
            size = next(b for b in self.row_buckets if b >= len(rows))
            tokens = np.full((size, length), self.pad_id, np.int32)  # [rows bucket, length bucket]
            mask = np.zeros((size, length), bool)
            for i, (job, row) in enumerate(rows):
                ids = job.sequences[row]
                tokens[i, :len(ids)] = ids
                mask[i, :len(ids)] = True
            return embed_tokens(self.params, tokens, mask, self.cfg, pooling=self.pooling,
                                normalize=self.config.normalize)
        except Exception as error:  # a bug: fail these requests, keep serving
            self._fail(rows, error)
            return None

    def _finish(self, rows: list, dispatched) -> None:
        """Copy a batch's vectors to the host and answer every request whose last row it held."""
        try:
            vectors = np.asarray(dispatched)  # [rows bucket, d_model]: waits for the device
        except Exception as error:
            self._fail(rows, error)
            return
        self.batches_run += 1
        self.sequences_run += len(rows)
        done: dict[asyncio.AbstractEventLoop, list] = {}
        for i, (job, row) in enumerate(rows):
            job.vectors[row] = vectors[i]
            job.remaining -= 1
            if job.remaining == 0:
                done.setdefault(job.loop, []).append((job.future, job.vectors, None))
        for loop, answers in done.items():
            call_on(loop, _answer_all, answers)

    def _fail(self, rows: list, error: Exception) -> None:
        self.failures += 1
        logger.error("embedding a batch failed: %s: %s", type(error).__name__, error)
        failure = EmbedFailure(f"the model failed on this batch: {type(error).__name__}: {error}")
        for job in {id(job): job for job, _ in rows}.values():
            job.remaining = -1  # its other rows are dropped
            call_on(job.loop, _answer_all, [(job.future, None, failure)])
        self._carry = collections.deque((job, row) for job, row in self._carry if job.remaining >= 0)

    def _fail_waiting(self, failure: Exception) -> None:
        jobs = {id(job): job for job, _ in self._carry}
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                jobs[id(job)] = job
        self._carry.clear()
        for job in jobs.values():
            call_on(job.loop, _answer_all, [(job.future, None, failure)])


def call_on(loop: asyncio.AbstractEventLoop, function, *args) -> bool:
    """Run function(*args) on an event loop from another thread; False when the loop is closed (nobody listens)."""
    try:
        loop.call_soon_threadsafe(function, *args)
        return True
    except RuntimeError:  # the loop is closed: nobody waits
        return False


def _answer_all(answers: list) -> None:
    for future, result, error in answers:
        if not future.done():
            future.set_result(result) if error is None else future.set_exception(error)


# --- the request -----------------------------------------------------------------------------------

def _is_token_list(value) -> bool:
    """A list of integers (not booleans); checked in C (map, set): it runs on every token of every request."""
    return isinstance(value, list) and (not value or set(map(type, value)) == {int})


def read_inputs(value) -> list[str | list[int]]:
    """`input` as a list of texts and token-id lists (raises APIError for any other shape)."""
    if value is None:
        raise invalid("input is required", "input", "missing_field")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise invalid(f"input must be a string, a list of strings, a list of token ids or a list of lists of token "
                      f"ids, not {json_type(value)}", "input", "invalid_type")
    if not value:
        raise invalid("input is an empty list: give at least one string or token id", "input")
    if _is_token_list(value):
        return [value]
    if all(isinstance(item, str) for item in value) or all(_is_token_list(item) for item in value):
        return list(value)
    bad = next(i for i, item in enumerate(value) if not (isinstance(item, str) or _is_token_list(item)))
    kind = json_type(value[bad])
    raise invalid(f"input[{bad}] is {kind}: input must be a string, a list of strings, a list of token ids or a list "
                  f"of lists of token ids (not a mix)", f"input[{bad}]", "invalid_type")


def parse_embedding_request(data: dict, embedder: Embedder, *, model_name: str) -> EmbeddingRequest:
    """A checked /v1/embeddings request (raises APIError): every field but the texts' token counts."""
    fields = Fields(data, EMBEDDING_FIELDS)
    check_model(fields, model_name)
    fields.string("user")  # accepted, unused
    encoding_format = fields.string("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise invalid(f"encoding_format={encoding_format!r}: must be one of {', '.join(ENCODING_FORMATS)}",
                      "encoding_format")
    dimensions = fields.integer("dimensions", None, minimum=1)
    if dimensions is not None and dimensions > embedder.dimension:
        raise invalid(f"dimensions={dimensions}: this model's embeddings have {embedder.dimension}; ask for at most "
                      f"that many", "dimensions")
    inputs = read_inputs(fields.get("input"))
    if len(inputs) > embedder.config.max_inputs:
        raise invalid(f"input has {len(inputs)} items, over this server's limit of {embedder.config.max_inputs} per "
                      f"request; split it into several requests", "input", "too_many_inputs")
    truncate = fields.integer("truncate_prompt_tokens", None, minimum=-1)
    if truncate is not None and not (truncate == -1 or 2 <= truncate <= embedder.max_tokens):
        raise invalid(f"truncate_prompt_tokens={truncate}: must be -1 (the limit, {embedder.max_tokens}) or between 2 "
                      f"and {embedder.max_tokens}", "truncate_prompt_tokens")
    return EmbeddingRequest(inputs, encoding_format, dimensions, truncate)


def tokenize_inputs(request: EmbeddingRequest, embedder: Embedder) -> list[list[int]]:
    """Each input's ids as the model reads them, checked against the vocabulary and the token limit (raises
    APIError): a text through `tokenize_for_embedding`, token ids as given; cut to truncate_prompt_tokens if sent."""
    limit = embedder.max_tokens if request.truncate in (None, -1) else request.truncate
    vocab, sequences = embedder.cfg.vocab_size, []
    for i, item in enumerate(request.inputs):
        where = f"input[{i}]" if len(request.inputs) > 1 else "input"
        if isinstance(item, str):
            if not item:
                raise invalid(f"{where} is an empty string: give text to embed", where)
            try:
                ids, cut = tokenize_for_embedding(embedder.tokenizer, item, limit)
            except TokenizerError as error:
                raise invalid(f"{where} cannot be tokenized: {error}", where) from None
            total = len(ids) + cut
        else:
            if not item:
                raise invalid(f"{where} is an empty list of token ids: give at least one", where)
            if min(item) < 0 or max(item) >= vocab:
                bad = next(t for t in item if not 0 <= t < vocab)
                raise invalid(f"{where} holds the token id {bad}, outside the model's vocabulary of {vocab}", where)
            ids, total = item[:limit], len(item)
        if total > limit and request.truncate is None:
            raise invalid(f"{where} has {total} tokens, over this server's limit of {limit} per input; shorten it, or "
                          f"send truncate_prompt_tokens (-1: cut to the limit)", where, "context_length_exceeded")
        if not ids:
            raise invalid(f"{where} gives no tokens: give text to embed", where)
        sequences.append(ids)
    return sequences


def request_chars(request: EmbeddingRequest) -> int:
    return sum(len(item) for item in request.inputs if isinstance(item, str))


def shorten(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """The first `dimensions` values of each vector, back to unit length when the model's vectors are normalized
    (OpenAI's text-embedding-3 `dimensions`)."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    kept = vectors[:, :dimensions]
    if not normalize:
        return np.ascontiguousarray(kept)
    return kept / np.maximum(np.linalg.norm(kept, axis=1, keepdims=True), 1e-12)


def encode_vector(vector: np.ndarray, encoding_format: str):
    """One embedding as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
    return vector.tolist()


def embeddings_body(vectors: np.ndarray, sequences: list[list[int]], request: EmbeddingRequest, model: str) -> dict:
    """OpenAI's response: {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
    "usage": {"prompt_tokens", "total_tokens"}}."""
    tokens = sum(map(len, sequences))
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, request.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
