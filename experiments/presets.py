"""The named model configurations and their parameter counts (computed, not typed)."""

from __future__ import annotations

import argparse

from llmjax.config import PRESETS, ModelConfig, count_params


def family(cfg: ModelConfig) -> str:
    if not cfg.causal:
        return "BERT"
    name = "GPT-2" if cfg.positions == "learned" else "LLaMA"
    return f"{name} MoE" if cfg.is_moe else name


def feed_forward(cfg: ModelConfig) -> str:
    """d_ff, or for MoE models: experts x width, top-k, and how often (dense blocks keep d_ff)."""
    if not cfg.is_moe:
        return str(cfg.d_ff)
    experts = f"{cfg.num_experts}x{cfg.expert_width} top-{cfg.experts_per_token}"
    if cfg.num_shared_experts:
        experts += f" +{cfg.num_shared_experts} shared"
    return experts if cfg.moe_every == 1 else f"{cfg.d_ff}; {experts} every {cfg.moe_every}"


def parameters(cfg: ModelConfig) -> str:
    total = count_params(cfg)
    if not cfg.is_moe:
        return f"{total:,} ({human(total)})"
    return f"{total:,} ({human(total)}; {human(count_params(cfg, active=True))} active)"


def human(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}K"


def presets_markdown() -> str:
    """The preset table as Markdown (the README's table is exactly this text)."""
    rows = [
        "| preset | family | layers | d_model | heads (kv) | d_ff | vocab | context | parameters |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, cfg in PRESETS.items():
        rows.append(
            f"| `{name}` | {family(cfg)} | {cfg.num_layers} | {cfg.d_model} | {cfg.num_heads} ({cfg.num_kv_heads}) "
            f"| {feed_forward(cfg)} | {cfg.vocab_size} | {cfg.max_seq_len} | {parameters(cfg)} |"
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
