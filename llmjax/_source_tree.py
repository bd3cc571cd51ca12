"""`llmjax.kernels` and `llmjax.experiments` in a source checkout that is not installed.

The repository keeps `kernels/` and `experiments/` beside `llmjax/`; an install (wheel or `pip install -e .`)
maps them to `llmjax.kernels` and `llmjax.experiments` (setup.py's package_dir), so the distribution claims
no top-level name but `llmjax`. A checkout run with only its dependencies installed
(`PYTHONPATH=. python3 -m experiments NAME`, as on the lent GPU machine) has no such mapping; this finder
gives those two names the same folders there. It is consulted last, so an install's own finders win.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_FOLDERS = {"llmjax.kernels": _ROOT / "kernels", "llmjax.experiments": _ROOT / "experiments"}


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds exactly `llmjax.kernels` and `llmjax.experiments` in the checkout's top-level folders."""

    def find_spec(self, fullname, path=None, target=None):
        folder = _FOLDERS.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install() -> None:
    """Append the finder when llmjax is imported from a checkout (pyproject.toml beside it); else do nothing."""
    if not (_ROOT / "pyproject.toml").is_file():
        return
    if not any(isinstance(finder, SourceTreeFinder) for finder in sys.meta_path):
        sys.meta_path.append(SourceTreeFinder())
