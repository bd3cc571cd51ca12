"""The --lora flags of the experiments that can train adapters instead of every weight (`sft`, `dpo`).

Cheap to import (argparse only), so `--help` stays fast; a LoRA setting given without --lora is an error, not ignored.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmjax.peft.lora import LoraConfig


class _LoraFlag(argparse.Action):
    """Stores (append=True: appends) the value and notes the flag in namespace.lora_flags, so a LoRA setting given
    without --lora is refused rather than ignored."""

    def __init__(self, *args, append: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.append = append

    def __call__(self, parser, namespace, values, option_string=None):
        if self.append:
            values = [*(getattr(namespace, self.dest) or []), values]
        setattr(namespace, self.dest, values)
        namespace.lora_flags = (*namespace.lora_flags, option_string)


def add_lora_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--lora and its settings (--rank, --alpha, --dropout, --target); `what`: what the adapters are trained on."""
    parser.set_defaults(lora_flags=())
    group = parser.add_argument_group("LoRA (--lora)")
    group.add_argument("--lora", action="store_true",
                       help=f"train LoRA adapters on {what}, the base frozen, instead of every weight; the run folder "
                            f"gets lora-checkpoints/ (resume), adapter/ (Hugging Face PEFT files) and, at the end, "
                            f"checkpoints/ with the adapters merged into the base")
    group.add_argument("--rank", type=int, default=8, action=_LoraFlag, help="--lora: the adapters' rank")
    group.add_argument("--alpha", type=float, default=16.0, action=_LoraFlag,
                       help="--lora: LoRA alpha (updates scaled by alpha / rank)")
    group.add_argument("--dropout", type=float, default=0.05, action=_LoraFlag,
                       help="--lora: dropout of the adapter path's input features")
    group.add_argument("--target", default=None, metavar="REGEX", action=_LoraFlag, append=True,
                       help="--lora: weights to adapt, a regex over names like blocks/attn/q/kernel (repeatable; "
                            "default: attention q/k/v/o and the MLP)")


def lora_config_from_args(args) -> LoraConfig | None:
    """The LoraConfig of --lora (None without it); ValueError for a LoRA setting without --lora or a bad one."""
    if not args.lora:
        if args.lora_flags:
            given = ", ".join(dict.fromkeys(args.lora_flags))
            raise ValueError(f"{given} set{'s' if len(args.lora_flags) == 1 else ''} up LoRA adapters: add --lora, "
                             f"or drop {'it' if len(args.lora_flags) == 1 else 'them'} to train every weight")
        return None
    from llmjax.peft.lora import LoraConfig
    from llmjax.quant.model import DEFAULT_TARGETS

    return LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                      targets=tuple(args.target) if args.target else DEFAULT_TARGETS)
