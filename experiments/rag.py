"""Retrieval-augmented generation: `rag index` embeds a corpus's chunks into an index, `rag ask` answers from it.

    python -m experiments rag index --encoder hf:all-minilm-l6-v2 --data stdlib --out runs/rag/stdlib
    python -m experiments rag ask --index runs/rag/stdlib --gguf smollm2-135m-instruct "What does textwrap.dedent do?"

The pipeline is `llmjax.retrieval.rag` (build_rag_index, retrieve, build_prompt, rag_generate); the evaluations are
`python -m experiments rag_eval loss|qa`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m experiments rag"


# --- flags shared with rag_eval --------------------------------------------------------------------------------------

def add_generator_flags(parser) -> None:
    """The language model: one of --ckpt, --gguf, --hf, --model (a random preset, for trying things out)."""
    from llmjax.io.models import GGUF_HELP

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="the language model: a run folder (`experiments train`, ...)")
    source.add_argument("--gguf", metavar="PATH_OR_NAME", help=f"the language model: {GGUF_HELP}")
    source.add_argument("--hf", metavar="FOLDER_OR_HUB_ID", help="the language model: a Hugging Face folder / hub id")
    source.add_argument("--model", metavar="PRESET", help="the language model: a preset with random weights (--seed)")
    parser.add_argument("--seed", type=int, default=0, help="--model's random weights")


def load_generator(args):
    """The LoadedModel the generator flags name (ModelLoadError when they name nothing loadable)."""
    from llmjax.io.models import load_model

    return load_model(ckpt=args.ckpt, gguf=args.gguf, hf=args.hf, preset=args.model, seed=args.seed)


def generator_name(args) -> str:
    from llmjax.io.models import model_name

    return model_name(ckpt=args.ckpt, gguf=args.gguf, hf=args.hf, preset=args.model)


def add_store_flags(parser) -> None:
    parser.add_argument("--index", type=Path, required=True, metavar="FOLDER",
                        help="a RAG index folder written by `rag index --out FOLDER`")
    parser.add_argument("--encoder", default=None, metavar="SOURCE:NAME",
                        help="the query encoder (default: the one the index was built with, from its meta.json); "
                             "another one than the index's is refused")
    parser.add_argument("-k", type=int, default=4, help="chunks retrieved per query (at most the index's size)")


def load_store(args):
    """(store, encoder) of --index and --encoder (default: the index's own encoder, its pooling and max_len)."""
    from llmjax.retrieval.rag import check_encoder, load_encoder, load_rag_index

    store = load_rag_index(args.index)
    built = store.meta["encoder"]
    encoder = load_encoder(args.encoder or built["name"], pooling=built["pooling"], normalize=built["normalize"],
                           max_len=built["max_len"])
    check_encoder(store.meta, encoder, f"the index {args.index}")
    return store, encoder


def run_command(function, args) -> int:
    """Run a subcommand; bad input (RagError, a model that does not load, a corpus, a prompt) is one line, exit 2."""
    from llmjax.data.corpus import CorpusError
    from llmjax.infer.engine import EngineError
    from llmjax.infer.generate import GenerationError
    from llmjax.io.models import ModelLoadError
    from llmjax.retrieval.base import RetrievalError

    try:
        function(args)
    except (RetrievalError, ModelLoadError, GenerationError, EngineError, CorpusError) as error:
        print(f"{args.prog}: {error}", file=sys.stderr)
        return 2
    return 0


# --- rag index -------------------------------------------------------------------------------------------------------

def corpus_for(data: str, split: str, max_files: int | None) -> list:
    """Documents of --data (stdlib: the default corpus) and --split, the first --max-files of them."""
    from llmjax.data.corpus import corpus_documents

    documents = corpus_documents(None if data == "stdlib" else data, split=None if split == "all" else split)
    out = []
    for document in documents:
        if max_files is not None and len(out) >= max_files:
            break
        if document.text.strip():
            out.append(document)
    return out


def index_command(args) -> None:
    from llmjax.retrieval.rag import RagError, build_rag_index, load_encoder

    if args.max_files is not None and args.max_files < 1:
        raise RagError(f"--max-files {args.max_files}: must be at least 1")
    encoder = load_encoder(args.encoder, pooling=args.pooling, max_len=args.max_len, batch_size=args.batch_size)
    documents = corpus_for(args.data, args.split, args.max_files)
    store = build_rag_index(documents, encoder, args.out, kind=args.index_kind, chunk_chars=args.chunk_chars,
                            progress=not args.no_progress, source=f"{args.data} ({args.split})")
    print(f"indexed {store.size} chunks of {store.meta['files']} files with {encoder.name} (dim {encoder.dim}, "
          f"{encoder.pooling} pooling) in an index of kind {args.index_kind}: {store.path}")


# --- rag ask ---------------------------------------------------------------------------------------------------------

def ask_command(args) -> None:
    from llmjax.retrieval.rag import rag_generate

    store, encoder = load_store(args)
    model = load_generator(args)
    use_chat = False if args.plain else None
    answer = rag_generate(store, encoder, model, args.query, k=args.k, max_new_tokens=args.max_new_tokens,
                          use_chat=use_chat, engine=True, max_running=1)[0]
    for retrieved in answer.retrieved:
        kept = "" if retrieved in answer.prompt.kept else "  (dropped: no room)"
        print(f"retrieved {retrieved.rank + 1}: {retrieved.chunk.key}  score {retrieved.score:.4f}{kept}")
    if answer.prompt.cut_tokens:
        print(f"(the last chunk kept was cut by {answer.prompt.cut_tokens} tokens to fit the context)")
    print(f"prompt: {len(answer.prompt.ids)} tokens; answer ({answer.finish_reason}):")
    print(answer.answer)


# --- the command -----------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Retrieval-augmented generation. `index`: cut a corpus into chunks of whole lines, embed them "
        "with an encoder and save an index folder (index.npz, chunks.jsonl, meta.json: the encoder and chunking). "
        "`ask`: retrieve the k chunks nearest to a question or code prompt, put them before it within the model's "
        "context (lowest-ranked chunks dropped first, then the last kept one cut; the query is never cut) and "
        "generate greedily with the serving engine; prints the retrieved chunks' keys and the answer.")
    commands = p.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="build an index folder from a corpus",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    index.add_argument("--encoder", default="hf:all-minilm-l6-v2", metavar="SOURCE:NAME",
                       help="the embedding model: hf:FOLDER|NAME (hf:all-minilm-l6-v2), ckpt:RUN, gguf:PATH|NAME, or "
                            "preset:NAME (random weights, for tests)")
    index.add_argument("--data", default="stdlib",
                       help="the corpus: stdlib (the Python standard library's source), or files / a folder / a glob")
    index.add_argument("--split", choices=("all", "train", "validation"), default="all",
                       help="which files of the corpus (the split is by a hash of each file's path); the loss "
                            "evaluation leaves the held-out file's own chunks out whatever is indexed")
    index.add_argument("--out", type=Path, required=True, help="the index folder to write (replaced atomically)")
    index.add_argument("--index-kind", default="exact", choices=("exact", "hnsw", "ivfpq", "filtered_vamana"),
                       help="the vector index (llmjax.retrieval)")
    index.add_argument("--chunk-chars", type=int, default=800,
                       help="the most characters of a chunk (whole lines; 800: about MiniLM's 256 word pieces)")
    index.add_argument("--max-files", type=int, default=None, help="index only the first N files (a quick try)")
    index.add_argument("--pooling", choices=("mean", "cls", "last"), default=None,
                       help="the encoder's pooling (default: mean for an encoder, last for a decoder)")
    index.add_argument("--max-len", type=int, default=256, help="the encoder's tokens per chunk (longer: cut)")
    index.add_argument("--batch-size", type=int, default=64, help="chunks per embedding batch")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")

    ask = commands.add_parser("ask", help="answer a question (or continue a code prompt) from an index",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_store_flags(ask)
    add_generator_flags(ask)
    ask.add_argument("--max-new-tokens", type=int, default=64, help="the answer's most tokens")
    ask.add_argument("--plain", action="store_true",
                     help="plain-text prompt even for a model with a chat template (default: the chat template "
                          "when the model has one, e.g. SmolLM2-Instruct)")
    ask.add_argument("query", help="the question or code prompt")
    args = p.parse_args(argv)
    args.prog = f"{PROG} {args.command}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(index_command if args.command == "index" else ask_command, args)
