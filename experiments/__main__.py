"""Dispatch `python -m experiments NAME [flags]` to experiments/NAME.py."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import experiments

USAGE = "usage: python -m experiments NAME [flags]   (python -m experiments NAME --help for its flags)"


def available() -> dict[str, str]:
    """{name: one-line description}, read from each module's docstring without importing it."""
    found = {}
    for module in pkgutil.iter_modules(experiments.__path__):
        if module.name.startswith("_"):
            continue
        source = Path(experiments.__path__[0], module.name + ".py").read_text()
        doc = ast.get_docstring(ast.parse(source)) or ""
        found[module.name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return dict(sorted(found.items()))


def print_help() -> None:
    print(USAGE)
    print("\nexperiments:")
    names = available()
    width = max(map(len, names))
    for name, description in names.items():
        print(f"  {name:<{width}}  {description}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return 0
    name, rest = argv[0], argv[1:]
    names = available()
    if name not in names:
        print(f"python -m experiments: unknown experiment {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"experiments.{name}")
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
