"""BPETokenizer: round trips, special tokens, decode of broken bytes, the merge loops and the cache,
our JSON format, parity with tiktoken built from the same vocabulary, and streaming encode."""

import json
import random
import tracemalloc

import pytest

from llmjax.tokenizer.base import Tokenizer, TokenizerError
from llmjax.tokenizer.bpe import BPETokenizer
from llmjax.tokenizer.bpe_train import train_bpe
from llmjax.tokenizer.pretokenize import CL100K_PATTERN

hypothesis = pytest.importorskip("hypothesis")
tiktoken = pytest.importorskip("tiktoken")
from hypothesis import given, settings, strategies as st  # noqa: E402

EOT = "<|endoftext|>"
from tokenizer_texts import HARD_TEXTS, tricky_text, unicode_text  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    from llmjax.data.corpus import default_corpus_files, read_text

    return [read_text(p) for p in default_corpus_files()[:25]] + ["日本語 中文 한국어 émoji 👍🏽 👩‍👩‍👧‍👦 Ωμέγα"] * 20


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe(corpus, 1200, num_workers=1, progress=False)


@pytest.fixture(scope="module")
def cl100k_tokenizer(corpus):
    return train_bpe(corpus, 800, special_tokens=[EOT, "<|pad|>"], pattern=CL100K_PATTERN, num_workers=1, progress=False)


def tiktoken_from(tokenizer):
    special_ids = set(tokenizer.special_tokens.values())
    ranks = {token: i for i, token in tokenizer.vocab.items() if i not in special_ids}
    return tiktoken.Encoding("test", pat_str=tokenizer.pattern, mergeable_ranks=ranks, special_tokens=tokenizer.special_tokens)


# --- round trips and decode ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(text=unicode_text | tricky_text)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode_ordinary(text)) == text
    assert tokenizer.decode_bytes(tokenizer.encode(text)) == text.encode()


def test_decode_of_invalid_bytes_gives_replacement_characters(tokenizer):
    byte_ids = {token[0]: i for i, token in tokenizer.vocab.items() if len(token) == 1}
    ids = [byte_ids[b] for b in b"ok \xff then \xe6\x97"]  # a byte never valid, then a cut-off character
    assert tokenizer.decode(ids) == "ok \ufffd then \ufffd"
    assert tokenizer.decode_bytes(ids) == b"ok \xff then \xe6\x97"
    emoji = tokenizer.encode("👍")
    assert all(tokenizer.decode([i]) == "\ufffd" for i in emoji) and len(emoji) > 1  # each id holds part of it


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    for bad in ([tokenizer.vocab_size], [-1], [0, 10**9]):
        with pytest.raises(TokenizerError, match="not in this vocabulary"):
            tokenizer.decode(bad)
    with pytest.raises(TokenizerError, match="'a' is not in this vocabulary"):
        tokenizer.decode(["a"])


def test_lone_surrogates_become_replacement_characters_like_tiktoken(tokenizer):
    text = "a\ud800b \udc00"
    assert tokenizer.decode(tokenizer.encode(text)) == "a\ufffdb \ufffd"
    assert tokenizer.encode(text) == tiktoken_from(tokenizer).encode(text)


# --- special tokens -----------------------------------------------------------------------------


def test_special_tokens_match_only_when_allowed(tokenizer):
    eot = tokenizer.eot_id
    assert eot == tokenizer.vocab_size - 1
    ids = tokenizer.encode(f"a{EOT}b")
    assert ids.count(eot) == 1 and tokenizer.decode(ids) == f"a{EOT}b"
    for ordinary in (tokenizer.encode_ordinary(f"a{EOT}b"), tokenizer.encode(f"a{EOT}b", allowed_special="none")):
        assert eot not in ordinary and tokenizer.decode(ordinary) == f"a{EOT}b"
    assert tokenizer.encode(EOT, allowed_special={EOT}) == [eot]
    with pytest.raises(TokenizerError, match="lacks"):
        tokenizer.encode("x", allowed_special={"<|nope|>"})


@settings(max_examples=100, deadline=None)
@given(text=tricky_text)
def test_fast_encode_equals_the_base_class_encode(cl100k_tokenizer, text):
    text = text.replace("<|", "<|pad|>", 1)
    for allowed in ("all", "none", {"<|pad|>"}):
        expected = Tokenizer.encode(cl100k_tokenizer, text, allowed_special=allowed)
        assert cl100k_tokenizer.encode(text, allowed_special=allowed) == expected


def test_overlapping_special_tokens_match_longest_first():
    tokenizer = BPETokenizer.from_merge_ids([], special_tokens=["<|a|>", "<|a|><|b|>", "<|b|>"])
    assert tokenizer.encode("x<|a|><|b|>y<|a|><|b") == [ord("x"), 257, ord("y"), 256, *map(ord, "<|b")]


# --- the merge loops and the cache --------------------------------------------------------------


def test_long_pieces_merge_with_the_heap_exactly_as_short_ones(tokenizer):
    rng = random.Random(0)
    pieces = ["x" * 300, "9" * 1000, " " * 500, "ab" * 200]
    pieces += ["".join(rng.choice("abc de_") for _ in range(rng.randint(2, 120))) for _ in range(300)]
    for piece in pieces:
        parts = list(piece.encode())
        assert tokenizer._merge_long(list(parts)) == tokenizer._merge_short(list(parts)), piece


def test_a_huge_pre_token_encodes_fast(tokenizer):
    digits = "7" * 200_000  # one pre-token: O(n^2) merging would take minutes
    assert tokenizer.decode(tokenizer.encode(digits)) == digits


def test_pickles_for_worker_processes(tokenizer):
    import pickle

    tokenizer.encode("warm the cache")
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.fingerprint() == tokenizer.fingerprint() and copy._cache == {}
    assert all(copy.encode(text) == tokenizer.encode(text) for text in HARD_TEXTS)


def test_the_cache_is_bounded_and_changes_nothing(corpus):
    small = train_bpe(corpus[:5], 500, num_workers=1, progress=False)
    uncached = BPETokenizer.from_json(small.to_json())
    uncached._cache_size = 0
    limited = BPETokenizer(small.vocab, small.merges, small.pattern, small.special_tokens, cache_size=64)
    for text in corpus[:8]:
        assert limited.encode(text) == uncached.encode(text) == small.encode(text)
        assert len(limited._cache) <= 64
    assert len(uncached._cache) == 0


# --- our JSON format ----------------------------------------------------------------------------


def test_json_round_trip(tmp_path, tokenizer, cl100k_tokenizer):
    for original in (tokenizer, cl100k_tokenizer):
        path = tmp_path / "tok.json"
        original.save(path)
        data = json.loads(path.read_text())
        assert data["type"] == "byte_bpe" and data["merge_ids"] == 256 and data["byte_ids"] == list(range(256))
        loaded = BPETokenizer.from_json(data)
        assert loaded.fingerprint() == original.fingerprint()
        assert loaded.vocab == original.vocab and loaded.merges == original.merges
        for text in HARD_TEXTS:
            assert loaded.encode(text) == original.encode(text)


def test_json_keeps_arbitrary_id_layouts_exactly():
    # Byte ids reversed, merge results out of order, a token that no merge makes, a special inside.
    vocab = {255 - b: bytes([b]) for b in range(256)}
    vocab.update({300: b"ab", 257: b"abc", 400: b"unused", 256: b"<s>"})
    tokenizer = BPETokenizer(vocab, [(b"a", b"b"), (b"ab", b"c")], special_tokens={"<s>": 256})
    loaded = BPETokenizer.from_json(json.loads(json.dumps(tokenizer.to_json())))
    assert loaded.vocab == tokenizer.vocab and loaded.vocab_size == 401
    assert loaded.encode("abcab<s>") == [257, 300, 256] == tokenizer.encode("abcab<s>")
    assert tokenizer.to_json()["merge_ids"] == [300, 257]


def test_from_json_rejects_other_and_broken_files(tokenizer):
    with pytest.raises(TokenizerError, match="not a byte_bpe tokenizer JSON"):
        BPETokenizer.from_json({"type": "sentencepiece"})
    broken = tokenizer.to_json()
    broken["merges"] = [[1, 2, 3]]
    with pytest.raises(TokenizerError, match="malformed byte_bpe JSON"):
        BPETokenizer.from_json(broken)
    broken = tokenizer.to_json()
    broken["merges"] = [[1, 99999]]
    with pytest.raises(TokenizerError, match="refers to an id"):
        BPETokenizer.from_json(broken)


def test_constructor_checks_vocabularies():
    vocab = {b: bytes([b]) for b in range(255)}  # no 0xff (never in UTF-8 text): loads
    assert BPETokenizer(vocab, []).encode("ab") == [97, 98]
    without_c3 = {i: bytes([b]) for i, b in enumerate(b for b in range(256) if b != 0xC3)}
    with pytest.raises(TokenizerError, match="needs the byte 0xc3"):  # only a text that needs it is refused
        BPETokenizer(without_c3, []).encode_ordinary("caf\u00e9")  # é: UTF-8 c3 a9
    vocab[255] = b"\xff"
    with pytest.raises(TokenizerError, match="needs the token b'ab'"):
        BPETokenizer(vocab, [(b"a", b"b")])
    vocab[256] = b"a"
    with pytest.raises(TokenizerError, match="ids 97 and 256 both stand for b'a'"):
        BPETokenizer(vocab, [])


# --- parity with tiktoken built from our vocabulary ---------------------------------------------


def test_equals_tiktoken_on_hard_and_real_text(tokenizer, cl100k_tokenizer, corpus):
    for ours in (tokenizer, cl100k_tokenizer):
        reference = tiktoken_from(ours)
        for text in HARD_TEXTS + corpus[:10]:
            assert ours.encode(text) == reference.encode(text, allowed_special="all"), text[:80]
            assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(text=unicode_text | tricky_text)
def test_equals_tiktoken_on_random_text(tokenizer, cl100k_tokenizer, text):
    for ours in (tokenizer, cl100k_tokenizer):
        assert ours.encode(text) == tiktoken_from_cached(ours).encode(text, allowed_special="all")


_tiktoken_cache = {}


def tiktoken_from_cached(tokenizer):
    key = tokenizer.fingerprint()
    if key not in _tiktoken_cache:
        _tiktoken_cache[key] = tiktoken_from(tokenizer)
    return _tiktoken_cache[key]


# --- streaming encode ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(text=tricky_text, cuts=st.lists(st.integers(0, 400), max_size=12))
def test_encode_iterable_equals_encoding_the_whole_text(tokenizer, text, cuts):
    text = text * 3
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert list(tokenizer.encode_iterable(chunks)) == tokenizer.encode(text)
    assert list(tokenizer.encode_iterable(chunks, allowed_special="none")) == tokenizer.encode_ordinary(text)


def test_encode_iterable_equals_encode_on_indented_code(tokenizer, corpus):
    text = "".join(corpus[:5])
    assert list(tokenizer.encode_iterable(text.splitlines(keepends=True))) == tokenizer.encode(text)


def test_encode_iterable_memory_is_bounded(tokenizer):
    """Peak memory stays flat as the stream grows 3x; it is the pre-token cache plus one block.
    (The default cache holds 32768 pre-tokens, about 7 MB; a small one keeps this test quick.)"""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 8))) for _ in range(5000)]

    def lines(count):  # ~68 bytes a line, made on the fly; every line has a new number (a new pre-token)
        for i in range(count):
            yield f"    {words[i % 5000]} = {words[(i * 7) % 5000]}({i}) + {EOT if i % 97 == 0 else ''}\n" + "x " * 20 + "\n"

    peaks = []
    for count in (8_000, 24_000):  # 0.54 MB, then 1.6 MB of text: holding the text or the ids would pass 2 MB
        streaming = BPETokenizer(tokenizer.vocab, tokenizer.merges, tokenizer.pattern, tokenizer.special_tokens, cache_size=4096)
        tracemalloc.start()
        try:
            num_ids = sum(1 for _ in streaming.encode_iterable(lines(count)))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert num_ids > 35 * count
    assert peaks[1] < 1.25 * peaks[0] + 200_000, f"peak grew from {peaks[0] / 1e6:.2f} to {peaks[1] / 1e6:.2f} MB"
    assert peaks[1] < 2_000_000
