"""The docstring -> code task (parsing, held-out modules, distractors, dedup, cache), rank_metrics and BM25."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llmjax.data.corpus import stdlib_folder
from llmjax.retrieval.base import RetrievalError
from llmjax.retrieval.bm25 import BM25Index, bm25_reference, bm25s_available, code_tokens
from llmjax.retrieval.code_task import (
    CodeTaskOptions,
    check_k,
    check_texts,
    is_heldout,
    load_code_task,
    module_examples,
    rank_metrics,
)

MODULE = '''
"""A module about parsing widgets. It explains what widgets are and how the parser reads them from text files,
one widget per line, with fields separated by commas and comments starting with hash marks."""

import functools


@functools.lru_cache
def parse_widget(line, strict=False):
    """Parse one widget from a line of text.

    The second paragraph is not part of the query.
    """
    fields = line.split(",")
    return fields


def one_liner(x): "Docstring on the signature line is skipped."; return x


def only_a_docstring(self):
    """This function has no code besides its docstring."""
    pass


def short(x):
    """Too short."""
    return x


class WidgetStore:
    """Keep widgets in memory by their name."""

    def add(self, widget):
        """Store one widget under its name and return it."""
        # a long comment inside code stays part of the code
        self.items[widget.name] = widget
        return widget
'''


def _write_modules(root: Path, count: int = 12) -> None:
    root.mkdir()
    for i in range(count):
        body = "\n".join(
            f'def function_{i}_{j}(value):\n    """Compute the {["sum", "product", "mean"][j]} of value for '
            f'module {i} item {j}."""\n    return value * {i} + {j}\n' for j in range(3))
        comment = "\n".join(f"# comment line {k} of module {i} that explains at some length what the following "
                            f"code does" for k in range(3))
        (root / f"mod{i}.py").write_text(f'"""Module {i}."""\n{comment}\n{body}')
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text(MODULE)
    (root / "pkg" / "copy.py").write_text(MODULE.replace("Parse one widget", "Read one widget"))  # same code
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text('def test_it():\n    """A test docstring of many words."""\n    x = 1\n')
    (root / "broken.py").write_text("def broken(:\n")  # not Python: skipped


def test_module_examples_keep_the_signature_and_drop_every_docstring():
    found = {key: (query, document) for key, query, document in module_examples(MODULE, "pkg", CodeTaskOptions())}
    assert sorted(found) == ["pkg:WidgetStore", "pkg:WidgetStore.add", "pkg:parse_widget"]
    query, document = found["pkg:parse_widget"]
    assert query == "Parse one widget from a line of text."
    assert document == '@functools.lru_cache\ndef parse_widget(line, strict=False):\n    fields = line.split(",")\n' \
                       "    return fields"
    query, document = found["pkg:WidgetStore"]
    assert query == "Keep widgets in memory by their name."
    assert document.startswith("class WidgetStore:\n    def add(self, widget):\n        # a long comment")
    assert '"""' not in document and "Store one widget" not in document
    assert found["pkg:WidgetStore.add"][1].startswith("def add(self, widget):\n    # a long comment")
    full = module_examples(MODULE, "pkg", CodeTaskOptions(query_mode="full", max_query_words=10))
    assert dict((k, q) for k, q, _ in full)["pkg:parse_widget"] == "Parse one widget from a line of text. The second"


def test_module_examples_of_a_real_standard_library_module():
    text = (stdlib_folder() / "json" / "__init__.py").read_text()
    found = {key: (query, document) for key, query, document in module_examples(text, "json", CodeTaskOptions())}
    query, document = found["json:dumps"]
    assert query.startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert document.startswith("def dumps(obj, *, skipkeys=False") and "Serialize" not in document
    compile(textwrap.dedent(document), "dumps", "exec")  # still valid Python


def test_task_split_by_whole_modules_with_distractors_dedup_and_cache(tmp_path):
    _write_modules(tmp_path / "src")
    options = dict(heldout_fraction=0.3, seed=1, cache_dir=tmp_path / "cache")
    task = load_code_task(tmp_path / "src", **options)
    modules = {key.split(":")[0] for key in task.train_query_keys + task.test_query_keys}
    assert "test.test_x" not in modules and "broken" not in modules and "pkg" in modules
    resolved = CodeTaskOptions(heldout_fraction=0.3, seed=1)
    assert all(is_heldout(key.split(":")[0], resolved) for key in task.test_query_keys)
    assert not any(is_heldout(key.split(":")[0], resolved) for key in task.train_query_keys)
    assert task.test_queries and task.train_queries
    for queries, positives, keys in ((task.train_queries, task.train_positives, task.train_query_keys),
                                     (task.test_queries, task.test_positives, task.test_query_keys)):
        for query, row, key in zip(queries, positives, keys):
            assert task.doc_splits[row] in ("train", "test") and query.split()[0] in ("Compute", "Keep", "Store",
                                                                                     "Parse", "Read")
            assert task.doc_modules[row] == key.split(":")[0] or task.documents.count(task.documents[row]) == 1
    assert len(set(task.documents)) == len(task.documents)  # pkg/copy.py's identical code is one document
    widget_row = task.doc_keys.index("pkg:parse_widget")
    assert "pkg.copy:parse_widget" not in task.doc_keys
    both = [q for q, r in zip(task.train_queries + task.test_queries,
                              np.concatenate([task.train_positives, task.test_positives])) if r == widget_row]
    assert sorted(both) == ["Parse one widget from a line of text.", "Read one widget from a line of text."] or \
        all(is_heldout(m, resolved) for m in ("pkg", "pkg.copy"))
    # "Keep widgets in memory" names the same document in both modules: kept once, not ambiguous
    distractors = [k for k, s in zip(task.doc_keys, task.doc_splits) if s == "distractor"]
    assert "distractor:pkg:0" in distractors and "distractor:mod3:0" in distractors  # module docstring, comments
    assert not any(k.startswith("distractor:mod3:1") for k in distractors)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    again = load_code_task(tmp_path / "src", **options)
    assert again.documents == task.documents and again.test_queries == task.test_queries
    np.testing.assert_array_equal(again.test_positives, task.test_positives)
    other = load_code_task(tmp_path / "src", **{**options, "seed": 2})
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2 and other.test_query_keys != task.test_query_keys
    small = load_code_task(tmp_path / "src", **{**options, "max_examples": 20})
    assert len(small.train_queries) + len(small.test_queries) <= 20


def test_ambiguous_queries_and_leaking_test_queries_are_dropped(tmp_path):
    from llmjax.retrieval.code_task import assemble_task

    options = CodeTaskOptions(heldout_fraction=0.5)
    modules = ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7"]
    train = [m for m in modules if not is_heldout(m, options)][:2]
    test = [m for m in modules if is_heldout(m, options)][:2]
    examples = [(f"{test[0]}:h", "Copy of training code.", "def f():\n    return 1", test[0]),   # leaks
                (f"{train[0]}:f", "Return the value of it.", "def f():\n    return 1", train[0]),
                (f"{train[1]}:g", "Return the value of it.", "def g():\n    return 2", train[1]),  # ambiguous
                (f"{test[1]}:k", "A held-out function here.", "def k():\n    return 3", test[1]),
                (f"{train[1]}:n", "A training function here.", "def n():\n    return 4", train[1])]
    task = assemble_task(examples, [("distractor:x:0", "some passage", "x")], options, "here")
    assert task.train_queries == ["A training function here."] and task.test_queries == ["A held-out function here."]
    assert task.documents[task.test_positives[0]] == "def k():\n    return 3"
    assert task.doc_splits == ["train", "train", "test", "train", "distractor"]  # f's code is training code


def _rank_metrics_loop(ranked, positives):
    out = {"recall@1": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr": 0.0}
    for row, positive in zip(ranked.tolist(), positives.tolist()):
        rank = row.index(positive) + 1 if positive in row else None
        for k in (1, 10, 100):
            out[f"recall@{k}"] += rank is not None and rank <= k
        out["mrr"] += 1 / rank if rank else 0
    return {k: v / len(positives) for k, v in out.items()}


def test_rank_metrics_match_a_plain_loop():
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(300)[:150] for _ in range(64)])
    positives = np.where(rng.random(64) < 0.7, ranked[np.arange(64), rng.integers(0, 150, 64)], 299)
    got, want = rank_metrics(ranked, positives), _rank_metrics_loop(ranked, positives)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    assert rank_metrics(np.array([[3, 1, 2]]), np.array([3])) == {"recall@1": 1.0, "recall@10": 1.0,
                                                                  "recall@100": 1.0, "mrr": 1.0}
    with pytest.raises(RetrievalError, match="ranked"):
        rank_metrics(ranked[:, 0], positives)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(RetrievalError, match=r"queries\[1\] is empty"):
        check_texts(["fine", "  "], "queries")
    with pytest.raises(RetrievalError, match="larger than the document pool"):
        check_k(11, 10)
    with pytest.raises(RetrievalError, match="heldout_fraction"):
        load_code_task(tmp_path, heldout_fraction=1.5, cache_dir=None)
    with pytest.raises(RetrievalError, match="not a folder"):
        load_code_task(tmp_path / "missing", cache_dir=None)
    index = BM25Index(["def add(a, b): return a + b", "class Stack: pass"], backend="numpy")
    with pytest.raises(RetrievalError, match="larger than the document pool"):
        index.search(["add numbers"], k=3)
    with pytest.raises(RetrievalError, match="empty"):
        index.search([""], k=1)
    with pytest.raises(RetrievalError, match=r"documents\[0\] is empty"):
        BM25Index([""], backend="numpy")


def test_code_tokens_split_identifiers():
    assert code_tokens("def parseHTTPHeader_value(self, x): return the URL") == [
        "def", "parse", "http", "header", "value", "parsehttpheader_value", "self", "return", "url"]


def _corpus():
    rng = np.random.default_rng(1)
    words = ["widget", "parse", "value", "stack", "queue", "push", "pop", "read", "write", "file", "json", "dump"]
    return [" ".join(rng.choice(words, size=rng.integers(3, 30))) + " parseValue" * (i % 3) for i in range(60)]


def test_bm25_numpy_matches_the_textbook_formula():
    documents = _corpus()
    index = BM25Index(documents, backend="numpy", k1=1.2, b=0.6)
    for query in ["parse the widget value", "stack push pop pop", "json dump file nothing", "unknownword"]:
        np.testing.assert_allclose(index.scores(query), bm25_reference(documents, query, k1=1.2, b=0.6), rtol=1e-12)
    scores, rows = index.search(["parse the widget value"], k=5)
    want = bm25_reference(documents, "parse the widget value", k1=1.2, b=0.6)
    np.testing.assert_allclose(scores[0], np.sort(want)[::-1][:5], rtol=1e-6)
    np.testing.assert_allclose(want[rows[0]], scores[0], rtol=1e-6)


@pytest.mark.skipif(not bm25s_available(), reason="bm25s (the bench extra) is not installed; the NumPy backend it "
                                                   "is checked against is tested above")
def test_bm25s_backend_matches_numpy():
    documents = _corpus()
    fast, plain = BM25Index(documents, backend="bm25s"), BM25Index(documents, backend="numpy")
    queries = ["parse the widget value", "stack push pop pop", "json dump file nothing", "unknownword"]
    for query in queries:
        np.testing.assert_allclose(fast.scores(query), plain.scores(query), rtol=1e-5, atol=1e-7)
    (fast_scores, _), (plain_scores, _) = fast.search(queries, k=10), plain.search(queries, k=10)
    np.testing.assert_allclose(fast_scores, plain_scores, rtol=1e-5, atol=1e-7)
    json.dumps(rank_metrics(fast.search(queries, k=10)[1], np.arange(4)))
