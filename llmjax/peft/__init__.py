"""Parameter-efficient fine-tuning: LoRA adapters (and QLoRA on NF4-quantized bases)."""
