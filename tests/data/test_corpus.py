"""Corpora: files, folders, globs, JSONL, Parquet, the default corpus and its split; bad input."""

import gzip
import json
import sys

import pytest

from llmjax.data.corpus import (
    CorpusError,
    CorpusFile,
    CorpusStats,
    corpus_documents,
    decode_utf8,
    default_corpus,
    default_corpus_files,
    default_corpus_split,
    read_text,
    resolve_corpus,
    split_files,
    split_of,
    utf8_size,
)


def texts(documents):
    return [d.text for d in documents]


def test_invalid_utf8_is_replaced_and_counted_exactly():
    assert decode_utf8("fine é".encode()) == ("fine é", 0)
    assert decode_utf8(b"a\xffb\xfe") == ("a\ufffdb\ufffd", 2)
    genuine = "\ufffd".encode()
    assert decode_utf8(genuine + b"\xe2" + genuine) == ("\ufffd\ufffd\ufffd", 1)  # U+FFFD in the input is not counted


def test_files_folders_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("one")
    (tmp_path / "a" / "two.md").write_text("two")
    (tmp_path / "a" / ".hidden").write_text("hidden")
    (tmp_path / "a" / "__pycache__").mkdir()
    (tmp_path / "a" / "__pycache__" / "x.pyc").write_bytes(b"\x00")
    (tmp_path / "b.txt").write_text("bee")
    with gzip.open(tmp_path / "c.txt.gz", "wt") as file:
        file.write("sea")
    assert texts(corpus_documents(tmp_path / "a")) == ["one", "two"]
    mixed = [str(tmp_path / "*.txt"), tmp_path / "a" / "one.txt", tmp_path / "c.txt.gz"]
    assert texts(corpus_documents(mixed)) == ["bee", "one", "sea"]
    assert texts(corpus_documents(str(tmp_path / "**" / "*.txt"))) == ["one", "bee"]
    keys = [f.key for f in resolve_corpus(tmp_path)]
    assert keys == ["a/one.txt", "a/two.md", "b.txt", "c.txt.gz"]  # relative to the folder: the split is location-free


def test_empty_or_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="holds no files"):
        corpus_documents(tmp_path)
    with pytest.raises(CorpusError, match="matches no files"):
        corpus_documents(str(tmp_path / "*.txt"))
    with pytest.raises(CorpusError, match="not a file, a folder or a glob pattern"):
        corpus_documents(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="is empty"):
        corpus_documents([])


def test_jsonl_documents_with_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "first"}), "", json.dumps({"body": "x", "text": "second é"}), '{"text": "bad \\ud800 escape"}']
    path.write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "bad \xff byte"}\n')
    documents = list(corpus_documents(path))
    assert texts(documents) == ["first", "second é", "bad \ufffd escape", "bad \ufffd byte"]
    assert [d.replaced for d in documents] == [0, 0, 1, 1]
    assert documents[1].source == f"{path} line 3" and documents[1].key == "docs.jsonl:3"
    other = tmp_path / "other.jsonl.gz"
    with gzip.open(other, "wt") as file:
        file.write(json.dumps({"content": "zipped"}) + "\n")
    assert texts(corpus_documents(other, text_field="content")) == ["zipped"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl line 2: not valid JSON"),
        ('{"body": "no text"}', r"bad\.jsonl line 2: no 'text' field \(its keys are \['body'\]\)"),
        ('["a list"]', r"bad\.jsonl line 2: no 'text' field \(it is a JSON list\)"),
        ('{"text": 3}', r"bad\.jsonl line 2: field 'text' holds a int, not text"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    documents = corpus_documents(path)
    assert next(documents).text == "ok"
    with pytest.raises(CorpusError, match=message):
        next(documents)


def test_parquet_documents(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "docs.parquet"
    parquet.write_table(pyarrow.table({"text": ["alpha", None, "gamma"], "id": [1, 2, 3]}), path)
    documents = list(corpus_documents(path))
    assert texts(documents) == ["alpha", "", "gamma"]
    assert documents[2].source == f"{path} row 3"
    with pytest.raises(CorpusError, match=r"no column 'body' \(its columns are \['text', 'id'\]\)"):
        list(corpus_documents(path, text_field="body"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        list(corpus_documents(tmp_path / "fake.parquet"))


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(CorpusError, match="needs the pyarrow package: pip install pyarrow"):
        list(corpus_documents(tmp_path / "docs.parquet"))


def test_default_corpus_split_is_stable_disjoint_and_about_one_percent():
    train, validation = default_corpus_split("train"), default_corpus_split("validation")
    everything = default_corpus_files()
    assert sorted(train + validation) == everything and not set(train) & set(validation)
    assert validation and train
    assert len(validation) <= max(1, 0.03 * len(everything))
    assert default_corpus_split("validation") == validation
    by_hash = {f.key for f in default_corpus() if split_of(f.key) == "validation"}  # keys: paths relative to the stdlib
    assert {f.key for f in default_corpus() if f.path in set(validation)} == by_hash or (not by_hash and len(validation) == 1)
    with pytest.raises(CorpusError, match="split must be one of"):
        default_corpus_split("test")


def test_default_corpus_reads_a_carried_copy_of_a_standard_library(tmp_path):
    (tmp_path / "json").mkdir()
    for name in ("json/decoder.py", "abc.py", "site-packages/ignored.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    assert [f.key for f in default_corpus(tmp_path)] == ["abc.py", "json/decoder.py"]
    with pytest.raises(CorpusError, match="no .py files under the standard library folder"):
        default_corpus(tmp_path / "json" / "empty")


def test_every_split_gets_a_file_and_records_split_by_record(tmp_path):
    files = [CorpusFile(tmp_path / f"{n}.txt", f"{n}.txt") for n in range(2)]
    assert len(split_files(files, "train")) == len(split_files(files, "validation")) == 1
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": str(n)}) + "\n" for n in range(300)))
    train = texts(corpus_documents(path, split="train", validation_fraction=0.1))
    validation = texts(corpus_documents(path, split="validation", validation_fraction=0.1))
    assert sorted(train + validation, key=int) == [str(n) for n in range(300)]
    assert 10 <= len(validation) <= 50


def test_stats_report_invalid_utf8(tmp_path):
    (tmp_path / "good.txt").write_text("good")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 \xff")
    (tmp_path / "empty.txt").write_text("")
    stats = CorpusStats()
    for document in corpus_documents(tmp_path):
        stats.add(document, utf8_size(document.text))
    assert (stats.documents, stats.empty_documents, stats.invalid_utf8_documents, stats.replaced_sequences) == (3, 1, 1, 2)
    assert "invalid UTF-8 in 1 documents (2 byte sequences replaced by U+FFFD), e.g. " in stats.summary()
    assert str(tmp_path / "bad.txt") in stats.summary()
    assert read_text(tmp_path / "bad.txt") == "caf\ufffd \ufffd"
