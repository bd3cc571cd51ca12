"""BPE training and pre-token counting: hand-checked merges, a brute-force reference, determinism,
special tokens, exact chunking, bad input, and bounded memory while streaming a corpus."""

import random
import tracemalloc
from collections import Counter

import pytest
import regex

from llmjax.tokenizer.base import TokenizerError
from llmjax.tokenizer.bpe_train import descending_key, learn_merges, train_bpe, train_bpe_from_counts
from llmjax.tokenizer.pretokenize import (
    CL100K_PATTERN,
    GPT2_PATTERN,
    count_pretokens,
    decode_utf8_counting,
    list_corpus_files,
    peak_rss_bytes,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

EOT = "<|endoftext|>"
CS336_TEXT = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"


def reference_merges(pretoken_counts: dict[bytes, int], num_merges: int) -> list[tuple[int, int]]:
    """Brute force: recount every pair before each merge; ties to the greatest (bytes_a, bytes_b)."""
    tokens = [bytes([i]) for i in range(256)]
    words = {tuple(word): count for word, count in pretoken_counts.items()}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs or max(pairs.values()) < 2:
            break
        (a, b), _ = max(pairs.items(), key=lambda item: (item[1], tokens[item[0][0]], tokens[item[0][1]]))
        new = len(tokens)
        tokens.append(tokens[a] + tokens[b])
        merges.append((a, b))
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


@pytest.fixture(scope="module")
def stdlib_texts():
    from llmjax.data.corpus import default_corpus_files, read_text

    return [read_text(p) for p in default_corpus_files()[:40]]


# --- the merge loop ---------------------------------------------------------------------------


def test_cs336_example_merges_by_hand():
    # Whitespace pre-tokens: low x5, lower x2, widest x3, newest x6. Worked out by hand:
    # "s t" and "e s" tie at 9 -> the greater pair (b"s", b"t"); "o w" beats "l o" (7 each); at 6,
    # ("w","est") > ("n","e") > ("e","w"); at 3, "w i" > "i d" > "d est"; at 2, "low e" > "e r".
    expected = ["s t", "e st", "o w", "l ow", "w est", "n e", "ne west", "w i", "wi d", "wid est", "low e", "lowe r"]
    with pytest.warns(UserWarning, match="stopped after 12 of 43 merges"):
        tokenizer = train_bpe([CS336_TEXT], vocab_size=300, pattern=r"\S+", num_workers=1, progress=False)
    assert [f"{a.decode()} {b.decode()}" for a, b in tokenizer.merges] == expected
    assert tokenizer.vocab_size == 256 + 12 + 1
    assert tokenizer.special_tokens == {EOT: 268}
    assert tokenizer.vocab[256] == b"st" and tokenizer.vocab[267] == b"lower"
    assert tokenizer.encode("newest lowest") == [262, 259, 257]  # newest | low | est


def test_first_six_merges_as_in_the_cs336_handout():
    tokenizer = train_bpe([CS336_TEXT], vocab_size=256 + 1 + 6, pattern=r"\S+", num_workers=1, progress=False)
    assert [a + b" " + b for a, b in tokenizer.merges] == [b"s t", b"e st", b"o w", b"l ow", b"w est", b"n e"]


def test_descending_key_reverses_byte_order_with_prefixes():
    tokens = [b"", b"\x00", b"\x00\x00", b"a", b"ab", b"abc", b"b", b"\xff", b"\xff\x00"]
    assert sorted(tokens, key=descending_key) == sorted(tokens, reverse=True)


@pytest.mark.filterwarnings("ignore:BPE training stopped")
def test_incremental_merges_equal_brute_force_on_repetitive_words():
    rng = random.Random(0)
    for _ in range(150):
        words = [bytes(rng.choice(b"ab ") for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 25))]
        counts = {word: rng.randint(1, 5) for word in words}
        assert learn_merges(counts, 40, progress=False) == reference_merges(counts, 40), counts


def test_incremental_merges_equal_brute_force_on_real_text(stdlib_texts):
    counts, _ = count_pretokens(stdlib_texts[:12], num_workers=1)
    sample = dict(random.Random(1).sample(sorted(counts.items()), 1500))
    assert learn_merges(sample, 150, progress=False) == reference_merges(sample, 150)


def test_training_is_deterministic_across_runs_and_workers(stdlib_texts):
    first = train_bpe(stdlib_texts[:10], 700, num_workers=1, progress=False)
    again = train_bpe(stdlib_texts[:10], 700, num_workers=1, progress=False)
    assert first.merges == again.merges and first.fingerprint() == again.fingerprint()
    # Several tasks on a pool of 2 processes, results arriving in any order: same counts, same merges.
    one, _ = count_pretokens(stdlib_texts[:10], num_workers=1)
    two, stats = count_pretokens(stdlib_texts[:10], num_workers=2, task_bytes=40_000, chunk_bytes=10_000)
    assert one == two and stats.num_documents == 10
    assert stats.peak_worker_rss_bytes < peak_rss_bytes()  # counted in small worker processes, not in pytest
    assert train_bpe_from_counts(two, 700, progress=False).merges == first.merges


def test_special_tokens_are_never_merged_across_or_split():
    text = f"x{EOT}y x{EOT}y ab{EOT}ab{EOT}<|endoftext|x" * 20
    with pytest.warns(UserWarning, match="stopped after"):
        tokenizer = train_bpe([text], 300, special_tokens=[EOT, "<|pad|>"], num_workers=1, progress=False)
    assert tokenizer.special_tokens == {EOT: tokenizer.vocab_size - 2, "<|pad|>": tokenizer.vocab_size - 1}
    merged_tokens = [a + b for a, b in tokenizer.merges]
    assert not any(b"x<" in t or b">y" in t or b"b<" in t or b">a" in t for t in merged_tokens)
    assert tokenizer.encode(f"x{EOT}y") == [*tokenizer.encode_ordinary("x"), tokenizer.eot_id, *tokenizer.encode_ordinary("y")]
    near_miss = tokenizer.encode("<|endoftext|x")  # not the special token: plain text, learned as such
    assert tokenizer.eot_id not in near_miss and tokenizer.decode(near_miss) == "<|endoftext|x"


# --- bad input --------------------------------------------------------------------------------


def test_vocab_too_small_names_the_minimum():
    with pytest.raises(TokenizerError, match="at least 257 ids"):
        train_bpe(["some text"], 256, progress=False)
    with pytest.raises(TokenizerError, match=r"at least 259 ids \(256 bytes \+ 3 special"):
        train_bpe(["some text"], 258, special_tokens=["<a>", "<b>", "<c>"], progress=False)
    assert train_bpe(["aaaa aaaa"], 257, progress=False).vocab_size == 257  # no merge at all is fine


@pytest.mark.parametrize("corpus", [[], [""], [EOT * 3], ["", EOT]])
def test_empty_corpus_is_one_clear_error(corpus):
    with pytest.raises(TokenizerError, match="is empty"):
        train_bpe(corpus, 300, progress=False)


def test_empty_or_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="has no text files"):
        train_bpe(tmp_path, 300, progress=False)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(TokenizerError, match=r"has no text files \(1 binary files skipped\)"):
        train_bpe(tmp_path, 300, progress=False)
    with pytest.raises(TokenizerError, match="does not exist"):
        train_bpe(str(tmp_path / "nope.txt"), 300, progress=False)
    with pytest.raises(TokenizerError, match="does not exist.*pass a list of strings"):
        train_bpe("low low lower", 300, progress=False)


def test_invalid_utf8_in_a_file_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xc3\xa9 ok \xff\xfe done \xef\xbf\xbd real U+FFFD \xe6\x97")  # 2 + 2 invalid bytes
    with pytest.warns(UserWarning, match="4 bytes of invalid UTF-8 were replaced by 3 U\\+FFFD"):
        counts, stats = count_pretokens(path)
    assert (stats.invalid_utf8_bytes, stats.invalid_utf8_replacements, stats.num_bytes) == (4, 3, path.stat().st_size)
    assert counts[" \ufffd\ufffd".encode()] == 1 and counts[" \ufffd".encode()] == 2
    assert decode_utf8_counting(b"plain") == ("plain", 0, 0)


def test_corpus_forms_agree(tmp_path, stdlib_texts):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(stdlib_texts[0])
    (folder / "sub" / "b.py").write_text(stdlib_texts[1])
    (folder / "sub" / "c.pyc").write_bytes(b"\x00\x01binary")
    (folder / ".hidden").write_text("never read")
    expected, _ = count_pretokens(stdlib_texts[:2], num_workers=1)
    for corpus in (folder, str(folder), f"{folder}/**/*.*", [folder / "a.txt", folder / "sub" / "b.py"]):
        counts, stats = count_pretokens(corpus, num_workers=1)
        assert counts == expected, corpus
        assert stats.num_documents == 2
    assert list_corpus_files(folder) == ([folder / "a.txt", folder / "sub" / "b.py"], 1)


# --- exact chunking ---------------------------------------------------------------------------


def whole_text_counts(text: str, pattern: str, specials: list[str]) -> Counter:
    pieces = regex.split("|".join(map(regex.escape, sorted(specials, key=len, reverse=True))), text) if specials else [text]
    return Counter(t.encode() for piece in pieces for t in regex.findall(pattern, piece))


chunky_text = st.lists(
    st.sampled_from(["a", "bb", " ", "  ", "\n", "\n  ", "\t", "7", "12345", "'s", "é", "日本", "!?", " <|x y|> ", "<|x y|>", EOT, "\r\n", "\u3000"]),
    max_size=120,
).map("".join)


@settings(max_examples=60, deadline=None)
@given(text=chunky_text, chunk=st.integers(8, 64), pattern=st.sampled_from([GPT2_PATTERN, CL100K_PATTERN]))
def test_counting_in_small_chunks_equals_counting_the_whole_text(tmp_path_factory, text, chunk, pattern):
    specials = [EOT, "<|x y|>"]
    expected = whole_text_counts(text, pattern, specials)
    path = tmp_path_factory.mktemp("chunks") / "text.txt"
    path.write_bytes(text.encode())
    for corpus in (path, [text]):
        if not expected:
            continue
        counts, stats = count_pretokens(corpus, pattern, specials, num_workers=1, chunk_bytes=chunk)
        if stats.forced_cuts == 0:
            assert Counter(counts) == expected


def test_a_long_run_without_spaces_is_cut_by_force_and_counted(tmp_path):
    path = tmp_path / "run.txt"
    path.write_text("x" * 5000 + " tail")
    counts, stats = count_pretokens(path, chunk_bytes=64)
    assert stats.forced_cuts > 0 and sum(len(t) * c for t, c in counts.items()) == 5005


# --- bounded memory ---------------------------------------------------------------------------


def test_counting_an_8mb_file_streams_it(tmp_path):
    """Peak memory stays a fraction of the file: 1 MB tasks of 256 kB chunks (the defaults' 4 MB / 1 MB scaled
    down 4x, with the file and the bound) keep the file / bound ratio of 20 MB / 6 MB at 40% of the work."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(3000)]
    line = " ".join(words) + "\n"
    path = tmp_path / "big.txt"
    with open(path, "w") as file:
        while file.tell() < 8_000_000:
            rng.shuffle(words)
            file.write(" ".join(words) + "\n    indented line with 12 numbers\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        counts, stats = count_pretokens(path, num_workers=1, chunk_bytes=1 << 18, task_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.num_bytes == size and len(line) > 10_000
    assert peak < 2_500_000, f"peak {peak / 1e6:.1f} MB while counting a {size / 1e6:.0f} MB file"
