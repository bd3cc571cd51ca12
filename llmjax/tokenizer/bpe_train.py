"""Byte-level BPE training: count pre-tokens once, then learn merges incrementally.

    tokenizer = train_bpe("corpus/", vocab_size=10_000)          # special "<|endoftext|>" by default

The vocabulary is ids 0..255 for the 256 bytes, then one id per merge in the order learned
(256 + rank), then the special tokens (so a tokenizer that stops early has fewer ids, still
contiguous). Training never merges across a pre-token or a special token.

The merge loop (`learn_merges`) is the classic incremental algorithm:
  * each distinct pre-token is a word: a list of symbol ids with the number of times it occurs;
  * `pair_counts[pair]` is the weighted count of every adjacent pair, and `pair_words[pair]` the
    words that (may) contain it: merging a pair visits only those words, and adjusts the counts
    of the pairs around each occurrence (no recounting);
  * the best pair comes from a heap with lazy invalidation: a popped entry whose count is stale
    is pushed back with the current count. This is exact because counts of existing pairs only
    ever go down; the only pairs whose counts go up contain the new symbol and are pushed after
    each merge;
  * a pair counted fewer than 2 times can never become the best one again, so it is dropped
    from the heap and the index: memory stays proportional to the pairs that matter.
Ties in count go to the lexicographically greatest pair of byte strings (bytes_a, bytes_b), the
convention of GPT-2 style trainers and of Stanford CS336. Training stops early, with a warning,
when no pair occurs at least twice (a merge seen once teaches nothing).
"""

from __future__ import annotations

import heapq
import itertools
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence

from tqdm import tqdm

from llmjax.tokenizer.base import ENDOFTEXT, TokenizerError
from llmjax.tokenizer.bpe import BPETokenizer
from llmjax.tokenizer.pretokenize import GPT2_PATTERN, compile_pattern, count_pretokens


def minimum_vocab_size(special_tokens: Sequence[str]) -> int:
    """256 byte tokens plus the special tokens: the smallest vocabulary (no merges at all)."""
    return 256 + len(special_tokens)


def descending_key(token: bytes) -> bytes:
    """A key that sorts byte strings in DEscending order, so a min-heap pops the greatest first.

    Each byte x becomes the 16-bit big-endian value 255 - x and the key ends with 256: a
    prefix then sorts after its extensions (b"ab" < b"abc" in bytes, so key(b"ab") > key(b"abc")).
    """
    return bytes(itertools.chain.from_iterable((0, 255 - x) for x in token)) + b"\x01\x00"


def learn_merges(pretoken_counts: dict[bytes, int], num_merges: int, *, progress: bool = True) -> list[tuple[int, int]]:
    """The BPE merges, as (id_a, id_b) pairs in rank order; merge r creates id 256 + r.

    pretoken_counts: {pre-token bytes: occurrences}. Returns fewer than `num_merges` merges when
    no pair is left that occurs at least twice.
    """
    token_bytes = [bytes([i]) for i in range(256)]  # id -> bytes, grows with each merge
    sort_keys = [descending_key(t) for t in token_bytes]  # id -> tie-breaking key
    shift = max(256 + num_merges, 2).bit_length()  # pair (a, b) is the int a << shift | b
    mask = (1 << shift) - 1

    words: list[list[int]] = []  # [word][position] -> symbol id
    word_counts: list[int] = []  # [word] -> occurrences
    for token, count in pretoken_counts.items():
        if len(token) > 1:  # a single byte has no pair to merge
            words.append(list(token))
            word_counts.append(count)

    pair_counts = _count_pairs(words, word_counts, shift)
    pair_words = _index_pairs(words, pair_counts, shift)
    heap = [(-count, sort_keys[key >> shift], sort_keys[key & mask], key) for key, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=num_merges, desc="BPE merges", unit="merge", disable=not progress, mininterval=0.5)
    while len(merges) < num_merges and heap:
        negative_count, key_a, key_b, pair = heapq.heappop(heap)
        current = pair_counts.get(pair)
        if current is None:  # merged already, or fell below 2
            continue
        if current != -negative_count:  # stale: counts only decrease, so push back and look again
            if current >= 2:
                heapq.heappush(heap, (-current, key_a, key_b, pair))
            else:
                del pair_counts[pair]
                pair_words.pop(pair, None)
            continue
        a, b = pair >> shift, pair & mask
        new = len(token_bytes)
        merges.append((a, b))
        token_bytes.append(token_bytes[a] + token_bytes[b])
        sort_keys.append(descending_key(token_bytes[new]))
        del pair_counts[pair]
        new_pair_counts, new_pair_words = _apply_merge(words, word_counts, pair_words.pop(pair), a, b, new, pair_counts, shift)
        for new_pair, count in new_pair_counts.items():
            if count >= 2:
                pair_counts[new_pair] = count
                pair_words[new_pair] = new_pair_words[new_pair]
                heapq.heappush(heap, (-count, sort_keys[new_pair >> shift], sort_keys[new_pair & mask], new_pair))
        bar.update()
    bar.close()
    if len(merges) < num_merges:
        warnings.warn(
            f"BPE training stopped after {len(merges)} of {num_merges} merges: no pair of symbols occurs twice "
            "in the corpus any more; the vocabulary is smaller than asked (give more text for more merges)",
            stacklevel=2,
        )
    return merges


def _count_pairs(words: list[list[int]], word_counts: list[int], shift: int) -> dict[int, int]:
    """{pair: weighted count} for pairs that occur at least twice (the others can never win)."""
    counts: dict[int, int] = {}
    get = counts.get
    for word, count in zip(words, word_counts):
        for a, b in zip(word, word[1:]):
            pair = a << shift | b
            counts[pair] = get(pair, 0) + count
    return {pair: count for pair, count in counts.items() if count >= 2}


def _index_pairs(words: list[list[int]], pair_counts: dict[int, int], shift: int) -> dict[int, list[int]]:
    """{pair: indices of the words that contain it}, for the pairs in `pair_counts`."""
    index: dict[int, list[int]] = {pair: [] for pair in pair_counts}
    get = index.get
    for word_index, word in enumerate(words):
        for pair in {a << shift | b for a, b in zip(word, word[1:])}:
            listed = get(pair)
            if listed is not None:
                listed.append(word_index)
    return index


def _apply_merge(
    words: list[list[int]],
    word_counts: list[int],
    word_indices: list[int],
    a: int,
    b: int,
    new: int,
    pair_counts: dict[int, int],
    shift: int,
) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Replace (a, b) by `new` in the listed words, in place, leftmost first (as encoding does).

    Decrements in `pair_counts` the pairs that disappear around each occurrence (pairs not
    tracked there are ignored) and returns the pairs that appear, all containing `new`:
    ({pair: count}, {pair: word indices}). Listed words that no longer hold (a, b) are skipped
    (the index is never pruned, only appended to).
    """
    new_counts: defaultdict[int, int] = defaultdict(int)
    new_words: defaultdict[int, list[int]] = defaultdict(list)
    get = pair_counts.get
    b_shifted = b << shift  # (b, y) is b_shifted | y
    new_shifted = new << shift
    for word_index in word_indices:
        word = words[word_index]
        remaining = word.count(a)  # occurrences of `a` not yet looked at: no exception ends the scan
        if not remaining:
            continue
        count = word_counts[word_index]
        last = len(word) - 1
        i = -1
        while remaining:
            i = word.index(a, i + 1)
            remaining -= 1
            if i == last or word[i + 1] != b:
                continue
            # Pairs around the occurrence at i: (left, a) (a, b) (b, right) -> (left, new) (new, right).
            if i:
                left = word[i - 1]
                if left == new:  # the previous occurrence ended at i - 1 and already removed (b, a)
                    added = new_shifted | new
                else:
                    removed = left << shift | a
                    current = get(removed)
                    if current is not None:
                        pair_counts[removed] = current - count
                    added = left << shift | new
                new_counts[added] += count
                new_words[added].append(word_index)
            if i + 2 <= last:
                right = word[i + 2]
                removed = b_shifted | right
                current = get(removed)
                if current is not None:
                    pair_counts[removed] = current - count
                # If another occurrence starts right after, it adds (new, new) as its left pair.
                if not (right == a and i + 3 <= last and word[i + 3] == b):
                    added = new_shifted | right
                    new_counts[added] += count
                    new_words[added].append(word_index)
            word[i] = new
            del word[i + 1]
            last -= 1
            if a == b:  # the b just consumed was one of the a's counted
                remaining -= 1
    return new_counts, new_words


def train_bpe_from_counts(
    pretoken_counts: dict[bytes, int],
    vocab_size: int,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    pattern: str = GPT2_PATTERN,
    *,
    progress: bool = True,
) -> BPETokenizer:
    """A BPETokenizer learned from pre-token counts (see `count_pretokens`)."""
    specials = _check_special_tokens(special_tokens)
    _check_vocab_size(vocab_size, specials)
    merges = learn_merges(pretoken_counts, vocab_size - minimum_vocab_size(specials), progress=progress)
    return BPETokenizer.from_merge_ids(merges, pattern=pattern, special_tokens=specials)


def train_bpe(
    corpus: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    pattern: str = GPT2_PATTERN,
    num_workers: int | None = None,
    progress: bool = True,
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` ids (special tokens included).

    corpus: a file, a folder (recursive), a glob, a list of Path objects, or an iterable of str
    (see `count_pretokens`). Pre-tokens are counted on `num_workers` processes (default: all
    cores); the merges are learned in this process. vocab_size below 256 + len(special_tokens)
    is an error; the result has fewer ids when the corpus runs out of pairs that occur twice.
    """
    specials = _check_special_tokens(special_tokens)
    _check_vocab_size(vocab_size, specials)
    compile_pattern(pattern)
    counts, _ = count_pretokens(corpus, pattern, specials, num_workers)
    return train_bpe_from_counts(counts, vocab_size, specials, pattern, progress=progress)


def _check_special_tokens(special_tokens: Sequence[str]) -> tuple[str, ...]:
    if isinstance(special_tokens, str):
        raise TokenizerError(f"special_tokens must be a list of strings, not the string {special_tokens!r}")
    specials = tuple(special_tokens)
    if not all(isinstance(token, str) and token for token in specials):
        raise TokenizerError(f"special tokens must be non-empty strings: {specials!r}")
    if len(set(specials)) != len(specials):
        raise TokenizerError(f"special tokens repeat: {specials!r}")
    return specials


def _check_vocab_size(vocab_size: int, specials: tuple[str, ...]) -> None:
    minimum = minimum_vocab_size(specials)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size {vocab_size!r} is too small: a byte-level BPE needs at least {minimum} ids "
            f"(256 bytes + {len(specials)} special tokens) before any merge"
        )
