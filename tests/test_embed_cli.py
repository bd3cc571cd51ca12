"""`python -m experiments embed`: text lines, whole files, JSONL and stdlib windows embedded into shards equal to
`embed_texts`, float16, resuming (complete shards kept, a wrong meta refused), bad input, and `load_embeddings`."""

import json
import os

import numpy as np
import pytest

from llmjax.embed import EmbeddingsError, embed_ids, embed_texts, load_embeddings, shard_path
from llmjax.experiments import embed as embed_cli
from llmjax.io.models import load_model

# one bucket (every text here has at most 16 bytes, the byte tokenizer's tokens): few programs to compile
FLAGS = ["--model", "bert-tiny", "--batch-size", "8", "--max-len", "16"]
LINES = ["the cat sat", "", "def f(x):", "   ", "return x + 1", "naïve café", "a"]


@pytest.fixture(scope="module")
def model():
    return load_model(preset="bert-tiny")  # what --model bert-tiny loads: seed 0, the byte tokenizer


def reference(model, texts):
    return embed_texts(model.params, model.cfg, model.tokenizer, texts, batch_size=8, max_len=16)


def run(*flags) -> int:
    return embed_cli.main([*FLAGS, *map(str, flags)])


def test_lines_of_a_text_file_in_shards_equal_embed_texts(model, tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(LINES) + "\n")
    assert run("--data", data, "--out", tmp_path / "out", "--shard-size", 2) == 0
    assert "2 empty documents skipped" in capsys.readouterr().err
    ids, vectors, meta = load_embeddings(tmp_path / "out")
    kept = [i for i, line in enumerate(LINES) if line.strip()]
    assert ids == [f"docs.txt:{i + 1}" for i in kept]
    assert vectors.dtype == np.float32 and vectors.shape == (5, 48)
    np.testing.assert_allclose(vectors, reference(model, [LINES[i] for i in kept]), atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "embeddings-00000.npy", "embeddings-00001.npy", "embeddings-00002.npy", "ids.jsonl", "meta.json"]
    assert meta | {"data_sha256": None, "source": None} == {
        "format": "llmjax-embeddings/1", "model": "bert-tiny", "dimension": 48, "pooling": "mean", "normalize": True,
        "max_len": 16, "count": 5, "dtype": "float32", "source": None, "documents": "lines", "shard_size": 2,
        "skipped_empty": 2, "data_sha256": None, "seed": 0, "complete": True}


def test_jsonl_files_folder_float16_and_no_normalize(model, tmp_path):
    records = [{"id": "first", "text": "the cat"}, {"text": "no id here"}, {"id": 7, "text": "seven"}]
    (tmp_path / "docs.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n\n")
    assert run("--data", tmp_path / "docs.jsonl", "--out", tmp_path / "a", "--dtype", "float16") == 0
    ids, vectors, meta = load_embeddings(tmp_path / "a")
    assert ids == ["first", "docs.jsonl:2", "7"] and vectors.dtype == np.float16 and meta["dtype"] == "float16"
    expected = reference(model, [r["text"] for r in records])
    np.testing.assert_allclose(vectors.astype(np.float32), expected, atol=2e-3)

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("first\ntwo lines")
    (folder / "sub" / "two.txt").write_text("second file")
    assert run("--data", folder, "--out", tmp_path / "b", "--no-normalize", "--pooling", "cls") == 0
    ids, vectors, meta = load_embeddings(tmp_path / "b")
    assert ids == ["one.txt", "sub/two.txt"] and meta["documents"] == "files" and meta["pooling"] == "cls"
    texts = ["first\ntwo lines", "second file"]
    np.testing.assert_allclose(vectors, embed_texts(model.params, model.cfg, model.tokenizer, texts, batch_size=8,
                                                    max_len=16, pooling="cls", normalize=False), atol=1e-5)


def test_stdlib_windows(model, tmp_path):
    assert run("--out", tmp_path / "s", "--limit", 5) == 0
    ids, vectors, meta = load_embeddings(tmp_path / "s")
    assert len(ids) == 5 and meta["source"] == "stdlib" and meta["documents"] == "windows" and meta["max_len"] == 16
    path, start = ids[1].rsplit("@", 1)
    assert path.endswith(".py") and int(start) == 16  # the byte tokenizer frames nothing: windows of 16 bytes
    from llmjax.data.corpus import read_text, stdlib_folder

    window = model.tokenizer.encode_ordinary(read_text(stdlib_folder() / path))[16:32]
    expected = embed_ids(model.params, model.cfg, [window], batch_size=8, max_len=16)
    np.testing.assert_allclose(vectors[1], expected[0], atol=1e-5)


def test_resume_keeps_complete_shards_and_refuses_another_run(model, tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(f"line {i} " + "x" * i for i in range(7)))  # 7 .. 13 bytes
    out = tmp_path / "out"
    assert run("--data", data, "--out", out, "--shard-size", 3) == 0
    _, first, _ = load_embeddings(out)
    shard_path(out, 1).unlink()  # as if interrupted while writing shard 1
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta | {"complete": False}))
    with pytest.raises(EmbeddingsError, match="unfinished"):
        load_embeddings(out)
    before = os.stat(shard_path(out, 0)).st_mtime_ns
    capsys.readouterr()
    assert run("--data", data, "--out", out, "--shard-size", 3) == 0
    assert "wrote 3 embeddings (4 kept from an earlier run)" in capsys.readouterr().err
    assert os.stat(shard_path(out, 0)).st_mtime_ns == before
    ids, again, _ = load_embeddings(out)
    np.testing.assert_array_equal(again, first)
    assert len(ids) == 7
    for flags, message in (
            (["--shard-size", 4], "made with shard_size=3, this run has shard_size=4"),
            (["--shard-size", 3, "--pooling", "cls"], "made with pooling='mean', this run has pooling='cls'"),
            (["--shard-size", 3, "--dtype", "float16"], "dtype='float32'")):
        assert run("--data", data, "--out", out, *flags) == 2
        assert message in capsys.readouterr().err
    data.write_text(data.read_text() + "\nchanged")
    assert run("--data", data, "--out", out, "--shard-size", 3) == 2
    assert "count=7, this run has count=8" in capsys.readouterr().err


def test_bad_input_gets_one_clear_error(tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("abc\n\nb\n")
    cases = [
        (["--data", data, "--on-empty", "error"], "document 'docs.txt:2' is empty (1 empty documents in all)"),
        (["--data", data, "--on-long", "error", "--max-len", 2], "has 3 tokens, more than --max-len=2"),
        (["--data", tmp_path / "blank.txt"], "no document to embed (2 empty skipped)"),
        (["--data", tmp_path / "bad.jsonl"], 'bad.jsonl:2: expected a JSON object with a "text" string'),
    ]
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    for flags, message in cases:
        assert embed_cli.main([*FLAGS, *map(str, flags), "--out", str(tmp_path / "never")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never" / "embeddings-00000.npy").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert run("--data", data, "--out", tmp_path / "other") == 2
    assert "not empty and holds no meta.json" in capsys.readouterr().err
    for flags, message in ((["--data", tmp_path / "missing.txt"], "missing.txt: no such file or folder"),
                           (["--data", data, "--batch-size", 0], "--batch-size=0: must be a positive integer"),
                           (["--data", data, "--max-len", 1000], "the model reads at most 64 tokens")):
        with pytest.raises(SystemExit) as caught:
            embed_cli.main([*FLAGS, "--out", str(tmp_path / "x"), *map(str, flags)])
        assert caught.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(EmbeddingsError, match="no embeddings here"):
        load_embeddings(tmp_path / "nothing")
