"""A docstring -> code retrieval task made from the Python standard library on this machine (no download).

    task = load_code_task()                         # cached under runs/retrieval_task, deterministic
    task.documents[task.test_positives[0]]          # the code whose docstring is task.test_queries[0]
    metrics = rank_metrics(ranked, task.test_positives)   # ranked: [n, K] document indices, best first

Every function, method and class of the library's .py files that has a docstring of at least `min_query_words`
words gives one example: the query is its docstring (dedented with inspect.cleandoc; its first paragraph, or all of
it, cut to `max_query_words` words), the document is its source (decorators and signature kept) with every
docstring inside it removed (ast positions). Test folders (test/, tests/, idle_test/) are left out: their
docstrings describe tests, not code.

Held-out evaluation is by whole modules: a module is a test module when a stable hash of (seed, its path) falls below
`heldout_fraction`, so no code of a test module is seen in training. Distractors are passages that no query asks for:
module docstrings and long comment blocks of the library, cut into passages of at most `distractor_words` words.
Evaluation searches the whole pool (every document of both splits and every distractor) with the test queries.

Cleaning: identical documents are kept once (queries share it); a query text that points to two different documents
is ambiguous and dropped; a test query whose document also occurs in a training module is dropped (it would be seen
in training); a document that a training module also holds is labelled "train" (training code).

`write_synthetic_library` writes a small made-up library to give as root, for quick runs and tests.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmjax.data.corpus import CorpusFile, default_corpus, split_hash, stdlib_folder
from llmjax.retrieval.base import RetrievalError

FORMAT_VERSION = 2  # bump when the examples change: old caches are then ignored
SKIPPED_PARTS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
QUERY_MODES = ("first_paragraph", "full")
METRIC_KS = (1, 10, 100)
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(frozen=True)
class CodeTaskOptions:
    """How the task is made (every field is part of the cache key)."""

    heldout_fraction: float = 0.1
    seed: int = 0
    max_examples: int | None = None   # keep this many examples (a deterministic subset) and as many distractors
    query_mode: str = "first_paragraph"
    min_query_words: int = 4
    max_query_words: int = 64
    max_document_lines: int = 80      # longer definitions (big classes) keep their first lines
    distractor_words: int = 120
    min_distractor_words: int = 20

    def __post_init__(self):
        if not 0 < self.heldout_fraction < 1:
            raise RetrievalError(f"heldout_fraction={self.heldout_fraction}: expected a fraction in (0, 1)")
        if self.max_examples is not None and (not isinstance(self.max_examples, int) or self.max_examples < 2):
            raise RetrievalError(f"max_examples={self.max_examples!r}: expected an integer >= 2, or None for all")
        if self.query_mode not in QUERY_MODES:
            raise RetrievalError(f"query_mode={self.query_mode!r}: expected one of {', '.join(QUERY_MODES)}")
        for name in ("min_query_words", "max_query_words", "max_document_lines", "distractor_words",
                     "min_distractor_words"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RetrievalError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        if self.min_query_words > self.max_query_words:
            raise RetrievalError(f"min_query_words={self.min_query_words} > max_query_words={self.max_query_words}")


@dataclass(frozen=True, eq=False)
class RetrievalTask:
    """Queries, their positive documents, and the pool searched (documents of both splits + distractors)."""

    documents: list[str]          # the pool: code documents, then distractor passages
    doc_keys: list[str]           # "pkg.mod:Qual.name" or "distractor:pkg.mod:n"
    doc_modules: list[str]        # "pkg.mod" of each document
    doc_splits: list[str]         # "train", "test" or "distractor"
    train_queries: list[str]
    test_queries: list[str]
    train_positives: np.ndarray   # int64 [train queries]: index into documents
    test_positives: np.ndarray    # int64 [test queries]
    train_query_keys: list[str]   # "pkg.mod:Qual.name" the query is the docstring of
    test_query_keys: list[str]
    options: CodeTaskOptions = field(default_factory=CodeTaskOptions)
    source: str = ""              # the folder the .py files came from

    def summary(self) -> str:
        distractors = self.doc_splits.count("distractor")
        return (f"{len(self.documents):,} documents ({len(self.documents) - distractors:,} code, {distractors:,} "
                f"distractors); {len(self.train_queries):,} training and {len(self.test_queries):,} held-out queries "
                f"from {len(set(self.doc_modules))} modules")

    def subset(self, max_test_queries: int | None = None) -> RetrievalTask:
        """The same pool with only the first max_test_queries held-out queries (None: all)."""
        if max_test_queries is None or max_test_queries >= len(self.test_queries):
            return self
        n = max_test_queries
        return RetrievalTask(**{**self.__dict__, "test_queries": self.test_queries[:n],
                                "test_positives": self.test_positives[:n], "test_query_keys": self.test_query_keys[:n]})


# --- parsing one module --------------------------------------------------------------------------------------


def module_name(key: str) -> str:
    """"json/decoder.py" -> "json.decoder"; "json/__init__.py" -> "json"."""
    parts = list(Path(key).with_suffix("").parts)
    if parts and parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def clean_query(docstring: str, mode: str = "first_paragraph", max_words: int = 64) -> str:
    """A docstring as a query: dedented (inspect.cleandoc), its first paragraph (mode "first_paragraph") or all of it
    ("full"), whitespace collapsed, cut to max_words words."""
    text = inspect.cleandoc(docstring)
    if mode == "first_paragraph":
        text = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    return " ".join(text.split()[:max_words])


def docstring_lines(node) -> tuple[int, int] | None:
    """(first, last) 1-based lines of the docstring statement of a def / class / module node, or None."""
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0].lineno, body[0].end_lineno
    return None


def definition_source(lines: list[str], node, max_lines: int) -> str | None:
    """The source of a def / class node (decorators and signature kept) without any docstring inside it (its own
    and those of nested definitions), dedented; None when its own docstring shares a line with the signature or
    no code is left besides the signature."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    own = docstring_lines(node)
    if own is None or own[0] == node.lineno:
        return None
    removed = set()
    for inner in ast.walk(node):
        span = docstring_lines(inner) if isinstance(inner, _DEFINITIONS) else None
        if span is not None and span[0] != inner.lineno:
            removed.update(range(span[0], span[1] + 1))
    body_lines = [n for n in range(own[1] + 1, node.end_lineno + 1) if n not in removed and lines[n - 1].strip()]
    code = [s for s in (lines[n - 1].strip() for n in body_lines) if not s.startswith("#")]
    if not code or all(s in ("pass", "...") for s in code):
        return None
    kept = [lines[n - 1] for n in range(first, node.end_lineno + 1) if n not in removed and lines[n - 1].strip()]
    indent = node.col_offset
    kept = [line[indent:] if not line[:indent].strip() else line.lstrip() for line in kept[:max_lines]]
    return "\n".join(kept)


def module_examples(text: str, module: str, options: CodeTaskOptions) -> list[tuple[str, str, str]]:
    """(key "module:Qual.name", query, document) of every def / class of one module's source with a long enough
    docstring and some code."""
    tree = ast.parse(text)
    lines = text.splitlines()
    out = []

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _DEFINITIONS):
                continue
            name = f"{prefix}{child.name}"
            docstring = ast.get_docstring(child, clean=False)
            if docstring:
                query = clean_query(docstring, options.query_mode, options.max_query_words)
                document = definition_source(lines, child, options.max_document_lines)
                if document and len(query.split()) >= options.min_query_words:
                    out.append((f"{module}:{name}", query, document))
            visit(child, f"{name}.")

    visit(tree, "")
    return out


def split_passages(text: str, words_per_passage: int) -> list[str]:
    """Whitespace-collapsed text cut into passages of at most words_per_passage words."""
    words = text.split()
    return [" ".join(words[i:i + words_per_passage]) for i in range(0, len(words), words_per_passage)]


def comment_blocks(lines: list[str]) -> list[str]:
    """The text of each run of consecutive whole-line comments ("# ..."), the "#" marks removed."""
    blocks, current = [], []
    for line in [*lines, ""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            current.append(stripped.lstrip("#").strip())
        elif current:
            blocks.append(" ".join(current))
            current = []
    return blocks


def module_distractors(text: str, options: CodeTaskOptions) -> list[str]:
    """Passages of a module's docstring and of its long comment blocks (at least min_distractor_words words)."""
    tree = ast.parse(text)
    sources = [ast.get_docstring(tree) or ""] + comment_blocks(text.splitlines())
    passages = [p for source in sources for p in split_passages(source, options.distractor_words)]
    return [p for p in passages if len(p.split()) >= options.min_distractor_words]


# --- the task ------------------------------------------------------------------------------------------------


def code_files(root: str | os.PathLike | None) -> list[CorpusFile]:
    """The .py files of `root` (default: the standard library, as the default corpus finds it), test folders left
    out, in a fixed order; keys are paths relative to root."""
    if root is None:
        files = default_corpus()
    else:
        root = Path(root)
        if not root.is_dir():
            raise RetrievalError(f"root={str(root)!r}: not a folder of .py files")
        files = [CorpusFile(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*.py"))]
    files = [f for f in files if not SKIPPED_PARTS.intersection(Path(f.key).parts[:-1])]
    if not files:
        raise RetrievalError(f"no .py files under {root or stdlib_folder()} (test folders left out)")
    return files


def is_heldout(module: str, options: CodeTaskOptions) -> bool:
    return split_hash(f"code_task:{options.seed}:{module}") < options.heldout_fraction


def build_code_task(root: str | os.PathLike | None = None, options: CodeTaskOptions = CodeTaskOptions(), *,
                    progress: bool = False) -> RetrievalTask:
    """Parse every file and assemble the task (no cache: see load_code_task)."""
    files = code_files(root)
    examples, distractors = [], []  # (key, query, document, module); (key, passage, module)
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="parsing", unit="file")
    for corpus_file in iterator:
        module = module_name(corpus_file.key)
        try:
            text = corpus_file.path.read_text(encoding="utf-8")
            found, passages = module_examples(text, module, options), module_distractors(text, options)
        except (SyntaxError, UnicodeDecodeError, ValueError):  # lib2to3 test data and the like: not Python 3
            continue
        examples += [(key, query, document, module) for key, query, document in found]
        distractors += [(f"distractor:{module}:{n}", passage, module) for n, passage in enumerate(passages)]
    if options.max_examples is not None:
        by_hash = sorted(examples, key=lambda e: split_hash(f"code_task:{options.seed}:{e[0]}"))
        keep = {e[0] for e in by_hash[:options.max_examples]}
        examples = [e for e in examples if e[0] in keep]
        by_hash = sorted(distractors, key=lambda d: split_hash(f"code_task:{options.seed}:{d[0]}"))
        keep = {d[0] for d in by_hash[:options.max_examples]}
        distractors = [d for d in distractors if d[0] in keep]
    return assemble_task(examples, distractors, options, str(Path(root) if root is not None else stdlib_folder()))


def assemble_task(examples: list[tuple], distractors: list[tuple], options: CodeTaskOptions,
                  source: str) -> RetrievalTask:
    """The pool and the two query sets from (key, query, document, module) examples and (key, passage, module)
    distractors: identical documents (and passages) kept once, ambiguous queries and leaking test queries dropped."""
    documents, doc_keys, doc_modules, doc_splits, row_of = [], [], [], [], {}
    pairs = []  # (query, row, key, heldout)
    for key, query, document, module in examples:
        heldout = is_heldout(module, options)
        if document not in row_of:
            row_of[document] = len(documents)
            documents.append(document)
            doc_keys.append(key)
            doc_modules.append(module)
            doc_splits.append("test" if heldout else "train")
        pairs.append((query, row_of[document], key, heldout))
    in_training = {row for _, row, _, heldout in pairs if not heldout}
    for row in in_training:  # code that a training module also holds is training code
        doc_splits[row] = "train"
    rows_of_query: dict[str, set] = {}
    for query, row, _, _ in pairs:
        rows_of_query.setdefault(query, set()).add(row)
    seen, split = set(), {True: ([], [], []), False: ([], [], [])}
    for query, row, key, heldout in pairs:
        if len(rows_of_query[query]) > 1 or (query, row) in seen or (heldout and row in in_training):
            continue
        seen.add((query, row))
        queries, positives, keys = split[heldout]
        queries.append(query)
        positives.append(row)
        keys.append(key)
    for key, passage, module in distractors:
        if passage not in row_of:
            row_of[passage] = len(documents)
            documents.append(passage)
            doc_keys.append(key)
            doc_modules.append(module)
            doc_splits.append("distractor")
    (train_q, train_p, train_k), (test_q, test_p, test_k) = split[False], split[True]
    if not train_q or not test_q:
        raise RetrievalError(f"the task has {len(train_q)} training and {len(test_q)} held-out queries: too few "
                             f"examples for heldout_fraction={options.heldout_fraction} (give more files or examples)")
    return RetrievalTask(documents, doc_keys, doc_modules, doc_splits, train_q, test_q,
                         np.asarray(train_p, np.int64), np.asarray(test_p, np.int64), train_k, test_k, options, source)


def cache_key(root, options: CodeTaskOptions) -> str:
    """A short hash of everything the task depends on: the options, the source folder, the Python version."""
    spec = {"format": FORMAT_VERSION, "options": asdict(options), "python": sys.version,
            "root": str(Path(root).resolve()) if root is not None else str(stdlib_folder())}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def save_task(path: str | os.PathLike, task: RetrievalTask) -> Path:
    """The task as one JSON file, written to a temporary name and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT_VERSION, **{k: v for k, v in task.__dict__.items() if k != "options"},
            "options": asdict(task.options)}
    data["train_positives"], data["test_positives"] = task.train_positives.tolist(), task.test_positives.tolist()
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temporary.write_text(json.dumps(data))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def read_task(path: str | os.PathLike) -> RetrievalTask:
    """A task written by save_task (RetrievalError when unreadable or of another format)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise RetrievalError(f"{path}: not a readable retrieval task ({error})") from None
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT_VERSION:
        raise RetrievalError(f"{path}: not a retrieval task of format {FORMAT_VERSION}")
    data["options"] = CodeTaskOptions(**data["options"])
    data["train_positives"] = np.asarray(data["train_positives"], np.int64)
    data["test_positives"] = np.asarray(data["test_positives"], np.int64)
    return RetrievalTask(**data)


def load_code_task(root: str | os.PathLike | None = None, *, heldout_fraction: float = 0.1, seed: int = 0,
                   max_examples: int | None = None, cache_dir: str | os.PathLike | None = "runs/retrieval_task",
                   progress: bool = False, **options) -> RetrievalTask:
    """The docstring -> code task over the .py files under root (default: this Python's standard library).

    heldout_fraction: the share of modules held out for evaluation; seed: which ones. max_examples: a
    deterministic subset of that many examples (and at most as many distractors), for quick runs. options: the
    other CodeTaskOptions fields (query_mode, min_query_words, ...). Cached as JSON under cache_dir (None: no
    cache), keyed by the options, the folder and the Python version: the same task every time."""
    task_options = CodeTaskOptions(heldout_fraction=heldout_fraction, seed=seed, max_examples=max_examples, **options)
    path = None if cache_dir is None else Path(cache_dir) / f"code_task-{cache_key(root, task_options)}.json"
    if path is not None and path.is_file():
        try:
            return read_task(path)
        except RetrievalError:
            pass  # an unreadable cache is rebuilt
    task = build_code_task(root, task_options, progress=progress)
    if path is not None:
        save_task(path, task)
    return task


_VERBS = ("parse", "render", "merge", "split", "count", "encode", "sort", "filter", "load", "store", "check", "join")
_NOUNS = ("header", "widget", "token", "record", "path", "stream", "buffer", "queue", "matrix", "cookie", "label",
          "socket", "cache", "number", "message", "window")


def write_synthetic_library(folder: str | os.PathLike, modules: int = 24, functions: int = 4, seed: int = 0) -> Path:
    """A small made-up library of `modules` .py files (each with a module docstring, a comment block and
    `functions` documented functions whose code uses the words of their docstring), for quick runs and tests of the
    task's pipeline with --root. Deterministic in seed."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for m in range(modules):
        parts = [f'"""Module {m} of the synthetic library: helpers that {rng.choice(_VERBS)} and '
                 f'{rng.choice(_VERBS)} every {rng.choice(_NOUNS)} and {rng.choice(_NOUNS)} the callers hand in, '
                 f'written to exercise retrieval with a few documented functions and some comments."""\n',
                 "\n".join(f"# note {k}: this module keeps each {rng.choice(_NOUNS)} in memory and will "
                           f"{rng.choice(_VERBS)} the {rng.choice(_NOUNS)} before returning it to the caller"
                           for k in range(3))]
        for f in range(functions):
            verb, noun, other = rng.choice(_VERBS), rng.choice(_NOUNS), rng.choice(_NOUNS)
            parts.append(f'\n\ndef {verb}_{noun}_{m}_{f}({noun}, {other}_limit={int(rng.integers(1, 99))}):\n'
                         f'    """{verb.capitalize()} the {noun} using at most {other}_limit items of {other}."""\n'
                         f'    {other}_items = list({noun})[:{other}_limit]\n'
                         f'    return [{verb}_one(item) for item in {other}_items]\n')
        (folder / f"synthetic_{m}.py").write_text("\n".join(parts))
    return folder


# --- evaluation ----------------------------------------------------------------------------------------------


def rank_metrics(ranked: np.ndarray, positives: np.ndarray) -> dict[str, float]:
    """recall@1 / @10 / @100 and MRR of ranked document indices [n, K] (best first; -1 for no document) against
    each query's positive [n]. recall@k: the share of queries whose positive is among their first k (k beyond K:
    among all K given; give K >= 100, or the whole pool); MRR: the mean of 1 / rank of the positive (0 when it is
    not among the K)."""
    ranked, positives = np.asarray(ranked), np.asarray(positives)
    if ranked.ndim != 2 or positives.shape != (ranked.shape[0],) or ranked.shape[1] < 1:
        raise RetrievalError(f"rank_metrics: expected ranked [n, K >= 1] and positives [n], got {ranked.shape} and "
                             f"{positives.shape}")
    if ranked.shape[0] == 0:
        raise RetrievalError("rank_metrics: no queries")
    hits = ranked == positives[:, None]  # [n, K]
    found = hits.any(axis=1)
    rank = np.where(found, hits.argmax(axis=1) + 1, np.inf)  # 1-based
    metrics = {f"recall@{k}": float(np.mean(rank <= k)) for k in METRIC_KS}
    metrics["mrr"] = float(np.mean(np.where(found, 1.0 / rank, 0.0)))
    return metrics


def check_texts(texts, what: str) -> list[str]:
    """texts as a list of non-empty strings, or one RetrievalError naming the first bad one."""
    if isinstance(texts, str):
        raise RetrievalError(f"{what}: expected a list of strings, not one string")
    texts = list(texts)
    if not texts:
        raise RetrievalError(f"{what}: empty list (give at least one text)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RetrievalError(f"{what}[{i}] is a {type(text).__name__}, not a string")
        if not text.strip():
            raise RetrievalError(f"{what}[{i}] is empty (an empty query or document cannot be searched)")
    return texts


def check_k(k: int, pool: int) -> int:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise RetrievalError(f"k={k!r}: expected a positive integer")
    if k > pool:
        raise RetrievalError(f"k={k} is larger than the document pool ({pool} documents)")
    return int(k)


__all__ = ["CodeTaskOptions", "RetrievalTask", "build_code_task", "check_k", "check_texts", "clean_query",
           "load_code_task", "rank_metrics"]
