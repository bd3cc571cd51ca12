"""Exact deduplication: documents, and lines / paragraphs within documents, by 64-bit blake2b hashes.

The first occurrence is kept (in input order), so the result is deterministic. Lines are
compared after stripping surrounding whitespace; blank lines are never removed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def text_hash(text: str) -> int:
    """64-bit blake2b of the text's UTF-8 (stable across processes and machines)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def first_occurrences(texts: Iterable[str], seen: set[int] | None = None) -> list[bool]:
    """[documents] True for each text whose hash was not seen before (seen is updated in place)."""
    seen = set() if seen is None else seen
    keep = []
    for text in texts:
        digest = text_hash(text)
        keep.append(digest not in seen)
        seen.add(digest)
    return keep


def split_units(text: str, unit: str) -> list[str]:
    """The text cut into lines (keeping their newline) or paragraphs (blocks separated by blank lines)."""
    if unit == "line":
        return text.splitlines(keepends=True)
    if unit == "paragraph":
        parts = text.split("\n\n")
        return [p + "\n\n" for p in parts[:-1]] + [parts[-1]]
    raise ValueError(f"unit must be 'line' or 'paragraph', not {unit!r}")


def dedup_units(text: str, seen: set[int], unit: str = "line") -> tuple[str, int]:
    """(text without lines / paragraphs already seen in this or earlier documents, number removed).
    `seen` holds the hashes of units seen so far and is updated in place."""
    kept, removed = [], 0
    for part in split_units(text, unit):
        key = part.strip()
        if not key:
            kept.append(part)
            continue
        digest = text_hash(key)
        if digest in seen:
            removed += 1
            continue
        seen.add(digest)
        kept.append(part)
    return "".join(kept), removed
