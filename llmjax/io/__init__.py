"""Checkpoint interop: Hugging Face safetensors import / export (GPT-2, LLaMA, Mistral, Mixtral)."""

from llmjax.io.hf import (
    CheckpointMismatchError,
    config_from_hf,
    hf_config_from,
    hf_tensor_shapes,
    load_hf_checkpoint,
    save_hf_checkpoint,
)

__all__ = [
    "CheckpointMismatchError",
    "config_from_hf",
    "hf_config_from",
    "hf_tensor_shapes",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
]
