"""Checkpoint interop: Hugging Face safetensors import / export (GPT-2, LLaMA, Mistral, Mixtral) and GGUF import
(LLaMA-family and GPT-2 files of llama.cpp / ollama)."""

from llmjax.io.gguf import (
    GGUFError,
    config_from_gguf,
    dequantize,
    load_gguf,
    quantized_matrix,
    read_gguf,
    read_metadata,
    resolve_gguf,
)
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
    "GGUFError",
    "config_from_gguf",
    "config_from_hf",
    "dequantize",
    "hf_config_from",
    "hf_tensor_shapes",
    "load_gguf",
    "load_hf_checkpoint",
    "quantized_matrix",
    "read_gguf",
    "read_metadata",
    "resolve_gguf",
    "save_hf_checkpoint",
]
