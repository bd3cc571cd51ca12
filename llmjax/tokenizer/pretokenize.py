"""Pre-tokenization: split text into the pieces BPE merges within, and count them over a corpus.

    counts, stats = count_pretokens("corpus/", special_tokens=["<|endoftext|>"])
    # counts: {b" the": 51234, b"\n": 40211, ...}   stats.num_bytes, stats.invalid_utf8_bytes, ...

BPE never merges across a pre-token boundary, so training only needs how often each distinct
pre-token occurs. `count_pretokens` streams the corpus: files are cut into units of about
`chunk_bytes` (read whole by one worker, never the whole corpus at once), units are grouped
into tasks of about `task_bytes`, and tasks run on a pool of processes with a bounded number in
flight. Special tokens are split out first, so they are never part of a pre-token.

Cuts inside a file are exact (counting the pieces gives the same counts as the whole text): a
cut goes just before a space that follows a printable ASCII character, never inside a special
token. That is a pre-token boundary for every pattern in which a space can only start a
pre-token or belong to a whitespace-only one (GPT-2, cl100k, o200k, Llama 3). A stretch of more
than `16 * chunk_bytes` with no such space (a giant minified line) is cut at a character
boundary instead and counted in `stats.forced_cuts`.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import multiprocessing
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import regex

from llmjax.tokenizer.base import TokenizerError, special_token_splitter

# GPT-2's pattern, as in OpenAI's encoder.py and Hugging Face's ByteLevel pre-tokenizer.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (cl100k_base) pattern, as in tiktoken: case-insensitive contractions, numbers in groups
# of at most 3 digits, punctuation runs keep their trailing newlines.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# The pre-tokenizers llama.cpp names in GGUF files ("tokenizer.ggml.pre"; src/llama-vocab.cpp). llama.cpp applies a list
# of regexes in turn, each splitting the pieces of the one before (text between matches is a piece too, and a piece's
# end is the end of text for lookaheads); each list is written here as one regex that gives the same pieces.
# Llama 3 ("llama-bpe"): case-insensitive contractions, letters after one non-letter, numbers in groups of at most 3.
LLAMA3_PATTERN = (
    r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2: Llama 3's with every digit alone.
QWEN2_PATTERN = (
    r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# SmolLM / StarCoder (llama.cpp: ["\p{N}", GPT-2's]; Hugging Face: Digits(individual_digits) then ByteLevel): every
# digit alone, GPT-2's regex between digits, where a digit ends the text: so no " 1" piece, and a run of spaces
# before a digit stays whole.
DIGITS_THEN_GPT2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# llama.cpp's "default" (["[\p{P}\$\+<=>\^~\|]+", GPT-2's, "\p{N}+", "[0-9][0-9][0-9]"]): punctuation runs whole
# (so contractions never match), GPT-2's regex between them, a space before digits alone, numbers cut into groups
# of three ASCII digits from the left.
_PUNCTUATION = r"\p{P}\$\+<=>\^~\|"
LLAMA_CPP_DEFAULT_PATTERN = (
    rf"""[{_PUNCTUATION}]+| ?\p{{L}}+| (?=\p{{N}})|[0-9]{{3}}|(?:(?![0-9]{{3}})\p{{N}})+"""
    rf"""| ?[^\s\p{{L}}\p{{N}}{_PUNCTUATION}]+|\s+(?![^\s{_PUNCTUATION}])|\s+"""
)
PATTERNS = {
    "gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN,
    "digits_then_gpt2": DIGITS_THEN_GPT2_PATTERN, "llama_cpp_default": LLAMA_CPP_DEFAULT_PATTERN,
}

CHUNK_BYTES = 1 << 20  # a unit one worker reads whole
TASK_BYTES = 4 << 20  # units per task sent to a worker (amortizes sending the counts back)
_FORCED_CUT_FACTOR = 16  # give up looking for a safe cut after this many chunks
_FINDALL_CHARS = 1 << 16  # text pre-tokenized at once (its pre-token list is ~15x larger)
_BINARY_SNIFF_BYTES = 8000  # like git: a NUL byte in the first 8000 bytes means binary
_SAFE_CUT_BYTES = regex.compile(rb"[\x21-\x7e] ")  # cut between the two: before the space
_SAFE_CUT_TEXT = regex.compile(r"\S ")


@dataclass(frozen=True)
class PretokenStats:
    """What `count_pretokens` read. Bytes are UTF-8 bytes of the input (files: as stored)."""

    num_bytes: int = 0
    num_documents: int = 0  # files, or strings of an in-memory corpus
    num_pretokens: int = 0  # occurrences, special tokens excluded
    num_unique_pretokens: int = 0
    num_special_tokens: int = 0  # occurrences of special tokens split out
    invalid_utf8_bytes: int = 0  # bytes that were not valid UTF-8, each run became one U+FFFD
    invalid_utf8_replacements: int = 0  # U+FFFD characters inserted for them
    skipped_binary_files: int = 0  # files under a folder / glob that hold a NUL byte
    forced_cuts: int = 0  # cuts not at a safe boundary (see the module docstring)
    peak_worker_rss_bytes: int = 0  # largest peak resident memory of a process that counted

    def __add__(self, other: PretokenStats) -> PretokenStats:
        """Sums of the counts; the max of the peak memory."""
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        summed["peak_worker_rss_bytes"] = max(self.peak_worker_rss_bytes, other.peak_worker_rss_bytes)
        return PretokenStats(**summed)


# --- regexes ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def compile_pattern(pattern: str) -> regex.Pattern:
    """The compiled pre-tokenizer regex (cached per process); a bad pattern is a TokenizerError."""
    try:
        return regex.compile(pattern)
    except regex.error as error:
        raise TokenizerError(f"pre-tokenizer pattern does not compile ({error}): {pattern!r}") from None


def pretokenize(text: str, pattern: str = GPT2_PATTERN) -> list[str]:
    """The pre-tokens of `text` (no special-token handling)."""
    return compile_pattern(pattern).findall(text)


def replace_lone_surrogates(text: str) -> str:
    """Text with each lone surrogate (not encodable as UTF-8) replaced by U+FFFD, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def decode_utf8_counting(data: bytes) -> tuple[str, int, int]:
    """(text, invalid bytes, U+FFFD inserted): `data.decode("utf-8", "replace")` plus how much it replaced.

    Every invalid run becomes one U+FFFD (3 bytes when re-encoded); U+FFFD already in the data
    is valid and not counted, so invalid = len(data) - (len(text as UTF-8) - 3 * inserted).
    """
    try:
        return data.decode("utf-8"), 0, 0
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", "replace")
    inserted = text.count("\ufffd") - data.count("\ufffd".encode())
    invalid = len(data) - (len(text.encode("utf-8")) - 3 * inserted)
    return text, invalid, inserted


# --- corpus -> files / texts ------------------------------------------------------------------


def is_binary_file(path: Path) -> bool:
    """True when the file's first 8000 bytes hold a NUL byte (git's test for binary files)."""
    with open(path, "rb") as file:
        return b"\0" in file.read(_BINARY_SNIFF_BYTES)


def list_corpus_files(corpus: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], int]:
    """(files, number of binary files skipped) for a path, a glob or a list of them.

    A folder is searched recursively, in sorted order, skipping hidden entries and binary files
    (a NUL byte near the start: .pyc, .so, images); a file named explicitly is always kept.
    """
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    files: list[Path] = []
    skipped = 0
    for item in items:
        text = os.fspath(item)
        path = Path(text)
        if path.is_file():
            files.append(path)
            continue
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(path)))
        elif glob.has_magic(text):
            candidates = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        else:
            raise TokenizerError(f"corpus path does not exist: {text!r} (to train on in-memory text, pass a list of strings)")
        for candidate in candidates:
            if is_binary_file(candidate):
                skipped += 1
            else:
                files.append(candidate)
    return files, skipped


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _is_path_corpus(corpus) -> bool:
    """A str / PathLike is a path or glob; so is a list whose items all name files, folders or
    globs that match (Path objects always do); any other iterable is in-memory text."""
    if isinstance(corpus, (str, os.PathLike)):
        return True
    if isinstance(corpus, Sequence) and corpus:
        return all(_names_files(item) for item in corpus)
    return False


def _names_files(item) -> bool:
    if isinstance(item, os.PathLike):
        return True
    if not isinstance(item, str) or "\n" in item or len(item) > 4096:
        return False
    return os.path.exists(item) or (glob.has_magic(item) and any(glob.iglob(item, recursive=True)))


# --- safe cuts --------------------------------------------------------------------------------


def _straddles_special(window: bytes | str, position: int, spaced_specials: Sequence[bytes | str]) -> bool:
    """True if some occurrence of a special token in `window` covers both sides of `position`."""
    for special in spaced_specials:
        start = window.find(special, max(0, position - len(special) + 1))
        while start != -1 and start < position:
            if start + len(special) > position:
                return True
            start = window.find(special, start + 1)
    return False


def find_safe_cut(window: bytes | str, start: int, end: int, specials: Sequence[bytes | str]) -> int | None:
    """First position p in [start, end) where cutting `window` before p is exact, or None.

    p is the index of a space that follows a non-space character (printable ASCII for bytes),
    not inside an occurrence of a special token. Only specials that contain a space can cover
    such a p, so only they are checked; `window` must extend past `end` by the longest special.
    """
    cut_regex = _SAFE_CUT_BYTES if isinstance(window, bytes) else _SAFE_CUT_TEXT
    spaced = [s for s in specials if (b" " if isinstance(s, bytes) else " ") in s]
    position = max(start - 1, 0)
    while (match := cut_regex.search(window, position, end)) is not None:
        cut = match.start() + 1
        if cut >= start and not _straddles_special(window, cut, spaced):
            return cut
        position = match.start() + 1
    return None


_SAFE_CUT_TEXT_LAST = regex.compile(r"(?r)\S ")  # searched from the end


def find_last_safe_cut(text: str, end: int, specials: Sequence[str]) -> int | None:
    """Last position p < end where cutting `text` before p is exact (see `find_safe_cut`), or None.

    `text` must extend past `end` by the longest special token (so an occurrence is seen whole).
    """
    spaced = [s for s in specials if " " in s]
    limit = end + 1  # the match "x " ends one past the cut
    while (match := _SAFE_CUT_TEXT_LAST.search(text, 0, limit)) is not None:
        cut = match.start() + 1
        if not _straddles_special(text, cut, spaced):
            return cut
        limit = match.start() + 1
    return None


def _utf8_char_start(data: bytes, position: int) -> int:
    """`position` moved back to the start of the UTF-8 character it falls in (at most 3 bytes)."""
    for back in range(4):
        if position - back <= 0 or (data[position - back] & 0xC0) != 0x80:
            return max(position - back, 0)
    return position


def file_units(path: Path, chunk_bytes: int, specials: Sequence[str]) -> Iterator[tuple[str, int, int, bool]]:
    """(path, start, end, forced) byte ranges of about `chunk_bytes` covering the file, cut exactly.

    Each cut is the first safe one at least `chunk_bytes` after the previous; when there is none
    within `16 * chunk_bytes`, the cut is forced there, at a character boundary (forced=True).
    """
    size = path.stat().st_size
    name = os.fspath(path)
    if size <= chunk_bytes:
        yield name, 0, size, False
        return
    special_bytes = [s.encode("utf-8") for s in specials]
    with open(path, "rb") as file:
        start = 0
        while size - start > chunk_bytes:
            cut, forced = _next_cut(file, size, start + chunk_bytes, start + _FORCED_CUT_FACTOR * chunk_bytes, special_bytes)
            if cut is None:
                break
            yield name, start, cut, forced
            start = cut
        yield name, start, size, False


def _next_cut(file, size: int, target: int, limit: int, specials: list[bytes]) -> tuple[int | None, bool]:
    """(cut, forced): the first safe cut in [target, limit) read through 64 KiB windows; else a
    forced cut at `limit` (None when the file ends before `limit`)."""
    margin = max(map(len, specials), default=0)  # context read around a window to see specials whole
    position = target
    while position < min(limit, size):
        span = min(1 << 16, limit - position)
        window_start = max(position - margin, 0)
        file.seek(window_start)
        window = file.read(position - window_start + span + margin)
        at_eof = window_start + len(window) >= size
        end = min(position - window_start + span, len(window) if at_eof else len(window) - margin)
        found = find_safe_cut(window, position - window_start, end, specials)
        if found is not None:
            return window_start + found, False
        position += span
    if limit >= size:
        return None, False
    file.seek(limit - 3)
    return limit - 3 + _utf8_char_start(file.read(4), 3), True


def split_text(text: str, chunk_chars: int, specials: Sequence[str]) -> list[str]:
    """`text` cut exactly into pieces of about `chunk_chars` characters (one piece if none is safe)."""
    if len(text) <= chunk_chars:
        return [text]
    pieces = []
    start = 0
    while len(text) - start > chunk_chars:
        cut = find_safe_cut(text, start + chunk_chars, len(text), specials)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


# --- counting ---------------------------------------------------------------------------------

Item = str | tuple[str, int, int, bool]  # a text, a file range (path, start, end, forced), or a TextPiece


class TextPiece(str):
    """A piece of a long in-memory text after its first piece (so it is not counted as a document)."""


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(start)
        return file.read(end - start)


def count_task(items: list[Item], pattern: str, special_tokens: tuple[str, ...]) -> tuple[dict[bytes, int], PretokenStats]:
    """Count the pre-tokens of some texts / file ranges (runs in a worker process)."""
    findall = compile_pattern(pattern).findall
    splitter = special_token_splitter(special_tokens)
    counter: Counter[str] = Counter()
    num_bytes = documents = specials = invalid = replaced = forced = 0
    for item in items:
        if isinstance(item, str):
            try:
                num_bytes += len(item.encode("utf-8"))
                text = item
            except UnicodeEncodeError:
                text = replace_lone_surrogates(item)
                num_bytes += len(text.encode("utf-8"))
            documents += not isinstance(item, TextPiece)
        else:
            path, start, end, was_forced = item
            text, bad, inserted = decode_utf8_counting(_read_range(path, start, end))
            num_bytes += end - start
            documents += start == 0
            invalid += bad
            replaced += inserted
            forced += was_forced
        pieces = splitter.split(text) if splitter is not None else (text,)
        specials += len(pieces) - 1
        for piece in pieces:
            for block in split_text(piece, _FINDALL_CHARS, ()):  # bounds the list findall builds
                counter.update(findall(block))
    counts = {token.encode("utf-8"): count for token, count in counter.items()}
    stats = PretokenStats(
        num_bytes=num_bytes, num_documents=documents, num_pretokens=counter.total(), num_special_tokens=specials,
        invalid_utf8_bytes=invalid, invalid_utf8_replacements=replaced, forced_cuts=forced,
        peak_worker_rss_bytes=peak_rss_bytes(),
    )
    return counts, stats


def _file_tasks(files: Iterable[Path], chunk_bytes: int, task_bytes: int, specials: tuple[str, ...]) -> Iterator[list[Item]]:
    """Tasks of about `task_bytes`, each a list of file ranges; produced lazily."""
    batch: list[Item] = []
    size = 0
    for path in files:
        for unit in file_units(path, chunk_bytes, specials):
            batch.append(unit)
            size += unit[2] - unit[1]
            if size >= task_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _text_tasks(texts: Iterable[str], chunk_chars: int, task_chars: int, specials: tuple[str, ...]) -> Iterator[list[Item]]:
    """Tasks of about `task_chars` characters of in-memory text (long texts cut exactly)."""
    batch: list[Item] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerError(f"an in-memory corpus must yield str, got {type(text).__name__}")
        for index, piece in enumerate(split_text(text, chunk_chars, specials)):
            batch.append(TextPiece(piece) if index else piece)
            size += len(piece)
            if size >= task_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _process_context() -> multiprocessing.context.BaseContext:
    """forkserver where it exists: forking a process that runs threads (JAX's, BLAS's) can
    deadlock the child; spawn elsewhere. As with any such pool, a script calling this must guard
    its entry point with `if __name__ == "__main__":` (workers import the main module)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _run_tasks(tasks: Iterator[list[Item]], pattern: str, specials: tuple[str, ...], num_workers: int):
    """Yield each task's (counts, stats), at most 2 * num_workers tasks in flight (bounded memory).

    With one worker, or when the corpus fits in one task, everything runs in this process.
    """
    first_two = list(itertools.islice(tasks, 2))
    tasks = itertools.chain(first_two, tasks)
    if num_workers <= 1 or len(first_two) < 2:
        for task in tasks:
            yield count_task(task, pattern, specials)
        return
    with ProcessPoolExecutor(num_workers, mp_context=_process_context()) as pool:
        pending = set()
        for task in tasks:
            pending.add(pool.submit(count_task, task, pattern, specials))
            while len(pending) >= 2 * num_workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in done)


def merge_counts(total: dict[bytes, int], part: dict[bytes, int]) -> None:
    """total += part, in place."""
    get = total.get
    for token, count in part.items():
        total[token] = get(token, 0) + count


def count_pretokens(
    corpus: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    pattern: str = GPT2_PATTERN,
    special_tokens: Sequence[str] = (),
    num_workers: int | None = None,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    task_bytes: int = TASK_BYTES,
) -> tuple[dict[bytes, int], PretokenStats]:
    """({pre-token bytes: occurrences}, stats) over a corpus, streamed, on `num_workers` processes.

    corpus: a file, a folder (recursive), a glob ("data/**/*.txt"), a list of them (Path objects,
    or strings that all name existing files / folders / matching globs), or any other iterable
    of str, each one document (a plain str is always a path: pass one text as [text]).
    Special tokens are split out first and never counted. Invalid UTF-8 in files becomes U+FFFD
    and is counted in the stats (with a warning). num_workers: default os.cpu_count().
    """
    specials = tuple(special_tokens)
    special_token_splitter(specials)  # validates before any work starts
    compile_pattern(pattern)
    num_workers = max(1, num_workers if num_workers is not None else (os.cpu_count() or 1))
    skipped = 0
    if _is_path_corpus(corpus):
        files, skipped = list_corpus_files(corpus)
        if not files:
            raise TokenizerError(f"corpus {_describe(corpus)} has no text files ({skipped} binary files skipped)")
        tasks = _file_tasks(files, chunk_bytes, task_bytes, specials)
    else:
        tasks = _text_tasks(corpus, chunk_bytes, task_bytes, specials)
    counts: dict[bytes, int] = {}
    stats = PretokenStats(skipped_binary_files=skipped)
    for part, part_stats in _run_tasks(tasks, pattern, specials, num_workers):
        if counts:
            merge_counts(counts, part)
        else:
            counts = part
        stats += part_stats
    stats = dataclasses.replace(stats, num_unique_pretokens=len(counts))
    if not counts:
        raise TokenizerError(
            f"corpus {_describe(corpus)} is empty: {stats.num_bytes} bytes in {stats.num_documents} documents "
            "and no text outside special tokens; give it some text"
        )
    if stats.invalid_utf8_bytes:
        warnings.warn(
            f"corpus {_describe(corpus)}: {stats.invalid_utf8_bytes} bytes of invalid UTF-8 were replaced by "
            f"{stats.invalid_utf8_replacements} U+FFFD characters", stacklevel=2,
        )
    return counts, stats


def _describe(corpus) -> str:
    if isinstance(corpus, (str, os.PathLike)):
        return repr(os.fspath(corpus))
    if isinstance(corpus, Sequence):
        return f"of {len(corpus)} items"
    return "(iterable of texts)"
