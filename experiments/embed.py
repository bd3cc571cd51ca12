"""Embed a corpus with any model (an encoder such as all-MiniLM-L6-v2, or a decoder): vectors in shards on disk.

    python -m experiments embed --hf all-minilm-l6-v2 --data docs.jsonl --out runs/embeddings/docs
    python -m experiments embed --hf all-minilm-l6-v2 --out runs/embeddings/stdlib --limit 20000   # the default corpus

--data is a text file (one document per line, or --documents files: the whole file), a folder or glob of such files,
a JSONL file (a "text" field, and "id" if present), or `stdlib`: the standard library's source cut into windows of
--max-len tokens (`llmjax.retrieval.datasets.text_windows`). Texts are batched by `llmjax.embed.embed_ids` (sorted by
length, padded to a few bucket lengths, every batch of a shard dispatched before one transfer to the host) and written
as DIR/embeddings-00000.npy ... (rows of --shard-size), DIR/ids.jsonl and DIR/meta.json, each file atomically. Run
the same command again after an interruption: shards already complete are kept. `llmjax.embed.load_embeddings(DIR)`
reads the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROG = "python -m experiments embed"
DOCUMENT_UNITS = ("auto", "lines", "files")
ON_EMPTY = ("skip", "error")
FORMAT = "llmjax-embeddings/1"


class EmbedError(ValueError):
    """Bad input to this command: one line for the person running it."""


@dataclass(frozen=True)
class Document:
    """One thing to embed: text to tokenize, or token ids already framed as the model reads them (stdlib windows)."""

    id: str
    text: str | None = None
    ids: tuple[int, ...] | None = None


def build_parser() -> argparse.ArgumentParser:
    from llmjax.embed import DEFAULT_MAX_LEN
    from llmjax.io.models import GGUF_HELP

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] + " " + " ".join(
        __doc__.split("\n\n")[2].split()), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model preset with random weights (bert-tiny, minilm-l6, gpt2-tiny ...; "
                                        "its vocabulary is --tokenizer's)")
    source.add_argument("--hf", metavar="FOLDER_OR_HUB_ID",
                        help="a Hugging Face folder or hub id, or a packaged model's name: all-minilm-l6-v2")
    source.add_argument("--ckpt", type=Path, help="a run folder written by `experiments train` / `quickstart`")
    source.add_argument("--gguf", metavar="PATH_OR_NAME", help=GGUF_HELP)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (default: the run's / the HF folder's / the GGUF file's; 'bytes' for --model)")
    p.add_argument("--seed", type=int, default=0, help="seed of --model's random weights")
    p.add_argument("--data", default="stdlib",
                   help="a text file, a folder or glob of text files, a .jsonl file (field 'text', optional 'id'), "
                        "or 'stdlib' (the standard library's source in windows of --max-len tokens)")
    p.add_argument("--documents", choices=DOCUMENT_UNITS, default="auto",
                   help="for text files: 'lines' (each line one document), 'files' (each file one document); "
                        "auto: lines for one file, files for a folder or glob")
    p.add_argument("--out", type=Path, required=True, help="output folder (re-run the same command to resume)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (256+ on a GPU)")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"tokens per text, special tokens included (default: {DEFAULT_MAX_LEN} or the model's "
                        f"context if shorter); stdlib windows are this long")
    p.add_argument("--stride", type=int, default=None,
                   help="stdlib only: tokens between window starts (default: the window's length, no overlap)")
    p.add_argument("--limit", type=int, default=None, help="embed only the first N documents (after skipping empty)")
    p.add_argument("--pooling", choices=("mean", "cls", "last"), default=None,
                   help="default: mean for an encoder, last for a decoder (llmjax.embed.default_pooling)")
    p.add_argument("--no-normalize", action="store_true", help="keep the pooled vectors' length (default: unit L2)")
    p.add_argument("--on-long", choices=("truncate", "error"), default="truncate",
                   help="a text longer than --max-len tokens: cut to its first --max-len tokens (one warning), or stop")
    p.add_argument("--on-empty", choices=ON_EMPTY, default="skip",
                   help="an empty (or whitespace-only) document: skip it (counted in meta.json), or stop")
    p.add_argument("--shard-size", type=int, default=8192, help="rows per embeddings-NNNNN.npy file")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="dtype of the stored vectors")
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    for flag in ("batch_size", "shard_size", "limit", "stride"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')}={value}: must be a positive integer")
    if args.max_len is not None and args.max_len < 2:
        p.error(f"--max-len={args.max_len}: must be at least 2")
    if args.stride is not None and args.data != "stdlib":
        p.error("--stride is for --data stdlib (windows of the default corpus)")
    if args.data != "stdlib" and not Path(args.data).exists() and not any(c in args.data for c in "*?["):
        p.error(f"--data {args.data}: no such file or folder (give a text file, a folder, a .jsonl file or stdlib)")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: exists and is not a folder")


# --- reading documents -------------------------------------------------------------------------------------------

def read_documents(data: str, unit: str) -> tuple[list[Document], str, str]:
    """(documents in a fixed order, the source as meta.json records it, the unit read: lines or files) of a file,
    folder or glob."""
    from llmjax.data.corpus import CorpusError, read_text, record_format, resolve_one

    try:
        files = resolve_one(data)
    except CorpusError as error:
        raise EmbedError(f"--data {data}: {error}") from None
    if unit == "auto":
        unit = "lines" if len(files) == 1 and Path(data).is_file() else "files"
    documents: list[Document] = []
    for corpus_file in files:
        kind = record_format(corpus_file.path)
        if kind == "jsonl":
            documents += jsonl_documents(corpus_file.path, corpus_file.key)
        elif kind is not None:
            raise EmbedError(f"{corpus_file.path}: {kind} records are not read by this command; give JSONL or text")
        elif unit == "files":
            documents.append(Document(corpus_file.key, read_text(corpus_file.path)))
        else:
            lines = read_text(corpus_file.path).split("\n")
            if lines and lines[-1] == "":
                lines.pop()  # the file's final newline ends the last line; it is not an empty document
            documents += [Document(f"{corpus_file.key}:{number}", line) for number, line in enumerate(lines, 1)]
    return documents, str(Path(data).resolve()) if Path(data).exists() else data, unit


def jsonl_documents(path: Path, key: str) -> list[Document]:
    """One document per non-blank line {"text": ..., "id": ... (optional; default FILE:LINE)}."""
    from llmjax.data.corpus import read_text

    documents = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EmbedError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EmbedError(f'{path}:{number}: expected a JSON object with a "text" string')
        given = record.get("id")
        if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int))):
            raise EmbedError(f'{path}:{number}: "id" must be a string or an integer')
        documents.append(Document(str(given) if given is not None else f"{key}:{number}", record["text"]))
    return documents


def stdlib_documents(tokenizer, max_len: int, stride: int | None, limit: int | None) -> list[Document]:
    """The default corpus (the standard library's .py files, in a fixed order) tokenized and cut into windows of
    max_len tokens with the tokenizer's framing ([CLS] ... [SEP] for WordPiece) by `text_windows`; reading stops
    once `limit` windows are had. Ids: "path@first token"."""
    from tqdm import tqdm

    from llmjax.data.corpus import default_corpus, read_text
    from llmjax.retrieval.datasets import text_windows

    framing = tokenizer.special_ids.around([])
    window = max_len - len(framing)
    if window < 1:
        raise EmbedError(f"--max-len={max_len} leaves no room for text between the tokenizer's special tokens")
    head = [tokenizer.special_ids.bos] if framing and framing[0] == tokenizer.special_ids.bos else []
    tail = framing[len(head):]
    documents: list[Document] = []
    for corpus_file in tqdm(default_corpus(), desc="reading the standard library", unit="file"):
        tokens = np.asarray(tokenizer.encode_ordinary(read_text(corpus_file.path)), np.int64)
        if len(tokens) == 0:
            continue
        for _, start in text_windows([tokens], window, stride or window):
            ids = (*head, *tokens[start:start + window].tolist(), *tail)
            documents.append(Document(f"{corpus_file.key}@{start}", ids=ids))
        if limit is not None and len(documents) >= limit:
            break
    return documents


def data_fingerprint(documents: list[Document]) -> str:
    """sha256 of every document's id and content: a re-run on changed data is told apart from a resume."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.id.encode("utf-8", "surrogatepass") + b"\0")
        if document.text is not None:
            digest.update(document.text.encode("utf-8", "surrogatepass") + b"\1")
        else:
            digest.update(np.asarray(document.ids, np.int64).tobytes() + b"\2")
    return digest.hexdigest()


def drop_empty(documents: list[Document], on_empty: str) -> tuple[list[Document], int]:
    """(the documents with text, how many were empty or whitespace only); on_empty="error": the first one refused."""
    kept = [d for d in documents if d.ids is not None or d.text.strip()]
    empty = len(documents) - len(kept)
    if empty and on_empty == "error":
        first = next(d for d in documents if d.ids is None and not d.text.strip())
        raise EmbedError(f"document {first.id!r} is empty ({empty} empty documents in all): remove them, or pass "
                         f"--on-empty skip")
    return kept, empty


# --- the run -----------------------------------------------------------------------------------------------------

def token_ids(documents: list[Document], tokenizer, max_len: int, on_long: str) -> tuple[list[list[int]], int]:
    """(each document's ids as the model reads them, cut to max_len; how many were cut). on_long="error": the first
    long document is refused."""
    from llmjax.embed import tokenize_for_embedding

    sequences, cut = [], 0
    for document in documents:
        if document.ids is not None:
            sequences.append(list(document.ids))
            continue
        ids, lost = tokenize_for_embedding(tokenizer, document.text, max_len)
        if lost and on_long == "error":
            raise EmbedError(f"document {document.id!r} has {len(ids) + lost} tokens, more than --max-len={max_len}: "
                             f"shorten it, raise --max-len, or pass --on-long truncate")
        cut += bool(lost)
        sequences.append(ids or list(tokenizer.special_ids.around([])) or [0])
    return sequences, cut


def run_meta(args, model_name: str, cfg, pooling: str, max_len: int, documents: list[Document], source: str,
             unit: str, skipped_empty: int) -> dict:
    """What the output folder holds; every field but "complete" must match for a re-run to resume."""
    meta = {"format": FORMAT, "model": model_name, "dimension": cfg.d_model, "pooling": pooling,
            "normalize": not args.no_normalize, "max_len": max_len, "count": len(documents), "dtype": args.dtype,
            "source": source, "documents": unit,
            "shard_size": args.shard_size, "skipped_empty": skipped_empty, "data_sha256": data_fingerprint(documents)}
    if args.model is not None:
        meta["seed"] = args.seed
    if args.data == "stdlib":
        meta["stride"] = args.stride  # None: windows do not overlap
    return meta | {"complete": False}


def check_resumable(out: Path, meta: dict) -> bool:
    """True when `out` holds an earlier run of the same meta (its complete shards are kept); EmbedError when it holds
    something else."""
    from llmjax.embed import META_FILE

    if not out.exists() or not any(out.iterdir()):
        return False
    if not (out / META_FILE).is_file():
        raise EmbedError(f"--out {out}: the folder is not empty and holds no {META_FILE}: give a new or empty folder")
    try:
        old = json.loads((out / META_FILE).read_text())
    except json.JSONDecodeError:
        raise EmbedError(f"{out / META_FILE}: not valid JSON: delete {out} to start over") from None
    for name, value in meta.items():
        if name != "complete" and old.get(name) != value:
            raise EmbedError(f"--out {out} holds embeddings made with {name}={old.get(name)!r}, this run has "
                             f"{name}={value!r}: give another --out, or delete {out} to start over")
    return True


def embed_to_folder(model, documents: list[Document], meta: dict, out: Path, *, batch_size: int,
                    on_long: str) -> dict:
    """Write every shard not already complete, then meta.json with complete: true. Returns a summary."""
    from tqdm import tqdm

    from llmjax.data.shards import write_json_atomically
    from llmjax.embed import IDS_FILE, META_FILE, embed_ids, save_shard, shard_count, shard_is_complete, \
        write_atomically

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / META_FILE, meta)
    write_atomically(out / IDS_FILE, lambda path: path.write_text(
        "".join(json.dumps(d.id, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8"))
    tokenizer, shard_size, count = model.tokenizer, meta["shard_size"], meta["count"]
    pad_id = tokenizer.special_ids.pad if tokenizer.special_ids.pad is not None else 0
    shards = range(shard_count(count, shard_size))
    done = [i for i in shards if shard_is_complete(out, i, min(shard_size, count - i * shard_size),
                                                   meta["dimension"], meta["dtype"])]
    kept_rows = sum(min(shard_size, count - i * shard_size) for i in done)
    started, cut, embedded = time.perf_counter(), 0, 0
    with tqdm(total=count, initial=kept_rows, desc="embedding", unit="text") as bar:
        for index in shards:
            if index in done:
                continue
            part = documents[index * shard_size:(index + 1) * shard_size]
            sequences, part_cut = token_ids(part, tokenizer, meta["max_len"], on_long)
            vectors = embed_ids(model.params, model.cfg, sequences, pad_id=pad_id, batch_size=batch_size,
                                max_len=meta["max_len"], pooling=meta["pooling"], normalize=meta["normalize"])
            save_shard(out, index, vectors.astype(meta["dtype"]))
            cut, embedded = cut + part_cut, embedded + len(part)
            bar.update(len(part))
    seconds = time.perf_counter() - started
    write_json_atomically(out / META_FILE, meta | {"complete": True})
    return {"embedded": embedded, "kept": kept_rows, "shards_kept": len(done), "truncated": cut, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    from llmjax.embed import DEFAULT_MAX_LEN, default_pooling
    from llmjax.io.models import ModelLoadError, load_model, model_name

    try:
        model = load_model(ckpt=args.ckpt, hf=args.hf, gguf=args.gguf, preset=args.model, tokenizer=args.tokenizer,
                           seed=args.seed)
    except ModelLoadError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    cfg = model.cfg
    max_len = args.max_len if args.max_len is not None else min(DEFAULT_MAX_LEN, cfg.max_seq_len)
    if max_len > cfg.max_seq_len:
        p.error(f"--max-len={max_len}: the model reads at most {cfg.max_seq_len} tokens")
    pooling = args.pooling or default_pooling(cfg)
    name = model_name(ckpt=args.ckpt, hf=args.hf, gguf=args.gguf, preset=args.model)
    try:
        if args.data == "stdlib":
            documents = stdlib_documents(model.tokenizer, max_len, args.stride, args.limit)
            source, unit = "stdlib", "windows"
        else:
            documents, source, unit = read_documents(args.data, args.documents)
        documents, empty = drop_empty(documents, args.on_empty)
        documents = documents[:args.limit] if args.limit is not None else documents
        if not documents:
            raise EmbedError(f"--data {args.data}: no document to embed" + (f" ({empty} empty skipped)" if empty
                                                                             else ""))
        meta = run_meta(args, name, cfg, pooling, max_len, documents, source, unit, empty)
        resuming = check_resumable(args.out, meta)
        print(f"{PROG}: {len(documents)} documents of {source} -> {args.out} ({name}, {pooling} pooling, "
              f"{'unit length' if meta['normalize'] else 'not normalized'}, max {max_len} tokens, {args.dtype})"
              + (f"; {empty} empty documents skipped" if empty else "") + ("; resuming" if resuming else ""),
              file=sys.stderr, flush=True)
        summary = embed_to_folder(model, documents, meta, args.out, batch_size=args.batch_size, on_long=args.on_long)
    except EmbedError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if summary["truncated"]:
        print(f"{PROG}: warning: {summary['truncated']} documents were longer than --max-len={max_len} tokens and "
              f"were truncated to their first {max_len}", file=sys.stderr)
    rate = summary["embedded"] / summary["seconds"] if summary["seconds"] > 0 else float("nan")
    print(f"{PROG}: wrote {summary['embedded']} embeddings ({summary['kept']} kept from an earlier run) in "
          f"{summary['seconds']:.1f} s ({rate:.1f} texts/s) to {args.out}", file=sys.stderr)
    return 0
