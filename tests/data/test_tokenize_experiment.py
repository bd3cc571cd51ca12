"""`python -m experiments tokenize`: every tokenizer form, both splits, and its errors."""

import json

import numpy as np
import pytest

from llmjax.experiments import tokenize
from llmjax.data.shards import TokenShards
from llmjax.tokenizer.bytes import ByteTokenizer
from llmjax.tokenizer.sentencepiece import train_sentencepiece


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for n in range(6):
        (folder / f"file{n}.txt").write_text(f"file {n} says hello\n" * (n + 1))
    return folder


def run(*argv):
    return tokenize.main([*map(str, argv), "--workers", "1", "--no-progress"])


def test_bytes_on_a_folder_writes_both_splits(corpus, tmp_path, capsys):
    assert run("--tokenizer", "bytes", "--corpus", corpus, "--out", tmp_path / "out") == 0
    printed = capsys.readouterr().out
    train, validation = TokenShards(tmp_path / "out" / "train", ByteTokenizer()), TokenShards(tmp_path / "out" / "validation")
    assert train.num_documents + validation.num_documents == 6 and validation.num_documents >= 1
    assert f"total: {train.total_tokens + validation.total_tokens:,} tokens" in printed
    assert "tokens/s" in printed and "MB/s" in printed and str(tmp_path / "out") in printed


def test_default_corpus_validation_split_with_bytes(tmp_path, capsys):
    assert run("--split", "validation", "--out", tmp_path / "out") == 0
    shards = TokenShards(tmp_path / "out" / "validation", ByteTokenizer())
    assert shards.total_tokens > 10_000
    assert "the standard library's .py files" in capsys.readouterr().out
    assert not (tmp_path / "out" / "train").exists()


def test_sentencepiece_model_and_our_json(corpus, tmp_path):
    tokenizer = train_sentencepiece([p.read_text() for p in sorted(corpus.iterdir())] * 20, 280, num_threads=1)
    tokenizer.save_model(tmp_path / "spm.model")
    tokenizer.save(tmp_path / "spm.json")
    ByteTokenizer().save(tmp_path / "bytes.json")
    for spec, loaded in [("spm.model", tokenizer), ("spm.json", tokenizer), ("bytes.json", ByteTokenizer())]:
        out = tmp_path / ("out-" + spec)
        assert run("--tokenizer", tmp_path / spec, "--corpus", corpus, "--out", out, "--split", "train") == 0
        shards = TokenShards(out / "train", loaded)
        assert shards.tokenizer_info["source"] == str(tmp_path / spec)
        first = shards.document(0)
        assert loaded.decode(first[:-1]) in {p.read_text() for p in corpus.iterdir()}
    assert tokenize.tokenizer_name(str(tmp_path / "spm.model")) == "spm"
    assert tokenize.tokenizer_name("bytes") == "bytes"


def test_large_shards_and_uint16(corpus, tmp_path):
    assert run("--corpus", corpus, "--out", tmp_path / "out", "--split", "train", "--shard-tokens", "50") == 0
    shards = TokenShards(tmp_path / "out" / "train")
    assert len(shards.shards) == -(-shards.total_tokens // 50) and shards.dtype == np.uint16


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (None, ["--tokenizer", "missing.model"], "tokenizer missing.model does not exist"),
        ("unknown.json", ["--tokenizer", "{tmp}/unknown.json"], "unknown tokenizer type 'mystery'"),
        (None, ["--corpus", "{tmp}/nothing/*.txt"], "matches no files"),
        ("bad.jsonl", ["--corpus", "{tmp}/bad.jsonl"], r"bad.jsonl line 1: not valid JSON"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, capsys, setup, argv, message):
    if setup == "unknown.json":
        (tmp_path / setup).write_text(json.dumps({"type": "mystery"}))
    if setup == "bad.jsonl":
        (tmp_path / setup).write_text("{oops\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert run(*argv, "--out", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert error.startswith("python -m experiments tokenize: error: ") and error.count("\n") == 1
    assert __import__("re").search(message, error)


def test_existing_output_needs_overwrite(corpus, tmp_path, capsys):
    assert run("--corpus", corpus, "--out", tmp_path / "out") == 0
    assert run("--corpus", corpus, "--out", tmp_path / "out") == 1
    assert "pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert run("--corpus", corpus, "--out", tmp_path / "out", "--overwrite") == 0


def test_byte_bpe_json_and_gpt2_folder_in_worker_processes(corpus, tmp_path):
    """Our BPE, as saved JSON and as GPT-2 files, pickled to 2 encoding workers: same ids as direct encoding."""
    bpe_train = pytest.importorskip("llmjax.tokenizer.bpe_train")
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    tokenizer = bpe_train.train_bpe(texts * 5, 270, num_workers=1, progress=False)
    tokenizer.save(tmp_path / "bpe.json")
    tokenizer.save_gpt2_files(tmp_path / "gpt2")
    for spec in ("bpe.json", "gpt2"):
        out = tmp_path / ("out-" + spec)
        assert tokenize.main(["--tokenizer", str(tmp_path / spec), "--corpus", str(corpus), "--out", str(out),
                              "--split", "train", "--workers", "2", "--no-progress"]) == 0
        shards = TokenShards(out / "train")
        documents = [shards.document(n)[:-1].tolist() for n in range(shards.num_documents)]
        assert all(ids in [tokenizer.encode_ordinary(t) for t in texts] for ids in documents)
