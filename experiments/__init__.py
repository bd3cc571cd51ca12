"""Runnable experiments: `python -m experiments NAME [flags]`; `python -m experiments --help` lists them.

Installed, this folder is the package `llmjax.experiments` (`python -m llmjax.experiments NAME`, or the
`llmjax-experiments` command); in a checkout it is imported under that name too.

Each module here (not starting with `_`) is one experiment: its docstring's first line is its
one-line description, and it defines `main(argv: list[str] | None = None) -> int`.
"""
