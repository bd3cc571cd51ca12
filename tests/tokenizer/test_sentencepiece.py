"""SentencePiece behind the Tokenizer interface: training (BPE and unigram), exact round trips,
special tokens, byte fallback, save / load / fingerprint, and models trained elsewhere."""

import io
import json
import pickle
import random
import sysconfig
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from llmjax.tokenizer.base import ENDOFTEXT, TokenizerError
from llmjax.tokenizer.sentencepiece import SentencePieceTokenizer, train_sentencepiece, training_sentences

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = [(STDLIB / name).read_text() for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "bisect.py")]
AWKWARD = ["", " ", "  leading and trailing  ", "tab\tnew\nline\r\n", "\x00nul", "▁literal space mark ▁▁",
           "日本語 😀 é", f"a{ENDOFTEXT}b", "<|endoftext", "x" * 5000]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request):
    return train_sentencepiece(CORPUS, 500, model_type=request.param, num_threads=2)


@pytest.fixture(scope="module")
def external():
    """A model trained with SentencePiece's defaults (dummy prefix, NFKC, <s> / </s>), like LLaMA's."""
    model = io.BytesIO()
    lines = [line for text in CORPUS for line in text.splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                             user_defined_symbols=["<sep>"], byte_fallback=True, minloglevel=2)
    return SentencePieceTokenizer(model.getvalue())


def test_training_gives_the_requested_vocabulary_with_specials_and_bytes(trained):
    assert trained.vocab_size == 500
    assert trained.special_tokens == {ENDOFTEXT: 1}
    assert trained.eot_id == 1
    assert trained.processor.is_byte(2) and trained.processor.id_to_piece(2) == "<0x00>"
    assert len(trained.encode("def return self")) < len("def return self")  # it learned something


@pytest.mark.parametrize("text", AWKWARD)
def test_awkward_text_round_trips_exactly(trained, text):
    assert trained.decode(trained.encode_ordinary(text)) == text
    assert trained.decode(trained.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"])))
def test_any_text_round_trips(trained, text):
    assert trained.decode(trained.encode_ordinary(text)) == text


def test_special_tokens_only_where_allowed(trained):
    ids = trained.encode(f"a{ENDOFTEXT}b")
    assert ids.count(1) == 1
    assert 1 not in trained.encode_ordinary(f"a{ENDOFTEXT}b")  # text cannot forge a document boundary
    assert 1 not in trained.encode(f"a{ENDOFTEXT}b", allowed_special="none")


def test_byte_fallback_decodes_to_real_bytes(trained):
    ids = trained.encode_ordinary("😀")
    assert [trained.processor.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert trained.decode_bytes(ids[:2]) == "😀".encode()[:2]
    assert trained.decode(ids[:2] + trained.encode_ordinary("a")) == "\ufffda"


def test_decode_agrees_with_sentencepiece_on_ordinary_pieces(trained, external):
    rng = random.Random(0)
    for tokenizer in (trained, external):
        ordinary = [i for i in range(tokenizer.vocab_size) if i not in tokenizer.special_tokens.values()
                    and not tokenizer.processor.is_byte(i) and not tokenizer.processor.is_unknown(i)]
        for _ in range(200):
            ids = rng.choices(ordinary, k=rng.randint(1, 8))
            assert tokenizer.decode(ids) == tokenizer.processor.decode(ids), [tokenizer.processor.id_to_piece(i) for i in ids]


def test_model_trained_elsewhere(external):
    assert external.special_tokens == {"<s>": 1, "</s>": 2, "<sep>": 3}
    assert external.eot_id == 2  # no <|endoftext|>: documents are separated by </s>
    text = "return the value"
    assert external.decode(external.encode_ordinary(text)) == text
    assert external.encode_ordinary(text) == external.processor.encode(text)


def test_save_load_fingerprint_and_pickle(trained, tmp_path):
    trained.save(tmp_path / "spm.json")
    from_json = SentencePieceTokenizer.load(tmp_path / "spm.json")
    trained.save_model(tmp_path / "spm.model")
    from_model = SentencePieceTokenizer.load(tmp_path / "spm.model")
    pickled = pickle.loads(pickle.dumps(trained))
    assert from_json.fingerprint() == from_model.fingerprint() == pickled.fingerprint() == trained.fingerprint()
    assert from_model.encode("def f(): pass") == trained.encode("def f(): pass")
    assert sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model")).vocab_size() == 500
    other = train_sentencepiece(CORPUS, 501, num_threads=2)
    assert other.fingerprint() != trained.fingerprint()
    assert json.loads((tmp_path / "spm.json").read_text())["type"] == "sentencepiece"


def test_training_sentences_are_cut_at_line_ends_within_the_limit():
    sentences = list(training_sentences(["ab\ncd\n" * 3, "é" * 10], max_bytes=7))
    assert "".join(sentences) == "ab\ncd\n" * 3 + "é" * 10
    assert all(len(s.encode()) <= 7 for s in sentences)
    assert sentences[0] == "ab\ncd\n"


def test_bad_requests_are_clear_errors():
    with pytest.raises(TokenizerError, match="use at least 259"):
        train_sentencepiece(CORPUS, 258)
    with pytest.raises(TokenizerError, match="model_type must be one of"):
        train_sentencepiece(CORPUS, 500, model_type="word")
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_sentencepiece([], 500)
    with pytest.raises(TokenizerError, match="Vocabulary size too high"):
        train_sentencepiece(["tiny corpus"], 5000)
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        SentencePieceTokenizer(b"\xff\xff not a model")
    with pytest.raises(TokenizerError, match="outside this SentencePiece vocabulary"):
        train_sentencepiece(CORPUS, 500, num_threads=2).decode([500])


def test_an_error_in_the_corpus_is_raised_as_itself():
    def corpus():
        yield CORPUS[0]
        raise FileNotFoundError("shard 3 vanished")

    with pytest.raises(FileNotFoundError, match="shard 3 vanished"):
        train_sentencepiece(corpus(), 500)


def test_training_is_deterministic():
    assert train_sentencepiece(CORPUS, 500, num_threads=2).fingerprint() == train_sentencepiece(CORPUS, 500, num_threads=2).fingerprint()
