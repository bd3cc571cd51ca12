"""Exact dedup, quality heuristics and PII masking (llmjax.data.curate) on hand-made documents."""

import pytest

from llmjax.data.curate import dedup, pii, quality

PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from his porch. "
         "Later that evening, rain began to fall across the valley, and the river slowly rose. "
         "Children ran home from school, laughing about the storm and the puddles forming everywhere. "
         "Their grandmother had prepared soup, bread and apples, which everybody enjoyed together. "
         "After dinner, the family read stories aloud until the candles burned low and sleep arrived.")


def test_exact_dedup_keeps_first_and_is_deterministic():
    texts = ["a", "b", "a", "c", "b", "a"]
    assert dedup.first_occurrences(texts) == [True, True, False, True, False, False]
    assert dedup.first_occurrences(texts) == dedup.first_occurrences(list(texts))
    assert dedup.text_hash("a") == dedup.text_hash("a") != dedup.text_hash("b")
    seen = set()
    assert dedup.first_occurrences(["x"], seen) == [True] and dedup.first_occurrences(["x"], seen) == [False]


def test_line_and_paragraph_dedup():
    seen = set()
    first, removed = dedup.dedup_units("alpha\nbeta\n\nalpha\n  beta  \ngamma\n", seen)
    assert (first, removed) == ("alpha\nbeta\n\ngamma\n", 2)
    second, removed = dedup.dedup_units("gamma\ndelta\n", seen)  # lines seen in earlier documents too
    assert (second, removed) == ("delta\n", 1)
    text, removed = dedup.dedup_units("p one\nline\n\np two\n\np one\nline\n\nend", set(), unit="paragraph")
    assert (text, removed) == ("p one\nline\n\np two\n\nend", 1)
    with pytest.raises(ValueError, match="unit"):
        dedup.dedup_units("x", set(), unit="word")


def test_prose_passes():
    assert quality.word_count(PROSE) >= 50
    assert quality.failed_rules(PROSE) == []


@pytest.mark.parametrize("text, rule", [
    ("too short", "word_count"),
    (" ".join(["a"] * 80), "mean_word_length"),
    (" ".join(["supercalifragilistic"] * 3 + [f"w{i}xyzabcdefghijk" for i in range(60)]), "mean_word_length"),
    (PROSE + " #tag" * 20, "symbol_to_word_ratio"),
    ("\n".join(f"line {i} goes on and on and then..." for i in range(20)), "ellipsis_line_fraction"),
    ("\n".join(f"- item {i} of the list here with words" for i in range(20)), "bullet_line_fraction"),
    (PROSE + "\n" + "\n".join(["this very same line again and again"] * 30), "duplicate_line_fraction"),
    (" ".join(["buy cheap pills"] * 40), "top_ngram_fraction"),
    (PROSE + " " + " ".join(["one two three four five six"] * 12), "duplicate_ngram_fraction"),
    (" ".join(f"{i} + {i * 2} = {i * 3};" for i in range(30)), "alphabetic_word_fraction"),
])
def test_each_rule_fails_its_document(text, rule):
    assert rule in quality.failed_rules(text)


def test_rule_values():
    assert quality.mean_word_length("ab abcd") == 3.0
    assert quality.ellipsis_line_fraction("a...\nb\n\nc\u2026\nd") == 0.5
    assert quality.bullet_line_fraction("- a\n* b\nc\nd") == 0.5
    assert quality.duplicate_line_fraction("ab\ncd\nab") == pytest.approx(2 / 6)
    assert quality.alphabetic_word_fraction("a 1 b2 ;") == 0.5
    assert quality.symbol_to_word_ratio("# a ... b") == pytest.approx(2 / 4)


@pytest.mark.parametrize("text, kind", [
    ("write to bob.smith+news@example.co.uk today", "email"),
    ("call +44 20 7946 0958 now", "phone"),
    ("call +1 415 555 2671", "phone"),
    ("office (555) 123-4567", "phone"),
    ("office 555-123-4567.", "phone"),
    ("toll free 1-800-555-0199", "phone"),
    ("host 192.168.0.1 is up", "ipv4"),
    ("listen on 0.0.0.0:8080", "ipv4"),
    ("server 2001:db8:85a3::8a2e:370:7334 ok", "ipv6"),
    ("link fe80:0:0:0:0:0:0:1", "ipv6"),
])
def test_pii_positives(text, kind):
    masked, counts = pii.mask_pii(text)
    assert counts == {kind: 1}
    assert pii.TAGS[kind] in masked


@pytest.mark.parametrize("text", [
    "Python 3.12.1", "released 2026-12-06", "1.2.3.4.5", "v10.0.0.1", "999.1.1.1", "12/06/2026",
    "5551234567", "x[1::2]", "std::vector", "10:30:00", "a::b", "+12 3", "sha 1234-5678-9012", "python3.12",
])
def test_pii_negatives(text):
    assert pii.mask_pii(text) == (text, {})


def test_pii_counts_several():
    masked, counts = pii.mask_pii("a@b.io, c@d.org and 10.0.0.1 or 555-123-4567")
    assert counts == {"email": 2, "ipv4": 1, "phone": 1}
    assert "@" not in masked and "10.0.0.1" not in masked
