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


def warn_if_gpu_unused(already_said: set[str]) -> None:
    """Print one line (stderr, once per reason) when jax is not using the NVIDIA GPU this machine has."""
    from llmjax.devices import gpu_unused_reason

    reason = gpu_unused_reason()
    if reason is not None and reason not in already_said:
        already_said.add(reason)
        print(f"llmjax: {reason}", file=sys.stderr, flush=True)


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
    said: set[str] = set()
    warn_if_gpu_unused(said)  # before: a missing CUDA plugin, JAX_PLATFORMS=cpu
    status = module.main(rest) or 0
    # After: CUDA that failed to start is only known once the run has started jax, which the check before must not
    # do itself (the experiment sets XLA_FLAGS and calls jax.distributed.initialize before jax's first device query).
    warn_if_gpu_unused(said)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
