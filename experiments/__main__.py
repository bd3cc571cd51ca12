"""Dispatch `python -m experiments NAME [flags]` to experiments/NAME.py.

The folder is the package `llmjax.experiments` (in a checkout and installed alike), so every experiment is
imported under that one name. From a checkout's root `python -m experiments` finds this file directly;
installed, the same runs as `python -m llmjax.experiments` or the `llmjax-experiments` command.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import llmjax.experiments as package

PROG = "python -m experiments"  # as started from a checkout; main's `prog` names the other ways


def usage(prog: str = PROG) -> str:
    return f"usage: {prog} NAME [flags]   ({prog} NAME --help for its flags)"


def available() -> dict[str, str]:
    """{name: one-line description}, read from each module's docstring without importing it."""
    found = {}
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith("_"):  # helpers (e.g. _torch_gpt, bench_train's peer), not experiments
            continue
        source = Path(package.__path__[0], module.name + ".py").read_text()
        doc = ast.get_docstring(ast.parse(source)) or ""
        found[module.name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return dict(sorted(found.items()))


def print_help(prog: str = PROG) -> None:
    print(usage(prog))
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


def main(argv: list[str], prog: str = PROG) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help(prog)
        return 0
    name, rest = argv[0], argv[1:]
    names = available()
    if name not in names:
        print(f"{prog}: unknown experiment {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{package.__name__}.{name}")
    said: set[str] = set()
    warn_if_gpu_unused(said)  # before: a missing CUDA plugin, JAX_PLATFORMS=cpu
    status = module.main(rest) or 0
    # After: CUDA that failed to start is only known once the run has started jax, which the check before must not
    # do itself (the experiment sets XLA_FLAGS and calls jax.distributed.initialize before jax's first device query).
    warn_if_gpu_unused(said)
    return status


def console() -> int:
    """The `llmjax-experiments` command ([project.scripts])."""
    return main(sys.argv[1:], prog="llmjax-experiments")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog=f"python -m {__spec__.parent}"))
