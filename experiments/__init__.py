"""Runnable experiments: `python -m experiments NAME [flags]`; `python -m experiments --help` lists them.

Each module here (not starting with `_`) is one experiment: its docstring's first line is its
one-line description, and it defines `main(argv: list[str] | None = None) -> int`.
"""
