"""Text corpora: where documents come from, and the train / validation split.

A corpus is files, folders or glob patterns. Plain text files (any suffix; `.gz` is decompressed)
are one document each; `.jsonl` files hold one document per line in a text field; `.parquet`
files one per row of a text column (read with pyarrow). With no corpus given, the default corpus
is the Python standard library's own source on this machine: tens of MB of real text that every
Python install has, so nothing needs downloading.

Bytes that are not valid UTF-8 become U+FFFD and are counted (`Document.replaced`,
`CorpusStats`), so a run reports them instead of failing or silently hiding them.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

VALIDATION_FRACTION = 0.01
SPLITS = ("train", "validation")
RECORD_SUFFIXES = (".jsonl", ".parquet")
SKIPPED_FOLDERS = {"__pycache__"}
REPLACEMENT = "\ufffd"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class CorpusError(ValueError):
    """A corpus that cannot be read: nothing matches, a malformed record, a missing package."""


@dataclass(frozen=True)
class Document:
    """One document's text, where it came from, and its stable split key."""

    text: str
    source: str  # for people: "path", "path line 12", "path row 7"
    key: str  # for the split: path relative to its corpus root (+ ":line" for records)
    replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD


@dataclass(frozen=True)
class CorpusFile:
    """A file of the corpus and its key: the path relative to the folder (or glob root) it was
    found under, so the split does not depend on where the corpus lives on disk."""

    path: Path
    key: str


@dataclass
class CorpusStats:
    """What a pass over a corpus saw; `add` each document as it streams by."""

    documents: int = 0
    utf8_bytes: int = 0
    empty_documents: int = 0
    invalid_utf8_documents: int = 0
    replaced_sequences: int = 0
    invalid_utf8_examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, document: Document, utf8_bytes: int) -> None:
        self.documents += 1
        self.utf8_bytes += utf8_bytes
        if not document.text:
            self.empty_documents += 1
        if document.replaced:
            self.invalid_utf8_documents += 1
            self.replaced_sequences += document.replaced
            if len(self.invalid_utf8_examples) < self.max_examples:
                self.invalid_utf8_examples.append(document.source)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "max_examples"}

    def summary(self) -> str:
        """One line for people, e.g. "1,723 documents, 31.2 MB of text; invalid UTF-8 in 3 ..."."""
        line = f"{self.documents:,} documents, {self.utf8_bytes / 1e6:.1f} MB of text"
        if self.empty_documents:
            line += f" ({self.empty_documents:,} empty, skipped)"
        if self.invalid_utf8_documents:
            line += (
                f"; invalid UTF-8 in {self.invalid_utf8_documents:,} documents ({self.replaced_sequences:,} byte "
                f"sequences replaced by U+FFFD), e.g. {', '.join(self.invalid_utf8_examples)}"
            )
        return line


# --- decoding -------------------------------------------------------------------------------


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """(text, number of invalid UTF-8 sequences replaced by U+FFFD).

    The count is exact: a genuine U+FFFD in the input is the valid sequence EF BF BD, which no
    invalid sequence can swallow, so replaced = U+FFFDs out - EF BF BDs in.
    """
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode())


def read_text(path: Path) -> str:
    """A file's text; bytes that are not valid UTF-8 become U+FFFD rather than failing the run."""
    return decode_utf8(read_bytes(Path(path)))[0]


def read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed when its name ends in .gz."""
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as file:
            return file.read()
    return path.read_bytes()


def replace_lone_surrogates(text: str) -> tuple[str, int]:
    """JSON "\\ud800" escapes decode to lone surrogates, which are not text: U+FFFD them, counted."""
    return LONE_SURROGATE.subn(REPLACEMENT, text)


# --- the default corpus: the standard library ------------------------------------------------


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(root: str | Path | None = None) -> list[Path]:
    """Every .py file of the standard library (site-packages excluded), in a fixed order. root: a copy of a
    standard library folder to read instead of this Python's (another machine's, carried, so that a data set made
    there is the one made here: distributions ship different subsets, e.g. without test/ or idlelib/)."""
    stdlib = stdlib_folder() if root is None else Path(root)
    files = [p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    if not files:
        raise CorpusError(f"no .py files under the standard library folder {stdlib}; pass a corpus explicitly")
    return sorted(files)


def default_corpus(root: str | Path | None = None) -> list[CorpusFile]:
    stdlib = stdlib_folder() if root is None else Path(root)
    return [CorpusFile(p, p.relative_to(stdlib).as_posix()) for p in default_corpus_files(stdlib)]


def default_corpus_split(split: str, validation_fraction: float = VALIDATION_FRACTION) -> list[Path]:
    """The default corpus's files of one split ("train" or "validation"): ~1% of the files are
    validation, chosen by a stable hash of their path relative to the standard library folder,
    so every machine with the same Python version gets the same split."""
    return [f.path for f in split_files(default_corpus(), split, validation_fraction)]


# --- the split ------------------------------------------------------------------------------


def split_hash(key: str) -> float:
    """A stable number in [0, 1) for a key (sha256: the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(key: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    return "validation" if split_hash(key) < validation_fraction else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise CorpusError(f"split must be one of {SPLITS}, not {split!r}")


def split_files(files: Sequence[CorpusFile], split: str, validation_fraction: float = VALIDATION_FRACTION) -> list[CorpusFile]:
    """The files of one split, by `split_of` their key; with two or more files, each split gets
    at least one (the file with the lowest hash is validation, the highest is train)."""
    check_split(split)
    validation = {f.key for f in files if split_of(f.key, validation_fraction) == "validation"}
    if len(files) >= 2:
        ranked = sorted(files, key=lambda f: split_hash(f.key))
        if not validation:
            validation = {ranked[0].key}
        if len(validation) == len(files):
            validation.discard(ranked[-1].key)
    return [f for f in files if (f.key in validation) == (split == "validation")]


# --- finding the files ----------------------------------------------------------------------


def resolve_corpus(specs: str | Path | Iterable[str | Path]) -> list[CorpusFile]:
    """Files of a corpus given as files, folders (searched recursively, skipping hidden entries
    and __pycache__) or glob patterns ("data/**/*.txt"), in a fixed order, without duplicates."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    found: dict[Path, CorpusFile] = {}
    for spec in specs:
        for corpus_file in resolve_one(str(spec)):
            found.setdefault(corpus_file.path.resolve(), corpus_file)
    if not found:
        raise CorpusError(f"the corpus {[str(s) for s in specs]} is empty: give files, folders or glob patterns")
    return list(found.values())


def resolve_one(spec: str) -> list[CorpusFile]:
    path = Path(spec)
    if path.is_file():
        return [CorpusFile(path, path.name)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not is_skipped(p.relative_to(path)))
        if not files:
            raise CorpusError(f"corpus folder {path} holds no files")
        return [CorpusFile(p, p.relative_to(path).as_posix()) for p in files]
    if glob.has_magic(spec):
        root = glob_root(spec)
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise CorpusError(f"corpus pattern {spec!r} matches no files")
        return [CorpusFile(p, p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()) for p in files]
    raise CorpusError(f"corpus {spec!r} is not a file, a folder or a glob pattern that exists")


def is_skipped(relative: Path) -> bool:
    return any(part.startswith(".") or part in SKIPPED_FOLDERS for part in relative.parts)


def glob_root(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard: "data/*/x.txt" -> data."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def record_format(path: Path) -> str | None:
    """"jsonl" or "parquet" for record files (also .jsonl.gz), None for plain text."""
    name = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    for suffix in RECORD_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return None


# --- reading documents ----------------------------------------------------------------------


def corpus_documents(
    corpus: str | Path | Iterable[str | Path] | None = None,
    *,
    split: str | None = None,
    text_field: str = "text",
    validation_fraction: float = VALIDATION_FRACTION,
) -> Iterator[Document]:
    """Documents of a corpus (None: the default corpus), optionally of one split only.

    Files are found now (so a wrong path fails here, not mid-run); documents are read lazily.
    Text files split by file; JSONL and Parquet records split by record.
    """
    files = default_corpus() if corpus is None else resolve_corpus(corpus)
    if split is not None:
        check_split(split)
        text_files = [f for f in files if record_format(f.path) is None]
        kept = {f.path for f in split_files(text_files, split, validation_fraction)}
        files = [f for f in files if f.path in kept or record_format(f.path) is not None]
    return _documents(files, split, text_field, validation_fraction)


def _documents(files: list[CorpusFile], split: str | None, text_field: str, validation_fraction: float) -> Iterator[Document]:
    for corpus_file in files:
        for document in file_documents(corpus_file, text_field):
            if split is None or record_format(corpus_file.path) is None or split_of(document.key, validation_fraction) == split:
                yield document


def file_documents(corpus_file: CorpusFile, text_field: str = "text") -> Iterator[Document]:
    """The documents of one file, by its format."""
    kind = record_format(corpus_file.path)
    if kind == "jsonl":
        yield from jsonl_documents(corpus_file, text_field)
    elif kind == "parquet":
        yield from parquet_documents(corpus_file, text_field)
    else:
        text, replaced = decode_utf8(read_bytes(corpus_file.path))
        yield Document(text, str(corpus_file.path), corpus_file.key, replaced)


def jsonl_documents(corpus_file: CorpusFile, text_field: str = "text") -> Iterator[Document]:
    """One document per non-blank line: the line's JSON object's `text_field` string."""
    path = corpus_file.path
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            line, replaced = decode_utf8(raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorpusError(f"{path} line {line_number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                has = (f"its keys are {sorted(record)[:10]}" if isinstance(record, dict)
                       else f"it is a JSON {type(record).__name__}")
                raise CorpusError(
                    f"{path} line {line_number}: no {text_field!r} field ({has}); choose the field with --text-field"
                )
            text = record[text_field]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise CorpusError(f"{path} line {line_number}: field {text_field!r} holds a {type(text).__name__}, not text")
            text, surrogates = replace_lone_surrogates(text)
            yield Document(text, f"{path} line {line_number}", f"{corpus_file.key}:{line_number}", replaced + surrogates)


def parquet_documents(corpus_file: CorpusFile, text_field: str = "text") -> Iterator[Document]:
    """One document per row of a Parquet file's `text_field` column (streamed in batches)."""
    path = corpus_file.path
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise CorpusError(f"reading the Parquet file {path} needs the pyarrow package: pip install pyarrow") from None
    try:
        reader = parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise CorpusError(f"{path}: not a readable Parquet file ({error})") from None
    columns = reader.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(f"{path}: no column {text_field!r} (its columns are {columns[:10]}); choose one with --text-field")
    row = 0
    for batch in reader.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            replaced = 0
            if value is None:
                value = ""
            elif isinstance(value, bytes):
                value, replaced = decode_utf8(value)
            elif not isinstance(value, str):
                raise CorpusError(f"{path} row {row}: column {text_field!r} holds a {type(value).__name__}, not text")
            yield Document(value, f"{path} row {row}", f"{corpus_file.key}:{row}", replaced)


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))
