"""llmjax: a functional LLM systems stack on JAX/XLA."""

from llmjax.config import ConfigError, ModelConfig, PRESETS, RopeScaling, count_params, get_config

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "RopeScaling", "count_params", "get_config"]
__version__ = "0.1.0"
