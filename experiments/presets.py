"""The named model configurations and their parameter counts (computed, not typed)."""

from __future__ import annotations

import argparse

from llmjax.config import PRESETS, ModelConfig, count_params


def family(cfg: ModelConfig) -> str:
    return "GPT-2" if cfg.positions == "learned" else "LLaMA"


def human(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}K"


def presets_markdown() -> str:
    """The preset table as Markdown (the README's table is exactly this text)."""
    rows = [
        "| preset | family | layers | d_model | heads (kv) | d_ff | vocab | context | parameters |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, cfg in PRESETS.items():
        params = count_params(cfg)
        rows.append(
            f"| `{name}` | {family(cfg)} | {cfg.num_layers} | {cfg.d_model} | {cfg.num_heads} ({cfg.num_kv_heads}) "
            f"| {cfg.d_ff} | {cfg.vocab_size} | {cfg.max_seq_len} | {params:,} ({human(params)}) |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments presets",
        description="Print every named model preset with its sizes and parameter count (vocab unpadded, as "
        "Hugging Face counts it; the embedding we allocate is padded to a multiple of vocab_multiple).",
    )
    parser.parse_args(argv)
    print(presets_markdown())
    return 0
