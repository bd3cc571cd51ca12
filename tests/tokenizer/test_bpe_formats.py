"""GPT-2 files (vocab.json + merges.txt) and Hugging Face tokenizer.json: load, export, and encode
exactly like HF `tokenizers` and tiktoken. Real GPT-2 files cannot be downloaded here, so HF trains
a byte-level BPE on a small text and saves it in both layouts."""

import json
import random

import pytest

from llmjax.tokenizer.base import TokenizerError
from llmjax.tokenizer.bpe import BPETokenizer, bytes_to_unicode
from llmjax.tokenizer.bpe_train import train_bpe
from llmjax.tokenizer.pretokenize import GPT2_PATTERN

hypothesis = pytest.importorskip("hypothesis")
tiktoken = pytest.importorskip("tiktoken")
tokenizers = pytest.importorskip("tokenizers")
from hypothesis import given, settings, strategies as st  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

EOT = "<|endoftext|>"
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
from tokenizer_texts import HARD_TEXTS, tricky_text, unicode_text  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    from llmjax.data.corpus import default_corpus_files, read_text

    return [read_text(p) for p in default_corpus_files()[:25]] + ["日本語 中文 한국어 émoji 👍🏽 👩‍👩‍👧‍👦 Ωμέγα"] * 20


def train_hf(texts, vocab_size=1000, alphabet=True):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet else [],
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def hf_files(corpus, tmp_path_factory):
    """An HF byte-level BPE saved as tokenizer.json and as vocab.json + merges.txt."""
    folder = tmp_path_factory.mktemp("hf")
    hf = train_hf(corpus)
    hf.save(str(folder / "tokenizer.json"))
    hf.model.save(str(folder))
    return hf, folder


@pytest.fixture(scope="module")
def loaded(hf_files):
    hf, folder = hf_files
    return (
        BPETokenizer.from_hf_tokenizer_json(folder / "tokenizer.json"),
        BPETokenizer.from_gpt2_files(folder / "vocab.json", folder / "merges.txt"),
    )


def tiktoken_from(tokenizer):
    special_ids = set(tokenizer.special_tokens.values())
    ranks = {token: i for i, token in tokenizer.vocab.items() if i not in special_ids}
    return tiktoken.Encoding("test", pat_str=tokenizer.pattern, mergeable_ranks=ranks, special_tokens=tokenizer.special_tokens)


def hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


# --- parity with HF tokenizers and tiktoken -----------------------------------------------------


def test_both_layouts_load_the_same_tokenizer(hf_files, loaded):
    hf, _ = hf_files
    from_json, from_files = loaded
    assert from_json.fingerprint() == from_files.fingerprint()
    assert from_json.vocab_size == hf.get_vocab_size() == 1000
    assert from_json.special_tokens == {EOT: 0}  # HF puts special tokens first: byte ids are not 0..255
    assert from_json.to_json()["byte_ids"] != list(range(256))


def test_equals_hf_and_tiktoken_on_hard_and_real_text(hf_files, loaded, corpus):
    hf, _ = hf_files
    reference = tiktoken_from(loaded[0])
    for text in HARD_TEXTS + corpus[:8]:
        expected = hf_ids(hf, text)
        for ours in loaded:
            assert ours.encode(text) == expected, text[:80]
        assert reference.encode(text, allowed_special="all") == expected
        assert loaded[0].decode(expected) == hf.decode(expected, skip_special_tokens=False) == text


@settings(max_examples=200, deadline=None)
@given(text=unicode_text | tricky_text)
def test_equals_hf_and_tiktoken_on_random_text(hf_files, loaded, text):
    hf, _ = hf_files
    expected = hf_ids(hf, text)
    assert loaded[0].encode(text) == expected
    assert loaded[1].encode(text) == expected


def test_our_tokenizer_equals_tiktoken_built_from_our_vocab(corpus):
    ours = train_bpe(corpus, 900, num_workers=1, progress=False)
    reference = tiktoken_from(ours)
    for text in HARD_TEXTS + corpus[:8]:
        assert ours.encode(text) == reference.encode(text, allowed_special="all")


# --- export -------------------------------------------------------------------------------------


def test_saved_gpt2_files_load_back_and_in_hf(corpus, tmp_path):
    ours = train_bpe(corpus, 900, num_workers=1, progress=False)
    vocab_path, merges_path = ours.save_gpt2_files(tmp_path)
    assert merges_path.read_text().startswith("#version: 0.2\n")
    again = BPETokenizer.from_gpt2_files(vocab_path, merges_path)
    assert again.fingerprint() == ours.fingerprint()
    hf = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.add_special_tokens([EOT])
    for text in HARD_TEXTS + corpus[:4]:
        assert hf_ids(hf, text) == ours.encode(text)


def test_gpt2_byte_alphabet():
    mapping = bytes_to_unicode()
    assert len(set(mapping.values())) == 256 and mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ"
    assert mapping[ord("A")] == "A" and mapping[0] == "Ā"


def test_arbitrary_id_assignment_in_vocab_json(hf_files, loaded, tmp_path):
    _, folder = hf_files
    vocab = json.loads((folder / "vocab.json").read_text())
    permutation = list(range(len(vocab)))
    random.Random(0).shuffle(permutation)
    (tmp_path / "vocab.json").write_text(json.dumps({token: permutation[i] for token, i in vocab.items()}))
    shuffled = BPETokenizer.from_gpt2_files(tmp_path / "vocab.json", folder / "merges.txt")
    for text in HARD_TEXTS:
        assert shuffled.encode(text) == [permutation[i] for i in loaded[1].encode(text)]
        assert shuffled.decode(shuffled.encode(text)) == text


def test_special_tokens_absent_from_vocab_json_get_new_ids(hf_files):
    _, folder = hf_files
    tokenizer = BPETokenizer.from_gpt2_files(folder / "vocab.json", folder / "merges.txt", special_tokens=[EOT, "<|pad|>"])
    assert tokenizer.special_tokens == {EOT: 0, "<|pad|>": 1000} and tokenizer.vocab_size == 1001
    assert tokenizer.encode("a<|pad|>") == [*tokenizer.encode("a"), 1000]


# --- bad files ----------------------------------------------------------------------------------


def test_merges_with_unknown_tokens_name_the_line(hf_files, tmp_path):
    _, folder = hf_files
    lines = (folder / "merges.txt").read_text().splitlines()
    assert lines[0].startswith("#version")
    cases = {
        "Ġt zzzq": r"merges.txt line 6: 'Ġt zzzq' refers to token 'zzzq', which is not in vocab.json",
        "q Ġ": r"merges.txt line 6: 'q Ġ' merges into token 'qĠ', which is not in vocab.json",
        "a b c": r"merges.txt line 6: expected two tokens separated by one space, got 'a b c'",
    }
    for bad_line, message in cases.items():
        (tmp_path / "merges.txt").write_text("\n".join(lines[:5] + [bad_line] + lines[5:]) + "\n")
        with pytest.raises(TokenizerError) as error:
            BPETokenizer.from_gpt2_files(folder / "vocab.json", tmp_path / "merges.txt")
        assert str(error.value) == message


def test_vocab_json_outside_the_byte_alphabet_is_rejected(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "hello world": 1}))
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(TokenizerError, match="'hello world' \\(id 1\\) has characters outside GPT-2's byte alphabet"):
        BPETokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def edited_tokenizer_json(hf_files, tmp_path, edit):
    _, folder = hf_files
    data = json.loads((folder / "tokenizer.json").read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"].update(type="WordPiece"), "model type is 'WordPiece'; only byte-level BPE"),
    (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer is 'Whitespace', not byte-level"),
    (lambda d: d.update(pre_tokenizer=None), "pre_tokenizer is None, not byte-level"),
    (lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space=true is not supported"),
    (lambda d: d.update(normalizer={"type": "NFC"}), "has a normalizer \\('NFC'\\)"),
    (lambda d: d["added_tokens"][0].update(lstrip=True), "added token '<\\|endoftext\\|>' has lstrip=true"),
    (lambda d: d["model"].update(dropout=0.1), "dropout=0.1 is not supported"),
    (lambda d: d.update(model="nope"), "not a Hugging Face tokenizer.json"),
])
def test_hf_json_that_is_not_byte_level_bpe_is_rejected(hf_files, tmp_path, edit, message):
    with pytest.raises(TokenizerError, match=message):
        BPETokenizer.from_hf_tokenizer_json(edited_tokenizer_json(hf_files, tmp_path, edit))


def test_hf_bpe_without_all_bytes_loads_and_refuses_only_texts_that_need_a_missing_byte(corpus, tmp_path):
    hf = train_hf(corpus[:3], 400, alphabet=False)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = BPETokenizer.from_hf_tokenizer_json(tmp_path / "tokenizer.json")
    assert ours.missing_bytes and 0xFF in ours.missing_bytes
    text = corpus[0][:200]
    assert ours.encode(text) == hf.encode(text).ids
    with pytest.raises(TokenizerError, match="needs the byte 0xc3"):
        ours.encode("\u00ff\u00ff")  # UTF-8 c3 bf: bytes the corpus never had


# --- other HF byte-level variants ---------------------------------------------------------------


def llama3_style(data):
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}


@pytest.mark.parametrize("edit", [
    llama3_style,
    lambda d: d["model"].update(ignore_merges=True),
    lambda d: d["model"].update(merges=[" ".join(m) for m in d["model"]["merges"]]),  # tokenizers < 0.20 layout
])
def test_hf_variants_encode_like_hf(hf_files, tmp_path, corpus, edit):
    path = edited_tokenizer_json(hf_files, tmp_path, edit)
    hf = Tokenizer.from_file(str(path))
    ours = BPETokenizer.from_hf_tokenizer_json(path)
    rng = random.Random(0)
    jumbles = ["".join(rng.choice(["ab", "Ġ", " ", "'s", "12", "日", "\n"]) for _ in range(50)) for _ in range(50)]
    for text in HARD_TEXTS + corpus[:3] + jumbles:
        assert ours.encode(text) == hf_ids(hf, text), text[:80]
    assert ours.pattern == (LLAMA3_PATTERN if edit is llama3_style else GPT2_PATTERN)
