"""Text corpora. The default corpus is the Python standard library's own source on this machine:
tens of MB of real text that every Python install has, so nothing needs downloading."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def default_corpus_files() -> list[Path]:
    """Every .py file of the standard library (site-packages excluded), in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library folder {stdlib}; pass a corpus explicitly")
    return sorted(files)


def read_text(path: Path) -> str:
    """A file's text; bytes that are not valid UTF-8 become U+FFFD rather than failing the run."""
    return path.read_bytes().decode("utf-8", errors="replace")
