"""Retrieval-augmented generation: a chunk store (texts cut into chunks, embedded, indexed, saved with their texts),
retrieval, prompt assembly within the language model's context, and generation.

    encoder = load_encoder("hf:all-minilm-l6-v2")                    # or ckpt:RUN, gguf:NAME, preset:bert-tiny
    store = build_rag_index(corpus_documents(), encoder, "runs/rag/stdlib")   # chunks -> vectors -> ExactIndex
    store = load_rag_index("runs/rag/stdlib", encoder)               # RagError if built with another encoder
    chunks = retrieve(store, encoder, "How do I remove common indentation?", k=4)
    prompt = build_prompt(query, chunks, model.tokenizer, max_tokens=1024, chat_format=model.chat_format)
    answer = rag_generate(store, encoder, model, query, k=4)         # retrieve + prompt + generate (greedy)

A store is one folder, written atomically (a temporary folder renamed into place): index.npz (any VectorIndex
kind, `llmjax.retrieval.load_index`), chunks.jsonl (one {"key", "file", "text"} per index id, in id order) and
meta.json (the encoder's name, dimension, pooling, normalization and max_len; the chunking options; the index kind).
Each chunk carries its file's number as its index label, and its file key in chunks.jsonl, so a search can leave a
whole file out (`exclude_file`: the evaluation of held-out code never retrieves the held-out file's own chunks).

Prompts: the retrieved chunks in rank order, then the query. A base model reads plain text ("# source: KEY" before
each chunk's text, or another label line: `label`; then the query as is: a code prompt continues naturally); an
instruct model (a chat template) reads one user turn "Context: ... Question: ...", after any earlier turns
(`history`: few-shot demonstrations), and the assistant's reply may start with given text (`prefill`). The budget
counts tokens exactly (pieces are tokenized separately and concatenated): the lowest-ranked chunks are dropped
first, then the last one kept is cut to fit; the query is never cut: when it alone exceeds the budget, RagError says
so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmjax.retrieval.base import KIND_MODULES, RetrievalError, atomic_folder

STORE_FORMAT = "llmjax.rag_store"
STORE_VERSION = 1
ENCODER_SOURCES = ("hf", "gguf", "ckpt", "preset")
DEFAULT_CHUNK_CHARS = 800  # about 200-250 BPE / WordPiece tokens of Python: within MiniLM's 256
CHAT_INSTRUCTION = "Use the context below to answer the question."
MIN_CUT_CHUNK_TOKENS = 8  # a chunk cut to fewer tokens than this is dropped instead (a stub of a chunk helps nobody)


class RagError(RetrievalError):
    """Bad input to the RAG pipeline (one line, for people)."""


# --- chunks ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    key: str      # "FILE:FIRST-LAST" (1-based lines), unique in a store
    file: str     # the document's key (its path relative to the corpus root)
    text: str


@dataclass(frozen=True)
class Retrieved:
    chunk: Chunk
    score: float  # larger is nearer
    rank: int     # 0: the nearest
    id: int = -1  # the chunk's id in its store (-1: not from a store)


def chunk_text(text: str, file: str, max_chars: int = DEFAULT_CHUNK_CHARS) -> list[Chunk]:
    """One document cut into chunks of whole lines, each at most max_chars characters (a longer line is cut into
    pieces of max_chars); chunks of only whitespace are left out."""
    if not isinstance(max_chars, int) or max_chars < 1:
        raise RagError(f"chunk_chars={max_chars!r}: expected a positive integer")
    pieces = [(number, line[i:i + max_chars])  # (1-based line number, text): long lines in max_chars pieces
              for number, line in enumerate(text.splitlines(keepends=True), start=1)
              for i in range(0, len(line), max_chars)]
    chunks, current, size = [], [], 0
    for number, piece in pieces + [(0, None)]:  # a sentinel flushes the last chunk
        if current and (piece is None or size + len(piece) > max_chars):
            body = "".join(p for _, p in current)
            if body.strip():
                chunks.append(Chunk(f"{file}:{current[0][0]}-{current[-1][0]}", file, body))
            current, size = [], 0
        if piece is not None:
            current.append((number, piece))
            size += len(piece)
    return chunks


def chunk_documents(documents: Iterable, max_chars: int = DEFAULT_CHUNK_CHARS) -> list[Chunk]:
    """Chunks of documents: `llmjax.data.corpus.Document`s (their .text and .key) or (key, text) pairs."""
    chunks = []
    for document in documents:
        key, text = (document.key, document.text) if hasattr(document, "key") else document
        chunks.extend(chunk_text(text, key, max_chars))
    return chunks


# --- the encoder ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoder:
    """An embedding model with how it embeds (llmjax.embed.embed_texts' options). name: the spec it was loaded from
    ("hf:all-minilm-l6-v2"), what a store's metadata records."""

    name: str
    params: dict = field(repr=False)
    cfg: object = field(repr=False)
    tokenizer: object = field(repr=False)
    pooling: str = "mean"
    normalize: bool = True
    max_len: int = 256
    batch_size: int = 64

    @property
    def dim(self) -> int:
        return int(self.cfg.d_model)

    def metadata(self) -> dict:
        return {"name": self.name, "dim": self.dim, "pooling": self.pooling, "normalize": self.normalize,
                "max_len": self.max_len}

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """float32 [len(texts), dim]."""
        from llmjax.embed import embed_texts

        return embed_texts(self.params, self.cfg, self.tokenizer, list(texts), batch_size=self.batch_size,
                           max_len=self.max_len, pooling=self.pooling, normalize=self.normalize, progress=progress)


def parse_encoder_spec(spec: str, flag: str = "--encoder") -> tuple[str, str]:
    """"hf:all-minilm-l6-v2" -> ("hf", "all-minilm-l6-v2"); RagError naming the flag otherwise."""
    source, _, name = str(spec).partition(":")
    if source not in ENCODER_SOURCES or not name:
        raise RagError(f"{flag} {spec!r}: expected SOURCE:NAME with SOURCE one of {', '.join(ENCODER_SOURCES)} "
                       "(e.g. hf:all-minilm-l6-v2, ckpt:runs/my-run, gguf:smollm2-135m-instruct, preset:bert-tiny)")
    return source, name


def load_encoder(spec: str, *, pooling: str | None = None, normalize: bool = True, max_len: int = 256,
                 batch_size: int = 64, seed: int = 0) -> Encoder:
    """The encoder a spec names (see parse_encoder_spec). pooling: default "mean" for a bidirectional encoder,
    "last" for a decoder. max_len is capped at the model's max_seq_len. preset: random weights (seed), bytes
    tokenizer: for tests."""
    from llmjax.io.models import load_model
    from llmjax.model.pooling import POOLINGS

    source, name = parse_encoder_spec(spec)
    model = load_model(**{"preset" if source == "preset" else source: name, "seed": seed})
    pooling = pooling or ("mean" if not model.cfg.causal else "last")
    if pooling not in POOLINGS:
        raise RagError(f"--pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    return Encoder(f"{source}:{name}", model.params, model.cfg, model.tokenizer, pooling, normalize,
                   min(max_len, model.cfg.max_seq_len), batch_size)


# --- the store ------------------------------------------------------------------------------------------------------

@dataclass
class RagStore:
    """An index with the chunk of every id (id i is chunks[i]) and how it was made."""

    index: object                 # VectorIndex
    chunks: list[Chunk]
    meta: dict
    path: Path | None = None

    def __post_init__(self):
        self.file_rows = {}      # file key -> ids of its chunks
        for i, chunk in enumerate(self.chunks):
            self.file_rows.setdefault(chunk.file, []).append(i)

    @property
    def size(self) -> int:
        return len(self.chunks)


def make_index(kind: str, dim: int, metric: str = "cosine", **options):
    """An empty VectorIndex of a kind by name (KIND_MODULES: exact, hnsw, ivfpq, filtered_vamana)."""
    import importlib

    from llmjax.retrieval.base import _INDEX_CLASSES

    if kind not in KIND_MODULES:
        raise RagError(f"--index-kind {kind!r}: expected one of {', '.join(KIND_MODULES)}")
    importlib.import_module(KIND_MODULES[kind])
    return _INDEX_CLASSES[kind](dim, metric, **options)


def build_rag_index(documents: Iterable, encoder: Encoder, out: str | os.PathLike | None = None, *,
                    kind: str = "exact", chunk_chars: int = DEFAULT_CHUNK_CHARS, index_options: dict | None = None,
                    progress: bool = False, source: str | None = None) -> RagStore:
    """Chunk the documents (Documents, (key, text) pairs, or Chunks as they are), embed every chunk, index the
    vectors (ids 0..n-1, each labelled with its file's number) and, with `out`, save the store there atomically."""
    documents = list(documents)
    chunks = documents if documents and isinstance(documents[0], Chunk) else chunk_documents(documents, chunk_chars)
    if not chunks:
        raise RagError("no chunks to index: the documents are empty (give a corpus with text in it)")
    files = {file: number for number, file in enumerate(dict.fromkeys(c.file for c in chunks))}
    vectors = encoder.embed([c.text for c in chunks], progress=progress)  # [chunks, dim]
    index = make_index(kind, encoder.dim, "cosine", **(index_options or {}))
    index.add(np.arange(len(chunks)), vectors, labels=np.asarray([files[c.file] for c in chunks], np.int64))
    meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "encoder": encoder.metadata(), "index_kind": kind,
            "metric": "cosine", "chunking": {"chunk_chars": chunk_chars, "unit": "lines"}, "chunks": len(chunks),
            "files": len(files), "source": source}
    store = RagStore(index, list(chunks), meta)
    if out is not None:
        store.path = save_rag_index(store, out)
    return store


def save_rag_index(store: RagStore, folder: str | os.PathLike) -> Path:
    """Write the store's folder atomically (a temporary folder renamed into place, replacing an older one)."""
    with atomic_folder(folder) as temporary:
        store.index.save(temporary / "index.npz")
        with open(temporary / "chunks.jsonl", "w", encoding="utf-8") as file:
            for chunk in store.chunks:
                file.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
        (temporary / "meta.json").write_text(json.dumps(store.meta, indent=1))
    return Path(folder)


def check_encoder(meta: dict, encoder: Encoder | None, where: str = "the index") -> None:
    """RagError when the query encoder is not the one the store was built with (name, dimension, pooling or
    normalization differ): its vectors would not be comparable."""
    if encoder is None:
        return
    built, given = meta["encoder"], encoder.metadata()
    differ = [name for name in ("name", "dim", "pooling", "normalize") if built.get(name) != given[name]]
    if differ:
        raise RagError(f"{where} was built with encoder {built.get('name')} (dim {built.get('dim')}, pooling "
                       f"{built.get('pooling')}, normalize {built.get('normalize')}), but the query encoder is "
                       f"{given['name']} (dim {given['dim']}, pooling {given['pooling']}, normalize "
                       f"{given['normalize']}): {', '.join(differ)} differ; pass --encoder {built.get('name')} "
                       "(and its --pooling) or rebuild the index with this encoder")


def load_rag_index(folder: str | os.PathLike, encoder: Encoder | None = None) -> RagStore:
    """A store saved by build_rag_index / save_rag_index; with `encoder`, checked to be the one it was built with."""
    from llmjax.retrieval.base import load_index

    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise RagError(f"{folder}: no RAG index here (meta.json missing): build one with "
                       "`python -m experiments rag index --out FOLDER`")
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except ValueError:
        raise RagError(f"{folder}/meta.json: not valid JSON (a corrupt index folder: rebuild it)") from None
    if meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
        raise RagError(f"{folder}: not an llmjax RAG index of version {STORE_VERSION}")
    check_encoder(meta, encoder, f"the index {folder}")
    index = load_index(folder / "index.npz")
    if index.dim != meta["encoder"]["dim"]:
        raise RagError(f"{folder}: index.npz holds {index.dim}-dimensional vectors but meta.json says "
                       f"{meta['encoder']['dim']} (a corrupt index folder: rebuild it)")
    with open(folder / "chunks.jsonl", encoding="utf-8") as file:
        chunks = [Chunk(**json.loads(line)) for line in file if line.strip()]
    if len(chunks) != index.size:
        raise RagError(f"{folder}: chunks.jsonl has {len(chunks)} chunks for {index.size} vectors in index.npz "
                       "(a corrupt index folder: rebuild it)")
    return RagStore(index, chunks, meta, folder)


# --- retrieval ------------------------------------------------------------------------------------------------------

def check_query(query) -> str:
    if not isinstance(query, str):
        raise RagError(f"query: expected a string, got {type(query).__name__}")
    if not query.strip():
        raise RagError("the query is empty: give a question or a code prompt to retrieve for")
    return query


def retrieve(store: RagStore, encoder: Encoder, query: str, k: int = 4, *,
             exclude_file: str | None = None) -> list[Retrieved]:
    """The k chunks nearest to the query, nearest first. exclude_file: no chunk of that file (its key) is returned
    (the search asks for k more than that file has, then drops them). RagError: empty query, k not in 1..size."""
    return retrieve_many(store, encoder, [query], k, exclude_files=[exclude_file])[0]


def retrieve_many(store: RagStore, encoder: Encoder, queries: Sequence[str], k: int = 4, *,
                  exclude_files: Sequence[str | None] | None = None) -> list[list[Retrieved]]:
    """`retrieve` for many queries at once (one embedding pass, one search)."""
    queries = [check_query(q) for q in queries]
    exclude_files = list(exclude_files) if exclude_files is not None else [None] * len(queries)
    if len(exclude_files) != len(queries):
        raise RagError(f"{len(exclude_files)} files to exclude for {len(queries)} queries")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise RagError(f"k={k!r}: expected a positive integer")
    if k > store.size:
        raise RagError(f"k={k} is larger than the index ({store.size} chunks): ask for at most {store.size}")
    extra = max((len(store.file_rows.get(f, ())) for f in exclude_files if f is not None), default=0)
    scores, ids = store.index.search(encoder.embed(queries), min(k + extra, store.size))
    out = []
    for row, excluded in enumerate(exclude_files):
        found = [(i, s) for i, s in zip(ids[row], scores[row]) if i >= 0 and store.chunks[i].file != excluded]
        out.append([Retrieved(store.chunks[i], float(s), rank, int(i)) for rank, (i, s) in enumerate(found[:k])])
    return out


def with_continuation(store: RagStore, retrieved: Retrieved) -> Retrieved:
    """The retrieved chunk followed by the next chunk of its file (RETRO's neighbour + continuation: what came after
    text like the query's is the best guess at what comes after the query), as one chunk keyed FILE:FIRST-LAST; the
    chunk alone when it ends its file."""
    following = retrieved.id + 1
    if retrieved.id < 0 or following >= store.size or store.chunks[following].file != retrieved.chunk.file:
        return retrieved
    first, after = retrieved.chunk, store.chunks[following]
    key = f"{first.key.rsplit('-', 1)[0]}-{after.key.rsplit('-', 1)[1]}"
    return Retrieved(Chunk(key, first.file, first.text + after.text), retrieved.score, retrieved.rank, retrieved.id)


# --- prompts --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    ids: list[int]                 # the prompt's token ids
    kept: list[Retrieved]          # the chunks in it, in rank order (the last may be cut)
    cut_tokens: int                # tokens cut from the last kept chunk (0: whole)
    dropped: int                   # retrieved chunks left out for want of room
    text: str                      # the ids decoded (for people)


CHUNK_SEPARATOR = "\n\n"


def source_label(chunk: Chunk) -> str:
    """The default line naming a chunk in a prompt: "# source: FILE:FIRST-LAST"."""
    return f"# source: {chunk.key}"


def chunk_block(chunk: Chunk, label=None) -> str:
    """How one chunk reads in a prompt: its label line (label(chunk); default `source_label`), then its text."""
    return f"{(label or source_label)(chunk)}\n{chunk.text.rstrip()}"


def chunk_piece(retrieved: Retrieved | Chunk, tokenizer, label=None) -> list[int]:
    """How one chunk reads in a prompt, as token ids: `chunk_block` (a label line naming it, its text), then a blank
    line (CHUNK_SEPARATOR, tokenized on its own so that a chunk cut to fit keeps it: see fit_pieces' keep_tail)."""
    chunk = retrieved.chunk if isinstance(retrieved, Retrieved) else retrieved
    return tokenizer.encode(chunk_block(chunk, label), allowed_special="none") + separator_ids(tokenizer)


def separator_ids(tokenizer) -> list[int]:
    return tokenizer.encode(CHUNK_SEPARATOR, allowed_special="none")


def context_content(query: str, context: str) -> str:
    """A chat user turn with context: the instruction, "Context:", the chunks' text (each `chunk_block` and
    CHUNK_SEPARATOR), "Question: query"."""
    return f"{CHAT_INSTRUCTION}\n\nContext:\n{context}Question: {query}"


def prompt_frame(query: str, chat_format=None, with_context: bool = True, *, history: Sequence[dict] = (),
                 prefill: str = "") -> tuple[str, str]:
    """(text before the chunks, text after them: holds the query). Plain: (the history's contents, each followed by a
    blank line; query + prefill). Chat (a ChatFormat with a template): the history's turns ({"role", "content"}:
    few-shot demonstrations), then one user turn `context_content` (with context) or the query alone (without:
    nothing retrieved), rendered by the template, the assistant's turn opened and started with `prefill`."""
    if chat_format is None or getattr(chat_format, "template", None) is None:
        return "".join(f"{m['content']}{CHUNK_SEPARATOR}" for m in history), query + prefill
    if not with_context:
        return "", chat_format.render([*history, {"role": "user", "content": query}]) + prefill
    marker = "\x00CONTEXT\x00"
    rendered = chat_format.render([*history, {"role": "user", "content": context_content(query, marker)}])
    before, _, after = rendered.partition(marker)
    return before, after + prefill


def fit_pieces(pieces: Sequence[Sequence[int]], room: int, *, keep_tail: int = 0,
               min_cut: int = MIN_CUT_CHUNK_TOKENS) -> list[list[int]]:
    """Token pieces (rank order) within `room` tokens: the whole of each piece while it fits, then the next one cut
    to the room left (when at least min_cut tokens are left, else dropped; its last keep_tail tokens, a separator,
    kept after the cut); the rest dropped."""
    kept, left = [], max(room, 0)
    for piece in pieces:
        piece = list(piece)
        if len(piece) <= left:
            kept.append(piece)
            left -= len(piece)
            continue
        tail = piece[len(piece) - keep_tail:] if keep_tail else []
        if left - len(tail) >= min_cut:
            kept.append(piece[:left - len(tail)] + tail)
        break
    return kept


def build_prompt(query: str, chunks: Sequence[Retrieved | Chunk], tokenizer, max_tokens: int,
                 chat_format=None, *, label=None, history: Sequence[dict] = (), prefill: str = "") -> Prompt:
    """The prompt's ids: chunks (rank order, each named by label(chunk): `chunk_piece`) and the query within
    max_tokens tokens, after the history's turns and before the prefill (`prompt_frame`; see the module). RagError
    when the query alone (with the frame) does not fit."""
    check_query(query)
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise RagError(f"max_tokens={max_tokens!r}: expected a positive integer")
    chunks = [c if isinstance(c, Retrieved) else Retrieved(c, 0.0, r) for r, c in enumerate(chunks)]
    before, after = prompt_frame(query, chat_format, with_context=bool(chunks), history=history, prefill=prefill)
    head = tokenizer.encode(before)
    special = tokenizer.special_ids
    if special.add_bos and head[:1] != [special.bos]:  # the model's BOS first (before the chunks), never doubled
        head = [special.bos, *head]
    tail = tokenizer.encode(after)
    frame = len(head) + len(tail)
    if frame > max_tokens:
        turns = f" and {len(history)} earlier turns" if history else ""
        raise RagError(f"the query alone takes {frame} tokens (with the prompt's frame{turns}), more than the budget "
                       f"of {max_tokens} tokens: shorten the query{', give fewer earlier turns' if history else ''}, "
                       "or raise the budget (a longer context or fewer new tokens)")
    pieces = [chunk_piece(c, tokenizer, label) for c in chunks]
    fitted = fit_pieces(pieces, max_tokens - frame, keep_tail=len(separator_ids(tokenizer)))
    kept = chunks[:len(fitted)]
    cut = len(pieces[len(fitted) - 1]) - len(fitted[-1]) if fitted else 0  # tokens cut from the last kept chunk
    ids = head + [t for piece in fitted for t in piece] + tail
    return Prompt(ids, kept, cut, len(chunks) - len(kept), tokenizer.decode(ids))


# --- generation -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RagAnswer:
    query: str
    retrieved: list[Retrieved]
    prompt: Prompt
    answer: str
    finish_reason: str


def rag_generate(store: RagStore | None, encoder: Encoder | None, model, queries: str | Sequence[str], *, k: int = 4,
                 max_new_tokens: int = 64, retrieval_queries: Sequence[str] | None = None, use_chat: bool | None = None,
                 sampling=None, engine: bool = False, max_running: int = 32, label=None,
                 history: Sequence[dict] = (), prefill: str = "") -> list[RagAnswer]:
    """Retrieve k chunks for each query, build its prompt within the model's context (less max_new_tokens) and
    generate the answers (greedy unless `sampling`, a SamplingConfig). model: an `llmjax.io.models.LoadedModel`.
    store None (or k=0): no retrieval, the query alone (through the chat template for a chat). retrieval_queries:
    search with these texts instead of the queries. use_chat: the chat template (default: when the model has one).
    engine: through the serving engine (`llmjax.infer.engine`: continuous batching of max_running sequences over
    bucketed shapes, greedy only; many prompts of many lengths compile a few programs), else `generate` (one batch
    padded to the longest prompt). label, history, prefill: how chunks are named, earlier turns (few-shot
    demonstrations) and the reply's given start (`build_prompt`); the answers are what follows the prefill."""
    queries = [queries] if isinstance(queries, str) else list(queries)
    queries = [check_query(q) for q in queries]
    if store is not None and k > 0:
        found = retrieve_many(store, encoder, list(retrieval_queries or queries), k)
    else:
        found = [[] for _ in queries]
    chat = model.chat_format if (use_chat if use_chat is not None else model.chat_format.template is not None) \
        else None
    budget = model.cfg.max_seq_len - max_new_tokens
    prompts = [build_prompt(q, f, model.tokenizer, budget, chat, label=label, history=history, prefill=prefill)
               for q, f in zip(queries, found)]
    if engine:
        if sampling is not None:
            raise RagError("rag_generate(engine=True) is greedy: give sampling=None, or engine=False to sample")
        outputs = engine_greedy([p.ids for p in prompts], model, max_new_tokens, max_running)
    else:
        from llmjax.infer.generate import generate

        out = generate(model.params, model.cfg, [p.ids for p in prompts], max_new_tokens=max_new_tokens,
                       sampling=sampling, eos_id=model.end_ids[0] if model.end_ids else None)
        outputs = list(zip(out.tokens, out.finish_reasons))
    return [RagAnswer(q, f, p, model.tokenizer.decode([t for t in tokens if t not in model.end_ids]), reason)
            for q, f, p, (tokens, reason) in zip(queries, found, prompts, outputs)]


def engine_greedy(prompts: Sequence[Sequence[int]], model, max_new_tokens: int,
                  max_running: int = 32) -> list[tuple[list[int], str]]:
    """(tokens, finish reason) of the greedy completion of every prompt, in order, through one Engine sized for them
    (`llmjax.posttrain.rollouts.rollout_engine_config`); a reply ends at any of the model's end ids."""
    from llmjax.infer.engine import Engine, SamplingParams
    from llmjax.posttrain.rollouts import complete, rollout_engine_config

    config = rollout_engine_config(prompts, max_new_tokens, model.cfg.max_seq_len, max_running=max_running)
    eos = model.end_ids[0] if model.end_ids else None
    engine = Engine(model.params, model.cfg, config, eos_token_id=eos)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(model.end_ids[1:]))
    return [(list(r.completion_ids), r.finish_reason) for r in complete(engine, prompts, params)]


__all__ = ["Chunk", "Encoder", "Prompt", "RagAnswer", "RagError", "RagStore", "Retrieved", "build_prompt",
           "build_rag_index", "check_encoder", "chunk_block", "chunk_documents", "chunk_piece", "chunk_text",
           "context_content", "fit_pieces", "load_encoder", "load_rag_index", "make_index", "parse_encoder_spec",
           "prompt_frame", "rag_generate", "retrieve", "retrieve_many", "save_rag_index", "separator_ids",
           "source_label", "with_continuation", "engine_greedy"]
