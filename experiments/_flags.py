"""Flag helpers shared by experiments (not an experiment itself)."""

from __future__ import annotations

import argparse


def apply_quick(parser: argparse.ArgumentParser, args: argparse.Namespace, values: dict) -> None:
    """--quick: each flag in `values` left at its default takes the quick value (flags the user set win)."""
    for name, value in values.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
