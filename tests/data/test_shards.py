"""Token shards: write / read round trip in both dtypes, atomic writes, and every corrupt input."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llmjax.data.corpus import CorpusError, corpus_documents
from llmjax.data import shards as shards_module
from llmjax.data.shards import TokenShards, TokenShardsError, write_shards
from llmjax.tokenizer.base import ENDOFTEXT
from llmjax.tokenizer.bytes import ByteTokenizer

DOCUMENTS = ["first document\n", "", "second: é 日本", f"third with a literal {ENDOFTEXT} inside", "x" * 40, "last"]


class WideByteTokenizer(ByteTokenizer):
    """Bytes, but claiming 70,000 ids (end-of-text is 69,999): its shards need uint32."""

    kind = "wide_bytes"

    @property
    def vocab_size(self):
        return 70_000

    @property
    def special_tokens(self):
        return {ENDOFTEXT: 69_999}

    def to_json(self):
        return {"type": self.kind}


def expected_stream(tokenizer, documents):
    return np.array([t for d in documents if d for t in tokenizer.encode_ordinary(d) + [tokenizer.eot_id]])


def write(tmp_path, tokenizer=ByteTokenizer(), documents=DOCUMENTS, name="shards", **options):
    options = {"shard_tokens": 16, "progress": False, **options}
    return write_shards(documents, tokenizer, tmp_path / name, **options)


@pytest.mark.parametrize("tokenizer, dtype", [(ByteTokenizer(), np.uint16), (WideByteTokenizer(), np.uint32)])
def test_round_trip_equals_direct_encoding_with_eot_between_documents(tmp_path, tokenizer, dtype):
    report = write(tmp_path, tokenizer)
    shards = TokenShards(tmp_path / "shards", tokenizer)
    stream = expected_stream(tokenizer, DOCUMENTS)
    assert shards.dtype == dtype and report.dtype == np.dtype(dtype).name
    assert shards.total_tokens == report.total_tokens == len(stream)
    assert np.array_equal(shards.tokens(0, len(stream)), stream)
    assert (np.array_equal(shards.tokens(3, 40), stream[3:40]))  # spans shards of 16 tokens
    assert report.num_shards == len(shards.shards) == -(-len(stream) // 16)
    nonempty = [d for d in DOCUMENTS if d]
    assert shards.num_documents == len(nonempty)
    for number, text in enumerate(nonempty):
        assert shards.document(number).tolist() == tokenizer.encode_ordinary(text) + [tokenizer.eot_id]
    assert report.corpus.documents == len(DOCUMENTS) and report.corpus.empty_documents == 1
    entry = shards.index["shards"][0]
    assert entry["file"] == "shard_00000.bin" and entry["bytes"] == 16 * np.dtype(dtype).itemsize and len(entry["sha256"]) == 64
    assert sum(s["documents"] for s in shards.index["shards"]) == shards.num_documents
    assert np.memmap(tmp_path / "shards" / "shard_00001.bin", dtype, mode="r").tolist() == stream[16:32].tolist()


def test_random_ranges_across_shards(tmp_path):
    documents = [f"document {n} " * (n % 7) for n in range(50)]
    write(tmp_path, documents=documents, shard_tokens=37)
    shards = TokenShards(tmp_path / "shards")
    stream = expected_stream(ByteTokenizer(), documents)
    rng = np.random.default_rng(0)
    for _ in range(100):
        start, stop = sorted(rng.integers(0, len(stream) + 1, size=2))
        assert np.array_equal(shards.tokens(start, stop), stream[start:stop])
    with pytest.raises(IndexError, match="outside the"):
        shards.tokens(0, len(stream) + 1)


def test_worker_processes_write_the_same_files(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "TASK_CHARACTERS", 5_000)  # many tasks, finishing out of order
    documents = [f"{n} " * (n * 37 % 500) for n in range(200)]
    write(tmp_path, documents=documents, name="one", shard_tokens=10_000)
    write(tmp_path, documents=documents, name="two", shard_tokens=10_000, workers=2)
    for name in ["index.json", "document_starts.npy", "shard_00000.bin", "shard_00001.bin"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_invalid_utf8_is_counted_in_the_report_and_the_index(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"caf\xe9 au lait \xff")
    (tmp_path / "corpus" / "good.txt").write_text("fine")
    report = write_shards(corpus_documents(tmp_path / "corpus"), ByteTokenizer(), tmp_path / "shards", progress=False)
    assert (report.corpus.invalid_utf8_documents, report.corpus.replaced_sequences) == (1, 2)
    assert "invalid UTF-8 in 1 documents" in report.summary()
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["corpus"]["invalid_utf8_examples"] == [str(tmp_path / "corpus" / "bad.txt")]
    assert ByteTokenizer().decode(TokenShards(tmp_path / "shards").document(0)) == f"caf\ufffd au lait \ufffd{ENDOFTEXT}"


def test_empty_corpus_is_a_clear_error_and_leaves_nothing(tmp_path):
    for documents in ([], ["", ""]):
        with pytest.raises(CorpusError, match="is empty"):
            write(tmp_path, documents=documents)
    assert list(tmp_path.iterdir()) == []


def test_writes_are_atomic(tmp_path):
    write(tmp_path, documents=["old"])
    with pytest.raises(TokenShardsError, match="already exists and is not empty; pass overwrite=True"):
        write(tmp_path, documents=["new"])

    def failing():
        yield "new"
        raise OSError("disk vanished")

    with pytest.raises(OSError, match="disk vanished"):
        write(tmp_path, documents=failing(), overwrite=True)
    assert ByteTokenizer().decode(TokenShards(tmp_path / "shards").tokens(0, 4)) == f"old{ENDOFTEXT}"
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]  # no partial folder left behind
    write(tmp_path, documents=["new"], overwrite=True)
    assert TokenShards(tmp_path / "shards").tokens(0, 3).tolist() == list(b"new")


def test_index_that_does_not_match_the_files(tmp_path):
    write(tmp_path)
    index_path = tmp_path / "shards" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][1]["tokens"] += 1
    index["total_tokens"] += 1
    index_path.write_text(json.dumps(index))
    with pytest.raises(TokenShardsError, match=r"shard_00001\.bin is truncated: 32 bytes on disk, but index.json gives it "
                                               r"17 uint16 tokens = 34 bytes"):
        TokenShards(tmp_path / "shards")


def test_truncated_shard(tmp_path):
    write(tmp_path)
    shard = tmp_path / "shards" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(TokenShardsError, match=r"shard_00000\.bin is truncated: 29 bytes on disk.* = 32 bytes"):
        TokenShards(tmp_path / "shards")
    shard.unlink()
    with pytest.raises(TokenShardsError, match=r"shard_00000\.bin is missing"):
        TokenShards(tmp_path / "shards")


def test_corrupt_shard_caught_by_checksum(tmp_path):
    write(tmp_path)
    shard = tmp_path / "shards" / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    TokenShards(tmp_path / "shards")  # same size: only the checksum can tell
    with pytest.raises(TokenShardsError, match="does not match the sha256"):
        TokenShards(tmp_path / "shards", verify_checksums=True)


def test_tokenizer_other_than_the_one_that_made_the_shards(tmp_path):
    write(tmp_path, tokenizer_source="runs/tokenizers/bytes.json")
    made_with, other = ByteTokenizer().fingerprint(), WideByteTokenizer().fingerprint()
    with pytest.raises(TokenShardsError) as error:
        TokenShards(tmp_path / "shards", WideByteTokenizer())
    message = str(error.value)
    assert f"made with a bytes tokenizer (vocab 257, fingerprint {made_with[:16]}, from runs/tokenizers/bytes.json)" in message
    assert f"not with the given wide_bytes tokenizer (vocab 70,000, fingerprint {other[:16]})" in message
    assert TokenShards(tmp_path / "shards").tokenizer_info["fingerprint"] == made_with


def test_not_a_shards_folder(tmp_path):
    with pytest.raises(TokenShardsError, match="has no index.json"):
        TokenShards(tmp_path)
    (tmp_path / "index.json").write_text("{broken")
    with pytest.raises(TokenShardsError, match="is not valid JSON"):
        TokenShards(tmp_path)


def test_tokenizer_without_end_of_text(tmp_path):
    class NoEndOfText(ByteTokenizer):
        @property
        def special_tokens(self):
            return {}

    with pytest.raises(TokenShardsError, match="no end-of-text token"):
        write(tmp_path, NoEndOfText())


@settings(max_examples=60, deadline=None)
@given(documents=st.lists(st.text(max_size=30), min_size=1, max_size=12), shard_tokens=st.integers(1, 50))
def test_any_documents_any_shard_size_round_trip(documents, shard_tokens):
    assume(any(documents))
    with tempfile.TemporaryDirectory() as directory:
        write_shards(documents, ByteTokenizer(), Path(directory) / "shards", shard_tokens=shard_tokens, progress=False)
        shards = TokenShards(Path(directory) / "shards", ByteTokenizer())
        assert np.array_equal(shards.tokens(0, shards.total_tokens), expected_stream(ByteTokenizer(), documents))
        assert [ByteTokenizer().decode(shards.document(n)[:-1]) for n in range(shards.num_documents)] == [d for d in documents if d]
