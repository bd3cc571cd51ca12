"""ByteTokenizer: ids are UTF-8 bytes, 256 is <|endoftext|>, any text round-trips."""

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmjax.tokenizer.base import ENDOFTEXT, TokenizerError
from llmjax.tokenizer.bytes import ByteTokenizer

tokenizer = ByteTokenizer()


def test_ids_are_utf8_bytes_and_eot_is_256():
    assert tokenizer.vocab_size == 257
    assert tokenizer.special_tokens == {ENDOFTEXT: 256}
    assert tokenizer.eot_id == 256
    assert tokenizer.encode("aé") == [97, 0xC3, 0xA9]


@given(st.text())
def test_any_text_round_trips(text):
    assert tokenizer.decode(tokenizer.encode_ordinary(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, allowed_special="none")) == text


def test_special_token_only_where_allowed():
    text = f"a{ENDOFTEXT}b"
    assert tokenizer.encode(text) == [97, 256, 98]
    assert tokenizer.encode_ordinary(text) == list(text.encode())
    assert tokenizer.encode(text, allowed_special="none") == list(text.encode())
    assert tokenizer.decode([97, 256, 98]) == text


def test_invalid_bytes_decode_to_replacement_character_but_raw_bytes_are_kept():
    cut = tokenizer.encode("é")[:1]  # half a character
    assert tokenizer.decode_bytes(cut) == b"\xc3"
    assert tokenizer.decode(cut + [97]) == "\ufffda"


def test_out_of_range_id_is_a_clear_error():
    with pytest.raises(TokenizerError, match="257 is outside the byte vocabulary"):
        tokenizer.decode([257])


def test_lone_surrogate_is_a_clear_error():
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tokenizer.encode("a\ud800")


def test_json_save_load_fingerprint_and_pickle(tmp_path):
    tokenizer.save(tmp_path / "bytes.json")
    loaded = ByteTokenizer.from_json(__import__("json").loads((tmp_path / "bytes.json").read_text()))
    assert loaded.fingerprint() == tokenizer.fingerprint() == ByteTokenizer().fingerprint()
    assert pickle.loads(pickle.dumps(tokenizer)).encode("hi") == tokenizer.encode("hi")
    with pytest.raises(TokenizerError, match="expected 'bytes'"):
        ByteTokenizer.from_json({"type": "byte_bpe"})
