"""Quality heuristics in the spirit of Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020).

Each rule is a small pure function of the text returning a number; `QualityThresholds` holds the
bounds (Gopher's published values unless noted) and `failed_rules` names the rules a document
breaks. Words are whitespace-separated tokens.

- word_count: whitespace words; 50 <= n <= 100,000.
- mean_word_length: mean characters per word; 3 <= m <= 10.
- symbol_to_word_ratio: ("#" + "..." + "\u2026") per word; <= 0.1.
- ellipsis_line_fraction: non-blank lines ending in "..." or "\u2026"; <= 0.3.
- bullet_line_fraction: non-blank lines starting with a bullet (-, *, \u2022 ...); <= 0.9.
- duplicate_line_fraction: characters in lines repeating an earlier line; <= 0.3
  (Gopher: 0.2 of lines; source code repeats more).
- top_ngram_fraction: characters covered by the most frequent word 3-gram; <= 0.2 (Gopher: 0.18).
- duplicate_ngram_fraction: characters in word 5-grams seen earlier in the text; <= 0.3
  (Gopher: 0.15; source code repeats more).
- alphabetic_word_fraction: words with an alphabetic character; >= 0.5 (Gopher: 0.8; code has operators).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

ELLIPSES = ("...", "\u2026")
BULLETS = ("-", "*", "\u2022", "\u2023", "\u25e6", "\u2043")
ALPHA = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class QualityThresholds:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_to_word_ratio: float = 0.1
    max_ellipsis_line_fraction: float = 0.3
    max_bullet_line_fraction: float = 0.9
    max_duplicate_line_fraction: float = 0.3
    max_top_ngram_fraction: float = 0.2
    max_duplicate_ngram_fraction: float = 0.3
    min_alphabetic_word_fraction: float = 0.5


def words_of(text: str) -> list[str]:
    return text.split()


def nonblank_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def word_count(text: str) -> int:
    return len(words_of(text))


def mean_word_length(text: str) -> float:
    words = words_of(text)
    return sum(map(len, words)) / len(words) if words else 0.0


def symbol_to_word_ratio(text: str) -> float:
    words = words_of(text)
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return symbols / len(words) if words else 0.0


def ellipsis_line_fraction(text: str) -> float:
    lines = nonblank_lines(text)
    return sum(line.endswith(ELLIPSES) for line in lines) / len(lines) if lines else 0.0


def bullet_line_fraction(text: str) -> float:
    lines = nonblank_lines(text)
    return sum(line.startswith(BULLETS) for line in lines) / len(lines) if lines else 0.0


def duplicate_line_fraction(text: str) -> float:
    """Share of the non-blank lines' characters in lines equal to an earlier line."""
    lines = nonblank_lines(text)
    seen, repeated, total = set(), 0, 0
    for line in lines:
        total += len(line)
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


def top_ngram_fraction(text: str, n: int = 3) -> float:
    """Characters covered by the most frequent word n-gram (all its occurrences) / characters in words."""
    words = words_of(text)
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    return count * sum(map(len, gram)) / sum(map(len, words)) if count > 1 else 0.0


def duplicate_ngram_fraction(text: str, n: int = 5) -> float:
    """Characters of words covered by a word n-gram that occurred earlier in the text / characters in words."""
    words = words_of(text)
    if len(words) < n:
        return 0.0
    covered = [False] * len(words)
    seen = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i: i + n])
        if gram in seen:
            covered[i: i + n] = [True] * n
        seen.add(gram)
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered) if c) / total


def alphabetic_word_fraction(text: str) -> float:
    words = words_of(text)
    return sum(bool(ALPHA.search(w)) for w in words) / len(words) if words else 0.0


def failed_rules(text: str, thresholds: QualityThresholds = QualityThresholds()) -> list[str]:
    """The names of the rules the text breaks (empty: it passes)."""
    t = thresholds
    failed = []
    count = word_count(text)
    if not t.min_words <= count <= t.max_words:
        return ["word_count"]  # the other measures mean little on too short / too long texts
    checks = {
        "mean_word_length": t.min_mean_word_length <= mean_word_length(text) <= t.max_mean_word_length,
        "symbol_to_word_ratio": symbol_to_word_ratio(text) <= t.max_symbol_to_word_ratio,
        "ellipsis_line_fraction": ellipsis_line_fraction(text) <= t.max_ellipsis_line_fraction,
        "bullet_line_fraction": bullet_line_fraction(text) <= t.max_bullet_line_fraction,
        "duplicate_line_fraction": duplicate_line_fraction(text) <= t.max_duplicate_line_fraction,
        "top_ngram_fraction": top_ngram_fraction(text) <= t.max_top_ngram_fraction,
        "duplicate_ngram_fraction": duplicate_ngram_fraction(text) <= t.max_duplicate_ngram_fraction,
        "alphabetic_word_fraction": alphabetic_word_fraction(text) >= t.min_alphabetic_word_fraction,
    }
    failed.extend(name for name, ok in checks.items() if not ok)
    return failed
