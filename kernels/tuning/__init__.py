"""Tuned tile tables, one JSON file per kernel family, with the device they were tuned on.

Each file (kernels/tuning/FAMILY.json, shipped as package data) holds {"device": what it was tuned on,
"source": the command or docs/perf.md section that measured it, "tables": the family's tables}. A kernel
module loads its file once at import (`load_tables`) and turns the plain JSON into its own types; heuristics
(a few thresholds in a function) stay in the kernel's code.
"""

from __future__ import annotations

import json
from pathlib import Path

TUNING_DIR = Path(__file__).resolve().parent


class TuningTableError(RuntimeError):
    """A tuning table file that is missing or does not hold what its kernel expects."""


def table_path(family: str) -> Path:
    return TUNING_DIR / f"{family}.json"


def load_tables(family: str, path: Path | None = None) -> dict:
    """The "tables" of kernels/tuning/FAMILY.json (or of `path`), checked for its "device" and "tables" fields."""
    path = table_path(family) if path is None else Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TuningTableError(f"tuning table {path} for the {family} kernels is missing; it ships with the package "
                               "(reinstall llmjax, or restore the file from git)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TuningTableError(f"tuning table {path} for the {family} kernels cannot be read ({error}); restore the "
                               "file from git") from None
    if not isinstance(data, dict) or not isinstance(data.get("device"), str) or not isinstance(data.get("tables"),
                                                                                               dict):
        raise TuningTableError(f"tuning table {path} must be a JSON object with a \"device\" string and a "
                               "\"tables\" object; restore the file from git")
    return data["tables"]


def table_entry(tables: dict, keys: tuple[str, ...], family: str):
    """tables[keys[0]][keys[1]]..., with an error naming the file and the missing key."""
    value = tables
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise TuningTableError(f"tuning table {table_path(family)} lacks {'/'.join(keys[: depth + 1])}; restore "
                                   "the file from git")
        value = value[key]
    return value
