"""Evaluating retrieval-augmented language models: held-out LM loss with and without retrieved neighbours at equal
context length, and exact-match answers to questions made from standard-library docstrings.

Loss (`loss_targets`, `rag_loss_eval`): held-out files (the corpus's validation split: a hash of each path, so the
same files on every machine; `validation_fraction` of them, by default the corpus's 1%, the split a model trained on
the corpus's training split never saw) are tokenized by the language model; target chunks of `target` tokens starting
at least `context` tokens into their file (so only files longer than context + target tokens give any), up to
`per_file` of each file and spread over as many files as `total` allows, are scored twice, after `context` tokens
each time:
    baseline:  the last `context` tokens before the target
    RAG:       neighbours (at most `neighbour_tokens` tokens, rank order, the last one cut to fit; by default each
               retrieved chunk followed by the next chunk of its file, RETRO's neighbour + continuation) + the
               last (context - their length) tokens before the target
Neighbours are retrieved by the text just before the target (its last `query_tokens` tokens, decoded) with every
chunk of the held-out file itself left out. The index holds what `rag index` put in it: by default (--split all)
every file of the corpus, the held-out ones included (another held-out file may be a neighbour: it is not the text
scored; only the target's own file is excluded); with --split train only the training files. Only the target's
tokens are scored (`llmjax.evaluation.target_token_losses`); the mean loss per position in the target chunk is
reported in log2 buckets (`llmjax.long_context.position_buckets`). The default 1% is too few files for a small
standard library: one without its test suite, idlelib and tkinter (a distribution's python3.12, 569 files) holds
out 2 files at 1%, 21 targets at --context 1024 --target 64, but ~80 files at 15%, 512 targets from ~50 of them. A
larger fraction suits a model that was not trained on this corpus's training split (SmolLM2); for a checkpoint
trained on the training split keep the default, else "held-out" files include training files.

QA (`stdlib_questions`, `qa_eval`): "Which standard-library function has this docstring?" for public top-level
functions of the standard library (the first paragraph of the docstring; answer: module.function), chosen by a
hash of the name (deterministic; the DEMONSTRATIONS' functions never), saved as JSONL. The prompt of both conditions
(`qa_history`, `llmjax.retrieval.rag.build_prompt`): `shots` solved demonstrations (DEMONSTRATIONS: fixed
functions outside every question set, as earlier chat turns), the question, and the assistant's turn prefilled
with QA_PREFILL ("Answer:") so that the reply starts with the name. With retrieval, each user turn (the
demonstrations' too, with their fixed context of two chunks, the right one not always first) holds its chunks,
each labelled with its module (`module_label`: "# module inspect (inspect.py, lines 439-447)"); without, the same
turns without context: the prompts differ only by the retrieved chunks (and the "Use the context below" frame
around them). Answers are greedy and scored by exact match of the reply's first dotted name (`normalize_answer`;
an alias counts: asyncio.gather for asyncio.tasks.gather), and, more leniently, by whether the qualified name or
just the function's name appears in the reply at all.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmjax.data.corpus import VALIDATION_FRACTION
from llmjax.retrieval.rag import (CHUNK_SEPARATOR, Chunk, RagError, RagStore, chunk_block, chunk_piece, context_content,
                                  fit_pieces, retrieve_many, separator_ids, source_label)

# --- LM loss with and without neighbours ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LossTarget:
    file: str              # the held-out document's key
    start: int             # the target's first token in the document
    preceding: np.ndarray  # int32 [context]: the tokens just before the target
    target: np.ndarray     # int32 [target]


def heldout_documents(data: str | os.PathLike | None = None,
                      validation_fraction: float = VALIDATION_FRACTION, split: str = "validation") -> list:
    """The held-out documents (`llmjax.data.corpus.Document`) of a corpus (None: the standard library): its
    validation split of `validation_fraction` of the files, chosen by a hash of each file's path (a larger fraction
    holds the smaller one's files); split="train": the other files (what `rag_training_rows` reads)."""
    from llmjax.data.corpus import corpus_documents

    if not 0 < validation_fraction < 1:
        raise RagError(f"--validation-fraction {validation_fraction}: expected a fraction between 0 and 1")
    return [d for d in corpus_documents(data, split=split, validation_fraction=validation_fraction)
            if d.text.strip()]


def loss_targets(documents: Sequence, tokenizer, *, context: int, target: int, per_file: int = 8,
                 total: int | None = None) -> list[LossTarget]:
    """Target chunks of `target` tokens, each with its `context` preceding tokens: up to per_file per document,
    spread evenly over the document's chunk starts (context, context + target, ...); at most `total` in all, taken
    round-robin (every long enough document's first, then every one's second, ...) so that they come from as many
    documents as possible. In document order, each document's in order."""
    if context < 1 or target < 1 or per_file < 1:
        raise RagError(f"context={context}, target={target}, per_file={per_file}: expected positive integers")
    per_document = []
    for document in documents:
        ids = np.asarray(tokenizer.encode(document.text, allowed_special="none"), np.int32)
        starts = np.arange(context, len(ids) - target + 1, target)
        if len(starts) > per_file:
            starts = starts[np.linspace(0, len(starts) - 1, per_file).round().astype(int)]
        per_document.append([LossTarget(document.key, int(s), ids[s - context:s], ids[s:s + target])
                             for s in starts])
    rounds = [t for turn in itertools.zip_longest(*per_document) for t in turn if t is not None]
    chosen = {id(t) for t in rounds[:total]}
    return [t for targets in per_document for t in targets if id(t) in chosen]


def neighbour_context(pieces: Sequence[Sequence[int]], preceding: np.ndarray, context: int, neighbour_tokens: int,
                      separator_tokens: int = 0) -> np.ndarray:
    """int32 [context]: the neighbours' pieces (rank order) within neighbour_tokens, then the last tokens of the
    preceding text to fill `context` exactly."""
    fitted = fit_pieces(pieces, min(neighbour_tokens, context - 1), keep_tail=separator_tokens)
    fitted = [t for piece in fitted for t in piece]
    rest = context - len(fitted)
    if len(preceding) < rest:
        raise RagError(f"{len(preceding)} preceding tokens cannot fill a context of {context}")
    return np.concatenate([np.asarray(fitted, np.int32), np.asarray(preceding[len(preceding) - rest:], np.int32)])


NEIGHBOUR_TEXTS = ("chunk", "continuation")


def neighbour_rows(store: RagStore, encoder, tokenizer, targets: Sequence[LossTarget], *, k: int, context: int,
                   neighbour_tokens: int, query_tokens: int = 128, neighbour_text: str = "continuation"
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[list]]:
    """Per target: (its baseline row: the last `context` preceding tokens + the target; its RAG row: the neighbours
    retrieved by its preceding text (its own file's chunks excluded), then the preceding tail, `context` tokens in
    all, + the target; the neighbours' RetrievalResults). Rows are int32 [context + target]."""
    from llmjax.retrieval.rag import with_continuation

    if neighbour_text not in NEIGHBOUR_TEXTS:
        raise RagError(f"--neighbours {neighbour_text!r}: expected one of {', '.join(NEIGHBOUR_TEXTS)}")
    queries = [tokenizer.decode(t.preceding[-query_tokens:].tolist()) for t in targets]
    with warnings.catch_warnings():  # a query longer than the encoder's max_len is cut (its first tokens kept)
        warnings.filterwarnings("ignore", message=".*longer than max_len")
        found = retrieve_many(store, encoder, [q if q.strip() else "(blank)" for q in queries], k,
                              exclude_files=[t.file for t in targets])
    rows_base, rows_rag, neighbours_of = [], [], []
    for t, neighbours in zip(targets, found):
        if neighbour_text == "continuation":
            neighbours = [with_continuation(store, r) for r in neighbours]
        pieces = [chunk_piece(r, tokenizer) for r in neighbours]
        rows_base.append(np.concatenate([t.preceding[-context:], t.target]).astype(np.int32))
        rows_rag.append(np.concatenate([neighbour_context(pieces, t.preceding, context, neighbour_tokens,
                                                          len(separator_ids(tokenizer))), t.target]).astype(np.int32))
        neighbours_of.append(neighbours)
    return rows_base, rows_rag, neighbours_of


def check_rag_window(context: int, neighbour_tokens: int) -> None:
    if not 0 < neighbour_tokens < context:
        raise RagError(f"--neighbour-tokens {neighbour_tokens}: expected 1 .. context - 1 ({context - 1}), so some "
                       "preceding text stays")


def rag_training_rows(store: RagStore, encoder, tokenizer, targets: Sequence[LossTarget], *, k: int = 4,
                      context: int, neighbour_tokens: int, query_tokens: int = 128, batch_size: int = 64,
                      neighbour_text: str = "continuation", progress: bool = False) -> np.ndarray:
    """Training rows for a retrieval-augmented LM (RETRO's idea at the input: neighbours in the context), built as
    `rag_loss_eval` builds its rows, from targets of the corpus's training files: int32 [2 * targets, context +
    target], each target's baseline row then its RAG row, so a model trained on them reads neighbours and does
    without them. Write them with `llmjax.data.shards.write_rows` (training reads whole rows)."""
    if not targets:
        raise RagError("no training targets: the files are shorter than context + target tokens")
    check_rag_window(context, neighbour_tokens)
    starts = range(0, len(targets), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="rag rows", unit="batch")
    rows = []
    for start in starts:
        base, rag, _ = neighbour_rows(store, encoder, tokenizer, targets[start:start + batch_size], k=k,
                                      context=context, neighbour_tokens=neighbour_tokens, query_tokens=query_tokens,
                                      neighbour_text=neighbour_text)
        rows.extend(row for pair in zip(base, rag) for row in pair)
    return np.stack(rows)


def rag_loss_eval(store: RagStore, encoder, params, cfg, tokenizer, targets: Sequence[LossTarget], *, k: int = 4,
                  context: int, neighbour_tokens: int, query_tokens: int = 128, batch_size: int = 8,
                  neighbour_text: str = "continuation", progress: bool = False) -> dict:
    """Mean target-token loss with and without neighbours (see the module): {baseline, rag, delta (baseline - rag,
    nats/token), per_position_{baseline,rag} [target], buckets (per position bucket: both and the delta), targets,
    files, examples}. neighbour_text: "chunk" (each retrieved chunk) or "continuation" (each followed by the next
    chunk of its file, RETRO's neighbour + continuation: `llmjax.retrieval.rag.with_continuation`). The rows:
    `neighbour_rows`."""
    from llmjax.evaluation import target_token_losses
    from llmjax.long_context import position_buckets

    if not targets:
        raise RagError("no held-out target chunks: the held-out files are shorter than context + target tokens "
                       "(give a shorter --context / --target, or a corpus with longer held-out files)")
    if context + len(targets[0].target) - 1 > cfg.max_seq_len:
        raise RagError(f"--context {context} + --target {len(targets[0].target)} tokens exceed the model's context "
                       f"of {cfg.max_seq_len} + 1 (max_seq_len): shorten them")
    check_rag_window(context, neighbour_tokens)
    length = len(targets[0].target)
    baseline_losses, rag_losses, examples = [], [], []
    starts = range(0, len(targets), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="rag loss", unit="batch")
    for start in starts:
        part = targets[start:start + batch_size]
        rows_base, rows_rag, neighbours_of = neighbour_rows(
            store, encoder, tokenizer, part, k=k, context=context, neighbour_tokens=neighbour_tokens,
            query_tokens=query_tokens, neighbour_text=neighbour_text)
        for t, neighbours in zip(part, neighbours_of):
            if len(examples) < 5:
                examples.append({"file": t.file, "start": t.start, "neighbours": [r.chunk.key for r in neighbours]})
        pad = batch_size - len(part)  # one batch shape: one compile
        both = np.stack(rows_base + rows_rag + [rows_base[0]] * (2 * pad))
        losses = target_token_losses(params, cfg, both, length)  # [2 * batch_size, target]
        baseline_losses.append(losses[:len(part)])
        rag_losses.append(losses[len(part):2 * len(part)])
    baseline, rag = np.concatenate(baseline_losses), np.concatenate(rag_losses)  # [targets, target]
    per_base, per_rag = baseline.mean(axis=0), rag.mean(axis=0)
    buckets = [{**b, "baseline": b["mean_loss"], "rag": r["mean_loss"], "delta": b["mean_loss"] - r["mean_loss"]}
               for b, r in zip(position_buckets(per_base), position_buckets(per_rag))]
    for bucket in buckets:
        del bucket["mean_loss"]
    return {"baseline": float(baseline.mean()), "rag": float(rag.mean()),
            "delta": float(baseline.mean() - rag.mean()), "targets": len(targets),
            "files": len({t.file for t in targets}), "per_position_baseline": [round(float(x), 5) for x in per_base],
            "per_position_rag": [round(float(x), 5) for x in per_rag], "buckets": buckets, "examples": examples}


# --- questions from standard-library docstrings --------------------------------------------------------------------

SKIPPED_PARTS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages", "__main__.py"}
QUESTION = ("Which Python standard-library function has this docstring?\n\n\"{docstring}\"\n\nAnswer with its "
            "full name only, as module.function.")  # an example name here is echoed back by SmolLM2


def module_name(key: str) -> str:
    """"json/decoder.py" -> "json.decoder"; "json/__init__.py" -> "json"."""
    parts = key.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_label(chunk: Chunk) -> str:
    """The line naming a chunk of Python in a QA prompt: "# module inspect (inspect.py, lines 439-447)" (its key is
    FILE:FIRST-LAST); a chunk of another kind of file: `llmjax.retrieval.rag.source_label`."""
    lines = chunk.key.removeprefix(f"{chunk.file}:")
    if not chunk.file.endswith(".py") or lines == chunk.key:
        return source_label(chunk)
    return f"# module {module_name(chunk.file)} ({chunk.file}, lines {lines})"


@dataclass(frozen=True)
class Demonstration:
    """A solved QA example shown before every question (never itself a question: `stdlib_questions` leaves its
    function out): its docstring, answer, and the context its user turn holds in the with-retrieval condition."""

    docstring: str
    answer: str
    context: tuple[Chunk, ...]


DEMONSTRATIONS = (  # the standard library's own text (Python 3.12); the right chunk second in one, first in the other
    Demonstration(
        "Remove any common leading whitespace from every line in `text`.", "textwrap.dedent",
        (Chunk("base64.py:51-57", "base64.py",
               'def b64encode(s, altchars=None):\n    """Encode the bytes-like object s using Base64 and return a '
               'bytes object.\n\n    Optional altchars should be a byte string of length 2 which specifies an\n'
               '    alternative alphabet for the \'+\' and \'/\' characters.\n    """\n'),
         Chunk("textwrap.py:419-425", "textwrap.py",
               'def dedent(text):\n    """Remove any common leading whitespace from every line in `text`.\n\n'
               '    This can be used to make triple-quoted strings line up with the left\n    edge of the display, '
               'while still presenting them in the source code\n    in indented form.\n'))),
    Demonstration(
        "Parse addr into its constituent realname and email address parts.", "email.utils.parseaddr",
        (Chunk("email/utils.py:208-218", "email/utils.py",
               'def parseaddr(addr):\n    """\n    Parse addr into its constituent realname and email address parts.'
               '\n\n    Return a tuple of realname and email address, unless the parse fails, in\n    which case '
               'return a 2-tuple of (\'\', \'\').\n    """\n    addrs = _AddressList(addr).addresslist\n'
               '    if not addrs:\n        return \'\', \'\'\n    return addrs[0]\n'),
         Chunk("calendar.py:141-143", "calendar.py",
               'def isleap(year):\n    """Return True for leap years, False for non-leap years."""\n'
               '    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n'))),
)
DEMONSTRATED = frozenset(d.answer for d in DEMONSTRATIONS)
QA_PREFILL = "Answer:"  # the assistant's reply starts here: the model goes on with the name


def qa_history(shots: int = len(DEMONSTRATIONS), with_context: bool = False, label=module_label,
               prefill: str = QA_PREFILL) -> list[dict]:
    """The chat turns before a question: the first `shots` DEMONSTRATIONS, each a user turn (QUESTION; with
    context: `llmjax.retrieval.rag.context_content` around its chunks, each `chunk_block` named by label, as
    retrieved chunks read) and the assistant's answer after the prefill."""
    if not 0 <= shots <= len(DEMONSTRATIONS):
        raise RagError(f"--shots {shots}: expected 0 .. {len(DEMONSTRATIONS)} (the fixed demonstrations)")
    turns = []
    for demo in DEMONSTRATIONS[:shots]:
        question = QUESTION.format(docstring=demo.docstring)
        if with_context:
            question = context_content(question, "".join(chunk_block(c, label) + CHUNK_SEPARATOR
                                                         for c in demo.context))
        turns += [{"role": "user", "content": question},
                  {"role": "assistant", "content": f"{prefill} {demo.answer}" if prefill else demo.answer}]
    return turns


def public_module(key: str) -> bool:
    parts = key.split("/")
    return (key.endswith(".py") and not SKIPPED_PARTS & set(parts) and not parts[-1].startswith("test_")
            and not any(p.startswith("_") and p != "__init__.py" for p in parts))


def first_paragraph(docstring: str) -> str:
    """The docstring's first paragraph with its whitespace collapsed to single spaces."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def stdlib_questions(count: int = 200, files: Sequence | None = None, *, min_chars: int = 40,
                     max_chars: int = 300) -> list[dict]:
    """`count` questions about public top-level functions with a distinctive docstring (first paragraph of
    min_chars..max_chars characters, naming neither the function nor shared with another function), chosen by a
    hash of the qualified name; never a DEMONSTRATIONS function. files: `llmjax.data.corpus.CorpusFile`s (default:
    the standard library's).
    Each: {id, question, docstring, answer (module.function), aliases (package.function where the package
    re-exports it: asyncio.gather for asyncio.tasks.gather), file}."""
    from llmjax.data.corpus import default_corpus, read_text, split_hash

    files = default_corpus() if files is None else list(files)
    by_key = {f.key: f for f in files}
    candidates, seen = {}, {}
    for corpus_file in files:
        if not public_module(corpus_file.key):
            continue
        try:
            tree = ast.parse(read_text(corpus_file.path))
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            paragraph = first_paragraph(ast.get_docstring(node) or "")
            if not min_chars <= len(paragraph) <= max_chars or node.name in paragraph:
                continue
            answer = f"{module_name(corpus_file.key)}.{node.name}"
            if answer in DEMONSTRATED:
                continue
            seen[paragraph] = seen.get(paragraph, 0) + 1
            candidates[answer] = (paragraph, corpus_file.key)
    unique = [(a, p, f) for a, (p, f) in candidates.items() if seen[p] == 1]
    unique.sort(key=lambda entry: split_hash(f"rag-qa:{entry[0]}"))
    return [{"id": i, "question": QUESTION.format(docstring=p), "docstring": p, "answer": a,
             "aliases": package_aliases(a, f, by_key), "file": f} for i, (a, p, f) in enumerate(unique[:count])]


def package_aliases(answer: str, key: str, by_key: dict) -> list[str]:
    """["package.function"] when `answer` is package.sub...function and the package's __init__.py re-exports it
    (`from .sub import *` or `from .sub import ..., function`); else []."""
    from llmjax.data.corpus import read_text

    parts = answer.split(".")
    package = by_key.get(f"{parts[0]}/__init__.py")
    if len(parts) < 3 or package is None:
        return []
    imports = rf"^from \.{re.escape(parts[1])} import (\*|.*\b{re.escape(parts[-1])}\b)"
    return [f"{parts[0]}.{parts[-1]}"] if re.search(imports, read_text(package.path), re.MULTILINE) else []


def write_questions(path: str | os.PathLike, questions: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    return path


def read_questions(path: str | os.PathLike) -> list[dict]:
    """Questions from JSONL (each line: at least "question" and "answer"); RagError naming the line otherwise."""
    path, questions = Path(path), []
    if not path.is_file():
        raise RagError(f"--questions {path}: no such file")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise RagError(f"--questions {path} line {number}: not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
                or not isinstance(record.get("answer"), str):
            raise RagError(f"--questions {path} line {number}: expected an object with \"question\" and \"answer\"")
        questions.append(record)
    if not questions:
        raise RagError(f"--questions {path}: no questions in it")
    return questions


ANSWER_PREFIX = re.compile(r"^(the\s+)?(answer|function|full name)(\s+is)?\s*[:\-]?\s*", re.IGNORECASE)
DOTTED_NAME = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")  # module.function, a.b.c


def normalize_answer(text: str) -> str:
    """The answer's first dotted name (module.function: "The answer is `textwrap.dedent(text)`." -> "textwrap.dedent",
    "It is textwrap.dedent, I think" too: the prompt asks for the name first), lowercase; with none, the first
    non-blank line without an "Answer:" prefix, Markdown / quotes around it, a call's parentheses ("dedent(text)" ->
    "dedent") or final punctuation."""
    dotted = DOTTED_NAME.search(text)
    if dotted is not None:
        return dotted.group(0).lower()
    line = next((line for line in text.strip().splitlines() if line.strip()), "")
    line = ANSWER_PREFIX.sub("", line.strip())
    line = line.strip().strip("`*\"' ").rstrip(".,;:!").strip("`*\"' ")
    line = re.sub(r"\(.*\)$", "", line).strip()
    return line.lower()


def exact_match(prediction: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    """The normalized prediction (its first dotted name) is the answer, or one of its aliases (names the same
    function goes by)."""
    got = normalize_answer(prediction)
    return got != "" and any(got == normalize_answer(name) for name in (answer, *aliases))


def name_mentioned(prediction: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    """The qualified name (or an alias) appears in the prediction as a whole name (more lenient than exact match)."""
    return any(re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", prediction) is not None
               for name in (answer, *aliases))


def function_mentioned(prediction: str, answer: str) -> bool:
    """The function's own name (the answer's last part) appears in the prediction as a whole identifier: the model
    found the function but maybe not its module (the most lenient score)."""
    name = answer.rsplit(".", 1)[-1]
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", prediction) is not None


def qa_eval(store: RagStore | None, encoder, model, questions: Sequence[dict], *, k: int = 4,
            max_new_tokens: int = 32, batch_size: int = 32, shots: int = len(DEMONSTRATIONS),
            prefill: str = QA_PREFILL, progress: bool = False) -> dict:
    """Greedy answers with retrieval (retrieved by each question's docstring, or its question; each chunk labelled
    with its module) and without, both after the same `shots` demonstrations (`qa_history`, in each condition's
    form) and with the reply prefilled (see the module), through the serving engine (batch_size sequences decoded
    together): the exact-match, name-mentioned and function-mentioned rates of both, every answer (what follows the
    prefill), and one prompt of each condition (for people). RagError when a question is a demonstration."""
    from llmjax.retrieval.rag import rag_generate

    demonstrated = {d.answer for d in DEMONSTRATIONS[:shots]}
    clash = next((q["answer"] for q in questions if q["answer"] in demonstrated), None)
    if clash is not None:
        raise RagError(f"the question about {clash} is one of the few-shot demonstrations: leave it out of "
                       "--questions (or give fewer --shots)")
    records = [dict(q) for q in questions]
    modes = {"without": (None, 0), "with": (store, k)} if store is not None else {"without": (None, 0)}
    prompts = {}
    for mode, (mode_store, mode_k) in modes.items():
        if progress:
            print(f"rag qa: {len(records)} questions {mode} retrieval", flush=True)
        answers = rag_generate(mode_store, encoder, model, [q["question"] for q in records], k=mode_k,
                               max_new_tokens=max_new_tokens,
                               retrieval_queries=[q.get("docstring") or q["question"] for q in records],
                               engine=True, max_running=batch_size, label=module_label,
                               history=qa_history(shots, mode == "with", module_label, prefill), prefill=prefill)
        prompts[mode] = answers[0].prompt.text
        for record, answer in zip(records, answers):
            aliases = record.get("aliases") or ()
            record[f"{mode}_answer"] = answer.answer
            record[f"{mode}_exact"] = exact_match(answer.answer, record["answer"], aliases)
            record[f"{mode}_mentioned"] = name_mentioned(answer.answer, record["answer"], aliases)
            record[f"{mode}_function"] = function_mentioned(answer.answer, record["answer"])
            if mode == "with":
                record["retrieved"] = [r.chunk.key for r in answer.retrieved]
                record["answer_file_retrieved"] = any(r.chunk.file == record.get("file") for r in answer.retrieved)
    summary = {"questions": len(records), "shots": shots, "prefill": prefill}
    for mode in modes:
        summary[f"{mode}_exact_match"] = float(np.mean([r[f"{mode}_exact"] for r in records]))
        summary[f"{mode}_mentioned"] = float(np.mean([r[f"{mode}_mentioned"] for r in records]))
        summary[f"{mode}_function"] = float(np.mean([r[f"{mode}_function"] for r in records]))
    if "with" in modes and all("file" in r for r in records):
        summary["answer_file_retrieved"] = float(np.mean([r["answer_file_retrieved"] for r in records]))
    return {"summary": summary, "records": records, "prompts": prompts}


__all__ = ["DEMONSTRATIONS", "Demonstration", "LossTarget", "QA_PREFILL", "exact_match", "function_mentioned",
           "heldout_documents", "loss_targets", "module_label", "module_name", "name_mentioned", "neighbour_context",
           "normalize_answer", "package_aliases", "qa_eval", "qa_history", "rag_loss_eval", "read_questions",
           "stdlib_questions", "write_questions"]
